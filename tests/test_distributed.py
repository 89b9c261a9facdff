"""torchrun with 2 CPU processes (gloo): DDP training and checkpoint-sharded analysis."""

from __future__ import annotations

import os
import subprocess
import sys

import pandas as pd
import pytest
import torch

import checkpoints_manifest as cm

TINY = ["--dataset-param", "n_train=240", "--dataset-param", "n_test=120",
        "--dataset-param", "image_size=16", "--arch-param", "width=8",
        "--arch-param", "feature_dim=16"]


def _torchrun(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "dtprobe", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp") / "ctc"
    _torchrun("train", "--out", str(out), "--epochs", "3", "--save-every", "1", "--ctc",
              "--stage-two-epoch", "1", "--nce-k", "16", "--proj-dim", "8", "--batch-size", "64",
              "--device", "cpu", "--no-progress", *TINY)
    return out


def test_ddp_training_writes_one_manifest_from_rank_zero(ddp_run):
    manifest = cm.read_manifest(ddp_run)
    assert [c.epoch for c in manifest.checkpoints] == [0, 1, 2, 3]
    assert manifest.training["world_size"] == 2
    for entry in manifest.checkpoints:
        assert cm.sha256_file(ddp_run / entry.path) == entry.sha256
    state = torch.load(ddp_run / "checkpoints" / "epoch_0003.pt", weights_only=True)["model"]
    assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())
    log = pd.read_csv(ddp_run / "train_log.csv")
    assert list(log["epoch"]) == [1, 2, 3] and log["train_nce"].notna().iloc[-1]


def test_sharded_analysis_equals_single_process(ddp_run, tmp_path):
    from dtprobe.analysis import analyze

    metrics = ["source_accuracy", "class_separation", "rankme"]
    _torchrun("analyze", str(ddp_run), "--device", "cpu", "--no-progress", "--metrics", *metrics)
    sharded = pd.read_csv(ddp_run / "analysis" / "metrics.csv", keep_default_na=False)
    single_dir = tmp_path / "single"
    import shutil

    shutil.copytree(ddp_run, single_dir, ignore=shutil.ignore_patterns("analysis"))
    single = analyze(single_dir, metrics=metrics, device="cpu", progress=False, plot=False)
    expected = pd.read_csv(single_dir / "analysis" / "metrics.csv", keep_default_na=False)
    assert len(single.table) == len(sharded)
    pd.testing.assert_frame_equal(sharded.drop(columns="run"), expected.drop(columns="run"),
                                  rtol=1e-6)
