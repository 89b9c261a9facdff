"""Export an analysis to other tools: per-epoch metrics as TensorBoard scalars.

``dtprobe export RUN --tensorboard DIR`` writes one scalar series per metric, task and layer
(tag ``dtprobe/METRIC[/TASK][/LAYER]``) so the trade-off sits next to the run's loss curves.
The x axis is the checkpoint's optimiser step when every row has one (it lines up with the
training logs), else the epoch; rows with a NaN value are skipped.

TensorBoard's writer opens its event file by name and would write through a symbolic link
planted there; so the events are written into a private temporary folder first and each file
is then placed with :func:`checkpoints_manifest.atomic_writer` (a fresh, unpredictable
temporary name, renamed into place: a link at the name is replaced, never followed), like
every other file dtprobe writes. A run name that is not a plain file name (``..``, ``a/b``: a
hand-edited table) becomes one, so no event file lands outside ``log_dir``.
"""

from __future__ import annotations

import math
import os
import re
import shutil
import tempfile
from pathlib import Path

import checkpoints_manifest as cm

__all__ = ["export_tensorboard", "scalar_tag"]


def scalar_tag(metric: str, task: str = "", layer: str = "", estimator: str = "") -> str:
    """TensorBoard tag of one series: ``dtprobe/metric[/task][/layer][/estimator]``."""
    parts = ["dtprobe", metric] + [p for p in (task, layer, estimator) if p]
    return "/".join(str(p).replace(" ", "_") for p in parts)


def _folder_name(run: str) -> str:
    """``run`` as one plain path component (never ``.``, ``..`` or containing a separator)."""
    name = re.sub(r"[^\w.+=@-]", "_", str(run))
    return name if name.strip(".") else f"run_{name}"


def _place(private: Path, target: Path) -> None:
    """Every event file written under ``private``, placed atomically at the same relative
    path under ``target`` (folders created; links at the file names replaced)."""
    for src in sorted(p for p in private.rglob("*") if p.is_file()):
        dst = target / src.relative_to(private)
        dst.parent.mkdir(parents=True, exist_ok=True)
        with open(src, "rb") as fh, cm.atomic_writer(dst, "wb") as out:
            shutil.copyfileobj(fh, out)


def export_tensorboard(results, log_dir: str | os.PathLike[str], *, x: str = "auto") -> int:
    """Write ``results.table`` as TensorBoard scalars under ``log_dir``; returns the number of
    scalars written.

    Parameters
    ----------
    results : a :class:`dtprobe.results.Results` (``dtprobe.load_results(RUN)``).
    log_dir : event-file directory (one sub-folder per run when results hold several runs).
    x : ``"step"``, ``"epoch"`` or ``"auto"`` (steps when every row has one).
    """
    from dtprobe.errors import ConfigError

    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as exc:  # torch's writer needs the tensorboard package
        raise ConfigError("TensorBoard export needs the tensorboard package; install it with "
                          "`pip install 'dtprobe[tensorboard]'`") from exc
    if x not in ("auto", "step", "epoch"):
        raise ConfigError(f"x must be 'auto', 'step' or 'epoch', got {x!r}")
    table = results.table
    if table.empty:
        raise ConfigError("the analysis has no rows to export; run `dtprobe analyze` first")
    multi_estimator = table.groupby(["metric", "task", "layer"])["estimator"].nunique()
    runs = sorted(table["run"].unique())
    written = 0
    for run in runs:
        rows = table[table["run"] == run]
        steps = rows["step"] if "step" in rows else None
        have_steps = steps is not None and steps.notna().all() and (steps.astype(str) != "").all()
        use_step = x == "step" or (x == "auto" and have_steps)
        if x == "step" and not have_steps:
            raise ConfigError(f"run {run!r} has rows without a step; export with x='epoch'")
        target = Path(log_dir) / _folder_name(run) if len(runs) > 1 else Path(log_dir)
        private = Path(tempfile.mkdtemp(prefix="dtprobe-tensorboard-"))  # mode 0700, ours
        writer = SummaryWriter(log_dir=str(private))
        try:
            for r in rows.itertuples(index=False):
                value = float(r.value)
                if not math.isfinite(value):
                    continue
                key = (r.metric, r.task, r.layer)
                est = r.estimator if multi_estimator.get(key, 1) > 1 else ""
                position = int(float(r.step)) if use_step else int(r.epoch)
                # cka_to_run: one series per other run (its own column since issue 16)
                task = r.task or (f"vs_{r.other_run}" if getattr(r, "other_run", "") else "")
                writer.add_scalar(scalar_tag(r.metric, task, r.layer, est), value, position)
                written += 1
            writer.close()
            _place(private, target)
        finally:
            writer.close()
            shutil.rmtree(private, ignore_errors=True)
    return written
