"""Across-epoch similarity: linear CKA to the final and previous epoch, the streamed epoch x epoch
matrix, and CKA to other runs (``--compare``).

Every CKA row carries its permutation null (``null_mean``, ``null_q95``, ``p_value`` in
``params``; :func:`dtprobe.metrics.cka_permutation_null`): the value CKA takes by chance at this
``n`` and width.  Similarity measures selected with ``--metrics`` (mutual k-NN, CKNNA, shape
metrics, SVCCA, PWCCA) add ``<name>_to_final``, ``<name>_to_previous`` and ``<name>_to_run``
rows, whose params record the measure's direction (``higher_is_similar``) and invariances.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

import numpy as np
import pandas as pd
import torch

from dtprobe.analysis.data import EvalData
from dtprobe.analysis.features import checkpoint_features
from dtprobe.analysis.plan import AnalysisOptions, PlannedCheckpoint, RunPlan
from dtprobe.analysis.resume import EpochFeatures, ReadThroughCache
from dtprobe.analysis.rows import note
from dtprobe.features.cache import FeatureCache, dataset_key
from dtprobe.metrics import cka_matrix, cka_permutation_null
from dtprobe.metrics.registry import MetricSpec
from dtprobe.runtime.isolation import contain
from dtprobe.table import ANALYSIS_DIR, FEATURES_DIR


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


#: Linear CKA rows are always computed by the pipeline itself.
_BUILT_IN = "linear_cka"


def _cka_with_null(x: torch.Tensor, y: torch.Tensor, seed: int) -> tuple[float, dict[str, Any]]:
    res = cka_permutation_null(x, y, seed=seed)
    return res.score, res.as_params()


def similarity_measure_rows(base: dict[str, Any], suffix: str, x: torch.Tensor, y: torch.Tensor,
                     similarities: Sequence[MetricSpec], extra: dict[str, Any]
                     ) -> list[dict[str, Any]]:
    """One row per selected similarity measure between ``x`` and ``y`` (NaN row on bad input)."""
    rows = []
    for spec in similarities:
        sim = spec.similarity
        if sim is None or spec.name == _BUILT_IN:
            continue
        params = {**sim.row_params(), "split": "test", **extra}
        try:
            value = float(sim.func(x, y))
            estimator = spec.name
        except Exception as exc:  # any class: this measure's row only (dtprobe.runtime.isolation)
            value, estimator = float("nan"), "error"
            failure = contain(exc, spec.name, "its row is NaN")
            params["error"] = str(exc) if failure.expected else failure.reason
        rows.append({**base, "metric": f"{spec.name}_{suffix}", "value": value,
                     "estimator": estimator, "params": json.dumps(params, default=str)})
    return rows


def cka_rows(plan: RunPlan, epochs: list[PlannedCheckpoint],
             test_feats: Mapping[int, dict[str, torch.Tensor]],
             similarities: Sequence[MetricSpec] = (), seed: int = 0
             ) -> tuple[list[dict], pd.DataFrame]:
    """CKA (with its permutation null) and the selected similarity measures of each epoch to the
    final and to the previous one, per layer; the full epoch x epoch CKA matrix."""
    rows: list[dict[str, Any]] = []
    ok = [c for c in epochs if c.epoch in test_feats]
    if not ok:
        return rows, pd.DataFrame()
    final = ok[-1]
    if isinstance(test_feats, EpochFeatures):
        test_feats.pin(final.epoch)
    params = {"kernel": "linear", "split": "test", "debiased": False, "higher_is_similar": True,
              "invariances": ["sample_permutation", "translation", "orthogonal",
                              "isotropic_scaling"]}
    layer_keys = sorted(k for k in test_feats[final.epoch] if k.startswith("layer:"))
    for i, c in enumerate(ok):
        for key in ["features", *layer_keys]:
            layer = "" if key == "features" else key[len("layer:"):]
            base = {"run": plan.name, "epoch": c.epoch, "step": c.step, "task": "",
                    "layer": layer}
            refs = [("to_final", final)] + ([("to_previous", ok[i - 1])] if i > 0 else [])
            for suffix, ref in refs:
                x, y = test_feats[c.epoch][key], test_feats[ref.epoch][key]
                value, null = _cka_with_null(x, y, seed)
                rows.append({**base, "metric": f"cka_{suffix}", "value": float(value),
                             "estimator": "linear_cka",
                             "params": json.dumps({**params, **null,
                                                   "reference_epoch": ref.epoch})})
                rows.extend(similarity_measure_rows(base, suffix, x, y, similarities,
                                             {"reference_epoch": ref.epoch}))
    names = [c.epoch for c in ok]
    matrix = streamed_cka_matrix(test_feats, names)
    return rows, pd.DataFrame(matrix, index=names, columns=names)


def compare_rows(plan: RunPlan, test_feats: Mapping[int, dict[str, torch.Tensor]],
                 other: RunPlan, data: EvalData, device: torch.device,
                 opts: AnalysisOptions, similarities: Sequence[MetricSpec] = ()
                 ) -> list[dict[str, Any]]:
    """Linear CKA (with its permutation null) and the selected similarity measures between this
    run and ``other`` at matching epochs on the same test images."""
    if dataset_key(other.dataset, other.dataset_params) != dataset_key(plan.dataset,
                                                                        plan.dataset_params):
        # Compare on this run's data: the other model is evaluated on the same images.
        other.dataset, other.dataset_params = plan.dataset, plan.dataset_params
    cache = ReadThroughCache(
        FeatureCache(plan.run_dir / ANALYSIS_DIR / FEATURES_DIR, opts.use_cache),
        FeatureCache(other.run_dir / ANALYSIS_DIR / FEATURES_DIR, opts.use_cache))
    rows = []
    steps = {c.epoch: c.step for c in plan.checkpoints}
    # the analysis's own options (e.g. --follow-symlinks, --engine): the compared run is read
    # and extracted exactly as the analysed one; its images are not sharded
    other_opts = replace(opts, image_shards=1)
    for c in other.checkpoints:
        if c.epoch not in test_feats:
            continue
        try:
            feats, _ = checkpoint_features(other, c, data, cache, device, other_opts)
        except Exception as exc:  # any class: one bad file of the other run is skipped
            note(f"compare: skipping {c.path}: "
                 f"{contain(exc, str(c.path), 'this epoch is not compared').reason}")
            continue
        mine = test_feats[c.epoch]
        # the penultimate, then each requested layer both runs have (Kornblith et al. 2021
        # compare objectives layer by layer at the final epoch); the other run goes in its own
        # column (not `task`), and step is this run's, as on every other row
        for key in ["features", *(k for k in mine if k.startswith("layer:"))]:
            if key not in feats["test"]:
                continue
            x, y = mine[key], feats["test"][key]
            value, null = _cka_with_null(x, y, opts.seed)
            base = {"run": plan.name, "epoch": c.epoch, "step": steps.get(c.epoch), "task": "",
                    "other_run": other.name,
                    "layer": "" if key == "features" else key[len("layer:"):]}
            rows.append({**base, "metric": "cka_to_run", "value": float(value),
                         "estimator": "linear_cka",
                         "params": json.dumps({"kernel": "linear", "split": "test",
                                               "other_run_dir": str(other.run_dir),
                                               "higher_is_similar": True, **null})})
            if key == "features":  # the opt-in similarity measures on the penultimate only
                rows.extend(similarity_measure_rows(base, "to_run", x, y, similarities,
                                             {"other_run_dir": str(other.run_dir)}))
    return rows

