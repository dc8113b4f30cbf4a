"""``kddpm sample``: a PNG grid of samples from a trained model."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from kddpm.cli.common import add_clip_x0, add_grid_scale, positive
from kddpm.defaults import DEFAULT_GUIDANCE, DEFAULT_SAMPLER, DEFAULT_STEPS, SAMPLERS


def add_parser(verbs, common) -> None:
    sample = verbs.add_parser("sample", parents=[common], help="draw samples from a trained model")
    sample.add_argument("--model", required=True, help="run folder or .keras file")
    sample.add_argument("--num", type=int, help="number of images (default 64; 4 with --trajectory)")
    sample.add_argument("--seed", type=int, default=0)
    sample.add_argument(
        "--sampler",
        choices=SAMPLERS,
        default=DEFAULT_SAMPLER,
        help=f"default {DEFAULT_SAMPLER} (see the README's quality-per-call figures)",
    )
    sample.add_argument(
        "--steps", type=int, help="steps of ddim (default 50) and dpm++2m, dpm++2m_sde (default 20); DDPM takes all T"
    )
    sample.add_argument("--eta", type=float, help="DDIM noise scale (default 0: deterministic); DDIM only")
    sample.add_argument(
        "--variance", choices=["beta_tilde", "beta"], help="DDPM's sigma^2 (default beta_tilde); DDPM only"
    )
    add_clip_x0(sample)
    sample.add_argument("--batch-size", type=int, help="images per graph call (default: all)")
    sample.add_argument("--out", default="samples.png", help="PNG grid to write (default samples.png)")
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
        "one row each, --num images in all",
    )
    sample.add_argument(
        "--per-class", type=int, metavar="N", help="conditional models: N images of every class, one row per class"
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
    sample.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from kddpm.errors import KddpmError
    from kddpm.loading import load_diffusion_model
    from kddpm.training import write_grid

    positive(args, "num", "steps", "batch_size", "grid_scale", "per_class")
    out = Path(args.out)
    if out.suffix.lower() != ".png":
        raise KddpmError(f"--out {out} must end in .png.")
    model = load_diffusion_model(args.model)
    steps = args.steps if args.sampler != "ddpm" else None
    if args.sampler == "ddpm" and args.steps not in (None, model.schedule.timesteps):
        raise KddpmError(
            f"DDPM takes all {model.schedule.timesteps} steps; use --sampler ddim or dpm++2m for --steps {args.steps}."
        )
    num = args.num or (4 if args.trajectory else 64)
    labels, columns, row_labels = _labels(model, args, num)
    num = num if labels is None else len(labels)
    guidance = 0.0 if labels is None else (DEFAULT_GUIDANCE if args.guidance is None else args.guidance)
    guided = f", guidance {guidance:g}" if labels is not None else ""
    shown = steps or DEFAULT_STEPS.get(args.sampler) or model.schedule.timesteps
    print(f"Sampling {num} images with {args.sampler.upper()} ({shown} steps{guided})")
    options = dict(seed=args.seed, sampler=args.sampler, steps=steps, eta=args.eta, variance=args.variance)
    options.update(labels=labels, guidance_scale=guidance)
    precision = _sampling_precision(args.mixed_precision)
    if args.trajectory:
        shots = model.trajectory(num, clip_x0=args.clip_x0, **options)
        # Rows: image 1's x_t, image 1's predicted x0, image 2's x_t, ...; columns: time.
        rows = [np.stack([shot[part][i] for shot in shots]) for i in range(num) for part in (1, 2)]
        path = write_grid(np.concatenate(rows), out, args.grid_scale, columns=len(shots))
        print(f"Trajectory: {path}")
        return 0
    images = model.sample(
        num, clip_x0=args.clip_x0, batch_size=args.batch_size, progress=True, precision=precision, **options
    )
    print(f"Samples: {write_grid(images, out, args.grid_scale, columns, row_labels)}")
    return 0


def _labels(model, args: argparse.Namespace, num: int) -> tuple[np.ndarray | None, int | None, list[str] | None]:
    """(labels [N], images per row, row captions) asked for by --class / --per-class; Nones without them."""
    from kddpm.errors import KddpmError

    if args.classes and args.per_class:
        raise KddpmError("Give --class (some classes) or --per-class (every class), not both.")
    if not (args.classes or args.per_class):
        if args.guidance is not None:
            raise KddpmError("--guidance goes with --class or --per-class: guidance moves images towards a class.")
        return None, None, None
    if model.num_classes is None:
        raise KddpmError(
            "--class and --per-class need a class-conditional model; this one is unconditional "
            "(train one with kddpm train --conditional)."
        )
    if args.guidance is not None and args.guidance < 0:
        raise KddpmError(f"--guidance must be >= 0, got {args.guidance}.")
    if args.per_class:
        if args.num:
            raise KddpmError("--num and --per-class both set the number of images; give one.")
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
