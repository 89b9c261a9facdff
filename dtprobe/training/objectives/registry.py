"""The objective registry: ``@register_objective`` and the look-ups by name.

Imports none of the families: each family module registers its objectives when imported, and
the package :mod:`dtprobe.training.objectives` imports every family (as :mod:`dtprobe.data`
and :mod:`dtprobe.models` do).
"""

from __future__ import annotations

import inspect
import math
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
        # the docstring's first line; none under `python -OO`, which strips docstrings
        doc = description or next(iter((factory.__doc__ or "").strip().splitlines()), "")
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
    params = check_objective_params(name, params)
    objective = spec.factory(ctx, **{**spec.defaults, **params})
    objective.name = name
    return objective.to(ctx.device)


#: Every integer parameter of an objective is a size or a count (projection widths, bank sizes,
#: epochs): bounded here; each factory checks its own finer range.
_INT_LIMIT = 2**31 - 1
_KINDS = {"bool": "true or false", "int": f"an integer in [0, {_INT_LIMIT}]",
          "float": "a finite number", "str": "text", "None": "null"}


def _fits(value: Any, kind: str) -> bool:
    if kind == "None":
        return value is None
    if kind == "bool":
        return isinstance(value, bool)
    if kind == "int":
        return (isinstance(value, int) and not isinstance(value, bool)
                and 0 <= value <= _INT_LIMIT)
    if kind == "float":
        return (isinstance(value, (int, float)) and not isinstance(value, bool)
                and math.isfinite(value))
    return isinstance(value, str)


def _param_kinds(spec: ObjectiveSpec, key: str) -> list[str]:
    """The simple types a factory parameter takes, from its annotation (``float | None``) or,
    without one, its default's type; empty when the annotation is anything else."""
    param = inspect.signature(spec.factory).parameters[key]
    note = param.annotation
    if note is inspect.Parameter.empty:
        default = spec.defaults[key]
        note = "None" if default is None else type(default).__name__
    kinds = [k.strip() for k in (note if isinstance(note, str) else
                                 getattr(note, "__name__", str(note))).split("|")]
    return kinds if all(k in _KINDS for k in kinds) else []


def check_objective_params(name: str, params: dict[str, Any] | None) -> dict[str, Any]:
    """``params`` of objective ``name``, checked before anything is built: every key is one
    of its parameters and every value has a type the factory declares (a bool for a bool, an
    integer for an int, a finite number for a float, text for a str, null where ``None`` is
    allowed; integers are sizes or counts, so in ``[0, 2**31 - 1]``). The factory then checks
    its finer ranges. One-line :class:`ConfigError` otherwise."""
    spec = get_objective(name)
    params = dict(params or {})
    unknown = sorted(set(params) - set(spec.defaults), key=str)
    if unknown:
        valid = ", ".join(f"{k}={v}" for k, v in spec.defaults.items()) or "none"
        raise ConfigError(f"--objective-param {', '.join(map(str, unknown))}: not a parameter "
                          f"of {name} (valid, with defaults: {valid})")
    for key, value in params.items():
        kinds = _param_kinds(spec, key)
        if kinds and not any(_fits(value, k) for k in kinds):
            shown = repr(value) if len(repr(value)) <= 40 else repr(value)[:37] + "..."
            raise ConfigError(f"--objective-param {key}={shown} for {name} must be "
                              f"{' or '.join(_KINDS[k] for k in kinds)} "
                              f"(default {spec.defaults[key]!r})")
    return params
