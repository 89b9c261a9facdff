"""``dtprobe demo``: the main job on the embedded default.

Trains a cross-entropy run and a CTC run on ``shapes`` with the same seed, data order and
schedule, analyses both (with CKA between them, and transfer to the embedded downstream datasets
``digits`` and ``textures``), and writes the trade-off charts, an HTML
report and ``OUT/README_table.md``, the README's demo table made from this run's own results
(``--update-readme README.md`` copies it between the README's demo markers, so the two cannot
drift). Re-running reuses finished runs and cached analysis.

Reproducibility. Everything random is seeded (initialisation, data order, augmentation, CTC
negatives, probe splits, estimator subsampling), and no step uses a nondeterministic kernel on the
CPU, so what is left to vary is how floating-point sums are split: PyTorch's CPU convolutions and
matrix products partition their reductions by the intra-op thread count, and the same seed gives
different weights with 1 and with 2 threads (checked: the epoch-2 weights of a tiny run differ,
and equal across repeats at a fixed count). Over 16 epochs such round-off differences grow into
different accuracies. The demo therefore runs with a fixed thread count (:data:`DEMO_THREADS`,
``--threads``) whatever the machine's core count or load, and a seeded demo is then repeatable
on one machine and library set. What still varies across machines: the PyTorch/oneDNN and
NumPy/BLAS versions and the CPU's instruction set (AVX2 vs AVX-512 kernels round differently),
and on a GPU the cuDNN algorithms; the table records the conditions it was made under.
"""

from __future__ import annotations

import contextlib
import os
import platform
import re
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import torch

import checkpoints_manifest as cm
from dtprobe.training.sweep import run_is_complete
from dtprobe.training.trainer import TrainConfig, train

# Sized so that both runs train and are analysed on two CPU cores in a few minutes while the
# trade-off is clear: shape accuracy rises as the colour and position probes fall. CTC uses the
# paper's "discriminability" preset: with the "transferability" preset (alpha 0.5, tau1 0.1)
# the small CNN barely learned the shape task in 16 epochs (test accuracy 0.25 vs CE's 0.97).
DEMO_DATA = {"n_train": 4000, "n_test": 1000, "noise": 0.1}
DEMO_ARCH = {"width": 16, "feature_dim": 128}
DEMO_EPOCHS = 16
DEMO_CTC = {"preset": "discriminability", "nce_k": 1024}
QUICK_DATA = {"n_train": 600, "n_test": 300}
# Transfer targets that need no download (dtprobe.data): real handwritten digits and procedural
# textures, both rendered to the source's input shape; quick mode shrinks textures.
DEMO_DOWNSTREAM = ["digits", "textures"]
QUICK_DOWNSTREAM = ["digits", "textures:n_train=300,n_test=300"]
DEMO_THREADS = 2
"""Intra-op threads of the demo: fixed, because CPU kernels round differently per thread count."""

TABLE_FILE = "README_table.md"
BEGIN_MARKER = "<!-- demo-table:begin (written by `dtprobe demo --update-readme README.md`) -->"
END_MARKER = "<!-- demo-table:end -->"


def demo_configs(out: Path, epochs: int = DEMO_EPOCHS, seed: int = 0, device: str = "auto",
                 quick: bool = False, data: dict[str, Any] | None = None,
                 batch_size: int | None = None, save_every: int | None = None,
                 ) -> dict[str, TrainConfig]:
    """The demo's two runs, ``{"ce": ..., "ctc": ...}`` (also used by the example notebook).

    ``data``, ``batch_size`` and ``save_every`` override the demo's values (the notebook's
    small setting); CTC's stage 2 always starts after 2/3 of the epochs.
    """
    if data is None:
        data = dict(QUICK_DATA) if quick else dict(DEMO_DATA)
    if quick:
        epochs = min(epochs, 4)
    if save_every is None:
        save_every = 1 if quick else 2
    common: dict[str, Any] = dict(dataset="shapes", dataset_params=dict(data), arch="small_cnn",
                                  arch_params=dict(DEMO_ARCH), epochs=epochs,
                                  save_every=save_every, seed=seed, device=device)
    if batch_size is not None:
        common["batch_size"] = batch_size
    ctc = {**DEMO_CTC, "stage_two_epoch": max(1, round(epochs * 2 / 3))}
    # CTC draws its negatives from the other classes: at most N - max_c n_c of them.  On the
    # small data of --quick (or a small override) half the training set is under that pool for
    # any near-balanced labels, instead of 1024 clipped with a warning the user cannot act on.
    if "n_train" in data:
        ctc["nce_k"] = min(int(ctc["nce_k"]), max(1, int(data["n_train"]) // 2))
    return {"ce": TrainConfig(out=str(out / "ce"), objective="ce", **common),
            "ctc": TrainConfig(out=str(out / "ctc"), objective="ctc", ctc=ctc, **common)}


@contextlib.contextmanager
def fixed_threads(n: int) -> Iterator[None]:
    """Run the block with ``torch.set_num_threads(n)`` and restore the previous count after."""
    before = torch.get_num_threads()
    torch.set_num_threads(int(n))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
        for line in text.splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def conditions(device: str = "cpu") -> dict[str, Any]:
    """What the demo's numbers and wall time depend on, recorded next to the table."""
    import numpy as np

    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        usable = os.cpu_count() or 0
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    return {"cpu": _cpu_model(), "cores": os.cpu_count() or 0, "usable_cores": usable,
            "torch_threads": torch.get_num_threads(), "load_average_1min": round(load[0], 2),
            "device": device, "torch": torch.__version__, "numpy": np.__version__,
            "python": platform.python_version()}


def _train_or_resume(cfg: TrainConfig) -> None:
    run_dir = Path(cfg.out)
    if run_is_complete(run_dir, cfg.epochs):
        print(f"{run_dir}: already trained, reusing it")
        return
    cfg.resume = (run_dir / cm.MANIFEST_NAME).exists()
    train(cfg)


def _fmt(value: float) -> str:
    return "n/a" if pd.isna(value) else f"{value:.3f}"


def demo_table(results, names: dict[str, str] | None = None) -> str:
    """Markdown table of the README: source accuracy and each probe's peak and last value.

    Parameters
    ----------
    results : :class:`dtprobe.results.Results` of the demo's runs.
    names : run name -> label shown in the first column (default: upper-case run name).
    """
    summary = results.summary()
    summary = summary[summary["layer"] == ""]
    peaks = results.probe_peaks()
    tasks = sorted(peaks["task"].unique())
    header = ["run", "source accuracy (first -> last epoch)"]
    header += [f"{t} probe: peak (epoch) -> last" for t in tasks]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for run in results.runs:
        src = summary[(summary["run"] == run) & (summary["metric"] == "source_accuracy")]
        if src.empty:
            continue
        s = src.iloc[0]
        cells = [(names or {}).get(run, run.upper()),
                 f"{_fmt(s['first'])} (epoch {s['first_epoch']}) -> {_fmt(s['last'])} "
                 f"(epoch {s['last_epoch']})"]
        for task in tasks:
            p = peaks[(peaks["run"] == run) & (peaks["task"] == task)]
            cells.append("n/a" if p.empty else
                         f"{_fmt(p.iloc[0]['peak'])} ({p.iloc[0]['peak_epoch']}) -> "
                         f"{_fmt(p.iloc[0]['last'])}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def demo_finding(results, base: str = "ce", other: str = "ctc") -> str:
    """One sentence comparing the last-epoch probes and source accuracy of two runs.

    Each probe's difference is judged against its uncertainty, never by its sign alone: it
    counts only when the 95 % interval of the difference, built from the two probe rows'
    Wilson intervals by Newcombe's method (:func:`dtprobe.results.uncertainty.difference_interval`),
    excludes 0; otherwise the sentence says "no difference beyond the intervals".
    """
    from dtprobe.results.uncertainty import last_epoch_differences, verdict_sentence

    if base not in results.runs or other not in results.runs:
        return ""
    table = results.table
    diffs = last_epoch_differences(table, base, other).dropna(subset=["diff"])
    if diffs.empty:
        return ""

    def cell(r) -> str:
        if pd.isna(r.low):
            return f"{r.task} {r.diff:+.3f}"
        return f"{r.task} {r.diff:+.3f} [{r.low:+.3f}, {r.high:+.3f}]"

    parts = ", ".join(cell(r) for r in diffs.itertuples())
    verdict = verdict_sentence(diffs, other.upper(), base.upper())
    src = last_epoch_differences(table, base, other, metric="source_accuracy")
    src_txt = ""
    if not src.empty and pd.notna(src.iloc[0]["diff"]):
        s = src.iloc[0]
        src_txt = f"; source accuracy {s['diff']:+.3f}"
        if s["verdict"] != "no interval":
            src_txt += f" [{s['low']:+.3f}, {s['high']:+.3f}]"
    return (f"Last-epoch probes, {other.upper()} minus {base.upper()} [95% interval of the "
            f"difference]: {parts}. {verdict[0].upper()}{verdict[1:]} (a difference counts "
            f"only when its interval, from the two probes' Wilson intervals by Newcombe's "
            f"method, excludes 0){src_txt}.")


def write_table_file(results, out: Path, info: dict[str, Any], wall_s: float | None) -> Path:
    """Write ``out/README_table.md``: the table, the finding and the conditions it was made in."""
    cond = ", ".join(f"{k} {v}" for k, v in info.items())
    timing = ""
    if wall_s is not None:
        minutes, seconds = divmod(round(wall_s), 60)
        timing = (f"Wall time {minutes} min {seconds:02d} s for training and analysis (a shared "
                  "or loaded machine takes longer; the load average says how busy it was).")
    text = "\n\n".join(p for p in (demo_table(results), demo_finding(results),
                                   f"Made by `dtprobe demo` under: {cond}. {timing}".strip())
                       if p) + "\n"
    path = out / TABLE_FILE
    cm.atomic_write_text(path, text)
    return path


def update_readme_markers(readme: Path, table_file: Path) -> None:
    """Replace the text between the demo markers of ``readme`` with ``table_file``'s text."""
    from dtprobe.errors import ConfigError

    text = readme.read_text(encoding="utf-8")
    pattern = re.compile(re.escape(BEGIN_MARKER) + r".*?" + re.escape(END_MARKER), re.S)
    if not pattern.search(text):
        raise ConfigError(f"{readme}: no demo markers; add the lines {BEGIN_MARKER!r} and "
                          f"{END_MARKER!r} where the demo table belongs")
    block = f"{BEGIN_MARKER}\n{table_file.read_text(encoding='utf-8').strip()}\n{END_MARKER}"
    cm.atomic_write_text(readme, pattern.sub(lambda _m: block, text, count=1))


def run_demo(out: Path, epochs: int = DEMO_EPOCHS, seed: int = 0, device: str = "auto",
             quick: bool = False, fresh: bool = False, threads: int = DEMO_THREADS,
             update_readme: str | os.PathLike[str] | None = None, progress: bool = True) -> int:
    """Train CE and CTC runs on ``shapes``, analyse and chart them; returns an exit code.

    Runs with ``threads`` intra-op threads (see the module docstring for why), writes
    ``out/README_table.md`` and, with ``update_readme``, copies it into that README.
    """
    start = time.perf_counter()
    load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    with fixed_threads(threads):
        code, both = _run(out, epochs, seed, device, quick, fresh, progress)
    wall = time.perf_counter() - start
    info = conditions(device)
    info["torch_threads"] = threads
    info["load_average_1min"] = f"{load_before:.2f} at start, {info['load_average_1min']} at end"
    table = write_table_file(both, out, info, wall)
    print(f"  README table: {table}")
    if update_readme is not None:
        update_readme_markers(Path(update_readme), table)
        print(f"  updated {update_readme} between its demo markers")
    print(f"demo wall time {wall:.0f} s on {info['usable_cores']} usable core(s) of "
          f"{info['cores']}, {threads} torch thread(s), 1-min load average "
          f"{info['load_average_1min']}, device {device}")
    return code


def _run(out: Path, epochs: int, seed: int, device: str, quick: bool, fresh: bool,
         progress: bool = True):
    from dtprobe.analysis import analyze
    from dtprobe.plotting import save_all_figures
    from dtprobe.results.core import compare
    from dtprobe.results.report import write_report

    if fresh and out.exists():
        shutil.rmtree(out)
    runs = demo_configs(out, epochs, seed, device, quick)
    for name, cfg in runs.items():
        cfg.progress = progress
        print(f"== training {name} ({cfg.epochs} epochs) ==")
        _train_or_resume(cfg)
    failed = 0
    for name, other in (("ce", "ctc"), ("ctc", "ce")):
        print(f"== analysing {name} ==")
        res = analyze(out / name, compare=[out / other], device=device, seed=seed,
                      progress=progress,
                      downstream=QUICK_DOWNSTREAM if quick else DEMO_DOWNSTREAM)
        failed += len(res.failures)
    both = compare([out / "ce", out / "ctc"])
    figures = save_all_figures(both, out / "figures")
    report = write_report(both, out / "report.html")
    print(demo_table(both))
    finding = demo_finding(both)
    if finding:
        print(finding)
    transfer = both.transfer()
    if not transfer.empty:
        print("\ncross-dataset transfer (linear-probe accuracy per epoch):")
        print(transfer.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
        tau = both.score_rank_correlation()
        wide = tau.pivot_table(index=["run", "score"], columns="dataset", values="tau",
                               sort=False)
        print("\nKendall tau of each score vs downstream probe accuracy across epochs:")
        print(wide.to_string(float_format=lambda v: f"{v:+.2f}"))
    print("\nresults:")
    for name in runs:
        print(f"  {out / name / 'analysis' / 'metrics.csv'}")
    print(f"  charts: {out / 'figures'} ({len(figures)} files)")
    print(f"  report: {report}")
    return (1 if failed else 0), both
