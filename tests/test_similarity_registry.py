"""Every registered similarity measure declares its direction and invariances, and the declared
invariances hold (property-tested); ``dtprobe list`` shows both."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dtprobe.cli import main
from dtprobe.metrics.registry import INVARIANCES, available_similarities, register_similarity

SIMILARITIES = available_similarities()


def test_expected_measures_are_registered():
    assert {"linear_cka", "debiased_cka", "mutual_knn", "cknna", "procrustes_distance",
            "angular_shape_metric", "svcca", "pwcca"} <= set(SIMILARITIES)
    for spec in SIMILARITIES.values():
        assert set(spec.similarity.invariances) <= set(INVARIANCES)
        assert "sample_permutation" in spec.similarity.invariances
        params = spec.similarity.row_params()
        assert isinstance(params["higher_is_similar"], bool) and params["invariances"]
        assert spec.func(None) == []  # no per-checkpoint rows
    assert SIMILARITIES["procrustes_distance"].similarity.higher_is_similar is False
    assert SIMILARITIES["linear_cka"].similarity.higher_is_similar is True


def _transform(kind: str, rng, x, y, scale):
    if kind == "sample_permutation":
        p = rng.permutation(len(x))
        return x[p], y[p]
    if kind == "translation":
        return x + rng.standard_normal(x.shape[1]), y - 3.0
    if kind == "orthogonal":
        qx, _ = np.linalg.qr(rng.standard_normal((x.shape[1],) * 2))
        qy, _ = np.linalg.qr(rng.standard_normal((y.shape[1],) * 2))
        return x @ qx, y @ qy
    if kind == "isotropic_scaling":
        return scale * x, y / scale
    if kind == "neuron_permutation":
        return (np.ascontiguousarray(x[:, rng.permutation(x.shape[1])]),
                np.ascontiguousarray(y[:, rng.permutation(y.shape[1])]))
    if kind == "invertible_linear_of_y":
        return x, y @ (rng.standard_normal((y.shape[1],) * 2) + 3 * np.eye(y.shape[1]))
    if kind == "invertible_linear":
        return (x @ (rng.standard_normal((x.shape[1],) * 2) + 3 * np.eye(x.shape[1])),
                y @ (rng.standard_normal((y.shape[1],) * 2) + 3 * np.eye(y.shape[1])))
    raise AssertionError(kind)


@pytest.mark.parametrize("name", sorted(SIMILARITIES))
@settings(max_examples=8, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), scale=st.floats(1e-2, 1e2))
def test_declared_invariances_hold(name, seed, scale):
    spec = SIMILARITIES[name].similarity
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((48, 6)) + 0.5
    y = np.tanh(x @ rng.standard_normal((6, 5))) + 0.3 * rng.standard_normal((48, 5))
    base = spec.func(x, y)
    for kind in spec.invariances:
        tx, ty = _transform(kind, rng, x, y, scale)
        assert spec.func(tx, ty) == pytest.approx(base, rel=1e-7, abs=1e-9), kind


def test_list_shows_direction_and_invariances(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for name in ("twonn", "alpha_req", "cdnv", "nleep"):
        assert name in out
    line = next(ln for ln in out.splitlines() if ln.strip().startswith("procrustes_distance"))
    assert "lower=more similar" in line and "orthogonal" in line
    line = next(ln for ln in out.splitlines() if ln.strip().startswith("cknna"))
    assert "higher=more similar" in line and "translation" not in line


def test_register_similarity_rejects_unknown_invariance():
    with pytest.raises(ValueError, match="unknown invariance"):
        register_similarity("bogus", higher_is_similar=True, invariances=("affine",))
