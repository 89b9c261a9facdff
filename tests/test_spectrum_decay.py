"""alpha-ReQ (Agrawal et al. 2022) and numerical rank against numpy float64 references."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dtprobe.errors import ConfigError
from dtprobe.metrics import alpha_req, numerical_rank
from dtprobe.metrics.registry import EpochView, FeatureSplit
from dtprobe.metrics.spectrum import _alpha_req_metric


def ref_alpha(x: np.ndarray, lo: int = 1, hi: int | None = None, tol: float = 1e-10) -> float:
    """Eigenvalues of np.cov, fitted with np.polyfit in log-log coordinates."""
    lam = np.sort(np.linalg.eigvalsh(np.cov(np.asarray(x, np.float64), rowvar=False)))[::-1]
    lam = lam[lam > tol * lam[0]]
    hi = len(lam) if hi is None else min(hi, len(lam))
    ranks = np.arange(lo, hi + 1)
    slope, _ = np.polyfit(np.log(ranks), np.log(lam[lo - 1:hi]), 1)
    return float(-slope)


def power_law_features(n: int, d: int, alpha: float, seed: int = 0) -> np.ndarray:
    """Centred features whose covariance eigenvalues are exactly i^-alpha (times a constant)."""
    rng = np.random.default_rng(seed)
    u, _ = np.linalg.qr(rng.standard_normal((n, d)) - 0.0)
    u = u - u.mean(axis=0)
    u, _ = np.linalg.qr(u)  # orthonormal columns orthogonal to the all-ones vector
    u -= u.mean(axis=0)
    v, _ = np.linalg.qr(rng.standard_normal((d, d)))
    s = np.arange(1, d + 1) ** (-alpha / 2)
    return (u * s) @ v.T + 4.0


@pytest.mark.parametrize("alpha", [0.5, 1.0, 2.3])
def test_alpha_req_oracle_power_law(alpha):
    x = power_law_features(500, 40, alpha)
    assert alpha_req(x) == pytest.approx(alpha, abs=1e-6)


@pytest.mark.parametrize("fit_range", [(1, None), (3, None), (2, 10)])
def test_alpha_req_matches_numpy(fit_range):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((300, 30)) * np.linspace(3, 0.1, 30) @ rng.standard_normal((30, 30))
    assert alpha_req(x, fit_range=fit_range) == pytest.approx(ref_alpha(x, *fit_range), rel=1e-8)


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), scale=st.floats(1e-3, 1e3))
def test_invariances(seed, scale):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((80, 8)) * np.linspace(2, 0.2, 8)
    q, _ = np.linalg.qr(rng.standard_normal((8, 8)))
    perm = rng.permutation(80)
    assert alpha_req(scale * x @ q + 5) == pytest.approx(alpha_req(x), rel=1e-7)
    assert alpha_req(x[perm]) == pytest.approx(alpha_req(x), rel=1e-9)
    assert numerical_rank(scale * x @ q) == numerical_rank(x[perm]) == 8


def test_numerical_rank_matches_numpy_and_thresholds():
    rng = np.random.default_rng(2)
    low = rng.standard_normal((200, 5)) @ rng.standard_normal((5, 64))
    assert numerical_rank(low) == np.linalg.matrix_rank(low) == 5
    assert numerical_rank(np.hstack([low, np.ones((200, 1))])) == 6
    assert numerical_rank(np.hstack([low, np.ones((200, 1))]), center=True) == 5
    assert numerical_rank(np.zeros((4, 3))) == 0
    # n < d
    assert numerical_rank(rng.standard_normal((10, 50))) == 10
    # float32 / bfloat16 storage of a rank-5 matrix: rounding does not add rank
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        assert numerical_rank(torch.from_numpy(low).to(dtype)) == 5
    sigma = np.linalg.svd(low, compute_uv=False)
    assert numerical_rank(low, rtol=float(sigma[2] / sigma[0]) * 1.0001) == 2


def test_alpha_req_edge_cases():
    with pytest.warns(RuntimeWarning, match="fewer than 2"):
        assert math.isnan(alpha_req(np.ones((10, 4))))
    rank1 = np.outer(np.arange(10.0), np.ones(4))
    with pytest.warns(RuntimeWarning):
        assert math.isnan(alpha_req(rank1))
    with pytest.raises(ConfigError):
        alpha_req(np.eye(4), fit_range=(0, None))
    x = power_law_features(200, 10, 1.0)
    # half precision: the value of the rounded features (their rounding is not counted as rank)
    for dtype in (torch.float16, torch.bfloat16):
        t = torch.from_numpy(x).to(dtype)
        rtol = max(max(t.shape) * 2.0**-52, torch.finfo(dtype).eps / 2 * min(t.shape) ** 0.5)
        assert alpha_req(t) == pytest.approx(alpha_req(t.double(), rtol=rtol), rel=1e-12)
        assert numerical_rank(t) == numerical_rank(t.double(), rtol=rtol)
    # duplicates of every row leave the covariance spectrum's shape unchanged
    assert alpha_req(np.vstack([x, x])) == pytest.approx(alpha_req(x), rel=1e-9)


def test_adapter_rows():
    x = torch.from_numpy(power_law_features(100, 10, 1.5)).float()
    split = FeatureSplit(x, torch.zeros(100, dtype=torch.long))
    rows = _alpha_req_metric(EpochView(epoch=1, train=split, test=split))
    assert [r.metric for r in rows] == ["alpha_req", "numerical_rank"]
    assert rows[0].value == pytest.approx(1.5, abs=1e-3)
    assert rows[1].value == 10.0
