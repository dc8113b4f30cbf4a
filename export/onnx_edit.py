"""Editing real images with a kddpm ONNX denoiser: img2img (SDEdit) and RePaint inpainting, in numpy.

``onnx_sample.py --input ... --strength S`` and ``--input ... --mask M`` call these. Like
``onnx_sample.py`` this file repeats kddpm's formulas in numpy (``kddpm.editing`` and
``kddpm.sampling.edits``; the test suite checks both give the same images from the same noise),
so that the deployment side needs numpy and onnxruntime, and Pillow to read image files.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from client import (
    DEFAULT_SAMPLER,
    REPAINT_JUMP_LENGTH,
    REPAINT_JUMP_N_SAMPLE,
    REPAINT_STEPS,
    KddpmOnnxError,
    Progress,
)
from onnx_sample import (
    _eps_function,
    betas_of,
    plan,
    read_metadata,
    sample,
    threshold,
)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")


def img2img(
    session,
    images: np.ndarray,
    strength: float = 0.5,
    sampler: str = DEFAULT_SAMPLER,
    steps: int | None = None,
    seed: int = 0,
    labels: np.ndarray | None = None,
    guidance_scale: float = 0.0,
    clip_x0: bool | str | None = None,
    eps: np.ndarray | None = None,
    noise: np.ndarray | None = None,
    progress: bool = False,
) -> np.ndarray:
    """SDEdit: images [B, H, W, C] (uint8, or floats in [-1, 1]) noised with q(x_t | x_0) to the
    sampler's timestep at ``strength`` of the way (the last round(strength * k) of its k
    timesteps run; DDPM: from round(strength * T) - 1), then denoised. eps: the forward noise
    [B, H, W, C] and noise: the reverse steps' (default: drawn from ``seed``). Returns [B, H, W, C]
    float32."""
    metadata = read_metadata(session)
    x0 = pixels(images, metadata["image_shape"])
    if not 0.0 < strength <= 1.0:
        raise KddpmOnnxError(f"--strength must be in (0, 1], got {strength}.")
    betas = betas_of(metadata["schedule"])
    timesteps = plan(betas, sampler, steps)[0]
    if sampler == "ddpm":
        start = round(strength * len(betas)) - 1
    else:
        runs = round(strength * len(timesteps))
        if runs < 1:
            raise KddpmOnnxError(f"strength {strength} runs none of the {len(timesteps)} steps; raise it or --steps.")
        start = int(timesteps[len(timesteps) - runs])
    abar = np.cumprod(1.0 - betas)[start]
    if eps is None:
        eps = np.random.default_rng([seed, 1]).standard_normal(x0.shape)  # apart from the reverse steps' noise
    x_t = math.sqrt(abar) * x0 + math.sqrt(1.0 - abar) * eps
    return sample(
        session, sampler=sampler, steps=steps, clip_x0=clip_x0, seed=seed, x_T=x_t, noise=noise, labels=labels,
        guidance_scale=guidance_scale, progress=progress, start_t=start,
    )  # fmt: skip


def repaint_timesteps(timesteps: int, steps: int, jump_length: int, jump_n_sample: int) -> np.ndarray:
    """RePaint's timestep sequence as diffusers' ``RePaintScheduler.set_timesteps`` builds it: down
    ``steps`` strides of T // steps, back up ``jump_length`` strides ``jump_n_sample - 1`` times at
    every ``jump_length``-th stride (a higher value than the one before: a forward step)."""
    if not 1 <= steps <= timesteps:
        raise KddpmOnnxError(f"RePaint steps must be between 1 and T={timesteps}, got {steps}.")
    if jump_length < 1 or jump_n_sample < 1:
        raise KddpmOnnxError(f"jump length and resamplings must be >= 1, got {jump_length} and {jump_n_sample}.")
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


def inpaint(
    session,
    images: np.ndarray,
    mask: np.ndarray,
    steps: int | None = None,
    jump_length: int = REPAINT_JUMP_LENGTH,
    jump_n_sample: int = REPAINT_JUMP_N_SAMPLE,
    seed: int = 0,
    labels: np.ndarray | None = None,
    guidance_scale: float = 0.0,
    clip_x0: bool | str | None = None,
    x_T: np.ndarray | None = None,
    noise: np.ndarray | None = None,
    progress: bool = False,
) -> np.ndarray:
    """RePaint (Lugmayr et al. 2022): fills where ``mask`` [B, H, W] is 1 and keeps the rest
    exactly (1 = fill, as image editors use it; RePaint's own code uses 1 = keep). steps: reverse
    strides over T (default 250, or T if smaller).

    A reverse step from level t to t' = t - T // steps is DDIM's with eta 1 (the DDPM posterior
    over the stride), then the kept pixels become sqrt(abar_t') x0 + sqrt(1 - abar_t') z; a
    forward step from a to b draws q(x_b | x_a) = N(sqrt(abar_b / abar_a) x_a, 1 - abar_b / abar_a).
    x_T and noise: [B, H, W, C] and [S, B, H, W, C] step noise (default: drawn from ``seed``).
    Returns [B, H, W, C] float32."""
    metadata = read_metadata(session)
    known = pixels(images, metadata["image_shape"])
    fill = np.asarray(mask, np.float64)
    fill = fill[..., 0] if fill.ndim == 4 and fill.shape[-1] == 1 else fill
    if fill.shape != known.shape[:3]:
        raise KddpmOnnxError(f"The mask has shape {fill.shape}; give one [H, W] per image: {known.shape[:3]}.")
    if not np.isin(fill, (0.0, 1.0)).all():
        raise KddpmOnnxError("Mask values must be 0 (keep) or 1 (fill).")
    keep = (1.0 - fill)[..., None]
    clip_x0 = metadata["clip_x0"] if clip_x0 is None else clip_x0
    betas = betas_of(metadata["schedule"])
    abar = np.append(np.cumprod(1.0 - betas), 1.0)  # abar[-1] = 1: a finished image
    steps = min(REPAINT_STEPS, len(betas)) if steps is None else steps
    sequence = repaint_timesteps(len(betas), steps, jump_length, jump_n_sample)
    stride = len(betas) // steps
    rng = np.random.default_rng(seed)
    known_rng = np.random.default_rng([seed, 2])  # the kept pixels' noise
    x = rng.standard_normal(known.shape) if x_T is None else np.asarray(x_T, np.float64)
    eps_of = _eps_function(session, metadata, labels, guidance_scale, len(x))
    bar = Progress(len(sequence)) if progress else None
    last = sequence[0] + 1
    for k, t in enumerate(sequence):
        z = rng.standard_normal(x.shape) if noise is None else noise[k]
        if t < last:  # reverse, from level t to t - stride (-1: the image)
            abar_t, abar_prev = abar[t], abar[max(t - stride, -1)]
            eps = eps_of(x.astype(np.float32), np.full(len(x), t, dtype=np.int32))
            x0_hat = threshold((x - math.sqrt(1.0 - abar_t) * eps) / math.sqrt(abar_t), clip_x0)
            eps = (x - math.sqrt(abar_t) * x0_hat) / math.sqrt(1.0 - abar_t)  # the eps x0_hat implies
            sigma = math.sqrt((1.0 - abar_prev) / (1.0 - abar_t) * (1.0 - abar_t / abar_prev))
            x = math.sqrt(abar_prev) * x0_hat + math.sqrt(max(1.0 - abar_prev - sigma**2, 0.0)) * eps + sigma * z
            z_known = known_rng.standard_normal(x.shape)
            x = keep * (math.sqrt(abar_prev) * known + math.sqrt(1.0 - abar_prev) * z_known) + (1.0 - keep) * x
        else:  # forward, from the level the last reverse step reached to t - stride
            ratio = abar[max(t - stride, -1)] / abar[max(last - stride, -1)]
            x = math.sqrt(ratio) * x + math.sqrt(max(1.0 - ratio, 0.0)) * z
        last = t
        if bar:
            bar.update(k + 1)
    return x.astype(np.float32)


# --- Image files --------------------------------------------------------------------------


def pixels(images: np.ndarray, image_shape: tuple[int, int, int]) -> np.ndarray:
    """uint8 pixels or floats in [-1, 1], [B, H, W, C] of the model's shape -> float64 in [-1, 1]."""
    array = np.asarray(images)
    if array.ndim != 4 or tuple(array.shape[1:]) != tuple(image_shape):
        raise KddpmOnnxError(
            f"Images have shape {array.shape}; this model takes [B, {', '.join(map(str, image_shape))}]."
        )
    if array.dtype == np.uint8:
        return array.astype(np.float64) / 127.5 - 1.0
    if np.abs(array).max() > 1.0 + 1e-6:
        raise KddpmOnnxError("Float images must lie in [-1, 1] (x / 127.5 - 1); or give uint8 pixels.")
    return array.astype(np.float64)


def read_images(paths: list[str], image_shape: tuple[int, int, int]) -> np.ndarray:
    """Image files and folders -> uint8 [N, H, W, C]: converted to the model's channels, centre-cropped
    to its aspect ratio and resized (antialiased bilinear), as kddpm's pipeline reads training data."""
    from PIL import Image, UnidentifiedImageError

    files = []
    for path in map(Path, paths):
        if path.is_dir():
            files += sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        elif path.is_file():
            files.append(path)
        else:
            raise KddpmOnnxError(f"--input {path} does not exist; give image files or folders of them.")
    if not files:
        raise KddpmOnnxError(f"No images ({', '.join(IMAGE_SUFFIXES)}) in --input {' '.join(paths)}.")
    height, width, channels = image_shape
    images = []
    for file in files:
        try:
            with Image.open(file) as image:
                image = image.convert("L" if channels == 1 else "RGB")
                images.append(np.asarray(_fitted(image, width, height)).reshape(height, width, channels))
        except (UnidentifiedImageError, OSError) as error:
            raise KddpmOnnxError(f"{file} does not decode as an image ({error}); remove it from --input.") from None
    return np.stack(images)


def read_mask(path: str, count: int, height: int, width: int) -> np.ndarray:
    """A mask image (white = fill) -> [count, H, W] of 0 and 1, the same mask for every image."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            grey = np.asarray(_fitted(image.convert("L"), width, height), np.float64)
    except (FileNotFoundError, UnidentifiedImageError, OSError) as error:
        raise KddpmOnnxError(f"--mask {path} does not open as an image ({error}).") from None
    return np.repeat((grey >= 128).astype(np.float64)[None], count, axis=0)


def _fitted(image, width: int, height: int):
    """``image`` centre-cropped to width:height and resized to it."""
    from PIL import Image

    scale = min(image.width / width, image.height / height)
    crop_w, crop_h = round(width * scale), round(height * scale)
    left, top = (image.width - crop_w) // 2, (image.height - crop_h) // 2
    image = image.crop((left, top, left + crop_w, top + crop_h))
    return image if image.size == (width, height) else image.resize((width, height), Image.Resampling.BILINEAR)
