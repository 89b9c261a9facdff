"""Follow a run while it trains: analyse each new checkpoint as soon as it is complete.

``watch(run_dir)`` polls the run. A checkpoint is taken only once it is complete: for a run with
a manifest, when its manifest entry exists (writers add the entry after the file is written
atomically, and the analysis verifies its sha256); without a manifest, when every checkpoint
file has kept its size and modification time for one polling interval. Each time the set of
complete checkpoints changes it calls :func:`dtprobe.analysis.analyze`, which reuses the cached
features and per-checkpoint rows of everything analysed before, so each update costs only the
new checkpoints plus the across-epoch CKA; ``metrics.csv``, the charts and (with ``report``) the
HTML report are replaced atomically after each one. It returns when the manifest says training
finished (the last epoch of ``training.epochs`` is recorded), after ``idle_timeout`` seconds
without a new checkpoint, or on Ctrl-C -- everything analysed so far is kept in every case, and
a restarted watch resumes from the cache.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dtprobe.errors import ConfigError
from dtprobe.table import ANALYSIS_DIR

__all__ = ["run_finished", "snapshot", "watch"]

#: Extensions of checkpoint files followed in a run without a manifest.
_CHECKPOINT_SUFFIXES = (".pt", ".pth", ".ckpt", ".tar", ".bin", ".safetensors")


def snapshot(run_dir: str | os.PathLike[str]) -> tuple:
    """What identifies the run's checkpoints now: the manifest's entries, or without a
    manifest the (path, size, mtime) of every checkpoint-like file below the run."""
    import checkpoints_manifest as cm

    run = Path(run_dir)
    if cm.manifest_path(run).exists():
        manifest = cm.read_manifest(run)
        return ("manifest",) + tuple((c.epoch, c.step, c.path, c.sha256)
                                     for c in manifest.checkpoints)
    files = []
    for root, dirs, names in os.walk(run):
        dirs[:] = [d for d in dirs if d != ANALYSIS_DIR and not d.startswith(".")]
        for name in names:
            if name.endswith(_CHECKPOINT_SUFFIXES) and not name.startswith("."):
                path = Path(root) / name
                try:
                    st = path.stat()
                except OSError:
                    continue  # removed while listing
                files.append((path.relative_to(run).as_posix(), st.st_size, st.st_mtime_ns))
    return ("files",) + tuple(sorted(files))


def run_finished(run_dir: str | os.PathLike[str]) -> bool:
    """True when the run's manifest records the last epoch its training config announces."""
    import checkpoints_manifest as cm

    run = Path(run_dir)
    if not cm.manifest_path(run).exists():
        return False
    manifest = cm.read_manifest(run)
    epochs = manifest.training.get("epochs") if isinstance(manifest.training, dict) else None
    if isinstance(epochs, bool) or not isinstance(epochs, int) or not manifest.checkpoints:
        return False
    return max(c.epoch for c in manifest.checkpoints) >= epochs


def watch(run_dir: str | os.PathLike[str], *, poll: float = 5.0,
          idle_timeout: float | None = None, report: str | os.PathLike[str] | None = None,
          every: int = 1,
          on_update: Callable[[Any], None] | None = None, log: Callable[[str], None] = print,
          sleep: Callable[[float], None] = time.sleep, options: Any = None,
          **analyze_kwargs: Any):
    """Analyse ``run_dir`` after every new complete checkpoint until training finishes.

    Parameters
    ----------
    run_dir : the run directory being written by a training process.
    poll : seconds between looks at the run.
    idle_timeout : stop after this many seconds without a new checkpoint (``None``: wait until
        the manifest says training finished, or Ctrl-C).
    report : also rewrite this HTML report after each update.
    every : analyse once this many new checkpoints are complete (and always once training
        finished), to bound the analysis cost of a run that saves often.
    on_update : called with the :class:`~dtprobe.results.Results` of each update.
    log : where one-line progress messages go.
    options : the analysis options, already built (:meth:`AnalysisOptions.build`; the CLI's).
    **analyze_kwargs : else, the keywords of :func:`dtprobe.analysis.analyze` (``metrics``,
        ``device`` ...), built into options once, before the first look.

    Returns
    -------
    Results or None
        The last analysis (``None`` if no checkpoint ever appeared).
    """
    from dtprobe.analysis.pipeline import analyze
    from dtprobe.analysis.plan import AnalysisOptions

    if not float(poll) > 0:
        raise ConfigError(f"poll must be > 0 seconds, got {poll}")
    if isinstance(every, bool) or not isinstance(every, int) or every < 1:
        raise ConfigError(f"every must be a positive number of checkpoints, got {every!r}")
    if options is None:
        options = AnalysisOptions.build(**analyze_kwargs)
    results = None
    analysed: tuple | None = None
    pending: tuple | None = None
    last_change = time.monotonic()
    try:
        while True:
            now = snapshot(run_dir)
            stable = now[0] == "manifest" or now == pending  # files: unchanged for one poll
            fresh = len(now) - (len(analysed) if analysed else 1)
            due = fresh >= every or (fresh > 0 and run_finished(run_dir))
            if len(now) > 1 and now != analysed and stable and (due or fresh < 0):
                results = analyze(run_dir, options=options)
                analysed, last_change = now, time.monotonic()
                if report is not None:
                    from dtprobe.results.report import write_report

                    write_report(results, report)
                n = len(now) - 1
                log(f"dtprobe watch: {n} checkpoint(s) analysed"
                    + (f", report {report}" if report is not None else ""))
                if on_update is not None:
                    on_update(results)
            elif now != pending:
                last_change = time.monotonic()
            pending = now
            # finished first, then a fresh look: a checkpoint recorded while the last analysis
            # ran is in that look (entries are only ever added), so it is never missed
            if analysed is not None and run_finished(run_dir) and snapshot(run_dir) == analysed:
                log("dtprobe watch: training finished")
                return results
            if idle_timeout is not None and time.monotonic() - last_change > idle_timeout:
                log(f"dtprobe watch: no new checkpoint for {idle_timeout:g} s; stopping")
                return results
            sleep(float(poll))
    except KeyboardInterrupt:
        log("dtprobe watch: interrupted; everything analysed so far is kept")
        return results
