"""Table: the tidy rows assembled into ``metrics.csv``, and the trade-off chart beside it."""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path
from typing import Any

import pandas as pd

import checkpoints_manifest as cm
from dtprobe.runtime.progress import tqdm
from dtprobe.table import FAILURE_COLUMNS, TABLE_COLUMNS, normalize_table  # noqa: F401

COLUMNS = list(TABLE_COLUMNS)


def note(message: str) -> None:
    tqdm.write(message, file=sys.stderr)


def finalise_table(rows: list[dict[str, Any]], feature_dtype: str = "float32") -> pd.DataFrame:
    """The sorted table of ``rows``; a ``feature_dtype`` other than float32 (``--feature-dtype``)
    is recorded in every row's ``params``, as the setting the values were computed with."""
    if feature_dtype != "float32":
        rows = [{**r, "params": with_setting(r.get("params"), "feature_dtype", feature_dtype)}
                for r in rows]
    # normalize_table also brings rows of parts cached by older versions to the current schema
    table = normalize_table(pd.DataFrame(rows, columns=COLUMNS), source="analysis rows")
    return table[COLUMNS].sort_values(["epoch", "metric", "task", "layer", "other_run"],
                                      kind="stable").reset_index(drop=True)


def with_setting(params: Any, key: str, value: Any) -> str:
    """A row's ``params`` JSON text with ``key`` set to ``value``."""
    doc = json.loads(params) if isinstance(params, str) and params else {}
    return json.dumps({**doc, key: value}, sort_keys=True, default=str)


def save_tradeoff_chart(table: pd.DataFrame, path: Path, epoch_note: str = "") -> None:
    """The trade-off chart; ``epoch_note`` (what epoch 0 means for the run) is printed under it."""
    import matplotlib.pyplot as plt

    from dtprobe.plotting import plot_tradeoff_over_epochs

    fig = plot_tradeoff_over_epochs(table).figure
    if epoch_note:
        fig.text(0.01, -0.02, epoch_note, fontsize=7, ha="left", va="top", wrap=True)
    try:  # rendered in memory, then written atomically: no predictable temp name to plant
        buf = io.BytesIO()
        fig.savefig(buf, dpi=130, bbox_inches="tight", format="png")
    finally:
        plt.close(fig)
    cm.atomic_write_bytes(path, buf.getvalue())

