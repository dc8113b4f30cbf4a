"""``kddpm evaluate``: FID, KID, precision/recall and bits/dim of a trained model, as a table and JSON."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from kddpm.cli.common import add_clip_x0, positive
from kddpm.defaults import DEFAULT_GUIDANCE, DEFAULT_SAMPLER, SAMPLERS


def add_parser(verbs, common) -> None:
    evaluate = verbs.add_parser(
        "evaluate",
        parents=[common],
        help="FID, KID, precision/recall and bits/dim of a trained model",
        description="Score a model's EMA samples against real images (FID, KID, precision/recall on a feature "
        "network's features) and the variational bound on real images (bits/dim). Writes the numbers and "
        "everything needed to reproduce them to a JSON file.",
    )
    evaluate.add_argument("--model", required=True, help="run folder or .keras file")
    evaluate.add_argument(
        "--metrics", default="fid,kid,pr,bpd", help="comma-separated: fid, kid, pr, bpd (default: all four)"
    )
    evaluate.add_argument("--num-samples", type=int, default=10_000, help="generated images (default 10000)")
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
    evaluate.add_argument("--weights", help="InceptionV3 notop weights file, when Keras' cache has none")
    evaluate.add_argument("--bpd-images", type=int, default=256, help="reference images for bits/dim (default 256)")
    evaluate.add_argument(
        "--variance", choices=["beta_tilde", "beta", "both"], default="beta_tilde", help="sigma^2 of the bound"
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
    evaluate.add_argument("--seed", type=int, default=0)
    evaluate.add_argument("--data-dir", help="where Fashion-MNIST's IDX files or tensorflow-datasets data live")
    evaluate.add_argument("--out", help="JSON file to write (default: evaluation.json beside the model)")
    evaluate.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    import kddpm
    from kddpm.errors import KddpmError
    from kddpm.evaluation import evaluate, format_table, parse_metrics
    from kddpm.loading import load_diffusion_model

    positive(args, "num_samples", "steps", "bpd_images", "batch_size")
    metrics = parse_metrics(args.metrics)
    if args.sampler == "ddpm" and args.steps is not None:
        raise KddpmError("DDPM takes all T steps; use --sampler ddim or dpm++2m for --steps.")
    model_path = Path(args.model)
    out = Path(args.out) if args.out else (model_path if model_path.is_dir() else model_path.parent) / "evaluation.json"
    if out.suffix.lower() != ".json":
        raise KddpmError(f"--out {out} must end in .json.")
    model = load_diffusion_model(model_path)
    results = evaluate(
        model,
        metrics,
        num_samples=args.num_samples,
        sampler=args.sampler,
        steps=args.steps,
        clip_x0=args.clip_x0,
        reference=args.reference,
        extractor=args.extractor,
        weights=args.weights,
        batch_size=args.batch_size,
        seed=args.seed,
        bpd_images=args.bpd_images,
        bpd_variances=("beta_tilde", "beta") if args.variance == "both" else (args.variance,),
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
