"""t-ReX and t-ReX* (Sariyildiz et al. 2023): supervised training through an expendable projector.

The projector ``g`` maps the penultimate features ``h`` to the space where the classification
loss is computed: ``g(h) = Linear_256,nobias([Linear_d, BatchNorm, GELU] x L (L2norm(h)))``;
it is thrown away after training. The analysed features are ``h``, taken *before* the projector
(recorded in the manifest as ``analysed_features``), which is what makes the projector
"expendable": the source-task pressure is absorbed by ``g`` and ``h`` keeps more transferable
information.

* ``trex``: CE of a cosine classifier on the projector output,
  ``logits_k = cos(g(h), w_k) / tau``, with learned class weights ``w_k``.
* ``trex_star``: the class weights are replaced by *prototypes* computed on the fly from a
  memory bank of the latest ``bank_size`` projector outputs with their labels (a FIFO queue);
  ``c_k = mean of the bank entries of class k and of the batch's own embeddings of class k``;
  the batch's embeddings carry the gradient, the bank is detached. A class with no entry yet
  scores 0.
* Multi-crop (optional, ``local_crops=N``): ``N`` extra random-resized crops of scale
  ``(0.05, 0.4)`` at half the image side pass through the network and the projector and add
  their CE, averaged with the global view's (t-ReX's multi-crop, scaled to small images).

The model's own head ``fc`` is not part of the objective: it is fitted on the detached features
``h`` (term ``probe_ce``, no gradient reaches the encoder), so every checkpoint's source accuracy
is that of a linear classifier of the analysed features.

Defaults (hidden width 2048, ``L = 1``, output 256, ``tau = 0.1``, bank 8192) follow the paper's
description of the projector (and DESIGN.md); ``tau`` and the bank size are dtprobe's defaults
where the paper's values could not be checked here. The paper's projector input is ``h`` after
global pooling of a ResNet-50; here it is whatever the architecture's head receives. Under DDP the
projector's BatchNorm keeps per-rank running statistics (unused: the projector is expendable) and
the bank is filled with the embeddings all-gathered from every rank.

References
----------
.. [1] M. B. Sariyildiz, Y. Kalantidis, K. Alahari, D. Larlus, "No Reason for No Supervision:
   Improved Generalization in Supervised Models", ICLR 2023.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dtprobe.errors import ConfigError
from dtprobe.training.augment import random_resized_crop
from dtprobe.training.objectives.base import (
    Objective,
    ObjectiveContext,
    check_positive,
    safe_normalize,
)
from dtprobe.training.objectives.memory_bank import all_gather_rows
from dtprobe.training.objectives.registry import register_objective

PAPER = "Sariyildiz et al. 2023"


class Projector(nn.Module):
    """``L2norm -> [Linear(hidden), BatchNorm1d, GELU] x layers -> Linear(out_dim, bias=False)``."""

    def __init__(self, in_dim: int, hidden: int = 2048, layers: int = 1, out_dim: int = 256):
        super().__init__()
        blocks: list[nn.Module] = []
        d = in_dim
        for _ in range(layers):
            blocks += [nn.Linear(d, hidden), nn.BatchNorm1d(hidden), nn.GELU()]
            d = hidden
        self.mlp = nn.Sequential(*blocks)
        self.out = nn.Linear(d, out_dim, bias=False)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.out(self.mlp(safe_normalize(h)))


def prototype_logits(z: torch.Tensor, labels: torch.Tensor, bank: torch.Tensor,
                     bank_labels: torch.Tensor, num_classes: int, tau: float) -> torch.Tensor:
    """``cos(z_i, c_k) / tau`` with ``c_k`` the mean of the bank rows (labels ``>= 0``) and batch
    rows of class ``k``; classes with no row give 0. Gradient flows through ``z`` (twice: as
    query and through its own class's prototype)."""
    valid = bank_labels >= 0
    rows = torch.cat([bank[valid].detach(), z])
    ys = torch.cat([bank_labels[valid], labels])
    sums = torch.zeros(num_classes, z.shape[1], dtype=z.dtype, device=z.device)
    sums = sums.index_add(0, ys, rows)
    counts = torch.bincount(ys, minlength=num_classes).clamp(min=1).to(z.dtype)
    protos = sums / counts[:, None]
    return safe_normalize(z) @ safe_normalize(protos).T / tau


class TReX(Objective):
    """t-ReX / t-ReX*; see the module docstring."""

    analysed_features = "penultimate, BEFORE the t-ReX projector (the projector is discarded)"

    def __init__(self, ctx: ObjectiveContext, *, prototypes: bool, hidden: int, layers: int,
                 out_dim: int, tau: float, bank_size: int, local_crops: int):
        super().__init__()
        object.__setattr__(self, "_head", ctx.head)
        self.prototypes = prototypes
        self.num_classes = ctx.num_classes
        self.tau = float(tau)
        self.local_crops = int(local_crops)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(ctx.seed + 104729)
            self.projector = Projector(ctx.feature_dim, hidden, layers, out_dim)
            if not prototypes:
                self.classifier = nn.Parameter(torch.randn(ctx.num_classes, out_dim) * 0.01)
        if prototypes:
            self.register_buffer("bank", torch.zeros(bank_size, out_dim))
            self.register_buffer("bank_labels", torch.full((bank_size,), -1, dtype=torch.long))
            self.register_buffer("bank_ptr", torch.zeros((), dtype=torch.long))
        self.views = 1 + self.local_crops
        self.hparams = {"hidden": hidden, "layers": layers, "out_dim": out_dim, "tau": tau,
                        "classifier": "prototypes from a memory bank" if prototypes
                        else "cosine classifier on the projector output",
                        "bank_size": bank_size if prototypes else None,
                        "local_crops": local_crops,
                        "local_crop": {"scale": (0.05, 0.4), "size": "image_side // 2"}
                        if local_crops else None,
                        "analysed_features": self.analysed_features,
                        "model_head": "linear classifier on detached features, trained online"}

    def extra_views(self, images: torch.Tensor, generator: torch.Generator) -> list[torch.Tensor]:
        size = max(8, images.shape[-1] // 2)
        return [random_resized_crop(images, generator, (0.05, 0.4), (3 / 4, 4 / 3), size=size)
                for _ in range(self.local_crops)]

    def _logits(self, z: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if self.prototypes:
            return prototype_logits(z, labels, self.bank, self.bank_labels, self.num_classes,
                                    self.tau)
        return safe_normalize(z) @ safe_normalize(self.classifier).T / self.tau

    @torch.no_grad()
    def _enqueue(self, z: torch.Tensor, labels: torch.Tensor) -> None:
        z, labels = all_gather_rows(z.detach()), all_gather_rows(labels)
        n = len(self.bank)
        z, labels = z[-n:], labels[-n:]
        idx = (self.bank_ptr + torch.arange(len(z), device=z.device)) % n
        self.bank[idx] = z.to(self.bank.dtype)
        self.bank_labels[idx] = labels
        self.bank_ptr.copy_((self.bank_ptr + len(z)) % n)

    def forward(self, *, features, labels, **views):
        z = self.projector(features)
        ce = F.cross_entropy(self._logits(z, labels).float(), labels)
        crops = [views[k] for k in sorted(views) if k.startswith("features") and k != "features"]
        for h in crops:
            ce = ce + F.cross_entropy(self._logits(self.projector(h), labels).float(), labels)
        ce = ce / (1 + len(crops))
        probe = F.cross_entropy(self._head(features.detach()).float(), labels)
        if self.prototypes and self.training:
            self._enqueue(z, labels)
        return ce + probe, {"projector_ce": float(ce.detach()), "probe_ce": float(probe.detach())}


def _make(ctx: ObjectiveContext, name: str, prototypes: bool, hidden: int, layers: int,
          out_dim: int, tau: float, bank_size: int, local_crops: int) -> Objective:
    check_positive(name, tau=tau)
    for key, value, low in (("hidden", hidden, 1), ("layers", layers, 0),
                            ("out_dim", out_dim, 1), ("bank_size", bank_size, 1),
                            ("local_crops", local_crops, 0)):
        if int(value) != value or value < low:
            raise ConfigError(f"--objective-param {key}={value!r} for {name} must be an integer "
                              f">= {low}")
    return TReX(ctx, prototypes=prototypes, hidden=int(hidden), layers=int(layers),
                out_dim=int(out_dim), tau=tau, bank_size=int(bank_size),
                local_crops=int(local_crops))


@register_objective("trex", paper=PAPER)
def _trex(ctx: ObjectiveContext, hidden: int = 2048, layers: int = 1, out_dim: int = 256,
          tau: float = 0.1, local_crops: int = 0) -> Objective:
    """CE through an expendable projector (features analysed before it)"""
    return _make(ctx, "trex", False, hidden, layers, out_dim, tau, 1, local_crops)


@register_objective("trex_star", paper=PAPER)
def _trex_star(ctx: ObjectiveContext, hidden: int = 2048, layers: int = 1, out_dim: int = 256,
               tau: float = 0.1, bank_size: int = 8192, local_crops: int = 0) -> Objective:
    """t-ReX*: projector + class prototypes from a memory bank"""
    return _make(ctx, "trex_star", True, hidden, layers, out_dim, tau, bank_size, local_crops)
