"""Intervals in the results table: run differences beyond them, bands in charts, the report."""

from __future__ import annotations

import json
import math

import matplotlib.pyplot as plt
import pandas as pd
import pytest
from matplotlib.collections import PolyCollection

from dtprobe.demo import demo_finding
from dtprobe.plotting import plot_cka_to_final, plot_metrics, plot_tradeoff_over_epochs
from dtprobe.results import Results
from dtprobe.results.report import render_report
from dtprobe.results.uncertainty import (
    chance_level,
    difference_interval,
    intervals,
    last_epoch_differences,
    run_differences,
)


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


# ----------------------------------------------------------------------------------------
# Differences judged against their intervals (issue 26)
# ----------------------------------------------------------------------------------------


def _wilson(p: float, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """Wilson score interval, from its formula."""
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return centre - half, centre + half


def test_difference_interval_is_newcombes_method_10():
    # Newcombe (1998), table II, example (a): 56/70 vs 48/80 -> [0.0524, 0.3339]
    p1, p2 = 56 / 70, 48 / 80
    d, lo, hi = difference_interval(p1, *_wilson(p1, 70), p2, *_wilson(p2, 80))
    assert d == pytest.approx(0.2)
    assert (round(lo, 4), round(hi, 4)) == (0.0524, 0.3339)
    # example (d): 5/56 vs 0/29 -> [-0.0381, 0.1926]
    p1, p2 = 5 / 56, 0.0
    _, lo, hi = difference_interval(p1, *_wilson(p1, 56), p2, *_wilson(p2, 29))
    assert (round(lo, 4), round(hi, 4)) == (-0.0381, 0.1926)
    assert all(math.isnan(v) for v in difference_interval(0.5, math.nan, 0.6, 0.4, 0.3, 0.5)[1:])


def _two_runs(last: dict[str, dict[str, float]], n_test: int = 1000) -> pd.DataFrame:
    rows = []
    for run, probes in last.items():
        for task, acc in probes.items():
            for epoch, value in ((0, 0.5), (16, acc)):
                lo, hi = _wilson(value, n_test)
                rows.append({"run": run, "epoch": epoch, "metric": "probe_accuracy",
                             "task": task, "layer": "", "value": value,
                             "diagnostics": json.dumps({"ci_low": lo, "ci_high": hi,
                                                        "n_test": n_test})})
        rows.append({"run": run, "epoch": 16, "metric": "source_accuracy", "task": "",
                     "layer": "", "value": 0.95, "diagnostics": ""})
    return pd.DataFrame(rows)


def test_summary_line_is_built_from_intervals():
    # differences of 0.01-0.03 on 1,000 test images are inside the intervals (half-width ~0.04)
    close = _two_runs({"ce": {"colour": 0.345, "digits": 0.833, "size": 0.845},
                       "ctc": {"colour": 0.364, "digits": 0.860, "size": 0.835}})
    diffs = last_epoch_differences(close, "ce", "ctc")
    assert list(diffs["verdict"]) == ["no difference"] * 3
    assert (diffs["low"] < 0).all() and (diffs["high"] > 0).all()
    line = demo_finding(Results(close))
    assert "no difference beyond the intervals on any of the 3 probes" in line
    assert "above" not in line and "below" not in line
    # clearly different ones are counted, each in its direction
    apart = _two_runs({"ce": {"colour": 0.345, "digits": 0.833, "size": 0.845},
                       "ctc": {"colour": 0.364, "digits": 0.950, "size": 0.600}})
    line = demo_finding(Results(apart))
    assert ("CTC is above CE beyond the intervals on 1 of 3 probes (digits), below on 1 (size), "
            "no difference beyond the intervals on 1") in line
    assert "digits +0.117 [+" in line and "size -0.245 [-" in line
    diffs = run_differences(apart)
    last = diffs[diffs["epoch"] == 16].set_index("task")
    assert list(last.loc[["colour", "digits", "size"], "exceeds"]) == [False, True, True]
    # the report's run-vs-run finding uses the same rule
    html = render_report(Results(close), dpi=30)
    assert "ctc vs ce: no difference beyond the intervals on any of the 3 tasks" in html
