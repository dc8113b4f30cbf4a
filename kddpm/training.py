"""Putting a run together: strategy, precision, the model and its optimizer, and sample grids.

The callbacks that make training observable and restartable are in ``kddpm.callbacks``."""

from __future__ import annotations

import json
import os
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from kddpm.errors import KddpmError
from kddpm.grid import image_grid
from kddpm.model import DiffusionModel
from kddpm.presets import Preset
from kddpm.sampling import to_uint8
from kddpm.schedule import NoiseSchedule
from kddpm.unet import build_unet

STRATEGIES = ("auto", "default", "mirrored", "multiworker")
PRECISIONS = {"off": "float32", "bfloat16": "mixed_bfloat16", "float16": "mixed_float16"}
PRECISION_MODES = ("auto", *PRECISIONS)


def make_strategy(name: str = "auto") -> tf.distribute.Strategy:
    """The ``tf.distribute`` strategy called ``name``.

    auto: MirroredStrategy when more than one GPU is visible, else the default strategy.
    default: no distribution. mirrored: every local GPU (or the CPU). multiworker:
    MultiWorkerMirroredStrategy over the cluster described by ``TF_CONFIG``. Create it
    first, before any other TensorFlow work, and build the model in ``strategy.scope()``.
    """
    if name not in STRATEGIES:
        raise KddpmError(f"Unknown strategy {name!r}; use one of {STRATEGIES}.")
    if name == "auto":
        name = "mirrored" if len(tf.config.list_physical_devices("GPU")) > 1 else "default"
    if name == "default":
        return tf.distribute.get_strategy()
    if name == "mirrored":
        return tf.distribute.MirroredStrategy()
    config = os.environ.get("TF_CONFIG")
    if not config:
        raise KddpmError(
            "The multiworker strategy reads the cluster from TF_CONFIG, which is not set; "
            "set it on every host as the README's 'Several hosts' section shows."
        )
    try:
        parsed = json.loads(config)
        parsed["cluster"], parsed["task"]["type"], parsed["task"]["index"]
    except (ValueError, KeyError, TypeError):
        raise KddpmError(
            'TF_CONFIG is not valid: it must be JSON like {"cluster": {"worker": ["host:port", ...]}, '
            '"task": {"type": "worker", "index": 0}}.'
        ) from None
    return tf.distribute.MultiWorkerMirroredStrategy()


def is_chief(strategy: tf.distribute.Strategy) -> bool:
    """Whether this process writes the run's files: always, except on non-chief workers."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not resolver.task_type:
        return True
    if resolver.task_type == "chief":
        return True
    has_chief = "chief" in resolver.cluster_spec().as_dict()
    return resolver.task_type == "worker" and resolver.task_id == 0 and not has_chief


def native_bfloat16() -> tuple[bool, str]:
    """Whether this machine computes bfloat16 natively, and why (for printing).

    GPUs: compute capability 8.0 or more (Ampere and later), on every visible GPU. CPUs: the
    avx512_bf16 or amx_bf16 flag (Linux' /proc/cpuinfo; other systems count as without).
    """
    gpus = tf.config.list_physical_devices("GPU")
    if gpus:
        details = [tf.config.experimental.get_device_details(gpu) for gpu in gpus]
        capabilities = [tuple(detail.get("compute_capability", (0, 0))) for detail in details]
        oldest = min(capabilities)
        return oldest >= (8, 0), f"GPU compute capability {oldest[0]}.{oldest[1]}"
    flags = _cpu_flags()
    for flag in ("amx_bf16", "avx512_bf16"):
        if flag in flags:
            return True, f"the CPU has {flag}"
    return False, "the CPU has no avx512_bf16 or amx_bf16"


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    return {flag for line in text.splitlines() if line.startswith("flags") for flag in line.split(":", 1)[1].split()}


def set_precision(mode: str) -> str:
    """Sets Keras' global dtype policy for ``mode`` and returns a line saying which and why.

    mode: 'off' (float32), 'bfloat16', 'float16', or 'auto': bfloat16 where the hardware
    computes it natively (``native_bfloat16``), float32 otherwise. Call before building.
    Mixed precision computes the network in 16 bits with float32 weights; the output layer,
    the loss, the schedule and the sampler stay float32, and ``compile`` wraps the optimizer
    in a ``LossScaleOptimizer`` for float16.
    """
    if mode not in PRECISION_MODES:
        raise KddpmError(f"Unknown mixed precision {mode!r}; use one of {PRECISION_MODES}.")
    reason = f"--mixed-precision {mode}"
    if mode == "auto":
        native, why = native_bfloat16()
        mode = "bfloat16" if native else "off"
        reason = f"auto: {why}"
    policy = PRECISIONS[mode]
    keras.mixed_precision.set_global_policy(policy)
    return f"{policy} ({reason})"


def create_model(
    preset: Preset,
    seed: int = 0,
    schedule: NoiseSchedule | None = None,
    class_names: list[str] | None = None,
    label_dropout: float = 0.1,
    image_shape: tuple[int, int, int] | None = None,
) -> DiffusionModel:
    """A new DiffusionModel with the preset's U-Net and EMA settings.

    The seed gives the initial weights, the training noise and the dropout masks: the same
    seed, the same run, without ``keras.utils.set_random_seed``. class_names: one name per
    class makes the model class-conditional (K = len(class_names)), trained with
    ``label_dropout`` for classifier-free guidance. image_shape: (H, W, C) instead of the
    preset's, with the preset's widths and depth (``Preset.unet_kwargs``).
    """
    num_classes = None if class_names is None else len(class_names)
    denoiser = build_unet(**preset.unet_kwargs(image_shape), seed=seed, num_classes=num_classes)
    return DiffusionModel(
        denoiser,
        schedule or NoiseSchedule.linear(),
        ema_decay=preset.ema_decay,
        ema_warmup=preset.ema_warmup,
        seed=seed,
        num_classes=num_classes,
        label_dropout=label_dropout,
        class_names=class_names,
    )


def class_grid_labels(num_classes: int, num_images: int = 64) -> tuple[np.ndarray, int]:
    """Labels for a grid with one row per class: ([K * n] int32, n) with n = max(1, num_images // K)."""
    per_class = max(1, num_images // num_classes)
    return np.repeat(np.arange(num_classes, dtype=np.int32), per_class), per_class


def make_optimizer(learning_rate: float, warmup_steps: int = 0, epsilon: float = 1e-8) -> keras.optimizers.Optimizer:
    """Adam with a linear learning-rate warm-up, as in the paper (gradient clipping is the model's).

    epsilon: 1e-8, the original code's (TensorFlow 1's Adam default; Keras' is 1e-7).
    """
    if warmup_steps > 0:
        # alpha=1 keeps the rate constant at the target once the warm-up is over.
        learning_rate = keras.optimizers.schedules.CosineDecay(
            0.0, decay_steps=1, alpha=1.0, warmup_target=learning_rate, warmup_steps=warmup_steps
        )
    return keras.optimizers.Adam(learning_rate, epsilon=epsilon)


def write_grid(
    images: np.ndarray,
    path: str | Path,
    scale: int | None = None,
    columns: int | None = None,
    row_labels: list[str] | None = None,
) -> Path:
    """Writes images [N, H, W, C] in [-1, 1] as one PNG grid (``kddpm.grid.image_grid``); returns the path.

    scale: nearest-neighbour enlargement of each image (default: a grid at least 512 px wide;
    1: raw pixels). row_labels: one caption per row, written in a strip left of the grid.
    """
    path = Path(path)
    grid = grid_pixels(images, scale, columns, row_labels)
    path.parent.mkdir(parents=True, exist_ok=True)
    keras.utils.save_img(path, grid, scale=False)
    return path


def grid_pixels(
    images: np.ndarray, scale: int | None = None, columns: int | None = None, row_labels: list[str] | None = None
) -> np.ndarray:
    """The uint8 [H', W', C] grid that ``write_grid`` writes (TensorBoard's image summaries show the same)."""
    if scale is not None and scale < 1:
        raise KddpmError(f"The grid scale must be a positive integer, got {scale}.")
    grid = image_grid(to_uint8(images), columns=columns, scale=scale)
    return _with_row_labels(grid, row_labels) if row_labels else grid


def _with_row_labels(grid: np.ndarray, labels: list[str], gap: int = 2) -> np.ndarray:
    """``grid`` (uint8 [H, W, C]) with a white strip on its left holding each row's label."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default()
    measure = ImageDraw.Draw(Image.new("L", (1, 1)))
    widths = [measure.textbbox((0, 0), label, font=font)[2] for label in labels]
    strip = Image.new("L", (max(widths) + 12, grid.shape[0]), 255)
    draw = ImageDraw.Draw(strip)
    pitch = (grid.shape[0] + gap) / len(labels)  # row height including the gap below it
    for row, label in enumerate(labels):
        top, _, _, bottom = draw.textbbox((0, 0), label, font=font)
        centre = row * pitch + (pitch - gap) / 2
        draw.text((6, centre - (bottom + top) / 2), label, fill=0, font=font)
    column = np.asarray(strip, np.uint8)[..., None].repeat(grid.shape[2], axis=2)
    return np.concatenate([column, grid], axis=1)
