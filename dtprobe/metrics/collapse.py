"""Neural-collapse statistics NC1-NC4 (Papyan, Han and Donoho 2020).

Late in training, penultimate features of each class shrink to their class mean
(NC1), the centred class means form a simplex equiangular tight frame (NC2),
the classifier rows align with those means (NC3) and the classifier acts as a
nearest-class-centre rule (NC4).  Kornblith et al. (2021) and Cui et al. (2022)
link this collapse to worse transfer, so dtprobe tracks it per checkpoint.

Conventions (all documented choices where the paper leaves room):

* ``mu_c`` is the mean of class ``c``; the *global mean* ``mu_G`` is the mean of
  the class means (classes weighted equally).  For balanced classes it equals
  the sample mean, as in the paper; for unbalanced classes it keeps the
  centred-mean matrix ``M = [mu_c - mu_G]`` (d x C) exactly orthogonal to the
  all-ones vector, as the simplex ETF it is compared with is.
* ``Sigma_W = (1/n) sum_i (h_i - mu_{y_i})(h_i - mu_{y_i})^T`` (average over all
  samples) and ``Sigma_B = (1/C) M M^T``.
* Standard deviations are population standard deviations (``ddof = 0``).

Two later variants are here too: the class-distance normalised variance (CDNV,
Galanti et al. 2022), the collapse measure they link to few-shot transfer, and
the hyperspherical uniformity of the class means (Wang and Isola 2020's
uniformity, applied to class means as in Liu et al. 2023).

References
----------
Papyan, V., Han, X. Y., Donoho, D. L. (2020). Prevalence of neural collapse
during the terminal phase of deep learning training. PNAS 117(40), 24652-24663.

Galanti, T., Gyorgy, A., Hutter, M. (2022). On the role of neural collapse in
transfer learning. ICLR 2022.

Wang, T., Isola, P. (2020). Understanding contrastive representation learning
through alignment and uniformity on the hypersphere. ICML 2020.

Liu, W., Yu, L., Weller, A., Schoelkopf, B. (2023). Generalizing and decoupling
neural collapse via hyperspherical uniformity gap. ICLR 2023.
"""

from __future__ import annotations

import math
import warnings
from typing import cast

import torch

from dtprobe.errors import MetricInputError
from dtprobe.metrics._validation import (
    ArrayLike,
    as_tensor,
    check_features,
    check_labels,
    ldexp,
    pow2_scale_exponent,
)
from dtprobe.metrics.registry import EpochView, MetricValue, register_metric

__all__ = ["neural_collapse", "cdnv", "class_mean_uniformity", "DEFAULT_RCOND",
           "DEFAULT_UNIFORMITY_T"]

#: Relative cut-off for the pseudo-inverse of Sigma_B: eigenvalues at or below
#: ``DEFAULT_RCOND * lambda_max(Sigma_B)`` are treated as zero (numpy ``pinv``'s
#: ``rtol`` semantics).  Sigma_B is formed from an SVD of M in float64, so its
#: numerical null space sits near 1e-32 relative and genuine directions are kept.
DEFAULT_RCOND = 1e-12

# Class means whose spread is below this fraction of the feature scale are "all equal".
_DEGENERATE_SPREAD = 1e-10
#: Bytes of float64 work space per block of rows (or of class pairs).  Features are read in
#: row blocks, each upcast to float64 on its own: no full float64 copy of the features and no
#: (n x C) matrix is formed, so memory is O(C d) besides the input (n = 300k, d = 2048,
#: C = 1000 needed about 25 GB before).
_MEMORY_BUDGET = 64 * 2**20


def _steps(total: int, width: int) -> range:
    """Block starts over ``total`` rows of ``width`` float64 values within the budget."""
    return range(0, total, _step(width))


def _step(width: int) -> int:
    return max(1, _MEMORY_BUDGET // (8 * max(width, 1)))


def _warn(msg: str) -> None:
    warnings.warn(f"neural_collapse: {msg}", RuntimeWarning, stacklevel=3)


def neural_collapse(features: ArrayLike, labels: ArrayLike, weight: ArrayLike | None = None,
                    bias: ArrayLike | None = None, *,
                    rcond: float = DEFAULT_RCOND) -> dict[str, float]:
    """Neural-collapse statistics of Papyan, Han and Donoho (2020).

    Parameters
    ----------
    features : array_like or torch.Tensor, shape (n_samples, n_features)
        Penultimate features ``h_i`` (the paper uses the training set); numpy
        or torch, CPU or CUDA, computed in float64 on the input's device.
    labels : array_like or torch.Tensor, shape (n_samples,)
        Integer class labels.  Without ``weight`` any integer values work (at
        least two classes); with ``weight`` they must be row indices
        ``0 .. C-1`` of ``weight`` and every class must occur.
    weight : array_like or torch.Tensor, shape (n_classes, n_features), optional
        Last-layer classifier weights stored as ``torch.nn.Linear.weight`` and
        scikit-learn's ``coef_`` store them (one row per class).  Needed for
        ``nc3`` and ``nc4``.
    bias : array_like or torch.Tensor, shape (n_classes,), optional
        Classifier bias (zero when omitted); only used by ``nc4``.
    rcond : float, default ``DEFAULT_RCOND`` (1e-12)
        Relative cut-off of the pseudo-inverse ``Sigma_B^+``: eigenvalues of
        ``Sigma_B`` at most ``rcond * lambda_max`` are treated as zero.

    Returns
    -------
    dict of str to float
        ``nc1``
            ``tr(Sigma_W Sigma_B^+) / C`` (within-class variability relative
            to between-class spread; 0 at full collapse).
        ``nc2_equinorm``
            ``std_c ||mu_c - mu_G|| / mean_c ||mu_c - mu_G||``.
        ``nc2_equiangularity``
            standard deviation of ``cos(mu_c - mu_G, mu_c' - mu_G)`` over the
            off-diagonal pairs ``c != c'`` (NaN with a warning when a class
            mean coincides with the global mean).
        ``nc2_etf_error``
            ``|| G / ||G||_F - (I - 11^T/C) / ||I - 11^T/C||_F ||_F`` with
            ``G = M^T M``.  The columns of ``M`` are *not* normalised one by
            one (only ``G`` as a whole, as in the authors' code), so the
            value measures distance to a simplex ETF in both norms and angles.
        ``nc3`` (only with ``weight``)
            ``|| W^T / ||W||_F - M / ||M||_F ||_F^2`` (self-duality).
        ``nc4`` (only with ``weight``)
            fraction of samples where ``argmax_c (W h + b)_c`` differs from the
            nearest-class-mean rule ``argmin_c ||h - mu_c||`` (ties go to the
            lowest class index in both rules).

        If all class means coincide (to round-off), ``nc1``, both NC2
        measures, ``nc2_etf_error`` and ``nc3`` are NaN and a
        :class:`RuntimeWarning` is issued; ``nc4`` is still defined.

    Raises
    ------
    MetricInputError
        Wrong shapes, NaN/Inf, fewer than two classes, or labels that do not
        index the rows of ``weight``.

    References
    ----------
    Papyan, V., Han, X. Y., Donoho, D. L. (2020). Prevalence of neural collapse
    during the terminal phase of deep learning training. PNAS 117(40),
    24652-24663 (Figures 2-6 define NC1-NC4).
    """
    h = check_features(features, "features", dtype=None)  # upcast block by block below
    n, d = h.shape
    y, n_classes = check_labels(labels, n, "labels", device=h.device)
    w = b = None
    if weight is not None:
        w = check_features(weight, "weight", min_samples=1, device=h.device)
        if w.shape[1] != d:
            raise MetricInputError(
                f"weight has shape {tuple(w.shape)} but features have {d} columns; pass it as "
                "(n_classes, n_features) like nn.Linear.weight (transpose it if needed)")
        raw = as_tensor(labels, device=h.device).reshape(-1)
        if w.shape[0] != n_classes or float(raw.min()) < 0 or float(raw.max()) >= w.shape[0]:
            raise MetricInputError(
                f"labels cover {n_classes} classes with values {int(raw.min())}..{int(raw.max())} "
                f"but weight has {w.shape[0]} rows; labels must be the row indices 0..C-1 of "
                "weight and every class must occur")
        if bias is not None:
            b = as_tensor(bias, device=h.device).reshape(-1)
            if b.shape[0] != w.shape[0] or not torch.isfinite(b).all():
                raise MetricInputError(f"bias must be {w.shape[0]} finite values (one per row of "
                                       f"weight), got shape {tuple(b.shape)}")
    elif bias is not None:
        raise MetricInputError("bias was given without weight; pass the classifier weight too")

    # NC1-NC3 and the nearest-centre rule are scale-free: an exact power-of-two rescaling keeps
    # their squares representable for features near 1e+-200 (the classifier of NC4 sees h as is)
    f64 = torch.float64
    step = _step(d + 2 * n_classes)
    starts = range(0, n, step)
    exponent = pow2_scale_exponent(*(h[s:s + step] for s in starts))

    def scaled(s: int) -> torch.Tensor:
        return ldexp(h[s:s + step].to(f64), -exponent)

    counts = torch.bincount(y, minlength=n_classes).to(f64)
    means = torch.zeros(n_classes, d, dtype=f64, device=h.device)
    scale = 0.0
    for s in starts:  # pass 1: class sums and the largest row norm
        block = scaled(s)
        means.index_add_(0, y[s:s + step], block)
        scale = max(scale, float(torch.linalg.vector_norm(block, dim=1).max()))
    means /= counts[:, None]
    global_mean = means.mean(dim=0)
    m = (means - global_mean).T  # d x C, centred class means as columns

    out: dict[str, float] = {}
    nan = float("nan")
    col_norms = torch.linalg.vector_norm(m, dim=0)
    degenerate = float(col_norms.max()) <= _DEGENERATE_SPREAD * scale
    if degenerate:
        _warn("all class means coincide; NC1, NC2 and NC3 are undefined (NaN)")
        out.update(nc1=nan, nc2_equinorm=nan, nc2_equiangularity=nan, nc2_etf_error=nan)
    else:
        # NC1 through the SVD of M: Sigma_B = (1/C) U S^2 U^T, so
        # tr(Sigma_W Sigma_B^+)/C = sum_j (u_j^T Sigma_W u_j) / s_j^2, and
        # u_j^T Sigma_W u_j = mean_i ((h_i - mu_{y_i}) . u_j)^2.  No d x d matrix is formed.
        u, sv, _ = torch.linalg.svd(m, full_matrices=False)
        keep = sv**2 > rcond * sv[0] ** 2
        u, sv = u[:, keep], sv[keep]
        centre_proj = means @ u
        within = torch.zeros(u.shape[1], dtype=f64, device=h.device)
        for s in starts:  # pass 2: sum over rows of ((h_i - mu_{y_i}) . u_j)^2, block by block
            resid_proj = scaled(s) @ u - centre_proj[y[s:s + step]]  # block x r
            within += (resid_proj**2).sum(dim=0)
        out["nc1"] = float((within / n / sv**2).sum())

        out["nc2_equinorm"] = float(col_norms.std(correction=0) / col_norms.mean())
        if float(col_norms.min()) <= _DEGENERATE_SPREAD * float(col_norms.max()):
            _warn("a class mean equals the global mean; nc2_equiangularity is NaN")
            out["nc2_equiangularity"] = nan
        else:
            unit = m / col_norms
            cos = unit.T @ unit
            off = cos[~torch.eye(n_classes, dtype=torch.bool, device=cos.device)]
            out["nc2_equiangularity"] = float(off.std(correction=0))

        gram = m.T @ m
        target = torch.eye(n_classes, dtype=f64, device=h.device) - 1.0 / n_classes
        target /= math.sqrt(n_classes - 1)  # ||I - 11^T/C||_F = sqrt(C - 1)
        out["nc2_etf_error"] = float(torch.linalg.matrix_norm(
            gram / torch.linalg.matrix_norm(gram) - target))

    if w is not None:
        w_norm = torch.linalg.matrix_norm(w)
        if degenerate or float(w_norm) == 0:
            if not degenerate:
                _warn("classifier weight is all zeros; nc3 is NaN")
            out["nc3"] = nan
        else:
            diff = w.T / w_norm - m / torch.linalg.matrix_norm(m)
            out["nc3"] = float((diff**2).sum())
        mean_sq = (means**2).sum(dim=1)
        disagree = 0
        for s in starts:  # the two rules on each row block (no n x C matrix)
            raw = h[s:s + step].to(f64)
            logits = raw @ w.T
            if b is not None:
                logits = logits + b
            classifier = logits.argmax(dim=1)
            # argmin_c ||h - mu_c||^2 = argmin_c (||mu_c||^2 - 2 h . mu_c)
            dist = mean_sq - 2.0 * (ldexp(raw, -exponent) @ means.T)
            disagree += int((classifier != dist.argmin(dim=1)).sum())
        out["nc4"] = disagree / n
    return out


@register_metric("neural_collapse", default=True,
                 rows=("nc1", "nc2_equinorm", "nc2_equiangularity", "nc2_etf_error", "nc3", "nc4"),
                 description="neural collapse NC1-NC4 (Papyan et al. 2020) on train features")
def _neural_collapse_metric(view: EpochView) -> list[MetricValue]:
    """NC1-NC4 on the training split, as Papyan et al. (2020) measure them."""
    values = neural_collapse(view.train.features, view.train.labels,
                             weight=view.head_weight,
                             bias=view.head_bias if view.head_weight is not None else None)
    params = {"split": "train", "rcond": DEFAULT_RCOND, "global_mean": "mean_of_class_means",
              "std_ddof": 0, "etf_columns": "unnormalised",
              "head_bias": view.head_bias is not None}
    order = ["nc1", "nc2_equinorm", "nc2_equiangularity", "nc2_etf_error", "nc3", "nc4"]
    return [MetricValue(name, values[name], estimator="papyan2020", params=dict(params))
            for name in order if name in values]


#: Wang and Isola's (2020) temperature of the uniformity potential.
DEFAULT_UNIFORMITY_T = 2.0


def _class_stats(features: ArrayLike, labels: ArrayLike, variances: bool = True
                 ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Class means (C x d), population variances ``E||h - mu_c||^2`` (C; None unless
    ``variances``) and counts (C), float64, from row blocks upcast one at a time."""
    h = check_features(features, "features", dtype=None)
    n, d = h.shape
    y, n_classes = check_labels(labels, n, "labels", device=h.device)
    f64 = torch.float64
    step = _step(2 * d)
    counts = torch.bincount(y, minlength=n_classes).to(f64)
    means = torch.zeros(n_classes, d, dtype=f64, device=h.device)
    for s in range(0, n, step):
        means.index_add_(0, y[s:s + step], h[s:s + step].to(f64))
    means /= counts[:, None]
    if not variances:
        return means, None, counts
    var = torch.zeros(n_classes, dtype=f64, device=h.device)
    for s in range(0, n, step):  # second pass: deviations from the final means (no cancellation)
        yb = y[s:s + step]
        var.index_add_(0, yb, ((h[s:s + step].to(f64) - means[yb]) ** 2).sum(dim=1))
    return means, var / counts, counts


def _pair_sq_dists(points: torch.Tensor) -> torch.Tensor:
    """``||p_i - p_j||^2`` over the pairs ``i < j`` (row-major order), from the coordinate
    differences, in blocks of pairs: all pairs at once are ``C^2 / 2`` rows of ``d`` values
    (8 GB at C = 1000, d = 2048)."""
    k = points.shape[0]
    i, j = torch.triu_indices(k, k, offset=1, device=points.device)
    out = torch.empty(i.numel(), dtype=points.dtype, device=points.device)
    step = _step(2 * points.shape[1])
    for s in range(0, i.numel(), step):
        out[s:s + step] = ((points[i[s:s + step]] - points[j[s:s + step]]) ** 2).sum(dim=1)
    return out


def cdnv(features: ArrayLike, labels: ArrayLike) -> float:
    """Class-distance normalised variance (CDNV) of Galanti et al. (2022).

    ``V(i, j) = (Var_i + Var_j) / (2 ||mu_i - mu_j||^2)`` with ``Var_c = E ||h - mu_c||^2``
    (population variance, ``ddof = 0``) and ``mu_c`` the class means, averaged over all
    unordered class pairs ``i < j``.

    Parameters
    ----------
    features : array_like or torch.Tensor, shape (n_samples, n_features)
        Features (numpy or torch, CPU or CUDA, any float dtype; float64 inside).
    labels : array_like or torch.Tensor, shape (n_samples,)
        Integer class labels, at least two classes.  A class with one sample has
        variance 0 (documented, not an error).

    Returns
    -------
    float
        Mean CDNV over class pairs, ``>= 0``; 0 at full collapse, smaller = more collapsed.
        Invariant to rotations, translations and isotropic scaling of the features and to
        the sample order.  ``inf`` with a :class:`RuntimeWarning` when two class means
        coincide (to round-off) while a variance is positive; NaN with a warning when
        they coincide and both classes are points.

    Raises
    ------
    MetricInputError
        Wrong shapes, NaN/Inf, fewer than two classes.

    References
    ----------
    Galanti, T., Gyorgy, A., Hutter, M. (2022). On the role of neural collapse in transfer
    learning. ICLR 2022 (class-distance normalized variance).
    """
    means, maybe_var, _ = _class_stats(features, labels)
    var = cast(torch.Tensor, maybe_var)
    k = means.shape[0]
    i, j = torch.triu_indices(k, k, offset=1, device=means.device)
    dist2 = _pair_sq_dists(means)
    num = var[i] + var[j]
    scale = float((means**2).sum(dim=1).max()) + float(var.max())
    same = dist2 <= 1e-24 * max(scale, torch.finfo(torch.float64).tiny)
    if bool(same.any()):
        if bool((num[same] == 0).any()):
            _warn_fn("cdnv", "two classes are the same single point; CDNV is undefined (NaN)")
            return float("nan")
        _warn_fn("cdnv", f"{int(same.sum())} class pair(s) have coinciding means; CDNV is inf")
        return float("inf")
    return float((num / (2.0 * dist2)).mean())


def class_mean_uniformity(features: ArrayLike, labels: ArrayLike, *,
                          t: float = DEFAULT_UNIFORMITY_T) -> float:
    """Hyperspherical uniformity of the class means (Wang and Isola 2020; Liu et al. 2023).

    The class means are centred at their mean (classes weighted equally, as in
    :func:`neural_collapse`) and projected to the unit sphere, ``u_c``; the value is Wang and
    Isola's uniformity potential over the distinct pairs,
    ``log( mean_{c != c'} exp(-t ||u_c - u_c'||^2) )``.

    Parameters
    ----------
    features, labels
        As :func:`cdnv`.
    t : float, default 2
        Temperature (Wang and Isola's value).

    Returns
    -------
    float
        Lower = more uniform.  Its minimum over ``C`` points on a sphere of dimension at least
        ``C - 1`` is reached by the simplex ETF, where ``||u_c - u_c'||^2 = 2C/(C-1)`` gives
        ``-2 t C / (C - 1)``.  Invariant to rotations, translations and scaling.  NaN with a
        :class:`RuntimeWarning` when a class mean equals the mean of the means.

    Raises
    ------
    MetricInputError
        As :func:`cdnv` (the same checks of ``features`` and ``labels``).

    References
    ----------
    Wang, T., Isola, P. (2020). Understanding contrastive representation learning through
    alignment and uniformity on the hypersphere. ICML 2020 (uniformity loss).

    Liu, W., Yu, L., Weller, A., Schoelkopf, B. (2023). Generalizing and decoupling neural
    collapse via hyperspherical uniformity gap. ICLR 2023.
    """
    means, _, _ = _class_stats(features, labels, variances=False)
    m = means - means.mean(dim=0)
    norms = torch.linalg.vector_norm(m, dim=1, keepdim=True)
    if float(norms.min()) <= _DEGENERATE_SPREAD * max(float(norms.max()),
                                                      float(torch.finfo(torch.float64).tiny)):
        _warn_fn("class_mean_uniformity",
                 "a class mean equals the mean of the class means; its direction is undefined "
                 "(NaN)")
        return float("nan")
    d2 = _pair_sq_dists(m / norms)
    # log-mean-exp, stable
    return float(torch.logsumexp(-t * d2, dim=0) - math.log(d2.numel()))


def _warn_fn(fn: str, msg: str) -> None:
    warnings.warn(f"{fn}: {msg}", RuntimeWarning, stacklevel=3)


@register_metric("cdnv", default=True, rows=("cdnv", "class_mean_uniformity"),
                 description="CDNV (Galanti et al. 2022) and hyperspherical uniformity of class "
                             "means (Wang & Isola 2020) on train features")
def _cdnv_metric(view: EpochView) -> list[MetricValue]:
    """CDNV and class-mean uniformity on the training split (as neural_collapse)."""
    feats, labels = view.train.features, view.train.labels
    return [MetricValue("cdnv", cdnv(feats, labels), estimator="galanti2022_cdnv",
                        params={"split": "train", "variance_ddof": 0, "pairs": "unordered_mean"}),
            MetricValue("class_mean_uniformity", class_mean_uniformity(feats, labels),
                        estimator="wang_isola2020_uniformity",
                        params={"split": "train", "t": DEFAULT_UNIFORMITY_T,
                                "centre": "mean_of_class_means"})]
