"""Sampling plans: the per-step coefficients of DDPM (Algorithm 2), DDIM and DPM-Solver++.

A sampler is a *plan*, per-step coefficients computed once in float64 from the schedule, and
one generic reverse loop (``kddpm.sampling.loop``) that applies it:

    x0_hat = clip?(x0_from_xt * x_t - x0_from_eps * eps)
    x_prev = coef_xt * x_t + coef_eps * eps + coef_x0 * x0_hat + coef_x0_prev * x0_hat_before + sigma * z

x0_hat_before is the previous step's x0_hat (zero at the first step): multistep solvers carry it
in the loop. DDPM without clipping is Algorithm 2 as printed, x_prev = (x_t - beta_t /
sqrt(1 - abar_t) eps) / sqrt(alpha_t) + sigma_t z; with clipping it is the posterior mean of the
clipped x0_hat, as in the original code. DDIM (Song et al. 2021) is the same loop over a shorter,
decreasing list of timesteps. DPM-Solver++(2M) (Lu et al. 2022) is a linear multistep method in
the data prediction x0_hat, first order at its first and last steps, second order between.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import tensorflow as tf

from kddpm.errors import KddpmError
from kddpm.schedule import NoiseSchedule

SAMPLERS = ("ddpm", "ddim", "dpm++2m", "dpm++2m_sde")
VARIANCES = ("beta_tilde", "beta")
# Default steps of the samplers that take a step count.
DEFAULT_STEPS = {"ddim": 50, "dpm++2m": 20, "dpm++2m_sde": 20}
NUM_COEFFICIENTS = 7


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
    clip_x0: bool

    @property
    def num_steps(self) -> int:
        return len(self.timesteps)

    def coefficients(self) -> np.ndarray:
        """The seven coefficient rows stacked as [S, 7] float32, in the loop's order."""
        rows = [self.x0_from_xt, self.x0_from_eps, self.coef_x0, self.coef_xt, self.coef_eps, self.sigma]
        return np.stack([*rows, self.coef_x0_prev], axis=1).astype(np.float32)


def ddpm_plan(schedule: NoiseSchedule, variance: str = "beta_tilde", clip_x0: bool = False) -> SamplingPlan:
    """Algorithm 2 over all T steps; sigma_t^2 = beta_tilde_t (default) or beta_t, zero at t = 1."""
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


def ddim_plan(schedule: NoiseSchedule, steps: int = 50, eta: float = 0.0, clip_x0: bool = False) -> SamplingPlan:
    """DDIM over ``steps`` timesteps: eta = 0 is deterministic, eta = 1 over all T is DDPM."""
    if eta < 0:
        raise KddpmError(f"eta must be >= 0, got {eta}.")
    _check_steps("DDIM", schedule.timesteps, steps)
    timesteps, rows = ddim_tables(tf.constant(schedule.alphas_cumprod), tf.constant(steps), eta, clip_x0)
    return SamplingPlan(timesteps.numpy().astype(np.int64), *(row.numpy() for row in rows), clip_x0=clip_x0)


def ddim_tables(
    alphas_cumprod: tf.Tensor, steps: tf.Tensor, eta: float | tf.Tensor = 0.0, clip_x0: bool = False
) -> tuple[tf.Tensor, list[tf.Tensor]]:
    """The DDIM plan as tensors, so that a graph can build it from a ``steps`` input.

    alphas_cumprod: [T] float64. steps: int32 scalar in [1, T]. Returns timesteps [S] int32
    and the seven coefficient rows, each [S] float64, in ``SamplingPlan`` order.
    """
    last = tf.cast(tf.shape(alphas_cumprod)[0] - 1, tf.float64)
    timesteps = tf.cast(tf.round(tf.linspace(last, tf.constant(0.0, tf.float64), steps)), tf.int32)
    abar = tf.gather(alphas_cumprod, timesteps)
    abar_prev = tf.concat([abar[1:], tf.ones([1], tf.float64)], axis=0)
    eta = tf.cast(eta, tf.float64)
    sigma = eta * tf.sqrt((1.0 - abar_prev) / (1.0 - abar)) * tf.sqrt(1.0 - abar / abar_prev)
    direction = tf.sqrt(tf.maximum(1.0 - abar_prev - sigma**2, 0.0))
    zeros = tf.zeros_like(abar)
    if clip_x0:
        coef_x0, coef_xt, coef_eps = tf.sqrt(abar_prev), zeros, direction
    else:
        # sqrt(abar_prev) * x0_hat expanded, so that no clip-free step divides by sqrt(abar).
        coef_x0 = zeros
        coef_xt = tf.sqrt(abar_prev / abar)
        coef_eps = direction - tf.sqrt(abar_prev) * tf.sqrt(1.0 - abar) / tf.sqrt(abar)
    x0_from_xt = 1.0 / tf.sqrt(abar)
    x0_from_eps = tf.sqrt(1.0 / abar - 1.0)
    return timesteps, [x0_from_xt, x0_from_eps, coef_x0, coef_xt, coef_eps, sigma, zeros]


def dpm_solver_plan(
    schedule: NoiseSchedule, steps: int = 20, clip_x0: bool = False, stochastic: bool = False
) -> SamplingPlan:
    """DPM-Solver++(2M) (Lu et al. 2022) over ``steps`` steps; ``stochastic``: its SDE variant."""
    _check_steps("DPM-Solver++", schedule.timesteps, steps)
    timesteps, rows = dpm_solver_tables(tf.constant(schedule.alphas_cumprod), tf.constant(steps), clip_x0, stochastic)
    return SamplingPlan(timesteps.numpy().astype(np.int64), *(row.numpy() for row in rows), clip_x0=clip_x0)


def dpm_solver_tables(
    alphas_cumprod: tf.Tensor, steps: tf.Tensor, clip_x0: bool = False, stochastic: bool | tf.Tensor = False
) -> tuple[tf.Tensor, list[tf.Tensor]]:
    """DPM-Solver++(2M) as tensors (for graphs that take ``steps`` as an input), as diffusers'
    ``DPMSolverMultistepScheduler`` defaults run it.

    Timesteps: round(linspace(0, T - 1, steps + 1)) reversed, the last (0) dropped; the solver
    then steps from each to the next and from the last to sigma = 0 (x0 itself). With
    alpha = sqrt(abar), sigma = sqrt(1 - abar), lambda = log(alpha / sigma), h = lambda_next -
    lambda and the data predictions m0 (this step) and m1 (the previous one):

        first order (the first and the last step):  x' = sigma'/sigma x - alpha' (e^-h - 1) m0
        second order (midpoint), r = h_prev / h:    x' = sigma'/sigma x - alpha' (e^-h - 1) (m0 + (m0 - m1) / 2r)

    The SDE variant (sde-dpmsolver++): x' = sigma'/sigma e^-h x + alpha' (1 - e^-2h) (m0 [+ (m0 - m1)
    / 2r]) + sigma' sqrt(1 - e^-2h) z. Both are linear in x, m0 and m1: the seven ``SamplingPlan`` rows.
    alphas_cumprod: [T] float64; steps: int32 scalar in [1, T]. Returns timesteps [S] int32 and rows [S].
    """
    last = tf.cast(tf.shape(alphas_cumprod)[0] - 1, tf.float64)
    grid = tf.round(tf.linspace(tf.constant(0.0, tf.float64), last, steps + 1))
    timesteps = tf.cast(tf.reverse(grid, [0])[:-1], tf.int32)
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
    return timesteps, rows


def _check_steps(name: str, timesteps: int, steps: int) -> None:
    if not 1 <= steps <= timesteps:
        raise KddpmError(f"{name} steps must be between 1 and T={timesteps}, got {steps}.")


def make_plan(
    schedule: NoiseSchedule,
    sampler: str = "ddpm",
    steps: int | None = None,
    eta: float | None = None,
    variance: str | None = None,
    clip_x0: bool = False,
) -> SamplingPlan:
    """The plan for ``sampler``: 'ddpm' over all T steps (``variance``, default 'beta_tilde'),
    'ddim' over ``steps`` (default 50) with ``eta`` (default 0), or 'dpm++2m' / 'dpm++2m_sde'
    (DPM-Solver++(2M), ODE or SDE) over ``steps`` (default 20). An option the sampler does not
    take is an error rather than silently ignored."""
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
