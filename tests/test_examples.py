"""The examples run end to end: the notebook (via nbclient) and the external-run script."""

from __future__ import annotations

import shutil
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]
CHANCE_MARGIN = 0.25  # the shapes source task has 6 balanced classes: chance is 0.167


def test_notebook_outputs_are_stripped_in_git():
    nb = nbformat.read(ROOT / "examples" / "tradeoff.ipynb", as_version=4)
    assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code")


@pytest.mark.slow  # trains two 10-epoch runs: minutes on two cores
def test_tradeoff_notebook_executes(tmp_path):
    nb = nbformat.read(ROOT / "examples" / "tradeoff.ipynb", as_version=4)
    client = NotebookClient(nb, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}})
    client.execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) >= 3, "the notebook should display its charts"
    streams = "".join(o.get("text", "") for o in outputs if o.get("output_type") == "stream")
    assert "TqdmWarning" not in streams and "IProgress" not in streams, streams
    run = tmp_path / "runs" / "notebook-small"
    import pandas as pd

    for name in ("ce", "ctc"):
        t = pd.read_csv(run / name / "analysis" / "metrics.csv")
        src = t[t["metric"] == "source_accuracy"].sort_values("epoch")["value"]
        # the small setting learns the shape task: it ends well above chance (1/6)
        assert src.iloc[-1] > CHANCE_MARGIN, (name, src.tolist())


@pytest.mark.slow
def test_external_run_example(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    shutil.copy(ROOT / "examples" / "analyze_external_run.py", tmp_path)
    import runpy

    monkeypatch.setattr("sys.argv", ["analyze_external_run.py", "--epochs", "1"])
    runpy.run_path(str(tmp_path / "analyze_external_run.py"), run_name="__main__")
    assert (tmp_path / "runs" / "external" / "analysis" / "metrics.csv").exists()
