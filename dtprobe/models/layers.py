"""Which intermediate layers to analyse: the block outputs of an architecture.

``block_layers(model, head)`` is the rule behind ``dtprobe analyze --layers auto``. It takes the
module tree level where the network's blocks sit: the parameterised *containers* (modules with
children, e.g. a ResNet's ``layer1``..``layer4`` or a CNN's conv blocks) among the top-level
children; when fewer than three exist and one of them holds most of the parameters (a
``features`` trunk, a ViT's ``blocks``), the rule descends into it. The head, and any module whose
output *is* the penultimate feature (already analysed as layer ``""``), are left out. Spatial
outputs are global-average pooled by the extraction engine.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

__all__ = ["block_layers", "describe_layers"]


def _params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def _containers(parent: nn.Module, prefix: str, skip: set[str]) -> list[tuple[str, nn.Module]]:
    out = []
    for name, child in parent.named_children():
        full = f"{prefix}{name}"
        if full in skip or _params(child) == 0:
            continue
        if any(True for _ in child.children()):
            out.append((full, child))
    return out


def block_layers(model: nn.Module, head: str, penultimate_source: str | None = None
                 ) -> list[str]:
    """Dotted names of the block outputs of ``model`` (see the module docstring).

    ``penultimate_source`` names a module whose output is the penultimate feature, to leave out.
    """
    skip = {head}
    level = _containers(model, "", skip)
    outer: list[tuple[str, nn.Module]] = []
    total = max(_params(model), 1)
    while 0 < len(level) < 3:
        dominant = max(level, key=lambda item: _params(item[1]))
        inner = _containers(dominant[1], dominant[0] + ".", skip)
        if _params(dominant[1]) <= total / 2 or len(inner) < 2:
            break
        outer += [item for item in level if item[0] != dominant[0]]
        level = inner
    names = [n for n, _ in level] + [n for n, _ in outer]
    return [n for n in names if n != penultimate_source]


def describe_layers(model: nn.Module, head: nn.Module, images: torch.Tensor
                    ) -> list[tuple[str, tuple[int, ...], bool]]:
    """(name, output shape of one image, output is the penultimate feature) for every named
    module, from one forward pass of ``images`` (a couple suffice)."""
    shapes: dict[str, tuple[int, ...]] = {}
    outputs: dict[str, torch.Tensor] = {}
    seen: dict[str, torch.Tensor] = {}
    hooks = []

    def hook_for(name: str):
        def hook(_module, _inputs, output):
            if isinstance(output, torch.Tensor):
                shapes[name] = tuple(output.shape[1:])
                outputs[name] = output.detach()
        return hook

    def head_hook(_module, inputs, _output):
        seen["penultimate"] = inputs[0].detach()

    for name, module in model.named_modules():
        if name:
            hooks.append(module.register_forward_hook(hook_for(name)))
    hooks.append(head.register_forward_hook(head_hook))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(images)
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    pen = seen.get("penultimate")
    out = []
    for name, _ in model.named_modules():
        if name in shapes:
            same = (pen is not None and outputs[name].shape == pen.shape
                    and bool(torch.equal(outputs[name], pen)))
            out.append((name, shapes[name], same))
    return out


def penultimate_source(described: Sequence[tuple[str, tuple[int, ...], bool]]) -> str | None:
    """The outermost module whose output is the penultimate feature, if any."""
    hits = [name for name, _, same in described if same]
    return min(hits, key=lambda n: n.count(".")) if hits else None
