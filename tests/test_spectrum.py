"""Tests for dtprobe.metrics.spectrum (RankMe, Garrido et al. 2023) against np.linalg.svd."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dtprobe.errors import MetricInputError
from dtprobe.metrics.registry import EpochView, FeatureSplit
from dtprobe.metrics.spectrum import _rankme_metric, rankme


def ref_rankme(x: np.ndarray, eps: float = 1e-7) -> float:
    sigma = np.linalg.svd(np.asarray(x, dtype=np.float64), compute_uv=False)
    p = sigma / np.abs(sigma).sum() + eps
    return float(np.exp(-np.sum(p * np.log(p))))


@pytest.mark.parametrize("shape", [(50, 8), (8, 50), (200, 32), (1, 5)])
def test_matches_numpy_svd(shape):
    rng = np.random.default_rng(shape[0])
    x = np.maximum(rng.standard_normal(shape), 0) + 0.5  # raw, uncentred ReLU-like features
    assert rankme(x) == pytest.approx(ref_rankme(x), rel=1e-6)
    assert rankme(torch.from_numpy(x).float()) == pytest.approx(
        ref_rankme(x.astype(np.float32)), rel=1e-6)
    assert rankme(x, eps=1e-3) == pytest.approx(ref_rankme(x, 1e-3), rel=1e-6)


def test_uses_raw_not_squared_singular_values():
    x = np.diag([4.0, 1.0])  # sigma = (4, 1): p = (0.8, 0.2); squared would give (16/17, 1/17)
    p = np.array([0.8, 0.2]) + 1e-7
    assert rankme(x) == pytest.approx(np.exp(-(p * np.log(p)).sum()), rel=1e-9)


def test_known_ranks():
    rng = np.random.default_rng(0)
    q, _ = np.linalg.qr(rng.standard_normal((40, 10)))
    assert rankme(q) == pytest.approx(10.0, rel=1e-5)  # 10 equal singular values
    low = rng.standard_normal((300, 3)) @ rng.standard_normal((3, 64))
    assert rankme(low) < 3.0 + 1e-3


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), scale=st.floats(1e-4, 1e4))
def test_scale_and_rotation_invariant(seed, scale):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((30, 6))
    q, _ = np.linalg.qr(rng.standard_normal((6, 6)))
    base = rankme(x)
    assert 1.0 <= base <= 6.0 + 1e-4
    assert rankme(scale * x @ q) == pytest.approx(base, rel=1e-6)


def test_degenerate_inputs():
    with pytest.warns(RuntimeWarning, match="all zero"):
        assert np.isnan(rankme(np.zeros((5, 3))))
    x = np.ones((5, 3))
    x[1, 1] = np.nan
    with pytest.raises(MetricInputError, match="NaN/Inf"):
        rankme(x)
    with pytest.raises(MetricInputError, match="2-D"):
        rankme(np.ones((2, 2, 2)))
    assert rankme(np.ones((6, 3))) == pytest.approx(ref_rankme(np.ones((6, 3))), rel=1e-6)


def test_registered_adapter_uses_test_split():
    rng = np.random.default_rng(1)
    train = FeatureSplit(torch.randn(20, 4), torch.arange(20) % 2)
    xt = rng.standard_normal((30, 5))
    test = FeatureSplit(torch.from_numpy(xt), torch.arange(30) % 3)
    (row,) = _rankme_metric(EpochView(epoch=0, train=train, test=test))
    assert row.metric == "rankme"
    assert row.value == pytest.approx(ref_rankme(xt), rel=1e-6)
    assert row.estimator and row.params == {"split": "test", "eps": 1e-7,
                                            "singular_values": "raw_uncentred"}
