"""Metrics: the registered per-epoch metrics of one checkpoint, as tidy rows."""

from __future__ import annotations

import contextlib
import hashlib
import json
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from dtprobe.analysis.data import EvalData
from dtprobe.analysis.plan import AnalysisOptions, PlannedCheckpoint, RunPlan
from dtprobe.errors import MetricInputError
from dtprobe.metrics.registry import EpochView, FeatureSplit, MetricSpec, MetricValue
from dtprobe.models import get_arch

PARTS_VERSION = 1


def _head_params(plan: RunPlan, state: dict[str, torch.Tensor],
                 ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    head = plan.head or get_arch(plan.arch).head
    return state.get(f"{head}.weight"), state.get(f"{head}.bias")


def _rows(plan: RunPlan, ckpt: PlannedCheckpoint, values) -> list[dict[str, Any]]:
    return [{"run": plan.name, "epoch": ckpt.epoch, "step": ckpt.step, "metric": v.metric,
             "task": v.task, "layer": getattr(v, "layer", ""), "value": float(v.value),
             "estimator": v.estimator, "params": v.params_json()} for v in values]


@contextlib.contextmanager
def metric_threads(view: EpochView) -> Iterator[None]:
    """One intra-op thread for CPU metrics: their matrices are small (thousands x hundreds), so
    thread hand-offs cost more than they save, 7-30x more on a busy machine (measured on the
    demo's probes and Renyi MI); extraction keeps all threads."""
    if view.train.features.is_cuda:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def epoch_metrics(plan: RunPlan, ckpt: PlannedCheckpoint, feats, data: EvalData,
                  specs: Sequence[MetricSpec], opts: AnalysisOptions,
                  state: dict[str, torch.Tensor]) -> list[dict[str, Any]]:
    b = data.bundle
    weight, bias = _head_params(plan, state)
    view = EpochView(
        epoch=ckpt.epoch,
        train=FeatureSplit(feats["train"]["features"], b.train.labels, b.train.factors,
                           feats["train"]["logits"]),
        test=FeatureSplit(feats["test"]["features"], b.test.labels, b.test.factors,
                          feats["test"]["logits"], inputs=data.mi_inputs),
        head_weight=weight, head_bias=bias, seed=opts.seed)
    rows = []
    for spec in specs:
        try:
            with metric_threads(view):
                values = spec.func(view)
        except MetricInputError as exc:
            # A metric that cannot apply to this checkpoint (e.g. a class missing from a split)
            # leaves a NaN row that says why, instead of failing the whole checkpoint.
            warnings.warn(f"epoch {ckpt.epoch}: {spec.name}: {exc}", stacklevel=2)
            values = [MetricValue(spec.name, float("nan"), estimator="error",
                                  params={"error": str(exc)})]
        rows.extend(_rows(plan, ckpt, values))
    return rows


def part_key(ckpt: PlannedCheckpoint, data: EvalData, specs: Sequence[MetricSpec],
             opts: AnalysisOptions) -> str:
    payload = json.dumps([PARTS_VERSION, ckpt.digest, data.key, [s.name for s in specs],
                          opts.seed])
    return hashlib.sha256(payload.encode()).hexdigest()

