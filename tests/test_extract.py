"""Tests for the extraction engine and feature cache (dtprobe.features.extract).

Every engine output is compared with a manual forward pass of the original, unfolded model,
written out here module by module.
"""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from dtprobe.errors import ConfigError
from dtprobe.features import extract
from dtprobe.features.extract import (
    FeatureCache,
    auto_batch_size,
    cache_key,
    dataset_key,
    extract_features,
    inference_model,
)
from dtprobe.models import build_model
from tests.helpers import randomise_bn


@pytest.fixture(scope="module")
def cnn():
    torch.manual_seed(0)
    return randomise_bn(build_model("small_cnn", 5, width=8, feature_dim=16))


@pytest.fixture(scope="module")
def images():
    return torch.randn(37, 3, 16, 16, generator=torch.Generator().manual_seed(1))


def _manual(model, x):
    """Reference: the small CNN's forward written out, with its intermediate outputs."""
    with torch.no_grad():
        block0 = model.features[0](x)
        h = x
        for m in model.features:
            h = m(h)
        feats = model.embed(h)
        logits = model.fc(feats)
    return block0, feats, logits


@pytest.mark.parametrize("batch_size", [1, 7, 64, "auto"])
@pytest.mark.parametrize("fold", [True, False])
def test_features_equal_manual_forward(cnn, images, batch_size, fold):
    out = extract_features(cnn, cnn.fc, images, device=torch.device("cpu"),
                           batch_size=batch_size, layers=["features.0", "embed"],
                           fold_batchnorm=fold)
    block0, feats, logits = _manual(cnn, images)
    assert set(out) == {"features", "logits", "layer:features.0", "layer:embed"}
    for t in out.values():
        assert t.dtype == torch.float32 and t.device.type == "cpu" and t.shape[0] == 37
    torch.testing.assert_close(out["features"], feats, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out["logits"], logits, rtol=1e-4, atol=1e-5)
    # layer pooling: conv maps -> spatial mean per channel; 2-D outputs pass through
    torch.testing.assert_close(out["layer:features.0"], block0.mean(dim=(2, 3)),
                               rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out["layer:embed"], feats, rtol=1e-4, atol=1e-5)


def test_amp_opt_in_on_cpu(cnn, images):
    exact = extract_features(cnn, cnn.fc, images, device="cpu", batch_size=16)
    assert torch.equal(exact["logits"], extract_features(
        cnn, cnn.fc, images, device="cpu", batch_size=16, amp=False)["logits"])  # CPU default
    _, feats, logits = _manual(cnn, images)
    low = extract_features(cnn, cnn.fc, images, device="cpu", batch_size=16, amp=True)
    assert low["features"].dtype == torch.float32  # bf16 outputs come back as float32
    scale = float(logits.abs().max())
    assert float((low["logits"] - logits).abs().max()) <= 0.05 * scale  # bf16 rounding only
    assert float((low["features"] - feats).abs().max()) <= 0.05 * float(feats.abs().max())


def test_original_model_is_not_modified(cnn, images):
    before = {k: v.clone() for k, v in cnn.state_dict().items()}
    cnn.train()
    extract_features(cnn, cnn.fc, images, device="cpu", batch_size=16)
    assert not cnn.training  # documented: the model is put in eval mode
    after = cnn.state_dict()
    assert before.keys() == after.keys()  # BatchNorm modules still there
    for k, v in before.items():
        assert torch.equal(v, after[k]), k
    assert cnn.features[0][0].weight.is_contiguous()  # memory format untouched on the CPU
    assert not cnn.fc._forward_pre_hooks and not cnn.features[0]._forward_hooks


def test_inference_model_folds_and_keeps_hooked_layers(cnn, images):
    net, head, folded = inference_model(cnn, cnn.fc, ["features.0"], images[:4])
    assert folded and net is not cnn
    kept = [name for name, m in net.named_modules() if isinstance(m, nn.BatchNorm2d)]
    # every BatchNorm is folded, also inside the hooked block: which pairs are folded does
    # not depend on the layers requested (the penultimate features stay the same numbers)
    assert kept == []
    alone, _, _ = inference_model(cnn, cnn.fc, (), images[:4])
    assert [n for n, _ in alone.named_modules()] == [n for n, _ in net.named_modules()]
    for (n, a), (_, b) in zip(alone.state_dict().items(), net.state_dict().items(), strict=True):
        assert torch.equal(a, b), n
    assert isinstance(head, nn.Linear)
    # requesting the conv itself keeps it unfolded, so its (pre-BatchNorm) output is exact
    out = extract_features(cnn, cnn.fc, images, device="cpu", batch_size=8,
                           layers=["features.0.0"])
    with torch.no_grad():
        conv = cnn.features[0][0](images)
    torch.testing.assert_close(out["layer:features.0.0"], conv.mean(dim=(2, 3)),
                               rtol=1e-4, atol=1e-5)


class _Branchy(nn.Module):
    """Data-dependent control flow: torch.fx cannot trace it, so no folding happens."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        h = self.bn(self.conv(x))
        if float(h.mean()) > 1e9:
            h = -h
        return self.fc(h.mean(dim=(2, 3)))


def test_untraceable_model_falls_back_to_eager(images):
    torch.manual_seed(3)
    model = randomise_bn(_Branchy())
    net, _, folded = inference_model(model, model.fc, (), images[:4])
    assert not folded and net is model
    out = extract_features(model, model.fc, images, device="cpu", batch_size=10)
    with torch.no_grad():
        ref = model(images)
    torch.testing.assert_close(out["logits"], ref, rtol=1e-5, atol=1e-6)


def test_non_image_inputs_and_model_without_batchnorm():
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(6, 10), nn.ReLU(), nn.Linear(10, 3)).eval()
    x = torch.randn(25, 6)
    out = extract_features(model, model[2], x, device="cpu", batch_size="auto", layers=["0"])
    with torch.no_grad():
        hidden = model[1](model[0](x))
    torch.testing.assert_close(out["features"], hidden)
    torch.testing.assert_close(out["logits"], model(x))
    torch.testing.assert_close(out["layer:0"], model[0](x).detach())


def test_argument_errors(cnn, images):
    for bad in (0, -3, "big", 2.5, True):
        with pytest.raises(ConfigError, match="batch_size"):
            extract_features(cnn, cnn.fc, images, device="cpu", batch_size=bad)
    with pytest.raises(ConfigError, match="no images"):
        extract_features(cnn, cnn.fc, images[:0], device="cpu")
    stray = nn.Linear(16, 5)  # not part of the model: never called
    with pytest.raises(RuntimeError, match="head module was not called"):
        extract_features(cnn, stray, images, device="cpu", batch_size=8)
    assert not stray._forward_pre_hooks  # hooks removed after the failure


def test_auto_batch_size_on_cpu():
    cpu = torch.device("cpu")
    for shape in [(5000, 3, 32, 32), (5000, 3, 224, 224), (5000, 1, 8, 8), (12, 3, 32, 32)]:
        size = auto_batch_size(torch.empty(shape), cpu)
        assert 1 <= size <= min(512, shape[0])
        assert size == shape[0] or size & (size - 1) == 0  # a power of two unless capped by n
    assert auto_batch_size(torch.empty(5000, 3, 32, 32), cpu) > auto_batch_size(
        torch.empty(5000, 3, 224, 224), cpu)


class _OOMAbove(nn.Module):
    """Raises the CUDA out-of-memory error for batches larger than ``limit``."""

    def __init__(self, limit: int):
        super().__init__()
        self.limit = limit
        self.body = nn.Linear(4, 4)
        self.fc = nn.Linear(4, 2)
        self.sizes: list[int] = []

    def forward(self, x):
        self.sizes.append(x.shape[0])
        if x.shape[0] > self.limit:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 1 GiB")
        return self.fc(self.body(x))


def test_auto_batch_halves_on_out_of_memory_and_remembers():
    torch.manual_seed(5)
    model = _OOMAbove(limit=40).eval()
    x = torch.randn(300, 4)
    extract._AUTO_BATCH.clear()
    out = extract_features(model, model.fc, x, device="cpu", batch_size="auto")
    torch.testing.assert_close(out["logits"], model.fc(model.body(x)).detach())
    assert max(s for s in model.sizes[-3:]) <= 40
    remembered = list(extract._AUTO_BATCH.values())
    assert remembered and remembered[0] <= 40
    model.sizes.clear()
    extract_features(model, model.fc, x, device="cpu", batch_size="auto")
    assert max(model.sizes) <= 40  # starts from the size that fitted: no failed attempt
    with pytest.raises(torch.cuda.OutOfMemoryError):  # an explicit size is used as given
        extract_features(model, model.fc, x, device="cpu", batch_size=64)
    extract._AUTO_BATCH.clear()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("pinned", [True, False])
def test_cuda_async_copies_match_cpu(cnn, images, pinned):
    model = build_model("small_cnn", 5, width=8, feature_dim=16)
    model.load_state_dict(cnn.state_dict())
    model = model.cuda().eval()
    host = images.pin_memory() if pinned else images
    out = extract_features(model, model.fc, host, device="cuda", batch_size=8,
                           layers=["features.0"])
    ref = extract_features(cnn, cnn.fc, images, device="cpu", batch_size=8,
                           layers=["features.0"])
    for k in ref:  # bf16 autocast on CUDA
        torch.testing.assert_close(out[k], ref[k], rtol=5e-2, atol=5e-2)


# ----------------------------------------------------------------------------------- cache
def _tensors(n: int = 6) -> dict[str, torch.Tensor]:
    return {"features": torch.arange(n * 3, dtype=torch.float32).reshape(n, 3),
            "logits": torch.ones(n, 2), "layer:a": torch.zeros(n, 4)}


def test_cache_miss_put_hit(tmp_path):
    cache = FeatureCache(tmp_path / "features")
    assert cache.get("k1") is None and "k1" not in cache  # miss: nothing there yet
    cache.put("k1", _tensors())
    hit = cache.get("k1")
    assert hit is not None and set(hit) == {"features", "logits", "layer:a"}
    for k, v in _tensors().items():
        assert torch.equal(hit[k], v)
    assert [p.name for p in (tmp_path / "features").iterdir()] == ["k1.safetensors"]


def test_cache_reuse_false_ignores_old_entries_but_serves_fresh_ones(tmp_path):
    FeatureCache(tmp_path).put("old", _tensors())
    cache = FeatureCache(tmp_path, reuse=False)
    assert cache.get("old") is None  # written by an earlier run: recomputed
    cache.put("old", _tensors(4))
    assert cache.get("old")["features"].shape[0] == 4  # written in this run: served


def test_torn_foreign_and_inconsistent_files_are_misses(tmp_path):
    cache = FeatureCache(tmp_path)
    cache.put("good", _tensors())
    raw = (tmp_path / "good.safetensors").read_bytes()
    (tmp_path / "torn.safetensors").write_bytes(raw[: len(raw) // 2])  # killed mid-write
    (tmp_path / "foreign.safetensors").write_bytes(b"not a safetensors file at all")
    (tmp_path / "empty.safetensors").write_bytes(b"")
    save_file({"something": torch.ones(3)}, tmp_path / "nofeatures.safetensors")
    save_file({"features": torch.ones(5, 2), "logits": torch.ones(4, 2)},
              tmp_path / "ragged.safetensors")
    for key in ("torn", "foreign", "empty", "nofeatures", "ragged"):
        assert cache.get(key) is None, key
    cache.put("torn", _tensors())  # a miss is recomputed and overwrites the torn file
    assert cache.get("torn") is not None
    assert not list(tmp_path.glob("*.tmp"))


def test_cache_put_leaves_no_partial_file_on_failure(tmp_path):
    cache = FeatureCache(tmp_path)
    with pytest.raises(Exception):  # noqa: B017 - safetensors refuses shared storage
        base = torch.ones(4, 2)
        cache.put("bad", {"features": base, "logits": base})
    assert cache.get("bad") is None
    assert not list(tmp_path.glob("*.tmp"))


def test_cache_key_contract():
    base = cache_key("ab" * 32, "shapes:{}", "test", ["b", "a"])
    assert base == cache_key("ab" * 32, "shapes:{}", "test", ["a", "b"])  # layer order
    others = {cache_key("cd" * 32, "shapes:{}", "test", ["a", "b"]),
              cache_key("ab" * 32, "digits:{}", "test", ["a", "b"]),
              cache_key("ab" * 32, "shapes:{}", "train", ["a", "b"]),
              cache_key("ab" * 32, "shapes:{}", "test", ["a"]),
              cache_key("ab" * 32, "shapes:{}", "test", ["a", "b"], transform="center-crop")}
    assert base not in others and len(others) == 5
    # the empty transform keeps the earlier key, so existing caches stay valid
    legacy = json.dumps([extract.CACHE_VERSION, "ab" * 32, "shapes:{}", "test", ["a", "b"]])
    assert base == hashlib.sha256(legacy.encode()).hexdigest()[:32]
    assert dataset_key("shapes", {"b": 1, "a": 2}) == dataset_key("shapes", {"a": 2, "b": 1})
