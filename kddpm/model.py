"""DiffusionModel: DDPM training (Algorithm 1, L_simple) as a ``keras.Model``, with EMA weights."""

from __future__ import annotations

import math
import os
import zipfile
import zlib
from pathlib import Path
from typing import Any

import keras
import numpy as np
import tensorflow as tf

# Registers the U-Net's custom layers, so that a saved model loads without custom_objects
# in a process that never built one.
import kddpm.unet  # noqa: F401
from kddpm.defaults import DEFAULT_GUIDANCE, DEFAULT_SAMPLER
from kddpm.errors import KddpmError
from kddpm.sampling import VARIANCES, Sampler, SamplingPlan, check_clip_x0, make_plan
from kddpm.schedule import NoiseSchedule
from kddpm.streams import example_integers, example_keys, example_normals, example_uniforms, fold_in

# Training images must lie in [-1, 1]; this bound only catches data that was never scaled
# (0..255, or standardised with large outliers), leaving room for resampling overshoot.
_MAX_ABS_PIXEL = 1.5
_OUT_OF_RANGE = "Training images lie far outside [-1, 1]; scale them to [-1, 1] (x / 127.5 - 1 for 0..255 data)."
_OUT_OF_RANGE_KEY = "data_out_of_range"
_BAD_LABELS_KEY = "labels_out_of_range"


@keras.saving.register_keras_serializable(package="kddpm")
class DiffusionModel(keras.Model):
    """Trains any eps-network with ``fit`` and samples from an EMA copy of its weights.

    Args:
        denoiser: a ``keras.Model`` called as ``denoiser([x_t, t])`` with x_t [B, H, W, C]
            float32 and t [B] int32 in [0, T), returning eps of x_t's shape.
        schedule: the noise schedule (default: the paper's linear schedule, T = 1000).
        ema_decay: decay of the exponential moving average of the weights (paper: 0.9999).
        ema_warmup: use decay_n = min(ema_decay, (1 + n) / (10 + n)) at step n, so that a
            short run's EMA is not dominated by the initial weights.
        clip_grad_norm: clip the global gradient norm (over all replicas) to this; None: off.
        seed: seed of the training randomness. The timestep, noise and dropout masks of batch
            n, example i of the global batch are a function of (seed, n, i) alone, so a run is
            reproducible and the same on one device or several replicas and workers. (The
            denoiser's initial weights are its own: ``build_unet(seed=...)``.)
        image_shape: (H, W, C); read from ``denoiser.inputs`` when it is a functional model.
        variance: DDPM's default sampling variance sigma_t^2, 'beta_tilde' (the default) or 'beta'.
        clip_x0: how sampling clips the predicted x0 unless told otherwise: True (the default:
            to [-1, 1], where training data lies, as the original code's ``clip_denoised``),
            False, or 'dynamic' (dynamic thresholding); a converted diffusers model takes its
            scheduler's ``clip_sample``.
        num_classes: K for a class-conditional denoiser ``[x_t, t, label] -> eps`` (build_unet's
            ``num_classes``); read from the denoiser when left out. Training data is then
            (images, labels) with labels in [0, K).
        label_dropout: the probability with which a training label is replaced by the null
            label K, so that one network learns eps(x_t, t, c) and eps(x_t, t) (classifier-free
            guidance). Drawn from (seed, step, position in the global batch) like the noise.
        class_names: K names, so that samples can be asked for by name (``class_index``).
    """

    def __init__(
        self,
        denoiser: keras.Model,
        schedule: NoiseSchedule | None = None,
        ema_decay: float = 0.9999,
        ema_warmup: bool = True,
        clip_grad_norm: float | None = 1.0,
        seed: int = 0,
        image_shape: tuple[int, int, int] | None = None,
        variance: str = "beta_tilde",
        clip_x0: bool | str = True,
        num_classes: int | None = None,
        label_dropout: float = 0.1,
        class_names: list[str] | None = None,
        **kwargs: Any,
    ):
        super().__init__(**kwargs)
        if variance not in VARIANCES:
            raise KddpmError(f"Unknown variance {variance!r}; use one of {VARIANCES}.")
        self.variance = variance
        self.clip_x0 = check_clip_x0(clip_x0)
        if not 0.0 <= ema_decay < 1.0:
            raise KddpmError(f"ema_decay must be in [0, 1), got {ema_decay}.")
        self.denoiser = denoiser
        self.schedule = schedule or NoiseSchedule.linear()
        self.ema_decay = float(ema_decay)
        self.ema_warmup = bool(ema_warmup)
        self.clip_grad_norm = None if clip_grad_norm is None else float(clip_grad_norm)
        self.seed = int(seed)
        self.image_shape = _image_shape_of(denoiser, image_shape)
        self.num_classes = _num_classes_of(denoiser, num_classes)
        if not 0.0 <= label_dropout < 1.0:
            raise KddpmError(f"label_dropout must be in [0, 1), got {label_dropout}.")
        self.label_dropout = float(label_dropout)
        self.class_names = _checked_class_names(class_names, self.num_classes)
        self.ema_denoiser = _copy_network(denoiser, self.image_shape, self.num_classes)
        self.ema_denoiser.trainable = False
        # Data batches trained on (skipped float16 steps included): keys the training noise and
        # says where a resumed run's data stream continues. optimizer.iterations is not it: a
        # loss-scaling optimizer does not count the steps it skips.
        self.batches_seen = keras.Variable(
            0, dtype="int64", trainable=False, aggregation="only_first_replica", name="batches_seen"
        )
        self.loss_tracker = keras.metrics.Mean(name="loss")
        self._sampler: Sampler | None = None
        self._sampler_key: tuple | None = None
        self.built = True

    # --- Keras plumbing --------------------------------------------------------------------

    def call(self, inputs, training=False):
        """eps_theta([x_t, t]) (or [x_t, t, label]) with the trained (not EMA) weights; t must lie in [0, T)."""
        x_t, t, *label = inputs
        if not isinstance(t, keras.KerasTensor):  # symbolic calls carry no values to check
            t = self.schedule.checked_timesteps(t)
        return self.denoiser([x_t, t, *label], training=training)

    def compile(self, optimizer="adam", **kwargs: Any) -> None:
        """Keras' compile; the loss is L_simple, so only the optimizer (and options) are taken."""
        super().compile(optimizer=optimizer, **kwargs)
        inner = getattr(self.optimizer, "inner_optimizer", self.optimizer)
        if (inner.gradient_accumulation_steps or 1) > 1:
            raise KddpmError(
                f"gradient_accumulation_steps={inner.gradient_accumulation_steps} is not supported: its micro-"
                "batches would share one step's noise and the clip and EMA would act per micro-batch. Use a larger "
                "global batch (--batch-size) spread over more replicas or workers instead."
            )
        if self.clip_grad_norm:
            # The train step all-reduces the gradient itself, to clip the global gradient's
            # norm; the optimizer must not sum the already-summed gradient over replicas again.
            inner._all_reduce_sum_gradients = _already_all_reduced
        # Built now rather than inside the first traced step, so that a step that fails on bad
        # data leaves nothing half-created and the next fit starts cleanly.
        self.optimizer.build(self.denoiser.trainable_variables)

    def _maybe_symbolic_build(self, iterator=None, data_batch=None):
        # Under a strategy, Keras first averages one data batch over all replicas (a collective
        # MEAN) to build the model symbolically; across workers that fails for integer labels.
        # A DiffusionModel is built by __init__ and compile, so there is nothing to build.
        if self.optimizer is not None and self.optimizer.built and all(layer.built for layer in self._flatten_layers()):
            return
        super()._maybe_symbolic_build(iterator=iterator, data_batch=data_batch)

    def get_compile_config(self) -> dict[str, Any] | None:
        return super().get_compile_config()

    def compile_from_config(self, config: dict[str, Any]) -> None:
        self.compile(**keras.saving.deserialize_keras_object(config))

    @property
    def metrics(self):
        return [self.loss_tracker]

    def get_config(self) -> dict[str, Any]:
        return {
            **super().get_config(),
            "denoiser": keras.saving.serialize_keras_object(self.denoiser),
            "schedule": self.schedule.get_config(),
            "ema_decay": self.ema_decay,
            "ema_warmup": self.ema_warmup,
            "clip_grad_norm": self.clip_grad_norm,
            "seed": self.seed,
            "image_shape": list(self.image_shape),
            "variance": self.variance,
            "clip_x0": self.clip_x0,
            "num_classes": self.num_classes,
            "label_dropout": self.label_dropout,
            "class_names": self.class_names,
        }

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> DiffusionModel:
        config = dict(config)
        config["denoiser"] = keras.saving.deserialize_keras_object(config["denoiser"])
        config["schedule"] = NoiseSchedule.from_config(config["schedule"])
        config["image_shape"] = tuple(config["image_shape"])
        return cls(**config)

    # --- Algorithm 1 -----------------------------------------------------------------------

    def train_step(self, data):
        images, labels = self._images_and_labels(data)
        key = self._training_key()
        first = self._first_example(images)
        t, noise = self._draw_t_and_noise(images, key, first)
        replicas = tf.distribute.get_strategy().num_replicas_in_sync
        images_valid = tf.reduce_max(tf.abs(images)) <= _MAX_ABS_PIXEL
        labels_valid = tf.constant(True)
        conditions = []
        if labels is not None:
            labels_valid = tf.reduce_all((labels >= 0) & (labels < self.num_classes))
            conditions = [self._drop_labels(labels, key, first)]
        in_range = images_valid & labels_valid

        def update():
            x_t = self.schedule.q_sample(images, t, noise)
            with tf.GradientTape() as tape, example_keys(fold_in(key, 3), first):
                eps = tf.cast(self.denoiser([x_t, t, *conditions], training=True), tf.float32)
                loss = tf.reduce_mean(tf.square(noise - eps))
                # Gradients are summed over replicas: dividing each replica's mean by their
                # number makes the sum the gradient of the global-batch mean.
                scaled_loss = self.optimizer.scale_loss(loss / replicas)
            variables = self.denoiser.trainable_variables
            gradients = tape.gradient(scaled_loss, variables)
            if self.clip_grad_norm:
                gradients = self._clip_global_norm(gradients, replicas)
            self.optimizer.apply_gradients(zip(gradients, variables))
            self._update_ema()
            self.batches_seen.assign_add(1)
            return loss

        if not tf.distribute.has_strategy():
            # A cond rather than an assert: XLA compiles asserts to nothing, and Keras turns
            # XLA on for one GPU. Out-of-range data skips the update; the train function raises.
            loss = tf.cond(in_range, update, lambda: tf.constant(np.nan, tf.float32))
        else:
            # A merge_call (optimizer, EMA) cannot sit in a cond branch; the assert holds
            # without XLA, which Keras leaves off under strategies.
            checks = [
                tf.debugging.Assert(images_valid, [_OUT_OF_RANGE]),
                tf.debugging.Assert(labels_valid, [self._bad_labels_message()]),
            ]
            with tf.control_dependencies(checks):
                loss = update()
        self.loss_tracker.update_state(loss)
        return {
            "loss": _reportable(self.loss_tracker.result()),
            _OUT_OF_RANGE_KEY: _reportable(1.0 - tf.cast(images_valid, tf.float32)),
            _BAD_LABELS_KEY: _reportable(1.0 - tf.cast(labels_valid, tf.float32)),
        }

    def _bad_labels_message(self) -> str:
        return (
            f"Training labels must be class indices in [0, {self.num_classes}) for this {self.num_classes}-class "
            "model; check the dataset's labels or build the model with more classes."
        )

    def _drop_labels(self, labels: tf.Tensor, key: tf.Tensor, first) -> tf.Tensor:
        """Each label replaced by the null label K with probability label_dropout, keyed like the noise."""
        if not self.label_dropout:
            return labels
        uniform = example_uniforms(fold_in(key, 4), first, tf.shape(labels)[0], ())
        return tf.where(uniform < self.label_dropout, tf.fill(tf.shape(labels), self.num_classes), labels)

    def make_train_function(self, force=False):
        """Keras' train function, raising KddpmError after a step that saw out-of-range data."""
        if self.train_function is not None and not force:
            return self.train_function
        super().make_train_function(force=force)
        step = self.train_function

        def checked(iterator):
            try:
                logs = dict(step(iterator))
            except tf.errors.InvalidArgumentError as error:
                for message in (_OUT_OF_RANGE, self._bad_labels_message()):
                    if message in str(error):
                        raise KddpmError(message) from None
                raise
            if float(tf.reduce_max(logs.pop(_OUT_OF_RANGE_KEY))) > 0:
                raise KddpmError(_OUT_OF_RANGE)
            if float(tf.reduce_max(logs.pop(_BAD_LABELS_KEY))) > 0:
                raise KddpmError(self._bad_labels_message())
            return logs

        self.train_function = checked
        return checked

    def test_step(self, data):
        """L_simple on validation data, with noise that depends only on the batch's content."""
        images, labels = self._images_and_labels(data)
        fingerprint = tf.cast(tf.reduce_sum(tf.abs(images)) * 1024.0, tf.int64)
        key = tf.stack([tf.constant(self.seed ^ 0x5EED, tf.int64), fingerprint])
        t, noise = self._draw_t_and_noise(images, key, self._first_example(images))
        x_t = self.schedule.q_sample(images, t, noise)
        conditions = [] if labels is None else [tf.clip_by_value(labels, 0, self.num_classes)]
        eps = tf.cast(self.denoiser([x_t, t, *conditions], training=False), tf.float32)
        self.loss_tracker.update_state(tf.reduce_mean(tf.square(noise - eps)))
        return {"loss": _reportable(self.loss_tracker.result())}

    def _training_key(self) -> tf.Tensor:
        """The [2] int64 key of the current batch: (seed, batches trained on so far)."""
        return tf.stack([tf.constant(self.seed, tf.int64), tf.cast(self.batches_seen, tf.int64)])

    @staticmethod
    def _first_example(images: tf.Tensor) -> tf.Tensor:
        """The global-batch position of this replica's first example (replicas hold contiguous slices)."""
        context = tf.distribute.get_replica_context()
        replica = context.replica_id_in_sync_group if context is not None else 0
        return tf.cast(replica, tf.int32) * tf.shape(images)[0]

    def _draw_t_and_noise(
        self, images: tf.Tensor, key: tf.Tensor, first: tf.Tensor | int = 0
    ) -> tuple[tf.Tensor, tf.Tensor]:
        """t ~ U{0..T-1} and eps ~ N(0, I) for this replica's examples [first, first + B).

        Example i of the global batch gets the draws of position i of the key's streams,
        whatever the number of replicas; each replica draws its own examples only.
        """
        local = tf.shape(images)[0]
        t = example_integers(fold_in(key, 1), first, local, self.schedule.timesteps)
        noise = example_normals(fold_in(key, 2), first, local, self.image_shape)
        return t, noise

    def _images_and_labels(self, data) -> tuple[tf.Tensor, tf.Tensor | None]:
        """The image batch of ``data`` and, for a conditional model, its int32 labels [B]."""
        images = self._images(data)
        if self.num_classes is None:
            return images, None
        if not isinstance(data, (tuple, list)) or len(data) < 2 or data[1] is None:
            raise KddpmError(
                f"This model is class-conditional ({self.num_classes} classes): train it on (images, labels) "
                "pairs, e.g. kddpm.load_dataset(...) with its labels, not on images alone."
            )
        labels = data[1]
        if not labels.dtype.is_integer:
            raise KddpmError(f"Labels are {labels.dtype.name}; give integer class indices in [0, {self.num_classes}).")
        labels = tf.reshape(tf.cast(labels, tf.int32), [-1])
        return images, labels

    def _images(self, data) -> tf.Tensor:
        """The image batch of ``data`` (images, or (images, labels)), checked against the network."""
        images = data[0] if isinstance(data, (tuple, list)) else data
        if isinstance(images, dict):
            raise KddpmError("Training data must be images or (images, labels) pairs, not a dict.")
        if images.dtype != tf.float32:
            raise KddpmError(
                f"Training images are {images.dtype.name}; convert them to float32 in [-1, 1] "
                "(x / 127.5 - 1 for uint8), as kddpm.load_dataset does."
            )
        if images.shape.rank != 4 or tuple(images.shape[1:]) != self.image_shape:
            raise KddpmError(
                f"Training images have shape {tuple(images.shape)} but the denoiser expects "
                f"[B, {', '.join(map(str, self.image_shape))}]; resize or pad the data "
                "(kddpm.load_dataset(..., image_size=...)) or build the network for this shape."
            )
        return images

    def _clip_global_norm(self, gradients, replicas: int):
        """Clips by the norm of the global-batch gradient, not of each replica's share."""
        # A loss-scaling optimizer hands back scaled gradients: clip them at the same scale.
        threshold = self.clip_grad_norm * tf.cast(getattr(self.optimizer, "dynamic_scale", 1.0), tf.float32)
        context = tf.distribute.get_replica_context()
        if replicas > 1 and context is not None:
            # The step's one all-reduce: every replica now holds the global gradient, and
            # the optimizer applies it as it is (see compile).
            gradients = context.all_reduce(tf.distribute.ReduceOp.SUM, gradients)
        return tf.clip_by_global_norm(gradients, threshold)[0]

    # --- EMA -------------------------------------------------------------------------------

    def _ema_decay_now(self) -> tf.Tensor:
        if not self.ema_warmup:
            return tf.constant(self.ema_decay)
        n = tf.cast(self.optimizer.iterations, tf.float32)
        return tf.minimum(self.ema_decay, (1.0 + n) / (10.0 + n))

    def _update_ema(self) -> None:
        decay = self._ema_decay_now()
        pairs = [
            (ema.value, weight.value, weight.trainable)
            for ema, weight in zip(self.ema_denoiser.weights, self.denoiser.weights)
        ]

        def update(strategy, pairs, decay):
            # Runs in cross-replica context; ``update`` hands each device its own components.
            for ema, weight, trainable in pairs:
                if trainable:
                    strategy.extended.update(ema, _moving_average, args=(weight, decay))
                else:
                    strategy.extended.update(ema, lambda e, w: e.assign(w), args=(weight,))

        tf.__internal__.distribute.interim.maybe_merge_call(update, tf.distribute.get_strategy(), pairs, decay)

    def reset_ema(self) -> None:
        """Copies the current weights into the EMA network."""
        self.ema_denoiser.set_weights(self.denoiser.get_weights())

    # --- Sampling --------------------------------------------------------------------------

    def sample(
        self,
        num_images: int | None = None,
        seed: int = 0,
        sampler: str = DEFAULT_SAMPLER,
        steps: int | None = None,
        eta: float | None = None,
        variance: str | None = None,
        clip_x0: bool | str | None = None,
        use_ema: bool = True,
        batch_size: int | None = None,
        progress: bool = False,
        jit_compile: bool | str = "auto",
        x_T: np.ndarray | None = None,
        precision: str | None = None,
        labels: int | str | np.ndarray | list | None = None,
        guidance_scale: float | None = None,
    ) -> np.ndarray:
        """Draws ``num_images`` images: [N, H, W, C] float32 numpy in [-1, 1].

        sampler: 'dpm++2m' (the default: DPM-Solver++(2M), ``steps`` default 20, the best
        images per network call), its stochastic variant 'dpm++2m_sde', 'ddim' (``steps``,
        default 50, stochasticity ``eta``, default 0), or 'ddpm' (the paper's Algorithm 2, all
        T steps; sigma^2 = ``variance``, 'beta_tilde' or 'beta', default the model's
        ``variance``). An option that does not apply to the sampler is an error.
        clip_x0: True (clip the predicted x0 to [-1, 1] at every step), False, or 'dynamic'
        (dynamic thresholding); default: the model's ``clip_x0``. use_ema: sample with the EMA
        weights (the default, as the paper does). batch_size: images per graph call (default:
        all); image i of a seed is the same whatever the batch size. jit_compile: XLA on or
        off, or "auto" (see ``Sampler``). x_T: explicit initial noise [N, H, W, C] float32 instead of
        the seed's (the per-step noise still comes from the seed). precision: 'float32' or
        'bfloat16' to run the network in that precision (weights unchanged); default: as the
        model was built. The same seed gives the same images.

        Class-conditional models: labels, one class (index or name) for every image or [N] of
        them, in [0, K) (K, the null label, asks for an unconditional image); None: all
        unconditional. guidance_scale: w >= 0 of classifier-free guidance, eps = (1 + w)
        eps(x_t, t, c) - w eps(x_t, t, null), one network call on the doubled batch per step
        (default with labels: ``kddpm.defaults.DEFAULT_GUIDANCE``); 0: plain conditional
        sampling, one call on the batch itself.
        """
        plan = self.plan(sampler, steps, eta, variance, clip_x0)
        if x_T is not None:
            x_T = np.asarray(x_T, np.float32)
            if x_T.ndim != 4 or x_T.shape[1:] != self.image_shape or len(x_T) == 0:
                raise KddpmError(
                    f"x_T has shape {x_T.shape}; expected [N, {', '.join(map(str, self.image_shape))}] with N >= 1."
                )
            if num_images not in (None, len(x_T)):
                raise KddpmError(f"num_images={num_images} but x_T holds {len(x_T)} images; give one or the other.")
            num_images = len(x_T)
        _check_count("num_images", num_images)
        if batch_size is not None:
            _check_count("batch_size", batch_size, " (or None for all at once)")
        labels, guidance_scale = self.label_array(labels, num_images, guidance_scale)
        runner = self._get_sampler(use_ema, jit_compile, precision)
        batch_size = batch_size or num_images
        batches = []
        for start in range(0, num_images, batch_size):
            count = min(batch_size, num_images - start)
            initial = None if x_T is None else x_T[start : start + count]
            images = runner.sample(
                plan,
                count,
                seed=seed,
                x_T=initial,
                progress=progress,
                first_image=start,
                labels=None if labels is None else labels[start : start + count],
                guidance_scale=guidance_scale,
            )
            batches.append(np.clip(images.numpy(), -1.0, 1.0))
        return np.concatenate(batches, axis=0)

    def class_index(self, name_or_index: int | str) -> int:
        """The class index of a class name or index (a string of digits counts as an index)."""
        if self.num_classes is None:
            raise KddpmError("This model is unconditional; it has no classes to ask for.")
        if isinstance(name_or_index, str) and not name_or_index.strip().isdigit():
            names = self.class_names or []
            folded = {name.lower(): i for i, name in enumerate(names)}
            if name_or_index.lower() not in folded:
                known = ", ".join(names) if names else f"indices 0..{self.num_classes - 1} (the model has no names)"
                raise KddpmError(f"Unknown class {name_or_index!r}; this model's classes are {known}.")
            return folded[name_or_index.lower()]
        index = int(name_or_index)
        if not 0 <= index <= self.num_classes:
            raise KddpmError(
                f"Class {index} is outside [0, {self.num_classes - 1}] ({self.num_classes} is the null label)."
            )
        return index

    def label_array(
        self, labels: int | str | np.ndarray | list | None, num_images: int, guidance_scale: float | None = None
    ) -> tuple[np.ndarray | None, float]:
        """(``labels`` as [num_images] int32 class indices, the guidance scale w), both checked.

        labels None stays None (w then 0); w None is ``DEFAULT_GUIDANCE`` with labels.
        """
        if guidance_scale is None:
            guidance_scale = DEFAULT_GUIDANCE if labels is not None and self.num_classes is not None else 0.0
        if not (isinstance(guidance_scale, (int, float, np.number)) and math.isfinite(guidance_scale)):
            raise KddpmError(f"guidance_scale must be a finite number >= 0, got {guidance_scale!r}.")
        if guidance_scale < 0:
            raise KddpmError(f"guidance_scale must be >= 0, got {guidance_scale}.")
        if self.num_classes is None:
            if labels is not None or guidance_scale:
                raise KddpmError(
                    "labels and guidance_scale need a class-conditional model; train one with "
                    "num_classes (kddpm train --conditional)."
                )
            return None, 0.0
        w = float(guidance_scale)
        if labels is None:
            if w:
                raise KddpmError("guidance_scale needs labels: guidance moves each image towards its class.")
            return None, 0.0
        if isinstance(labels, (int, np.integer, str)):
            return np.full([num_images], self.class_index(labels), np.int32), w
        values = [self.class_index(label) for label in np.asarray(labels).reshape(-1).tolist()]
        if len(values) != num_images:
            raise KddpmError(f"labels holds {len(values)} classes for {num_images} images; give one per image.")
        return np.asarray(values, np.int32), w

    def trajectory(
        self,
        num_images: int = 4,
        seed: int = 0,
        sampler: str = DEFAULT_SAMPLER,
        steps: int | None = None,
        eta: float | None = None,
        variance: str | None = None,
        clip_x0: bool | str | None = None,
        snapshots: int = 10,
        labels: int | str | np.ndarray | list | None = None,
        guidance_scale: float | None = None,
    ) -> list[tuple[int, np.ndarray, np.ndarray]]:
        """x_t and the predicted x0 at ``snapshots`` points of the reverse process, from the EMA
        weights (see ``Sampler.trajectory``; the options and defaults are ``sample``'s)."""
        plan = self.plan(sampler, steps, eta, variance, clip_x0)
        _check_count("num_images", num_images)
        labels, guidance_scale = self.label_array(labels, num_images, guidance_scale)
        return self._get_sampler(True, "auto").trajectory(plan, num_images, seed, snapshots, labels, guidance_scale)

    def plan(
        self,
        sampler: str = DEFAULT_SAMPLER,
        steps: int | None = None,
        eta: float | None = None,
        variance: str | None = None,
        clip_x0: bool | str | None = None,
    ) -> SamplingPlan:
        """``make_plan`` with this model's schedule, its default variance (DDPM) and clip_x0."""
        if variance is None and sampler == "ddpm":
            variance = self.variance
        return make_plan(self.schedule, sampler, steps, eta, variance, self.clip_x0 if clip_x0 is None else clip_x0)

    def _get_sampler(self, use_ema: bool, jit_compile: bool | str, precision: str | None = None) -> Sampler:
        network = self.ema_denoiser if use_ema else self.denoiser
        key = (use_ema, jit_compile, precision)
        if self._sampler is None or self._sampler_key != key:
            copy = network if precision is None else network_with_precision(network, precision)
            self._sampler = Sampler(copy, self.image_shape, jit_compile=jit_compile, num_classes=self.num_classes)
            self._sampler_key = key
        elif self._sampler.network is not network:
            # A copy in another precision: bring it the weights trained since it was made.
            self._sampler.network.set_weights(network.get_weights())
        return self._sampler


def _check_count(name: str, value, alternative: str = "") -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise KddpmError(f"{name} must be a positive integer{alternative}, got {value!r}.")


def network_with_precision(network: keras.Model, precision: str) -> keras.Model:
    """``network`` computing in ``precision`` ('float32' or 'bfloat16'), with the same float32 weights.

    The network is returned as it is when it already computes so; otherwise a copy whose layers
    take the mixed policy ('mixed_bfloat16') or 'float32'. Output layers stay float32, as the
    U-Net builds them, so that eps and the sampler's arithmetic are float32 either way.
    """
    policy = {"float32": "float32", "bfloat16": "mixed_bfloat16"}.get(precision)
    if policy is None:
        raise KddpmError(f"Unknown sampling precision {precision!r}; use 'float32' or 'bfloat16'.")
    outputs = {tensor._keras_history.operation.name for tensor in network.outputs}
    wanted = {layer.name: "float32" if layer.name in outputs else policy for layer in network.layers}
    if all(layer.dtype_policy.name == wanted[layer.name] for layer in network.layers if layer.weights):
        return network

    def with_policy(layer):
        return layer.__class__.from_config({**layer.get_config(), "dtype": wanted[layer.name]})

    copy = keras.models.clone_model(network, clone_function=with_policy)
    copy.set_weights(network.get_weights())
    return copy


def _reportable(loss: tf.Tensor) -> tf.Tensor:
    """The loss in the shape Keras can average over replicas.

    Across several workers Keras averages step outputs with ``strategy.reduce(MEAN, v,
    axis=0)``, which needs a batch axis; a scalar there fails. A [1] tensor is averaged to
    a scalar.
    """
    strategy = tf.distribute.get_strategy()
    if isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy) and strategy.extended._in_multi_worker_mode():
        return tf.reshape(loss, [1])
    return loss


def _already_all_reduced(grads_and_vars):
    """Stands in for the optimizer's all-reduce when the train step has done it."""
    return list(grads_and_vars)


def _moving_average(average: tf.Variable, value: tf.Tensor, decay: tf.Tensor):
    return average.assign(decay * average + (1.0 - decay) * tf.cast(value, average.dtype))


def _image_shape_of(denoiser: keras.Model, image_shape) -> tuple[int, int, int]:
    if image_shape is None:
        try:
            image_shape = tuple(denoiser.inputs[0].shape[1:])
        except (AttributeError, TypeError, IndexError, ValueError):
            raise KddpmError("Cannot read the image shape from this denoiser; pass image_shape=(H, W, C).") from None
    image_shape = tuple(image_shape)
    if len(image_shape) != 3 or not all(isinstance(d, int) and d > 0 for d in image_shape):
        raise KddpmError(f"image_shape must be (H, W, C) with known sizes, got {image_shape}.")
    return image_shape


def _num_classes_of(denoiser: keras.Model, num_classes: int | None) -> int | None:
    """K of a conditional denoiser (its ``label`` input and ``class_embedding``), checked against ``num_classes``."""
    names = [getattr(tensor, "name", "") for tensor in getattr(denoiser, "inputs", None) or []]
    conditional = any(name.startswith("label") for name in names)
    found = None
    if conditional:
        try:
            found = int(denoiser.get_layer("class_embedding").input_dim) - 1
        except ValueError:
            found = None
    if num_classes is None:
        if conditional and found is None:
            raise KddpmError("The denoiser takes a label input; pass num_classes=K (its null label is K).")
        return found
    if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)) or num_classes < 1:
        raise KddpmError(f"num_classes must be a positive integer, got {num_classes!r}.")
    if names and not conditional:
        raise KddpmError(
            f"num_classes={num_classes} but the denoiser has no label input; build it with "
            f"build_unet(..., num_classes={num_classes})."
        )
    if found is not None and found != num_classes:
        raise KddpmError(f"num_classes={num_classes} but the denoiser's class embedding holds {found} classes.")
    return int(num_classes)


def _checked_class_names(class_names, num_classes: int | None) -> list[str] | None:
    if class_names is None:
        return None
    names = [str(name) for name in class_names]
    if num_classes is None or len(names) != num_classes:
        raise KddpmError(f"class_names has {len(names)} names for a model with {num_classes} classes.")
    if len(set(names)) != len(names):
        raise KddpmError(f"class_names must be distinct, got {names}.")
    return names


def _copy_network(
    network: keras.Model, image_shape: tuple[int, int, int], num_classes: int | None = None
) -> keras.Model:
    """A new network of the same architecture holding a copy of ``network``'s weights."""
    try:
        copy = keras.models.clone_model(network)
    except Exception as error:  # clone_model raises many types for unserialisable models
        raise KddpmError(
            f"Cannot copy the denoiser for its EMA weights ({error}); give the model a get_config()."
        ) from error
    if not copy.built or len(copy.weights) != len(network.weights):
        batch = 1
        labels = [] if num_classes is None else [tf.zeros((batch,), tf.int32)]
        copy([tf.zeros((batch, *image_shape)), tf.zeros((batch,), tf.int32), *labels])
    copy.set_weights(network.get_weights())
    return copy


def load_diffusion_model(path: str | os.PathLike) -> DiffusionModel:
    """Loads a ``.keras`` file saved from a DiffusionModel, or ``RUN/model.keras`` for a run folder.

    Raises KddpmError naming the file when it is missing, unreadable or not a DiffusionModel.
    """
    path = Path(path)
    if path.is_dir():
        path = path / "model.keras"
    if not path.is_file():
        raise KddpmError(f"No model at {path}; give a run folder holding model.keras or a .keras file.")
    _check_keras_archive(path)
    try:
        model = keras.models.load_model(path)
    except Exception as error:  # Keras raises many types for damaged archives
        raise KddpmError(
            f"Cannot read {path} ({type(error).__name__}: {str(error).splitlines()[0][:200] if str(error) else ''}); "
            "the file is corrupt, truncated or not a Keras model: restore it from the run's checkpoints/ or retrain."
        ) from error
    if not isinstance(model, DiffusionModel):
        raise KddpmError(f"{path} holds a {type(model).__name__}, not a kddpm DiffusionModel.")
    return model


def _check_keras_archive(path: Path) -> None:
    """A ``.keras`` file is a zip archive: name truncation or damage before Keras reads it."""
    restore = "restore it from the run's checkpoints/ or backup, or retrain"
    try:
        with zipfile.ZipFile(path) as archive:
            damaged = archive.testzip()
            names = set(archive.namelist())
    except zipfile.BadZipFile:
        raise KddpmError(
            f"{path} is truncated or not a zip archive (a .keras file is one), so it is not a saved Keras model; "
            f"{restore}."
        ) from None
    except (OSError, EOFError, zlib.error) as error:
        raise KddpmError(f"{path} is damaged ({error}); {restore}.") from None
    if damaged is not None:
        raise KddpmError(f"{path} is damaged: its member {damaged} fails its checksum; {restore}.")
    if "config.json" not in names:
        raise KddpmError(f"{path} is a zip archive without config.json, not a saved Keras model; {restore}.")
