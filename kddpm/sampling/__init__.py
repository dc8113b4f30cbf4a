"""Sampling: plans (per-step coefficients) and the one compiled reverse loop that runs them."""

from kddpm.sampling.loop import XLA_CPU_MAX_BATCH, Sampler, initial_noise, step_noise, to_uint8, to_uint8_tensor
from kddpm.sampling.plans import (
    SAMPLERS,
    VARIANCES,
    SamplingPlan,
    ddim_plan,
    ddim_tables,
    ddim_timesteps,
    ddpm_plan,
    make_plan,
)

__all__ = [
    "SAMPLERS",
    "VARIANCES",
    "XLA_CPU_MAX_BATCH",
    "Sampler",
    "SamplingPlan",
    "ddim_plan",
    "ddim_tables",
    "ddim_timesteps",
    "ddpm_plan",
    "initial_noise",
    "make_plan",
    "step_noise",
    "to_uint8",
    "to_uint8_tensor",
]
