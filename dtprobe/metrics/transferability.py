"""Transferability scores: cheap estimates of how well fixed features suit a target task.

Every score here is computed from target-task features (or the source head's outputs on the
target images) and target labels, without training a probe:

========================  ==============================================  =================
score                     what it measures                                paper
========================  ==============================================  =================
:func:`logme`             Bayesian evidence of a linear model             You et al. 2021
:func:`h_score`           between-class / total feature covariance         Bao et al. 2019
:func:`transrate`         coding rate R(Z) - R(Z|Y)                        Huang et al. 2022
:func:`gbc`               Bhattacharyya overlap of class Gaussians          Pandy et al. 2022
:func:`leep`              expected log-likelihood of a re-labelled head    Nguyen et al. 2020
:func:`nce_score`         negative conditional entropy H(Y|Z)             Tran et al. 2019
:func:`nleep`             LEEP of a Gaussian-mixture "head" on features    Li et al. 2021
========================  ==============================================  =================

Higher is better for all of them.  All are computed in float64 on the input's device.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from dtprobe.errors import ConfigError, MetricInputError
from dtprobe.metrics._validation import (
    ArrayLike,
    as_tensor,
    check_features,
    check_labels,
    pow2_rescale,
)
from dtprobe.metrics.convergence import warn_unconverged
from dtprobe.metrics.registry import EpochView, MetricValue, register_metric
from dtprobe.references import with_references

__doc__ = with_references(
    __doc__,
    "you2021",
    "bao2019",
    "ibrahim2022",
    "huang2022",
    "pandy2022",
    "nguyen2020",
    "tran2019",
    "ledoit2004",
    "li2021",
)

__all__ = [
    "LogMEFit",
    "gbc",
    "h_score",
    "ledoit_wolf_shrinkage",
    "leep",
    "logme",
    "logme_fit",
    "nce_score",
    "nleep",
    "transrate",
]

_TINY = 1e-300  # guards divisions by exactly zero in float64


# ------------------------------------------------------------------------------------------
# LogME
# ------------------------------------------------------------------------------------------


@dataclass
class LogMEFit:
    """Maximum of LogME's evidence, one entry per target column.

    Attributes
    ----------
    evidence : (K,) maximum log evidence divided by the number of samples (the supremum where
        the maximum is a limit, see ``optimum``).
    alpha : (K,) prior precision of the weights at the maximum (``inf`` in the zero-weight
        limit).
    beta : (K,) noise precision at the maximum (``inf`` in the interpolation limit).
    n_iter : Newton iterations used (the maximum over columns; 0 when every column's maximum
        is a limit).
    converged : whether every column met the tolerance or has its maximum at a limit.
    optimum : per column, ``"interior"`` (a stationary point, found to ``tol``), ``"t->0"``
        (the evidence increases towards ``alpha / beta -> 0``: the noise-free interpolation of
        the targets, possible when the features' rank is the sample count, e.g. ``n <= D``;
        the value is that limit, exactly), ``"t->inf"`` (the evidence increases towards zero
        weights: the features explain nothing; the value is that limit), ``"unbounded"`` (the
        targets lie in the span of rank-deficient features: the evidence has no finite
        supremum and the value is ``inf``) or ``"unconverged"``.
    """

    evidence: torch.Tensor
    alpha: torch.Tensor
    beta: torch.Tensor
    n_iter: int
    converged: bool
    optimum: tuple[str, ...] = ()


#: Stopping rule of the registered ``logme`` metric (recorded in every row's params).
LOGME_TOL = 1e-10
LOGME_MAX_ITER = 100
#: Grid of LogME's one-dimensional search: log(alpha / beta) in steps of this size ...
_LOGME_GRID_STEP = 0.25
#: ... reaching this far (in log units) beyond the smallest and largest eigenvalue of F^T F,
#: where the evidence is within e^-12 (relative) of its limits.
_LOGME_GRID_MARGIN = 12.0


class _Profile:
    """LogME's evidence maximised over ``beta`` at fixed ``t = alpha / beta``, as a function of
    ``u = log t`` (per column), with its first two derivatives.

    In the left singular basis of ``F`` (eigenvalues ``s_i`` of ``F^T F``, ``z = U^T y``,
    ``o = ||y||^2 - ||z||^2``) the evidence is ``log N(y | 0, beta^-1 (I + F F^T / t))``; its
    maximum over ``beta`` is at ``beta = n / q`` with ``q(t) = sum_i z_i^2 t / (t + s_i) + o``
    and equals ``-n/2 log(2 pi) + n/2 log(n / q) - n/2 - 1/2 sum_i log(1 + s_i / t)``.  With
    ``w_i = s_i / (t + s_i)``, ``p = sum_i z_i^2 w_i (1 - w_i)`` and ``gamma = sum_i w_i``:
    ``dh/du = (gamma - n p / q) / 2``, zero exactly where MacKay's fixed point holds.
    """

    def __init__(self, s2: torch.Tensor, z: torch.Tensor, outside: torch.Tensor, n: int):
        self.s2, self.z2, self.outside, self.n = s2[:, None], z * z, outside, n

    def value(self, u: torch.Tensor) -> torch.Tensor:
        """Evidence per sample at ``u`` of shape (K,), or (G, 1) for one ``u`` per grid row."""
        n = self.n
        if u.ndim == 2:                                 # (G, 1): a grid shared by all columns
            t = torch.exp(u)                            # (G, 1)
            keep = t / (t + self.s2.T)                  # (G, r) = 1 - w
            q = keep @ self.z2 + self.outside           # (G, K)
            logdet = torch.log1p(self.s2.T / t).sum(1, keepdim=True)
        else:
            t = torch.exp(u)[None, :]                   # (1, K)
            keep = t / (t + self.s2)                    # (r, K)
            q = (keep * self.z2).sum(0) + self.outside
            logdet = torch.log1p(self.s2 / t).sum(0)
        h = (-n / 2 * math.log(2 * math.pi) + n / 2 * torch.log(n / q) - n / 2
             - logdet / 2)
        return h / n

    def derivatives(self, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(dh/du, d2h/du2)`` per column at ``u`` (K,), for the evidence *not* per sample."""
        t = torch.exp(u)[None, :]
        w = self.s2 / (t + self.s2)
        keep = t / (t + self.s2)
        ww = w * keep
        q = (keep * self.z2).sum(0) + self.outside
        p = (ww * self.z2).sum(0)
        dp = -(ww * (keep - w) * self.z2).sum(0)
        gamma = w.sum(0)
        dgamma = -ww.sum(0)
        n = self.n
        g = (gamma - n * p / q) / 2
        hess = (dgamma - n * (dp / q - (p / q) ** 2)) / 2
        return g, hess

    def q(self, u: torch.Tensor) -> torch.Tensor:
        t = torch.exp(u)[None, :]
        return (t / (t + self.s2) * self.z2).sum(0) + self.outside


def logme_fit(features: ArrayLike, targets: ArrayLike, *, tol: float = 1e-10,
              max_iter: int = 100) -> LogMEFit:
    """Maximise the evidence of Bayesian linear regression from ``features`` to each target.

    Model (You et al. 2021): ``y = F w + noise``, ``w ~ N(0, alpha^-1 I)``,
    ``noise ~ N(0, beta^-1 I)``.  With ``A = alpha I + beta F^T F`` and
    ``m = beta A^-1 F^T y`` the log evidence is

    ``L = n/2 log beta + D/2 log alpha - n/2 log 2 pi - beta/2 ||F m - y||^2 - alpha/2 m^T m
    - 1/2 log|A|``

    (``log|A|`` over all ``D`` eigenvalues, ``D - rank(F)`` of which equal ``alpha``).  The
    authors maximise it with MacKay's fixed-point iteration ``gamma = sum_i beta s_i /
    (alpha + beta s_i)``, ``alpha = gamma / m^T m``, ``beta = (n - gamma) / ||F m - y||^2``.
    That iteration only moves ``t = alpha / beta`` and can crawl: at ``n <= D`` it needed more
    than 10^5 steps on random features, or never stops because the maximum is a limit
    (``t -> 0`` or ``t -> inf``).  Here the same maximum is found directly: ``beta`` is
    eliminated in closed form (``beta = n / q(t)``, see :class:`_Profile`), the remaining
    one-dimensional evidence in ``u = log t`` is evaluated on a grid covering the spectrum
    of ``F^T F`` and both limits, and the best grid point is refined by safeguarded Newton
    steps until a step is below ``tol`` (in ``u``, i.e. a relative change of ``alpha / beta``).
    The stationary point is MacKay's fixed point; where the supremum is a limit its value is
    computed exactly (see :attr:`LogMEFit.optimum`).  One SVD of ``F`` serves every column.

    Parameters
    ----------
    features : (n, D) features ``F`` (used as given, no centring).
    targets : (n,) or (n, K) real targets.
    tol : Newton steps in ``log(alpha / beta)`` below this count as converged.  (The
        authors' code stops at a relative change of 1e-3 in ``alpha / beta`` or after 11
        iterations.)
    max_iter : Newton iterations at most; a column still moving then is reported
        unconverged.

    Returns
    -------
    LogMEFit

    Notes
    -----
    The authors' ``LogME._fit_fixed_point`` (thuml/LogME) sums ``log(alpha + beta s_i)``
    over the ``min(n, D)`` singular values only, dropping ``(D - n) log(alpha)`` from
    ``log|A|`` when ``n < D``; their earlier ``_fit_icml`` and the formula above keep it.
    Here the formula is followed (the value then depends on ``F`` only through ``F F^T``).

    References
    ----------
    .. [1] K. You, Y. Liu, J. Wang, M. Long, "LogME: Practical Assessment of Pre-trained
       Models for Transfer Learning", ICML 2021, algorithm 1.
    .. [2] D. J. C. MacKay, "Bayesian interpolation", Neural Computation 4(3), 1992.
    """
    f = check_features(features, "features")
    n, dim = f.shape
    y = as_tensor(targets, device=f.device)
    if y.ndim == 1:
        y = y[:, None]
    if y.ndim != 2 or y.shape[0] != n:
        raise MetricInputError(f"targets must have {n} rows (one per feature row), got shape "
                               f"{tuple(y.shape)}")
    if not bool(torch.isfinite(y).all()):
        raise MetricInputError("targets contain NaN/Inf")
    if int(max_iter) < 1 or not float(tol) > 0:
        raise ConfigError(f"logme needs max_iter >= 1 and tol > 0, got max_iter={max_iter}, "
                          f"tol={tol}")
    u_left, s, _ = torch.linalg.svd(f, full_matrices=False)
    if float(s.max()) == 0.0:
        raise MetricInputError("features are all zero; LogME is undefined (dead layer?)")
    eps = torch.finfo(f.dtype).eps
    # numerical rank: directions below round-off carry no signal and would only add noise to
    # the interpolation limit
    keep = s > s.max() * max(n, dim) * eps
    u_left, s = u_left[:, keep], s[keep]
    r = int(s.shape[0])
    s2 = s * s
    z = u_left.T @ y                                   # (r, K) targets in the left basis
    y2 = (y * y).sum(0)
    if r == n:   # the features span R^n: nothing of y is outside (exactly, not to round-off)
        outside = torch.zeros_like(y2)
    else:        # the projection residual directly (no cancellation in ||y||^2 - ||z||^2)
        outside = ((y - u_left @ z) ** 2).sum(0)
    k = y.shape[1]
    prof = _Profile(s2, z, outside, n)

    # both limits of the profiled evidence (per sample)
    log2pi = math.log(2 * math.pi)
    zero_weights = (-log2pi + torch.log(n / y2) - 1) / 2           # t -> inf: w = 0
    tiny = (n * eps) ** 2 * y2
    if r == n:
        q0 = (z * z / s2[:, None]).sum(0)                          # q(t) / t as t -> 0
        interp = (-log2pi + torch.log(n / q0) - 1) / 2 - torch.log(s2).sum() / (2 * n)
    else:
        interp = torch.where(outside <= tiny, torch.inf, -torch.inf).to(f.dtype)
        q0 = torch.full_like(y2, torch.nan)
    # the grid: the evidence is flat (within e^-12) beyond its ends
    lo = float(torch.log(s2.min())) - _LOGME_GRID_MARGIN
    hi = float(torch.log(s2.max())) + _LOGME_GRID_MARGIN
    grid = torch.arange(lo, hi + _LOGME_GRID_STEP, _LOGME_GRID_STEP, dtype=f.dtype,
                        device=f.device)
    values = prof.value(grid[:, None])                             # (G, K)
    best_val, best = values.max(0)
    at_zero = interp >= best_val
    at_inf = (zero_weights >= best_val) & ~at_zero
    # safeguarded Newton on dh/du = 0 within the best grid point's neighbours
    last = grid.shape[0] - 1
    a = grid[(best - 1).clamp(min=0)]
    b = grid[(best + 1).clamp(max=last)]
    u = grid[best]
    done = at_zero | at_inf
    iters = torch.zeros(k, dtype=torch.long, device=f.device)
    for _ in range(int(max_iter)):
        if bool(done.all()):
            break
        g, hess = prof.derivatives(u)
        step = -g / hess
        small = (hess < 0) & (step.abs() <= float(tol))
        a = torch.where(g > 0, u, a)                   # the maximum is above u where g > 0
        b = torch.where(g > 0, b, u)
        cand = u + step
        ok = (hess < 0) & torch.isfinite(cand) & (cand > a) & (cand < b)
        nxt = torch.where(ok | small, cand, (a + b) / 2)
        iters = iters + (~done).long()
        u = torch.where(done, u, nxt)
        done = done | small
    interior = ~(at_zero | at_inf)
    converged_cols = done
    ev = prof.value(u)
    # the refined point never loses to the grid (a safeguard, not an expected event)
    ev = torch.where(interior & (ev < best_val), best_val, ev)
    q = prof.q(u)
    beta = n / q
    alpha = torch.exp(u) * beta
    ev = torch.where(at_zero, interp, torch.where(at_inf, zero_weights, ev))
    alpha = torch.where(at_zero, n / q0, torch.where(at_inf, torch.inf, alpha))
    beta = torch.where(at_zero, torch.inf, torch.where(at_inf, n / y2, beta))
    optimum = tuple("unbounded" if bool(at_zero[c]) and math.isinf(float(interp[c]))
                    else "t->0" if bool(at_zero[c]) else "t->inf" if bool(at_inf[c])
                    else "interior" if bool(converged_cols[c]) else "unconverged"
                    for c in range(k))
    converged = all(o in ("interior", "t->0", "t->inf") for o in optimum)
    return LogMEFit(evidence=ev, alpha=alpha, beta=beta, n_iter=int(iters.max()),
                    converged=converged, optimum=optimum)


def _logme_classes(features: ArrayLike, labels: ArrayLike, tol: float,
                   max_iter: int) -> LogMEFit:
    f = check_features(features, "features")
    y, k = check_labels(labels, f.shape[0], "labels")
    onehot = torch.zeros(f.shape[0], k, dtype=f.dtype, device=f.device)
    onehot[torch.arange(f.shape[0], device=f.device), y] = 1.0
    fit = logme_fit(f, onehot, tol=tol, max_iter=max_iter)
    if not fit.converged:
        bad = [c for c, o in enumerate(fit.optimum) if o == "unconverged"]
        if bad:
            warn_unconverged("logme", f"the evidence of {len(bad)} of {k} class(es) was still "
                             f"moving after max_iter={max_iter} Newton steps", "raise max_iter",
                             stacklevel=4)
        if "unbounded" in fit.optimum:
            warn_unconverged("logme", "the labels lie in the span of rank-deficient features "
                             "(exactly collapsed classes?), so the evidence has no maximum "
                             "and LogME is inf", "use features with within-class variation",
                             stacklevel=4)
    return fit


def logme(features: ArrayLike, labels: ArrayLike, *, tol: float = 1e-10,
          max_iter: int = 100) -> float:
    """LogME score of features for a classification task (You et al. 2021).

    Each class's one-hot indicator is a regression target; the score is the mean over classes
    of the maximum log evidence per sample (see :func:`logme_fit`).  An
    :class:`~dtprobe.metrics.convergence.EstimatorConvergenceWarning` says when a class's
    maximum was not found within ``max_iter`` Newton steps.

    Parameters
    ----------
    features : (n, D) target-task features.
    labels : (n,) integer target labels (at least two classes).
    tol, max_iter : stopping rule of the maximisation (see :func:`logme_fit`).

    Returns
    -------
    float
        Mean per-sample log evidence (higher = more transferable).

    References
    ----------
    .. [1] K. You, Y. Liu, J. Wang, M. Long, "LogME: Practical Assessment of Pre-trained
       Models for Transfer Learning", ICML 2021.
    """
    return float(_logme_classes(features, labels, tol, max_iter).evidence.mean())


# ------------------------------------------------------------------------------------------
# H-score
# ------------------------------------------------------------------------------------------


def ledoit_wolf_shrinkage(features: ArrayLike) -> float:
    """Ledoit-Wolf (2004) shrinkage coefficient for the covariance of ``features``.

    With centred rows ``x_i``, ``S = X^T X / n`` and ``mu = tr(S) / d``:
    ``delta = ||S - mu I||_F^2 / d``, ``b = sum_i ||x_i x_i^T - S||_F^2 / (n^2 d)`` and the
    coefficient is ``min(b, delta) / delta`` (0 when ``delta = 0``).

    References
    ----------
    .. [1] O. Ledoit, M. Wolf, "A well-conditioned estimator for large-dimensional covariance
       matrices", J. Multivariate Analysis 88(2), 2004, lemma 3.2-3.4.
    """
    x = check_features(features, "features")
    x = x - x.mean(dim=0)
    n, d = x.shape
    s = x.T @ x / n
    mu = torch.trace(s) / d
    s_fro2 = (s * s).sum()
    delta = (s_fro2 - 2 * mu * torch.trace(s) + d * mu * mu) / d
    row_norm2 = (x * x).sum(dim=1)
    # sum_i ||x_i x_i^T - S||_F^2 = sum_i ||x_i||^4 - n ||S||_F^2
    b = ((row_norm2 * row_norm2).sum() / n - s_fro2) / (n * d)
    if float(delta) <= 0.0:
        return 0.0
    return float(torch.clamp(b, min=0.0).minimum(delta) / delta)


def h_score(features: ArrayLike, labels: ArrayLike, *,
            shrinkage: float | str | None = None) -> float:
    """H-score of features for a classification task (Bao et al. 2019).

    ``H(f) = tr(cov(f)^+ cov(g))`` where ``g(x) = E[f | y(x)]`` is each sample's class-
    conditional mean feature, so ``cov(g) = sum_c (n_c / n) (mu_c - mu)(mu_c - mu)^T``; ``^+``
    is the Moore-Penrose pseudo-inverse (constant feature directions are ignored).  (Some
    public code computes the inverse of a trace instead of the trace of a product; that is a
    different, wrong quantity.)

    With ``shrinkage`` the regularised H-score of Ibrahim et al. (2022) is returned:
    ``H_a = tr(cov_a(f)^-1 (1 - a) cov(g))`` with
    ``cov_a(f) = (1 - a) cov(f) + a (tr cov(f) / d) I``.

    Parameters
    ----------
    features : (n, d) target-task features.
    labels : (n,) integer target labels (at least two classes).
    shrinkage : ``None`` (plain H-score), a coefficient ``a`` in [0, 1], or ``"ledoit-wolf"``
        for the Ledoit-Wolf coefficient (:func:`ledoit_wolf_shrinkage`) as in Ibrahim et al.

    Returns
    -------
    float
        The H-score (0 <= H <= min(d, C - 1); higher = more discriminative features).

    References
    ----------
    .. [1] Y. Bao et al., "An Information-Theoretic Approach to Transferability in Task
       Transfer Learning", ICIP 2019, definition 2.
    .. [2] S. Ibrahim, N. Ponomareva, R. Mazumder, "Newer is not always better: Rethinking
       transferability metrics, their peculiarities, stability and performance",
       ECML-PKDD 2022, section 4.
    """
    f = check_features(features, "features")
    y, k = check_labels(labels, f.shape[0], "labels")
    n, d = f.shape
    # H is invariant to scaling f; an exact power-of-two rescaling of the centred features
    # keeps covariances of features near 1e+-200 representable
    (f,) = pow2_rescale(f - f.mean(dim=0))
    counts = torch.bincount(y, minlength=k).to(f.dtype)
    means = torch.zeros(k, d, dtype=f.dtype, device=f.device).index_add_(0, y, f)
    means = means / counts[:, None]
    cov_f = f.T @ f / n
    cov_g = (means * (counts / n)[:, None]).T @ means
    if shrinkage is None:
        a = 0.0
    elif isinstance(shrinkage, str):
        if shrinkage.lower().replace("_", "-") != "ledoit-wolf":
            raise ConfigError(f"shrinkage must be None, a number in [0, 1] or 'ledoit-wolf', "
                              f"got {shrinkage!r}")
        a = ledoit_wolf_shrinkage(f)
    else:
        a = float(shrinkage)
        if not 0.0 <= a <= 1.0:
            raise ConfigError(f"shrinkage must be in [0, 1], got {shrinkage}")
    if a > 0.0:
        eye = torch.eye(d, dtype=f.dtype, device=f.device)
        cov_f = (1 - a) * cov_f + a * (torch.trace(cov_f) / d) * eye
        cov_g = (1 - a) * cov_g
    return float(torch.trace(torch.linalg.pinv(cov_f, hermitian=True) @ cov_g))


# ------------------------------------------------------------------------------------------
# TransRate
# ------------------------------------------------------------------------------------------


def _coding_rate(z: torch.Tensor, eps: float) -> torch.Tensor:
    """``1/2 logdet(I_d + Z^T Z / (n eps))``, via the smaller of the two Gram matrices."""
    n, d = z.shape
    gram = z.T @ z if d <= n else z @ z.T
    eye = torch.eye(gram.shape[0], dtype=z.dtype, device=z.device)
    return 0.5 * torch.linalg.slogdet(eye + gram / (n * eps))[1]


def transrate(features: ArrayLike, labels: ArrayLike, eps: float = 1e-4) -> float:
    """TransRate of features for a classification task (Huang et al. 2022).

    ``TrR = R(Z, eps) - R(Z | Y, eps)`` with the coding rate
    ``R(Z, eps) = 1/2 logdet(I_d + Z^T Z / (n eps))`` of the centred features ``Z`` (n rows)
    and ``R(Z | Y, eps) = (1 / C) sum_c R(Z_c, eps)`` over the rows ``Z_c`` of each class
    (each with its own row count).  This is the scaling of the authors' released code, in
    which ``eps`` plays the role of the squared distortion.

    Parameters
    ----------
    features : (n, d) target-task features (centred here).
    labels : (n,) integer target labels (at least two classes).
    eps : distortion; the value changes the score's scale, so compare scores at one ``eps``.

    Returns
    -------
    float
        TransRate in nats (higher = more transferable).

    References
    ----------
    .. [1] L.-K. Huang, J. Huang, Y. Rong, Q. Yang, Y. Wei, "Frustratingly Easy
       Transferability Estimation", ICML 2022, section 3.
    """
    if not float(eps) > 0:
        raise ConfigError(f"transrate eps must be > 0, got {eps}")
    f = check_features(features, "features")
    y, k = check_labels(labels, f.shape[0], "labels")
    z = f - f.mean(dim=0)
    r_z = _coding_rate(z, float(eps))
    r_zy = sum(_coding_rate(z[y == c], float(eps)) for c in range(k)) / k
    return float(r_z - r_zy)


# ------------------------------------------------------------------------------------------
# GBC
# ------------------------------------------------------------------------------------------


def gbc(features: ArrayLike, labels: ArrayLike, *, gaussian: str = "spherical",
        var_floor: float = 1e-4) -> float:
    """Gaussian Bhattacharyya Coefficient of features for a classification task (Pandy 2022).

    Each class ``c`` is modelled as a Gaussian ``N(mu_c, Sigma_c)`` with ``Sigma_c`` diagonal
    (per-dimension population variances) or spherical (``sigma_c^2 I`` with ``sigma_c^2`` the
    mean of those variances); variances below ``var_floor`` are raised to it, as in the
    authors' code.  For two classes with ``Sigma = (Sigma_1 + Sigma_2) / 2`` the Bhattacharyya
    distance is

    ``D_B = 1/8 (mu_1 - mu_2)^T Sigma^-1 (mu_1 - mu_2)
    + 1/2 ln(det Sigma / sqrt(det Sigma_1 det Sigma_2))``

    and ``BC = exp(-D_B)``.  The score is ``GBC = -sum_i sum_{j != i} BC(c_i, c_j)`` over
    ordered class pairs (each unordered pair counts twice), as in the paper.

    Note: for the spherical variant the log-determinant term here carries its factor ``d``
    (``det(s I) = s^d``), as the Gaussian formula requires; the authors' released code sums
    the log of the scalar variance once, which changes values (not the rule above).

    Parameters
    ----------
    features : (n, d) target-task features (the paper reduces them with PCA first; pass the
        reduced features if you want that).
    labels : (n,) integer target labels (at least two classes).
    gaussian : ``"spherical"`` (the paper's default) or ``"diagonal"``.
    var_floor : lower bound on each variance.

    Returns
    -------
    float
        GBC, in ``[-C (C - 1), 0]``; higher (closer to 0) = better separated classes.

    References
    ----------
    .. [1] M. Pándy, A. Agostinelli, J. Uijlings, V. Ferrari, T. Mensink, "Transferability
       Estimation using Bhattacharyya Class Separability", CVPR 2022, eq. 2-4.
    """
    if gaussian not in ("spherical", "diagonal"):
        raise ConfigError(f"gbc gaussian must be 'spherical' or 'diagonal', got {gaussian!r}")
    if not float(var_floor) > 0:
        raise ConfigError(f"gbc var_floor must be > 0, got {var_floor}")
    f = check_features(features, "features")
    y, k = check_labels(labels, f.shape[0], "labels")
    d = f.shape[1]
    counts = torch.bincount(y, minlength=k).to(f.dtype)[:, None]
    means = torch.zeros(k, d, dtype=f.dtype, device=f.device).index_add_(0, y, f) / counts
    sq = torch.zeros(k, d, dtype=f.dtype, device=f.device).index_add_(0, y, (f - means[y]) ** 2)
    var = (sq / counts).clamp(min=float(var_floor))    # (K, d)
    if gaussian == "spherical":
        var = var.mean(dim=1, keepdim=True).expand(k, d)
    log_var = torch.log(var)
    total = torch.zeros((), dtype=f.dtype, device=f.device)
    for i in range(k):  # one row of the pair matrix at a time: O(K d) memory
        avg = (var[i] + var) / 2                        # (K, d)
        maha = ((means[i] - means) ** 2 / avg).sum(dim=1) / 8
        logdet = (torch.log(avg) - (log_var[i] + log_var) / 2).sum(dim=1) / 2
        bc = torch.exp(-(maha + logdet))
        bc[i] = 0.0  # drop j == i by masking: subtracting its 1 would erase BCs below 1e-16
        total = total + bc.sum()
    return float(-total)


# ------------------------------------------------------------------------------------------
# LEEP and NCE (use the source head's outputs on the target images)
# ------------------------------------------------------------------------------------------


def _check_probs(p: ArrayLike) -> torch.Tensor:
    probs = check_features(p, "source_probs", min_samples=1)
    if (probs < 0).any():
        raise MetricInputError("source_probs has negative entries; pass softmax(logits), not "
                               "logits")
    sums = probs.sum(dim=1)
    if not torch.allclose(sums, torch.ones_like(sums), atol=1e-3):
        raise MetricInputError("source_probs rows do not sum to 1; pass softmax(logits) of the "
                               "source head")
    return probs / sums[:, None]


def leep(source_probs: ArrayLike, target_labels: ArrayLike) -> float:
    """Log Expected Empirical Prediction (Nguyen et al. 2020).

    With the source head's class probabilities ``theta(x_i)`` over source labels ``z``, the
    empirical joint ``P(y, z) = (1/n) sum_{i: y_i = y} theta(x_i)_z``, ``P(z) = sum_y P(y, z)``
    and ``P(y | z) = P(y, z) / P(z)``:
    ``LEEP = (1/n) sum_i log sum_z P(y_i | z) theta(x_i)_z``.

    Parameters
    ----------
    source_probs : (n, Z) source-head probabilities on the target images (rows sum to 1).
    target_labels : (n,) integer target labels (at least two classes).

    Returns
    -------
    float
        LEEP, ``<= 0`` (higher = more transferable).

    References
    ----------
    .. [1] C. V. Nguyen, T. Hassner, M. Seeger, C. Archambeau, "LEEP: A New Measure to
       Evaluate Transferability of Learned Representations", ICML 2020, eq. 1-2.
    """
    theta = _check_probs(source_probs)
    n, nz = theta.shape
    y, k = check_labels(target_labels, n, "target_labels")
    joint = torch.zeros(k, nz, dtype=theta.dtype, device=theta.device).index_add_(0, y, theta) / n
    marginal = joint.sum(dim=0)
    cond = torch.where(marginal > 0, joint / marginal.clamp(min=_TINY), torch.zeros_like(joint))
    eep = (cond[y] * theta).sum(dim=1)
    return float(torch.log(eep).mean())


def nce_score(source_pred: ArrayLike, target_labels: ArrayLike) -> float:
    """Negative Conditional Entropy ``-H(Y | Z)`` (Tran et al. 2019).

    ``Z`` is the source head's predicted label on each target image; with the empirical joint
    ``P(y, z)`` of (target label, source prediction) counts,
    ``NCE = sum_{y, z} P(y, z) log(P(y, z) / P(z))``.

    Parameters
    ----------
    source_pred : (n,) integer source predictions, or (n, Z) source scores/probabilities
        (their row-wise argmax is used).
    target_labels : (n,) integer target labels (at least two classes).

    Returns
    -------
    float
        NCE in nats, in ``[-log C, 0]`` (higher = more transferable).

    References
    ----------
    .. [1] A. T. Tran, C. V. Nguyen, T. Hassner, "Transferability and Hardness of Supervised
       Classification Tasks", ICCV 2019, eq. 3-4.
    """
    t = as_tensor(source_pred)
    if t.ndim == 2:
        t = check_features(t, "source_pred", min_samples=1).argmax(dim=1)
    n = int(t.reshape(-1).shape[0])
    z, nz = check_labels(t, n, "source_pred", min_classes=1)
    y, k = check_labels(target_labels, n, "target_labels", device=z.device)
    joint = torch.bincount(y * nz + z, minlength=k * nz).reshape(k, nz).to(torch.float64) / n
    marginal = joint.sum(dim=0, keepdim=True).expand_as(joint)
    nonzero = joint > 0
    return float((joint[nonzero] * torch.log(joint[nonzero] / marginal[nonzero])).sum())


#: Li et al. (2021): PCA keeping 80 % of the variance, 5 Gaussian components per target class.
NLEEP_VARIANCE = 0.8
NLEEP_COMPONENT_RATIO = 5
#: EM stopping rule of NLEEP's mixture (scikit-learn's defaults): at most this many EM steps ...
NLEEP_MAX_ITER = 100
#: ... until the per-sample log-likelihood bound changes by less than this.
NLEEP_TOL = 1e-3
#: Lloyd iterations of the mixture's k-means start at most (scikit-learn's ``KMeans`` default,
#: the start ``GaussianMixture`` uses itself).
NLEEP_INIT_MAX_ITER = 300
#: Variance floor added to every covariance (scikit-learn's ``GaussianMixture.reg_covar``).
NLEEP_REG_COVAR = 1e-6


def nleep(features: ArrayLike, target_labels: ArrayLike, *,
          variance: float = NLEEP_VARIANCE, component_ratio: int = NLEEP_COMPONENT_RATIO,
          covariance_type: str = "diag", seed: int = 0, max_iter: int = NLEEP_MAX_ITER,
          tol: float = NLEEP_TOL, init_max_iter: int = NLEEP_INIT_MAX_ITER) -> float:
    """NLEEP: LEEP with a Gaussian mixture in place of the source head (Li et al. 2021).

    The features are centred and reduced by PCA to the leading directions that explain
    ``variance`` of the variance; a Gaussian mixture with ``component_ratio x K`` components
    (``K`` target classes; fewer when that would reach ``n``) is fitted by EM; its posterior
    component probabilities replace the source head's class probabilities in :func:`leep`.

    Parameters
    ----------
    features : (n, d) target-image features (numpy or torch, CPU or CUDA; PCA in float64 on
        the device, the mixture with scikit-learn on the CPU).
    target_labels : (n,) integer target labels (at least two classes).
    variance : fraction of variance the PCA keeps, in ``(0, 1]``.
    component_ratio : mixture components per target class (positive integer).
    covariance_type : scikit-learn ``GaussianMixture`` covariance type; ``"diag"`` (default)
        is well-posed on the PCA coordinates for any class size; ``"full"`` as some
        re-implementations use.
    seed : random state of the mixture's k-means initialisation (the score depends on it).
    max_iter, tol : EM stopping rule (scikit-learn's ``GaussianMixture``: stop when the
        per-sample lower bound changes by less than ``tol``).  When EM stops at ``max_iter``
        first, one :class:`~dtprobe.metrics.convergence.EstimatorConvergenceWarning` line says
        so (the registered metric records ``converged`` and ``n_iter`` in the row).
    init_max_iter : Lloyd iterations of the k-means start at most.  The start is the one
        scikit-learn's ``GaussianMixture`` makes itself (``KMeans(n_init=1)`` with the same
        seed, one-hot responsibilities, ``reg_covar`` 1e-6), run here so that its own
        convergence is known: a k-means that stops at ``init_max_iter`` gives the same one-line
        warning and ``converged`` is then false in the row.

    Returns
    -------
    float
        NLEEP, ``<= 0`` (higher = more transferable).  Invariant to translations, rotations
        and isotropic scaling of the features (PCA coordinates are, up to sign) and to the
        sample order up to the mixture's initialisation.

    Raises
    ------
    MetricInputError
        Wrong shapes, NaN/Inf, fewer than two classes, constant features.
    ConfigError
        ``variance`` outside ``(0, 1]`` or ``component_ratio`` not a positive integer.

    References
    ----------
    .. [1] Y. Li, X. Jia, R. Sang, Y. Zhu, B. Green, L. Wang, B. Gong, "Ranking Neural
       Checkpoints", CVPR 2021 (N-LEEP).
    """
    return _nleep(features, target_labels, variance=variance, component_ratio=component_ratio,
                  covariance_type=covariance_type, seed=seed, max_iter=max_iter, tol=tol,
                  init_max_iter=init_max_iter)[0]


def _mixture_start(z: np.ndarray, labels: np.ndarray, components: int,
                   covariance_type: str) -> dict[str, np.ndarray]:
    """Weights, means and precisions of a mixture whose responsibilities are one-hot ``labels``.

    The maximum-likelihood M-step on hard assignments plus the variance floor
    :data:`NLEEP_REG_COVAR`, as scikit-learn's ``GaussianMixture`` computes its k-means start
    (counts padded by ``10 eps`` so that an empty cluster stays finite).
    """
    n, d = z.shape
    resp = np.zeros((n, components))
    resp[np.arange(n), labels] = 1.0
    nk = resp.sum(axis=0) + 10 * np.finfo(np.float64).eps
    means = resp.T @ z / nk[:, None]
    if covariance_type == "tied":
        cov = (z.T @ z - (nk[:, None] * means).T @ means) / nk.sum()
        precisions = np.linalg.inv(cov + NLEEP_REG_COVAR * np.eye(d))
    elif covariance_type == "full":
        precisions = np.empty((components, d, d))
        for k in range(components):
            diff = z - means[k]
            cov = (resp[:, k] * diff.T) @ diff / nk[k] + NLEEP_REG_COVAR * np.eye(d)
            precisions[k] = np.linalg.inv(cov)
    else:
        var = resp.T @ (z * z) / nk[:, None] - means**2 + NLEEP_REG_COVAR
        precisions = 1.0 / (var.mean(axis=1) if covariance_type == "spherical" else var)
    return {"weights_init": nk / n, "means_init": means, "precisions_init": precisions}


def _nleep(features: ArrayLike, target_labels: ArrayLike, *, variance: float,
           component_ratio: int, covariance_type: str, seed: int, max_iter: int,
           tol: float, init_max_iter: int = NLEEP_INIT_MAX_ITER
           ) -> tuple[float, dict[str, Any]]:
    """:func:`nleep` and its diagnostics ``{"converged", "n_iter", "init_converged",
    "init_n_iter", "n_components"}`` (``converged``: the k-means start and EM both did)."""
    from sklearn.cluster import KMeans
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.mixture import GaussianMixture

    for name, value in (("max_iter", max_iter), ("init_max_iter", init_max_iter)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"nleep needs an integer {name} >= 1, got {name}={value!r}")
    if not float(tol) > 0:
        raise ConfigError(f"nleep needs tol > 0, got tol={tol!r}")
    if covariance_type not in ("diag", "full", "tied", "spherical"):
        raise ConfigError(f"covariance_type={covariance_type!r}: use diag, full, tied or "
                          "spherical")
    if not 0.0 < variance <= 1.0:
        raise ConfigError(f"variance={variance!r} must be a fraction in (0, 1]")
    if isinstance(component_ratio, bool) or not isinstance(component_ratio, int) \
            or component_ratio < 1:
        raise ConfigError(f"component_ratio={component_ratio!r} must be a positive integer")
    f = check_features(features, "features")
    n = f.shape[0]
    y, k = check_labels(target_labels, n, "target_labels", device=f.device)
    f = f - f.mean(dim=0)
    u, s, _ = torch.linalg.svd(f, full_matrices=False)
    if float(s.max()) == 0.0:
        raise MetricInputError("features are constant; nleep needs variance to fit a mixture")
    energy = torch.cumsum(s**2, dim=0)
    r = int((energy < variance * energy[-1]).sum()) + 1
    # PCA coordinates scaled by the top singular value: the mixture sees the same problem for
    # any isotropic rescaling of the features (its variance floor reg_covar is absolute).
    z = (u[:, :r] * (s[:r] / s[0])).cpu().numpy()
    components = component_ratio * k
    while components >= n and components > k:
        components -= k
    components = min(components, n - 1) if n > 1 else 1
    with warnings.catch_warnings():
        # scikit-learn's multi-line warnings are replaced by the one-line ones below
        warnings.simplefilter("ignore", ConvergenceWarning)
        # The k-means start GaussianMixture would make itself (same seed, same estimator),
        # made here so that its convergence is known; EM then starts from exactly it.
        kmeans = KMeans(n_clusters=components, n_init=1, random_state=seed,
                        max_iter=init_max_iter).fit(z)
        gmm = GaussianMixture(n_components=components, covariance_type=covariance_type,
                              reg_covar=NLEEP_REG_COVAR, max_iter=max_iter, tol=float(tol),
                              random_state=seed, init_params="random_from_data",
                              **_mixture_start(z, kmeans.labels_, components, covariance_type))
        gmm.fit(z)
    # Lloyd stops early exactly when it converged; stopping at the cap is unconfirmed.
    init_converged = int(kmeans.n_iter_) < init_max_iter
    info = {"converged": bool(gmm.converged_) and init_converged, "n_iter": int(gmm.n_iter_),
            "init_converged": init_converged, "init_n_iter": int(kmeans.n_iter_),
            "n_components": int(components)}
    if not init_converged:
        warn_unconverged("nleep", f"the k-means start of the {components}-component mixture "
                         f"stopped at init_max_iter={init_max_iter} before its centres "
                         "settled", "raise init_max_iter", stacklevel=4)
    if not gmm.converged_:
        warn_unconverged("nleep", f"EM of the {components}-component mixture stopped at "
                         f"max_iter={max_iter} before the lower bound changed by less than "
                         f"tol={tol:g}", "raise max_iter", stacklevel=4)
    theta = torch.as_tensor(gmm.predict_proba(z), dtype=torch.float64)
    return leep(theta, y.cpu()), info


# ------------------------------------------------------------------------------------------
# Analysis adapters (one row per downstream task, on the training split)
# ------------------------------------------------------------------------------------------


def _tasks(view: EpochView) -> list[tuple[str, torch.Tensor]]:
    return sorted(view.train.factors.items())


def _source_logits(view: EpochView, metric: str) -> torch.Tensor:
    if view.train.logits is None:
        raise MetricInputError(f"{metric} needs the source head's outputs (view.train.logits), "
                               "but this checkpoint has none; drop it from --metrics")
    return view.train.logits


@register_metric("logme", description="LogME evidence per downstream task (You et al. 2021)")
def _logme_metric(view: EpochView) -> list[MetricValue]:
    """LogME of train features for every downstream task."""
    rows = []
    for task, y in _tasks(view):
        fit = _logme_classes(view.train.features, y, LOGME_TOL, LOGME_MAX_ITER)
        limits = sum(o in ("t->0", "t->inf") for o in fit.optimum)
        rows.append(MetricValue(
            "logme", float(fit.evidence.mean()), task=task, estimator="logme-evidence-max",
            params={"tol": LOGME_TOL, "max_iter": LOGME_MAX_ITER, "split": "train"},
            diagnostics={"converged": fit.converged, "n_iter": fit.n_iter,
                         "classes_at_limit": limits}))
    return rows


@register_metric("h_score", description="H-score per downstream task (Bao et al. 2019)")
def _h_score_metric(view: EpochView) -> list[MetricValue]:
    """H-score (pseudo-inverse, no shrinkage) of train features for every downstream task."""
    return [MetricValue("h_score", h_score(view.train.features, y), task=task,
                        estimator="h-score-pinv", params={"shrinkage": None, "split": "train"})
            for task, y in _tasks(view)]


@register_metric("transrate", description="TransRate per downstream task (Huang et al. 2022)")
def _transrate_metric(view: EpochView) -> list[MetricValue]:
    """TransRate (eps = 1e-4) of train features for every downstream task."""
    return [MetricValue("transrate", transrate(view.train.features, y), task=task,
                        estimator="coding-rate", params={"eps": 1e-4, "split": "train"})
            for task, y in _tasks(view)]


@register_metric("gbc", description="Gaussian Bhattacharyya coefficient per downstream task "
                                    "(Pandy et al. 2022)")
def _gbc_metric(view: EpochView) -> list[MetricValue]:
    """GBC (spherical Gaussians) of train features for every downstream task."""
    return [MetricValue("gbc", gbc(view.train.features, y), task=task,
                        estimator="gbc-spherical",
                        params={"gaussian": "spherical", "var_floor": 1e-4, "split": "train"})
            for task, y in _tasks(view)]


@register_metric("leep", description="LEEP of the source head per downstream task "
                                     "(Nguyen et al. 2020)")
def _leep_metric(view: EpochView) -> list[MetricValue]:
    """LEEP of the source head's softmax on the train images for every downstream task."""
    probs = torch.softmax(as_tensor(_source_logits(view, "leep")), dim=1)
    return [MetricValue("leep", leep(probs, y), task=task, estimator="leep",
                        params={"source": "softmax(logits)", "split": "train"})
            for task, y in _tasks(view)]


@register_metric("nleep", description="NLEEP (Gaussian-mixture LEEP, Li et al. 2021) per "
                                      "downstream task; opt-in (EM fit per task)")
def _nleep_metric(view: EpochView) -> list[MetricValue]:
    """NLEEP of train features for every downstream task (seeded mixture)."""
    rows = []
    for task, y in _tasks(view):
        value, info = _nleep(view.train.features, y, variance=NLEEP_VARIANCE,
                             component_ratio=NLEEP_COMPONENT_RATIO, covariance_type="diag",
                             seed=view.seed, max_iter=NLEEP_MAX_ITER, tol=NLEEP_TOL)
        rows.append(MetricValue(
            "nleep", value, task=task, estimator="nleep-pca-gmm",
            params={"variance": NLEEP_VARIANCE, "component_ratio": NLEEP_COMPONENT_RATIO,
                    "covariance_type": "diag", "seed": view.seed, "max_iter": NLEEP_MAX_ITER,
                    "tol": NLEEP_TOL, "init_max_iter": NLEEP_INIT_MAX_ITER, "split": "train"},
            diagnostics={key: info[key] for key in
                         ("converged", "n_iter", "init_converged", "init_n_iter")}))
    return rows


@register_metric("nce", description="negative conditional entropy of the source head per "
                                    "downstream task (Tran et al. 2019)")
def _nce_metric(view: EpochView) -> list[MetricValue]:
    """NCE of the source head's argmax on the train images for every downstream task."""
    pred = as_tensor(_source_logits(view, "nce")).argmax(dim=1)
    return [MetricValue("nce", nce_score(pred, y), task=task, estimator="nce-argmax",
                        params={"source": "argmax(logits)", "split": "train"})
            for task, y in _tasks(view)]
