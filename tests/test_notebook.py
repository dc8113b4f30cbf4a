"""The notebooks run from top to bottom in a fresh kernel and show what they promise."""

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = Path(__file__).parents[1] / "notebooks"


def execute(name, tmp_path, monkeypatch, setting, **env):
    """Runs notebooks/NAME in a new kernel in tmp_path, with the first code cell's ``setting``
    ("NAME = value" as a user would edit it) switched to its tiny value; returns every code
    cell's outputs."""
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
    first = next(cell for cell in notebook.cells if cell.cell_type == "code")
    line, tiny = setting
    assert line in first.source, f"{name}'s first code cell no longer sets {line}"
    first.source = first.source.replace(line, tiny)
    NotebookClient(
        notebook, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    ).execute()
    outputs = [output for cell in notebook.cells if cell.cell_type == "code" for output in cell.get("outputs", [])]
    assert not [o for o in outputs if o.output_type == "error"]
    assert any("image/png" in o.get("data", {}) for o in outputs)
    return outputs


def text_of(outputs):
    return "".join(o.get("text", "") + o.get("data", {}).get("text/plain", "") for o in outputs)


@pytest.mark.slow
def test_quickstart_notebook_executes(tmp_path, monkeypatch):
    outputs = execute("quickstart.ipynb", tmp_path, monkeypatch, ("TINY = False", "TINY = True"))
    assert (tmp_path / "quickstart_samples.png").is_file() and (tmp_path / "quickstart.keras").is_file()
    text = text_of(outputs)
    assert "loss" in text and "np.True_" in text  # the reloaded model draws the same images


@pytest.mark.slow
def test_evaluate_notebook_executes(tmp_path, monkeypatch):
    outputs = execute(
        "evaluate.ipynb", tmp_path, monkeypatch, ("MODEL = None", "MODEL = None"), KDDPM_CACHE=str(tmp_path / "cache")
    )
    for expected in ("FID", "KID", "precision / recall", "'total'", "'decoder'"):
        assert expected in text_of(outputs), expected
    assert (tmp_path / "evaluate_trajectory.png").is_file()


@pytest.mark.slow
def test_conditional_notebook_executes(tmp_path, monkeypatch):
    outputs = execute("conditional.ipynb", tmp_path, monkeypatch, ("TINY = False", "TINY = True"))
    for name in ("conditional_classes.png", "conditional_guidance.png", "conditional.keras"):
        assert (tmp_path / name).is_file(), name
    text = text_of(outputs)
    assert "'x_t', 't', 'label'" in text and "'Ankle boot'" in text


@pytest.mark.slow
def test_editing_notebook_executes(tmp_path, monkeypatch):
    outputs = execute("editing.ipynb", tmp_path, monkeypatch, ("TINY = False", "TINY = True"))
    for name in ("strength", "inpaint", "interpolation", "inversion"):
        assert (tmp_path / f"editing_{name}.png").is_file(), name
    text = text_of(outputs)
    kept = float(text.split("largest change in the kept half:")[1].split()[0])
    assert kept < 1e-5 and "reconstruction PSNR:" in text
