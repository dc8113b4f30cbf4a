"""The quickstart notebook runs from top to bottom and shows a sample grid."""

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOK = Path(__file__).parents[1] / "notebooks" / "quickstart.ipynb"


@pytest.mark.slow
def test_quickstart_notebook_executes(tmp_path, monkeypatch):
    monkeypatch.setenv("KDDPM_QUICKSTART_TINY", "1")
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(
        notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    ).execute()
    outputs = [output for cell in notebook.cells if cell.cell_type == "code" for output in cell.get("outputs", [])]
    assert not [o for o in outputs if o.output_type == "error"]
    assert any("image/png" in o.get("data", {}) for o in outputs)
    assert (tmp_path / "quickstart_samples.png").is_file()
    assert "loss" in "".join(o.get("text", "") for o in outputs)


EVALUATE = Path(__file__).parents[1] / "notebooks" / "evaluate.ipynb"


@pytest.mark.slow
def test_evaluate_notebook_executes(tmp_path, monkeypatch):
    monkeypatch.setenv("KDDPM_EVALUATE_TINY", "1")
    monkeypatch.setenv("KDDPM_CACHE", str(tmp_path / "cache"))
    notebook = nbformat.read(EVALUATE, as_version=4)
    NotebookClient(
        notebook, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    ).execute()
    outputs = [output for cell in notebook.cells if cell.cell_type == "code" for output in cell.get("outputs", [])]
    assert not [o for o in outputs if o.output_type == "error"]
    text = "".join(o.get("text", "") for o in outputs) + "".join(
        o.get("data", {}).get("text/plain", "") for o in outputs
    )
    for expected in ("FID", "KID", "precision / recall", "'total'", "'decoder'"):
        assert expected in text, expected
    assert any("image/png" in o.get("data", {}) for o in outputs)
    assert (tmp_path / "evaluate_trajectory.png").is_file()
