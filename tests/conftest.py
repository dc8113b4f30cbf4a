import json
import os
import socket
import subprocess
import sys

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


# The environment the command line runs in, as a user's: TensorFlow's log level unset, so that the
# tests see whether kddpm itself keeps the output quiet.
CLI_ENV = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}


def kddpm_command(*args, cwd=None, timeout=600):
    """Runs ``kddpm ARGS`` as a subprocess (``python -m kddpm.cli``), as a user runs it."""
    return subprocess.run(
        [sys.executable, "-m", "kddpm.cli", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=cwd,
        env=CLI_ENV,
    )


EXPORT_SHAPE = (8, 8, 1)
EXPORT_T = 40


@pytest.fixture(scope="session")
def random_ema_model():
    """A tiny model whose EMA weights are random and differ from its trained weights (export tests)."""
    from kddpm import DiffusionModel, NoiseSchedule

    keras.utils.set_random_seed(5)
    model = DiffusionModel(tiny_unet(EXPORT_SHAPE), NoiseSchedule.linear(EXPORT_T))
    rng = np.random.default_rng(5)
    model.ema_denoiser.set_weights(
        [rng.normal(0, 0.2, w.shape).astype(np.float32) for w in model.ema_denoiser.get_weights()]
    )
    return model


@pytest.fixture(scope="session")
def random_ema_exported(random_ema_model, tmp_path_factory):
    """(base folder, {format: ExportResult}) of ``random_ema_model`` exported in both formats."""
    from kddpm.export import export_model

    base = tmp_path_factory.mktemp("exported")
    results = export_model(random_ema_model, base, "all")
    return base, {r.format: r for r in results}


EXPORT_CLASSES = ["ring", "dot", "bar"]


@pytest.fixture(scope="session")
def random_conditional_model():
    """A tiny 3-class model with random EMA weights (export tests)."""
    from kddpm import DiffusionModel, NoiseSchedule

    network = tiny_unet(EXPORT_SHAPE, num_classes=3, seed=2)
    model = DiffusionModel(network, NoiseSchedule.linear(EXPORT_T), num_classes=3, class_names=EXPORT_CLASSES)
    weights = model.ema_denoiser.get_weights()
    model.ema_denoiser.set_weights([np.random.default_rng(7).normal(0, 0.2, w.shape) for w in weights])
    return model


@pytest.fixture(scope="session")
def random_conditional_exported(random_conditional_model, tmp_path_factory):
    """{format: ExportResult} of ``random_conditional_model`` in both formats, model name 'cond'."""
    from kddpm.export import export_model

    base = tmp_path_factory.mktemp("conditional")
    results = {r.format: r for r in export_model(random_conditional_model, base, "all", model_name="cond")}
    assert all(r.max_abs_diff <= 1e-4 for r in results.values())  # the parity checks cover the label
    return results


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """One trained run of the tiny preset (2 epochs of 2 steps, a grid each epoch), shared by every
    test that needs a run folder or a trained model file: (run folder, the command's output)."""
    out = tmp_path_factory.mktemp("tiny-run") / "run"
    done = kddpm_command(
        "train", "--preset", "tiny", "--steps", "4", "--steps-per-epoch", "2", "--grid-every", "1", "--out", out
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return out, done


@pytest.fixture(scope="session")
def tiny_conditional_run(tmp_path_factory):
    """One trained class-conditional tiny run on Fashion-MNIST's ten classes: (run folder, output)."""
    out = tmp_path_factory.mktemp("tiny-conditional") / "run"
    done = kddpm_command(
        "train", "--preset", "tiny", "--conditional", "--label-dropout", "0.2", "--steps", "2", "--steps-per-epoch",
        "2", "--out", out,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return out, done


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
