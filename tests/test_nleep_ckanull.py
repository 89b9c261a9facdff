"""NLEEP (Li et al. 2021) against sklearn PCA + GaussianMixture + a LEEP loop, and the CKA
permutation null against a loop of linear_cka calls on shuffled rows."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from sklearn.decomposition import PCA
from sklearn.mixture import GaussianMixture

from dtprobe.errors import ConfigError, MetricInputError
from dtprobe.metrics import cka_permutation_null, linear_cka, nleep
from dtprobe.metrics.registry import EpochView, FeatureSplit
from dtprobe.metrics.transferability import _nleep_metric


def ref_leep(theta: np.ndarray, y: np.ndarray) -> float:
    n, z = theta.shape
    classes = sorted(set(y.tolist()))
    joint = {(c, j): sum(theta[i, j] for i in range(n) if y[i] == c) / n
             for c in classes for j in range(z)}
    marg = {j: sum(joint[(c, j)] for c in classes) for j in range(z)}
    total = 0.0
    for i in range(n):
        total += math.log(sum(joint[(y[i], j)] / marg[j] * theta[i, j] for j in range(z)
                              if marg[j] > 0))
    return total / n


def ref_nleep(x, y, seed=0, cov="diag"):
    pca = PCA(n_components=0.8, svd_solver="full").fit(x)
    z = pca.transform(x) / np.sqrt(pca.explained_variance_[0] * (len(x) - 1))
    k = len(set(y.tolist()))
    gmm = GaussianMixture(5 * k, covariance_type=cov, random_state=seed).fit(z)
    return ref_leep(gmm.predict_proba(z), y)


def test_nleep_matches_reference():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 150)
    x = 1.5 * rng.standard_normal((3, 12))[y] + rng.standard_normal((150, 12))
    assert nleep(x, y) == pytest.approx(ref_nleep(x, y), abs=1e-6)
    assert nleep(x, y, covariance_type="full") == pytest.approx(
        ref_nleep(x, y, cov="full"), abs=1e-6)


def test_nleep_orders_tasks_and_edge_cases():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 4, 200)
    x = 3 * rng.standard_normal((4, 8))[y] + rng.standard_normal((200, 8))
    assert nleep(x, y) > nleep(x, rng.integers(0, 4, 200))  # aligned task scores higher
    assert nleep(x, y) <= 0.0
    assert nleep(2.0 * x + 5, y) == pytest.approx(nleep(x, y), abs=1e-6)
    with pytest.raises(MetricInputError, match="constant"):
        nleep(np.ones((20, 3)), np.arange(20) % 2)
    with pytest.raises(ConfigError):
        nleep(x, y, variance=0)
    with pytest.raises(ConfigError):
        nleep(x, y, component_ratio=0)
    # few samples: components shrink below n; a class with one sample still scores
    y_small = np.array([0, 0, 0, 1, 1, 1, 2])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # sklearn convergence chatter on 7 points
        assert nleep(rng.standard_normal((7, 3)), y_small) <= 0.0


def test_nleep_adapter():
    rng = np.random.default_rng(2)
    x = torch.from_numpy(rng.standard_normal((80, 6)))
    split = FeatureSplit(x, torch.zeros(80, dtype=torch.long),
                         factors={"colour": torch.from_numpy(rng.integers(0, 2, 80))})
    (row,) = _nleep_metric(EpochView(epoch=1, train=split, test=split, seed=3))
    assert row.task == "colour" and row.params["seed"] == 3 and row.value <= 0


def test_cka_null_matches_loop():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((60, 5))
    y = x @ rng.standard_normal((5, 7)) + rng.standard_normal((60, 7))
    for debiased in (False, True):
        res = cka_permutation_null(x, y, n_permutations=15, debiased=debiased, seed=4)
        gen = torch.Generator().manual_seed(4)
        null = [linear_cka(x, y[torch.randperm(60, generator=gen).numpy()], debiased=debiased)
                for _ in range(15)]
        assert res.score == pytest.approx(linear_cka(x, y, debiased=debiased), abs=1e-12)
        assert res.null_mean == pytest.approx(np.mean(null), abs=1e-12)
        assert res.null_std == pytest.approx(np.std(null, ddof=1), abs=1e-12)
        assert res.null_quantile == pytest.approx(np.quantile(null, 0.95), abs=1e-12)
        assert res.p_value == (1 + sum(v >= res.score for v in null)) / 16
    # the Gram path (n < d1 d2) gives the same numbers
    wide = cka_permutation_null(x[:8], y[:8], n_permutations=5, seed=1)
    gen = torch.Generator().manual_seed(1)
    null = [linear_cka(x[:8], y[:8][torch.randperm(8, generator=gen).numpy()]) for _ in range(5)]
    assert wide.null_mean == pytest.approx(np.mean(null), abs=1e-12)


def test_cka_null_exact_expectation():
    """The closed-form permutation mean (derived in CKANull) against all 5! = 120 permutations
    of a small case, and against the Monte Carlo mean of a larger one."""
    import itertools

    rng = np.random.default_rng(7)
    x, y = rng.standard_normal((5, 3)), rng.standard_normal((5, 2))
    exact = np.mean([linear_cka(x, y[list(p)]) for p in itertools.permutations(range(5))])
    assert cka_permutation_null(x, y, n_permutations=2).expected == pytest.approx(exact,
                                                                                   abs=1e-12)
    x, y = rng.standard_normal((80, 10)), rng.standard_normal((80, 6))
    res = cka_permutation_null(x, y, n_permutations=400)
    assert res.expected == pytest.approx(res.null_mean, abs=4 * res.null_std / 20)
    assert math.isnan(cka_permutation_null(x, y, n_permutations=2, debiased=True).expected)


def test_cka_null_chance_level():
    """Biased CKA of independent features sits far above 0 at small n; the null shows it."""
    rng = np.random.default_rng(5)
    x, y = rng.standard_normal((50, 40)), rng.standard_normal((50, 40))
    biased = cka_permutation_null(x, y, n_permutations=30)
    assert biased.score > 0.3 and abs(biased.score - biased.null_mean) < 4 * biased.null_std
    assert biased.p_value > 0.05
    deb = cka_permutation_null(x, y, n_permutations=30, debiased=True)
    assert abs(deb.null_mean) < 0.05
    related = cka_permutation_null(x, x + 0.1 * y, n_permutations=19)
    assert related.p_value == pytest.approx(1 / 20)
    params = related.as_params()
    assert params["null"] == "permute_rows_of_y" and params["n_permutations"] == 19


def test_cka_null_edge_cases():
    rng = np.random.default_rng(6)
    x = rng.standard_normal((4, 3))
    res = cka_permutation_null(x, x + 0.1, n_permutations=3, debiased=True)  # n = 4
    assert math.isnan(res.score) or np.isfinite(res.null_mean)
    with pytest.raises(MetricInputError):
        cka_permutation_null(x[:3], x[:3], debiased=True)
    with pytest.raises(ConfigError):
        cka_permutation_null(x, x, n_permutations=0)
    with pytest.warns(RuntimeWarning, match="constant"):
        assert math.isnan(cka_permutation_null(np.ones((10, 2)), rng.standard_normal((10, 2)),
                                               n_permutations=2).null_mean)
    for dtype in (torch.float16, torch.bfloat16):
        t = torch.from_numpy(rng.standard_normal((30, 4))).to(dtype)
        u = torch.from_numpy(rng.standard_normal((30, 4))).to(dtype)
        assert cka_permutation_null(t, u, n_permutations=2).score == pytest.approx(
            linear_cka(t.double(), u.double()), abs=1e-12)
