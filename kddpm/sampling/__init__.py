"""Sampling: plans (per-step coefficients) and the one compiled reverse loop that runs them."""

from kddpm.sampling.loop import XLA_CPU_MAX_BATCH, Sampler, initial_noise, step_noise, to_uint8, to_uint8_tensor
from kddpm.sampling.plans import (
    CLIP_MODES,
    DEFAULT_SAMPLER,
    DEFAULT_STEPS,
    SAMPLERS,
    VARIANCES,
    SamplingPlan,
    check_clip_x0,
    clip_prediction,
    ddim_plan,
    ddim_tables,
    ddim_timesteps,
    ddpm_plan,
    dpm_solver_plan,
    dpm_solver_tables,
    make_plan,
)

__all__ = [
    "CLIP_MODES",
    "DEFAULT_SAMPLER",
    "DEFAULT_STEPS",
    "SAMPLERS",
    "VARIANCES",
    "XLA_CPU_MAX_BATCH",
    "Sampler",
    "SamplingPlan",
    "check_clip_x0",
    "clip_prediction",
    "ddim_plan",
    "ddim_tables",
    "ddim_timesteps",
    "ddpm_plan",
    "dpm_solver_plan",
    "dpm_solver_tables",
    "initial_noise",
    "make_plan",
    "step_noise",
    "to_uint8",
    "to_uint8_tensor",
]
