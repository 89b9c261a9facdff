"""TwoNN intrinsic dimension (Facco et al. 2017) against a pairwise-loop float64 reference."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dtprobe.errors import ConfigError, MetricInputError
from dtprobe.metrics import twonn
from dtprobe.metrics.intrinsic import _twonn_metric
from dtprobe.metrics.registry import EpochView, FeatureSplit


def ref_twonn(x: np.ndarray, discard: float = 0.1, mle: bool = False) -> float:
    """Facco et al. (2017) from the definition: loops over points, sorted CDF, LS through 0."""
    x = np.asarray(x, dtype=np.float64)
    n = len(x)
    mus = []
    for i in range(n):
        d = sorted(math.dist(x[i], x[j]) for j in range(n) if j != i)
        mus.append(d[1] / d[0])
    logs = [math.log(m) for m in mus]
    if mle:
        return n / sum(logs)
    logs.sort()
    keep = min(int(math.floor(n * (1 - discard))), n - 1)
    num = den = 0.0
    for i in range(keep):
        y = -math.log(1 - (i + 1) / n)
        num += logs[i] * y
        den += logs[i] ** 2
    return num / den


@pytest.mark.parametrize("shape", [(60, 3), (40, 80), (150, 10)])
def test_matches_reference(shape):
    rng = np.random.default_rng(shape[0])
    x = rng.standard_normal(shape)
    assert twonn(x) == pytest.approx(ref_twonn(x), rel=1e-10)
    assert twonn(x, estimator="mle") == pytest.approx(ref_twonn(x, mle=True), rel=1e-10)
    assert twonn(x, discard_fraction=0.0) == pytest.approx(ref_twonn(x, 0.0), rel=1e-10)


def test_recovers_known_dimension():
    """Points uniform on a 2-D square embedded (rotated) in 20-D: the estimate is about 2."""
    rng = np.random.default_rng(0)
    flat = rng.uniform(size=(3000, 2))
    q, _ = np.linalg.qr(rng.standard_normal((20, 20)))
    x = np.hstack([flat, np.zeros((3000, 18))]) @ q + 5.0
    assert twonn(x) == pytest.approx(2.0, abs=0.15)
    cube = rng.uniform(size=(3000, 5))
    assert twonn(cube) == pytest.approx(5.0, abs=0.5)


def test_large_offset_does_not_change_ratios():
    """Exact distance recomputation: a huge common offset leaves the estimate unchanged."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal((200, 4))
    assert twonn(x + 1e6) == pytest.approx(twonn(x), rel=1e-6)


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), scale=st.floats(1e-3, 1e3))
def test_invariances(seed, scale):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((50, 6))
    q, _ = np.linalg.qr(rng.standard_normal((6, 6)))
    perm = rng.permutation(50)
    base = twonn(x)
    assert twonn(scale * x @ q + 3.0) == pytest.approx(base, rel=1e-7)
    assert twonn(x[perm]) == pytest.approx(base, rel=1e-10)


def test_duplicates_collapsed_with_warning():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((50, 3))
    dup = np.vstack([x, x[:5]])
    with pytest.warns(RuntimeWarning, match="5 duplicate"):
        value = twonn(dup)
    assert value == pytest.approx(twonn(x), rel=1e-10)


def test_edge_cases():
    with pytest.raises(MetricInputError, match="distinct"):
        with pytest.warns(RuntimeWarning):
            twonn(np.ones((10, 3)))
    three = np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 3.0]])  # the smallest admissible input
    assert twonn(three, estimator="mle") == pytest.approx(ref_twonn(three, mle=True), rel=1e-12)
    with pytest.raises(MetricInputError, match="at least 3"):
        twonn(np.zeros((2, 3)))
    with pytest.raises(MetricInputError, match="NaN"):
        twonn(np.array([[0.0, 1.0], [np.nan, 1.0], [2.0, 3.0], [1.0, 1.0]]))
    with pytest.raises(ConfigError):
        twonn(np.eye(5), estimator="knn")
    with pytest.raises(ConfigError):
        twonn(np.eye(5), discard_fraction=1.0)
    # A regular lattice: every point equidistant from its two nearest neighbours.
    grid = np.array([[i, j] for i in range(6) for j in range(6)], dtype=float)
    with pytest.warns(RuntimeWarning, match="equidistant"):
        assert math.isnan(twonn(grid))
    # Constant extra features change nothing; n < d is fine.
    rng = np.random.default_rng(3)
    x = rng.standard_normal((30, 50))
    assert twonn(np.hstack([x, np.ones((30, 4))])) == pytest.approx(twonn(x), rel=1e-10)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_low_precision_is_the_estimate_of_the_rounded_points(dtype):
    x = torch.randn(80, 5, generator=torch.Generator().manual_seed(0)).to(dtype)
    rounded = x.to(torch.float64).numpy()
    assert twonn(x) == pytest.approx(ref_twonn(np.unique(rounded, axis=0)), rel=1e-9)


def test_adapter_row():
    x = torch.randn(64, 8, generator=torch.Generator().manual_seed(0))
    split = FeatureSplit(x, torch.zeros(64, dtype=torch.long))
    (row,) = _twonn_metric(EpochView(epoch=1, train=split, test=split))
    assert row.metric == "twonn" and row.value == pytest.approx(twonn(x))
    assert row.params["discard_fraction"] == 0.1
