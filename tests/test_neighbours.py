"""Mutual k-NN and CKNNA (Huh et al. 2024) against dense float64 references from the definition."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dtprobe.errors import ConfigError, MetricInputError
from dtprobe.metrics import cknna, mutual_knn


def ref_knn(x: np.ndarray, k: int, metric: str = "cosine") -> list[set[int]]:
    x = np.asarray(x, dtype=np.float64)
    n = len(x)
    out = []
    for i in range(n):
        if metric == "euclidean":
            score = [-math.dist(x[i], x[j]) for j in range(n)]
        elif metric == "cosine":
            score = [float(x[i] @ x[j] / np.linalg.norm(x[i]) / np.linalg.norm(x[j]))
                     for j in range(n)]
        else:
            score = [float(x[i] @ x[j]) for j in range(n)]
        order = sorted((j for j in range(n) if j != i), key=lambda j: -score[j])
        out.append(set(order[:k]))
    return out


def ref_mutual_knn(x, y, k, metric="cosine"):
    a, b = ref_knn(x, k, metric), ref_knn(y, k, metric)
    return sum(len(p & q) for p, q in zip(a, b, strict=True)) / (len(a) * k)


def ref_hsic1(K: np.ndarray, L: np.ndarray) -> float:
    """Song et al. (2012) unbiased HSIC, written with explicit sums (K, L need not be symmetric)."""
    n = len(K)
    Kt, Lt = K.copy(), L.copy()
    np.fill_diagonal(Kt, 0)
    np.fill_diagonal(Lt, 0)
    tr = sum(Kt[i, j] * Lt[j, i] for i in range(n) for j in range(n))
    ones = np.ones(n)
    return float((tr + Kt.sum() * Lt.sum() / ((n - 1) * (n - 2))
                  - 2.0 / (n - 2) * ones @ Kt @ Lt @ ones) / (n * (n - 3)))


def ref_cknna(x, y, k):
    x = np.asarray(x, np.float64)
    y = np.asarray(y, np.float64)
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    y = y / np.linalg.norm(y, axis=1, keepdims=True)
    K, L = x @ x.T, y @ y.T
    n = len(x)
    nk, nl = ref_knn(x, k, "inner"), ref_knn(y, k, "inner")
    mk = np.array([[1.0 if j in nk[i] else 0.0 for j in range(n)] for i in range(n)])
    ml = np.array([[1.0 if j in nl[i] else 0.0 for j in range(n)] for i in range(n)])
    m = mk * ml
    return ref_hsic1(m * K, m * L) / math.sqrt(ref_hsic1(mk * K, mk * K)
                                                * ref_hsic1(ml * L, ml * L))


@pytest.mark.parametrize("shape,k", [((60, 5), 3), ((40, 80), 10), ((90, 12), 7)])
def test_mutual_knn_matches_reference(shape, k):
    rng = np.random.default_rng(k)
    x = rng.standard_normal(shape)
    y = x + rng.standard_normal(shape)
    assert mutual_knn(x, y, k) == pytest.approx(ref_mutual_knn(x, y, k), abs=1e-12)
    assert mutual_knn(x, y, k, metric="euclidean") == pytest.approx(
        ref_mutual_knn(x, y, k, "euclidean"), abs=1e-12)


@pytest.mark.parametrize("shape,k", [((50, 5), 3), ((30, 60), 10), ((70, 8), 2)])
def test_cknna_matches_reference(shape, k):
    rng = np.random.default_rng(k)
    x = rng.standard_normal(shape) + 0.3
    y = np.tanh(x @ rng.standard_normal((shape[1], 6))) + 0.2 * rng.standard_normal((shape[0], 6))
    assert cknna(x, y, k) == pytest.approx(ref_cknna(x, y, k), rel=1e-9, abs=1e-12)


def test_identical_and_unrelated():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((300, 16))
    assert mutual_knn(x, x) == 1.0
    assert cknna(x, x) == pytest.approx(1.0, abs=1e-12)
    y = rng.standard_normal((300, 16))
    # chance level of mutual k-NN is about k / (n - 1)
    assert mutual_knn(x, y) < 5 * 10 / 299
    assert abs(cknna(x, y)) < 0.2


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), scale=st.floats(1e-3, 1e3))
def test_invariances(seed, scale):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((40, 6))
    y = x @ rng.standard_normal((6, 5)) + 0.5 * rng.standard_normal((40, 5))
    qx, _ = np.linalg.qr(rng.standard_normal((6, 6)))
    qy, _ = np.linalg.qr(rng.standard_normal((5, 5)))
    perm = rng.permutation(40)
    for fn in (mutual_knn, cknna):
        base = fn(x, y, 4)
        assert fn(scale * x @ qx, y @ qy / scale, 4) == pytest.approx(base, rel=1e-8, abs=1e-12)
        assert fn(x[perm], y[perm], 4) == pytest.approx(base, rel=1e-8, abs=1e-12)
    base = mutual_knn(x, y, 4, metric="euclidean")
    assert mutual_knn(x + 7.0, y - 2.0, 4, metric="euclidean") == pytest.approx(base)


def test_duplicates_warn_about_ties():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((20, 4))
    x = np.vstack([x, x[:3], x[:3]])  # three points appear three times
    with pytest.warns(RuntimeWarning, match="tied"):
        mutual_knn(x, x + 0.01 * rng.standard_normal(x.shape), 1)


def test_edge_cases():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((10, 3))
    with pytest.raises(ConfigError, match="topk"):
        mutual_knn(x, x, 9)
    with pytest.raises(ConfigError, match="at least 2"):
        cknna(x, x, 1)
    with pytest.raises(MetricInputError, match="same inputs"):
        mutual_knn(x, x[:9], 2)
    with pytest.raises(MetricInputError, match="all-zero"):
        mutual_knn(np.vstack([x, np.zeros((1, 3))]), np.vstack([x, np.ones((1, 3))]), 2)
    with pytest.raises(ConfigError):
        mutual_knn(x, x, 2, metric="manhattan")
    # n = 4, the smallest the unbiased HSIC allows: a number or a documented NaN, never an error.
    x4 = rng.standard_normal((4, 3))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # NaN comes with a warning
        v = cknna(x4, x4 + 0.1, 2)
    assert math.isnan(v) or -1.5 < v < 1.5
    with pytest.raises(MetricInputError, match="at least 4"):
        cknna(x4[:3], x4[:3], 1)
    # constant features under cosine: all rows identical -> every neighbour tied
    with pytest.warns(RuntimeWarning, match="tied"):
        assert mutual_knn(np.ones((8, 3)), x[:8], 2) <= 1.0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_is_the_value_of_the_rounded_features(dtype):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(60, 8, generator=g)
    y = x + torch.randn(60, 8, generator=g)
    xr, yr = x.to(dtype), y.to(dtype)
    assert mutual_knn(xr, yr, 5) == pytest.approx(
        mutual_knn(xr.double().numpy(), yr.double().numpy(), 5))
    assert cknna(xr, yr, 5) == pytest.approx(cknna(xr.double(), yr.double(), 5))
