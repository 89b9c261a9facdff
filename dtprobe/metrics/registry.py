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
    """

    features: torch.Tensor
    labels: torch.Tensor
    factors: dict[str, torch.Tensor] = field(default_factory=dict)
    logits: torch.Tensor | None = None
    inputs: torch.Tensor | None = None


@dataclass
class EpochView:
    """Everything a per-checkpoint metric may use."""

    epoch: int
    train: FeatureSplit
    test: FeatureSplit
    head_weight: torch.Tensor | None = None
    head_bias: torch.Tensor | None = None
    seed: int = 0


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


@dataclass(frozen=True)
class MetricSpec:
    name: str
    func: MetricFn
    default: bool
    description: str


_REGISTRY: dict[str, MetricSpec] = {}


def register_metric(name: str, *, default: bool = False,
                    description: str = "") -> Callable[[MetricFn], MetricFn]:
    """Register ``func`` as analysis metric ``name`` (selected with ``--metrics name``)."""

    def decorator(func: MetricFn) -> MetricFn:
        if name in _REGISTRY and _REGISTRY[name].func is not func:
            raise ValueError(f"metric {name!r} registered twice")
        doc = description or (func.__doc__ or "").strip()
        _REGISTRY[name] = MetricSpec(name, func, default, doc)
        return func

    return decorator


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
