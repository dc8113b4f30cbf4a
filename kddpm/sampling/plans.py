"""Sampling plans: the per-step coefficients of DDPM (Algorithm 2), DDIM and DPM-Solver++.

A sampler is a *plan*, per-step coefficients computed once in float64 from the schedule, and
one generic reverse loop (``kddpm.sampling.loop``) that applies it:

    x0_hat = clip?(x0_from_xt * x_t - x0_from_eps * eps)
    x_prev = coef_xt * x_t + coef_eps * eps + coef_x0 * x0_hat + coef_x0_prev * x0_hat_before + sigma * z

x0_hat_before is the previous step's x0_hat (zero at the first step): multistep solvers carry it
in the loop. DDPM without clipping is Algorithm 2 as printed, x_prev = (x_t - beta_t /
sqrt(1 - abar_t) eps) / sqrt(alpha_t) + sigma_t z; with clipping it is the posterior mean of the
clipped x0_hat, as in the original code. DDIM (Song et al. 2021) is the same loop over a shorter,
decreasing list of timesteps; with clipping it continues from the eps that the clipped x0_hat
implies, as guided-diffusion and GLIDE do, so that every step stays on the line through x_t and
the clipped prediction. DPM-Solver++(2M) (Lu et al. 2022) is a linear multistep method in the
data prediction x0_hat, first order at its first and last steps, second order between.

Clipping (``clip_x0``): False; True, x0_hat clipped to [-1, 1]; or "dynamic", Imagen's dynamic
thresholding (Saharia et al. 2022): s = max(1, the 0.995 quantile of |x0_hat| over each image),
x0_hat = clip(x0_hat, -s, s) / s.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import tensorflow as tf

from kddpm.defaults import (
    CLIP_MODES,
    DEFAULT_SAMPLER,
    DEFAULT_STEPS,
    DYNAMIC_THRESHOLD_QUANTILE,
    SAMPLERS,
    VARIANCES,
)
from kddpm.errors import KddpmError
from kddpm.schedule import NoiseSchedule

__all__ = [
    "CLIP_MODES",
    "DEFAULT_SAMPLER",
    "DEFAULT_STEPS",
    "SAMPLERS",
    "VARIANCES",
    "SamplingPlan",
    "check_clip_x0",
    "clip_prediction",
    "ddim_plan",
    "ddim_tables",
    "ddim_timesteps",
    "ddpm_plan",
    "dpm_solver_plan",
    "dpm_solver_tables",
    "make_plan",
]
NUM_COEFFICIENTS = 7


def check_clip_x0(clip_x0) -> bool | str:
    """``clip_x0`` as one of CLIP_MODES (numpy bools count as bools), or KddpmError."""
    if isinstance(clip_x0, (bool, np.bool_)):
        return bool(clip_x0)
    if clip_x0 == "dynamic":
        return "dynamic"
    raise KddpmError(f"clip_x0 must be True, False or 'dynamic' (dynamic thresholding), got {clip_x0!r}.")


def clip_prediction(x0_hat: tf.Tensor, clip_x0: bool | str) -> tf.Tensor:
    """x0_hat [B, H, W, C] clipped as ``clip_x0`` says (see the module docstring).

    The dynamic threshold is the quantile with linear interpolation between order statistics
    (numpy's and torch's default), read off ``top_k``, which XLA compiles.
    """
    if not clip_x0:
        return x0_hat
    if clip_x0 != "dynamic":
        return tf.clip_by_value(x0_hat, -1.0, 1.0)
    size = math.prod(x0_hat.shape[1:])
    flat = tf.abs(tf.reshape(x0_hat, [-1, size]))
    position = DYNAMIC_THRESHOLD_QUANTILE * (size - 1)
    below = math.floor(position)
    # The largest size - below values, descending: [..., sorted[below + 1], sorted[below]].
    top = tf.math.top_k(flat, k=size - below).values
    low = top[:, -1]
    high = top[:, -2] if size - below >= 2 else low
    s = tf.maximum(low + (position - below) * (high - low), 1.0)
    s = tf.reshape(s, [-1, 1, 1, 1])
    return tf.clip_by_value(x0_hat, -s, s) / s


@dataclasses.dataclass(frozen=True)
class SamplingPlan:
    """Per-step coefficients of a reverse process, each a float64 array of shape [S]."""

    timesteps: np.ndarray  # [S] int, decreasing, values in [0, T)
    x0_from_xt: np.ndarray
    x0_from_eps: np.ndarray
    coef_x0: np.ndarray
    coef_xt: np.ndarray
    coef_eps: np.ndarray
    sigma: np.ndarray
    coef_x0_prev: np.ndarray  # the previous step's x0_hat (multistep solvers; zero otherwise)
    clip_x0: bool | str  # one of CLIP_MODES
    # Inpainting plans only, [S, 3]: (1 for a network step, 0 for a forward "jump back" step; the
    # known image's coefficient sqrt(abar') and its noise's sqrt(1 - abar') after the step).
    known_rows: np.ndarray | None = None

    @property
    def num_steps(self) -> int:
        return len(self.timesteps)

    def rows_from(self, first: int) -> SamplingPlan:
        """The plan's steps first.. (a later start of the same reverse process)."""
        return dataclasses.replace(self, **{f: getattr(self, f)[first:] for f in ROW_FIELDS})

    def coefficients(self) -> np.ndarray:
        """The seven coefficient rows stacked as [S, 7] float32, in the loop's order."""
        rows = [self.x0_from_xt, self.x0_from_eps, self.coef_x0, self.coef_xt, self.coef_eps, self.sigma]
        return np.stack([*rows, self.coef_x0_prev], axis=1).astype(np.float32)


ROW_FIELDS = ("timesteps", "x0_from_xt", "x0_from_eps", "coef_x0", "coef_xt", "coef_eps", "sigma", "coef_x0_prev")


def ddpm_plan(schedule: NoiseSchedule, variance: str = "beta_tilde", clip_x0: bool | str = False) -> SamplingPlan:
    """Algorithm 2 over all T steps; sigma_t^2 = beta_tilde_t (default) or beta_t, zero at t = 1."""
    clip_x0 = check_clip_x0(clip_x0)
    if variance not in VARIANCES:
        raise KddpmError(f"Unknown variance {variance!r}; use one of {VARIANCES}.")
    s = schedule
    timesteps = np.arange(s.timesteps - 1, -1, -1)
    variances = (s.posterior_variance if variance == "beta_tilde" else s.betas).copy()
    variances[0] = 0.0  # the last step returns the mean
    if clip_x0:
        coef_x0, coef_xt = s.posterior_mean_coef1, s.posterior_mean_coef2
        coef_eps = np.zeros(s.timesteps)
    else:
        coef_x0 = np.zeros(s.timesteps)
        coef_xt = 1.0 / np.sqrt(s.alphas)
        coef_eps = -s.betas / (s.sqrt_one_minus_alphas_cumprod * np.sqrt(s.alphas))
    return SamplingPlan(
        timesteps=timesteps,
        x0_from_xt=(1.0 / s.sqrt_alphas_cumprod)[timesteps],
        x0_from_eps=np.sqrt(1.0 / s.alphas_cumprod - 1.0)[timesteps],
        coef_x0=coef_x0[timesteps],
        coef_xt=coef_xt[timesteps],
        coef_eps=coef_eps[timesteps],
        sigma=np.sqrt(variances)[timesteps],
        coef_x0_prev=np.zeros(s.timesteps),
        clip_x0=clip_x0,
    )


def ddim_timesteps(timesteps: int, steps: int) -> np.ndarray:
    """``steps`` timesteps evenly spaced over [0, T-1], both ends included, decreasing."""
    _check_steps("DDIM", timesteps, steps)
    return ddim_tables(tf.zeros([timesteps], tf.float64), tf.constant(steps))[0].numpy().astype(np.int64)


def ddim_plan(schedule: NoiseSchedule, steps: int = 50, eta: float = 0.0, clip_x0: bool | str = False) -> SamplingPlan:
    """DDIM over ``steps`` timesteps: eta = 0 is deterministic, eta = 1 over all T is DDPM."""
    clip_x0 = check_clip_x0(clip_x0)
    if eta < 0:
        raise KddpmError(f"eta must be >= 0, got {eta}.")
    _check_steps("DDIM", schedule.timesteps, steps)
    timesteps, rows = ddim_tables(tf.constant(schedule.alphas_cumprod), tf.constant(steps), eta, clip_x0)
    return SamplingPlan(timesteps.numpy().astype(np.int64), *(row.numpy() for row in rows), clip_x0=clip_x0)


def ddim_tables(
    alphas_cumprod: tf.Tensor, steps: tf.Tensor, eta: float | tf.Tensor = 0.0, clip_x0: bool | str = False
) -> tuple[tf.Tensor, list[tf.Tensor]]:
    """The DDIM plan as tensors, so that a graph can build it from a ``steps`` input.

    x_prev = sqrt(abar_prev) x0_hat + sqrt(1 - abar_prev - sigma^2) eps + sigma z. With clipping,
    eps is the one the clipped x0_hat implies, eps' = (x_t - sqrt(abar) x0_hat) / sqrt(1 - abar)
    (guided-diffusion's ``_predict_eps_from_xstart``); without, the network's eps, which is the
    same thing. alphas_cumprod: [T] float64. steps: int32 scalar in [1, T]. Returns timesteps [S]
    int32 and the seven coefficient rows, each [S] float64, in ``SamplingPlan`` order.
    """
    last = tf.cast(tf.shape(alphas_cumprod)[0] - 1, tf.float64)
    timesteps = tf.cast(tf.round(tf.linspace(last, tf.constant(0.0, tf.float64), steps)), tf.int32)
    return timesteps, ddim_rows(alphas_cumprod, timesteps, eta, clip_x0)


def ddim_rows(
    alphas_cumprod: tf.Tensor, timesteps: tf.Tensor, eta: float | tf.Tensor = 0.0, clip_x0: bool | str = False
) -> list[tf.Tensor]:
    """DDIM's seven coefficient rows [S] float64 for any decreasing ``timesteps`` [S] (each step
    goes to the next, the last to abar = 1)."""
    abar = tf.gather(alphas_cumprod, timesteps)
    abar_prev = tf.concat([abar[1:], tf.ones([1], tf.float64)], axis=0)
    eta = tf.cast(eta, tf.float64)
    sigma = eta * tf.sqrt((1.0 - abar_prev) / (1.0 - abar)) * tf.sqrt(1.0 - abar / abar_prev)
    direction = tf.sqrt(tf.maximum(1.0 - abar_prev - sigma**2, 0.0))
    zeros = tf.zeros_like(abar)
    if clip_x0:
        # sqrt(abar_prev) x0c + direction (x_t - sqrt(abar) x0c) / sqrt(1 - abar): no raw eps.
        coef_x0 = tf.sqrt(abar_prev) - direction * tf.sqrt(abar / (1.0 - abar))
        coef_xt, coef_eps = direction / tf.sqrt(1.0 - abar), zeros
    else:
        # sqrt(abar_prev) * x0_hat expanded, so that no clip-free step divides by sqrt(abar).
        coef_x0 = zeros
        coef_xt = tf.sqrt(abar_prev / abar)
        coef_eps = direction - tf.sqrt(abar_prev) * tf.sqrt(1.0 - abar) / tf.sqrt(abar)
    x0_from_xt = 1.0 / tf.sqrt(abar)
    x0_from_eps = tf.sqrt(1.0 / abar - 1.0)
    return [x0_from_xt, x0_from_eps, coef_x0, coef_xt, coef_eps, sigma, zeros]


def dpm_solver_plan(
    schedule: NoiseSchedule, steps: int = 20, clip_x0: bool | str = False, stochastic: bool = False
) -> SamplingPlan:
    """DPM-Solver++(2M) (Lu et al. 2022) over ``steps`` steps (at most T - 1, see
    ``dpm_solver_tables``); ``stochastic``: its SDE variant."""
    clip_x0 = check_clip_x0(clip_x0)
    _check_steps("DPM-Solver++", schedule.timesteps - 1, steps)
    timesteps, rows = dpm_solver_tables(tf.constant(schedule.alphas_cumprod), tf.constant(steps), clip_x0, stochastic)
    return SamplingPlan(timesteps.numpy().astype(np.int64), *(row.numpy() for row in rows), clip_x0=clip_x0)


def started_at(
    plan: SamplingPlan, schedule: NoiseSchedule, start_t: int, sampler: str, eta: float = 0.0
) -> SamplingPlan:
    """``plan`` started at timestep ``start_t`` from a given x_t: its steps at or below start_t,
    with start_t itself as the first (when it is not one of them, its step goes to the plan's
    next timestep below it). DDPM: rows start_t .. 0 of Algorithm 2."""
    if not 0 <= start_t < schedule.timesteps:
        raise KddpmError(f"start_t must lie in [0, {schedule.timesteps}), got {start_t}.")
    if sampler == "ddpm":
        return plan.rows_from(int(np.argmax(plan.timesteps <= start_t)))
    below = plan.timesteps[plan.timesteps < start_t]
    timesteps = tf.constant(np.concatenate([[start_t], below]), tf.int32)
    abar = tf.constant(schedule.alphas_cumprod)
    if sampler == "ddim":
        rows = ddim_rows(abar, timesteps, eta, plan.clip_x0)
    else:
        rows = dpm_solver_rows(abar, timesteps, sampler == "dpm++2m_sde")
    return SamplingPlan(timesteps.numpy().astype(np.int64), *(row.numpy() for row in rows), clip_x0=plan.clip_x0)


def dpm_solver_tables(
    alphas_cumprod: tf.Tensor, steps: tf.Tensor, clip_x0: bool | str = False, stochastic: bool | tf.Tensor = False
) -> tuple[tf.Tensor, list[tf.Tensor]]:
    """DPM-Solver++(2M) as tensors (for graphs that take ``steps`` as an input), as diffusers'
    ``DPMSolverMultistepScheduler`` defaults run it.

    Timesteps: round(linspace(0, T - 1, steps + 1)) reversed, the last (0) dropped; the solver
    then steps from each to the next and from the last to sigma = 0 (x0 itself). steps <= T - 1:
    at steps = T the T + 1 grid points share T integers, a timestep repeats, h = 0, and the
    second-order step divides by it. With
    alpha = sqrt(abar), sigma = sqrt(1 - abar), lambda = log(alpha / sigma), h = lambda_next -
    lambda and the data predictions m0 (this step) and m1 (the previous one):

        first order (the first and the last step):  x' = sigma'/sigma x - alpha' (e^-h - 1) m0
        second order (midpoint), r = h_prev / h:    x' = sigma'/sigma x - alpha' (e^-h - 1) (m0 + (m0 - m1) / 2r)

    The SDE variant (sde-dpmsolver++): x' = sigma'/sigma e^-h x + alpha' (1 - e^-2h) (m0 [+ (m0 - m1)
    / 2r]) + sigma' sqrt(1 - e^-2h) z. Both are linear in x, m0 and m1: the seven ``SamplingPlan`` rows.
    alphas_cumprod: [T] float64; steps: int32 scalar in [1, T - 1]. Returns timesteps [S] int32 and rows [S].
    """
    last = tf.cast(tf.shape(alphas_cumprod)[0] - 1, tf.float64)
    grid = tf.round(tf.linspace(tf.constant(0.0, tf.float64), last, steps + 1))
    timesteps = tf.cast(tf.reverse(grid, [0])[:-1], tf.int32)
    return timesteps, dpm_solver_rows(alphas_cumprod, timesteps, stochastic)


def dpm_solver_rows(alphas_cumprod: tf.Tensor, timesteps: tf.Tensor, stochastic: bool | tf.Tensor = False):
    """DPM-Solver++(2M)'s seven coefficient rows [S] float64 for any decreasing ``timesteps``
    (first order at the first and the last step, which goes to sigma = 0)."""
    abar = tf.gather(alphas_cumprod, timesteps)
    alpha, sigma = tf.sqrt(abar), tf.sqrt(1.0 - abar)
    alpha_next = tf.concat([alpha[1:], tf.ones([1], tf.float64)], 0)
    sigma_next = tf.concat([sigma[1:], tf.zeros([1], tf.float64)], 0)  # final sigma 0: the last step gives x0
    lam = tf.math.log(alpha) - tf.math.log(sigma)
    lam_next = tf.math.log(alpha_next) - tf.math.log(sigma_next)  # +inf at the end
    h = lam_next - lam
    h_prev = lam - tf.concat([lam[:1], lam[:-1]], 0)
    count = tf.shape(timesteps)[0]
    index = tf.range(count)
    second_order = (index > 0) & (index < count - 1)
    # 1 / (2r) where the step is second order; the other steps' values are never used.
    half_over_r = tf.where(second_order, 0.5 * h / tf.where(second_order, h_prev, 1.0), 0.0)
    stochastic = tf.cast(stochastic, tf.bool)
    decay = tf.exp(-h)
    weight = tf.where(stochastic, alpha_next * (1.0 - decay**2), -alpha_next * (decay - 1.0))
    coef_xt = tf.where(stochastic, sigma_next / sigma * decay, sigma_next / sigma)
    noise = tf.where(stochastic, sigma_next * tf.sqrt(tf.maximum(1.0 - decay**2, 0.0)), 0.0)
    zeros = tf.zeros_like(abar)
    rows = [
        1.0 / alpha,  # x0_from_xt
        sigma / alpha,  # x0_from_eps
        weight * (1.0 + half_over_r),  # coef_x0: m0
        coef_xt,
        zeros,  # coef_eps
        noise,
        -weight * half_over_r,  # coef_x0_prev: m1
    ]
    return rows


def _check_steps(name: str, most: int, steps: int) -> None:
    if not 1 <= steps <= most:
        bound = f"T={most}" if name == "DDIM" else f"T-1={most}"
        raise KddpmError(f"{name} steps must be between 1 and {bound}, got {steps}.")


def make_plan(
    schedule: NoiseSchedule,
    sampler: str = DEFAULT_SAMPLER,
    steps: int | None = None,
    eta: float | None = None,
    variance: str | None = None,
    clip_x0: bool | str = False,
    start_t: int | None = None,
) -> SamplingPlan:
    """The plan for ``sampler``: 'ddpm' over all T steps (``variance``, default 'beta_tilde'),
    'ddim' over ``steps`` (default 50) with ``eta`` (default 0), or 'dpm++2m' / 'dpm++2m_sde'
    (DPM-Solver++(2M), ODE or SDE) over ``steps`` (default 20). An option the sampler does not
    take is an error rather than silently ignored. start_t: start the reverse process at that
    timestep from a given x_t, with the sampler's steps below it (``started_at``)."""
    plan = _plan(schedule, sampler, steps, eta, variance, clip_x0)
    if start_t is None:
        return plan
    return started_at(plan, schedule, int(start_t), sampler, 0.0 if eta is None else float(eta))


def _plan(schedule, sampler, steps, eta, variance, clip_x0) -> SamplingPlan:
    if sampler not in SAMPLERS:
        raise KddpmError(f"Unknown sampler {sampler!r}; use one of {SAMPLERS}.")
    if steps is not None and (isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 1):
        raise KddpmError(f"steps must be a positive integer (or None for the sampler's default), got {steps!r}.")
    if eta is not None and not (isinstance(eta, (int, float, np.number)) and math.isfinite(eta) and eta >= 0):
        raise KddpmError(f"eta must be a finite number >= 0, got {eta!r}.")
    if sampler == "ddpm":
        if steps not in (None, schedule.timesteps):
            raise KddpmError(
                f"DDPM samples over all T={schedule.timesteps} steps; use sampler='ddim' or 'dpm++2m' for {steps}."
            )
        if eta is not None:
            raise KddpmError("eta is DDIM's option; DDPM's noise is set by variance ('beta_tilde' or 'beta').")
        return ddpm_plan(schedule, variance or "beta_tilde", clip_x0)
    steps = DEFAULT_STEPS[sampler] if steps is None else int(steps)
    if sampler.startswith("dpm++"):
        if eta is not None or variance is not None:
            raise KddpmError(f"{sampler} takes steps and clip_x0 only (eta is DDIM's option, variance DDPM's).")
        return dpm_solver_plan(schedule, steps, clip_x0, stochastic=sampler == "dpm++2m_sde")
    if variance is not None:
        raise KddpmError("variance is DDPM's option; DDIM's noise is set by eta (0: deterministic, 1: DDPM-like).")
    return ddim_plan(schedule, steps, 0.0 if eta is None else float(eta), clip_x0)
