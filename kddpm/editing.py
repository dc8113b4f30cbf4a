"""Editing real images with a trained model: img2img, inpainting, inversion, interpolation.

Each builds a plan (``kddpm.sampling``) and its inputs and runs it in the one compiled loop through
``DiffusionModel.run_plan``; nothing here loops over steps. ``DiffusionModel.img2img``,
``inpaint``, ``invert`` and ``interpolate`` call these. Images are [N, H, W, C] (or one
[H, W, C]) uint8 pixels or float32 in [-1, 1]; results are float32 in [-1, 1] (inversion's x_T
is not clipped). Noise is keyed by the seed and each image's index, as in sampling.
"""

from __future__ import annotations

import math

import numpy as np
import tensorflow as tf

from kddpm.defaults import DEFAULT_SAMPLER, REPAINT_JUMP_LENGTH, REPAINT_JUMP_N_SAMPLE, REPAINT_STEPS
from kddpm.errors import KddpmError
from kddpm.sampling import initial_noise
from kddpm.sampling.edits import inversion_plan, repaint_plan
from kddpm.streams import seed_pair


def img2img(
    model,
    images,
    strength: float = 0.5,
    *,
    sampler: str = DEFAULT_SAMPLER,
    steps: int | None = None,
    eta: float | None = None,
    variance: str | None = None,
    seed: int = 0,
    labels=None,
    guidance_scale: float | None = None,
    clip_x0=None,
    batch_size: int | None = None,
) -> np.ndarray:
    """SDEdit (Meng et al. 2022): each image noised with q(x_t | x_0) to the sampler's timestep
    at ``strength`` of the way, then the rest of the reverse process.

    strength in (0, 1], as diffusers' img2img defines it: with k sampler steps the last
    round(strength * k) of its timesteps run (strength 1: all, from the first); DDPM starts at
    index round(strength * T) - 1. Returns [N, H, W, C] float32 in [-1, 1].
    """
    x0 = model._images_array(images, "images")
    if not (isinstance(strength, (int, float)) and 0.0 < strength <= 1.0):
        raise KddpmError(f"strength must be in (0, 1], got {strength!r}.")
    plan = model.plan(sampler, steps, eta, variance, clip_x0)
    if sampler == "ddpm":
        start = round(strength * model.schedule.timesteps) - 1
    else:
        runs = round(strength * plan.num_steps)
        if runs < 1:
            raise KddpmError(
                f"strength {strength} runs none of the sampler's {plan.num_steps} steps; raise it or --steps."
            )
        start = int(plan.timesteps[plan.num_steps - runs])
    x_t = _noised(model, x0, start, seed)
    return model.sample(
        seed=seed, sampler=sampler, steps=steps, eta=eta, variance=variance, clip_x0=clip_x0, x_T=x_t,
        start_t=start, labels=labels, guidance_scale=guidance_scale, batch_size=batch_size,
    )  # fmt: skip


def inpaint(
    model,
    images,
    mask,
    *,
    steps: int | None = None,
    jump_length: int = REPAINT_JUMP_LENGTH,
    jump_n_sample: int = REPAINT_JUMP_N_SAMPLE,
    seed: int = 0,
    labels=None,
    guidance_scale: float | None = None,
    clip_x0=None,
    batch_size: int | None = None,
) -> np.ndarray:
    """RePaint (Lugmayr et al. 2022): fills the pixels where ``mask`` is 1 and keeps the others
    exactly as given.

    mask: [N, H, W] or [N, H, W, 1] (or one [H, W]), 1 (white) = fill, 0 = keep, as image
    editors and diffusers' inpainting pipelines use it; RePaint's own code and diffusers'
    RePaintPipeline use the opposite (1 = keep). steps: reverse strides over T (T // steps
    timesteps each; default 250, or T if smaller); every jump_length-th stride the process goes
    back up jump_length strides and down again, jump_n_sample - 1 times
    (``kddpm.sampling.edits``); jump_n_sample = 1 is plain replacement. Returns [N, H, W, C] float32 in [-1, 1].
    """
    known = model._images_array(images, "images")
    fill = np.asarray(mask, np.float32)
    if fill.ndim == 2:
        fill = fill[None]
    if fill.ndim == 4 and fill.shape[-1] == 1:
        fill = fill[..., 0]
    if fill.shape != known.shape[:3]:
        raise KddpmError(
            f"mask has shape {np.shape(mask)}; give one [H, W] (or [H, W, 1]) per image: {known.shape[:3]}."
        )
    if not np.isin(fill, (0.0, 1.0)).all():
        raise KddpmError("mask values must be 0 (keep) or 1 (fill); threshold a soft mask first.")
    steps = min(REPAINT_STEPS, model.schedule.timesteps) if steps is None else steps
    plan = repaint_plan(
        model.schedule, steps, jump_length, jump_n_sample, model.clip_x0 if clip_x0 is None else clip_x0
    )
    keep = (1.0 - fill)[..., None]
    return model.run_plan(plan, len(known), None, seed, labels, guidance_scale, batch_size, known=(known, keep))


def invert(model, images, steps: int = 50, *, labels=None, guidance_scale: float | None = None, batch_size=None):
    """Deterministic DDIM inversion (eta 0): the x_T [N, H, W, C] float32 (not clipped) from which
    ``model.sample(x_T=x_T, sampler="ddim", steps=steps, eta=0)`` reconstructs ``images``."""
    x0 = model._images_array(images, "images")
    plan = inversion_plan(model.schedule, steps)
    return model.run_plan(plan, len(x0), x0, 0, labels, guidance_scale, batch_size, clip_output=False)


def interpolate(
    model,
    a,
    b,
    num: int = 8,
    *,
    t: int = 500,
    method: str = "q",
    steps: int = 50,
    seed: int = 0,
    labels=None,
    guidance_scale: float | None = None,
) -> np.ndarray:
    """``num`` images [num, H, W, C] from image a to image b, lambda = 0 .. 1.

    method 'q': the paper's Figure 8: x_t and x'_t from q(x_t | x_0) with their own noise, mixed
    (1 - lambda) x_t + lambda x'_t, and decoded by the DDPM reverse process from t (an index in
    [0, T)) with the same reverse noise for every lambda, so that the row varies only through
    lambda. method 'ddim': both inverted by DDIM with ``steps`` steps, interpolated spherically
    (slerp), and decoded by DDIM (Song et al. 2021, section 5.3); ``t`` is not used.
    """
    if not isinstance(num, int) or num < 2:
        raise KddpmError(f"num must be an integer of at least 2 (both ends), got {num!r}.")
    ends = np.concatenate([model._images_array(a, "a"), model._images_array(b, "b")])
    if len(ends) != 2:
        raise KddpmError("interpolate takes one image a and one image b.")
    lambdas = np.linspace(0.0, 1.0, num, dtype=np.float32)[:, None, None, None]
    if labels is not None and not isinstance(labels, (int, np.integer, str)):
        raise KddpmError("interpolate takes one class (labels=NAME_OR_INDEX) for the whole row.")
    row_labels = None if labels is None else [labels] * num
    if method == "q":
        if not 0 <= t < model.schedule.timesteps:
            raise KddpmError(f"t must lie in [0, {model.schedule.timesteps}), got {t}.")
        noised = _noised(model, ends, t, seed)
        mixed = (1.0 - lambdas) * noised[0] + lambdas * noised[1]
        plan = model.plan("ddpm", start_t=t)
        return model.run_plan(plan, num, mixed, seed, row_labels, guidance_scale, shared_noise=True)
    if method == "ddim":
        x_T = invert(model, ends, steps, labels=None if labels is None else [labels] * 2, guidance_scale=guidance_scale)
        mixed = np.stack([slerp(x_T[0], x_T[1], float(w)) for w in lambdas[:, 0, 0, 0]])
        return model.sample(x_T=mixed, sampler="ddim", steps=steps, eta=0.0, labels=row_labels,
                            guidance_scale=guidance_scale)  # fmt: skip
    raise KddpmError(f"Unknown interpolation method {method!r}; use 'q' (the paper's) or 'ddim'.")


def slerp(a: np.ndarray, b: np.ndarray, weight: float) -> np.ndarray:
    """Spherical interpolation between a and b (as arrays of one vector each)."""
    cos = float(np.sum(a * b) / (np.linalg.norm(a) * np.linalg.norm(b)))
    theta = math.acos(min(1.0, max(-1.0, cos)))
    if theta < 1e-6:
        return (1.0 - weight) * a + weight * b
    return (math.sin((1.0 - weight) * theta) * a + math.sin(weight * theta) * b) / math.sin(theta)


def _noised(model, x0: np.ndarray, t: int, seed: int) -> np.ndarray:
    """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps for every image at timestep t; eps is image i's
    x_T of the seed, so at the last timestep this is (nearly) the seed's own x_T."""
    eps = initial_noise(seed_pair(seed), 0, len(x0), model.image_shape)
    steps = tf.fill([len(x0)], int(t))
    return model.schedule.q_sample(tf.constant(x0), steps, eps).numpy()
