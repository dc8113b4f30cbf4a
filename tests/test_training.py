"""Strategy choice, mixed precision, XLA, and fault tolerance: backups, resume after SIGKILL, NaN stop."""

import dataclasses
import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import run_loopback_workers, tiny_unet

from kddpm import DiffusionModel, KddpmError, NoiseSchedule
from kddpm.callbacks import StopOnNonFiniteLoss, TrainingBackup, read_backup_state
from kddpm.training import is_chief, make_optimizer, make_strategy, set_precision

IMAGES = np.random.default_rng(0).uniform(-1, 1, (32, 8, 8, 1)).astype(np.float32)


def fresh_model(initial=None, dropout=0.0, jit_compile=False, **kwargs):
    keras.utils.set_random_seed(0)
    model = DiffusionModel(tiny_unet(dropout=dropout), NoiseSchedule.linear(100), ema_decay=0.9, seed=3, **kwargs)
    model.compile(optimizer=make_optimizer(1e-3, 2), jit_compile=jit_compile)
    if initial is not None:
        model.denoiser.set_weights(initial)
        model.reset_ema()
    return model


# --- Strategies -----------------------------------------------------------------------------


def test_strategy_names_and_chief(monkeypatch):
    assert make_strategy("default") is tf.distribute.get_strategy()
    assert make_strategy("auto") is tf.distribute.get_strategy()  # no GPUs here
    with pytest.raises(KddpmError, match="Unknown strategy"):
        make_strategy("tpu")
    monkeypatch.delenv("TF_CONFIG", raising=False)
    with pytest.raises(KddpmError, match="TF_CONFIG, which is not set"):
        make_strategy("multiworker")
    monkeypatch.setenv("TF_CONFIG", '{"cluster": {}}')
    with pytest.raises(KddpmError, match="TF_CONFIG is not valid"):
        make_strategy("multiworker")
    assert is_chief(tf.distribute.get_strategy())

    def resolver(cluster, task_type, task_id):
        spec = tf.train.ClusterSpec(cluster)
        resolved = tf.distribute.cluster_resolver.SimpleClusterResolver(spec, task_type=task_type, task_id=task_id)
        return type("Strategy", (), {"cluster_resolver": resolved})()

    workers = {"worker": ["127.0.0.1:1", "127.0.0.1:2"]}
    assert is_chief(resolver(workers, "worker", 0)) and not is_chief(resolver(workers, "worker", 1))
    with_chief = {"chief": ["127.0.0.1:3"], **workers}
    assert is_chief(resolver(with_chief, "chief", 0)) and not is_chief(resolver(with_chief, "worker", 0))


# --- Precision and XLA ----------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["bfloat16", "float16"])
def test_mixed_precision_keeps_loss_output_and_sampler_float32(mode):
    keras.utils.set_random_seed(0)
    initial = tiny_unet().get_weights()
    reference = fresh_model(initial)
    reference_loss = reference.fit(IMAGES, batch_size=16, epochs=1, shuffle=False, verbose=0).history["loss"]
    try:
        set_precision(mode)
        model = fresh_model(initial)
        assert model.denoiser.get_layer("eps").compute_dtype == "float32"
        assert {layer.compute_dtype for layer in model.denoiser.layers} >= {mode}
        assert all(w.dtype == "float32" for w in model.denoiser.weights)
        assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer) == (mode == "float16")
        loss = model.fit(IMAGES, batch_size=16, epochs=1, shuffle=False, verbose=0).history["loss"]
        eps = model.denoiser([IMAGES[:2], np.array([3, 50], np.int32)])
        images = model.sample(2, seed=1, sampler="ddim", steps=3)
    finally:
        set_precision("off")
    assert eps.dtype == "float32" and images.dtype == np.float32
    assert np.all(np.isfinite(loss))
    # Same weights, same noise: the 16-bit loss is the float32 loss up to rounding.
    np.testing.assert_allclose(loss, reference_loss, rtol=0.05)
    with pytest.raises(KddpmError, match="Unknown mixed precision"):
        set_precision("int8")


def test_auto_precision_is_bfloat16_only_where_the_hardware_computes_it(monkeypatch):
    import kddpm.training as training

    try:
        monkeypatch.setattr(training, "_cpu_flags", lambda: {"avx2", "avx512f", "avx512_bf16"})
        line = set_precision("auto")
        assert keras.mixed_precision.global_policy().name == "mixed_bfloat16"
        assert line == "mixed_bfloat16 (auto: the CPU has avx512_bf16)"
        monkeypatch.setattr(training, "_cpu_flags", lambda: {"avx2", "amx_bf16"})
        assert set_precision("auto").startswith("mixed_bfloat16")
        monkeypatch.setattr(training, "_cpu_flags", lambda: {"avx2", "avx512f"})
        assert set_precision("auto") == "float32 (auto: the CPU has no avx512_bf16 or amx_bf16)"
        assert keras.mixed_precision.global_policy().name == "float32"
        # This machine's own answer agrees with its /proc/cpuinfo.
        monkeypatch.undo()
        native, _ = training.native_bfloat16()
        cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
        assert native == ("avx512_bf16" in cpuinfo or "amx_bf16" in cpuinfo)
    finally:
        set_precision("off")


def test_xla_train_step_is_l_simple_on_the_plain_graphs_draws():
    """t and eps for a seed are the same under XLA as in the plain graph (the noise is built from
    Philox integers, on which both agree), so the XLA step is L_simple on the plain draws."""
    model = fresh_model(jit_compile=True)
    rng = np.random.default_rng(0)
    model.denoiser.set_weights([rng.normal(0, 0.1, w.shape).astype(np.float32) for w in model.denoiser.get_weights()])
    x0 = IMAGES[:16]
    plain_t, noise = (v.numpy() for v in tf.function(model._draw_t_and_noise)(tf.constant(x0), model._training_key()))
    xla_t, xla_noise = (
        v.numpy()
        for v in tf.function(model._draw_t_and_noise, jit_compile=True)(tf.constant(x0), model._training_key())
    )
    np.testing.assert_array_equal(plain_t, xla_t)
    np.testing.assert_allclose(noise, xla_noise, rtol=1e-5, atol=1e-6)
    t = plain_t
    abar = model.schedule.alphas_cumprod[t][:, None, None, None]
    x_t = (np.sqrt(abar) * x0 + np.sqrt(1 - abar) * noise).astype(np.float32)
    expected = np.mean((noise - model.denoiser([x_t, t]).numpy()) ** 2)
    before = model.denoiser.get_weights()
    logs = model.train_on_batch(x0, return_dict=True)
    assert logs["loss"] == pytest.approx(expected, rel=1e-4)
    model.train_on_batch(x0)  # the warm-up's first step has a zero learning rate
    assert not np.allclose(model.denoiser.get_weights()[0], before[0])


# --- Backups --------------------------------------------------------------------------------


def file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_backup_resumes_exactly_with_dropout(tmp_path):
    """Two epochs, a fresh process-like restart from the backup, two more: the same as four."""
    keras.utils.set_random_seed(0)
    initial = tiny_unet(dropout=0.3).get_weights()
    data = tf.data.Dataset.from_tensor_slices(IMAGES).batch(8).repeat()

    straight = fresh_model(initial, dropout=0.3)
    straight.fit(data, epochs=4, steps_per_epoch=3, verbose=0)

    first = fresh_model(initial, dropout=0.3)
    first.fit(data, epochs=2, steps_per_epoch=3, callbacks=[TrainingBackup(tmp_path)], verbose=0)
    state = read_backup_state(tmp_path)
    assert state["epoch"] == 2 and state["step"] == 6 and state["seed_states"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest.weights.h5"]  # no partial left behind

    resumed = fresh_model(initial, dropout=0.3)
    history = resumed.fit(
        data.skip(state["step"]), epochs=4, steps_per_epoch=3, callbacks=[TrainingBackup(tmp_path)], verbose=0
    )
    assert len(history.history["loss"]) == 2  # epochs 3 and 4 only
    assert int(resumed.optimizer.iterations.numpy()) == 12
    for a, b in zip(straight.weights, resumed.weights):
        np.testing.assert_allclose(b.numpy(), a.numpy(), rtol=1e-6, atol=1e-7, err_msg=a.path)


def test_float16_resume_counts_data_batches_when_the_loss_scaler_skips_updates(tmp_path):
    """A loss scale far too high makes the first updates overflow and be skipped, so the optimizer's
    step falls behind the batches trained on. Resuming must continue the data and the noise at the
    batches count, or the run after the restart differs from one that never stopped."""
    set_precision("float16")
    try:
        initial = tiny_unet(seed=0).get_weights()
        data = tf.data.Dataset.from_tensor_slices(IMAGES).batch(8).repeat()

        def model():
            network = tiny_unet(seed=0)
            network.set_weights(initial)
            diffusion = DiffusionModel(network, NoiseSchedule.linear(100), ema_decay=0.9, seed=3)
            scaled = keras.optimizers.LossScaleOptimizer(keras.optimizers.Adam(1e-3), initial_scale=2.0**24)
            diffusion.compile(optimizer=scaled)
            return diffusion

        straight = model()
        straight.fit(data, epochs=4, steps_per_epoch=3, verbose=0)
        first = model()
        first.fit(data, epochs=2, steps_per_epoch=3, callbacks=[TrainingBackup(tmp_path)], verbose=0)
        state = read_backup_state(tmp_path)
        skipped = 6 - int(first.optimizer.iterations.numpy())
        assert state["step"] == 6 and skipped > 0, "the loss scaler skipped no update: the test means nothing"
        resumed = model()
        resumed.fit(
            data.skip(state["step"]), epochs=4, steps_per_epoch=3, callbacks=[TrainingBackup(tmp_path)], verbose=0
        )
        assert int(resumed.batches_seen.numpy()) == 12
        assert int(resumed.optimizer.iterations.numpy()) == int(straight.optimizer.iterations.numpy()) < 12
        assert not np.allclose(straight.denoiser.get_weights()[0], initial[0])
        # float16 arithmetic differs between the runs by rounding (~1e-5); a misplaced data
        # stream or noise key would move the weights by far more.
        for a, b in zip(straight.weights, resumed.weights):
            np.testing.assert_allclose(b.numpy(), a.numpy(), rtol=2e-3, atol=3e-5, err_msg=a.path)
    finally:
        set_precision("off")


def test_a_damaged_backup_is_named_and_left_alone(tmp_path):
    model = fresh_model()
    model.fit(IMAGES, batch_size=16, epochs=1, callbacks=[TrainingBackup(tmp_path)], verbose=0)
    path = tmp_path / "latest.weights.h5"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    digest = file_digest(path)
    with pytest.raises(KddpmError, match=f"Cannot resume from the backup {path}.*Nothing was overwritten"):
        read_backup_state(tmp_path)
    with pytest.raises(KddpmError, match="Cannot resume from the backup"):
        fresh_model().fit(IMAGES, batch_size=16, epochs=2, callbacks=[TrainingBackup(tmp_path)], verbose=0)
    assert file_digest(path) == digest


def test_nan_loss_stops_before_any_callback_saves(tmp_path):
    model = fresh_model()
    model.fit(IMAGES, batch_size=16, epochs=1, callbacks=[TrainingBackup(tmp_path)], verbose=0)
    digest = file_digest(tmp_path / "latest.weights.h5")

    class Poison(keras.callbacks.Callback):
        def on_train_begin(self, logs=None):  # after the backup's restore
            kernel = self.model.denoiser.trainable_weights[0]
            kernel.assign(np.full(kernel.shape, np.nan, np.float32))

    callbacks = [StopOnNonFiniteLoss(), TrainingBackup(tmp_path), Poison()]
    with pytest.raises(KddpmError, match=r"The loss became nan at step 3"):
        model.fit(IMAGES, batch_size=16, epochs=3, verbose=0, callbacks=callbacks)
    assert file_digest(tmp_path / "latest.weights.h5") == digest


# --- The command line: SIGKILL and resume, NaN ----------------------------------------------

ENV = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
TRAIN = ["train", "--preset", "tiny", "--steps", "120", "--steps-per-epoch", "10", "--grid-every", "100", "--seed", "4"]


def kddpm(*args, timeout=600):
    command = [sys.executable, "-m", "kddpm.cli", *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=ENV)


def final_weights(run: Path):
    model = keras.models.load_model(run / "model.keras")
    return model.denoiser.get_weights() + model.ema_denoiser.get_weights()


def start_and_kill_after_first_backup(run: Path, *extra) -> int:
    """Starts the training command, SIGKILLs it in the epoch after its first backup; returns the backup's step."""
    backup = run / "backup" / "latest.weights.h5"
    process = subprocess.Popen(
        [sys.executable, "-m", "kddpm.cli", *TRAIN, *extra, "--out", str(run)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=ENV,
    )
    try:
        deadline = time.time() + 300
        while not backup.exists() and process.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        time.sleep(0.15)  # into the next epoch
        assert process.poll() is None, "the run ended before it could be killed"
        os.kill(process.pid, signal.SIGKILL)
        process.wait(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert not (run / "model.keras").exists()
    return read_backup_state(run / "backup")["step"]


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["off", "float16"])
def test_sigkill_mid_epoch_then_the_same_command_resumes_and_matches(tmp_path, precision):
    """The user's command, killed and rerun, in float32 and in float16 (whose loss scaler may skip
    updates; the in-process test below forces skips)."""
    # float16 is emulated on a CPU (about 3 s a step of the tiny preset): 30 steps, three epochs.
    total = 120 if precision == "off" else 30
    extra = ["--mixed-precision", precision, "--steps", str(total)]  # the last --steps wins
    straight = kddpm(*TRAIN, *extra, "--out", tmp_path / "straight")
    assert straight.returncode == 0, straight.stderr[-2000:]
    run = tmp_path / "killed"
    saved_step = start_and_kill_after_first_backup(run, *extra)
    assert 10 <= saved_step < total and saved_step % 10 == 0

    resumed = kddpm(*TRAIN, *extra, "--out", run)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"Resuming from step {saved_step}" in resumed.stdout
    assert f"Trained {total - saved_step} steps" in resumed.stdout
    assert not (run / "backup").exists()  # the finished model supersedes it
    for a, b in zip(final_weights(tmp_path / "straight"), final_weights(run)):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6)
    assert int(keras.models.load_model(run / "model.keras").batches_seen.numpy()) == total


@pytest.mark.slow
def test_resuming_with_a_changed_setting_is_refused_by_name(tmp_path):
    run = tmp_path / "run"
    start_and_kill_after_first_backup(run)
    backup = run / "backup" / "latest.weights.h5"
    digest = file_digest(backup)
    for flag, value, stored in (("--batch-size", "8", "16"), ("--seed", "5", "4"), ("--steps-per-epoch", "20", "10")):
        refused = kddpm(*TRAIN, flag, value, "--out", run)  # argparse: the last --seed wins
        assert refused.returncode == 2, refused.stderr[-2000:]
        line = refused.stderr.strip()
        assert len(line.splitlines()) == 1 and flag in line and f"= {stored}" in line and f"gives {value}" in line
        assert file_digest(backup) == digest and not (run / "model.keras").exists()


@pytest.mark.slow
def test_cli_nan_keeps_the_backup_and_writes_no_model(tmp_path):
    run = tmp_path / "run"
    saved_step = start_and_kill_after_first_backup(run)
    digest = file_digest(run / "backup" / "latest.weights.h5")
    # Resumed with a learning rate this large, the weights overflow within a few steps.
    diverged = kddpm(*TRAIN, "--lr", "1e30", "--out", run)
    assert diverged.returncode == 2, diverged.stderr[-2000:]
    message = diverged.stderr.strip().splitlines()[-1]
    assert message.startswith("error: The loss became") and f"the backup of step {saved_step} is kept" in message
    assert "model.keras was not written" in message and "Traceback" not in diverged.stderr
    assert not (run / "model.keras").exists()
    assert file_digest(run / "backup" / "latest.weights.h5") == digest


@pytest.mark.slow
def test_cli_refuses_a_damaged_backup_without_touching_it(tmp_path):
    run = tmp_path / "run"
    start_and_kill_after_first_backup(run)
    backup = run / "backup" / "latest.weights.h5"
    backup.write_bytes(backup.read_bytes()[:1000])
    digest = file_digest(backup)
    refused = kddpm(*TRAIN, "--out", run)
    assert refused.returncode == 2
    assert f"Cannot resume from the backup {backup}" in refused.stderr and "Traceback" not in refused.stderr
    assert file_digest(backup) == digest and not (run / "model.keras").exists()


@pytest.mark.slow
def test_cli_multiworker_on_loopback_only_the_chief_writes(tmp_path):
    run = tmp_path / "run"
    command = [sys.executable, "-m", "kddpm.cli", *TRAIN[:4], "20", *TRAIN[5:], "--strategy", "multiworker"]
    envs = []
    for index in range(2):
        (tmp_path / f"tmp{index}").mkdir()
        envs.append({**ENV, "TMPDIR": str(tmp_path / f"tmp{index}")})
    outputs = run_loopback_workers([[*command, "--out", str(run)]] * 2, envs)
    for returncode, _, stderr in outputs:
        assert returncode == 0, stderr[-3000:]
    chief_out, worker_out = outputs[0][1], outputs[1][1]
    assert "2 replicas" in chief_out
    assert chief_out.strip().splitlines()[-1].startswith(f"Model: {run / 'model.keras'}")
    assert worker_out.strip().splitlines()[-1] == "Worker finished; the chief wrote the run."
    assert (run / "model.keras").is_file() and (run / "samples" / "final.png").is_file()
    assert any((run / "logs").rglob("events.out.tfevents*"))
    assert not list((tmp_path / "tmp1").iterdir())  # the worker removed what it wrote


def test_create_model_with_a_seed_is_reproducible_without_set_random_seed():
    from kddpm.presets import PRESETS
    from kddpm.training import create_model

    def run(seed):
        keras.utils.set_random_seed(seed + 99)  # the global generator must not matter
        model = create_model(dataclasses.replace(PRESETS["tiny"], dropout=0.2), seed=seed)
        model.compile(optimizer=make_optimizer(1e-3))
        data = np.random.default_rng(0).uniform(-1, 1, (8, 28, 28, 1)).astype(np.float32)
        model.fit(data, batch_size=4, epochs=1, verbose=0)
        return model.get_weights()

    first, second, other = run(3), run(3), run(4)
    for a, b in zip(first, second):
        np.testing.assert_array_equal(a, b)
    assert any(not np.array_equal(a, b) for a, b in zip(first, other))
