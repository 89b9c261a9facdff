"""Table: the tidy rows assembled into ``metrics.csv``, and the trade-off chart beside it."""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path
from typing import Any

import pandas as pd
from tqdm.auto import tqdm

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
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        fig.savefig(tmp, dpi=130, bbox_inches="tight", format="png")
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()

