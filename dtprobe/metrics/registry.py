"""Registry of analysis metrics: adding a metric to ``dtprobe analyze`` is one decorated function.

A registered metric receives an :class:`EpochView` (the features, labels and
head of one checkpoint) and returns a list of :class:`MetricValue` rows.  The
pure math lives in the family modules (``dtprobe.metrics.cka`` ...); the
registered function is a thin adapter that picks its inputs from the view and
records the estimator and its parameters, so every number in the results table
can be traced.

Example
-------
>>> from dtprobe.metrics.registry import register_metric, MetricValue
>>> @register_metric("feature_norm", description="mean L2 norm of test features")
... def _feature_norm(view):
...     return [MetricValue("feature_norm", float(view.test.features.norm(dim=1).mean()))]
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from dtprobe.errors import ConfigError
from dtprobe.table import SIMILARITY_INFO, similarity_rows


@dataclass
class FeatureSplit:
    """Penultimate features of one data split under one checkpoint.

    Attributes
    ----------
    features : (n, d) tensor of penultimate features.
    labels : (n,) int64 source-task labels.
    factors : downstream task name -> (n,) int64 labels on the same images.
    logits : (n, C) source-head outputs of the checkpoint, or None.
    inputs : (n, p) flattened, normalised input pixels (a subset may be used), or None.
    sample_ids : stable id of each sample (:mod:`dtprobe.data.subsets`), or None.
    """

    features: torch.Tensor
    labels: torch.Tensor
    factors: dict[str, torch.Tensor] = field(default_factory=dict)
    logits: torch.Tensor | None = None
    inputs: torch.Tensor | None = None
    sample_ids: list[str] | None = None


@dataclass
class EpochView:
    """Everything a per-checkpoint metric may use.

    ``options`` holds analysis settings a metric may read (``fewshot_shots``,
    ``fewshot_draws``); a metric reading one must record it in its rows' params.
    """

    epoch: int
    train: FeatureSplit
    test: FeatureSplit
    head_weight: torch.Tensor | None = None
    head_bias: torch.Tensor | None = None
    seed: int = 0
    #: Named linear-probe protocol (``dtprobe.metrics.probes.PROBE_PROTOCOLS``).
    probe_protocol: str = "kornblith2019"
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class MetricValue:
    """One row of the tidy results table (run/epoch/step are added by the pipeline)."""

    metric: str
    value: float
    task: str = ""
    estimator: str = ""
    params: dict[str, Any] = field(default_factory=dict)
    diagnostics: dict[str, Any] = field(default_factory=dict)
    """Values computed with the estimate (not settings); known keys in ``params`` move here too
    (``dtprobe.table.DIAGNOSTIC_KEYS``)."""
    layer: str = ""  # "" = the penultimate features; else the module name (layer x epoch)

    def params_json(self) -> str:
        return json.dumps(self.params, sort_keys=True, default=str) if self.params else ""


MetricFn = Callable[[EpochView], list[MetricValue]]


#: A similarity measure between two representations of the same inputs: ``(x, y) -> float``.
SimilarityFn = Callable[[torch.Tensor, torch.Tensor], float]


@dataclass(frozen=True)
class SimilaritySpec:
    """How to read a similarity measure: its direction and what it ignores.

    Attributes
    ----------
    func : ``(x, y) -> float`` on two ``(n, d)`` representations of the same samples.
    higher_is_similar : True for similarities (CKA), False for distances (Procrustes).
    invariances : transformations that leave the value unchanged, from
        ``INVARIANCES`` (e.g. ``"orthogonal"``, ``"isotropic_scaling"``).
    params : the estimator's fixed parameters, recorded with every row.
    """

    func: SimilarityFn
    higher_is_similar: bool
    invariances: tuple[str, ...]
    params: dict[str, Any] = field(default_factory=dict)

    @property
    def direction(self) -> str:
        return "higher=more similar" if self.higher_is_similar else "lower=more similar"

    def row_params(self) -> dict[str, Any]:
        """What every results-table row of this measure records besides its own params."""
        return {**self.params, "higher_is_similar": self.higher_is_similar,
                "invariances": list(self.invariances)}


#: Vocabulary of declared invariances (a joint permutation of the samples is always assumed).
INVARIANCES = ("sample_permutation", "translation", "orthogonal", "isotropic_scaling",
               "invertible_linear", "neuron_permutation", "invertible_linear_of_y")


@dataclass(frozen=True)
class MetricSpec:
    """A registered metric: its adapter, whether it runs by default, and the table rows it
    writes (whose presentation facts, :data:`dtprobe.table.METRIC_INFO`, must exist)."""

    name: str
    func: MetricFn
    default: bool
    description: str
    #: Set for similarity measures between representations (computed between epochs, runs
    #: and layers by the analysis, not per checkpoint): direction and invariances.
    similarity: SimilaritySpec | None = None
    #: The ``metric`` names of the rows it writes.
    rows: tuple[str, ...] = ()


_REGISTRY: dict[str, MetricSpec] = {}


def register_metric(name: str, *, default: bool = False, description: str = "",
                    rows: tuple[str, ...] | None = None) -> Callable[[MetricFn], MetricFn]:
    """Register ``func`` as analysis metric ``name`` (selected with ``--metrics name``).

    ``rows`` names the ``metric`` of the rows it writes (default: ``(name,)``); each needs its
    presentation facts in :data:`dtprobe.table.METRIC_INFO` (a test checks every one).
    """

    def decorator(func: MetricFn) -> MetricFn:
        if name in _REGISTRY and _REGISTRY[name].func is not func:
            raise ValueError(f"metric {name!r} registered twice")
        doc = description or (func.__doc__ or "").strip()
        _REGISTRY[name] = MetricSpec(name, func, default, doc, rows=tuple(rows or (name,)))
        return func

    return decorator


def register_similarity(name: str, *, invariances: tuple[str, ...],
                        higher_is_similar: bool | None = None, default: bool = False,
                        description: str = "", params: dict[str, Any] | None = None
                        ) -> Callable[[SimilarityFn], SimilarityFn]:
    """Register ``func(x, y) -> float`` as similarity measure ``name``.

    Every measure says which transformations it ignores, and (once, in
    :data:`dtprobe.table.SIMILARITY_INFO`, with its label and range) whether larger values mean
    more similar; ``dtprobe list`` and every results-table row show both. A measure registered
    from outside dtprobe passes ``higher_is_similar`` instead.  The analysis
    compares each checkpoint with the final and the previous one and with ``--compare`` runs
    (rows ``<name>_to_final``, ``<name>_to_previous``, ``<name>_to_run``); selecting it with
    ``--metrics name`` adds no per-checkpoint rows.
    """
    unknown = [inv for inv in invariances if inv not in INVARIANCES]
    if unknown:
        raise ValueError(f"similarity {name!r}: unknown invariance(s) {unknown}; "
                         f"use {', '.join(INVARIANCES)}")
    declared = SIMILARITY_INFO[name][2] if name in SIMILARITY_INFO else None
    if declared is None and higher_is_similar is None:
        raise ValueError(f"similarity {name!r}: say whether higher is more similar "
                         "(higher_is_similar=, or its entry in dtprobe.table.SIMILARITY_INFO)")
    if declared is not None and higher_is_similar not in (None, declared):
        raise ValueError(f"similarity {name!r}: higher_is_similar={higher_is_similar} "
                         f"contradicts dtprobe.table.SIMILARITY_INFO ({declared})")
    higher_is_similar = declared if declared is not None else higher_is_similar

    def decorator(func: SimilarityFn) -> SimilarityFn:
        if name in _REGISTRY and (_REGISTRY[name].similarity is None
                                  or _REGISTRY[name].similarity.func is not func):
            raise ValueError(f"metric {name!r} registered twice")
        sim = SimilaritySpec(func, higher_is_similar, tuple(invariances), dict(params or {}))
        doc = description or (func.__doc__ or "").strip()
        _REGISTRY[name] = MetricSpec(name, _no_epoch_rows, default, doc, similarity=sim,
                                     rows=similarity_rows(name))
        return func

    return decorator


def _no_epoch_rows(view: EpochView) -> list[MetricValue]:
    """Similarity measures compare two representations; they add no per-checkpoint rows."""
    return []


def available_similarities() -> dict[str, MetricSpec]:
    """Registered similarity measures by name (a subset of :func:`available_metrics`)."""
    return {k: v for k, v in available_metrics().items() if v.similarity is not None}


def available_metrics() -> dict[str, MetricSpec]:
    """All registered metrics by name (importing :mod:`dtprobe.metrics` registers built-ins)."""
    import dtprobe.metrics  # noqa: F401  (registers built-ins)

    return dict(sorted(_REGISTRY.items()))


def default_metrics() -> list[str]:
    return [name for name, spec in available_metrics().items() if spec.default]


def resolve_metrics(names: list[str] | None) -> list[MetricSpec]:
    """Turn ``--metrics`` names into specs; ``None`` or ``["default"]`` gives the default set."""
    registry = available_metrics()
    if not names or names == ["default"]:
        return [registry[n] for n in default_metrics()]
    if names == ["all"]:
        return list(registry.values())
    unknown = [n for n in names if n not in registry and n != "default"]
    if unknown:
        raise ConfigError(f"unknown metric(s) {', '.join(unknown)}; available: "
                          f"{', '.join(registry)}")
    out: list[MetricSpec] = []
    for n in names:
        chosen = [registry[d] for d in default_metrics()] if n == "default" else [registry[n]]
        out.extend(s for s in chosen if s not in out)
    return out
