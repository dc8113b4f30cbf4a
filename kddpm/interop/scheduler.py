"""The scheduler side of the diffusers format: DDPMScheduler's config <-> a NoiseSchedule and the
model's sampling defaults (DDPM variance, x0 clipping)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from kddpm.defaults import DYNAMIC_THRESHOLD_QUANTILE
from kddpm.errors import KddpmError
from kddpm.interop.unet import DIFFUSERS_VERSION
from kddpm.model import DiffusionModel
from kddpm.schedule import NoiseSchedule

# diffusers clamps its dynamic threshold to [1, sample_max_value]; this stands for "no cap".
UNCAPPED_SAMPLE_MAX = 1e9
_SCHEDULER_DEFAULTS: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "trained_betas": None,
    "variance_type": "fixed_small",
    "clip_sample": True,
    "prediction_type": "epsilon",
    "thresholding": False,
    "clip_sample_range": 1.0,
    "rescale_betas_zero_snr": False,
}
_VARIANCE_TYPES = {
    "fixed_small": "beta_tilde",
    "fixed_small_log": "beta_tilde",
    "fixed_large": "beta",
    "fixed_large_log": "beta",
}
# Fields of a scheduler config that sampling over all T steps does not read.
_SCHEDULER_IGNORED = {
    "_class_name",
    "_diffusers_version",
    "_name_or_path",
    "_use_default_values",
    "timestep_spacing",
    "steps_offset",
    "sample_max_value",
    "dynamic_thresholding_ratio",
    "tensor_format",
    "set_alpha_to_one",
    "variance_type_str",
}


def schedule_from_config(config: dict[str, Any], source: Path | None = None) -> tuple[NoiseSchedule, str, bool | str]:
    """(schedule, default variance, default clip_x0) of a diffusers scheduler config.

    diffusers' dynamic thresholding clamps its threshold s to [1, sample_max_value]: with
    sample_max_value 1 that is plain clipping (clip_x0 True); with no cap (at least
    ``UNCAPPED_SAMPLE_MAX``, as ``to_diffusers`` writes) it is kddpm's 'dynamic'.
    """
    where = f" in {source}" if source else ""
    unknown = sorted(set(config) - set(_SCHEDULER_DEFAULTS) - _SCHEDULER_IGNORED)
    if unknown:
        raise KddpmError(f"Scheduler field {unknown[0]} = {config[unknown[0]]!r}{where} is not one kddpm knows.")
    c = {**_SCHEDULER_DEFAULTS, **config}
    for field, wanted in (("prediction_type", "epsilon"), ("rescale_betas_zero_snr", False)):
        if c[field] != wanted:
            raise KddpmError(f"{field} = {c[field]!r}{where} is not supported; kddpm's DDPM has {field} = {wanted!r}.")
    clip_x0: bool | str = bool(c["clip_sample"])
    if c["thresholding"]:
        if c["dynamic_thresholding_ratio"] != DYNAMIC_THRESHOLD_QUANTILE:
            raise KddpmError(
                f"dynamic_thresholding_ratio = {c['dynamic_thresholding_ratio']!r}{where} is not supported; kddpm's "
                f"dynamic thresholding uses the {DYNAMIC_THRESHOLD_QUANTILE} quantile."
            )
        if c["sample_max_value"] <= 1.0:
            clip_x0 = True  # s clamped to [1, 1]: plain clipping
        elif c["sample_max_value"] >= UNCAPPED_SAMPLE_MAX:
            clip_x0 = "dynamic"
        else:
            raise KddpmError(
                f"sample_max_value = {c['sample_max_value']!r}{where} caps the dynamic threshold, which kddpm's "
                "dynamic thresholding (Imagen's, uncapped) does not."
            )
    if c["clip_sample"] and c["clip_sample_range"] != 1.0:
        raise KddpmError(
            f"clip_sample_range = {c['clip_sample_range']!r}{where} is not supported; kddpm clips to [-1, 1]."
        )
    variance = _VARIANCE_TYPES.get(c["variance_type"])
    if variance is None:
        raise KddpmError(
            f"variance_type = {c['variance_type']!r}{where} is not supported; kddpm samples with fixed variances "
            f"({', '.join(_VARIANCE_TYPES)})."
        )
    timesteps = int(c["num_train_timesteps"])
    if c["trained_betas"] is not None:
        betas = np.asarray(c["trained_betas"], np.float64)
        if betas.shape != (timesteps,):
            raise KddpmError(f"trained_betas{where} has {betas.size} values, not num_train_timesteps = {timesteps}.")
        schedule = NoiseSchedule.from_betas(betas)
    elif c["beta_schedule"] == "linear":
        schedule = NoiseSchedule.linear(timesteps, c["beta_start"], c["beta_end"])
    elif c["beta_schedule"] == "scaled_linear":
        schedule = NoiseSchedule.scaled_linear(timesteps, c["beta_start"], c["beta_end"])
    elif c["beta_schedule"] == "squaredcos_cap_v2":
        schedule = NoiseSchedule.cosine(timesteps, s=0.008)
    else:
        raise KddpmError(
            f"beta_schedule = {c['beta_schedule']!r}{where} is not supported; use linear, scaled_linear, "
            "squaredcos_cap_v2 or trained_betas."
        )
    return schedule, variance, clip_x0


def diffusers_scheduler_config(model: DiffusionModel) -> dict[str, Any]:
    """The DDPMScheduler config of ``model``'s schedule and sampling defaults."""
    schedule = model.schedule
    config: dict[str, Any] = {
        "_class_name": "DDPMScheduler",
        "_diffusers_version": DIFFUSERS_VERSION,
        "num_train_timesteps": schedule.timesteps,
        "beta_start": 0.0001,
        "beta_end": 0.02,
        "beta_schedule": "linear",
        "trained_betas": None,
        "variance_type": {"beta_tilde": "fixed_small", "beta": "fixed_large"}[model.variance],
        "clip_sample": model.clip_x0 is True,
        "clip_sample_range": 1.0,
        "prediction_type": "epsilon",
        "thresholding": model.clip_x0 == "dynamic",
        "dynamic_thresholding_ratio": DYNAMIC_THRESHOLD_QUANTILE,
        "sample_max_value": UNCAPPED_SAMPLE_MAX if model.clip_x0 == "dynamic" else 1.0,
        "timestep_spacing": "leading",
        "steps_offset": 0,
        "rescale_betas_zero_snr": False,
    }
    if schedule.kind in ("linear", "scaled_linear"):
        config.update(beta_schedule=schedule.kind, **schedule.params)
    elif schedule.kind == "cosine" and math.isclose(schedule.params["s"], 0.008):
        config["beta_schedule"] = "squaredcos_cap_v2"
    else:  # any other schedule, exactly, as its betas
        config["trained_betas"] = schedule.betas.tolist()
    return config
