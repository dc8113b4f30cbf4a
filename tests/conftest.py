import json
import os
import socket
import subprocess

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras
import pytest

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
