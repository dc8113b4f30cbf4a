"""DiffusionModel: DDPM training (Algorithm 1, L_simple) as a ``keras.Model``, with EMA weights."""

from __future__ import annotations

from typing import Any

import keras
import numpy as np
import tensorflow as tf

# Registers the U-Net's custom layers, so that a saved model loads without custom_objects
# in a process that never built one.
import kddpm.unet  # noqa: F401
from kddpm import labels as _labels
from kddpm.errors import KddpmError
from kddpm.generation import Generation
from kddpm.networks import copy_network
from kddpm.sampling import VARIANCES, check_clip_x0
from kddpm.schedule import NoiseSchedule
from kddpm.streams import example_integers, example_keys, example_normals, fold_in
from kddpm.training_data import BAD_LABELS_KEY, MAX_ABS_PIXEL, OUT_OF_RANGE, OUT_OF_RANGE_KEY, TrainingDataChecks


@keras.saving.register_keras_serializable(package="kddpm")
class DiffusionModel(Generation, TrainingDataChecks, keras.Model):
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
        self.num_classes = _labels.num_classes_of(denoiser, num_classes)
        if not 0.0 <= label_dropout < 1.0:
            raise KddpmError(f"label_dropout must be in [0, 1), got {label_dropout}.")
        self.label_dropout = float(label_dropout)
        self.class_names = _labels.checked_class_names(class_names, self.num_classes)
        self.ema_denoiser = copy_network(denoiser, self.image_shape, self.num_classes)
        self.ema_denoiser.trainable = False
        # Data batches trained on (skipped float16 steps included): keys the training noise and
        # says where a resumed run's data stream continues. optimizer.iterations is not it: a
        # loss-scaling optimizer does not count the steps it skips.
        self.batches_seen = keras.Variable(
            0, dtype="int64", trainable=False, aggregation="only_first_replica", name="batches_seen"
        )
        self.loss_tracker = keras.metrics.Mean(name="loss")
        # What improved-diffusion logs: the loss in each quarter of the timesteps (t in [0, T/4)
        # is loss_q0), and the gradient's global norm before clipping.
        self.quartile_trackers = [keras.metrics.Mean(name=f"loss_q{q}") for q in range(4)]
        self.grad_norm_tracker = keras.metrics.Mean(name="grad_norm")
        self._pending_data_checks: list = []
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
        return [self.loss_tracker, *self.quartile_trackers] + ([self.grad_norm_tracker] if self.clip_grad_norm else [])

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
            # Which kddpm wrote the file (kddpm info shows it; loading ignores it).
            "kddpm_version": _kddpm_version(),
        }

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> DiffusionModel:
        config = dict(config)
        config.pop("kddpm_version", None)
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
        images_valid = tf.reduce_max(tf.abs(images)) <= MAX_ABS_PIXEL
        labels_valid = tf.constant(True)
        conditions = []
        if labels is not None:
            labels_valid = tf.reduce_all((labels >= 0) & (labels < self.num_classes))
            conditions = [_labels.drop_labels(labels, self.label_dropout, self.num_classes, key, first)]
        in_range = images_valid & labels_valid

        def update():
            x_t = self.schedule.q_sample(images, t, noise)
            with tf.GradientTape() as tape, example_keys(fold_in(key, 3), first):
                eps = tf.cast(self.denoiser([x_t, t, *conditions], training=True), tf.float32)
                loss = tf.reduce_mean(tf.square(noise - eps))
                per_example = tf.stop_gradient(tf.reduce_mean(tf.square(noise - eps), axis=[1, 2, 3]))
                # Gradients are summed over replicas: dividing each replica's mean by their
                # number makes the sum the gradient of the global-batch mean.
                scaled_loss = self.optimizer.scale_loss(loss / replicas)
            variables = self.denoiser.trainable_variables
            gradients = tape.gradient(scaled_loss, variables)
            norm = tf.constant(np.nan, tf.float32)
            if self.clip_grad_norm:
                gradients, norm = self._clip_global_norm(gradients, replicas)
            self.optimizer.apply_gradients(zip(gradients, variables))
            self._update_ema()
            self.batches_seen.assign_add(1)
            return loss, per_example, norm

        if not tf.distribute.has_strategy():
            # A cond rather than an assert: XLA compiles asserts to nothing, and Keras turns
            # XLA on for one GPU. Out-of-range data skips the update; the train function raises.
            skipped = tf.constant(np.nan, tf.float32)
            loss, per_example, norm = tf.cond(
                in_range, update, lambda: (skipped, tf.fill(tf.shape(t), skipped), skipped)
            )
        else:
            # A merge_call (optimizer, EMA) cannot sit in a cond branch; the assert holds
            # without XLA, which Keras leaves off under strategies.
            checks = [
                tf.debugging.Assert(images_valid, [OUT_OF_RANGE]),
                tf.debugging.Assert(labels_valid, [_labels.bad_training_labels_message(self.num_classes or 0)]),
            ]
            with tf.control_dependencies(checks):
                loss, per_example, norm = update()
        self.loss_tracker.update_state(loss)
        self._track_quartiles(per_example, t)
        if self.clip_grad_norm:
            self.grad_norm_tracker.update_state(norm)
        return {
            **{metric.name: _reportable(metric.result()) for metric in self.metrics},
            OUT_OF_RANGE_KEY: _reportable(1.0 - tf.cast(images_valid, tf.float32)),
            BAD_LABELS_KEY: _reportable(1.0 - tf.cast(labels_valid, tf.float32)),
        }

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

    def _clip_global_norm(self, gradients, replicas: int):
        """Clips by the norm of the global-batch gradient, not of each replica's share."""
        # A loss-scaling optimizer hands back scaled gradients: clip them at the same scale.
        threshold = self.clip_grad_norm * tf.cast(getattr(self.optimizer, "dynamic_scale", 1.0), tf.float32)
        context = tf.distribute.get_replica_context()
        if replicas > 1 and context is not None:
            # The step's one all-reduce: every replica now holds the global gradient, and
            # the optimizer applies it as it is (see compile).
            gradients = context.all_reduce(tf.distribute.ReduceOp.SUM, gradients)
        clipped, norm = tf.clip_by_global_norm(gradients, threshold)
        return clipped, norm / tf.cast(getattr(self.optimizer, "dynamic_scale", 1.0), tf.float32)

    def _track_quartiles(self, per_example: tf.Tensor, t: tf.Tensor) -> None:
        """Adds each example's loss [B] to the tracker of its quarter of the timesteps."""
        quarter = (t * 4) // self.schedule.timesteps
        for q, tracker in enumerate(self.quartile_trackers):
            tracker.update_state(per_example, sample_weight=tf.cast(tf.equal(quarter, q), tf.float32))

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


def _kddpm_version() -> str:
    import kddpm

    return kddpm.__version__


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
