"""Exports a trained model's EMA denoiser for deployment, checking each export against Keras.

Two formats:

* **SavedModel for TF Serving**, written to ``BASE/<model_name>/<version>/`` with the
  signatures ``serving_default`` (``x_t``, ``t`` -> ``eps``), ``sample`` (``num_images``,
  ``seed``, ``sampler``, ``steps`` -> ``images`` uint8) and ``sample_from_noise`` (``x_T``,
  ``seed``, ``sampler``, ``steps`` -> ``images``); sampler "" and steps 0 ask for kddpm's
  defaults (DPM-Solver++(2M), 20 steps). A version is written to a hidden folder
  beside the final one, loaded back, compared with Keras, and only then renamed into place,
  so a server polling BASE never sees a half-written or wrong version.
* **ONNX** of the denoiser (``x_t``, ``t`` -> ``eps``, dynamic batch), converted with tf2onnx,
  with the schedule in ``metadata_props`` so that ``export/onnx_sample.py`` can sample with
  numpy and ONNX Runtime alone. ONNX Runtime's output is compared with Keras' before the file
  is written.

The sampling loop stays out of the ONNX file: tf2onnx cannot convert stateless random ops,
and noise drawn by the caller keeps the loop in plain numpy.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from kddpm.errors import KddpmError
from kddpm.loading import load_diffusion_model
from kddpm.model import DiffusionModel
from kddpm.networks import network_with_precision
from kddpm.sampling import check_clip_x0
from kddpm.sampling.plans import ROW_FIELDS
from kddpm.serving import serving_archive

FORMATS = ("saved_model", "onnx", "all")
DEFAULT_OPSET = 17
# Largest |ONNX Runtime - Keras| (or |SavedModel - Keras|) accepted on the parity check.
TOLERANCE = 1e-4
_PARITY_BATCHES = (1, 8)


@dataclasses.dataclass(frozen=True)
class ExportResult:
    """Where an export went and how far it is from Keras (max abs difference of eps)."""

    format: str
    path: Path
    max_abs_diff: float

    @property
    def label(self) -> str:
        return {"saved_model": "SavedModel", "onnx": "ONNX Runtime"}[self.format]


def export_model(
    model: DiffusionModel | str | os.PathLike,
    out: str | os.PathLike,
    format: str = "all",
    model_name: str = "kddpm",
    version: int | None = None,
    opset: int = DEFAULT_OPSET,
    clip_x0: bool | str | None = None,
    overwrite: bool = False,
    log: Callable[[str], Any] | None = None,
) -> list[ExportResult]:
    """Exports ``model`` (a DiffusionModel, a ``.keras`` file or a run folder) into ``out``.

    SavedModel: ``out/<model_name>/<version>/``; ONNX: ``out/<model_name>.onnx``. See
    ``export_saved_model`` and ``export_onnx`` for the arguments. Every format is written
    beside its final place and compared with Keras before any is published: when one fails
    (its target exists, or its parity check), nothing new appears. log: called with a line
    before each slow step.
    """
    log = log or (lambda line: None)
    if format not in FORMATS:
        raise KddpmError(f"Unknown export format {format!r}; use one of {FORMATS}.")
    out = Path(out)
    if format in ("saved_model", "all"):
        _saved_model_target(out, model_name, version)
    if format in ("onnx", "all"):
        _onnx_target(out / f"{model_name}.onnx", overwrite)
    if not isinstance(model, DiffusionModel):
        log(f"Loading {model}...")
        model = load_diffusion_model(model)
    staged: list[_Staged] = []
    try:
        if format in ("saved_model", "all"):
            log("Writing the SavedModel and checking it against the Keras model...")
            staged.append(_stage_saved_model(model, out, model_name, version, clip_x0))
        if format in ("onnx", "all"):
            log("Converting to ONNX and checking ONNX Runtime against the Keras model...")
            staged.append(_stage_onnx(model, out / f"{model_name}.onnx", opset, overwrite, clip_x0))
    except BaseException:
        # One format failed its check: none is published, so a retry starts from the same state.
        for item in staged:
            item.discard()
        raise
    return [item.publish() for item in staged]


@dataclasses.dataclass
class _Staged:
    """An export written beside its final place and checked, waiting to be renamed into it."""

    format: str
    partial: Path
    final: Path
    max_abs_diff: float

    def publish(self) -> ExportResult:
        try:
            os.replace(self.partial, self.final)
        except BaseException:
            self.discard()
            raise
        return ExportResult(self.format, self.final, self.max_abs_diff)

    def discard(self) -> None:
        if self.partial.is_dir():
            shutil.rmtree(self.partial, ignore_errors=True)
        else:
            self.partial.unlink(missing_ok=True)


def exported_network(model: DiffusionModel) -> keras.Model:
    """The network an export holds: the EMA denoiser, computing in float32.

    A mixed-precision model's weights are float32 already; its 16-bit compute policy is
    dropped, so that exports agree with Keras to float32 accuracy on any runtime.
    """
    return network_with_precision(model.ema_denoiser, "float32")


# --- SavedModel ------------------------------------------------------------------------------


def export_saved_model(
    model: DiffusionModel,
    base_dir: str | os.PathLike,
    model_name: str = "kddpm",
    version: int | None = None,
    clip_x0: bool | str | None = None,
) -> ExportResult:
    """Writes ``base_dir/<model_name>/<version>/`` (TF Serving's layout) and returns it.

    version: a positive integer; default one more than the highest version already there.
    An existing version is never replaced. clip_x0: whether the ``sample`` signatures clip
    the predicted x0 to [-1, 1] at each step (default: the model's ``clip_x0``). DDPM's
    variance is the model's ``variance``.
    """
    return _stage_saved_model(model, Path(base_dir), model_name, version, clip_x0).publish()


def _stage_saved_model(
    model: DiffusionModel, base_dir: Path, model_name: str, version: int | None, clip_x0: bool | None
) -> _Staged:
    clip_x0 = model.clip_x0 if clip_x0 is None else check_clip_x0(clip_x0)
    final = _saved_model_target(base_dir, model_name, version)
    # Hidden and non-numeric, so TF Serving ignores it until the rename.
    partial = Path(tempfile.mkdtemp(prefix=f".{final.name}.partial-", dir=final.parent))
    try:
        network = exported_network(model)
        serving_archive(model, network, clip_x0).write_out(str(partial), verbose=False)
        max_abs_diff = _saved_model_parity(model, network, partial)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return _Staged("saved_model", partial, final, max_abs_diff)


def _saved_model_target(base_dir: Path, model_name: str, version: int | None) -> Path:
    """The version folder an export will create, after checking that it can."""
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", model_name):
        raise KddpmError(f"Model name {model_name!r} must be letters, digits, '_', '.' or '-'.")
    model_dir = _writable_dir(base_dir / model_name)
    existing = [int(p.name) for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit()]
    if version is None:
        version = max(existing, default=0) + 1
    if version < 1:
        raise KddpmError(f"Version must be a positive integer, got {version}.")
    final = model_dir / str(version)
    if final.exists():
        raise KddpmError(f"{final} already exists; give another --version or leave it out to use the next one.")
    return final


def _saved_model_parity(model: DiffusionModel, network: keras.Model, path: Path) -> float:
    loaded = tf.saved_model.load(str(path))
    serve = loaded.signatures["serving_default"]
    diff = 0.0
    for inputs in _parity_inputs(model):
        eps = serve(**{name: tf.constant(value) for name, value in zip(_INPUT_NAMES, inputs)})["eps"].numpy()
        diff = max(diff, float(np.abs(eps - _keras_eps(network, *inputs)).max()))
    if not diff <= TOLERANCE:
        raise KddpmError(
            f"The exported SavedModel differs from the Keras model by {diff:.3g} (> {TOLERANCE}); nothing was written."
        )
    return diff


# --- ONNX ------------------------------------------------------------------------------------


def export_onnx(
    model: DiffusionModel,
    path: str | os.PathLike,
    opset: int = DEFAULT_OPSET,
    overwrite: bool = False,
    clip_x0: bool | str | None = None,
) -> ExportResult:
    """Writes the EMA denoiser as ONNX to ``path`` after checking it against Keras.

    Inputs ``x_t`` [B, H, W, C] float32 and ``t`` [B] int32, output ``eps``; B is dynamic.
    Raises KddpmError, writing nothing, when ONNX Runtime's eps differs from Keras' by more
    than TOLERANCE at batch 1 or 8. An existing file is replaced only with ``overwrite``.
    clip_x0: the clipping the metadata gives samplers (default: the model's ``clip_x0``).
    """
    return _stage_onnx(model, Path(path), opset, overwrite, clip_x0).publish()


def _stage_onnx(model: DiffusionModel, path: Path, opset: int, overwrite: bool, clip_x0=None) -> _Staged:
    import onnx
    import tf2onnx

    path = _onnx_target(path, overwrite)
    network = exported_network(model)
    signature = [
        tf.TensorSpec([None, *model.image_shape], tf.float32, name="x_t"),
        tf.TensorSpec([None], tf.int32, name="t"),
    ]
    if model.num_classes:
        signature.append(tf.TensorSpec([None], tf.int32, name="label"))

    @tf.function(input_signature=signature)
    def denoise(*inputs):
        return {"eps": tf.cast(network(list(inputs), training=False), tf.float32)}

    proto, _ = tf2onnx.convert.from_function(denoise, input_signature=signature, opset=opset)
    for key, value in onnx_metadata(model, clip_x0).items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.checker.check_model(proto)
    serialized = proto.SerializeToString()
    max_abs_diff = _onnx_parity(model, network, serialized)
    partial = path.with_name(f".{path.name}.partial")
    try:
        partial.write_bytes(serialized)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    return _Staged("onnx", partial, path, max_abs_diff)


def _onnx_target(path: Path, overwrite: bool) -> Path:
    if path.suffix != ".onnx":
        raise KddpmError(f"ONNX output {path} must end in .onnx.")
    if path.exists() and not overwrite:
        raise KddpmError(f"{path} already exists; pass overwrite=True (--overwrite) to replace it.")
    _writable_dir(path.parent)
    return path


def onnx_metadata(model: DiffusionModel, clip_x0: bool | str | None = None) -> dict[str, str]:
    """What a sampler needs besides the network, as ONNX ``metadata_props`` strings."""
    clip_x0 = model.clip_x0 if clip_x0 is None else check_clip_x0(clip_x0)
    return {
        "kddpm.format": "1",  # what export/onnx_sample.py checks for
        "kddpm.schedule": json.dumps(model.schedule.get_config()),
        "kddpm.image_shape": json.dumps(list(model.image_shape)),
        "kddpm.timesteps": str(model.schedule.timesteps),
        "kddpm.variance": model.variance,
        # "true", "false" or "dynamic" (dynamic thresholding).
        "kddpm.clip_x0": {True: "true", False: "false"}.get(clip_x0, "dynamic"),
        # Class-conditional models: K (the input 'label' takes [0, K], K meaning unconditional).
        "kddpm.num_classes": str(model.num_classes or 0),
        "kddpm.class_names": json.dumps(model.class_names or [str(c) for c in range(model.num_classes or 0)]),
        "kddpm.plans": json.dumps(web_plans(model, clip_x0)),
    }


# The deterministic plans the browser page (export/web/) offers, the first its default: kddpm's own
# plan rows, so that the page applies the compiled loop's coefficients instead of a copy of the maths.
WEB_PLANS = (("dpm++2m", 20), ("dpm++2m", 10), ("dpm++2m", 50), ("ddim", 50))


def web_plans(model: DiffusionModel, clip_x0: bool | str) -> list[dict[str, Any]]:
    """[{sampler, steps, rows: {timesteps, x0_from_xt, ...}}] of ``WEB_PLANS`` that fit T."""
    plans = []
    for sampler, steps in WEB_PLANS:
        if steps >= model.schedule.timesteps:
            continue
        plan = model.plan(sampler, steps, eta=0.0 if sampler == "ddim" else None, clip_x0=clip_x0)
        rows = {field: getattr(plan, field).tolist() for field in ROW_FIELDS}
        plans.append({"sampler": sampler, "steps": steps, "rows": rows})
    return plans


def _onnx_parity(model: DiffusionModel, network: keras.Model, serialized: bytes) -> float:
    import onnxruntime

    session = onnxruntime.InferenceSession(serialized, providers=["CPUExecutionProvider"])
    diff = 0.0
    for inputs in _parity_inputs(model):
        (eps,) = session.run(["eps"], dict(zip(_INPUT_NAMES, inputs)))
        diff = max(diff, float(np.abs(eps - _keras_eps(network, *inputs)).max()))
    if not diff <= TOLERANCE:
        raise KddpmError(
            f"ONNX Runtime's output differs from the Keras model by {diff:.3g} (> {TOLERANCE}); "
            "nothing was written. Try another --opset."
        )
    return diff


# --- Shared ----------------------------------------------------------------------------------


_INPUT_NAMES = ("x_t", "t", "label")


def _parity_inputs(model: DiffusionModel) -> list[tuple[np.ndarray, ...]]:
    """(x_t, t) at each parity batch size; conditional models get labels too, the null one included."""
    rng = np.random.default_rng(0)
    batches = []
    for batch in _PARITY_BATCHES:
        inputs = (
            rng.standard_normal((batch, *model.image_shape)).astype(np.float32),
            rng.integers(0, model.schedule.timesteps, batch).astype(np.int32),
        )
        if model.num_classes:
            inputs += (rng.integers(0, model.num_classes + 1, batch).astype(np.int32),)
        batches.append(inputs)
    return batches


def _keras_eps(network: keras.Model, x_t: np.ndarray, t: np.ndarray, *label: np.ndarray) -> np.ndarray:
    return keras.ops.convert_to_numpy(network([x_t, t, *label], training=False)).astype(np.float32)


def _writable_dir(path: Path) -> Path:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise KddpmError(f"Cannot create the output folder {path} ({error.strerror}); choose another --out.") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise KddpmError(f"Cannot write to {path}; choose another --out or fix its permissions.")
    return path
