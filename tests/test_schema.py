"""The results table's schema (issue 16, section 4): other_run and diagnostics columns, legacy
tables read as the current schema, CKA has no "best", and the schema is documented."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from dtprobe.results import Results, load_results
from dtprobe.table import COLUMN_DOCS, DIAGNOSTIC_KEYS, TABLE_COLUMNS, normalize_table, split_params

# a metrics.csv as written before the other_run / diagnostics columns existed
LEGACY_CSV = """\
run,epoch,step,metric,task,layer,value,estimator,params
ce,0,0,source_accuracy,,,0.17,head-top1,"{""split"": ""test""}"
ce,0,0,probe_accuracy,colour,,0.5,logreg-lbfgs,"{""C"": 0.1, \
""grid_size"": 5, ""val_accuracy"": 0.48}"
ce,0,,cka_to_run,ctc,,1.0,linear_cka,"{""kernel"": ""linear"", \
""other_run"": ""/runs/ctc"", ""split"": ""test""}"
ce,2,40,cka_to_run,ctc,,0.9,linear_cka,"{""kernel"": ""linear"", \
""other_run"": ""/runs/ctc"", ""split"": ""test""}"
ce,2,40,mi_xt,,,3.2,renyi,"{""alpha"": 1.01, ""entropy_a"": 7.1, ""sigma_a"": 0.8, ""n"": 1000}"
"""


@pytest.fixture
def legacy_run(tmp_path: Path) -> Path:
    run = tmp_path / "ce"
    (run / "analysis").mkdir(parents=True)
    (run / "analysis" / "metrics.csv").write_text(LEGACY_CSV)
    return run


def test_every_column_is_documented_in_code_and_contributing():
    assert set(COLUMN_DOCS) == set(TABLE_COLUMNS)
    text = (Path(__file__).resolve().parents[1] / "CONTRIBUTING.md").read_text()
    section = text.split("## The results table", 1)[1]
    for column in TABLE_COLUMNS:
        assert f"`{column}`" in section, column


def test_split_params_moves_computed_values():
    settings, diag = split_params({"C": 0.1, "grid_size": 45, "val_accuracy": 0.9,
                                   "other_run": "/r", "alpha": 1.01, "entropy_a": 3.0})
    assert settings == {"grid_size": 45, "alpha": 1.01}
    assert diag == {"C": 0.1, "val_accuracy": 0.9, "other_run_dir": "/r", "entropy_a": 3.0}
    assert {"C", "val_accuracy", "sigma_a", "entropy_b", "chance"} <= DIAGNOSTIC_KEYS


def test_legacy_table_reads_as_the_current_schema(legacy_run):
    res = load_results(legacy_run)
    t = res.table
    assert list(t.columns) == list(TABLE_COLUMNS)
    cka = t[t["metric"] == "cka_to_run"]
    assert cka["task"].tolist() == ["", ""] and cka["other_run"].tolist() == ["ctc", "ctc"]
    assert [json.loads(d) for d in cka["diagnostics"]] == [{"other_run_dir": "/runs/ctc"}] * 2
    assert json.loads(cka["params"].iloc[0]) == {"kernel": "linear", "split": "test"}
    probe = t[t["metric"] == "probe_accuracy"].iloc[0]
    assert json.loads(probe["params"]) == {"grid_size": 5}
    assert json.loads(probe["diagnostics"]) == {"C": 0.1, "val_accuracy": 0.48}
    mi = t[t["metric"] == "mi_xt"].iloc[0]
    assert json.loads(mi["params"]) == {"alpha": 1.01}
    assert json.loads(mi["diagnostics"]) == {"entropy_a": 7.1, "n": 1000, "sigma_a": 0.8}
    assert res.wide().loc[2, "cka_to_run[vs ctc]"] == pytest.approx(0.9)
    assert res.tasks("cka_to_run") == []
    est = res.estimators().set_index("metric")
    assert json.loads(est.loc["mi_xt", "settings"]) == {"alpha": 1.01}
    assert est.loc["mi_xt", "diagnostics"] == "entropy_a, n, sigma_a"


def test_migration_is_idempotent(legacy_run):
    once = load_results(legacy_run).table
    twice = normalize_table(once.copy())
    pd.testing.assert_frame_equal(once, twice)


def test_cka_has_no_best_in_the_summary():
    rows = [{"run": "ce", "epoch": e, "metric": "cka_to_run", "other_run": "ctc",
             "value": v} for e, v in [(0, 1.0), (2, 0.8), (4, 0.6)]]
    rows += [{"run": "ce", "epoch": e, "metric": "cka_to_final", "value": v}
             for e, v in [(0, 0.3), (2, 0.7), (4, 1.0)]]
    rows += [{"run": "ce", "epoch": e, "metric": "source_accuracy", "value": v}
             for e, v in [(0, 0.2), (2, 0.9), (4, 0.8)]]
    s = Results(pd.DataFrame(rows)).summary().set_index("metric")
    for m in ("cka_to_run", "cka_to_final"):
        assert s.loc[m, "best_is"] == "" and np.isnan(s.loc[m, "best"])
        assert np.isnan(s.loc[m, "best_epoch"])
    assert s.loc["cka_to_run", "other_run"] == "ctc" and s.loc["cka_to_run", "last"] == 0.6
    assert s.loc["source_accuracy", "best_epoch"] == 2 and s.loc["source_accuracy", "best"] == 0.9
