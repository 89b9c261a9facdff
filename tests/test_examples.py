"""The examples run end to end: the notebook (via nbclient) and the external-run script."""

from __future__ import annotations

import shutil
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]


def test_notebook_outputs_are_stripped_in_git():
    nb = nbformat.read(ROOT / "examples" / "tradeoff.ipynb", as_version=4)
    assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code")


def test_tradeoff_notebook_executes(tmp_path):
    nb = nbformat.read(ROOT / "examples" / "tradeoff.ipynb", as_version=4)
    client = NotebookClient(nb, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}})
    client.execute()
    images = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
              if "image/png" in o.get("data", {})]
    assert len(images) >= 3, "the notebook should display its charts"
    assert (tmp_path / "runs" / "notebook" / "ce" / "analysis" / "metrics.csv").exists()


@pytest.mark.slow
def test_external_run_example(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    shutil.copy(ROOT / "examples" / "analyze_external_run.py", tmp_path)
    import runpy

    monkeypatch.setattr("sys.argv", ["analyze_external_run.py", "--epochs", "1"])
    runpy.run_path(str(tmp_path / "analyze_external_run.py"), run_name="__main__")
    assert (tmp_path / "runs" / "external" / "analysis" / "metrics.csv").exists()
