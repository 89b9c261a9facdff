"""Metrics at scale (issue 14): the blockwise and subsampled paths against float64 references.

Every metric that now streams over row (or pair) blocks is run with its block budget shrunk
so that the blocks are a few rows, and compared with a dense float64 reference written from
the definition here.  The capped estimators must record the number of samples they used.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

import dtprobe.metrics._validation as validation
import dtprobe.metrics.cka as cka_mod
import dtprobe.metrics.collapse as collapse
import dtprobe.metrics.intrinsic as intrinsic
import dtprobe.metrics.neighbours as neighbours
import dtprobe.metrics.spectrum as spectrum
from dtprobe.errors import MetricInputError
from dtprobe.metrics import (
    cdnv,
    cka_permutation_null,
    cknna,
    class_mean_uniformity,
    mutual_knn,
    neural_collapse,
    renyi_mi,
    twonn,
)
from dtprobe.metrics.information import adapters, kde_mi, ksg_mi
from dtprobe.metrics.probes import LinearProbe
from dtprobe.metrics.registry import EpochView, FeatureSplit, available_metrics
from dtprobe.table import split_params


def clusters(n=240, d=6, k=5, seed=0, offset=1.0):
    rng = np.random.default_rng(seed)
    y = np.arange(n) % k
    x = 2.0 * rng.standard_normal((k, d))[y] + rng.standard_normal((n, d)) + offset
    return x.astype(np.float32), y


@pytest.fixture
def tiny_blocks(monkeypatch):
    """Block budgets of a few rows, so that every blockwise loop runs many times."""
    monkeypatch.setattr(intrinsic, "_MEMORY_BUDGET", 8 * 4 * 6 * 7)
    monkeypatch.setattr(neighbours, "_MEMORY_BUDGET", 8 * 240 * 9)
    monkeypatch.setattr(collapse, "_MEMORY_BUDGET", 8 * 20 * 13)
    monkeypatch.setattr(cka_mod, "_MEMORY_BUDGET", 8 * 11 * 17)
    monkeypatch.setattr(cka_mod, "_PERMUTATION_BUDGET", 8 * 10 * 13)
    monkeypatch.setattr(spectrum, "_MEMORY_BUDGET", 8 * 6 * 20)
    monkeypatch.setattr(validation, "_CHECK_ELEMENTS", 30)


# ----------------------------------------------------------------- kNN-based (exact, blocked)


def test_twonn_in_blocks_equals_the_pairwise_definition(tiny_blocks):
    x, _ = clusters(200, 6)
    z = x.astype(np.float64)
    dist = np.sqrt(((z[:, None, :] - z[None, :, :]) ** 2).sum(-1))
    np.fill_diagonal(dist, np.inf)
    two = np.sort(dist, axis=1)[:, :2]
    log_mu = np.sort(np.log(two[:, 1] / two[:, 0]))
    n = len(log_mu)
    keep = min(math.floor(n * 0.9), n - 1)
    ys = -np.log1p(-np.arange(1, keep + 1) / n)
    ref = float((log_mu[:keep] * ys).sum() / (log_mu[:keep] ** 2).sum())
    assert twonn(x) == pytest.approx(ref, rel=1e-10)


def _ref_neighbours(z: np.ndarray, k: int) -> list[set[int]]:
    s = z @ z.T
    np.fill_diagonal(s, -np.inf)
    return [set(np.argsort(-row, kind="stable")[:k].tolist()) for row in s]


def _unit(x: np.ndarray) -> np.ndarray:
    z = x.astype(np.float64)
    return z / np.linalg.norm(z, axis=1, keepdims=True)


def _ref_hsic1(a: np.ndarray, b: np.ndarray) -> float:
    n = len(a)
    a, b = a.copy(), b.copy()
    np.fill_diagonal(a, 0)
    np.fill_diagonal(b, 0)
    ones = np.ones(n)
    return float(((a * b.T).sum() + a.sum() * b.sum() / ((n - 1) * (n - 2))
                  - 2.0 / (n - 2) * ones @ a @ b @ ones) / (n * (n - 3)))


def test_mutual_knn_and_cknna_in_blocks_equal_dense_references(tiny_blocks):
    x, _ = clusters(240, 6, seed=1)
    rng = np.random.default_rng(2)
    y = (x @ rng.standard_normal((6, 5)) + 0.5 * rng.standard_normal((240, 5))).astype(np.float32)
    k = 7
    zx, zy = _unit(x), _unit(y)
    nx, ny = _ref_neighbours(zx, k), _ref_neighbours(zy, k)
    ref_mknn = sum(len(p & q) for p, q in zip(nx, ny, strict=True)) / (240 * k)
    assert mutual_knn(x, y, k) == pytest.approx(ref_mknn, abs=1e-15)

    def mask(sets):
        m = np.zeros((240, 240))
        for i, s in enumerate(sets):
            m[i, list(s)] = 1.0
        return m

    mk, ml = mask(nx), mask(ny)
    kx, ly = zx @ zx.T, zy @ zy.T
    ref = _ref_hsic1(mk * ml * kx, mk * ml * ly) / math.sqrt(
        _ref_hsic1(mk * kx, mk * kx) * _ref_hsic1(ml * ly, ml * ly))
    assert cknna(x, y, k) == pytest.approx(ref, rel=1e-10)


# ----------------------------------------------------------------- collapse (streamed)


def test_neural_collapse_streamed_equals_explicit_covariances(tiny_blocks):
    x, y = clusters(300, 7, k=6, seed=3)
    rng = np.random.default_rng(4)
    h = x.astype(np.float64)
    mu = np.stack([h[y == c].mean(0) for c in range(6)])
    w = mu + 0.7 * rng.standard_normal(mu.shape)
    b = rng.standard_normal(6)
    got = neural_collapse(torch.from_numpy(x), torch.from_numpy(y), w, b)
    resid = h - mu[y]
    sigma_w = resid.T @ resid / len(h)
    m = (mu - mu.mean(0)).T
    sigma_b = m @ m.T / 6
    nc1 = np.trace(sigma_w @ np.linalg.pinv(sigma_b, rtol=1e-12)) / 6
    clf = np.argmax(h @ w.T + b, axis=1)
    ncc = np.argmin(((h[:, None, :] - mu[None]) ** 2).sum(-1), axis=1)
    norms = np.linalg.norm(m, axis=0)
    assert got["nc1"] == pytest.approx(nc1, rel=1e-9)
    assert got["nc2_equinorm"] == pytest.approx(norms.std() / norms.mean(), rel=1e-10)
    assert got["nc3"] == pytest.approx(
        np.linalg.norm(w.T / np.linalg.norm(w) - m / np.linalg.norm(m)) ** 2, rel=1e-10)
    assert got["nc4"] == pytest.approx(float((clf != ncc).mean()), abs=0)


def test_neural_collapse_blocks_do_not_change_the_value(monkeypatch):
    x, y = clusters(500, 9, k=7, seed=5, offset=30.0)
    rng = np.random.default_rng(6)
    w, b = rng.standard_normal((7, 9)), rng.standard_normal(7)
    whole = neural_collapse(x, y, w, b)
    monkeypatch.setattr(collapse, "_MEMORY_BUDGET", 8 * 23 * 3)
    assert neural_collapse(x, y, w, b) == pytest.approx(whole, rel=1e-12, abs=1e-15)


def test_cdnv_and_uniformity_pair_blocks_equal_loops(tiny_blocks):
    x, y = clusters(270, 5, k=9, seed=7)  # 36 class pairs: two pair blocks
    h = x.astype(np.float64)
    mu = [h[y == c].mean(0) for c in range(9)]
    var = [((h[y == c] - mu[c]) ** 2).sum(1).mean() for c in range(9)]
    pairs = list(itertools.combinations(range(9), 2))
    ref = np.mean([(var[i] + var[j]) / (2 * ((mu[i] - mu[j]) ** 2).sum()) for i, j in pairs])
    assert cdnv(x, y) == pytest.approx(ref, rel=1e-11)
    g = np.mean(mu, axis=0)
    u = [(m - g) / np.linalg.norm(m - g) for m in mu]
    ref_u = math.log(np.mean([math.exp(-2.0 * ((u[i] - u[j]) ** 2).sum()) for i, j in pairs]))
    assert class_mean_uniformity(x, y) == pytest.approx(ref_u, rel=1e-11)


# ----------------------------------------------------------------- CKA null (chunked)


def _ref_cka(x: np.ndarray, y: np.ndarray, debiased: bool) -> float:
    x = x - x.mean(0)
    y = y - y.mean(0)
    k, l_ = x @ x.T, y @ y.T
    if not debiased:
        return float((k * l_).sum() / math.sqrt((k * k).sum() * (l_ * l_).sum()))
    return _ref_hsic1(k, l_) / math.sqrt(_ref_hsic1(k, k) * _ref_hsic1(l_, l_))


@pytest.mark.parametrize("debiased", [False, True])
def test_cka_null_in_chunks_equals_dense_permutations(tiny_blocks, debiased):
    x, _ = clusters(150, 6, seed=8, offset=5.0)
    rng = np.random.default_rng(9)
    y = (x @ rng.standard_normal((6, 4)) + rng.standard_normal((150, 4))).astype(np.float32)
    res = cka_permutation_null(x, y, n_permutations=6, debiased=debiased, seed=3)
    xd, yd = x.astype(np.float64), y.astype(np.float64)
    gen = torch.Generator().manual_seed(3)
    null = np.array([_ref_cka(xd, yd[torch.randperm(150, generator=gen).numpy()], debiased)
                     for _ in range(6)])
    assert res.score == pytest.approx(_ref_cka(xd, yd, debiased), rel=1e-10)
    assert res.null_mean == pytest.approx(null.mean(), rel=1e-9, abs=1e-14)
    assert res.null_std == pytest.approx(null.std(ddof=1), rel=1e-8)
    assert res.null_quantile == pytest.approx(np.quantile(null, 0.95), rel=1e-9, abs=1e-14)
    assert res.p_value == (1 + int((null >= res.score).sum())) / 7


# ----------------------------------------------------------------- spectrum (blockwise QR)


def test_spectrum_blockwise_equals_the_svd(tiny_blocks):
    rng = np.random.default_rng(10)
    x = (rng.standard_normal((400, 6)) * np.logspace(0, -4, 6) + 0.3).astype(np.float32)
    z = x.astype(np.float64)
    sigma = np.linalg.svd(z, compute_uv=False)
    p = sigma / sigma.sum() + spectrum.DEFAULT_RANKME_EPS
    assert spectrum.rankme(x) == pytest.approx(float(np.exp(-(p * np.log(p)).sum())), rel=1e-12)
    got = spectrum._singular_values(torch.from_numpy(x), center=True).numpy()
    np.testing.assert_allclose(got, np.linalg.svd(z - z.mean(0), compute_uv=False),
                               rtol=1e-12, atol=1e-14 * sigma[0])
    assert spectrum.numerical_rank(x) == 6
    lam = np.sort(np.linalg.eigvalsh(np.cov(z.T)))[::-1]
    u = np.log(np.arange(1, 7.0))
    v = np.log(lam)
    slope = ((u - u.mean()) * (v - v.mean())).sum() / ((u - u.mean()) ** 2).sum()
    assert spectrum.alpha_req(x) == pytest.approx(-slope, rel=1e-9)


def test_blocked_nan_check_counts_rows(tiny_blocks):
    x, _ = clusters(50, 6)
    x[[3, 17, 40]] = np.nan
    with pytest.raises(MetricInputError, match="NaN/Inf in 3 of 50 rows"):
        spectrum.rankme(x)


# ----------------------------------------------------------------- capped estimators


def test_mi_subsample_is_taken_before_the_float64_copy():
    x, y = clusters(900, 6, seed=11)
    idx = np.sort(np.random.default_rng(4).choice(900, size=150, replace=False))
    sub = x.astype(np.float64)[idx]
    got = renyi_mi(torch.from_numpy(x), torch.from_numpy(y), max_samples=150, seed=4)
    want = renyi_mi(sub, y[idx], max_samples=None)
    assert got.value == pytest.approx(want.value, rel=1e-13) and got.params["n"] == 150
    assert kde_mi(x, y, max_samples=150, seed=4).value == pytest.approx(
        kde_mi(sub, y[idx], max_samples=None).value, rel=1e-13)
    assert ksg_mi(x, y, max_samples=150, seed=4).value == pytest.approx(
        ksg_mi(sub, y[idx], max_samples=None, seed=4).value, rel=1e-13)
    bad = x.copy()
    bad[next(i for i in range(900) if i not in set(idx.tolist()))] = np.inf  # not subsampled
    with pytest.raises(MetricInputError, match="NaN/Inf"):
        renyi_mi(bad, y, max_samples=150, seed=4)


def test_default_mi_rows_record_the_cap_in_diagnostics():
    x, y = clusters(1200, 6, seed=12)
    t = torch.from_numpy(x)
    split = FeatureSplit(t, torch.from_numpy(y), inputs=t[:, :4] + 1.0)
    view = EpochView(epoch=0, train=split, test=split, seed=1)
    for name in ("mi_ty", "mi_xt"):
        (row,) = available_metrics()[name].func(view)
        settings, diagnostics = split_params(row.params)  # as the analysis writes the row
        assert diagnostics["n"] == adapters.DEFAULT_SAMPLES == 500
        assert settings["max_samples"] == adapters.DEFAULT_SAMPLES


# ----------------------------------------------------------------- linear probe


def test_probe_index_loss_is_the_one_hot_objective():
    """The index-based loss and gradient are those of the one-hot cross entropy (autograd)."""
    x, y = clusters(300, 5, k=4, seed=13)
    xt = torch.from_numpy(x).double()
    probe = LinearProbe(C=0.5, tol=1e-9, max_iter=500).fit(xt, torch.from_numpy(y))
    w = probe.coef_.clone().requires_grad_(True)
    b = probe.intercept_.clone().requires_grad_(True)
    onehot = torch.nn.functional.one_hot(torch.from_numpy(y).long(), 4).double()
    obj = (-(torch.log_softmax(xt @ w.T + b, dim=1) * onehot).sum() / 300
           + (w * w).sum() / (2 * 0.5 * 300))
    obj.backward()
    assert probe.objective_ == pytest.approx(float(obj.detach()), rel=1e-12)
    assert probe.converged_
    # tol 1e-9 is below float64's line-search floor (sqrt(eps) = 1.5e-8, documented on
    # LinearProbe.tol): converged means the gradient reached that floor
    assert float(torch.cat([w.grad.reshape(-1), b.grad]).abs().max()) <= 1.5e-8


# ----------------------------------------------------------------- the benchmark


def test_metrics_scale_benchmark_quick_measures_peaks():
    from benchmarks import metrics_scale

    got = metrics_scale.measure_in_process("cdnv", [300, 1200], 8, 4)
    assert [r["n"] for r in got] == [300, 1200]
    assert all(r["seconds"] > 0 for r in got)
    table = metrics_scale.table({"cdnv": got})
    assert "| cdnv |" in table and "memory ratio" in table


def test_metrics_scale_quick_cli_runs_children(capsys):
    from benchmarks import metrics_scale

    assert metrics_scale.main(["--quick", "--metrics", "cdnv"]) == 0
    out = capsys.readouterr().out
    assert "| cdnv |" in out and "sizes 500, 2000" in out
