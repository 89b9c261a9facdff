"""Watch mode against a hostile or broken writer (issue 25, item 6).

A writer thread mutates the run while the watch runs: a checkpoint rewritten, truncated or
removed while it is analysed, a manifest that shrinks, goes backwards or becomes a link, and
a writer that never stops rewriting the manifest. The promises: no number from bytes that were
not verified against the manifest, a link refused in one line, and the watch always ends.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
from pathlib import Path

import pandas as pd
import pytest

import checkpoints_manifest as cm
from dtprobe.analysis import analyze
from dtprobe.analysis.watch import watch
from dtprobe.checkpoints import reader
from dtprobe.training.trainer import TrainConfig, train

METRICS = ["source_accuracy", "class_separation"]
KW = dict(metrics=METRICS, device="cpu", progress=False, plot=False)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One finished 3-epoch run (epochs 0..3) and its analysis table from clean files."""
    base = tmp_path_factory.mktemp("watch_attacks")
    run = base / "run"
    train(TrainConfig(out=str(run), dataset="shapes",
                      dataset_params={"n_train": 240, "n_test": 120, "image_size": 16},
                      arch="small_cnn", arch_params={"width": 8, "feature_dim": 16}, epochs=3,
                      batch_size=64, save_every=1, seed=0, device="cpu", progress=False))
    clean = base / "clean"
    shutil.copytree(run, clean)
    analyze(clean, **KW)
    return run, _table(clean)


def _table(run: Path) -> pd.DataFrame:
    t = pd.read_csv(run / "analysis" / "metrics.csv", keep_default_na=False)
    return t.drop(columns=["run"]).sort_values(["epoch", "metric", "task", "layer"]) \
        .reset_index(drop=True)


def _copy(trained, tmp_path) -> tuple[Path, pd.DataFrame]:
    run, clean = trained
    dst = tmp_path / "run"
    shutil.copytree(run, dst, ignore=shutil.ignore_patterns("analysis"))
    return dst, clean


def _entry(run: Path, epoch: int) -> cm.CheckpointEntry:
    return next(c for c in cm.read_manifest(run).checkpoints if c.epoch == epoch)


def _rows_match_clean(table: pd.DataFrame, clean: pd.DataFrame, epochs) -> None:
    """Per-checkpoint rows of ``epochs`` are exactly those of an analysis of the untouched
    files (the across-epoch CKA rows depend on which epochs are present, so they are left out).
    """
    got = table[table["epoch"].isin(epochs) & table["metric"].isin(METRICS)]
    want = clean[clean["epoch"].isin(epochs) & clean["metric"].isin(METRICS)]
    got, want = got.reset_index(drop=True), want.reset_index(drop=True)
    pd.testing.assert_frame_equal(got, want, check_exact=False, rtol=1e-9, atol=1e-12)


class _WriterAtOpen:
    """A writer thread that mutates the run the moment the analysis opens ``victim``.

    The analysis's open of the checkpoint signals the thread and waits until it has written,
    so the mutation lands between planning (which took the manifest's digest) and the read of
    the bytes: the window a real writer would have to hit.
    """

    def __init__(self, monkeypatch, victim: Path, mutate) -> None:
        self.go, self.done, self.fired = threading.Event(), threading.Event(), False
        self.thread = threading.Thread(target=self._run, args=(mutate,), daemon=True)
        self.thread.start()
        real_open, victim = reader._open_checkpoint, os.path.abspath(victim)

        def hooked(path):
            if not self.fired and os.path.abspath(path) == victim:
                self.fired = True
                self.go.set()
                assert self.done.wait(10)
            return real_open(path)

        monkeypatch.setattr(reader, "_open_checkpoint", hooked)

    def _run(self, mutate) -> None:
        if self.go.wait(60):
            mutate()
            self.done.set()


@pytest.mark.parametrize("attack", ["rewrite_valid", "truncate", "remove"])
def test_a_checkpoint_changed_while_it_is_analysed_gives_no_row(trained, tmp_path, monkeypatch,
                                                                 attack):
    run, clean = _copy(trained, tmp_path)
    victim = run / _entry(run, 2).path
    other = run / _entry(run, 3).path

    def mutate():
        if attack == "rewrite_valid":  # valid weights, but not the bytes the manifest names
            shutil.copyfile(other, victim)
        elif attack == "truncate":
            with open(victim, "r+b") as fh:
                fh.truncate(100)
        else:
            victim.unlink()

    writer = _WriterAtOpen(monkeypatch, victim, mutate)
    lines: list[str] = []
    res = watch(run, poll=0.05, idle_timeout=5, log=lines.append, **KW)
    assert writer.fired
    assert lines[-1] == "dtprobe watch: training finished"
    assert sorted(res.table["epoch"].unique()) == [0, 1, 3]  # epoch 2: its failure, not a row
    _rows_match_clean(_table(run), clean, [0, 1, 3])
    failures = pd.read_csv(run / "analysis" / "failures.csv", keep_default_na=False)
    assert failures["epoch"].astype(str).tolist() == ["2"]
    reason = failures.iloc[0].to_dict()
    assert ("sha256" in str(reason) if attack != "remove" else "missing" in str(reason))


def test_a_manifest_that_shrinks_is_re_analysed_to_its_current_entries(trained, tmp_path):
    run, clean = _copy(trained, tmp_path)
    manifest = cm.read_manifest(run)
    lines: list[str] = []
    state = {"n": 0}

    def shrink(_results):  # the writer drops epochs 1 and 3 after the first update
        state["n"] += 1
        if state["n"] == 1:
            manifest.checkpoints = [c for c in manifest.checkpoints if c.epoch in (0, 2)]
            cm.write_manifest(run, manifest)

    res = watch(run, poll=0.05, idle_timeout=5, log=lines.append, on_update=shrink, **KW)
    assert state["n"] == 2
    assert any("epoch(s) 1, 3 removed" in line for line in lines)
    assert sorted(res.table["epoch"].unique()) == [0, 2]
    assert sorted(_table(run)["epoch"].unique()) == [0, 2]
    _rows_match_clean(_table(run), clean, [0, 2])


def test_a_manifest_that_goes_back_never_keeps_unverified_numbers(trained, tmp_path):
    """After the first update the writer points epoch 1 at epoch 3's file (with its digest)
    and gives epoch 2 a digest its file does not have: epoch 1's rows become epoch 3's
    numbers (verified bytes of the entry as it now reads), epoch 2 fails verification."""
    run, clean = _copy(trained, tmp_path)
    lines: list[str] = []
    state = {"n": 0}

    def go_back(_results):
        state["n"] += 1
        if state["n"] == 1:
            data = json.loads((run / "manifest.json").read_text())
            by_epoch = {c["epoch"]: c for c in data["checkpoints"]}
            by_epoch[1]["path"], by_epoch[1]["sha256"] = by_epoch[3]["path"], by_epoch[3]["sha256"]
            by_epoch[2]["sha256"] = "0" * 64
            data["checkpoints"] = [c for c in data["checkpoints"] if c["epoch"] != 3]
            cm.atomic_write_text(run / "manifest.json", json.dumps(data))

    res = watch(run, poll=0.05, idle_timeout=5, log=lines.append, on_update=go_back, **KW)
    assert state["n"] == 2
    assert any("went back" in line and "3 removed" in line and "1, 2 now name other bytes"
               in line for line in lines)
    table = _table(run)
    assert sorted(res.table["epoch"].unique()) == sorted(table["epoch"].unique()) == [0, 1]
    _rows_match_clean(table, clean, [0])
    got = table[(table["epoch"] == 1) & table["metric"].isin(METRICS)]
    want = clean[(clean["epoch"] == 3) & clean["metric"].isin(METRICS)]
    got = got.drop(columns=["epoch", "step"]).reset_index(drop=True)
    want = want.drop(columns=["epoch", "step"]).reset_index(drop=True)
    pd.testing.assert_frame_equal(got, want, check_exact=False, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("when", ["before", "during", "between"])
def test_a_manifest_replaced_by_a_link_is_refused_in_one_line(trained, tmp_path, monkeypatch,
                                                              when):
    run, _ = _copy(trained, tmp_path)
    elsewhere = tmp_path / "elsewhere.json"
    shutil.copyfile(run / "manifest.json", elsewhere)
    updates: list = []

    def plant(_results=None):
        os.replace(run / "manifest.json", tmp_path / "moved.json")
        os.symlink(elsewhere, run / "manifest.json")

    if when == "before":
        plant()
    elif when == "during":  # the writer plants it while the analysis reads epoch 1
        _WriterAtOpen(monkeypatch, run / _entry(run, 1).path, plant)
    with pytest.raises(cm.ManifestError) as info:
        watch(run, poll=0.05, idle_timeout=5, log=lambda _: None, on_update=(
            plant if when == "between" else updates.append), **KW)
    assert updates == []  # no update is reported from an analysis the link may have steered
    message = str(info.value)
    assert "\n" not in message and "symbolic link" in message and "manifest.json" in message


def test_the_cli_refuses_a_manifest_link_with_one_line_and_exit_2(trained, tmp_path, capsys):
    from dtprobe.cli import main

    run, _ = _copy(trained, tmp_path)
    elsewhere = tmp_path / "elsewhere.json"
    os.replace(run / "manifest.json", elsewhere)
    os.symlink(elsewhere, run / "manifest.json")
    code = main(["analyze", str(run), "--watch", "--poll", "0.05", "--idle-timeout", "2",
                 "--metrics", *METRICS, "--no-progress", "--device", "cpu"])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and "symbolic link" in err


def _rewriter(run: Path, stop: threading.Event, mutate) -> threading.Thread:
    def loop():
        i = 0
        while not stop.is_set():
            i += 1
            mutate(i)
            time.sleep(0.005)

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    return thread


@pytest.mark.parametrize("finished", [False, True])
def test_a_writer_that_never_stops_rewriting_the_manifest_cannot_keep_the_watch_alive(
        tmp_path, monkeypatch, finished):
    """Before training finished the idle timeout holds (rewrites are not new checkpoints);
    after, at most one more analysis runs. The analysis is stubbed: only the loop is tested."""
    from dtprobe.analysis import pipeline

    run = tmp_path / "r"
    cm.write_manifest(run, cm.create_manifest(
        run_name="r", model=cm.ModelSpec("small_cnn", 6), dataset="shapes",
        training={"epochs": 1 if finished else 9}))
    for epoch in (0, 1):
        (run / f"e{epoch}.pt").write_bytes(bytes([epoch]))
        cm.record_checkpoint(run, run / f"e{epoch}.pt", epoch=epoch, step=epoch)
    calls = []
    monkeypatch.setattr(pipeline, "analyze", lambda path, **kw: calls.append(1) or len(calls))

    def mutate(i):  # epoch 1's entry flips between two files, and metrics change every time
        m = cm.read_manifest(run)
        f = run / f"e1_{i % 2}.pt"
        if not f.exists():
            f.write_bytes(bytes([i % 2 + 7]))
        m.checkpoints = [m.checkpoints[0], cm.entry_for_file(run, f, epoch=1, step=1,
                                                             metrics={"i": float(i)})]
        cm.write_manifest(run, m)

    stop = threading.Event()
    thread = _rewriter(run, stop, mutate)
    lines: list[str] = []
    start = time.monotonic()
    try:
        watch(run, poll=0.02, idle_timeout=1.0, log=lines.append)
    finally:
        stop.set()
        thread.join()
    elapsed = time.monotonic() - start
    assert elapsed < 6, lines
    if finished:
        assert "changed again after the final analysis" in lines[-1] \
            or lines[-1] == "dtprobe watch: training finished"
        assert len(calls) <= 2
    else:
        assert "no new checkpoint for 1 s" in lines[-1]
