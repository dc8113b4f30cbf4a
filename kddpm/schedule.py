"""The noise schedule and the closed-form forward process of DDPM (Ho et al. 2020).

Indexing: the paper counts t = 1..T; arrays here are indexed 0..T-1, so index ``i`` is the
paper's ``t = i + 1``. Tables are computed once in float64 numpy and handed to graphs as
float32 constants.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import tensorflow as tf

from kddpm.errors import KddpmError

_SCHEDULE_KINDS = ("linear", "scaled_linear", "cosine", "custom")


class NoiseSchedule:
    """A variance schedule beta_1..beta_T and every table the paper derives from it.

    Tables (numpy float64, shape [T]): ``betas``, ``alphas``, ``alphas_cumprod``,
    ``alphas_cumprod_prev``, ``sqrt_alphas_cumprod``, ``sqrt_one_minus_alphas_cumprod``,
    ``posterior_variance``, ``posterior_log_variance_clipped``, ``posterior_mean_coef1``,
    ``posterior_mean_coef2``. ``tensor(name)`` returns one as a float32 tensor.

    Build one with ``NoiseSchedule.linear(...)``, ``NoiseSchedule.cosine(...)``,
    ``NoiseSchedule.scaled_linear(...)`` or ``NoiseSchedule.from_betas(betas)``.
    """

    def __init__(self, kind: str = "linear", timesteps: int = 1000, **params: float):
        if kind not in _SCHEDULE_KINDS:
            raise KddpmError(f"Unknown schedule kind {kind!r}; use one of {_SCHEDULE_KINDS}.")
        if int(timesteps) < 2:
            raise KddpmError(f"timesteps must be at least 2, got {timesteps}.")
        self.kind = kind
        self.timesteps = int(timesteps)
        if kind in ("linear", "scaled_linear"):
            self.params = {
                "beta_start": float(params.pop("beta_start", 1e-4)),
                "beta_end": float(params.pop("beta_end", 0.02)),
            }
            start, end = self.params["beta_start"], self.params["beta_end"]
            if kind == "linear":
                betas = np.linspace(start, end, self.timesteps, dtype=np.float64)
            else:  # evenly spaced in sqrt(beta), Stable Diffusion's schedule
                betas = np.linspace(start**0.5, end**0.5, self.timesteps, dtype=np.float64) ** 2
        elif kind == "custom":
            betas = np.asarray(params.pop("betas", ()), dtype=np.float64)
            if betas.shape != (self.timesteps,):
                raise KddpmError(f"A custom schedule needs {self.timesteps} betas, got shape {betas.shape}.")
            self.params = {"betas": betas.tolist()}
        else:
            self.params = {"s": float(params.pop("s", 0.008))}
            betas = _cosine_betas(self.timesteps, self.params["s"])
        if params:
            raise KddpmError(f"Unexpected parameters for a {kind} schedule: {sorted(params)}.")
        if not (np.all(betas > 0) and np.all(betas < 1)):
            raise KddpmError("Every beta must lie in (0, 1); check beta_start and beta_end.")
        self._compute_tables(betas)

    @classmethod
    def linear(cls, timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> NoiseSchedule:
        """The paper's schedule: betas evenly spaced from ``beta_start`` to ``beta_end``."""
        return cls("linear", timesteps, beta_start=beta_start, beta_end=beta_end)

    @classmethod
    def scaled_linear(
        cls, timesteps: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012
    ) -> NoiseSchedule:
        """sqrt(beta) evenly spaced from sqrt(``beta_start``) to sqrt(``beta_end``)."""
        return cls("scaled_linear", timesteps, beta_start=beta_start, beta_end=beta_end)

    @classmethod
    def from_betas(cls, betas) -> NoiseSchedule:
        """A schedule given by its T betas ([T] floats in (0, 1)), e.g. a checkpoint's trained betas."""
        betas = np.asarray(betas, dtype=np.float64)
        return cls("custom", len(betas), betas=betas)

    @classmethod
    def cosine(cls, timesteps: int = 1000, s: float = 0.008) -> NoiseSchedule:
        """Nichol & Dhariwal's cosine schedule, betas clipped to at most 0.999."""
        return cls("cosine", timesteps, s=s)

    def _compute_tables(self, betas: np.ndarray) -> None:
        self.betas = betas
        self.alphas = 1.0 - betas
        self.alphas_cumprod = np.cumprod(self.alphas)
        self.alphas_cumprod_prev = np.append(1.0, self.alphas_cumprod[:-1])
        self.sqrt_alphas_cumprod = np.sqrt(self.alphas_cumprod)
        self.sqrt_one_minus_alphas_cumprod = np.sqrt(1.0 - self.alphas_cumprod)
        # beta_tilde_t = beta_t (1 - abar_{t-1}) / (1 - abar_t); zero at the first step.
        self.posterior_variance = betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        # log(0) at the first step is replaced by the second step's value, as in the original code.
        self.posterior_log_variance_clipped = np.log(np.append(self.posterior_variance[1], self.posterior_variance[1:]))
        self.posterior_mean_coef1 = betas * np.sqrt(self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        self.posterior_mean_coef2 = (
            (1.0 - self.alphas_cumprod_prev) * np.sqrt(self.alphas) / (1.0 - self.alphas_cumprod)
        )

    def tensor(self, name: str) -> tf.Tensor:
        """The table ``name`` as a float32 constant [T] (a graph constant inside a tf.function)."""
        return tf.constant(getattr(self, name), dtype=tf.float32)

    def checked_timesteps(self, t) -> tf.Tensor:
        """``t`` as int32, after checking that every value lies in [0, T).

        Eager values (numpy, Python, eager tensors) raise KddpmError here; in a graph the
        check is an assert. It matters because ``tf.gather`` does not check on every device:
        on GPUs it returns 0 and under XLA it clamps, silently using the wrong timestep.
        """
        dtype = t.dtype if tf.is_tensor(t) else tf.as_dtype(np.asarray(t).dtype)
        if not dtype.is_integer:
            raise KddpmError(f"t must be integer timesteps in [0, {self.timesteps}), got {dtype.name}.")
        if not tf.is_tensor(t) or tf.executing_eagerly():
            values = np.asarray(t)
            if values.size and (values.min() < 0 or values.max() >= self.timesteps):
                raise KddpmError(
                    f"t must lie in [0, {self.timesteps}) (index i is the paper's t = i + 1), "
                    f"got values from {values.min()} to {values.max()}."
                )
            return tf.convert_to_tensor(values, tf.int32)
        t = tf.cast(t, tf.int32)
        message = f"t must lie in [0, {self.timesteps}) (index i is the paper's t = i + 1)"
        checks = [
            tf.debugging.assert_greater_equal(t, 0, message=message),
            tf.debugging.assert_less(t, self.timesteps, message=message),
        ]
        with tf.control_dependencies(checks):
            return tf.identity(t)

    def _extract(self, name: str, t: tf.Tensor, ndim: int) -> tf.Tensor:
        """Gathers ``name[t]`` and reshapes it to [B, 1, ..., 1] to broadcast over an image batch."""
        values = tf.gather(self.tensor(name), self.checked_timesteps(t))
        return tf.reshape(values, [-1] + [1] * (ndim - 1))

    # --- The forward process and its posterior -------------------------------------------

    def q_sample(self, x0: tf.Tensor, t: tf.Tensor, noise: tf.Tensor) -> tf.Tensor:
        """x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps, a draw from q(x_t | x_0).

        x0: [B, H, W, C] float32 in [-1, 1]; t: [B] int32 in [0, T); noise: like x0, N(0, I).
        Returns x_t: [B, H, W, C] float32.
        """
        x0 = tf.convert_to_tensor(x0, tf.float32)
        ndim = x0.shape.rank
        return (
            self._extract("sqrt_alphas_cumprod", t, ndim) * x0
            + self._extract("sqrt_one_minus_alphas_cumprod", t, ndim) * noise
        )

    def predict_x0(self, x_t: tf.Tensor, t: tf.Tensor, eps: tf.Tensor) -> tf.Tensor:
        """x_0 = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t), the inverse of ``q_sample``.

        x_t, eps: [B, H, W, C] float32; t: [B] int32 in [0, T). Returns [B, H, W, C] float32.
        """
        x_t = tf.convert_to_tensor(x_t, tf.float32)
        ndim = x_t.shape.rank
        return (x_t - self._extract("sqrt_one_minus_alphas_cumprod", t, ndim) * eps) / self._extract(
            "sqrt_alphas_cumprod", t, ndim
        )

    def q_posterior(self, x0: tf.Tensor, x_t: tf.Tensor, t: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
        """Mean, variance and clipped log-variance of q(x_{t-1} | x_t, x_0).

        mu_tilde = coef1_t x_0 + coef2_t x_t; variance beta_tilde_t. x0, x_t: [B, H, W, C]
        float32; t: [B] int32. Returns (mean [B,H,W,C], variance [B,1,1,1], log_variance [B,1,1,1]).
        """
        x0 = tf.convert_to_tensor(x0, tf.float32)
        x_t = tf.convert_to_tensor(x_t, tf.float32)
        ndim = x_t.shape.rank
        mean = (
            self._extract("posterior_mean_coef1", t, ndim) * x0 + self._extract("posterior_mean_coef2", t, ndim) * x_t
        )
        return (
            mean,
            self._extract("posterior_variance", t, ndim),
            self._extract("posterior_log_variance_clipped", t, ndim),
        )

    # --- Serialisation -------------------------------------------------------------------

    def get_config(self) -> dict[str, Any]:
        return {"kind": self.kind, "timesteps": self.timesteps, **self.params}

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> NoiseSchedule:
        config = dict(config)
        return cls(config.pop("kind"), config.pop("timesteps"), **config)

    def __repr__(self) -> str:
        shown = {k: v for k, v in self.get_config().items() if k != "betas"}
        params = ", ".join(f"{k}={v}" for k, v in shown.items())
        return f"NoiseSchedule({params})"


def _cosine_betas(timesteps: int, s: float) -> np.ndarray:
    """beta_t = 1 - abar(t) / abar(t-1) with abar(t) = f(t) / f(0), f(t) = cos(((t/T + s)/(1 + s)) pi/2)^2."""
    steps = np.arange(timesteps + 1, dtype=np.float64)
    f = np.cos(((steps / timesteps + s) / (1.0 + s)) * math.pi / 2.0) ** 2
    alphas_cumprod = f / f[0]
    betas = 1.0 - alphas_cumprod[1:] / alphas_cumprod[:-1]
    return np.clip(betas, 0.0, 0.999)
