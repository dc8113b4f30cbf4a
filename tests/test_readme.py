"""What a new user runs, the way they run it: README snippets and a saved model, each in a fresh process."""

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
ENV = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "KERAS_BACKEND": "tensorflow"}

# Each README python block, keyed by a line it contains, with the substitutions that make it
# tiny and the checks appended to it. A block without an entry fails the test, so a new
# snippet is run too.
SNIPPETS = {
    'model.save("fmnist.keras")': {
        "replace": [
            ("batch_size=64", "batch_size=8"),
            ("base_channels=32, channel_mults=(1, 2, 2)", "base_channels=8, channel_mults=(1, 2)"),
            ("attention_resolutions=(7,)", "attention_resolutions=(14,)"),
            ("norm_groups=8", "norm_groups=4"),
            ("steps_per_epoch=200, epochs=13", "steps_per_epoch=2, epochs=1"),
            ("model.sample(64, seed=0)", "model.sample(3, seed=0, steps=4)"),
        ],
        "check": "assert images.shape == (3, 28, 28, 1) and -1 <= images.min() and images.max() <= 1",
    },
    "strategy = make_strategy": {
        "replace": [
            ('PRESETS["small"]', 'PRESETS["tiny"]'),
            ("batch_size=128, image_shape=(32, 32, 1)", "batch_size=8, image_shape=(28, 28, 1)"),
            ("steps_per_epoch=500, epochs=100", "steps_per_epoch=2, epochs=1"),
        ],
        "check": "assert model.optimizer.iterations.numpy() == 2 and model.denoiser.compute_dtype == 'bfloat16'",
    },
}


SNIPPETS["callbacks = [EvaluateEvery"] = {
    "replace": [
        ('PRESETS["demo"]', 'PRESETS["tiny"]'),
        ("batch_size=64", "batch_size=8"),
        ("EvaluateEvery(every=5, num_samples=1000)", "EvaluateEvery(every=2, num_samples=20, steps=3)"),
        ("steps_per_epoch=200, epochs=13", "steps_per_epoch=2, epochs=2"),
    ],
    "check": "assert model.optimizer.iterations.numpy() == 4 and 'fid' in model.history.history",
}


SNIPPETS['from_diffusers("google/ddpm-cifar10-32")'] = {
    "replace": [
        ('"google/ddpm-cifar10-32"', repr(str(ROOT / "tests" / "fixtures" / "diffusers" / "cifar_pipeline"))),
        ("steps=20", "steps=3"),
    ],
    "check": "import json; assert images.shape == (4, 32, 32, 3) and -1 <= images.min() and images.max() <= 1\n"
    "assert json.load(open('ddpm-cifar10-32-again/unet/config.json'))['block_out_channels'] == [4, 8, 8, 8]",
}


SNIPPETS['labels="Sneaker"'] = {
    "replace": [
        ('PRESETS["demo"]', 'PRESETS["tiny"]'),
        ("batch_size=64", "batch_size=8"),
        ("steps_per_epoch=200, epochs=13", "steps_per_epoch=2, epochs=1"),
        ('labels="Sneaker")', 'labels="Sneaker", steps=2)'),
    ],
    "check": "assert sneakers.shape == (8, 28, 28, 1) and model.num_classes == 10\n"
    "assert model.class_index('sneaker') == 7",
}


def export_a_tiny_model(folder):
    """What the deployment page's snippet loads: a 28x28 model exported to folder/exported."""
    from kddpm.export import export_model
    from kddpm.presets import PRESETS
    from kddpm.training import create_model

    export_model(create_model(PRESETS["tiny"], seed=0), folder / "exported", format="saved_model")


SNIPPETS['tf.saved_model.load("exported/kddpm/1")'] = {
    "setup": export_a_tiny_model,
    "replace": [],
    "check": "assert images.shape == (4, 28, 28, 1) and images.dtype == tf.uint8 and eps.shape == (2, 28, 28, 1)\n"
    # Only kddpm is checked: `import tensorflow` itself imports keras in recent releases (TF 2.21 loads
    # keras 3), so keras in sys.modules says nothing about what the snippet needs.
    "assert 'kddpm' not in sys.modules, 'the snippet needs TensorFlow alone'",
    "prefix": "import sys\n",
}


def save_an_untrained_tiny_run(folder):
    """What the editing page's snippet loads: runs/demo/model.keras, a tiny 28x28 model."""
    from kddpm.presets import PRESETS
    from kddpm.training import create_model

    (folder / "runs" / "demo").mkdir(parents=True)
    create_model(PRESETS["tiny"], seed=0).save(folder / "runs" / "demo" / "model.keras")


SNIPPETS["model.inpaint(photos, mask, seed=0)"] = {
    "setup": save_an_untrained_tiny_run,
    "replace": [
        ("strength=0.5, seed=0)", "strength=0.5, seed=0, steps=4)"),
        (
            "model.inpaint(photos, mask, seed=0)",
            "model.inpaint(photos, mask, seed=0, steps=10, jump_length=2, jump_n_sample=2)",
        ),
        ("model.invert(photos, steps=50)", "model.invert(photos, steps=4)"),
        ('sampler="ddim", steps=50, eta=0)', 'sampler="ddim", steps=4, eta=0)'),
        ("num=8, t=500)", "num=3, t=5)"),
    ],
    "check": "assert varied.shape == filled.shape == x_T.shape == again.shape == (8, 28, 28, 1)\n"
    "assert row.shape == (3, 28, 28, 1) and -1 <= varied.min() and varied.max() <= 1\n"
    "pixels = photos.astype(np.float32) / 127.5 - 1\n"
    "assert np.abs(filled[:, :14] - pixels[:, :14]).max() < 1e-5, 'the kept half is the photos'\n"
    "assert np.abs(filled[:, 14:] - pixels[:, 14:]).max() > 0.1, 'the lower half is filled'",
}

DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def python_blocks(text):
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def run_python(code, cwd, timeout=600, env=None):
    return subprocess.run(
        [sys.executable, "-c", code],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**ENV, **(env or {})},
    )


def documented_blocks():
    """(document name, block) for every ```python block of the README and docs/*.md."""
    return [(path.name, block) for path in DOCUMENTS for block in python_blocks(path.read_text())]


def test_every_documented_block_has_a_test_entry():
    blocks = documented_blocks()
    assert len(blocks) >= 6
    used = set()
    for name, block in blocks:
        keys = [key for key in SNIPPETS if key in block]
        assert len(keys) == 1, f"{name} block without (or with several) test entries:\n{block}"
        used.add(keys[0])
    assert used == set(SNIPPETS), f"test entries for blocks that are gone: {set(SNIPPETS) - used}"


@pytest.mark.slow
@pytest.mark.parametrize("key", sorted(SNIPPETS))
def test_every_documented_python_block_runs_in_a_fresh_process(key, tmp_path):
    name, block = next((name, block) for name, block in documented_blocks() if key in block)
    entry = SNIPPETS[key]
    code = block
    for old, new in entry["replace"]:
        assert old in code, f"{old!r} is no longer in the {name} block; update the test's substitutions"
        code = code.replace(old, new)
    if "setup" in entry:
        entry["setup"](tmp_path)
    code = entry.get("prefix", "") + code + "\n" + entry["check"] + "\n"
    done = run_python(code, tmp_path, env={"KDDPM_CACHE": str(tmp_path / "cache")})
    assert done.returncode == 0, f"{name} block failed:\n{code}\n{done.stderr[-3000:]}"


@pytest.mark.slow
def test_a_model_saved_in_one_process_loads_in_another_after_import_kddpm(tmp_path):
    save = textwrap.dedent(
        """
        import numpy as np, kddpm
        denoiser = kddpm.build_unet((8, 8, 1), base_channels=8, channel_mults=(1, 2), num_res_blocks=1,
                                    attention_resolutions=(4,), dropout=0.1, norm_groups=4)
        model = kddpm.DiffusionModel(denoiser, kddpm.NoiseSchedule.cosine(50), seed=0)
        model.compile(optimizer="adam")
        model.fit(np.zeros((8, 8, 8, 1), np.float32), batch_size=4, epochs=1, verbose=0)
        model.save("m.keras")
        np.save("expected.npy", model.sample(2, seed=1, sampler="ddim", steps=3))
        """
    )
    assert run_python(save, tmp_path).returncode == 0
    # What the README promises: nothing but `import kddpm` and Keras' own loader.
    load = textwrap.dedent(
        """
        import keras, numpy as np
        import kddpm
        model = keras.models.load_model("m.keras")
        assert type(model).__name__ == "DiffusionModel", type(model)
        np.testing.assert_array_equal(model.sample(2, seed=1, sampler="ddim", steps=3), np.load("expected.npy"))
        print("loaded", model.schedule)
        """
    )
    done = run_python(load, tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "loaded NoiseSchedule(kind=cosine, timesteps=50" in done.stdout
    # Without `import kddpm` Keras cannot know the class: the registration is what fixed it.
    without = run_python("import keras\nkeras.models.load_model('m.keras')", tmp_path)
    assert without.returncode != 0 and "DiffusionModel" in without.stderr
