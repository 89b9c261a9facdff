"""Layer x epoch diagnostics: where (which layer) and when (which epoch) transferability is lost.

Kornblith et al. (2021) find that objectives differ mainly in the last few layers; Masarczyk et
al. (2023) find a "tunnel" of late layers that compress the representation. With
``dtprobe analyze RUN --layers auto`` the table holds per-layer rows (``layer`` = module name;
``""`` is the penultimate feature), and these functions turn them into layer x epoch matrices
and charts: a heatmap per metric and the best layer to transfer from at each epoch.

References
----------
Kornblith, S., Chen, T., Lee, H., Norouzi, M. (2021). Why do better loss functions lead to less
transferable features? NeurIPS 2021.
Masarczyk, W. et al. (2023). The tunnel effect: building data representations in deep neural
networks. NeurIPS 2023.
"""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from dtprobe.errors import ConfigError
from dtprobe.plotting.charts import as_table, run_colors

__all__ = ["best_layer", "layer_epoch_matrix", "plot_best_layer", "plot_layer_heatmap"]

PENULTIMATE = "penultimate"


def layer_order(table: pd.DataFrame) -> list[str]:
    """Layers in network order (as the analysis wrote them), the penultimate last."""
    seen = list(dict.fromkeys(table.loc[table["layer"] != "", "layer"]))
    return seen + [""]


def layer_epoch_matrix(data, metric: str = "probe_accuracy", task: str | None = None,
                       run: str | None = None) -> pd.DataFrame:
    """Layer x epoch matrix of ``metric`` for one run (a tasked metric is averaged over its
    tasks unless ``task`` is given); rows in network order, the penultimate (``""``) last and
    labelled ``"penultimate"``.

    Raises
    ------
    ConfigError
        If the table has no per-layer rows of ``metric`` (analyse with ``--layers auto``).
    """
    table = as_table(data)
    runs = list(dict.fromkeys(table["run"]))
    run = run if run is not None else (runs[0] if runs else None)
    rows = table[(table["metric"] == metric) & (table["run"] == run)
                 & np.isfinite(table["value"].astype(float))]
    if task is not None:
        rows = rows[rows["task"] == task]
    if not (rows["layer"] != "").any():
        raise ConfigError(f"no per-layer {metric!r} rows for run {run!r}; analyse with "
                          "`dtprobe analyze RUN --layers auto`")
    matrix = rows.pivot_table(index="layer", columns="epoch", values="value", aggfunc="mean")
    order = [name for name in layer_order(table) if name in matrix.index]
    matrix = matrix.loc[order]
    matrix.index = [PENULTIMATE if name == "" else name for name in matrix.index]
    matrix.index.name, matrix.columns.name = "layer", "epoch"
    return matrix


def best_layer(data, task: str | None = None, run: str | None = None,
               metric: str = "probe_accuracy") -> pd.DataFrame:
    """Per epoch, the layer whose features transfer best (highest ``metric``), its value and the
    penultimate's: columns ``epoch, layer, value, penultimate``."""
    matrix = layer_epoch_matrix(data, metric, task, run)
    out = pd.DataFrame({"epoch": matrix.columns, "layer": matrix.idxmax(axis=0).values,
                        "value": matrix.max(axis=0).values,
                        "penultimate": matrix.loc[PENULTIMATE].values
                        if PENULTIMATE in matrix.index else np.nan})
    return out.reset_index(drop=True)


def plot_layer_heatmap(data, metric: str = "probe_accuracy", task: str | None = None,
                       vmin: float | None = None, vmax: float | None = None) -> Figure:
    """One layer x epoch heatmap of ``metric`` per run (shared colour scale, values printed)."""
    table = as_table(data)
    runs = list(dict.fromkeys(table["run"]))
    mats = {r: layer_epoch_matrix(table, metric, task, r) for r in runs
            if ((table["run"] == r) & (table["metric"] == metric) & (table["layer"] != "")).any()}
    if not mats:
        raise ConfigError(f"no per-layer {metric!r} rows; analyse with --layers auto")
    values = np.concatenate([m.to_numpy().ravel() for m in mats.values()])
    lo = float(np.nanmin(values)) if vmin is None else vmin
    hi = float(np.nanmax(values)) if vmax is None else vmax
    first = next(iter(mats.values()))
    fig, axes = plt.subplots(1, len(mats), squeeze=False, layout="constrained",
                             figsize=(1.2 + 0.55 * first.shape[1] * len(mats) + 1.5,
                                      1.0 + 0.38 * first.shape[0]))
    for ax, (run, m) in zip(axes[0], mats.items(), strict=True):
        im = ax.imshow(m.to_numpy(), aspect="auto", cmap="viridis", vmin=lo, vmax=hi)
        ax.set_xticks(range(m.shape[1]), [str(int(e)) for e in m.columns])
        ax.set_yticks(range(m.shape[0]), list(m.index))
        ax.set_xlabel("epoch")
        ax.set_title(run)
        for i in range(m.shape[0]):
            for j in range(m.shape[1]):
                v = m.iat[i, j]
                if np.isfinite(v):
                    shade = (v - lo) / (hi - lo) if hi > lo else 0.5
                    ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7,
                            color="black" if shade > 0.6 else "white")
    label = metric.replace("_", " ") + (f" ({task})" if task else "")
    fig.colorbar(im, ax=axes[0].tolist(), label=label, shrink=0.9)
    axes[0][0].set_ylabel("layer (input side at the top)")
    return fig


def plot_best_layer(data, task: str | None = None) -> Figure:
    """Best layer to transfer from at each epoch (and its probe accuracy against the
    penultimate's), one line per run."""
    table = as_table(data)
    runs = [r for r in dict.fromkeys(table["run"])
            if ((table["run"] == r) & (table["metric"] == "probe_accuracy")
                & (table["layer"] != "")).any()]
    if not runs:
        raise ConfigError("no per-layer probe_accuracy rows; analyse with --layers auto")
    fig, (top, bottom) = plt.subplots(2, 1, sharex=True, layout="constrained",
                                      figsize=(6.4, 5.2), height_ratios=(1.2, 1))
    names = [PENULTIMATE if n == "" else n for n in layer_order(table)]
    colors = run_colors(runs)  # the same colour per run as every other chart
    for run in runs:
        best = best_layer(table, task, run)
        pos = [names.index(n) for n in best["layer"]]
        top.step(best["epoch"], pos, where="mid", marker="o", color=colors[run], label=run)
        bottom.plot(best["epoch"], best["value"], marker="o", color=colors[run],
                    label=f"{run}: best layer")
        bottom.plot(best["epoch"], best["penultimate"], marker="s", ls="--", color=colors[run],
                    alpha=0.7, label=f"{run}: penultimate")
    top.set_yticks(range(len(names)), names)
    top.set_ylim(len(names) - 0.5, -0.5)  # input side at the top, every label inside
    top.set_ylabel("best layer")
    top.legend(fontsize=8)
    bottom.set_ylabel("probe accuracy")
    bottom.set_title(f"task: {task}" if task else "mean over downstream tasks", fontsize=9)
    bottom.set_xlabel("epoch")
    bottom.legend(fontsize=7, ncol=2)
    epochs = sorted(table["epoch"].unique())
    bottom.set_xticks(epochs)
    return fig
