"""Tests for dtprobe.metrics.collapse against explicit covariance matrices (Papyan et al. 2020)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dtprobe.errors import MetricInputError
from dtprobe.metrics.collapse import DEFAULT_RCOND, _neural_collapse_metric, neural_collapse
from dtprobe.metrics.registry import EpochView, FeatureSplit

RTOL = 1e-6


def ref_neural_collapse(h, y, w=None, b=None, rcond=DEFAULT_RCOND) -> dict[str, float]:
    """Slow reference from the definitions: explicit d x d covariances, loops over classes."""
    h = np.asarray(h, dtype=np.float64)
    n, d = h.shape
    classes = list(range(int(y.max()) + 1))
    n_cls = len(classes)
    mu = np.stack([h[y == c].mean(axis=0) for c in classes])
    mu_g = mu.mean(axis=0)
    sigma_w = np.zeros((d, d))
    for i in range(n):
        r = h[i] - mu[y[i]]
        sigma_w += np.outer(r, r) / n
    sigma_b = sum(np.outer(mu[c] - mu_g, mu[c] - mu_g) for c in classes) / n_cls
    out = {"nc1": float(np.trace(sigma_w @ np.linalg.pinv(sigma_b, rtol=rcond)) / n_cls)}
    m = (mu - mu_g).T
    norms = np.array([np.linalg.norm(m[:, c]) for c in classes])
    out["nc2_equinorm"] = float(np.std(norms) / np.mean(norms))
    cos = [m[:, i] @ m[:, j] / (norms[i] * norms[j]) for i in classes for j in classes if i != j]
    out["nc2_equiangularity"] = float(np.std(cos))
    g = m.T @ m
    target = np.eye(n_cls) - np.ones((n_cls, n_cls)) / n_cls
    out["nc2_etf_error"] = float(np.linalg.norm(g / np.linalg.norm(g)
                                                - target / np.linalg.norm(target)))
    if w is not None:
        w = np.asarray(w, dtype=np.float64)
        out["nc3"] = float(np.linalg.norm(w.T / np.linalg.norm(w) - m / np.linalg.norm(m)) ** 2)
        bias = np.zeros(n_cls) if b is None else np.asarray(b, dtype=np.float64)
        disagree = 0
        for i in range(n):
            clf = int(np.argmax(w @ h[i] + bias))
            ncc = int(np.argmin([np.linalg.norm(h[i] - mu[c]) for c in classes]))
            disagree += clf != ncc
        out["nc4"] = disagree / n
    return out


def make_data(seed: int, sizes=(5, 17, 30, 9), d: int = 7, noise: float = 1.0):
    rng = np.random.default_rng(seed)
    centres = 3.0 * rng.standard_normal((len(sizes), d)) + 1.0
    h = np.concatenate([c + noise * rng.standard_normal((k, d))
                        for c, k in zip(centres, sizes, strict=True)])
    y = np.concatenate([np.full(k, c) for c, k in enumerate(sizes)])
    perm = rng.permutation(len(y))
    w = centres + 0.8 * rng.standard_normal(centres.shape)
    b = rng.standard_normal(len(sizes))
    return h[perm], y[perm], w, b


def assert_close(got: dict[str, float], want: dict[str, float]) -> None:
    assert set(got) == set(want)
    for key, value in want.items():
        assert got[key] == pytest.approx(value, rel=RTOL, abs=1e-12), key


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("sizes,d", [((5, 17, 30, 9), 7), ((4, 9, 6, 12, 8, 3), 3),
                                     ((10, 10, 10), 12)])
def test_matches_explicit_covariances(seed, sizes, d):
    h, y, w, b = make_data(seed, sizes, d)
    w, b = w[:, :d], b
    assert_close(neural_collapse(h, y), ref_neural_collapse(h, y))
    assert_close(neural_collapse(h, y, w), ref_neural_collapse(h, y, w))
    assert_close(neural_collapse(h, y, w, b), ref_neural_collapse(h, y, w, b))


def test_torch_float32_and_nn_linear_weight():
    h, y, _, _ = make_data(2)
    head = torch.nn.Linear(7, 4)
    got = neural_collapse(torch.from_numpy(h).float(), torch.from_numpy(y), head.weight,
                          head.bias)
    want = ref_neural_collapse(h.astype(np.float32), y, head.weight.detach().numpy(),
                               head.bias.detach().numpy())
    assert_close(got, want)


def test_collapsed_simplex_etf_gives_zeros():
    n_cls, d = 4, 6
    etf = np.eye(n_cls) - 1.0 / n_cls  # rows: vertices of a simplex ETF in R^C
    means = 5.0 * np.hstack([etf, np.zeros((n_cls, d - n_cls))]) + 2.0  # shifted global mean
    y = np.repeat(np.arange(n_cls), [3, 8, 2, 5])
    h = means[y]
    m_centred = means - means.mean(axis=0)
    out = neural_collapse(h, y, weight=m_centred, bias=np.zeros(n_cls))
    for key in ("nc1", "nc2_equinorm", "nc2_equiangularity", "nc2_etf_error", "nc3", "nc4"):
        assert out[key] == pytest.approx(0.0, abs=1e-10), key


def test_more_noise_means_larger_nc1():
    h_lo, y, _, _ = make_data(3, noise=0.3)
    h_hi, _, _, _ = make_data(3, noise=3.0)
    assert neural_collapse(h_lo, y)["nc1"] < neural_collapse(h_hi, y)["nc1"]


def test_labels_without_weight_may_be_any_integers():
    h, y, _, _ = make_data(4)
    assert_close(neural_collapse(h, 7 * y - 3), ref_neural_collapse(h, y))


def test_degenerate_inputs():
    h, y, w, b = make_data(5)
    with pytest.raises(MetricInputError, match="1 distinct class"):
        neural_collapse(h, np.zeros_like(y))
    bad = h.copy()
    bad[0, 0] = np.inf
    with pytest.raises(MetricInputError, match="NaN/Inf"):
        neural_collapse(bad, y)
    with pytest.raises(MetricInputError, match="transpose"):
        neural_collapse(h, y, w.T)
    with pytest.raises(MetricInputError, match="row indices"):
        neural_collapse(h, y + 1, np.vstack([w, w[:1]]))
    with pytest.raises(MetricInputError, match="row indices"):
        neural_collapse(h[y < 3], y[y < 3], w)
    with pytest.raises(MetricInputError, match="bias"):
        neural_collapse(h, y, w, b[:2])
    with pytest.raises(MetricInputError, match="without weight"):
        neural_collapse(h, y, bias=b)
    same = np.tile(np.array([[1.0, -2.0, 3.0]]), (len(y), 1))  # zero-variance features
    with pytest.warns(RuntimeWarning, match="class means coincide"):
        out = neural_collapse(same, y, weight=w[:, :3])
    assert all(np.isnan(out[k]) for k in ("nc1", "nc2_equinorm", "nc2_equiangularity",
                                          "nc2_etf_error", "nc3"))
    assert 0.0 <= out["nc4"] <= 1.0


def test_registered_adapter_uses_train_split_and_head():
    h, y, w, b = make_data(6)
    ht, yt, _, _ = make_data(7)
    split = FeatureSplit(torch.from_numpy(h), torch.from_numpy(y))
    test = FeatureSplit(torch.from_numpy(ht), torch.from_numpy(yt))
    rows = _neural_collapse_metric(EpochView(epoch=1, train=split, test=test))
    assert [r.metric for r in rows] == ["nc1", "nc2_equinorm", "nc2_equiangularity",
                                        "nc2_etf_error"]
    want = ref_neural_collapse(h, y)
    for r in rows:
        assert r.value == pytest.approx(want[r.metric], rel=RTOL)
        assert r.estimator and r.params["split"] == "train"
    rows = _neural_collapse_metric(EpochView(epoch=1, train=split, test=test,
                                             head_weight=torch.from_numpy(w),
                                             head_bias=torch.from_numpy(b)))
    want = ref_neural_collapse(h, y, w, b)
    assert [r.metric for r in rows][-2:] == ["nc3", "nc4"]
    for r in rows:
        assert r.value == pytest.approx(want[r.metric], rel=RTOL, abs=1e-12)
