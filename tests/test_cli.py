"""The kddpm command line, run as a user runs it."""

from pathlib import Path

import keras
import numpy as np
import pytest
from conftest import kddpm_command as kddpm


@pytest.fixture
def run_dir(tiny_run):
    return tiny_run


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
    # The first line says the precision; every epoch says how long the whole run will take.
    assert done.stdout.splitlines()[0] == "Precision: float32 (--mixed-precision off)"
    assert "Time: epoch 1/2 took" in done.stdout and "Time: epoch 2/2 took" in done.stdout
    assert "in all," in done.stdout and "left" in done.stdout
    # No TensorFlow log walls: nothing from the C++ logger, no Python warnings.
    assert "I0000" not in done.stderr and "WARNING" not in done.stderr and "Warning" not in done.stderr
    # 64 images of 28x28 enlarged 3x (the smallest scale giving >= 512 px) with 2-px gaps.
    grid = keras.utils.load_img(out / "samples" / "final.png", color_mode="grayscale")
    assert grid.size == (8 * 84 + 7 * 2, 8 * 84 + 7 * 2)


def summaries(folder):
    """{tag: [(step, value)]} of every event file under folder (images as uint8 arrays, scalars as floats)."""
    import tensorflow as tf

    found = {}
    for path in sorted(folder.rglob("events.out.tfevents*")):
        for event in tf.compat.v1.train.summary_iterator(str(path)):
            for value in event.summary.value:
                array = tf.make_ndarray(value.tensor)
                if value.metadata.plugin_data.plugin_name == "images":  # [width, height, PNG...]
                    array = tf.io.decode_png(array[2]).numpy()
                found.setdefault(value.tag, []).append((event.step, array))
    return found


@pytest.mark.slow
def test_tensorboard_gets_the_grids_the_trajectory_and_the_loss_per_quarter(run_dir):
    out, _ = run_dir
    images = summaries(out / "logs" / "images")
    # The grid of every epoch (--grid-every 1), the same pixels as its PNG, at step = epoch.
    assert [step for step, _ in images["samples"]] == [1, 2]
    for step, grid in images["samples"]:
        png = keras.utils.img_to_array(
            keras.utils.load_img(out / "samples" / f"epoch_{step:04d}.png", color_mode="grayscale")
        )
        np.testing.assert_array_equal(grid, png.astype(np.uint8))
    # The trajectory once, at the end: 4 images x (x_t, x0) rows, 10 snapshots, 28x28 tiles.
    [(step, trajectory)] = images["trajectory"]
    height, width, channels = trajectory.shape
    assert step == 2 and channels == 1 and width >= 512 and 0.7 < height / width < 0.9  # 8 rows, 10 columns
    scalars = {tag: [float(v) for _, v in values] for tag, values in summaries(out / "logs" / "train").items()}
    quarters = np.array([scalars[f"epoch_loss_q{q}"] for q in range(4)])
    assert quarters.shape == (4, 2) and len(scalars["epoch_grad_norm"]) == 2 and min(scalars["epoch_grad_norm"]) > 0
    # The epoch loss is a mean over the examples, so it lies between the quarters' means.
    loss = np.array(scalars["epoch_loss"])
    assert (quarters.min(axis=0) <= loss + 1e-6).all() and (loss <= quarters.max(axis=0) + 1e-6).all()
    assert len(scalars["epoch_learning_rate"]) == 2


@pytest.mark.slow
def test_sample_command_writes_a_deterministic_grid(run_dir, tmp_path):
    out, _ = run_dir
    first, second, raw = tmp_path / "a.png", tmp_path / "b.png", tmp_path / "raw.png"
    for target, scale in ((first, []), (second, []), (raw, ["--grid-scale", 1])):
        done = kddpm(
            "sample",
            "--model",
            out,
            "--num",
            6,
            "--sampler",
            "ddim",
            "--steps",
            5,
            "--seed",
            3,
            "--out",
            target,
            *scale,
        )
        assert done.returncode == 0, done.stderr[-3000:]
        assert done.stdout.strip().splitlines()[-1] == f"Samples: {target}"
    a = np.asarray(keras.utils.load_img(first, color_mode="grayscale"))
    b = np.asarray(keras.utils.load_img(second, color_mode="grayscale"))
    # 2 rows of 3 tiles enlarged 7x (3 * 28 * 7 >= 512), 2-px gaps; --grid-scale 1 keeps raw pixels.
    assert a.shape == (2 * 196 + 2, 3 * 196 + 2 * 2)
    np.testing.assert_array_equal(a, b)
    c = np.asarray(keras.utils.load_img(raw, color_mode="grayscale"))
    assert c.shape == (2 * 28 + 2, 3 * 28 + 2 * 2)
    np.testing.assert_array_equal(c[:28, :28], a[:196:7, :196:7])  # the same image, not enlarged


def test_zero_or_negative_steps_are_refused(tmp_path):
    for steps in ("0", "-3"):
        done = kddpm("sample", "--model", tmp_path / "m.keras", "--sampler", "ddim", "--steps", steps)
        assert done.returncode == 2 and "--steps must be a positive integer" in done.stderr
    done = kddpm("sample", "--model", tmp_path / "m.keras", "--grid-scale", "0")
    assert done.returncode == 2 and "--grid-scale must be a positive integer" in done.stderr


@pytest.mark.slow
def test_a_folder_with_a_truncated_image_names_the_file(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    for index in range(6):
        keras.utils.save_img(folder / f"{index}.png", np.full((28, 28, 1), 40 * index, np.uint8), scale=False)
    whole = (folder / "0.png").read_bytes()
    (folder / "broken.png").write_bytes(whole[: len(whole) // 2])
    done = kddpm("train", "--preset", "tiny", "--data", folder, "--steps", 1, "--out", tmp_path / "r")
    assert done.returncode == 2, done.stderr[-2000:]
    assert str(folder / "broken.png") in done.stderr and "truncated or corrupt" in done.stderr
    assert "--skip-bad-images" in done.stderr and len(done.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "r" / "model.keras").exists()
    done = kddpm(
        "train",
        "--preset",
        "tiny",
        "--data",
        folder,
        "--steps",
        1,
        "--batch-size",
        4,
        "--skip-bad-images",
        "--out",
        tmp_path / "r",
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "6 images in" in done.stdout and "1 undecodable file skipped" in done.stdout


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
    assert done.returncode == 2 and str(corrupt) in done.stderr and "truncated or not a zip archive" in done.stderr
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


# --- Class-conditional runs -----------------------------------------------------------------


@pytest.fixture
def conditional_run(tiny_conditional_run):
    return tiny_conditional_run


@pytest.mark.slow
def test_conditional_training_keeps_the_class_names(conditional_run):
    out, done = conditional_run
    assert "Classes: 10 (T-shirt/top, Trouser, Pullover, Dress, Coat, Sandal, Shirt, Sneaker, Bag, Ankle boot)" in (
        done.stdout
    )
    model = keras.models.load_model(out / "model.keras")
    assert model.num_classes == 10 and model.class_names[7] == "Sneaker" and model.label_dropout == 0.2
    # The final grid has one row per class (6 images each), with a caption strip on the left.
    grid = np.asarray(keras.utils.load_img(out / "samples" / "final.png", color_mode="grayscale"))
    assert grid.shape[0] == 10 * (28 * 4 + 2) - 2 and grid.shape[1] > 6 * (28 * 4 + 2)


@pytest.mark.slow
def test_sample_by_class_name_per_class_and_guidance(conditional_run, tmp_path):
    out, _ = conditional_run
    common = ("--model", out, "--sampler", "ddim", "--steps", 3, "--seed", 1)
    one = kddpm("sample", *common, "--class", "sneaker", "--num", 4, "--guidance", 0, "--out", tmp_path / "a.png")
    same = kddpm("sample", *common, "--class", "7", "--num", 4, "--guidance", 0, "--out", tmp_path / "b.png")
    for done in (one, same):
        assert done.returncode == 0, done.stderr[-2000:]
    assert "guidance 0" in one.stdout
    a, b = (np.asarray(keras.utils.load_img(tmp_path / n, color_mode="grayscale")) for n in ("a.png", "b.png"))
    np.testing.assert_array_equal(a, b)  # by name or by index, the same images
    rows = kddpm("sample", *common, "--per-class", 2, "--out", tmp_path / "rows.png")
    assert rows.returncode == 0, rows.stderr[-2000:]
    assert "Sampling 20 images" in rows.stdout and "guidance 1" in rows.stdout
    grid = np.asarray(keras.utils.load_img(tmp_path / "rows.png", color_mode="grayscale"))
    assert grid.shape[0] > 10 * 28
    for args, message in (
        (("--class", "dog"), "Unknown class 'dog'; this model's classes are T-shirt/top"),
        (("--guidance", 2), "--guidance goes with --class or --per-class"),
        (("--class", "bag", "--per-class", 2), "not both"),
        (("--class", "bag", "--guidance", -1), "--guidance must be >= 0"),
    ):
        done = kddpm("sample", *common, *args, "--out", tmp_path / "x.png")
        assert done.returncode == 2 and done.stderr.strip().splitlines() == [
            f"error: {done.stderr.split('error: ')[1].strip()}"
        ]
        assert message in done.stderr, done.stderr


def test_conditional_flags_need_labels_and_a_conditional_model(run_dir, tmp_path):
    folder = tmp_path / "flat"
    folder.mkdir()
    keras.utils.save_img(folder / "a.png", np.zeros((28, 28, 1), np.uint8), scale=False)
    done = kddpm("train", "--preset", "tiny", "--conditional", "--data", folder, "--steps", 1, "--out", tmp_path / "r")
    assert done.returncode == 2 and "--conditional needs labels" in done.stderr and "sub-folder" in done.stderr
    done = kddpm("train", "--preset", "tiny", "--label-dropout", "0.3", "--steps", 1, "--out", tmp_path / "r")
    assert done.returncode == 2 and "--label-dropout would have no effect here: it goes with --conditional" in (
        done.stderr
    )
    out, _ = run_dir
    done = kddpm("sample", "--model", out, "--class", "bag", "--out", tmp_path / "x.png")
    assert done.returncode == 2 and "need a class-conditional model" in done.stderr


@pytest.mark.slow
def test_a_colour_folder_trains_a_colour_model_at_the_size_asked(tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for index in range(12):  # red-ish and blue-ish photos of other sizes than the model's
        colour = np.array([200, 40, 40] if index % 2 else [40, 40, 200], np.uint8)
        image = np.clip(colour + rng.integers(-30, 30, (48, 40, 3)), 0, 255).astype(np.uint8)
        keras.utils.save_img(folder / f"{index}.jpg", image)
    out = tmp_path / "run"
    done = kddpm("train", "--preset", "tiny", "--data", folder, "--image-size", 32, "--channels", 3, "--steps", 2,
                 "--batch-size", 4, "--out", out)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert "Model: preset tiny at 32x32x3" in done.stdout
    model = keras.models.load_model(out / "model.keras")
    assert model.image_shape == (32, 32, 3)
    grid = np.asarray(keras.utils.load_img(out / "samples" / "final.png"))
    assert grid.shape[2] == 3 and np.abs(grid[..., 0].astype(int) - grid[..., 2]).max() > 0  # colour, not grey
    # Without --channels the data decides: a colour folder is never made grey.
    done = kddpm("train", "--preset", "tiny", "--data", folder, "--steps", 1, "--batch-size", 4, "--out",
                 tmp_path / "run2")  # fmt: skip
    assert done.returncode == 0 and "Model: preset tiny at 28x28x3" in done.stdout
    # A grey image among them: both kinds and the flag are named, before any training.
    keras.utils.save_img(folder / "grey.png", np.zeros((48, 40, 1), np.uint8), scale=False)
    done = kddpm("train", "--preset", "tiny", "--data", folder, "--steps", 1, "--out", tmp_path / "run3")
    assert done.returncode == 2 and "mix grey and colour" in done.stderr
    assert "--channels 1 or --channels 3" in done.stderr
    assert "grey.png is grey" in done.stderr and ".jpg is colour" in done.stderr
