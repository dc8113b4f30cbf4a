"""The input pipeline on folders of 256x256 JPEGs: memory, time to the first batch, speed, per-worker decodes.

    python benchmarks/bench_data.py [--sizes 3000,12000,30000] [--root /tmp/kddpm-bench-data]
        [--batch-size 64] [--batches 60] [--out benchmarks/results/data.json]

Makes synthetic 256x256 colour JPEGs (smooth random textures, about 20 KB each, like photos in
size; kept out of git, under --root) and, for each size, in a fresh process: the peak resident
memory (ru_maxrss, TensorFlow included) while reading --batches batches of --batch-size through
``kddpm.load_dataset`` at 256x256x3 with flips, the time from listing the folder to the first
batch, and the pipeline's images/s after it (decoding from disk, both cores). Then two workers of
a MultiWorkerMirroredStrategy on 127.0.0.1 read the largest folder through
``kddpm.data.distributed_dataset`` and report how many images each decoded. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent

READ = textwrap.dedent("""
    import dataclasses, json, os, resource, sys, time
    started = time.perf_counter()
    import tensorflow as tf
    strategy = tf.distribute.MultiWorkerMirroredStrategy() if os.environ.get("TF_CONFIG") else None
    from kddpm.data import distributed_dataset, image_source, load_dataset
    folder, batch, batches = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    source = image_source(folder)
    listed = time.perf_counter() - started
    decoded = []
    def count(index):
        decoded.append(int(index))
        return index
    read = source.read
    source = dataclasses.replace(source, read=lambda i: read(tf.numpy_function(count, [i], tf.int64, stateful=True)))
    settings = dict(image_shape=(256, 256, 3), flip=True, repeat=True, seed=0, labels=False)
    if strategy is not None:
        data = distributed_dataset(strategy, source, batch, **settings)
    else:
        data = load_dataset(source, batch_size=batch, **settings)
    iterator = iter(data)
    next(iterator)
    first = time.perf_counter() - started
    begin = time.perf_counter()
    for _ in range(batches):
        next(iterator)
    speed = batches * batch / (time.perf_counter() - begin)
    del iterator, data
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"images": source.size, "listed_s": listed, "first_batch_s": first, "images_per_s": speed,
                      "peak_rss_mb": peak_mb, "decoded": len(decoded), "distinct": len(set(decoded))}))
""")


def make_folder(root: Path, count: int) -> Path:
    """count synthetic 256x256 JPEGs in root/COUNT (made once, reused)."""
    from PIL import Image

    folder = root / str(count)
    existing = len(list(folder.glob("*.jpg"))) if folder.is_dir() else 0
    if existing == count:
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(count)
    for index in range(existing, count):
        # Random colour noise at 16x16, enlarged smoothly: photo-like file sizes and decode work.
        small = Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8))
        small.resize((256, 256), Image.BICUBIC).save(folder / f"{index:06d}.jpg", quality=90)
    return folder


def run(folder: Path, batch: int, batches: int, env=None) -> dict:
    done = subprocess.run(
        [sys.executable, "-c", READ, str(folder), str(batch), str(batches)],
        capture_output=True, text=True, timeout=3600, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", **(env or {})},
    )  # fmt: skip
    if done.returncode:
        raise SystemExit(done.stderr[-3000:])
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="3000,12000,30000")
    parser.add_argument("--root", default="/tmp/kddpm-bench-data")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--batches", type=int, default=60)
    parser.add_argument("--out", default="benchmarks/results/data.json")
    args = parser.parse_args()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    rows = []
    for size in (int(s) for s in args.sizes.split(",")):
        folder = make_folder(Path(args.root), size)
        rows.append(run(folder, args.batch_size, args.batches))
        print(json.dumps(rows[-1]), flush=True)
    sys.path.insert(0, str(HERE.parent / "tests"))
    from conftest import run_loopback_workers

    command = [sys.executable, "-c", READ, str(folder), str(args.batch_size), str(args.batches)]
    env = {k: v for k, v in os.environ.items() if k != "TF_CONFIG"} | {"TF_CPP_MIN_LOG_LEVEL": "3"}
    workers = []
    for returncode, stdout, stderr in run_loopback_workers([command, command], [env, env], timeout=3600):
        if returncode:
            raise SystemExit(stderr[-3000:])
        workers.append(json.loads(stdout.strip().splitlines()[-1]))
    out.write_text(json.dumps({"rows": rows, "workers": workers, "batch_size": args.batch_size}, indent=2) + "\n")
    print("\n| images | peak RSS | time to first batch (listing and header check) | images/s |")
    print("| --- | --- | --- | --- |")
    for row in rows:
        print(f"| {row['images']:,} | {row['peak_rss_mb']:,.0f} MB | {row['first_batch_s']:.1f} s "
              f"({row['listed_s']:.1f} s) | {row['images_per_s']:,.0f} |")  # fmt: skip
    read = args.batch_size * (args.batches + 1)
    print(f"\nTwo workers, {read:,} images of global batches read from the {rows[-1]['images']:,}-image folder: "
          + ", ".join(f"worker {i} decoded {w['decoded']:,}" for i, w in enumerate(workers))
          + " (a worker's prefetch reads a few batches ahead)")  # fmt: skip
    print(f"\nResults: {out}")


if __name__ == "__main__":
    main()
