"""Capture the penultimate features (the input of the classification head) during a forward pass."""

from __future__ import annotations

import torch
from torch import nn


class PenultimateTap:
    """Forward pre-hook on ``head`` that keeps the head's input from the latest forward pass.

    One forward of the model then yields both the logits (its output) and the penultimate
    features (``tap.features``), for any architecture whose head is a module.

    Examples
    --------
    >>> tap = PenultimateTap(model.fc)
    >>> logits = model(x); feats = tap.features
    >>> tap.remove()
    """

    def __init__(self, head: nn.Module):
        self.features: torch.Tensor | None = None
        self._handle = head.register_forward_pre_hook(self._hook)

    def _hook(self, module: nn.Module, args: tuple) -> None:
        self.features = args[0].flatten(1)

    def remove(self) -> None:
        self._handle.remove()


def penultimate_features(model: nn.Module, head: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Run ``model`` on ``images`` and return the input of ``head`` (e.g. for a frozen snapshot)."""
    tap = PenultimateTap(head)
    try:
        model(images)
        assert tap.features is not None, "the head module was not called in forward()"
        return tap.features
    finally:
        tap.remove()
