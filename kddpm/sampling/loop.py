"""The reverse loop that runs any sampling plan, compiled as one graph.

The loop runs inside one ``tf.function`` (a ``tf.while_loop``), so a whole batch of images costs
one graph call, or one per chunk when a progress bar is shown. Its state is x_t and, for
multistep plans, the previous step's x0_hat (see ``kddpm.sampling.plans``).
"""

from __future__ import annotations

import itertools
import math

import keras
import numpy as np
import tensorflow as tf

from kddpm.errors import KddpmError
from kddpm.progress import progress_bar
from kddpm.sampling.plans import NUM_COEFFICIENTS, SamplingPlan, clip_prediction
from kddpm.streams import example_normals, fold_in, seed_pair

# On CPU, XLA's compiled loop beats TensorFlow's oneDNN kernels only at small batches. Per
# reverse step of the 64-channel (1, 2, 2) U-Net at 32x32x1 on 2 cores, XLA vs plain graph:
# 12.0 vs 15.7 ms at batch 1, 38 vs 44 at 4, 70 vs 72 at 8, 143 vs 133 at 16, 294 vs 264 at 32
# (benchmarks/bench_train_and_sample.py prints this sweep).
XLA_CPU_MAX_BATCH = 8
# The stream of the known image's noise in inpainting (apart from x_T's, 0, and step k's, k + 1).
_KNOWN_STREAM = 1 << 20


def initial_noise(key: tf.Tensor, first: int | tf.Tensor, count: int | tf.Tensor, image_shape) -> tf.Tensor:
    """x_T ~ N(0, I) for images [first, first + count) of ``key``: [count, H, W, C] float32."""
    return example_normals(fold_in(key, 0), first, count, image_shape)


def step_noise(key: tf.Tensor, step: int | tf.Tensor, first, count, image_shape) -> tf.Tensor:
    """z ~ N(0, I) of plan step ``step`` for images [first, first + count): [count, H, W, C]."""
    return example_normals(fold_in(key, step + 1), first, count, image_shape)


class Sampler:
    """Runs a ``SamplingPlan`` with an eps-network ``[x_t, t] -> eps`` in one compiled loop.

    Noise is a function of the seed and the image's index alone: image i's x_T is example i of
    the stream ``fold_in(seed, 0)`` and its noise at plan step k example i of ``fold_in(seed,
    k + 1)`` (``kddpm.streams``). So the same seed gives the same images, and image i is the
    same whatever batch it is drawn in (``first_image`` says where a batch starts). Explicit
    ``x_T`` and per-step ``noise`` can be given instead (to compare implementations).

    jit_compile: True or False, or "auto": XLA on a GPU, and on CPU for batches of at most
    ``XLA_CPU_MAX_BATCH`` images, where it is faster. The noise does not depend on it, so
    the images agree either way to float rounding.

    num_classes: K for a class-conditional network ``[x_t, t, label] -> eps``; ``sample`` then
    takes ``labels`` [B] in [0, K] (K: the null label) and a classifier-free guidance scale w:
    eps = (1 + w) eps(x_t, t, c) - w eps(x_t, t, null), both halves computed by one network call
    on the doubled batch at each step (w = 0 calls the network once on the batch itself).
    """

    def __init__(
        self,
        network: keras.Model,
        image_shape: tuple[int, int, int],
        jit_compile: bool | str = "auto",
        num_classes: int | None = None,
    ):
        if jit_compile not in (True, False, "auto"):
            raise KddpmError(f"jit_compile must be True, False or 'auto', got {jit_compile!r}.")
        self.network = network
        self.image_shape = tuple(int(d) for d in image_shape)
        self.jit_compile = jit_compile
        self.num_classes = num_classes
        self._functions: dict[tuple[bool, bool, bool, bool], tf.types.experimental.PolymorphicFunction] = {}

    def uses_xla(self, batch: int) -> bool:
        """Whether a batch of ``batch`` images runs through XLA."""
        if self.jit_compile != "auto":
            return bool(self.jit_compile)
        return batch <= XLA_CPU_MAX_BATCH or bool(tf.config.list_physical_devices("GPU"))

    def sample(
        self,
        plan: SamplingPlan,
        num_images: int | None = None,
        seed: int = 0,
        x_T: np.ndarray | tf.Tensor | None = None,
        noise: np.ndarray | tf.Tensor | None = None,
        progress: bool = False,
        chunks: int = 50,
        first_image: int = 0,
        labels: np.ndarray | tf.Tensor | None = None,
        guidance_scale: float = 0.0,
        known: tuple[np.ndarray | tf.Tensor, np.ndarray | tf.Tensor] | None = None,
        shared_noise: bool = False,
    ) -> tf.Tensor:
        """Runs the reverse process and returns x_0: [B, H, W, C] float32 (not clipped).

        num_images: B, when ``x_T`` is not given. x_T: [B, H, W, C] initial noise (or, for a
        plan that starts later, x_t at its first timestep). noise: [S, B, H, W, C] per-step
        noise, S = plan.num_steps. progress: show a Keras progress bar, running the loop in
        about ``chunks`` graph calls instead of one. first_image: the seed's image index of
        this batch's first image (images first_image .. first_image + B - 1 of the seed are
        drawn). labels: [B] int in [0, K] and guidance_scale: w >= 0, conditional networks only
        (see the class docstring). known: (images [B, H, W, C] in [-1, 1], keep [B, H, W, 1]
        with 1 where the image is kept) for a plan with ``known_rows`` (inpainting, RePaint):
        after each network step the kept pixels are replaced by the known image noised to the
        step's level. shared_noise: every image of the batch gets image first_image's per-step
        noise (interpolations that differ only in their x_t).
        """
        key = seed_pair(seed)
        if x_T is None:
            if not isinstance(num_images, (int, np.integer)) or num_images < 1:
                raise KddpmError(f"num_images must be a positive integer, got {num_images!r}.")
            x_T = initial_noise(key, first_image, num_images, self.image_shape)
        x = tf.convert_to_tensor(x_T, tf.float32)
        if x.shape.rank != 4 or tuple(x.shape[1:]) != self.image_shape or x.shape[0] == 0:
            raise KddpmError(f"x_T has shape {tuple(x.shape)}; expected [B, {', '.join(map(str, self.image_shape))}].")
        if noise is not None:
            noise = tf.convert_to_tensor(noise, tf.float32)
            if tuple(noise.shape) != (plan.num_steps, *x.shape):
                raise KddpmError(f"noise has shape {tuple(noise.shape)}; expected {(plan.num_steps, *x.shape)}.")
        condition = self._condition(labels, guidance_scale, int(x.shape[0]))
        guided = bool(condition) and float(guidance_scale) != 0.0
        edits = self._edits(plan, known, x)
        loop = self._function(
            plan.clip_x0, noise is not None, self.uses_xla(int(x.shape[0])), guided, bool(edits), shared_noise
        )
        timesteps = tf.constant(plan.timesteps, tf.int32)
        coefficients = tf.constant(plan.coefficients())
        first = tf.constant(first_image, tf.int32)
        extra = (() if noise is None else (noise,)) + edits + condition
        steps = plan.num_steps
        x0_prev = tf.zeros_like(x)  # a multistep solver's history, carried across chunks
        if not progress:
            return loop(x, x0_prev, key, first, timesteps, coefficients, tf.constant(0), tf.constant(steps), *extra)[0]
        bar = progress_bar(steps, unit_name="step")
        bounds = np.unique(np.linspace(0, steps, min(chunks, steps) + 1).round().astype(np.int32))
        for start, stop in itertools.pairwise(bounds):
            x, x0_prev = loop(
                x, x0_prev, key, first, timesteps, coefficients, tf.constant(start), tf.constant(stop), *extra
            )
            bar.update(int(stop))
        return x

    def _edits(self, plan: SamplingPlan, known, x: tf.Tensor) -> tuple:
        """The loop's (known images, keep mask, known rows) inputs for an inpainting plan; () otherwise."""
        if (known is None) != (plan.known_rows is None):
            raise KddpmError("An inpainting plan (known_rows) needs known=(images, keep) and only it takes them.")
        if known is None:
            return ()
        images = tf.convert_to_tensor(known[0], tf.float32)
        keep = tf.convert_to_tensor(known[1], tf.float32)
        if tuple(images.shape) != tuple(x.shape) or tuple(keep.shape) != (*x.shape[:3], 1):
            raise KddpmError(
                f"known images {tuple(images.shape)} and keep mask {tuple(keep.shape)} must be {tuple(x.shape)} "
                f"and {(*x.shape[:3], 1)}."
            )
        return images, keep, tf.constant(plan.known_rows, tf.float32)

    def _condition(self, labels, guidance_scale: float, batch: int) -> tuple:
        """The loop's (labels, guidance) inputs: () for an unconditional network."""
        if self.num_classes is None:
            if labels is not None or guidance_scale:
                raise KddpmError("labels and guidance_scale need a class-conditional model (num_classes).")
            return ()
        if labels is None:
            if guidance_scale:
                raise KddpmError("guidance_scale needs labels: guidance moves samples towards a class.")
            labels = np.full([batch], self.num_classes, np.int32)  # the null label: unconditional
        labels = tf.convert_to_tensor(labels)
        if not labels.dtype.is_integer or labels.shape != (batch,):
            raise KddpmError(f"labels must be [{batch}] integers, got {labels.dtype.name} {tuple(labels.shape)}.")
        if not math.isfinite(guidance_scale) or guidance_scale < 0:
            raise KddpmError(f"guidance_scale must be a finite number >= 0, got {guidance_scale!r}.")
        return tf.cast(labels, tf.int32), tf.constant(guidance_scale, tf.float32)

    def trajectory(
        self,
        plan: SamplingPlan,
        num_images: int,
        seed: int = 0,
        snapshots: int = 10,
        labels: np.ndarray | None = None,
        guidance_scale: float = 0.0,
    ) -> list[tuple[int, np.ndarray, np.ndarray]]:
        """The reverse process seen at ``snapshots`` evenly spaced points (the paper's Figure 6).

        Returns [(t, x_t, x0_hat)] from x_T to the end: t the timestep index the snapshot is
        taken before (-1 after the last step), x_t [B, H, W, C] and the x0 predicted from it
        (clipped to [-1, 1]; at the end, the sample itself). The images are those ``sample``
        draws for the seed; the loop runs one graph call per stretch between snapshots, plus
        one network call per snapshot for its x0.
        """
        if snapshots < 2:
            raise KddpmError(f"A trajectory needs at least 2 snapshots, got {snapshots}.")
        key = seed_pair(seed)
        x = initial_noise(key, 0, num_images, self.image_shape)
        condition = self._condition(labels, guidance_scale, num_images)
        guided = bool(condition) and float(guidance_scale) != 0.0
        loop = self._function(plan.clip_x0, False, self.uses_xla(num_images), guided)
        timesteps = tf.constant(plan.timesteps, tf.int32)
        coefficients = tf.constant(plan.coefficients())
        first = tf.constant(0)
        x0_prev = tf.zeros_like(x)
        shots, done = [], 0
        for bound in np.unique(np.linspace(0, plan.num_steps, snapshots).round().astype(np.int32)):
            if bound > done:
                stretch = (tf.constant(done), tf.constant(int(bound)))
                x, x0_prev = loop(x, x0_prev, key, first, timesteps, coefficients, *stretch, *condition)
                done = int(bound)
            if bound < plan.num_steps:
                t = int(plan.timesteps[bound])
                eps = self.eps_function(guided)(x, tf.fill([num_images], t), *condition)
                x0_from_xt, x0_from_eps = plan.coefficients()[bound, :2]
                x0_hat = np.clip((x0_from_xt * x - x0_from_eps * eps).numpy(), -1.0, 1.0)
                shots.append((t, x.numpy(), x0_hat))
            else:
                shots.append((-1, x.numpy(), np.clip(x.numpy(), -1.0, 1.0)))
        return shots

    def _function(
        self,
        clip_x0: bool | str,
        explicit_noise: bool,
        jit_compile: bool,
        guided: bool = False,
        inpaint: bool = False,
        shared_noise: bool = False,
    ):
        key = (clip_x0, explicit_noise, jit_compile, guided, inpaint, shared_noise)
        if key not in self._functions:
            signature = [
                tf.TensorSpec([None, *self.image_shape], tf.float32),
                tf.TensorSpec([None, *self.image_shape], tf.float32),
                tf.TensorSpec([2], tf.int64),
                tf.TensorSpec([], tf.int32),
                tf.TensorSpec([None], tf.int32),
                tf.TensorSpec([None, NUM_COEFFICIENTS], tf.float32),
                tf.TensorSpec([], tf.int32),
                tf.TensorSpec([], tf.int32),
            ]
            if explicit_noise:
                signature.append(tf.TensorSpec([None, None, *self.image_shape], tf.float32))
            if inpaint:
                signature += [
                    tf.TensorSpec([None, *self.image_shape], tf.float32),
                    tf.TensorSpec([None, *self.image_shape[:2], 1], tf.float32),
                    tf.TensorSpec([None, 3], tf.float32),
                ]
            if self.num_classes is not None:
                signature += [tf.TensorSpec([None], tf.int32), tf.TensorSpec([], tf.float32)]
            self._functions[key] = tf.function(
                self.loop(clip_x0, explicit_noise, guided, inpaint, shared_noise),
                input_signature=signature,
                jit_compile=jit_compile,
            )
        return self._functions[key]

    def eps_function(self, guided: bool = False):
        """The loop's network call: ``eps(x, t[, labels, guidance]) -> [B, H, W, C] float32``.

        Guided: eps = (1 + w) eps(x, t, labels) - w eps(x, t, null) from ONE call of the
        network on the batch stacked on itself, the second half with the null label K.
        """
        network = self.network
        if self.num_classes is None:
            return lambda x, t: tf.cast(network([x, t], training=False), tf.float32)
        if not guided:
            return lambda x, t, labels, guidance: tf.cast(network([x, t, labels], training=False), tf.float32)
        null = self.num_classes

        def guided_eps(x, t, labels, guidance):
            both = network(
                [tf.concat([x, x], 0), tf.concat([t, t], 0), tf.concat([labels, tf.fill(tf.shape(labels), null)], 0)],
                training=False,
            )
            conditional, unconditional = tf.split(tf.cast(both, tf.float32), 2, axis=0)
            return (1.0 + guidance) * conditional - guidance * unconditional

        return guided_eps

    def loop(
        self,
        clip_x0: bool | str,
        explicit_noise: bool,
        guided: bool = False,
        inpaint: bool = False,
        shared_noise: bool = False,
    ):
        """The reverse loop as a plain Python function of tensors, for use inside any graph:
        ``loop(x, x0_prev, key, first, timesteps, coefficients, start, stop[, noise][, known,
        keep, known_rows][, labels, guidance]) -> (x, x0_prev)`` runs plan steps [start, stop)
        from x, images first .. first + B - 1 of the key's streams; x0_prev: the previous
        step's x0_hat (zeros before the first step); timesteps [S] int32, coefficients [S, 7]
        float32; for ``inpaint``, the known images, the keep mask and the plan's known rows
        [S, 3] (see ``sample``); labels [B] int32 and guidance [] float32 for a conditional
        network (``guided``: w may be non-zero). ``shared_noise``: one image's step noise for all."""
        eps_of = self.eps_function(guided)
        image_shape = self.image_shape

        def loop(x, x0_prev, key, first, timesteps, coefficients, start, stop, *extra):
            noise = extra[0] if explicit_noise else None
            extra = extra[1:] if explicit_noise else extra
            known, keep, known_rows = extra[:3] if inpaint else (None, None, None)
            condition = extra[3:] if inpaint else extra
            batch = tf.shape(x)[0]

            def step(k, x, x0_prev):
                t = tf.fill([batch], timesteps[k])
                if inpaint:
                    # A row whose weight is 0 is a forward ("jump back") step: no network call.
                    network_step, known_x0, known_noise = tf.unstack(known_rows[k])
                    eps = tf.cond(network_step > 0, lambda: eps_of(x, t, *condition), lambda: tf.zeros_like(x))
                else:
                    eps = eps_of(x, t, *condition)
                x0_from_xt, x0_from_eps, coef_x0, coef_xt, coef_eps, sigma, coef_x0_prev = tf.unstack(coefficients[k])
                x0_hat = clip_prediction(x0_from_xt * x - x0_from_eps * eps, clip_x0)
                # DDPM and DDIM weigh x0_hat only when clipping, and x0_prev never (their rows
                # are 0 there, which adds exactly nothing).
                x_prev = coef_xt * x + coef_eps * eps + (coef_x0 * x0_hat + coef_x0_prev * x0_prev)
                count = 1 if shared_noise else batch
                z = noise[k] if explicit_noise else step_noise(key, k, first, count, image_shape)
                x_prev = x_prev + sigma * z
                if inpaint:
                    # The kept pixels: the known image at the step's noise level (its own noise).
                    z_known = example_normals(fold_in(key, _KNOWN_STREAM + k), first, batch, image_shape)
                    known_now = known_x0 * known + known_noise * z_known
                    x_prev = x_prev + network_step * keep * (known_now - x_prev)
                return k + 1, x_prev, x0_hat

            _, x, x0_prev = tf.while_loop(lambda k, *_: k < stop, step, (start, x, x0_prev), parallel_iterations=1)
            return x, x0_prev

        return loop


def to_uint8(images: np.ndarray | tf.Tensor) -> np.ndarray:
    """Images in [-1, 1], [B, H, W, C] float -> uint8 numpy in 0..255 (values outside are clipped)."""
    return to_uint8_tensor(tf.convert_to_tensor(images, tf.float32)).numpy()


def to_uint8_tensor(images: tf.Tensor) -> tf.Tensor:
    """The graph form of ``to_uint8``: [B, H, W, C] float32 in [-1, 1] -> uint8 tensor."""
    return tf.cast(tf.round((tf.clip_by_value(images, -1.0, 1.0) + 1.0) * 127.5), tf.uint8)
