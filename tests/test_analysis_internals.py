"""Pieces of the analysis pipeline that bound memory: lazy epoch features, streamed CKA matrix."""

from __future__ import annotations

import numpy as np
import torch

from dtprobe.analysis import EpochFeatures, streamed_cka_matrix
from dtprobe.features.extract import FeatureCache
from dtprobe.metrics import cka_matrix


def _store(tmp_path, n_epochs=7, n=60, d=5):
    gen = torch.Generator().manual_seed(0)
    store = EpochFeatures(FeatureCache(tmp_path), keep=2)
    base = torch.randn(n, d, generator=gen)
    feats = []
    for e in range(n_epochs):
        x = base + 0.3 * e * torch.randn(n, d, generator=gen)
        feats.append(x)
        store.cache.put(f"k{e}", {"features": x, "logits": x[:, :2]})
        store.add(e, f"k{e}", {"features": x, "logits": x[:, :2]})
    return store, feats


def test_epoch_features_keeps_only_a_few_in_memory_and_reloads(tmp_path):
    store, feats = _store(tmp_path)
    assert len(store._recent) == 2
    for e in range(len(feats)):
        torch.testing.assert_close(store[e]["features"], feats[e])
        assert "logits" not in store[e]
    assert len(store._recent) <= 2 and 3 in store and 99 not in store


def test_streamed_matrix_equals_one_pass_matrix_for_any_block_size(tmp_path):
    store, feats = _store(tmp_path)
    expected = np.asarray(cka_matrix(feats))
    per_epoch = feats[0].numel() * 8
    for budget in (2 * per_epoch, 5 * per_epoch, 1 << 30):
        got = streamed_cka_matrix(store, list(range(len(feats))), budget_bytes=budget)
        np.testing.assert_allclose(got, expected, rtol=1e-10, atol=1e-12)


def test_epoch_features_hold_the_cache_dtype_and_return_float32(tmp_path):
    from dtprobe.features.extract import for_compute, for_storage

    x = torch.randn(50, 6, generator=torch.Generator().manual_seed(1))
    cached = for_storage({"features": x, "logits": x[:, :2]}, "float16")
    store = EpochFeatures(FeatureCache(tmp_path), keep=2, dtype="float16")
    store.cache.put("k", cached)
    store.add(0, "k", for_compute(cached))  # what checkpoint_features hands over
    assert store._recent[0]["features"].dtype == torch.float16  # half the memory held
    got = store[0]["features"]
    assert got.dtype == torch.float32 and torch.equal(got, cached["features"].float())
    store.pin(0)
    assert store.pinned[0]["features"].dtype == torch.float16
