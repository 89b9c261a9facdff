"""``dtprobe sweep``: one run per objective and seed, analysed and charted as Kornblith et al. do.

Every run of a sweep shares all training flags (data, architecture, schedule, data order,
augmentation); only the objective, its parameters and the seed differ. The sweep directory holds
``OBJECTIVE-seedS/`` run directories, ``sweep.json`` (the list of runs), ``sweep_runs.csv`` (one
row per run: final-epoch metrics), ``sweep_summary.csv`` (one row per objective: mean and
standard deviation over seeds) and ``figures/``:

* ``sweep_accuracy_vs_transfer``: final source accuracy vs mean downstream probe accuracy,
  one point per objective with error bars across seeds (Kornblith et al. 2021, Fig. 1);
* ``sweep_separation_vs_transfer``: class separation R^2 vs transfer (their Fig. 4);
* the per-epoch trade-off charts of all runs together (:func:`dtprobe.plotting.save_all_figures`).

Re-running a sweep reuses finished runs and cached analyses and continues interrupted ones.
A run that fails costs that run only (:func:`dtprobe.runtime.isolation.contain`'s rule, whatever
exception class it raised): it is recorded with ``status`` ``failed`` and its one-line
``error`` in ``sweep.json`` and ``sweep_runs.csv``, counted in the summary's ``failed`` column,
and the other runs go on; a re-run tries it again. Ctrl-C and a full disk still end the sweep,
and a sweep whose every run failed ends with one line naming the first failure.
``dtprobe report SWEEP_DIR`` and ``dtprobe plot SWEEP_DIR`` take the sweep directory.

References
----------
S. Kornblith, T. Chen, H. Lee, M. Norouzi, "Why Do Better Loss Functions Lead to Less
Transferable Features?", NeurIPS 2021.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

import checkpoints_manifest as cm
from dtprobe.errors import ConfigError, DtprobeError, TrainingDivergedError
from dtprobe.runtime.isolation import contain
from dtprobe.table import ANALYSIS_DIR, FAILURES_FILE
from dtprobe.training.trainer import TrainConfig, train

SWEEP_FILE = "sweep.json"
#: Per-run columns of the sweep table (``transfer`` = mean probe accuracy over downstream tasks).
COLUMNS = ("source_accuracy", "class_separation", "transfer")


def run_is_complete(run_dir: Path, epochs: int) -> bool:
    """Whether ``run_dir``'s manifest records the checkpoint of epoch ``epochs`` (the last)."""
    try:
        manifest = cm.read_manifest(run_dir)
    except (cm.ManifestError, FileNotFoundError, OSError):
        return False
    return any(c.epoch == epochs for c in manifest.checkpoints)


def train_or_resume(cfg: TrainConfig) -> Path:
    """Train ``cfg``, continue it if interrupted, or reuse it if complete."""
    run_dir = Path(cfg.out)
    if run_is_complete(run_dir, cfg.epochs):
        return run_dir
    return train(replace(cfg, resume=(run_dir / cm.MANIFEST_NAME).exists()))


def _write_index(out: Path, runs: list[dict[str, Any]]) -> None:
    out.mkdir(parents=True, exist_ok=True)  # atomic, never through a link (random temp name)
    cm.atomic_write_text(out / SWEEP_FILE, json.dumps(
        {"format": "dtprobe-sweep", "version": 1, "runs": runs}, indent=2))


def read_sweep(path: str | Path) -> list[dict[str, Any]]:
    """The runs of the sweep in ``path`` (``objective``, ``seed``, ``dir`` relative to it,
    ``status``: ``ok``, ``diverged``, ``failed`` (with its ``error``) or ``pending``)."""
    index = Path(path) / SWEEP_FILE
    try:
        doc = json.loads(index.read_text())
        return list(doc["runs"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"{index}: not a readable sweep index ({type(exc).__name__}); "
                          "re-run `dtprobe sweep` into that directory") from None


def expand_sweeps(paths: Iterable[str | Path]) -> list[Path]:
    """Replace every sweep directory in ``paths`` by its run directories (others unchanged)."""
    out: list[Path] = []
    for p in map(Path, paths):
        if (p / SWEEP_FILE).is_file():
            out += [p / r["dir"] for r in read_sweep(p)
                    if r.get("status") not in ("diverged", "failed")]
        else:
            out.append(p)
    return out


def final_metrics(table: pd.DataFrame) -> dict[str, float]:
    """Last-epoch source accuracy, class separation, per-task probe accuracy and their mean
    (``transfer``) from one run's tidy table."""
    t = table[table["layer"].fillna("") == ""] if "layer" in table else table
    last = t[t["epoch"] == t["epoch"].max()]
    row: dict[str, float] = {"epoch": float(last["epoch"].max())}
    for metric in ("source_accuracy", "class_separation"):
        vals = last.loc[last["metric"] == metric, "value"]
        row[metric] = float(vals.iloc[0]) if len(vals) else float("nan")
    probes = last[last["metric"] == "probe_accuracy"]
    for task, value in zip(probes["task"], probes["value"], strict=True):
        row[f"probe_accuracy[{task}]"] = float(value)
    row["transfer"] = float(probes["value"].mean()) if len(probes) else float("nan")
    return row


def summarize(runs: pd.DataFrame) -> pd.DataFrame:
    """Mean and standard deviation over seeds (``ddof=1``; 0 for one seed) per objective.

    ``seeds`` counts the runs that produced numbers; ``diverged`` and ``failed`` the others.
    """
    skip = ("objective", "seed", "run", "epoch", "status", "error")
    value_cols = [c for c in runs.columns if c not in skip]
    rows = []
    for name, group in runs.groupby("objective", sort=False):
        status = group.get("status", pd.Series(dtype=str))
        diverged, failed = int((status == "diverged").sum()), int((status == "failed").sum())
        row: dict[str, Any] = {"objective": name, "seeds": len(group) - diverged - failed,
                               "diverged": diverged, "failed": failed}
        for c in value_cols:
            vals = group[c].to_numpy(dtype=float)
            row[c] = float(np.mean(vals[np.isfinite(vals)])) if np.isfinite(vals).any() \
                else float("nan")
            finite = vals[np.isfinite(vals)]
            row[f"{c}_std"] = float(np.std(finite, ddof=1)) if len(finite) > 1 else 0.0
        rows.append(row)
    return pd.DataFrame(rows)


def kornblith_check(summary: pd.DataFrame, baseline: str = "ce") -> pd.DataFrame:
    """For every objective whose mean source accuracy beats ``baseline``'s: does it separate
    classes more and transfer worse, as Kornblith et al. (2021) found on ImageNet?"""
    base = summary[summary["objective"] == baseline]
    if base.empty:
        return pd.DataFrame(columns=["objective", "beats_ce", "more_separation", "worse_transfer"])
    b = base.iloc[0]
    out = summary[summary["objective"] != baseline][["objective"]].copy()
    out["beats_ce"] = summary["source_accuracy"] > b["source_accuracy"]
    out["more_separation"] = summary["class_separation"] > b["class_separation"]
    out["worse_transfer"] = summary["transfer"] < b["transfer"]
    return out.reset_index(drop=True)


def plot_sweep(summary: pd.DataFrame, out_dir: Path, formats: Sequence[str] = ("png",)
               ) -> list[Path]:
    """The two Kornblith charts: source accuracy vs transfer, class separation vs transfer."""
    import matplotlib.pyplot as plt

    from dtprobe.plotting import palette, style, write_figure

    out_dir.mkdir(parents=True, exist_ok=True)
    colors = palette(len(summary))
    written: list[Path] = []
    for x, xlabel, name in (
            ("source_accuracy", "final source accuracy (own head, test)",
             "sweep_accuracy_vs_transfer"),
            ("class_separation", "class separation R$^2$ (penultimate, test)",
             "sweep_separation_vs_transfer")):
        with style():
            fig, ax = plt.subplots(figsize=(6.4, 4.6), constrained_layout=True)
            for color, (_, row) in zip(colors, summary.iterrows(), strict=True):
                if not (np.isfinite(row[x]) and np.isfinite(row["transfer"])):
                    continue  # every seed diverged
                ax.errorbar(row[x], row["transfer"], xerr=row[f"{x}_std"],
                            yerr=row["transfer_std"], fmt="o", color=color, capsize=3,
                            label=f"{row['objective']} (n={row['seeds']})")
            ax.set_xlabel(xlabel)
            ax.set_ylabel("transfer: mean downstream probe accuracy")
            ax.set_title("objectives: " + ("accuracy" if x == "source_accuracy"
                                           else "class separation") + " vs transfer")
            ax.legend(fontsize=7, loc="best")
            written.extend(write_figure(fig, out_dir, name, formats))
            plt.close(fig)
    return written


def run_sweep(configs: Mapping[tuple[str, int], TrainConfig], out: Path, *,
              metrics: list[str] | None = None, device: str = "auto",
              progress: bool = True, plot: bool = True) -> pd.DataFrame:
    """Train (or reuse) and analyse every ``(objective, seed) -> TrainConfig``, write the sweep
    tables and charts into ``out``; returns the per-objective summary.

    Raises
    ------
    ConfigError
        No runs, or an objective that is not registered (checked before anything trains).
    """
    from dtprobe.analysis import analyze
    from dtprobe.plotting import save_all_figures
    from dtprobe.results.core import compare
    from dtprobe.training.objectives import get_objective

    if not configs:
        raise ConfigError("dtprobe sweep needs at least one --objectives name")
    for name, _seed in configs:
        get_objective(name)
    out = Path(out)
    index = [{"objective": n, "seed": s, "dir": Path(c.out).name, "status": "pending"}
             for (n, s), c in configs.items()]
    _write_index(out, index)
    rows: list[dict[str, Any]] = []
    trained: list[Path] = []
    for entry, ((name, seed), cfg) in zip(index, configs.items(), strict=True):
        print(f"== sweep: {name} seed {seed} ==")
        try:
            run_dir = train_or_resume(cfg)
            res = analyze(run_dir, metrics=metrics, device=device, progress=progress,
                          plot=False)
            if len(res.failures):
                # A run with lost checkpoints would enter the summary with an earlier epoch's
                # numbers as its "final" ones: it is failed, and the next sweep retries it.
                raise DtprobeError(
                    f"{name} seed {seed}: its analysis recorded {len(res.failures)} failure(s), "
                    f"first: {res.failures['reason'].iloc[0]} (all in "
                    f"{run_dir / ANALYSIS_DIR / FAILURES_FILE})")
            final = final_metrics(res.table)
        except TrainingDivergedError as exc:
            # One diverged objective must not cost the others: record it and go on.
            print(f"dtprobe sweep: {exc}")
            rows.append({"objective": name, "seed": seed, "run": Path(cfg.out).name,
                         "status": "diverged"})
            entry["status"] = "diverged"
            _write_index(out, index)
            continue
        except Exception as exc:  # any class: isolation is not a list of expected types
            failure = contain(exc, f"{name} seed {seed}", "the sweep goes on with the other runs")
            print(f"dtprobe sweep: FAILED {failure.reason}", file=sys.stderr)
            rows.append({"objective": name, "seed": seed, "run": Path(cfg.out).name,
                         "status": "failed", "error": failure.reason})
            entry.update(status="failed", error=failure.reason)
            _write_index(out, index)
            continue
        rows.append({"objective": name, "seed": seed, "run": run_dir.name, "status": "ok",
                     **final})
        trained.append(run_dir)
        entry["status"] = "ok"
        entry.pop("error", None)
        _write_index(out, index)
    runs = pd.DataFrame(rows)
    for col in COLUMNS:
        if col not in runs:
            runs[col] = np.nan
    cm.atomic_write_text(out / "sweep_runs.csv", runs.to_csv(index=False))
    summary = summarize(runs)
    cm.atomic_write_text(out / "sweep_summary.csv", summary.to_csv(index=False))
    if plot:
        plot_sweep(summary, out / "figures")
        if trained:
            save_all_figures(compare(trained), out / "figures")
    failed = [r for r in rows if r["status"] == "failed"]
    if failed and not trained:
        raise DtprobeError(f"all {len(rows)} run(s) of the sweep failed or diverged; first "
                           f"failure: {failed[0]['error']} (details: {out / SWEEP_FILE})")
    return summary
