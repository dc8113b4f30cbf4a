"""Evaluation figures for a trained model: FID/KID/precision/recall by sampler, bits/dim, the data's floor.

    python benchmarks/bench_evaluation.py --model runs/demo [--samples 2000] [--ddpm-samples 500]
        [--bpd-images 256] [--precision-seeds 0,1,2] [--out benchmarks/results/evaluation.json]

Prints a markdown table and writes the numbers as JSON. Everything uses kddpm.evaluation with
the shipped Fashion-MNIST feature network against the 10k test split:

* samplers: DPM-Solver++(2M) with 20 steps (the default) with x0 clipping on, off and dynamic,
  DDIM with 20, 50, 100 steps clipped and not, and DDPM (all T steps) clipped, with the wall
  time of sampling plus features per 1,000 images;
* bits/dim of the first ``--bpd-images`` test images, both variances, with the three parts;
* the floor: the same metrics for ``--samples`` real train images against the test split;
* precision: the default sampler with a float32 and a bfloat16 network, for each of
  ``--precision-seeds``, so that the difference can be read against the seed-to-seed noise.
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
from kddpm.loading import load_diffusion_model
from kddpm.metrics import feature_statistics, frechet_distance_from_stats, kernel_distance, precision_recall
from kddpm.sampling import to_uint8


def sample_scores(model, extractor, samples, sampler, steps, clip_x0, precision=None, seed=0):
    real = reference_features(extractor, "fashion_mnist:test", model.image_shape)
    # Trace the loop first (a 1-step plan of the same graph), so that the time is sampling alone.
    model.sample(min(samples, 250), seed=seed, sampler="ddim" if sampler == "ddpm" else sampler, steps=1,
                 clip_x0=clip_x0, precision=precision)  # fmt: skip
    started = time.perf_counter()
    images = model.sample(
        samples, seed=seed, sampler=sampler, steps=steps, clip_x0=clip_x0, batch_size=250, precision=precision
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
    parser.add_argument("--precision-seeds", default="0,1,2")
    parser.add_argument("--only", choices=["samplers", "bpd", "floor", "precision"], action="append")
    parser.add_argument(
        "--samplers", default="dpm++2m,ddim,ddpm", help="which samplers' rows to run (default dpm++2m,ddim,ddpm)"
    )
    parser.add_argument("--out", default="benchmarks/results/evaluation.json")
    args = parser.parse_args()
    parts = set(args.only or ["samplers", "bpd", "floor", "precision"])
    model = load_diffusion_model(args.model)
    extractor = feature_extractor("fashion_mnist")
    results = {"model": args.model, "rows": [], "bpd": {}, "floor": None, "precision": []}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    def save():
        out.write_text(json.dumps(results, indent=2) + "\n")

    def show(row):
        clip = {True: "on", False: "off"}.get(row["clip_x0"], row["clip_x0"])
        print(
            f"| {row['sampler'].upper()}-{row['steps']} | {clip} | {row['samples']} | "
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
        settings = [("dpm++2m", 20, clip) for clip in (True, False, "dynamic") if "dpm++2m" in chosen]
        settings += [("ddim", steps, clip) for steps in (20, 50, 100) for clip in (True, False) if "ddim" in chosen]
        settings += [("ddpm", None, True)] if "ddpm" in chosen else []
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
    if "precision" in parts:
        for seed in (int(s) for s in args.precision_seeds.split(",")):
            for precision in ("float32", "bfloat16"):
                row = sample_scores(model, extractor, args.samples, "dpm++2m", 20, True, precision, seed=seed)
                row["seed"] = seed
                results["precision"].append(row)
                print(f"seed {seed}, {precision} network", end=": ")
                show(row)
                save()
    print(f"Results: {out}")


if __name__ == "__main__":
    np.set_printoptions(precision=4)
    main()
