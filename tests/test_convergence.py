"""Every iterative estimator says whether it converged (issue 21, section 3).

LogME is checked against two references written in this file from their definitions:

* the evidence of You et al. (2021) in its direct form, ``log N(y | 0, beta^-1 I +
  alpha^-1 F F^T)`` (an ``n x n`` Cholesky, no SVD, no profiling), maximised over
  ``(log alpha, log beta)`` by Nelder-Mead from several starts;
* the authors' own fixed-point update (thuml/LogME, ``LogME._fit_fixed_point``), written from
  reading that file, run with its 1e-5 guards removed and its stopping rule tightened.

For each estimator one case converges (flag true, no warning) and one is forced not to (flag
false and one warning line).
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch

from dtprobe.errors import ConfigError
from dtprobe.metrics.convergence import EstimatorConvergenceWarning
from dtprobe.metrics.information import infonce_mi, mine_mi
from dtprobe.metrics.information.neural import settled
from dtprobe.metrics.registry import EpochView, FeatureSplit
from dtprobe.metrics.transferability import (
    _logme_metric,
    _nleep_metric,
    logme,
    logme_fit,
    nleep,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _task(n, d, k, seed, signal=2.0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, k, n)
    f = rng.standard_normal((n, d))
    f[:, :k] += signal * np.eye(k)[y]
    return f, y, np.eye(k)[y]


# ----------------------------------------------------------------------------------------
# LogME references
# ----------------------------------------------------------------------------------------


def direct_evidence(gram: np.ndarray, y: np.ndarray, log_alpha: float, log_beta: float) -> float:
    """Per-sample log N(y | 0, I / beta + F F^T / alpha), from the model's definition."""
    n = gram.shape[0]
    cov = np.eye(n) * math.exp(-log_beta) + gram * math.exp(-log_alpha)
    chol = np.linalg.cholesky(cov)
    white = np.linalg.solve(chol, y)
    return (-n / 2 * math.log(2 * math.pi) - np.log(np.diag(chol)).sum()
            - 0.5 * float(white @ white)) / n


def max_direct_evidence(f: np.ndarray, y: np.ndarray) -> float:
    """Maximum of :func:`direct_evidence`: for each ``t = alpha / beta`` the best ``beta`` is
    ``n / y^T (I + F F^T / t)^-1 y`` (set d/dbeta of the Gaussian log density to 0); ``log t``
    is then searched on a grid and refined by Brent's method."""
    from scipy.optimize import minimize_scalar

    gram = f @ f.T
    n = gram.shape[0]

    def best_beta(u):
        chol = np.linalg.cholesky(np.eye(n) + gram * math.exp(-u))
        white = np.linalg.solve(chol, y)
        return direct_evidence(gram, y, u + math.log(n / float(white @ white)),
                               math.log(n / float(white @ white)))

    grid = np.arange(-25.0, 25.0, 0.5) + math.log(np.trace(gram) / n)
    values = [best_beta(u) for u in grid]
    i = int(np.argmax(values))
    if i in (0, len(grid) - 1):
        return values[i]
    res = minimize_scalar(lambda u: -best_beta(u), bracket=(grid[i - 1], grid[i], grid[i + 1]),
                          tol=1e-12)
    return max(values[i], -float(res.fun))


def authors_fixed_point(f: np.ndarray, y: np.ndarray, iters: int = 100000,
                        rtol: float = 1e-14) -> tuple[float, float, float]:
    """The update of thuml/LogME ``_fit_fixed_point`` (their evidence formula, their t-update),
    without the 1e-5 guards and run to a tight tolerance; returns (evidence/n, alpha, beta)."""
    n, d = f.shape
    u, s, _ = np.linalg.svd(f, full_matrices=False)
    sigma = s**2
    x2 = (u.T @ y) ** 2
    res_x2 = float(y @ y) - x2.sum()
    alpha = beta = 1.0
    for _ in range(iters):
        t = alpha / beta
        gamma = (sigma / (sigma + t)).sum()
        m2 = (sigma * x2 / (t + sigma) ** 2).sum()
        res2 = (x2 / (1 + sigma / t) ** 2).sum() + res_x2
        alpha, beta = gamma / m2, (n - gamma) / res2
        if abs(alpha / beta - t) / t <= rtol:
            break
    ev = (d / 2 * math.log(alpha) + n / 2 * math.log(beta)
          - 0.5 * np.log(alpha + beta * sigma).sum() - beta / 2 * res2 - alpha / 2 * m2
          - n / 2 * math.log(2 * math.pi))
    return ev / n, alpha, beta


@pytest.mark.parametrize("n,d,k,seed", [(30, 45, 3, 0), (50, 100, 3, 0), (24, 300, 2, 5),
                                        (60, 60, 3, 1), (90, 12, 4, 2)])
def test_logme_equals_the_maximum_of_the_direct_evidence(n, d, k, seed):
    """n <= D included: the value is the maximum of the evidence to float64 round-off."""
    f, _, onehot = _task(n, d, k, seed)
    with warnings.catch_warnings():
        warnings.simplefilter("error", EstimatorConvergenceWarning)
        fit = logme_fit(f, onehot)
    assert fit.converged and fit.n_iter <= 10
    gram = f @ f.T
    for c in range(k):
        best = max_direct_evidence(f, onehot[:, c])
        if fit.optimum[c] != "interior":  # a limit: the reference approaches it from below
            assert best - 1e-13 <= float(fit.evidence[c]) <= best + 1e-9
            continue
        assert float(fit.evidence[c]) == pytest.approx(best, abs=1e-12)
        # the reported alpha, beta are where it is attained
        at = direct_evidence(gram, onehot[:, c], math.log(float(fit.alpha[c])),
                             math.log(float(fit.beta[c])))
        assert at == pytest.approx(float(fit.evidence[c]), abs=1e-13)


def test_logme_is_the_authors_fixed_point_where_it_converges():
    """n > D: the authors' update, run to convergence, lands on the same alpha, beta, value."""
    f, _, onehot = _task(300, 16, 3, 7)
    fit = logme_fit(f, onehot)
    for c in range(3):
        ev, alpha, beta = authors_fixed_point(f, onehot[:, c])
        assert float(fit.alpha[c]) == pytest.approx(alpha, rel=1e-9)
        assert float(fit.beta[c]) == pytest.approx(beta, rel=1e-9)
        assert float(fit.evidence[c]) == pytest.approx(ev, abs=1e-13)


def test_logme_at_n_below_d_differs_from_the_authors_formula_by_their_dropped_term():
    """Their fixed-point version sums log(alpha + beta s) over min(n, D) values only, so at
    n < D it reports the evidence plus (D - n) log(alpha) / (2 n); the maximiser is the same."""
    n, d = 30, 45
    f, _, onehot = _task(n, d, 3, 0)
    fit = logme_fit(f, onehot)
    for c in range(3):
        assert fit.optimum[c] == "interior"
        ev, alpha, beta = authors_fixed_point(f, onehot[:, c])
        assert float(fit.alpha[c]) == pytest.approx(alpha, rel=1e-8)
        assert float(fit.evidence[c]) == pytest.approx(
            ev - (d - n) * math.log(alpha) / (2 * n), abs=1e-12)


def test_logme_limits_are_the_supremum_of_the_evidence():
    """At n <= D the maximum can be a limit (alpha / beta -> 0 or -> inf); the value is that
    limit, which the direct evidence approaches from below."""
    f, _, onehot = _task(40, 512, 5, 0)
    fit = logme_fit(f, onehot)
    assert fit.converged
    assert {"t->0", "t->inf"} <= set(fit.optimum)
    gram = f @ f.T
    for c, where in enumerate(fit.optimum):
        best = max_direct_evidence(f, onehot[:, c])
        assert best - 1e-13 <= float(fit.evidence[c]) <= best + 1e-9
        if where == "t->0":   # noise-free interpolation: finite alpha, beta -> inf
            assert math.isinf(float(fit.beta[c]))
            near = direct_evidence(gram, onehot[:, c], math.log(float(fit.alpha[c])), 40.0)
        elif where == "t->inf":  # zero weights: alpha -> inf, beta = n / ||y||^2
            assert math.isinf(float(fit.alpha[c]))
            near = direct_evidence(gram, onehot[:, c], 40.0, math.log(float(fit.beta[c])))
        else:
            continue
        assert near <= float(fit.evidence[c]) + 1e-13
        assert near == pytest.approx(float(fit.evidence[c]), abs=1e-9)


def test_logme_forced_to_stop_says_so():
    f, y, onehot = _task(50, 100, 3, 0)
    fit = logme_fit(f, onehot, max_iter=1)
    assert not fit.converged and "unconverged" in fit.optimum and fit.n_iter == 1
    with pytest.warns(EstimatorConvergenceWarning, match=r"logme: .*max_iter=1") as rec:
        value = logme(f, y, max_iter=1)
    assert len([w for w in rec if w.category is EstimatorConvergenceWarning]) == 1
    assert "\n" not in str(rec[0].message)
    assert math.isfinite(value)


def _view(x, task_labels, seed=0):
    split = FeatureSplit(torch.as_tensor(x), torch.zeros(len(x), dtype=torch.long),
                         factors={"t": torch.as_tensor(task_labels)})
    return EpochView(epoch=1, train=split, test=split, seed=seed)


def test_logme_row_records_convergence():
    f, y, _ = _task(40, 512, 5, 0)
    with warnings.catch_warnings():
        warnings.simplefilter("error", EstimatorConvergenceWarning)
        (row,) = _logme_metric(_view(f, y))
    assert row.diagnostics["converged"] is True and row.diagnostics["n_iter"] >= 1
    assert row.diagnostics["classes_at_limit"] >= 2
    assert row.value == pytest.approx(logme(f, y), abs=1e-15)


# ----------------------------------------------------------------------------------------
# NLEEP (EM of scikit-learn's GaussianMixture)
# ----------------------------------------------------------------------------------------


def test_nleep_converged_and_forced_stop():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 150)
    x = 1.5 * rng.standard_normal((3, 12))[y] + rng.standard_normal((150, 12))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # neither ours nor scikit-learn's warning
        (row,) = _nleep_metric(_view(x, y))
    assert row.diagnostics["converged"] is True and 1 <= row.diagnostics["n_iter"] < 100
    with pytest.warns(EstimatorConvergenceWarning, match=r"nleep: EM .*max_iter=1") as rec:
        value = nleep(x, y, max_iter=1)
    assert len(rec) == 1 and math.isfinite(value)
    with pytest.warns(EstimatorConvergenceWarning):
        from dtprobe.metrics.transferability import _nleep
        _, info = _nleep(x, y, variance=0.8, component_ratio=5, covariance_type="diag",
                         seed=0, max_iter=1, tol=1e-3)
    assert info == {"converged": False, "n_iter": 1, "init_converged": True,
                    "init_n_iter": info["init_n_iter"], "n_components": 15}
    assert 1 <= info["init_n_iter"] < 300


@pytest.mark.parametrize("covariance_type", ["diag", "full", "tied", "spherical"])
def test_nleep_start_is_scikit_learns_own(covariance_type):
    """The k-means start made explicitly (to know its convergence) is the one GaussianMixture
    makes itself: same value to round-off and the same EM iteration count."""
    from sklearn.mixture import GaussianMixture

    from dtprobe.metrics.transferability import _nleep, leep
    for seed in range(2):
        rng = np.random.default_rng(seed)
        y = rng.integers(0, 4, 400)
        x = 0.4 * rng.standard_normal((4, 10))[y] + rng.standard_normal((400, 10))
        value, info = _nleep(x, y, variance=0.8, component_ratio=5,
                             covariance_type=covariance_type, seed=seed, max_iter=100, tol=1e-3)
        # reference: PCA written from the definition, scikit-learn's default k-means start
        centred = x - x.mean(axis=0)
        u, s, _ = np.linalg.svd(centred, full_matrices=False)
        energy = np.cumsum(s**2)
        r = int((energy < 0.8 * energy[-1]).sum()) + 1
        z = u[:, :r] * (s[:r] / s[0])
        gmm = GaussianMixture(n_components=20, covariance_type=covariance_type,
                              random_state=seed, max_iter=100, tol=1e-3).fit(z)
        reference = leep(torch.as_tensor(gmm.predict_proba(z)), torch.as_tensor(y))
        assert value == pytest.approx(reference, rel=1e-9, abs=1e-12)
        assert info["n_iter"] == gmm.n_iter_ and info["converged"] and info["init_converged"]


def test_nleep_reports_an_unsettled_kmeans_start():
    rng = np.random.default_rng(3)
    y = rng.integers(0, 3, 300)
    x = 0.3 * rng.standard_normal((3, 8))[y] + rng.standard_normal((300, 8))
    from dtprobe.metrics.transferability import _nleep
    with pytest.warns(EstimatorConvergenceWarning, match=r"nleep: the k-means start .*"
                      r"init_max_iter=1") as rec:
        value, info = _nleep(x, y, variance=0.8, component_ratio=5, covariance_type="diag",
                             seed=0, max_iter=200, tol=1e-3, init_max_iter=1)
    assert len(rec) == 1 and math.isfinite(value)
    assert info["init_converged"] is False and info["init_n_iter"] == 1
    assert info["converged"] is False  # the row's flag covers the start too
    with pytest.raises(ConfigError, match="init_max_iter"):
        nleep(x, y, init_max_iter=0)


# ----------------------------------------------------------------------------------------
# MINE and InfoNCE (trained networks: the settling test of the reported estimate)
# ----------------------------------------------------------------------------------------


def test_settled_rule():
    assert settled(2.0, 1.99, 100)["converged"]            # 0.5 % of 2 nats
    assert not settled(2.0, 1.9, 100)["converged"]         # 5 %
    assert settled(0.1, 0.095, 100)["converged"]           # below 1 nat: 0.01 nats absolute
    assert not settled(0.1, 0.05, 100)["converged"]
    assert not settled(math.nan, 0.05, 100)["converged"]
    d = settled(1.5, 1.0, 40, tol=0.5)
    assert d == {"converged": True, "n_iter": 40, "last_change": 0.5, "settle_steps": 4}


def _pair(n=400, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, 2))
    return x, 0.8 * x + 0.6 * rng.standard_normal((n, 2))


@pytest.mark.parametrize("fn", [mine_mi, infonce_mi])
def test_trained_estimators_report_settling(fn):
    x, y = _pair()
    with warnings.catch_warnings():
        warnings.simplefilter("error", EstimatorConvergenceWarning)
        res = fn(x, y, hidden=16, steps=600, batch_size=128, lr=3e-3, seed=0,
                 plateau_tol=0.05)
    assert res.diagnostics["converged"] is True and res.diagnostics["n_iter"] == 600
    assert abs(res.diagnostics["last_change"]) <= 0.05 * max(abs(res.value), 1.0)
    with pytest.warns(EstimatorConvergenceWarning, match=rf"{fn.__name__[:-3]}: .*raise steps"):
        # 20 steps, judged to 1e-6: the estimate is still moving at that tolerance
        early = fn(x, y, hidden=16, steps=20, batch_size=128, lr=3e-3, seed=0,
                   plateau_tol=1e-6)
    assert early.diagnostics["converged"] is False and early.diagnostics["n_iter"] == 20
    assert abs(early.diagnostics["last_change"]) > 1e-6
