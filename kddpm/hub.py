"""Hugging Face Hub ids for ``from_diffusers``: ``google/ddpm-cifar10-32`` instead of a folder.

huggingface_hub is an optional extra (``pip install 'kddpm[hub]'``): it downloads into its own
cache (``HF_HOME`` / ``HF_HUB_CACHE``) and, with ``HF_HUB_OFFLINE=1``, answers from that cache
alone. Only the configs and safetensors weights are fetched, never a PyTorch ``.bin``.
"""

from __future__ import annotations

import importlib.util
import os
import re
from pathlib import Path

from kddpm.errors import KddpmError

# owner/name as the Hub spells repository ids (no leading dot or slash, one slash).
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")
_PATTERNS = ["*.json", "*.safetensors"]


def is_hub_id(path: str | os.PathLike) -> bool:
    """True for "owner/name" that is not an existing local path (a local folder always wins)."""
    text = os.fspath(path)
    return bool(_HUB_ID.match(text)) and not Path(text).exists()


def check_hub_available(path: str | os.PathLike) -> None:
    """Raises KddpmError before any work when ``path`` is a Hub id and huggingface_hub is missing."""
    if is_hub_id(path) and importlib.util.find_spec("huggingface_hub") is None:
        raise KddpmError(
            f"{os.fspath(path)} is not a local folder; to read it from the Hugging Face Hub, "
            "pip install 'kddpm[hub]' (or download it and give the folder)."
        )


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A local folder for ``path``: itself, or the Hub repository's snapshot in the cache."""
    if not is_hub_id(path):
        return Path(path)
    repo_id = os.fspath(path)
    check_hub_available(repo_id)
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, IncompleteSnapshotError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo_id, allow_patterns=_PATTERNS))
    except IncompleteSnapshotError as error:
        raise KddpmError(
            f"{repo_id} is only partly in the Hub cache and the Hub cannot be reached: download it again online."
        ) from error
    except LocalEntryNotFoundError as error:
        raise KddpmError(
            f"{repo_id} is neither a local folder nor in the Hub cache, and the Hub cannot be reached "
            "(HF_HUB_OFFLINE=1 or no network): download it once online, or give a local folder."
        ) from error
    except HfHubHTTPError as error:
        raise KddpmError(f"The Hub refused {repo_id}: {str(error).splitlines()[0]}") from error
