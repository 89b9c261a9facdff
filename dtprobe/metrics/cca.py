"""CCA similarity of representations: SVCCA (Raghu et al. 2017) and PWCCA (Morcos et al. 2018).

Canonical correlation analysis finds directions ``h_i = X a_i`` and
``g_i = Y b_i`` of two column-centred representations with maximal
correlations ``rho_1 >= rho_2 >= ...``.  With orthonormal bases ``Q_X``,
``Q_Y`` of the column spaces of the centred ``X`` and ``Y``, the ``rho_i`` are
the singular values of ``Q_X^T Q_Y`` (Bjoerck and Golub 1973), which is how
they are computed here: no covariance is inverted.

* **SVCCA** first keeps, on each side, the leading singular directions that
  explain a fraction ``keep`` of the variance (Raghu et al. use 0.99), then
  averages the canonical correlations of the reduced representations.
* **PWCCA** weights the correlations by how much of the representation each
  canonical direction accounts for: ``alpha_i ~ sum_j |<h_i, x_j>|`` over the
  centred neurons ``x_j`` (columns of ``X``), ``h_i`` the unit-norm canonical
  variates of ``X``, normalised to sum to 1; ``PWCCA = sum_i alpha_i rho_i``.
  Morcos et al.'s release takes the inner products with the *uncentred*
  neurons and weights whichever side has fewer neurons; here the neurons are
  centred (as the paper defines the projection weights) and ``weight_by`` says which
  side is weighted.

Numerical robustness (rank-deficient features, e.g. dead ReLU units or
``n < d``): each side is centred in float64 and decomposed by an SVD; if the
LAPACK SVD fails to converge, an eigendecomposition of the smaller Gram matrix
(``d x d`` or ``n x n``) is used instead.  **Rank threshold**: singular values at
most ``rtol * sigma_max`` are dropped before CCA, with the default
``rtol = max(max(n, d) * eps_64, (eps_in / 2) sqrt(min(n, d)))`` of
:func:`dtprobe.metrics.spectrum.numerical_rank` (``eps_in`` the machine epsilon
of the input's dtype), so directions that only the float64 SVD error or the
rounding of the stored features could produce never enter the correlations.

When the two kept ranks add up to more than ``n - 1`` (the dimension of the
centred sample space), at least ``r_x + r_y - (n - 1)`` canonical correlations
equal 1 by construction: a :class:`RuntimeWarning` says so.

References
----------
Raghu, M., Gilmer, J., Yosinski, J., Sohl-Dickstein, J. (2017). SVCCA: Singular
vector canonical correlation analysis for deep learning dynamics and
interpretability. NeurIPS 2017.

Morcos, A. S., Raghu, M., Bengio, S. (2018). Insights on representational
similarity in neural networks with canonical correlation. NeurIPS 2018.

Bjoerck, A., Golub, G. H. (1973). Numerical methods for computing angles
between linear subspaces. Mathematics of Computation 27, 579-594.
"""

from __future__ import annotations

import warnings

import torch

from dtprobe.errors import ConfigError, MetricInputError
from dtprobe.metrics._validation import ArrayLike, check_features
from dtprobe.metrics.registry import register_similarity
from dtprobe.metrics.spectrum import input_eps, rank_tol

__all__ = ["svcca", "pwcca", "canonical_correlations", "DEFAULT_SVCCA_KEEP"]

#: Raghu et al. (2017) keep the directions explaining 99 % of the variance.
DEFAULT_SVCCA_KEEP = 0.99


def _svd(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD; falls back to an eigendecomposition of the smaller Gram if LAPACK fails."""
    try:
        return torch.linalg.svd(x, full_matrices=False)
    except RuntimeError:  # torch.linalg.LinAlgError: "SVD did not converge"
        n, d = x.shape
        if d <= n:
            lam, v = torch.linalg.eigh(x.T @ x)
            lam, v = lam.flip(0).clamp_min(0), v.flip(1)
            s = lam.sqrt()
            u = x @ v / torch.where(s > 0, s, torch.ones_like(s))
            return u, s, v.T
        lam, u = torch.linalg.eigh(x @ x.T)
        lam, u = lam.flip(0).clamp_min(0), u.flip(1)
        s = lam.sqrt()
        vt = (u.T @ x) / torch.where(s > 0, s, torch.ones_like(s))[:, None]
        return u, s, vt


def _basis(raw: ArrayLike, name: str, rtol: float | None, keep: float | None,
           device=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Centred ``raw`` -> (U_r, s_r, Vh_r) of its kept singular directions."""
    x = check_features(raw, name, device=device)
    x = x - x.mean(dim=0)
    u, s, vh = _svd(x)
    if float(s.max()) == 0.0:
        raise MetricInputError(f"{name} is constant (zero after centring); CCA needs variance "
                               "in at least one direction")
    r = int((s > rank_tol(s, tuple(x.shape), rtol, input_eps(raw))).sum())
    if keep is not None:
        energy = torch.cumsum(s[:r] ** 2, dim=0)
        r = min(r, int((energy < keep * energy[-1]).sum()) + 1)
    return u[:, :r], s[:r], vh[:r]


def _check_pair(x: torch.Tensor, y: torch.Tensor, fn: str) -> None:
    if x.shape[0] != y.shape[0]:
        raise MetricInputError(f"x has {x.shape[0]} samples but y has {y.shape[0]}; {fn} "
                               "compares representations of the same inputs")


def _correlations(ux: torch.Tensor, uy: torch.Tensor, fn: str, stacklevel: int
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    n = ux.shape[0]
    if ux.shape[1] + uy.shape[1] > n - 1:
        warnings.warn(f"{fn}: kept ranks {ux.shape[1]} + {uy.shape[1]} exceed n - 1 = {n - 1}; "
                      f"at least {ux.shape[1] + uy.shape[1] - n + 1} canonical correlation(s) "
                      "are 1 by construction (use more samples than dimensions)",
                      RuntimeWarning, stacklevel=stacklevel)
    a, rho, bt = _svd(ux.T @ uy)
    return a, rho.clamp(0.0, 1.0), bt


def canonical_correlations(x: ArrayLike, y: ArrayLike, *, rtol: float | None = None
                           ) -> torch.Tensor:
    """All canonical correlations of two representations, largest first (float64 tensor).

    Parameters as :func:`pwcca`; the length is ``min(r_x, r_y)``, the kept ranks.
    """
    ux, _, _ = _basis(x, "x", rtol, None)
    uy, _, _ = _basis(y, "y", rtol, None, device=ux.device)
    _check_pair(ux, uy, "canonical_correlations")
    return _correlations(ux, uy, "canonical_correlations", 3)[1]


def svcca(x: ArrayLike, y: ArrayLike, keep: float = DEFAULT_SVCCA_KEEP, *,
          rtol: float | None = None) -> float:
    """SVCCA similarity (Raghu et al. 2017).

    Parameters
    ----------
    x, y : array_like or torch.Tensor, shapes (n_samples, d1) and (n_samples, d2)
        The two representations, as in :func:`pwcca`.
    keep : float, default 0.99
        Fraction of the variance kept on each side: the fewest leading singular directions
        whose squared singular values reach ``keep`` of the total, in ``(0, 1]``.
    rtol : float, optional
        Relative rank threshold (module docstring); directions below it are dropped first.

    Returns
    -------
    float
        Mean of the ``min(k_x, k_y)`` canonical correlations of the reduced
        representations, in ``[0, 1]``; **larger means more similar**.  Invariant to
        translations, orthogonal maps and isotropic scaling of either side and to a joint
        permutation of the samples (not to general invertible maps: the variance
        truncation is not).

    Raises
    ------
    MetricInputError
        Wrong shapes, NaN/Inf, different sample counts, a constant representation.
    ConfigError
        ``keep`` outside ``(0, 1]``.

    References
    ----------
    Raghu, M., Gilmer, J., Yosinski, J., Sohl-Dickstein, J. (2017). SVCCA: Singular vector
    canonical correlation analysis for deep learning dynamics and interpretability.
    NeurIPS 2017 (the SVCCA procedure).
    """
    if not 0.0 < keep <= 1.0:
        raise ConfigError(f"keep={keep!r} must be a fraction of variance in (0, 1]")
    ux, _, _ = _basis(x, "x", rtol, keep)
    uy, _, _ = _basis(y, "y", rtol, keep, device=ux.device)
    _check_pair(ux, uy, "svcca")
    return float(_correlations(ux, uy, "svcca", 3)[1].mean())


def pwcca(x: ArrayLike, y: ArrayLike, *, weight_by: str = "x",
          rtol: float | None = None) -> float:
    """Projection-weighted CCA (Morcos et al. 2018).

    Parameters
    ----------
    x : array_like or torch.Tensor, shape (n_samples, d1)
        First representation (numpy or torch, CPU or CUDA, any float dtype; float64 inside).
    y : array_like or torch.Tensor, shape (n_samples, d2)
        Second representation of the same samples, same order.
    weight_by : {"x", "y"}, default "x"
        Side whose neurons weight the canonical correlations (PWCCA is asymmetric).
    rtol : float, optional
        Relative rank threshold (module docstring).

    Returns
    -------
    float
        ``sum_i alpha_i rho_i`` in ``[0, 1]``; **larger means more similar**.  Invariant to
        translations and isotropic scaling of either side, to any invertible linear map of
        the unweighted side, to permuting the neurons, and to a joint permutation of the
        samples; *not* to rotations of the weighted side (the weights sum over its neurons).

    Raises
    ------
    MetricInputError
        Wrong shapes, NaN/Inf, different sample counts, a constant representation.
    ConfigError
        Unknown ``weight_by``.

    References
    ----------
    Morcos, A. S., Raghu, M., Bengio, S. (2018). Insights on representational similarity in
    neural networks with canonical correlation. NeurIPS 2018 (projection weighting).
    """
    if weight_by not in ("x", "y"):
        raise ConfigError(f"weight_by={weight_by!r} must be 'x' or 'y'")
    if weight_by == "y":
        x, y = y, x
    ux, sx, vhx = _basis(x, "x" if weight_by == "x" else "y", rtol, None)
    uy, _, _ = _basis(y, "y" if weight_by == "x" else "x", rtol, None, device=ux.device)
    _check_pair(ux, uy, "pwcca")
    a, rho, _ = _correlations(ux, uy, "pwcca", 3)
    m = rho.numel()
    # h = U_x a_i (unit norm); h^T X = a_i^T U_x^T U_x S V^T = a_i^T S V^T.
    proj = a[:, :m].T @ (sx[:, None] * vhx)
    alpha = proj.abs().sum(dim=1)
    return float((alpha / alpha.sum() * rho).sum())


@register_similarity("svcca",
                     invariances=("sample_permutation", "translation", "orthogonal",
                                  "isotropic_scaling"),
                     params={"keep": DEFAULT_SVCCA_KEEP, "rtol": "default"},
                     description="SVCCA, 99% variance kept (Raghu et al. 2017)")
def _svcca_similarity(x: torch.Tensor, y: torch.Tensor) -> float:
    return svcca(x, y, DEFAULT_SVCCA_KEEP)


@register_similarity("pwcca",
                     invariances=("sample_permutation", "translation", "isotropic_scaling",
                                  "neuron_permutation", "invertible_linear_of_y"),
                     params={"weight_by": "x", "rtol": "default"},
                     description="projection-weighted CCA, weighted by this checkpoint "
                                 "(Morcos et al. 2018)")
def _pwcca_similarity(x: torch.Tensor, y: torch.Tensor) -> float:
    return pwcca(x, y, weight_by="x")
