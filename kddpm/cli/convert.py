"""``kddpm convert``: diffusers DDPM checkpoints to a kddpm ``.keras`` file, and back."""

from __future__ import annotations

import argparse
from pathlib import Path

from kddpm.cli.common import add_verb, writable_output
from kddpm.errors import KddpmError


def add_parser(verbs, common) -> None:
    convert = add_verb(
        verbs,
        common,
        "convert",
        "convert a diffusers DDPM checkpoint to kddpm, or a kddpm model to diffusers",
        "--from-diffusers SRC --out FILE.keras reads a diffusers pipeline or model folder, or a Hub id such as "
        "google/ddpm-cifar10-32 (pip install 'kddpm[hub]'); --to-diffusers --model RUN_OR_FILE --out DIR writes "
        "a DDPMPipeline folder (EMA "
        "weights, safetensors) that diffusers.DDPMPipeline.from_pretrained loads (docs/pretrained.md).",
        [
            "kddpm convert --from-diffusers google/ddpm-cifar10-32 --out cifar10.keras",
            "kddpm convert --from-diffusers ddpm-cifar10-32/ --out cifar10.keras   # a folder",
            "kddpm convert --to-diffusers --model runs/demo --out demo-diffusers/",
        ],
    )
    direction = convert.add_mutually_exclusive_group(required=True)
    direction.add_argument(
        "--from-diffusers",
        metavar="SRC",
        help="a diffusers pipeline or UNet2DModel folder, or a Hub id (this or --to-diffusers is required)",
    )
    direction.add_argument("--to-diffusers", action="store_true", help="write --model in the diffusers format")
    convert.add_argument("--model", help="a run folder or .keras file (required with --to-diffusers)")
    convert.add_argument("--out", required=True, help="FILE.keras (--from-diffusers) or a folder (--to-diffusers)")
    convert.add_argument("--overwrite", action="store_true", help="replace an existing --out (default: refuse)")
    convert.add_argument(
        "--trained-weights",
        action="store_true",
        help="with --to-diffusers: the trained weights, not the EMA ones (default: EMA)",
    )
    convert.set_defaults(run=run, check=check_arguments)


def check_arguments(args: argparse.Namespace) -> None:
    out = Path(args.out)
    if args.from_diffusers:
        if args.model or args.trained_weights:
            raise KddpmError("--model and --trained-weights go with --to-diffusers; --from-diffusers reads SRC.")
        if out.suffix != ".keras":
            raise KddpmError(f"--out {out} must end in .keras (a kddpm model file).")
        if out.exists() and not args.overwrite:
            raise KddpmError(f"{out} already exists; choose another --out or pass --overwrite.")
        from kddpm.hub import check_hub_available

        check_hub_available(args.from_diffusers)
    elif not args.model:
        raise KddpmError("--to-diffusers needs --model RUN_OR_FILE (a run folder or .keras file).")
    writable_output(out if args.from_diffusers else out.parent / f".{out.name}-check")


def run(args: argparse.Namespace) -> int:
    out = Path(args.out)
    if args.from_diffusers:
        from kddpm.cli.common import save_atomically
        from kddpm.interop import from_diffusers

        print(f"Reading {args.from_diffusers}")
        model = from_diffusers(args.from_diffusers, log=print)
        _describe(model)
        out.parent.mkdir(parents=True, exist_ok=True)
        save_atomically(model, out)
        print(f"Converted: {out}")
        return 0
    from kddpm.interop import to_diffusers
    from kddpm.loading import load_diffusion_model

    model = load_diffusion_model(args.model)
    _describe(model)
    path = to_diffusers(model, out, use_ema=not args.trained_weights, overwrite=args.overwrite)
    print(f"Converted: {path} (load it with diffusers.DDPMPipeline.from_pretrained)")
    return 0


def _describe(model) -> None:
    from kddpm.defaults import clip_name

    height, width, channels = model.image_shape
    print(
        f"Model: {model.denoiser.count_params():,} parameters, {height}x{width}x{channels} images, {model.schedule}, "
        f"DDPM variance {model.variance}, clip_x0 {clip_name(model.clip_x0)}"
    )
