"""Evaluation figures for a trained model: FID/KID/precision/recall by sampler, bits/dim, the data's floor.

    python benchmarks/bench_evaluation.py --model runs/demo [--samples 2000] [--ddpm-samples 500]
        [--bpd-images 256] [--bf16-model runs/demo-bf16] [--out benchmarks/results/evaluation.json]

Prints a markdown table and writes the numbers as JSON. Everything uses kddpm.evaluation with
the shipped Fashion-MNIST feature network against the 10k test split:

* samplers: DDPM (all T steps) and DDIM with 10, 20, 50, 100 steps, x0 clipping on and off,
  with the wall time of sampling plus features per 1,000 images;
* bits/dim of the first ``--bpd-images`` test images, both variances, with the three parts;
* the floor: the same metrics for ``--samples`` real train images against the test split;
* with ``--bf16-model``: FID of that (bfloat16-trained) model, and of the float32 model sampled
  with a bfloat16 network, against the float32 model's, all with DDIM (--bf16-steps) and clipping.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import numpy as np

from kddpm.data import load_fashion_mnist
from kddpm.evaluation import evaluate
from kddpm.features import feature_extractor, reference_features
from kddpm.metrics import feature_statistics, frechet_distance_from_stats, kernel_distance, precision_recall
from kddpm.model import load_diffusion_model
from kddpm.sampling import to_uint8


def sample_scores(model, extractor, samples, sampler, steps, clip_x0, precision=None):
    real = reference_features(extractor, "fashion_mnist:test", model.image_shape)
    started = time.perf_counter()
    images = model.sample(
        samples, seed=0, sampler=sampler, steps=steps, clip_x0=clip_x0, batch_size=250, precision=precision
    )
    fake = extractor(to_uint8(images))
    seconds = time.perf_counter() - started
    kid, kid_std = kernel_distance(real["features"], fake)
    precision_value, recall = precision_recall(real["features"], fake)
    return {
        "sampler": sampler,
        "steps": steps or model.schedule.timesteps,
        "clip_x0": clip_x0,
        "samples": samples,
        "precision_net": precision or "model",
        "fid": frechet_distance_from_stats(*feature_statistics(fake), real["mu"], real["sigma"]),
        "kid": kid,
        "kid_std": kid_std,
        "precision": precision_value,
        "recall": recall,
        "seconds_per_1000": seconds / samples * 1000,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--samples", type=int, default=2000)
    parser.add_argument("--ddpm-samples", type=int, default=500)
    parser.add_argument("--bpd-images", type=int, default=256)
    parser.add_argument("--bf16-model")
    parser.add_argument("--bf16-steps", type=int, default=100, help="DDIM steps of the bfloat16 comparison")
    parser.add_argument("--only", choices=["samplers", "bpd", "floor", "bf16"], action="append")
    parser.add_argument("--samplers", default="ddim,ddpm", help="which samplers' rows to run (default ddim,ddpm)")
    parser.add_argument("--out", default="benchmarks/results/evaluation.json")
    args = parser.parse_args()
    parts = set(args.only or ["samplers", "bpd", "floor", "bf16"])
    model = load_diffusion_model(args.model)
    extractor = feature_extractor("fashion_mnist")
    results = {"model": args.model, "rows": [], "bpd": {}, "floor": None, "bf16": []}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    def save():
        out.write_text(json.dumps(results, indent=2) + "\n")

    def show(row):
        print(
            f"| {row['sampler'].upper()}-{row['steps']} | {'on' if row['clip_x0'] else 'off'} | {row['samples']} | "
            f"{row['fid']:.2f} | {row['kid']:.4f} | {row['precision']:.3f} / {row['recall']:.3f} | "
            f"{row['seconds_per_1000']:.0f} s |",
            flush=True,
        )

    if "floor" in parts:
        train, _, _ = load_fashion_mnist("train")
        real = reference_features(extractor, "fashion_mnist:test", model.image_shape)
        fake = extractor(train[: args.samples])
        results["floor"] = {
            "samples": args.samples,
            "fid": frechet_distance_from_stats(*feature_statistics(fake), real["mu"], real["sigma"]),
            "kid": kernel_distance(real["features"], fake)[0],
            "precision_recall": precision_recall(real["features"], fake),
        }
        print("floor (train images vs test):", results["floor"], flush=True)
        save()
    if "samplers" in parts:
        print("| sampler | clip x0 | N | FID | KID | precision / recall | time per 1,000 |")
        print("| --- | --- | --- | --- | --- | --- | --- |")
        chosen = args.samplers.split(",")
        settings = [("ddim", steps, clip) for steps in (10, 20, 50, 100) for clip in (True, False) if "ddim" in chosen]
        settings += [("ddpm", None, clip) for clip in (True, False) if "ddpm" in chosen]
        for sampler, steps, clip in settings:
            samples = args.ddpm_samples if sampler == "ddpm" else args.samples
            row = sample_scores(model, extractor, samples, sampler, steps, clip)
            results["rows"].append(row)
            show(row)
            save()
    if "bpd" in parts:
        for variance in ("beta_tilde", "beta"):
            scores = evaluate(model, ("bpd",), bpd_images=args.bpd_images, bpd_variances=(variance,))
            results["bpd"][variance] = {**scores["metrics"]["bpd"][variance], "seconds": scores["seconds"]}
            print(f"bits/dim ({variance}):", results["bpd"][variance], flush=True)
            save()
    if "bf16" in parts and args.bf16_model:
        bf16_model = load_diffusion_model(args.bf16_model)
        for label, which, precision in (
            ("float32-trained, float32 sampling", model, None),
            ("bfloat16-trained, float32 sampling", bf16_model, "float32"),
            ("float32-trained, bfloat16 sampling", model, "bfloat16"),
        ):
            row = sample_scores(which, extractor, args.samples, "ddim", args.bf16_steps, True, precision)
            row["label"] = label
            results["bf16"].append(row)
            print(label, end=": ")
            show(row)
            save()
    print(f"Results: {out}")


if __name__ == "__main__":
    np.set_printoptions(precision=4)
    main()
