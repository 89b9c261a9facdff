"""Intrinsic dimension of a representation: the TwoNN estimator (Facco et al. 2017).

For each sample let ``r1`` and ``r2`` be the distances to its first and second
nearest neighbours and ``mu = r2 / r1``.  If the density is locally uniform on
a ``d``-dimensional manifold, ``mu`` is Pareto distributed,
``F(mu) = 1 - mu^{-d}``, so ``-log(1 - F(mu)) = d log(mu)``: a line through the
origin.  Facco et al. estimate ``d`` as the least-squares slope of that line
over the empirical CDF of the sorted ``mu``, after discarding the largest 10 %
of ``mu`` (the tail most affected by curvature and density changes).  Ansuini
et al. (2019) track it layer by layer and over training: it first rises, then
falls as the representation compresses.

Conventions:

* The empirical CDF of the ``i``-th smallest of ``N`` ratios is ``i / N``
  (``i = 1..N``); the fit keeps the ``floor(N (1 - discard_fraction))``
  smallest ratios and never the last (``F = 1`` has infinite ``-log(1 - F)``).
* ``estimator="mle"`` gives the maximum-likelihood estimate of the Pareto
  exponent, ``N / sum_i log mu_i``, over all points.
* Duplicate samples have ``r1 = 0``: they are collapsed to one copy before the
  estimate (with a :class:`RuntimeWarning` giving their number), as the
  estimator assumes a continuous density.
* Neighbours are found from squared distances in bounded-memory blocks
  (``n = 10,000`` never forms an ``n x n`` matrix), then the candidate distances
  are recomputed directly from the coordinate differences in float64 (also in row
  blocks), so cancellation in ``|a|^2 + |b|^2 - 2 a.b`` cannot change ``mu``.
  Memory is ``O(n d)`` (about two float64 copies of the features); time is
  ``O(n^2 d)``, the exact neighbour search, on the features' device.

References
----------
Facco, E., d'Errico, M., Rodriguez, A., Laio, A. (2017). Estimating the
intrinsic dimension of datasets by a minimal neighborhood information.
Scientific Reports 7, 12140.

Ansuini, A., Laio, A., Macke, J. H., Zoccolan, D. (2019). Intrinsic dimension
of data representations in deep neural networks. NeurIPS 2019.
"""

from __future__ import annotations

import math
import warnings

import torch

from dtprobe.errors import ConfigError, MetricInputError
from dtprobe.metrics._validation import ArrayLike, check_features
from dtprobe.metrics.neighbours import knn_indices
from dtprobe.metrics.registry import EpochView, MetricValue, register_metric

__all__ = ["twonn", "DEFAULT_DISCARD_FRACTION"]

#: Facco et al. (2017) and Ansuini et al. (2019) discard the largest 10 % of the ratios.
DEFAULT_DISCARD_FRACTION = 0.1
#: Candidates examined per point before the exact distance recomputation.
_CANDIDATES = 4
#: Bytes of float64 coordinate differences one block of the recomputation may hold.
_MEMORY_BUDGET = 64 * 2**20
_ESTIMATORS = ("fit", "mle")


def _two_nn_ratios(x: torch.Tensor) -> torch.Tensor:
    """``mu_i = r2 / r1`` for every row of duplicate-free float64 ``x``."""
    n, d = x.shape
    k = min(_CANDIDATES, n - 1)
    cand, _ = knn_indices(x, k, "euclidean")
    # Exact distances of the candidates (no cancellation), then the two smallest; in row blocks,
    # since the differences of all rows at once are k copies of x (20 GB at n = 300k, d = 2048)
    step = max(1, _MEMORY_BUDGET // (8 * k * d))
    mu = torch.empty(n, dtype=x.dtype, device=x.device)
    for s in range(0, n, step):
        dist = torch.linalg.vector_norm(x[cand[s:s + step]] - x[s:s + step, None, :], dim=2)
        two = torch.topk(dist, 2, dim=1, largest=False).values
        mu[s:s + step] = two[:, 1] / two[:, 0]
    return mu


def twonn(features: ArrayLike, *, estimator: str = "fit",
          discard_fraction: float = DEFAULT_DISCARD_FRACTION) -> float:
    """TwoNN intrinsic dimension (Facco et al. 2017).

    Parameters
    ----------
    features : array_like or torch.Tensor, shape (n_samples, n_features)
        Representation (numpy or torch, CPU or CUDA, any float dtype; distances in float64,
        so float16/bfloat16 give the estimate of the rounded points, whose duplicates are
        collapsed as below).  ``n < d`` is fine: only distances are used.
    estimator : {"fit", "mle"}, default "fit"
        ``"fit"``: Facco et al.'s least-squares slope of ``-log(1 - F(mu))`` against
        ``log(mu)`` through the origin; ``"mle"``: ``N / sum log mu``.
    discard_fraction : float, default 0.1
        Fraction of the largest ratios left out of the fit (``"fit"`` only), in ``[0, 1)``.

    Returns
    -------
    float
        Estimated intrinsic dimension (``> 0``).  Invariant to rotations, translations,
        isotropic scaling and the order of the samples.  Duplicate rows are collapsed to one
        (a :class:`RuntimeWarning` says how many).  NaN with a :class:`RuntimeWarning` when
        every ratio is 1 (each point equidistant from its two nearest neighbours).

    Raises
    ------
    MetricInputError
        Wrong shape, NaN/Inf, or fewer than 3 distinct samples.
    ConfigError
        Unknown ``estimator`` or ``discard_fraction`` outside ``[0, 1)``.

    References
    ----------
    Facco, E., d'Errico, M., Rodriguez, A., Laio, A. (2017). Estimating the intrinsic
    dimension of datasets by a minimal neighborhood information. Scientific Reports 7,
    12140.

    Ansuini, A., Laio, A., Macke, J. H., Zoccolan, D. (2019). Intrinsic dimension of data
    representations in deep neural networks. NeurIPS 2019.
    """
    if estimator not in _ESTIMATORS:
        raise ConfigError(f"estimator={estimator!r} is not one of {', '.join(_ESTIMATORS)}")
    if not 0.0 <= discard_fraction < 1.0:
        raise ConfigError(f"discard_fraction={discard_fraction!r} must lie in [0, 1)")
    x = check_features(features, "features", min_samples=3)
    unique = torch.unique(x, dim=0)
    if unique.shape[0] < x.shape[0]:
        warnings.warn(f"twonn: {x.shape[0] - unique.shape[0]} duplicate sample(s) collapsed "
                      "to one copy each (TwoNN assumes distinct points)", RuntimeWarning,
                      stacklevel=2)
        x = unique
    del unique  # a full copy of the features: not held through the neighbour search
    if x.shape[0] < 3:
        raise MetricInputError(f"features has {x.shape[0]} distinct samples; twonn needs at "
                               "least 3")
    log_mu = torch.log(_two_nn_ratios(x))
    if float(log_mu.max()) <= 0.0:
        warnings.warn("twonn: every point is equidistant from its two nearest neighbours "
                      "(all ratios 1); returning NaN", RuntimeWarning, stacklevel=2)
        return float("nan")
    n = log_mu.shape[0]
    if estimator == "mle":
        return float(n / log_mu.sum())
    keep = min(math.floor(n * (1.0 - discard_fraction)), n - 1)
    xs = torch.sort(log_mu).values[:keep]
    cdf = torch.arange(1, keep + 1, dtype=torch.float64, device=xs.device) / n
    ys = -torch.log1p(-cdf)
    denom = (xs * xs).sum()
    if float(denom) == 0.0:
        warnings.warn("twonn: the kept ratios are all 1; returning NaN", RuntimeWarning,
                      stacklevel=2)
        return float("nan")
    return float((xs * ys).sum() / denom)


@register_metric("twonn", default=True,
                 description="TwoNN intrinsic dimension (Facco et al. 2017) of test features "
                             "and layers")
def _twonn_metric(view: EpochView) -> list[MetricValue]:
    """TwoNN intrinsic dimension of the test-split features (per ``--layers`` layer too, as
    Ansuini et al. 2019 track it: the analysis runs this adapter on each layer's view)."""
    return [MetricValue("twonn", twonn(view.test.features), estimator="facco2017_twonn_fit",
                        params={"split": "test", "discard_fraction": DEFAULT_DISCARD_FRACTION,
                                "duplicates": "collapsed"})]
