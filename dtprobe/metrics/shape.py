"""Shape metrics between representations (Williams et al. 2021): Procrustes and angular distance.

Williams et al. treat a representation ``X`` (n x d) as a point in a *shape
space*: after centring (translation) and allowing any orthogonal map
(rotation/reflection), two representations are compared by a proper metric
(symmetric, triangle inequality).  With column-centred ``X``, ``Y`` (the
narrower one zero-padded, which changes nothing below) and the nuclear norm
``||.||_*`` (sum of singular values),

* ``min_Q ||X - Y Q||_F^2 = ||X||_F^2 + ||Y||_F^2 - 2 ||X^T Y||_*`` over
  orthogonal ``Q`` (orthogonal Procrustes, Schoenemann 1966), so the
  **Procrustes distance** of the unit-Frobenius-norm representations is
  ``sqrt(2 - 2 ||X^T Y||_* / (||X||_F ||Y||_F))``, in ``[0, sqrt 2]``;
* the **angular shape metric** is
  ``theta = arccos(||X^T Y||_* / (||X||_F ||Y||_F))``, in ``[0, pi/2]``.

Both are *distances*: smaller means more similar.  Only the ``d1 x d2``
cross-product and its singular values are needed (``O(n d1 d2)``), never an
``n x n`` matrix or the rotation itself.

References
----------
Williams, A. H., Kunz, E., Kornblith, S., Linderman, S. W. (2021). Generalized
shape metrics on neural representations. NeurIPS 2021.

Schoenemann, P. H. (1966). A generalized solution of the orthogonal Procrustes
problem. Psychometrika 31, 1-10.
"""

from __future__ import annotations

import math
import warnings

import torch

from dtprobe.errors import MetricInputError
from dtprobe.metrics._validation import ArrayLike, check_features
from dtprobe.metrics.registry import register_similarity

__all__ = ["procrustes_distance", "angular_shape_metric"]

#: Centred energy below this fraction of the raw energy means a constant representation.
_CONSTANT_RATIO = 1e-24


def _centred_pair(x: ArrayLike, y: ArrayLike, fn: str) -> tuple[torch.Tensor, torch.Tensor]:
    a = check_features(x, "x")
    b = check_features(y, "y", device=a.device)
    if a.shape[0] != b.shape[0]:
        raise MetricInputError(f"x has {a.shape[0]} samples but y has {b.shape[0]}; {fn} "
                               "compares representations of the same inputs")
    out = []
    for t in (a, b):
        c = t - t.mean(dim=0)
        if float((c**2).sum()) <= _CONSTANT_RATIO * float((t**2).sum()):
            c = torch.zeros_like(c)  # constant: exactly zero, not round-off noise
        out.append(c)
    return out[0], out[1]


def _cosine_of_shapes(x: ArrayLike, y: ArrayLike, fn: str) -> float | None:
    """``||X^T Y||_* / (||X||_F ||Y||_F)`` of the centred pair, clipped to [0, 1]; None if
    either side is constant."""
    a, b = _centred_pair(x, y, fn)
    na, nb = torch.linalg.matrix_norm(a), torch.linalg.matrix_norm(b)
    if float(na) == 0.0 or float(nb) == 0.0:
        warnings.warn(f"{fn}: a representation is constant (zero after centring); its shape is "
                      "undefined, returning NaN", RuntimeWarning, stacklevel=3)
        return None
    # Scale first so the cross-product cannot overflow; then the nuclear norm of d1 x d2.
    cross = (a / na).T @ (b / nb)
    nuc = torch.linalg.svdvals(cross).sum()
    return min(max(float(nuc), 0.0), 1.0)


def procrustes_distance(x: ArrayLike, y: ArrayLike) -> float:
    """Orthogonal Procrustes shape distance (Williams et al. 2021).

    Parameters
    ----------
    x : array_like or torch.Tensor, shape (n_samples, d1)
        First representation (numpy or torch, CPU or CUDA, any float dtype; float64 inside,
        so float16/bfloat16 give the distance of the rounded features).
    y : array_like or torch.Tensor, shape (n_samples, d2)
        Second representation of the same samples, same order; ``d2`` may differ from ``d1``.

    Returns
    -------
    float
        ``min_Q ||X - Y Q||_F`` over orthogonal ``Q`` after centring each side and scaling
        it to unit Frobenius norm: ``sqrt(2 - 2 ||X^T Y||_*)`` in ``[0, sqrt 2]``.  A
        distance: **smaller means more similar** (0 iff the shapes are equal).  Invariant to
        translations, orthogonal maps and isotropic scaling of either side and to a joint
        permutation of the samples.  NaN with a :class:`RuntimeWarning` when a side is
        constant.

    Raises
    ------
    MetricInputError
        Wrong shapes, NaN/Inf, different numbers of samples, fewer than 2 samples.

    References
    ----------
    Williams, A. H., Kunz, E., Kornblith, S., Linderman, S. W. (2021). Generalized shape
    metrics on neural representations. NeurIPS 2021 (Procrustes distance).
    """
    cos = _cosine_of_shapes(x, y, "procrustes_distance")
    if cos is None:
        return float("nan")
    return math.sqrt(max(2.0 - 2.0 * cos, 0.0))


def angular_shape_metric(x: ArrayLike, y: ArrayLike) -> float:
    """Angular Procrustes shape metric ``arccos(||X^T Y||_* / (||X||_F ||Y||_F))``.

    Parameters
    ----------
    x, y : as :func:`procrustes_distance`.

    Returns
    -------
    float
        Angle in radians, ``[0, pi/2]``; **smaller means more similar**.  Same invariances
        as :func:`procrustes_distance`; NaN with a :class:`RuntimeWarning` when a side is
        constant.

    References
    ----------
    Williams et al. (2021), cited in full at :func:`procrustes_distance` (angular distance).
    """
    cos = _cosine_of_shapes(x, y, "angular_shape_metric")
    if cos is None:
        return float("nan")
    return math.acos(cos)


_SHAPE_INVARIANCES = ("sample_permutation", "translation", "orthogonal", "isotropic_scaling")


@register_similarity("procrustes_distance", invariances=_SHAPE_INVARIANCES,
                     params={"normalised": "unit_frobenius"},
                     description="orthogonal Procrustes shape distance (Williams et al. 2021)")
def _procrustes_similarity(x: torch.Tensor, y: torch.Tensor) -> float:
    return procrustes_distance(x, y)


@register_similarity("angular_shape_metric", invariances=_SHAPE_INVARIANCES,
                     params={"unit": "radians"},
                     description="angular Procrustes shape metric (Williams et al. 2021)")
def _angular_similarity(x: torch.Tensor, y: torch.Tensor) -> float:
    return angular_shape_metric(x, y)
