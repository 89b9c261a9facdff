"""Class separation R^2 of penultimate features (Kornblith et al. 2021).

Kornblith et al. measure how tightly a representation clusters by class with
the ratio of average within-class to average overall cosine distance,

.. math::

    \\bar d_{within} = \\sum_k \\sum_{m, n \\in k} \\frac{1 - \\cos(x_m, x_n)}{K N_k^2}, \\qquad
    \\bar d_{total} = \\sum_{j, k} \\sum_{m \\in j, n \\in k}
        \\frac{1 - \\cos(x_m, x_n)}{K^2 N_j N_k}, \\qquad
    R^2 = 1 - \\bar d_{within} / \\bar d_{total},

with sums over *all ordered* pairs including ``m = n`` and every class weighted
equally.  Higher values mean more class-separated (more "collapsed") features,
which the paper links to worse transfer.

With unit-normalised rows ``z`` and class means ``mu_k`` of ``z`` the double sums
collapse to an exact ``O(n d)`` form: ``d_within = 1 - mean_k ||mu_k||^2`` and
``d_total = 1 - ||mean_k mu_k||^2``, and ``d_total = d_within + mean_k ||mu_k -
mean_j mu_j||^2``, so ``R^2`` is the between-class share of the spread of the
unit vectors.  This module evaluates it in one pass over cache-sized row blocks
(each upcast to float64 and normalised), never copying the whole matrix; each
class is accumulated relative to one of its own members, so the deviations keep
their digits when the features share a large common offset, where
``1 - ||mu||^2`` cancels (offset / spread 1e6 makes cosine distances ~1e-12):
the relative error of ``R^2`` is then about 1e-16 x offset / spread (measured
2e-11 at 1e6, against 5e-5 for the closed form), the limit set by rounding the
shifted input itself.  Values are unchanged by scaling features by any factor
in float64's range (rows are rescaled by exact powers of two when their norms
would over- or underflow).

References
----------
Kornblith, S., Chen, T., Lee, H., Norouzi, M. (2021). Why do better loss
functions lead to less transferable features? NeurIPS 2021.
"""

from __future__ import annotations

import warnings

import torch

from dtprobe.errors import MetricInputError
from dtprobe.metrics._validation import ArrayLike, as_numpy, check_labels, rowwise_pow2_rescale
from dtprobe.metrics.registry import EpochView, MetricValue, register_metric

__all__ = ["class_separation"]

# d_total below this (it lies in [0, 2]) means every feature points the same way.
_DEGENERATE_TOTAL = 1e-24
#: Row norms outside this range are rescaled by an exact power of two before normalising.
_TINY_NORM, _HUGE_NORM = 1e-150, 1e150
#: Rows per block: 1024 x 512 float64 is 4 MiB, cache-resident (measured fastest).
_BLOCK = 1024


def _features_view(features: ArrayLike) -> torch.Tensor:
    """Validate shape and dtype like ``check_features`` without a float64 copy of the data."""
    t = features.detach() if isinstance(features, torch.Tensor) else torch.as_tensor(
        as_numpy(features))
    if not t.is_floating_point():
        t = t.to(torch.float64)
    if t.ndim != 2:
        raise MetricInputError(f"features must be a 2-D (n_samples, n_features) array, got "
                               f"shape {tuple(t.shape)}")
    if t.shape[0] < 2:
        raise MetricInputError(f"features has {t.shape[0]} samples; this metric needs at least 2")
    return t


def class_separation(features: ArrayLike, labels: ArrayLike) -> float:
    """Class separation R^2 of Kornblith et al. (2021), classes weighted equally.

    Parameters
    ----------
    features : array_like or torch.Tensor, shape (n_samples, n_features)
        Penultimate-layer features (numpy or torch, CPU or CUDA); computed in
        float64 on the input's device.
    labels : array_like or torch.Tensor, shape (n_samples,)
        Integer class labels; at least two distinct classes.

    Returns
    -------
    float
        ``R^2 = 1 - d_within / d_total`` in ``[0, 1]`` (cosine distance, all
        ordered pairs including ``m = n``, each class weighted ``1/K``).
        Invariant to rescaling any single feature vector by a positive factor.
        Returns NaN with a :class:`RuntimeWarning` when ``d_total`` is zero to
        round-off, i.e. every feature vector points in the same direction.

    Raises
    ------
    MetricInputError
        On a wrong shape, NaN/Inf, fewer than two classes, or an all-zero
        feature row (its cosine similarity is undefined).

    References
    ----------
    Kornblith, S., Chen, T., Lee, H., Norouzi, M. (2021). Why do better loss
    functions lead to less transferable features? NeurIPS 2021, Sec. 3.2.
    """
    x = _features_view(features)
    y, n_classes = check_labels(labels, x.shape[0], "labels", device=x.device)
    n, d = x.shape
    counts = torch.bincount(y, minlength=n_classes).to(torch.float64)
    # One pass over row blocks small enough to stay in cache (the matrix is never copied).
    # Each class's unit vectors are accumulated relative to one of its own members (a shift):
    # means and mean squared deviations then keep their digits even when every feature shares
    # a large offset and cosine distances are ~1e-12, where 1 - ||mu_k||^2 cancels.
    first = torch.full((n_classes,), n, dtype=torch.long, device=x.device)
    first.scatter_reduce_(0, y, torch.arange(n, device=x.device), reduce="amin")
    shift = _unit_rows(x[first].to(torch.float64), x)  # (K, d)
    sums = torch.zeros(n_classes, d, dtype=torch.float64, device=x.device)
    squares = torch.zeros(n_classes, dtype=torch.float64, device=x.device)
    for start in range(0, n, _BLOCK):
        yb = y[start:start + _BLOCK]
        z = _unit_rows(x[start:start + _BLOCK].to(torch.float64), x) - shift[yb]
        sums.index_add_(0, yb, z)
        squares.index_add_(0, yb, (z * z).sum(dim=1))
    offsets = sums / counts[:, None]
    # for unit vectors, 1 - ||mu_k||^2 = mean_m ||z_m - mu_k||^2 (shift-invariant), and
    # 1 - ||mean_k mu_k||^2 = d_within + mean_k ||mu_k - mean_j mu_j||^2
    d_within = (squares / counts - (offsets * offsets).sum(dim=1)).clamp_min(0.0).mean()
    means = shift + offsets
    between = ((means - means.mean(dim=0)) ** 2).sum(dim=1).mean()
    d_total = d_within + between
    if float(d_total) <= _DEGENERATE_TOTAL:
        warnings.warn("class_separation: all feature vectors point in the same direction "
                      "(total cosine distance 0); returning NaN", RuntimeWarning, stacklevel=2)
        return float("nan")
    return float(between / d_total)  # = 1 - d_within / d_total, in [0, 1] by construction


def _unit_rows(z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Unit-normalised float64 rows of ``z`` (a block of ``x``); checks NaN/Inf and zero rows."""
    norms = torch.linalg.vector_norm(z, dim=1, keepdim=True)
    if not bool(((norms > _TINY_NORM) & (norms < _HUGE_NORM)).all()):
        if not bool(torch.isfinite(z).all()):
            bad = int((~torch.isfinite(x.to(torch.float64))).any(dim=1).sum())
            raise MetricInputError(f"features contains NaN/Inf in {bad} of {x.shape[0]} rows "
                                   "(diverged checkpoint?); drop or fix those rows first")
        z = rowwise_pow2_rescale(z)  # exact: rows near 1e+-200 keep representable norms
        norms = torch.linalg.vector_norm(z, dim=1, keepdim=True)
        if bool((norms == 0).any()):
            zero = int((x.to(torch.float64).abs().amax(dim=1) == 0).sum())
            raise MetricInputError(f"features has {zero} all-zero row(s); cosine similarity is "
                                   "undefined for them, drop those rows before class_separation")
    return z / norms


@register_metric("class_separation", default=True,
                 description="class separation R^2 (Kornblith et al. 2021) of test features")
def _class_separation_metric(view: EpochView) -> list[MetricValue]:
    """Class separation R^2 on the test split (Kornblith et al. 2021)."""
    value = class_separation(view.test.features, view.test.labels)
    return [MetricValue("class_separation", value,
                        estimator="kornblith2021_r2_closed_form",
                        params={"split": "test", "similarity": "cosine",
                                "class_weighting": "equal", "pairs": "ordered_incl_self"})]
