"""kddpm evaluate, the training callback and the trajectory figure, as a user runs them."""

import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

from kddpm.callbacks import EvaluateEvery
from kddpm.defaults import DEFAULT_GUIDANCE
from kddpm.evaluation import _label_counts, evaluate, parse_metrics
from kddpm.presets import PRESETS
from kddpm.training import create_model, make_optimizer


def kddpm(*args, env=None):
    return subprocess.run(
        [sys.executable, "-m", "kddpm.cli", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=900,
        env={**os.environ, **(env or {})},
    )


@pytest.fixture
def tiny_model_file(tiny_run):
    return tiny_run[0] / "model.keras"


@pytest.fixture
def tiny_conditional_file(tiny_conditional_run):
    return tiny_conditional_run[0] / "model.keras"


@pytest.mark.slow
def test_evaluate_command_writes_every_metric_and_how_to_reproduce_it(tiny_model_file, tmp_path):
    out = tmp_path / "scores.json"
    done = kddpm(
        "evaluate", "--model", tiny_model_file, "--num-samples", 60, "--steps", 3, "--bpd-images", 6,
        "--variance", "both", "--batch-size", 30, "--out", out, env={"KDDPM_CACHE": str(tmp_path / "cache")},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1].startswith(f"Evaluation: {out}")
    for label in ("FID", "KID", "precision / recall", "bits/dim (beta_tilde)", "bits/dim (beta)"):
        assert label in done.stdout
    assert "covariance singular" in done.stdout  # 60 samples < 128 feature dimensions
    record = json.loads(out.read_text())
    metrics, settings = record["metrics"], record["settings"]
    assert metrics["fid"] > 0 and 0 <= metrics["pr"]["precision"] <= 1 and metrics["kid"]["std"] >= 0
    for parts in metrics["bpd"].values():
        assert parts["total"] == pytest.approx(parts["prior"] + parts["kl"] + parts["decoder"])
    assert settings["extractor"].startswith("fashion_mnist@") and settings["reference"] == "fashion_mnist:test"
    assert settings["num_samples"] == 60 and settings["steps"] == 3 and settings["seed"] == 0
    assert record["kddpm_version"] and record["seconds"] > 0 and record["model"] == str(tiny_model_file)
    assert "I0000" not in done.stderr and "Traceback" not in done.stderr
    # The same command gives the same numbers (the reference now from the cache).
    again = kddpm(
        "evaluate", "--model", tiny_model_file, "--metrics", "fid", "--num-samples", 60, "--steps", 3,
        "--batch-size", 20, "--out", tmp_path / "again.json", env={"KDDPM_CACHE": str(tmp_path / "cache")},
    )  # fmt: skip
    assert again.returncode == 0 and "from the cache" in again.stdout
    assert json.loads((tmp_path / "again.json").read_text())["metrics"]["fid"] == pytest.approx(
        metrics["fid"], rel=1e-4
    )


def test_evaluate_refuses_bad_input_in_one_line(tiny_model_file, tmp_path):
    cases = (
        (["--metrics", "fid,is"], "Unknown metrics ['is']"),
        (["--num-samples", "0"], "--num-samples must be a positive integer"),
        (["--reference", str(tmp_path / "nothing.npz")], "No statistics file"),
        (["--extractor", "vgg"], "Unknown feature extractor"),
        (["--out", str(tmp_path / "x.txt")], "must end in .json"),
    )
    for extra, message in cases:
        done = kddpm("evaluate", "--model", tiny_model_file, *extra)
        assert done.returncode == 2, done.stderr[-2000:]
        assert message in done.stderr and len(done.stderr.strip().splitlines()) == 1
    before = tiny_model_file.read_bytes()
    folder = tmp_path / "one-image"
    folder.mkdir()
    keras.utils.save_img(folder / "a.png", np.zeros((28, 28, 1), np.uint8), scale=False)
    done = kddpm("evaluate", "--model", tiny_model_file, "--metrics", "fid", "--reference", folder, "--num-samples", 4)
    assert done.returncode == 2 and "needs at least 2" in done.stderr
    assert tiny_model_file.read_bytes() == before  # evaluation never writes into the model


@pytest.mark.slow
def test_a_conditional_model_is_evaluated_with_labels_through_the_command_line(tiny_conditional_file, tmp_path):
    out = tmp_path / "conditional.json"
    env = {"KDDPM_CACHE": str(tmp_path / "cache")}
    done = kddpm(
        "evaluate", "--model", tiny_conditional_file, "--num-samples", 40, "--steps", 3, "--bpd-images", 4,
        "--batch-size", 20, "--out", out, env=env,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    for label in ("FID", "KID", "precision / recall", "bits/dim (beta_tilde)"):
        assert label in done.stdout
    assert f"labels reference, guidance {DEFAULT_GUIDANCE:g}" in done.stdout
    record = json.loads(out.read_text())
    settings = record["settings"]
    # Fashion-MNIST's test split has 1,000 images of each class: 40 samples are 4 a class.
    assert settings["labels"] == "reference" and settings["label_counts"] == [4] * 10
    assert settings["guidance_scale"] == DEFAULT_GUIDANCE and settings["bpd_labels"] == "true"
    assert set(record["metrics"]) == {"fid", "kid", "pr", "bpd"}
    # The null label and the null bound are one flag each; they give other numbers.
    null = kddpm(
        "evaluate", "--model", tiny_conditional_file, "--num-samples", 40, "--steps", 3, "--bpd-images", 4,
        "--batch-size", 20, "--labels", "null", "--bpd-labels", "null", "--out", tmp_path / "null.json", env=env,
    )  # fmt: skip
    assert null.returncode == 0, null.stderr[-3000:]
    other = json.loads((tmp_path / "null.json").read_text())
    assert other["settings"]["labels"] == "null" and other["settings"]["guidance_scale"] == 0.0
    assert other["metrics"]["fid"] != record["metrics"]["fid"]
    assert other["metrics"]["bpd"]["beta_tilde"]["total"] != record["metrics"]["bpd"]["beta_tilde"]["total"]
    refused = kddpm("evaluate", "--model", tiny_conditional_file, "--labels", "null", "--guidance", "2", env=env)
    assert refused.returncode == 2 and "take no guidance" in refused.stderr


def test_samples_are_split_in_the_reference_class_proportions():
    class Model:
        num_classes = 3

    counts, mode = _label_counts(Model, "reference", np.array([500, 300, 200]), 7, print)
    # 3.5, 2.1, 1.4: floors 3, 2, 1, the one left to the largest remainder (class 0).
    assert mode == "reference" and counts.tolist() == [4, 2, 1]
    counts, mode = _label_counts(Model, "reference", None, 7, lambda line: None)
    assert mode == "uniform" and counts.tolist() == [3, 2, 2]
    assert _label_counts(Model, "uniform", np.array([9, 0, 1]), 6, print)[0].tolist() == [2, 2, 2]
    with pytest.raises(Exception, match="--labels uniform"):
        _label_counts(Model, "reference", np.array([1, 1, 1, 1]), 6, print)


def test_metrics_names_are_checked():
    assert parse_metrics("fid, kid,fid") == ("fid", "kid")
    with pytest.raises(Exception, match="Unknown metrics"):
        parse_metrics("")


@pytest.mark.slow
def test_the_training_callback_logs_fid_and_kid_to_tensorboard(tmp_path, monkeypatch):
    monkeypatch.setenv("KDDPM_CACHE", str(tmp_path / "cache"))
    model = create_model(PRESETS["tiny"], seed=0)
    model.compile(optimizer=make_optimizer(1e-3))
    lines = []
    callbacks = [
        EvaluateEvery(every=2, num_samples=30, steps=3, print_fn=lines.append),
        keras.callbacks.TensorBoard(tmp_path / "logs"),
    ]
    data = np.random.default_rng(0).uniform(-1, 1, (16, 28, 28, 1)).astype(np.float32)
    history = model.fit(data, batch_size=8, epochs=2, callbacks=callbacks, verbose=0)
    assert len(lines) == 1 and lines[0].startswith("Evaluation after epoch 2: FID")
    fid = float(lines[0].split("FID ")[1].split(",")[0])
    assert history.history["fid"] == [pytest.approx(fid, abs=0.01)]  # epoch 2 only
    tags = set()
    for event_file in (tmp_path / "logs").rglob("events.out.tfevents*"):
        for event in tf.compat.v1.train.summary_iterator(str(event_file)):
            tags.update(value.tag for value in event.summary.value)
    assert {"epoch_fid", "epoch_kid"} <= tags
    # The callback's FID is evaluate()'s with the same settings.
    direct = evaluate(model, ("fid",), num_samples=30, steps=3, clip_x0=True)["metrics"]["fid"]
    assert fid == pytest.approx(direct, abs=0.01)


@pytest.mark.slow
def test_trajectory_figure(tiny_model_file, tmp_path):
    out = tmp_path / "trajectory.png"
    done = kddpm("sample", "--model", tiny_model_file, "--trajectory", "--num", 2, "--out", out, "--grid-scale", 1)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == f"Trajectory: {out}"
    grid = np.asarray(keras.utils.load_img(out, color_mode="grayscale"))
    # 2 images x (x_t, predicted x0) rows, 10 snapshots, 28-px tiles with 2-px gaps.
    assert grid.shape == (4 * 28 + 3 * 2, 10 * 28 + 9 * 2)
    model = keras.models.load_model(tiny_model_file)
    shots = model.trajectory(2, seed=0)  # the default sampler, as the command's figure
    assert shots[0][0] == 999 and shots[-1][0] == -1 and len(shots) == 10
    # The last snapshot is the sample itself, the same as sample() gives for the seed.
    np.testing.assert_allclose(np.clip(shots[-1][1], -1, 1), model.sample(2, seed=0), atol=1e-4)
    ddpm = model.trajectory(2, seed=0, sampler="ddpm")
    np.testing.assert_allclose(np.clip(ddpm[-1][1], -1, 1), model.sample(2, seed=0, sampler="ddpm"), atol=1e-4)


@pytest.mark.slow
def test_evaluate_with_dpm_solver(tiny_model_file, tmp_path):
    out = tmp_path / "dpm.json"
    done = kddpm(
        "evaluate", "--model", tiny_model_file, "--metrics", "fid", "--num-samples", 30, "--sampler", "dpm++2m",
        "--out", out, env={"KDDPM_CACHE": str(tmp_path / "cache")},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    settings = json.loads(out.read_text())["settings"]
    assert settings["sampler"] == "dpm++2m" and settings["steps"] == 20  # DPM-Solver++'s default
    assert "Sampling 30 images (dpm++2m, 20 steps)" in done.stdout
