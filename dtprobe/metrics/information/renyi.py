"""Matrix-based Renyi alpha-entropy and mutual information.

The matrix-based functional (Sanchez Giraldo, Rao & Principe 2015) replaces densities by the
normalised Gram matrix ``A = K / tr(K)`` of a positive-definite kernel on the samples:
``S_alpha(A) = log(sum_i lambda_i(A)^alpha) / (1 - alpha)``. The joint entropy uses the
Hadamard product, ``S_alpha(A, B) = S_alpha(A o B / tr(A o B))`` (Yu et al. 2019), and
``I_alpha(A; B) = S_alpha(A) + S_alpha(B) - S_alpha(A, B)``. ``alpha -> 1`` approaches a
Shannon-like (von Neumann) entropy; the value depends strongly on the kernel width, so every
result records the width actually used. It is *not* a consistent estimator of Shannon MI.

Values are in nats (natural log); the papers use log2 (bits): divide by ln 2.
"""

from __future__ import annotations

import math
import warnings

import torch

from dtprobe.errors import MetricInputError
from dtprobe.metrics._validation import ArrayLike
from dtprobe.metrics.information._common import (
    MIResult,
    Variable,
    degenerate_result,
    prepare,
    prepare_pair,
    subsample_index,
)

SIGMA_RULES = ("scott", "median")
SigmaSpec = float | str | tuple[float | str, float | str]


def kernel_width(x: torch.Tensor, rule: float | str = "scott", *, gamma: float = 0.8) -> float:
    """Resolve a Gaussian kernel width for continuous samples ``x`` of shape ``(n, d)``.

    Parameters
    ----------
    x : (n, d) float tensor
    rule : {"scott", "median"} or float
        ``"scott"``: Scott/Silverman-type rule with the dimension normalisation of Tapia &
        Estevez (2020), ``sigma = gamma * s * sqrt(d) * n^(-1/(4+d))`` where ``s`` is the root
        mean per-feature standard deviation (``s = 1`` for standardised data, which recovers their
        ``gamma sqrt(d) n^(-1/(4+d))``). ``"median"``: the median pairwise Euclidean distance.
        A positive float is used as is.
    gamma : float
        Multiplier of the ``"scott"`` rule (Tapia & Estevez use 0.8).

    Returns
    -------
    float
        The width; 0.0 when all samples coincide.
    """
    if not isinstance(rule, str):
        sigma = float(rule)
        if not (sigma > 0 and math.isfinite(sigma)):
            raise MetricInputError(f"sigma must be a positive float or one of {SIGMA_RULES}, "
                                   f"got {rule!r}")
        return sigma
    n, d = x.shape
    if rule == "scott":
        m = float(x.abs().max())
        s = m * float((x / m).var(dim=0, unbiased=True).mean().sqrt()) if m > 0 else 0.0
        return gamma * s * math.sqrt(d) * n ** (-1.0 / (4 + d))
    if rule == "median":
        dist = torch.cdist(x, x)
        off = dist[~torch.eye(n, dtype=torch.bool, device=x.device)]
        return float(off.median())
    raise MetricInputError(f"sigma must be a positive float or one of {SIGMA_RULES}, got {rule!r}")


def gram_matrix(v: Variable, sigma: float | None) -> torch.Tensor:
    """Unnormalised kernel matrix (unit diagonal) of a prepared variable.

    Continuous: Gaussian ``exp(-||x_i - x_j||^2 / (2 sigma^2))``. Discrete labels: the linear
    kernel on one-hot vectors, ``K_ij = [y_i = y_j]`` (the sigma -> 0 limit of a Gaussian on
    one-hot vectors), for which ``S_alpha`` equals the Renyi entropy of the label frequencies.
    """
    if v.discrete:
        return (v.data[:, None] == v.data[None, :]).to(torch.float64)
    z = (v.data - v.data.mean(dim=0)) / sigma  # in units of the width: no over/underflow of sigma^2
    if bool(torch.isfinite(z).all()) and float(z.abs().max()) < 1e150:
        sq = (z * z).sum(dim=1)
        d2 = (sq[:, None] + sq[None, :] - 2.0 * z @ z.T).clamp_min(0.0)
        d2.fill_diagonal_(0.0)
    else:  # extreme outliers relative to the width: exact pairwise differences
        z = v.data / sigma
        d2 = torch.cdist(z, z, compute_mode="donot_use_mm_for_euclid_dist") ** 2
    return torch.exp(-0.5 * d2)


def _entropy_of_gram(k: torch.Tensor, alpha: float) -> float:
    """``S_alpha(K / tr K)`` in nats from the eigenvalues (float64 ``eigvalsh``)."""
    a = k / torch.trace(k)
    lam = torch.linalg.eigvalsh(a.to(torch.float64))
    lam = lam.clamp_min(0.0)
    lam = torch.where(lam > lam.max() * a.shape[0] * torch.finfo(torch.float64).eps, lam,
                      torch.zeros_like(lam))
    lam = lam / lam.sum()
    if alpha == 1.0:
        nz = lam[lam > 0]
        return float(-(nz * nz.log()).sum())
    return float(torch.log((lam[lam > 0] ** alpha).sum()) / (1.0 - alpha))


def _check_alpha(alpha: float) -> None:
    if not (alpha > 0 and math.isfinite(alpha)):
        raise MetricInputError(f"alpha must be a positive finite number, got {alpha!r}")


def _resolve(v: Variable, rule: float | str, gamma: float) -> float | None:
    if v.discrete:
        return None
    if v.constant:
        return 1.0  # every width gives the all-ones Gram
    sigma = kernel_width(v.data, rule, gamma=gamma)
    if sigma <= 0:  # "median" when over half of the pairs coincide
        warnings.warn(f"{v.name}: the median pairwise distance is 0; using the 'scott' width "
                      "instead", RuntimeWarning, stacklevel=3)
        sigma = kernel_width(v.data, "scott", gamma=gamma)
    return sigma


def renyi_entropy(x: ArrayLike, *, alpha: float = 1.01, sigma: float | str = "scott",
                  gamma: float = 0.8, max_samples: int | None = 1000, seed: int = 0) -> float:
    """Matrix-based Renyi alpha-entropy ``S_alpha(A)`` of samples ``x``, in nats.

    Parameters
    ----------
    x : (n, d) array or tensor, or (n,) integer labels
    alpha : float
        Order of the entropy (``1.0`` gives the von Neumann/Shannon form).
    sigma, gamma : see :func:`kernel_width` (ignored for labels).
    max_samples : int or None
        Seeded random subsample size (eigendecomposition is O(n^3)); None uses all rows.
    seed : int
        Seed of the subsample.

    Returns
    -------
    float
        Entropy in nats, between 0 and ``log(n)``.

    References
    ----------
    Sanchez Giraldo, Rao & Principe (2015), "Measures of entropy from data using infinitely
    divisible kernels", IEEE Trans. Inf. Theory 61(1).
    """
    _check_alpha(alpha)
    v = prepare(x, "x", upcast=False)
    v = v.take(subsample_index(v.n, max_samples, seed)).upcast()
    return _entropy_of_gram(gram_matrix(v, _resolve(v, sigma, gamma)), alpha)


def renyi_mi(a: ArrayLike, b: ArrayLike, *, alpha: float = 1.01, sigma: SigmaSpec = "scott",
             gamma: float = 0.8, max_samples: int | None = 1000, seed: int = 0) -> MIResult:
    """Matrix-based Renyi alpha-order mutual information ``S(A) + S(B) - S(A, B)``.

    Parameters
    ----------
    a, b : (n, d) arrays/tensors, or (n,) integer labels
        Paired samples. Labels use the one-hot (delta) kernel of :func:`gram_matrix`.
    alpha : float
        Entropy order; 1.01 (default) approximates Shannon entropy (Yu et al. 2019).
    sigma : "scott", "median", float, or a pair of these for (a, b)
        Gaussian kernel-width rule, see :func:`kernel_width`; the resolved widths are reported
        in ``params["sigma_a"]``/``params["sigma_b"]``.
    gamma : float
        Multiplier of the ``"scott"`` rule.
    max_samples : int or None
        The same seeded subsample of rows is used for both variables (O(n^3) eigensolves).
    seed : int
        Seed of the subsample.

    Returns
    -------
    MIResult
        Value in nats. Bounded above by ``min(S(A), S(B))`` because the Hadamard joint entropy
        is at least each marginal (Sanchez Giraldo et al. 2015, Prop. 4.1); with labels it is
        therefore at most the Renyi entropy of the label frequencies. It is not guaranteed to
        be non-negative (values near -0.01 nats occur for ``alpha = 2`` on tiny samples).

    References
    ----------
    Sanchez Giraldo, Rao & Principe (2015), IEEE Trans. Inf. Theory 61(1), 535-548.
    Yu, Wickstrom, Jenssen & Principe (2019), "Understanding convolutional neural networks with
    information theory: an initial exploration", IEEE TNNLS.
    Tapia & Estevez (2020), "On the information plane of autoencoders", IJCNN (width rule).
    """
    _check_alpha(alpha)
    rule_a, rule_b = sigma if isinstance(sigma, tuple) else (sigma, sigma)
    va, vb = prepare_pair(a, b, max_samples=max_samples, seed=seed)
    sa, sb = _resolve(va, rule_a, gamma), _resolve(vb, rule_b, gamma)
    params = {"alpha": alpha, "sigma": list(sigma) if isinstance(sigma, tuple) else sigma,
              "gamma": gamma, "sigma_a": "one-hot" if sa is None else sa,
              "sigma_b": "one-hot" if sb is None else sb, "n": va.n, "seed": seed,
              "max_samples": max_samples}
    if (zero := degenerate_result(va, vb, "renyi", params)) is not None:
        return zero
    ka, kb = gram_matrix(va, sa), gram_matrix(vb, sb)
    h_a, h_b = _entropy_of_gram(ka, alpha), _entropy_of_gram(kb, alpha)
    h_ab = _entropy_of_gram(ka * kb, alpha)
    params.update(entropy_a=h_a, entropy_b=h_b, joint_entropy=h_ab)
    return MIResult(h_a + h_b - h_ab, "renyi", "nats", params)
