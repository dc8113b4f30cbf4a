"""Plans for editing real images: DDIM inversion and RePaint's resampled inpainting.

Both are rows of the same ``SamplingPlan`` the compiled loop runs (``kddpm.sampling.loop``):

* **DDIM inversion** (Song et al. 2021, section 4.3) runs the deterministic DDIM update with the
  timesteps increasing: from level a to the next, higher level b,
  x_b = sqrt(abar_b) x0_hat + sqrt(1 - abar_b) eps, x0_hat = (x_a - sqrt(1 - abar_a) eps) / sqrt(abar_a),
  with eps = eps(x_a, b): the network at the level the step goes to, where the DDIM step it
  inverts evaluated it (diffusers' DDIMInverseScheduler does the same; evaluating it at a instead
  is a first-order error: on Gaussian data, 50 steps land 0.09 from the exact x_T that way, 0.002
  this way). An image is taken as x at the sampler's last timestep (index 0), so inverting with
  k steps gives the x_T that DDIM with the same k steps (eta 0) decodes back to the image.
* **RePaint** (Lugmayr et al. 2022) alternates reverse steps with forward "jump back" steps along
  diffusers' ``RePaintScheduler.set_timesteps`` sequence. A reverse row is DDIM's step over the
  stride n = T // steps with eta = 1 (the DDPM posterior variance over that stride, as RePaint's
  own code samples), after which the kept pixels are replaced by the known image at the new
  level, sqrt(abar') x0 + sqrt(1 - abar') z. A forward row takes the image from level a up to b in
  one draw of q(x_b | x_a): x_b = sqrt(abar_b / abar_a) x_a + sqrt(1 - abar_b / abar_a) z, the exact
  inverse of the reverse step it undoes (diffusers' ``undo_step`` multiplies n single steps whose
  betas start at its own timestep, n - 1 levels higher), with no network call.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from kddpm.errors import KddpmError
from kddpm.sampling.plans import SamplingPlan, check_clip_x0, ddim_rows, ddim_timesteps
from kddpm.schedule import NoiseSchedule


def inversion_plan(schedule: NoiseSchedule, steps: int = 50) -> SamplingPlan:
    """DDIM inversion over the ``steps`` timesteps of DDIM's plan, upwards (steps - 1 rows:
    from the last timestep, where the image is taken to be, to the first)."""
    if not 2 <= steps <= schedule.timesteps:
        raise KddpmError(f"DDIM inversion takes between 2 and T={schedule.timesteps} steps, got {steps}.")
    levels = ddim_timesteps(schedule.timesteps, steps)[::-1]  # increasing: 0, ..., T - 1
    abar = schedule.alphas_cumprod
    current, target = levels[:-1], levels[1:]
    a, b = abar[current], abar[target]
    zeros = np.zeros(len(current))
    return SamplingPlan(
        timesteps=target,  # where the network is evaluated (see the module docstring)
        x0_from_xt=1.0 / np.sqrt(a),
        x0_from_eps=np.sqrt(1.0 / a - 1.0),
        coef_x0=zeros,
        # sqrt(b) x0_hat + sqrt(1 - b) eps, with x0_hat expanded in x_a and eps.
        coef_xt=np.sqrt(b / a),
        coef_eps=np.sqrt(1.0 - b) - np.sqrt(b) * np.sqrt(1.0 - a) / np.sqrt(a),
        sigma=zeros,
        coef_x0_prev=zeros,
        clip_x0=False,
    )


def repaint_timesteps(timesteps: int, steps: int, jump_length: int = 10, jump_n_sample: int = 10) -> np.ndarray:
    """RePaint's timestep sequence, as diffusers' ``RePaintScheduler.set_timesteps`` builds it: down
    ``steps`` strides of T // steps, going back up ``jump_length`` strides ``jump_n_sample - 1``
    times at every ``jump_length``-th stride. A value lower than the one before is a reverse step
    from it; a higher one is a forward step."""
    if not 1 <= steps <= timesteps:
        raise KddpmError(f"RePaint steps must be between 1 and T={timesteps}, got {steps}.")
    if jump_length < 1 or jump_n_sample < 1:
        raise KddpmError(f"jump_length and jump_n_sample must be >= 1, got {jump_length} and {jump_n_sample}.")
    jumps = {j: jump_n_sample - 1 for j in range(0, steps - jump_length, jump_length)}
    sequence, t = [], steps
    while t >= 1:
        t -= 1
        sequence.append(t)
        if jumps.get(t, 0) > 0:
            jumps[t] -= 1
            for _ in range(jump_length):
                t += 1
                sequence.append(t)
    return np.asarray(sequence, np.int64) * (timesteps // steps)


def repaint_plan(
    schedule: NoiseSchedule, steps: int = 250, jump_length: int = 10, jump_n_sample: int = 10, clip_x0=True
) -> SamplingPlan:
    """RePaint's rows (see the module docstring): ``known_rows`` says which are network steps and
    how the kept pixels are formed after each."""
    clip_x0 = check_clip_x0(clip_x0)
    sequence = repaint_timesteps(schedule.timesteps, steps, jump_length, jump_n_sample)
    stride = schedule.timesteps // steps
    abar = np.append(schedule.alphas_cumprod, 1.0)  # abar[-1] = 1: the level of a finished image
    rows, last = [], sequence[0] + 1
    for t in sequence:
        if t < last:  # a reverse step from level t to t - stride
            rows.append(_reverse_row(schedule, t, t - stride, clip_x0))
        else:  # forward, from the level the last reverse step reached (last - stride) to t - stride
            rows.append(_forward_row(abar[max(last - stride, -1)], abar[max(t - stride, -1)], t))
        last = t
    columns = list(zip(*rows))
    return SamplingPlan(
        timesteps=np.asarray(columns[0], np.int64),
        **{name: np.asarray(column) for name, column in zip(_ROW_NAMES, columns[1:8])},
        clip_x0=clip_x0,
        known_rows=np.asarray(columns[8:], np.float64).T,
    )


_ROW_NAMES = ("x0_from_xt", "x0_from_eps", "coef_x0", "coef_xt", "coef_eps", "sigma", "coef_x0_prev")


def _reverse_row(schedule: NoiseSchedule, t: int, target: int, clip_x0) -> tuple:
    """DDIM's row from level t to ``target`` (-1: a finished image) with eta = 1, then the known part."""
    pair = tf.constant([t, max(target, 0)], tf.int32)
    values = [row.numpy() for row in ddim_rows(tf.constant(schedule.alphas_cumprod), pair, 1.0, clip_x0)]
    if target >= 0:
        row = [v[0] for v in values]  # the step from t to target (the pair's first row)
        abar_next = schedule.alphas_cumprod[target]
    else:
        single = [row.numpy() for row in ddim_rows(tf.constant(schedule.alphas_cumprod), pair[:1], 1.0, clip_x0)]
        row = [v[0] for v in single]  # to abar = 1: the image itself
        abar_next = 1.0
    return (t, *row, 1.0, np.sqrt(abar_next), np.sqrt(1.0 - abar_next))


def _forward_row(abar_from: float, abar_to: float, t: int) -> tuple:
    ratio = abar_to / abar_from
    # coef_xt = sqrt(ratio), sigma = sqrt(1 - ratio); no network (x0 rows and eps rows 0).
    return (t, 1.0, 0.0, 0.0, np.sqrt(ratio), 0.0, np.sqrt(max(1.0 - ratio, 0.0)), 0.0, 0.0, 0.0, 0.0)
