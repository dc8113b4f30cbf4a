"""Editing figures for an unconditional Fashion-MNIST model: inpainting, img2img, inversion, Figure 8.

    python benchmarks/bench_editing.py --model RUN [--num 1000] [--repaint-steps 250]
        [--strengths 0.3,0.5,0.7,0.9] [--inpaint-strengths 0.5,0.8] [--inversion-steps 20,50,100]
        [--out benchmarks/results/editing.json]

On the first ``--num`` test images (seed 0 everywhere):

* inpainting the lower half (rows 14..27 filled, the upper half kept): RePaint (jump length 10,
  10 resamplings, ``--repaint-steps`` strides), plain replacement (the same strides without
  resampling), and img2img of the image with its lower half set to mid-grey at two strengths,
  the upper half pasted back (SDEdit used as an inpainter);
* img2img of the whole image at each of ``--strengths`` (DPM-Solver++(2M), 20 steps);
* DDIM inversion and reconstruction at each of ``--inversion-steps``: PSNR (peak 2, the width of
  [-1, 1]) of the reconstruction, and the x_T's mean and standard deviation.

FID is against the 10k test split with the shipped Fashion-MNIST network's features (at N images,
so compare rows with each other and with the test images' own row, not with sampling FIDs of
another N); "class kept" is how often the shipped classifier gives the image's test label (its
accuracy on the test images themselves is the ceiling). Writes the JSON, one grid per edit, and
the paper's Figure 8 (interpolation rows at t = 250, 500, 750) beside it; prints markdown tables.
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
from kddpm.features import feature_extractor, reference_features, shipped_fashion_mnist_classifier
from kddpm.loading import load_diffusion_model
from kddpm.metrics import feature_statistics, frechet_distance_from_stats
from kddpm.sampling import to_uint8
from kddpm.training import write_grid


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="an unconditional 28x28 Fashion-MNIST run folder or .keras")
    parser.add_argument("--num", type=int, default=1000, help="test images edited (default 1000)")
    parser.add_argument("--repaint-steps", type=int, default=250, help="RePaint strides over T (default 250)")
    parser.add_argument("--strengths", default="0.3,0.5,0.7,0.9", help="img2img strengths of the sweep")
    parser.add_argument("--inpaint-strengths", default="0.5,0.8", help="img2img strengths as an inpainter")
    parser.add_argument("--inversion-steps", default="20,50,100")
    parser.add_argument("--batch-size", type=int, default=250)
    parser.add_argument("--out", default="benchmarks/results/editing.json")
    args = parser.parse_args()
    model = load_diffusion_model(args.model)
    images, labels, _ = load_fashion_mnist("test")
    photos, labels = images[: args.num], labels[: args.num].astype(np.int64)
    pixels = photos.astype(np.float32) / 127.5 - 1
    classifier, _ = shipped_fashion_mnist_classifier()
    extractor = feature_extractor("fashion_mnist")
    real = reference_features(extractor, "fashion_mnist:test", model.image_shape)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    rows = []

    def score(group, name, edited, seconds, **extra):
        uint8 = to_uint8(edited)
        predicted = np.argmax(classifier.predict(uint8.astype(np.float32), batch_size=500, verbose=0), axis=1)
        fid = frechet_distance_from_stats(*feature_statistics(extractor(uint8)), real["mu"], real["sigma"])
        row = {"group": group, "edit": name, "fid": fid, "class_kept": float(np.mean(predicted == labels)),
               "seconds": seconds, "images": len(uint8), **extra}  # fmt: skip
        if group != "reference":
            grid = out.with_name(f"editing_{name}.png")
            row["grid"] = str(write_grid(np.concatenate([pixels[:8], edited[:8]]), grid, columns=8))
        rows.append(row)
        print(json.dumps(row), flush=True)
        out.write_text(json.dumps({"model": str(args.model), "num": args.num, "rows": rows}, indent=2) + "\n")

    def timed(function, *positional, **options):
        started = time.perf_counter()
        result = function(*positional, **options)
        return result, time.perf_counter() - started

    score("reference", "test images", pixels, 0.0)
    mask = np.zeros(photos.shape[:3], np.float32)
    mask[:, 14:, :] = 1  # 1 = fill: the lower half
    common = dict(seed=0, batch_size=args.batch_size, steps=args.repaint_steps)
    edited, seconds = timed(model.inpaint, photos, mask, **common)
    score("inpaint", "repaint", edited, seconds, jump_length=10, jump_n_sample=10)
    edited, seconds = timed(model.inpaint, photos, mask, jump_n_sample=1, **common)
    score("inpaint", "replacement", edited, seconds)
    grey = np.where(mask[..., None] > 0, 0.0, pixels).astype(np.float32)
    for strength in [float(s) for s in args.inpaint_strengths.split(",")]:
        edited, seconds = timed(model.img2img, grey, strength=strength, seed=0, batch_size=args.batch_size)
        edited = np.where(mask[..., None] > 0, edited, pixels)
        score("inpaint", f"img2img_{strength:g}_of_grey", edited, seconds, strength=strength)
    for strength in [float(s) for s in args.strengths.split(",")]:
        edited, seconds = timed(model.img2img, photos, strength=strength, seed=0, batch_size=args.batch_size)
        score("img2img", f"img2img_{strength:g}", edited, seconds, strength=strength)
    for steps in [int(s) for s in args.inversion_steps.split(",")]:
        started = time.perf_counter()
        x_T = model.invert(photos, steps=steps, batch_size=args.batch_size)
        again = model.sample(x_T=x_T, sampler="ddim", steps=steps, eta=0, batch_size=args.batch_size)
        mse = np.mean((again - pixels) ** 2, axis=(1, 2, 3))
        row = {"group": "inversion", "steps": steps, "psnr": float(np.mean(10 * np.log10(4.0 / mse))),
               "x_T_mean": float(x_T.mean()), "x_T_std": float(x_T.std()),
               "seconds": time.perf_counter() - started}  # fmt: skip
        rows.append(row)
        print(json.dumps(row), flush=True)
    lines = [model.interpolate(photos[0], photos[1], num=8, t=t, seed=0) for t in (250, 500, 750)]
    figure = write_grid(np.concatenate(lines), out.with_name("editing_interpolation.png"), columns=8,
                        row_labels=["t = 250", "t = 500", "t = 750"])  # fmt: skip
    rows.append({"group": "interpolation", "grid": str(figure)})
    out.write_text(json.dumps({"model": str(args.model), "num": args.num, "rows": rows}, indent=2) + "\n")
    print(f"\n{args.num} test images, seed 0\n\n| edit | FID | class kept | seconds |\n| --- | --- | --- | --- |")
    for row in rows:
        if "fid" in row:
            print(f"| {row['edit']} | {row['fid']:.2f} | {row['class_kept']:.1%} | {row['seconds']:.0f} |")
    print("\n| DDIM steps | reconstruction PSNR | x_T std |\n| --- | --- | --- |")
    for row in rows:
        if row["group"] == "inversion":
            print(f"| {row['steps']} | {row['psnr']:.1f} dB | {row['x_T_std']:.3f} |")
    print(f"\nWrote {out} and the grids beside it.")


if __name__ == "__main__":
    main()
