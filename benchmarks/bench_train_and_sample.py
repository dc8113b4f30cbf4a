"""Training throughput and sampler speed on this machine; prints figures, asserts nothing.

    python benchmarks/bench_train_and_sample.py [--train-steps 15] [--sample-steps 40]

Training: images/s of DiffusionModel.fit at batch 64 for the `small` preset's U-Net (64 channels,
(1, 2, 2), 32x32x1: the configuration diffusers trains at 31.5 images/s on 2 CPU cores) in float32
and mixed bfloat16, and for the `demo` preset. Sampling: time per reverse step of the compiled
sampler at batch 1 and 64, against a Python loop calling `denoiser.predict` once per step.
The compiled sampler runs with its default `jit_compile="auto"` (XLA on CPU up to batch 8),
and at batch 1 also with XLA off. This VM's speed drifts by up to 30% over minutes, so the
batch-1 comparison alternates the two loops for several rounds and reports every round.
"""

from __future__ import annotations

import argparse
import os
import time
import warnings

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import keras
import numpy as np
import tensorflow as tf

from kddpm.callbacks import Throughput
from kddpm.presets import PRESETS
from kddpm.sampling import XLA_CPU_MAX_BATCH, Sampler, ddim_plan
from kddpm.schedule import NoiseSchedule
from kddpm.training import create_model, make_optimizer

SCHEDULE = NoiseSchedule.linear()


def train_throughput(
    preset_name: str, precision: str, steps: int, batch_size: int = 64, conditional: bool = False
) -> float:
    keras.mixed_precision.set_global_policy(precision)
    preset = PRESETS[preset_name]
    class_names = [str(c) for c in range(10)] if conditional else None
    model = create_model(preset, seed=0, class_names=class_names)
    model.compile(optimizer=make_optimizer(2e-4, 100))
    images = np.random.default_rng(0).uniform(-1, 1, (batch_size * 4, *preset.image_shape)).astype(np.float32)
    labels = np.arange(len(images), dtype=np.int32) % 10
    data = tf.data.Dataset.from_tensor_slices((images, labels) if conditional else images)
    data = data.batch(batch_size).repeat().prefetch(2)
    meter = Throughput(batch_size, skip_steps=3)
    model.fit(data, steps_per_epoch=steps + 3, epochs=1, callbacks=[meter], verbose=0)
    keras.mixed_precision.set_global_policy("float32")
    return meter.images_per_second()


def sampler_step_seconds(sampler: Sampler, batch: int, steps: int) -> float:
    plan = ddim_plan(SCHEDULE, steps, eta=1.0)
    sampler.sample(plan, batch, seed=0).numpy()  # trace and compile once
    start = time.perf_counter()
    sampler.sample(plan, batch, seed=1).numpy()
    return (time.perf_counter() - start) / steps


def predict_loop_step_seconds(network, image_shape, steps: int) -> float:
    """keras-io's way: one `predict` call per reverse step. The update is in numpy, which is
    cheaper than keras-io's eager TensorFlow ops, so the loop is timed at its fastest."""
    schedule = SCHEDULE
    x = np.random.default_rng(0).standard_normal((1, *image_shape)).astype(np.float32)
    network.predict([x, np.array([999], np.int32)], verbose=0)
    start = time.perf_counter()
    for t in range(steps - 1, -1, -1):
        eps = network.predict([x, np.array([t], np.int32)], verbose=0)
        alpha, abar = schedule.alphas[t], schedule.alphas_cumprod[t]
        x = (x - (1 - alpha) / np.sqrt(1 - abar) * eps) / np.sqrt(alpha)
        x = x + np.sqrt(schedule.betas[t]) * np.random.standard_normal(x.shape).astype(np.float32)
    return (time.perf_counter() - start) / steps


def main() -> None:
    warnings.filterwarnings("ignore")
    tf.get_logger().setLevel("ERROR")  # each sampler traces its own loop; the retracing notice is expected
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train-steps", type=int, default=15)
    parser.add_argument("--sample-steps", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=3, help="alternating batch-1 measurements")
    parser.add_argument("--no-train", action="store_true", help="measure the samplers only")
    parser.add_argument(
        "--demo-only", action="store_true", help="training only: the demo preset, unconditional vs conditional"
    )
    args = parser.parse_args()

    print(f"TensorFlow {tf.__version__}, Keras {keras.__version__}, {os.cpu_count()} CPU cores")
    print("\nTraining, batch 64 (images/s, steady state):")
    trained = (("small", "float32", False), ("small", "mixed_bfloat16", False), ("demo", "float32", False))
    # The conditional demo must train in the unconditional demo's time budget.
    trained += (("demo", "float32", True),)
    if args.demo_only:  # the demo, unconditional and conditional, alternating
        trained = (("demo", "float32", False), ("demo", "float32", True)) * args.rounds
    for preset, precision, conditional in () if args.no_train else trained:
        rate = train_throughput(preset, precision, args.train_steps, conditional=conditional)
        kind = "conditional" if conditional else ""
        print(f"  {preset:6s} {precision:15s} {kind:11s} {rate:7.1f}", flush=True)

    if args.demo_only:
        return
    print("\nSampling with the small preset's U-Net (ms per reverse step):")
    model = create_model(PRESETS["small"], seed=0)
    network, shape = model.ema_denoiser, PRESETS["small"].image_shape
    default, no_xla = Sampler(network, shape), Sampler(network, shape, jit_compile=False)
    ratios = []
    for round_ in range(1, args.rounds + 1):
        compiled_1 = sampler_step_seconds(default, 1, args.sample_steps)
        loop_1 = predict_loop_step_seconds(network, shape, args.sample_steps)
        ratios.append(loop_1 / compiled_1)
        print(
            f"  batch 1, round {round_}: compiled (default, XLA) {compiled_1 * 1e3:5.1f}, "
            f"Python loop of predict() {loop_1 * 1e3:5.1f}  ({ratios[-1]:.1f}x slower)",
            flush=True,
        )
    print(f"  batch 1,  predict() loop / compiled : median {np.median(ratios):.1f}x, lowest {min(ratios):.1f}x")
    no_xla_1 = sampler_step_seconds(no_xla, 1, args.sample_steps)
    print(f"  batch 1,  compiled, XLA off         : {no_xla_1 * 1e3:7.1f}")
    compiled_64 = sampler_step_seconds(default, 64, max(5, args.sample_steps // 4))
    print(f"  batch 64, compiled (default, no XLA): {compiled_64 * 1e3:7.1f}")
    print(f"  XLA vs plain graph by batch (jit_compile='auto' uses XLA up to batch {XLA_CPU_MAX_BATCH}):")
    xla = Sampler(network, shape, jit_compile=True)
    for batch in (1, 4, 8, 16, 32):
        steps = 20 if batch <= 4 else 6
        with_xla, without = sampler_step_seconds(xla, batch, steps), sampler_step_seconds(no_xla, batch, steps)
        print(f"    batch {batch:2d}: XLA {with_xla * 1e3:6.1f}, plain {without * 1e3:6.1f}", flush=True)
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    bf16_network = create_model(PRESETS["small"], seed=0).ema_denoiser
    keras.mixed_precision.set_global_policy("float32")
    bf16_sampler = Sampler(bf16_network, shape)
    bf16_64 = sampler_step_seconds(bf16_sampler, 64, max(5, args.sample_steps // 4))
    print(f"  batch 64, compiled, bfloat16 network: {bf16_64 * 1e3:7.1f}")
    bf16_1 = sampler_step_seconds(bf16_sampler, 1, args.sample_steps)
    bf16_loop_1 = predict_loop_step_seconds(bf16_network, shape, args.sample_steps)
    print(f"  batch 1,  compiled, bfloat16 network: {bf16_1 * 1e3:7.1f}")
    print(f"  batch 1,  predict(), bfloat16 network: {bf16_loop_1 * 1e3:6.1f}  ({bf16_loop_1 / bf16_1:.1f}x slower)")


if __name__ == "__main__":
    main()
