"""Live analysis: `watch` follows a training run and ends with the table of an analysis done
after training; killed and restarted, it loses nothing."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

import checkpoints_manifest as cm
from dtprobe.analysis import analyze
from dtprobe.analysis.watch import run_finished, snapshot, watch
from dtprobe.training.trainer import TrainConfig, train

METRICS = ["source_accuracy", "class_separation"]
ROOT = Path(__file__).resolve().parents[1]


def _train_cmd(out: Path, params: dict, epochs: int = 3) -> list[str]:
    cmd = [sys.executable, "-m", "dtprobe", "train", "--out", str(out), "--dataset", "shapes",
           "--arch", "small_cnn", "--arch-param", "width=8", "--arch-param", "feature_dim=16",
           "--epochs", str(epochs), "--batch-size", "64", "--save-every", "1", "--seed", "0",
           "--device", "cpu", "--no-progress"]
    for k, v in params.items():
        cmd += ["--dataset-param", f"{k}={v}"]
    return cmd


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _table(run: Path) -> pd.DataFrame:
    t = pd.read_csv(run / "analysis" / "metrics.csv", keep_default_na=False)
    return t.sort_values(["epoch", "metric", "task", "layer"]).reset_index(drop=True)


def _fresh_table(run: Path, tmp: Path) -> pd.DataFrame:
    copy = tmp / "copy"
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns("analysis"))
    analyze(copy, metrics=METRICS, device="cpu", progress=False, plot=False)
    return _table(copy)


def _same(a: pd.DataFrame, b: pd.DataFrame) -> None:
    a, b = a.drop(columns=["run"]), b.drop(columns=["run"])
    pd.testing.assert_frame_equal(a, b, check_exact=False, rtol=1e-9, atol=1e-12)


def test_watch_started_before_training_ends_with_the_after_training_table(tmp_path,
                                                                           tiny_shapes_params):
    run = tmp_path / "run"
    trainer = subprocess.Popen(_train_cmd(run, tiny_shapes_params), env=_env(),
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    updates, lines = [], []
    try:
        res = watch(run, poll=0.2, idle_timeout=300, metrics=METRICS, device="cpu",
                    progress=False, plot=False, on_update=updates.append, log=lines.append)
    finally:
        trainer.wait(timeout=300)
    assert trainer.returncode == 0, trainer.stderr.read().decode()
    assert lines[-1] == "dtprobe watch: training finished"
    assert run_finished(run)
    assert sorted(res.table["epoch"].unique()) == [0, 1, 2, 3]
    assert len(updates) >= 1
    _same(_table(run), _fresh_table(run, tmp_path))


def test_watch_killed_and_restarted_loses_nothing(tmp_path, tiny_shapes_params):
    run = tmp_path / "run"
    train(TrainConfig(out=str(run), dataset="shapes", dataset_params=tiny_shapes_params,
                      arch="small_cnn", arch_params={"width": 8, "feature_dim": 16}, epochs=3,
                      batch_size=64, save_every=1, seed=0, device="cpu", progress=False))
    code = ("import sys; from dtprobe.analysis.watch import watch; "
            f"watch(sys.argv[1], poll=0.2, idle_timeout=60, metrics={METRICS!r}, "
            "device='cpu', progress=False, plot=False)")
    proc = subprocess.Popen([sys.executable, "-c", code, str(run)], env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    parts = run / "analysis" / "parts"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not (parts.exists() and any(parts.iterdir())):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)  # mid-analysis: some checkpoints done, others not
    proc.wait()
    res = watch(run, poll=0.2, idle_timeout=60, metrics=METRICS, device="cpu",
                progress=False, plot=False, log=lambda _: None)
    assert sorted(res.table["epoch"].unique()) == [0, 1, 2, 3]
    _same(_table(run), _fresh_table(run, tmp_path))


def test_watch_waits_for_files_to_stop_changing_without_a_manifest(tmp_path):
    run = tmp_path / "plain"
    run.mkdir()
    (run / "ckpt_epoch_1.pth").write_bytes(b"x" * 10)
    first = snapshot(run)
    (run / "ckpt_epoch_1.pth").write_bytes(b"x" * 20)  # still being written
    assert snapshot(run) != first
    assert snapshot(run) == snapshot(run)
    (run / "analysis").mkdir()
    (run / "analysis" / "cache.pt").write_bytes(b"y")  # dtprobe's own output is not followed
    (run / ".tmp.pth").write_bytes(b"y")  # nor are hidden temp files
    assert [f[0] for f in snapshot(run)[1:]] == ["ckpt_epoch_1.pth"]


def test_watch_stops_after_idle_timeout_and_on_ctrl_c(tmp_path):
    run = tmp_path / "empty"
    run.mkdir()
    clock = {"t": 0.0}
    lines = []

    def fake_sleep(s):
        clock["t"] += s
        time.sleep(0.01)

    assert watch(run, poll=0.05, idle_timeout=0.2, log=lines.append, sleep=fake_sleep) is None
    assert "no new checkpoint" in lines[-1]

    def interrupt(_):
        raise KeyboardInterrupt

    assert watch(run, poll=1, log=lines.append, sleep=interrupt) is None
    assert "interrupted" in lines[-1]


def test_run_finished_reads_the_manifest(tmp_path):
    run = tmp_path / "r"
    m = cm.create_manifest(run_name="r", model=cm.ModelSpec("small_cnn", 6),
                           dataset="shapes", training={"epochs": 2})
    cm.write_manifest(run, m)
    assert not run_finished(run)
    for epoch in (0, 2):
        f = run / f"e{epoch}.pt"
        f.write_bytes(b"0")
        cm.record_checkpoint(run, f, epoch=epoch, step=epoch)
    assert run_finished(run)
    data = json.loads((run / "manifest.json").read_text())
    assert data["training"]["epochs"] == 2


@pytest.mark.slow  # trains and analyses with the default metrics in a background process
def test_train_analyze_every_runs_the_watch_in_the_background(tmp_path, tiny_shapes_params,
                                                              capsys):
    from dtprobe.cli import main

    run = tmp_path / "bg"
    argv = _train_cmd(run, tiny_shapes_params)[3:] + ["--analyze-every", "2"]
    assert main(argv) == 0
    assert "analysis:" in capsys.readouterr().out
    log = (run / "analyze_watch.log").read_text()
    assert "training finished" in log
    table = pd.read_csv(run / "analysis" / "metrics.csv", keep_default_na=False)
    assert sorted(table["epoch"].unique()) == [0, 1, 2, 3]


def test_cli_watch_writes_the_report(tmp_path, tiny_shapes_params, capsys):
    from dtprobe.cli import main

    run = tmp_path / "done"
    train(TrainConfig(out=str(run), dataset="shapes", dataset_params=tiny_shapes_params,
                      arch="small_cnn", arch_params={"width": 8, "feature_dim": 16}, epochs=2,
                      batch_size=64, save_every=1, seed=0, device="cpu", progress=False))
    report = tmp_path / "live.html"
    code = main(["analyze", str(run), "--watch", "--report", str(report), "--poll", "0.1",
                 "--metrics", *METRICS, "--no-progress", "--device", "cpu"])
    assert code == 0
    assert "training finished" in capsys.readouterr().out
    assert report.stat().st_size > 10_000 and "<html" in report.read_text()[:500].lower()


def test_a_checkpoint_recorded_during_an_analysis_is_not_missed(tmp_path, monkeypatch):
    """The final entry lands while the watch is analysing the previous one: the watch must
    analyse it too before it says training finished (this once ended the watch early)."""
    from dtprobe.analysis import pipeline

    run = tmp_path / "r"
    cm.write_manifest(run, cm.create_manifest(run_name="r", model=cm.ModelSpec("small_cnn", 6),
                                              dataset="shapes", training={"epochs": 2}))

    def record(epoch):
        f = run / f"e{epoch}.pt"
        f.write_bytes(bytes([epoch]))
        cm.record_checkpoint(run, f, epoch=epoch, step=epoch)

    record(0)
    seen = []

    def fake_analyze(path, **kwargs):
        epochs = [c.epoch for c in cm.read_manifest(path).checkpoints]
        seen.append(epochs)
        if len(seen) == 1:
            record(2)  # training finishes while this analysis runs
        return epochs

    monkeypatch.setattr(pipeline, "analyze", fake_analyze)
    result = watch(run, poll=0.01, idle_timeout=30, log=lambda _: None)
    assert result == [0, 2]
    assert seen == [[0], [0, 2]]
