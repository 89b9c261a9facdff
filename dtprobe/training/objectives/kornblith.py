"""The objectives of Kornblith et al. (2021), as the authors' released code computes them.

Notation: ``h`` the penultimate features, ``z = W h + b`` the final layer's output, ``t`` the
one-hot label, ``y`` the label, ``K`` the number of classes; every loss is a mean over examples.
``l2_loss(W) = ||W||_F^2 / 2`` (TensorFlow's ``tf.nn.l2_loss``).

=====================  ==============================================================  ==========
registry name          loss (the authors' ``losses.py``)                               default
=====================  ==============================================================  ==========
``ce``                 ``-log softmax(z)_y``                                           --
``label_smoothing``    ``-1/(1-a) sum_k ((1 - a) t_k + a / K) log softmax(z)_k``       a = 0.1
``sigmoid``            ``sum_k BCE(z_k - log K, t_k)`` (logits shifted by ``-log K``)  --
``extra_l2``           ``CE + lam l2_loss(W)`` (final-layer kernel, on top of wd)      lam = 8e-4
``dropout``            ``CE`` on ``z = W dropout(h) + b``, keep probability rho        rho = 0.7
``logit_penalty``      ``CE + beta ||z||^2 / 2``                                       beta = 6e-4
``logit_norm``         ``-log softmax(z / (tau ||z||))_y``                             see below
``cosine_softmax``     ``-log softmax((h . W_k / ||W_k|| + b_k) / tau)_y``             see below
``squared_error``      ``s (kappa (z_y - M)^2 + sum_{k != y} z_k^2)``                   see below
=====================  ==============================================================  ==========

Source: the authors' code, google-research/google-research ``loss_functions_transfer/``:
``losses.py`` (every formula above), ``resnet_model.py`` (penultimate dropout in the network,
training only; cosine softmax's final layer), ``load_model.py`` (``LOSS_HYPERPARAMETERS``, the
values in the table, and the training regulariser: weight decay 8e-5 as ``l2_loss`` over every
variable that is neither a BatchNorm variable nor a bias; see
:mod:`dtprobe.training.recipes`). Every formula and value here was checked against those files
(``tests/test_objectives_reference.py`` writes each of them out and compares to round-off).
Where the paper's text (S. Kornblith, T. Chen, H. Lee, M. Norouzi, "Why Do Better Loss
Functions Lead to Less Transferable Features?", NeurIPS 2021, Section 3.1 and Table 1) reads
differently, dtprobe follows the code:

* label smoothing: the smoothed cross-entropy is *weighted by* ``1 / (1 - alpha)`` (the code
  passes ``weights / (1 - alpha)`` to ``softmax_cross_entropy``), so its gradient on the
  correct logit is the unsmoothed one's scale;
* sigmoid: the ``-log K`` shift is part of the loss (``final_layer - log K``), not a bias
  initialisation; the binary cross-entropy is summed over classes (the code averages over all
  ``N x K`` entries with weight ``K``);
* extra final-layer L2 and logit penalty carry a factor ``1/2`` (``tf.nn.l2_loss`` and
  ``reduce_sum(z**2) / 2``);
* cosine softmax normalises the class weight vectors only (columns of the kernel), *not* the
  features, and keeps a bias: ``z_k = h . W_k / ||W_k|| + b_k``, then CE on ``z / tau``;
* squared error is not divided by ``K``.

A checkpoint's head is exported so that ``model(x)`` gives the authors' ``outputs`` tensor (the
scaled or shifted logits each loss applies softmax/sigmoid to): cosine softmax's weights become
``W_k / (tau ||W_k||)`` and its bias ``b / tau``; sigmoid's bias is shifted by ``-log K``.
Argmax predictions are unchanged by either.

**Squared error at small K.** The authors' values (kappa 9, M 60, loss scale 10) are for
ImageNet's 1001 outputs. The loss's gradient on the correct logit at initialisation is
``2 s kappa M`` = 10,800 per example, against at most 1 for softmax CE, and on the embedded
6-class ``shapes`` task at lr 0.05 it diverges in the first epoch (loss 9.5e10). dtprobe's
default therefore derives the three values from ``K`` with the rule of Hui & Belkin (2021),
who proposed this rescaled square loss and whom the authors follow: for few classes no
rescaling (``kappa = 1``, ``M = 1``) and the loss averaged over the ``K`` outputs (``s = 1/K``);
for ``K >= 100`` the authors' ImageNet values. ``--objective-param kappa=9 M=60 scale=10``
gives the authors' values at any ``K`` (and the trainer's one-line divergence message where
they do not train).

**Temperatures at small K.** Logit normalisation (tau 0.04) and cosine softmax (tau 0.05) bound
the logits to ``[-1/tau, 1/tau]`` (cosine softmax up to ``||h||``); the authors chose tau for
ImageNet's 1001 outputs, where the uniform loss is ``ln 1001``. At the embedded default's 6
classes the same tau starts the loss far above ``ln 6`` (4.2 for logit normalisation) and the
fastest way down is the collapse to the uniform loss: ``small_cnn``'s ReLU embedding dies
(every feature 0) and the run stays at chance without diverging (measured: 0.166 and 0.18 test
accuracy after 16 epochs, 2 seeds). dtprobe's default (``tau=auto``) therefore keeps the
logit range in units of the uniform loss, ``tau ln K``, at the authors' value:
``tau(K) = tau_authors ln 1001 / ln K`` below 1001 classes (0.154 and 0.193 at K = 6: after
16 epochs cosine softmax reaches 0.926 and 0.668 test accuracy, logit normalisation 0.688 and
0.209, 2 seeds each), the authors' value from 1001 classes on. ``--objective-param tau=0.05``
gives the authors' value at any ``K``.

Zero-norm logits (logit normalisation) or class weights (cosine softmax) give exactly 0 with a
zero gradient instead of NaN (``tf.nn.l2_normalize`` divides by ``max(||x||, 1e-6)``; the two
agree for every norm above 1e-6).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from dtprobe.references import with_references
from dtprobe.training.objectives.base import (
    Objective,
    ObjectiveContext,
    check_positive,
    check_range,
    safe_normalize,
)
from dtprobe.training.objectives.registry import register_objective

__doc__ = with_references(
    __doc__,
    ("kornblith2021",
     "(arXiv:2010.16402); code: "
     "https://github.com/google-research/google-research/tree/master/loss_functions_transfer"),
    "hui2021",
)

PAPER = "Kornblith et al. 2021"

#: The authors' values (``LOSS_HYPERPARAMETERS`` in their ``load_model.py``), by registry name.
AUTHORS_HYPERPARAMETERS: dict[str, dict[str, float]] = {
    "label_smoothing": {"alpha": 0.1}, "dropout": {"keep_prob": 0.7},
    "extra_l2": {"lam": 8e-4}, "logit_penalty": {"beta": 6e-4}, "logit_norm": {"tau": 0.04},
    "cosine_softmax": {"tau": 0.05}, "squared_error": {"kappa": 9.0, "M": 60.0, "scale": 10.0},
}
#: From this many classes on, ``squared_error`` defaults to the authors' ImageNet values.
SQUARED_ERROR_MANY_CLASSES = 100
#: Outputs of the authors' ImageNet networks (1000 classes and a background class): the class
#: count their temperatures were chosen for.
AUTHORS_NUM_CLASSES = 1001


def temperature_default(objective: str, num_classes: int) -> float:
    """``tau`` of ``logit_norm`` or ``cosine_softmax`` for ``K`` classes: the authors' value
    scaled so that ``tau ln K`` equals theirs at :data:`AUTHORS_NUM_CLASSES` (their value from
    that many classes on; see the module docstring)."""
    tau = AUTHORS_HYPERPARAMETERS[objective]["tau"]
    if num_classes >= AUTHORS_NUM_CLASSES:
        return tau
    return tau * math.log(AUTHORS_NUM_CLASSES) / math.log(max(2, num_classes))


def _wide(x: torch.Tensor) -> torch.Tensor:
    """``x`` in float32 at least (bf16 autocast outputs are widened, float64 is kept)."""
    return x if x.dtype == torch.float64 else x.float()


def label_smoothing_loss(logits: torch.Tensor, labels: torch.Tensor, alpha: float) -> torch.Tensor:
    """``-1/(1 - alpha) sum_k ((1 - alpha) t_k + alpha / K) log softmax(z)_k``, batch mean.

    The authors weight the smoothed cross-entropy (Szegedy et al. 2016) by ``1 / (1 - alpha)``.
    """
    logp = F.log_softmax(logits, dim=1)
    k = logits.shape[1]
    target = torch.full_like(logp, alpha / k)
    target.scatter_add_(1, labels[:, None], torch.full_like(logp[:, :1], 1.0 - alpha))
    return -(target * logp).sum(1).mean() / (1.0 - alpha)


def sigmoid_logits(logits: torch.Tensor) -> torch.Tensor:
    """The authors' sigmoid logits: the final layer shifted by ``-log K``."""
    return logits - math.log(logits.shape[1])


def sigmoid_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``sum_k BCE(z_k - log K, t_k)``, batch mean (the authors' shift and reduction)."""
    target = F.one_hot(labels, logits.shape[1]).to(logits.dtype)
    return F.binary_cross_entropy_with_logits(sigmoid_logits(logits), target,
                                              reduction="none").sum(1).mean()


def logit_norm_loss(logits: torch.Tensor, labels: torch.Tensor, tau: float) -> torch.Tensor:
    """``-log softmax(z / (tau ||z||))_y``; all-zero logits give the uniform loss ``log K``."""
    return F.cross_entropy(safe_normalize(logits) / tau, labels)


def cosine_logits(features: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                  tau: float) -> torch.Tensor:
    """``(h . W_k / ||W_k|| + b_k) / tau``: the class weights are normalised, the features are
    not, the bias is kept (the authors' ``resnet_model.py``). Zero-norm class weights give a
    zero column with zero gradient."""
    z = features @ safe_normalize(weight).T
    if bias is not None:
        z = z + bias
    return z / tau


def squared_error_loss(logits: torch.Tensor, labels: torch.Tensor, kappa: float, m: float,
                       scale: float) -> torch.Tensor:
    """``scale (kappa (z_y - M)^2 + sum_{k != y} z_k^2)``, batch mean (the authors' form of
    Hui & Belkin's rescaled square loss; no division by ``K``)."""
    t = F.one_hot(labels, logits.shape[1]).to(logits.dtype)
    correct = (logits * t).sum(1)
    others = ((logits * (1 - t)) ** 2).sum(1)
    return (scale * (kappa * (correct - m) ** 2 + others)).mean()


def squared_error_defaults(num_classes: int) -> dict[str, float]:
    """``kappa, M, scale`` for ``K`` classes: the authors' ImageNet values from
    :data:`SQUARED_ERROR_MANY_CLASSES` classes on, else Hui & Belkin's small-``K`` setting
    (no rescaling, ``kappa = M = 1``, loss averaged over the ``K`` outputs: ``scale = 1/K``)."""
    if num_classes >= SQUARED_ERROR_MANY_CLASSES:
        return dict(AUTHORS_HYPERPARAMETERS["squared_error"])
    return {"kappa": 1.0, "M": 1.0, "scale": 1.0 / num_classes}


class _Kornblith(Objective):
    """Shared plumbing: keeps the head and the hyperparameters."""

    def __init__(self, head: nn.Linear, head_name: str = "fc", **hparams: Any):
        super().__init__()
        object.__setattr__(self, "_head", head)  # the model's module, not ours to save
        self.head_name = head_name
        self.hparams = hparams


class LabelSmoothing(_Kornblith):
    def uninformative_losses(self, batch_size, num_classes):
        # uniform logits: every smoothed target sums to 1, so ln K / (1 - alpha)
        return {"label_smoothing": math.log(num_classes) / (1.0 - self.hparams["alpha"])}

    def forward(self, *, logits, labels, **_):
        loss = label_smoothing_loss(logits, labels, self.hparams["alpha"])
        return loss, {"label_smoothing": float(loss.detach())}


class Sigmoid(_Kornblith):
    def export_model_state(self, state):
        # The saved head outputs the shifted logits (the authors' ``outputs``).
        state = dict(state)
        key = f"{self.head_name}.bias"
        if key in state:
            shift = math.log(self._head.out_features)
            state[key] = (state[key].double() - shift).to(state[key].dtype)
        return state

    def uninformative_losses(self, batch_size, num_classes):
        # every shifted output at the class frequency 1/K: K binary entropies of 1/K
        k = num_classes
        return {"sigmoid": math.log(k) + (k - 1) * math.log(k / (k - 1)) if k > 1 else 0.0}

    def forward(self, *, logits, labels, **_):
        loss = sigmoid_loss(logits, labels)
        return loss, {"sigmoid": float(loss.detach())}


class ExtraL2(_Kornblith):
    def forward(self, *, logits, labels, **_):
        ce = F.cross_entropy(logits, labels)
        l2 = _wide(self._head.weight).pow(2).sum() / 2  # tf.nn.l2_loss
        return ce + self.hparams["lam"] * l2, {"ce": float(ce.detach()),
                                               "final_l2_loss": float(l2.detach())}


class PenultimateDropout(_Kornblith):
    def forward(self, *, features, labels, **_):
        dropped = F.dropout(features, p=1.0 - self.hparams["keep_prob"], training=self.training)
        ce = F.cross_entropy(_wide(self._head(dropped)), labels)
        return ce, {"ce": float(ce.detach())}


class LogitPenalty(_Kornblith):
    def forward(self, *, logits, labels, **_):
        ce = F.cross_entropy(logits, labels)
        penalty = logits.pow(2).sum(1).mean() / 2
        return ce + self.hparams["beta"] * penalty, {"ce": float(ce.detach()),
                                                     "half_logit_sq_norm": float(penalty.detach())}


class LogitNorm(_Kornblith):
    def uninformative_losses(self, batch_size, num_classes):
        # z along (1, ..., 1) has equal normalised logits: uniform, ln K
        return {"logit_norm": math.log(num_classes)}

    def forward(self, *, logits, labels, **_):
        loss = logit_norm_loss(logits, labels, self.hparams["tau"])
        return loss, {"logit_norm": float(loss.detach())}


class CosineSoftmax(_Kornblith):
    def _logits(self, features: torch.Tensor) -> torch.Tensor:
        bias = self._head.bias
        return cosine_logits(_wide(features), _wide(self._head.weight),
                             None if bias is None else _wide(bias), self.hparams["tau"])

    def eval_logits(self, features, logits):
        return self._logits(features)

    def export_model_state(self, state):
        state = dict(state)
        tau = self.hparams["tau"]
        w = state[f"{self.head_name}.weight"]
        state[f"{self.head_name}.weight"] = (safe_normalize(w.double()) / tau).to(w.dtype)
        key = f"{self.head_name}.bias"
        if key in state:
            state[key] = (state[key].double() / tau).to(state[key].dtype)
        return state

    def uninformative_losses(self, batch_size, num_classes):
        # equal features (or all 0: a dead embedding) leave the bias: uniform at best, ln K
        return {"cosine_softmax": math.log(num_classes)}

    def forward(self, *, features, labels, **_):
        loss = F.cross_entropy(self._logits(features), labels)
        return loss, {"cosine_softmax": float(loss.detach())}


class SquaredError(_Kornblith):
    def uninformative_losses(self, batch_size, num_classes):
        # the best input-blind z_k = kappa M / (kappa + K - 1) for every k (balanced classes)
        h, k = self.hparams, num_classes
        value = h["scale"] * h["kappa"] * (k - 1) * h["M"] ** 2 / (h["kappa"] + k - 1)
        return {"squared_error": value}

    def forward(self, *, logits, labels, **_):
        h = self.hparams
        loss = squared_error_loss(logits, labels, h["kappa"], h["M"], h["scale"])
        return loss, {"squared_error": float(loss.detach())}


@register_objective("label_smoothing", paper=f"Szegedy et al. 2016; {PAPER}")
def _label_smoothing(ctx: ObjectiveContext, alpha: float = 0.1) -> Objective:
    """softmax CE against (1 - alpha) one-hot + alpha / K, weighted by 1 / (1 - alpha)"""
    check_range("label_smoothing", "alpha", alpha, 0.0, 1.0, hi_open=True)
    return LabelSmoothing(ctx.head, ctx.head_name, alpha=alpha)


@register_objective("sigmoid", paper=f"Beyer et al. 2020; {PAPER}")
def _sigmoid(ctx: ObjectiveContext) -> Objective:
    """sigmoid cross-entropy summed over classes, on logits shifted by -log K"""
    return Sigmoid(ctx.head, ctx.head_name, logit_shift=-math.log(ctx.num_classes))


@register_objective("extra_l2", paper=PAPER)
def _extra_l2(ctx: ObjectiveContext, lam: float = 8e-4) -> Objective:
    """softmax CE + lam * ||W_final||^2 / 2 (extra final-layer L2, on top of weight decay)"""
    check_positive("extra_l2", lam=lam)
    return ExtraL2(ctx.head, ctx.head_name, lam=lam)


@register_objective("dropout", paper=f"Srivastava et al. 2014; {PAPER}")
def _dropout(ctx: ObjectiveContext, keep_prob: float = 0.7) -> Objective:
    """softmax CE with dropout on the penultimate layer (keep probability keep_prob)"""
    check_range("dropout", "keep_prob", keep_prob, 0.0, 1.0)
    if keep_prob == 0:
        check_positive("dropout", keep_prob=keep_prob)
    return PenultimateDropout(ctx.head, ctx.head_name, keep_prob=keep_prob)


@register_objective("logit_penalty", paper=PAPER)
def _logit_penalty(ctx: ObjectiveContext, beta: float = 6e-4) -> Objective:
    """softmax CE + beta * ||z||^2 / 2"""
    check_positive("logit_penalty", beta=beta)
    return LogitPenalty(ctx.head, ctx.head_name, beta=beta)


def _temperature(objective: str, ctx: ObjectiveContext, tau: float | str) -> dict[str, Any]:
    """The hyperparameters of a temperature objective: ``tau`` (resolved from ``"auto"``) and
    whether it was derived from ``K`` (recorded with the run)."""
    value = temperature_default(objective, ctx.num_classes) if tau == "auto" else tau
    check_positive(objective, tau=value)
    return {"tau": float(value), "derived_from_K": tau == "auto"}


@register_objective("logit_norm", paper=PAPER,
                    description="softmax CE on z / (tau ||z||); tau auto: the authors' 0.04 "
                                "scaled by ln 1001 / ln K below 1001 classes")
def _logit_norm(ctx: ObjectiveContext, tau: float | str = "auto") -> Objective:
    """softmax CE on z / (tau ||z||)"""
    return LogitNorm(ctx.head, ctx.head_name, **_temperature("logit_norm", ctx, tau))


@register_objective("cosine_softmax", paper=PAPER,
                    description="softmax CE on (h . W_k / ||W_k|| + b_k) / tau (class weights "
                                "normalised, bias kept); tau auto: the authors' 0.05 scaled by "
                                "ln 1001 / ln K below 1001 classes")
def _cosine_softmax(ctx: ObjectiveContext, tau: float | str = "auto") -> Objective:
    """softmax CE on (h . W_k / ||W_k|| + b_k) / tau (class weights normalised, bias kept)"""
    return CosineSoftmax(ctx.head, ctx.head_name, **_temperature("cosine_softmax", ctx, tau))


@register_objective("squared_error", paper=f"Hui & Belkin 2021; {PAPER}",
                    description="scale * (kappa (z_y - M)^2 + sum_{k != y} z_k^2); auto: 1, 1, "
                                "1/K below 100 classes, else the authors' 9, 60, 10")
def _squared_error(ctx: ObjectiveContext, kappa: float | str = "auto",
                   M: float | str = "auto", scale: float | str = "auto",  # noqa: N803
                   ) -> Objective:
    """The authors' rescaled squared error with ``K``-derived defaults.

    ``auto`` is Hui & Belkin's rule (see the module docstring): the authors' ImageNet values
    from :data:`SQUARED_ERROR_MANY_CLASSES` classes on, no rescaling and a mean over the ``K``
    outputs below."""
    derived = squared_error_defaults(ctx.num_classes)
    given = {"kappa": kappa, "M": M, "scale": scale}
    values = {k: derived[k] if v == "auto" else v for k, v in given.items()}
    check_positive("squared_error", **values)
    return SquaredError(ctx.head, ctx.head_name, **{k: float(v) for k, v in values.items()},
                        derived_from_K={k: given[k] == "auto" for k in given})
