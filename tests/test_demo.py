"""The demo writes the README's table from its own results (issue 16, section 5)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pandas as pd
import pytest
import torch

from dtprobe import demo
from dtprobe.errors import ConfigError
from dtprobe.results import Results

ROOT = Path(__file__).resolve().parents[1]


def _results() -> Results:
    rows = []
    for run, probe_last in (("ce", 0.30), ("ctc", 0.36)):
        for epoch, src, colour in ((0, 0.17, 0.40), (2, 0.60, 0.89), (4, 0.95, probe_last)):
            rows.append({"run": run, "epoch": epoch, "metric": "source_accuracy",
                         "value": src - (0.01 if run == "ctc" else 0)})
            rows.append({"run": run, "epoch": epoch, "metric": "probe_accuracy",
                         "task": "colour", "value": colour})
            rows.append({"run": run, "epoch": epoch, "metric": "probe_accuracy", "task": "size",
                         "value": 0.5 + epoch / 100})
    return Results(pd.DataFrame(rows))


def test_table_and_finding_come_from_the_results():
    res = _results()
    table = demo.demo_table(res)
    lines = table.splitlines()
    assert lines[0].startswith("| run | source accuracy") and "colour probe" in lines[0]
    assert lines[2] == ("| CE | 0.170 (epoch 0) -> 0.950 (epoch 4) | 0.890 (2) -> 0.300 | "
                        "0.540 (4) -> 0.540 |")
    assert lines[3].startswith("| CTC | 0.160 (epoch 0) -> 0.940 (epoch 4) | 0.890 (2) -> 0.360")
    finding = demo.demo_finding(res)
    # these rows carry no interval, so no difference is judged (see test_uncertainty)
    assert finding.startswith("Last-epoch probes, CTC minus CE [95% interval of the "
                              "difference]: colour +0.060, size +0.000. 2 probes without an "
                              "interval: differences not judged")
    assert finding.endswith("; source accuracy -0.010.")


def test_update_readme_between_markers(tmp_path):
    res = _results()
    info = {"cpu": "test cpu", "torch_threads": 2}
    table = demo.write_table_file(res, tmp_path, info, wall_s=125.4)
    text = table.read_text()
    assert "Wall time 2 min 05 s" in text and "torch_threads 2" in text
    readme = tmp_path / "README.md"
    shutil.copy(ROOT / "README.md", readme)  # the real README carries the markers
    before = readme.read_text()
    demo.update_readme_markers(readme, table)
    after = readme.read_text()
    assert demo.demo_table(res) in after and after.count(demo.BEGIN_MARKER) == 1
    head, tail = before.split(demo.BEGIN_MARKER)[0], before.split(demo.END_MARKER)[1]
    assert after.startswith(head) and after.endswith(tail)  # nothing else changed
    demo.update_readme_markers(readme, table)
    assert readme.read_text() == after  # idempotent
    readme.write_text("no markers here\n")
    with pytest.raises(ConfigError, match="no demo markers"):
        demo.update_readme_markers(readme, table)


def test_fixed_threads_restores_and_conditions_are_recorded():
    before = torch.get_num_threads()
    with demo.fixed_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    info = demo.conditions("cpu")
    assert {"cpu", "cores", "usable_cores", "torch_threads", "load_average_1min", "torch",
            "numpy"} <= set(info)


def test_notebook_full_setting_is_the_demo():
    cfgs = demo.demo_configs(Path("x"))
    assert cfgs["ce"].dataset_params == demo.DEMO_DATA and cfgs["ce"].epochs == demo.DEMO_EPOCHS
    assert cfgs["ctc"].ctc["preset"] == demo.DEMO_CTC["preset"]
    nb = (ROOT / "examples" / "tradeoff.ipynb").read_text()
    assert "demo_configs" in nb  # the notebook's full setting is built by the demo's function


def test_quick_demo_ctc_negatives_fit_its_small_data():
    # --quick trains on 600 images of 6 shapes: the other-class pool is ~500, so the full
    # demo's 1024 negatives would be clipped with a warning a newcomer cannot act on
    full = demo.demo_configs(Path("x"))["ctc"].ctc["nce_k"]
    quick = demo.demo_configs(Path("x"), quick=True)["ctc"].ctc["nce_k"]
    assert full == demo.DEMO_CTC["nce_k"] == 1024
    assert quick == demo.QUICK_DATA["n_train"] // 2
