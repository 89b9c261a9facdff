"""The objective registry: ``@register_objective`` and the look-ups by name.

Imports none of the families: each family module registers its objectives when imported, and
the package :mod:`dtprobe.training.objectives` imports every family (as :mod:`dtprobe.data`
and :mod:`dtprobe.models` do).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from dtprobe.errors import ConfigError
from dtprobe.training.objectives.base import Objective, ObjectiveContext


@dataclass(frozen=True)
class ObjectiveSpec:
    """A registered objective: its factory, the paper it comes from and its default parameters."""

    name: str
    factory: Callable[..., Objective]
    paper: str
    defaults: dict[str, Any] = field(default_factory=dict)
    description: str = ""


_OBJECTIVES: dict[str, ObjectiveSpec] = {}


def register_objective(name: str, *, paper: str, description: str = ""):
    """Register ``factory(ctx, **params) -> Objective`` as objective ``name``.

    The factory's keyword defaults are the objective's documented defaults (shown by
    ``dtprobe list`` and recorded in the manifest).
    """

    def decorator(factory: Callable[..., Objective]) -> Callable[..., Objective]:
        sig = inspect.signature(factory)
        defaults = {k: p.default for k, p in list(sig.parameters.items())[1:]
                    if p.default is not inspect.Parameter.empty}
        doc = description or (factory.__doc__ or "").strip().splitlines()[0]
        _OBJECTIVES[name] = ObjectiveSpec(name, factory, paper, defaults, doc)
        return factory

    return decorator


def available_objectives() -> dict[str, ObjectiveSpec]:
    """Every registered objective by name."""
    order = ["cross_entropy", "kornblith", "contrastive", "trex", "ctc"]

    def rank(spec: ObjectiveSpec) -> int:
        family = spec.factory.__module__.rsplit(".", 1)[-1]
        return order.index(family) if family in order else len(order)

    return {s.name: s for s in sorted(_OBJECTIVES.values(), key=rank)}


def get_objective(name: str) -> ObjectiveSpec:
    specs = available_objectives()
    if name not in specs:
        raise ConfigError(f"unknown --objective {name!r}; available: {', '.join(specs)}")
    return specs[name]


def build_objective(name: str, ctx: ObjectiveContext, params: dict[str, Any] | None = None
                    ) -> Objective:
    """Build objective ``name`` with ``params`` overriding its defaults.

    Raises
    ------
    ConfigError
        Unknown objective or parameter, or a parameter out of range.
    """
    spec = get_objective(name)
    params = dict(params or {})
    unknown = sorted(set(params) - set(spec.defaults))
    if unknown:
        valid = ", ".join(f"{k}={v}" for k, v in spec.defaults.items()) or "none"
        raise ConfigError(f"--objective-param {', '.join(unknown)}: not a parameter of {name} "
                          f"(valid, with defaults: {valid})")
    objective = spec.factory(ctx, **{**spec.defaults, **params})
    objective.name = name
    return objective.to(ctx.device)
