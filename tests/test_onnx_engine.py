"""The ONNX Runtime extraction engine (``engine="onnx"``, dtprobe.features.engines.onnx, issue 14).

Outputs are compared with forward passes of the original, unfolded networks written out here
module by module (and with the eager engine); the tests that run ONNX Runtime skip cleanly
when it is not installed.
"""

from __future__ import annotations

import importlib.util
import sys

import pytest
import torch
from torch import nn

from dtprobe import analysis
from dtprobe.cli import main
from dtprobe.data.pixels import RawImages
from dtprobe.errors import ConfigError
from dtprobe.features.extract import extract_features
from dtprobe.models import build_model
from tests.helpers import randomise_bn, train_tiny

MISSING = "--engine onnx needs onnxruntime: pip install 'dtprobe[onnx]'"


@pytest.fixture
def ort():
    """onnxruntime, with the engine's counters and kept session reset."""
    module = pytest.importorskip("onnxruntime")
    from dtprobe.features.engines import onnx as engine

    engine.reset_export_stats()
    yield module
    engine.reset_export_stats()


def _stats() -> dict:
    from dtprobe.features.engines.onnx import export_stats

    return export_stats()


def _close(got: torch.Tensor, ref: torch.Tensor, tol: float = 1e-4) -> None:
    """max |got - ref| <= tol * max |ref| (the engine's own criterion)."""
    assert got.shape == ref.shape and got.dtype == torch.float32
    scale = float(ref.abs().max())
    assert scale > 0
    assert float((got - ref).abs().max()) <= tol * scale


def _small_cnn_reference(model, x):
    """small_cnn by hand: block outputs, penultimate embedding, logits."""
    with torch.no_grad():
        h, block0 = x, None
        for i, m in enumerate(model.features):
            h = m(h)
            if i == 0:
                block0 = h
        feats = model.embed(h)
        return {"layer:features.0": block0.mean(dim=(2, 3)), "features": feats,
                "logits": model.fc(feats)}


def _resnet_reference(model, x):
    """torchvision's ResNet forward written out, with layer2 and layer4 pooled."""
    with torch.no_grad():
        h = model.maxpool(model.relu(model.bn1(model.conv1(x))))
        h = model.layer2(model.layer1(h))
        layer2 = h.mean(dim=(2, 3))
        h = model.layer4(model.layer3(h))
        feats = torch.flatten(model.avgpool(h), 1)
        return {"layer:layer2": layer2, "layer:layer4": h.mean(dim=(2, 3)), "features": feats,
                "logits": model.fc(feats)}


# ----------------------------------------------------------------------------- equality
@pytest.mark.parametrize("batch_size", [7, "auto"])
def test_small_cnn_equals_eager_and_manual_forward(ort, batch_size):
    torch.manual_seed(0)
    model = randomise_bn(build_model("small_cnn", 5, width=8, feature_dim=16))
    images = torch.randn(37, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    layers = ["features.0"]
    got = extract_features(model, model.fc, images, device="cpu", batch_size=batch_size,
                           layers=layers, engine="onnx")
    assert _stats()["exports"] == 1 and _stats()["fallbacks"] == 0
    eager = extract_features(model, model.fc, images, device="cpu", batch_size=batch_size,
                             layers=layers)
    ref = _small_cnn_reference(model, images)
    assert list(got) == list(eager) == ["features", "logits", "layer:features.0"]
    for key in got:
        _close(got[key], ref[key])
        _close(got[key], eager[key])
    assert not torch.equal(got["logits"], eager["logits"])  # really another engine
    assert not model.fc._forward_pre_hooks and not model.features[0]._forward_hooks


def test_resnet18_equals_manual_forward_and_follows_new_weights(ort):
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = randomise_bn(torchvision.models.resnet18(num_classes=6))
    images = torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    layers = ["layer2", "layer4"]
    got = extract_features(model, model.fc, images, device="cpu", batch_size=4, layers=layers,
                           engine="onnx")
    ref = _resnet_reference(model, images)
    assert set(got) == set(ref)
    for key in ref:
        _close(got[key], ref[key])
    # a second split of the same checkpoint reuses the export
    again = extract_features(model, model.fc, images[:3], device="cpu", batch_size=4,
                             layers=layers, engine="onnx")
    assert _stats()["exports"] == 1 and _stats()["reused"] == 1
    for key in ref:
        _close(again[key], ref[key][:3])
    # the next checkpoint (weights loaded in place into the same object) is exported afresh
    torch.manual_seed(1)
    other = randomise_bn(torchvision.models.resnet18(num_classes=6), seed=3)
    model.load_state_dict(other.state_dict())
    new = extract_features(model, model.fc, images, device="cpu", batch_size=4, layers=layers,
                           engine="onnx")
    assert _stats()["exports"] == 2
    ref_new = _resnet_reference(other, images)
    for key in ref_new:
        _close(new[key], ref_new[key])
    assert float((ref_new["logits"] - ref["logits"]).abs().max()) > 1e-2  # weights did change


def test_raw_uint8_images_are_normalised_like_eager(ort):
    torch.manual_seed(0)
    model = randomise_bn(build_model("small_cnn", 4, width=8, feature_dim=16))
    pixels = torch.randint(0, 256, (9, 3, 16, 16), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(4))
    raw = RawImages(pixels, mean=(0.4, 0.5, 0.6), std=(0.2, 0.25, 0.3))
    got = extract_features(model, model.fc, raw, device="cpu", batch_size=4, engine="onnx")
    mean = torch.tensor([0.4, 0.5, 0.6])[None, :, None, None]
    std = torch.tensor([0.2, 0.25, 0.3])[None, :, None, None]
    ref = _small_cnn_reference(model, (pixels.float() / 255 - mean) / std)
    for key in ("features", "logits"):
        _close(got[key], ref[key])


# ----------------------------------------------------------------------------- fallbacks
class _Unexportable(nn.Module):
    """torch.special.i0 has no ONNX export (opset 17)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(torch.special.i0(self.conv(x)).mean(dim=(2, 3)))


class _TracesDifferently(nn.Module):
    """Computes something else while being traced: the export is wrong, the check must see it."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        h = self.conv(x).mean(dim=(2, 3))
        if torch.jit.is_tracing():
            h = h * 1.01
        return self.fc(h)


def _manual_small(model, x, transform=lambda h: h):
    with torch.no_grad():
        feats = transform(model.conv(x)).mean(dim=(2, 3))
        return feats, model.fc(feats)


def test_unexportable_model_falls_back_to_eager_with_a_warning(ort, capfd):
    torch.manual_seed(0)
    model = _Unexportable().eval()
    images = torch.randn(10, 3, 8, 8, generator=torch.Generator().manual_seed(5))
    feats, logits = _manual_small(model, images, torch.special.i0)
    with pytest.warns(RuntimeWarning, match="could not be exported.*eager engine instead"):
        got = extract_features(model, model.fc, images, device="cpu", batch_size=4,
                               engine="onnx")
    torch.testing.assert_close(got["features"], feats, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got["logits"], logits, rtol=1e-5, atol=1e-6)
    assert _stats()["fallbacks"] == 1 and _stats()["exports"] == 0
    assert "graph" not in capfd.readouterr().out  # the exporter's graph dump is silenced
    with pytest.warns(RuntimeWarning, match="an earlier checkpoint"):  # not tried again
        extract_features(model, model.fc, images, device="cpu", batch_size=4, engine="onnx")
    assert _stats()["fallbacks"] == 2 and _stats()["exports"] == 0


def test_export_that_disagrees_with_eager_falls_back(ort):
    torch.manual_seed(0)
    model = _TracesDifferently().eval()
    images = torch.randn(6, 3, 8, 8, generator=torch.Generator().manual_seed(6))
    feats, logits = _manual_small(model, images)
    with pytest.warns(RuntimeWarning,
                      match=r"disagrees with eager on (features|logits) .*> 0.0001"):
        got = extract_features(model, model.fc, images, device="cpu", batch_size=4,
                               engine="onnx")
    torch.testing.assert_close(got["logits"], logits, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got["features"], feats, rtol=1e-5, atol=1e-6)
    assert _stats()["fallbacks"] == 1 and _stats()["exports"] == 1


# ----------------------------------------------------------------------------- options
def test_bad_engine_options_are_one_line_config_errors(monkeypatch):
    model = build_model("small_cnn", 3, width=4, feature_dim=4).eval()
    x = torch.randn(2, 3, 8, 8)
    with pytest.raises(ConfigError, match=r"^--engine must be one of eager, onnx, got 'trt'$"):
        extract_features(model, model.fc, x, device="cpu", engine="trt")
    if importlib.util.find_spec("onnxruntime") is not None:
        with pytest.raises(ConfigError, match="runs on the CPU .*pass --device cpu"):
            extract_features(model, model.fc, x, device="cuda", engine="onnx")
        with pytest.raises(ConfigError, match="computes in float32"):
            extract_features(model, model.fc, x, device="cpu", engine="onnx", amp=True)
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import fails as if not installed
    with pytest.raises(ConfigError) as info:
        extract_features(model, model.fc, x, device="cpu", engine="onnx")
    assert str(info.value) == MISSING


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, tiny_shapes_params):
    out = tmp_path_factory.mktemp("onnx") / "ce"
    train_tiny(out)
    return out


def _cli(argv, capsys):
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse errors may exit from inside parse_args
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err.strip().splitlines()


def test_cli_bad_or_unavailable_engine_is_one_line(tiny_run, capsys, monkeypatch):
    code, _, err = _cli(["analyze", str(tiny_run), "--engine", "tensorrt"], capsys)
    assert code == 2 and len(err) == 1
    assert "--engine" in err[0] and "'tensorrt'" in err[0] and "eager" in err[0]
    with pytest.raises(ConfigError, match="^--engine must be one of eager, onnx, got 'jit'$"):
        analysis.analyze(tiny_run, device="cpu", progress=False, plot=False, engine="jit")
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    code, _, err = _cli(["analyze", str(tiny_run), "--device", "cpu", "--engine", "onnx",
                         "--no-progress", "--no-plot"], capsys)
    assert code == 2 and err == [f"dtprobe analyze: error: {MISSING}"]


def test_analysis_with_onnx_engine_matches_eager(ort, tiny_run):
    metrics = ["source_accuracy", "class_separation", "rankme"]
    kwargs = dict(device="cpu", progress=False, plot=False, metrics=metrics, use_cache=False)
    ref = analysis.analyze(tiny_run, **kwargs).table.set_index(["epoch", "metric"])["value"]
    res = analysis.analyze(tiny_run, engine="onnx", **kwargs)
    stats = _stats()
    assert stats["fallbacks"] == 0
    assert stats["exports"] == 3 and stats["reused"] == 3  # 3 checkpoints x (train, test)
    values = res.table.set_index(["epoch", "metric"])["value"]
    assert values.index.equals(ref.index)
    assert float((values - ref).abs().max()) <= 1e-4


def test_weights_written_through_data_are_exported_afresh(ort):
    torch.manual_seed(0)
    model = randomise_bn(build_model("small_cnn", 4, width=8, feature_dim=16))
    images = torch.randn(8, 3, 16, 16, generator=torch.Generator().manual_seed(7))
    extract_features(model, model.fc, images, device="cpu", batch_size=4, engine="onnx")
    version = model.fc.weight._version
    model.fc.weight.data.copy_(torch.randn(4, 16))  # .data: the version counter stays put
    assert model.fc.weight._version == version
    got = extract_features(model, model.fc, images, device="cpu", batch_size=4, engine="onnx")
    assert _stats()["exports"] == 2 and _stats()["fallbacks"] == 0  # no warning either
    ref = _small_cnn_reference(model, images)
    _close(got["logits"], ref["logits"])
