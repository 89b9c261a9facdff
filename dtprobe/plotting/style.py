"""Chart style: colours (colour-blind safe), line styles and markers, and the matplotlib theme.

A leaf of :mod:`dtprobe.plotting`: charts draw inside :func:`style` with these colours.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import matplotlib as mpl
import seaborn as sns
from cycler import cycler

EPOCH_CMAP = "viridis"
"""Colormap for epochs (trajectories) and CKA values: perceptually uniform, colour-blind safe."""

#: Line styles told apart in print, cycled per run or task.
LINESTYLES: tuple[Any, ...] = ("-", "--", ":", "-.", (0, (5, 1, 1, 1, 1, 1)), (0, (1, 3)))
#: Markers cycled per run where colour alone would not tell runs apart.
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "h")


def palette(n: int) -> list[tuple[float, float, float]]:
    """``n`` colours from seaborn's colour-blind-safe palette (cycled beyond ten)."""
    base = sns.color_palette("colorblind")
    return [tuple(base[i % len(base)]) for i in range(n)]


def run_colors(runs: Sequence[str]) -> dict[str, tuple[float, float, float]]:
    """A fixed colour per run, in order: the same run gets the same colour in every chart."""
    return dict(zip(runs, palette(len(runs)), strict=True))


TASK_PALETTE: tuple[str, ...] = ("#4477AA", "#EE6677", "#228833", "#AA3377", "#66CCEE",
                                 "#CCBB44", "#BBBBBB")
"""Paul Tol's "bright" scheme, reordered so the first four differ most: colour-blind safe and
distinct in print (the seaborn entries after the runs' gave two near-identical oranges)."""


def task_colors(tasks: Sequence[str]) -> dict[str, tuple[float, float, float]]:
    """A distinct colour per downstream task from :data:`TASK_PALETTE` (cycled beyond seven)."""
    rgb = [mpl.colors.to_rgb(c) for c in TASK_PALETTE]
    return {t: rgb[i % len(rgb)] for i, t in enumerate(tasks)}


def _rc() -> dict[str, Any]:
    rc: dict[str, Any] = {}
    rc.update(sns.axes_style("whitegrid"))
    rc.update(sns.plotting_context("notebook", font_scale=0.85))
    rc.update({
        "axes.prop_cycle": cycler(color=palette(10)),
        "axes.titlesize": 11,
        "axes.titleweight": "bold",
        "axes.labelsize": 10,
        "legend.fontsize": 9,
        "legend.title_fontsize": 9,
        "grid.linewidth": 0.6,
        "lines.linewidth": 1.8,
        "savefig.dpi": 150,
        "image.cmap": EPOCH_CMAP,
        "figure.constrained_layout.w_pad": 0.08,
        "figure.constrained_layout.h_pad": 0.08,
    })
    return rc


@contextlib.contextmanager
def style() -> Iterator[None]:
    """Context manager applying dtprobe's chart style (does not change global rcParams)."""
    with mpl.rc_context(_rc()):
        yield
