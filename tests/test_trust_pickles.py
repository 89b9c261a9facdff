"""``--trust-pickles`` plans and loads from the same bytes (issue 25, part 3).

Without a manifest, planning reads each file's metadata (its epoch ...) and the analysis later
loads its weights. With ``--trust-pickles`` both unpickle the file; a file rewritten between the
two must not be analysed under the plan made from its earlier content: planning reads the file
once into memory, hashes those bytes and takes the metadata from them, and the load accepts
only bytes with that digest.
"""

from __future__ import annotations

import argparse
import shutil

import pytest
import torch

from dtprobe.analysis.pipeline import analyze_plan
from dtprobe.analysis.plan import AnalysisOptions, plan_run
from dtprobe.checkpoints.reader import PLANNED_DIGEST
from dtprobe.training.trainer import TrainConfig, train

TINY = {"n_train": 240, "n_test": 120, "image_size": 16}
ARCH = {"width": 8, "feature_dim": 16}
FLAGS = dict(arch="small_cnn", num_classes=6, arch_params=ARCH, dataset="shapes",
             dataset_params=dict(TINY), trust_pickles=True)
UNPICKLED: list[int] = []


class Recorded:
    """Plain Python object the safe loader refuses; counts how often it is unpickled."""

    def __init__(self, epoch: int):
        self.epoch = epoch

    def __setstate__(self, state):
        self.__dict__.update(state)
        UNPICKLED.append(self.epoch)


@pytest.fixture(scope="module")
def states(tmp_path_factory):
    out = tmp_path_factory.mktemp("tp") / "run"
    train(TrainConfig(out=str(out), dataset="shapes", dataset_params=dict(TINY),
                      arch="small_cnn", arch_params=ARCH, epochs=2, batch_size=64,
                      save_every=1, seed=0, device="cpu", progress=False))
    return {e: torch.load(p, weights_only=True)
            for e, p in ((e, next((out / "checkpoints").glob(f"*{e}.*"))) for e in (0, 1, 2))}


def _pickled_run(states, root):
    root.mkdir()
    for epoch, state in states.items():
        torch.save({"state_dict": state, "epoch": epoch, "args": argparse.Namespace(lr=0.1),
                    "marker": Recorded(epoch)}, root / f"ckpt_epoch_{epoch}.pth")
    return root


def _opts():
    return AnalysisOptions(metrics=["source_accuracy"], device="cpu", progress=False,
                           plot=False, use_cache=False)


def test_planned_bytes_are_the_loaded_bytes(states, tmp_path):
    run = _pickled_run(states, tmp_path / "run")
    UNPICKLED.clear()
    plan = plan_run(run, **FLAGS)
    assert sorted(UNPICKLED) == [0, 1, 2]  # planning: each file once, from the bytes it hashed
    assert all(c.sha256 and c.sha256_from == PLANNED_DIGEST for c in plan.checkpoints)
    # the file of epoch 1 is rewritten (other weights, same metadata) after planning
    torch.save({"state_dict": states[2], "epoch": 1, "args": argparse.Namespace(lr=0.1),
                "marker": Recorded(1)}, run / "ckpt_epoch_1.pth")
    UNPICKLED.clear()
    res = analyze_plan(plan, _opts())
    assert sorted(res.table["epoch"].unique()) == [0, 2]
    (reason,) = res.failures["reason"]
    assert "ckpt_epoch_1.pth" in reason and f"does not match {PLANNED_DIGEST}" in reason
    assert 1 not in UNPICKLED  # the rewritten file's bytes were never unpickled
    # planned again, the new content is analysed
    res = analyze_plan(plan_run(run, **FLAGS), _opts())
    assert sorted(res.table["epoch"].unique()) == [0, 1, 2] and res.failures.empty


def test_unchanged_pickled_run_analyses_like_the_safe_files(states, tmp_path):
    run = _pickled_run(states, tmp_path / "run")
    safe = tmp_path / "safe"
    safe.mkdir()
    for epoch, state in states.items():
        torch.save({"state_dict": state, "epoch": epoch}, safe / f"ckpt_epoch_{epoch}.pth")
    got = analyze_plan(plan_run(run, **FLAGS), _opts()).table
    ref = analyze_plan(plan_run(safe, **{**FLAGS, "trust_pickles": False}), _opts()).table
    assert list(got["value"]) == list(ref["value"]) and len(got) == 3 + 3 + 2
    shutil.rmtree(run / "analysis")
