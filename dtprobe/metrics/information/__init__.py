"""Information-theoretic metrics: mutual information between inputs, features and labels.

One entry point, :func:`mutual_information`, dispatches to one estimator per module:

============  =====================================================  ==========================
estimator     what it computes                                       module
============  =====================================================  ==========================
``renyi``     matrix-based Renyi alpha-order MI (Gram eigenvalues)   :mod:`.renyi`
``kde``       pairwise-distance KDE bound for ``T = h + noise``      :mod:`.kde`
``binning``   plug-in MI of equal-width binned variables             :mod:`.binning`
``ksg``       KSG (continuous) / Ross (continuous-labels) k-NN       :mod:`.ksg`
``mine``      Donsker-Varadhan bound with a statistics network       :mod:`.neural`
``infonce``   InfoNCE bound with a separable critic                  :mod:`.neural`
============  =====================================================  ==========================

All values are in **nats** unless ``unit="bits"`` is asked for. Arguments are ``(n, d)`` arrays
or tensors (continuous) or 1-D integer arrays (class labels). For a deterministic network the
true ``I(X;T)`` is constant or infinite (Goldfeld et al. 2019): binning, KDE and Renyi numbers
measure the geometry of the representation at a chosen scale, so every result carries its
estimator and parameters (:class:`MIResult`). The analysis adapters (``mi_xt``, ``mi_ty`` and
their per-estimator variants) are registered by importing :mod:`.adapters`.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

from dtprobe.errors import ConfigError
from dtprobe.metrics._validation import ArrayLike
from dtprobe.metrics.information._common import DegenerateMIWarning, MIResult, check_unit
from dtprobe.metrics.information.binning import binning_entropy, binning_mi
from dtprobe.metrics.information.kde import kde_entropy, kde_mi
from dtprobe.metrics.information.ksg import ksg_mi
from dtprobe.metrics.information.neural import infonce_mi, mine_mi
from dtprobe.metrics.information.renyi import kernel_width, renyi_entropy, renyi_mi

ESTIMATORS: dict[str, Callable[..., MIResult]] = {
    "renyi": renyi_mi,
    "kde": kde_mi,
    "binning": binning_mi,
    "ksg": ksg_mi,
    "mine": mine_mi,
    "infonce": infonce_mi,
}


def mutual_information(a: ArrayLike, b: ArrayLike, estimator: str = "renyi", *,
                       unit: str = "nats", **params) -> MIResult:
    """Estimate the mutual information ``I(a; b)`` with the named estimator.

    Parameters
    ----------
    a, b : (n, d) numpy arrays or torch tensors, or (n,) integer label vectors
        Paired samples (row ``i`` of ``a`` goes with row ``i`` of ``b``). A 1-D array of integer
        dtype is treated as discrete labels; arrays with more than 2 dimensions are flattened
        per sample. For ``kde`` with two continuous arguments, ``a`` is the input and ``b`` the
        representation.
    estimator : {"renyi", "kde", "binning", "ksg", "mine", "infonce"}
        See the module table; each estimator's keyword parameters are documented on its
        function (:func:`renyi_mi`, :func:`kde_mi`, :func:`binning_mi`, :func:`ksg_mi`,
        :func:`mine_mi`, :func:`infonce_mi`).
    unit : {"nats", "bits"}
        Unit of the returned value.
    **params
        Passed to the estimator function.

    Returns
    -------
    MIResult
        ``value``, ``estimator``, ``unit`` and ``params`` (including resolved data-dependent
        parameters such as kernel widths and the number of samples used).

    Raises
    ------
    ConfigError
        Unknown estimator or parameter.
    MetricInputError
        Degenerate input: mismatched rows, too few samples, NaN/Inf values, bad parameter values.

    References
    ----------
    See the estimator functions; Goldfeld et al. (2019), "Estimating information flow in deep
    neural networks", ICML, for why deterministic-network MI needs a stated estimator and scale.

    Examples
    --------
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> x = rng.standard_normal((2000, 1))
    >>> y = 0.8 * x + 0.6 * rng.standard_normal((2000, 1))
    >>> res = mutual_information(x, y, "ksg", k=3)
    >>> round(res.value, 2), res.unit  # closed form: -log(1 - 0.8**2) / 2 = 0.511 nats
    (0.51, 'nats')
    """
    check_unit(unit)
    if estimator not in ESTIMATORS:
        raise ConfigError(f"unknown MI estimator {estimator!r}; choose one of "
                          f"{', '.join(ESTIMATORS)}")
    func = ESTIMATORS[estimator]
    accepted = [p for p in inspect.signature(func).parameters if p not in ("a", "b")]
    unknown = sorted(set(params) - set(accepted))
    if unknown:
        raise ConfigError(f"estimator {estimator!r} has no parameter(s) {', '.join(unknown)}; "
                          f"accepted: {', '.join(accepted)}")
    return func(a, b, **params).to(unit)


from dtprobe.metrics.information import adapters  # noqa: E402,F401  (registers mi_xt, mi_ty)

__all__ = [
    "ESTIMATORS",
    "DegenerateMIWarning",
    "MIResult",
    "binning_entropy",
    "binning_mi",
    "infonce_mi",
    "kde_entropy",
    "kde_mi",
    "kernel_width",
    "ksg_mi",
    "mine_mi",
    "mutual_information",
    "renyi_entropy",
    "renyi_mi",
]
