"""Half-precision feature cache (``--feature-dtype``, issue 14): keys, rounding, end to end."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors import safe_open

from dtprobe import analysis
from dtprobe.cli import main
from dtprobe.errors import ConfigError
from dtprobe.features import extract
from dtprobe.features.extract import (
    FeatureCache,
    cache_key,
    feature_dtype_tag,
    for_compute,
    for_storage,
    resolve_feature_dtype,
)
from dtprobe.training.trainer import TrainConfig, train

KEY = ["epoch", "metric", "task", "layer", "other_run"]
METRICS = ["source_accuracy", "class_separation", "rankme", "probe_accuracy"]
# Largest |float16 - float32| difference over this run, measured (benchmarks/feature_dtype.py
# and this test's run): class_separation 7.4e-5, CKA 1.1e-4, RankMe 2.9e-4 (of ~10), probe
# accuracy 2 test images of 120; bfloat16: 5.6e-4, 2.7e-3, 9.7e-3, 5 images. Tolerances ~5x
# (accuracies: 2.5x, as they move by whole images).
TOLERANCE = {
    "float16": {"class_separation": 5e-4, "cka_to_final": 1e-3, "cka_to_previous": 1e-3,
                "rankme": 2e-3, "probe_accuracy": 5 / 120},
    "bfloat16": {"class_separation": 3e-3, "cka_to_final": 1.5e-2, "cka_to_previous": 1.5e-2,
                 "rankme": 5e-2, "probe_accuracy": 12 / 120},
}


def _bfloat16_reference(x: torch.Tensor) -> torch.Tensor:
    """float32 -> bfloat16 -> float32 by hand: round the float32 bits to nearest, ties to even,
    at bit 16 (finite inputs)."""
    bits = x.numpy().view(np.uint32).astype(np.uint64)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return torch.from_numpy(rounded.astype(np.uint32).view(np.float32).copy())


def test_cache_key_separates_dtypes_and_keeps_float32_keys():
    args = ("ab" * 32, "shapes:{}", "test", ["layer1"])
    plain = cache_key(*args)
    keys = {name: cache_key(*args, transform=feature_dtype_tag(name))
            for name in ("float32", "float16", "bfloat16")}
    assert keys["float32"] == plain  # existing float32 caches stay valid
    legacy = json.dumps([extract.CACHE_VERSION, "ab" * 32, "shapes:{}", "test", ["layer1"]])
    assert plain == hashlib.sha256(legacy.encode()).hexdigest()[:32]
    assert len(set(keys.values())) == 3
    with pytest.raises(ConfigError, match="--feature-dtype 'float8'"):
        feature_dtype_tag("float8")
    assert resolve_feature_dtype("bfloat16") is torch.bfloat16


def test_values_round_trip_within_half_precision_rounding(tmp_path):
    gen = torch.Generator().manual_seed(0)
    feats = torch.randn(64, 32, generator=gen) * torch.logspace(-3, 3, 32)  # many exponents
    tensors = {"features": feats, "logits": torch.randn(64, 5, generator=gen),
               "layer:block1": torch.rand(64, 8, generator=gen) * 100}
    cache = FeatureCache(tmp_path)
    for name in ("float16", "bfloat16"):
        stored = for_storage(tensors, name)
        assert stored["features"].dtype == resolve_feature_dtype(name)
        assert stored["layer:block1"].dtype == resolve_feature_dtype(name)
        assert stored["logits"].dtype == torch.float32  # logits are kept exact
        cache.put(name, stored)
        back = for_compute(cache.get(name))
        assert all(v.dtype == torch.float32 for v in back.values())
        assert torch.equal(back["logits"], tensors["logits"])
        for key in ("features", "layer:block1"):
            x = tensors[key]
            if name == "float16":  # numpy's IEEE half rounding is the reference
                ref = torch.from_numpy(x.numpy().astype(np.float16).astype(np.float32))
            else:
                ref = _bfloat16_reference(x)
            assert torch.equal(back[key], ref)
            # and within half an ulp: 2**-11 (float16) / 2**-8 (bfloat16) relative
            rel = 2.0 ** (-11 if name == "float16" else -8)
            assert bool(((back[key] - x).abs() <= rel * x.abs() + 1e-7).all())
    # the files hold half-precision tensors: about half the bytes of float32 features
    with safe_open(str(tmp_path / "float16.safetensors"), "pt") as f:
        assert f.get_tensor("features").dtype == torch.float16
    cache.put("float32", tensors)
    sizes = {p.stem: p.stat().st_size for p in tmp_path.iterdir()}
    assert sizes["float16"] < 0.75 * sizes["float32"]


def test_float16_overflow_is_refused_not_stored_as_inf():
    big = {"features": torch.tensor([[1.0, 7e4]]), "logits": torch.zeros(1, 2)}
    with pytest.raises(ValueError, match="beyond the float16 range"):
        for_storage(big, "float16")
    assert float(for_storage(big, "bfloat16")["features"][0, 1]) == pytest.approx(7e4, rel=2**-8)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, tiny_shapes_params):
    out = tmp_path_factory.mktemp("fp16") / "ce"
    train(TrainConfig(out=str(out), dataset="shapes", dataset_params=tiny_shapes_params,
                      arch="small_cnn", arch_params={"width": 8, "feature_dim": 16}, epochs=3,
                      batch_size=64, save_every=2, seed=0, device="cpu", progress=False))
    return out


def _analyze(run, dtype):
    return analysis.analyze(run, device="cpu", progress=False, plot=False, metrics=METRICS,
                            feature_dtype=dtype)


def test_half_precision_analysis_matches_float32_within_rounding(tiny_run):
    ref = _analyze(tiny_run, "float32")
    files32 = set((tiny_run / "analysis" / "features").iterdir())
    values32 = ref.table.set_index(KEY)["value"]
    for name, tolerance in TOLERANCE.items():
        res = _analyze(tiny_run, name)
        assert res.stats.features_extracted == 3  # own cache entries, never float32's
        values = res.table.set_index(KEY)["value"]
        assert values.index.equals(values32.index)
        diff = (values - values32).abs()
        by_metric = diff.groupby(level="metric").max()
        assert by_metric["source_accuracy"] == 0.0  # logits are cached in float32
        for metric, tol in tolerance.items():
            assert by_metric[metric] <= tol, (name, metric, by_metric[metric])
        assert (ref.table["value"] != res.table["value"]).any()  # the rounding is real
        params = [json.loads(p) for p in res.table["params"] if p]
        assert params and all(p["feature_dtype"] == name for p in params)
        # resumed: the same table from the half-precision cache and parts
        again = _analyze(tiny_run, name)
        assert again.stats.features_reused == 3
        pd.testing.assert_frame_equal(again.table, res.table)
    new = set((tiny_run / "analysis" / "features").iterdir()) - files32
    size = lambda files: sum(p.stat().st_size for p in files)  # noqa: E731
    assert len(new) == 2 * len(files32) and size(new) < 1.5 * size(files32)
    # float32 again: its cache and parts untouched by the half-precision analyses
    back = _analyze(tiny_run, "float32")
    assert back.stats.features_reused == 3
    pd.testing.assert_frame_equal(back.table, ref.table)
    assert not any("feature_dtype" in p for p in back.table["params"])


def test_cli_feature_dtype_flag(tiny_run, capsys):
    try:
        code = main(["analyze", str(tiny_run), "--feature-dtype", "float8"])
    except SystemExit as exc:  # argparse errors may exit from inside parse_args
        code = exc.code
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert "--feature-dtype" in err[0] and "float16" in err[0]
    assert main(["analyze", str(tiny_run), "--device", "cpu", "--no-progress", "--no-plot",
                 "--feature-dtype", "float16", "--metrics", *METRICS]) == 0
    table = pd.read_csv(tiny_run / "analysis" / "metrics.csv", keep_default_na=False)
    assert all(json.loads(p)["feature_dtype"] == "float16" for p in table["params"] if p)


def test_python_api_refuses_unknown_dtype_before_work(tiny_run):
    with pytest.raises(ConfigError, match="--feature-dtype must be one of"):
        _analyze(tiny_run, "half")
