"""``kddpm img2img``, ``inpaint``, ``interpolate`` and ``invert``: editing real images with a trained model."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from kddpm.cli.common import add_verb, positive, writable_output
from kddpm.defaults import (
    DEFAULT_GUIDANCE,
    DEFAULT_SAMPLER,
    REPAINT_JUMP_LENGTH,
    REPAINT_JUMP_N_SAMPLE,
    REPAINT_STEPS,
    SAMPLERS,
)
from kddpm.errors import KddpmError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


def add_parser(verbs, common) -> None:
    img2img = add_verb(
        verbs,
        common,
        "img2img",
        "re-imagine images: noise them part of the way and denoise (SDEdit)",
        "Noise each input image to `--strength` of the way with the forward process and run the rest of the "
        "reverse process (SDEdit, Meng et al. 2022); strength as diffusers' img2img defines it (docs/editing.md).",
        [
            "kddpm img2img --model runs/demo --input photo.png --strength 0.5 --out edited.png",
            "kddpm img2img --model runs/demo --input inputs/ --strength 0.3 --out edited/",
        ],
    )
    _inputs_and_outputs(img2img)
    img2img.add_argument("--strength", type=float, default=0.5, help="in (0, 1]: how far to noise (default 0.5)")
    img2img.add_argument("--sampler", choices=SAMPLERS, default=DEFAULT_SAMPLER, help=f"default {DEFAULT_SAMPLER}")
    img2img.add_argument("--steps", type=int, help="the sampler's steps over the whole process (default its own)")
    _conditioning(img2img)
    img2img.set_defaults(run=run_img2img, check=check_arguments)

    inpaint = add_verb(
        verbs,
        common,
        "inpaint",
        "fill part of images (RePaint), keeping the rest exactly",
        "Fill where the mask is white (1) and keep the other pixels exactly, with RePaint's resampling (Lugmayr "
        "et al. 2022): a mask image per input, or one box for all (docs/editing.md).",
        [
            "kddpm inpaint --model runs/demo --input photo.png --mask mask.png --out filled.png",
            "kddpm inpaint --model runs/demo --input inputs/ --box 0,14,28,28 --out filled/   # the lower half",
        ],
    )
    _inputs_and_outputs(inpaint)
    area = inpaint.add_mutually_exclusive_group(required=True)
    area.add_argument(
        "--mask",
        nargs="+",
        help="mask image(s), white = fill, one for all inputs or one each (this or --box is required)",
    )
    area.add_argument(
        "--box",
        help="x0,y0,x1,y1 in the model's pixels: fill that box, x1 and y1 excluded (this or --mask is required)",
    )
    inpaint.add_argument("--steps", type=int, help=f"reverse strides over T (default {REPAINT_STEPS}, or T if smaller)")
    inpaint.add_argument(
        "--jump-length",
        type=int,
        default=REPAINT_JUMP_LENGTH,
        help=f"strides per jump back (default {REPAINT_JUMP_LENGTH})",
    )
    inpaint.add_argument(
        "--jump-n-sample",
        type=int,
        default=REPAINT_JUMP_N_SAMPLE,
        help=f"resamplings per jump; 1: plain replacement (default {REPAINT_JUMP_N_SAMPLE})",
    )
    _conditioning(inpaint)
    inpaint.set_defaults(run=run_inpaint, check=check_arguments)

    interpolate = add_verb(
        verbs,
        common,
        "interpolate",
        "a row of images between two images through the diffusion (the paper's Figure 8)",
        "Encode two images, mix them, decode: with the forward process to --t and the DDPM reverse process "
        "(--method q, the paper's Figure 8), or by DDIM inversion and spherical interpolation (--method ddim).",
        ["kddpm interpolate --model runs/demo --input a.png b.png --num 8 --t 500 --out row.png"],
    )
    _inputs_and_outputs(interpolate)
    interpolate.add_argument("--num", type=int, default=8, help="images in the row, both ends included (default 8)")
    interpolate.add_argument("--t", type=int, default=500, help="with --method q: the timestep index (default 500)")
    interpolate.add_argument("--method", choices=["q", "ddim"], default="q", help="default q (the paper's)")
    interpolate.add_argument("--steps", type=int, help="with --method ddim: DDIM steps (default 50)")
    _conditioning(interpolate)
    interpolate.set_defaults(run=run_interpolate, check=check_arguments)

    invert = add_verb(
        verbs,
        common,
        "invert",
        "DDIM inversion: the noise each image comes from, and its reconstruction",
        "Invert each image with deterministic DDIM (eta 0) to the x_T it would be sampled from, save them, and "
        "decode them again: the reconstruction and its PSNR say how faithful the inversion is.",
        ["kddpm invert --model runs/demo --input inputs/ --steps 50 --npz noise.npz --out reconstructed.png"],
    )
    _inputs_and_outputs(invert)
    invert.add_argument("--steps", type=int, default=50, help="DDIM steps (default 50)")
    invert.add_argument("--npz", help="save the x_T [N, H, W, C] float32 to FILE.npz (default: no)")
    _conditioning(invert)
    invert.set_defaults(run=run_invert, check=check_arguments)


def _inputs_and_outputs(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="run folder or .keras file")
    parser.add_argument(
        "--input", nargs="+", required=True, help="image files and folders, resized and converted as training data is"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the noise (default 0)")
    parser.add_argument("--batch-size", type=int, help="images per graph call (default: all at once)")
    parser.add_argument(
        "--out",
        default="edited.png",
        help="a .png or .jpg grid, or a folder (ending in /) for one PNG per image plus grid.png (default edited.png)",
    )


def _conditioning(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--class", dest="label", metavar="NAME_OR_INDEX", help="conditional models: the class (default: unconditional)"
    )
    parser.add_argument(
        "--guidance", type=float, help=f"with --class: guidance scale w >= 0 (default {DEFAULT_GUIDANCE})"
    )


def check_arguments(args: argparse.Namespace) -> None:
    positive(
        args, *(name for name in ("steps", "batch_size", "num", "jump_length", "jump_n_sample") if hasattr(args, name))
    )
    if args.guidance is not None and args.label is None:
        raise KddpmError("--guidance goes with --class: guidance moves images towards a class.")
    if getattr(args, "strength", 1.0) is not None and not 0 < getattr(args, "strength", 1.0) <= 1:
        raise KddpmError(f"--strength must be in (0, 1], got {args.strength}.")
    if getattr(args, "method", None) == "q" and args.steps is not None:
        raise KddpmError("--steps goes with --method ddim; --method q decodes with DDPM from --t.")
    if getattr(args, "method", None) == "ddim" and args.t != 500:
        raise KddpmError("--t goes with --method q; --method ddim inverts all the way.")
    if args.run is run_interpolate and len(args.input) != 2:
        raise KddpmError(f"interpolate takes two images (--input A B), got {len(args.input)} paths.")
    out = Path(args.out)
    if not (args.out.endswith(("/", "\\")) or out.is_dir() or out.suffix.lower() in IMAGE_SUFFIXES):
        raise KddpmError(f"--out {out} must end in .png or .jpg (a grid), or / (a folder of images).")
    writable_output(out / "grid.png" if args.out.endswith(("/", "\\")) or out.is_dir() else out)
    if getattr(args, "npz", None):
        if not args.npz.endswith(".npz"):
            raise KddpmError(f"--npz {args.npz} must end in .npz.")
        writable_output(Path(args.npz), "--npz")


def _checked_against_the_model(args: argparse.Namespace) -> None:
    """The checks that need the model's shape, T and classes, read from its file without TensorFlow."""
    from kddpm.loading import model_config

    config = model_config(args.model)
    height, width, _ = config["image_shape"]
    timesteps = int(config["schedule"]["timesteps"])
    for path in args.input:
        if not Path(path).exists():
            raise KddpmError(f"--input {path} does not exist; give image files or folders of them.")
    if getattr(args, "box", None):
        _box(args.box, height, width)
    if args.label is not None and not config.get("num_classes"):
        raise KddpmError("--class needs a class-conditional model; this one is unconditional.")
    sampler = getattr(args, "sampler", "ddim")
    if sampler == "ddpm" and args.steps not in (None, timesteps):
        raise KddpmError(f"DDPM takes all {timesteps} steps; add --sampler ddim or dpm++2m for --steps {args.steps}.")
    most = timesteps - 1 if sampler.startswith("dpm") else timesteps
    if args.steps is not None and args.steps > most:
        raise KddpmError(f"--steps {args.steps}: at most {most} here (T={timesteps}).")
    if getattr(args, "method", None) == "q" and not 0 <= args.t < timesteps:
        raise KddpmError(f"--t {args.t} must lie in [0, {timesteps}) for this model.")


def _box(text: str, height: int, width: int) -> tuple[int, int, int, int]:
    try:
        x0, y0, x1, y1 = (int(v) for v in text.split(","))
    except ValueError:
        raise KddpmError(f"--box takes x0,y0,x1,y1 in pixels, got {text!r}.") from None
    if not (0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height):
        raise KddpmError(f"--box {text} must lie within the model's {width}x{height} images (x1, y1 excluded).")
    return x0, y0, x1, y1


def _load(args: argparse.Namespace):
    """(model, images [N, H, W, C] in [-1, 1]) of --model and --input."""
    _checked_against_the_model(args)
    from kddpm.data import files_source, load_dataset
    from kddpm.loading import load_diffusion_model

    model = load_diffusion_model(args.model)
    source = files_source(args.input, channels=model.image_shape[2])
    dataset = load_dataset(
        source, batch_size=source.size, image_shape=model.image_shape, channels=model.image_shape[2], shuffle=False,
        drop_remainder=False, labels=False, cache=False,
    )  # fmt: skip
    images = next(iter(dataset)).numpy()
    print(f"Inputs: {source.description}, as {'x'.join(map(str, model.image_shape))}")
    return model, images


def _condition(model, args) -> dict:
    if args.label is None:
        return {}
    return {"labels": args.label, "guidance_scale": args.guidance}


def _write(images: np.ndarray, args: argparse.Namespace, columns: int | None = None, name: str = "Images") -> str:
    from kddpm.cli.sample import _write_images
    from kddpm.training import write_grid

    out = Path(args.out)
    if args.out.endswith(("/", "\\")) or out.is_dir():
        _write_images(images, out)
        grid = write_grid(images, out / "grid.png", columns=columns)
        return f"{name}: {out}  Grid: {grid}"
    return f"{name}: {write_grid(images, out, columns=columns)}"


def run_img2img(args: argparse.Namespace) -> int:
    model, images = _load(args)
    print(f"img2img: strength {args.strength:g}, {args.sampler}")
    edited = model.img2img(
        images, args.strength, sampler=args.sampler, steps=args.steps, seed=args.seed, batch_size=args.batch_size,
        **_condition(model, args),
    )  # fmt: skip
    print(_write(edited, args))
    return 0


def run_inpaint(args: argparse.Namespace) -> int:
    model, images = _load(args)
    mask = _mask(model, args, len(images))
    if args.steps is None:
        args.steps = min(REPAINT_STEPS, model.schedule.timesteps)
    print(f"Inpainting {mask.mean():.0%} of the pixels with RePaint ({args.steps} strides, jumps {args.jump_length} x "
          f"{args.jump_n_sample})")  # fmt: skip
    filled = model.inpaint(
        images, mask, steps=args.steps, jump_length=args.jump_length, jump_n_sample=args.jump_n_sample,
        seed=args.seed, batch_size=args.batch_size, **_condition(model, args),
    )  # fmt: skip
    print(_write(filled, args))
    return 0


def _mask(model, args, count: int) -> np.ndarray:
    """[N, H, W] float32, 1 = fill: from --box, or mask images (white = fill) resized to the model's size."""
    height, width = model.image_shape[:2]
    if args.box:
        x0, y0, x1, y1 = _box(args.box, height, width)
        mask = np.zeros((count, height, width), np.float32)
        mask[:, y0:y1, x0:x1] = 1.0
        return mask
    from kddpm.data import files_source, load_dataset

    source = files_source(args.mask, channels=1)
    if source.size not in (1, count):
        raise KddpmError(f"Give one --mask for all inputs or one per input ({count}), not {source.size}.")
    dataset = load_dataset(source, batch_size=source.size, image_shape=(height, width, 1), channels=1, shuffle=False,
                           drop_remainder=False, labels=False, cache=False)  # fmt: skip
    masks = (next(iter(dataset)).numpy()[..., 0] > 0).astype(np.float32)  # white (above mid-grey) = fill
    return np.broadcast_to(masks, (count, height, width)).copy()


def run_interpolate(args: argparse.Namespace) -> int:
    model, images = _load(args)
    options = {"t": args.t} if args.method == "q" else {"steps": args.steps or 50}
    row = model.interpolate(images[0], images[1], args.num, method=args.method, seed=args.seed, **options,
                            **_condition(model, args))  # fmt: skip
    print(_write(row, args, columns=args.num, name="Interpolation"))
    return 0


def run_invert(args: argparse.Namespace) -> int:
    model, images = _load(args)
    condition = _condition(model, args)
    x_T = model.invert(images, args.steps, batch_size=args.batch_size, **condition)
    again = model.sample(x_T=x_T, sampler="ddim", steps=args.steps, eta=0.0, batch_size=args.batch_size, **condition)
    mse = np.mean((again - images) ** 2, axis=(1, 2, 3))
    psnr = 10 * np.log10(4.0 / np.maximum(mse, 1e-12))  # images span [-1, 1]: a peak-to-peak of 2
    print(f"Reconstruction with DDIM-{args.steps}: PSNR {psnr.mean():.1f} dB (mean of {len(images)})")
    written = []
    if args.npz:
        np.savez(args.npz, x_T=x_T)
        written.append(f"Noise: {args.npz}")
    # Inputs above their reconstructions.
    print("  ".join([*written, _write(np.concatenate([images, again]), args, columns=len(images), name="Grid")]))
    return 0
