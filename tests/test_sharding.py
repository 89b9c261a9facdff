"""Image sharding (torchrun ``--shard images``): rank shares of every checkpoint's rows,
assembled by rank 0 into the features one process would extract."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pandas as pd
import pytest
import torch

from dtprobe import analysis
from dtprobe.analysis.data import prepare_data
from dtprobe.analysis.features import checkpoint_features, features_key
from dtprobe.analysis.plan import AnalysisOptions, plan_run
from dtprobe.analysis.sharding import extract_share, part_key, row_range, shard_mode
from dtprobe.errors import ConfigError
from dtprobe.features.extract import FeatureCache
from dtprobe.training.trainer import train
from tests.helpers import make_folder, tiny_config

METRICS = ["source_accuracy", "class_separation", "rankme", "probe_accuracy"]


@pytest.mark.parametrize("n,parts", [(10, 3), (7, 7), (3, 5), (1000, 8)])
def test_row_ranges_tile_the_rows(n, parts):
    ranges = [row_range(n, p, parts) for p in range(parts)]
    assert ranges[0][0] == 0 and ranges[-1][1] == n
    assert all(a[1] == b[0] for a, b in zip(ranges[:-1], ranges[1:], strict=True))
    sizes = [b - a for a, b in ranges]
    assert max(sizes) - min(sizes) <= 1


def test_shard_mode_rule():
    assert shard_mode("auto", 3, 8) == "images" and shard_mode("auto", 30, 8) == "checkpoints"
    assert shard_mode("auto", 3, 1) == "checkpoints" and shard_mode("images", 30, 2) == "images"
    with pytest.raises(ConfigError, match="--shard 'rows'"):
        shard_mode("rows", 3, 2)


@pytest.fixture(scope="module")
def folder_run(tmp_path_factory):
    data = make_folder(tmp_path_factory.mktemp("d") / "data", per_class=40)
    out = tmp_path_factory.mktemp("r") / "run"
    train(tiny_config(out, epochs=1, dataset="imagefolder",
                      dataset_params={"root": str(data), "image_size": 16}))
    return out


@pytest.mark.parametrize("store", [True, False])
def test_shares_assemble_to_the_single_process_features(folder_run, tmp_path, store):
    run = tmp_path / "run"
    shutil.copytree(folder_run, run)
    plan = plan_run(run)
    opts = AnalysisOptions(image_store=str(tmp_path / "stores") if store else None)
    data = prepare_data(plan, torch.device("cpu"), opts)
    cache = FeatureCache(tmp_path / "shared")
    ckpt = plan.checkpoints[-1]
    for part in range(3):  # what three ranks write
        extract_share(plan, ckpt, data, cache, torch.device("cpu"), opts, part, 3)
    key = features_key(ckpt, data, "test", opts)
    n = len(data.bundle.test)
    assert cache.get(key) is None and cache.get(part_key(key, 2, 3, n)) is not None
    sharded, state = checkpoint_features(plan, ckpt, data, cache, torch.device("cpu"),
                                         replace(opts, image_shards=3))
    assert state is None  # assembled from the shares: the network did not run again
    single, _ = checkpoint_features(plan, ckpt, data, FeatureCache(tmp_path / "single"),
                                    torch.device("cpu"), opts)
    for split in ("train", "test"):
        for name, value in single[split].items():
            torch.testing.assert_close(sharded[split][name], value, rtol=1e-5, atol=1e-6)
    assert cache.get(key) is not None  # assembled and cached whole, parts removed
    assert all(cache.get(part_key(key, p, 3, n)) is None for p in range(3))
    assert len(list((tmp_path / "shared").glob("*.safetensors"))) == 2


def test_missing_share_is_extracted_by_rank_zero(folder_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(folder_run, run)
    plan = plan_run(run)
    opts = AnalysisOptions(image_store=None)
    data = prepare_data(plan, torch.device("cpu"), opts)
    cache = FeatureCache(tmp_path / "shared")
    ckpt = plan.checkpoints[0]
    extract_share(plan, ckpt, data, cache, torch.device("cpu"), opts, 0, 2)  # rank 1 died
    out, state = checkpoint_features(plan, ckpt, data, cache, torch.device("cpu"),
                                     replace(opts, image_shards=2))
    assert state is not None  # extracted afresh, whole
    assert out["test"]["features"].shape[0] == len(data.bundle.test)


def _torchrun(*args: str) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1",
           "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
           "2", "-m", "dtprobe", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def test_torchrun_image_sharding_equals_single_process(folder_run, tmp_path):
    sharded_dir, single_dir = tmp_path / "sharded", tmp_path / "single"
    for d in (sharded_dir, single_dir):
        shutil.copytree(folder_run, d, ignore=shutil.ignore_patterns("analysis"))
    ds = "textures:n_train=120,n_test=60,image_size=16"
    _torchrun("analyze", str(sharded_dir), "--device", "cpu", "--no-progress", "--shard",
              "images", "--image-store", str(tmp_path / "stores"), "--metrics", *METRICS,
              "--downstream", ds, "--downstream-metrics", "probe_accuracy", "knn_accuracy")
    analysis.analyze(single_dir, metrics=METRICS, device="cpu", progress=False, plot=False,
                     image_store=tmp_path / "stores", downstream=[ds],
                     downstream_metrics=["probe_accuracy", "knn_accuracy"])
    got = pd.read_csv(sharded_dir / "analysis" / "metrics.csv", keep_default_na=False)
    want = pd.read_csv(single_dir / "analysis" / "metrics.csv", keep_default_na=False)
    pd.testing.assert_frame_equal(got.drop(columns="run"), want.drop(columns="run"),
                                  rtol=1e-5)
    assert set(got["task"]) >= {"textures"}
    assert not list((sharded_dir / "analysis" / "features").glob("*.tmp"))
    # every share was assembled (parts removed): 2 checkpoints x 2 splits x 2 datasets
    assert len(list((sharded_dir / "analysis" / "features").glob("*.safetensors"))) == 8
