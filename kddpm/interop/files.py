"""Reading and writing diffusers folders: ``from_diffusers`` and ``to_diffusers``.

A pipeline folder as ``DDPMPipeline.save_pretrained`` writes it (``model_index.json``, ``unet/``,
``scheduler/``) or a bare model folder; weights in safetensors (read with its numpy API), or a
PyTorch ``.bin`` where torch is installed.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from kddpm.errors import KddpmError
from kddpm.hub import resolve_checkpoint
from kddpm.interop.scheduler import diffusers_scheduler_config, schedule_from_config
from kddpm.interop.unet import (
    DIFFUSERS_VERSION,
    check_same_function,
    diffusers_tensors,
    diffusers_unet_config,
    load_diffusers_weights,
    unet_architecture,
    unet_kwargs_from_config,
)
from kddpm.model import DiffusionModel
from kddpm.unet import build_unet

WEIGHTS_FILE = "diffusion_pytorch_model.safetensors"
TORCH_WEIGHTS_FILE = "diffusion_pytorch_model.bin"


def from_diffusers(path: str | os.PathLike, log: Callable[[str], Any] | None = None) -> DiffusionModel:
    """A kddpm ``DiffusionModel`` holding a diffusers DDPM checkpoint.

    path: a pipeline folder as ``DDPMPipeline.save_pretrained`` writes it (``model_index.json``,
    ``unet/``, ``scheduler/``) or a bare model folder (``config.json`` + weights, optional
    ``scheduler_config.json`` beside them, as the Hub's google/ddpm-* repositories hold them),
    or a Hub id such as ``"google/ddpm-cifar10-32"`` (``kddpm.hub``: the optional
    huggingface_hub, its cache and ``HF_HUB_OFFLINE``).
    The weights go into both the trained and the EMA network (published weights are EMA
    weights); EMA warm-up is off, so that fine-tuning starts its average from them. The
    scheduler becomes the model's schedule, default DDPM variance (fixed_small: beta_tilde,
    fixed_large: beta) and default clip_x0 (clip_sample). Without a scheduler config the
    paper's linear schedule is used and ``log`` (default: a warning) says so.

    Anything outside the DDPM family of UNet2DModel is refused with the field and its value.
    """
    say = log or (lambda line: warnings.warn(line, stacklevel=3))
    unet_dir, scheduler_file = _locate(resolve_checkpoint(path))
    config = _read_json(unet_dir / "config.json")
    build_kwargs = unet_kwargs_from_config(config)
    tensors = _read_weights(unet_dir)
    network = build_unet(**build_kwargs, seed=0)
    load_diffusers_weights(network, tensors)

    if scheduler_file is None:
        say(
            f"No scheduler config found with {path} (scheduler/scheduler_config.json or scheduler_config.json); "
            "using the paper's linear schedule, 1e-4 to 0.02 over T = 1000, beta_tilde variance and clip_x0."
        )
        scheduler: dict[str, Any] = {}
    else:
        scheduler = _read_json(scheduler_file)
    schedule, variance, clip_x0 = schedule_from_config(scheduler, source=scheduler_file)
    return DiffusionModel(network, schedule, ema_warmup=False, variance=variance, clip_x0=clip_x0)


def _locate(path: Path) -> tuple[Path, Path | None]:
    """The U-Net's folder and the scheduler config (or None) of a pipeline or bare model folder."""
    if not path.is_dir():
        raise KddpmError(
            f"{path} is not a folder; give a diffusers pipeline folder (model_index.json, unet/, scheduler/) "
            "or a model folder (config.json + diffusion_pytorch_model.safetensors)."
        )
    if (path / "unet" / "config.json").is_file():
        scheduler = path / "scheduler" / "scheduler_config.json"
        return path / "unet", scheduler if scheduler.is_file() else None
    if (path / "config.json").is_file():
        scheduler = path / "scheduler_config.json"
        return path, scheduler if scheduler.is_file() else None
    raise KddpmError(
        f"{path} is not a diffusers model: it has neither unet/config.json (a pipeline folder) nor config.json "
        "(a model folder); download the whole repository, e.g. "
        "huggingface_hub.snapshot_download('google/ddpm-cifar10-32')."
    )


def _read_json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise KddpmError(f"Cannot read {path} ({error}); download it again.") from None
    if not isinstance(value, dict):
        raise KddpmError(f"{path} holds a JSON {type(value).__name__}, not a config object; download it again.")
    return value


def _read_weights(unet_dir: Path) -> dict[str, np.ndarray]:
    """The U-Net's tensors by diffusers name, as numpy arrays."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    path = unet_dir / WEIGHTS_FILE
    if path.is_file():
        try:
            return load_file(path)
        except (SafetensorError, OSError, ValueError) as error:
            raise KddpmError(
                f"Cannot read {path} ({error}); the file is damaged or truncated: download it again."
            ) from None
    if (unet_dir / TORCH_WEIGHTS_FILE).is_file():
        return _read_torch_weights(unet_dir / TORCH_WEIGHTS_FILE)
    raise KddpmError(f"{unet_dir} has config.json but no {WEIGHTS_FILE}; download the weights file too.")


def _read_torch_weights(path: Path) -> dict[str, np.ndarray]:
    """A PyTorch pickle of the weights, read with torch when it happens to be installed."""
    try:
        import torch
    except ImportError:
        raise KddpmError(
            f"{path} is a PyTorch pickle and kddpm reads safetensors without torch; convert it where torch is "
            'installed: python -c "import torch; from safetensors.torch import save_file; '
            f"save_file(torch.load('{path}', map_location='cpu'), '{path.with_name(WEIGHTS_FILE)}')\"."
        ) from None
    state = torch.load(path, map_location="cpu", weights_only=True)
    return {name: tensor.detach().float().numpy() for name, tensor in state.items()}


def to_diffusers(model: DiffusionModel, path: str | os.PathLike, use_ema: bool = True, overwrite: bool = False) -> Path:
    """Writes ``model`` as a ``DDPMPipeline.save_pretrained`` folder and returns its path.

    The folder holds ``model_index.json``, ``unet/config.json``, ``unet/diffusion_pytorch_model.
    safetensors`` (the EMA weights unless ``use_ema=False``) and ``scheduler/scheduler_config.json``;
    ``diffusers.DDPMPipeline.from_pretrained(path)`` loads it. A model the format cannot express
    is refused before anything is written; an existing folder is replaced only with
    ``overwrite=True``. The folder is written beside its place and renamed into it.
    """
    path = Path(path)
    if model.num_classes is not None:
        raise KddpmError(
            f"This model is class-conditional ({model.num_classes} classes with a null label for guidance); "
            "DDPMPipeline has no class labels, so the diffusers format cannot express it."
        )
    if path.exists() and not overwrite:
        raise KddpmError(f"{path} already exists; choose another --out or pass overwrite=True (--overwrite).")
    network = model.ema_denoiser if use_ema else model.denoiser
    build_kwargs = unet_architecture(network)
    named = build_unet(**build_kwargs, seed=0)
    named.set_weights(network.get_weights())
    check_same_function(network, named, model.schedule.timesteps)
    unet_config = diffusers_unet_config(build_kwargs)
    tensors = diffusers_tensors(named)
    scheduler_config = diffusers_scheduler_config(model)

    path.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=f".{path.name}.partial-", dir=path.parent))
    try:
        from safetensors.numpy import save_file

        (partial / "unet").mkdir()
        (partial / "scheduler").mkdir()
        _write_json(partial / "model_index.json", _model_index())
        _write_json(partial / "unet" / "config.json", unet_config)
        save_file(tensors, str(partial / "unet" / WEIGHTS_FILE), metadata={"format": "pt"})
        _write_json(partial / "scheduler" / "scheduler_config.json", scheduler_config)
        if path.exists():
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            os.replace(path, old)
            os.replace(partial, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(partial, path)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return path


def _model_index() -> dict[str, Any]:
    return {
        "_class_name": "DDPMPipeline",
        "_diffusers_version": DIFFUSERS_VERSION,
        "scheduler": ["diffusers", "DDPMScheduler"],
        "unet": ["diffusers", "UNet2DModel"],
    }


def _write_json(path: Path, value: dict[str, Any]) -> None:
    path.write_text(json.dumps(value, indent=2, sort_keys=True) + "\n")
