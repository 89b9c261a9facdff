"""Intervals in the results table: run differences beyond them, bands in charts, the report."""

from __future__ import annotations

import json

import matplotlib.pyplot as plt
import pandas as pd
from matplotlib.collections import PolyCollection

from dtprobe.plotting import plot_cka_to_final, plot_metrics, plot_tradeoff_over_epochs
from dtprobe.results import Results
from dtprobe.results.report import render_report
from dtprobe.results.uncertainty import chance_level, intervals, run_differences


def _table() -> pd.DataFrame:
    rows = []
    for run, shift in (("a", 0.0), ("b", 0.2)):
        for epoch in (1, 2, 3):
            acc = 0.5 + 0.05 * epoch + (shift if epoch == 3 else 0.0)
            rows.append({"run": run, "epoch": epoch, "step": None, "metric": "probe_accuracy",
                         "task": "colour", "layer": "", "value": acc, "estimator": "linear",
                         "params": json.dumps({"ci_low": acc - 0.05, "ci_high": acc + 0.05})})
            rows.append({"run": run, "epoch": epoch, "step": None, "metric": "cka_to_final",
                         "task": "", "layer": "", "value": 0.3 if epoch == 1 else 0.9,
                         "estimator": "linear_cka",
                         "params": json.dumps({"null_mean": 0.3, "null_q95": 0.35,
                                               "p_value": 0.5})})
    return pd.DataFrame(rows)


def test_intervals_and_run_differences():
    table = _table()
    assert len(intervals(table)) == 6 and len(chance_level(table)) == 6
    diffs = run_differences(table)
    assert list(diffs[diffs["exceeds"]]["epoch"]) == [3]  # only the shifted epoch
    assert not diffs[diffs["epoch"] < 3]["exceeds"].any()
    empty = run_differences(table[table["run"] == "a"])
    assert empty.empty


def test_charts_draw_bands():
    table = _table()
    fig = plot_metrics(table, metrics=["probe_accuracy", "cka_to_final"])
    bands = [c for a in fig.axes for c in a.collections if isinstance(c, PolyCollection)]
    assert len(bands) >= 4  # a CI band per run, a chance band per run
    plt.close(fig)
    ax = plot_tradeoff_over_epochs(table)
    assert sum(isinstance(c, PolyCollection) for c in ax.collections) == 2  # probe CI per run
    ax = plot_cka_to_final(table)
    assert any(isinstance(c, PolyCollection) for c in ax.collections)
    assert "chance" in " ".join(t.get_text() for t in ax.get_legend().get_texts())
    plt.close("all")


def test_report_says_which_differences_exceed_intervals():
    html = render_report(Results(_table()), dpi=40)
    assert 'id="uncertainty"' in html
    assert "1 of 3" in html  # one of three epochs beyond the intervals
    assert "at or below the 95% quantile of chance" in html
    assert "debiased_cka" in html
    plt.close("all")
