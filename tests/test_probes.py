"""Tests for dtprobe.metrics.probes against independent references (scikit-learn, loops)."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression

from dtprobe.errors import ConfigError, MetricInputError
from dtprobe.metrics import probes
from dtprobe.metrics.probes import (
    KORNBLITH_C_GRID,
    LinearProbe,
    ProbeConvergenceWarning,
    ProbeSweepConvergenceWarning,
    accuracy_interval,
    knn_predict,
    knn_probe,
    linear_probe,
    stratified_split,
)
from dtprobe.metrics.registry import EpochView, FeatureSplit


def _blobs(n: int, d: int, k: int, seed: int, noise: float = 2.0):
    """Overlapping Gaussian classes (not separable, so the optimum is well conditioned)."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, k, n)
    centres = rng.normal(size=(k, d))
    x = centres[y] + noise * rng.normal(size=(n, d)) + 3.0  # offset: standardisation matters
    return x, y


def _standardise(x_fit: np.ndarray, *xs: np.ndarray) -> list[np.ndarray]:
    mean, std = x_fit.mean(0), x_fit.std(0)
    std[std == 0] = 1.0
    return [(x - mean) / std for x in xs]


def _reference_objective(coef: np.ndarray, intercept: np.ndarray, x: np.ndarray,
                         y: np.ndarray, C: float) -> float:
    """scikit-learn's objective C * sum CE + ||W||^2 / 2, divided by C n, written out."""
    coef = np.asarray(coef, dtype=np.float64)
    intercept = np.asarray(intercept, dtype=np.float64)
    total = 0.0
    for i in range(x.shape[0]):
        if coef.shape[0] == 1:  # binary: P(y=1) = sigmoid(w x + b)
            z = float(x[i] @ coef[0] + intercept[0])
            total += math.log1p(math.exp(-z)) if y[i] == 1 else math.log1p(math.exp(z))
        else:
            z = coef @ x[i] + intercept
            zmax = z.max()
            total += zmax + math.log(np.exp(z - zmax).sum()) - z[y[i]]
    return (C * total + 0.5 * float((coef ** 2).sum())) / (C * x.shape[0])


@pytest.mark.parametrize("k,C", [(4, 0.05), (4, 2.0), (2, 0.3)])
def test_linear_probe_matches_sklearn_objective_and_accuracy(k, C):
    x, y = _blobs(900, 12, k, seed=k)
    xtr, xte = _standardise(x[:600], x[:600], x[600:])
    ytr, yte = y[:600], y[600:]
    ours = LinearProbe(C, tol=1e-10, max_iter=5000).fit(xtr, ytr)
    ref = LogisticRegression(C=C, tol=1e-12, max_iter=20000).fit(xtr, ytr)
    obj_ours = _reference_objective(ours.coef_.numpy(), ours.intercept_.numpy(), xtr, ytr, C)
    obj_ref = _reference_objective(ref.coef_, ref.intercept_, xtr, ytr, C)
    assert abs(obj_ours - obj_ref) <= 1e-4 * abs(obj_ref)
    # the probe's own objective is the same function
    assert ours.objective(xtr, ytr) == pytest.approx(obj_ours, rel=1e-10)
    assert ours.objective_ == pytest.approx(obj_ours, rel=1e-8)
    assert ours.converged_
    assert abs(ours.score(xte, yte) - ref.score(xte, yte)) <= 0.005
    # predictions and probabilities agree with sklearn's, not just accuracies
    assert (ours.predict(xte).numpy() == ref.predict(xte)).mean() >= 0.99
    np.testing.assert_allclose(ours.predict_proba(xte).numpy(), ref.predict_proba(xte),
                               atol=1e-3)


def test_linear_probe_standardize_flag_and_labels():
    x, y = _blobs(400, 6, 3, seed=5)
    labels = np.array([7, 11, 42])[y]  # arbitrary label values come back as themselves
    probe = LinearProbe(1.0, standardize=True, tol=1e-9).fit(x, labels)
    (xs,) = _standardise(x, x)
    plain = LinearProbe(1.0, tol=1e-9).fit(xs, labels)
    np.testing.assert_allclose(probe.coef_.numpy(), plain.coef_.numpy(), atol=1e-6)
    assert set(probe.predict(x).tolist()) <= {7, 11, 42}
    assert probe.score(x, labels) == plain.score(xs, labels)
    assert probe.get_params()["C"] == 1.0
    with pytest.raises(ConfigError):
        probe.set_params(penalty="l1")


def test_sweep_chooses_best_val_c_by_brute_force():
    x, y = _blobs(700, 10, 3, seed=1, noise=2.5)
    grid = [1e-3, 1e-2, 1e-1, 1.0, 10.0]
    res = linear_probe(x[:500], y[:500], x[500:], y[500:], c_grid=grid, patience=None,
                       tol=1e-9, sweep_tol=None, seed=3)
    assert list(res.val_accuracy) == grid  # the whole grid, ascending
    # brute force: cold sklearn fits at every C on the same split and standardisation
    fit_idx, val_idx = stratified_split(y[:500], 0.2, seed=3)
    x_fit, x_val = _standardise(x[fit_idx], x[fit_idx], x[val_idx])
    ref_acc = {c: LogisticRegression(C=c, tol=1e-12, max_iter=20000)
               .fit(x_fit, y[fit_idx]).score(x_val, y[val_idx]) for c in grid}
    for c in grid:
        assert abs(res.val_accuracy[c] - ref_acc[c]) <= 1.0 / len(val_idx) + 1e-12
    # the choice: re-solved candidates within one validation sample of the best, compared on
    # (accuracy, -log-loss); the log-loss is the mean validation cross-entropy, written out
    best = max(res.val_accuracy.values())
    cands = res.selection
    assert all(res.val_accuracy[c] >= best - 1 / len(val_idx) - 1e-12 for c in cands)
    assert res.best_c == max(cands, key=lambda c: (cands[c]["val_accuracy"],
                                                   -cands[c]["val_log_loss"], -c))
    clf = LogisticRegression(C=res.best_c, tol=1e-12, max_iter=20000).fit(x_fit, y[fit_idx])
    p = clf.predict_proba(x_val)
    ref_loss = -np.mean(np.log(p[np.arange(len(val_idx)), y[val_idx]]))
    assert cands[res.best_c]["val_log_loss"] == pytest.approx(ref_loss, rel=1e-5)
    # the refit: sklearn on all training data, standardised with all-train statistics
    xtr, xte = _standardise(x[:500], x[:500], x[500:])
    ref = LogisticRegression(C=res.best_c, tol=1e-12, max_iter=20000).fit(xtr, y[:500])
    assert abs(res.test_accuracy - ref.score(xte, y[500:])) <= 0.005
    assert abs(res.train_accuracy - ref.score(xtr, y[:500])) <= 0.005
    assert res.converged and res.n_iter > 0 and res.n_iter_total >= res.n_iter


def test_sweep_early_stopping_rule():
    x, y = _blobs(600, 8, 3, seed=2, noise=3.0)
    grid = list(np.logspace(-4, 4, 17))
    for patience in (1, 2):
        res = linear_probe(x[:450], y[:450], x[450:], y[450:], c_grid=grid, patience=patience)
        accs = list(res.val_accuracy.values())
        # replay the rule on the recorded accuracies: stop right after `patience` misses
        best, misses = -1.0, 0
        for i, a in enumerate(accs):
            if a > best:
                best, misses = a, 0
            else:
                misses += 1
            if misses >= patience:
                assert i == len(accs) - 1
        assert len(accs) == len(grid) or misses >= patience
        assert list(res.val_accuracy) == grid[:len(accs)]


def test_stratified_split():
    y = np.repeat([0, 1, 2], [50, 30, 5])
    tr, va = stratified_split(y, 0.2, seed=0)
    assert np.intersect1d(tr, va).size == 0
    assert np.union1d(tr, va).tolist() == list(range(y.size))
    assert np.bincount(y[va]).tolist() == [10, 6, 1]
    tr2, va2 = stratified_split(y, 0.2, seed=0)
    assert np.array_equal(va, va2)
    assert not np.array_equal(va, stratified_split(y, 0.2, seed=1)[1])
    # a singleton class stays in train
    tr, va = stratified_split(np.array([0, 0, 0, 0, 0, 1]), 0.5, seed=0)
    assert 5 in tr
    with pytest.raises(ConfigError):
        stratified_split(y, 1.0)
    with pytest.raises(MetricInputError):
        stratified_split(np.array([0, 1]), 0.2)


def test_linear_probe_degenerate_inputs():
    x, y = _blobs(100, 4, 2, seed=0)
    with pytest.raises(MetricInputError, match="train_y"):
        linear_probe(x, np.zeros(100), x, y)
    bad = x.copy()
    bad[3, 1] = np.nan
    with pytest.raises(MetricInputError, match="NaN"):
        linear_probe(bad, y, x, y)
    with pytest.raises(MetricInputError, match="features"):
        linear_probe(x, y, x[:, :3], y)
    with pytest.raises(MetricInputError, match="entries"):
        linear_probe(x, y[:50], x, y)
    with pytest.raises(ConfigError):
        linear_probe(x, y, x, y, c_grid=[0.0, 1.0])
    with pytest.raises(ConfigError):
        linear_probe(x, y, x, y, val_fraction=0.0)
    with pytest.raises(ConfigError):
        LinearProbe(-1.0).fit(x, y)
    with pytest.raises(ConfigError, match="not fitted"):
        LinearProbe().predict(x)
    # test classes never seen in training count as errors, with a warning
    with pytest.warns(RuntimeWarning, match="absent"):
        res = linear_probe(x, y, x, np.where(np.arange(100) < 10, 5, y))
    assert res.test_accuracy <= 0.9 + 1e-12


def test_linear_probe_constant_feature_and_inference_mode():
    x, y = _blobs(300, 5, 3, seed=4)
    x[:, 2] = 1.5  # zero variance: only centred
    with torch.inference_mode():
        res = linear_probe(torch.as_tensor(x), torch.as_tensor(y), torch.as_tensor(x),
                           torch.as_tensor(y))
    assert 0.0 <= res.test_accuracy <= 1.0 and math.isfinite(res.best_c)


def test_convergence_warning_on_max_iter():
    x, y = _blobs(300, 5, 3, seed=6)
    with pytest.warns(probes.ProbeConvergenceWarning):
        linear_probe(x, y, x, y, c_grid=[100.0], max_iter=2, tol=1e-12)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_linear_probe_on_cuda_matches_cpu():
    x, y = _blobs(800, 16, 4, seed=7)
    cpu = linear_probe(x[:600], y[:600], x[600:], y[600:])
    tx, ty = torch.as_tensor(x).cuda(), torch.as_tensor(y).cuda()
    gpu = linear_probe(tx[:600], ty[:600], tx[600:], ty[600:])
    assert abs(gpu.test_accuracy - cpu.test_accuracy) <= 0.01


def _knn_reference(xtr, ytr, xte, k, t):
    preds = []
    for q in xte:
        sims = [float(q @ p / (np.linalg.norm(q) * np.linalg.norm(p))) for p in xtr]
        order = sorted(range(len(sims)), key=lambda j: -sims[j])[:k]
        votes: dict[int, float] = {}
        for j in order:
            votes[int(ytr[j])] = votes.get(int(ytr[j]), 0.0) + math.exp(sims[j] / t)
        top = max(votes.values())
        preds.append(min(c for c, v in votes.items() if v == top))
    return np.array(preds)


@pytest.mark.parametrize("k,t,batch", [(5, 0.1, 3), (1, 0.07, None), (50, 0.5, 4)])
def test_knn_matches_explicit_loop(k, t, batch):
    rng = np.random.default_rng(k)
    xtr, xte = rng.normal(size=(30, 6)), rng.normal(size=(12, 6))
    ytr, yte = rng.integers(0, 3, 30) * 10, rng.integers(0, 3, 12) * 10
    ref = _knn_reference(xtr, ytr, xte, min(k, 30), t)
    pred = knn_predict(xtr, ytr, xte, k=k, temperature=t, batch_size=batch).numpy()
    assert np.array_equal(pred, ref)
    assert knn_probe(xtr, ytr, xte, yte, k=k, temperature=t,
                     batch_size=batch) == pytest.approx((ref == yte).mean())


def test_knn_errors_and_scale_invariance():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(40, 5)), rng.integers(0, 4, 40)
    assert knn_probe(x, y, x * 7.0, y) == knn_probe(x, y, x, y)  # cosine: scale-free
    with pytest.raises(ConfigError):
        knn_probe(x, y, x, y, k=0)
    with pytest.raises(ConfigError):
        knn_probe(x, y, x, y, temperature=0.0)
    with pytest.raises(MetricInputError):
        knn_probe(x, y, x[:, :3], y)


def _view(seed: int = 0) -> EpochView:
    x, y = _blobs(500, 16, 3, seed=seed)
    rng = np.random.default_rng(seed)
    colour = (x[:, 0] > 3).astype(np.int64)
    pos = rng.integers(0, 4, 500)
    t = torch.as_tensor
    factors = {"colour": t(colour), "pos": t(pos)}
    train = FeatureSplit(t(x[:400]), t(y[:400]), {k: v[:400] for k, v in factors.items()})
    test = FeatureSplit(t(x[400:]), t(y[400:]), {k: v[400:] for k, v in factors.items()})
    return EpochView(epoch=3, train=train, test=test, seed=1)


def test_registered_probe_adapters():
    from dtprobe.metrics.registry import _REGISTRY

    assert _REGISTRY["probe_accuracy"].default and not _REGISTRY["knn_accuracy"].default
    view = _view()
    rows = _REGISTRY["probe_accuracy"].func(view)
    assert [r.task for r in rows] == ["colour", "pos"]
    for r in rows:
        assert r.metric == "probe_accuracy" and r.estimator == "logreg-lbfgs"
        assert {"protocol", "grid_size", "val_fraction", "standardize"} <= set(r.params)
        assert r.params["protocol"] == "kornblith2019" and r.params["grid_size"] == 45
        assert {"C", "val_accuracy", "val_log_loss", "converged"} <= set(r.diagnostics)
        assert 0.0 <= r.value <= 1.0
    direct = linear_probe(view.train.features, view.train.factors["colour"],
                          view.test.features, view.test.factors["colour"], seed=1)
    assert rows[0].value == direct.test_accuracy and rows[0].diagnostics["C"] == direct.best_c
    assert rows[0].value > 0.9  # colour is a linear function of feature 0
    knn_rows = _REGISTRY["knn_accuracy"].func(view)
    assert [r.task for r in knn_rows] == ["colour", "pos"]
    assert all(0.0 <= r.value <= 1.0 for r in knn_rows)
    del view.test.factors["pos"]
    with pytest.raises(MetricInputError, match="pos"):
        _REGISTRY["probe_accuracy"].func(view)


def test_default_grid_documented_values():
    assert len(probes.KORNBLITH_C_GRID) == 45
    assert probes.KORNBLITH_C_GRID[0] == pytest.approx(1e-6)
    assert probes.KORNBLITH_C_GRID[-1] == pytest.approx(1e5)
    # the papers' protocol is the default; the short sweep is a named option
    assert probes.DEFAULT_C_GRID == probes.KORNBLITH_C_GRID
    assert probes.PROBE_PROTOCOLS["kornblith2019"]["patience"] is None
    assert len(probes.SHORT_C_GRID) == 9 and probes.PROBE_PROTOCOLS["short"]["patience"] == 3
    assert probes.SHORT_C_GRID[0] == pytest.approx(1e-3)
    assert probes.SHORT_C_GRID[-1] == pytest.approx(10.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        x, y = _blobs(300, 5, 3, seed=8)
        res = linear_probe(x[:200], y[:200], x[200:], y[200:])
        short = linear_probe(x[:200], y[:200], x[200:], y[200:], protocol="short")
    assert res.grid == probes.KORNBLITH_C_GRID and len(res.val_accuracy) == 45
    assert res.protocol == "kornblith2019" and short.protocol == "short"
    assert short.grid == probes.SHORT_C_GRID
    with pytest.raises(ConfigError, match="protocol"):
        linear_probe(x[:200], y[:200], x[200:], y[200:], protocol="long")


# ------------------------------------------------------------------ round-off stalls (issue 16)


def _n_below_d_case(seed: int, n: int = 150, d: int = 400, k: int = 2, m: int = 300,
                    sep: float = 6.0):
    """Post-ReLU-like features with n < d: the float32 sweep once stalled at C = 1e-6 here."""
    rng = np.random.default_rng(seed)
    mu = rng.normal(size=(k, d)) * sep / np.sqrt(d) * 3
    y, yt = rng.integers(0, k, n), rng.integers(0, k, m)
    x = np.maximum(mu[y] + rng.normal(size=(n, d)) + 0.5, 0) * 3 + 1
    xt = np.maximum(mu[yt] + rng.normal(size=(m, d)) + 0.5, 0) * 3 + 1
    return x, y, xt, yt


def _sklearn_protocol(x, y, xt, yt, grid, seed=0):
    """The Kornblith protocol with scikit-learn, cold float64 fits solved to tol 1e-10."""
    fit, val = stratified_split(y, 0.2, seed)
    xf, xv = _standardise(x[fit], x[fit], x[val])
    accs = {}
    for c in grid:
        clf = LogisticRegression(C=c, tol=1e-10, max_iter=20000).fit(xf, y[fit])
        accs[c] = clf.score(xv, y[val])
    best = max(grid, key=lambda c: (accs[c], -c))
    xa, xte = _standardise(x, x, xt)
    clf = LogisticRegression(C=best, tol=1e-10, max_iter=20000).fit(xa, y)
    return best, accs, clf.score(xte, yt)


def test_float32_round_off_stall_is_not_reported_as_convergence():
    x, y, _, _ = _n_below_d_case(2)
    (xs,) = _standardise(x, x)
    # (C = 0.1: at C = 1e-6 the cold start, zero weights and the log class frequencies as
    # bias, is already within 1e-4 of the optimum, so nothing stalls there)
    probe = LinearProbe(0.1, dtype=torch.float32, tol=1e-4).fit(xs, y)
    ref = LinearProbe(0.1, dtype=torch.float64, tol=1e-4).fit(xs, y)
    assert ref.converged_ and ref.grad_max_ <= 1e-4
    # float32 cannot resolve a gradient below ~3.5e-4 by line searches on loss values: its
    # stop counts as convergence only at that floor, never on a loss that stopped changing
    # (the old solver once reported 1e-3 as converged here)
    assert probe.n_iter_ < probe.max_iter
    assert probe.converged_ == (probe.grad_max_ <= 3.5e-4)
    assert probe.grad_max_ > 1e-4


@pytest.mark.parametrize("seed", [2])
def test_linear_probe_never_chooses_c_on_a_stalled_float32_solution(seed):
    x, y, xt, yt = _n_below_d_case(seed)
    grid = KORNBLITH_C_GRID
    res = linear_probe(x, y, xt, yt, c_grid=grid, patience=None)
    exact = linear_probe(x, y, xt, yt, c_grid=grid, patience=None, sweep_dtype=None)
    best, sk_val, sk_test = _sklearn_protocol(x, y, xt, yt, grid)
    # the float32 sweep is verified in float64, so it reproduces the float64 path exactly
    assert res.best_c == exact.best_c
    assert res.test_accuracy == exact.test_accuracy
    assert res.converged and all(res.sweep_converged.values())
    # and scikit-learn's protocol (seed 2 once gave C = 1e-6 and 0.517 against 1.000 here)
    assert res.test_accuracy == pytest.approx(sk_test, abs=0.01)
    assert res.val_accuracy[res.best_c] == pytest.approx(sk_val[res.best_c], abs=0.02)


def test_emulated_gpu_precisions_are_verified_the_same_way():
    # CUDA runs the sweep in float32 and verifies in float64: the same code path as
    # sweep_dtype=float32 on the CPU
    x, y, xt, yt = _n_below_d_case(2)
    res = linear_probe(x, y, xt, yt, c_grid=KORNBLITH_C_GRID, patience=None,
                       sweep_dtype=torch.float32)
    exact = linear_probe(x, y, xt, yt, c_grid=KORNBLITH_C_GRID, patience=None, sweep_dtype=None)
    assert (res.best_c, res.test_accuracy) == (exact.best_c, exact.test_accuracy)


def test_unconverged_probe_says_so():
    # max_iter=6: the refit stops above tol; the number is unverified and the warning says so
    x, y, xt, yt = _n_below_d_case(2, k=2)
    with pytest.warns(ProbeConvergenceWarning, match="unverified"):
        res = linear_probe(x, y, xt, yt, max_iter=6)
    assert not res.converged
    assert not all(res.sweep_converged.values())


def test_unchosen_unconverged_sweep_fits_do_not_alarm():
    # max_iter=7: one sweep fit (not the chosen C) stops early; the chosen fit and the refit
    # converge.  That is recorded, and said once per process, not once per probe (also when
    # something else resets the warning filters between probes, as an analysis does).
    x, y, xt, yt = _n_below_d_case(3, k=2)
    probes._SWEEP_NOTE_SHOWN.clear()  # (another test may have shown it in this process)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        for _ in range(3):
            res = linear_probe(x, y, xt, yt, max_iter=7)
            warnings.resetwarnings()
            warnings.simplefilter("default")
    assert res.converged and res.sweep_converged[res.best_c]
    assert not all(res.sweep_converged.values())
    assert [type(w.message) for w in caught] == [ProbeSweepConvergenceWarning]
    assert issubclass(ProbeSweepConvergenceWarning, ProbeConvergenceWarning)


def test_accuracy_interval_is_wilsons():
    from scipy.stats import binomtest

    for k, n in [(0, 10), (3, 10), (10, 10), (512, 1000), (999, 1000)]:
        low, high = accuracy_interval(k / n, n)
        ref = binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
        assert (low, high) == pytest.approx((ref.low, ref.high), abs=1e-12)
    assert all(math.isnan(v) for v in accuracy_interval(0.5, 0))


def test_source_accuracy_row_carries_wilsons_interval():
    """The source head's accuracy carries the same interval as every probe accuracy."""
    from scipy.stats import binomtest

    from dtprobe.metrics.accuracy import CI_METHOD
    from dtprobe.metrics.registry import EpochView, FeatureSplit, available_metrics

    rng = np.random.default_rng(0)
    labels = rng.integers(0, 4, 250)
    logits = rng.standard_normal((250, 4))
    logits[np.arange(250)[:170], labels[:170]] += 10.0  # 170 right by construction, +chance
    split = FeatureSplit(torch.zeros(250, 2), torch.as_tensor(labels),
                         logits=torch.as_tensor(logits))
    (row,) = available_metrics()["source_accuracy"].func(EpochView(epoch=1, train=split,
                                                                    test=split))
    hits = int((logits.argmax(axis=1) == labels).sum())
    assert row.value == hits / 250
    ref = binomtest(hits, 250).proportion_ci(confidence_level=0.95, method="wilson")
    assert (row.diagnostics["ci_low"], row.diagnostics["ci_high"]) == pytest.approx(
        (ref.low, ref.high), abs=1e-12)
    assert row.diagnostics["n_test"] == 250 and row.params["ci_method"] == CI_METHOD
