"""The callbacks that make training observable and restartable: sample grids, evaluation,
throughput, a time estimate, the NaN stop and backups that resume a run exactly."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import keras
import numpy as np

from kddpm.defaults import DEFAULT_SAMPLER
from kddpm.errors import KddpmError
from kddpm.training import grid_pixels, write_grid


class SampleGrid(keras.callbacks.Callback):
    """Draws a grid of samples from the EMA weights every ``every`` epochs, from the same seed.

    The grid goes to ``directory/epoch_NNNN.png`` and, with ``log_dir``, to TensorBoard as the
    image summary ``samples`` at step = epoch (``log_dir/images``), so that the images tab's slider
    walks through training. At the end of training it also logs ``trajectory``: the reverse
    process of ``trajectory_images`` images at ten points, a row of x_t above a row of the x_0
    predicted from it for each (the paper's Figure 6).
    """

    def __init__(
        self,
        directory: str | Path,
        every: int = 1,
        num_images: int = 64,
        seed: int = 0,
        grid_scale: int | None = None,
        columns: int | None = None,
        row_labels: list[str] | None = None,
        log_dir: str | Path | None = None,
        trajectory_images: int = 4,
        **sample_kwargs,
    ):
        super().__init__()
        self.grid_scale = grid_scale
        self.columns = columns
        self.row_labels = row_labels
        self.directory = Path(directory)
        self.every = max(1, int(every))
        self.num_images = num_images
        self.seed = seed
        self.log_dir = None if log_dir is None else Path(log_dir)
        self.trajectory_images = trajectory_images
        self.sample_kwargs = sample_kwargs
        self._writer = None
        self._epoch = 0

    def on_epoch_end(self, epoch, logs=None):
        self._epoch = epoch + 1
        if (epoch + 1) % self.every == 0:
            images = self.model.sample(self.num_images, seed=self.seed, **self.sample_kwargs)
            path = self.directory / f"epoch_{epoch + 1:04d}.png"
            write_grid(images, path, self.grid_scale, self.columns, self.row_labels)
            self._summary("samples", grid_pixels(images, self.grid_scale, self.columns, self.row_labels), epoch + 1)

    def on_train_end(self, logs=None):
        if self.log_dir is None or not self.trajectory_images:
            return
        kept = ("sampler", "steps", "clip_x0", "guidance_scale")
        options = {key: value for key, value in self.sample_kwargs.items() if key in kept}
        count = self.trajectory_images
        if self.sample_kwargs.get("labels") is not None:
            # A conditional grid: one image of each of the first classes.
            options["labels"] = np.unique(np.asarray(self.sample_kwargs["labels"]))[:count]
            count = len(options["labels"])
        shots = self.model.trajectory(count, seed=self.seed, **options)
        rows = [np.stack([shot[part][i] for shot in shots]) for i in range(count) for part in (1, 2)]
        self._summary("trajectory", grid_pixels(np.concatenate(rows), columns=len(shots)), self._epoch)
        self._writer.close()
        self._writer = None

    def _summary(self, name: str, grid: np.ndarray, step: int) -> None:
        if self.log_dir is None:
            return
        import tensorflow as tf

        if self._writer is None:
            self._writer = tf.summary.create_file_writer(str(self.log_dir / "images"))
        with self._writer.as_default():
            tf.summary.image(name, grid[None], step=step)
        self._writer.flush()


class EvaluateEvery(keras.callbacks.Callback):
    """FID and KID of EMA samples against a reference every ``every`` epochs, added to the epoch's logs.

    Put it before ``keras.callbacks.TensorBoard`` in the callback list: TensorBoard then writes
    ``epoch_fid`` and ``epoch_kid`` as scalars. The reference's features are computed once and
    cached (``kddpm.features``). Other arguments are ``kddpm.evaluation.evaluate``'s.
    """

    def __init__(
        self,
        every: int = 1,
        num_samples: int = 1000,
        reference: str | None = None,
        extractor: str | None = None,
        sampler: str = DEFAULT_SAMPLER,
        steps: int | None = None,
        clip_x0: bool | str | None = None,
        seed: int = 0,
        print_fn=print,
    ):
        super().__init__()
        if every < 1 or num_samples < 2:
            raise KddpmError(f"Evaluate every >= 1 epochs with >= 2 samples, got {every} and {num_samples}.")
        self.every = every
        self.settings = dict(
            num_samples=num_samples, reference=reference, sampler=sampler, steps=steps, clip_x0=clip_x0, seed=seed
        )
        self.extractor_name = extractor
        self.print_fn = print_fn
        self._extractor = None

    def on_epoch_end(self, epoch, logs=None):
        if (epoch + 1) % self.every:
            return
        from kddpm.evaluation import default_extractor, evaluate
        from kddpm.features import feature_extractor

        if self._extractor is None:
            self._extractor = feature_extractor(self.extractor_name or default_extractor(self.model.image_shape))
        results = evaluate(self.model, ("fid", "kid"), extractor=self._extractor, **self.settings)["metrics"]
        if logs is not None:
            logs["fid"] = results["fid"]
            logs["kid"] = results["kid"]["mean"]
        self.print_fn(
            f"Evaluation after epoch {epoch + 1}: FID {results['fid']:.2f}, KID {results['kid']['mean']:.4f} "
            f"({self.settings['num_samples']} samples)"
        )


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


class TrainingClock(keras.callbacks.Callback):
    """After every epoch, prints one line: the estimated whole training time and what is left.

    The estimate is the time so far plus the remaining epochs at the last epoch's pace (which,
    unlike the first, includes no tracing), so it holds on machines of any speed. The line is
    printed when the next epoch begins (or training ends), after Keras' progress bar has
    finished its own line.
    """

    def __init__(self, epochs: int, print_fn=print):
        super().__init__()
        self.epochs = epochs
        self.print_fn = print_fn
        self._started: float | None = None
        self._epoch_started = 0.0
        self._pending: str | None = None

    def on_train_begin(self, logs=None):
        self._started = time.perf_counter()

    def on_epoch_begin(self, epoch, logs=None):
        self._flush()
        self._epoch_started = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        now = time.perf_counter()
        last = now - self._epoch_started
        left = (self.epochs - epoch - 1) * last
        total = now - self._started + left
        self._pending = (
            f"Time: epoch {epoch + 1}/{self.epochs} took {last:.0f} s; training about "
            f"{_minutes(total)} in all, {_minutes(left)} left"
        )

    def on_train_end(self, logs=None):
        self._flush()

    def _flush(self):
        if self._pending:
            self.print_fn(self._pending)
            self._pending = None


def _minutes(seconds: float) -> str:
    return f"{seconds / 60:.1f} min" if seconds >= 60 else f"{seconds:.0f} s"


class NonFiniteLossError(KddpmError):
    """Training produced a NaN or infinite loss."""


class StopOnNonFiniteLoss(keras.callbacks.TerminateOnNaN):
    """Keras' TerminateOnNaN raising at once, so that no later callback (a backup, a checkpoint)
    writes the broken weights and ``fit`` does not return as if it had finished.

    Put it first in the callback list.
    """

    def __init__(self):
        super().__init__(raise_error=True)

    def on_batch_end(self, batch, logs=None):
        try:
            super().on_batch_end(batch, logs)
        except RuntimeError:
            step = int(self.model.optimizer.iterations.numpy())
            raise NonFiniteLossError(f"The loss became {(logs or {}).get('loss')} at step {step}") from None


_STATE_ATTRIBUTE = "kddpm_training_state"


class TrainingBackup(keras.callbacks.BackupAndRestore):
    """``keras.callbacks.BackupAndRestore`` at every epoch end, atomic and exact.

    The whole training state goes into one file, ``backup_dir/latest.weights.h5``: the weights,
    the EMA weights, the optimizer state (its step counter keys the training noise), and, as
    an HDF5 attribute, the epoch, the step and the dropout seed generators' states. The file
    is written beside and renamed into place, so a kill at any moment leaves the previous
    backup or the new one, never a mix. A backup that cannot be read raises ``KddpmError``
    naming it, instead of training from scratch over it. The data position is the caller's
    part: resume the pipeline ``read_backup_state(...)["step"]`` batches in.

    write_dir: where this process writes (default ``backup_dir``); non-chief workers of a
    multi-worker run write to a directory of their own and all read the chief's.
    settings: what the run must keep to resume exactly (batch size, seed, ...), stored with
    the backup so that a rerun can be checked against it (``mismatched_settings``).

    The step stored is the number of data batches trained on (``DiffusionModel.batches_seen``),
    not the optimizer's count, which a float16 loss scaler does not advance on skipped steps.
    """

    def __init__(
        self, backup_dir: str | Path, write_dir: str | Path | None = None, settings: dict[str, Any] | None = None
    ):
        super().__init__(str(backup_dir), save_freq="epoch", delete_checkpoint=False)
        self.path = Path(self._weights_path)
        self.write_path = Path(write_dir or backup_dir) / self.path.name
        self.settings = dict(settings or {})

    def on_train_begin(self, logs=None):
        state = read_backup_state(self.path.parent)
        if state is None:
            return
        optimizer = self.model.optimizer
        if optimizer is not None and not optimizer.built:
            optimizer.build(self.model.trainable_variables)
        # A constant learning rate is an optimizer variable and would come back from the
        # backup; the one this run was started with wins (a schedule is not saved).
        constant_rate = None if _has_schedule(optimizer) else float(optimizer.learning_rate.numpy())
        try:
            self.model.load_weights(self.path)
        except Exception as error:  # h5py and Keras raise many types for damaged files
            raise _damaged(self.path, error) from None
        if constant_rate is not None:
            optimizer.learning_rate = constant_rate
        for generator, value in zip(_seed_generators(self.model), state["seed_states"]):
            generator.state.assign(np.asarray(value, dtype=generator.state.dtype))
        self.model._initial_epoch = state["epoch"]

    def _save_model(self):
        import h5py

        self.write_path.parent.mkdir(parents=True, exist_ok=True)
        partial = self.write_path.with_name(".partial-" + self.write_path.name)
        self.model.save_weights(partial, overwrite=True)
        state = {
            "epoch": self._current_epoch,
            "step": int(self.model.batches_seen.numpy()),
            "seed_states": [generator.state.numpy().tolist() for generator in _seed_generators(self.model)],
            "settings": self.settings,
        }
        with h5py.File(partial, "a") as file:
            file.attrs[_STATE_ATTRIBUTE] = json.dumps(state)
        os.replace(partial, self.write_path)


def mismatched_settings(stored: dict[str, Any], current: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """(name, backup's value, current value) for every setting that differs from the backup's."""
    return [(name, stored[name], current.get(name)) for name in sorted(stored) if stored[name] != current.get(name)]


def read_backup_state(backup_dir: str | Path) -> dict[str, Any] | None:
    """{'epoch', 'step', 'seed_states', 'settings'} of the backup in ``backup_dir``, or None when there is none.

    Raises KddpmError naming the file when it exists but cannot be read.
    """
    import h5py

    path = Path(backup_dir) / "latest.weights.h5"
    if not path.exists():
        return None
    try:
        with h5py.File(path, "r") as file:
            return json.loads(file.attrs[_STATE_ATTRIBUTE])
    except Exception as error:  # a truncated file fails in h5py, a foreign one lacks the attribute
        raise _damaged(path, error) from None


def _damaged(path: Path, error: Exception) -> KddpmError:
    reason = str(error).strip().splitlines()[0][:160] if str(error).strip() else type(error).__name__
    return KddpmError(
        f"Cannot resume from the backup {path} ({reason}): it is damaged or not a kddpm backup. "
        "Nothing was overwritten; move it away to restart this run from step 0, or use another --out."
    )


def _has_schedule(optimizer: keras.optimizers.Optimizer) -> bool:
    inner = getattr(optimizer, "inner_optimizer", optimizer)
    return isinstance(inner._learning_rate, keras.optimizers.schedules.LearningRateSchedule)


def _seed_generators(model: keras.Model) -> list:
    """The model's random seed generators (dropout), in a fixed order."""
    return [generator for layer in model._flatten_layers() for generator in layer._seed_generators]
