"""Classifier-free guidance figures for a class-conditional Fashion-MNIST model.

    python benchmarks/bench_guidance.py --model RUN [--per-class 100] [--steps 20]
        [--guidance 0,0.5,1,2,3,4] [--settings ddim:clip,dpm++2m:clip,dpm++2m:dynamic,ddim:raw-eps]
        [--out benchmarks/results/guidance.json]

For each guidance scale w and each sampler setting (sampler:clipping, at ``--steps`` steps):
``--per-class`` images of every class (seed 0), the share that the shipped Fashion-MNIST
classifier (kddpm's evaluation network, 92% on the test split) assigns to the requested class,
and FID against the 10k test split with the same network's features. Settings: ``clip`` is x0
clipped to [-1, 1], ``dynamic`` dynamic thresholding, ``off`` no clipping, and ``ddim:raw-eps``
the clipped DDIM step that keeps the network's eps in its direction term (diffusers'
DDIMScheduler default, kddpm's DDIM before it recomputed eps), for comparison. Also the
unconditional samples (the null label), and images per second of the default setting at w = 0
and w > 0 (guidance costs one network call on twice the batch). Writes the JSON and one grid per
w of the first setting (8 images a class, one row each) beside it, and prints markdown tables.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import numpy as np

from kddpm.features import feature_extractor, reference_features, shipped_fashion_mnist_classifier
from kddpm.loading import load_diffusion_model
from kddpm.metrics import feature_statistics, frechet_distance_from_stats
from kddpm.sampling import Sampler, to_uint8

CLIP_MODES = {"clip": True, "dynamic": "dynamic", "off": False, "raw-eps": True}


def raw_eps_ddim(plan):
    """The clipped DDIM plan with the network's eps in the direction term:
    x' = sqrt(abar') clip(x0_hat) + sqrt(1 - abar' - sigma^2) eps (no eps recomputed from the clip)."""
    abar = 1.0 / plan.x0_from_xt**2
    abar_prev = np.append(abar[1:], 1.0)
    direction = np.sqrt(np.maximum(1.0 - abar_prev - plan.sigma**2, 0.0))
    return dataclasses.replace(plan, coef_x0=np.sqrt(abar_prev), coef_xt=np.zeros_like(abar), coef_eps=direction)


def draw(model, setting, steps, count, labels, w, batch_size):
    """``count`` images of ``setting``; labels None: the null label (unconditional)."""
    sampler, mode = setting.split(":")
    if mode != "raw-eps":
        return model.sample(
            count, seed=0, sampler=sampler, steps=steps, clip_x0=CLIP_MODES[mode], labels=labels,
            guidance_scale=w if labels is not None else None, batch_size=batch_size,
        )  # fmt: skip
    plan = raw_eps_ddim(model.plan("ddim", steps, clip_x0=True))
    runner = Sampler(model.ema_denoiser, model.image_shape, num_classes=model.num_classes)
    labels = np.full(count, model.num_classes, np.int32) if labels is None else labels
    batches = [
        runner.sample(plan, len(labels[i : i + batch_size]), seed=0, first_image=i, labels=labels[i : i + batch_size],
                      guidance_scale=w).numpy()
        for i in range(0, len(labels), batch_size)
    ]  # fmt: skip
    return np.clip(np.concatenate(batches), -1, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="a class-conditional run folder or .keras file")
    parser.add_argument("--per-class", type=int, default=100)
    parser.add_argument("--steps", type=int, default=20, help="sampler steps (default 20)")
    parser.add_argument("--guidance", default="0,0.5,1,2,3,4")
    parser.add_argument("--settings", default="dpm++2m:clip,ddim:clip,dpm++2m:dynamic,ddim:raw-eps")
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
    settings = args.settings.split(",")
    scales = [float(w) for w in args.guidance.split(",")]
    rows = []

    def save():
        out.write_text(json.dumps({"model": str(args.model), "steps": args.steps, "rows": rows}, indent=2) + "\n")

    runs = [(settings[0], None, 0.0)] + [(setting, labels, w) for w in scales for setting in settings]
    for setting, asked, w in runs:
        pixels = to_uint8(draw(model, setting, args.steps, len(labels), asked, w, args.batch_size))
        predicted = np.argmax(classifier.predict(pixels.astype(np.float32), batch_size=500, verbose=0), axis=1)
        row = {
            "setting": setting,
            "guidance": None if asked is None else w,
            "class_accuracy": None if asked is None else float(np.mean(predicted == labels)),
            "fid": frechet_distance_from_stats(*feature_statistics(extractor(pixels)), real["mu"], real["sigma"]),
            "samples": len(labels),
        }
        if asked is not None and setting == settings[0]:
            keep = np.concatenate([np.flatnonzero(labels == c)[:8] for c in range(model.num_classes)])
            row["grid"] = str(_grid(pixels[keep], out.with_name(f"guidance_w{w:g}.png"), model.class_names))
        rows.append(row)
        print(json.dumps(row), flush=True)
        save()
    speed = {}
    for w in (0.0, max(scales)):
        # Trace first (a 1-step plan of the same loop), then time sampling alone.
        sampler = settings[0].split(":")[0]
        model.sample(args.batch_size, seed=0, sampler=sampler, steps=1, labels=labels[: args.batch_size],
                     guidance_scale=w)  # fmt: skip
        started = time.perf_counter()
        model.sample(args.batch_size, seed=0, sampler=sampler, steps=args.steps, labels=labels[: args.batch_size],
                     guidance_scale=w)  # fmt: skip
        speed[w] = args.batch_size / (time.perf_counter() - started)
    rows.append({"images_per_second": {str(w): s for w, s in speed.items()}, "batch": args.batch_size})
    save()
    print(f"\n{args.steps} steps, {len(labels)} samples ({args.per_class} a class), seed 0; agreement / FID\n")
    print("| guidance w | " + " | ".join(settings) + " |")
    print("| --- |" + " --- |" * len(settings))
    unconditional = rows[0]
    print(f"| unconditional (null label) | - / {unconditional['fid']:.2f} |" + " |" * (len(settings) - 1))
    for w in scales:
        cells = []
        for setting in settings:
            row = next(r for r in rows if r.get("setting") == setting and r.get("guidance") == w)
            cells.append(f"{100 * row['class_accuracy']:.1f}% / {row['fid']:.2f}")
        print(f"| {w:g} | " + " | ".join(cells) + " |")
    print(
        f"\nimages/s ({settings[0]}, batch {args.batch_size}): "
        + ", ".join(f"w = {w:g}: {s:.1f}" for w, s in speed.items())
    )
    print(f"\nResults: {out}")


def _grid(pixels, path, names):
    from kddpm.training import write_grid

    return write_grid(pixels.astype(np.float32) / 127.5 - 1.0, path, columns=8, row_labels=names)


if __name__ == "__main__":
    main()
