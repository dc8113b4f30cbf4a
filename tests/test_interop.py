"""The diffusers format: parity with diffusers' own outputs (fixtures made by
tools/make_diffusers_fixtures.py), exact round trips, and clear refusals. No torch here."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest
from conftest import tiny_unet
from safetensors.numpy import load_file, save_file

from kddpm import DiffusionModel, KddpmError, NoiseSchedule, build_unet
from kddpm.export import export_model
from kddpm.interop import from_diffusers, schedule_from_config, to_diffusers, unet_architecture

FIXTURES = Path(__file__).parent / "fixtures" / "diffusers"
PIPELINE = FIXTURES / "cifar_pipeline"  # DDPMPipeline.save_pretrained layout
SIX_LEVELS = FIXTURES / "six_levels"  # bare model folder, scheduler_config.json beside it
FULL_SIZE = os.environ.get("KDDPM_DIFFUSERS_FULL")  # the full ddpm-cifar10-32 architecture, if made
ENV = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}


def nhwc(array):
    return np.transpose(array, (0, 2, 3, 1))


def copy_of(folder, tmp_path):
    return Path(shutil.copytree(folder, tmp_path / folder.name))


def unet_dir(folder):
    return folder / "unet" if (folder / "unet").is_dir() else folder


def edit_config(folder, **changes):
    path = unet_dir(folder) / "config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


@pytest.mark.parametrize("folder", [PIPELINE, SIX_LEVELS] + ([Path(FULL_SIZE)] if FULL_SIZE else []), ids=str)
def test_from_diffusers_reproduces_diffusers_eps(folder):
    model = from_diffusers(folder)
    fixture = np.load(folder / "eps.npz")
    want = nhwc(fixture["eps"])
    for network in (model.ema_denoiser, model.denoiser):  # the published weights are in both
        got = np.asarray(network([nhwc(fixture["x"]), fixture["t"]]))
        assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()
    # The weights really matter: another network's output is far off.
    other = np.asarray(build_unet(**unet_architecture(model.denoiser), seed=5)([nhwc(fixture["x"]), fixture["t"]]))
    assert np.abs(other - want).max() > 0.1 * np.abs(want).max()


def test_the_paper_settings_come_from_the_scheduler_configs():
    pipeline = from_diffusers(PIPELINE)
    assert pipeline.schedule.kind == "linear" and pipeline.schedule.timesteps == 1000
    assert (pipeline.variance, pipeline.clip_x0) == ("beta_tilde", True)  # fixed_small, clip_sample true
    assert not pipeline.ema_warmup  # fine-tuning averages from the published weights
    bare = from_diffusers(SIX_LEVELS)
    assert bare.schedule.kind == "cosine" and bare.schedule.params["s"] == 0.008
    assert (bare.variance, bare.clip_x0) == ("beta", False)  # fixed_large, clip_sample false
    arch = unet_architecture(bare.denoiser)
    assert arch["channel_mults"] == (1, 1, 1, 2, 2, 2) and arch["attention_resolutions"] == (4,)


@pytest.mark.parametrize(
    "name, config",
    [
        ("linear", {"beta_schedule": "linear"}),
        ("scaled_linear", {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}),
        ("squaredcos_cap_v2", {"beta_schedule": "squaredcos_cap_v2"}),
        ("trained", None),
    ],
)
def test_schedule_tables_equal_diffusers(name, config):
    tables = np.load(FIXTURES / "schedules.npz")
    if config is None:
        config = {"trained_betas": tables["trained_input"].tolist()}
    schedule, _, _ = schedule_from_config(config)
    # diffusers computes in float32; kddpm in float64.
    np.testing.assert_allclose(schedule.betas, tables[f"{name}_betas"], rtol=1e-6)
    np.testing.assert_allclose(schedule.alphas_cumprod, tables[f"{name}_alphas_cumprod"], rtol=5e-5)
    # DDPMScheduler's fixed_small variance is beta_tilde (clamped at 1e-20 at the first step).
    variance = schedule.posterior_variance[tables["variance_timesteps"]]
    np.testing.assert_allclose(variance, tables[f"{name}_variance"], atol=1e-6)


def test_to_diffusers_round_trips_exactly_in_diffusers_layout(tmp_path):
    model = from_diffusers(PIPELINE)
    out = to_diffusers(model, tmp_path / "pipeline")
    # The layout DDPMPipeline.save_pretrained writes, with the fixture's names, shapes and config.
    assert json.loads((out / "model_index.json").read_text()) == json.loads((PIPELINE / "model_index.json").read_text())
    written = load_file(out / "unet" / "diffusion_pytorch_model.safetensors")
    original = load_file(PIPELINE / "unet" / "diffusion_pytorch_model.safetensors")
    assert {k: v.shape for k, v in written.items()} == {k: v.shape for k, v in original.items()}
    assert all(np.array_equal(written[k], original[k]) for k in original)
    assert json.loads((out / "unet" / "config.json").read_text()) == json.loads(
        (PIPELINE / "unet" / "config.json").read_text()
    )
    scheduler = json.loads((out / "scheduler" / "scheduler_config.json").read_text())
    fixture = json.loads((PIPELINE / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler == {k: v for k, v in fixture.items() if k in scheduler}
    # And back: the same weights, schedule and sampling defaults.
    again = from_diffusers(out)
    for a, b in zip(again.ema_denoiser.get_weights(), model.ema_denoiser.get_weights()):
        assert np.array_equal(a, b)
    assert again.schedule.get_config() == model.schedule.get_config()
    assert (again.variance, again.clip_x0) == (model.variance, model.clip_x0)


def test_a_kddpm_model_writes_its_ema_weights_and_its_schedule(tmp_path):
    network = tiny_unet((8, 12, 1), channel_mults=(1, 2, 2), attention_resolutions=(8, 2), dropout=0.1)
    model = DiffusionModel(network, NoiseSchedule.cosine(50, s=0.02), variance="beta", clip_x0=True)
    model.ema_denoiser.set_weights([w + 0.01 for w in network.get_weights()])  # EMA != trained
    out = to_diffusers(model, tmp_path / "kddpm")
    config = json.loads((out / "unet" / "config.json").read_text())
    assert config["sample_size"] == [8, 12] and config["dropout"] == 0.1
    assert config["down_block_types"] == ["AttnDownBlock2D", "DownBlock2D", "AttnDownBlock2D"]
    assert config["up_block_types"] == ["AttnUpBlock2D", "UpBlock2D", "AttnUpBlock2D"]
    scheduler = json.loads((out / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["variance_type"] == "fixed_large" and scheduler["clip_sample"] is True
    assert len(scheduler["trained_betas"]) == 50  # a cosine with s != 0.008 has no diffusers name
    again = from_diffusers(out)
    x = np.random.default_rng(0).standard_normal((2, 8, 12, 1)).astype(np.float32)
    t = np.array([3, 40], np.int32)
    np.testing.assert_array_equal(again.denoiser([x, t]), model.ema_denoiser([x, t]))
    np.testing.assert_allclose(again.schedule.betas, model.schedule.betas, rtol=0, atol=0)
    trained = to_diffusers(model, tmp_path / "trained", use_ema=False)
    np.testing.assert_array_equal(from_diffusers(trained).denoiser([x, t]), network([x, t]))


def test_older_attention_names_load(tmp_path):
    folder = copy_of(SIX_LEVELS, tmp_path)
    path = folder / "diffusion_pytorch_model.safetensors"
    renamed = {}
    for name, value in load_file(path).items():
        for new, old in (("to_q", "query"), ("to_k", "key"), ("to_v", "value"), ("to_out.0", "proj_attn")):
            name = name.replace(f".{new}.", f".{old}.")
        renamed[name] = value
    assert any(".proj_attn." in name for name in renamed)
    save_file(renamed, str(path))
    fixture = np.load(folder / "eps.npz")
    got = np.asarray(from_diffusers(folder).denoiser([nhwc(fixture["x"]), fixture["t"]]))
    assert np.abs(got - nhwc(fixture["eps"])).max() <= 1e-5 * np.abs(fixture["eps"]).max()


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(image_shape=(32, 32, 3), channel_mults=(1, 2, 2, 2), num_res_blocks=2, attention_resolutions=(16,)),
        dict(image_shape=(16, 8, 1), channel_mults=(1, 2), num_res_blocks=1, attention_resolutions=(8, 16)),
        dict(image_shape=(8, 8, 1), channel_mults=(2,), num_res_blocks=3, attention_resolutions=()),
    ],
)
def test_the_architecture_is_read_back_off_any_unet(kwargs):
    settings = dict(base_channels=8, dropout=0.0, norm_groups=4, norm_epsilon=1e-6, **kwargs)
    arch = unet_architecture(build_unet(**settings))
    assert arch == {**settings, "attention_resolutions": tuple(sorted(kwargs["attention_resolutions"], reverse=True))}


def test_a_network_that_is_not_the_unet_is_refused_before_writing(tmp_path):
    x_t = keras.Input((8, 8, 1), name="x_t")
    t = keras.Input((), dtype="int32", name="t")
    eps = keras.layers.Conv2D(1, 3, padding="same", name="eps")(x_t)
    model = DiffusionModel(keras.Model([x_t, t], eps), NoiseSchedule.linear(10))
    with pytest.raises(KddpmError, match="not a network build_unet makes"):
        to_diffusers(model, tmp_path / "out")
    conditional = DiffusionModel(tiny_unet((8, 8, 1), num_classes=3), NoiseSchedule.linear(10))
    with pytest.raises(KddpmError, match=r"class-conditional .* cannot express it"):
        to_diffusers(conditional, tmp_path / "out")
    assert not (tmp_path / "out").exists() and list(tmp_path.iterdir()) == []


def test_an_existing_folder_is_kept_unless_overwrite(tmp_path):
    model = from_diffusers(PIPELINE)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(KddpmError, match="already exists"):
        to_diffusers(model, out)
    assert (out / "keep.txt").read_text() == "mine"
    to_diffusers(model, out, overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "unet" / "config.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no partial or old folder left


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"flip_sin_to_cos": True}, "flip_sin_to_cos = True"),
        ({"attention_head_dim": 2}, "attention_head_dim = 2"),
        ({"num_class_embeds": 10}, "num_class_embeds = 10"),
        ({"act_fn": "gelu"}, "act_fn = 'gelu'"),
        ({"down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D", "DownBlock2D"]}, "CrossAttn"),
        ({"up_block_types": ["UpBlock2D", "AttnUpBlock2D", "UpBlock2D", "UpBlock2D"]}, "different levels"),
        ({"out_channels": 6}, "out_channels = 6"),
        ({"some_new_field": 1}, "some_new_field = 1"),
    ],
)
def test_configs_outside_the_ddpm_family_are_refused_by_field(tmp_path, changes, message):
    folder = copy_of(PIPELINE, tmp_path)
    edit_config(folder, **changes)
    with pytest.raises(KddpmError, match=message.replace("(", r"\(")):
        from_diffusers(folder)


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"prediction_type": "v_prediction"}, "prediction_type = 'v_prediction'"),
        ({"variance_type": "learned_range"}, "variance_type = 'learned_range'"),
        ({"beta_schedule": "sigmoid"}, "beta_schedule = 'sigmoid'"),
    ],
)
def test_unsupported_schedulers_are_refused_by_field(tmp_path, changes, message):
    folder = copy_of(PIPELINE, tmp_path)
    path = folder / "scheduler" / "scheduler_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))
    with pytest.raises(KddpmError, match=message):
        from_diffusers(folder)


def test_weights_that_do_not_match_the_config_are_refused(tmp_path):
    folder = copy_of(PIPELINE, tmp_path)
    edit_config(folder, layers_per_block=1)  # the file has 2 blocks a level
    with pytest.raises(KddpmError, match=r"has shape \(16,\) but the config's network needs \(12,\)"):
        from_diffusers(folder)
    edit_config(folder, layers_per_block=3)
    with pytest.raises(KddpmError, match=r"no down_blocks\.0\.resnets\.2\.norm1\.weight"):
        from_diffusers(folder)
    edit_config(folder, layers_per_block=2)
    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    save_file({**load_file(weights), "class_embedding.weight": np.zeros((10, 16), np.float32)}, str(weights))
    with pytest.raises(KddpmError, match=r"1 tensors the config has no place for \(class_embedding.weight\)"):
        from_diffusers(folder)


def test_not_a_diffusers_folder_and_damaged_files_get_clear_errors(tmp_path):
    with pytest.raises(KddpmError, match="is not a diffusers model"):
        from_diffusers(tmp_path)
    with pytest.raises(KddpmError, match="is not a folder"):
        from_diffusers(tmp_path / "missing")
    folder = copy_of(SIX_LEVELS, tmp_path)
    weights = folder / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(KddpmError, match="damaged or truncated"):
        from_diffusers(folder)
    weights.unlink()
    with pytest.raises(KddpmError, match=r"no diffusion_pytorch_model\.safetensors"):
        from_diffusers(folder)


def test_a_pytorch_pickle_without_torch_says_how_to_convert(tmp_path):
    folder = copy_of(SIX_LEVELS, tmp_path)
    (folder / "diffusion_pytorch_model.safetensors").rename(folder / "diffusion_pytorch_model.bin")
    code = (
        "import sys; sys.modules['torch'] = None\n"  # this interpreter has no torch
        "from kddpm.interop import from_diffusers\n"
        f"from_diffusers({str(folder)!r})\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV, timeout=300)
    assert done.returncode != 0
    assert "is a PyTorch pickle" in done.stderr and "safetensors.torch import save_file" in done.stderr


def test_a_missing_scheduler_config_falls_back_to_the_paper_and_says_so(tmp_path):
    folder = copy_of(SIX_LEVELS, tmp_path)
    (folder / "scheduler_config.json").unlink()
    lines = []
    model = from_diffusers(folder, log=lines.append)
    assert len(lines) == 1 and "linear schedule" in lines[0]
    assert model.schedule.get_config() == NoiseSchedule.linear().get_config()
    with pytest.warns(UserWarning, match="No scheduler config"):
        from_diffusers(folder)


@pytest.mark.slow
def test_an_imported_model_fine_tunes_samples_and_exports(tmp_path):
    model = from_diffusers(PIPELINE)
    before = model.denoiser.get_weights()
    model.compile(optimizer=keras.optimizers.Adam(1e-3))
    images = np.random.default_rng(0).uniform(-1, 1, (8, 32, 32, 3)).astype(np.float32)
    history = model.fit(images, batch_size=4, epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"]).all()
    assert any(not np.array_equal(a, b) for a, b in zip(before, model.denoiser.get_weights()))
    samples = model.sample(2, seed=0, sampler="ddim", steps=3)
    assert samples.shape == (2, 32, 32, 3) and np.isfinite(samples).all()
    results = export_model(model, tmp_path / "exported", "all")
    assert [r.format for r in results] == ["saved_model", "onnx"]
    assert all(r.max_abs_diff <= 1e-4 for r in results)


@pytest.mark.slow
def test_convert_command_both_ways(tmp_path):
    def kddpm(*args):
        return subprocess.run(
            [sys.executable, "-m", "kddpm.cli", *map(str, args)], capture_output=True, text=True, env=ENV, timeout=600
        )

    done = kddpm("convert", "--from-diffusers", SIX_LEVELS, "--out", tmp_path / "m.keras")
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == f"Converted: {tmp_path / 'm.keras'}"
    assert "28,655 parameters" in done.stdout and "DDPM variance beta" in done.stdout
    assert "tensorflow" not in done.stderr.lower()
    done = kddpm("convert", "--to-diffusers", "--model", tmp_path / "m.keras", "--out", tmp_path / "back")
    assert done.returncode == 0, done.stderr[-2000:]
    written = load_file(tmp_path / "back" / "unet" / "diffusion_pytorch_model.safetensors")
    original = load_file(SIX_LEVELS / "diffusion_pytorch_model.safetensors")
    assert written.keys() == original.keys() and all(np.array_equal(written[k], original[k]) for k in original)
    again = kddpm("convert", "--to-diffusers", "--model", tmp_path / "m.keras", "--out", tmp_path / "back")
    assert again.returncode == 2 and again.stderr.strip().splitlines() == [
        f"error: {tmp_path / 'back'} already exists; choose another --out or pass overwrite=True (--overwrite)."
    ]
    bad = kddpm("convert", "--from-diffusers", tmp_path, "--out", tmp_path / "x.keras")
    assert bad.returncode == 2 and "is not a diffusers model" in bad.stderr and len(bad.stderr.splitlines()) == 1


def test_dynamic_thresholding_maps_to_diffusers_and_back():
    from kddpm.interop import diffusers_scheduler_config

    model = DiffusionModel(tiny_unet((8, 8, 1)), NoiseSchedule.linear(1000), clip_x0="dynamic")
    config = diffusers_scheduler_config(model)
    assert config["thresholding"] and not config["clip_sample"] and config["dynamic_thresholding_ratio"] == 0.995
    assert schedule_from_config(config)[2] == "dynamic"
    # diffusers clamps s to [1, sample_max_value]: 1 is plain clipping, other caps kddpm does not have.
    assert schedule_from_config({**config, "sample_max_value": 1.0})[2] is True
    with pytest.raises(KddpmError, match=r"sample_max_value = 1\.5 caps the dynamic threshold"):
        schedule_from_config({**config, "sample_max_value": 1.5})
    with pytest.raises(KddpmError, match=r"dynamic_thresholding_ratio = 0\.9"):
        schedule_from_config({**config, "dynamic_thresholding_ratio": 0.9})
