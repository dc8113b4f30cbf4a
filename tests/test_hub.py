"""Hub ids for the paper's checkpoints: resolved through huggingface_hub's cache, offline.

The cache is laid out as huggingface_hub lays it out (models--OWNER--NAME/refs/main naming a
commit, snapshots/COMMIT/ holding the files), made here from a committed diffusers fixture."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import kddpm
from kddpm import KddpmError
from kddpm.hub import is_hub_id, resolve_checkpoint
from kddpm.interop import from_diffusers

FIXTURE = Path(__file__).parent / "fixtures" / "diffusers" / "six_levels"  # a bare model folder, as on the Hub
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def hub_cache(root, repo_id="google/ddpm-cifar10-32"):
    storage = root / ("models--" + repo_id.replace("/", "--"))
    (storage / "refs").mkdir(parents=True)
    (storage / "refs" / "main").write_text(COMMIT)
    snapshot = storage / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    for name in ("config.json", "diffusion_pytorch_model.safetensors", "scheduler_config.json"):
        shutil.copy(FIXTURE / name, snapshot / name)
    return root


def offline(cache):
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    return {**env, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}


def kddpm_cli(*args, cwd, env):
    return subprocess.run(
        [sys.executable, "-m", "kddpm.cli", *map(str, args)], capture_output=True, text=True, cwd=cwd, env=env,
        timeout=600,
    )  # fmt: skip


def test_a_hub_id_is_owner_slash_name_that_is_not_a_local_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert is_hub_id("google/ddpm-cifar10-32") and not is_hub_id("ddpm-cifar10-32/") and not is_hub_id("/abs/path")
    assert not is_hub_id("a/b/c") and not is_hub_id("./google/x")
    (tmp_path / "google" / "ddpm-cifar10-32").mkdir(parents=True)
    assert not is_hub_id("google/ddpm-cifar10-32")  # a local folder of that name wins
    assert resolve_checkpoint("google/ddpm-cifar10-32") == Path("google/ddpm-cifar10-32")


@pytest.mark.slow
def test_convert_reads_a_hub_id_from_the_cache_offline(tmp_path):
    cache = hub_cache(tmp_path / "hub")
    out = tmp_path / "cifar10.keras"
    done = kddpm_cli("convert", "--from-diffusers", "google/ddpm-cifar10-32", "--out", out, cwd=tmp_path,
                     env=offline(cache))  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == f"Converted: {out}"
    model = kddpm.load_diffusion_model(out)
    fixture = np.load(FIXTURE / "eps.npz")
    got = np.asarray(model.ema_denoiser([np.transpose(fixture["x"], (0, 2, 3, 1)), fixture["t"]]))
    want = np.transpose(fixture["eps"], (0, 2, 3, 1))
    assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()
    # Python, the same way: from_diffusers("google/ddpm-cifar10-32") in a fresh process.
    code = "from kddpm.interop import from_diffusers\n"
    code += "print(from_diffusers('google/ddpm-cifar10-32').denoiser.count_params())"
    python = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path,
                            env=offline(cache), timeout=600)  # fmt: skip
    assert python.returncode == 0 and python.stdout.split()[-1] == str(model.denoiser.count_params()), python.stderr


@pytest.mark.slow
def test_a_hub_id_that_is_not_cached_offline_is_one_line(tmp_path):
    done = kddpm_cli("convert", "--from-diffusers", "google/ddpm-church-256", "--out", tmp_path / "c.keras",
                     cwd=tmp_path, env=offline(hub_cache(tmp_path / "hub")))  # fmt: skip
    assert done.returncode == 2, done.stderr[-2000:]
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "google/ddpm-church-256" in lines[0] and "HF_HUB_OFFLINE" in lines[0], lines
    assert not (tmp_path / "c.keras").exists()


def test_without_huggingface_hub_a_hub_id_says_which_extra_to_install(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # as if not installed
    with pytest.raises(KddpmError, match=r"pip install 'kddpm\[hub\]'"):
        from_diffusers("google/ddpm-cifar10-32")
