"""``kddpm sample``: images from a trained model, as a grid, one file per image, or arrays."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from kddpm.cli.common import add_clip_x0, add_grid_scale, add_verb, positive, writable_output
from kddpm.defaults import DEFAULT_GUIDANCE, DEFAULT_SAMPLER, DEFAULT_STEPS, SAMPLERS
from kddpm.errors import KddpmError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


def add_parser(verbs, common) -> None:
    sample = add_verb(
        verbs,
        common,
        "sample",
        "draw samples from a trained model",
        "Draw images from a model's EMA weights with DPM-Solver++(2M), 20 steps, x0 clipped (kddpm's defaults), "
        "or any sampler, and write them as one grid, one PNG per image, and/or the float arrays.",
        [
            "kddpm sample --model runs/demo --num 16 --out grid.png",
            "kddpm sample --model runs/demo --num 100 --out samples/          # samples/0000.png ... and grid.png",
            "kddpm sample --model runs/demo --sampler ddpm --npz samples.npz   # the paper's Algorithm 2",
            "kddpm sample --model runs/demo-conditional --class sneaker --num 8 --guidance 2",
            "kddpm sample --model runs/demo --trajectory --out fig6.png        # the paper's Figure 6",
        ],
    )
    sample.add_argument("--model", required=True, help="run folder or .keras file")
    sample.add_argument("--num", type=int, help="number of images (default 64; 4 with --trajectory)")
    sample.add_argument("--seed", type=int, default=0, help="seed of the initial noise and every step's (default 0)")
    sample.add_argument(
        "--sampler", choices=SAMPLERS, default=DEFAULT_SAMPLER, help=f"default {DEFAULT_SAMPLER} (docs/samplers.md)"
    )
    sample.add_argument(
        "--steps", type=int, help="steps of ddim (default 50) and dpm++2m, dpm++2m_sde (default 20); ddpm takes all T"
    )
    sample.add_argument("--eta", type=float, help="DDIM's noise scale (default 0: deterministic); with --sampler ddim")
    sample.add_argument(
        "--variance",
        choices=["beta_tilde", "beta"],
        help="DDPM's sigma^2 (default: the model's, beta_tilde for models trained here); with --sampler ddpm",
    )
    add_clip_x0(sample)
    sample.add_argument("--batch-size", type=int, help="images per graph call (default: all at once)")
    sample.add_argument(
        "--out",
        default="samples.png",
        help="a .png or .jpg grid, or a folder (ending in /) for one PNG per image plus grid.png (default samples.png)",
    )
    sample.add_argument(
        "--npz", help="also save the images as float32 [N, H, W, C] in [-1, 1] (and labels) to FILE.npz (default: no)"
    )
    add_grid_scale(sample)
    sample.add_argument(
        "--mixed-precision",
        choices=["auto", "off", "bfloat16"],
        help="the network's precision while sampling: off (float32), bfloat16, or auto (bfloat16 where the "
        "hardware computes it natively); default: as the model was trained",
    )
    sample.add_argument(
        "--class",
        dest="classes",
        action="append",
        metavar="NAME_OR_INDEX",
        help="conditional models: draw this class (a name such as sneaker, or an index); repeat for several, "
        "one row each, --num images in all (default: unconditional)",
    )
    sample.add_argument(
        "--per-class",
        type=int,
        metavar="N",
        help="conditional models: N images of every class, one row per class (default: --num of the --class given)",
    )
    sample.add_argument(
        "--guidance",
        type=float,
        help=f"classifier-free guidance scale w >= 0 with --class or --per-class (default {DEFAULT_GUIDANCE}; "
        "0: plain conditional sampling, half the cost)",
    )
    sample.add_argument(
        "--trajectory",
        action="store_true",
        help="write the paper's Figure 6 instead: per image, a row of x_t and a row of the predicted x0 at 10 points",
    )
    sample.set_defaults(run=run, check=check_arguments)


def run(args: argparse.Namespace) -> int:
    from kddpm.loading import model_config

    outputs = check_arguments(args)  # again, for its outputs (cheap)
    config = model_config(args.model)  # no TensorFlow yet: shape, T and classes from the file
    timesteps = int(config["schedule"]["timesteps"])
    if args.sampler == "ddpm" and args.steps not in (None, timesteps):
        raise KddpmError(
            f"DDPM takes all {timesteps} steps; add --sampler ddim or dpm++2m to use --steps {args.steps}."
        )
    most = timesteps if args.sampler == "ddim" else timesteps - 1
    if args.steps is not None and args.steps > most:
        raise KddpmError(
            f"--steps {args.steps}: {args.sampler} takes at most {most} steps for this model (T={timesteps})."
        )
    if (args.classes or args.per_class) and not config.get("num_classes"):
        raise KddpmError(
            "--class and --per-class need a class-conditional model; this one is unconditional "
            "(train one with kddpm train --conditional)."
        )

    from kddpm.loading import load_diffusion_model
    from kddpm.training import write_grid

    model = load_diffusion_model(args.model)
    num = args.num or (4 if args.trajectory else 64)
    labels, columns, row_labels = _labels(model, args, num)
    num = num if labels is None else len(labels)
    guidance = 0.0 if labels is None else (DEFAULT_GUIDANCE if args.guidance is None else args.guidance)
    steps = args.steps or DEFAULT_STEPS.get(args.sampler) or timesteps
    guided = f", guidance {guidance:g}" if labels is not None else ""
    print(f"Sampling {num} images with {args.sampler.upper()} ({steps} steps{guided})")
    options = dict(seed=args.seed, sampler=args.sampler, steps=args.steps, eta=args.eta, variance=args.variance)
    options.update(labels=labels, guidance_scale=guidance, clip_x0=args.clip_x0)
    if args.trajectory:
        shots = model.trajectory(num, **options)
        # Rows: image 1's x_t, image 1's predicted x0, image 2's x_t, ...; columns: time.
        rows = [np.stack([shot[part][i] for shot in shots]) for i in range(num) for part in (1, 2)]
        path = write_grid(np.concatenate(rows), outputs["grid"], args.grid_scale, columns=len(shots))
        print(f"Trajectory: {path}")
        return 0
    precision = _sampling_precision(args.mixed_precision)
    images = model.sample(num, batch_size=args.batch_size, progress=True, precision=precision, **options)
    written = []
    if "folder" in outputs:
        written.append(f"Images: {_write_images(images, outputs['folder'])}")
    written.append(f"Samples: {write_grid(images, outputs['grid'], args.grid_scale, columns, row_labels)}")
    if args.npz:
        arrays = {"images": images} if labels is None else {"images": images, "labels": labels}
        np.savez(outputs["npz"], **arrays)
        written.append(f"Arrays: {outputs['npz']}")
    print("  ".join(written))
    return 0


def check_arguments(args: argparse.Namespace) -> dict[str, Path]:
    """Every check that needs no model, before anything is loaded; returns where outputs go:
    'grid' (a file), 'folder' (one PNG per image) and 'npz'."""
    positive(args, "num", "steps", "batch_size", "grid_scale", "per_class")
    if args.eta is not None and args.sampler != "ddim":
        raise KddpmError(f"--eta is DDIM's noise scale and {args.sampler} takes none; add --sampler ddim.")
    if args.variance is not None and args.sampler != "ddpm":
        raise KddpmError(f"--variance is DDPM's sigma^2 and {args.sampler} takes none; add --sampler ddpm.")
    if args.guidance is not None and not (args.classes or args.per_class):
        raise KddpmError("--guidance goes with --class or --per-class: guidance moves images towards a class.")
    if args.guidance is not None and args.guidance < 0:
        raise KddpmError(f"--guidance must be >= 0, got {args.guidance}.")
    if args.classes and args.per_class:
        raise KddpmError("Give --class (some classes) or --per-class (every class), not both.")
    if args.per_class and args.num:
        raise KddpmError("--num and --per-class both set the number of images; give one.")
    if args.trajectory:
        for flag, value in (("--batch-size", args.batch_size), ("--npz", args.npz), ("--mixed-precision",
                            args.mixed_precision)):  # fmt: skip
            if value is not None:
                raise KddpmError(f"{flag} goes with sampling, not --trajectory (which writes one figure).")
    out = Path(args.out)
    outputs: dict[str, Path] = {}
    if args.out.endswith(("/", "\\")) or out.is_dir():
        if args.trajectory:
            raise KddpmError(f"--trajectory writes one figure: give --out a .png file, not the folder {out}.")
        outputs["grid"] = writable_output(out / "grid.png")  # makes the folder
        outputs["folder"] = out
    elif out.suffix.lower() in IMAGE_SUFFIXES:
        outputs["grid"] = writable_output(out)
    else:
        raise KddpmError(f"--out {out} must end in .png or .jpg (a grid), or / (a folder of images).")
    if args.npz:
        npz = Path(args.npz)
        if npz.suffix != ".npz":
            raise KddpmError(f"--npz {npz} must end in .npz.")
        outputs["npz"] = writable_output(npz, "--npz")
    return outputs


def _write_images(images: np.ndarray, folder: Path) -> Path:
    """images [N, H, W, C] in [-1, 1] as folder/0000.png, 0001.png, ... (raw pixels, no scaling)."""
    import keras

    from kddpm.sampling import to_uint8

    pixels = to_uint8(images)
    digits = max(4, len(str(len(pixels) - 1)))
    for index, image in enumerate(pixels):
        keras.utils.save_img(folder / f"{index:0{digits}d}.png", image, scale=False)
    return folder


def _labels(model, args: argparse.Namespace, num: int) -> tuple[np.ndarray | None, int | None, list[str] | None]:
    """(labels [N], images per row, row captions) asked for by --class / --per-class; Nones without them."""
    if not (args.classes or args.per_class):
        return None, None, None
    if args.per_class:
        classes, per_row = list(range(model.num_classes)), args.per_class
    else:
        classes = [model.class_index(name) for name in args.classes]
        if len(classes) == 1:
            return np.full([num], classes[0], np.int32), None, None
        per_row = max(1, num // len(classes))
    names = model.class_names or [str(c) for c in range(model.num_classes)]
    captions = [names[c] if c < model.num_classes else "unconditional" for c in classes]
    return np.repeat(np.asarray(classes, np.int32), per_row), per_row, captions


def _sampling_precision(mode: str | None) -> str | None:
    """--mixed-precision as model.sample's precision (None: as the model was trained)."""
    if mode is None:
        return None
    if mode == "auto":
        from kddpm.training import native_bfloat16

        native, why = native_bfloat16()
        print(f"Precision: {'bfloat16' if native else 'float32'} (auto: {why})")
        return "bfloat16" if native else "float32"
    return {"off": "float32", "bfloat16": "bfloat16"}[mode]
