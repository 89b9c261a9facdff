"""Uncertainty carried by the results table: intervals per row and run differences beyond them.

Two kinds of uncertainty reach the tidy table through a row's ``diagnostics`` (the computed
values; tables written before that column existed kept them in ``params``, also read):

* **confidence intervals** ``ci_low`` / ``ci_high`` (e.g. the probe accuracies' binomial or
  bootstrap intervals), drawn as bands;
* the **permutation null** of CKA rows, ``null_mean`` / ``null_q95``
  (:func:`dtprobe.metrics.cka_permutation_null`): the value CKA takes by chance at this ``n``
  and width, drawn as a grey band, with ``p_value``.

:func:`run_differences` lists, for every metric with intervals, the epochs at which two runs'
intervals do not overlap.  Non-overlap of two 95 % intervals is a conservative test of a
difference (it implies a two-sided ``p`` well below 0.05 for roughly normal estimates), so a
difference listed here is a real one at the stated level; one not listed may still be.
Pure functions of the table (a leaf next to :mod:`dtprobe.table`).
"""

from __future__ import annotations

import itertools
import math

import pandas as pd

from dtprobe.table import parse_params

__all__ = ["intervals", "run_differences", "chance_level"]


def _float(value) -> float:
    try:
        out = float(value)
    except (TypeError, ValueError):
        return math.nan
    return out


def intervals(table: pd.DataFrame, low: str = "ci_low", high: str = "ci_high") -> pd.DataFrame:
    """Rows of ``table`` whose params hold a finite ``low``/``high`` pair.

    Returns
    -------
    DataFrame
        ``run, epoch, metric, task, layer, value, low, high`` (possibly empty); one line per
        table row with an interval, in table order.
    """
    cols = ["run", "epoch", "metric", "task", "layer", "value", "low", "high"]
    # computed values live in ``diagnostics`` (older tables: in ``params``)
    sources = [c for c in ("diagnostics", "params") if c in table]
    if table.empty or not sources:
        return pd.DataFrame(columns=cols)
    mask = pd.Series(False, index=table.index)
    for c in sources:
        mask |= table[c].astype(str).str.contains(f'"{low}"', regex=False)
    out = []
    for r in table[mask].itertuples(index=False):
        p = {}
        for c in reversed(sources):
            p.update(parse_params(str(getattr(r, c))))
        lo, hi = _float(p.get(low)), _float(p.get(high))
        if math.isfinite(lo) and math.isfinite(hi):
            out.append((r.run, r.epoch, r.metric, r.task, r.layer, float(r.value), lo, hi))
    return pd.DataFrame(out, columns=cols)


def chance_level(table: pd.DataFrame) -> pd.DataFrame:
    """The permutation null of CKA rows: ``low = null_mean``, ``high = null_q95`` per row."""
    return intervals(table, "null_mean", "null_q95")


def run_differences(table: pd.DataFrame) -> pd.DataFrame:
    """Epochs where two runs' confidence intervals of a metric do not overlap.

    Returns
    -------
    DataFrame
        ``metric, task, layer, epoch, run_a, value_a, low_a, high_a, run_b, value_b, low_b,
        high_b, exceeds`` for every pair of runs measured at the same metric, task, layer and
        epoch; ``exceeds`` is True where the intervals are disjoint.
    """
    cols = ["metric", "task", "layer", "epoch", "run_a", "value_a", "low_a", "high_a", "run_b",
            "value_b", "low_b", "high_b", "exceeds"]
    ci = intervals(table)
    if ci.empty or ci["run"].nunique() < 2:
        return pd.DataFrame(columns=cols)
    ci = ci.groupby(["metric", "task", "layer", "epoch", "run"], sort=False).mean().reset_index()
    out = []
    for key, g in ci.groupby(["metric", "task", "layer", "epoch"], sort=False):
        for a, b in itertools.combinations(g.itertuples(index=False), 2):
            disjoint = a.high < b.low or b.high < a.low
            out.append((*key, a.run, a.value, a.low, a.high, b.run, b.value, b.low, b.high,
                        bool(disjoint)))
    return pd.DataFrame(out, columns=cols)
