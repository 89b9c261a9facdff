"""dtprobe benchmark suite: each row times dtprobe and a baseline side by side in one run.

``python -m benchmarks.run [--quick]`` runs every benchmark module (``separation``, ``cka``,
``probe``, ``extraction``, ``gpu_extraction``, ``memory``, ``training``), prints one table and
checks that dtprobe and the baseline agree on their outputs. Timings are never asserted (the
machines are shared and noisy); agreement always is.

This module holds what the benchmark modules share: the :class:`Row` of the results table,
timers, thread control and the table formatting.
"""

from __future__ import annotations

import gc
import math
import os
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

REPO = Path(__file__).resolve().parent.parent


@dataclass
class Row:
    """One line of the results table.

    Attributes
    ----------
    name : what is measured ("class separation vs pairwise definition", ...).
    sizes : problem sizes in words.
    ours, base : dtprobe's and the baseline's measurement, in ``unit``.
    unit : ``"s"``, ``"MB"`` or ``"img/s"``.
    ratio : ``base / ours`` when ``kind == "speedup"`` (times), ``ours / base`` when
        ``"factor"`` (a cost factor) or ``"rate"`` (a throughput fraction).
    kind : ``"speedup"`` and ``"rate"`` (goal: ratio at least ``goal``) or ``"factor"``
        (goal: ratio at most ``goal``); ``goal=None`` = reported only.
    goal : the threshold, or ``None``.
    agreement : how the two outputs compare, in words (with the tolerance).
    agree_ok : whether they agree within the tolerance.
    baseline : what the baseline is.
    note : anything a reader must know (extrapolation, skipped, ...).
    skipped : the row could not run here (e.g. no CUDA); ``note`` says why.
    """

    name: str
    sizes: str
    ours: float | None = None
    base: float | None = None
    unit: str = "s"
    kind: str = "speedup"
    goal: float | None = None
    agreement: str = ""
    agree_ok: bool = True
    baseline: str = ""
    note: str = ""
    skipped: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def ratio(self) -> float | None:
        if self.ours is None or self.base is None:
            return None
        if self.kind == "speedup":
            return self.base / self.ours if self.ours > 0 else math.inf
        return self.ours / self.base if self.base > 0 else math.inf

    @property
    def met(self) -> bool | None:
        if self.goal is None or self.ratio is None:
            return None
        return self.ratio <= self.goal if self.kind == "factor" else self.ratio >= self.goal

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out.update(ratio=self.ratio, met=self.met)
        return out


def timed(fn: Callable[[], T], repeat: int = 1) -> tuple[float, T]:
    """Best wall time of ``repeat`` calls of ``fn`` (after a garbage collection) and its result."""
    best, result = math.inf, None
    for _ in range(max(1, repeat)):
        gc.collect()
        t0 = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - t0)
    return best, result  # type: ignore[return-value]


def set_threads(n: int) -> None:
    """Use ``n`` threads in torch, and in every BLAS / OpenMP pool of this process and its
    child processes, so that dtprobe and every baseline run under the same limit."""
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = str(n)  # read by child processes and by libraries loaded later
    import scipy.linalg  # noqa: F401  (load the BLAS pools now, so the limit reaches them)
    import sklearn.linear_model  # noqa: F401
    import torch
    from threadpoolctl import threadpool_limits

    torch.set_num_threads(n)
    threadpool_limits(n)


#: Python source to put at the top of a script measured in a fresh process (Linux):
#: ``status(key)``, the bytes of a ``/proc/self/status`` field (``VmRSS``, ``VmHWM``), and
#: ``reset_peak()``, which sets the peak ``VmHWM`` back to the current RSS (Linux >= 4.0).
PEAK_RSS_CODE = """
def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024
def reset_peak():
    open("/proc/self/clear_refs", "w").write("5")
"""


def run_python(code: str, *args: str, timeout: float = 1800,
               env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run ``python -c code args`` with the repository importable; raise on failure."""
    full_env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep
                + os.environ.get("PYTHONPATH", ""), "TQDM_DISABLE": "1", **(env or {})}
    proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                          timeout=timeout, env=full_env, cwd=str(REPO))
    if proc.returncode != 0:
        raise RuntimeError(f"subprocess failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc


def cpu_model() -> str:
    """The CPU model name from /proc/cpuinfo (or the platform's processor string)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or "unknown CPU"


def _fmt(value: float | None, unit: str) -> str:
    if value is None:
        return "-"
    if unit == "MB":
        return f"{value:.0f} MB"
    if unit == "img/s":
        return f"{value:,.0f} img/s"
    if value >= 100:
        return f"{value:.0f} s"
    if value >= 1:
        return f"{value:.2f} s"
    return f"{value * 1000:.1f} ms"


def _fmt_ratio(row: Row) -> str:
    r = row.ratio
    if r is None:
        return "-"
    if row.kind == "speedup":
        return f"{r:.0f}x" if r >= 100 else f"{r:.1f}x"
    if row.kind == "rate":
        return f"{r:.0%}"
    return f"{r:.2f}"


def _fmt_goal(row: Row) -> str:
    if row.goal is None:
        return "(report)"
    if row.kind == "rate":
        return f">= {row.goal:.0%}"
    return f">= {row.goal:g}x" if row.kind == "speedup" else f"<= {row.goal:g}"


def markdown_table(rows: Sequence[Row]) -> str:
    """The results as a Markdown table (benchmark, sizes, dtprobe, baseline, ratio, goal,
    met?, agreement)."""
    head = ("| benchmark | sizes | dtprobe | baseline | ratio | goal | met? | agreement |\n"
            "|---|---|---|---|---|---|---|---|")
    lines = [head]
    for r in rows:
        met = {True: "yes", False: "**no**", None: "-"}[r.met]
        if r.skipped:
            met = "skipped"
        agree = r.agreement + ("" if r.agree_ok else " **DISAGREE**")
        base = _fmt(r.base, r.unit) + (f" ({r.baseline})" if r.baseline else "")
        lines.append(f"| {r.name} | {r.sizes} | {_fmt(r.ours, r.unit)} | {base} | "
                     f"{_fmt_ratio(r)} | {_fmt_goal(r)} | {met} | {agree} |")
    notes = [f"- {r.name}: {r.note}" for r in rows if r.note]
    return "\n".join(lines) + ("\n\nNotes:\n" + "\n".join(notes) if notes else "")
