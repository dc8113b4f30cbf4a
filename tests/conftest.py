import json
import os
import socket
import subprocess

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras
import numpy as np
import pytest
import tensorflow as tf

from kddpm import build_unet


def tiny_unet(image_shape=(8, 8, 1), **overrides):
    """A U-Net small enough that a train step takes milliseconds."""
    settings = dict(
        image_shape=image_shape,
        base_channels=8,
        channel_mults=(1, 2),
        num_res_blocks=1,
        attention_resolutions=(4,),
        dropout=0.0,
        norm_groups=4,
    )
    settings.update(overrides)
    return build_unet(**settings)


class GaussianEps:
    """The exact eps of data N(mu, s^2 I): sqrt(1 - abar) (x - sqrt(abar) mu) / (abar s^2 + 1 - abar).

    Called as a network ([x_t, t] -> eps, float32) or through ``numpy(x, t)`` in float64.
    """

    def __init__(self, schedule, mean=0.4, std=0.3):
        self.abar = schedule.alphas_cumprod
        self.mean, self.var = mean, std**2

    def numpy(self, x, t):
        abar = self.abar[t]
        return np.sqrt(1 - abar) * (x - np.sqrt(abar) * self.mean) / (abar * self.var + 1 - abar)

    def __call__(self, inputs, training=False):
        x, t = inputs
        abar = tf.reshape(tf.gather(tf.constant(self.abar, tf.float32), t), [-1, 1, 1, 1])
        return tf.sqrt(1.0 - abar) * (x - tf.sqrt(abar) * self.mean) / (abar * self.var + 1.0 - abar)


def numpy_threshold(x0, clip):
    """x0 [B, ...] clipped as ``clip_x0`` says, written from Saharia et al. 2022 with numpy's quantile."""
    if clip == "dynamic":
        s = np.maximum(np.quantile(np.abs(x0).reshape(len(x0), -1), 0.995, axis=1), 1.0)
        s = s.reshape((-1,) + (1,) * (x0.ndim - 1))
        return np.clip(x0, -s, s) / s
    return np.clip(x0, -1, 1) if clip else x0


@pytest.fixture
def seeded():
    keras.utils.set_random_seed(1234)


def run_loopback_workers(commands, envs, timeout=600):
    """Runs one process per command as the workers of a MultiWorkerMirroredStrategy cluster on
    127.0.0.1 (free ports chosen now), each with its TF_CONFIG; returns (returncode, stdout,
    stderr) per worker. Every process is killed if the test fails or times out."""
    sockets = [socket.socket() for _ in commands]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        cluster = {"worker": [f"127.0.0.1:{s.getsockname()[1]}" for s in sockets]}
    finally:
        for s in sockets:
            s.close()
    workers = []
    try:
        for index, (command, env) in enumerate(zip(commands, envs)):
            config = json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}})
            workers.append(
                subprocess.Popen(
                    command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**env, "TF_CONFIG": config}
                )
            )
        outputs = [worker.communicate(timeout=timeout) for worker in workers]
    finally:
        for worker in workers:
            if worker.poll() is None:
                worker.kill()
                worker.wait()
    return [(worker.returncode, out, err) for worker, (out, err) in zip(workers, outputs)]
