"""Tests for dtprobe.metrics.transferability against explicit float64 references."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sklearn.covariance import ledoit_wolf_shrinkage as sk_ledoit_wolf_shrinkage

from dtprobe.errors import ConfigError, MetricInputError
from dtprobe.metrics.registry import EpochView, FeatureSplit
from dtprobe.metrics.transferability import (
    gbc,
    h_score,
    ledoit_wolf_shrinkage,
    leep,
    logme,
    logme_fit,
    nce_score,
    transrate,
)


def _data(n=300, d=10, k=4, seed=0, spread=1.0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, k, n)
    x = rng.normal(size=(n, d)) + spread * rng.normal(size=(k, d))[y] + 0.5
    return x, y


# ----------------------------------------------------------------------------------------
# LogME
# ----------------------------------------------------------------------------------------


def _explicit_evidence(f, y, alpha, beta):
    """Log evidence of Bayesian linear regression with explicit inverse and log-det."""
    n, d = f.shape
    a = alpha * np.eye(d) + beta * f.T @ f
    a_inv = np.linalg.inv(a)
    m = beta * a_inv @ f.T @ y
    res2 = float(((f @ m - y) ** 2).sum())
    logdet = np.linalg.slogdet(a)[1]
    ev = (n / 2 * math.log(beta) + d / 2 * math.log(alpha) - n / 2 * math.log(2 * math.pi)
          - beta / 2 * res2 - alpha / 2 * float(m @ m) - logdet / 2)
    gamma = d - alpha * np.trace(a_inv)  # = sum_i beta s_i / (alpha + beta s_i)
    return ev, m, res2, gamma


@pytest.mark.parametrize("n,d", [(200, 8), (30, 45)])  # n > D and n < D
def test_logme_fixed_point_and_evidence(n, d):
    f, y = _data(n, d, 3, seed=n)
    onehot = np.eye(3)[y]
    fit = logme_fit(f, onehot)
    assert fit.converged
    for c in range(3):
        alpha, beta = float(fit.alpha[c]), float(fit.beta[c])
        ev, m, res2, gamma = _explicit_evidence(f, onehot[:, c], alpha, beta)
        # fixed-point conditions (MacKay): alpha = gamma / m'm, beta = (n - gamma) / ||Fm - y||^2
        assert alpha == pytest.approx(gamma / float(m @ m), rel=1e-6)
        assert beta == pytest.approx((n - gamma) / res2, rel=1e-6)
        assert float(fit.evidence[c]) == pytest.approx(ev / n, rel=1e-9, abs=1e-12)
        # the fixed point is a maximum of the evidence in alpha and in beta
        for fa, fb in [(1.05, 1.0), (0.95, 1.0), (1.0, 1.05), (1.0, 0.95)]:
            assert _explicit_evidence(f, onehot[:, c], alpha * fa, beta * fb)[0] < ev
    assert logme(f, y) == pytest.approx(float(fit.evidence.mean()), rel=1e-12)


def test_logme_prefers_informative_features_and_rejects_degenerate():
    f, y = _data(400, 6, 3, seed=1, spread=3.0)
    noise = np.random.default_rng(2).normal(size=f.shape)
    assert logme(f, y) > logme(noise, y)
    with pytest.raises(MetricInputError, match="zero"):
        logme(np.zeros((50, 4)), np.arange(50) % 2)
    with pytest.raises(MetricInputError, match="class"):
        logme(f, np.zeros(400))


# ----------------------------------------------------------------------------------------
# H-score
# ----------------------------------------------------------------------------------------


def _explicit_h_score(f, y, shrink=0.0):
    n, d = f.shape
    fc = f - f.mean(0)
    g = np.zeros_like(fc)
    for i in range(n):  # class-conditional mean feature of each sample, expanded per sample
        g[i] = fc[y == y[i]].mean(0)
    cov_f = np.cov(fc, rowvar=False, bias=True)
    cov_g = np.cov(g, rowvar=False, bias=True)
    if shrink:
        cov_f = (1 - shrink) * cov_f + shrink * np.trace(cov_f) / d * np.eye(d)
        cov_g = (1 - shrink) * cov_g
    return float(np.trace(np.linalg.pinv(cov_f, hermitian=True) @ cov_g))


def test_h_score_matches_explicit_covariances():
    f, y = _data(250, 7, 5, seed=3)
    assert h_score(f, y) == pytest.approx(_explicit_h_score(f, y), rel=1e-9)
    # rank-deficient features: a duplicated column and a constant column (pinv ignores them)
    g = np.column_stack([f, f[:, 0], np.full(250, 2.0)])
    assert h_score(g, y) == pytest.approx(_explicit_h_score(g, y), rel=1e-6)
    assert h_score(g, y) == pytest.approx(h_score(f, y), rel=1e-6)
    assert 0.0 <= h_score(f, y) <= 4.0 + 1e-9  # at most min(d, C - 1)


def test_h_score_shrinkage():
    f, y = _data(120, 30, 3, seed=4)
    assert h_score(f, y, shrinkage=0.3) == pytest.approx(_explicit_h_score(f, y, 0.3), rel=1e-9)
    assert ledoit_wolf_shrinkage(f) == pytest.approx(sk_ledoit_wolf_shrinkage(f), rel=1e-9)
    lw = sk_ledoit_wolf_shrinkage(f)
    assert h_score(f, y, shrinkage="ledoit-wolf") == pytest.approx(
        _explicit_h_score(f, y, lw), rel=1e-8)
    assert h_score(f, y, shrinkage=0.0) == pytest.approx(h_score(f, y), rel=1e-12)
    with pytest.raises(ConfigError):
        h_score(f, y, shrinkage=1.5)
    with pytest.raises(ConfigError):
        h_score(f, y, shrinkage="oas")


# ----------------------------------------------------------------------------------------
# TransRate
# ----------------------------------------------------------------------------------------


def _explicit_coding_rate(z, eps):
    n, d = z.shape
    return 0.5 * np.linalg.slogdet(np.eye(d) + z.T @ z / (n * eps))[1]


@pytest.mark.parametrize("n,d,eps", [(300, 8, 1e-4), (60, 40, 1e-2)])  # classes with n_c < d
def test_transrate_matches_explicit_logdet(n, d, eps):
    f, y = _data(n, d, 3, seed=5)
    z = f - f.mean(0)
    classes = sorted(set(y.tolist()))
    ref = _explicit_coding_rate(z, eps) - sum(
        _explicit_coding_rate(z[y == c], eps) for c in classes) / len(classes)
    assert transrate(f, y, eps=eps) == pytest.approx(ref, rel=1e-9)
    with pytest.raises(ConfigError):
        transrate(f, y, eps=0.0)


# ----------------------------------------------------------------------------------------
# GBC
# ----------------------------------------------------------------------------------------


def _explicit_gbc(f, y, gaussian, floor=1e-4):
    classes = sorted(set(y.tolist()))
    d = f.shape[1]
    stats = {}
    for c in classes:
        fc = f[y == c]
        var = np.maximum(fc.var(0), floor)
        cov = np.diag(var) if gaussian == "diagonal" else var.mean() * np.eye(d)
        stats[c] = (fc.mean(0), cov)
    total = 0.0
    for ci in classes:
        for cj in classes:
            if ci == cj:
                continue
            (m1, s1), (m2, s2) = stats[ci], stats[cj]
            s = (s1 + s2) / 2
            diff = m1 - m2
            db = (diff @ np.linalg.inv(s) @ diff / 8
                  + 0.5 * (np.linalg.slogdet(s)[1]
                           - 0.5 * (np.linalg.slogdet(s1)[1] + np.linalg.slogdet(s2)[1])))
            total += math.exp(-db)
    return -total


@pytest.mark.parametrize("gaussian", ["spherical", "diagonal"])
def test_gbc_matches_explicit_bhattacharyya(gaussian):
    f, y = _data(200, 6, 4, seed=6, spread=0.6)
    f[:, 3] *= 4.0  # unequal variances across dimensions
    f[y == 2, 5] = 1.0  # a constant feature within one class: the variance floor applies
    ref = _explicit_gbc(f, y, gaussian)
    assert gbc(f, y, gaussian=gaussian) == pytest.approx(ref, rel=1e-9)
    assert -4 * 3 <= ref < 0


def test_gbc_orders_separability():
    f, y = _data(300, 5, 3, seed=7, spread=0.3)
    far = f + 5.0 * y[:, None]  # class means pushed apart along the diagonal
    assert gbc(far, y) > gbc(f, y)
    with pytest.raises(ConfigError):
        gbc(f, y, gaussian="full")


# ----------------------------------------------------------------------------------------
# LEEP and NCE
# ----------------------------------------------------------------------------------------


def _probs(n, z, seed):
    logits = np.random.default_rng(seed).normal(size=(n, z)) * 2.0
    e = np.exp(logits - logits.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def test_leep_matches_explicit_joint():
    n, nz = 80, 5
    theta = _probs(n, nz, seed=8)
    y = np.random.default_rng(9).integers(0, 3, n) + 4  # labels 4..6
    labels = sorted(set(y.tolist()))
    joint = {(a, z): 0.0 for a in labels for z in range(nz)}
    for i in range(n):
        for z in range(nz):
            joint[(y[i], z)] += theta[i, z] / n
    marg = {z: sum(joint[(a, z)] for a in labels) for z in range(nz)}
    total = 0.0
    for i in range(n):
        total += math.log(sum(joint[(y[i], z)] / marg[z] * theta[i, z] for z in range(nz)))
    assert leep(theta, y) == pytest.approx(total / n, rel=1e-12)
    assert leep(torch.as_tensor(theta, dtype=torch.float32), y) == pytest.approx(total / n,
                                                                                  rel=1e-5)


def test_leep_rejects_logits():
    with pytest.raises(MetricInputError, match="softmax"):
        leep(np.random.default_rng(0).normal(size=(20, 3)), np.arange(20) % 2)
    with pytest.raises(MetricInputError, match="sum to 1"):
        leep(np.full((20, 3), 0.5), np.arange(20) % 2)


def test_nce_matches_explicit_counting():
    rng = np.random.default_rng(10)
    z = rng.integers(0, 6, 150)
    y = (z % 3 + rng.integers(0, 2, 150)) % 4
    counts: dict[tuple[int, int], int] = {}
    for a, b in zip(y.tolist(), z.tolist(), strict=True):
        counts[(a, b)] = counts.get((a, b), 0) + 1
    zc = {b: sum(v for (_, bb), v in counts.items() if bb == b) for b in set(z.tolist())}
    ref = sum(v / 150 * math.log(v / zc[b]) for (_, b), v in counts.items())
    assert nce_score(z, y) == pytest.approx(ref, rel=1e-12)
    scores = np.eye(6)[z] * 3.0 + rng.uniform(0, 1, (150, 6))  # argmax of scores is z
    assert nce_score(scores, y) == pytest.approx(ref, rel=1e-12)
    assert nce_score(z, z % 3) == pytest.approx(0.0, abs=1e-15)  # y determined by z
    assert -math.log(4) - 1e-12 <= ref <= 0.0


# ----------------------------------------------------------------------------------------
# Shared input checks and adapters
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("fn", [logme, h_score, transrate, gbc])
def test_feature_scores_reject_degenerate_input(fn):
    f, y = _data(50, 4, 2, seed=11)
    with pytest.raises(MetricInputError, match="class"):
        fn(f, np.ones(50))
    bad = f.copy()
    bad[0, 0] = np.inf
    with pytest.raises(MetricInputError, match="NaN"):
        fn(bad, y)
    with pytest.raises(MetricInputError, match="entries"):
        fn(f, y[:40])
    assert math.isfinite(fn(torch.as_tensor(f, dtype=torch.float32), torch.as_tensor(y)))


def _view(with_logits: bool = True) -> EpochView:
    f, y = _data(300, 8, 3, seed=12)
    rng = np.random.default_rng(12)
    t = torch.as_tensor
    factors = {"colour": t((f[:, 0] > 0.5).astype(np.int64)), "size": t(rng.integers(0, 3, 300))}
    logits = t(rng.normal(size=(300, 3))) if with_logits else None
    split = FeatureSplit(t(f, dtype=torch.float32), t(y), factors, logits=logits)
    return EpochView(epoch=1, train=split, test=split)


def test_registered_transferability_adapters():
    from dtprobe.metrics.registry import _REGISTRY

    view = _view()
    expected = {"logme": logme, "h_score": h_score, "transrate": transrate, "gbc": gbc}
    for name, fn in expected.items():
        spec = _REGISTRY[name]
        assert not spec.default
        rows = spec.func(view)
        assert [r.task for r in rows] == ["colour", "size"]
        assert rows[0].value == pytest.approx(fn(view.train.features,
                                                 view.train.factors["colour"]))
        assert rows[0].estimator and rows[0].params
    probs = torch.softmax(view.train.logits.double(), dim=1)
    rows = _REGISTRY["leep"].func(view)
    assert rows[1].value == pytest.approx(leep(probs, view.train.factors["size"]))
    rows = _REGISTRY["nce"].func(view)
    assert rows[1].value == pytest.approx(nce_score(probs, view.train.factors["size"]))
    with pytest.raises(MetricInputError, match="logits"):
        _REGISTRY["leep"].func(_view(with_logits=False))
