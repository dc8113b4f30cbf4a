"""Putting a preset together: the model, its optimizer, and the sample-grid callback."""

from __future__ import annotations

import time
from pathlib import Path

import keras
import numpy as np

from kddpm.model import DiffusionModel
from kddpm.presets import Preset
from kddpm.sampling import image_grid, to_uint8
from kddpm.schedule import NoiseSchedule
from kddpm.unet import build_unet


def create_model(preset: Preset, seed: int = 0, schedule: NoiseSchedule | None = None) -> DiffusionModel:
    """A new DiffusionModel with the preset's U-Net; the same seed gives the same initial weights."""
    keras.utils.set_random_seed(seed)
    denoiser = build_unet(**preset.unet_kwargs())
    return DiffusionModel(denoiser, schedule or NoiseSchedule.linear(), ema_decay=preset.ema_decay, seed=seed)


def make_optimizer(learning_rate: float, warmup_steps: int = 0) -> keras.optimizers.Optimizer:
    """Adam with a linear learning-rate warm-up, as in the paper (gradient clipping is the model's)."""
    if warmup_steps > 0:
        # alpha=1 keeps the rate constant at the target once the warm-up is over.
        learning_rate = keras.optimizers.schedules.CosineDecay(
            0.0, decay_steps=1, alpha=1.0, warmup_target=learning_rate, warmup_steps=warmup_steps
        )
    return keras.optimizers.Adam(learning_rate)


def write_grid(images: np.ndarray, path: str | Path) -> Path:
    """Writes images [N, H, W, C] in [-1, 1] as one PNG grid; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    keras.utils.save_img(path, image_grid(to_uint8(images)), scale=False)
    return path


class SampleGrid(keras.callbacks.Callback):
    """Draws a grid of samples from the EMA weights every ``every`` epochs."""

    def __init__(self, directory: str | Path, every: int = 1, num_images: int = 64, seed: int = 0, **sample_kwargs):
        super().__init__()
        self.directory = Path(directory)
        self.every = max(1, int(every))
        self.num_images = num_images
        self.seed = seed
        self.sample_kwargs = sample_kwargs

    def on_epoch_end(self, epoch, logs=None):
        if (epoch + 1) % self.every == 0:
            images = self.model.sample(self.num_images, seed=self.seed, **self.sample_kwargs)
            write_grid(images, self.directory / f"epoch_{epoch + 1:04d}.png")


class Throughput(keras.callbacks.Callback):
    """Measures training images per second over the steps themselves.

    Leaves out the first ``skip_steps`` steps (tracing, warm-up) and the time between epochs
    (checkpoints, sample grids).
    """

    def __init__(self, batch_size: int, skip_steps: int = 5):
        super().__init__()
        self.batch_size = batch_size
        self.skip_steps = skip_steps
        self._seen = 0
        self._last: float | None = None
        self._counted = 0
        self._elapsed = 0.0

    def on_epoch_begin(self, epoch, logs=None):
        self._last = None

    def on_train_batch_begin(self, batch, logs=None):
        if self._last is None:
            self._last = time.perf_counter()

    def on_train_batch_end(self, batch, logs=None):
        now = time.perf_counter()
        self._seen += 1
        if self._seen > self.skip_steps:
            self._counted += 1
            self._elapsed += now - self._last
        self._last = now

    def images_per_second(self) -> float:
        return self._counted * self.batch_size / self._elapsed if self._elapsed else float("nan")
