"""k-nearest-neighbour mutual-information estimators (KSG and Ross).

* Continuous-continuous: Kraskov, Stoegbauer & Grassberger (2004), algorithm 1,
  ``I = psi(k) + psi(N) - < psi(n_a(i) + 1) + psi(n_b(i) + 1) >``, where ``eps_i`` is the
  max-norm distance from sample ``i`` to its ``k``-th neighbour in the joint space and
  ``n_a(i)`` counts the other samples strictly closer than ``eps_i`` in the ``a`` space.
* Continuous-discrete: Ross (2014),
  ``I = psi(N) - < psi(N_y(i)) > + psi(k) - < psi(m_i) >``, where ``d_i`` is the distance to the
  ``k``-th neighbour among samples of the same label, ``N_y(i)`` the size of that class and
  ``m_i`` the number of other samples (any label) within ``d_i``.

All distances are max-norm (Chebyshev), searched with ``scipy.spatial.cKDTree``. Every
continuous column is first scaled to unit variance and perturbed with seeded Gaussian noise of
standard deviation ``jitter`` (default 1e-10) so that repeated values do not create distance
ties, as recommended by Kraskov et al. (2004). Values are in nats; being a bias-reduced
estimator, it can return small negative values for independent variables.
"""

from __future__ import annotations

import warnings

import numpy as np
from scipy.spatial import cKDTree
from scipy.special import digamma

from dtprobe.errors import MetricInputError
from dtprobe.metrics._validation import ArrayLike
from dtprobe.metrics.information._common import (
    MIResult,
    Variable,
    degenerate_result,
    prepare_pair,
)

#: Spawn key of the tie-breaking noise stream: its generator is never the one a caller gets from
#: ``default_rng(seed)``, so jitter cannot replay the noise that generated tied test data.
_JITTER_STREAM = (0x4B5347,)


def _jitter_rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=_JITTER_STREAM))


def _scaled(v: Variable, rng: np.random.Generator, jitter: float) -> np.ndarray:
    """Centred unit-variance columns plus tie-breaking noise of standard deviation ``jitter``.

    Centring comes first: on raw columns with a large common offset the noise would be below
    the offset's rounding step and vanish (KSG is invariant to shifting a variable).
    """
    x = v.data.cpu().numpy().astype(np.float64)
    x = x - x.mean(axis=0)
    peak = np.abs(x).max(axis=0)
    x = x / np.where(peak > 0, peak, 1.0)  # keeps the variance of tiny-valued columns representable
    std = x.std(axis=0)
    x = x / np.where(std > 0, std, 1.0)
    return x + jitter * rng.standard_normal(x.shape)


def _count_within(tree: cKDTree, x: np.ndarray, radius: np.ndarray) -> np.ndarray:
    """Number of tree points (the query point included) at max-norm distance <= radius."""
    return np.asarray(tree.query_ball_point(x, radius, p=np.inf, return_length=True))


def _ksg_cc(x: np.ndarray, y: np.ndarray, k: int) -> float:
    n = x.shape[0]
    joint = np.hstack([x, y])
    dist, _ = cKDTree(joint).query(joint, k=k + 1, p=np.inf)
    eps = dist[:, k]
    strict = np.nextafter(eps, 0.0)  # "strictly closer than eps" as "<= the float just below"
    n_x = _count_within(cKDTree(x), x, strict) - 1
    n_y = _count_within(cKDTree(y), y, strict) - 1
    return float(digamma(k) + digamma(n) - np.mean(digamma(n_x + 1) + digamma(n_y + 1)))


def _ross_cd(x: np.ndarray, labels: np.ndarray, k: int) -> tuple[float, int]:
    counts = np.bincount(labels)
    keep = counts[labels] >= 2
    if keep.sum() < 2:
        raise MetricInputError("ksg (Ross 2014) needs at least one label with 2 or more samples; "
                               "every class is a singleton")
    if not keep.all():
        warnings.warn(f"ksg: ignoring {int((~keep).sum())} samples whose label occurs once "
                      "(no same-label neighbour)", RuntimeWarning, stacklevel=3)
        x, labels = x[keep], labels[keep]
        counts = np.bincount(labels)
    n = x.shape[0]
    radius = np.empty(n)
    k_i = np.empty(n)
    for c in np.unique(labels):
        mask = labels == c
        kc = min(k, int(mask.sum()) - 1)
        dist, _ = cKDTree(x[mask]).query(x[mask], k=kc + 1, p=np.inf)
        radius[mask] = dist[:, kc]
        k_i[mask] = kc
    m = _count_within(cKDTree(x), x, radius) - 1
    value = digamma(n) - np.mean(digamma(counts[labels])) + np.mean(digamma(k_i) - digamma(m))
    return float(value), n


def ksg_mi(a: ArrayLike, b: ArrayLike, *, k: int = 3, jitter: float = 1e-10,
           max_samples: int | None = None, seed: int = 0) -> MIResult:
    """k-NN mutual information: KSG (continuous pair) or Ross (continuous and labels), in nats.

    Parameters
    ----------
    a, b : (n, d) arrays/tensors, or (n,) integer labels
        At least one must be continuous. For the Ross estimator, samples whose label occurs
        only once are dropped with a warning.
    k : int
        Number of neighbours (3 is the usual bias/variance compromise); per class it is capped
        at ``class size - 1``.
    jitter : float
        Standard deviation of the tie-breaking noise added to the centred, unit-variance
        columns (so it survives any common offset of the input).
    max_samples, seed : optional seeded subsample; ``seed`` also seeds the jitter, from a
        stream of its own (``SeedSequence(seed, spawn_key=(0x4B5347,))``) so that it is
        independent of data drawn with ``numpy.random.default_rng(seed)``.

    Returns
    -------
    MIResult
        Nats; ``params["variant"]`` is ``"ksg1"`` or ``"ross"``.

    References
    ----------
    Kraskov, Stoegbauer & Grassberger (2004), "Estimating mutual information", Phys. Rev. E 69.
    Ross (2014), "Mutual information between discrete and continuous data sets", PLoS ONE 9(2).
    """
    if not isinstance(k, int) or k < 1:
        raise MetricInputError(f"k must be a positive integer, got {k!r}")
    if not jitter >= 0:
        raise MetricInputError(f"jitter must be >= 0, got {jitter!r}")
    va, vb = prepare_pair(a, b, min_samples=k + 1, max_samples=max_samples, seed=seed)
    if va.discrete and vb.discrete:
        raise MetricInputError("ksg needs at least one continuous argument; both a and b are "
                               "integer labels (use estimator='binning' for the plug-in MI)")
    variant = "ross" if (va.discrete or vb.discrete) else "ksg1"
    params = {"k": k, "jitter": jitter, "variant": variant, "metric": "chebyshev", "n": va.n,
              "seed": seed, "max_samples": max_samples}
    if (zero := degenerate_result(va, vb, "ksg", params)) is not None:
        return zero
    rng = _jitter_rng(seed)
    if variant == "ksg1":
        value = _ksg_cc(_scaled(va, rng, jitter), _scaled(vb, rng, jitter), k)
    else:
        cont, lab = (vb, va) if va.discrete else (va, vb)
        value, n_used = _ross_cd(_scaled(cont, rng, jitter), lab.data.cpu().numpy(), k)
        params["n"] = n_used
    return MIResult(value, "ksg", "nats", params)
