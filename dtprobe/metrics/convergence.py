"""Convergence reporting shared by the iterative estimators of :mod:`dtprobe.metrics`.

Every estimator that iterates (LogME's evidence maximisation, NLEEP's k-means start and EM,
the MINE and InfoNCE networks) records in its result whether its convergence test was met and
how many iterations it used, and issues one :class:`EstimatorConvergenceWarning` line when it
was not met: its number is then unverified, never silently reported as if it were final.  The
registered analysis metrics copy both into the row's ``diagnostics`` (``converged``,
``n_iter``), as the linear probe does (:class:`dtprobe.metrics.probes.ProbeConvergenceWarning`).
"""

from __future__ import annotations

import warnings

__all__ = ["EstimatorConvergenceWarning", "warn_unconverged"]


class EstimatorConvergenceWarning(UserWarning):
    """An iterative estimator stopped before its convergence test was met."""


def warn_unconverged(estimator: str, detail: str, fix: str, *, stacklevel: int = 3) -> None:
    """Issue the one-line warning of an estimator whose convergence test was not met.

    Parameters
    ----------
    estimator : name of the function (``"logme"``, ``"nleep"``, ...).
    detail : what stopped short, with the numbers (iterations, remaining change).
    fix : what the user can change (``"raise max_iter"``).
    stacklevel : passed to :func:`warnings.warn` (3 points at the estimator's caller).
    """
    warnings.warn(f"{estimator}: {detail}; the value is unverified ({fix})",
                  EstimatorConvergenceWarning, stacklevel=stacklevel)
