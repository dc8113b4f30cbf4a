"""The command line's conventions: fast help, documented options, checks before any work,
outputs in the forms people ask for, plain progress in logs, Ctrl-C that says how to resume."""

import argparse
import os
import re
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import keras
import numpy as np
import pytest
import tomllib

from kddpm.callbacks import read_backup_state
from kddpm.presets import PRESETS
from kddpm.training import create_model

ROOT = Path(__file__).parents[1]
ENV = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}


def kddpm(*args, timeout=600):
    return subprocess.run(
        [sys.executable, "-m", "kddpm.cli", *map(str, args)], capture_output=True, text=True, timeout=timeout, env=ENV
    )


def as_the_command(argv, after=""):
    """Runs kddpm.cli.main(argv) in a fresh interpreter that is the ``kddpm`` command, then ``after``
    (Python, with ``code`` the exit code); returns the completed process."""
    script = textwrap.dedent(f"""
        import sys
        sys.argv = ["kddpm", *{list(map(str, argv))!r}]
        from kddpm.cli import main
        try:
            code = main(sys.argv[1:])
        except SystemExit as exit:
            code = exit.code
        """) + textwrap.dedent(after)
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env=ENV)


def parsers():
    """{'': the top-level parser, VERB: its parser}, built as the command builds them."""
    from kddpm.cli import _parser

    top = _parser()
    (verbs,) = [a for a in top._actions if isinstance(a, argparse._SubParsersAction)]
    return {"": top, **verbs.choices}


def option_strings(parser):
    return {flag for action in parser._actions for flag in action.option_strings}


@pytest.fixture
def tiny_model(tiny_run):
    return tiny_run[0] / "model.keras"


@pytest.fixture
def read_only_dir(tmp_path):
    """A folder nobody can create files in, root included (chattr +i; chmod for other users)."""
    folder = tmp_path / "read-only"
    folder.mkdir()
    if os.geteuid() == 0:
        subprocess.run(["chattr", "+i", str(folder)], check=True)
    else:
        folder.chmod(0o555)
    try:
        yield folder
    finally:
        if os.geteuid() == 0:
            subprocess.run(["chattr", "-i", str(folder)], check=True)
        else:
            folder.chmod(0o755)


# --- Help -----------------------------------------------------------------------------------


def test_help_and_version_answer_without_loading_tensorflow():
    for verb in ["", *sorted(set(parsers()) - {""})]:
        done = as_the_command(
            [verb, "--help"] if verb else ["--help"],
            'assert "tensorflow" not in sys.modules and "keras" not in sys.modules, "TensorFlow was imported"',
        )
        assert done.returncode == 0, (verb, done.stderr[-2000:])
        if verb:
            assert "examples:\n  kddpm " + verb in done.stdout or f"examples:\n  kddpm {verb}" in done.stdout, verb
    done = as_the_command(["--version"], 'assert "tensorflow" not in sys.modules')
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert done.returncode == 0 and done.stdout.strip() == f"kddpm {version}"


def test_every_option_has_help_and_says_its_default():
    for verb, parser in parsers().items():
        for action in parser._actions:
            if not action.option_strings or isinstance(action, (argparse._HelpAction, argparse._VersionAction)):
                continue
            assert action.help, f"kddpm {verb} {action.option_strings[0]} has no help"
            takes_value = action.nargs != 0 and not isinstance(action, argparse._StoreConstAction)
            if takes_value and not action.required and "required" not in action.help:
                assert "default" in action.help, f"kddpm {verb} {action.option_strings[0]}: say its default"


def test_the_cli_reference_page_is_the_parsers_help():
    done = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "write_cli_reference.py"), "--check"], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr


def documented_commands():
    """(file, verb, flags) for every `kddpm VERB ...` line in the README's and docs' code blocks."""
    for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "export" / "README.md"]:
        if path.name == "cli.md":
            continue
        text = path.read_text()
        for block in re.findall(r"```[a-z]*\n(.*?)```", text, flags=re.S):
            for line in block.replace("\\\n", " ").splitlines():
                match = re.match(r"\s*(?:\$\s*)?kddpm (\w+)(.*)", line)
                if match:
                    yield path.name, match.group(1), re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", match.group(2))


def test_documented_commands_use_options_that_exist():
    known = parsers()
    commands = list(documented_commands())
    assert len(commands) > 10  # the scan finds the README's commands
    for name, verb, flags in commands:
        assert verb in known, f"{name}: kddpm {verb} is not a command"
        missing = set(flags) - option_strings(known[verb])
        assert not missing, f"{name}: kddpm {verb} has no {sorted(missing)}"


def test_every_flag_a_message_names_exists():
    """Errors and help name flags as fixes; each flag named in kddpm's source must be one the parsers have."""
    known = set().union(*(option_strings(p) for p in parsers().values()))
    sys.path.insert(0, str(ROOT / "export"))
    import onnx_sample
    import rest_client

    known |= option_strings(onnx_sample.build_parser()) | option_strings(rest_client.build_parser())
    named = {}
    for path in (ROOT / "kddpm").rglob("*.py"):
        for flag in re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*[a-z0-9]", path.read_text()):
            named.setdefault(flag, path.relative_to(ROOT))
    unknown = {flag: str(where) for flag, where in named.items() if flag not in known}
    assert not unknown, f"flags named in messages but missing from the parsers: {unknown}"


# --- Checks before any work -------------------------------------------------------------------


def test_bad_arguments_are_answered_before_tensorflow_loads(tmp_path):
    model = tmp_path / "absent.keras"  # never read: every check below comes first
    cases = [
        (["sample", "--model", model, "--num", "0"], "--num must be a positive integer"),
        (["sample", "--model", model, "--sampler", "dpm++2m", "--eta", "0.5"], "add --sampler ddim"),
        (["sample", "--model", model, "--variance", "beta"], "add --sampler ddpm"),
        (["sample", "--model", model, "--out", tmp_path / "grid.gif"], "must end in .png or .jpg"),
        (["train", "--epochs", "2", "--steps-per-epoch", "5"], "--steps-per-epoch would have no effect"),
        (["train", "--eval-samples", "50"], "they go with --eval-every"),
        (["train", "--label-dropout", "0.3"], "it goes with --conditional"),
        (["evaluate", "--model", model, "--metrics", "fid", "--variance", "beta"], "they go with bpd in --metrics"),
        (["evaluate", "--model", model, "--metrics", "bpd", "--num-samples", "9"], "bits/dim draws no samples"),
        (["evaluate", "--model", model, "--weights", "w.h5"], "add --extractor inception"),
        (["export", "--model", model, "--format", "onnx", "--version", "3"], "add --format saved_model"),
    ]
    for argv, message in cases:
        done = as_the_command(argv, 'assert "tensorflow" not in sys.modules; sys.exit(code)')
        assert done.returncode == 2, (argv, done.stderr[-2000:])
        assert message in done.stderr and len(done.stderr.strip().splitlines()) == 1, (argv, done.stderr)


def test_a_read_only_out_is_refused_before_any_work(read_only_dir, tiny_model, tmp_path):
    for argv in (
        ["sample", "--model", tiny_model, "--out", read_only_dir / "grid.png"],
        ["sample", "--model", tiny_model, "--out", f"{read_only_dir}/images/"],
        ["sample", "--model", tiny_model, "--npz", read_only_dir / "a.npz", "--out", tmp_path / "g.png"],
        ["evaluate", "--model", tiny_model, "--out", read_only_dir / "scores.json"],
        ["export", "--model", tiny_model, "--out", read_only_dir],
    ):
        done = as_the_command(argv, 'assert "tensorflow" not in sys.modules; sys.exit(code)')
        assert done.returncode == 2, (argv, done.stderr[-2000:])
        assert "cannot write to" in done.stderr and "choose another --" in done.stderr, done.stderr
    done = kddpm("train", "--preset", "tiny", "--steps", "2", "--out", read_only_dir / "run")
    assert done.returncode == 2 and "cannot write to" in done.stderr and "choose another --out" in done.stderr
    assert "Data:" not in done.stdout  # refused before the data was read


def test_files_of_the_wrong_kind_are_named(tmp_path):
    onnx_file = tmp_path / "model.onnx"
    onnx_file.write_bytes(b"\x08\x07\x12\x07tf2onnx")
    done = kddpm("sample", "--model", onnx_file)
    assert done.returncode == 2 and "is an ONNX file" in done.stderr and "not a kddpm .keras model" in done.stderr
    saved_model = tmp_path / "exported" / "kddpm" / "1"
    saved_model.mkdir(parents=True)
    (saved_model / "saved_model.pb").write_bytes(b"")
    done = kddpm("sample", "--model", saved_model)
    assert done.returncode == 2 and "is an exported SavedModel" in done.stderr


# --- Outputs ------------------------------------------------------------------------------------


@pytest.mark.slow
def test_sample_writes_a_png_per_image_a_jpg_grid_and_the_arrays(tiny_model, tmp_path):
    folder = tmp_path / "images"
    done = kddpm("sample", "--model", tiny_model, "--num", 3, "--steps", 2, "--out", f"{folder}/", "--npz",
                 tmp_path / "a.npz")  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert sorted(p.name for p in folder.iterdir()) == ["0000.png", "0001.png", "0002.png", "grid.png"]
    arrays = np.load(tmp_path / "a.npz")
    images = arrays["images"]
    assert images.shape == (3, 28, 28, 1) and images.dtype == np.float32 and np.abs(images).max() <= 1
    for index in range(3):
        pixels = np.asarray(keras.utils.load_img(folder / f"{index:04d}.png", color_mode="grayscale"))
        np.testing.assert_array_equal(pixels, np.round((images[index, ..., 0] + 1) * 127.5).astype(np.uint8))
    assert done.stdout.strip().splitlines()[-1] == (
        f"Images: {folder}  Samples: {folder / 'grid.png'}  Arrays: {tmp_path / 'a.npz'}"
    )
    assert "\r" not in done.stdout and "\x1b[" not in done.stdout  # plain lines in a pipe
    done = kddpm("sample", "--model", tiny_model, "--num", 2, "--steps", 2, "--out", tmp_path / "grid.jpg")
    assert done.returncode == 0 and keras.utils.load_img(tmp_path / "grid.jpg").size[0] >= 512


@pytest.mark.slow
def test_info_describes_a_model(tmp_path):
    model = create_model(PRESETS["tiny"], seed=0, class_names=["cat", "dog"])
    model.save(tmp_path / "cond.keras")
    done = kddpm("info", tmp_path / "cond.keras")
    assert done.returncode == 0, done.stderr[-2000:]
    lines = dict(line.split(": ", 1) for line in done.stdout.strip().splitlines())
    assert lines["Images"] == "28x28x1, in [-1, 1]"
    assert lines["Network"].startswith(f"{model.denoiser.count_params():,} parameters")
    assert lines["Schedule"] == "linear, T = 1000, beta_start 0.0001, beta_end 0.02"
    assert lines["Classes"].startswith("2 (cat, dog)") and lines["Trained"].startswith("0 batches")
    assert lines["Sampling defaults"].startswith("dpm++2m, 20 steps, clip x0 on, guidance")
    assert lines["Precision"] == "float32"
    import kddpm as package

    assert lines["Written by"] == f"kddpm {package.__version__} (this is kddpm {package.__version__})"


@pytest.mark.slow
def test_ctrl_c_says_how_to_resume(tmp_path):
    out = tmp_path / "run"
    process = subprocess.Popen(
        [sys.executable, "-m", "kddpm.cli", "train", "--preset", "tiny", "--steps", "4000", "--steps-per-epoch",
         "2", "--out", str(out)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV,
    )  # fmt: skip
    try:
        for line in process.stdout:
            if line.startswith("Time: epoch 2/"):  # a backup exists
                break
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 130, stderr[-2000:]
    assert "Interrupted; training resumes from step" in stderr and "run the same command again" in stderr
    assert read_backup_state(out / "backup")["step"] >= 2
