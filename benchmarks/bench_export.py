"""Exported denoiser: agreement and latency of Keras, SavedModel and ONNX Runtime; prints, asserts nothing.

    python benchmarks/bench_export.py [--model runs/NAME] [--repeats 30]

Exports the EMA denoiser of ``--model`` (default: the demo preset's U-Net with random weights, so
that eps is far from zero and the differences mean something) to a temporary folder, then for
batch 1 and 64 prints the max abs difference of eps between the three runtimes on the same random
inputs and the median latency of one denoiser call in each: Keras (the network called inside a
``tf.function``), the SavedModel's ``serving_default`` signature, and an ONNX Runtime session.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import logging

import numpy as np
import onnxruntime
import tensorflow as tf

from kddpm.export import export_onnx, export_saved_model
from kddpm.loading import load_diffusion_model
from kddpm.presets import PRESETS
from kddpm.training import create_model


def median_seconds(call, repeats: int, *args, **kwargs) -> float:
    call(*args, **kwargs)  # warm up
    call(*args, **kwargs)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call(*args, **kwargs)
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="run folder or .keras file (default: demo preset, random weights)")
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()
    logging.getLogger("tf2onnx").setLevel(logging.ERROR)
    if args.model:
        model = load_diffusion_model(args.model)
        source = args.model
    else:
        model = create_model(PRESETS["demo"], seed=0)
        rng = np.random.default_rng(0)
        weights = model.ema_denoiser.get_weights()
        model.ema_denoiser.set_weights([w + rng.normal(0, 0.05, w.shape).astype(w.dtype) for w in weights])
        source = "demo preset, random weights"
    network = model.ema_denoiser
    print(f"Model: {source}; image shape {model.image_shape}; {network.count_params():,} parameters")
    with tempfile.TemporaryDirectory() as folder:
        saved = export_saved_model(model, folder)
        onnx_file = export_onnx(model, os.path.join(folder, "kddpm.onnx"))
        serve = tf.saved_model.load(str(saved.path)).signatures["serving_default"]
        options = onnxruntime.SessionOptions()
        session = onnxruntime.InferenceSession(str(onnx_file.path), options, providers=["CPUExecutionProvider"])
        keras_call = tf.function(lambda x_t, t: network([x_t, t], training=False), reduce_retracing=True)

        print(
            f"{'batch':>5} {'|SM-Keras|':>11} {'|ORT-Keras|':>12} {'|ORT-SM|':>10}   latency ms: Keras  SavedModel  ORT"
        )
        rng = np.random.default_rng(1)
        for batch in (1, 64):
            x_t = rng.standard_normal((batch, *model.image_shape)).astype(np.float32)
            t = rng.integers(0, model.schedule.timesteps, batch).astype(np.int32)
            x_tensor, t_tensor = tf.constant(x_t), tf.constant(t)
            keras_eps = keras_call(x_tensor, t_tensor).numpy()
            saved_eps = serve(x_t=x_tensor, t=t_tensor)["eps"].numpy()
            (onnx_eps,) = session.run(["eps"], {"x_t": x_t, "t": t})
            latencies = [
                median_seconds(lambda x, s: keras_call(x, s).numpy(), args.repeats, x_tensor, t_tensor),
                median_seconds(lambda x, s: serve(x_t=x, t=s)["eps"].numpy(), args.repeats, x_tensor, t_tensor),
                median_seconds(session.run, args.repeats, ["eps"], {"x_t": x_t, "t": t}),
            ]
            print(
                f"{batch:>5} {np.abs(saved_eps - keras_eps).max():>11.2e} {np.abs(onnx_eps - keras_eps).max():>12.2e}"
                f" {np.abs(onnx_eps - saved_eps).max():>10.2e}   " + "  ".join(f"{1000 * s:>9.2f}" for s in latencies)
            )
        print(f"eps scale: max |eps| = {np.abs(keras_eps).max():.2f}")


if __name__ == "__main__":
    main()
