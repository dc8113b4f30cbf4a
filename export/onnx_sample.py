#!/usr/bin/env python3
"""Samples images from a kddpm ONNX denoiser with numpy and ONNX Runtime only (no TensorFlow).

    pip install numpy onnxruntime
    python onnx_sample.py --model exported/kddpm.onnx --num 16 --out grid.png   # DPM-Solver++(2M), 20 steps
    python onnx_sample.py --model exported/kddpm.onnx --input photos/ --strength 0.5 --out edited.png
    python onnx_sample.py --model exported/kddpm.onnx --input photos/ --mask lower_half.png --out filled.png

(editing reads image files with Pillow: ``pip install pillow``; the edits are in onnx_edit.py).

The network is the ONNX file; the reverse process (DPM-Solver++(2M) by default, DDIM, or the
paper's Algorithm 2) runs here in numpy, with the noise schedule read from the file's
``metadata_props``. The ``export/`` folder is self-contained so that it can be copied onto a
serving machine on its own: it repeats, in numpy, the schedule and sampler formulas of
``kddpm.schedule`` and ``kddpm.sampling`` (the test suite checks that both give the same images
from the same noise).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np
from client import (  # noqa: F401 (the defaults are this script's too)
    DEFAULT_GUIDANCE,
    DEFAULT_SAMPLER,
    DEFAULT_STEPS,
    DYNAMIC_THRESHOLD_QUANTILE,
    SAMPLERS,
    KddpmOnnxError,
    Progress,
    add_class_arguments,
    add_clip_arguments,
    class_index,
    class_rows,
    to_uint8,
    write_png,
)
from grid import image_grid  # a copy of kddpm/grid.py (a test keeps them identical): every kddpm grid alike

# --- The schedule, from metadata ---------------------------------------------------------------


def read_metadata(session) -> dict:
    """The kddpm metadata of an ONNX Runtime session: schedule config, image shape, T."""
    props = session.get_modelmeta().custom_metadata_map
    if props.get("kddpm.format") != "1" or "kddpm.schedule" not in props:
        raise KddpmOnnxError(
            "This ONNX file has no kddpm metadata (metadata_props 'kddpm.*'); export it with "
            "`kddpm export --format onnx` or `kddpm.export.export_onnx`."
        )
    try:
        metadata = {
            "schedule": json.loads(props["kddpm.schedule"]),
            "image_shape": tuple(int(d) for d in json.loads(props["kddpm.image_shape"])),
            "timesteps": int(props["kddpm.timesteps"]),
            # Sampling defaults the model carries (a converted diffusers model sets them).
            "variance": props.get("kddpm.variance", "beta_tilde"),
            "clip_x0": {"true": True, "false": False, "dynamic": "dynamic"}[props.get("kddpm.clip_x0", "false")],
            # Class-conditional models: K classes and their names (0: unconditional).
            "num_classes": int(props.get("kddpm.num_classes", "0")),
            "class_names": json.loads(props.get("kddpm.class_names", "[]")),
        }
    except (KeyError, ValueError, TypeError) as error:
        raise KddpmOnnxError(f"The file's kddpm metadata is damaged ({error}); export the model again.") from None
    return metadata


def betas_of(schedule: dict) -> np.ndarray:
    """beta_1..beta_T (float64 [T]) of a schedule config {'kind', 'timesteps', params...}."""
    timesteps = int(schedule["timesteps"])
    if schedule["kind"] == "linear":
        return np.linspace(schedule["beta_start"], schedule["beta_end"], timesteps, dtype=np.float64)
    if schedule["kind"] == "scaled_linear":
        return np.linspace(schedule["beta_start"] ** 0.5, schedule["beta_end"] ** 0.5, timesteps) ** 2
    if schedule["kind"] == "custom":
        return np.asarray(schedule["betas"], dtype=np.float64)
    if schedule["kind"] == "cosine":
        steps = np.arange(timesteps + 1, dtype=np.float64)
        f = np.cos(((steps / timesteps + schedule["s"]) / (1.0 + schedule["s"])) * math.pi / 2.0) ** 2
        alphas_cumprod = f / f[0]
        return np.clip(1.0 - alphas_cumprod[1:] / alphas_cumprod[:-1], 0.0, 0.999)
    raise KddpmOnnxError(f"Unknown schedule kind {schedule['kind']!r} in the metadata; update onnx_sample.py.")


# --- Plans: per-step timesteps and coefficients ------------------------------------------------


def plan(
    betas: np.ndarray,
    sampler: str = DEFAULT_SAMPLER,
    steps: int | None = None,
    eta: float = 0.0,
    variance: str = "beta_tilde",
    start_t: int | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(timesteps [S], x0 coefficients a [S], coefficients (b, c) of (x_t, eps) [S, 2], sigma [S],
    coefficients d of the previous step's x0_hat [S]).

    Each step computes x0_hat = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t), optionally clips
    it, and returns x_prev = a * x0_hat + b * x_t + c * eps + d * x0_hat_before + sigma * z.
    No sampler weighs the raw eps once x0_hat is known (c = 0): each continues from x0_hat,
    so a clipped x0_hat is followed consistently. start_t: start at that timestep from a given
    x_t, with the sampler's timesteps below it (img2img).
    """
    timesteps_total = len(betas)
    abar = np.cumprod(1.0 - betas)
    if sampler == "ddpm":
        if steps not in (None, timesteps_total):
            raise KddpmOnnxError(f"DDPM takes all T={timesteps_total} steps; use --sampler ddim for {steps} steps.")
        taus = np.arange(timesteps_total - 1, -1, -1)
    elif sampler == "ddim":
        steps = DEFAULT_STEPS["ddim"] if steps is None else int(steps)
        if not 1 <= steps <= timesteps_total:
            raise KddpmOnnxError(f"DDIM steps must be between 1 and T={timesteps_total}, got {steps}.")
        taus = np.round(np.linspace(timesteps_total - 1, 0, steps)).astype(np.int64)
    elif sampler in ("dpm++2m", "dpm++2m_sde"):
        steps = DEFAULT_STEPS[sampler] if steps is None else int(steps)
        if not 1 <= steps < timesteps_total:
            # At steps = T the grid's T + 1 points share T integers: a timestep would repeat.
            raise KddpmOnnxError(f"DPM-Solver++ steps must be between 1 and T-1={timesteps_total - 1}, got {steps}.")
        taus = np.linspace(0, timesteps_total - 1, steps + 1).round()[::-1][:-1].astype(np.int64)
    else:
        raise KddpmOnnxError(f"Unknown sampler {sampler!r}; use one of {SAMPLERS}.")
    if start_t is not None:
        if not 0 <= start_t < timesteps_total:
            raise KddpmOnnxError(f"start_t must lie in [0, {timesteps_total}), got {start_t}.")
        taus = np.concatenate([[start_t], taus[taus < start_t]]).astype(np.int64)
    if sampler == "ddpm":
        return _ddpm_rows(betas, taus, variance)
    if sampler == "ddim":
        abar_t = abar[taus]
        abar_prev = np.append(abar[taus[1:]], 1.0)
        sigma = eta * np.sqrt((1.0 - abar_prev) / (1.0 - abar_t)) * np.sqrt(1.0 - abar_t / abar_prev)
        direction = np.sqrt(np.maximum(1.0 - abar_prev - sigma**2, 0.0))
        # sqrt(abar_prev) x0_hat + direction eps', with eps' = (x_t - sqrt(abar_t) x0_hat) / sqrt(1 - abar_t)
        # the eps that x0_hat implies (the network's own eps when x0_hat is not clipped).
        a = np.sqrt(abar_prev) - direction * np.sqrt(abar_t / (1.0 - abar_t))
        b = direction / np.sqrt(1.0 - abar_t)
        return taus, a, np.stack([b, np.zeros_like(a)], axis=1), sigma, np.zeros_like(a)
    return _dpm_solver_rows(abar, taus, sampler == "dpm++2m_sde")


def _ddpm_rows(betas: np.ndarray, taus: np.ndarray, variance: str):
    """Algorithm 2's rows at the consecutive timesteps ``taus`` (down to 0)."""
    alphas = 1.0 - betas
    abar = np.cumprod(alphas)
    abar_prev = np.append(1.0, abar[:-1])[taus]
    # Posterior mean of q(x_{t-1} | x_t, x0): coefficients of x0 and x_t (ddpm.md).
    a = np.sqrt(abar_prev) * betas[taus] / (1.0 - abar[taus])
    b = np.sqrt(alphas[taus]) * (1.0 - abar_prev) / (1.0 - abar[taus])
    c = np.zeros_like(a)
    if variance == "beta_tilde":
        sigma2 = betas[taus] * (1.0 - abar_prev) / (1.0 - abar[taus])
    elif variance == "beta":
        sigma2 = betas[taus].copy()
    else:
        raise KddpmOnnxError(f"Unknown variance {variance!r}; use 'beta_tilde' or 'beta'.")
    sigma2[-1] = 0.0  # the last step returns the mean
    return taus, a, np.stack([b, c], axis=1), np.sqrt(sigma2), np.zeros_like(a)


def _dpm_solver_rows(abar: np.ndarray, taus: np.ndarray, stochastic: bool):
    """DPM-Solver++(2M) (Lu et al. 2022) with diffusers' defaults over the decreasing ``taus``
    (round(linspace(0, T-1, steps+1)) reversed without the last): first order at the first and
    last step (to sigma 0), second order (midpoint) between; ``stochastic``: the SDE variant."""
    alpha, sigma = np.sqrt(abar[taus]), np.sqrt(1.0 - abar[taus])
    alpha_next, sigma_next = np.append(alpha[1:], 1.0), np.append(sigma[1:], 0.0)
    lam = np.log(alpha / sigma)
    with np.errstate(divide="ignore"):
        lam_next = np.log(alpha_next / sigma_next)  # +inf at the end
    h = lam_next - lam
    decay = np.exp(-h)
    if stochastic:
        weight, b, noise = alpha_next * (1.0 - decay**2), sigma_next / sigma * decay, sigma_next * np.sqrt(1 - decay**2)
    else:
        weight, b, noise = alpha_next * (1.0 - decay), sigma_next / sigma, np.zeros_like(alpha)
    half_over_r = np.zeros_like(alpha)  # 1 / 2r of the second-order steps, r = h_prev / h
    inner = np.arange(1, len(taus) - 1)
    half_over_r[inner] = 0.5 * h[inner] / (lam[inner] - lam[inner - 1])
    a, d = weight * (1.0 + half_over_r), -weight * half_over_r
    return taus, a, np.stack([b, np.zeros_like(a)], axis=1), noise, d


def threshold(x0_hat: np.ndarray, clip_x0: bool | str) -> np.ndarray:
    """x0_hat clipped to [-1, 1] (True), dynamically thresholded ('dynamic': s = max(1, the 0.995
    quantile of |x0_hat| per image), x0_hat = clip(x0_hat, -s, s) / s), or as it is (False)."""
    if not clip_x0:
        return x0_hat
    if clip_x0 != "dynamic":
        return np.clip(x0_hat, -1.0, 1.0)
    s = np.quantile(np.abs(x0_hat).reshape(len(x0_hat), -1), DYNAMIC_THRESHOLD_QUANTILE, axis=1)
    s = np.maximum(s, 1.0).reshape(-1, 1, 1, 1)
    return np.clip(x0_hat, -s, s) / s


def sample(
    session,
    num_images: int | None = None,
    sampler: str = DEFAULT_SAMPLER,
    steps: int | None = None,
    eta: float = 0.0,
    variance: str | None = None,
    clip_x0: bool | None = None,
    seed: int = 0,
    x_T: np.ndarray | None = None,
    noise: np.ndarray | None = None,
    labels: np.ndarray | None = None,
    guidance_scale: float = 0.0,
    progress: bool = False,
    start_t: int | None = None,
) -> np.ndarray:
    """Runs the reverse process with the ONNX denoiser; returns x_0 [B, H, W, C] float32.

    x_T: [B, H, W, C] initial noise and noise: [S, B, H, W, C] per-step noise, drawn from
    numpy's generator seeded with ``seed`` when not given. variance and clip_x0 default to
    the model's own settings (its metadata). Class-conditional models: labels [B] in [0, K]
    (K: unconditional; default all K) and classifier-free guidance w = guidance_scale:
    eps = (1 + w) eps(x_t, t, c) - w eps(x_t, t, K), one session run on the doubled batch.
    progress: count the steps on stderr. start_t: x_T is x_t at that timestep; the sampler's
    steps below it run (``plan``).
    """
    metadata = read_metadata(session)
    variance = metadata["variance"] if variance is None else variance
    clip_x0 = metadata["clip_x0"] if clip_x0 is None else clip_x0
    betas = betas_of(metadata["schedule"])
    taus, coef_x0, coef_xt_eps, sigma, coef_x0_prev = plan(betas, sampler, steps, eta, variance, start_t)
    abar = np.cumprod(1.0 - betas)
    rng = np.random.default_rng(seed)
    if x_T is None:
        if not num_images or num_images < 1:
            raise KddpmOnnxError(f"The number of images must be a positive integer, got {num_images}.")
        x_T = rng.standard_normal((num_images, *metadata["image_shape"]))
    x = np.asarray(x_T, dtype=np.float64)  # the loop runs in float64; only the network sees float32
    if x.ndim != 4 or tuple(x.shape[1:]) != metadata["image_shape"]:
        raise KddpmOnnxError(
            f"x_T has shape {x.shape}; this model takes [B, {', '.join(map(str, metadata['image_shape']))}]."
        )
    eps_of = _eps_function(session, metadata, labels, guidance_scale, len(x))
    x0_before = np.zeros_like(x)
    bar = Progress(len(taus)) if progress else None
    for k, t in enumerate(taus):
        eps = eps_of(x.astype(np.float32), np.full(len(x), t, dtype=np.int32))
        x0_hat = threshold((x - math.sqrt(1.0 - abar[t]) * eps) / math.sqrt(abar[t]), clip_x0)
        z = rng.standard_normal(x.shape) if noise is None else noise[k]
        x = (
            coef_x0[k] * x0_hat
            + coef_xt_eps[k, 0] * x
            + coef_xt_eps[k, 1] * eps
            + coef_x0_prev[k] * x0_before
            + sigma[k] * z
        )
        x0_before = x0_hat
        if bar:
            bar.update(k + 1)
    return x.astype(np.float32)


def _eps_function(session, metadata: dict, labels, guidance_scale: float, batch: int):
    """eps(x_t, t) of the session, conditioned and guided for a class-conditional model."""
    classes = metadata["num_classes"]
    if not classes:
        if labels is not None or guidance_scale:
            raise KddpmOnnxError("This model is unconditional; it takes no classes or guidance.")
        return lambda x, t: session.run(["eps"], {"x_t": x, "t": t})[0]
    if guidance_scale < 0 or not math.isfinite(guidance_scale):
        raise KddpmOnnxError(f"The guidance scale must be a finite number >= 0, got {guidance_scale}.")
    labels = np.full(batch, classes, np.int32) if labels is None else np.asarray(labels, np.int32).reshape(-1)
    if labels.shape != (batch,) or labels.min() < 0 or labels.max() > classes:
        raise KddpmOnnxError(f"Give one class in [0, {classes}] per image ({batch}), got {labels.tolist()}.")
    if not guidance_scale:
        return lambda x, t: session.run(["eps"], {"x_t": x, "t": t, "label": labels})[0]
    both_labels = np.concatenate([labels, np.full(batch, classes, np.int32)])

    def guided(x, t):
        feeds = {"x_t": np.concatenate([x, x]), "t": np.concatenate([t, t]), "label": both_labels}
        (both,) = session.run(["eps"], feeds)
        conditional, unconditional = both[:batch], both[batch:]
        return (1.0 + guidance_scale) * conditional - guidance_scale * unconditional

    return guided


def open_session(model: str | Path):
    """An ONNX Runtime session for ``model``, with clear errors for a missing or broken file."""
    import onnxruntime

    model = Path(model)
    if not model.is_file():
        raise KddpmOnnxError(f"No ONNX file at {model}; export one with `kddpm export --format onnx`.")
    with open(model, "rb") as file:
        head = file.read(4)
    if head.startswith(b"PK"):  # a zip archive: a .keras model, not an exported network
        raise KddpmOnnxError(
            f"{model} is a .keras model (a zip archive), not an ONNX file; export it first with "
            f"`kddpm export --model {model} --format onnx` and give the .onnx file."
        )
    try:
        return onnxruntime.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    except Exception as error:  # onnxruntime raises its own exception types for unreadable files
        raise KddpmOnnxError(f"Cannot load {model} ({str(error).splitlines()[0][:200]}); export it again.") from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Sample a PNG grid from a kddpm ONNX denoiser (numpy + onnxruntime).")
    parser.add_argument("--model", required=True, help="the .onnx file written by `kddpm export`")
    parser.add_argument("--num", type=int, default=16, help="number of images (default 16)")
    parser.add_argument("--sampler", choices=SAMPLERS, default=DEFAULT_SAMPLER, help=f"default {DEFAULT_SAMPLER}")
    parser.add_argument(
        "--steps", type=int, help="steps of ddim (default 50) and dpm++2m, dpm++2m_sde (default 20); DDPM takes all T"
    )
    parser.add_argument("--eta", type=float, default=0.0, help="DDIM noise scale (0: deterministic)")
    add_clip_arguments(parser)
    parser.add_argument("--seed", type=int, default=0, help="seed of numpy's generator (default 0)")
    add_class_arguments(parser)
    parser.add_argument(
        "--input", nargs="+", help="edit these image files or folders (with --strength or --mask) instead of sampling"
    )
    parser.add_argument("--strength", type=float, help="with --input: img2img (SDEdit) strength in (0, 1]")
    parser.add_argument("--mask", help="with --input: RePaint-inpaint where this mask image is white")
    parser.add_argument("--out", default="onnx_samples.png", help="PNG grid to write (default onnx_samples.png)")
    parser.add_argument(
        "--grid-scale", type=int, help="enlarge each image this many times (default: a grid >= 512 px wide; 1: raw)"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.grid_scale is not None and args.grid_scale < 1:
            raise KddpmOnnxError(f"--grid-scale must be a positive integer, got {args.grid_scale}.")
        if (args.strength is not None or args.mask) and not args.input:
            raise KddpmOnnxError("--strength and --mask edit images: give them with --input FILE_OR_FOLDER.")
        if args.input and (args.strength is None) == (args.mask is None):
            raise KddpmOnnxError("--input takes one edit: --strength S (img2img) or --mask MASK.png (inpainting).")
        session = open_session(args.model)
        labels, columns, guidance = None, None, 0.0
        metadata = read_metadata(session)
        if args.input:
            import onnx_edit  # needs Pillow, for reading image files

            inputs = onnx_edit.read_images(args.input, metadata["image_shape"])
            args.num = len(inputs)
        if args.classes:
            if args.input and len(args.classes) > 1:
                raise KddpmOnnxError("Editing takes one --class for all the --input images.")
            labels, columns = class_rows([class_index(metadata, name) for name in args.classes], args.num)
            guidance = args.guidance
        num = args.num if labels is None else len(labels)
        common = {"seed": args.seed, "labels": labels, "guidance_scale": guidance, "clip_x0": args.clip_x0}
        if args.input and args.strength is not None:
            images = onnx_edit.img2img(
                session, inputs, args.strength, args.sampler, args.steps, progress=True, **common
            )
        elif args.input:
            mask = onnx_edit.read_mask(args.mask, len(inputs), *metadata["image_shape"][:2])
            images = onnx_edit.inpaint(session, inputs, mask, progress=True, **common)
        else:
            images = sample(session, num, args.sampler, args.steps, args.eta, progress=True, **common)
        path = write_png(args.out, image_grid(to_uint8(images), columns=columns, scale=args.grid_scale))
    except KddpmOnnxError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"{'Edited images' if args.input else 'Samples'}: {path}")
    return 0


if __name__ == "__main__":
    sys.modules["onnx_sample"] = sys.modules[__name__]  # onnx_edit's imports see this module's classes
    sys.exit(main())
