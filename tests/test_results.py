"""Tests of dtprobe.results: loading, combining, pivoting and summarising analysis tables.

``synthetic_table`` builds a deterministic two-run (``ce``, ``ctc``), 16-epoch table with
every metric ``dtprobe analyze`` writes; test_plotting and test_report import it.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from dtprobe.errors import ConfigError, DtprobeError
from dtprobe.results import (
    TABLE_COLUMNS,
    Results,
    compare,
    estimator_unit,
    load_results,
    normalize_table,
    sort_layers,
)

EPOCHS = list(range(1, 17))
TASKS = ("colour", "orientation", "position", "size")
# (height, peak epoch) of each downstream probe; CE peaks early and falls fast, CTC later and slowly
PROBE_PEAKS = {
    "ce": {"colour": (0.95, 4), "orientation": (0.70, 10), "position": (0.85, 6),
           "size": (0.80, 8)},
    "ctc": {"colour": (0.93, 8), "orientation": (0.72, 14), "position": (0.86, 10),
            "size": (0.79, 12)},
}
PROBE_SLOPE = {"ce": 0.02, "ctc": 0.005}
MI_PARAMS = json.dumps({"alpha": 1.01, "kernel_width": 8.0, "n_samples": 1000}, sort_keys=True)


def source_accuracy(run: str, e: int) -> float:
    return 0.30 + 0.04 * (e - 1) if run == "ce" else 0.28 + 0.035 * (e - 1)


def probe_accuracy(run: str, task: str, e: int) -> float:
    height, peak = PROBE_PEAKS[run][task]
    return height - PROBE_SLOPE[run] * abs(e - peak)


def nc1(run: str, e: int) -> float:
    return (5.0 if run == "ce" else 7.0) / e


def cka_matrix(n: int = 16, scale: float = 6.0) -> pd.DataFrame:
    idx = pd.Index(range(1, n + 1), name="epoch")
    e = np.arange(1, n + 1)
    return pd.DataFrame(np.exp(-np.abs(e[:, None] - e[None, :]) / scale), index=idx, columns=idx)


def synthetic_table(runs: tuple[str, ...] = ("ce", "ctc"), epochs: list[int] | None = None,
                    metrics: set[str] | None = None) -> pd.DataFrame:
    """Deterministic tidy table shaped like ``RUN_DIR/analysis/metrics.csv``.

    ``metrics`` keeps a subset of metric names (all when None).
    """
    epochs = EPOCHS if epochs is None else epochs
    rows: list[dict] = []

    def add(run, e, metric, value, task="", layer="", estimator="", params=""):
        if metrics is None or metric in metrics:
            rows.append({"run": run, "epoch": e, "step": 100 * e, "metric": metric, "task": task,
                         "layer": layer, "value": value, "estimator": estimator,
                         "params": params})

    last = epochs[-1]
    for run in runs:
        k = 0 if run == "ce" else 1
        for e in epochs:
            add(run, e, "source_accuracy", source_accuracy(run, e))
            add(run, e, "class_separation", 0.1 + (0.03 - 0.01 * k) * (e - 1))
            add(run, e, "knn_accuracy", 0.25 + (0.035 - 0.005 * k) * (e - 1))
            for j, t in enumerate(TASKS):
                add(run, e, "probe_accuracy", probe_accuracy(run, t, e), task=t,
                    estimator="logreg_lbfgs", params=json.dumps({"C": 1.0}))
                add(run, e, "logme", -1.0 + 0.01 * e - 0.003 * k * e - 0.05 * j, task=t)
                add(run, e, "h_score", 2.0 + 0.1 * math.sin(e / 3 + k) + 0.05 * j, task=t)
                add(run, e, "leep", -2.0 + (0.05 - 0.02 * k) * e - 0.1 * j, task=t)
                add(run, e, "nce", -1.5 + (0.04 - 0.01 * k) * e - 0.1 * j, task=t)
                add(run, e, "transrate", 0.5 + (0.02 - 0.005 * k) * e + 0.03 * j, task=t)
                add(run, e, "gbc", -20.0 + (1.0 - 0.3 * k) * e - j, task=t)
            add(run, e, "cka_to_final", 1.0 - (0.05 - 0.02 * k) * (last - e))
            for i, layer in enumerate(("layer1", "layer2", "layer3", "layer4")):
                add(run, e, "cka_to_final", 1.0 - (0.01 + 0.01 * i + 0.005 * k) * (last - e),
                    layer=layer)
            if e != epochs[0]:
                add(run, e, "cka_to_previous", 0.80 + (0.01 + 0.002 * k) * e)
            for other in runs:
                if other != run:
                    add(run, e, "cka_to_run", 0.4 + 0.02 * e, task=other)
            add(run, e, "nc1", nc1(run, e))
            add(run, e, "nc2_equinorm", (0.5 + 0.2 * k) / e)
            add(run, e, "nc2_equiangularity", (0.3 + 0.1 * k) / e)
            add(run, e, "nc2_etf_error", (0.8 + 0.3 * k) / e)
            add(run, e, "nc3", (0.9 + 0.2 * k) / e)
            add(run, e, "nc4", (0.2 + 0.1 * k) / e)
            add(run, e, "rankme", 60.0 - 2.0 * e + 3 * k)
            add(run, e, "mi_xt", 6.0 - 0.1 * e + 0.5 * k + (0.1 * e if e < 5 else 0.4),
                estimator="renyi", params=MI_PARAMS)
            add(run, e, "mi_ty", min(3.2, 0.8 + 0.2 * e) - 0.1 * k, estimator="renyi",
                params=MI_PARAMS)
    return pd.DataFrame(rows, columns=list(TABLE_COLUMNS))


def manifest(run: str) -> dict:
    return {
        "run_name": run,
        "model": {"arch": "small_cnn", "num_classes": 4, "feature_dim": 128},
        "dataset": {"name": "shapes", "image_size": 32, "n_train": 6000},
        "training": {"objective": run, "epochs": 16, "lr": 0.05, "batch_size": 64,
                     **({"alpha": 0.5, "tau1": 0.1, "stage1_epochs": 10} if run == "ctc" else {})},
        "seed": 0,
        "checkpoints": [{"epoch": e, "step": 100 * e, "path": f"ckpt/epoch_{e:03d}.pt",
                         "sha256": "0" * 64} for e in EPOCHS],
    }


def write_run(root: Path, run: str, *, with_cka: bool = True, with_manifest: bool = True,
              table: pd.DataFrame | None = None) -> Path:
    """Write a run directory the way ``dtprobe analyze`` does; return its path."""
    run_dir = root / run
    (run_dir / "analysis").mkdir(parents=True)
    t = synthetic_table() if table is None else table
    t[t["run"] == run].to_csv(run_dir / "analysis" / "metrics.csv", index=False)
    if with_cka:
        cka_matrix().to_csv(run_dir / "analysis" / "cka_matrix.csv")
    if with_manifest:
        (run_dir / "manifest.json").write_text(json.dumps(manifest(run)))
    return run_dir


@pytest.fixture
def results() -> Results:
    return Results(synthetic_table(), manifests={r: manifest(r) for r in ("ce", "ctc")},
                   cka={"ce": cka_matrix(), "ctc": cka_matrix(scale=10.0)})


# ---------------------------------------------------------------------------- construction
def test_constructor_normalises_and_keeps_order(results):
    assert results.runs == ["ce", "ctc"]
    assert list(results.table.columns) == list(TABLE_COLUMNS)
    assert results.table["epoch"].dtype == np.int64
    assert results.table["value"].dtype == np.float64
    assert results.metrics[:3] == ["source_accuracy", "class_separation", "probe_accuracy"]
    assert results.tasks() == list(TASKS)
    assert results.tasks("cka_to_run") == []  # a legacy table's other run moved out of `task`
    cka_run = results.table[results.table["metric"] == "cka_to_run"]
    assert sorted(cka_run["other_run"].unique()) == ["ce", "ctc"]
    assert results.epochs("ce") == EPOCHS
    assert "ce" in repr(results) and "epochs 1..16" in repr(results)


def test_constructor_fills_optional_columns():
    t = pd.DataFrame({"run": ["a", "a"], "epoch": [1.0, 2.0], "metric": ["m", "m"],
                      "value": ["0.5", "nan"]})
    r = Results(t)
    assert r.table["task"].tolist() == ["", ""]
    assert r.table["epoch"].tolist() == [1, 2]
    assert r.table["value"].iloc[0] == 0.5 and math.isnan(r.table["value"].iloc[1])
    assert r.table["step"].isna().all()


def test_constructor_rejects_bad_tables():
    with pytest.raises(DtprobeError, match="lacks column"):
        Results(pd.DataFrame({"run": ["a"], "epoch": [1]}))
    with pytest.raises(DtprobeError, match="not an integer"):
        normalize_table(pd.DataFrame({"run": ["a"], "epoch": [1.5], "metric": ["m"],
                                      "value": [1.0]}))


# ---------------------------------------------------------------------------- wide
def test_wide_single_run_exact_values(results):
    w = results.wide("ce")
    assert list(w.index) == EPOCHS and w.index.name == "epoch"
    assert w.columns[0] == "source_accuracy"
    for e in (1, 7, 16):
        assert w.loc[e, "source_accuracy"] == pytest.approx(source_accuracy("ce", e), abs=1e-12)
        for t in TASKS:
            assert w.loc[e, f"probe_accuracy[{t}]"] == pytest.approx(
                probe_accuracy("ce", t, e), abs=1e-12)
    assert w.loc[16, "cka_to_final@layer2"] == pytest.approx(1.0)
    assert w.loc[1, "cka_to_final@layer2"] == pytest.approx(1.0 - 0.02 * 15)
    assert w.loc[3, "cka_to_run[vs ctc]"] == pytest.approx(0.46)
    assert math.isnan(w.loc[1, "cka_to_previous"])  # no previous epoch
    # layer-wise columns come after the penultimate one
    cols = list(w.columns)
    assert cols.index("cka_to_final") < cols.index("cka_to_final@layer1") < cols.index(
        "cka_to_final@layer4")


def test_wide_task_selection_and_multi_run(results):
    w = results.wide("ctc", task="position")
    assert "probe_accuracy" in w.columns and "probe_accuracy[colour]" not in w.columns
    assert w.loc[10, "probe_accuracy"] == pytest.approx(0.86)
    assert w.loc[2, "logme"] == pytest.approx(-1.0 + 0.02 - 0.006 - 0.1)
    both = results.wide()
    assert both.index.names == ["run", "epoch"] and len(both) == 32
    assert both.loc[("ctc", 16), "source_accuracy"] == pytest.approx(source_accuracy("ctc", 16))
    with pytest.raises(ConfigError, match="task 'texture'"):
        results.wide("ce", task="texture")
    with pytest.raises(ConfigError, match="available runs: ce, ctc"):
        results.wide("nope")


def test_wide_names_estimators_when_several_and_averages_duplicates():
    t = pd.DataFrame([
        {"run": "a", "epoch": 1, "metric": "mi_xt", "value": 1.0, "estimator": "renyi"},
        {"run": "a", "epoch": 1, "metric": "mi_xt", "value": 3.0, "estimator": "mine"},
        {"run": "a", "epoch": 1, "metric": "rankme", "value": 2.0},
        {"run": "a", "epoch": 1, "metric": "rankme", "value": 4.0},
    ])
    w = Results(t).wide()
    assert w.loc[1, "mi_xt(renyi)"] == 1.0 and w.loc[1, "mi_xt(mine)"] == 3.0
    assert w.loc[1, "rankme"] == 3.0


# ---------------------------------------------------------------------------- summary
def test_summary_first_best_last_exact(results):
    s = results.summary().set_index(["run", "metric", "task", "layer", "estimator"])
    src = s.loc[("ce", "source_accuracy", "", "", "")]
    assert (src.first_epoch, src.best_epoch, src.last_epoch) == (1, 16, 16)
    assert src["first"] == pytest.approx(0.30) and src["last"] == pytest.approx(0.90)
    assert src["best"] == pytest.approx(0.90) and src["best_is"] == "max"
    assert src["change"] == pytest.approx(0.60)
    for run in ("ce", "ctc"):
        for t in TASKS:
            row = s.loc[(run, "probe_accuracy", t, "", "logreg_lbfgs")]
            height, peak = PROBE_PEAKS[run][t]
            assert row.best_epoch == peak
            assert row["best"] == pytest.approx(height, abs=1e-12)
            assert row["first"] == pytest.approx(probe_accuracy(run, t, 1), abs=1e-12)
            assert row["last"] == pytest.approx(probe_accuracy(run, t, 16), abs=1e-12)
    # neural collapse: lower is better, so "best" is the minimum
    n = s.loc[("ctc", "nc1", "", "", "")]
    assert n["best_is"] == "min" and n.best_epoch == 16 and n["best"] == pytest.approx(7 / 16)
    # cka_to_previous starts at epoch 2
    assert s.loc[("ce", "cka_to_previous", "", "", "")].first_epoch == 2
    # layer-wise rows are summarised separately
    assert s.loc[("ce", "cka_to_final", "", "layer3", "")]["first"] == pytest.approx(1 - 0.03 * 15)
    assert len(s) == len(results.table.groupby(["run", "metric", "task", "layer", "estimator"]))


def test_summary_skips_nan_and_breaks_ties_early():
    t = pd.DataFrame({"run": "a", "epoch": [1, 2, 3, 4], "metric": "source_accuracy",
                      "value": [np.nan, 0.5, 0.7, 0.7]})
    row = Results(t).summary().iloc[0]
    assert (row.first_epoch, row["first"], row.best_epoch, row.last_epoch) == (2, 0.5, 3, 4)


def test_probe_peaks(results):
    p = results.probe_peaks().set_index(["run", "task"])
    assert len(p) == 8
    r = p.loc[("ce", "colour")]
    assert r.peak_epoch == 4 and r.peak == pytest.approx(0.95)
    assert r["drop"] == pytest.approx(0.02 * 12)
    assert r.source_at_peak == pytest.approx(source_accuracy("ce", 4))
    assert r.source_last == pytest.approx(0.90)
    assert p.loc[("ctc", "orientation")].peak_epoch == 14


def test_summary_and_wide_on_metric_subsets():
    r = Results(synthetic_table(metrics={"nc1"}))
    assert list(r.wide("ce").columns) == ["nc1"]
    assert r.probe_peaks().empty
    assert set(r.summary()["metric"]) == {"nc1"}


def test_estimators_table():
    t = synthetic_table(metrics={"mi_xt", "mi_ty", "probe_accuracy", "nc1"})
    t.loc[t["metric"] == "probe_accuracy", "params"] = [
        json.dumps({"C": float(i % 3), "grid_size": 45}) for i in range(
            int((t["metric"] == "probe_accuracy").sum()))]
    e = Results(t).estimators().set_index("metric")
    assert list(e.index) == ["probe_accuracy", "mi_xt", "mi_ty"]  # nc1 has no estimator
    assert json.loads(e.loc["mi_xt", "settings"]) == json.loads(MI_PARAMS)
    assert e.loc["mi_xt", "varying"] == ""
    assert json.loads(e.loc["probe_accuracy", "settings"]) == {"grid_size": 45}
    assert e.loc["probe_accuracy", "varying"] == ""  # C is computed: a diagnostic
    assert e.loc["probe_accuracy", "diagnostics"] == "C"


def test_helpers():
    assert sort_layers(["layer10", "", "layer2"]) == ["layer2", "layer10", ""]
    assert estimator_unit("renyi") == "bits" and estimator_unit("mine") == "nats"
    assert estimator_unit("mine", {"base": 2}) == "bits"
    assert estimator_unit("whatever") == ""


# ---------------------------------------------------------------------------- disk
def test_load_results_round_trip(tmp_path):
    run_dir = write_run(tmp_path, "ce")
    r = load_results(run_dir)
    expected = Results(synthetic_table()).table
    expected = expected[expected["run"] == "ce"].reset_index(drop=True)
    pd.testing.assert_frame_equal(r.table, expected)
    assert r.runs == ["ce"]
    assert r.manifests["ce"]["training"]["objective"] == "ce"
    pd.testing.assert_frame_equal(r.cka_matrices["ce"], cka_matrix(), check_names=False)
    assert list(r.cka_matrices["ce"].index) == EPOCHS
    assert r.sources["ce"] == run_dir
    # the analysis directory and the CSV itself work too
    assert load_results(run_dir / "analysis").runs == ["ce"]
    assert load_results(run_dir / "analysis" / "metrics.csv").manifests["ce"]["seed"] == 0


def test_load_keeps_empty_strings_and_odd_task_names(tmp_path):
    t = synthetic_table(runs=("ce",), metrics={"probe_accuracy"})
    t.loc[t["task"] == "size", "task"] = "NA"  # must not become NaN
    run_dir = write_run(tmp_path, "ce", table=t, with_cka=False, with_manifest=False)
    r = load_results(run_dir)
    assert "NA" in r.tasks() and (r.table["layer"] == "").all()
    assert r.manifests == {} and r.cka_matrices == {}


def test_missing_analysis_error(tmp_path):
    with pytest.raises(DtprobeError, match=r"no analysis in .*; run `dtprobe analyze .*` first"):
        load_results(tmp_path / "nothing")
    (tmp_path / "bad" / "analysis").mkdir(parents=True)
    (tmp_path / "bad" / "analysis" / "metrics.csv").write_text("run,epoch\nx,1\n")
    with pytest.raises(DtprobeError, match="lacks column"):
        load_results(tmp_path / "bad")
    run_dir = write_run(tmp_path, "ce")
    (run_dir / "manifest.json").write_text("{broken")
    with pytest.raises(DtprobeError, match="manifest.json is not valid JSON"):
        load_results(run_dir)


def test_compare_combines_and_deduplicates(tmp_path):
    a = write_run(tmp_path / "a", "ce")
    b = write_run(tmp_path / "b", "ctc")
    r = compare([a, b])
    assert r.runs == ["ce", "ctc"]
    assert set(r.manifests) == {"ce", "ctc"} and set(r.cka_matrices) == {"ce", "ctc"}
    assert len(r.table) == len(synthetic_table())
    same = load_results([a, a, a])
    assert same.runs == ["ce", "ce-2", "ce-3"]
    assert set(same.manifests) == {"ce", "ce-2", "ce-3"}
    assert same.wide("ce-3").equals(same.wide("ce"))
    assert same.failures.empty
    mixed = compare([Results(synthetic_table(runs=("ce",))), a])
    assert mixed.runs == ["ce", "ce-2"]
    with pytest.raises(ConfigError):
        compare([])


def test_failures_are_loaded_and_renamed(tmp_path):
    run_dir = write_run(tmp_path, "ce")
    pd.DataFrame([{"run": "ce", "epoch": 3, "path": "ckpt/epoch_003.pt",
                   "reason": "sha256 mismatch"}]).to_csv(
        run_dir / "analysis" / "failures.csv", index=False)
    r = load_results(run_dir)
    assert r.failures.to_dict("records") == [{"run": "ce", "epoch": "3",
                                              "path": "ckpt/epoch_003.pt",
                                              "reason": "sha256 mismatch"}]
    twice = compare([run_dir, run_dir])
    assert twice.failures["run"].tolist() == ["ce", "ce-2"]
    assert Results(synthetic_table()).failures.empty
