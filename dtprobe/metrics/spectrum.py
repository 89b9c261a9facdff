"""Spectral statistics of a feature matrix: RankMe (Garrido et al. 2023), alpha-ReQ (Agrawal et
al. 2022) and the numerical rank.

RankMe is the exponential of the Shannon entropy of the normalised singular
values of the (uncentred) embedding matrix; it is a smooth count of how many
directions the representation uses.  Collapsing (more discriminative) features
use fewer directions, so it is a label-free companion to class separation.

alpha-ReQ is the exponent ``alpha`` of a power-law fit ``lambda_i ~ i^-alpha``
to the eigenvalues of the feature covariance (the decay of the eigenspectrum):
a larger ``alpha`` means variance concentrated in fewer directions.  The
numerical rank counts the singular values above a stated threshold.

References
----------
Garrido, Q., Balestriero, R., Najman, L., LeCun, Y. (2023). RankMe: Assessing
the downstream performance of pretrained self-supervised representations by
their rank. ICML 2023.

Agrawal, K. K., Mondal, A. K., Ghosh, A., Richards, B. A. (2022). alpha-ReQ:
Assessing representation quality in self-supervised learning by measuring
eigenspectrum decay. NeurIPS 2022.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch

from dtprobe.errors import ConfigError
from dtprobe.metrics._validation import ArrayLike, check_features
from dtprobe.metrics.registry import EpochView, MetricValue, register_metric

__all__ = ["rankme", "alpha_req", "numerical_rank", "DEFAULT_RANKME_EPS"]

#: The paper's epsilon added to every normalised singular value.
DEFAULT_RANKME_EPS = 1e-7
#: Bytes of float64 rows per block.  A feature matrix larger than this is never copied whole
#: to float64: its singular values come from a blockwise QR (the R factor of each block stacked
#: on the previous R), its covariance from Gram blocks, so memory is O(d^2 + block) besides the
#: input (an SVD of 300k x 2048 features held ~3 float64 copies, 15 GB).
_MEMORY_BUDGET = 64 * 2**20


def _row_step(n: int, d: int) -> int:
    return max(2 * d, _MEMORY_BUDGET // (8 * max(d, 1)), 1)


def _column_means(x: torch.Tensor) -> torch.Tensor:
    """float64 column means of ``x`` from float64 row blocks."""
    step = _row_step(*x.shape)
    total = torch.zeros(x.shape[1], dtype=torch.float64, device=x.device)
    for s in range(0, x.shape[0], step):
        total += x[s:s + step].to(torch.float64).sum(dim=0)
    return total / x.shape[0]


def _singular_values(x: torch.Tensor, center: bool = False) -> torch.Tensor:
    """Singular values (descending, float64) of validated ``x`` (n, d), column-centred when
    ``center``.

    Matrices within ``_MEMORY_BUDGET`` (or not tall) go to one ``svdvals`` in float64; taller
    ones are reduced block by block to a d x d triangular factor with the same singular values
    (Householder QR is backward stable, so they agree to float64 rounding of ``sigma_max``,
    as the SVD itself does).
    """
    n, d = x.shape
    if 8 * n * d <= _MEMORY_BUDGET or n <= 2 * d:
        z = x.to(torch.float64)
        return torch.linalg.svdvals(z - z.mean(dim=0) if center else z)
    mean = _column_means(x) if center else None
    step = _row_step(n, d)
    r: torch.Tensor | None = None
    for s in range(0, n, step):
        block = x[s:s + step].to(torch.float64)
        if mean is not None:
            block = block - mean
        stacked = block if r is None else torch.cat([r, block])
        r = torch.linalg.qr(stacked, mode="r").R
    assert r is not None
    return torch.linalg.svdvals(r)


def rankme(features: ArrayLike, eps: float = DEFAULT_RANKME_EPS) -> float:
    """RankMe effective rank of a feature matrix (Garrido et al. 2023).

    Parameters
    ----------
    features : array_like or torch.Tensor, shape (n_samples, n_features)
        Embedding matrix (numpy or torch, CPU or CUDA); its singular values are
        computed in float64 on the input's device.  The matrix is *not*
        centred, as in the paper.
    eps : float, default 1e-7
        Added to every ``p_k`` before taking the entropy (paper's value).

    Returns
    -------
    float
        ``exp(-sum_k p_k log p_k)`` with ``p_k = sigma_k / ||sigma||_1 + eps``
        and ``sigma`` the ``min(n, d)`` singular values (not squared).  Lies in
        ``[1, min(n, d)]`` up to the ``eps`` term.  An all-zero matrix returns
        NaN with a :class:`RuntimeWarning`.

    Raises
    ------
    MetricInputError
        On a wrong shape or NaN/Inf.

    References
    ----------
    Garrido, Q., Balestriero, R., Najman, L., LeCun, Y. (2023). RankMe:
    Assessing the downstream performance of pretrained self-supervised
    representations by their rank. ICML 2023, Eq. 1.
    """
    x = check_features(features, "features", min_samples=1, dtype=None)
    sigma = _singular_values(x)
    total = sigma.sum()
    if float(total) == 0.0:
        warnings.warn("rankme: features are all zero; returning NaN", RuntimeWarning,
                      stacklevel=2)
        return float("nan")
    p = sigma / total + eps
    return float(torch.exp(-(p * torch.log(p)).sum()))


@register_metric("rankme", default=True,
                 description="RankMe effective rank (Garrido et al. 2023) of test features")
def _rankme_metric(view: EpochView) -> list[MetricValue]:
    """RankMe effective rank of the test-split features (Garrido et al. 2023)."""
    return [MetricValue("rankme", rankme(view.test.features), estimator="garrido2023_rankme",
                        params={"split": "test", "eps": DEFAULT_RANKME_EPS,
                                "singular_values": "raw_uncentred"})]


def rank_tol(sigma: torch.Tensor, shape: tuple[int, int], rtol: float | None,
              eps: float) -> float:
    """Absolute singular-value threshold ``rtol * sigma_max``.

    Default ``rtol = max(max(n, d) * eps_64, (eps_in / 2) * sqrt(min(n, d)))``: the first term
    is numpy ``matrix_rank``'s bound on the float64 SVD's own error; the second bounds what
    storing the features in a dtype of machine epsilon ``eps_in`` can add (Weyl:
    ``|Delta sigma| <= ||E||_2 <= ||E||_F <= (eps_in / 2) ||X||_F
    <= (eps_in / 2) sqrt(min(n, d)) sigma_max``), so rounding alone never counts as rank.
    """
    if rtol is None:
        rtol = max(max(shape) * float(torch.finfo(torch.float64).eps),
                   eps / 2 * min(shape) ** 0.5)
    return float(sigma.max()) * rtol if sigma.numel() else 0.0


def input_eps(features: ArrayLike) -> float:
    """Machine epsilon of the input's own float dtype (float64 for integers)."""
    dtype = getattr(features, "dtype", None)
    if isinstance(dtype, torch.dtype) and dtype.is_floating_point:
        return float(torch.finfo(dtype).eps)
    try:
        np_dtype = np.asarray(features).dtype
        if np.issubdtype(np_dtype, np.floating):
            return float(np.finfo(np_dtype).eps)
    except (TypeError, ValueError):
        pass
    return float(torch.finfo(torch.float64).eps)


def numerical_rank(features: ArrayLike, *, rtol: float | None = None,
                   center: bool = False) -> int:
    """Numerical rank: the number of singular values above ``rtol * sigma_max``.

    Parameters
    ----------
    features : array_like or torch.Tensor, shape (n_samples, n_features)
        Embedding matrix (numpy or torch, CPU or CUDA); singular values in float64.
    rtol : float, optional
        Relative threshold.  Default ``max(max(n, d) * eps_64, (eps_in / 2) sqrt(min(n, d)))``
        with ``eps_in`` the machine epsilon of the *input's* dtype (float64 2.2e-16, float32
        1.2e-7, float16 9.8e-4, bfloat16 7.8e-3): singular values that the float64 SVD's
        error or the rounding of the stored features could produce are not counted.
    center : bool, default False
        Subtract the column means first (the rank of the covariance); ``False`` matches
        RankMe's raw matrix.

    Returns
    -------
    int
        Between 0 (all-zero matrix) and ``min(n, d)``.  Invariant to orthogonal maps,
        nonzero scaling and row order.

    References
    ----------
    Golub, G. H., Van Loan, C. F. (2013). Matrix Computations, 4th ed.
    (numerical rank); Garrido et al. (2023) contrast it with RankMe.
    """
    x = check_features(features, "features", min_samples=1, dtype=None)
    sigma = _singular_values(x, center)
    if float(sigma.max()) == 0.0:
        return 0
    return int((sigma > rank_tol(sigma, tuple(x.shape), rtol, input_eps(features))).sum())


def alpha_req(features: ArrayLike, *, fit_range: tuple[int, int | None] = (1, None),
              rtol: float | None = None) -> float:
    """alpha-ReQ: power-law decay exponent of the covariance eigenspectrum (Agrawal et al. 2022).

    Parameters
    ----------
    features : array_like or torch.Tensor, shape (n_samples, n_features)
        Representation (numpy or torch, CPU or CUDA); centred and decomposed in float64.
    fit_range : (int, int or None), default (1, None)
        First and last eigenvalue rank (1-based, inclusive) of the fit; ``None`` = the last
        eigenvalue above the rank threshold.  Agrawal et al. fit the whole informative
        spectrum; skip the leading ranks (e.g. ``(5, None)``) to fit only the tail.
    rtol : float, optional
        Eigenvalues whose singular value is at most ``rtol * sigma_max`` (default as
        :func:`numerical_rank`, from the input dtype's precision) are left out, and so are
        eigenvalues below ``max(n, d) * eps_64 * lambda_max`` (the accuracy of the Gram
        eigendecomposition used here, i.e. singular values below ~1e-6 of the largest at
        n = 10,000): they are numerically zero and their logarithm is meaningless.

    Returns
    -------
    float
        ``alpha = -slope`` of the ordinary least-squares line (with intercept) through
        ``(log i, log lambda_i)`` over ``fit_range``, ``lambda_i = sigma_i^2 / (n - 1)`` the
        eigenvalues of the sample covariance.  Larger means faster decay (fewer effective
        directions).  Invariant to orthogonal maps, translations, isotropic scaling and
        row order.  NaN with a :class:`RuntimeWarning` when fewer than 2 eigenvalues are
        above the threshold inside ``fit_range`` (a constant or rank-1 representation).

    Raises
    ------
    MetricInputError
        Wrong shape, NaN/Inf, fewer than 2 samples.
    ConfigError
        A ``fit_range`` that does not start at 1 or later.

    References
    ----------
    Agrawal, K. K., Mondal, A. K., Ghosh, A., Richards, B. A. (2022). alpha-ReQ: Assessing
    representation quality in self-supervised learning by measuring eigenspectrum decay.
    NeurIPS 2022 (``lambda_i ~ i^-alpha``, fitted in log-log coordinates).
    """
    lo, hi = fit_range
    if isinstance(lo, bool) or not isinstance(lo, int) or lo < 1 or (
            hi is not None and (not isinstance(hi, int) or hi < lo)):
        raise ConfigError(f"fit_range={fit_range!r} must be (first, last) 1-based ranks with "
                          "1 <= first <= last, or last None")
    x = check_features(features, "features", min_samples=2, dtype=None)
    # Eigenvalues of the smaller Gram (d x d or n x n): 5-10x cheaper than an SVD of x. Their
    # absolute error is ~ max(n, d) eps_64 lambda_max, so only eigenvalues above that (and above
    # the rank threshold, squared) enter the fit.
    if 8 * x.shape[0] * x.shape[1] <= _MEMORY_BUDGET or x.shape[1] > x.shape[0]:
        z = x.to(torch.float64)
        z = z - z.mean(dim=0)
        gram = z.T @ z if z.shape[1] <= z.shape[0] else z @ z.T
    else:  # d x d Gram of the centred features from float64 row blocks (no float64 copy)
        mean = _column_means(x)
        step = _row_step(*x.shape)
        gram = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float64, device=x.device)
        for s in range(0, x.shape[0], step):
            block = x[s:s + step].to(torch.float64) - mean
            gram.addmm_(block.T, block)
    lam_all = torch.linalg.eigvalsh(gram).flip(0).clamp_min(0.0)
    sigma = lam_all.sqrt()
    floor = max(max(x.shape) * float(torch.finfo(torch.float64).eps) * float(lam_all[0]),
                rank_tol(sigma, tuple(x.shape), rtol, input_eps(features)) ** 2)
    kept = sigma[lam_all > floor] if float(lam_all[0]) > 0 else sigma[:0]
    last = kept.numel() if hi is None else min(hi, kept.numel())
    if last - lo + 1 < 2:
        warnings.warn(f"alpha_req: {kept.numel()} eigenvalue(s) above the rank threshold, "
                      f"fewer than 2 in ranks {lo}..{hi}; returning NaN", RuntimeWarning,
                      stacklevel=2)
        return float("nan")
    lam = kept[lo - 1:last] ** 2 / (x.shape[0] - 1)
    ranks = torch.arange(lo, last + 1, dtype=torch.float64, device=lam.device)
    u, v = torch.log(ranks), torch.log(lam)
    u = u - u.mean()
    slope = (u * (v - v.mean())).sum() / (u * u).sum()
    return float(-slope)


@register_metric("alpha_req", default=True, rows=("alpha_req", "numerical_rank"),
                 description="alpha-ReQ eigenspectrum decay (Agrawal et al. 2022) and numerical "
                             "rank of test features")
def _alpha_req_metric(view: EpochView) -> list[MetricValue]:
    """alpha-ReQ and numerical rank of the test-split features (one SVD each)."""
    feats = view.test.features
    eps = input_eps(feats)
    return [MetricValue("alpha_req", alpha_req(feats), estimator="agrawal2022_ols_loglog",
                        params={"split": "test", "fit_range": [1, None], "centred": True,
                                "rtol": "default", "input_eps": eps}),
            MetricValue("numerical_rank", float(numerical_rank(feats)),
                        estimator="svd_threshold",
                        params={"split": "test", "centred": False,
                                "rtol": "default", "input_eps": eps})]

