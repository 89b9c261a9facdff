"""`dtprobe sweep`: a run that fails with any exception costs that run only (issue 25)."""

from __future__ import annotations

import errno
import json
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest

import dtprobe.analysis
from dtprobe.errors import DtprobeError
from dtprobe.training import sweep


class Weird(Exception):
    """A class no isolation site lists."""


def _table(acc: float) -> pd.DataFrame:
    return pd.DataFrame([{"run": "r", "epoch": 1, "metric": m, "task": t, "layer": "",
                          "value": v}
                         for m, t, v in (("source_accuracy", "", acc),
                                         ("class_separation", "", 0.2),
                                         ("probe_accuracy", "colour", 0.7))])


def _sweep(tmp_path, monkeypatch, train_fail: dict, analyze_fail: dict,
           analysis_losses: dict | None = None):
    """Three runs; ``train_fail`` / ``analyze_fail`` map a run's folder name to what it raises,
    ``analysis_losses`` to the failure reasons its (finished) analysis records."""
    analysis_losses = analysis_losses or {}
    configs = {(name, seed): SimpleNamespace(out=str(tmp_path / "s" / f"{name}-seed{seed}"))
               for name, seed in (("ce", 0), ("ce", 1), ("label_smoothing", 0))}

    def fake_train(cfg):
        run = Path(cfg.out)
        if run.name in train_fail:
            raise train_fail[run.name]
        run.mkdir(parents=True, exist_ok=True)
        return run

    def fake_analyze(run_dir, **_):
        if Path(run_dir).name in analyze_fail:
            raise analyze_fail[Path(run_dir).name]
        failures = pd.DataFrame({"reason": analysis_losses.get(Path(run_dir).name, [])})
        return SimpleNamespace(table=_table(0.5 if "seed0" in str(run_dir) else 0.7),
                               failures=failures)

    monkeypatch.setattr(sweep, "train_or_resume", fake_train)
    monkeypatch.setattr(dtprobe.analysis, "analyze", fake_analyze)
    return sweep.run_sweep(configs, tmp_path / "s", plot=False)


def test_one_failing_run_is_recorded_and_the_others_go_on(tmp_path, monkeypatch, capsys):
    summary = _sweep(tmp_path, monkeypatch, {"ce-seed1": Weird("boom in training")},
                     {"label_smoothing-seed0": ValueError("bad table")})
    err = capsys.readouterr().err
    assert "FAILED ce seed 1: unexpected Weird (boom in training)" in err
    assert "FAILED label_smoothing seed 0: unexpected ValueError (bad table)" in err
    index = {r["dir"]: r for r in json.loads((tmp_path / "s" / "sweep.json").read_text())["runs"]}
    assert index["ce-seed0"]["status"] == "ok" and "error" not in index["ce-seed0"]
    assert index["ce-seed1"]["status"] == "failed" and "Weird" in index["ce-seed1"]["error"]
    assert index["label_smoothing-seed0"]["status"] == "failed"
    ce, ls = summary.iloc[0], summary.iloc[1]
    assert (ce["seeds"], ce["failed"], ce["diverged"]) == (1, 1, 0)
    assert ce["source_accuracy"] == 0.5  # the failed seed adds no number
    assert (ls["seeds"], ls["failed"]) == (0, 1) and pd.isna(ls["source_accuracy"])
    runs = pd.read_csv(tmp_path / "s" / "sweep_runs.csv", keep_default_na=False)
    assert runs["status"].tolist() == ["ok", "failed", "failed"]
    assert sweep.expand_sweeps([tmp_path / "s"]) == [tmp_path / "s" / "ce-seed0"]


def test_a_sweep_whose_every_run_failed_ends_with_one_line(tmp_path, monkeypatch):
    fails = {n: Weird("x") for n in ("ce-seed0", "ce-seed1", "label_smoothing-seed0")}
    with pytest.raises(DtprobeError) as info:
        _sweep(tmp_path, monkeypatch, fails, {})
    message = str(info.value)
    assert "\n" not in message and "all 3 run(s)" in message and "Weird" in message
    assert (tmp_path / "s" / "sweep_summary.csv").exists()  # tables written first


@pytest.mark.parametrize("exc", [KeyboardInterrupt(), OSError(errno.ENOSPC, "No space left")])
def test_ctrl_c_and_a_full_disk_still_end_the_sweep(tmp_path, monkeypatch, exc):
    with pytest.raises(type(exc)):
        _sweep(tmp_path, monkeypatch, {"ce-seed1": exc}, {})
    index = json.loads((tmp_path / "s" / "sweep.json").read_text())["runs"]
    assert [r["status"] for r in index] == ["ok", "pending", "pending"]


def test_a_run_whose_analysis_lost_checkpoints_is_failed_not_summarised(tmp_path, monkeypatch,
                                                                        capsys):
    summary = _sweep(tmp_path, monkeypatch, {}, {},
                     {"ce-seed1": ["checkpoint_e0004.pt: truncated file", "other"]})
    err = capsys.readouterr().err
    assert "FAILED ce seed 1" in err and "2 failure(s)" in err and "truncated file" in err
    ce = summary.iloc[0]
    assert (ce["seeds"], ce["failed"]) == (1, 1) and ce["source_accuracy"] == 0.5


def test_the_cli_exits_1_when_some_runs_failed(tmp_path, monkeypatch, capsys):
    from dtprobe import cli

    def fake_run_sweep(configs, out, **_):
        return pd.DataFrame([{"objective": "ce", "seeds": 1, "diverged": 0, "failed": 1}])

    monkeypatch.setattr(sweep, "run_sweep", fake_run_sweep)
    args = ["sweep", "--objectives", "ce", "--seeds", "0", "1", "--out", str(tmp_path / "s"),
            "--epochs", "1", "--no-progress"]
    assert cli.main(args) == cli.EXIT_PARTIAL
    assert "1 of 2 run(s) failed" in capsys.readouterr().err

    def all_ok(configs, out, **_):
        return pd.DataFrame([{"objective": "ce", "seeds": 2, "diverged": 0, "failed": 0}])

    monkeypatch.setattr(sweep, "run_sweep", all_ok)
    assert cli.main(args) == 0
