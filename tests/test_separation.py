"""Tests for dtprobe.metrics.separation against the pairwise definition of Kornblith et al. 2021."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dtprobe.errors import MetricInputError
from dtprobe.metrics.registry import EpochView, FeatureSplit
from dtprobe.metrics.separation import _class_separation_metric, class_separation


def ref_class_separation(x: np.ndarray, y: np.ndarray) -> float:
    """Definition: all ordered pairs incl. m = n, cosine distance, classes weighted equally."""
    x = np.asarray(x, dtype=np.float64)
    classes = sorted(set(y.tolist()))
    members = {c: [i for i in range(len(y)) if y[i] == c] for c in classes}
    n_cls = len(classes)

    def dist(m: int, n: int) -> float:
        return 1.0 - float(x[m] @ x[n]) / (np.linalg.norm(x[m]) * np.linalg.norm(x[n]))

    d_within = 0.0
    for c in classes:
        idx = members[c]
        d_within += sum(dist(m, n) for m in idx for n in idx) / (n_cls * len(idx) ** 2)
    d_total = 0.0
    for cj in classes:
        for ck in classes:
            s = sum(dist(m, n) for m in members[cj] for n in members[ck])
            d_total += s / (n_cls**2 * len(members[cj]) * len(members[ck]))
    return 1.0 - d_within / d_total


def unbalanced(seed: int, sizes=(3, 11, 25, 7), d: int = 6, spread: float = 1.0):
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((len(sizes), d)) * 2.0
    x = np.concatenate([c + spread * rng.standard_normal((k, d))
                        for c, k in zip(centres, sizes, strict=True)])
    y = np.concatenate([np.full(k, 10 * c + 3) for c, k in enumerate(sizes)])  # non-contiguous
    perm = rng.permutation(len(y))
    return x[perm], y[perm]


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("spread", [0.2, 1.0, 5.0])
def test_matches_pairwise_definition(seed, spread):
    x, y = unbalanced(seed, spread=spread)
    want = ref_class_separation(x, y)
    assert class_separation(x, y) == pytest.approx(want, rel=1e-6)
    assert class_separation(torch.from_numpy(x).float(), torch.from_numpy(y)) == pytest.approx(
        ref_class_separation(x.astype(np.float32), y), rel=1e-6)


def test_relu_like_features_and_two_classes():
    rng = np.random.default_rng(4)
    x = np.maximum(rng.standard_normal((30, 5)), 0) + 0.01
    y = np.array([0] * 4 + [1] * 26)
    assert class_separation(x, y) == pytest.approx(ref_class_separation(x, y), rel=1e-6)


def test_perfectly_separated_orthogonal_classes_give_one():
    x = np.repeat(np.eye(3), [2, 5, 9], axis=0) * np.linspace(1, 3, 16)[:, None]
    y = np.repeat([0, 1, 2], [2, 5, 9])
    assert class_separation(x, y) == pytest.approx(1.0, abs=1e-12)


def test_label_noise_lowers_separation():
    x, y = unbalanced(3, spread=0.3)
    shuffled = np.random.default_rng(0).permutation(y)
    assert class_separation(x, shuffled) < class_separation(x, y)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), log_scales=st.lists(st.floats(-6, 6), min_size=46,
                                                            max_size=46))
def test_invariant_to_positive_per_vector_scaling(seed, log_scales):
    x, y = unbalanced(seed)
    scaled = x * np.exp(np.array(log_scales))[:, None]
    base = class_separation(x, y)
    assert 0.0 <= base <= 1.0
    assert class_separation(scaled, y) == pytest.approx(base, rel=1e-9, abs=1e-12)


def test_degenerate_inputs():
    x, y = unbalanced(0)
    with pytest.raises(MetricInputError, match="1 distinct class"):
        class_separation(x, np.zeros(len(y), dtype=int))
    bad = x.copy()
    bad[5, 2] = np.nan
    with pytest.raises(MetricInputError, match="NaN/Inf"):
        class_separation(bad, y)
    zero = x.copy()
    zero[[1, 7]] = 0.0
    with pytest.raises(MetricInputError, match="2 all-zero row"):
        class_separation(zero, y)
    with pytest.raises(MetricInputError, match="entries"):
        class_separation(x, y[:-1])
    with pytest.raises(MetricInputError, match="integer"):
        class_separation(x, y + 0.5)
    same_direction = np.outer(np.arange(1, 47), [1.0, 2.0, -1.0])
    with pytest.warns(RuntimeWarning, match="same direction"):
        assert np.isnan(class_separation(same_direction, y))


def test_registered_adapter_uses_test_split():
    x, y = unbalanced(1)
    xt, yt = unbalanced(2)
    view = EpochView(epoch=3,
                     train=FeatureSplit(torch.from_numpy(x).float(), torch.from_numpy(y)),
                     test=FeatureSplit(torch.from_numpy(xt).float(), torch.from_numpy(yt)))
    (row,) = _class_separation_metric(view)
    assert row.metric == "class_separation"
    assert row.value == pytest.approx(class_separation(xt.astype(np.float32), yt), rel=1e-12)
    assert row.estimator and row.params["split"] == "test"
