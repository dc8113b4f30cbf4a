"""``kddpm sample``: a PNG grid of samples from a trained model."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from kddpm.cli.common import add_grid_scale, positive


def add_parser(verbs, common) -> None:
    sample = verbs.add_parser("sample", parents=[common], help="draw samples from a trained model")
    sample.add_argument("--model", required=True, help="run folder or .keras file")
    sample.add_argument("--num", type=int, help="number of images (default 64; 4 with --trajectory)")
    sample.add_argument("--seed", type=int, default=0)
    sample.add_argument("--sampler", choices=["ddpm", "ddim"], default="ddpm")
    sample.add_argument("--steps", type=int, help="DDIM steps (default 50); DDPM always takes T")
    sample.add_argument("--eta", type=float, help="DDIM noise scale (default 0: deterministic); DDIM only")
    sample.add_argument(
        "--variance", choices=["beta_tilde", "beta"], help="DDPM's sigma^2 (default beta_tilde); DDPM only"
    )
    sample.add_argument(
        "--clip-x0",
        action=argparse.BooleanOptionalAction,
        help="clip the predicted x0 to [-1, 1] at each step (default: the model's own setting)",
    )
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
        "--trajectory",
        action="store_true",
        help="write the paper's Figure 6 instead: per image, a row of x_t and a row of the predicted x0 at 10 points",
    )
    sample.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from kddpm.errors import KddpmError
    from kddpm.model import load_diffusion_model
    from kddpm.training import write_grid

    positive(args, "num", "steps", "batch_size", "grid_scale")
    out = Path(args.out)
    if out.suffix.lower() != ".png":
        raise KddpmError(f"--out {out} must end in .png.")
    model = load_diffusion_model(args.model)
    steps = args.steps if args.sampler == "ddim" else None
    if args.sampler == "ddpm" and args.steps not in (None, model.schedule.timesteps):
        raise KddpmError(
            f"DDPM takes all {model.schedule.timesteps} steps; use --sampler ddim for --steps {args.steps}."
        )
    num = args.num or (4 if args.trajectory else 64)
    print(f"Sampling {num} images with {args.sampler.upper()} ({steps or model.schedule.timesteps} steps)")
    options = dict(seed=args.seed, sampler=args.sampler, steps=steps, eta=args.eta, variance=args.variance)
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
    print(f"Samples: {write_grid(images, out, args.grid_scale)}")
    return 0


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
