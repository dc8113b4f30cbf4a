"""Classifier-free guidance figures for a class-conditional Fashion-MNIST model.

    python benchmarks/bench_guidance.py --model RUN [--per-class 100] [--steps 20]
        [--guidance 0,0.5,1,2,4] [--out benchmarks/results/guidance.json]

For each guidance scale w: ``--per-class`` images of every class (DDIM, x0 clipped, seed 0), the
share that the shipped Fashion-MNIST classifier (kddpm's evaluation network, 92% on the test
split) assigns to the requested class, FID against the 10k test split with the same network's
features, and images per second of sampling alone (guidance costs one network call on twice the
batch). Also the unconditional samples (the null label) for reference. Writes the JSON and one
grid per w (8 images a class, one row each) beside it, and prints a markdown table.
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

from kddpm.features import feature_extractor, reference_features, shipped_fashion_mnist_classifier
from kddpm.metrics import feature_statistics, frechet_distance_from_stats
from kddpm.model import load_diffusion_model
from kddpm.sampling import to_uint8
from kddpm.training import write_grid


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="a class-conditional run folder or .keras file")
    parser.add_argument("--per-class", type=int, default=100)
    parser.add_argument("--steps", type=int, default=20, help="DDIM steps (default 20)")
    parser.add_argument("--guidance", default="0,0.5,1,2,4")
    parser.add_argument("--batch-size", type=int, default=250)
    parser.add_argument("--out", default="benchmarks/results/guidance.json")
    args = parser.parse_args()
    model = load_diffusion_model(args.model)
    if model.num_classes is None:
        raise SystemExit("error: --model must be class-conditional (kddpm train --conditional).")
    classifier, _ = shipped_fashion_mnist_classifier()
    extractor = feature_extractor("fashion_mnist")
    real = reference_features(extractor, "fashion_mnist:test", model.image_shape)
    labels = np.repeat(np.arange(model.num_classes, dtype=np.int32), args.per_class)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    rows = []
    settings = [("unconditional", None, 0.0)] + [
        (f"w = {w:g}", labels, w) for w in map(float, args.guidance.split(","))
    ]
    for name, asked, w in settings:
        # Trace the loop for this batch size and guidance first (a 1-step plan), so that the
        # timing below is sampling alone.
        model.sample(len(labels), seed=0, sampler="ddim", steps=1, labels=asked, guidance_scale=w,
                     batch_size=args.batch_size)  # fmt: skip
        started = time.perf_counter()
        images = model.sample(
            len(labels), seed=0, sampler="ddim", steps=args.steps, clip_x0=True, labels=asked, guidance_scale=w,
            batch_size=args.batch_size,
        )  # fmt: skip
        seconds = time.perf_counter() - started
        pixels = to_uint8(images)
        predicted = np.argmax(classifier.predict(pixels.astype(np.float32), batch_size=500, verbose=0), axis=1)
        fid = frechet_distance_from_stats(*feature_statistics(extractor(pixels)), real["mu"], real["sigma"])
        row = {
            "setting": name,
            "guidance": w if asked is not None else None,
            "class_accuracy": None if asked is None else float(np.mean(predicted == labels)),
            "fid": fid,
            "images_per_second": len(labels) / seconds,
            "samples": len(labels),
        }
        if asked is not None:
            keep = np.concatenate([np.flatnonzero(labels == c)[:8] for c in range(model.num_classes)])
            row["grid"] = str(
                write_grid(images[keep], out.with_name(f"guidance_w{w:g}.png"), columns=8, row_labels=model.class_names)
            )
        rows.append(row)
        print(json.dumps(row), flush=True)
    out.write_text(json.dumps({"model": str(args.model), "steps": args.steps, "rows": rows}, indent=2) + "\n")
    print(f"\nDDIM-{args.steps}, x0 clipped, {len(labels)} samples ({args.per_class} a class), seed 0\n")
    print("| guidance w | classifier agrees with the asked class | FID | images/s |")
    print("| --- | --- | --- | --- |")
    for row in rows:
        accuracy = "-" if row["class_accuracy"] is None else f"{100 * row['class_accuracy']:.1f}%"
        print(f"| {row['setting']} | {accuracy} | {row['fid']:.2f} | {row['images_per_second']:.2f} |")
    print(f"\nResults: {out}")


if __name__ == "__main__":
    main()
