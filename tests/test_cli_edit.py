"""kddpm img2img, inpaint, interpolate and invert, run as a user runs them on a trained tiny model."""

import numpy as np
import pytest
from conftest import kddpm_command as kddpm
from PIL import Image


@pytest.fixture
def inputs(tmp_path):
    """Three 28x28 grey PNGs (a bright square on a dark background) and a 56x56 one, in a folder."""
    folder = tmp_path / "inputs"
    folder.mkdir()
    for i in range(3):
        image = np.full((28, 28), 20, np.uint8)
        image[4 + 4 * i : 16 + 4 * i, 6:20] = 230
        Image.fromarray(image).save(folder / f"{i}.png")
    big = np.full((56, 56), 20, np.uint8)
    big[10:40, 10:40] = 200
    Image.fromarray(big).save(folder / "3_large.png")  # resized to the model's 28x28, as training data is
    return folder


def pixels(path):
    return np.asarray(Image.open(path).convert("L"))


def one_error_line(done, message):
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1 and message in lines[0], done.stderr[-2000:]


def test_img2img_and_inpaint_from_a_folder(tiny_run, inputs, tmp_path):
    run, _ = tiny_run
    out = tmp_path / "edited.png"
    done = kddpm("img2img", "--model", run, "--input", inputs, "--strength", "0.5", "--steps", 4, "--out", out)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1].endswith(str(out))
    assert "4 images" in done.stdout and "28x28x1" in done.stdout
    assert pixels(out).std() > 0
    filled = tmp_path / "filled"
    done = kddpm(
        "inpaint", "--model", run, "--input", inputs, "--box", "0,14,28,28", "--steps", 20, "--jump-length", 2,
        "--jump-n-sample", 2, "--out", f"{filled}/",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert "Inpainting 50% of the pixels with RePaint (20 strides, jumps 2 x 2)" in done.stdout
    written = sorted(filled.glob("[0-9]*.png"))
    assert len(written) == 4 and (filled / "grid.png").exists()  # one PNG per image, and the grid, as sample writes
    for i in range(3):  # the kept upper half comes back exactly
        np.testing.assert_array_equal(pixels(written[i])[:14], pixels(inputs / f"{i}.png")[:14])
    mask = tmp_path / "mask.png"
    Image.fromarray(np.where(np.arange(28)[:, None] >= 14, 255, 0).repeat(28, 1).astype(np.uint8)).save(mask)
    again = tmp_path / "again"
    done = kddpm(
        "inpaint", "--model", run, "--input", inputs, "--mask", mask, "--steps", 20, "--jump-length", 2,
        "--jump-n-sample", 2, "--out", f"{again}/",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    for a, b in zip(written, sorted(again.glob("[0-9]*.png")), strict=True):  # the same mask as the box, the same seed
        np.testing.assert_array_equal(pixels(a), pixels(b))


def test_interpolate_and_invert(tiny_run, inputs, tmp_path):
    run, _ = tiny_run
    row = tmp_path / "row.png"
    a, b = inputs / "0.png", inputs / "2.png"
    done = kddpm("interpolate", "--model", run, "--input", a, b, "--num", 4, "--t", 5, "--out", row)
    assert done.returncode == 0, done.stderr[-2000:]
    assert pixels(row).shape[1] > pixels(row).shape[0] * 3  # one row of four
    grid, noise = tmp_path / "inverted.png", tmp_path / "noise.npz"
    done = kddpm("invert", "--model", run, "--input", inputs, "--steps", 5, "--npz", noise, "--out", grid)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "Reconstruction with DDIM-5: PSNR" in done.stdout
    assert np.load(noise)["x_T"].shape == (4, 28, 28, 1)
    assert done.stdout.strip().splitlines()[-1].endswith(str(grid))


def test_edit_verbs_refuse_bad_input_in_one_line(tiny_run, inputs, tmp_path):
    run, _ = tiny_run
    out = ("--out", tmp_path / "x.png")
    for args, message in (
        (("img2img", "--model", run, "--input", inputs, "--strength", 0, *out), "--strength must be in (0, 1]"),
        (("img2img", "--model", run, "--input", tmp_path / "none", *out), "does not exist"),
        (("img2img", "--model", run, "--input", inputs, "--sampler", "ddpm", "--steps", 5, *out), "DDPM takes all"),
        (("inpaint", "--model", run, "--input", inputs, "--box", "0,14,40,28", *out), "must lie within the model's"),
        (("inpaint", "--model", run, "--input", inputs, "--box", "a,b", *out), "--box takes x0,y0,x1,y1"),
        (("inpaint", "--model", run, "--input", inputs, *out), "one of the arguments --mask --box is required"),
        (("interpolate", "--model", run, "--input", inputs / "0.png", *out), "takes two images"),
        (("invert", "--model", run, "--input", inputs, "--class", "bag", *out), "needs a class-conditional model"),
        (("invert", "--model", tmp_path / "nothing", "--input", inputs, *out), "nothing"),
        (("img2img", "--model", run, "--input", inputs, "--out", tmp_path / "x.gif"), "must end in .png or .jpg"),
    ):
        done = kddpm(*args, timeout=120)
        if "required" in message:
            assert done.returncode == 2 and message in done.stderr, done.stderr
        else:
            one_error_line(done, message)
    assert not (tmp_path / "x.png").exists()
    bad = inputs / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 10)
    done = kddpm("img2img", "--model", run, "--input", inputs, *out)
    one_error_line(done, "broken.png")
