"""End to end: train a tiny run, analyse it, reload results; analyse a run written by other code."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch
import torchvision

import checkpoints_manifest as cm
from dtprobe import analysis
from dtprobe.cli import main
from dtprobe.training.trainer import train
from tests.helpers import tiny_config


def _tiny_cfg(out, params, **kw):
    """This file's runs: 3 epochs, a checkpoint every second one."""
    return tiny_config(out, **{"dataset_params": params, "epochs": 3, "save_every": 2, **kw})


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, tiny_shapes_params):
    out = tmp_path_factory.mktemp("runs") / "ce"
    train(_tiny_cfg(out, tiny_shapes_params))
    return out


def test_train_writes_manifest_with_initial_periodic_and_last_checkpoints(trained_run):
    manifest = cm.read_manifest(trained_run)
    assert [c.epoch for c in manifest.checkpoints] == [0, 2, 3]
    assert manifest.model.arch == "small_cnn" and manifest.model.penultimate == "fc"
    assert manifest.dataset.name == "shapes"
    for entry in manifest.checkpoints:
        assert cm.sha256_file(trained_run / entry.path) == entry.sha256
    assert {"train_loss", "train_acc", "test_acc"} <= set(manifest.checkpoints[-1].metrics)
    log = pd.read_csv(trained_run / "train_log.csv")
    assert list(log["epoch"]) == [1, 2, 3]


def test_analyze_writes_tidy_table_and_chart(trained_run):
    res = analysis.analyze(trained_run, device="cpu", progress=False)
    table = pd.read_csv(trained_run / "analysis" / "metrics.csv", keep_default_na=False)
    assert list(table.columns) == analysis.COLUMNS
    assert sorted(table["epoch"].unique()) == [0, 2, 3]
    metrics = set(table["metric"])
    assert {"source_accuracy", "class_separation", "cka_to_final", "cka_to_previous",
            "probe_accuracy"} <= metrics
    probes = table[table["metric"] == "probe_accuracy"]
    assert set(probes["task"]) == {"colour", "position", "size", "orientation"} or \
        len(set(probes["task"])) >= 2
    final_cka = table[(table["metric"] == "cka_to_final") & (table["epoch"] == 3)
                      & (table["layer"] == "")]["value"]
    assert final_cka.iloc[0] == pytest.approx(1.0, abs=1e-6)
    assert (trained_run / "analysis" / "tradeoff.png").stat().st_size > 10_000
    assert res.table.shape[0] == table.shape[0]
    # Re-running reuses the per-checkpoint parts and the feature cache: same table.
    again = analysis.analyze(trained_run, device="cpu", progress=False, plot=False)
    pd.testing.assert_frame_equal(again.table.reset_index(drop=True),
                                  res.table.reset_index(drop=True))


def test_cli_analyze_and_list(trained_run, capsys):
    assert main(["analyze", str(trained_run), "--device", "cpu", "--no-progress",
                 "--metrics", "source_accuracy", "class_separation"]) == 0
    out = capsys.readouterr().out
    assert "source_accuracy" in out and "metrics.csv" in out
    assert main(["list"]) == 0
    assert "small_cnn" in capsys.readouterr().out


def test_cli_user_error_is_one_line_exit_2(tmp_path, capsys):
    code = main(["analyze", str(tmp_path / "missing")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "missing" in err[0]


def test_resume_matches_uninterrupted_run(tmp_path, tiny_shapes_params):
    full = tmp_path / "full"
    train(_tiny_cfg(full, tiny_shapes_params, epochs=4, save_every=2))
    part = tmp_path / "part"
    train(_tiny_cfg(part, tiny_shapes_params, epochs=4, save_every=2, stop_after=1))
    train(_tiny_cfg(part, tiny_shapes_params, epochs=4, save_every=2, resume=True))
    a = torch.load(full / "checkpoints" / "epoch_0004.pt", weights_only=True)["model"]
    b = torch.load(part / "checkpoints" / "epoch_0004.pt", weights_only=True)["model"]
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)


def test_analyze_external_ctc_format_run_without_manifest(tmp_path, tiny_shapes_params):
    """A run written by other code: torchvision resnet18 saved as {'model': sd, 'epoch': e}."""
    run = tmp_path / "external"
    run.mkdir()
    torch.manual_seed(0)
    for epoch in (1, 2, 3):
        model = torchvision.models.resnet18(num_classes=6)
        torch.save({"model": model.state_dict(), "epoch": epoch}, run / f"ckpt_epoch_{epoch}.pth")
    res = analysis.analyze(run, arch="resnet18", num_classes=6, dataset="shapes",
                           dataset_params=tiny_shapes_params, device="cpu", progress=False,
                           metrics=["source_accuracy", "class_separation"], plot=False)
    assert sorted(res.table["epoch"].unique()) == [1, 2, 3]
    assert set(res.table["metric"]) >= {"source_accuracy", "class_separation", "cka_to_final"}
    # Architecture and classes are recognised from the weights; only the data must be named.
    with pytest.raises(Exception, match="pass --dataset"):
        analysis.analyze(run, device="cpu", progress=False)


def test_manifest_records_training_config(trained_run):
    doc = json.loads((trained_run / "manifest.json").read_text())
    assert doc["training"]["objective"] == "ce"
    assert doc["training"]["epochs"] == 3


@pytest.mark.parametrize("stop_after", [2, 3])
def test_ctc_resume_matches_uninterrupted_run(tmp_path, tiny_shapes_params, stop_after):
    """Interrupt at the stage boundary and inside stage 2: banks, snapshot and sampler restore."""
    ctc = {"preset": "transferability", "stage_two_epoch": 2, "nce_k": 32, "proj_dim": 16}
    full = tmp_path / "full"
    train(_tiny_cfg(full, tiny_shapes_params, epochs=4, objective="ctc", ctc=ctc))
    part = tmp_path / "part"
    train(_tiny_cfg(part, tiny_shapes_params, epochs=4, objective="ctc", ctc=ctc,
                    stop_after=stop_after))
    train(_tiny_cfg(part, tiny_shapes_params, epochs=4, objective="ctc", ctc=ctc, resume=True))
    a = torch.load(full / "checkpoints" / "epoch_0004.pt", weights_only=True)["model"]
    b = torch.load(part / "checkpoints" / "epoch_0004.pt", weights_only=True)["model"]
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)
    log = pd.read_csv(full / "train_log.csv")
    assert log["train_instance"].notna().iloc[0] and log["train_nce"].notna().iloc[-1]
    manifest = cm.read_manifest(full)
    assert manifest.training["objective_config"]["nce_k"] == 32
