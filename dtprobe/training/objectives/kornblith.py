"""The objectives of Kornblith et al. (2021), Table 1, with the paper's tuned hyperparameters.

Notation: ``h`` the penultimate features, ``z = W h + b`` the logits of the head, ``t`` the
one-hot label, ``K`` the number of classes; every loss is averaged over the batch.

=====================  ==========================================================  ============
registry name          loss                                                        default
=====================  ==========================================================  ============
``ce``                 ``-log softmax(z)_y``                                       --
``label_smoothing``    ``-sum_k ((1 - a) t_k + a / K) log softmax(z)_k``           a = 0.1
``sigmoid``            ``-sum_k [t_k log s(z_k) + (1 - t_k) log(1 - s(z_k))]``     --
``extra_l2``           ``CE + lam ||W||_F^2`` (final layer only, on top of wd)     lam = 8e-4
``dropout``            ``CE`` on ``z = W dropout(h) + b``, keep probability rho    rho = 0.7
``logit_penalty``      ``CE + beta ||z||_2^2``                                     beta = 6e-4
``logit_norm``         ``-log softmax(z / (tau ||z||))_y``                         tau = 0.04
``cosine_softmax``     ``-log softmax(cos(h, W_k) / tau)_y`` (no bias)             tau = 0.05
``squared_error``      ``s / K sum_k [kappa t_k (z_k - M)^2 + (1 - t_k) z_k^2]``   kappa 9, M 60,
                                                                                   s = 10
=====================  ==========================================================  ============

Source: S. Kornblith, T. Chen, H. Lee, M. Norouzi, "Why Do Better Loss Functions Lead to Less
Transferable Features?", NeurIPS 2021 (arXiv:2010.16402v2), Section 3.1 (definitions) and
Table 1 (the tuned value of each hyperparameter on ImageNet). The search corpus available while
writing this module returned only the paper's abstract, so the values above are the Table 1
values as recorded by the implementer; check them against the paper before publishing numbers
that depend on them. They were tuned for ResNet-50 on ImageNet; on other data the defaults are a
starting point (pass ``--objective-param``).

dtprobe's own choices (not from the paper): the sigmoid head's bias starts at ``-log(K)`` so the
initial loss is ``~1 + log K`` rather than ``K log 2`` (``init_bias=false`` keeps the
architecture's initialisation); cosine softmax's checkpoint head is exported as
``W_k / (tau ||W_k||)`` with zero bias, so ``argmax`` of the saved model equals the cosine
prediction (its logits are ``||h|| cos / tau``); zero-norm features or class weights give a
cosine (and a logit-norm) of exactly 0 with zero gradient instead of NaN.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from dtprobe.training.objectives.base import (
    Objective,
    ObjectiveContext,
    check_positive,
    check_range,
    safe_normalize,
)
from dtprobe.training.objectives.registry import register_objective

PAPER = "Kornblith et al. 2021, Table 1"


def _wide(x: torch.Tensor) -> torch.Tensor:
    """``x`` in float32 at least (bf16 autocast outputs are widened, float64 is kept)."""
    return x if x.dtype == torch.float64 else x.float()


def label_smoothing_loss(logits: torch.Tensor, labels: torch.Tensor, alpha: float) -> torch.Tensor:
    """``-sum_k ((1 - alpha) t_k + alpha / K) log softmax(z)_k``, batch mean (Szegedy 2016)."""
    logp = F.log_softmax(logits, dim=1)
    k = logits.shape[1]
    target = torch.full_like(logp, alpha / k)
    target.scatter_add_(1, labels[:, None], torch.full_like(logp[:, :1], 1.0 - alpha))
    return -(target * logp).sum(1).mean()


def sigmoid_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum over classes of binary cross-entropy with one-hot targets, batch mean."""
    target = F.one_hot(labels, logits.shape[1]).to(logits.dtype)
    return F.binary_cross_entropy_with_logits(logits, target, reduction="none").sum(1).mean()


def logit_norm_loss(logits: torch.Tensor, labels: torch.Tensor, tau: float) -> torch.Tensor:
    """``-log softmax(z / (tau ||z||))_y``; all-zero logits give the uniform loss ``log K``."""
    return F.cross_entropy(safe_normalize(logits) / tau, labels)


def cosine_logits(features: torch.Tensor, weight: torch.Tensor, tau: float) -> torch.Tensor:
    """``cos(h, W_k) / tau`` (zero for zero-norm rows, with zero gradient)."""
    return safe_normalize(features) @ safe_normalize(weight).T / tau


def squared_error_loss(logits: torch.Tensor, labels: torch.Tensor, kappa: float, m: float,
                       scale: float) -> torch.Tensor:
    """``scale / K sum_k [kappa t_k (z_k - M)^2 + (1 - t_k) z_k^2]``, batch mean (Hui & Belkin
    2021's rescaled square loss, as parametrised by Kornblith et al. 2021)."""
    t = F.one_hot(labels, logits.shape[1]).to(logits.dtype)
    per = kappa * t * (logits - m) ** 2 + (1 - t) * logits ** 2
    return scale * per.mean(1).mean()


class _Kornblith(Objective):
    """Shared plumbing: keeps the head and the hyperparameters."""

    def __init__(self, head: nn.Linear, **hparams: Any):
        super().__init__()
        object.__setattr__(self, "_head", head)  # the model's module, not ours to save
        self.hparams = hparams


class LabelSmoothing(_Kornblith):
    def forward(self, *, logits, labels, **_):
        loss = label_smoothing_loss(logits, labels, self.hparams["alpha"])
        return loss, {"label_smoothing": float(loss.detach())}


class Sigmoid(_Kornblith):
    def forward(self, *, logits, labels, **_):
        loss = sigmoid_loss(logits, labels)
        return loss, {"sigmoid": float(loss.detach())}


class ExtraL2(_Kornblith):
    def forward(self, *, logits, labels, **_):
        ce = F.cross_entropy(logits, labels)
        l2 = _wide(self._head.weight).pow(2).sum()
        return ce + self.hparams["lam"] * l2, {"ce": float(ce.detach()),
                                               "final_l2": float(l2.detach())}


class PenultimateDropout(_Kornblith):
    def forward(self, *, features, labels, **_):
        dropped = F.dropout(features, p=1.0 - self.hparams["keep_prob"], training=self.training)
        ce = F.cross_entropy(_wide(self._head(dropped)), labels)
        return ce, {"ce": float(ce.detach())}


class LogitPenalty(_Kornblith):
    def forward(self, *, logits, labels, **_):
        ce = F.cross_entropy(logits, labels)
        penalty = logits.pow(2).sum(1).mean()
        return ce + self.hparams["beta"] * penalty, {"ce": float(ce.detach()),
                                                     "logit_sq_norm": float(penalty.detach())}


class LogitNorm(_Kornblith):
    def forward(self, *, logits, labels, **_):
        loss = logit_norm_loss(logits, labels, self.hparams["tau"])
        return loss, {"logit_norm": float(loss.detach())}


class CosineSoftmax(_Kornblith):
    def _logits(self, features: torch.Tensor) -> torch.Tensor:
        return cosine_logits(_wide(features), _wide(self._head.weight), self.hparams["tau"])

    def eval_logits(self, features, logits):
        return self._logits(features)

    def export_model_state(self, state):
        state = dict(state)
        name = self.hparams_head_name
        w = state[f"{name}.weight"]
        state[f"{name}.weight"] = (safe_normalize(w.float()) / self.hparams["tau"]).to(w.dtype)
        if f"{name}.bias" in state:
            state[f"{name}.bias"] = torch.zeros_like(state[f"{name}.bias"])
        return state

    def forward(self, *, features, labels, **_):
        loss = F.cross_entropy(self._logits(features), labels)
        return loss, {"cosine_softmax": float(loss.detach())}


class SquaredError(_Kornblith):
    def forward(self, *, logits, labels, **_):
        h = self.hparams
        loss = squared_error_loss(logits, labels, h["kappa"], h["M"], h["scale"])
        return loss, {"squared_error": float(loss.detach())}


@register_objective("label_smoothing", paper=f"Szegedy et al. 2016; {PAPER}")
def _label_smoothing(ctx: ObjectiveContext, alpha: float = 0.1) -> Objective:
    """softmax CE against (1 - alpha) one-hot + alpha / K"""
    check_range("label_smoothing", "alpha", alpha, 0.0, 1.0, hi_open=True)
    return LabelSmoothing(ctx.head, alpha=alpha)


@register_objective("sigmoid", paper=f"Beyer et al. 2020; {PAPER}")
def _sigmoid(ctx: ObjectiveContext, init_bias: bool = True) -> Objective:
    """independent sigmoid cross-entropy per class (bias starts at -log K)"""
    if init_bias and ctx.head.bias is not None:
        with torch.no_grad():
            ctx.head.bias.fill_(-math.log(ctx.num_classes))
    return Sigmoid(ctx.head, init_bias=bool(init_bias))


@register_objective("extra_l2", paper=PAPER)
def _extra_l2(ctx: ObjectiveContext, lam: float = 8e-4) -> Objective:
    """softmax CE + lam * ||W_final||_F^2 (extra final-layer L2, on top of weight decay)"""
    check_positive("extra_l2", lam=lam)
    return ExtraL2(ctx.head, lam=lam)


@register_objective("dropout", paper=f"Srivastava et al. 2014; {PAPER}")
def _dropout(ctx: ObjectiveContext, keep_prob: float = 0.7) -> Objective:
    """softmax CE with dropout on the penultimate layer (keep probability keep_prob)"""
    check_range("dropout", "keep_prob", keep_prob, 0.0, 1.0)
    if keep_prob == 0:
        check_positive("dropout", keep_prob=keep_prob)
    return PenultimateDropout(ctx.head, keep_prob=keep_prob)


@register_objective("logit_penalty", paper=PAPER)
def _logit_penalty(ctx: ObjectiveContext, beta: float = 6e-4) -> Objective:
    """softmax CE + beta * ||z||^2"""
    check_positive("logit_penalty", beta=beta)
    return LogitPenalty(ctx.head, beta=beta)


@register_objective("logit_norm", paper=PAPER)
def _logit_norm(ctx: ObjectiveContext, tau: float = 0.04) -> Objective:
    """softmax CE on z / (tau ||z||)"""
    check_positive("logit_norm", tau=tau)
    return LogitNorm(ctx.head, tau=tau)


@register_objective("cosine_softmax", paper=PAPER)
def _cosine_softmax(ctx: ObjectiveContext, tau: float = 0.05) -> Objective:
    """softmax CE on cos(h, W_k) / tau (no bias)"""
    check_positive("cosine_softmax", tau=tau)
    objective = CosineSoftmax(ctx.head, tau=tau)
    objective.hparams_head_name = ctx.head_name
    return objective


@register_objective("squared_error", paper=f"Hui & Belkin 2021; {PAPER}")
def _squared_error(ctx: ObjectiveContext, kappa: float = 9.0, M: float = 60.0,  # noqa: N803
                   scale: float = 10.0) -> Objective:
    """rescaled squared error scale/K * sum_k [kappa t_k (z_k - M)^2 + (1 - t_k) z_k^2]"""
    check_positive("squared_error", kappa=kappa, M=M, scale=scale)
    return SquaredError(ctx.head, kappa=kappa, M=M, scale=scale)
