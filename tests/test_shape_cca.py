"""Shape metrics (Williams et al. 2021), SVCCA (Raghu et al. 2017) and PWCCA (Morcos et al. 2018)
against float64 references written from the definitions."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.spatial import procrustes as scipy_procrustes

from dtprobe.errors import ConfigError, MetricInputError
from dtprobe.metrics import angular_shape_metric, procrustes_distance, pwcca, svcca
from dtprobe.metrics.cca import canonical_correlations


def _centre_unit(x):
    x = np.asarray(x, np.float64)
    x = x - x.mean(axis=0)
    return x / np.linalg.norm(x)


def ref_procrustes(x, y):
    """Solve the orthogonal Procrustes problem explicitly, then measure ||X - Y Q||_F."""
    a, b = _centre_unit(x), _centre_unit(y)
    d = max(a.shape[1], b.shape[1])
    a = np.hstack([a, np.zeros((len(a), d - a.shape[1]))])
    b = np.hstack([b, np.zeros((len(b), d - b.shape[1]))])
    u, _, vt = np.linalg.svd(b.T @ a)
    q = u @ vt  # argmin_Q ||A - B Q||_F (Schoenemann 1966)
    return float(np.linalg.norm(a - b @ q))


def test_procrustes_matches_explicit_rotation():
    rng = np.random.default_rng(0)
    for shape_x, shape_y in [((50, 4), (50, 4)), ((30, 40), (30, 7)), ((80, 6), (80, 9))]:
        x = rng.standard_normal(shape_x)
        y = x[:, :1] + rng.standard_normal(shape_y)
        assert procrustes_distance(x, y) == pytest.approx(ref_procrustes(x, y), abs=1e-10)
        cos = 1 - ref_procrustes(x, y) ** 2 / 2
        assert angular_shape_metric(x, y) == pytest.approx(math.acos(cos), abs=1e-7)


def test_angular_metric_matches_scipy_procrustes():
    """scipy's disparity (scaling allowed) is 1 - cos^2 of the angular shape metric."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal((40, 5))
    y = x @ rng.standard_normal((5, 5)) + rng.standard_normal((40, 5))
    _, _, disparity = scipy_procrustes(x, y)
    assert math.cos(angular_shape_metric(x, y)) ** 2 == pytest.approx(1 - disparity, rel=1e-9)


def test_shape_metric_oracles_and_triangle_inequality():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((60, 5))
    q, _ = np.linalg.qr(rng.standard_normal((5, 5)))
    assert procrustes_distance(x, 3 * x @ q + 1) == pytest.approx(0.0, abs=1e-7)
    assert angular_shape_metric(x, x) == pytest.approx(0.0, abs=1e-7)
    y, z = rng.standard_normal((60, 5)), rng.standard_normal((60, 5))
    for fn in (procrustes_distance, angular_shape_metric):
        assert fn(x, z) <= fn(x, y) + fn(y, z) + 1e-12
        assert fn(x, y) == pytest.approx(fn(y, x), abs=1e-12)


def ref_cca(x, y):
    """Canonical correlations by whitening: svd(Sxx^-1/2 Sxy Syy^-1/2), full-rank inputs."""
    x = np.asarray(x, np.float64) - np.mean(x, axis=0)
    y = np.asarray(y, np.float64) - np.mean(y, axis=0)

    def inv_sqrt(c):
        w, v = np.linalg.eigh(c)
        return v @ np.diag(w**-0.5) @ v.T

    wx, wy = inv_sqrt(x.T @ x), inv_sqrt(y.T @ y)
    u, rho, vt = np.linalg.svd(wx @ (x.T @ y) @ wy)
    return rho, wx @ u, x  # correlations, canonical directions of x, centred x


def ref_svcca(x, y, keep):
    def reduce(a):
        a = np.asarray(a, np.float64) - np.mean(a, axis=0)
        u, s, _ = np.linalg.svd(a, full_matrices=False)
        frac = np.cumsum(s**2) / np.sum(s**2)
        k = int(np.searchsorted(frac, keep - 1e-15) + 1)
        return u[:, :k] * s[:k]
    rho, _, _ = ref_cca(reduce(x), reduce(y))
    return float(np.mean(rho[:min(reduce(x).shape[1], reduce(y).shape[1])]))


def ref_pwcca(x, y):
    rho, dirs, xc = ref_cca(x, y)
    m = min(np.shape(x)[1], np.shape(y)[1])
    alpha = []
    for i in range(m):
        h = xc @ dirs[:, i]
        h = h / np.linalg.norm(h)
        alpha.append(sum(abs(h @ xc[:, j]) for j in range(xc.shape[1])))
    alpha = np.array(alpha) / np.sum(alpha)
    return float(np.sum(alpha * rho[:m]))


@pytest.mark.parametrize("dx,dy", [(4, 4), (6, 3), (3, 8)])
def test_cca_matches_whitening_reference(dx, dy):
    rng = np.random.default_rng(dx * 10 + dy)
    x = rng.standard_normal((200, dx))
    y = np.hstack([x[:, :1], rng.standard_normal((200, dy - 1))]) @ rng.standard_normal((dy, dy))
    rho, _, _ = ref_cca(x, y)
    np.testing.assert_allclose(canonical_correlations(x, y).numpy(), rho[:min(dx, dy)],
                               atol=1e-10)
    assert pwcca(x, y) == pytest.approx(ref_pwcca(x, y), abs=1e-10)
    for keep in (0.5, 0.9, 0.99, 1.0):
        assert svcca(x, y, keep) == pytest.approx(ref_svcca(x, y, keep), abs=1e-10)


def test_pwcca_weight_side():
    rng = np.random.default_rng(3)
    x, y = rng.standard_normal((100, 5)), rng.standard_normal((100, 5))
    assert pwcca(x, y, weight_by="y") == pytest.approx(pwcca(y, x))
    with pytest.raises(ConfigError):
        pwcca(x, y, weight_by="both")


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), scale=st.floats(1e-3, 1e3))
def test_invariances(seed, scale):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((60, 5))
    y = x @ rng.standard_normal((5, 4)) + rng.standard_normal((60, 4))
    qx, _ = np.linalg.qr(rng.standard_normal((5, 5)))
    qy, _ = np.linalg.qr(rng.standard_normal((4, 4)))
    perm = rng.permutation(60)
    for fn in (procrustes_distance, angular_shape_metric, svcca):
        base = fn(x, y)
        assert fn(scale * x @ qx + 2.0, y @ qy / scale - 1.0) == pytest.approx(base, abs=1e-7)
        assert fn(x[perm], y[perm]) == pytest.approx(base, abs=1e-9)
    base = pwcca(x, y)
    inv = rng.standard_normal((4, 4)) + 3 * np.eye(4)
    assert pwcca(scale * x + 2.0, y @ inv) == pytest.approx(base, abs=1e-7)
    assert pwcca(np.ascontiguousarray(x[perm][:, ::-1]), y[perm]) == pytest.approx(base, abs=1e-9)


def test_rank_deficient_and_n_less_than_d():
    rng = np.random.default_rng(4)
    base = rng.standard_normal((100, 3))
    # 50 columns spanning 3 directions, dead (constant) units, duplicate rows
    x = np.hstack([base @ rng.standard_normal((3, 50)), np.zeros((100, 10))])
    x[50:] = x[:50]
    y = np.maximum(x @ rng.standard_normal((60, 20)), 0)
    assert canonical_correlations(x, x).numel() == 3
    assert svcca(x, x) == pytest.approx(1.0, abs=1e-9)
    assert pwcca(x, x) == pytest.approx(1.0, abs=1e-9)
    assert 0.0 <= pwcca(x, y) <= 1.0
    # n < d: correlations of 1 by construction, and a warning says so
    small = rng.standard_normal((10, 30))
    with pytest.warns(RuntimeWarning, match="by construction"):
        assert svcca(small, rng.standard_normal((10, 30))) == pytest.approx(1.0, abs=1e-9)


def test_edge_cases():
    rng = np.random.default_rng(5)
    x = rng.standard_normal((20, 3))
    with pytest.raises(MetricInputError, match="constant"):
        svcca(np.ones((20, 3)), x)
    with pytest.raises(MetricInputError, match="same inputs"):
        pwcca(x, x[:10])
    with pytest.raises(ConfigError):
        svcca(x, x, keep=0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.warns(RuntimeWarning, match="constant"):
            assert math.isnan(procrustes_distance(np.ones((20, 3)), x))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision(dtype):
    """Half inputs: the value of the rounded features; the rank threshold follows the dtype."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 6, generator=g)
    y = x @ torch.randn(6, 6, generator=g) + 0.3 * torch.randn(300, 6, generator=g)
    xr, yr = x.to(dtype), y.to(dtype)
    assert procrustes_distance(xr, yr) == pytest.approx(
        procrustes_distance(xr.double(), yr.double()), abs=1e-12)
    assert svcca(xr, yr) == pytest.approx(svcca(xr.double(), yr.double()), abs=1e-9)
    # A rank-2 matrix stored in half precision: rounding must not add rank.
    low = (torch.randn(300, 2, generator=g) @ torch.randn(2, 40, generator=g)).to(dtype)
    assert canonical_correlations(low, low.double()).numel() == 2
