"""Editing through the deployment paths: the SavedModel's img2img and inpaint signatures, the numpy
img2img and RePaint of export/onnx_edit.py, and both deployment scripts' --input flags."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
from conftest import EXPORT_SHAPE as SHAPE
from PIL import Image
from test_export import ServingStandIn, fake_tensorflow, load_onnx_sample

from kddpm import defaults
from kddpm.sampling import Sampler, make_plan, to_uint8
from kddpm.sampling.edits import repaint_plan, repaint_timesteps

REPO = Path(__file__).resolve().parents[1]
DIFFUSERS = REPO / "tests" / "fixtures" / "diffusers"


def load_onnx_edit():
    load_onnx_sample()  # puts export/ on the path
    import onnx_edit

    return onnx_edit


def pictures(count=3, seed=0):
    """uint8 images [count, 8, 8, 1] with structure (a bright square on a dark background)."""
    rng = np.random.default_rng(seed)
    images = np.full((count, *SHAPE), 30, np.uint8)
    for i in range(count):
        top, left = rng.integers(0, 4, 2)
        images[i, top : top + 4, left : left + 4] = 220
    return images


def lower_half(count=3):
    mask = np.zeros((count, *SHAPE[:2]), np.float32)
    mask[:, SHAPE[0] // 2 :] = 1.0
    return mask


# --- SavedModel -----------------------------------------------------------------------------


@pytest.mark.parametrize("sampler, steps", [("ddim", 8), ("dpm++2m", 6), ("ddpm", 0)])
def test_saved_model_img2img_matches_the_library(random_ema_model, random_ema_exported, sampler, steps):
    loaded = tf.saved_model.load(str(random_ema_exported[1]["saved_model"].path))
    images = pictures()
    for strength in (0.5, 1.0):
        served = loaded.signatures["img2img"](
            images=tf.constant(images),
            strength=tf.constant([strength]),
            seed=tf.constant([3], tf.int64),
            sampler=tf.constant([sampler]),
            steps=tf.constant([steps]),
        )["images"].numpy()
        expected = to_uint8(random_ema_model.img2img(images, strength, sampler=sampler, steps=steps or None, seed=3))
        assert np.abs(served.astype(int) - expected).max() <= 1, (sampler, strength)
    low = loaded.signatures["img2img"](
        images=tf.constant(images), strength=tf.constant([0.25]), seed=tf.constant([3], tf.int64),
        sampler=tf.constant([sampler]), steps=tf.constant([steps]),
    )["images"].numpy()  # fmt: skip
    # A low strength stays near the input; the comparison above is not between two blurs.
    assert np.abs(low.astype(int) - images).mean() < np.abs(served.astype(int) - images).mean()


def test_saved_model_inpaint_matches_the_library_and_keeps_pixels(random_ema_model, random_ema_exported):
    loaded = tf.saved_model.load(str(random_ema_exported[1]["saved_model"].path))
    images, mask = pictures(), lower_half()
    served = loaded.signatures["inpaint"](
        images=tf.constant(images), mask=tf.constant(mask), seed=tf.constant([4], tf.int64)
    )["images"].numpy()
    steps = min(defaults.REPAINT_STEPS, random_ema_model.schedule.timesteps)  # the export's settings
    expected = to_uint8(random_ema_model.inpaint(images, mask, steps=steps, seed=4))
    assert np.abs(served.astype(int) - expected).max() <= 1
    kept = mask == 0
    np.testing.assert_array_equal(served[kept], images[kept])
    assert np.abs(served[~kept].astype(int) - images[~kept]).mean() > 5  # the filled half was redrawn


def test_saved_model_edit_signatures_check_their_inputs(random_ema_exported):
    loaded = tf.saved_model.load(str(random_ema_exported[1]["saved_model"].path))
    images = tf.constant(pictures(2))
    options = {"seed": tf.constant([0], tf.int64), "sampler": tf.constant(["ddim"]), "steps": tf.constant([4])}
    for strength, message in ((0.0, "strength must be in"), (1.5, "strength must be in"), (0.1, "runs none")):
        with pytest.raises(tf.errors.InvalidArgumentError, match=message):
            loaded.signatures["img2img"](images=images, strength=tf.constant([strength]), **options)
    with pytest.raises(tf.errors.InvalidArgumentError, match="images must be"):
        loaded.signatures["img2img"](images=tf.zeros([1, 4, 4, 1], tf.uint8), strength=tf.constant([0.5]), **options)
    inpaint = loaded.signatures["inpaint"]
    with pytest.raises(tf.errors.InvalidArgumentError, match="mask must be 0"):
        inpaint(images=images, mask=tf.fill([2, 8, 8], 0.5), seed=tf.constant([0], tf.int64))
    with pytest.raises(tf.errors.InvalidArgumentError, match="mask must be \\[B, 8, 8\\]"):
        inpaint(images=images, mask=tf.zeros([1, 8, 8]), seed=tf.constant([0], tf.int64))


def test_conditional_saved_model_edits_take_labels(random_conditional_model, random_conditional_exported):
    loaded = tf.saved_model.load(str(random_conditional_exported["saved_model"].path))
    images = pictures(2)
    condition = {"labels": tf.constant([1, 2]), "guidance_scale": tf.constant([1.5])}
    served = loaded.signatures["img2img"](
        images=tf.constant(images), strength=tf.constant([0.6]), seed=tf.constant([1], tf.int64),
        sampler=tf.constant(["ddim"]), steps=tf.constant([5]), **condition,
    )["images"].numpy()  # fmt: skip
    model = random_conditional_model
    expected = model.img2img(images, 0.6, sampler="ddim", steps=5, seed=1, labels=[1, 2], guidance_scale=1.5)
    assert np.abs(served.astype(int) - to_uint8(expected)).max() <= 1
    served = loaded.signatures["inpaint"](
        images=tf.constant(images), mask=tf.constant(lower_half(2)), seed=tf.constant([1], tf.int64), **condition
    )["images"].numpy()
    steps = min(defaults.REPAINT_STEPS, model.schedule.timesteps)
    expected = model.inpaint(images, lower_half(2), steps=steps, seed=1, labels=[1, 2], guidance_scale=1.5)
    assert np.abs(served.astype(int) - to_uint8(expected)).max() <= 1


# --- The numpy implementation (export/onnx_edit.py) -----------------------------------------


def onnx_session(exported):
    import onnxruntime

    return onnxruntime.InferenceSession(str(exported[1]["onnx"].path), providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("sampler, steps", [("ddim", 8), ("dpm++2m", 6), ("dpm++2m_sde", 6), ("ddpm", None)])
def test_onnx_img2img_matches_the_tf_one(random_ema_model, random_ema_exported, sampler, steps):
    onnx_edit = load_onnx_edit()
    session = onnx_session(random_ema_exported)
    model, images = random_ema_model, pictures()
    rng = np.random.default_rng(5)
    eps = rng.standard_normal(images.shape)
    strength = 0.6
    full = model.plan(sampler, steps)
    start = round(strength * model.schedule.timesteps) - 1 if sampler == "ddpm" else None
    if start is None:
        start = int(full.timesteps[full.num_steps - round(strength * full.num_steps)])
    plan = make_plan(model.schedule, sampler, steps, clip_x0=model.clip_x0, start_t=start)
    noise = rng.standard_normal((plan.num_steps, *images.shape)).astype(np.float32)
    x0 = images / 127.5 - 1.0
    abar = model.schedule.alphas_cumprod[start]
    x_t = (np.sqrt(abar) * x0 + np.sqrt(1 - abar) * eps).astype(np.float32)
    reference = Sampler(model.ema_denoiser, SHAPE).sample(plan, x_T=x_t, noise=noise).numpy()
    ours = onnx_edit.img2img(session, images, strength, sampler, steps, eps=eps, noise=noise)
    np.testing.assert_allclose(ours, reference, atol=2e-3, rtol=0)
    assert np.abs(reference - x0).max() > 0.1  # the edit moved the images


def test_onnx_repaint_matches_the_tf_one(random_ema_model, random_ema_exported):
    onnx_edit = load_onnx_edit()
    session = onnx_session(random_ema_exported)
    model = random_ema_model
    T = model.schedule.timesteps
    for steps, jump_length, jump_n_sample in ((T, 10, 10), (20, 3, 4), (10, 1, 1)):
        np.testing.assert_array_equal(
            onnx_edit.repaint_timesteps(T, steps, jump_length, jump_n_sample),
            repaint_timesteps(T, steps, jump_length, jump_n_sample),
        )
    fixture = np.load(DIFFUSERS / "repaint_timesteps.npz")
    for key in fixture.files:
        T_, steps, jump_length, jump_n_sample = (int(v) for v in key.split("_"))
        np.testing.assert_array_equal(onnx_edit.repaint_timesteps(T_, steps, jump_length, jump_n_sample), fixture[key])
    # Everything filled: the reverse and forward rows alone, with the same step noise.
    images = pictures(2)
    plan = repaint_plan(model.schedule, 20, 3, 4, model.clip_x0)
    rng = np.random.default_rng(6)
    x_T = rng.standard_normal(images.shape).astype(np.float32)
    noise = rng.standard_normal((plan.num_steps, *images.shape)).astype(np.float32)
    known = (images / 127.5 - 1.0, np.zeros((2, *SHAPE[:2], 1), np.float32))
    reference = Sampler(model.ema_denoiser, SHAPE).sample(plan, x_T=x_T, noise=noise, known=known).numpy()
    fill = np.ones((2, *SHAPE[:2]))
    ours = onnx_edit.inpaint(session, images, fill, 20, 3, 4, x_T=x_T, noise=noise)
    np.testing.assert_allclose(ours, reference, atol=2e-3, rtol=0)
    # Half kept: exactly the given pixels there.
    half = onnx_edit.inpaint(session, images, lower_half(2), 20, 3, 4, seed=1)
    kept = lower_half(2) == 0
    np.testing.assert_array_equal(load_onnx_sample().to_uint8(half)[kept], images[kept])


# --- The scripts, as a deployer runs them ---------------------------------------------------


def write_inputs(folder: Path, images: np.ndarray) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(images):
        Image.fromarray(image[..., 0]).resize((16, 16)).save(folder / f"{i}.png")  # resized back to 8x8
    return folder


def test_onnx_sample_script_edits_files(random_ema_exported, tmp_path):
    subprocess.run(["cp", "-r", str(REPO / "export"), str(tmp_path / "deploy")], check=True)
    script = tmp_path / "deploy" / "onnx_sample.py"
    env = {**os.environ, **fake_tensorflow(tmp_path)}
    inputs = write_inputs(tmp_path / "inputs", pictures(3))
    mask = tmp_path / "mask.png"
    Image.fromarray((lower_half(1)[0] * 255).astype(np.uint8)).save(mask)
    model = str(random_ema_exported[1]["onnx"].path)

    def run(*args):
        return subprocess.run(
            [sys.executable, str(script), "--model", model, *args], env=env, capture_output=True, text=True, timeout=300
        )

    out = tmp_path / "edited.png"
    done = run("--input", str(inputs), "--strength", "0.5", "--sampler", "ddim", "--steps", "6", "--out", str(out))
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == f"Edited images: {out}"
    assert np.asarray(Image.open(out)).std() > 0
    done = run("--input", str(inputs), "--mask", str(mask), "--out", str(out), "--grid-scale", "1")
    assert done.returncode == 0, done.stderr
    grid = np.asarray(Image.open(out))
    assert grid.shape == (2 * 8 + 2, 2 * 8 + 2)  # 3 images in kddpm's 2-column grid
    for args, message in (
        (["--input", str(inputs)], "--input takes one edit: --strength S"),
        (["--strength", "0.5"], "give them with --input"),
        (["--input", str(tmp_path / "none"), "--strength", "0.5"], "does not exist"),
        (["--input", str(inputs), "--strength", "2"], "--strength must be in (0, 1]"),
    ):
        done = run(*args, "--out", str(tmp_path / "x.png"))
        assert done.returncode == 2 and message in done.stderr and "Traceback" not in done.stderr, done.stderr


def test_rest_client_edits_through_the_signatures(random_ema_model, random_ema_exported, tmp_path, capsys):
    images = pictures(2)
    stand_in = ServingStandIn(random_ema_exported[1]["saved_model"].path)
    inputs = write_inputs(tmp_path / "inputs", images)
    mask = tmp_path / "mask.png"
    Image.fromarray((lower_half(1)[0] * 255).astype(np.uint8)).save(mask)
    out = tmp_path / "served.png"
    with stand_in as rest_client:
        edited = rest_client.request_edit(stand_in.url, "kddpm", images, strength=0.5, sampler="ddim", steps=6, seed=2)
        filled = rest_client.request_edit(stand_in.url, "kddpm", images, mask=lower_half(2), seed=2)
        for edit in (["--strength", "0.5", "--steps", "6"], ["--mask", str(mask)]):
            args = ["--url", stand_in.url, "--input", str(inputs), *edit, "--out", str(out), "--grid-scale", "1"]
            assert rest_client.main(args) == 0
            assert capsys.readouterr().out.strip().splitlines()[-1] == f"Edited images: {out}"
            assert np.asarray(Image.open(out)).shape == (8, 2 * 8 + 2)
        with pytest.raises(SystemExit, match="--input takes one edit"):
            rest_client.main(["--url", stand_in.url, "--input", str(inputs)])
    expected = to_uint8(random_ema_model.img2img(images, 0.5, sampler="ddim", steps=6, seed=2))
    assert np.abs(edited.astype(int) - expected).max() <= 1
    kept = lower_half(2) == 0
    np.testing.assert_array_equal(filled[kept], images[kept])
