"""Scale-free metrics must be scale-free in floating point too.

Every metric here is invariant (in exact arithmetic) to multiplying the features by a positive
constant. Features of magnitude 1e-200 or 1e+200 are representable in float64, so the values
must match those at scale 1 to round-off: no NaN, no overflow, no spurious "constant" or
"all-zero" diagnosis (outside report, issue 16).
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from dtprobe.metrics import probes
from dtprobe.metrics.cka import MinibatchCKA, cka_matrix, linear_cka, rbf_cka
from dtprobe.metrics.collapse import neural_collapse
from dtprobe.metrics.information.ksg import ksg_mi
from dtprobe.metrics.separation import class_separation
from dtprobe.metrics.spectrum import rankme
from dtprobe.metrics.transferability import h_score

SCALES = [1e-300, 1e-200, 2.0**-600, 1e-20, 1e20, 2.0**600, 1e200, 1e300]


def _data(seed: int = 0, n: int = 120, d: int = 6, k: int = 3):
    rng = np.random.default_rng(seed)
    y = np.arange(n) % k
    x = rng.normal(size=(n, d)) + 1.5 * np.eye(k, d)[y]
    other = x @ rng.normal(size=(d, d)) + 0.5 * rng.normal(size=(n, d))
    return x, y, other


def _mb_cka(x, y):
    m = MinibatchCKA()
    for b in range(0, x.shape[0], 40):
        m.update(x[b:b + 40], y[b:b + 40])
    return m.result()


X, Y, OTHER = _data()
HALF = X.shape[0] // 2
CASES = {
    "linear_cka": lambda s: linear_cka(X * s, OTHER),
    "linear_cka_both": lambda s: linear_cka(X * s, OTHER * s),
    "debiased_cka": lambda s: linear_cka(X * s, OTHER, debiased=True),
    "linear_cka_gram_chunked": lambda s: linear_cka(X * s, OTHER, method="gram", chunk=17),
    "cka_matrix": lambda s: cka_matrix([X * s, OTHER, X + OTHER])[0, 1:],
    "rbf_cka": lambda s: rbf_cka(X * s, OTHER),
    "minibatch_cka": lambda s: _mb_cka(X * s, OTHER),
    "class_separation": lambda s: class_separation(X * s, Y),
    "rankme": lambda s: rankme(X * s),
    "h_score": lambda s: h_score(X * s, Y),
    "neural_collapse": lambda s: np.array([v for _, v in sorted(neural_collapse(X * s, Y).items())
                                           if isinstance(v, float)]),
    "knn_probe": lambda s: probes.knn_probe(X[:HALF] * s, Y[:HALF], X[HALF:] * s, Y[HALF:]),
    "linear_probe": lambda s: probes.linear_probe(X[:HALF] * s, Y[:HALF], X[HALF:] * s,
                                                  Y[HALF:]).test_accuracy,
    "ksg_mi": lambda s: ksg_mi(X * s, OTHER).value,
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_scale_free_metric_is_scale_free_in_float64(name):
    fn = CASES[name]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a spurious "constant" / overflow warning is a failure
        ref = np.asarray(fn(1.0), dtype=np.float64)
        assert np.all(np.isfinite(ref))
        for s in SCALES:
            got = np.asarray(fn(s), dtype=np.float64)
            np.testing.assert_allclose(got, ref, rtol=1e-9, atol=1e-12,
                                       err_msg=f"{name} at scale {s:g}")


def test_power_of_two_scales_are_bit_exact_for_cka_and_separation():
    # an exact power-of-two factor must not change a single bit
    for s in (2.0**-600, 2.0**600):
        assert linear_cka(X * s, OTHER) == linear_cka(X, OTHER)
        assert class_separation(X * s, Y) == class_separation(X, Y)
