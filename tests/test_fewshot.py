"""Few-shot transfer (dtprobe.metrics.fewshot): float64 references written from the definitions,
scikit-learn's RidgeClassifier(CV) / NearestCentroid, big_vision's closed form, the hash draws,
bad input, and the rows of a downstream analysis."""

from __future__ import annotations

import hashlib
import json
import warnings

import numpy as np
import pytest
import torch

from dtprobe.errors import MetricInputError
from dtprobe.metrics.fewshot import (
    RIDGE_RATIOS,
    FewShotRidge,
    NearestClassMean,
    draw_shots,
    fewshot_accuracy,
    fewshot_metric_name,
)
from dtprobe.metrics.registry import EpochView, FeatureSplit, available_metrics


def _blobs(n: int, d: int, c: int, seed: int = 0, sep: float = 1.0):
    rng = np.random.default_rng(seed)
    means = rng.normal(size=(c, d)) * sep
    y = np.arange(n) % c
    rng.shuffle(y)
    return means[y] + rng.normal(size=(n, d)) * rng.uniform(0.5, 2.0, size=d), y


def _standardise(x):
    mean, std = x.mean(axis=0), x.std(axis=0) + 1e-5
    return (x - mean) / std, mean, std


def _ridge_reference(xs, targets, lam):
    """Ridge with an unpenalised intercept by its normal equations on [X, 1] (float64)."""
    n, d = xs.shape
    a = np.hstack([xs, np.ones((n, 1))])
    pen = lam * np.eye(d + 1)
    pen[d, d] = 0.0
    return np.linalg.solve(a.T @ a + pen, a.T @ targets)  # (d + 1, C): weights, intercept


def _loo_reference(xs, targets, lam):
    """Leave-one-out squared error by refitting n times (the definition)."""
    n = len(xs)
    err = 0.0
    for i in range(n):
        keep = np.arange(n) != i
        w = _ridge_reference(xs[keep], targets[keep], lam)
        pred = np.append(xs[i], 1.0) @ w
        err += float(np.sum((targets[i] - pred) ** 2))
    return err / n


@pytest.mark.parametrize("n, d", [(15, 40), (60, 8)])  # n <= d (Gram) and n > d (covariance)
def test_ridge_fit_and_leave_one_out_equal_the_definition(n, d):
    x, y = _blobs(n, d, 3, seed=n)
    ratios = (1e-2, 1e-1, 1.0, 10.0)
    model = FewShotRidge(ratios).fit(x, y)
    xs, _, _ = _standardise(x)
    targets = 2.0 * np.eye(3)[y] - 1.0
    for lam, mse in zip(model.alphas_, model.loo_mse_, strict=True):
        assert mse == pytest.approx(_loo_reference(xs, targets, lam), rel=1e-9)
    w = _ridge_reference(xs, targets, model.alpha_)
    x_new, _ = _blobs(20, d, 3, seed=99)
    xs_new = (x_new - x.mean(axis=0)) / (x.std(axis=0) + 1e-5)
    np.testing.assert_allclose(model.decision_function(x_new), xs_new @ w[:-1] + w[-1],
                               rtol=1e-9, atol=1e-10)
    assert model.alpha_ == model.alphas_[int(np.argmin(model.loo_mse_))]


@pytest.mark.parametrize("n, d, c", [(20, 50, 4), (120, 10, 4), (30, 12, 2)])
def test_ridge_agrees_with_sklearn_ridgeclassifier_cv(n, d, c):
    from sklearn.linear_model import RidgeClassifier, RidgeClassifierCV

    x, y = _blobs(n, d, c, seed=d)
    x_test, _ = _blobs(200, d, c, seed=d + 1)
    model = FewShotRidge().fit(x, y)
    xs, mean, std = _standardise(x)
    cv = RidgeClassifierCV(alphas=model.alphas_).fit(xs, y)
    assert cv.alpha_ == pytest.approx(model.alpha_, rel=1e-12)
    ref = RidgeClassifier(alpha=model.alpha_).fit(xs, y)
    xt = (x_test - mean) / std
    np.testing.assert_array_equal(model.predict(x_test), ref.predict(xt))
    dec = model.decision_function(x_test)
    if c == 2:  # sklearn keeps one column for two classes: ours are its +-
        np.testing.assert_allclose(dec[:, 1], ref.decision_function(xt), atol=1e-9)
        np.testing.assert_allclose(dec[:, 0], -ref.decision_function(xt), atol=1e-9)
    else:
        np.testing.assert_allclose(dec, ref.decision_function(xt), atol=1e-9)


def test_ridge_matches_big_vision_closed_form_at_a_fixed_penalty():
    """big_vision's fewshot_lsr (read from its file): standardise (std + 1e-5), append a
    constant feature of 100 for the bias, targets 2 * one_hot - 1, solve through eigh of
    X X^T (D > N) with the penalty on every weight. The bias is then penalised by lam / 100^2
    per unit, so it agrees with the exact unpenalised intercept up to that small term."""
    x, y = _blobs(25, 64, 5, seed=3)
    x_test, _ = _blobs(300, 64, 5, seed=4)
    model = FewShotRidge(ratios=(0.1,)).fit(x, y)
    lam = model.alpha_
    xs, mean, std = _standardise(x)
    xb = np.hstack([xs, np.full((len(xs), 1), 100.0)])
    eigs, q = np.linalg.eigh(xb @ xb.T)
    w = (xb.T @ q) / (eigs + lam) @ (q.T @ (2.0 * np.eye(5)[y] - 1.0))
    xt = np.hstack([(x_test - mean) / std, np.full((len(x_test), 1), 100.0)])
    ref = xt @ w
    np.testing.assert_allclose(model.decision_function(x_test), ref, atol=2e-3)
    assert np.mean(model.predict(x_test) == np.argmax(ref, axis=1)) > 0.99


def test_ncm_equals_a_loop_and_sklearn_nearest_centroid():
    from sklearn.neighbors import NearestCentroid

    x, y = _blobs(40, 6, 4, seed=5)
    x_test, _ = _blobs(100, 6, 4, seed=6)
    model = NearestClassMean().fit(torch.from_numpy(x).float(), torch.from_numpy(y))
    xf = torch.from_numpy(x).float().double().numpy()
    means = np.stack([xf[y == k].mean(axis=0) for k in range(4)])
    loop = [int(np.argmin([np.sum((row - m) ** 2) for m in means])) for row in x_test]
    np.testing.assert_array_equal(model.predict(x_test), loop)
    np.testing.assert_array_equal(model.predict(x_test),
                                  NearestCentroid().fit(xf, y).predict(x_test))


def test_draws_follow_the_hash_rule_are_nested_and_ignore_order():
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(3), 12)
    ids = [f"img/{i:03d}.png" for i in range(36)]
    picked = draw_shots(ids, labels, 4, draw=2, seed=7)
    for c in range(3):  # the definition: the 4 smallest sha256("fewshot-7-2:" + id) per class
        members = [i for i in range(36) if labels[i] == c]
        key = sorted(members, key=lambda i: hashlib.sha256(
            f"fewshot-7-2:{ids[i]}".encode()).digest()[:8])[:4]
        assert sorted(key) == [i for i in picked if labels[i] == c]
    assert set(draw_shots(ids, labels, 1, draw=2, seed=7)) <= set(picked)  # nested
    perm = rng.permutation(36)
    again = draw_shots([ids[i] for i in perm], labels[perm], 4, draw=2, seed=7)
    assert sorted(ids[perm[i]] for i in again) == sorted(ids[i] for i in picked)
    assert set(draw_shots(ids, labels, 4, draw=3, seed=7)) != set(picked)


def test_fewshot_accuracy_mean_interval_and_recorded_draws():
    from scipy import stats

    x_all, y_all = _blobs(500, 20, 4, seed=8, sep=0.7)
    x, y, xt, yt = x_all[:300], y_all[:300], x_all[300:], y_all[300:]
    ids = [f"s{i}" for i in range(300)]
    out = fewshot_accuracy(x, y, xt, yt, ids, shots=(2, 10), draws=4, seed=1)
    for k in (2, 10):
        res = out[("ridge", k)]
        accs = []
        for j in range(4):
            p = draw_shots(ids, y, k, draw=j, seed=1)
            m = FewShotRidge(RIDGE_RATIOS).fit(x[p], y[p])
            accs.append(float(np.mean(m.predict(xt) == yt)))
        assert res.draw_accuracies == pytest.approx(accs)
        assert res.accuracy == pytest.approx(np.mean(accs))
        low, high = stats.t.interval(0.95, 3, loc=np.mean(accs), scale=stats.sem(accs))
        assert (res.ci_low, res.ci_high) == pytest.approx((low, high))
        assert len(res.draw_digests) == 4 and len(set(res.draw_digests)) == 4
        assert res.n_train == 4 * k
        assert out[("ncm", k)].accuracy > 0.5  # well above chance (0.25) on these blobs
    # features on torch (float32) give the same draws and accuracies up to rounding
    t_out = fewshot_accuracy(torch.from_numpy(x).float(), torch.from_numpy(y),
                             torch.from_numpy(xt).float(), torch.from_numpy(yt), ids,
                             shots=(10,), draws=4, seed=1)
    assert t_out[("ncm", 10)].draw_digests == out[("ncm", 10)].draw_digests
    assert t_out[("ncm", 10)].accuracy == pytest.approx(out[("ncm", 10)].accuracy, abs=0.02)


def test_bad_input_one_class_or_too_few_images_per_class():
    x, y = _blobs(30, 5, 3, seed=2)
    y[:] = np.where(y == 2, 1, y)
    y[0] = 2  # class 2 has one training image
    out = fewshot_accuracy(x, y, x, y, shots=(1, 5), draws=2)
    assert np.isfinite(out[("ridge", 1)].accuracy) and out[("ridge", 1)].error is None
    err = out[("ridge", 5)].error
    assert np.isnan(out[("ridge", 5)].accuracy) and "\n" not in err
    assert "class 2 has 1 training image(s), fewer than 5" in err
    with pytest.raises(MetricInputError, match="1 distinct class"):
        fewshot_accuracy(x, np.zeros(30, dtype=int), x, y, shots=(1,))
    bad = x.copy()
    bad[3, 1] = np.nan
    with pytest.raises(MetricInputError, match="training features contain NaN/Inf"):
        fewshot_accuracy(bad, y, x, y, shots=(1,))
    with pytest.raises(MetricInputError, match="test features contain NaN/Inf"):
        fewshot_accuracy(x, y, torch.from_numpy(bad), y, shots=(1,))


def _view(x, y, xt, yt, task="colour", **options):
    return EpochView(epoch=3, train=FeatureSplit(torch.from_numpy(x).float(),
                                                 torch.from_numpy(y), {task: torch.from_numpy(y)},
                                                 sample_ids=[f"a:{i}" for i in range(len(y))]),
                     test=FeatureSplit(torch.from_numpy(xt).float(), torch.from_numpy(yt),
                                       {task: torch.from_numpy(yt)}), seed=0, options=options)


def test_registered_rows_per_shot_with_settings_and_draws_recorded():
    x, y = _blobs(400, 8, 4, seed=3)
    registry = available_metrics()
    view = _view(x[:200], y[:200], x[200:], y[200:], fewshot_shots=(1, 3, 60), fewshot_draws=3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rows = registry["fewshot_ridge"].func(view)
    assert [r.metric for r in rows] == [fewshot_metric_name("ridge", k) for k in (1, 3, 60)]
    ok, failed = rows[1], rows[2]
    assert ok.params["shots"] == 3 and ok.params["draws"] == 3 and ok.task == "colour"
    assert len(ok.diagnostics["draw_ids_sha256"]) == 3 and len(ok.diagnostics["ridge_alphas"]) == 3
    assert ok.diagnostics["ci_low"] <= ok.value <= ok.diagnostics["ci_high"]
    assert np.isnan(failed.value) and "fewer than 60" in failed.diagnostics["error"]
    assert sum("fewer than 60" in str(w.message) for w in caught) == 1
    # one class in the task: every shot count's row is NaN with the reason, nothing raised
    one = _view(x[:200], np.zeros(200, dtype=np.int64), x[200:], y[200:], fewshot_shots=(1, 5))
    rows = registry["fewshot_ncm"].func(one)
    assert len(rows) == 2 and all(np.isnan(r.value) for r in rows)
    assert all("1 distinct class" in r.diagnostics["error"] for r in rows)


def test_downstream_analysis_writes_fewshot_rows_and_reuses_them(tmp_path):
    from dtprobe import analysis
    from dtprobe.training.trainer import TrainConfig, train

    run = tmp_path / "run"
    train(TrainConfig(out=str(run), dataset="shapes",
                      dataset_params={"n_train": 120, "n_test": 60, "image_size": 16},
                      arch="small_cnn", arch_params={"width": 4, "feature_dim": 16}, epochs=1,
                      batch_size=64, save_every=1, seed=0, device="cpu", progress=False))
    kw = dict(metrics=["source_accuracy"], device="cpu", progress=False, plot=False,
              downstream=["textures:n_train=80,n_test=40"],
              downstream_metrics=["fewshot_ridge", "fewshot_ncm"], fewshot_shots=(1, 5),
              fewshot_draws=2, layers=["auto"])
    res = analysis.analyze(run, **kw)
    t = res.table[res.table["task"] == "textures"]
    layered = t[t["layer"] != ""]  # --layers: the same rows on each block's pooled outputs
    assert len(layered) and set(layered["metric"]) == set(t["metric"])
    t = t[t["layer"] == ""]
    assert sorted(t["metric"].unique()) == sorted(
        fewshot_metric_name(c, k) for c in ("ridge", "ncm") for k in (1, 5))
    assert sorted(t["epoch"].unique()) == [0, 1] and t["value"].notna().all()
    diag = json.loads(t["diagnostics"].iloc[0])
    assert len(diag["draw_ids_sha256"]) == 2 and "chance" in diag
    assert all(json.loads(p)["downstream"].startswith("textures") for p in t["params"])
    again = analysis.analyze(run, **kw)
    assert again.stats.metrics_computed == 0
    other = analysis.analyze(run, **{**kw, "fewshot_draws": 3})  # a setting changes the key
    assert other.stats.metrics_computed > 0
