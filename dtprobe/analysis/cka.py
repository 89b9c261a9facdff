"""Across-epoch similarity: linear CKA to the final and previous epoch, the streamed epoch x epoch
matrix, and CKA to other runs (``--compare``)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd
import torch

from dtprobe.analysis.data import EvalData
from dtprobe.analysis.features import checkpoint_features
from dtprobe.analysis.plan import AnalysisOptions, PlannedCheckpoint, RunPlan
from dtprobe.analysis.stores import EpochFeatures, ReadThroughCache
from dtprobe.analysis.table import note
from dtprobe.errors import DtprobeError
from dtprobe.extract import FeatureCache, dataset_key
from dtprobe.metrics import cka_matrix, linear_cka


def streamed_cka_matrix(store: Mapping[int, dict[str, torch.Tensor]], epochs: list[int],
                        budget_bytes: int = 1 << 30) -> np.ndarray:
    """Linear CKA between every pair of ``epochs``, loading at most two blocks of epochs at once.

    When all features fit in ``budget_bytes`` this is one :func:`cka_matrix` call; otherwise the
    matrix is filled block pair by block pair from the cache (memory bounded, same values).
    """
    if not epochs:
        return np.zeros((0, 0))
    first = store[epochs[0]]["features"]
    per_epoch = first.numel() * 8  # float64 once centred
    block = max(1, int(budget_bytes // (2 * per_epoch)))
    if block >= len(epochs):
        return np.asarray(cka_matrix([store[e]["features"] for e in epochs]))
    out = np.eye(len(epochs))
    starts = list(range(0, len(epochs), block))
    for bi in starts:
        for bj in starts:
            if bj < bi:
                continue
            idx = list(range(bi, min(bi + block, len(epochs))))
            if bj != bi:
                idx += list(range(bj, min(bj + block, len(epochs))))
            sub = np.asarray(cka_matrix([store[epochs[i]]["features"] for i in idx]))
            for a, ia in enumerate(idx):
                for b, ib in enumerate(idx):
                    out[ia, ib] = sub[a, b]
    return out


def cka_rows(plan: RunPlan, epochs: list[PlannedCheckpoint],
             test_feats: Mapping[int, dict[str, torch.Tensor]]) -> tuple[list[dict], pd.DataFrame]:
    """CKA of each epoch to the final and to the previous one; the full epoch x epoch matrix."""
    rows: list[dict[str, Any]] = []
    ok = [c for c in epochs if c.epoch in test_feats]
    if not ok:
        return rows, pd.DataFrame()
    final = ok[-1]
    if isinstance(test_feats, EpochFeatures):
        test_feats.pin(final.epoch)
    params = {"kernel": "linear", "split": "test", "debiased": False}
    layer_keys = sorted(k for k in test_feats[final.epoch] if k.startswith("layer:"))
    for i, c in enumerate(ok):
        for key in ["features", *layer_keys]:
            layer = "" if key == "features" else key[len("layer:"):]
            value = linear_cka(test_feats[c.epoch][key], test_feats[final.epoch][key])
            rows.append({"run": plan.name, "epoch": c.epoch, "step": c.step,
                         "metric": "cka_to_final", "task": "", "layer": layer,
                         "value": float(value), "estimator": "linear_cka",
                         "params": json.dumps({**params, "reference_epoch": final.epoch})})
            if i > 0:
                prev = ok[i - 1]
                value = linear_cka(test_feats[c.epoch][key], test_feats[prev.epoch][key])
                rows.append({"run": plan.name, "epoch": c.epoch, "step": c.step,
                             "metric": "cka_to_previous", "task": "", "layer": layer,
                             "value": float(value), "estimator": "linear_cka",
                             "params": json.dumps({**params, "reference_epoch": prev.epoch})})
    names = [c.epoch for c in ok]
    matrix = streamed_cka_matrix(test_feats, names)
    return rows, pd.DataFrame(matrix, index=names, columns=names)


def compare_rows(plan: RunPlan, test_feats: Mapping[int, dict[str, torch.Tensor]],
                 other: RunPlan, data: EvalData, device: torch.device,
                 opts: AnalysisOptions) -> list[dict[str, Any]]:
    """Linear CKA between this run and ``other`` at matching epochs on the same test images."""
    if dataset_key(other.dataset, other.dataset_params) != dataset_key(plan.dataset,
                                                                        plan.dataset_params):
        # Compare on this run's data: the other model is evaluated on the same images.
        other.dataset, other.dataset_params = plan.dataset, plan.dataset_params
    cache = ReadThroughCache(FeatureCache(plan.run_dir / "analysis" / "features", opts.use_cache),
                             FeatureCache(other.run_dir / "analysis" / "features", opts.use_cache))
    rows = []
    for c in other.checkpoints:
        if c.epoch not in test_feats:
            continue
        try:
            feats, _ = checkpoint_features(other, c, data, cache, device,
                                           AnalysisOptions(batch_size=opts.batch_size))
        except OSError:
            raise  # the environment (disk full, read-only): not this checkpoint's fault
        except Exception as exc:  # noqa: BLE001 - one bad file of the other run is skipped
            reason = exc if isinstance(exc, DtprobeError) else repr(exc)
            note(f"compare: skipping {c.path}: {reason}")
            continue
        value = linear_cka(test_feats[c.epoch]["features"], feats["test"]["features"])
        rows.append({"run": plan.name, "epoch": c.epoch, "step": None, "metric": "cka_to_run",
                     "task": other.name, "layer": "", "value": float(value),
                     "estimator": "linear_cka",
                     "params": json.dumps({"kernel": "linear", "split": "test",
                                           "other_run": str(other.run_dir)})})
    return rows

