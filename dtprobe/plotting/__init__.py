"""Charts of the trade-off over a training run (matplotlib; imported only when charts are drawn).

- :mod:`~dtprobe.plotting.style`: colours, line styles, markers and the theme (a leaf);
- :mod:`~dtprobe.plotting.charts`: one function per chart of the tidy table;
- :mod:`~dtprobe.plotting.layer_charts`: layer x epoch charts (``--layers auto``);
- :mod:`~dtprobe.plotting.catalogue`: every chart the table allows, and writing them to files.

Import order: style <- charts <- layer_charts <- catalogue. This package re-exports the names
``dtprobe.plotting`` (formerly one module) had, so ``from dtprobe.plotting import plot_tradeoff``
keeps working.
"""

from __future__ import annotations

from dtprobe.plotting.catalogue import iter_figures, save_all_figures, write_figure
from dtprobe.plotting.charts import (
    ACCURACY_METRICS,
    LOG_METRICS,
    chance_levels,
    epoch_ticks,
    plot_cka,
    plot_cka_grid,
    plot_cka_to_final,
    plot_information_plane,
    plot_metrics,
    plot_tradeoff,
    plot_tradeoff_by_task,
    plot_tradeoff_over_epochs,
    plot_transfer_protocols,
    plot_transfer_tradeoff,
)
from dtprobe.plotting.style import EPOCH_CMAP, TASK_PALETTE, palette, run_colors, style, task_colors

__all__ = [
    "ACCURACY_METRICS",
    "EPOCH_CMAP",
    "LOG_METRICS",
    "TASK_PALETTE",
    "chance_levels",
    "epoch_ticks",
    "iter_figures",
    "palette",
    "plot_cka",
    "plot_cka_grid",
    "plot_cka_to_final",
    "plot_information_plane",
    "plot_metrics",
    "plot_tradeoff",
    "plot_tradeoff_by_task",
    "plot_tradeoff_over_epochs",
    "plot_transfer_protocols",
    "plot_transfer_tradeoff",
    "run_colors",
    "save_all_figures",
    "style",
    "task_colors",
    "write_figure",
]
