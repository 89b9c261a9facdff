"""CDNV (Galanti et al. 2022) and class-mean uniformity (Wang & Isola 2020) against loops."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dtprobe.errors import MetricInputError
from dtprobe.metrics import cdnv, class_mean_uniformity
from dtprobe.metrics.collapse import _cdnv_metric
from dtprobe.metrics.registry import EpochView, FeatureSplit


def ref_cdnv(x, y):
    x = np.asarray(x, np.float64)
    classes = sorted(set(np.asarray(y).tolist()))
    mu, var = {}, {}
    for c in classes:
        rows = [x[i] for i in range(len(x)) if y[i] == c]
        mu[c] = sum(rows) / len(rows)
        var[c] = sum(float((r - mu[c]) @ (r - mu[c])) for r in rows) / len(rows)
    vals = [(var[i] + var[j]) / (2 * float((mu[i] - mu[j]) @ (mu[i] - mu[j])))
            for i, j in itertools.combinations(classes, 2)]
    return sum(vals) / len(vals)


def ref_uniformity(x, y, t=2.0):
    x = np.asarray(x, np.float64)
    classes = sorted(set(np.asarray(y).tolist()))
    mus = [x[np.asarray(y) == c].mean(axis=0) for c in classes]
    g = sum(mus) / len(mus)
    us = [(m - g) / np.linalg.norm(m - g) for m in mus]
    vals = [math.exp(-t * float((a - b) @ (a - b))) for a, b in itertools.combinations(us, 2)]
    return math.log(sum(vals) / len(vals))


def data(seed=0, n=300, d=10, k=4):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, k, n)
    x = 2 * rng.standard_normal((k, d))[y] + rng.standard_normal((n, d)) + 1.0
    return x, y


def test_matches_loops():
    for seed in range(3):
        x, y = data(seed)
        assert cdnv(x, y) == pytest.approx(ref_cdnv(x, y), rel=1e-10)
        assert class_mean_uniformity(x, y) == pytest.approx(ref_uniformity(x, y), rel=1e-10)
        assert class_mean_uniformity(x, y, t=0.5) == pytest.approx(
            ref_uniformity(x, y, 0.5), rel=1e-10)


def test_oracles():
    # Simplex ETF means: the uniformity minimum -2tC/(C-1); collapsed classes: CDNV 0.
    c = 5
    etf = np.eye(c) - 1.0 / c
    labels = np.repeat(np.arange(c), 3)
    x = np.repeat(etf, 3, axis=0)
    assert class_mean_uniformity(x, labels) == pytest.approx(-2 * 2 * c / (c - 1), rel=1e-12)
    assert cdnv(x, labels) == pytest.approx(0.0, abs=1e-30)
    # two classes, unit variance each, means 2 apart in 1-D: (1 + 1) / (2 * 4)
    x1 = np.array([[-1.0], [1.0], [1.0], [3.0]])
    assert cdnv(x1, [0, 0, 1, 1]) == pytest.approx(2 / 8)


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), scale=st.floats(1e-3, 1e3))
def test_invariances(seed, scale):
    x, y = data(seed % 1000, n=60, d=5, k=3)
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.standard_normal((5, 5)))
    perm = rng.permutation(60)
    for fn in (cdnv, class_mean_uniformity):
        base = fn(x, y)
        assert fn(scale * x @ q - 3.0, y) == pytest.approx(base, rel=1e-8)
        assert fn(x[perm], y[perm]) == pytest.approx(base, rel=1e-10)


def test_edge_cases():
    x, y = data(1, n=50)
    y = y.copy()
    y[0] = 9  # a class with one sample: variance 0 (documented)
    assert cdnv(x, y) == pytest.approx(ref_cdnv(x, y), rel=1e-10)
    with pytest.warns(RuntimeWarning, match="coinciding"):
        assert cdnv(np.array([[0.0], [2.0], [1.0], [1.0]]), [0, 0, 1, 1]) == math.inf
    with pytest.warns(RuntimeWarning, match="single point"):
        assert math.isnan(cdnv(np.array([[1.0], [1.0]]), [0, 1]))
    with pytest.raises(MetricInputError, match="class"):
        cdnv(x, np.zeros(50))
    with pytest.warns(RuntimeWarning, match="mean of the class means"):
        assert math.isnan(class_mean_uniformity(np.array([[0.0], [1.0], [2.0]]), [0, 1, 2]))
    # n < d and constant extra features
    xs, ys = data(2, n=12, d=40)
    assert cdnv(np.hstack([xs, np.ones((12, 3))]), ys) == pytest.approx(cdnv(xs, ys))
    for dtype in (torch.float16, torch.bfloat16):
        t = torch.from_numpy(x).to(dtype)
        assert cdnv(t, y) == pytest.approx(ref_cdnv(t.double().numpy(), y), rel=1e-10)


def test_adapter_rows():
    x, y = data(3)
    split = FeatureSplit(torch.from_numpy(x), torch.from_numpy(y))
    rows = _cdnv_metric(EpochView(epoch=1, train=split, test=split))
    assert [r.metric for r in rows] == ["cdnv", "class_mean_uniformity"]
    assert rows[0].value == pytest.approx(ref_cdnv(x, y))
