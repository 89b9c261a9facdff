"""SIGKILL at random and at chosen moments: ``analyze`` and ``train`` lose nothing (issue 7).

Each killed command is a real process (a child of a fork server that imported dtprobe once, so a
kill round costs no interpreter start-up) running ``dtprobe.cli.main`` exactly as ``python -m
dtprobe`` does. It is killed with SIGKILL at points drawn from a seeded random generator: by this
test, a random moment after the command made a random amount of progress (result files written,
manifest entries added, lock taken), or by itself just before its n-th atomic rename
(``os.replace``), i.e. with a complete temporary file on disk that never got its name. The last
analysis of the series runs as ``python -m dtprobe analyze``.

Counts of kills survived and results lost are printed (``pytest -s``) for the issue's close note.
"""

from __future__ import annotations

import fcntl
import json
import multiprocessing
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from multiprocessing import forkserver
from pathlib import Path

import pytest
import torch

import checkpoints_manifest as cm
from dtprobe import analysis
from dtprobe import checkpoints as ck
from dtprobe.training.trainer import train
from tests.helpers import TINY, copy_run, tiny_config

REPO = Path(__file__).resolve().parents[1]
DATA_ARGS = [a for k, v in TINY.items() for a in ("--dataset-param", f"{k}={v}")]
TRAIN_ARGS = ["--epochs", "3", "--batch-size", "64", "--save-every", "1", "--seed", "0",
              "--device", "cpu", "--no-progress", "--arch-param", "width=8",
              "--arch-param", "feature_dim=16", *DATA_ARGS]
ANALYZE_ARGS = ["--device", "cpu", "--no-progress", "--no-plot"]
CHILD_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TQDM_DISABLE": "1"}


# ------------------------------------------------------------------------------ harness
def _child(argv: list[str], log: str, kill_at_replace: int | None) -> None:
    """Run ``dtprobe`` with ``argv`` in this process, output to ``log``; optionally SIGKILL
    ourselves just before the ``kill_at_replace``-th ``os.replace`` (an atomic rename)."""
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    torch.set_num_threads(1)
    from tqdm import tqdm

    tqdm.set_lock(threading.RLock())  # not a multiprocessing lock: a kill would leak it
    if kill_at_replace is not None:
        real_replace = os.replace
        count = [0]

        def replace(src, dst, *args, **kwargs):
            count[0] += 1
            if count[0] == kill_at_replace:
                os.kill(os.getpid(), signal.SIGKILL)
            return real_replace(src, dst, *args, **kwargs)

        os.replace = replace
    from dtprobe.cli import main

    try:
        code = main(argv)
    except SystemExit as exc:  # argparse
        code = exc.code if isinstance(exc.code, int) else 2
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


@pytest.fixture(scope="module")
def procs():
    """A fork server that has imported dtprobe: each child starts in a fraction of a second."""
    for key, value in CHILD_ENV.items():
        os.environ.setdefault(key, value)
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "dtprobe.cli", "dtprobe.analysis",
                                "dtprobe.training.trainer", "dtprobe.metrics", "tqdm"])
    forkserver.ensure_running()  # imports in the background while the reference is computed
    return ctx


class Outcome:
    def __init__(self, code: int | None, killed: bool, log: Path):
        self.code, self.killed, self.log = code, killed, log

    @property
    def output(self) -> str:
        return self.log.read_text() if self.log.exists() else ""


def _run(procs, argv: list[str], log: Path, *, kill_after: float | None = None,
         started=None, kill_at_replace: int | None = None, timeout: float = 240) -> Outcome:
    """Run a child to completion, or SIGKILL it ``kill_after`` seconds after ``started()`` is
    true (polled), or let it kill itself at its ``kill_at_replace``-th rename."""
    p = procs.Process(target=_child, args=(argv, str(log), kill_at_replace))
    p.start()
    deadline = time.monotonic() + timeout
    if kill_after is not None:
        while p.is_alive() and started is not None and not started(p.pid):
            assert time.monotonic() < deadline, "child never started working"
            time.sleep(0.005)
        time.sleep(kill_after)
        if p.is_alive():
            os.kill(p.pid, signal.SIGKILL)
    p.join(max(1.0, deadline - time.monotonic()))
    assert not p.is_alive(), f"child timed out: {log.read_text()[-2000:]}"
    return Outcome(p.exitcode, p.exitcode == -signal.SIGKILL, log)


def _files(directory: Path, suffix: str) -> dict[str, tuple[int, int]]:
    """name -> (inode, mtime_ns) of the files in ``directory`` ending in ``suffix``."""
    if not directory.is_dir():
        return {}
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in directory.iterdir()
            if p.name.endswith(suffix)}


def _temp_files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*")
                  if p.is_file() and (p.name.endswith(".tmp") or ".tmp." in p.name))


# ------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def reference(procs, tmp_path_factory):
    """A trained run (checkpoints at epochs 0..3) and its uninterrupted analysis."""
    root = tmp_path_factory.mktemp("kill")
    run = root / "run"
    train(tiny_config(run, epochs=3))
    ref = copy_run(run, root / "reference")
    res = analysis.analyze(ref, device="cpu", progress=False, plot=False)
    assert len(res.failures) == 0
    return {"run": run,
            "metrics": (ref / "analysis" / "metrics.csv").read_bytes(),
            "cka": (ref / "analysis" / "cka_matrix.csv").read_bytes(),
            "epochs": sorted(res.table["epoch"].unique().tolist()),
            "root": root}


# ------------------------------------------------------------------------------ analyze
def _holds_lock(analysis_dir: Path):
    def started(pid: int) -> bool:
        try:
            return (analysis_dir / analysis.LOCK_FILE).read_text().split()[:1] == [str(pid)]
        except (OSError, IndexError):
            return False
    return started


def _written(analysis_dir: Path) -> int:
    """Result files an analysis has completed so far (features and parts, under final names)."""
    return (len(_files(analysis_dir / "parts", ".json"))
            + len(_files(analysis_dir / "features", ".safetensors")))


def _check_after_kill(run: Path, reference: dict) -> None:
    """What a killed analysis leaves is complete or absent, never partial."""
    out = run / "analysis"
    metrics = out / "metrics.csv"
    assert not metrics.exists() or metrics.read_bytes() == reference["metrics"]
    parts = analysis.PartStore(out / "parts")
    for name in _files(out / "parts", ".json"):
        epoch = int(re.fullmatch(r"epoch_(\d+)\.json", name).group(1))
        doc = (out / "parts" / name).read_text()
        assert doc.startswith('{"key": ') and doc.endswith('"}'), name
        assert parts.get(epoch, json.loads(doc)["key"]) is not None


def test_analyze_killed_at_random_points_recomputes_only_what_is_missing(procs, reference,
                                                                          tmp_path):
    run = copy_run(reference["run"], tmp_path / "run")
    out = run / "analysis"
    n_ckpt = len(reference["epochs"])
    rng = random.Random(20240501)
    argv = ["analyze", str(run), *ANALYZE_ARGS]
    kills = 0
    # Three kinds of kill point, mixed: (a) the child kills itself just before its n-th rename
    # (a complete temporary feature/part file that never got its name); (b) this test kills it
    # a random moment after it has written a random number of further result files (mid
    # extraction, mid metrics); (c) a random moment early after it took the run's lock (while
    # it loads the data). Random numbers come from a fixed seed.
    # Each kill is placed so that work is still left after it (n never exceeds what remains).
    total = 3 * n_ckpt  # a train and a test feature file and a part per checkpoint
    schedule = [("early", None), ("rename", rng.randint(1, 3)), ("progress", rng.randint(1, 3)),
                ("rename", rng.randint(1, 2)), ("progress", 1)]
    for i, (how, n) in enumerate(schedule):
        log = tmp_path / f"kill{i}.log"
        if how == "rename":
            outcome = _run(procs, argv, log, kill_at_replace=n)
        elif how == "progress":
            target = _written(out) + min(n, max(1, total - _written(out) - 1))
            outcome = _run(procs, argv, log, kill_after=rng.uniform(0.0, 0.1),
                           started=lambda _pid, target=target: _written(out) >= target)
        else:
            outcome = _run(procs, argv, log, kill_after=rng.uniform(0.0, 0.3),
                           started=_holds_lock(out))
        if outcome.killed:
            kills += 1
        else:
            assert outcome.code == 0, outcome.output
        _check_after_kill(run, reference)
    assert kills >= 4, "too few of the kills landed while the analysis was running"
    before_parts = _files(out / "parts", ".json")
    before_feats = _files(out / "features", ".safetensors")
    # The last run is the real command line.
    env = {**os.environ, **CHILD_ENV, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-m", "dtprobe", *argv], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # Only what was missing was recomputed: earlier files are untouched (same inode and mtime).
    after_parts = _files(out / "parts", ".json")
    after_feats = _files(out / "features", ".safetensors")
    assert {k: after_parts[k] for k in before_parts} == before_parts
    assert {k: after_feats[k] for k in before_feats} == before_feats
    assert len(after_parts) == n_ckpt and len(after_feats) == 2 * n_ckpt
    reused = len(before_parts)
    assert (f"metrics: {n_ckpt - reused} computed, {reused} reused" in proc.stdout), proc.stdout
    # ... and the table is byte-identical to the uninterrupted analysis: nothing lost.
    assert (out / "metrics.csv").read_bytes() == reference["metrics"]
    assert (out / "cka_matrix.csv").read_bytes() == reference["cka"]
    assert _temp_files(out) == []
    lost = sum(1 for line in reference["metrics"].splitlines()
               if line not in set((out / "metrics.csv").read_bytes().splitlines()))
    assert lost == 0
    print(f"\n[kill-analyze] kills survived: {kills}, results lost: {lost}, "
          f"parts reused on resume: {reused}/{n_ckpt}")


def test_two_concurrent_analyses_queue_on_the_lock(procs, reference, tmp_path):
    run = copy_run(reference["run"], tmp_path / "run")
    lock_dir = run / "analysis"
    lock_dir.mkdir()
    fd = os.open(lock_dir / analysis.LOCK_FILE, os.O_CREAT | os.O_RDWR, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # a third party holds the run: both must wait
        os.write(fd, b"424242 elsewhere\n")
        children = []
        for name in ("a", "b"):
            log = tmp_path / f"{name}.log"
            p = procs.Process(target=_child,
                              args=(["analyze", str(run), *ANALYZE_ARGS], str(log), None))
            p.start()
            children.append((p, log))
        deadline = time.monotonic() + 120
        while not all(log.exists() and "waiting" in log.read_text() for _, log in children):
            assert time.monotonic() < deadline, "an analysis did not wait for the lock"
            assert all(p.is_alive() for p, _ in children), "an analysis did not wait"
            time.sleep(0.02)
        for _, log in children:
            line = next(ln for ln in log.read_text().splitlines() if "waiting" in ln)
            assert "another dtprobe analyze (pid 424242 on elsewhere)" in line
        assert not (lock_dir / "metrics.csv").exists()  # nobody worked while the lock was held
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
    outputs = []
    for p, log in children:
        p.join(300)
        assert p.exitcode == 0, log.read_text()[-2000:]
        outputs.append(log.read_text())
    assert (lock_dir / "metrics.csv").read_bytes() == reference["metrics"]
    assert (lock_dir / "cka_matrix.csv").read_bytes() == reference["cka"]
    n = len(reference["epochs"])
    # One computed everything, the other queued behind it and reused it all.
    summaries = sorted(re.search(r"metrics: (\d+) computed, (\d+) reused", o).groups()
                       for o in outputs)
    assert summaries == [("0", str(n)), (str(n), "0")]
    assert _temp_files(lock_dir) == []


# -------------------------------------------------------------------------------- train
def _entries(run: Path) -> int:
    try:
        return len(cm.read_manifest(run).checkpoints)
    except cm.ManifestError:
        return 0


def _check_run_consistent(run: Path) -> int:
    """The manifest names only complete files whose sha256 matches; returns #entries."""
    if not (run / "manifest.json").exists():
        return 0
    manifest = cm.read_manifest(run)
    for entry in manifest.checkpoints:
        path = run / entry.path
        assert path.is_file(), f"manifest names a missing file {entry.path}"
        assert cm.sha256_file(path) == entry.sha256, f"half-written {entry.path} referenced"
        ck.load_state_dict(path)
    # Every file under a checkpoint's real name is complete; leftovers are temp names only.
    for path in (run / "checkpoints").glob("*") if (run / "checkpoints").is_dir() else []:
        if ck.is_temporary_name(path.name):
            continue
        ck.load_state_dict(path)
    series = ck.infer_checkpoint_series(run, allow_empty=True)
    assert all(not ck.is_temporary_name(c.relpath) for c in series)
    return len(manifest.checkpoints)


def test_train_killed_at_random_points_resumes_to_the_same_weights(procs, reference, tmp_path):
    run = tmp_path / "run"
    rng = random.Random(99)
    argv = ["train", "--out", str(run), *TRAIN_ARGS]
    kills = 0
    # Renames of a fresh 3-epoch run: manifest (1), then per save: checkpoint, resume state,
    # manifest entry; plus one training log per epoch. Kill at chosen renames, and at random
    # moments after the manifest gained a further entry (mid-epoch, mid-save).
    schedule = [("rename", 1), ("rename", rng.randint(2, 4)), ("progress", None),
                ("rename", rng.randint(2, 6)), ("progress", None)]
    for i, (how, n) in enumerate(schedule):
        args = argv + (["--resume"] if (run / "manifest.json").exists() else [])
        log = tmp_path / f"train{i}.log"
        if how == "progress" and _entries(run) + 1 >= 4:
            how, n = "rename", 1  # the last entry ends the run: kill before its next write
        if how == "rename":
            outcome = _run(procs, args, log, kill_at_replace=n)
        else:
            target = _entries(run) + 1
            outcome = _run(procs, args, log, kill_after=rng.uniform(0.0, 0.4),
                           started=lambda _pid, target=target: _entries(run) >= target)
        kills += outcome.killed
        if not outcome.killed:
            assert outcome.code == 0, outcome.output
        _check_run_consistent(run)
    assert kills >= 4
    final = _run(procs, argv + ["--resume"], tmp_path / "final.log")
    assert final.code == 0, final.output
    assert _check_run_consistent(run) == 4
    manifest = cm.read_manifest(run)
    assert manifest.epochs == [0, 1, 2, 3]
    for entry in manifest.checkpoints:  # bit-identical to the uninterrupted run
        a = ck.load_state_dict(reference["run"] / entry.path)
        b = ck.load_state_dict(run / entry.path)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), entry.path
    assert _temp_files(run) == []
    log = (run / "train_log.csv").read_text().splitlines()
    assert [line.split(",")[0] for line in log[1:]] == ["1", "2", "3"]
    print(f"\n[kill-train] kills survived: {kills}, checkpoints lost or corrupted: 0")


def test_kill_before_the_first_checkpoint_then_resume_starts_afresh(procs, reference, tmp_path):
    run = tmp_path / "run"
    # The 2nd rename is the epoch-0 checkpoint: the manifest exists but lists nothing yet.
    outcome = _run(procs, ["train", "--out", str(run), *TRAIN_ARGS], tmp_path / "k.log",
                   kill_at_replace=2)
    assert outcome.killed
    assert cm.read_manifest(run).checkpoints == []
    assert [p.name for p in (run / "checkpoints").iterdir()] != []  # a complete temp file
    assert all(ck.is_temporary_name(p.name) for p in (run / "checkpoints").iterdir())
    again = _run(procs, ["train", "--out", str(run), *TRAIN_ARGS, "--resume"],
                 tmp_path / "r.log")
    assert again.code == 0, again.output
    assert "starting the run from scratch" in again.output
    assert _check_run_consistent(run) == 4 and _temp_files(run) == []
