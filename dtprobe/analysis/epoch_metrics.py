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
from dtprobe.metrics.registry import EpochView, FeatureSplit, MetricSpec, MetricValue
from dtprobe.models import get_arch
from dtprobe.runtime.isolation import contain
from dtprobe.table import split_params

PARTS_VERSION = 3  # 2: params split into params + diagnostics, chance levels recorded;
# 3: the linear probe's default is the papers' 45-value protocol


def _head_params(plan: RunPlan, state: dict[str, torch.Tensor],
                 ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    head = plan.head or get_arch(plan.arch).head
    return state.get(f"{head}.weight"), state.get(f"{head}.bias")


ACCURACY_METRICS = ("source_accuracy", "probe_accuracy", "knn_accuracy")
"""Metrics whose rows record their chance level (``diagnostics["chance"]``)."""


def chance_level(labels: torch.Tensor | None) -> float | None:
    """Accuracy of always predicting the most frequent test label (``1/K`` when balanced)."""
    if labels is None or labels.numel() == 0:
        return None
    counts = torch.bincount(labels.reshape(-1).long().clamp_min(0).cpu())
    return float(counts.max()) / float(labels.numel())


def _chance(view: EpochView, metric: str, task: str) -> float | None:
    if metric not in ACCURACY_METRICS:
        return None
    if metric == "source_accuracy":
        return chance_level(view.test.labels)
    return chance_level(view.test.factors.get(task)) if view.test.factors else None


def metric_rows(plan: RunPlan, ckpt: PlannedCheckpoint, values,
                view: EpochView | None = None) -> list[dict[str, Any]]:
    """Table rows of ``values`` (:class:`MetricValue`) measured on ``ckpt`` of ``plan``: settings
    and
    computed diagnostics split, the chance level of an accuracy added from ``view``."""
    rows = []
    for v in values:
        settings, diagnostics = split_params(v.params)
        diagnostics.update(getattr(v, "diagnostics", None) or {})
        chance = _chance(view, v.metric, v.task) if view is not None else None
        if chance is not None:
            diagnostics["chance"] = chance
        rows.append({"run": plan.name, "epoch": ckpt.epoch, "step": ckpt.step,
                     "metric": v.metric, "task": v.task, "layer": v.layer,
                     "other_run": "", "value": float(v.value), "estimator": v.estimator,
                     "params": _json(settings), "diagnostics": _json(diagnostics)})
    return rows


def _json(obj: dict[str, Any]) -> str:
    return json.dumps(obj, sort_keys=True, default=str) if obj else ""


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
                          feats["test"]["logits"], inputs=data.mi()),
        head_weight=weight, head_bias=bias, seed=opts.seed,
        probe_protocol=opts.probe_protocol, options=metric_options(opts))
    view.train.sample_ids = b.train.sample_ids
    view.test.sample_ids = b.test.sample_ids
    rows = []
    for spec in specs:
        rows.extend(metric_rows(plan, ckpt, apply_metric(spec, view, ckpt.epoch), view))
    # Layer x epoch: the metrics that depend only on features and labels, on each requested
    # layer's (pooled) outputs; the source head, logits and MI inputs belong to the penultimate.
    layer_specs = [s for s in specs if s.name in LAYER_METRICS]
    for layer, layer_view in layer_views(feats, b, opts.layers if layer_specs else (),
                                         ckpt.epoch, opts.seed, opts.probe_protocol,
                                         view.options):
        for spec in layer_specs:
            values = apply_metric(spec, layer_view, ckpt.epoch)
            for v in values:
                v.layer = layer
            rows.extend(metric_rows(plan, ckpt, values, layer_view))
    return rows


def layer_views(feats, bundle, layers: Sequence[str], epoch: int, seed: int,
                probe_protocol: str = "kornblith2019",
                options: dict[str, Any] | None = None) -> Iterator[tuple[str, EpochView]]:
    """``(layer, view)`` for each of ``layers`` whose pooled outputs were extracted for both
    splits; the views hold no logits or head (those belong to the penultimate)."""
    for layer in layers:
        key = f"layer:{layer}"
        if key in feats["train"] and key in feats["test"]:
            yield layer, EpochView(
                epoch=epoch,
                train=FeatureSplit(feats["train"][key], bundle.train.labels,
                                   bundle.train.factors, sample_ids=bundle.train.sample_ids),
                test=FeatureSplit(feats["test"][key], bundle.test.labels, bundle.test.factors,
                                  sample_ids=bundle.test.sample_ids),
                seed=seed, probe_protocol=probe_protocol, options=dict(options or {}))


def metric_options(opts: AnalysisOptions) -> dict[str, Any]:
    """The analysis settings metrics read from ``EpochView.options``."""
    return {"fewshot_shots": tuple(int(k) for k in opts.fewshot_shots),
            "fewshot_draws": int(opts.fewshot_draws)}


def option_key_fields(opts: AnalysisOptions) -> list[str]:
    """Part-key fields of the metric settings that differ from their defaults (so that keys
    of analyses with default settings are unchanged)."""
    default = AnalysisOptions()
    fields = []
    if tuple(opts.fewshot_shots) != tuple(default.fewshot_shots) \
            or opts.fewshot_draws != default.fewshot_draws:
        fields.append(f"fewshot={list(opts.fewshot_shots)}x{opts.fewshot_draws}")
    return fields


#: Registered metrics computed per layer with ``--layers`` (functions of features and labels).
LAYER_METRICS = frozenset({"probe_accuracy", "knn_accuracy", "class_separation", "rankme",
                           "twonn", "alpha_req", "cdnv", "fewshot_ridge", "fewshot_ncm"})


def apply_metric(spec: MetricSpec, view: EpochView, epoch: int, where: str = "",
                 task: str = "") -> list[MetricValue]:
    """``spec``'s rows on ``view``; a metric that fails becomes one NaN row saying why.

    A metric that cannot apply to this checkpoint (e.g. a class missing from a split:
    :class:`~dtprobe.errors.MetricInputError`), or that fails in any other way (any exception
    class, see :mod:`dtprobe.runtime.isolation`), must not cost the checkpoint's other metrics. A
    failure no check foresaw also records ``diagnostics["exception"]`` (its class), and the
    checkpoint's rows are then not cached (:func:`cacheable`): the next analysis computes that
    metric again. ``where`` and ``task`` place the warning and the NaN row (e.g. a downstream
    dataset).
    """
    try:
        with metric_threads(view):
            return list(spec.func(view))
    except Exception as exc:
        failure = contain(exc, f"epoch {epoch}: {where}{spec.name}", "its rows are NaN")
        reason = str(exc) if failure.expected else failure.reason
    warnings.warn(f"epoch {epoch}: {where}{spec.name}: {reason}" if failure.expected else reason,
                  stacklevel=3)
    return [MetricValue(spec.name, float("nan"), task=task, estimator="error",
                        params={"error": reason},
                        diagnostics={} if failure.expected else {"exception": failure.exception})]


def cacheable(rows: Sequence[dict[str, Any]]) -> bool:
    """Whether rows may be stored as a part: none holds a failure no check foresaw (see
    :func:`apply_metric`), which the next analysis should try again."""
    return not any('"exception":' in (r.get("diagnostics") or "") for r in rows)


def rows_key(version: int, ckpt: PlannedCheckpoint, fields: Sequence[Any],
             opts: AnalysisOptions) -> str:
    """The one recipe for the key of a checkpoint's stored rows (a part file is reused only
    when its key matches): the rows' format ``version``, the checkpoint's verified digest, what
    the rows are of (``fields``, the seed among them), then the options every row depends on.

    Parameters
    ----------
    version : the format version of the part files (bumped when rows change meaning).
    ckpt : the checkpoint (its ``cache_digest``).
    fields : JSON-serialisable, e.g. the data key, the metric names and the seed.
    opts : the analysis options (layers extracted, feature dtype, probe protocol, few-shot
        settings).

    Returns
    -------
    str
        A sha256 hex digest.
    """
    key = [version, ckpt.cache_digest, *fields]
    if opts.layers:  # per-layer rows depend on the layers extracted
        key.append(sorted(opts.layers))
    if opts.feature_dtype != "float32":  # rows of rounded features (float32 keys unchanged)
        key.append(f"dtype={opts.feature_dtype}")
    if opts.probe_protocol != "kornblith2019":  # the default protocol's keys carry no tag
        key.append(f"probe={opts.probe_protocol}")
    key.extend(option_key_fields(opts))
    return hashlib.sha256(json.dumps(key).encode()).hexdigest()


def part_key(ckpt: PlannedCheckpoint, data: EvalData, specs: Sequence[MetricSpec],
             opts: AnalysisOptions) -> str:
    """Key of the source-metric rows of ``ckpt`` (:func:`rows_key`)."""
    return rows_key(PARTS_VERSION, ckpt, [data.key, [s.name for s in specs], opts.seed], opts)

