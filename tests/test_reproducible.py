"""A seeded run is repeatable on one machine and library set (issue 16, section 5), and the rows
the analysis writes follow the schema (other_run, step, chance levels in diagnostics)."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch

from dtprobe.analysis import analyze
from dtprobe.demo import fixed_threads
from dtprobe.training.trainer import TrainConfig, train

TINY = {"n_train": 240, "n_test": 120, "image_size": 16}
METRICS = ["source_accuracy", "probe_accuracy", "class_separation"]


def _train(out, objective="ce"):
    ctc = {"preset": "discriminability", "stage_two_epoch": 1, "nce_k": 64} \
        if objective == "ctc" else {}
    train(TrainConfig(out=str(out), dataset="shapes", dataset_params=dict(TINY),
                      arch="small_cnn", arch_params={"width": 8, "feature_dim": 16}, epochs=2,
                      batch_size=64, save_every=1, seed=0, device="cpu", progress=False,
                      objective=objective, ctc=ctc))


@pytest.fixture(scope="module")
def twins(tmp_path_factory):
    """Two CTC runs with the same seed and thread count, trained and analysed separately."""
    root = tmp_path_factory.mktemp("twins")
    with fixed_threads(2):
        for name in ("a", "b"):
            _train(root / name, "ctc")
        tables = [analyze(root / n, metrics=METRICS, device="cpu", progress=False,
                          plot=False).table for n in ("a", "b")]
        compared = analyze(root / "a", metrics=METRICS, device="cpu", progress=False,
                           plot=False, compare=[root / "b"]).table
    return root, tables, compared


def test_two_seeded_runs_give_equal_tables(twins):
    root, (a, b), _ = twins
    wa = torch.load(root / "a" / "checkpoints" / "epoch_0002.pt", weights_only=True)["model"]
    wb = torch.load(root / "b" / "checkpoints" / "epoch_0002.pt", weights_only=True)["model"]
    assert all(torch.equal(wa[k], wb[k]) for k in wa)  # bit-identical weights
    cols = [c for c in a.columns if c != "run"]
    pd.testing.assert_frame_equal(a[cols], b[cols])  # bit-identical table


def test_cka_to_run_rows_follow_the_schema(twins):
    _, (a, _), compared = twins
    rows = compared[compared["metric"] == "cka_to_run"]
    assert len(rows) == 3
    assert (rows["task"] == "").all() and (rows["other_run"] == "b").all()
    steps = a[a["metric"] == "source_accuracy"].set_index("epoch")["step"]
    assert rows.set_index("epoch")["step"].equals(steps)  # filled like every other row
    assert rows["value"].tolist() == pytest.approx([1.0, 1.0, 1.0])  # identical runs
    assert all(json.loads(d)["other_run_dir"].endswith("b") for d in rows["diagnostics"])
    assert set(json.loads(rows["params"].iloc[0])) == {"kernel", "split"}


def test_accuracy_rows_record_chance_and_settings_exclude_computed_values(twins):
    _, (a, _), _ = twins
    from dtprobe.data import load_dataset

    bundle = load_dataset("shapes", **TINY)
    src = a[a["metric"] == "source_accuracy"]
    majority = bundle.test.labels.bincount().max().item() / len(bundle.test.labels)
    assert [json.loads(d)["chance"] for d in src["diagnostics"]] == pytest.approx(
        [majority] * len(src))
    probe = a[a["metric"] == "probe_accuracy"]
    for row in probe.itertuples():
        labels = bundle.test.factors[row.task]
        assert json.loads(row.diagnostics)["chance"] == pytest.approx(
            labels.bincount().max().item() / len(labels))
        params, diag = json.loads(row.params), json.loads(row.diagnostics)
        assert "C" not in params and "val_accuracy" not in params
        assert {"C", "val_accuracy"} <= set(diag)
