"""Loading a saved DiffusionModel, with one-line errors that say what the file is and what to do.

``model_file`` and ``model_config`` need no TensorFlow: the command line checks a model and
reads its settings (shape, classes, T) before any slow work.
"""

from __future__ import annotations

import json
import os
import zipfile
import zlib
from pathlib import Path
from typing import Any

from kddpm.errors import KddpmError

_RESTORE = "restore it from the run's checkpoints/ or backup, or retrain"


def load_diffusion_model(path: str | os.PathLike):
    """Loads a ``.keras`` file saved from a DiffusionModel, or ``RUN/model.keras`` for a run folder.

    Raises KddpmError naming the file when it is missing, of another kind (an ONNX file, a
    SavedModel, a weights file), unreadable, or not a DiffusionModel.
    """
    import keras

    from kddpm.model import DiffusionModel

    path = model_file(path)
    try:
        model = keras.models.load_model(path)
    except Exception as error:  # Keras raises many types for damaged archives
        reason = str(error).splitlines()[0][:200] if str(error) else ""
        raise KddpmError(
            f"Cannot read {path} ({type(error).__name__}: {reason}); the file is corrupt, truncated or not a Keras "
            "model: restore it from the run's checkpoints/ or retrain."
        ) from error
    if not isinstance(model, DiffusionModel):
        raise KddpmError(f"{path} holds a {type(model).__name__}, not a kddpm DiffusionModel.")
    return model


def model_config(path: str | os.PathLike) -> dict[str, Any]:
    """The saved DiffusionModel's own config (schedule, image_shape, num_classes, class_names,
    clip_x0, ...), read from the archive's config.json without building anything."""
    path = model_file(path)
    with zipfile.ZipFile(path) as archive:
        config = json.loads(archive.read("config.json"))
    if config.get("class_name") != "DiffusionModel":
        raise KddpmError(f"{path} holds a {config.get('class_name')}, not a kddpm DiffusionModel.")
    return config["config"]


def model_file(path: str | os.PathLike) -> Path:
    """The ``.keras`` file a model path names (``RUN/model.keras`` for a run folder), checked
    to exist, to be a ``.keras`` archive rather than a file of another kind, and to be intact."""
    path = Path(path)
    if path.is_dir():
        if (path / "saved_model.pb").is_file():
            raise KddpmError(
                f"{path} is an exported SavedModel (for TF Serving or tf.saved_model.load), not a kddpm model; "
                "give the run folder or .keras file it was exported from."
            )
        path = path / "model.keras"
    if not path.is_file():
        raise KddpmError(f"No model at {path}; give a run folder holding model.keras or a .keras file.")
    _check_kind(path)
    _check_keras_archive(path)
    return path


def _check_kind(path: Path) -> None:
    """Names files of other kinds by what they are, before they are read as a truncated archive."""
    with open(path, "rb") as file:
        head = file.read(8)
    if head.startswith(b"PK"):
        return  # a zip archive, as .keras files are
    suffix = path.suffix.lower()
    if suffix == ".onnx":
        kind = "an ONNX file (for ONNX Runtime and export/onnx_sample.py)"
    elif head.startswith(b"\x89HDF"):
        kind = "an HDF5 file (weights or a backup, without the model's configuration)"
    elif suffix in (".pb", ".safetensors", ".bin", ".npz", ".png", ".jpg", ".json"):
        kind = f"a {suffix} file"
    else:
        return  # left to the archive check, which says what is wrong with it
    raise KddpmError(
        f"{path} is {kind}, not a kddpm .keras model; give a run folder or the .keras file "
        "(kddpm convert --from-diffusers makes one from a diffusers checkpoint)."
    )


def _check_keras_archive(path: Path) -> None:
    """A ``.keras`` file is a zip archive: name truncation or damage before Keras reads it."""
    try:
        with zipfile.ZipFile(path) as archive:
            damaged = archive.testzip()
            names = set(archive.namelist())
    except zipfile.BadZipFile:
        raise KddpmError(
            f"{path} is truncated or not a zip archive (a .keras file is one), so it is not a saved Keras model; "
            f"{_RESTORE}."
        ) from None
    except (OSError, EOFError, zlib.error) as error:
        raise KddpmError(f"{path} is damaged ({error}); {_RESTORE}.") from None
    if damaged is not None:
        raise KddpmError(f"{path} is damaged: its member {damaged} fails its checksum; {_RESTORE}.")
    if "config.json" not in names:
        raise KddpmError(f"{path} is a zip archive without config.json, not a saved Keras model; {_RESTORE}.")
