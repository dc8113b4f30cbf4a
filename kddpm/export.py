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

from kddpm.defaults import DEFAULT_SAMPLER, DEFAULT_STEPS
from kddpm.errors import KddpmError
from kddpm.loading import load_diffusion_model
from kddpm.model import DiffusionModel
from kddpm.networks import network_with_precision
from kddpm.sampling import (
    Sampler,
    check_clip_x0,
    ddim_tables,
    ddpm_plan,
    dpm_solver_tables,
    initial_noise,
    to_uint8_tensor,
)
from kddpm.streams import seed_pair

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
        _serving_archive(model, network, clip_x0).write_out(str(partial), verbose=False)
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


def _serving_archive(model: DiffusionModel, network: keras.Model, clip_x0: bool) -> keras.export.ExportArchive:
    height, width, channels = model.image_shape
    timesteps = model.schedule.timesteps
    classes = model.num_classes
    sampler = Sampler(network, model.image_shape, num_classes=classes)
    loop = sampler.loop(clip_x0, explicit_noise=False)
    guided_loop = sampler.loop(clip_x0, explicit_noise=False, guided=True) if classes else None
    ddpm = ddpm_plan(model.schedule, model.variance, clip_x0=clip_x0)
    alphas_cumprod = model.schedule.alphas_cumprod

    shape_text = ", ".join(map(str, model.image_shape))

    def image_checks(images, name):
        # Serving does not enforce a signature's shape, only its dtype; a wrong image size
        # would otherwise fail deep inside the network with a message about a reshape.
        return [
            tf.debugging.assert_equal(
                tf.shape(images)[1:], model.image_shape, message=f"{name} must be [B, {shape_text}]"
            )
        ]

    def label_checks(labels, count, name):
        message = f"{name} must be class indices in [0, {classes}] ({classes}: unconditional)"
        return [
            tf.debugging.assert_greater_equal(labels, 0, message=message),
            tf.debugging.assert_less_equal(labels, classes, message=message),
            tf.debugging.assert_equal(tf.size(labels), count, message=f"{name} must hold one class per image"),
        ]

    def denoise(x_t, t, label=None):
        checks = [
            *image_checks(x_t, "x_t"),
            tf.debugging.assert_equal(tf.shape(t), tf.shape(x_t)[:1], message="t must be [B], one per image in x_t"),
            tf.debugging.assert_greater_equal(t, 0, message=f"t must be in [0, {timesteps})"),
            tf.debugging.assert_less(t, timesteps, message=f"t must be in [0, {timesteps})"),
        ]
        conditions = []
        if classes:
            checks += label_checks(label, tf.shape(x_t)[0], "label")
            conditions = [label]
        with tf.control_dependencies(checks):
            return {"eps": tf.cast(network([x_t, t, *conditions], training=False), tf.float32)}

    def plan(sampler_name, steps):
        # "" and 0 stand for kddpm's defaults: TF Serving has no optional inputs.
        sampler_name = tf.where(tf.equal(sampler_name, ""), DEFAULT_SAMPLER, sampler_name)
        is_ddpm = tf.equal(sampler_name, "ddpm")
        is_ddim = tf.equal(sampler_name, "ddim")
        is_dpm = tf.equal(sampler_name, "dpm++2m")
        is_dpm_sde = tf.equal(sampler_name, "dpm++2m_sde")
        asked = steps
        default_steps = tf.where(is_ddim, DEFAULT_STEPS["ddim"], DEFAULT_STEPS["dpm++2m"])
        steps = tf.where(tf.equal(steps, 0), default_steps, steps)
        known = tf.reduce_any(tf.stack([is_ddpm, is_ddim, is_dpm, is_dpm_sde]))
        checks = [
            tf.debugging.Assert(known, ["sampler must be ddpm, ddim, dpm++2m or dpm++2m_sde, got", sampler_name]),
            tf.debugging.Assert(
                tf.logical_or(~is_ddpm, tf.equal(asked, 0) | tf.equal(asked, timesteps)),
                [f"DDPM takes all {timesteps} steps; send steps 0 (or {timesteps}), or sampler ddim or dpm++2m"],
            ),
            tf.debugging.Assert(
                tf.logical_or(~is_ddim, (steps >= 1) & (steps <= timesteps)),
                [f"DDIM steps must be in [1, {timesteps}], got", steps],
            ),
            tf.debugging.Assert(
                tf.logical_or(~(is_dpm | is_dpm_sde), (steps >= 1) & (steps < timesteps)),
                [f"DPM-Solver++ steps must be in [1, {timesteps - 1}], got", steps],
            ),
        ]
        with tf.control_dependencies(checks):

            def stacked(tables):
                plan_timesteps, rows = tables
                return plan_timesteps, tf.cast(tf.stack(rows, axis=1), tf.float32)

            def ddim():
                return stacked(ddim_tables(tf.constant(alphas_cumprod), steps, 0.0, clip_x0))

            def dpm_solver():
                return stacked(dpm_solver_tables(tf.constant(alphas_cumprod), steps, clip_x0, is_dpm_sde))

            return tf.case(
                [
                    (is_ddpm, lambda: (tf.constant(ddpm.timesteps, tf.int32), tf.constant(ddpm.coefficients()))),
                    (is_ddim, ddim),
                ],
                default=dpm_solver,
            )

    def run(x_T, seed, sampler_name, steps, labels=None, guidance_scale=None):
        # Row-format requests send every input once per instance; the first one is used
        # (but for labels: one per image).
        key = seed_pair(seed[0])
        plan_timesteps, coefficients = plan(sampler_name[0], steps[0])
        stop = tf.shape(plan_timesteps)[0]
        args = (x_T, tf.zeros_like(x_T), key, tf.constant(0), plan_timesteps, coefficients, tf.constant(0), stop)
        if not classes:
            return {"images": to_uint8_tensor(loop(*args)[0])}
        w = guidance_scale[0]
        checks = [
            *label_checks(labels, tf.shape(x_T)[0], "labels"),
            tf.debugging.assert_greater_equal(w, 0.0, message="guidance_scale must be >= 0"),
            tf.debugging.assert_all_finite(w, message="guidance_scale must be finite"),
        ]
        with tf.control_dependencies(checks):
            # w = 0 runs the network once per step on the batch; w > 0 once on the doubled batch.
            x_0 = tf.cond(tf.equal(w, 0.0), lambda: loop(*args, labels, w)[0], lambda: guided_loop(*args, labels, w)[0])
        return {"images": to_uint8_tensor(x_0)}

    def sample(num_images, seed, sampler, steps, *condition):
        count = num_images[0]
        with tf.control_dependencies([tf.debugging.assert_positive(count, message="num_images must be >= 1")]):
            x_T = initial_noise(seed_pair(seed[0]), 0, count, model.image_shape)
        return run(x_T, seed, sampler, steps, *condition)

    def sample_from_noise(x_T, seed, sampler, steps, *condition):
        with tf.control_dependencies(image_checks(x_T, "x_T")):
            return run(tf.identity(x_T), seed, sampler, steps, *condition)

    def class_names(index):
        return {"names": tf.constant(model.class_names or [str(c) for c in range(classes)])}

    image = tf.TensorSpec([None, height, width, channels], tf.float32, name="x_t")
    options = [
        tf.TensorSpec([None], tf.int64, name="seed"),
        tf.TensorSpec([None], tf.string, name="sampler"),
        tf.TensorSpec([None], tf.int32, name="steps"),
    ]
    denoise_inputs = [image, tf.TensorSpec([None], tf.int32, name="t")]
    if classes:
        denoise_inputs.append(tf.TensorSpec([None], tf.int32, name="label"))
        options += [
            tf.TensorSpec([None], tf.int32, name="labels"),
            tf.TensorSpec([None], tf.float32, name="guidance_scale"),
        ]
    archive = keras.export.ExportArchive()
    archive.track(network)
    archive.add_endpoint("serving_default", denoise, denoise_inputs)
    archive.add_endpoint("sample", sample, [tf.TensorSpec([None], tf.int32, name="num_images"), *options])
    archive.add_endpoint(
        "sample_from_noise",
        sample_from_noise,
        [tf.TensorSpec([None, height, width, channels], tf.float32, name="x_T"), *options],
    )
    if classes:
        # The class names, so that a client can ask for classes by name (the input is ignored).
        archive.add_endpoint("class_names", class_names, [tf.TensorSpec([None], tf.int32, name="index")])
    return archive


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
    }


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
