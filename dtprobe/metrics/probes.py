"""Probe accuracy of fixed features: L2 logistic-regression linear probe and weighted kNN.

The linear probe follows the protocol of Kornblith, Shlens and Le (2019), also used by
Kornblith et al. (2021), Islam et al. (2021) and t-ReX (Sariyildiz et al. 2023): a
multinomial logistic regression with an L2 penalty is fitted with L-BFGS on fixed
(standardised) features, the regularisation strength is chosen among 45 log-spaced values
in [1e-6, 1e5] on a stratified validation split carved from the training set, the model is
refitted on train + validation with the chosen value and its test accuracy is reported.
A faster named protocol (``"short"``: 9 values in [1e-3, 10], early stop) is available.
The solver is written in torch, so the same code runs on the CPU (float64) and on a GPU
(float32 by default) when given CUDA tensors.

The kNN probe is the weighted nearest-neighbour classifier of Wu et al. (2018), also used
by DINO (Caron et al. 2021): cosine similarity, the ``k`` most similar training samples
vote for their class with weight ``exp(sim / T)``.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.base import BaseEstimator

from dtprobe.errors import ConfigError, MetricInputError
from dtprobe.metrics._validation import (
    ArrayLike,
    as_tensor,
    check_features,
    ldexp,
    pow2_scale_exponent,
    rowwise_pow2_rescale,
)
from dtprobe.metrics.accuracy import CI_LEVEL, CI_METHOD, accuracy_interval
from dtprobe.metrics.registry import EpochView, MetricValue, register_metric
from dtprobe.references import with_references

__doc__ = with_references(__doc__, "kornblith2019transfer", "wu2018", "caron2021")

__all__ = [
    "DEFAULT_C_GRID",
    "DEFAULT_PROTOCOL",
    "KNN_METRIC_SETTINGS",
    "KORNBLITH_C_GRID",
    "LinearProbe",
    "PROBE_METRIC_SETTINGS",
    "PROBE_PROTOCOLS",
    "ProbeConvergenceWarning",
    "ProbeSweepConvergenceWarning",
    "ProbeResult",
    "SHORT_C_GRID",
    "accuracy_interval",
    "knn_predict",
    "knn_probe",
    "linear_probe",
    "stratified_split",
]

#: The full sweep of Kornblith et al. (2019): 45 log-spaced values in [1e-6, 1e5], used here
#: as the inverse regularisation strength ``C`` (scikit-learn's parameterisation).
KORNBLITH_C_GRID: tuple[float, ...] = tuple(float(c) for c in np.logspace(-6, 5, 45))

#: The faster sweep (protocol ``"short"``): 9 values at half-decade spacing in [1e-3, 1e1],
#: a 2x coarser spacing and a narrower range than the paper, stopped after 3 grid points
#: without improvement.  On standardised features with a few thousand samples the penalty
#: 1 / (2 C n) is already ~1e-5 at C = 10; on features where the best C lies outside
#: [1e-3, 10] it chooses another C than the papers' protocol.
SHORT_C_GRID: tuple[float, ...] = tuple(float(c) for c in np.logspace(-3, 1, 9))

#: Named probe protocols: the C grid and the early-stopping patience of the sweep
#: (``None``: the whole grid).  ``"kornblith2019"`` is the papers' protocol and the default.
PROBE_PROTOCOLS: dict[str, dict[str, Any]] = {
    "kornblith2019": {"c_grid": KORNBLITH_C_GRID, "patience": None},
    "short": {"c_grid": SHORT_C_GRID, "patience": 3},
}
DEFAULT_PROTOCOL = "kornblith2019"
#: The default protocol's grid (kept under its earlier name).
DEFAULT_C_GRID: tuple[float, ...] = KORNBLITH_C_GRID
_FROM_PROTOCOL: Any = object()  # patience not given: take the protocol's


#: Smallest gradient a line search on loss values can resolve, sqrt(machine epsilon): below
#: it the loss changes by less than its own rounding.  A ``tol`` under this floor counts as
#: met once the gradient reaches the floor (float32's 3.5e-4 is why sweeps finish in float64).
_GRAD_FLOOR = {torch.float64: 1.5e-8, torch.float32: 3.5e-4, torch.float16: 3.1e-2,
               torch.bfloat16: 8.8e-2}


#: Where a fast-precision phase hands over to ``dtype``: the float32 gradient of standardised
#: features carries ~1e-6 of round-off (sums of n products of O(1) terms), so below ~1e-5 its
#: steps are no longer worth their precision.
_FAST_FLOOR = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2}


#: L-BFGS memory of the sweep (curvature pairs kept along the grid).
_SWEEP_HISTORY = 20


class ProbeConvergenceWarning(UserWarning):
    """L-BFGS stopped at ``max_iter`` before the gradient tolerance was met, for a fit that
    the reported number rests on (the chosen C's fit or the refit)."""


class ProbeSweepConvergenceWarning(ProbeConvergenceWarning):
    """Some sweep fits at C values that were *not* chosen stopped before the tolerance (said
    once per process; every result records them)."""


#: Non-empty once the :class:`ProbeSweepConvergenceWarning` of this process was issued.
_SWEEP_NOTE_SHOWN: set[bool] = set()


def _resolve_device_dtype(x: ArrayLike, device: Any, dtype: torch.dtype | None
                          ) -> tuple[torch.device, torch.dtype]:
    if device is None:
        device = x.device if isinstance(x, torch.Tensor) else torch.device("cpu")
    device = torch.device(device)
    if dtype is None:
        dtype = torch.float32 if device.type == "cuda" else torch.float64
    return device, dtype


def _train_test(train_x: ArrayLike, test_x: ArrayLike, train_y: ArrayLike,
                device: torch.device, min_train: int
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Checked train and test features of one width on ``device``, the train split's classes
    and its labels as indices of them."""
    xtr = check_features(train_x, "train_x", min_samples=min_train, device=device)
    xte = check_features(test_x, "test_x", min_samples=1, device=device)
    if xtr.shape[1] != xte.shape[1]:
        raise MetricInputError(f"train_x has {xtr.shape[1]} features but test_x has "
                               f"{xte.shape[1]}; extract both with the same layer")
    classes, ytr = _encode_labels(train_y, xtr.shape[0], "train_y", device)
    return xtr, xte, classes, ytr


def _encode_labels(y: ArrayLike, n: int, name: str, device: torch.device,
                   classes: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Map integer labels to ``0..K-1`` indices of ``classes`` (``-1`` where unseen).

    When ``classes`` is ``None`` they are the sorted distinct values of ``y``.
    """
    t = as_tensor(y, dtype=torch.float64, device=device).reshape(-1)
    if t.shape[0] != n:
        raise MetricInputError(f"{name} has {t.shape[0]} entries but its features have {n} rows")
    if not torch.isfinite(t).all() or not torch.equal(t, t.round()):
        raise MetricInputError(f"{name} must be integer class labels")
    t = t.long()
    if classes is None:
        classes, idx = torch.unique(t, return_inverse=True)
        return classes, idx
    pos = torch.searchsorted(classes, t).clamp(max=classes.numel() - 1)
    idx = torch.where(classes[pos] == t, pos, torch.full_like(pos, -1))
    return classes, idx


def _standardizer(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-feature mean and (population) standard deviation; zero deviations become 1."""
    var, mean = torch.var_mean(x, dim=0, unbiased=False)  # one pass over the data
    scale = var.sqrt()
    return mean, torch.where(scale > 0, scale, torch.ones_like(scale))


def _check_c(C: float) -> float:
    C = float(C)
    if not (C > 0 and math.isfinite(C)):
        raise ConfigError(f"LinearProbe C must be a positive finite number, got {C}")
    return C


def _objective(xt: torch.Tensor, yi: torch.Tensor, k_eff: int, penalty: float):
    """``theta -> (loss, grad)`` of the mean cross-entropy plus ``penalty * ||W||^2`` for
    flat parameters ``theta`` (``k_eff`` rows of ``d`` weights and a bias) on features
    ``xt`` (d, n) with class indices ``yi``; ``k_eff == 1`` is the binary logistic loss."""
    d, n = xt.shape
    # classes along dim 0, samples along dim 1: softmax over a short leading dimension of a
    # contiguous (K, n) block is several times faster than over rows of (n, K); the labels
    # stay indices, not a one-hot (K, n) target (with the logits and their log-softmax that
    # would be three (K, n) matrices: 7 GB at K = 1000, n = 300k)
    target = yi.to(xt.dtype)[None, :] if k_eff == 1 else None
    cols = torch.arange(n, device=xt.device)

    def fun(flat: torch.Tensor) -> tuple[float, torch.Tensor]:
        theta = flat.view(k_eff, d + 1)
        w, b = theta[:, :d], theta[:, d]
        z = torch.addmm(b[:, None], w, xt)
        if target is not None:
            loss = F.binary_cross_entropy_with_logits(z, target, reduction="sum")
            resid = torch.sigmoid(z).sub_(target)
        else:
            logp = torch.log_softmax(z, dim=0)
            del z
            loss = -logp[yi, cols].sum()
            resid = logp.exp_()  # softmax - one-hot, in place
            resid[yi, cols] -= 1.0
        grad = torch.empty_like(theta)
        torch.mm(resid, xt.T, out=grad[:, :d])
        grad[:, :d].add_(w, alpha=2.0 * penalty * n).div_(n)
        torch.sum(resid, dim=1, out=grad[:, d]).div_(n)
        return float(loss) / n + penalty * float((w * w).sum()), grad.view(-1)

    return fun


class _Curvature:
    """L-BFGS memory: the last ``size`` pairs ``s`` (step) and ``y`` (gradient change), flat.

    Kept across the grid: moving from penalty ``p`` to ``p'`` changes every ``y`` by exactly
    ``2 (p' - p) s`` on the weights (the penalty is quadratic), so the pairs stay exact
    curvature information of the new objective after :meth:`shift_penalty`.
    """

    def __init__(self, size: int) -> None:
        self.size = max(1, int(size))
        self.s: list[torch.Tensor] = []
        self.y: list[torch.Tensor] = []

    def push(self, s: torch.Tensor, y: torch.Tensor) -> None:
        sy = float(torch.dot(s, y))
        # a pair with (near-)zero or negative curvature would make the inverse-Hessian
        # estimate indefinite; skip it (the objective is convex, so this is round-off)
        if sy <= 1e-10 * float(torch.linalg.vector_norm(s) * torch.linalg.vector_norm(y)):
            return
        self.s.append(s)
        self.y.append(y)
        if len(self.s) > self.size:
            del self.s[0], self.y[0]

    def shift_penalty(self, delta: float, k_eff: int, d: int) -> None:
        """Adjust every pair to a penalty changed by ``delta`` (``p' - p``) on the weights of
        ``k_eff`` rows of ``d`` weights and a bias (in place: the pairs are this memory's)."""
        for s, y in zip(self.s, self.y, strict=True):
            y.view(k_eff, d + 1)[:, :d].add_(s.view(k_eff, d + 1)[:, :d], alpha=2.0 * delta)
        kept = [(s, y) for s, y in zip(self.s, self.y, strict=True)
                if float(torch.dot(s, y)) > 0]
        self.s, self.y = [s for s, _ in kept], [y for _, y in kept]

    def to(self, dtype: torch.dtype) -> _Curvature:
        out = _Curvature(self.size)
        out.s = [s.to(dtype, copy=True) for s in self.s]
        out.y = [y.to(dtype, copy=True) for y in self.y]
        return out

    def direction(self, g: torch.Tensor) -> torch.Tensor:
        """``-H g`` by the two-loop recursion (Nocedal and Wright 2006, algorithm 7.4)."""
        q = g.neg()
        if not self.s:
            return q
        alphas = []
        for s, y in zip(reversed(self.s), reversed(self.y), strict=True):
            a = float(torch.dot(s, q)) / float(torch.dot(s, y))
            q.add_(y, alpha=-a)
            alphas.append(a)
        s, y = self.s[-1], self.y[-1]
        q.mul_(float(torch.dot(s, y)) / float(torch.dot(y, y)))
        for (s, y), a in zip(zip(self.s, self.y, strict=True), reversed(alphas), strict=True):
            b = float(torch.dot(y, q)) / float(torch.dot(s, y))
            q.add_(s, alpha=a - b)
        return q


@dataclass
class _Solve:
    theta: torch.Tensor
    loss: float
    grad: torch.Tensor
    n_iter: int
    n_eval: int
    grad_max: float
    converged: bool


#: Relative round-off allowance of the line search's sufficient-decrease test per precision:
#: near the optimum a float32 step decreases the loss by less than its own rounding, so a step
#: whose loss is equal up to round-off and whose gradient is smaller is accepted (convergence
#: is still decided by the gradient test alone).
_LOSS_SLACK = {torch.float64: 1e-15, torch.float32: 5e-7}


def _lbfgs(fun, theta: torch.Tensor, tol: float, max_iter: int, memory: _Curvature,
           start: tuple[float, torch.Tensor] | None = None) -> _Solve:
    """Minimise ``fun(theta) -> (loss, grad)`` from ``theta`` by L-BFGS until the largest
    absolute gradient entry is ``<= tol`` (``memory`` is used and updated in place).

    ``start``: ``fun(theta)`` when the caller already knows it (the sweep does: moving to a
    new penalty changes the previous solution's loss and gradient by a known quadratic term),
    which saves the first evaluation.

    The line search starts at the quasi-Newton step 1 (a scaled gradient step when there is
    no memory) and backtracks by safeguarded quadratic interpolation until the Armijo
    condition holds (with a round-off allowance, see ``_LOSS_SLACK``).  It stops, not
    converged, when ``max_iter`` iterations are spent or no step decreases the objective.
    """
    slack = _LOSS_SLACK.get(theta.dtype, 1e-6)
    if start is None:
        loss, grad = fun(theta)
        n_eval = 1
    else:
        loss, grad = start
        n_eval = 0
    n_iter = 0
    gmax = float(grad.abs().max())
    flat_steps = 0  # consecutive accepted steps that did not lower the loss (round-off)
    while gmax > tol and n_iter < max_iter and flat_steps < 5:
        d = memory.direction(grad)
        gd = float(torch.dot(grad, d))
        if not gd < 0:  # not a descent direction (stale memory): restart from the gradient
            memory.s.clear()
            memory.y.clear()
            d = grad.neg()
            gd = -float(torch.dot(grad, grad))
        t = 1.0 if memory.s else min(1.0, 1.0 / max(float(grad.abs().sum()), 1e-300))
        accepted = False
        for _ in range(40):
            new = theta + t * d
            new_loss, new_grad = fun(new)
            n_eval += 1
            if new_loss <= loss + 1e-4 * t * gd + slack * abs(loss) and math.isfinite(new_loss):
                accepted = True
                break
            # minimiser of the quadratic through loss, gd and new_loss, kept in [0.1t, 0.5t]
            denom = 2.0 * (new_loss - loss - gd * t)
            t_q = -gd * t * t / denom if denom > 0 and math.isfinite(denom) else 0.5 * t
            t = min(0.5 * t, max(0.1 * t, t_q))
        if not accepted:
            break
        flat_steps = flat_steps + 1 if new_loss >= loss else 0
        memory.push(new - theta, new_grad - grad)
        theta, loss, grad = new, new_loss, new_grad
        n_iter += 1
        gmax = float(grad.abs().max())
    return _Solve(theta, loss, grad, n_iter, n_eval, gmax, gmax <= tol)


class LinearProbe(BaseEstimator):
    """L2-regularised multinomial logistic regression fitted with full-batch L-BFGS in torch.

    Minimises, over weights ``W`` and an unpenalised bias ``b``,

    .. math:: \\frac{1}{n}\\sum_i \\mathrm{CE}(W x_i + b, y_i) + \\frac{1}{2 C n}\\lVert W\\rVert^2,

    which is scikit-learn's ``LogisticRegression(C=C)`` objective
    ``C * sum_i CE + ||W||^2 / 2`` divided by ``C n``: the same minimiser, so ``C`` means the
    same thing in both.  As in scikit-learn, two classes use one weight vector (binary
    logistic loss) and three or more use one vector per class (softmax).

    Parameters
    ----------
    C : float
        Inverse regularisation strength (larger = weaker penalty).
    standardize : bool
        Centre and scale each feature with the statistics of the data passed to :meth:`fit`
        (features with zero variance are only centred).  ``coef_`` then refers to the
        standardised features.
    max_iter : int
        Maximum L-BFGS iterations.
    tol : float
        Stop when the largest absolute gradient entry of the objective is below ``tol``
        (scikit-learn's ``tol`` for ``lbfgs`` has the same meaning on the same objective).
    history_size : int
        L-BFGS memory (pairs kept).
    warm_start : bool
        Start :meth:`fit` from the previous solution when the shapes agree.
    device, dtype :
        Where and in which precision to fit; default: the device of ``X`` in :meth:`fit`,
        float64 on the CPU and float32 on CUDA.

    Attributes
    ----------
    classes_ : (K,) int64 tensor of class labels.
    coef_ : (K, d) tensor, or (1, d) for two classes.
    intercept_ : (K,) or (1,) tensor.
    mean_, scale_ : standardisation statistics (``None`` without standardisation).
    n_iter_ : int, L-BFGS iterations of the last fit (all precisions).
    converged_ : bool, whether the largest absolute gradient entry of the objective at the
        solution, evaluated in ``dtype``, is ``<= tol`` (or ``<=`` the resolution floor of
        the precision, 1.5e-8 in float64 and 3.5e-4 in float32, when ``tol`` is below it).
        A stop for any other reason (iteration budget, or no step that decreases the loss,
        as float32 does near flat optima) is *not* convergence.
    grad_max_ : float, that largest absolute gradient entry.
    objective_ : float, objective value at the solution.

    References
    ----------
    .. [1] S. Kornblith, J. Shlens, Q. V. Le, "Do Better ImageNet Models Transfer Better?",
       CVPR 2019.
    .. [2] J. Nocedal, S. J. Wright, "Numerical Optimization", 2nd ed., Springer 2006,
       chapter 7 (L-BFGS).
    """

    def __init__(self, C: float = 1.0, *, standardize: bool = False, max_iter: int = 1000,
                 tol: float = 1e-4, history_size: int = 20, warm_start: bool = False,
                 device: Any = None, dtype: torch.dtype | None = None) -> None:
        self.C = C
        self.standardize = standardize
        self.max_iter = max_iter
        self.tol = tol
        self.history_size = history_size
        self.warm_start = warm_start
        self.device = device
        self.dtype = dtype

    def set_params(self, **params: Any) -> LinearProbe:
        """Set constructor parameters, as in scikit-learn; returns ``self``.

        An unknown name raises :class:`~dtprobe.errors.ConfigError` (a ``ValueError``)."""
        valid = self.get_params(deep=False)
        unknown = [k for k in params if k not in valid]
        if unknown:
            raise ConfigError(f"LinearProbe has no parameter {unknown[0]!r}; valid: "
                              f"{', '.join(valid)}")
        return super().set_params(**params)

    # -- helpers ------------------------------------------------------------------------------
    def _prepare(self, X: ArrayLike, name: str = "X") -> torch.Tensor:
        if not hasattr(self, "classes_"):
            raise ConfigError("LinearProbe is not fitted; call fit(X, y) first")
        x = check_features(X, name, min_samples=1, device=self._device)
        if x.shape[1] != self.coef_.shape[1]:
            raise MetricInputError(f"{name} has {x.shape[1]} features but the probe was fitted "
                                   f"on {self.coef_.shape[1]}")
        x = x.to(self._dtype)
        if self.mean_ is not None:
            x = (x - self.mean_) / self.scale_
        return x

    def _logits(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        z = x @ weight.T + bias
        if weight.shape[0] == 1:  # binary: class 0 has logit 0
            z = torch.cat([torch.zeros_like(z), z], dim=1)
        return z

    def _predict_index(self, xt: torch.Tensor) -> torch.Tensor:
        """Class indices for prepared, transposed features ``xt`` (d, n)."""
        z = torch.addmm(self.intercept_[:, None], self.coef_, xt)
        return (z[0] > 0).long() if z.shape[0] == 1 else z.argmax(dim=0)

    def _accuracy_log_loss(self, xt: torch.Tensor, yi: torch.Tensor) -> tuple[float, float]:
        """Accuracy and mean log-loss on prepared, transposed features ``xt`` (d, n) with
        class indices ``yi`` (``-1``: a class unseen in fit, an error of infinite loss)."""
        z = torch.addmm(self.intercept_[:, None], self.coef_, xt)
        if z.shape[0] == 1:
            z = torch.cat([torch.zeros_like(z), z], dim=0)
        known = yi >= 0
        pred = z.argmax(dim=0)
        acc = float(((pred == yi) & known).double().mean())
        if not bool(known.all()):
            return acc, math.inf
        logp = torch.log_softmax(z.double(), dim=0)
        return acc, float(-logp[yi, torch.arange(yi.numel(), device=yi.device)].mean())

    # -- fitting ------------------------------------------------------------------------------
    def fit(self, X: ArrayLike, y: ArrayLike) -> LinearProbe:
        """Fit the probe on features ``X`` (n, d) and integer labels ``y`` (n,)."""
        device, dtype = _resolve_device_dtype(X, self.device, self.dtype)
        with torch.inference_mode(False), torch.no_grad():
            x = check_features(X, "X", min_samples=2, device=device).to(dtype)
            classes, yi = _encode_labels(y, x.shape[0], "y", device)
            if classes.numel() < 2:
                raise MetricInputError(f"y has {classes.numel()} distinct class(es); a probe "
                                       "needs at least 2")
            mean = scale = None
            if self.standardize:
                mean, scale = _standardizer(x)
                x = (x - mean) / scale
            self._fit_prepared(x.T.contiguous(), yi, classes, mean, scale)
        return self

    def _fit_prepared(self, xt: torch.Tensor, yi: torch.Tensor, classes: torch.Tensor,
                      mean: torch.Tensor | None, scale: torch.Tensor | None,
                      xt_fast: torch.Tensor | None = None,
                      memory: _Curvature | None = None, verify: bool = True,
                      start: tuple[float, torch.Tensor] | None = None) -> None:
        """Solve on prepared features ``xt`` (d, n) (already standardised, right dtype/device)
        with class indices ``yi`` into ``classes``.

        With ``xt_fast`` (the same features in a faster, lower precision) the bulk of the
        iterations runs on it and the solve is then verified, and finished where needed, in
        ``xt``'s precision.  ``memory`` (L-BFGS pairs of the fast precision, for this
        objective) is used and updated: the sweep passes one along the grid.  With
        ``verify=False`` a fast solve that met half the tolerance (twice the margin of its
        gradient's round-off) is not re-evaluated in ``xt``'s precision; it then leaves
        ``_fast_state`` (its solution, loss, gradient and penalty in the fast precision) for
        the next grid point's ``start`` (the fast objective's loss and gradient at the warm
        start, which the sweep derives exactly from ``_fast_state``).
        """
        self._fast_state = None
        C = _check_c(self.C)
        if int(self.max_iter) < 1 or not float(self.tol) > 0:
            raise ConfigError("LinearProbe needs max_iter >= 1 and tol > 0")
        d, n = xt.shape
        dtype, device = xt.dtype, xt.device
        k_eff = 1 if classes.numel() == 2 else int(classes.numel())
        theta = torch.zeros(k_eff, d + 1, dtype=dtype, device=device)
        # cold start: zero weights and the bias that minimises the loss at zero weights (the
        # log class frequencies), the strong-penalty solution's neighbourhood
        counts = torch.bincount(yi, minlength=int(classes.numel())).to(dtype).clamp_(min=0.5)
        log_freq = counts.log()
        theta[:, d] = (log_freq[1:] - log_freq[:1]) if k_eff == 1 else log_freq - log_freq.mean()
        if (self.warm_start and getattr(self, "coef_", None) is not None
                and tuple(self.coef_.shape) == (k_eff, d)):
            theta[:, :d] = self.coef_.to(device=device, dtype=dtype)
            theta[:, d] = self.intercept_.to(device=device, dtype=dtype)
        penalty = 1.0 / (2.0 * C * n)
        tol, max_iter = float(self.tol), int(self.max_iter)
        floor = _GRAD_FLOOR.get(dtype, 0.0)
        n_iter = 0
        theta = theta.reshape(-1)
        if xt_fast is not None and xt_fast.dtype != dtype:
            fast_memory = memory if memory is not None else _Curvature(self.history_size)
            fun = _objective(xt_fast, yi, k_eff, penalty)
            # half the tolerance: the fast precision's gradient carries ~1e-6 of round-off
            fast_floor = _FAST_FLOOR.get(xt_fast.dtype, 0.0)
            res = _lbfgs(fun, theta.to(xt_fast.dtype), max(0.5 * tol, fast_floor), max_iter,
                         fast_memory, start=start)
            theta, n_iter = res.theta.to(dtype), res.n_iter
            # (a tolerance below the fast precision's floor is never met in it: finish below)
            if not verify and res.converged and 0.5 * tol >= fast_floor:
                self._store(res, theta, n_iter, k_eff, d, classes, mean, scale)
                self._fast_state = (res.theta, res.loss, res.grad, penalty)
                return
            memory = fast_memory.to(dtype)
        elif memory is None:
            memory = _Curvature(self.history_size)
        res = _lbfgs(_objective(xt, yi, k_eff, penalty), theta, max(tol, floor),
                     max(1, max_iter - n_iter), memory)
        self._store(res, res.theta, n_iter + res.n_iter, k_eff, d, classes, mean, scale)

    def _store(self, res: _Solve, theta: torch.Tensor, n_iter: int, k_eff: int, d: int,
               classes: torch.Tensor, mean: torch.Tensor | None,
               scale: torch.Tensor | None) -> None:
        theta = theta.reshape(k_eff, d + 1)
        self.n_iter_ = n_iter
        self.grad_max_ = res.grad_max
        self.converged_ = res.converged
        self.objective_ = res.loss
        self.coef_ = theta[:, :d].clone()
        self.intercept_ = theta[:, d].clone()
        self.classes_ = classes
        self.mean_, self.scale_ = mean, scale
        self._device, self._dtype = theta.device, theta.dtype

    # -- inference ----------------------------------------------------------------------------
    def decision_function(self, X: ArrayLike) -> torch.Tensor:
        """Class scores (n, K) (for two classes: column 0 is zero)."""
        x = self._prepare(X)
        return self._logits(x, self.coef_, self.intercept_)

    def predict_proba(self, X: ArrayLike) -> torch.Tensor:
        """Class probabilities (n, K)."""
        return torch.softmax(self.decision_function(X), dim=1)

    def predict(self, X: ArrayLike) -> torch.Tensor:
        """Predicted class labels (values of ``classes_``) as an int64 tensor."""
        index = self.decision_function(X).argmax(dim=1)
        return self.classes_[index]

    def score(self, X: ArrayLike, y: ArrayLike) -> float:
        """Accuracy on ``(X, y)``; labels never seen in :meth:`fit` count as errors."""
        pred = self.predict(X)
        _, yi = _encode_labels(y, pred.shape[0], "y", self._device, self.classes_)
        known = yi >= 0
        correct = torch.zeros_like(known)
        correct[known] = self.classes_[yi[known]] == pred[known]
        return float(correct.double().mean())

    def objective(self, X: ArrayLike, y: ArrayLike) -> float:
        """The training objective (mean CE + ||W||^2 / (2 C n)) of the fitted parameters."""
        x = self._prepare(X)
        _, yi = _encode_labels(y, x.shape[0], "y", self._device, self.classes_)
        if (yi < 0).any():
            raise MetricInputError("y contains labels not seen in fit; the objective is undefined")
        with torch.no_grad():
            ce = F.cross_entropy(self._logits(x, self.coef_, self.intercept_), yi)
            reg = (self.coef_ ** 2).sum() / (2.0 * _check_c(self.C) * x.shape[0])
        return float(ce + reg)

# ------------------------------------------------------------------------------------------
# The probe protocol
# ------------------------------------------------------------------------------------------


@dataclass
class ProbeResult:
    """Outcome of :func:`linear_probe`.

    Attributes
    ----------
    test_accuracy : accuracy of the refitted probe on the test set.
    best_c : the chosen inverse regularisation strength.
    val_accuracy : validation accuracy per evaluated ``C`` (grid points skipped by early
        stopping are absent).  Every entry comes from a solve whose gradient test passed in
        ``dtype``, unless ``sweep_converged`` says otherwise for it.
    train_accuracy : accuracy of the refitted probe on train + validation.
    n_iter : L-BFGS iterations of the final refit.
    n_iter_total : L-BFGS iterations of the whole sweep plus the refit.
    grid : the requested grid, sorted ascending.
    converged : whether the refit *and* the fit at ``best_c`` met the protocol's gradient
        tolerance ``tol`` (see ``LinearProbe.converged_``).  False means the number is
        unverified (and a :class:`ProbeConvergenceWarning` was issued).
    tight : whether both also met the tighter ``select_tol`` (for round-off stability).
    refit_grad_max : largest absolute gradient entry of the refit's objective at its solution.
    sweep_converged : per evaluated ``C``, whether its fit met ``sweep_tol`` (a tolerance
        below the fast precision's floor is finished in ``dtype``).  Unconverged grid points
        are never chosen while a converged one exists.
    n_test : number of test samples (for the confidence interval).
    val_log_loss : validation log-loss per evaluated ``C`` (sweep solutions).
    selection : per candidate ``C`` re-solved to ``select_tol``: its validation accuracy,
        log-loss and convergence (the choice is made on these).
    protocol : the named protocol (``"kornblith2019"`` or ``"short"``).
    """

    test_accuracy: float
    best_c: float
    val_accuracy: dict[float, float]
    train_accuracy: float
    n_iter: int
    n_iter_total: int = 0
    grid: tuple[float, ...] = field(default_factory=tuple)
    converged: bool = True
    tight: bool = True
    refit_grad_max: float = float("nan")
    sweep_converged: dict[float, bool] = field(default_factory=dict)
    n_test: int = 0
    val_log_loss: dict[float, float] = field(default_factory=dict)
    selection: dict[float, dict[str, Any]] = field(default_factory=dict)
    protocol: str = ""

    def interval(self, level: float = CI_LEVEL) -> tuple[float, float]:
        """Wilson score interval of the test accuracy (see :func:`accuracy_interval`)."""
        return accuracy_interval(self.test_accuracy, self.n_test, level)


def stratified_split(labels: ArrayLike, val_fraction: float, seed: int = 0
                     ) -> tuple[np.ndarray, np.ndarray]:
    """Seeded stratified split of sample indices into (train, validation).

    Each class with ``n_c`` samples puts ``round(val_fraction * n_c)`` of them (at most
    ``n_c - 1``, so every class keeps a training sample) into validation, chosen by a
    ``numpy.random.default_rng(seed)`` permutation.  Returns sorted index arrays.
    """
    if not 0.0 < float(val_fraction) < 1.0:
        raise ConfigError(f"val_fraction must be in (0, 1), got {val_fraction}")
    y = as_tensor(labels, dtype=torch.float64, device="cpu").reshape(-1).numpy()
    rng = np.random.default_rng(seed)
    train_parts, val_parts = [], []
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        idx = idx[rng.permutation(idx.size)]
        n_val = min(int(round(val_fraction * idx.size)), idx.size - 1)
        val_parts.append(idx[:n_val])
        train_parts.append(idx[n_val:])
    train = np.sort(np.concatenate(train_parts))
    val = np.sort(np.concatenate(val_parts))
    if val.size == 0:
        raise MetricInputError(f"val_fraction={val_fraction} leaves no validation samples for "
                               f"{y.size} training samples; raise val_fraction or pass more data")
    return train, val


def _sweep_dtype(sweep_dtype: torch.dtype | str | None, dtype: torch.dtype,
                 standardize: bool) -> torch.dtype:
    if sweep_dtype is None:
        return dtype
    if isinstance(sweep_dtype, str) and sweep_dtype == "auto":
        # float32 does most of the work on standardised (well-conditioned) features; every
        # float32 solution is then verified, and finished if needed, in ``dtype``.
        return torch.float32 if standardize and dtype == torch.float64 else dtype
    if not isinstance(sweep_dtype, torch.dtype) or not sweep_dtype.is_floating_point:
        raise ConfigError(f"sweep_dtype={sweep_dtype!r}: pass 'auto', None or a torch float "
                          "dtype")
    return sweep_dtype


def linear_probe(train_x: ArrayLike, train_y: ArrayLike, test_x: ArrayLike, test_y: ArrayLike,
                 *, protocol: str = DEFAULT_PROTOCOL, c_grid: Sequence[float] | None = None,
                 patience: Any = _FROM_PROTOCOL, val_fraction: float = 0.2,
                 standardize: bool = True, max_iter: int = 1000, tol: float = 1e-4,
                 sweep_tol: float | None = None, select_tol: float = 1e-6,
                 n_candidates: int = 4, seed: int = 0, device: Any = None,
                 dtype: torch.dtype | None = None,
                 sweep_dtype: torch.dtype | str | None = "auto") -> ProbeResult:
    """Linear-probe test accuracy with the protocol of Kornblith et al. (2019).

    1. Split the training set (stratified, seeded) into train and validation.
    2. For each ``C`` of the grid from strongest to weakest regularisation, fit a
       :class:`LinearProbe` on the train part (standardised with train-part statistics),
       warm-started from the previous ``C``'s solution and L-BFGS memory, and record
       validation accuracy and log-loss.  The default protocol (``"kornblith2019"``) sweeps
       the papers' 45 values in [1e-6, 1e5] entirely; ``"short"`` sweeps 9 values in
       [1e-3, 10] and stops once validation accuracy has not improved for 3 grid points.
    3. Choose ``C``: the best validation accuracy among converged fits; the (at most
       ``n_candidates``, the most accurate, then the most regularised) grid points within
       one validation sample of it are solved again to
       ``select_tol`` and compared on validation accuracy, ties broken by the lower
       validation log-loss (a continuous criterion, so round-off cannot flip the choice
       between equally accurate values), then by the smaller ``C``.  A single candidate is
       the choice whatever its log-loss, so it is not re-solved.
    4. Refit on train + validation (standardised with their statistics) at the chosen ``C``
       to ``select_tol`` and report test accuracy.

    Convergence is decided by the gradient test alone.  The sweep runs in the fast
    precision (float32 on standardised float64 features) and a sweep fit counts as converged
    when its float32 gradient is below ``tol / 2`` (twice the margin of its round-off, ~1e-6);
    one that stalls before is continued in ``dtype``.  The candidates that choose ``C`` and
    the refit are verified, and finished, in ``dtype`` (float64 unless asked otherwise).  So
    a float32 round-off stall can neither be reported as convergence nor choose ``C``.

    The solver is L-BFGS written for this loop: the memory of curvature pairs is carried
    from one ``C`` to the next (each pair shifted exactly to the new penalty), so a weaker
    regularisation starts from the previous solution *and* its curvature; the previous
    solution's loss and gradient under the new penalty are known exactly (the penalty is
    quadratic), so a grid point costs no evaluation at its start and none at all when its
    warm start already meets the tolerance; one evaluation per iteration where the unit step
    is accepted (Nocedal and Wright 2006, ch. 7).  The first fit starts from zero weights
    and the log class frequencies as bias.  The candidates and the refit start with the
    curvature kept at the most accurate ``C``; the refit's warm start is the chosen solution
    written in the train + validation standardisation (the same linear function).

    Parameters
    ----------
    train_x, train_y : (n, d) features and (n,) integer labels of the probe's training set.
    test_x, test_y : (m, d) features and (m,) labels; labels absent from ``train_y`` count as
        errors.
    protocol : ``"kornblith2019"`` (default; the papers' full sweep) or ``"short"`` (faster,
        see :data:`PROBE_PROTOCOLS`).  Sets the grid and the early-stopping patience.
    c_grid : inverse regularisation strengths; overrides the protocol's grid.
    patience : early-stopping patience of the sweep in grid points (``None``: the whole
        grid); overrides the protocol's.
    val_fraction : fraction of each class held out for choosing ``C``.
    standardize : standardise features with training statistics (cuts L-BFGS iterations
        several-fold).
    max_iter, tol : L-BFGS limits per sweep fit (see :class:`LinearProbe`): a fit converges
        when the largest absolute gradient entry of the mean objective is ``<= tol``, which
        is scikit-learn's ``tol`` for ``lbfgs`` on the same objective.
    sweep_tol : gradient tolerance of the sweep fits; ``None`` (default) is ``tol``.
    select_tol : gradient tolerance of the candidate fits that choose ``C`` and of the
        refit (never looser than ``tol``); tight, so that equal inputs, or inputs equal up
        to round-off, give the same choice and the same test accuracy.
    n_candidates : at most this many grid points are re-solved to ``select_tol``.
    seed : seed of the validation split.
    device : default: the device of ``train_x``.
    dtype : precision in which every fit is verified and finished; default float64 (also on
        CUDA, where only the finishing iterations run in it).
    sweep_dtype : fast precision for the bulk of each solve. ``"auto"`` (default) uses
        float32 when ``dtype`` is float64 and features are standardised. ``None`` runs
        everything in ``dtype``.

    Returns
    -------
    ProbeResult

    References
    ----------
    .. [1] S. Kornblith, J. Shlens, Q. V. Le, "Do Better ImageNet Models Transfer Better?",
       CVPR 2019, section 3 and appendix A.3 (45 values of C in [1e-6, 1e5], refit).
    .. [2] S. Kornblith, T. Chen, H. Lee, M. Norouzi, "Why Do Better Loss Functions Lead to
       Less Transferable Features?", NeurIPS 2021 (the same probe protocol).
    """
    if protocol not in PROBE_PROTOCOLS:
        raise ConfigError(f"unknown probe protocol {protocol!r}; use one of "
                          f"{', '.join(PROBE_PROTOCOLS)}")
    preset = PROBE_PROTOCOLS[protocol]
    grid = tuple(sorted(float(c) for c in (preset["c_grid"] if c_grid is None else c_grid)))
    if patience is _FROM_PROTOCOL:
        patience = preset["patience"]
    if not grid:
        raise ConfigError("c_grid is empty; pass at least one C value")
    for c in grid:
        _check_c(c)
    if patience is not None and int(patience) < 1:
        raise ConfigError(f"patience must be >= 1 or None, got {patience}")
    if int(n_candidates) < 1 or not float(select_tol) > 0:
        raise ConfigError("linear_probe needs n_candidates >= 1 and select_tol > 0")
    # float64 by default on every device: each fit is verified in it (float32 does the bulk)
    device, dtype = _resolve_device_dtype(train_x, device,
                                          torch.float64 if dtype is None else dtype)
    xtr, xte, classes, ytr = _train_test(train_x, test_x, train_y, device, min_train=3)
    if classes.numel() < 2:
        raise MetricInputError(f"train_y has {classes.numel()} distinct class(es); a probe needs "
                               "at least 2")
    _, yte = _encode_labels(test_y, xte.shape[0], "test_y", device, classes)
    if (yte < 0).any():
        warnings.warn(f"test_y has {int((yte < 0).sum())} samples of classes absent from "
                      "train_y; they count as errors", RuntimeWarning, stacklevel=2)

    fit_idx, val_idx = stratified_split(ytr.cpu(), val_fraction, seed)
    fit_idx_t = torch.as_tensor(fit_idx, device=device)
    val_idx_t = torch.as_tensor(val_idx, device=device)
    # A common power-of-two factor is exact and leaves standardised features unchanged, but
    # keeps the variance of features near 1e+-200 from over- or underflowing.
    # (one side at a time, so that at most one extra copy exists at once)
    exponent = pow2_scale_exponent(xtr, xte)
    xtr = ldexp(xtr, -exponent).to(dtype)
    xte = ldexp(xte, -exponent).to(dtype)
    fast = _sweep_dtype(sweep_dtype, dtype, standardize)
    fit_tol = tol if sweep_tol is None else sweep_tol
    tight_tol = min(float(select_tol), float(fit_tol), float(tol))

    def stats(x: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        return _standardizer(x) if standardize else (None, None)

    def transposed(x: torch.Tensor, mean: torch.Tensor | None,
                   scale: torch.Tensor | None) -> torch.Tensor:
        """``((x - mean) / scale).T`` written straight into one contiguous (d, m) buffer."""
        if mean is None or scale is None:
            return x.T.contiguous()
        out = torch.empty(x.shape[1], x.shape[0], dtype=x.dtype, device=x.device)
        torch.sub(x.T, mean[:, None], out=out)
        return out.div_(scale[:, None])

    probe = LinearProbe(grid[0], standardize=standardize, max_iter=max_iter, tol=fit_tol,
                        history_size=_SWEEP_HISTORY, warm_start=True, device=device,
                        dtype=dtype)
    n_iter_total = 0
    d = int(xtr.shape[1])
    k_eff = 1 if classes.numel() == 2 else int(classes.numel())
    weight_mask = torch.ones(k_eff, d + 1, dtype=fast, device=device)
    weight_mask[:, d] = 0.0
    weight_mask = weight_mask.reshape(-1)

    val_acc: dict[float, float] = {}
    val_loss: dict[float, float] = {}
    sweep_ok: dict[float, bool] = {}
    sweep_grad: dict[float, float] = {}
    solutions: dict[float, tuple[torch.Tensor, torch.Tensor]] = {}
    with torch.inference_mode(False), torch.no_grad():
        # Peak memory: the features, one prepared (transposed) copy and its fast-precision
        # copy; each sweep matrix is freed before the refit's are made.
        x_fit = xtr[fit_idx_t]
        n_fit = int(x_fit.shape[0])
        mean, scale = stats(x_fit)
        xt_fit = transposed(x_fit, mean, scale)
        del x_fit
        xt_val = transposed(xtr[val_idx_t], mean, scale)
        xt_fit_fast = xt_fit.to(fast) if fast != dtype else None
        y_fit, y_val = ytr[fit_idx_t], ytr[val_idx_t]
        # the L-BFGS memory travels along the grid (its pairs shifted to each new penalty)
        memory = _Curvature(probe.history_size)
        previous_penalty = previous_c = None
        best_acc, since_best = -1.0, 0
        best_memory: tuple[float, _Curvature] | None = None

        def memory_near(penalty: float) -> _Curvature | None:
            """A copy of the memory kept at the most accurate C, shifted to ``penalty`` (for
            the refit its pairs come from the objective on the fitting part in the fitting
            part's standardisation: an approximation of the curvature, all L-BFGS needs)."""
            if best_memory is None:
                return None
            out = best_memory[1].to(fast)
            out.shift_penalty(penalty - best_memory[0], k_eff, d)
            return out

        for c in grid:
            penalty = 1.0 / (2.0 * c * n_fit)
            if previous_penalty is not None:
                memory.shift_penalty(penalty - previous_penalty, k_eff, d)
            previous_penalty = penalty
            # The previous solution's loss and gradient under the new penalty are known
            # exactly (the penalty is quadratic): no evaluation is spent at the warm start,
            # and a warm start that already meets the tolerance costs nothing.
            state = getattr(probe, "_fast_state", None)
            start = None
            if state is not None:
                theta_prev, loss_prev, grad_prev, penalty_prev = state
                w = theta_prev * weight_mask
                delta = penalty - penalty_prev
                start = (loss_prev + delta * float(torch.dot(w, w)),
                         grad_prev + (2.0 * delta) * w)
            probe.set_params(C=c)
            probe._fit_prepared(xt_fit, y_fit, classes, mean, scale, xt_fast=xt_fit_fast,
                                memory=memory, verify=False, start=start)
            n_iter_total += probe.n_iter_
            if (start is not None and probe.n_iter_ == 0 and probe._fast_state is not None
                    and sweep_ok.get(previous_c, False)):
                # the same parameters as the previous grid point: the same predictions
                val_acc[c], val_loss[c] = val_acc[previous_c], val_loss[previous_c]
            else:
                val_acc[c], val_loss[c] = probe._accuracy_log_loss(xt_val, y_val)
            previous_c = c
            sweep_ok[c] = probe.converged_
            sweep_grad[c] = probe.grad_max_
            solutions[c] = (probe.coef_, probe.intercept_)
            if probe.converged_ and val_acc[c] > best_acc:
                best_acc, since_best = val_acc[c], 0
                # the curvature near the most accurate C so far, for the candidates and the
                # refit (which solve near it again)
                best_memory = (penalty, memory.to(fast))
            else:
                since_best += 1
                if patience is not None and since_best >= patience:
                    break

        # Candidates: converged fits (all fits if none converged) within one validation
        # sample of the best accuracy; at most n_candidates of them, by accuracy and then
        # strongest regularisation first.  Chosen from accuracies alone: the sweep's log-losses
        # at weak regularisation depend on the solver's path (on separable data the solution
        # drifts along flat directions), the re-solved candidates' do not.
        pool = [c for c in val_acc if sweep_ok[c]] or list(val_acc)
        top = max(val_acc[c] for c in pool)
        one_sample = 1.0 / max(1, int(val_idx.size))
        near = [c for c in pool if val_acc[c] >= top - one_sample - 1e-12]
        near.sort(key=lambda c: (-val_acc[c], c))
        candidates = sorted(near[:int(n_candidates)])
        polished: dict[float, tuple[float, float, bool, float]] = {}
        probe.set_params(tol=tight_tol)
        if len(candidates) == 1:
            # a single candidate is the choice whatever its log-loss: nothing to compare, so
            # no tight re-solve (the refit below is solved to ``select_tol`` all the same)
            c = candidates[0]
            polished[c] = (val_acc[c], val_loss[c], sweep_ok[c], sweep_grad[c])
            candidates = []
        for c in candidates:
            probe.set_params(C=c)
            probe.coef_, probe.intercept_ = solutions[c]
            probe._fit_prepared(xt_fit, y_fit, classes, mean, scale, xt_fast=xt_fit_fast,
                                memory=memory_near(1.0 / (2.0 * c * n_fit)))
            n_iter_total += probe.n_iter_
            acc, loss = probe._accuracy_log_loss(xt_val, y_val)
            polished[c] = (acc, loss, probe.converged_, probe.grad_max_)
            solutions[c] = (probe.coef_, probe.intercept_)
        best_c = max(polished, key=lambda c: (polished[c][2] or not any(
            v[2] for v in polished.values()), polished[c][0], -polished[c][1], -c))
        del xt_fit_fast, xt_fit, xt_val

        # refit on train + validation, warm-started from the chosen sweep solution expressed
        # in the new standardisation (the same linear function of the raw features)
        fit_mean, fit_scale = mean, scale
        mean, scale = stats(xtr)
        xt_tr = transposed(xtr, mean, scale)
        del xtr
        xt_te = transposed(xte, mean, scale)
        n_test = int(xte.shape[0])
        del xte
        probe.set_params(C=best_c)
        coef, intercept = solutions[best_c]
        if mean is not None and fit_mean is not None:
            intercept = intercept + coef @ ((mean - fit_mean) / fit_scale)
            coef = coef * (scale / fit_scale)
        probe.coef_, probe.intercept_ = coef, intercept
        probe._fit_prepared(xt_tr, ytr, classes, mean, scale,
                            xt_fast=xt_tr.to(fast) if fast != dtype else None,
                            memory=memory_near(1.0 / (2.0 * best_c * int(xt_tr.shape[1]))))
        n_iter_total += probe.n_iter_
        train_acc = float((probe._predict_index(xt_tr) == ytr).double().mean())
        test_acc = float((probe._predict_index(xt_te) == yte).double().mean())  # yte=-1 never hits
    # The reported number rests on the chosen C's fit and the refit: they must meet the
    # protocol's tolerance ``tol`` (scikit-learn's meaning), else the number is unverified and
    # a warning says so.  Missing only the tighter ``select_tol`` (solved for round-off
    # stability) is recorded (``tight``, ``refit_grad_max``), not alarmed.
    loose = max(float(fit_tol), _GRAD_FLOOR.get(dtype, 0.0))
    chosen_ok = polished[best_c][2] or polished[best_c][3] <= loose
    refit_ok = probe.converged_ or probe.grad_max_ <= loose
    unconverged = [c for c, ok in sweep_ok.items() if not ok and c != best_c]
    if not (chosen_ok and refit_ok):
        what = " and ".join(w for w, ok in (
            (f"the fit at the chosen C={best_c:g} (max |grad| {polished[best_c][3]:.2g})",
             chosen_ok),
            (f"the refit at C={best_c:g} (max |grad| {probe.grad_max_:.2g})", refit_ok))
            if not ok)
        others = (f"; {len(unconverged)} of {len(sweep_ok)} sweep fits at other C values also "
                  "stopped early" if unconverged else "")
        warnings.warn(f"linear_probe: {what} stopped above tol={loose:g} within "
                      f"max_iter={max_iter}: the test accuracy is unverified (raise max_iter)"
                      f"{others}", ProbeConvergenceWarning, stacklevel=2)
    elif unconverged and not _SWEEP_NOTE_SHOWN:
        # C is chosen among converged fits; these only say that some weakly regularised fit
        # (typically on (near-)separable features, whose unpenalised optimum is at infinity)
        # did not finish.  Said once per process, not once per probe (Python's own
        # once-per-call-site registry is cleared by every warnings.catch_warnings() of the
        # analysis); the count is in every result and row.
        _SWEEP_NOTE_SHOWN.add(True)
        warnings.warn("linear_probe: some sweep fits at C values that were not chosen stopped "
                      "at max_iter before tol (weak regularisation); C is chosen among the "
                      "converged fits, and each result records which did not converge "
                      "(ProbeResult.sweep_converged, row diagnostics 'unconverged_sweep_fits')",
                      ProbeSweepConvergenceWarning, stacklevel=2)
    return ProbeResult(test_accuracy=test_acc, best_c=best_c, val_accuracy=val_acc,
                       train_accuracy=train_acc, n_iter=probe.n_iter_,
                       n_iter_total=n_iter_total, grid=grid,
                       converged=bool(chosen_ok and refit_ok),
                       tight=bool(probe.converged_ and polished[best_c][2]),
                       refit_grad_max=float(probe.grad_max_),
                       sweep_converged=sweep_ok, n_test=n_test, val_log_loss=val_loss,
                       selection={c: {"val_accuracy": v[0], "val_log_loss": v[1],
                                      "converged": v[2]} for c, v in polished.items()},
                       protocol=protocol)


# ------------------------------------------------------------------------------------------
# Weighted kNN
# ------------------------------------------------------------------------------------------


def knn_predict(train_x: ArrayLike, train_y: ArrayLike, test_x: ArrayLike, *, k: int = 20,
                temperature: float = 0.07, batch_size: int | None = None,
                device: Any = None, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Weighted-kNN class predictions (labels of ``train_y``) for ``test_x``.

    Cosine similarity; the ``k`` most similar training samples vote with weight
    ``exp(sim / temperature)`` (Wu et al. 2018; DINO).  Ties in the vote go to the smaller
    class label.  See :func:`knn_probe`.
    """
    if int(k) < 1:
        raise ConfigError(f"k must be >= 1, got {k}")
    if not float(temperature) > 0:
        raise ConfigError(f"temperature must be > 0, got {temperature}")
    device, dtype = _resolve_device_dtype(train_x, device, dtype)
    xtr, xte, classes, ytr = _train_test(train_x, test_x, train_y, device, min_train=1)
    # exact per-row power-of-two rescaling first: F.normalize clamps norms below 1e-12, so rows
    # of tiny magnitude would otherwise not be unit vectors (cosine is scale-free; so is this)
    xtr = F.normalize(rowwise_pow2_rescale(xtr).to(dtype), dim=1)
    xte = F.normalize(rowwise_pow2_rescale(xte).to(dtype), dim=1)
    k = min(int(k), xtr.shape[0])
    n_cls = int(classes.numel())
    if batch_size is None:  # keep the (batch, n_train) similarity block near 2**24 entries
        batch_size = max(1, (1 << 24) // max(1, xtr.shape[0]))
    preds = []
    for start in range(0, xte.shape[0], batch_size):
        sim = xte[start:start + batch_size] @ xtr.T
        top_sim, top_idx = sim.topk(k, dim=1)
        # exp((s - 1) / T) is exp(s / T) up to a common factor: same vote, no overflow
        weight = torch.exp((top_sim - 1.0) / float(temperature))
        votes = torch.zeros(top_sim.shape[0], n_cls, dtype=weight.dtype, device=device)
        votes.scatter_add_(1, ytr[top_idx], weight)
        preds.append(votes.argmax(dim=1))
    return classes[torch.cat(preds)]


def knn_probe(train_x: ArrayLike, train_y: ArrayLike, test_x: ArrayLike, test_y: ArrayLike,
              k: int = 20, temperature: float = 0.07, *, batch_size: int | None = None,
              device: Any = None, dtype: torch.dtype | None = None) -> float:
    """Weighted k-nearest-neighbour accuracy of fixed features.

    Features are L2-normalised; for each test sample the ``k`` training samples of highest
    cosine similarity ``s`` vote for their class with weight ``exp(s / temperature)``; the
    class with the largest total wins.  Test samples are processed in batches, so memory is
    ``O(batch_size * n_train)``.

    Parameters
    ----------
    train_x, train_y, test_x, test_y : features (n, d) and integer labels.
    k : number of neighbours (capped at the training-set size).
    temperature : vote temperature ``T``.
    batch_size : test samples per similarity block (default: ~2**24 / n_train).
    device, dtype : default: the device of ``train_x``; float64 on CPU, float32 on CUDA.

    Returns
    -------
    float
        Test accuracy; test labels absent from ``train_y`` count as errors.

    References
    ----------
    .. [1] Z. Wu, Y. Xiong, S. X. Yu, D. Lin, "Unsupervised Feature Learning via
       Non-Parametric Instance Discrimination", CVPR 2018 (weighted kNN, eq. 7-8).
    .. [2] M. Caron et al., "Emerging Properties in Self-Supervised Vision Transformers",
       ICCV 2021 (k = 20, T = 0.07).
    """
    pred = knn_predict(train_x, train_y, test_x, k=k, temperature=temperature,
                       batch_size=batch_size, device=device, dtype=dtype)
    yte = as_tensor(test_y, dtype=torch.float64, device=pred.device).reshape(-1)
    if yte.shape[0] != pred.shape[0]:
        raise MetricInputError(f"test_y has {yte.shape[0]} entries but test_x has "
                               f"{pred.shape[0]} rows")
    return float((pred.double() == yte).double().mean())


# ------------------------------------------------------------------------------------------
# Analysis adapters
# ------------------------------------------------------------------------------------------


def _task_pairs(view: EpochView, metric: str) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    out = []
    for task in sorted(view.train.factors):
        if task not in view.test.factors:
            raise MetricInputError(f"{metric}: downstream task {task!r} has train labels but no "
                                   "test labels; label both splits")
        out.append((task, view.train.factors[task], view.test.factors[task]))
    return out


#: Settings of the registered ``probe_accuracy`` metric besides its protocol (recorded in
#: every row's params with the protocol's name, grid and patience).
PROBE_METRIC_SETTINGS: dict[str, Any] = {"val_fraction": 0.2, "standardize": True,
                                         "tol": 1e-4, "sweep_tol": None, "select_tol": 1e-6,
                                         "n_candidates": 4, "sweep_dtype": "auto"}
#: Settings of the registered ``knn_accuracy`` metric.
KNN_METRIC_SETTINGS: dict[str, Any] = {"k": 20, "temperature": 0.07}


@register_metric("probe_accuracy", default=True,
                 description="downstream linear-probe test accuracy per task: the papers' "
                             "protocol (Kornblith 2019/2021): 45 values of C in [1e-6, 1e5], "
                             "full sweep on a stratified validation split, refit on train + "
                             "validation; --probe-protocol short: 9 values, early stop")
def _probe_accuracy(view: EpochView) -> list[MetricValue]:
    """Linear-probe test accuracy of every downstream task (Kornblith et al. 2019 protocol,
    or the faster named protocol of ``view.probe_protocol``)."""
    rows = []
    protocol = view.probe_protocol
    if protocol not in PROBE_PROTOCOLS:
        raise ConfigError(f"unknown probe protocol {protocol!r}; use one of "
                          f"{', '.join(PROBE_PROTOCOLS)}")
    preset = PROBE_PROTOCOLS[protocol]
    for task, ytr, yte in _task_pairs(view, "probe_accuracy"):
        res = linear_probe(view.train.features, ytr, view.test.features, yte, seed=view.seed,
                           protocol=protocol, **PROBE_METRIC_SETTINGS)
        low, high = res.interval(CI_LEVEL)
        params = {"protocol": protocol, "grid_size": len(res.grid), "grid_min": res.grid[0],
                  "grid_max": res.grid[-1], "patience": preset["patience"],
                  **PROBE_METRIC_SETTINGS, "seed": view.seed}
        # "converged" is false when the refit or the chosen C's fit missed the gradient
        # tolerance: the row says its number is unverified instead of dropping it
        diagnostics = {"C": res.best_c, "val_accuracy": res.val_accuracy[res.best_c],
                       "val_log_loss": res.selection[res.best_c]["val_log_loss"],
                       "converged": res.converged, "tight": res.tight,
                       "refit_grad_max": res.refit_grad_max,
                       "unconverged_sweep_fits": sum(not ok for ok in
                                                     res.sweep_converged.values()),
                       "unconverged_sweep_c": " ".join(f"{c:g}" for c, ok in
                                                       res.sweep_converged.items() if not ok),
                       "grid_points_evaluated": len(res.val_accuracy),
                       "iterations": res.n_iter_total, "n_test": res.n_test,
                       "ci_low": low, "ci_high": high}
        rows.append(MetricValue("probe_accuracy", res.test_accuracy, task=task,
                                estimator="logreg-lbfgs",
                                params={**params, "ci_method": CI_METHOD},
                                diagnostics=diagnostics))
    return rows


@register_metric("knn_accuracy",
                 description="downstream weighted-kNN test accuracy per task (k=20, T=0.07)")
def _knn_accuracy(view: EpochView) -> list[MetricValue]:
    """Weighted kNN test accuracy of every downstream task (Wu et al. 2018)."""
    rows = []
    for task, ytr, yte in _task_pairs(view, "knn_accuracy"):
        acc = knn_probe(view.train.features, ytr, view.test.features, yte,
                        **KNN_METRIC_SETTINGS)
        n_test = int(yte.shape[0])
        low, high = accuracy_interval(acc, n_test, CI_LEVEL)
        rows.append(MetricValue("knn_accuracy", acc, task=task, estimator="weighted-knn-cosine",
                                params={**KNN_METRIC_SETTINGS, "n_test": n_test, "ci_low": low,
                                        "ci_high": high, "ci_method": CI_METHOD}))
    return rows
