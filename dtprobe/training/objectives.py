"""Training objectives. The trainer is objective-agnostic: CE and CTC differ only here.

An objective is an ``nn.Module`` that maps one batch (images, penultimate features, logits,
labels, dataset indices) to a total loss and a dict of named loss terms for logging. Its
``state_dict`` holds everything needed to resume (memory banks, projectors, snapshots).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


class Objective(nn.Module):
    """Base class: plain cross-entropy on the source labels."""

    name = "ce"

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Extra parameters the optimiser must train (e.g. projection heads)."""
        return [p for p in self.parameters() if p.requires_grad]

    def start_epoch(self, epoch: int, model: nn.Module) -> None:
        """Hook called before each (1-based) epoch; CTC takes its temporal snapshot here."""

    def config(self) -> dict[str, Any]:
        """Hyperparameters, recorded in the run manifest."""
        return {"objective": self.name}

    def forward(self, *, images: torch.Tensor, features: torch.Tensor, logits: torch.Tensor,
                labels: torch.Tensor, indices: torch.Tensor,
                epoch: int) -> tuple[torch.Tensor, dict[str, float]]:
        ce = F.cross_entropy(logits.float(), labels)
        return ce, {"ce": float(ce.detach())}


class CrossEntropyObjective(Objective):
    """Cross-entropy on the source labels (the baseline CTC is compared with)."""
