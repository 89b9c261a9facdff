"""Downstream dataset specs: ``DATASET[:KEY=VALUE,...]`` strings naming a registered dataset.

A spec names a transfer target of ``dtprobe analyze --downstream``: a registered dataset and its
loader's parameters, plus ``name=`` (the label of the dataset in the results table, default the
dataset name). Examples::

    digits
    textures:seed=1
    cinic10:root=/data/cinic10,max_per_class=500
    imagefolder:root=/data/pets,name=pets

Values are JSON literals where they parse (``500`` is an int, ``true`` a bool), else strings.
Names and parameters are checked against the registry before any work, so a typo is one line that
lists the valid choices.
"""

from __future__ import annotations

import inspect
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from dtprobe.errors import ConfigError
from dtprobe.literals import json_value

__all__ = ["DownstreamSpec", "json_value", "loader_parameters", "parse_downstream",
           "parse_downstreams", "check_spec_names"]

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")


@dataclass(frozen=True)
class DownstreamSpec:
    """One downstream dataset: registry ``dataset``, loader ``params`` and its table ``name``."""

    dataset: str
    params: dict[str, Any] = field(default_factory=dict, hash=False, compare=True)
    name: str = ""

    def __post_init__(self) -> None:
        if not self.name:
            object.__setattr__(self, "name", self.dataset)

    @property
    def text(self) -> str:
        """The canonical spec string (parameters sorted; ``name`` only when it differs)."""
        items = [f"{k}={_format(v)}" for k, v in sorted(self.params.items())]
        if self.name != self.dataset:
            items.append(f"name={self.name}")
        return self.dataset + (":" + ",".join(items) if items else "")


def _format(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def loader_parameters(dataset: str) -> list[str]:
    """Keyword parameters of the registered loader of ``dataset``, plus the generic ones every
    dataset takes (``max_samples``); raises for unknown names."""
    from dtprobe.data import registry

    names = registry.available_datasets()
    if dataset not in names:
        raise ConfigError(f"--downstream: unknown dataset {dataset!r}; available: "
                          f"{', '.join(names)}")
    sig = inspect.signature(registry.dataset_loader(dataset))
    # ``store``/``progress`` say how the analysis keeps decoded images, not what they are
    names = [p.name for p in sig.parameters.values()
             if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
             and p.name not in registry.RUNTIME_PARAMS]
    return names + [g for g in registry.GENERIC_PARAMS if g not in names]


def _check(spec: DownstreamSpec, shown: str) -> DownstreamSpec:
    valid = loader_parameters(spec.dataset)
    unknown = sorted(k for k in spec.params if k not in valid)
    if unknown:
        raise ConfigError(f"--downstream {shown}: unknown parameter(s) {', '.join(unknown)} of "
                          f"dataset {spec.dataset!r}; valid: {', '.join(valid + ['name'])}")
    if not _NAME.match(spec.name):
        raise ConfigError(f"--downstream {shown}: name={spec.name!r} must be letters, digits, "
                          "'_', '.', '+' or '-' (it labels the dataset in the results table)")
    return spec


def parse_downstream(spec: str | DownstreamSpec | Mapping[str, Any]) -> DownstreamSpec:
    """Parse and validate one downstream spec.

    Parameters
    ----------
    spec : ``"DATASET[:KEY=VALUE,...]"``, a :class:`DownstreamSpec`, or a mapping with
        ``dataset`` (and optionally ``name``) plus loader parameters.

    Returns
    -------
    DownstreamSpec

    Raises
    ------
    ConfigError
        Malformed spec, unknown dataset (the message lists the registered ones) or unknown
        parameter (the message lists the loader's parameters).
    """
    if isinstance(spec, DownstreamSpec):
        return _check(spec, spec.text)
    if isinstance(spec, Mapping):
        params = dict(spec)
        dataset = params.pop("dataset", None)
        if not isinstance(dataset, str) or not dataset:
            raise ConfigError(f"downstream spec {spec!r} has no 'dataset' key; pass e.g. "
                              "{'dataset': 'digits'} or the string 'digits'")
        name = params.pop("name", "")
        return _check(DownstreamSpec(dataset, params, str(name)), repr(spec))
    if not isinstance(spec, str) or not spec.strip():
        raise ConfigError(f"--downstream expects DATASET[:KEY=VALUE,...], got {spec!r}")
    text = spec.strip()
    dataset, _, rest = text.partition(":")
    params: dict[str, Any] = {}
    name = ""
    for item in filter(None, (s.strip() for s in rest.split(","))):
        if "=" not in item:
            raise ConfigError(f"--downstream {text!r}: {item!r} is not KEY=VALUE; write e.g. "
                              "imagefolder:root=/data/pets,name=pets")
        key, raw = (s.strip() for s in item.split("=", 1))
        if key == "name":
            name = raw
        elif key in params:
            raise ConfigError(f"--downstream {text!r}: parameter {key!r} given twice")
        else:
            params[key] = json_value(raw)
    return _check(DownstreamSpec(dataset.strip(), params, name), repr(text))


def parse_downstreams(specs: Iterable[str | DownstreamSpec | Mapping[str, Any]],
                      reserved: Iterable[str] = ()) -> list[DownstreamSpec]:
    """Parse several specs; their names must be unique and differ from ``reserved`` (the source
    dataset's own tasks), so that rows of different datasets never share a ``task``."""
    if isinstance(specs, (str, Mapping, DownstreamSpec)):
        specs = [specs]
    out = [parse_downstream(s) for s in specs]
    check_spec_names(out, reserved)
    return out


def check_spec_names(specs: Iterable[DownstreamSpec], reserved: Iterable[str] = ()) -> None:
    """Refuse two parsed specs of one name, or a name in ``reserved`` (the source dataset's
    tasks): rows of different datasets must never share a ``task``."""
    taken = set(reserved)
    seen: set[str] = set()
    for s in specs:
        if s.name in seen:
            raise ConfigError(f"--downstream: two datasets are named {s.name!r}; give one a "
                              f"name= (e.g. {s.dataset}:name={s.name}2)")
        if s.name in taken:
            raise ConfigError(f"--downstream: name {s.name!r} is also a task of the source "
                              f"dataset ({', '.join(sorted(taken))}); pass name= to label it "
                              "apart")
        seen.add(s.name)
