"""Pairwise-distance (KDE) estimates of the information in a noisy representation.

Following Saxe et al. (2018), the deterministic representation ``h`` is made stochastic,
``T = h(X) + N(0, noise_var I)``, so that over the empirical inputs ``T`` is an equal-weight
mixture of ``n`` Gaussians with means ``h_i``. Its entropy is bounded with the pairwise-distance
estimators of Kolchinsky & Tracey (2017):

``H(T) <= H(T|X) - (1/n) sum_i log((1/n) sum_j exp(-KL_ij))``, ``KL_ij = ||h_i - h_j||^2 / (2 s)``
(upper bound), and the same with the Bhattacharyya distance ``||h_i - h_j||^2 / (8 s)`` for the
lower bound, where ``s = noise_var`` and ``H(T|X) = d/2 log(2 pi e s)``. Hence
``I(X;T) = H(T) - H(T|X)`` is the negative mean log kernel density, and
``I(T;Y) = H(T) - sum_c p_c H(T|Y=c)`` uses the same bound within each class (a difference of
two bounds, so itself neither an upper nor a lower bound; it is at most ``H(Y)``).

The numbers measure how spread out the representation is at the scale ``sqrt(noise_var)``
(Goldfeld et al. 2019): they are not consistent estimators of Shannon MI. Values are in nats.
"""

from __future__ import annotations

import math

import torch

from dtprobe.errors import MetricInputError
from dtprobe.metrics._validation import ArrayLike
from dtprobe.metrics.information._common import (
    MIResult,
    degenerate_result,
    prepare,
    prepare_pair,
    subsample_index,
)

BOUNDS = {"upper": 2.0, "lower": 8.0}  # KL and Bhattacharyya distance denominators (x noise_var)
_CHUNK = 1024


def _mean_log_density(t: torch.Tensor, noise_var: float, bound: str,
                      labels: torch.Tensor | None = None) -> float:
    """``(1/n) sum_i log((1/n_i) sum_{j in group(i)} exp(-||t_i - t_j||^2 / (c noise_var)))``.

    The group is every sample (``labels`` None) or the samples of the same class; rows are
    processed in chunks so memory stays O(chunk x n).
    """
    n = t.shape[0]
    t = t - t.mean(dim=0)  # centring keeps the |a|^2 + |b|^2 - 2ab expansion accurate
    scale = 1.0 / (BOUNDS[bound] * noise_var)
    sq = (t * t).sum(dim=1)
    total = torch.zeros((), dtype=torch.float64, device=t.device)
    counts = None if labels is None else torch.bincount(labels).to(torch.float64)
    for start in range(0, n, _CHUNK):
        block = t[start:start + _CHUNK]
        d2 = (sq[start:start + _CHUNK, None] + sq[None, :] - 2.0 * block @ t.T).clamp_min(0.0)
        rows = torch.arange(start, start + block.shape[0], device=t.device)
        d2[torch.arange(block.shape[0], device=t.device), rows] = 0.0
        logits = -scale * d2
        if labels is None:
            total = total + (torch.logsumexp(logits, dim=1) - math.log(n)).sum()
        else:
            same = labels[start:start + _CHUNK, None] == labels[None, :]
            logits = logits.masked_fill(~same, -math.inf)
            log_nc = counts[labels[start:start + _CHUNK]].log()
            total = total + (torch.logsumexp(logits, dim=1) - log_nc).sum()
    return float(total) / n


def _check(noise_var: float, bound: str) -> None:
    if not (noise_var > 0 and math.isfinite(noise_var)):
        raise MetricInputError(f"noise_var must be a positive float, got {noise_var!r}")
    if bound not in BOUNDS:
        raise MetricInputError(f"bound must be one of {tuple(BOUNDS)}, got {bound!r}")


def kde_entropy(t: ArrayLike, *, noise_var: float = 0.1, bound: str = "upper",
                max_samples: int | None = 2000, seed: int = 0) -> float:
    """Pairwise-distance bound on the differential entropy of ``T = t + N(0, noise_var I)``, nats.

    Parameters
    ----------
    t : (n, d) array or tensor
        Representation samples (the mixture means).
    noise_var : float
        Variance of the added isotropic Gaussian noise.
    bound : {"upper", "lower"}
        KL-based upper bound or Bhattacharyya-based lower bound (Kolchinsky & Tracey 2017).
    max_samples, seed : seeded subsample size (None: all rows) and its seed.

    Returns
    -------
    float
        ``d/2 log(2 pi e noise_var) - (1/n) sum_i log((1/n) sum_j exp(-D_ij))``.

    References
    ----------
    Kolchinsky & Tracey (2017), "Estimating mixture entropy with pairwise distances", Entropy 19.
    """
    _check(noise_var, bound)
    v = prepare(t, "t", upcast=False)
    if v.discrete:
        raise MetricInputError("t must be continuous (n, d) features, got integer labels")
    v = v.take(subsample_index(v.n, max_samples, seed)).upcast()
    h_cond = 0.5 * v.dim * math.log(2 * math.pi * math.e * noise_var)
    return h_cond - _mean_log_density(v.data, noise_var, bound)


def kde_mi(a: ArrayLike, b: ArrayLike, *, noise_var: float = 0.1, bound: str = "upper",
           max_samples: int | None = 2000, seed: int = 0) -> MIResult:
    """KDE (pairwise-distance) estimate of ``I(X;T)`` or ``I(T;Y)`` for ``T = h + noise``.

    Parameters
    ----------
    a, b : arrays or tensors
        * both continuous: ``a`` is the input ``X`` and ``b`` the representation ``h(X)``;
          ``I(X;T) = H(T) - H(T|X)`` depends on ``b`` only (each row of ``a`` is one mixture
          component, as for a deterministic network evaluated on the data);
        * one of them 1-D integer labels ``Y``: ``I(T;Y)`` with ``T`` the continuous argument,
          by the class-conditional decomposition ``H(T) - sum_c p_c H(T|Y=c)``.
    noise_var : float
        Variance of the Gaussian noise added to the representation (Saxe et al. used 1e-1).
    bound : {"upper", "lower"}
        Entropy bound used for every entropy term (KL upper / Bhattacharyya lower bound).
    max_samples, seed : seeded subsample size (None: all rows) and its seed.

    Returns
    -------
    MIResult
        Nats. ``I(X;T)`` lies in ``[0, log n]``; ``I(T;Y) <= H(Y)`` (plug-in label entropy).

    References
    ----------
    Saxe et al. (2018), "On the information bottleneck theory of deep learning", ICLR.
    Kolchinsky & Tracey (2017), Entropy 19(7), 361.
    """
    _check(noise_var, bound)
    va, vb = prepare_pair(a, b, max_samples=max_samples, seed=seed)
    if va.discrete and vb.discrete:
        raise MetricInputError("kde needs a continuous representation; both a and b are integer "
                               "labels (use estimator='binning' for two label vectors)")
    target = "I(T;Y)" if (va.discrete or vb.discrete) else "I(X;T)"
    params = {"noise_var": noise_var, "bound": bound, "n": va.n, "seed": seed,
              "max_samples": max_samples, "quantity": target}
    if (zero := degenerate_result(va, vb, "kde", params)) is not None:
        return zero
    if target == "I(X;T)":
        value = -_mean_log_density(vb.data, noise_var, bound)
    else:
        t, y = (vb, va) if va.discrete else (va, vb)
        value = (_mean_log_density(t.data, noise_var, bound, labels=y.data)
                 - _mean_log_density(t.data, noise_var, bound))
    return MIResult(value, "kde", "nats", params)
