"""Supervised and self-supervised contrastive objectives, as compared by Islam et al. (2021).

Two families. ``islam_supcon``, ``islam_ce_ssl`` and ``islam_supcon_ssl`` (:class:`IslamMoCo`) are
the objectives as Islam et al.'s released code (asrafulashiq/transfer_broad, ``system/``) computes
them: MoCo-style, with a momentum key encoder (0.999), a queue of 64,000 keys (on ImageNet: 5 % of
its training set; dtprobe's default ``queue_size=auto`` keeps that fraction of a smaller training
set, :func:`islam_queue_default`), temperature 0.07, Linear-ReLU-Linear projections to 128-d, and
the self-supervised term weighted 0.5. ``supcon``, ``ce_simclr`` and ``supcon_simclr`` (below) are
the in-batch definitions of Khosla et al. and SimCLR, which the paper's text names but its code
does not use; ``supcon`` equals the reference ``SupConLoss`` of HobbitLong/SupContrast (Khosla et
al.'s PyTorch code) when its ``base_temperature`` equals the temperature (with their default
``base_temperature = 0.07`` their loss is dtprobe's times ``tau / 0.07``).

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
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn

from dtprobe.errors import ConfigError
from dtprobe.references import with_references
from dtprobe.runtime.distributed import all_gather_rows
from dtprobe.training.augment import CONTRASTIVE_VIEW
from dtprobe.training.objectives.base import (
    Objective,
    ObjectiveContext,
    check_positive,
)
from dtprobe.training.objectives.registry import register_objective

__doc__ = with_references(__doc__, "islam2021", "khosla2020", "chen2020")

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

    def uninformative_losses(self, batch_size: int, num_classes: int) -> dict[str, float]:
        """ln(2B - 1) for SupCon and NT-Xent (each of the 2B anchors against the 2B - 1 other
        views, all at one similarity when every embedding is equal), ln K for the CE terms."""
        in_batch = math.log(max(1, 2 * batch_size - 1))
        return {**super().uninformative_losses(batch_size, num_classes),
                "supcon": in_batch, "simclr": in_batch}

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


def _two_view(name: str, ctx: ObjectiveContext, base: str, tau: float, proj_dim: int,
              weight: float | None = None) -> TwoViewContrastive:
    """The checked two-view objective ``name``; ``weight=None``: no SimCLR term."""
    _check(name, tau, proj_dim)
    if weight is not None:
        check_positive(name, weight=weight)
    return TwoViewContrastive(ctx, base=base, simclr_weight=0.0 if weight is None else weight,
                              tau=tau, proj_dim=int(proj_dim))


@register_objective("supcon", paper="Khosla et al. 2020 (in-batch; HobbitLong/SupContrast)")
def _supcon(ctx: ObjectiveContext, tau: float = 0.1, proj_dim: int = 128) -> Objective:
    """SupCon on two views; linear classifier on the frozen features"""
    return _two_view("supcon", ctx, "supcon", tau, proj_dim)


@register_objective("ce_simclr", paper="Chen et al. 2020 (in-batch NT-Xent; Islam et al.'s "
                    "code uses MoCo: islam_ce_ssl)")
def _ce_simclr(ctx: ObjectiveContext, weight: float = 1.0, tau: float = 0.1,
               proj_dim: int = 128) -> Objective:
    """CE + weight * SimCLR NT-Xent on two views"""
    return _two_view("ce_simclr", ctx, "ce", tau, proj_dim, weight)


@register_objective("supcon_simclr", paper="Khosla et al. 2020 + Chen et al. 2020 (in-batch; "
                    "Islam et al.'s code: islam_supcon_ssl)")
def _supcon_simclr(ctx: ObjectiveContext, weight: float = 1.0, tau: float = 0.1,
                   proj_dim: int = 128) -> Objective:
    """SupCon + weight * SimCLR NT-Xent on two views; linear classifier on frozen features"""
    return _two_view("supcon_simclr", ctx, "supcon", tau, proj_dim, weight)


# ------------------------------------------------------------- Islam et al.'s released code

ISLAM_CODE = ("Islam et al. 2021, asrafulashiq/transfer_broad (system/system_moco_mit.py, "
              "system_base_plus_moco.py, system_supervised_mean2.py)")


def islam_mlp(feature_dim: int, out_dim: int = 128) -> nn.Sequential:
    """The authors' projection: Linear(d, d), ReLU, Linear(d, 128) (hidden width = d)."""
    return nn.Sequential(nn.Linear(feature_dim, feature_dim), nn.ReLU(),
                         nn.Linear(feature_dim, out_dim))


def queue_supcon_loss(q: torch.Tensor, queue: torch.Tensor, queue_labels: torch.Tensor,
                      labels: torch.Tensor, tau: float) -> torch.Tensor:
    """Islam et al.'s supervised contrastive loss against a queue of keys.

    ``logits = q @ queue.T / tau`` over every queue entry; the positives of anchor ``i`` are
    the entries with its label; ``loss_i = -sum_{p} log softmax(logits_i)_p / (|P(i)| + 1e-5)``,
    mean over anchors (``q`` and ``queue`` rows L2-normalised).
    """
    logp = F.log_softmax(q @ queue.T / tau, dim=1)
    mask = (labels[:, None] == queue_labels[None, :]).to(logp.dtype)
    return (-(logp * mask).sum(1) / (mask.sum(1) + 1e-5)).mean()


def moco_infonce_loss(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor,
                      tau: float) -> torch.Tensor:
    """MoCo's InfoNCE: the positive ``q_i . k_i`` against every queue entry, CE with target 0."""
    logits = torch.cat([(q * k).sum(1, keepdim=True), q @ queue.T], dim=1) / tau
    return F.cross_entropy(logits, torch.zeros(len(q), dtype=torch.long, device=q.device))


class IslamMoCo(Objective):
    """Islam et al.'s three objectives, as their released code computes them.

    ``mode``:

    * ``"supcon"`` (their SupCon, ``system_moco_mit.py``): keys from a momentum copy of the
      network + projection (m = 0.999, updated before the key forward) are enqueued first, then
      :func:`queue_supcon_loss` of the queries against the whole queue;
    * ``"ce_ssl"`` (CE + self-supervised, ``system_base_plus_moco.py``): CE of the model's own
      head on the query view's features + ``weight`` x MoCo-v2 InfoNCE (positive: the key of
      the other view; negatives: the whole queue, read before the batch is enqueued);
    * ``"supcon_ssl"`` (SupCon + self-supervised, ``system_supervised_mean2.py``): two
      projections; ``weight`` x InfoNCE on the first (queue read before enqueueing) + the queue
      SupCon on the second (after enqueueing).

    The queue starts as random unit rows labelled ``-1`` (never a positive). View 1 (the
    query) is the view every dtprobe objective sees; view 2 (the key) is the contrastive view.
    For ``supcon`` and ``supcon_ssl`` the model's head ``fc`` is a linear classifier trained
    online on the detached features (``probe_ce``).
    """

    views = 2

    def __init__(self, ctx: ObjectiveContext, *, mode: str, tau: float, weight: float,
                 queue_size: int, momentum: float, proj_dim: int):
        super().__init__()
        object.__setattr__(self, "_head", ctx.head)
        object.__setattr__(self, "_model", ctx.model)
        object.__setattr__(self, "_feature_fn", ctx.feature_fn)
        self.mode, self.tau, self.weight, self.momentum = mode, float(tau), float(weight), \
            float(momentum)
        heads = {"supcon": ["sup"], "ce_ssl": ["ssl"], "supcon_ssl": ["ssl", "sup"]}[mode]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(ctx.seed + 7919)
            self.heads = nn.ModuleDict({h: islam_mlp(ctx.feature_dim, proj_dim) for h in heads})
            for h in heads:
                q = F.normalize(torch.randn(queue_size, proj_dim), dim=1)
                self.register_buffer(f"queue_{h}", q)
        self.register_buffer("queue_labels", torch.full((queue_size,), -1, dtype=torch.long))
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))
        self.model_k = copy.deepcopy(ctx.model)
        self.heads_k = copy.deepcopy(self.heads)
        for p in [*self.model_k.parameters(), *self.heads_k.parameters()]:
            p.requires_grad_(False)
        self.hparams = {"tau": tau, "weight": weight if mode != "supcon" else None,
                        "queue_size": queue_size, "momentum": momentum, "proj_dim": proj_dim,
                        "views": 2, "view2_augmentation": dict(CONTRASTIVE_VIEW),
                        "source": ISLAM_CODE,
                        "classifier": ("the model's head, by CE" if mode == "ce_ssl" else
                                       "linear head on detached features, trained online")}

    @torch.no_grad()
    def _momentum_update(self) -> None:
        for live, key in ((self._model, self.model_k), (self.heads, self.heads_k)):
            for p, q in zip(live.parameters(), key.parameters(), strict=True):
                q.mul_(self.momentum).add_(p.detach(), alpha=1.0 - self.momentum)

    @torch.no_grad()
    def _enqueue(self, keys: dict[str, torch.Tensor], labels: torch.Tensor) -> None:
        labels = all_gather_rows(labels)
        n = len(self.queue_labels)
        idx = (int(self.queue_ptr) + torch.arange(len(labels), device=labels.device)) % n
        for h, k in keys.items():
            buf = getattr(self, f"queue_{h}")
            buf[idx] = all_gather_rows(k).to(buf.dtype)
        self.queue_labels[idx] = labels
        self.queue_ptr.fill_((int(self.queue_ptr) + len(labels)) % n)

    def uninformative_losses(self, batch_size: int, num_classes: int) -> dict[str, float]:
        """ln(queue) for the queue SupCon, ln(queue + 1) for MoCo's InfoNCE (the positive and
        every queue entry at one similarity when every key is equal), ln K for the CE terms.

        The queue SupCon's value holds once every anchor has a positive in the queue (an anchor
        without one adds 0), up to the authors' ``+ 1e-5`` (1e-5 / |P(i)| relative)."""
        queue = len(self.queue_labels)
        return {**super().uninformative_losses(batch_size, num_classes),
                "supcon": math.log(queue), "moco": math.log(queue + 1)}

    def forward(self, *, features, logits, labels, images2, **_):
        q = {h: F.normalize(m(features), dim=1) for h, m in self.heads.items()}
        with torch.no_grad():
            if self.training:
                self._momentum_update()
            hk = self._feature_fn(self.model_k, images2).to(features.dtype)
            k = {h: F.normalize(m(hk), dim=1) for h, m in self.heads_k.items()}
        terms: dict[str, float] = {}
        loss = features.new_zeros(())
        if "ssl" in q:  # MoCo reads the queue before this batch is enqueued
            ssl = moco_infonce_loss(q["ssl"], k["ssl"], self.queue_ssl.detach().clone(),
                                    self.tau)
            loss = loss + self.weight * ssl
            terms["moco"] = float(ssl.detach())
        if self.training:
            self._enqueue(k, labels)
        if "sup" in q:  # the supervised term reads it after (its positives include the keys)
            sup = queue_supcon_loss(q["sup"], self.queue_sup.detach().clone(),
                                    self.queue_labels.clone(), labels, self.tau)
            loss = loss + sup
            terms["supcon"] = float(sup.detach())
        if self.mode == "ce_ssl":
            ce = F.cross_entropy(logits.float() if logits.dtype != torch.float64 else logits,
                                 labels)
            loss = loss + ce
            terms["ce"] = float(ce.detach())
        else:
            head_out = self._head(features.detach())
            probe = F.cross_entropy(head_out if head_out.dtype == torch.float64
                                    else head_out.float(), labels)
            loss = loss + probe
            terms["probe_ce"] = float(probe.detach())
        return loss, terms


#: The authors' queue (64,000 keys) and the training set it was sized for (ImageNet's 1,281,167
#: images): the queue holds 5 % of the training set.
ISLAM_QUEUE_SIZE = 64000
ISLAM_TRAIN_IMAGES = 1_281_167
#: The smallest derived queue (enough keys for the queue SupCon's positives at a few classes).
ISLAM_MIN_QUEUE = 256


def islam_queue_default(num_samples: int) -> int:
    """``queue_size=auto``: the authors' fraction of the training set (64,000 of ImageNet's
    1,281,167 images, 5 %), at least :data:`ISLAM_MIN_QUEUE`, at most their 64,000.

    A queue larger than that fraction of a small training set fills with real keys only after
    many epochs (random initial keys are easy negatives, so the loss rises meanwhile: 5.2 -> 5.5
    over epochs 1-3 for ``islam_supcon`` with 64,000 keys on 6,000 images) and then holds stale
    keys of each query's own image among its InfoNCE negatives."""
    derived = round(ISLAM_QUEUE_SIZE * num_samples / ISLAM_TRAIN_IMAGES)
    return int(min(ISLAM_QUEUE_SIZE, max(ISLAM_MIN_QUEUE, derived)))


def _islam(ctx: ObjectiveContext, name: str, mode: str, tau: float, weight: float,
           queue_size: int | str, momentum: float, proj_dim: int) -> Objective:
    _check(name, tau, proj_dim)
    check_positive(name, weight=weight)
    if queue_size == "auto":
        queue_size = islam_queue_default(ctx.num_samples)
    if isinstance(queue_size, str) or int(queue_size) != queue_size or queue_size < 1:
        raise ConfigError(f"--objective-param queue_size={queue_size!r} for {name} must be an "
                          "integer >= 1")
    if not (isinstance(momentum, (int, float)) and 0 <= momentum < 1):
        raise ConfigError(f"--objective-param momentum={momentum!r} for {name} must lie in "
                          "[0, 1)")
    if ctx.feature_fn is None:
        raise ConfigError(f"{name} needs the trainer's feature function (train it with "
                          "dtprobe train)")
    return IslamMoCo(ctx, mode=mode, tau=tau, weight=weight, queue_size=int(queue_size),
                     momentum=float(momentum), proj_dim=int(proj_dim))


@register_objective("islam_supcon", paper=f"{PAPER} (released code)")
def _islam_supcon(ctx: ObjectiveContext, tau: float = 0.07,
                  queue_size: int | str = "auto", momentum: float = 0.999,
                  proj_dim: int = 128) -> Objective:
    """Islam et al.'s SupCon: queries against a queue of momentum-encoder keys"""
    return _islam(ctx, "islam_supcon", "supcon", tau, 1.0, queue_size, momentum, proj_dim)


@register_objective("islam_ce_ssl", paper=f"{PAPER} (released code)")
def _islam_ce_ssl(ctx: ObjectiveContext, weight: float = 0.5, tau: float = 0.07,
                  queue_size: int | str = "auto", momentum: float = 0.999,
                  proj_dim: int = 128) -> Objective:
    """Islam et al.'s CE + weight * MoCo-v2 (momentum encoder, queue)"""
    return _islam(ctx, "islam_ce_ssl", "ce_ssl", tau, weight, queue_size, momentum, proj_dim)


@register_objective("islam_supcon_ssl", paper=f"{PAPER} (released code)")
def _islam_supcon_ssl(ctx: ObjectiveContext, weight: float = 0.5, tau: float = 0.07,
                      queue_size: int | str = "auto", momentum: float = 0.999,
                      proj_dim: int = 128) -> Objective:
    """Islam et al.'s queue SupCon + weight * MoCo-v2, two projections"""
    return _islam(ctx, "islam_supcon_ssl", "supcon_ssl", tau, weight, queue_size, momentum,
                  proj_dim)
