"""Architecture registry: adding an architecture is one decorated builder function.

A builder takes ``num_classes`` plus keyword arguments and returns an
``nn.Module`` whose classification head is a ``nn.Linear`` reachable by the
dotted name recorded in :class:`ArchSpec.head`.  The penultimate features are
the input of that head, captured with a forward hook, so the same extraction
code serves every architecture (and checkpoints saved by other code keep
their plain torchvision state-dict keys).

Besides registered names, :func:`get_arch` accepts four families built on demand:
``timm:<model_name>`` (timm), ``torchvision:<model_name>`` (``torchvision.models.get_model``),
``hf:<folder>`` (a ``transformers`` classifier from the folder's ``config.json``) and
``package.module:callable`` (the user's own code; the callable receives ``num_classes``
and the ``--arch-param`` keyword arguments it accepts; its head is the last ``nn.Linear``).

An :class:`ArchSpec` may also carry :class:`KeyMap` rename rules (for checkpoints written by
other code whose network is the same but whose parameter names differ, e.g. the CIFAR
ResNet-18 of the CTC reference code) and ``variants``: keyword-argument sets tried when the
architecture is recognised from a checkpoint's keys (:func:`guess_arch`).
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import os
import re
import sys
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn

from dtprobe.errors import ConfigError

#: Head name meaning "the last ``nn.Linear`` of the built model" (user callables, torchvision:).
AUTO_HEAD = "<last Linear>"


@dataclass(frozen=True)
class KeyMap:
    """Regex rename rules from another codebase's parameter names to the registered network's.

    Attributes
    ----------
    name : str
        Where the names come from, e.g. ``"dt-tradeoff resnetv2"``.
    rules : tuple of (pattern, replacement)
        Applied in order with :func:`re.sub` to every key.
    """

    name: str
    rules: tuple[tuple[str, str], ...]

    def apply(self, keys: Mapping[str, Any]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in keys.items():
            new = key
            for pattern, repl in self.rules:
                new = re.sub(pattern, repl, new)
            out[new] = value
        return out


@dataclass(frozen=True)
class ArchSpec:
    name: str
    builder: Callable[..., nn.Module]
    head: str
    description: str
    key_maps: tuple[KeyMap, ...] = ()
    variants: tuple[dict[str, Any], ...] = field(default=({},))
    deprecated: str | None = None


_ARCHS: dict[str, ArchSpec] = {}
#: ``prefix -> (resolver, cache)``: name schemes (``timm:``, ``hf:``) resolved by a back-end
#: module, registered when :mod:`dtprobe.models` imports it (this module imports none of them).
_PREFIX_RESOLVERS: dict[str, tuple[Callable[[str], ArchSpec], bool]] = {}


def register_arch_prefix(prefix: str, resolver: Callable[[str], ArchSpec], *,
                         cache: bool = True) -> None:
    """Resolve every ``--arch`` name starting with ``prefix`` with ``resolver(name)``.

    Parameters
    ----------
    prefix : str
        E.g. ``"timm:"``.
    resolver : callable
        ``resolver(name) -> ArchSpec``; raises :class:`~dtprobe.errors.ConfigError` when the
        name cannot be built (back-end missing, unknown model).
    cache : bool
        Keep the spec for later look-ups of the same name (not for specs read from files that
        may change between runs).
    """
    _PREFIX_RESOLVERS[prefix] = (resolver, cache)


def register_arch(name: str, *, head: str, description: str = "",
                  key_maps: tuple[KeyMap, ...] = (),
                  variants: tuple[dict[str, Any], ...] = ({},)):
    """Register ``builder(num_classes, **kwargs) -> nn.Module`` as architecture ``name``.

    ``key_maps`` rename other codebases' keys to this network's; ``variants`` are the keyword
    arguments tried when recognising the architecture from a checkpoint (:func:`guess_arch`).
    """

    def decorator(builder: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        _ARCHS[name] = ArchSpec(name, builder, head, description or (builder.__doc__ or "").strip(),
                                tuple(key_maps), tuple(variants))
        return builder

    return decorator


def register_alias(old: str, new: str, reason: str) -> None:
    """Keep ``old`` working as a deprecated name of ``new`` (a warning says ``reason``)."""
    spec = _ARCHS[new]
    _ARCHS[old] = replace(spec, name=old, variants=(), deprecated=(
        f"architecture name {old!r} is deprecated: {reason}; use {new!r}"),
        description=f"deprecated alias of {new}")


def available_archs() -> dict[str, ArchSpec]:
    import dtprobe.models  # noqa: F401  (registers built-ins)

    return dict(sorted(_ARCHS.items()))


def _accepts(func: Callable[..., Any], name: str) -> bool:
    try:
        params = inspect.signature(func).parameters.values()
    except (TypeError, ValueError):
        return True
    return any(p.name == name or p.kind is p.VAR_KEYWORD for p in params)


def _user_callable(name: str) -> ArchSpec:
    """``package.module:callable`` from the user's code (the current directory is importable)."""
    module_name, _, attr = name.partition(":")
    if not module_name or not attr or not re.fullmatch(r"[\w.]+", module_name + attr):
        raise ConfigError(f"--arch {name!r}: write package.module:callable")
    cwd = os.getcwd()
    added = cwd not in sys.path
    if added:
        sys.path.insert(0, cwd)
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"--arch {name!r}: cannot import {module_name!r} ({exc}); run from the "
                          "folder that holds it or add it to PYTHONPATH") from None
    finally:
        if added:
            with contextlib.suppress(ValueError):
                sys.path.remove(cwd)
    target: Any = module
    for part in attr.split("."):
        target = getattr(target, part, None)
    if not callable(target):
        raise ConfigError(f"--arch {name!r}: {module_name} has no callable {attr!r}")

    def builder(num_classes: int, **kwargs: Any) -> nn.Module:
        kwargs = {k: v for k, v in kwargs.items() if k != "in_channels" or _accepts(target, k)}
        if _accepts(target, "num_classes"):
            kwargs["num_classes"] = num_classes
        return target(**kwargs)

    return ArchSpec(name, builder, AUTO_HEAD, f"{attr} from {module_name}")


def _torchvision_arch(name: str) -> ArchSpec:
    import torchvision

    model_name = name.split(":", 1)[1]
    if model_name not in torchvision.models.list_models():
        raise ConfigError(f"torchvision has no model {model_name!r} "
                          "(see torchvision.models.list_models())")

    def builder(num_classes: int, in_channels: int = 3, **kwargs: Any) -> nn.Module:
        if in_channels != 3:
            raise ConfigError(f"{name}: only 3-channel input is supported")
        return torchvision.models.get_model(model_name, weights=None, num_classes=num_classes,
                                            **kwargs)

    return ArchSpec(name, builder, AUTO_HEAD, f"torchvision model {model_name}")


def get_arch(name: str) -> ArchSpec:
    """The :class:`ArchSpec` of ``name`` (a registered name, ``timm:``/``torchvision:`` names,
    or ``package.module:callable``); a deprecated alias warns once per call."""
    archs = available_archs()
    if name in archs:
        spec = archs[name]
        if spec.deprecated:
            warnings.warn(spec.deprecated, FutureWarning, stacklevel=2)
        return spec
    for prefix, (resolver, cache) in _PREFIX_RESOLVERS.items():
        if name.startswith(prefix):
            spec = resolver(name)
            if cache:
                _ARCHS[name] = spec
            return spec
    if name.startswith("torchvision:"):
        _ARCHS[name] = _torchvision_arch(name)
        return _ARCHS[name]
    if ":" in name:
        return _user_callable(name)  # not cached: the user's code may change between runs
    raise ConfigError(f"unknown architecture {name!r}; available: {', '.join(archs)} "
                      "(or timm:<model_name>, torchvision:<model_name>, "
                      "package.module:callable)")


def build_model(name: str, num_classes: int, **kwargs) -> nn.Module:
    """Build architecture ``name`` with a ``num_classes``-way head."""
    return get_arch(name).builder(num_classes=num_classes, **kwargs)


def head_name(model: nn.Module, arch: str) -> str:
    """Dotted name of the classification head of ``model`` built as ``arch``."""
    head = get_arch(arch).head
    if head != AUTO_HEAD:
        return head
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ConfigError(f"{arch}: the model has no nn.Linear head; its penultimate layer "
                          "cannot be found")
    return linears[-1]


def head_module(model: nn.Module, arch: str) -> nn.Linear:
    """The classification head of ``model`` (its input is the penultimate feature)."""
    name = head_name(model, arch)
    head = model.get_submodule(name)
    if not isinstance(head, nn.Linear):
        raise ConfigError(f"head {name!r} of {arch} is {type(head).__name__}, "
                          "expected nn.Linear")
    return head


@dataclass(frozen=True)
class ArchGuess:
    """An architecture whose parameter names and shapes match a checkpoint exactly."""

    arch: str
    kwargs: dict[str, Any]
    num_classes: int
    key_map: str | None = None


def _signature(model: nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()
            if not k.endswith("num_batches_tracked")}


def guess_arch(state: Mapping[str, torch.Tensor], in_channels: int = 3) -> list[ArchGuess]:
    """Registered architectures (and their ``variants``) whose keys and shapes fit ``state``.

    Each candidate is built on the ``meta`` device (no memory, no initialisation cost) with a
    2-way head; it fits when the key sets agree (``num_batches_tracked`` aside, after one of its
    :class:`KeyMap` renames or none) and every shape agrees except the head's output size,
    which gives ``num_classes``.

    Returns
    -------
    list of ArchGuess
        Every fitting candidate, in registry order (empty when none fits).
    """
    shapes = {k: tuple(v.shape) for k, v in state.items()
              if not k.endswith("num_batches_tracked")}
    found: list[ArchGuess] = []
    for spec in available_archs().values():
        if spec.deprecated or spec.head == AUTO_HEAD:
            continue
        maps: list[KeyMap | None] = [None, *spec.key_maps]
        for kwargs in spec.variants:
            try:
                with torch.device("meta"), warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    model = spec.builder(num_classes=2, in_channels=in_channels, **kwargs)
            except Exception:  # noqa: BLE001 - a variant that cannot be built is no guess
                continue
            want = _signature(model)
            weight = f"{spec.head}.weight"
            for key_map in maps:
                have = key_map.apply(shapes) if key_map else shapes
                if key_map is not None and set(have) == set(shapes):
                    continue  # the rename does not apply: the plain guess covers it
                if set(have) != set(want) or weight not in have:
                    continue
                classes = have[weight][0]
                if all(have[k] == v or (k.startswith(spec.head + ".") and v[1:] == have[k][1:])
                       for k, v in want.items()):
                    found.append(ArchGuess(spec.name, dict(kwargs), int(classes),
                                           key_map.name if key_map else None))
    return found
