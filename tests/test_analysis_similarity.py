"""Analysis integration of the new metrics: similarity rows between epochs, layers and runs carry
their direction and invariances, CKA rows carry a permutation null, TwoNN runs per layer."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from dtprobe import analysis
from dtprobe.analysis.similarity import cka_rows
from dtprobe.metrics import cka_permutation_null, svcca
from dtprobe.metrics.registry import available_metrics
from dtprobe.training.trainer import TrainConfig, train


def _cfg(out, params, seed):
    return TrainConfig(out=str(out), dataset="shapes", dataset_params=params, arch="small_cnn",
                       arch_params={"width": 8, "feature_dim": 16}, epochs=2, batch_size=64,
                       save_every=1, seed=seed, device="cpu", progress=False)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_shapes_params):
    root = tmp_path_factory.mktemp("sim")
    train(_cfg(root / "a", tiny_shapes_params, 0))
    train(_cfg(root / "b", tiny_shapes_params, 1))
    return root / "a", root / "b"


def test_similarity_rows_and_null(runs):
    a, b = runs
    res = analysis.analyze(a, device="cpu", progress=False, plot=False, compare=[b],
                           layers=["features.0"],
                           metrics=["source_accuracy", "twonn", "mutual_knn",
                                    "procrustes_distance"])
    table = res.table
    metrics = set(table["metric"])
    assert {"twonn", "mutual_knn_to_final", "mutual_knn_to_previous", "mutual_knn_to_run",
            "procrustes_distance_to_final", "procrustes_distance_to_run", "cka_to_final",
            "cka_to_run"} <= metrics
    row = table[table["metric"] == "procrustes_distance_to_final"].iloc[0]
    params = json.loads(row["params"])
    assert params["higher_is_similar"] is False and "orthogonal" in params["invariances"]
    knn = table[table["metric"] == "mutual_knn_to_final"]
    final = knn[knn["epoch"] == knn["epoch"].max()]["value"].iloc[0]
    assert final == 1.0
    # TwoNN per layer (Ansuini et al. 2019) and similarity per layer
    assert set(table[table["metric"] == "twonn"]["layer"]) == {"", "features.0"}
    assert "features.0" in set(table[table["metric"] == "mutual_knn_to_final"]["layer"])
    for name in ("cka_to_final", "cka_to_previous", "cka_to_run"):
        row = table[table["metric"] == name].iloc[0]
        p, d = json.loads(row["params"]), json.loads(row["diagnostics"])
        assert {"n_permutations", "null", "null_seed"} <= set(p)  # the null's settings
        assert {"null_mean", "null_q95", "p_value"} <= set(d)  # computed per row
        assert p["higher_is_similar"] is True


def test_cka_rows_null_matches_direct_call():
    """cka_rows' null equals cka_permutation_null on the same features; similarity rows follow
    the registry."""
    rng = np.random.default_rng(0)
    feats = {e: {"features": torch.from_numpy(rng.standard_normal((40, 6)))} for e in (1, 2, 3)}
    plan = SimpleNamespace(name="run")
    epochs = [SimpleNamespace(epoch=e, step=None) for e in (1, 2, 3)]
    sims = [available_metrics()[n] for n in ("mutual_knn", "svcca", "linear_cka")]
    rows, matrix = cka_rows(plan, epochs, feats, sims, seed=5)
    assert matrix.shape == (3, 3)
    by = {(r["metric"], r["epoch"]): r for r in rows}
    p = json.loads(by[("cka_to_previous", 2)]["params"])
    direct = cka_permutation_null(feats[2]["features"], feats[1]["features"], seed=5)
    assert by[("cka_to_previous", 2)]["value"] == pytest.approx(direct.score, abs=1e-12)
    assert p["null_mean"] == pytest.approx(direct.null_mean, abs=1e-12)
    assert p["p_value"] == direct.p_value
    assert by[("svcca_to_final", 1)]["value"] == pytest.approx(
        svcca(feats[1]["features"], feats[3]["features"]), abs=1e-12)
    assert ("linear_cka_to_final", 1) not in by  # built in as cka_to_final
    assert json.loads(by[("mutual_knn_to_final", 1)]["params"])["topk"] == 10


def test_report_on_two_real_runs_lists_interval_comparisons(runs, tmp_path):
    """Probe rows carry Wilson intervals (probes.py); the report compares the two runs on them."""
    import matplotlib.pyplot as plt

    import dtprobe
    from dtprobe.results.report import render_report

    a, b = runs
    for run in runs:
        analysis.analyze(run, device="cpu", progress=False, plot=False,
                         metrics=["source_accuracy", "probe_accuracy"])
    both = dtprobe.compare([a, b])
    html = render_report(both, dpi=40)
    assert "epochs beyond the intervals" in html
    assert "quantile of chance" in html
    plt.close("all")


def test_a_compared_run_is_read_with_the_analysis_options(runs, tmp_path):
    """--follow-symlinks (and every other option) applies to the --compare run as well: its
    checkpoints on scratch storage behind a link are compared, not skipped."""
    import shutil

    a, b = runs
    other = tmp_path / "b"
    shutil.copytree(b, other, ignore=shutil.ignore_patterns("analysis"))
    shutil.move(other / "checkpoints", tmp_path / "scratch")
    (other / "checkpoints").symlink_to(tmp_path / "scratch", target_is_directory=True)
    res = analysis.analyze(a, device="cpu", progress=False, plot=False, compare=[other],
                           metrics=["source_accuracy"], follow_symlinks=True, use_cache=False)
    rows = res.table[res.table["metric"] == "cka_to_run"]
    assert sorted(rows["epoch"]) == [0, 1, 2]
    assert np.isfinite(rows["value"]).all()
