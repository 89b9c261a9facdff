"""Architecture registry: adding an architecture is one decorated builder function.

A builder takes ``num_classes`` plus keyword arguments and returns an
``nn.Module`` whose classification head is a ``nn.Linear`` reachable by the
dotted name recorded in :class:`ArchSpec.head`.  The penultimate features are
the input of that head, captured with a forward hook, so the same extraction
code serves every architecture (and checkpoints saved by other code keep
their plain torchvision state-dict keys).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from dtprobe.errors import ConfigError


@dataclass(frozen=True)
class ArchSpec:
    name: str
    builder: Callable[..., nn.Module]
    head: str
    description: str


_ARCHS: dict[str, ArchSpec] = {}


def register_arch(name: str, *, head: str, description: str = ""):
    """Register ``builder(num_classes, **kwargs) -> nn.Module`` as architecture ``name``."""

    def decorator(builder: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        _ARCHS[name] = ArchSpec(name, builder, head, description or (builder.__doc__ or "").strip())
        return builder

    return decorator


def available_archs() -> dict[str, ArchSpec]:
    import dtprobe.models  # noqa: F401  (registers built-ins)

    return dict(sorted(_ARCHS.items()))


def get_arch(name: str) -> ArchSpec:
    archs = available_archs()
    if name.startswith("timm:"):
        if name not in _ARCHS:
            from dtprobe.models.timm_models import timm_arch

            _ARCHS[name] = timm_arch(name)
        return _ARCHS[name]
    if name not in archs:
        raise ConfigError(f"unknown architecture {name!r}; available: {', '.join(archs)} "
                          "(or timm:<model_name> with timm installed)")
    return archs[name]


def build_model(name: str, num_classes: int, **kwargs) -> nn.Module:
    """Build architecture ``name`` with a ``num_classes``-way head."""
    return get_arch(name).builder(num_classes=num_classes, **kwargs)


def head_module(model: nn.Module, arch: str) -> nn.Linear:
    """The classification head of ``model`` (its input is the penultimate feature)."""
    head = model.get_submodule(get_arch(arch).head)
    if not isinstance(head, nn.Linear):
        raise ConfigError(f"head {get_arch(arch).head!r} of {arch} is {type(head).__name__}, "
                          "expected nn.Linear")
    return head
