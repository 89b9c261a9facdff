"""examples/objectives.ipynb (a sweep over objectives on the embedded data) runs at tiny size."""

from __future__ import annotations

from pathlib import Path

import nbformat
import pandas as pd
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "examples" / "objectives.ipynb"


def test_objectives_notebook_outputs_are_stripped_in_git():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code")


def test_objectives_notebook_executes(tmp_path):
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = NotebookClient(nb, timeout=900, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}})
    client.execute()
    images = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
              if "image/png" in o.get("data", {})]
    assert len(images) >= 3, "the notebook should display the two sweep charts and the curves"
    summary = pd.read_csv(tmp_path / "runs" / "objectives" / "sweep_summary.csv")
    assert list(summary["objective"]) == ["ce", "label_smoothing", "sigmoid", "supcon"]
    assert (summary["seeds"] == 2).all()
    assert summary[["source_accuracy", "class_separation", "transfer"]].notna().all().all()
