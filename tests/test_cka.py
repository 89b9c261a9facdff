"""Tests for dtprobe.metrics.cka against slow references written from the definitions.

References used here: explicit n x n Grams with H = I - 11^T/n (Kornblith et al. 2019)
and the unbiased HSIC_1 formula of Song et al. (2012), all in float64 numpy.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dtprobe.errors import ConfigError, MetricInputError
from dtprobe.metrics.cka import MinibatchCKA, _normalise, cka_matrix, linear_cka, rbf_cka

RTOL = 1e-6


# ----------------------------------------------------------------------------- references


def ref_hsic(k: np.ndarray, l_: np.ndarray) -> float:
    """Biased HSIC: tr(K H L H) / (n-1)^2."""
    n = k.shape[0]
    h = np.eye(n) - np.ones((n, n)) / n
    return float(np.trace(k @ h @ l_ @ h)) / (n - 1) ** 2


def ref_hsic1(k: np.ndarray, l_: np.ndarray) -> float:
    """Unbiased HSIC_1 of Song et al. (2012), written out with explicit matrices."""
    n = k.shape[0]
    kt, lt = k.copy(), l_.copy()
    np.fill_diagonal(kt, 0.0)
    np.fill_diagonal(lt, 0.0)
    one = np.ones(n)
    # tr(K~ L~) = sum(K~ * L~) and 1^T K~ L~ 1 = (K~ 1).(L~ 1) for symmetric Grams.
    return float(((kt * lt).sum() + (one @ kt @ one) * (one @ lt @ one) / ((n - 1) * (n - 2))
                  - 2.0 / (n - 2) * ((kt @ one) @ (lt @ one))) / (n * (n - 3)))


def ref_cka(k: np.ndarray, l_: np.ndarray, debiased: bool = False) -> float:
    f = ref_hsic1 if debiased else ref_hsic
    return f(k, l_) / np.sqrt(f(k, k) * f(l_, l_))


def ref_linear_cka_centred_gram(x: np.ndarray, y: np.ndarray) -> float:
    """Biased linear CKA from the explicit centred Grams (H X)(H X)^T, H = I - 11^T/n."""
    n = x.shape[0]
    h = np.eye(n) - np.ones((n, n)) / n
    hx, hy = h @ np.asarray(x, np.float64), h @ np.asarray(y, np.float64)
    k, l_ = hx @ hx.T, hy @ hy.T
    return float((k * l_).sum() / np.sqrt((k * k).sum() * (l_ * l_).sum()))


def lin(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return x @ x.T


def rbf(x: np.ndarray, frac: float) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    sq = ((x[:, None, :] - x[None, :, :]) ** 2).sum(-1)
    return np.exp(-sq / (2 * frac**2 * np.median(sq)))


def oracle_data() -> tuple[np.ndarray, np.ndarray]:
    np.random.seed(1337)
    x = np.random.randn(100, 10)
    y = np.random.randn(100, 10) + x
    return x, y


def offset_relu(seed: int, n: int = 2000, d: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """float32 ReLU features with a large offset: the 'float32 Gram without centring' trap."""
    rng = np.random.default_rng(seed)
    x = np.maximum(rng.standard_normal((n, d)), 0) + 100.0
    y = np.maximum((x - 100.0) @ rng.standard_normal((d, d)) + rng.standard_normal((n, d)), 0)
    return x.astype(np.float32), (y + 100.0).astype(np.float32)


# ----------------------------------------------------------------------------- oracle values


def test_design_oracle_values():
    x, y = oracle_data()
    assert linear_cka(x, y) == pytest.approx(0.55761, abs=1e-5)
    assert linear_cka(x, y, debiased=True) == pytest.approx(0.51346, abs=1e-5)
    assert rbf_cka(x, y, sigma_frac=0.5) == pytest.approx(0.65483, abs=1e-5)
    assert cka_matrix([x, y])[0, 1] == pytest.approx(0.55761, abs=1e-5)
    assert cka_matrix([x, y], debiased=True)[0, 1] == pytest.approx(0.51346, abs=1e-5)


# ----------------------------------------------------------------------------- vs references


@pytest.mark.parametrize("n,d1,d2", [(60, 5, 7), (30, 80, 50), (9, 3, 200)])
@pytest.mark.parametrize("method", ["auto", "features", "gram"])
@pytest.mark.parametrize("debiased", [False, True])
def test_linear_cka_matches_explicit_gram(n, d1, d2, method, debiased):
    rng = np.random.default_rng(n * 1000 + d1)
    x = rng.standard_normal((n, d1)) + 3.0
    y = np.tanh(x[:, : min(d1, d2)] @ rng.standard_normal((min(d1, d2), d2))) \
        + 0.5 * rng.standard_normal((n, d2))
    want = ref_cka(lin(x), lin(y), debiased)
    assert linear_cka(x, y, debiased, method=method) == pytest.approx(want, rel=RTOL)
    assert linear_cka(x, y, debiased, method=method, chunk=7) == pytest.approx(want, rel=RTOL)


@pytest.mark.parametrize("debiased", [False, True])
@pytest.mark.parametrize("frac", [0.5, 1.0, 2.0])
def test_rbf_cka_matches_explicit_gram(debiased, frac):
    rng = np.random.default_rng(7)
    x = rng.standard_normal((41, 6))
    y = np.sin(x @ rng.standard_normal((6, 3))) + 0.3 * rng.standard_normal((41, 3))
    want = ref_cka(rbf(x, frac), rbf(y, frac), debiased)
    assert rbf_cka(x, y, sigma_frac=frac, debiased=debiased) == pytest.approx(want, rel=RTOL)


def test_torch_inputs_match_numpy():
    x, y = oracle_data()
    tx, ty = torch.from_numpy(x).float(), torch.from_numpy(y).float()
    for debiased in (False, True):
        want = ref_cka(lin(tx.double().numpy()), lin(ty.double().numpy()), debiased)
        assert linear_cka(tx, ty, debiased) == pytest.approx(want, rel=RTOL)
        assert cka_matrix([tx, ty], debiased)[0, 1] == pytest.approx(want, rel=RTOL)
    want = ref_cka(rbf(tx.double().numpy(), 0.5), rbf(ty.double().numpy(), 0.5))
    assert rbf_cka(tx, ty) == pytest.approx(want, rel=RTOL)


# ----------------------------------------------------------------------------- cka_matrix


@pytest.mark.parametrize("debiased", [False, True])
@pytest.mark.parametrize("method,chunk", [("auto", None), ("features", 11), ("gram", 11),
                                          ("gram", None)])
def test_cka_matrix_equals_pairwise(debiased, method, chunk):
    rng = np.random.default_rng(3)
    base = rng.standard_normal((50, 6))
    layers = [base, base @ rng.standard_normal((6, 9)), np.maximum(base, 0) + 5.0,
              rng.standard_normal((50, 4)), torch.from_numpy(np.tanh(base[:, :2]))]
    got = cka_matrix(layers, debiased=debiased, chunk=chunk, method=method)
    assert got.shape == (5, 5)
    np.testing.assert_array_equal(got, got.T)
    np.testing.assert_array_equal(np.diag(got), np.ones(5))
    for i in range(5):
        for j in range(5):
            want = ref_cka(lin(np.asarray(layers[i])), lin(np.asarray(layers[j])), debiased)
            assert got[i, j] == pytest.approx(want, rel=RTOL)
            if i < j:
                assert linear_cka(layers[i], layers[j], debiased) == pytest.approx(got[i, j],
                                                                                   rel=RTOL)


# ----------------------------------------------------------------------------- float32 offset


def test_float32_offset_relu_features_give_float64_answer():
    x, y = offset_relu(0)
    x64, y64 = x.astype(np.float64), y.astype(np.float64)
    want = ref_linear_cka_centred_gram(x64, y64)
    want_deb = ref_cka(lin(x64), lin(y64), debiased=True)
    # The trap is real: a float32 Gram of the raw features, centred afterwards, is far off.
    k32 = x @ x.T
    l32 = y @ y.T
    kc = k32 - k32.mean(0, keepdims=True) - k32.mean(1, keepdims=True) + k32.mean()
    lc = l32 - l32.mean(0, keepdims=True) - l32.mean(1, keepdims=True) + l32.mean()
    naive = float((kc * lc).sum() / np.sqrt((kc * kc).sum() * (lc * lc).sum()))
    assert abs(naive - want) > 1e-3
    for xin, yin in ((x, y), (torch.from_numpy(x), torch.from_numpy(y))):
        assert linear_cka(xin, yin) == pytest.approx(want, abs=1e-5)
        assert linear_cka(xin, yin, method="gram", chunk=512) == pytest.approx(want, abs=1e-5)
        assert linear_cka(xin, yin, debiased=True) == pytest.approx(want_deb, abs=1e-5)
        got = cka_matrix([xin, yin], chunk=300)
        assert got[0, 1] == pytest.approx(want, abs=1e-5)
    acc = MinibatchCKA()
    per_batch = []
    for b in range(0, 2000, 500):
        acc.update(x[b:b + 500], torch.from_numpy(y[b:b + 500]))
        xb, yb = x64[b:b + 500], y64[b:b + 500]
        per_batch.append((ref_hsic1(lin(xb), lin(yb)), ref_hsic1(lin(xb), lin(xb)),
                          ref_hsic1(lin(yb), lin(yb))))
    xy, xx, yy = np.mean(per_batch, axis=0)
    assert acc.result() == pytest.approx(xy / np.sqrt(xx * yy), abs=1e-5)


# ----------------------------------------------------------------------------- minibatch CKA


def test_minibatch_cka_averages_every_batch():
    rng = np.random.default_rng(11)
    x = rng.standard_normal((130, 5))
    y = x @ rng.standard_normal((5, 4)) + rng.standard_normal((130, 4))
    x[:40] *= 4.0  # batches differ, so the last batch alone gives a different answer
    bounds = [(0, 40), (40, 77), (77, 130)]  # unequal batch sizes
    acc = MinibatchCKA()
    sums = np.zeros(3)
    for b0, b1 in bounds:
        acc.update(x[b0:b1], y[b0:b1])
        kx, ky = lin(x[b0:b1]), lin(y[b0:b1])
        sums += [ref_hsic1(kx, ky), ref_hsic1(kx, kx), ref_hsic1(ky, ky)]
    want = sums[0] / np.sqrt(sums[1] * sums[2])
    assert acc.result() == pytest.approx(want, rel=RTOL)
    assert acc.score() == acc.result()
    assert acc.n_batches_ == 3 and acc.n_samples_ == 130
    last = ref_cka(lin(x[77:]), lin(y[77:]), debiased=True)
    assert abs(last - want) > 1e-3
    np.testing.assert_allclose(acc.hsic_, [[sums[1], sums[0]], [sums[0], sums[2]]], rtol=RTOL)
    acc.reset()
    with pytest.raises(MetricInputError, match="before any update"):
        acc.result()


def test_minibatch_cka_lists_of_layers():
    rng = np.random.default_rng(5)
    xs = [rng.standard_normal((90, 4)) for _ in range(3)]
    ys = [xs[0] @ rng.standard_normal((4, 6)), xs[1] + 0.1 * rng.standard_normal((90, 4))]
    cross, self_mode = MinibatchCKA(), MinibatchCKA()
    for b0, b1 in [(0, 30), (30, 60), (60, 90)]:
        cross.update([t[b0:b1] for t in xs], [t[b0:b1] for t in ys])
        self_mode.update([t[b0:b1] for t in xs])
    got = cross.result()
    assert got.shape == (3, 2)
    mat = self_mode.result()
    assert mat.shape == (3, 3)
    np.testing.assert_array_equal(np.diag(mat), np.ones(3))
    np.testing.assert_allclose(mat, mat.T)
    for i in range(3):
        for j in range(2):
            single = MinibatchCKA()
            for b0, b1 in [(0, 30), (30, 60), (60, 90)]:
                single.update(xs[i][b0:b1], ys[j][b0:b1])
            assert got[i, j] == pytest.approx(single.result(), rel=RTOL)
        for j in range(3):
            s = np.zeros(3)
            for b0, b1 in [(0, 30), (30, 60), (60, 90)]:
                ki, kj = lin(xs[i][b0:b1]), lin(xs[j][b0:b1])
                s += [ref_hsic1(ki, kj), ref_hsic1(ki, ki), ref_hsic1(kj, kj)]
            assert mat[i, j] == pytest.approx(s[0] / np.sqrt(s[1] * s[2]), rel=RTOL)


def test_minibatch_cka_rejects_bad_batches():
    rng = np.random.default_rng(0)
    acc = MinibatchCKA()
    with pytest.raises(MetricInputError, match="at least 4"):
        acc.update(rng.standard_normal((3, 2)), rng.standard_normal((3, 2)))
    acc.update(rng.standard_normal((8, 2)), rng.standard_normal((8, 2)))
    with pytest.raises(MetricInputError, match="reset"):
        acc.update(rng.standard_normal((8, 3)), rng.standard_normal((8, 2)))
    with pytest.raises(MetricInputError, match="same samples"):
        acc.update(rng.standard_normal((8, 2)), rng.standard_normal((7, 2)))
    with pytest.raises(MetricInputError):
        acc.update("not an array")


# ----------------------------------------------------------------------------- properties


def _random_orthogonal(rng: np.random.Generator, d: int) -> np.ndarray:
    q, r = np.linalg.qr(rng.standard_normal((d, d)))
    return q * np.sign(np.diag(r))


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), n=st.integers(6, 40), d=st.integers(1, 12),
       scale=st.floats(1e-3, 1e3))
def test_invariances(seed, n, d, scale):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d))
    y = np.tanh(x @ rng.standard_normal((d, 3))) + rng.standard_normal((n, 3))
    q = _random_orthogonal(rng, d)
    xt = scale * x @ q + 7.0  # orthogonal map, isotropic scaling and a shift
    for debiased in (False, True):
        base = linear_cka(x, y, debiased)
        assert linear_cka(xt, y, debiased) == pytest.approx(base, rel=1e-6, abs=1e-9)
        assert linear_cka(x, x, debiased) == pytest.approx(1.0, rel=1e-9)
        assert linear_cka(xt, x, debiased) == pytest.approx(1.0, rel=1e-6)
    base = rbf_cka(x, y)
    assert rbf_cka(xt, y) == pytest.approx(base, rel=1e-6, abs=1e-9)
    assert rbf_cka(x, x) == pytest.approx(1.0, rel=1e-9)


# ----------------------------------------------------------------------------- degenerate input


def test_constant_representation_gives_nan_with_warning():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((20, 3))
    const = np.full((20, 4), 3.7, dtype=np.float32)
    for debiased in (False, True):
        with pytest.warns(RuntimeWarning, match="constant"):
            assert np.isnan(linear_cka(x, const, debiased))
    with pytest.warns(RuntimeWarning, match="constant"):
        mat = cka_matrix([x, const, x + 1.0])
    assert np.isnan(mat[1]).all() and np.isnan(mat[:, 1]).all()
    assert mat[0, 2] == pytest.approx(1.0)
    acc = MinibatchCKA().update(x[:10], const[:10]).update(x[10:], const[10:])
    with pytest.warns(RuntimeWarning, match="constant"):
        assert np.isnan(acc.result())
    with pytest.warns(RuntimeWarning, match="median pairwise distance"):
        assert np.isnan(rbf_cka(x, const))


def test_negative_self_hsic_gives_nan_not_sqrt_error():
    hsic = torch.tensor([[2.0, 0.5, 0.1], [0.5, -0.3, 0.2], [0.1, 0.2, 1.0]], dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no numpy 'invalid value in sqrt'
        with pytest.raises(RuntimeWarning, match="HSIC_1 <= 0"):
            _normalise(hsic, ["a", "b", "c"], [False] * 3, True, 2)
    with pytest.warns(RuntimeWarning, match="HSIC_1 <= 0"):
        out = _normalise(hsic, ["a", "b", "c"], [False] * 3, True, 2)
    assert np.isnan(out[1]).all() and np.isnan(out[:, 1]).all()
    assert out[0, 2] == pytest.approx(0.1 / np.sqrt(2.0))
    assert out[0, 0] == 1.0 and out[2, 2] == 1.0


def test_invalid_inputs_raise():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((10, 3))
    bad = x.copy()
    bad[2, 1] = np.nan
    with pytest.raises(MetricInputError, match="NaN/Inf in 1 of 10 rows"):
        linear_cka(x, bad)
    with pytest.raises(MetricInputError, match="NaN/Inf"):
        cka_matrix([x, x, torch.from_numpy(bad)])
    with pytest.raises(MetricInputError, match="NaN/Inf"):
        rbf_cka(bad, x)
    with pytest.raises(MetricInputError, match="same inputs"):
        linear_cka(x, x[:9])
    with pytest.raises(MetricInputError, match="same inputs"):
        rbf_cka(x, x[:9])
    with pytest.raises(MetricInputError, match="at least 4"):
        linear_cka(x[:3], x[:3], debiased=True)
    with pytest.raises(MetricInputError, match="2-D"):
        linear_cka(np.zeros((4, 2, 2)), np.zeros((4, 2)))
    with pytest.raises(MetricInputError, match="empty"):
        cka_matrix([])
    with pytest.raises(ConfigError, match="method"):
        linear_cka(x, x, method="fast")
    with pytest.raises(ConfigError, match="chunk"):
        cka_matrix([x, x], chunk=0)
    with pytest.raises(ConfigError, match="sigma_frac"):
        rbf_cka(x, x, sigma_frac=0.0)
