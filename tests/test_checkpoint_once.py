"""Each checkpoint is read, hashed, loaded and prepared for inference once per analysis (issue 23).

The fixed per-checkpoint costs of an ImageNet-shaped analysis (a 100 MB ResNet-50 file) were
paid once for the source and twice more per downstream dataset (the file hashed before the
stored rows were trusted, then read, hashed, unpickled and its model built again to extract),
and the BatchNorm folding (a deep copy of the model and a check of two forward passes) once
per split of every dataset. These tests count them with wrappers around the real functions,
and check that the table is the very same as when every dataset opens the checkpoint itself.
"""

from __future__ import annotations

import pandas as pd
import pytest

import dtprobe.features.prepare as prepare
from benchmarks.memory_paths import make_run
from dtprobe import analysis
from dtprobe.analysis import features as features_mod
from dtprobe.data import load_dataset
from tests.helpers import make_folder

METRICS = ["source_accuracy", "linear_cka"]
DOWN_METRICS = ["probe_accuracy", "logme"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("once")
    return root, make_run(root), make_folder(root / "down", per_class=12, size=24, val=6)


def _counting(monkeypatch, module, name, counts):
    real = getattr(module, name)

    def wrapper(*a, **k):
        counts[name] = counts.get(name, 0) + 1
        return real(*a, **k)

    monkeypatch.setattr(module, name, wrapper)


def _analyse(run, down, stores, monkeypatch, **kw):
    counts: dict[str, int] = {}
    _counting(monkeypatch, features_mod, "read_checkpoint", counts)  # read + sha256
    _counting(monkeypatch, features_mod, "load_weights", counts)  # unpickled, model built
    _counting(monkeypatch, prepare, "_fold_batchnorm", counts)  # deep copy + fold
    res = analysis.analyze(run, metrics=METRICS, device="cpu", progress=False, plot=False,
                           image_store=str(stores), downstream=down,
                           downstream_metrics=DOWN_METRICS, use_cache=False, **kw)
    monkeypatch.undo()
    return res, counts


def test_each_checkpoint_is_read_loaded_and_folded_once(setup, monkeypatch):
    root, run, down = setup
    spec = [f"imagefolder:root={down},image_size=20,name=down"]
    res, counts = _analyse(run, spec, root / "stores", monkeypatch)
    n = res.stats.checkpoints
    assert n == 2 and res.stats.analysed == 2 and res.failures.empty
    assert set(res.table.task.fillna("")) >= {"down"}
    # one read, one model, one folding per checkpoint: source and downstream together
    assert counts == {"read_checkpoint": n, "load_weights": n, "_fold_batchnorm": n}, counts
    # features: source and downstream of each checkpoint, each counted once
    assert res.stats.features_extracted == 2 * n and res.stats.features_reused == 0

    # The same analysis with every downstream dataset opening the checkpoint itself (the
    # path of datasets held in memory): the same table, at the price of more reads.
    import dtprobe.analysis.pipeline as pipeline

    monkeypatch.setattr(pipeline, "preload_downstream", lambda *a, **k: {})
    apart, counts_apart = _analyse(run, spec, root / "stores", monkeypatch)
    assert counts_apart["read_checkpoint"] == 2 * n and counts_apart["load_weights"] == 2 * n
    key = ["epoch", "metric", "task", "layer", "other_run"]
    a = res.table.sort_values(key).reset_index(drop=True)
    b = apart.table.sort_values(key).reset_index(drop=True)
    pd.testing.assert_frame_equal(a, b)


def test_a_second_analysis_reads_each_checkpoint_once_and_loads_none(setup, monkeypatch):
    root, run, down = setup
    spec = [f"imagefolder:root={down},image_size=20,name=down"]
    first = analysis.analyze(run, metrics=METRICS, device="cpu", progress=False, plot=False,
                             image_store=str(root / "stores2"), downstream=spec,
                             downstream_metrics=DOWN_METRICS)
    counts: dict[str, int] = {}
    _counting(monkeypatch, features_mod, "read_checkpoint", counts)
    _counting(monkeypatch, features_mod, "load_weights", counts)
    again = analysis.analyze(run, metrics=METRICS, device="cpu", progress=False, plot=False,
                             image_store=str(root / "stores2"), downstream=spec,
                             downstream_metrics=DOWN_METRICS)
    n = again.stats.checkpoints
    # hashed once each (the keys of the stored features and rows); no model is built
    assert counts == {"read_checkpoint": n}, counts
    assert again.stats.features_extracted == 0 and again.stats.metrics_computed == 0
    pd.testing.assert_frame_equal(first.table, again.table)


def test_store_build_progress_follows_the_progress_switch(tmp_path, capfd):
    folder = make_folder(tmp_path / "f", per_class=4, size=20, val=2)
    load_dataset("imagefolder", root=str(folder), image_size=16, store=tmp_path / "quiet",
                 progress=False)
    assert "decoding once" not in capfd.readouterr().err
    load_dataset("imagefolder", root=str(folder), image_size=16, store=tmp_path / "shown")
    assert "decoding once into the image store" in capfd.readouterr().err


def test_no_progress_analysis_prints_no_store_bar(setup, tmp_path, capfd):
    root, run, down = setup
    capfd.readouterr()
    analysis.analyze(run, metrics=["source_accuracy"], device="cpu", progress=False,
                     plot=False, image_store=str(tmp_path / "fresh"), use_cache=False,
                     downstream=[f"imagefolder:root={down},image_size=20,name=down"],
                     downstream_metrics=["probe_accuracy"])
    err = capfd.readouterr().err
    assert "decoding once" not in err and "%|" not in err, err
