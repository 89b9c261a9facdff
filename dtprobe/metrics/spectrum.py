"""Spectral statistics of a feature matrix: RankMe effective rank (Garrido et al. 2023).

RankMe is the exponential of the Shannon entropy of the normalised singular
values of the (uncentred) embedding matrix; it is a smooth count of how many
directions the representation uses.  Collapsing (more discriminative) features
use fewer directions, so it is a label-free companion to class separation.

References
----------
Garrido, Q., Balestriero, R., Najman, L., LeCun, Y. (2023). RankMe: Assessing
the downstream performance of pretrained self-supervised representations by
their rank. ICML 2023.
"""

from __future__ import annotations

import warnings

import torch

from dtprobe.metrics._validation import ArrayLike, check_features
from dtprobe.metrics.registry import EpochView, MetricValue, register_metric

__all__ = ["rankme", "DEFAULT_RANKME_EPS"]

#: The paper's epsilon added to every normalised singular value.
DEFAULT_RANKME_EPS = 1e-7


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
    x = check_features(features, "features", min_samples=1)
    sigma = torch.linalg.svdvals(x)
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
