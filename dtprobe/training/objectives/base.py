"""The objective base class, its build context, and the parameter checks families share.

A leaf of :mod:`dtprobe.training.objectives`: it imports neither the registry nor a family
(the package docstring says how an objective is added).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from dtprobe.errors import ConfigError
from dtprobe.runtime.distributed import is_distributed


class Objective(nn.Module):
    """Base class: plain softmax cross-entropy on the source labels.

    Class attributes
    ----------------
    name : registry name (recorded in the manifest).
    views : number of augmented views of each image the objective needs (1 or 2); a second view
        is drawn with its own generator, so view 1 stays identical to what CE sees.
    analysed_features : what the analysis reads, recorded in the manifest.
    """

    name = "ce"
    views = 1
    analysed_features = "penultimate (input of the classification head)"

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Extra parameters the optimiser must train (e.g. projection heads)."""
        return [p for p in self.parameters() if p.requires_grad]

    def start_epoch(self, epoch: int, model: nn.Module) -> None:
        """Hook called before each (1-based) epoch; CTC takes its temporal snapshot here."""

    def config(self) -> dict[str, Any]:
        """Hyperparameters, recorded in the run manifest."""
        return {"objective": self.name, **getattr(self, "hparams", {})}

    def uninformative_losses(self, batch_size: int, num_classes: int) -> dict[str, float]:
        """The value each logged term takes on a batch of ``batch_size`` when the model's outputs
        carry no information about the input (uniform logits, every embedding equal).

        The trainer warns when a term stays at this value (``trainer.stuck_terms``): the loss is
        finite, so no divergence fires, and the model learns nothing. Terms absent here are
        not watched; cross-entropy terms assume balanced classes (``ln K``). Here: the model
        head's CE (``ce``) and the online linear head's (``probe_ce``); an objective with its
        own terms adds them to this.
        """
        return {"ce": math.log(num_classes), "probe_ce": math.log(num_classes)}

    def eval_logits(self, features: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """Scores used for the source accuracy (default: the head's logits)."""
        return logits

    def export_model_state(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The model state written to an analysis checkpoint (default: unchanged). An objective
        whose predictions are not the head's plain logits (cosine softmax) rewrites the head
        here so that ``model(x).argmax(1)`` gives its predictions."""
        return state

    def all_reduce_gradients(self) -> None:
        """Average the objective's own parameters' gradients over ranks (they live outside DDP)."""
        if not is_distributed():  # the one "am I distributed" test (runtime.distributed)
            return
        world = dist.get_world_size()
        for p in self.trainable_parameters():
            if p.grad is not None:
                dist.all_reduce(p.grad)
                p.grad.div_(world)

    def forward(self, *, images: torch.Tensor, features: torch.Tensor, logits: torch.Tensor,
                labels: torch.Tensor, indices: torch.Tensor, epoch: int,
                **views: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        ce = F.cross_entropy(logits.float(), labels)
        return ce, {"ce": float(ce.detach())}


@dataclass
class ObjectiveContext:
    """What a factory may use to build its objective.

    Attributes
    ----------
    model : the (unwrapped) network, already on ``device``.
    head : its classification head (``nn.Linear``; input = penultimate features).
    feature_dim, num_classes, num_samples : shapes of the problem.
    train_labels : ``(N,)`` labels of the training split in index order.
    device : where training runs.
    seed : the run's seed.
    epochs : number of training epochs.
    feature_fn : ``feature_fn(model, images) -> features`` (penultimate), for snapshots.
    refresh_batches : un-augmented ``(images, indices)`` batches over the training set.
    head_name : dotted name of ``head`` in ``model`` (state-dict prefix).
    """

    model: nn.Module
    head: nn.Linear
    feature_dim: int
    num_classes: int
    num_samples: int
    train_labels: torch.Tensor
    device: torch.device
    seed: int = 0
    epochs: int = 1
    feature_fn: Callable[[nn.Module, torch.Tensor], torch.Tensor] | None = None
    refresh_batches: Callable[[], Iterable[tuple[torch.Tensor, torch.Tensor]]] | None = None
    head_name: str = "fc"


def check_positive(objective: str, **values: float) -> None:
    """One-line :class:`ConfigError` for a non-positive or non-finite hyperparameter."""
    for key, value in values.items():
        if not (isinstance(value, (int, float)) and value == value and 0 < value < float("inf")):
            raise ConfigError(f"--objective-param {key}={value!r} for {objective} must be a "
                              "positive finite number")


def check_range(objective: str, key: str, value: float, lo: float, hi: float,
                *, hi_open: bool = False) -> None:
    ok = isinstance(value, (int, float)) and lo <= value
    ok = ok and (value < hi if hi_open else value <= hi)
    if not ok:
        bracket = ")" if hi_open else "]"
        raise ConfigError(f"--objective-param {key}={value!r} for {objective} must lie in "
                          f"[{lo}, {hi}{bracket}")


def safe_normalize(x: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Rows of ``x`` divided by their L2 norm; rows with norm <= ``eps`` become exactly 0 with a
    zero gradient (``F.normalize`` would return 0 with a gradient of order ``1/eps``, which
    turns weights into inf/NaN one step later)."""
    norm = x.norm(dim=-1, keepdim=True)
    ok = norm > eps
    return torch.where(ok, x / torch.where(ok, norm, torch.ones_like(norm)), torch.zeros_like(x))
