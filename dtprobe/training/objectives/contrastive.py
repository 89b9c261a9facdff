"""Supervised and self-supervised contrastive objectives, as compared by Islam et al. (2021).

* ``supcon``: SupCon (Khosla et al. 2020, the ``L_out`` form) on two views; the encoder is
  trained by SupCon alone and a linear classifier is fitted on the *frozen* (detached) features,
  which is Islam et al.'s protocol for SupCon. dtprobe fits that classifier online, during the
  run, on ``h.detach()`` (term ``probe_ce``), so every checkpoint carries a classifier of its
  own frozen features; no gradient of it reaches the encoder.
* ``ce_simclr``: ``CE + weight * NT-Xent`` (Chen et al. 2020) on two views.
* ``supcon_simclr``: ``SupCon + weight * NT-Xent`` on two views, classifier as for ``supcon``.

For each image, view 1 is exactly the source-task view every other objective sees (same data
order and augmentation); view 2 is drawn with its own generator from
:data:`dtprobe.training.augment.CONTRASTIVE_VIEW` (recorded in the manifest). Embeddings
``e = L2norm(g(h))`` with SimCLR's projection head ``g`` (Linear, ReLU, Linear to 128);
SupCon and NT-Xent have separate heads in the joint objectives. The CE of ``ce_simclr`` is
computed on view 1 only, so its CE term equals what the CE run optimises.

Definitions, over the ``2B`` embeddings of a batch (anchor ``i``, ``A(i)`` = all others):
``NT-Xent_i = -log exp(e_i.e_j(i)/tau) / sum_{a in A(i)} exp(e_i.e_a/tau)`` with ``j(i)`` the
other view of the same image; ``SupCon_i = -1/|P(i)| sum_{p in P(i)} log exp(e_i.e_p/tau) /
sum_{a in A(i)} exp(e_i.e_a/tau)`` with ``P(i)`` the others of the same label. Both are means
over anchors. With two views ``P(i)`` is never empty; a batch holding one class only has no
negatives and its SupCon value is the documented ``log(2B - 1)`` minimum pull (finite, logged,
no NaN). Distributed runs contrast within each rank's shard (no all-gather), as SimCLR's
per-device batches do.

Hyperparameters: ``tau = 0.1`` (Khosla et al.; Islam et al. use SimCLR's ImageNet value),
joint weight ``1.0``, projection 128-d.

References
----------
.. [1] A. Islam, C.-F. Chen, R. Panda, L. Karlinsky, R. Radke, R. Feris, "A Broad Study on the
   Transferability of Visual Representations with Contrastive Learning", ICCV 2021.
.. [2] P. Khosla et al., "Supervised Contrastive Learning", NeurIPS 2020.
.. [3] T. Chen, S. Kornblith, M. Norouzi, G. Hinton, "A Simple Framework for Contrastive
   Learning of Visual Representations", ICML 2020.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dtprobe.errors import ConfigError
from dtprobe.training.augment import CONTRASTIVE_VIEW
from dtprobe.training.objectives.base import (
    Objective,
    ObjectiveContext,
    check_positive,
)
from dtprobe.training.objectives.registry import register_objective

PAPER = "Islam et al. 2021"
MIN_TAU = 1e-3  # below this exp(1/tau) overflows float32 for cosine 1 (e^1000)


def _pairwise_logits(e: torch.Tensor, tau: float) -> torch.Tensor:
    sim = e @ e.T / tau
    eye = torch.eye(len(e), dtype=torch.bool, device=e.device)
    return sim.masked_fill(eye, float("-inf"))  # A(i) excludes i


def nt_xent_loss(e1: torch.Tensor, e2: torch.Tensor, tau: float) -> torch.Tensor:
    """SimCLR's NT-Xent over ``[e1; e2]`` (rows L2-normalised), mean over the ``2B`` anchors."""
    e = torch.cat([e1, e2])
    b = len(e1)
    target = torch.cat([torch.arange(b, 2 * b), torch.arange(0, b)]).to(e.device)
    return F.cross_entropy(_pairwise_logits(e, tau), target)


def supcon_loss(e1: torch.Tensor, e2: torch.Tensor, labels: torch.Tensor,
                tau: float) -> torch.Tensor:
    """Khosla et al.'s ``L_out`` over ``[e1; e2]`` (rows L2-normalised), mean over anchors."""
    e = torch.cat([e1, e2])
    y = torch.cat([labels, labels])
    logits = _pairwise_logits(e, tau)
    logp = logits - torch.logsumexp(logits, dim=1, keepdim=True)
    pos = (y[:, None] == y[None, :]) & ~torch.eye(len(e), dtype=torch.bool, device=e.device)
    # -inf on the diagonal never meets pos (diagonal excluded), so the where keeps it finite.
    per_anchor = -torch.where(pos, logp, torch.zeros_like(logp)).sum(1) / pos.sum(1)
    return per_anchor.mean()


def projection_head(feature_dim: int, out_dim: int = 128) -> nn.Sequential:
    """SimCLR's projection head: Linear, ReLU, Linear (hidden width = feature_dim)."""
    return nn.Sequential(nn.Linear(feature_dim, feature_dim), nn.ReLU(inplace=True),
                         nn.Linear(feature_dim, out_dim))


class TwoViewContrastive(Objective):
    """CE or SupCon (``supervised``) plus optionally NT-Xent, on two views; see the module."""

    views = 2

    def __init__(self, ctx: ObjectiveContext, *, base: str, simclr_weight: float, tau: float,
                 proj_dim: int):
        super().__init__()
        object.__setattr__(self, "_head", ctx.head)
        self.base = base
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(ctx.seed + 7919)
            if base == "supcon":
                self.supcon_head = projection_head(ctx.feature_dim, proj_dim)
            if simclr_weight > 0:
                self.simclr_head = projection_head(ctx.feature_dim, proj_dim)
        self.simclr_weight = float(simclr_weight)
        self.tau = float(tau)
        self.hparams = {"tau": tau, "simclr_weight": simclr_weight, "proj_dim": proj_dim,
                        "views": 2, "view2_augmentation": dict(CONTRASTIVE_VIEW),
                        "classifier": ("linear head on detached features, trained online"
                                       if base == "supcon" else "the model's head, by CE")}

    def forward(self, *, features, logits, labels, features2, **_):
        terms: dict[str, float] = {}
        if self.base == "ce":
            loss = F.cross_entropy(logits, labels)
            terms["ce"] = float(loss.detach())
        else:
            e1 = F.normalize(self.supcon_head(features), dim=1)
            e2 = F.normalize(self.supcon_head(features2), dim=1)
            sup = supcon_loss(e1, e2, labels, self.tau)
            probe = F.cross_entropy(self._head(features.detach()).float(), labels)
            loss = sup + probe
            terms.update(supcon=float(sup.detach()), probe_ce=float(probe.detach()))
        if self.simclr_weight > 0:
            z1 = F.normalize(self.simclr_head(features), dim=1)
            z2 = F.normalize(self.simclr_head(features2), dim=1)
            ssl = nt_xent_loss(z1, z2, self.tau)
            loss = loss + self.simclr_weight * ssl
            terms["simclr"] = float(ssl.detach())
        return loss, terms


def _check(name: str, tau: float, proj_dim: int) -> None:
    check_positive(name, tau=tau)
    if tau < MIN_TAU:
        raise ConfigError(f"--objective-param tau={tau} for {name} is below {MIN_TAU}: "
                          "exp(cos/tau) overflows float32; use tau >= 0.001")
    if int(proj_dim) != proj_dim or proj_dim < 1:
        raise ConfigError(f"--objective-param proj_dim={proj_dim} for {name} must be an "
                          "integer >= 1")


@register_objective("supcon", paper=f"Khosla et al. 2020; {PAPER}")
def _supcon(ctx: ObjectiveContext, tau: float = 0.1, proj_dim: int = 128) -> Objective:
    """SupCon on two views; linear classifier on the frozen features"""
    _check("supcon", tau, proj_dim)
    return TwoViewContrastive(ctx, base="supcon", simclr_weight=0.0, tau=tau,
                              proj_dim=int(proj_dim))


@register_objective("ce_simclr", paper=f"Chen et al. 2020; {PAPER}")
def _ce_simclr(ctx: ObjectiveContext, weight: float = 1.0, tau: float = 0.1,
               proj_dim: int = 128) -> Objective:
    """CE + weight * SimCLR NT-Xent on two views"""
    _check("ce_simclr", tau, proj_dim)
    check_positive("ce_simclr", weight=weight)
    return TwoViewContrastive(ctx, base="ce", simclr_weight=weight, tau=tau,
                              proj_dim=int(proj_dim))


@register_objective("supcon_simclr", paper=PAPER)
def _supcon_simclr(ctx: ObjectiveContext, weight: float = 1.0, tau: float = 0.1,
                   proj_dim: int = 128) -> Objective:
    """SupCon + weight * SimCLR NT-Xent on two views; linear classifier on frozen features"""
    _check("supcon_simclr", tau, proj_dim)
    check_positive("supcon_simclr", weight=weight)
    return TwoViewContrastive(ctx, base="supcon", simclr_weight=weight, tau=tau,
                              proj_dim=int(proj_dim))
