"""``kddpm evaluate``: FID, KID, precision/recall and bits/dim of a trained model, as a table and JSON."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from kddpm.cli.common import add_clip_x0, add_verb, positive, refuse_unused, writable_output
from kddpm.defaults import DEFAULT_GUIDANCE, DEFAULT_SAMPLER, SAMPLERS
from kddpm.errors import KddpmError

METRICS = ("fid", "kid", "pr", "bpd")
NUM_SAMPLES = 10_000


def add_parser(verbs, common) -> None:
    evaluate = add_verb(
        verbs,
        common,
        "evaluate",
        "FID, KID, precision/recall and bits/dim of a trained model",
        "Score a model's EMA samples against real images (FID, KID, precision/recall on a feature network's "
        "features) and the variational bound on real images (bits/dim). Writes the numbers and everything needed "
        "to reproduce them to a JSON file (docs/evaluation.md).",
        [
            "kddpm evaluate --model runs/demo --num-samples 2000",
            "kddpm evaluate --model runs/demo --metrics fid --sampler ddim --steps 100",
            "kddpm evaluate --model runs/demo --metrics bpd --bpd-images 64 --variance both",
            "kddpm evaluate --model cifar.keras --reference tfds:cifar10:train --extractor inception",
        ],
    )
    evaluate.add_argument("--model", required=True, help="run folder or .keras file")
    evaluate.add_argument(
        "--metrics", default="fid,kid,pr,bpd", help="comma-separated: fid, kid, pr, bpd (default: all four)"
    )
    evaluate.add_argument("--num-samples", type=int, help=f"generated images (default {NUM_SAMPLES})")
    evaluate.add_argument(
        "--sampler", choices=SAMPLERS, default=DEFAULT_SAMPLER, help=f"default {DEFAULT_SAMPLER} (as kddpm sample)"
    )
    evaluate.add_argument(
        "--steps", type=int, help="steps of ddim (default 50) and dpm++2m, dpm++2m_sde (default 20); DDPM takes all T"
    )
    add_clip_x0(evaluate)
    evaluate.add_argument(
        "--reference",
        help="real images: fashion_mnist:test (default for Fashion-MNIST-shaped models), fashion_mnist:train, "
        "tfds:NAME:SPLIT, a folder of images, or a statistics .npz",
    )
    evaluate.add_argument(
        "--extractor",
        help="feature network: fashion_mnist (default for 28x28x1 and 32x32x1 models), inception, or a .keras file",
    )
    evaluate.add_argument(
        "--weights", help="with --extractor inception: InceptionV3 notop weights file (default: Keras' cache)"
    )
    evaluate.add_argument("--bpd-images", type=int, help="reference images for bits/dim (default 256)")
    evaluate.add_argument(
        "--variance", choices=["beta_tilde", "beta", "both"], help="sigma^2 of the bits/dim bound (default beta_tilde)"
    )
    evaluate.add_argument(
        "--labels",
        choices=["reference", "uniform", "null"],
        help="class-conditional models: sample classes in the reference's proportions (default), equally, or "
        "with the null label (the unconditional model)",
    )
    evaluate.add_argument(
        "--guidance",
        type=float,
        help=f"class-conditional models: guidance scale w of the samples (default {DEFAULT_GUIDANCE}; 0 with "
        "--labels null)",
    )
    evaluate.add_argument(
        "--bpd-labels",
        choices=["true", "null"],
        help="class-conditional models: bits/dim given each reference image's own class (default: true) or the "
        "null label",
    )
    evaluate.add_argument("--batch-size", type=int, help="images per graph call (default 256)")
    evaluate.add_argument("--seed", type=int, default=0, help="seed of the samples and the bound's noise (default 0)")
    evaluate.add_argument(
        "--data-dir",
        help="where Fashion-MNIST's IDX files or tensorflow-datasets data live (default: the usual places, "
        "docs/data.md)",
    )
    evaluate.add_argument("--out", help="JSON file to write (default: evaluation.json beside the model)")
    evaluate.set_defaults(run=run, check=check_arguments)


def check_arguments(args: argparse.Namespace) -> Path:
    """Every check that needs no model, before anything is loaded; returns the JSON path."""
    positive(args, "num_samples", "steps", "bpd_images", "batch_size")
    names = [name.strip() for name in args.metrics.split(",") if name.strip()]
    unknown = sorted(set(names) - set(METRICS))
    if unknown or not names:
        raise KddpmError(f"Unknown metrics {unknown or names}; choose from {', '.join(METRICS)} (comma-separated).")
    if "bpd" not in names:
        refuse_unused(args, {"bpd_images": None, "variance": None, "bpd_labels": None}, "they go with bpd in --metrics")
    if set(names) == {"bpd"}:
        refuse_unused(
            args,
            {"num_samples": None, "sampler": DEFAULT_SAMPLER, "steps": None, "clip_x0": None, "extractor": None,
             "weights": None, "labels": None, "guidance": None},
            "bits/dim draws no samples; add fid, kid or pr to --metrics",
        )  # fmt: skip
    if args.weights and args.extractor != "inception":
        raise KddpmError("--weights are InceptionV3's; add --extractor inception.")
    if args.sampler == "ddpm" and args.steps is not None:
        raise KddpmError("DDPM takes all T steps; add --sampler ddim or dpm++2m to use --steps.")
    if args.labels == "null" and args.guidance:
        raise KddpmError("Null-label samples are unconditional and take no guidance; leave out --guidance.")
    model_path = Path(args.model)
    out = Path(args.out) if args.out else (model_path if model_path.is_dir() else model_path.parent) / "evaluation.json"
    if out.suffix.lower() != ".json":
        raise KddpmError(f"--out {out} must end in .json.")
    return writable_output(out)


def run(args: argparse.Namespace) -> int:
    import kddpm
    from kddpm.evaluation import evaluate, format_table
    from kddpm.loading import load_diffusion_model

    out = check_arguments(args)
    model_path = Path(args.model)
    model = load_diffusion_model(model_path)
    results = evaluate(
        model,
        args.metrics.split(","),
        num_samples=args.num_samples or NUM_SAMPLES,
        sampler=args.sampler,
        steps=args.steps,
        clip_x0=args.clip_x0,
        reference=args.reference,
        extractor=args.extractor,
        weights=args.weights,
        batch_size=args.batch_size,
        seed=args.seed,
        bpd_images=args.bpd_images or 256,
        bpd_variances=("beta_tilde", "beta") if args.variance == "both" else (args.variance or "beta_tilde",),
        data_dir=args.data_dir,
        progress=True,
        log=print,
        labels=args.labels,
        guidance_scale=args.guidance,
        bpd_labels=args.bpd_labels,
    )
    record = {
        "model": str(model_path.resolve()),
        **results,
        "kddpm_version": kddpm.__version__,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(format_table(results))
    print(f"Evaluation: {out} ({results['seconds'] / 60:.1f} min)")
    return 0
