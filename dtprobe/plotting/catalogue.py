"""The chart catalogue: every chart the available metrics allow (:func:`iter_figures`), and writing
them all to files (:func:`save_all_figures`, also behind ``dtprobe plot`` and the report).
"""

from __future__ import annotations

import io
import re
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.backend_bases import FigureCanvasBase
from matplotlib.figure import Figure

import checkpoints_manifest as cm
from dtprobe.errors import ConfigError
from dtprobe.plotting import charts
from dtprobe.plotting import layer_charts as layer_plots
from dtprobe.plotting.style import style
from dtprobe.table import downstream_mask, downstream_tasks, transfer_protocols

if TYPE_CHECKING:  # pragma: no cover  (type only: plotting never imports dtprobe.results)
    from dtprobe.results.core import Results

__all__ = ["iter_figures", "save_all_figures", "write_figure"]


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "x"


def iter_figures(results: Results | pd.DataFrame,
                 cka: Mapping[str, pd.DataFrame] | None = None
                 ) -> Iterator[tuple[str, str, Figure]]:
    """Yield ``(name, caption, figure)`` for every chart the available metrics allow.

    Charts whose metrics are absent are skipped. The caller owns (and should close) each
    figure. Names are unique and a chart has the same name wherever it is written:
    ``tradeoff`` (accuracies over epochs, also ``RUN_DIR/analysis/tradeoff.png``),
    ``tradeoff_plane``, ``tradeoff_plane_by_task``, ``transfer_protocols`` (linear probe vs
    few-shot vs fine-tuned transfer per downstream dataset), ``metrics``,
    ``information_plane[_<estimator>]``, ``cka_to_final``, ``temporal_cka``.
    """
    table = charts.as_table(results)
    if cka is None:
        cka = getattr(results, "cka_matrices", {}) or {}
    finite = table[np.isfinite(table["value"])]
    present = set(finite.loc[finite["layer"] == "", "metric"])
    if {"source_accuracy", "transfer_accuracy_mean"} <= present:
        names = downstream_tasks(finite)
        yield ("tradeoff_transfer", "Source accuracy against the mean linear-probe accuracy on "
               f"the downstream datasets ({', '.join(names)}): transfer to other images.",
               charts.plot_transfer_tradeoff(table).figure)
    if len(transfer_protocols(finite[downstream_mask(finite)])) >= 2:
        yield ("transfer_protocols", "Downstream test accuracy over epochs under the linear "
               "probe, few-shot (10-shot ridge, band = interval over draws) and full "
               "fine-tuning, one panel per dataset; markers show each curve's best epoch.",
               charts.plot_transfer_protocols(table))
    if present & {"source_accuracy", "probe_accuracy"}:
        yield ("tradeoff", "Source and downstream probe accuracy against epoch; triangles mark "
               "where each probe peaked, dotted lines the chance levels.",
               charts.plot_tradeoff_over_epochs(table).figure)
    if {"source_accuracy", "probe_accuracy"} <= present:
        yield ("tradeoff_plane", "Source accuracy (discriminability) against downstream "
               "linear-probe accuracy (transferability, mean over tasks), one trajectory per "
               "run.", charts.plot_tradeoff(table).figure)
        if len(charts.metric_tasks(finite, "probe_accuracy")) > 1:
            yield ("tradeoff_plane_by_task", "The same trade-off plane for each downstream task.",
                   charts.plot_tradeoff_by_task(table))
    if present:
        yield ("metrics", "Every metric against epoch (colour = run, line style = task).",
               charts.plot_metrics(table))
    if {"mi_xt", "mi_ty"} <= present:
        ex = set(finite.loc[finite["metric"] == "mi_xt", "estimator"])
        ey = set(finite.loc[finite["metric"] == "mi_ty", "estimator"])
        common = sorted(ex & ey)
        if len(common) > 1:
            for est in common:
                yield (f"information_plane_{_slug(est or 'default')}",
                       f"Information plane ({est} estimator).",
                       charts.plot_information_plane(table, estimator=est).figure)
        elif common or (len(ex) == 1 and len(ey) == 1):
            yield ("information_plane", "Information plane: I(X;T) against I(T;Y).",
                   charts.plot_information_plane(table).figure)
    if "cka_to_final" in set(finite["metric"]):
        yield ("cka_to_final", "Linear CKA of each epoch's features to the final epoch's.",
               charts.plot_cka_to_final(table).figure)
    layered = set(finite.loc[finite["layer"] != "", "metric"])
    if layered & {"probe_accuracy", "cka_to_final"}:
        if "probe_accuracy" in layered:
            yield ("layer_probe_heatmap", "Downstream linear-probe accuracy (mean over tasks) "
                   "of each layer's pooled features at each epoch: where and when "
                   "transferability is lost.", layer_plots.plot_layer_heatmap(table))
            yield ("best_layer", "The layer whose features transfer best at each epoch, and "
                   "its probe accuracy against the penultimate layer's.",
                   layer_plots.plot_best_layer(table))
        if "cka_to_final" in layered:
            yield ("layer_cka_to_final_heatmap", "Linear CKA of each layer to the same layer at "
                   "the final epoch: which layers are still changing.",
                   layer_plots.plot_layer_heatmap(table, "cka_to_final", vmin=0.0, vmax=1.0))
    usable = {r: m for r, m in cka.items() if isinstance(m, pd.DataFrame) and not m.empty}
    if usable:
        yield ("temporal_cka", "Temporal linear CKA between every pair of epochs "
               "(colour scale fixed to [0, 1]).", charts.plot_cka_grid(usable))


def write_figure(fig: Figure, out_dir: Path, name: str, formats: Sequence[str]) -> list[Path]:
    """Write ``fig`` as ``out_dir/name.<fmt>`` for each format: rendered in memory, then placed by
    the atomic writer (random temp name, no planted link followed). Returns the paths."""
    written = []
    for fmt in formats:
        path = out_dir / f"{name}.{fmt}"
        buf = io.BytesIO()
        fig.savefig(buf, format=fmt)
        cm.atomic_write_bytes(path, buf.getvalue())
        written.append(path)
    return written


def save_all_figures(results: Results | pd.DataFrame, out_dir: str | Path,
                     formats: Sequence[str] = ("png",)) -> list[Path]:
    """Write every chart the available metrics allow to ``out_dir``.

    Parameters
    ----------
    results : :class:`~dtprobe.results.Results` (or a bare table, then without CKA heatmaps).
    out_dir : directory, created if needed.
    formats : file formats understood by matplotlib, e.g. ``("png", "pdf", "svg")``.

    Returns
    -------
    list of Path
        The files written, ``<out_dir>/<chart>.<format>``; charts whose metrics are missing
        are skipped, not errors.
    """
    supported = set(FigureCanvasBase.get_supported_filetypes())
    formats = [f.lower().lstrip(".") for f in formats]
    bad = [f for f in formats if f not in supported]
    if bad:
        raise ConfigError(f"unsupported figure format(s) {', '.join(bad)}; choose from "
                          f"{', '.join(sorted(supported))}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    for name, _caption, fig in iter_figures(results):
        try:
            with style():
                written.extend(write_figure(fig, out, name, formats))
        finally:
            plt.close(fig)
    return written
