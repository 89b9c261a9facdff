"""Uncertainty carried by the results table: intervals per row and run differences beyond them.

Two kinds of uncertainty reach the tidy table through a row's ``diagnostics`` (the computed
values; tables written before that column existed kept them in ``params``, also read):

* **confidence intervals** ``ci_low`` / ``ci_high`` (e.g. the probe accuracies' binomial or
  bootstrap intervals), drawn as bands;
* the **permutation null** of CKA rows, ``null_mean`` / ``null_q95``
  (:func:`dtprobe.metrics.cka_permutation_null`): the value CKA takes by chance at this ``n``
  and width, drawn as a grey band, with ``p_value``.

:func:`run_differences` lists, for every metric with intervals, whether two runs differ at each
epoch beyond their uncertainty.  The rule (:func:`difference_interval`): the 95 % interval of the
difference ``a - b`` is built from the two rows' own 95 % intervals by Newcombe's method (his
method 10 for two Wilson intervals; the same square-root combination, Zou & Donner's MOVER, for
any two independent intervals), and a difference counts only when that interval excludes 0.
Two runs' probes are scored on the same test images, so the estimates are not independent; when
the two probes tend to err on the same images (positive correlation, the usual case) the
independent-samples interval is wider than the paired one, so the rule is conservative.  It
covers test-set sampling only: training-run variation (seeds, CPU rounding; the demo moves by up
to 0.05 between machines) is not in the intervals and needs several seeds.
Pure functions of the table (a leaf next to :mod:`dtprobe.table`).
"""

from __future__ import annotations

import itertools
import math

import pandas as pd

from dtprobe.table import parse_params

__all__ = ["chance_level", "difference_interval", "intervals", "last_epoch_differences",
           "run_differences", "verdict_sentence"]


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


def difference_interval(value_a: float, low_a: float, high_a: float, value_b: float,
                        low_b: float, high_b: float) -> tuple[float, float, float]:
    """``(a - b, low, high)``: interval of a difference from the two estimates' own intervals.

    ``low = (a - b) - sqrt((a - low_a)^2 + (high_b - b)^2)`` and
    ``high = (a - b) + sqrt((high_a - a)^2 + (b - low_b)^2)``: Newcombe's method 10 when the
    inputs are Wilson score intervals of two independent proportions (at the level of those
    intervals, here 95 %), and the MOVER construction of Zou & Donner for other intervals.
    NaN where an input is not finite.

    References
    ----------
    .. [1] R. G. Newcombe, "Interval estimation for the difference between independent
       proportions: comparison of eleven methods", Statistics in Medicine 17 (1998), method 10.
    .. [2] G. Y. Zou, A. Donner, "Construction of confidence limits about effect measures: a
       general approach", Statistics in Medicine 27 (2008).
    """
    vals = [_float(v) for v in (value_a, low_a, high_a, value_b, low_b, high_b)]
    if not all(math.isfinite(v) for v in vals):
        return (vals[0] - vals[3], math.nan, math.nan)
    a, la, ha, b, lb, hb = vals
    d = a - b
    return (d, d - math.hypot(a - la, hb - b), d + math.hypot(ha - a, b - lb))


def _verdict(low: float, high: float) -> str:
    if not (math.isfinite(low) and math.isfinite(high)):
        return "no interval"
    if low > 0:
        return "higher"
    if high < 0:
        return "lower"
    return "no difference"


def run_differences(table: pd.DataFrame) -> pd.DataFrame:
    """Epochs where two runs of a metric differ beyond their intervals.

    Returns
    -------
    DataFrame
        ``metric, task, layer, epoch, run_a, value_a, low_a, high_a, run_b, value_b, low_b,
        high_b, diff, diff_low, diff_high, exceeds`` for every pair of runs measured at the
        same metric, task, layer and epoch; ``diff = value_a - value_b`` with its interval
        (:func:`difference_interval`), and ``exceeds`` is True where that interval excludes 0.
    """
    cols = ["metric", "task", "layer", "epoch", "run_a", "value_a", "low_a", "high_a", "run_b",
            "value_b", "low_b", "high_b", "diff", "diff_low", "diff_high", "exceeds"]
    ci = intervals(table)
    if ci.empty or ci["run"].nunique() < 2:
        return pd.DataFrame(columns=cols)
    ci = ci.groupby(["metric", "task", "layer", "epoch", "run"], sort=False).mean().reset_index()
    out = []
    for key, g in ci.groupby(["metric", "task", "layer", "epoch"], sort=False):
        for a, b in itertools.combinations(g.itertuples(index=False), 2):
            d, lo, hi = difference_interval(a.value, a.low, a.high, b.value, b.low, b.high)
            out.append((*key, a.run, a.value, a.low, a.high, b.run, b.value, b.low, b.high,
                        d, lo, hi, _verdict(lo, hi) in ("higher", "lower")))
    return pd.DataFrame(out, columns=cols)


def last_epoch_differences(table: pd.DataFrame, base: str, other: str,
                           metric: str = "probe_accuracy") -> pd.DataFrame:
    """``other`` minus ``base`` at each run's last epoch of ``metric``, task by task.

    Returns
    -------
    DataFrame
        ``task, base, other, diff, low, high, verdict`` (penultimate layer); ``verdict`` is
        ``"higher"`` / ``"lower"`` (``other`` against ``base``, the difference interval of
        :func:`difference_interval` excludes 0), ``"no difference"`` (it contains 0) or
        ``"no interval"`` (a row carries none; the difference is then not judged).
    """
    cols = ["task", "base", "other", "diff", "low", "high", "verdict"]
    rows = table[(table["metric"] == metric) & (table["run"].isin([base, other]))]
    if "layer" in rows:
        rows = rows[rows["layer"].fillna("") == ""]
    if rows.empty:
        return pd.DataFrame(columns=cols)
    ci = intervals(rows)
    out = []
    tasks = sorted(set(rows[rows["run"] == base]["task"].fillna(""))
                   & set(rows[rows["run"] == other]["task"].fillna("")))
    for task in tasks:
        ends = {}
        for run in (base, other):
            r = rows[(rows["run"] == run) & (rows["task"].fillna("") == task)]
            last = r["epoch"].max()
            value = float(r[r["epoch"] == last]["value"].mean())
            c = ci[(ci["run"] == run) & (ci["task"] == task) & (ci["epoch"] == last)]
            lo, hi = ((float(c["low"].mean()), float(c["high"].mean())) if len(c)
                      else (math.nan, math.nan))
            ends[run] = (value, lo, hi)
        d, lo, hi = difference_interval(*ends[other], *ends[base])
        out.append((task, ends[base][0], ends[other][0], d, lo, hi, _verdict(lo, hi)))
    return pd.DataFrame(out, columns=cols)


def verdict_sentence(diffs: pd.DataFrame, other: str, base: str, what: str = "probe") -> str:
    """One clause saying on how many rows of :func:`last_epoch_differences` ``other`` is above
    or below ``base`` beyond the intervals, e.g. ``"CTC is above CE beyond the intervals on 1
    of 6 probes (digits), below on 2 (orientation, textures), no difference beyond the
    intervals on 3"``; ``"no difference beyond the intervals on any of the 6 probes"`` when
    none counts."""
    n = len(diffs)
    plural = f"{what}s" if n != 1 else what
    up = diffs[diffs["verdict"] == "higher"]["task"].tolist()
    down = diffs[diffs["verdict"] == "lower"]["task"].tolist()
    same = int((diffs["verdict"] == "no difference").sum())
    unjudged = int((diffs["verdict"] == "no interval").sum())
    tail = f"; {unjudged} without an interval, not judged" if unjudged else ""
    if unjudged == n:
        return f"{n} {plural} without an interval: differences not judged"
    if not up and not down:
        judged = n - unjudged
        return (f"{other} vs {base}: no difference beyond the intervals on "
                f"{'any of the ' + str(judged) if judged != 1 else 'the 1'} "
                f"{plural if judged != 1 else what}{tail}")
    parts = []
    if up:
        parts.append(f"{other} is above {base} beyond the intervals on {len(up)} of {n} "
                     f"{plural} ({', '.join(up)})")
    if down:
        parts.append(f"{'below' if up else f'{other} is below {base} beyond the intervals'} on "
                     f"{len(down)}{'' if up else f' of {n} {plural}'} ({', '.join(down)})")
    if same:
        parts.append(f"no difference beyond the intervals on {same}")
    return ", ".join(parts) + tail
