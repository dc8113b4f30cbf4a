"""The kddpm command line, run as a user runs it."""

import os
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest

ENV = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}


def kddpm(*args, cwd=None):
    return subprocess.run(
        [sys.executable, "-m", "kddpm.cli", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=cwd,
        env=ENV,
    )


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "run"
    done = kddpm(
        "train", "--preset", "tiny", "--steps", "4", "--steps-per-epoch", "2", "--grid-every", "1", "--out", out
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return out, done


@pytest.mark.slow
def test_train_writes_model_checkpoints_grids_and_logs_quietly(run_dir):
    out, done = run_dir
    for path in (
        "model.keras",
        "checkpoints/last.keras",
        "samples/epoch_0001.png",
        "samples/epoch_0002.png",
        "samples/final.png",
    ):
        assert (out / path).is_file(), path
    assert any((out / "logs").rglob("events.out.tfevents*"))
    last_line = done.stdout.strip().splitlines()[-1]
    assert str(out / "model.keras") in last_line and str(out / "samples" / "final.png") in last_line
    assert "final loss" in done.stdout and "images/s" in done.stdout
    # No TensorFlow log walls: nothing from the C++ logger, no Python warnings.
    assert "I0000" not in done.stderr and "WARNING" not in done.stderr and "Warning" not in done.stderr
    grid = keras.utils.load_img(out / "samples" / "final.png", color_mode="grayscale")
    assert grid.size == (8 * 28, 8 * 28)


@pytest.mark.slow
def test_sample_command_writes_a_deterministic_grid(run_dir, tmp_path):
    out, _ = run_dir
    first, second = tmp_path / "a.png", tmp_path / "b.png"
    for target in (first, second):
        done = kddpm(
            "sample", "--model", out, "--num", 6, "--sampler", "ddim", "--steps", 5, "--seed", 3, "--out", target
        )
        assert done.returncode == 0, done.stderr[-3000:]
        assert done.stdout.strip().splitlines()[-1] == f"Samples: {target}"
    a = np.asarray(keras.utils.load_img(first, color_mode="grayscale"))
    b = np.asarray(keras.utils.load_img(second, color_mode="grayscale"))
    assert a.shape == (2 * 28, 3 * 28)
    np.testing.assert_array_equal(a, b)


@pytest.mark.slow
def test_an_existing_run_is_not_overwritten(run_dir):
    out, _ = run_dir
    before = (out / "model.keras").read_bytes()
    done = kddpm("train", "--preset", "tiny", "--steps", "2", "--out", out)
    assert done.returncode == 2 and "--overwrite" in done.stderr
    assert (out / "model.keras").read_bytes() == before


def test_missing_and_corrupt_models_give_one_line_errors(tmp_path):
    done = kddpm("sample", "--model", tmp_path / "nothing", "--out", tmp_path / "x.png")
    assert done.returncode == 2
    assert done.stderr.strip().startswith("error: No model at") and "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1

    corrupt = tmp_path / "model.keras"
    corrupt.write_bytes(b"PK\x03\x04 this is not a whole zip archive")
    done = kddpm("sample", "--model", corrupt, "--out", tmp_path / "x.png")
    assert done.returncode == 2 and str(corrupt) in done.stderr and "corrupt" in done.stderr
    assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1
    assert corrupt.read_bytes().startswith(b"PK")  # left as it was
    # --verbose brings the traceback back.
    done = kddpm("sample", "--model", corrupt, "--out", tmp_path / "x.png", "--verbose")
    assert "Traceback" in done.stderr


def test_bad_arguments_and_missing_data(tmp_path):
    done = kddpm("train", "--preset", "tiny", "--data", tmp_path / "no-such-folder", "--out", tmp_path / "r")
    assert done.returncode == 2 and "Unknown dataset" in done.stderr and "Traceback" not in done.stderr
    done = kddpm("train", "--preset", "tiny", "--steps", "0", "--out", tmp_path / "r")
    assert done.returncode == 2 and "--steps must be a positive integer" in done.stderr
    assert not (Path(tmp_path) / "r" / "model.keras").exists()


def test_train_help_lists_the_presets():
    done = kddpm("train", "--help")
    for name in ("tiny", "demo", "small", "cifar10"):
        assert name in done.stdout


@pytest.mark.slow
def test_export_command_writes_both_formats_quietly(run_dir, tmp_path):
    out, _ = run_dir
    done = kddpm("export", "--model", out, "--out", tmp_path / "exported")
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "exported" / "kddpm" / "1" / "saved_model.pb").is_file()
    assert (tmp_path / "exported" / "kddpm.onnx").is_file()
    assert "max |SavedModel - Keras|" in done.stdout and "max |ONNX Runtime - Keras|" in done.stdout
    last_line = done.stdout.strip().splitlines()[-1]
    assert (
        str(tmp_path / "exported" / "kddpm" / "1") in last_line
        and str(tmp_path / "exported" / "kddpm.onnx") in last_line
    )
    assert "I0000" not in done.stderr and "WARNING" not in done.stderr and "Traceback" not in done.stderr
    again = kddpm("export", "--model", out, "--format", "onnx", "--out", tmp_path / "exported")
    assert again.returncode == 2 and again.stderr.startswith("error: ") and "--overwrite" in again.stderr
