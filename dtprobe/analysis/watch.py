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

Against a writer that misbehaves (see README, "Safety"): every number comes from bytes whose
sha256 matched the manifest entry the analysis planned with, checked on the very bytes that are
loaded (:func:`dtprobe.checkpoints.reader.read_checkpoint_bytes`), so a checkpoint rewritten,
truncated or removed while it is analysed is that checkpoint's failure (``failures.csv``), never
a row; a manifest that shrinks or goes backwards (an entry's file, digest or epoch changes, or
entries disappear) is re-analysed, said in one log line, and the table then describes only the
current entries; a manifest that is a symbolic link is refused (:class:`ManifestError`, one
line). Only a checkpoint never seen before in this watch restarts ``idle_timeout``, and once
training finished at most one more analysis follows, so a writer that keeps rewriting the
manifest cannot keep the watch alive.
"""

from __future__ import annotations

import os
import stat
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dtprobe.errors import ConfigError
from dtprobe.table import ANALYSIS_DIR

__all__ = ["run_finished", "snapshot", "watch"]

#: Extensions of checkpoint files followed in a run without a manifest.
_CHECKPOINT_SUFFIXES = (".pt", ".pth", ".ckpt", ".tar", ".bin", ".safetensors")


def _manifest_present(run: Path) -> bool:
    """Whether the run has a manifest; one that is a symbolic link is refused (one line)."""
    import checkpoints_manifest as cm

    path = run / cm.MANIFEST_NAME
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return False
    except OSError as exc:
        raise cm.ManifestError(str(path), f"cannot read it ({exc.strerror or exc})") from None
    if stat.S_ISLNK(st.st_mode):
        # writers replace the manifest atomically, never by a link: one here was planted, and
        # following it would analyse whatever manifest it points at
        raise cm.ManifestError(str(path), "is a symbolic link; dtprobe watch never follows a "
                                          "manifest link: replace it by the run's own manifest")
    return True


def snapshot(run_dir: str | os.PathLike[str]) -> tuple:
    """What identifies the run's checkpoints now: the manifest's entries, or without a
    manifest the (path, size, mtime) of every checkpoint-like file below the run.

    Raises
    ------
    checkpoints_manifest.ManifestError
        If the manifest is a symbolic link, unreadable or invalid.
    """
    import checkpoints_manifest as cm

    run = Path(run_dir)
    if _manifest_present(run):
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
    if not _manifest_present(run):
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
    seen: set = set()  # every checkpoint (manifest: epoch; files: path) seen in this watch
    last_new = time.monotonic()
    final_done = False
    try:
        while True:
            now = snapshot(run_dir)
            new = _keys(now) - seen
            if new:  # only a checkpoint never seen before restarts the idle clock: a writer
                seen |= new  # rewriting the manifest or a file in place does not
                last_new = time.monotonic()
            stable = now[0] == "manifest" or now == pending  # files: unchanged for one poll
            fresh = len(now) - (len(analysed) if analysed else 1)
            finished = run_finished(run_dir)
            changed = analysed is not None and _changed(analysed, now)
            due = fresh >= every or (fresh > 0 and finished)
            if len(now) > 1 and now != analysed and stable and (due or fresh < 0 or changed):
                if changed:
                    log(f"dtprobe watch: the manifest went back ({changed}); re-analysing "
                        "its current entries")
                results = analyze(run_dir, options=options)
                if now[0] == "manifest":
                    # a link planted while the analysis ran: refuse before reporting the update
                    _manifest_present(Path(run_dir))
                if finished:
                    final_done = True
                if _keys(now) - _keys(analysed or ("",)):
                    last_new = time.monotonic()  # analysis time is not idle time
                analysed = now
                if report is not None:
                    from dtprobe.results.report import write_report

                    write_report(results, report)
                n = len(now) - 1
                log(f"dtprobe watch: {n} checkpoint(s) analysed"
                    + (f", report {report}" if report is not None else ""))
                if on_update is not None:
                    on_update(results)
            pending = now
            # finished first, then a fresh look: a checkpoint recorded while the last analysis
            # ran is in that look (entries are only ever added by a well-behaved writer), so
            # it is never missed
            if analysed is not None and run_finished(run_dir):
                latest = snapshot(run_dir)
                if latest == analysed:
                    log("dtprobe watch: training finished")
                    return results
                if final_done:
                    # the bound: an analysis already ran after training finished; a manifest
                    # that keeps changing after it gets no more (one per change would let a
                    # writer keep the watch alive forever)
                    log("dtprobe watch: training finished; the manifest changed again after "
                        "the final analysis, stopping with it")
                    return results
            if idle_timeout is not None and time.monotonic() - last_new > idle_timeout:
                log(f"dtprobe watch: no new checkpoint for {idle_timeout:g} s; stopping")
                return results
            sleep(float(poll))
    except KeyboardInterrupt:
        log("dtprobe watch: interrupted; everything analysed so far is kept")
        return results


def _keys(snap: tuple) -> set:
    """The checkpoints of a snapshot: epochs of a manifest, relative paths of files."""
    return {item[0] for item in snap[1:]}


def _changed(before: tuple, now: tuple) -> str:
    """How ``now`` takes back what ``before`` recorded ("" if it only adds), for the log."""
    if before[0] != now[0]:
        return "the manifest appeared" if now[0] == "manifest" else "the manifest was removed"
    if now[0] != "manifest":
        gone = sorted(_keys(before) - _keys(now))
        return f"{len(gone)} file(s) removed" if gone else ""
    old = {item[0]: item for item in before[1:]}
    cur = {item[0]: item for item in now[1:]}
    gone = sorted(set(old) - set(cur))
    redone = sorted(e for e in set(old) & set(cur) if old[e] != cur[e])
    parts = []
    if gone:
        parts.append("epoch(s) " + ", ".join(map(str, gone)) + " removed")
    if redone:
        parts.append("epoch(s) " + ", ".join(map(str, redone)) + " now name other bytes")
    return "; ".join(parts)
