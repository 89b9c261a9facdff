"""Charts of the discriminability-transferability trade-off over a training run.

Every function takes the tidy results table (a DataFrame or a
:class:`dtprobe.results.Results`), an optional matplotlib ``ax`` to draw into, and returns
the Axes (or the Figure, for multi-panel charts). Nothing calls ``plt.show()``; in a
notebook the figure displays itself. All charts share one style: seaborn's "whitegrid"
with the colour-blind-safe "colorblind" palette for runs and tasks and the perceptually
uniform "viridis" map for epochs and CKA values.

The charts follow the two papers dtprobe is built around: source accuracy against
downstream linear-probe accuracy as training proceeds (Kornblith et al. 2021), the
information plane I(X;T) vs I(T;Y) and contrastive temporal coding runs next to
cross-entropy ones (Cui et al. 2022), and temporal linear CKA (Kornblith et al. 2019).
"""

from __future__ import annotations

import textwrap
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import matplotlib as mpl
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.axes import Axes
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

from dtprobe.errors import ConfigError
from dtprobe.plotting.style import (
    EPOCH_CMAP,
    LINESTYLES,
    MARKERS,
    run_colors,
    style,
    task_colors,
)
from dtprobe.references import with_references
from dtprobe.table import (
    downstream_mask,
    downstream_tasks,
    estimator_settings,
    estimator_unit,
    metric_info,
    normalize_table,
    parse_params,
    sort_layers,
    sort_metrics,
    transfer_protocols,
)

__doc__ = with_references(__doc__, "kornblith2021", "cui2022", "kornblith2019cka")

if TYPE_CHECKING:  # pragma: no cover  (type only: plotting never imports dtprobe.results.core)
    from dtprobe.results.core import Results

def as_table(data: pd.DataFrame | Results) -> pd.DataFrame:
    """The normalised tidy table of a Results object, or of a bare DataFrame."""
    # A Results object is recognised by its normalised ``table`` (duck typing keeps plotting
    # below dtprobe.results.core in the import graph).
    if not isinstance(data, pd.DataFrame) and isinstance(getattr(data, "table", None),
                                                         pd.DataFrame):
        return data.table
    if not isinstance(data, pd.DataFrame):
        raise ConfigError(f"expected a results table (DataFrame) or Results, got "
                          f"{type(data).__name__}")
    return normalize_table(data)


def _runs(table: pd.DataFrame) -> list[str]:
    return list(dict.fromkeys(table["run"].tolist()))


def _require(table: pd.DataFrame, metric: str, what: str = "chart") -> pd.DataFrame:
    rows = table[(table["metric"] == metric) & np.isfinite(table["value"])]
    if rows.empty:
        have = ", ".join(sort_metrics(table["metric"].unique())) or "(none)"
        raise ConfigError(f"the {what} needs metric {metric!r}, which is not in the results "
                          f"table; available: {have}")
    return rows


def epoch_ticks(epochs: Sequence[int] | np.ndarray, max_ticks: int = 9) -> list[int]:
    """Tick positions on checkpoint epochs: all of them if few, else an even subset that always
    includes the first and the last epoch (so the final checkpoint is labelled)."""
    ep = np.unique(np.asarray(epochs, dtype=float))
    ep = ep[np.isfinite(ep)].astype(int)
    if ep.size <= max_ticks:
        return ep.tolist()
    idx = np.unique(np.round(np.linspace(0, ep.size - 1, max_ticks)).astype(int))
    return ep[idx].tolist()


def _epoch_axis(ax: Axes, epochs: Sequence[int] | np.ndarray) -> None:
    """x ticks on the checkpoint epochs (first and last included); one epoch is centred."""
    ticks = epoch_ticks(epochs)
    if not ticks:
        return
    ax.xaxis.set_major_locator(mpl.ticker.FixedLocator(ticks))
    ax.xaxis.set_major_formatter(mpl.ticker.FixedFormatter([str(t) for t in ticks]))
    ax.xaxis.set_minor_locator(mpl.ticker.NullLocator())
    if len(ticks) == 1:
        ax.set_xlim(ticks[0] - 1, ticks[0] + 1)


def chance_levels(table: pd.DataFrame, metric: str) -> dict[tuple[str, str], float]:
    """``(run, task) -> chance accuracy`` of an accuracy metric, where the table records it.

    The analysis stores the chance level of every accuracy row (the test split's majority-class
    rate, ``1/K`` for balanced classes) as ``chance`` in the row's ``diagnostics``; tables written
    before that have none, and then no chance line is drawn.
    """
    rows = table[table["metric"] == metric]
    cols = [c for c in ("diagnostics", "params") if c in rows.columns]
    out: dict[tuple[str, str], float] = {}
    for r in rows[["run", "task", *cols]].drop_duplicates().itertuples(index=False):
        for col in cols:
            value = parse_params(str(getattr(r, col))).get("chance")
            if isinstance(value, (int, float)) and np.isfinite(value):
                out[(str(r.run), str(r.task))] = float(value)
                break
    return out


def _draw_chance(ax: Axes, levels: Mapping[Any, float], color: Any = "0.45",
                 label: bool = True) -> None:
    """Dotted horizontal line(s) at the chance level(s); equal levels are drawn once."""
    for i, value in enumerate(sorted(set(round(v, 6) for v in levels.values()))):
        ax.axhline(value, color=color, ls=":", lw=1.1, zorder=1)
        if label and i == 0:
            ax.annotate("chance", (1.0, value), xycoords=("axes fraction", "data"),
                        xytext=(-2, 2), textcoords="offset points", ha="right", va="bottom",
                        fontsize=7, color=color)


def _new_axes(ax: Axes | None, figsize: tuple[float, float]) -> Axes:
    if ax is not None:
        return ax
    _, new = plt.subplots(figsize=figsize, layout="constrained")
    return new


def _series(table: pd.DataFrame, metric: str, task: str | None = None, layer: str = "",
            estimator: str | None = None) -> pd.DataFrame:
    """``run, epoch, value`` of one metric; a tasked metric is averaged over tasks if task=None."""
    rows = _require(table, metric)
    rows = rows[rows["layer"] == layer]
    if estimator is not None:
        rows = rows[rows["estimator"] == estimator]
    if task is not None:
        rows = rows[rows["task"] == task]
        if rows.empty:
            have = sorted(t for t in table.loc[table["metric"] == metric, "task"].unique() if t)
            raise ConfigError(f"no {metric!r} rows for task {task!r}; available tasks: "
                              f"{', '.join(have) or '(none)'}")
    else:
        # The mean over tasks is over the source dataset's own tasks: rows of other
        # (downstream) datasets are averaged apart, by plot_transfer_tradeoff.
        own = rows[~downstream_mask(rows)]
        rows = own if len(own) else rows
    return rows.groupby(["run", "epoch"], sort=False)["value"].mean().reset_index()


def _interval_bands(ax: Axes, rows: pd.DataFrame, color: Any, metric: str) -> bool:
    """Shade the intervals stored in the rows' params: ``ci_low``/``ci_high`` in the series'
    colour, and for CKA rows the permutation null (``null_mean`` to ``null_q95``) in grey.
    Returns whether a chance band was drawn."""
    from dtprobe.results.uncertainty import chance_level, intervals

    ci = intervals(rows)
    if not ci.empty:
        g = ci.groupby("epoch")[["low", "high"]].mean().sort_index()
        ax.fill_between(g.index, g["low"], g["high"], color=color, alpha=0.18, lw=0, zorder=1)
    if not metric.startswith("cka_to"):
        return False
    null = chance_level(rows)
    if null.empty:
        return False
    g = null.groupby("epoch")[["low", "high"]].mean().sort_index()
    ax.fill_between(g.index, g["low"], g["high"], color="0.6", alpha=0.35, lw=0, zorder=1)
    return True


def metric_tasks(table: pd.DataFrame, metric: str) -> list[str]:
    """The downstream tasks with rows of ``metric``, sorted (empty task excluded)."""
    return sorted(t for t in table.loc[table["metric"] == metric, "task"].unique() if t)


def _metric_label(table: pd.DataFrame, metric: str, task: str | None) -> str:
    label = metric_info(metric).label
    tasks = metric_tasks(table, metric)
    if task is None:  # the mean of _series: the source's own tasks when it has any
        own = [t for t in tasks if t not in set(downstream_tasks(table))]
        tasks = own or tasks
    if task:
        return f"{label} [{task}]"
    if tasks:
        return f"{label}\n(mean of {len(tasks)} tasks)" if len(tasks) > 1 else \
            f"{label} [{tasks[0]}]"
    return label


def _estimator_caption(rows: pd.DataFrame, width: int = 100) -> list[str]:
    """Wrapped ``estimator: k=v, ...`` lines listing the settings fixed over ``rows``."""
    ests = sorted(e for e in rows["estimator"].unique() if e)
    if not ests:
        return []
    fixed, varying = estimator_settings(rows["params"])
    parts = [f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in fixed.items()]
    if varying:
        parts.append(f"per-epoch: {', '.join(varying)}")
    text = "/".join(ests) + (": " + ", ".join(parts) if parts else "")
    return textwrap.wrap(text, width=width)


def _mi_label(rows: pd.DataFrame, symbol: str) -> str:
    est = sorted(e for e in rows["estimator"].unique() if e)
    first = rows.iloc[0]
    unit = estimator_unit(str(first["estimator"]), parse_params(str(first["params"])))
    parts = [p for p in (unit, f"{'/'.join(est)} estimator" if est else "") if p]
    return f"{symbol}  [{', '.join(parts)}]" if parts else symbol


def _trajectory(ax: Axes, data: pd.DataFrame, runs: Sequence[str], *, norm: Normalize,
                colors: Mapping[str, Any]) -> list[Line2D]:
    """Draw one line per run through (x, y) points coloured by epoch; mark start and end."""
    cmap = mpl.colormaps[EPOCH_CMAP]
    handles = []
    longest = int(data.groupby("run")["epoch"].size().max()) if len(data) else 1
    size = 34.0 if longest <= 30 else max(9.0, 34.0 * 30 / longest)
    for i, run in enumerate(runs):
        d = data[data["run"] == run].sort_values("epoch")
        if d.empty:
            continue
        marker = MARKERS[i % len(MARKERS)]
        color = colors[run]
        ax.plot(d["x"], d["y"], color=color, lw=1.6, alpha=0.85, zorder=2)
        ax.scatter(d["x"], d["y"], c=cmap(norm(d["epoch"].to_numpy())), marker=marker, s=size,
                   edgecolors=[color], linewidths=0.9 if size > 20 else 0.5, zorder=3)
        ax.scatter(d["x"].iloc[:1], d["y"].iloc[:1], marker="o", s=190, facecolors="none",
                   edgecolors=[color], linewidths=2.0, zorder=4)
        ax.scatter(d["x"].iloc[-1:], d["y"].iloc[-1:], marker="*", s=300, c=[color],
                   edgecolors="black", linewidths=0.8, zorder=5)
        handles.append(Line2D([], [], color=color, marker=marker, markerfacecolor="white",
                              markeredgecolor=color, lw=1.6, label=run))
    grey = "0.35"
    handles.append(Line2D([], [], ls="none", marker="o", markersize=11, markerfacecolor="none",
                          markeredgecolor=grey, markeredgewidth=2.0, label="first epoch"))
    handles.append(Line2D([], [], ls="none", marker="*", markersize=15, markerfacecolor=grey,
                          markeredgecolor="black", label="last epoch"))
    return handles


def _epoch_colorbar(ax: Axes, norm: Normalize) -> None:
    sm = mpl.cm.ScalarMappable(norm=norm, cmap=EPOCH_CMAP)
    cbar = ax.figure.colorbar(sm, ax=ax, pad=0.02, fraction=0.05)
    cbar.set_label("epoch")
    cbar.ax.yaxis.set_major_locator(mpl.ticker.MaxNLocator(integer=True, nbins=6))


def _legend_below(ax: Axes, handles: list[Line2D], ncol: int | None = None) -> None:
    ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, -0.16),
              ncol=ncol or min(len(handles), 4), frameon=False, borderaxespad=0.0)


def _pad_limits(ax: Axes, xs: np.ndarray, ys: np.ndarray, frac: float = 0.08) -> None:
    for arr, setter in ((xs, ax.set_xlim), (ys, ax.set_ylim)):
        arr = arr[np.isfinite(arr)]
        if arr.size:
            lo, hi = float(arr.min()), float(arr.max())
            pad = (hi - lo) * frac or max(abs(hi) * 0.05, 0.01)
            setter(lo - pad, hi + pad)


def _paired(table: pd.DataFrame, x: str, y: str, *, x_task: str | None = None,
            y_task: str | None = None, x_est: str | None = None,
            y_est: str | None = None) -> pd.DataFrame:
    xs = _series(table, x, task=x_task, estimator=x_est).rename(columns={"value": "x"})
    ys = _series(table, y, task=y_task, estimator=y_est).rename(columns={"value": "y"})
    data = xs.merge(ys, on=["run", "epoch"], how="inner")
    if data.empty:
        raise ConfigError(f"{x!r} and {y!r} share no (run, epoch) pair; nothing to plot")
    return data


def plot_tradeoff(table: pd.DataFrame | Results, x: str = "source_accuracy",
                  y: str = "probe_accuracy", task: str | None = None,
                  ax: Axes | None = None) -> Axes:
    """Discriminability vs transferability: one trajectory per run through the epochs.

    Parameters
    ----------
    table : tidy results table or :class:`~dtprobe.results.Results`.
    x, y : metric names for the axes (default source accuracy vs downstream probe accuracy,
        the trade-off of Kornblith et al. 2021 and Cui et al. 2022).
    task : downstream task of a tasked ``y`` (or ``x``); ``None`` averages over the tasks
        available at each epoch.
    ax : Axes to draw into; a new figure is made if omitted.

    Returns
    -------
    Axes
        Points are coloured by epoch (colorbar "epoch"); a ring marks each run's first epoch
        and a star its last, so cross-entropy and CTC runs read in one picture.
    """
    table = as_table(table)
    xt = task if task is not None and metric_tasks(table, x) else None
    yt = task if task is not None and metric_tasks(table, y) else None
    if task is not None and xt is None and yt is None:
        raise ConfigError(f"task={task!r} given but neither {x!r} nor {y!r} has tasks")
    data = _paired(table, x, y, x_task=xt, y_task=yt)
    runs = [r for r in _runs(table) if r in set(data["run"])]
    norm = Normalize(data["epoch"].min(), max(data["epoch"].max(), data["epoch"].min() + 1))
    with style():
        ax = _new_axes(ax, (6.6, 5.4))
        handles = _trajectory(ax, data, runs, norm=norm, colors=run_colors(runs))
        _epoch_colorbar(ax, norm)
        info_x, info_y = metric_info(x), metric_info(y)
        ax.set_xlabel(_metric_label(table, x, xt).replace("\n", " ")
                      + (f"  {info_x.range}" if info_x.range else ""))
        ax.set_ylabel(_metric_label(table, y, yt) + (f"  {info_y.range}" if info_y.range else ""))
        ax.set_title("Discriminability vs transferability"
                     if (x, y) == ("source_accuracy", "probe_accuracy")
                     else f"{info_x.label} vs {info_y.label}")
        _plane_chance(ax, table, x, y, xt, yt, data)
        _legend_below(ax, handles)
    return ax


def _mean_chance(table: pd.DataFrame, metric: str, task: str | None) -> float | None:
    """Chance level of ``metric`` (of ``task``, or the mean over tasks) or None if unknown."""
    if metric not in ACCURACY_METRICS:
        return None
    levels = chance_levels(table, metric)
    values = [v for (_, t), v in levels.items() if task is None or t == task]
    return float(np.mean(values)) if values else None


def _plane_chance(ax: Axes, table: pd.DataFrame, x: str, y: str, xt: str | None,
                  yt: str | None, data: pd.DataFrame) -> None:
    """Chance levels on a trade-off plane, inside the (padded) limits it sets."""
    cx, cy = _mean_chance(table, x, xt), _mean_chance(table, y, yt)
    if cx is not None:
        ax.axvline(cx, color="0.45", ls=":", lw=1.1, zorder=1)
    if cy is not None:
        ax.axhline(cy, color="0.45", ls=":", lw=1.1, zorder=1)
    if cx is not None or cy is not None:
        ax.annotate("dotted: chance", (0.99, 0.01), xycoords="axes fraction", ha="right",
                    va="bottom", fontsize=7, color="0.45")
    xs = np.append(data["x"].to_numpy(dtype=float), [] if cx is None else [cx])
    ys = np.append(data["y"].to_numpy(dtype=float), [] if cy is None else [cy])
    _pad_limits(ax, xs, ys)
    ax.xaxis.set_major_locator(mpl.ticker.MaxNLocator(nbins=5))  # labels must not overlap


def plot_tradeoff_by_task(table: pd.DataFrame | Results, x: str = "source_accuracy",
                          y: str = "probe_accuracy", ncols: int = 2) -> Figure:
    """:func:`plot_tradeoff` once per downstream task, small multiples with a shared colorbar."""
    table = as_table(table)
    tasks = metric_tasks(table, y)
    if not tasks:
        raise ConfigError(f"metric {y!r} has no tasks; use plot_tradeoff instead")
    ncols = max(1, min(ncols, len(tasks)))
    nrows = int(np.ceil(len(tasks) / ncols))
    data = pd.concat([_paired(table, x, y, y_task=t).assign(task=t) for t in tasks])
    runs = [r for r in _runs(table) if r in set(data["run"])]
    colors = run_colors(runs)
    norm = Normalize(data["epoch"].min(), max(data["epoch"].max(), data["epoch"].min() + 1))
    with style():
        fig, axes = plt.subplots(nrows, ncols, figsize=(4.4 * ncols + 0.8, 3.6 * nrows + 0.6),
                                 layout="constrained", squeeze=False)
        handles: list[Line2D] = []
        for ax, t in zip(axes.flat, tasks, strict=False):
            d = data[data["task"] == t]
            handles = _trajectory(ax, d, runs, norm=norm, colors=colors)
            ax.set_title(f"{t}")
            ax.set_xlabel(metric_info(x).label)
            ax.set_ylabel(f"{metric_info(y).label}")
            _plane_chance(ax, table, x, y, None, t, d)
        for ax in axes.flat[len(tasks):]:
            ax.remove()
        sm = mpl.cm.ScalarMappable(norm=norm, cmap=EPOCH_CMAP)
        cbar = fig.colorbar(sm, ax=axes.flat[:len(tasks)], pad=0.02, fraction=0.04, shrink=0.9)
        cbar.set_label("epoch")
        cbar.ax.yaxis.set_major_locator(mpl.ticker.MaxNLocator(integer=True, nbins=6))
        fig.suptitle("Discriminability vs transferability, per downstream task",
                     fontweight="bold")
        fig.legend(handles=handles, loc="outside lower center", ncol=min(len(handles), 5),
                   frameon=False)
    return fig


def _panel_keys(table: pd.DataFrame, metrics: Sequence[str] | None) -> list[tuple[str, str]]:
    """(metric, estimator) panels: one per metric, one per estimator when several were used."""
    base = table[(table["layer"] == "") & np.isfinite(table["value"])]
    present = sort_metrics(base["metric"].unique())
    if metrics is None:
        chosen = present
    else:
        missing = [m for m in metrics if m not in present]
        if missing:
            raise ConfigError(f"metric(s) {', '.join(missing)} not in the results table; "
                              f"available: {', '.join(present) or '(none)'}")
        chosen = list(dict.fromkeys(metrics))
    keys = []
    for m in chosen:
        ests = sorted(base.loc[base["metric"] == m, "estimator"].unique())
        keys.extend((m, e) for e in ests) if len(ests) > 1 else keys.append((m, ""))
    return keys


def _panel_labels(table: pd.DataFrame, metric: str, estimator: str) -> tuple[str, str]:
    """(title, y-label) of one panel: the metric's name, and its range or unit."""
    info = metric_info(metric)
    rows = table[(table["metric"] == metric) & (table["layer"] == "")]
    if estimator:
        rows = rows[rows["estimator"] == estimator]
    if metric.startswith("mi_"):
        ests = sorted(e for e in rows["estimator"].unique() if e)
        first = rows.iloc[0]
        unit = estimator_unit(str(first["estimator"]), parse_params(str(first["params"])))
        return (f"{info.label}, {'/'.join(ests)}" if ests else info.label), unit
    yrange = f"range {info.range}" if info.range.startswith("[") else info.range
    return info.label + (f" ({estimator})" if estimator else ""), yrange


ACCURACY_METRICS = ("source_accuracy", "probe_accuracy", "knn_accuracy")
"""Metrics drawn with their chance level (see :func:`chance_levels`)."""

LOG_METRICS = ("nc1",)
"""Metrics drawn on a log axis: NC1 spans orders of magnitude as the features collapse."""


def _use_log_axis(metric: str, values: np.ndarray) -> bool:
    """Log axis for :data:`LOG_METRICS`, and for any positive series spanning over 100x."""
    v = values[np.isfinite(values)]
    if v.size < 2 or (v <= 0).any():
        return False
    return metric in LOG_METRICS or float(v.max() / v.min()) > 100.0


def plot_metrics(table: pd.DataFrame | Results, metrics: Sequence[str] | None = None,
                 ax: Axes | Sequence[Axes] | np.ndarray | None = None, ncols: int = 3,
                 fixed_range: bool = True) -> Figure:
    """Every metric against epoch, one small panel per metric, runs overlaid.

    Parameters
    ----------
    table : tidy results table or :class:`~dtprobe.results.Results`.
    metrics : metric names to draw (default: all non-layer-wise metrics present, in display
        order). A metric measured with several estimators gets one panel per estimator.
    ax : Axes to draw into, one per panel (a single Axes if there is one panel); a new
        figure is made if omitted.
    ncols : panels per row of a new figure.
    fixed_range : draw metrics bounded in [0, 1] (accuracies, CKA, class separation) on the full
        [0, 1] axis, so small noise does not look like a collapse; ``False`` autoscales.

    Returns
    -------
    Figure
        Colour = run; for tasked metrics (downstream probes) line style and marker = task,
        explained in a legend below the panels; titles carry range or unit and estimator.
        Accuracy panels draw the chance level (dotted) where the table records it; NC1 (and
        any positive metric spanning more than 100x) uses a log axis; epoch ticks fall on
        checkpoint epochs, the last included.
    """
    table = as_table(table)
    keys = _panel_keys(table, metrics)
    if not keys:
        raise ConfigError("no finite metric values to plot in the results table")
    runs = _runs(table)
    colors = run_colors(runs)
    base = table[table["layer"] == ""]
    task_tables = [m for m, _ in keys if m != "cka_to_run"]
    all_tasks = sorted({t for m in task_tables for t in metric_tasks(base, m)})
    styles = {t: (LINESTYLES[i % len(LINESTYLES)], MARKERS[i % len(MARKERS)])
              for i, t in enumerate(all_tasks)}
    n = len(keys)
    with style():
        if ax is None:
            ncols = max(1, min(ncols, n))
            nrows = int(np.ceil(n / ncols))
            fig, grid = plt.subplots(nrows, ncols, figsize=(3.7 * ncols, 2.75 * nrows + 0.7),
                                     sharex=True, layout="constrained", squeeze=False)
            axes = list(grid.flat)
            for extra in axes[n:]:
                extra.remove()
            # panels whose lower neighbour was removed show their own epoch labels
            for i in range(n):
                if i + ncols >= n:
                    axes[i].xaxis.set_tick_params(labelbottom=True)
                    axes[i].set_xlabel("epoch")
            axes = axes[:n]
        else:
            axes = [ax] if isinstance(ax, Axes) else list(np.asarray(ax, dtype=object).flat)
            if len(axes) < n:
                raise ConfigError(f"plot_metrics needs {n} Axes for {n} panels, got {len(axes)}")
            axes = axes[:n]
            fig = axes[0].figure
            for a in axes:
                a.set_xlabel("epoch")
        for a, (metric, est) in zip(axes, keys, strict=True):
            rows = base[(base["metric"] == metric) & np.isfinite(base["value"])]
            if est:
                rows = rows[rows["estimator"] == est]
            # one line per task; for CKA to other runs, one per other run (its own column)
            by = "other_run" if metric == "cka_to_run" else "task"
            for run in runs:
                r = rows[rows["run"] == run]
                for task, g in r.groupby(by, sort=True):
                    _interval_bands(a, g, colors[run], metric)
                    g = g.groupby("epoch")["value"].mean().sort_index()
                    if metric == "cka_to_run" or not task:
                        ls, mk = "-", None
                    else:
                        ls, mk = styles[task]
                    a.plot(g.index, g.to_numpy(), color=colors[run], ls=ls,
                           marker=mk or ("o" if len(g) < 2 else None),
                           markersize=4, markevery=max(1, len(g) // 8), lw=1.5)
                    if metric == "cka_to_run" and r[by].nunique() > 1 and len(g):
                        a.annotate(f"vs {task}", (g.index[-1], g.iloc[-1]), fontsize=7,
                                   xytext=(3, 0), textcoords="offset points", color=colors[run])
            title, ylabel = _panel_labels(base, metric, est)
            log = _use_log_axis(metric, rows["value"].to_numpy())
            if log:
                a.set_yscale("log")
                # 1-2-5 ticks with plain labels (not 7x10^1, 8x10^1 ...) even on a short span
                a.yaxis.set_major_locator(mpl.ticker.LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
                a.yaxis.set_major_formatter(mpl.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
                a.yaxis.set_minor_locator(mpl.ticker.NullLocator())
                ylabel = f"{ylabel}, log scale" if ylabel else "log scale"
            a.set_title(title, fontsize=9.5, loc="left")
            a.set_ylabel(ylabel, fontsize=8.5, color="0.35")
            _epoch_axis(a, rows["epoch"].to_numpy())
            if not log:
                a.yaxis.set_major_locator(mpl.ticker.MaxNLocator(nbins=5))
            if metric in ACCURACY_METRICS:
                _draw_chance(a, chance_levels(rows, metric))
            if fixed_range and metric_info(metric).range == "[0, 1]":
                a.set_ylim(-0.03, 1.03)  # noise of 0.01 must not look like a collapse
        handles = [Line2D([], [], color=colors[r], lw=2.2, label=r) for r in runs]
        if all_tasks:
            handles += [Line2D([], [], color="0.3", ls=styles[t][0], marker=styles[t][1],
                               markersize=4, lw=1.5, label=f"task: {t}") for t in all_tasks]
        if ax is None:
            fig.legend(handles=handles, loc="outside lower center",
                       ncol=min(len(handles), 6), frameon=False)
            fig.suptitle("Metrics over training", fontweight="bold")
        else:
            axes[-1].legend(handles=handles, fontsize=8, frameon=True, framealpha=0.8)
    return fig


def plot_information_plane(table: pd.DataFrame | Results, estimator: str | None = None,
                           ax: Axes | None = None) -> Axes:
    """The information plane I(X;T) vs I(T;Y) over training (Cui et al. 2022).

    Parameters
    ----------
    table : tidy results table with ``mi_xt`` and ``mi_ty`` rows.
    estimator : which estimator's numbers to use when several were computed; ``None`` picks
        the only one (or the only estimator each of the two metrics has).
    ax : Axes to draw into; a new figure is made if omitted.

    Returns
    -------
    Axes
        One trajectory per run, points coloured by epoch; axis labels name the unit and the
        estimator, and a caption lists the estimator's parameters (the kernel width decides
        the value of matrix-based Renyi estimates; Goldfeld et al. 2019 explain why such
        numbers measure clustering at a scale, not the true mutual information).
    """
    table = as_table(table)
    xt_rows = _require(table, "mi_xt", "information plane")
    ty_rows = _require(table, "mi_ty", "information plane")
    ex = sorted(xt_rows["estimator"].unique())
    ey = sorted(ty_rows["estimator"].unique())
    if estimator is not None:
        if estimator not in ex or estimator not in ey:
            raise ConfigError(f"estimator {estimator!r} not available for both mi_xt and mi_ty; "
                              f"mi_xt has {', '.join(ex)}; mi_ty has {', '.join(ey)}")
        x_est = y_est = estimator
    else:
        common = sorted(set(ex) & set(ey))
        if len(common) == 1:
            x_est = y_est = common[0]
        elif not common and len(ex) == 1 and len(ey) == 1:
            x_est, y_est = ex[0], ey[0]
        else:
            raise ConfigError(f"several MI estimators in the table ({', '.join(common or ex)}); "
                              f"pass estimator=<name>")
    data = _paired(table, "mi_xt", "mi_ty", x_est=x_est, y_est=y_est)
    runs = [r for r in _runs(table) if r in set(data["run"])]
    norm = Normalize(data["epoch"].min(), max(data["epoch"].max(), data["epoch"].min() + 1))
    xr = xt_rows[xt_rows["estimator"] == x_est]
    yr = ty_rows[ty_rows["estimator"] == y_est]
    with style():
        ax = _new_axes(ax, (6.6, 5.6))
        handles = _trajectory(ax, data, runs, norm=norm, colors=run_colors(runs))
        _epoch_colorbar(ax, norm)
        ax.set_xlabel(_mi_label(xr, "I(X;T)"))
        ax.set_ylabel(_mi_label(yr, "I(T;Y)"))
        ax.set_title("Information plane")
        # settings shared by both estimates (the per-epoch diagnostics are left out)
        both = pd.concat([xr, yr]) if x_est == y_est else xr
        # about 15 characters of 7.5 pt text per inch of axes width
        width = max(40, int(ax.get_position().width * ax.figure.get_figwidth() * 15))
        lines = _estimator_caption(both, width=width)
        if x_est != y_est:
            lines += _estimator_caption(yr, width=width)
        if lines:
            ax.text(0.0, 1.0, "\n".join(lines), transform=ax.transAxes, fontsize=7.5,
                    color="0.3", ha="left", va="bottom", linespacing=1.3)
            ax.set_title("Information plane", pad=8 + 11 * len(lines))
        _pad_limits(ax, data["x"].to_numpy(), data["y"].to_numpy())
        _legend_below(ax, handles)
    return ax


def _tick_positions(labels: Sequence[Any], max_ticks: int = 9) -> np.ndarray:
    """Indices of at most ``max_ticks`` labels to show, evenly spread, first and last included."""
    n = len(labels)
    if n <= max_ticks:
        return np.arange(n)
    return np.unique(np.round(np.linspace(0, n - 1, max_ticks)).astype(int))


def plot_cka(cka_matrix: pd.DataFrame, ax: Axes | None = None, title: str | None = None,
             colorbar: bool = True) -> Axes:
    """Temporal linear-CKA heatmap: similarity of every epoch's features to every other's.

    Parameters
    ----------
    cka_matrix : epoch x epoch DataFrame (index and columns are epochs), values in [0, 1].
    ax : Axes to draw into; a new figure is made if omitted.
    title : panel title (default "temporal linear CKA").
    colorbar : add a colorbar labelled "linear CKA".

    Returns
    -------
    Axes
        Heatmap with a fixed colour scale (vmin 0, vmax 1) so runs compare directly, and at
        most nine epoch ticks per axis.
    """
    if not isinstance(cka_matrix, pd.DataFrame) or cka_matrix.empty:
        raise ConfigError("plot_cka needs a non-empty epoch x epoch DataFrame "
                          "(RUN_DIR/analysis/cka_matrix.csv)")
    values = cka_matrix.to_numpy(dtype=float)
    with style():
        ax = _new_axes(ax, (5.4, 4.6))
        im = ax.imshow(values, vmin=0.0, vmax=1.0, cmap=EPOCH_CMAP, interpolation="nearest",
                       aspect="equal", origin="upper")
        rows = _tick_positions(list(cka_matrix.index))
        cols = _tick_positions(list(cka_matrix.columns))
        ax.set_yticks(rows, [str(cka_matrix.index[i]) for i in rows])
        ax.set_xticks(cols, [str(cka_matrix.columns[i]) for i in cols])
        ax.set_xlabel("epoch")
        ax.set_ylabel("epoch")
        ax.grid(False)
        ax.set_title(title or "temporal linear CKA")
        if colorbar:
            cbar = ax.figure.colorbar(im, ax=ax, pad=0.02, fraction=0.046)
            cbar.set_label("linear CKA")
    return ax


def plot_cka_grid(cka: Mapping[str, pd.DataFrame], ncols: int = 3) -> Figure:
    """One :func:`plot_cka` panel per run, with one shared colorbar."""
    if not cka:
        raise ConfigError("no temporal CKA matrices (RUN_DIR/analysis/cka_matrix.csv) to plot")
    n = len(cka)
    ncols = max(1, min(ncols, n))
    nrows = int(np.ceil(n / ncols))
    with style():
        fig, axes = plt.subplots(nrows, ncols, figsize=(4.3 * ncols + 0.9, 4.0 * nrows + 0.4),
                                 layout="constrained", squeeze=False)
        for a, (run, mat) in zip(axes.flat, cka.items(), strict=False):
            plot_cka(mat, ax=a, title=run, colorbar=False)
        for a in axes.flat[n:]:
            a.remove()
        sm = mpl.cm.ScalarMappable(norm=Normalize(0.0, 1.0), cmap=EPOCH_CMAP)
        cbar = fig.colorbar(sm, ax=axes.flat[:n], pad=0.02, fraction=0.04, shrink=0.9)
        cbar.set_label("linear CKA")
        fig.suptitle("Temporal linear CKA (epoch x epoch)", fontweight="bold")
    return fig


def plot_cka_to_final(table: pd.DataFrame | Results, ax: Axes | None = None) -> Axes:
    """Linear CKA of each epoch's features to the final epoch's, per run (and per layer).

    Without layer-wise rows the colour is the run. With layer-wise rows (``layer`` set)
    the colour is the layer (light = early, dark = deep, black = penultimate features) and
    the line style is the run, so one sees which layers settle first.

    Returns
    -------
    Axes
    """
    table = as_table(table)
    rows = _require(table, "cka_to_final", "CKA-to-final chart")
    rows = rows[rows["task"] == ""]
    runs = _runs(rows)
    layers = sort_layers(rows["layer"].unique())
    with style():
        ax = _new_axes(ax, (7.4, 4.4))
        handles: list[Line2D | Patch] = []
        if layers == [""]:
            colors = run_colors(_runs(table))
            chance = False
            for run in runs:
                chance = _interval_bands(ax, rows[rows["run"] == run], colors[run],
                                         "cka_to_final") or chance
                g = rows[rows["run"] == run].groupby("epoch")["value"].mean().sort_index()
                ax.plot(g.index, g.to_numpy(), color=colors[run], marker="o", markersize=3.5,
                        markevery=max(1, len(g) // 10))
                handles.append(Line2D([], [], color=colors[run], marker="o", markersize=3.5,
                                      label=run))
            if chance:
                handles.append(Patch(color="0.6", alpha=0.35,
                                     label="chance (permutation null,\nmean to 95%)"))
            title = "CKA to final epoch (penultimate features)"
        else:
            named = [lay for lay in layers if lay]
            shades = sns.color_palette("crest", len(named)) if named else []
            lcol = dict(zip(named, shades, strict=True)) | {"": (0.0, 0.0, 0.0)}
            styles = {r: LINESTYLES[i % len(LINESTYLES)] for i, r in enumerate(runs)}
            for run in runs:
                for layer in layers:
                    g = rows[(rows["run"] == run) & (rows["layer"] == layer)]
                    if g.empty:
                        continue
                    g = g.groupby("epoch")["value"].mean().sort_index()
                    ax.plot(g.index, g.to_numpy(), color=lcol[layer], ls=styles[run],
                            lw=2.4 if layer == "" else 1.6, marker="o" if len(g) < 2 else None)
            handles += [Line2D([], [], color=lcol[lay], lw=2.4 if lay == "" else 1.6,
                               label=lay or "penultimate") for lay in layers]
            if len(runs) > 1:
                handles += [Line2D([], [], color="0.3", ls=styles[r], label=f"run: {r}")
                            for r in runs]
            title = "CKA to final epoch, per layer"
        ax.set_xlabel("epoch")
        ax.set_ylabel("linear CKA to final epoch  [0, 1]")
        ax.set_title(title)
        _epoch_axis(ax, rows["epoch"].to_numpy())
        ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    return ax


def plot_tradeoff_over_epochs(table: pd.DataFrame | Results, ax: Axes | None = None,
                              source: str = "source_accuracy",
                              probe: str = "probe_accuracy") -> Axes:
    """Source accuracy and every downstream probe accuracy against epoch, on one axis.

    This is ``tradeoff.png`` (in ``RUN_DIR/analysis/`` and among :func:`save_all_figures`'
    charts): discriminability (source accuracy, thick black) rising while transferability (one
    coloured line per downstream task) peaks and falls, the pattern reported by Kornblith et
    al. (2021) and Cui et al. (2022). A triangle marks the epoch where each probe peaked;
    dotted lines in the same colours are the chance levels; the axis spans [0, 1]. Several
    runs are told apart by line style.

    Returns
    -------
    Axes
    """
    table = as_table(table)
    has_src = (table["metric"] == source).any()
    has_probe = (table["metric"] == probe).any()
    if not has_src and not has_probe:
        _require(table, source, "trade-off chart")
    base = table[(table["layer"] == "") & np.isfinite(table["value"])]
    runs = _runs(base[base["metric"].isin([source, probe])])
    tasks = metric_tasks(base, probe)
    tcol = task_colors(tasks)
    styles = {r: LINESTYLES[i % len(LINESTYLES)] for i, r in enumerate(runs)}
    with style():
        ax = _new_axes(ax, (7.6, 4.6))
        for run in runs:
            rr = base[base["run"] == run]
            s = rr[rr["metric"] == source].groupby("epoch")["value"].mean().sort_index()
            if len(s):
                ax.plot(s.index, s.to_numpy(), color="black", lw=2.6, ls=styles[run], zorder=4,
                        marker="o" if len(s) < 2 else None)
            pr = rr[rr["metric"] == probe]
            for task in tasks:
                g = pr[pr["task"] == task].groupby("epoch")["value"].mean().sort_index()
                if g.empty:
                    continue
                ax.plot(g.index, g.to_numpy(), color=tcol[task], ls=styles[run], lw=1.7)
                _interval_bands(ax, pr[pr["task"] == task], tcol[task], probe)
                peak = int(np.argmax(g.to_numpy()))
                ax.plot([g.index[peak]], [g.iloc[peak]], marker="v", color=tcol[task],
                        markersize=8, markeredgecolor="black", markeredgewidth=0.6, zorder=5,
                        ls="none")
        handles = []
        if has_src:
            handles.append(Line2D([], [], color="black", lw=2.6,
                                  label=f"{metric_info(source).label} (discriminability)"))
        handles += [Line2D([], [], color=tcol[t], lw=1.7, label=f"probe: {t}") for t in tasks]
        if tasks:
            handles.append(Line2D([], [], ls="none", marker="v", color="0.6", markersize=8,
                                  markeredgecolor="black", markeredgewidth=0.6,
                                  label="probe peak"))
        if len(runs) > 1:
            handles += [Line2D([], [], color="0.3", ls=styles[r], label=f"run: {r}")
                        for r in runs]
        src_chance = chance_levels(base, source)
        if src_chance:
            _draw_chance(ax, src_chance, color="black")
        probe_chance = chance_levels(base, probe)
        for task in tasks:
            levels = {k: v for k, v in probe_chance.items() if k[1] == task}
            _draw_chance(ax, levels, color=tcol[task], label=False)
        if src_chance or probe_chance:
            handles.append(Line2D([], [], color="0.45", ls=":", lw=1.1,
                                  label="chance (colour as the line)"))
        ax.set_ylim(-0.03, 1.03)
        ax.set_xlabel("epoch")
        ax.set_ylabel("accuracy  [0, 1]")
        ax.set_title("Source vs downstream accuracy over training"
                     + (f" ({runs[0]})" if len(runs) == 1 else ""))
        _epoch_axis(ax, base.loc[base["metric"].isin([source, probe]), "epoch"].to_numpy())
        ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    return ax


def plot_transfer_tradeoff(table: pd.DataFrame | Results, dataset: str | None = None,
                           x: str = "source_accuracy", ax: Axes | None = None) -> Axes:
    """Discriminability vs transfer to other datasets: :func:`plot_tradeoff` with the linear-probe
    accuracy on one downstream ``dataset``, or (``None``) the mean over the downstream set.

    Parameters
    ----------
    table : tidy results table or :class:`~dtprobe.results.Results` with downstream rows
        (``dtprobe analyze --downstream``).
    dataset : a downstream dataset's name, or ``None`` for the aggregate
        (``transfer_accuracy_mean``, Kornblith et al. 2021's mean over transfer datasets).
    x : the discriminability metric.
    ax : Axes to draw into; a new figure is made if omitted.

    Returns
    -------
    Axes
    """
    table = as_table(table)
    names = downstream_tasks(table)
    if not names:
        raise ConfigError("no downstream-dataset rows in the results; run `dtprobe analyze RUN "
                          "--downstream SPEC ...` first (e.g. --downstream digits textures)")
    if dataset is None:
        ax = plot_tradeoff(table, x=x, y="transfer_accuracy_mean", ax=ax)
        ax.set_ylabel(f"mean probe accuracy over {len(names)} downstream datasets  [0, 1]")
        ax.set_title(f"Discriminability vs transfer ({', '.join(names)})")
        return ax
    if dataset not in names:
        raise ConfigError(f"no downstream dataset {dataset!r} in the results; available: "
                          f"{', '.join(names)}")
    sub = table[~table["metric"].isin(["probe_accuracy"]) | (table["task"] == dataset)]
    ax = plot_tradeoff(sub, x=x, y="probe_accuracy", task=dataset, ax=ax)
    ax.set_ylabel(f"linear-probe accuracy on {dataset}  [0, 1]")
    ax.set_title(f"Discriminability vs transfer to {dataset}")
    return ax


_PROTOCOL_STYLE = {"linear": ("#1f77b4", "o"), "few-shot": ("#ff7f0e", "s"),
                   "fine-tuned": ("#2ca02c", "D")}


def plot_transfer_protocols(table: pd.DataFrame | Results, ncols: int = 3) -> Figure:
    """Transfer over epochs under the three protocols, one panel per downstream dataset.

    Linear probe (``probe_accuracy``), few-shot (:func:`dtprobe.table.transfer_protocols`
    picks the 10-shot ridge row; its band is the interval over draws) and full fine-tuning
    (``finetune_accuracy``, ``dtprobe analyze --finetune``) against epoch, colour = protocol,
    line style = run; a marker shows each curve's best epoch, dotted lines the chance level.
    Whether the late-training drop of the linear probe survives fine-tuning (Kornblith et al.
    2021) reads off the panel.

    Returns
    -------
    Figure
    """
    table = as_table(table)
    names = downstream_tasks(table)
    down = table[downstream_mask(table) & (table["layer"] == "") & np.isfinite(table["value"])]
    protocols = transfer_protocols(down)
    if not names or len(protocols) < 2:
        raise ConfigError("the transfer-protocol chart needs downstream rows of at least two "
                          "of: probe_accuracy, fewshot_*, finetune_accuracy (dtprobe analyze "
                          "--downstream SPEC [--finetune])")
    runs = _runs(down)
    styles = {r: LINESTYLES[i % len(LINESTYLES)] for i, r in enumerate(runs)}
    ncols = max(1, min(ncols, len(names)))
    nrows = -(-len(names) // ncols)
    with style():
        fig, axes = plt.subplots(nrows, ncols, figsize=(max(4.6 * ncols, 7.5), 3.4 * nrows + 1),
                                 layout="constrained", squeeze=False)
        for ax, name in zip(axes.flat, names, strict=False):
            sub = down[down["task"] == name]
            for proto, metric in protocols.items():
                color, marker = _PROTOCOL_STYLE[proto]
                rows = sub[sub["metric"] == metric]
                for run in runs:
                    g = rows[rows["run"] == run].groupby("epoch")["value"].mean().sort_index()
                    if g.empty:
                        continue
                    ax.plot(g.index, g.to_numpy(), color=color, ls=styles[run], lw=1.8)
                    best = int(np.argmax(g.to_numpy()))
                    ax.plot([g.index[best]], [g.iloc[best]], marker=marker, color=color,
                            markeredgecolor="black", markeredgewidth=0.6, ls="none", zorder=5)
                    _interval_bands(ax, rows[rows["run"] == run], color, metric)
                _draw_chance(ax, {k: v for k, v in chance_levels(rows, metric).items()},
                             color="0.45", label=False)
            ax.set_title(name)
            ax.set_xlabel("epoch")
            ax.set_ylabel("test accuracy  [0, 1]")
            ax.set_ylim(-0.03, 1.03)
            _epoch_axis(ax, sub["epoch"].to_numpy())
        for ax in list(axes.flat)[len(names):]:
            ax.axis("off")
        labels = {"linear": "linear probe", "fine-tuned": "fine-tuned"}
        handles = [Line2D([], [], color=_PROTOCOL_STYLE[p][0], marker=_PROTOCOL_STYLE[p][1],
                          markeredgecolor="black", lw=1.8,
                          label=labels.get(p) or
                          f"{p}: {metric_info(m).label.replace(' accuracy', '')}")
                   for p, m in protocols.items()]
        if len(runs) > 1:
            handles += [Line2D([], [], color="0.3", ls=styles[r], label=f"run: {r}")
                        for r in runs]
        handles.append(Line2D([], [], color="0.45", ls=":", lw=1.1, label="chance"))
        handles.append(Line2D([], [], ls="none", marker="o", color="white",
                              markeredgecolor="black", label="marker: best epoch"))
        fig.legend(handles=handles, loc="outside lower center", frameon=False,
                   ncol=min(len(handles), 4))
        fig.suptitle("Transfer over training: linear probe vs few-shot vs fine-tuning")
    return fig

