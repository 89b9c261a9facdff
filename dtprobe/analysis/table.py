"""Table: the tidy rows assembled into ``metrics.csv``, and the trade-off chart beside it."""

from __future__ import annotations

import io
import sys
from pathlib import Path
from typing import Any

import pandas as pd
from tqdm.auto import tqdm

import checkpoints_manifest as cm
from dtprobe.table import TABLE_COLUMNS

COLUMNS = list(TABLE_COLUMNS)
FAILURE_COLUMNS = ["run", "epoch", "path", "reason"]


def note(message: str) -> None:
    tqdm.write(message, file=sys.stderr)


def finalise_table(rows: list[dict[str, Any]]) -> pd.DataFrame:
    table = pd.DataFrame(rows, columns=COLUMNS)
    table["task"] = table["task"].fillna("")
    table["layer"] = table["layer"].fillna("")
    table["step"] = table["step"].astype("Int64")
    return table.sort_values(["epoch", "metric", "task", "layer"],
                             kind="stable").reset_index(drop=True)


def save_tradeoff_chart(table: pd.DataFrame, path: Path) -> None:
    import matplotlib.pyplot as plt

    from dtprobe.plotting import plot_tradeoff_over_epochs

    fig = plot_tradeoff_over_epochs(table).figure
    try:  # rendered in memory, then written atomically: no predictable temp name to plant
        buf = io.BytesIO()
        fig.savefig(buf, dpi=130, bbox_inches="tight", format="png")
    finally:
        plt.close(fig)
    cm.atomic_write_bytes(path, buf.getvalue())

