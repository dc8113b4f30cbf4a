"""train_step under MirroredStrategy equals training on one device (2 logical CPU devices)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import run_loopback_workers

SCRIPT = r"""
import json, os, sys
import tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
import keras
import numpy as np
sys.path.insert(0, sys.argv[1])
from conftest import tiny_unet
from kddpm import DiffusionModel, NoiseSchedule
from kddpm.training import make_optimizer

initial = [w.copy() for w in tiny_unet(seed=0).get_weights()]
rng = np.random.default_rng(0)
images = rng.uniform(-1, 1, (64, 8, 8, 1)).astype(np.float32)

# Counts the tensors each replica all-reduces while the train step is traced.
reduced = []
original_all_reduce = tf.distribute.ReplicaContext.all_reduce


def counting_all_reduce(self, reduce_op, value, options=None):
    reduced.append(len(tf.nest.flatten(value)))
    return original_all_reduce(self, reduce_op, value, options)


tf.distribute.ReplicaContext.all_reduce = counting_all_reduce


def train(strategy, optimizer, dropout):
    # Adam is blind to a constant gradient scale, so plain SGD checks the global-batch mean;
    # Adam with a tight clip checks that the clip sees the global gradient's norm. Dropout
    # checks that each example of the global batch gets its own mask on any replica.
    reduced.clear()
    with strategy.scope():
        clip = 0.05 if optimizer == "adam" else None
        network = tiny_unet(dropout=dropout)
        model = DiffusionModel(network, NoiseSchedule.linear(), ema_decay=0.9, clip_grad_norm=clip, seed=5)
        model.compile(optimizer=make_optimizer(1e-2, 2) if optimizer == "adam" else keras.optimizers.SGD(0.05))
    model.denoiser.set_weights(initial)
    model.reset_ema()
    data = tf.data.Dataset.from_tensor_slices(images).batch(16)
    history = model.fit(data, epochs=3, verbose=0)
    return {
        "replicas": strategy.num_replicas_in_sync,
        "loss": history.history["loss"],
        "weights": [w.tolist() for w in model.denoiser.get_weights()],
        "ema": [w.tolist() for w in model.ema_denoiser.get_weights()],
        "steps": int(model.optimizer.iterations.numpy()),
        "variables": len(model.denoiser.trainable_variables),
        "reduced_per_replica": sum(reduced) / strategy.num_replicas_in_sync,
    }


results = [
    [train(tf.distribute.OneDeviceStrategy("/cpu:0"), optimizer, dropout),
     train(tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"]), optimizer, dropout)]
    for optimizer, dropout in (("adam", 0.0), ("sgd", 0.0), ("adam", 0.3))
]
print(json.dumps(results))
"""


@pytest.mark.slow
def test_mirrored_strategy_matches_one_device(tmp_path):
    script = tmp_path / "mirrored.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "KERAS_BACKEND": "tensorflow"}
    done = subprocess.run(
        [sys.executable, str(script), str(Path(__file__).parent)], capture_output=True, text=True, timeout=600, env=env
    )
    assert done.returncode == 0, done.stderr[-3000:]
    for single, mirrored in json.loads(done.stdout.strip().splitlines()[-1]):
        check_same_training(single, mirrored)
        # One all-reduce of each gradient per step (traced once): the clip's when clipping, else
        # the optimizer's, never both.
        assert mirrored["reduced_per_replica"] == mirrored["variables"]


def check_same_training(single, mirrored):
    import numpy as np

    assert single["replicas"] == 1 and mirrored["replicas"] == 2
    assert single["steps"] == mirrored["steps"] == 12
    np.testing.assert_allclose(mirrored["loss"], single["loss"], rtol=1e-4)
    # The weights moved (so the comparison means something) and moved identically.
    assert single["loss"][-1] != single["loss"][0]
    for a, b in zip(single["weights"], mirrored["weights"]):
        np.testing.assert_allclose(np.array(b), np.array(a), rtol=1e-4, atol=1e-5)
    for a, b in zip(single["ema"], mirrored["ema"]):
        np.testing.assert_allclose(np.array(b), np.array(a), rtol=1e-4, atol=1e-5)


WORKER = r"""
import json, os, sys
import tensorflow as tf
strategy = tf.distribute.MultiWorkerMirroredStrategy() if os.environ.get("TF_CONFIG") else tf.distribute.get_strategy()
import keras
import numpy as np
sys.path.insert(0, sys.argv[1])
from conftest import tiny_unet
from kddpm import DiffusionModel, NoiseSchedule
from kddpm.training import make_optimizer

# A class-conditional model (with label dropout) when asked: labels must reach every worker intact.
classes = 3 if sys.argv[3:] == ["conditional"] else None
initial = [w.copy() for w in tiny_unet(seed=0, num_classes=classes).get_weights()]
images = np.random.default_rng(0).uniform(-1, 1, (64, 8, 8, 1)).astype(np.float32)
labels = np.arange(64, dtype=np.int32) % 3
with strategy.scope():
    # Dropout > 0: each worker must draw the masks of its own examples of the global batch.
    network = tiny_unet(dropout=0.3, num_classes=classes)
    model = DiffusionModel(
        network, NoiseSchedule.linear(), ema_decay=0.9, clip_grad_norm=0.05, seed=5, label_dropout=0.3
    )
    model.compile(optimizer=make_optimizer(1e-2, 2))
model.denoiser.set_weights(initial)
model.reset_ema()
options = tf.data.Options()
options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
data = tf.data.Dataset.from_tensor_slices((images, labels) if classes else images)
data = data.batch(16).with_options(options)  # 16 = the global batch
history = model.fit(data, epochs=3, verbose=0)
result = {
    "replicas": strategy.num_replicas_in_sync,
    "loss": history.history["loss"],
    "weights": [w.tolist() for w in model.denoiser.get_weights()],
    "ema": [w.tolist() for w in model.ema_denoiser.get_weights()],
    "steps": int(model.optimizer.iterations.numpy()),
}
with open(sys.argv[2], "w") as f:
    json.dump(result, f)
"""


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["unconditional", "conditional"])
def test_multi_worker_strategy_matches_one_process(tmp_path, kind):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    tests = str(Path(__file__).parent)
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "KERAS_BACKEND": "tensorflow"}
    env.pop("TF_CONFIG", None)
    single = subprocess.run(
        [sys.executable, str(script), tests, str(tmp_path / "single.json"), kind],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert single.returncode == 0, single.stderr[-3000:]

    commands = [[sys.executable, str(script), tests, str(tmp_path / f"worker{index}.json"), kind] for index in range(2)]
    for returncode, _, stderr in run_loopback_workers(commands, [env, env]):
        assert returncode == 0, stderr[-3000:]
    expected = json.loads((tmp_path / "single.json").read_text())
    for index in range(2):
        result = json.loads((tmp_path / f"worker{index}.json").read_text())
        check_same_training({**expected, "replicas": 1}, result)


PIPELINE = r"""
import dataclasses, json, os, sys
import tensorflow as tf
mode = sys.argv[2]
if mode == "mirrored":
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
elif mode == "workers":
    strategy = tf.distribute.MultiWorkerMirroredStrategy()
else:
    strategy = tf.distribute.get_strategy()
import numpy as np
from kddpm.data import distributed_dataset, load_dataset
from kddpm.data.sources import in_memory_source

# 48 images whose label is their record index; every read is counted.
images = np.random.default_rng(0).integers(0, 256, (48, 4, 4, 1)).astype(np.uint8)
source = in_memory_source(images, np.arange(48), "48 numbered images")
reads = []
def count(index):
    reads.append(int(index))
    return index
read = source.read
source = dataclasses.replace(source, read=lambda i: read(tf.numpy_function(count, [i], tf.int64, stateful=True)),
                             arrays=None)
settings = dict(repeat=True, seed=2, cache=False, flip=True, skip_batches=3)
if strategy.num_replicas_in_sync > 1:
    data = distributed_dataset(strategy, source, 8, **settings)
else:
    data = load_dataset(source, batch_size=8, **settings)
steps = []
iterator = iter(data)
for _ in range(7):  # crosses from epoch 0 (6 batches of 8) into epoch 1
    batch_images, batch_labels = next(iterator)
    parts = zip(strategy.experimental_local_results(batch_images), strategy.experimental_local_results(batch_labels))
    # Labels and each image's pixel sum (its flip shows in the weighted sum): small enough for a pipe.
    weights = np.arange(16, dtype=np.float64).reshape(1, 4, 4, 1)
    steps.append([[labels.numpy().tolist(), (images.numpy() * weights).sum(axis=(1, 2, 3)).tolist()]
                  for images, labels in parts])
# A live iterator whose map calls back into Python can hang the interpreter's exit: end it first.
del iterator, data
print(json.dumps({"steps": steps, "reads": sorted(set(reads))}))
"""


def run_pipeline(script, mode, env):
    done = subprocess.run([sys.executable, str(script), "", mode], capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_one_process_two_replicas_and_two_workers_read_the_same_batches(tmp_path):
    """kddpm's pipeline: the global batch of each step is the same images (flips included)
    whether one process reads it, two replicas split it, or two workers read half each; each
    worker decodes only its own half."""
    import numpy as np

    from kddpm.data import batch_records

    script = tmp_path / "pipeline.py"
    script.write_text(PIPELINE)
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "KERAS_BACKEND": "tensorflow"}
    env.pop("TF_CONFIG", None)
    single = run_pipeline(script, "single", env)
    mirrored = run_pipeline(script, "mirrored", env)
    commands = [[sys.executable, str(script), "", "workers"] for _ in range(2)]
    workers = []
    for returncode, stdout, stderr in run_loopback_workers(commands, [env, env]):
        assert returncode == 0, stderr[-3000:]
        workers.append(json.loads(stdout.strip().splitlines()[-1]))
    for step, (whole,) in enumerate(single["steps"]):
        np.testing.assert_array_equal(whole[0], batch_records(48, 8, step + 3, seed=2))
        for split in (mirrored["steps"][step], [worker["steps"][step][0] for worker in workers]):
            assert [len(labels) for labels, _ in split] == [4, 4]
            assert split[0][0] + split[1][0] == whole[0]
            np.testing.assert_allclose(np.concatenate([images for _, images in split]), whole[1], rtol=1e-6)
    # Worker w decoded records of its own halves only (steps 3, 4, ... with the prefetch's lookahead).
    for index, worker in enumerate(workers):
        own = {r for step in range(3, 30) for r in batch_records(48, 8, step, seed=2)[4 * index : 4 * index + 4]}
        assert set(worker["reads"]) <= own and len(worker["reads"]) >= 4 * 3
