"""Can the whole sampler be one ONNX graph? Converts two versions of the reverse loop with tf2onnx.

    python benchmarks/try_onnx_loop.py

1. The loop with every step's noise supplied as an input [S, B, H, W, C]: tf2onnx turns the
   `tf.while_loop` into an ONNX Loop; ONNX Runtime's result is compared with TensorFlow's.
2. The loop drawing its own noise with TensorFlow's stateless random ops (what kddpm's sampler
   does): reports whether conversion and `onnx.checker` succeed.

Uses a tiny random U-Net; prints what happened, asserts nothing. This is why the ONNX export holds
the denoiser and `export/onnx_sample.py` runs the loop (see export/README.md).
"""

from __future__ import annotations

import logging
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import numpy as np
import onnx
import onnxruntime
import tensorflow as tf
import tf2onnx

from kddpm import build_unet
from kddpm.streams import RNG_ALG

SHAPE = (8, 8, 1)
STEPS = 5


def main() -> None:
    logging.getLogger("tf2onnx").setLevel(logging.CRITICAL)
    network = build_unet(SHAPE, 8, (1, 2), 1, (4,), 0.0, norm_groups=4)
    rng = np.random.default_rng(0)
    network.set_weights([rng.normal(0, 0.2, w.shape).astype(np.float32) for w in network.get_weights()])
    plan = [
        tf.TensorSpec([None, *SHAPE], tf.float32, name="x_T"),
        tf.TensorSpec([None], tf.int32, name="timesteps"),
        tf.TensorSpec([None, 3], tf.float32, name="coefficients"),  # coef_xt, coef_eps, sigma
    ]

    def step(x, t, coefficients, z):
        eps = network([x, tf.fill([tf.shape(x)[0]], t)], training=False)
        return coefficients[0] * x + coefficients[1] * eps + coefficients[2] * z

    @tf.function(input_signature=[*plan, tf.TensorSpec([None, None, *SHAPE], tf.float32, name="noise")])
    def supplied(x, timesteps, coefficients, noise):
        def body(k, x):
            return k + 1, step(x, timesteps[k], coefficients[k], noise[k])

        return {"x_0": tf.while_loop(lambda k, _: k < tf.shape(timesteps)[0], body, (0, x))[1]}

    @tf.function(input_signature=[*plan, tf.TensorSpec([2], tf.int64, name="seed")])
    def drawn(x, timesteps, coefficients, seed):
        def body(k, x):
            key = tf.random.experimental.stateless_fold_in(seed, k, alg=RNG_ALG)
            z = tf.random.stateless_normal(tf.shape(x), seed=key, alg=RNG_ALG)
            return k + 1, step(x, timesteps[k], coefficients[k], z)

        return {"x_0": tf.while_loop(lambda k, _: k < tf.shape(timesteps)[0], body, (0, x))[1]}

    inputs = {
        "x_T": rng.standard_normal((2, *SHAPE)).astype(np.float32),
        "timesteps": np.arange(STEPS, dtype=np.int32)[::-1] * 100,
        "coefficients": rng.uniform(0.5, 1.0, (STEPS, 3)).astype(np.float32),
    }
    noise = rng.standard_normal((STEPS, 2, *SHAPE)).astype(np.float32)

    proto, _ = tf2onnx.convert.from_function(supplied, input_signature=supplied.input_signature, opset=17)
    onnx.checker.check_model(proto)
    loops = sum(node.op_type == "Loop" for node in proto.graph.node)
    session = onnxruntime.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    (onnx_x0,) = session.run(None, {**inputs, "noise": noise})
    tf_x0 = supplied(*inputs.values(), noise)["x_0"].numpy()
    print(f"1. noise as an input: converted ({loops} ONNX Loop), max |ORT - TF| = {np.abs(onnx_x0 - tf_x0).max():.2e}")

    try:
        proto, _ = tf2onnx.convert.from_function(drawn, input_signature=drawn.input_signature, opset=17)
        onnx.checker.check_model(proto)
        print("2. noise drawn inside: converted and checked")
    except Exception as error:  # tf2onnx and onnx raise several types
        print(f"2. noise drawn inside: failed: {type(error).__name__}: {str(error).splitlines()[0][:200]}")


if __name__ == "__main__":
    main()
