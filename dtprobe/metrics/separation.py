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
``d_total = 1 - ||mean_k mu_k||^2``.  This module evaluates the algebraically
identical sums of squares ``d_within = mean_k mean_{i in k} ||z_i - mu_k||^2``
and ``d_total = mean_k mean_{i in k} ||z_i - m||^2`` (``m = mean_k mu_k``),
which avoid the cancellation of ``1 - (number close to 1)``.

References
----------
Kornblith, S., Chen, T., Lee, H., Norouzi, M. (2021). Why do better loss
functions lead to less transferable features? NeurIPS 2021.
"""

from __future__ import annotations

import warnings

import torch

from dtprobe.errors import MetricInputError
from dtprobe.metrics._validation import ArrayLike, check_features, check_labels
from dtprobe.metrics.registry import EpochView, MetricValue, register_metric

__all__ = ["class_separation"]

# d_total below this (it lies in [0, 2]) means every feature points the same way.
_DEGENERATE_TOTAL = 1e-24


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
    x = check_features(features, "features")
    y, n_classes = check_labels(labels, x.shape[0], "labels", device=x.device)
    norms = torch.linalg.vector_norm(x, dim=1, keepdim=True)
    zero = int((norms == 0).sum())
    if zero:
        raise MetricInputError(f"features has {zero} all-zero row(s); cosine similarity is "
                               "undefined for them, drop those rows before class_separation")
    z = x / norms
    counts = torch.bincount(y, minlength=n_classes).to(z.dtype)
    means = torch.zeros(n_classes, z.shape[1], dtype=z.dtype, device=z.device)
    means.index_add_(0, y, z)
    means /= counts[:, None]
    # Per-sample weight 1 / (K N_k) makes every class count equally.
    weight = 1.0 / (n_classes * counts[y])
    d_within = (weight * ((z - means[y]) ** 2).sum(dim=1)).sum()
    grand = means.mean(dim=0)
    d_total = (weight * ((z - grand) ** 2).sum(dim=1)).sum()
    if float(d_total) <= _DEGENERATE_TOTAL:
        warnings.warn("class_separation: all feature vectors point in the same direction "
                      "(total cosine distance 0); returning NaN", RuntimeWarning, stacklevel=2)
        return float("nan")
    return float(1.0 - d_within / d_total)


@register_metric("class_separation", default=True,
                 description="class separation R^2 (Kornblith et al. 2021) of test features")
def _class_separation_metric(view: EpochView) -> list[MetricValue]:
    """Class separation R^2 on the test split (Kornblith et al. 2021)."""
    value = class_separation(view.test.features, view.test.labels)
    return [MetricValue("class_separation", value,
                        estimator="kornblith2021_r2_closed_form",
                        params={"split": "test", "similarity": "cosine",
                                "class_weighting": "equal", "pairs": "ordered_incl_self"})]
