"""Training throughput under each execution mode, against this machine's convolution peak.

    python benchmarks/bench_scale.py [--presets small cifar10] [--steps 6] [--batch 64] [--modes default ...]

For each preset, trains on random images and prints images/s (steady state, after the warm-up
steps) for: the default graph, XLA (jit_compile), mixed bfloat16, and MirroredStrategy over two
logical CPU devices. Each mode runs in a fresh process (logical devices and dtype policies are
process-wide). It also measures the fp32 throughput of a large 3x3 convolution (oneDNN's best
case on this machine) and reports which fraction of it the train step reaches, counting the
U-Net's FLOPs (2 per multiply-add; a train step as 3 forward passes: forward, and backward for
activations and weights), and the time of one train step. ``--batch 0`` uses each preset's own
batch size. Prints figures, asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

MODES = ("default", "xla", "bfloat16", "mirrored-2cpu")

WORKER = r"""
import json, os, sys
mode, preset_name, steps, batch = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
import tensorflow as tf
if mode == "mirrored-2cpu":
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
else:
    strategy = tf.distribute.get_strategy()
import numpy as np
from kddpm.presets import PRESETS
from kddpm.callbacks import Throughput
from kddpm.training import create_model, make_optimizer, set_precision

set_precision("bfloat16" if mode == "bfloat16" else "off")
preset = PRESETS[preset_name]
with strategy.scope():
    model = create_model(preset, seed=0)
    model.compile(optimizer=make_optimizer(2e-4, 10), jit_compile=(mode == "xla"))
images = np.random.default_rng(0).uniform(-1, 1, (batch * 2, *preset.image_shape)).astype(np.float32)
data = tf.data.Dataset.from_tensor_slices(images).batch(batch).repeat()
warmup = 3
meter = Throughput(batch, skip_steps=warmup)
model.fit(data, steps_per_epoch=steps + warmup, epochs=1, callbacks=[meter], verbose=0)
print(json.dumps({"images_per_second": meter.images_per_second()}))
"""


def conv_peak_gflops(repeats: int = 10) -> float:
    """fp32 GFLOP/s of a [64, 32, 32, 128] x [3, 3, 128, 128] convolution, the U-Net's bulk."""
    import tensorflow as tf

    x = tf.random.normal([64, 32, 32, 128])
    kernel = tf.random.normal([3, 3, 128, 128])
    conv = tf.function(lambda x: tf.nn.conv2d(x, kernel, 1, "SAME"))
    conv(x).numpy()
    start = time.perf_counter()
    for _ in range(repeats):
        conv(x).numpy()
    seconds = (time.perf_counter() - start) / repeats
    return 2 * 64 * 32 * 32 * 9 * 128 * 128 / seconds / 1e9


def forward_flops(network) -> float:
    """Multiply-add FLOPs (x2) of one image through the U-Net: convolutions, dense layers, attention."""
    import keras

    total = 0.0
    for layer in network.layers:
        if isinstance(layer, keras.layers.Conv2D):
            _, height, width, channels_out = layer.output.shape
            kh, kw, channels_in, _ = layer.kernel.shape
            total += 2 * height * width * kh * kw * channels_in * channels_out
        elif isinstance(layer, keras.layers.Dense):
            positions = 1
            for d in layer.output.shape[1:-1]:
                positions *= d
            total += 2 * positions * layer.kernel.shape[0] * layer.kernel.shape[1]
        elif isinstance(layer, keras.layers.Attention):
            query = layer.input[0].shape  # [B, N, C] or [B, H, W, C] flattened to N positions
            positions = 1
            for d in query[1:-1]:
                positions *= d
            total += 2 * 2 * positions * positions * query[-1]  # q.k^T and softmax.v
    return total


def run_mode(mode: str, preset: str, steps: int, batch: int) -> float:
    done = subprocess.run(
        [sys.executable, "-c", WORKER, mode, preset, str(steps), str(batch)],
        capture_output=True,
        text=True,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
    )
    if done.returncode != 0:
        print(done.stderr[-2000:], file=sys.stderr)
        return float("nan")
    return json.loads(done.stdout.strip().splitlines()[-1])["images_per_second"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", default=["small", "cifar10"])
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--steps", type=int, default=6, help="measured steps per mode (after 3 warm-up steps)")
    parser.add_argument("--batch", type=int, default=64, help="global batch (0: the preset's own)")
    args = parser.parse_args()

    import tensorflow as tf

    from kddpm.presets import PRESETS
    from kddpm.unet import build_unet

    peak = conv_peak_gflops()
    print(f"TensorFlow {tf.__version__}, {os.cpu_count()} CPU cores; fp32 3x3 convolution: {peak:.0f} GFLOP/s")
    for preset in args.presets:
        network = build_unet(**PRESETS[preset].unet_kwargs())
        train_flops = 3 * forward_flops(network)
        batch = args.batch or PRESETS[preset].batch_size
        print(
            f"\n{preset}: {network.count_params():,} parameters, {forward_flops(network) / 1e9:.2f} GFLOP "
            f"forward per image, batch {batch}"
        )
        print(f"  {'mode':14s} {'images/s':>9s} {'s/step':>8s} {'GFLOP/s':>8s} {'of conv peak':>13s}")
        for mode in args.modes:
            rate = run_mode(mode, preset, args.steps, batch)
            achieved = rate * train_flops / 1e9
            print(f"  {mode:14s} {rate:9.2f} {batch / rate:8.3f} {achieved:8.0f} {achieved / peak:12.0%}", flush=True)


if __name__ == "__main__":
    main()
