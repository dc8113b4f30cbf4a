"""What a trained DiffusionModel draws: ``sample``, ``trajectory`` and their plans, as methods.

``DiffusionModel`` takes these from ``Generation``; the maths is in ``kddpm.sampling`` (plans and
the one compiled loop), the label checks in ``kddpm.labels``.
"""

from __future__ import annotations

import numpy as np

from kddpm import labels as _labels
from kddpm.defaults import DEFAULT_SAMPLER
from kddpm.errors import KddpmError
from kddpm.networks import network_with_precision
from kddpm.sampling import Sampler, SamplingPlan, make_plan


class Generation:
    """Sampling entry points of ``DiffusionModel`` (a mixin: it uses the model's schedule,
    image_shape, sampling defaults, classes and networks)."""

    _sampler: Sampler | None = None
    _sampler_key: tuple | None = None

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
        start_t: int | None = None,
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
        model was built. The same seed gives the same images. start_t: with ``x_T`` as x_t at
        that timestep (in [0, T)), run the rest of the reverse process: the sampler's steps
        below it (the paper's Figure 7: several continuations of one x_t).

        Class-conditional models: labels, one class (index or name) for every image or [N] of
        them, in [0, K) (K, the null label, asks for an unconditional image); None: all
        unconditional. guidance_scale: w >= 0 of classifier-free guidance, eps = (1 + w)
        eps(x_t, t, c) - w eps(x_t, t, null), one network call on the doubled batch per step
        (default with labels: ``kddpm.defaults.DEFAULT_GUIDANCE``); 0: plain conditional
        sampling, one call on the batch itself.
        """
        if start_t is not None and x_T is None:
            raise KddpmError("start_t needs x_T: the x_t to start from at that timestep.")
        plan = self.plan(sampler, steps, eta, variance, clip_x0, start_t=start_t)
        if x_T is not None:
            x_T = self._images_array(x_T, "x_T", pixels=False)
            if num_images not in (None, len(x_T)):
                raise KddpmError(f"num_images={num_images} but x_T holds {len(x_T)} images; give one or the other.")
            num_images = len(x_T)
        _check_count("num_images", num_images)
        return self.run_plan(
            plan, num_images, x_T, seed, labels, guidance_scale, batch_size, use_ema, jit_compile, precision, progress
        )

    def run_plan(
        self,
        plan: SamplingPlan,
        num_images: int,
        x_start: np.ndarray | None = None,
        seed: int = 0,
        labels=None,
        guidance_scale: float | None = None,
        batch_size: int | None = None,
        use_ema: bool = True,
        jit_compile: bool | str = "auto",
        precision: str | None = None,
        progress: bool = False,
        clip_output: bool = True,
        known: tuple[np.ndarray, np.ndarray] | None = None,
        shared_noise: bool = False,
    ) -> np.ndarray:
        """Runs ``plan`` on ``num_images`` images in batches of ``batch_size``: from x_start
        [N, H, W, C] (default: the seed's x_T), with ``known`` (images, keep) for inpainting
        plans and ``shared_noise`` (see ``Sampler.sample``). Returns float32 [N, H, W, C],
        clipped to [-1, 1] unless ``clip_output`` is False. Image i's noise is keyed by i."""
        if batch_size is not None:
            _check_count("batch_size", batch_size, " (or None for all at once)")
        labels, guidance_scale = self.label_array(labels, num_images, guidance_scale)
        runner = self._get_sampler(use_ema, jit_compile, precision)
        batch_size = batch_size or num_images
        batches = []
        for start in range(0, num_images, batch_size):
            part = slice(start, min(start + batch_size, num_images))
            images = runner.sample(
                plan,
                part.stop - part.start,
                seed=seed,
                x_T=None if x_start is None else x_start[part],
                progress=progress,
                first_image=start,
                labels=None if labels is None else labels[part],
                guidance_scale=guidance_scale,
                known=None if known is None else (known[0][part], known[1][part]),
                shared_noise=shared_noise,
            ).numpy()
            batches.append(np.clip(images, -1.0, 1.0) if clip_output else images)
        return np.concatenate(batches, axis=0)

    def _images_array(self, images, name: str, pixels: bool = True) -> np.ndarray:
        """images [N, H, W, C] (or one [H, W, C]) as float32; pixels: uint8 or floats in [-1, 1]."""
        array = np.asarray(images)
        if array.ndim == 3:
            array = array[None]
        if array.ndim != 4 or array.shape[1:] != self.image_shape or len(array) == 0:
            raise KddpmError(
                f"{name} has shape {array.shape}; expected [N, {', '.join(map(str, self.image_shape))}] with N >= 1."
            )
        if pixels and array.dtype == np.uint8:
            return array.astype(np.float32) / 127.5 - 1.0
        array = array.astype(np.float32)
        if pixels and (not np.isfinite(array).all() or np.abs(array).max() > 1.0 + 1e-6):
            raise KddpmError(f"{name} must be uint8 pixels or floats in [-1, 1] (x / 127.5 - 1).")
        return array

    # --- Editing real images (kddpm.editing has the algorithms) ---------------------------

    def img2img(self, images, strength: float = 0.5, **options) -> np.ndarray:
        """SDEdit: ``images`` noised part of the way and denoised again (``kddpm.editing.img2img``)."""
        from kddpm import editing

        return editing.img2img(self, images, strength, **options)

    def inpaint(self, images, mask, **options) -> np.ndarray:
        """RePaint: fill where ``mask`` is 1, keep the rest exactly (``kddpm.editing.inpaint``)."""
        from kddpm import editing

        return editing.inpaint(self, images, mask, **options)

    def invert(self, images, steps: int = 50, **options) -> np.ndarray:
        """x_T that DDIM with ``steps`` steps decodes back to ``images`` (``kddpm.editing.invert``)."""
        from kddpm import editing

        return editing.invert(self, images, steps, **options)

    def interpolate(self, a, b, num: int = 8, **options) -> np.ndarray:
        """``num`` images from a to b through the diffusion (``kddpm.editing.interpolate``)."""
        from kddpm import editing

        return editing.interpolate(self, a, b, num, **options)

    def class_index(self, name_or_index: int | str) -> int:
        """The class index of a class name (case-insensitive) or index (a string of digits counts as an index)."""
        return _labels.class_index(self.num_classes, self.class_names, name_or_index)

    def label_array(
        self, labels: int | str | np.ndarray | list | None, num_images: int, guidance_scale: float | None = None
    ) -> tuple[np.ndarray | None, float]:
        """(``labels`` as [num_images] int32 class indices, the guidance scale w), both checked
        (``kddpm.labels.label_array``)."""
        return _labels.label_array(self.num_classes, self.class_names, labels, num_images, guidance_scale)

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
        start_t: int | None = None,
    ) -> SamplingPlan:
        """``make_plan`` with this model's schedule, its default variance (DDPM) and clip_x0."""
        if variance is None and sampler == "ddpm":
            variance = self.variance
        clip_x0 = self.clip_x0 if clip_x0 is None else clip_x0
        return make_plan(self.schedule, sampler, steps, eta, variance, clip_x0, start_t=start_t)

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
