"""Architectures: every registered model builds, its head is found, and the tap sees its input."""

from __future__ import annotations

import pytest
import torch

from dtprobe.errors import ConfigError
from dtprobe.models import available_archs, build_model, head_module
from dtprobe.models.tap import penultimate_features

EXPECTED_DIMS = {"small_cnn": 128, "resnet18": 512, "resnet50": 2048, "resnext32_16x4d": 512}


@pytest.mark.parametrize("arch", sorted(EXPECTED_DIMS))
def test_builds_and_exposes_penultimate_features(arch):
    kwargs = {"cifar_stem": True} if arch.startswith("resnet") else {}
    model = build_model(arch, 6, **kwargs).eval()
    x = torch.randn(2, 3, 32, 32)
    feats = penultimate_features(model, head_module(model, arch), x)
    assert feats.shape == (2, EXPECTED_DIMS[arch])
    with torch.no_grad():
        torch.testing.assert_close(head_module(model, arch)(feats), model(x))


def test_resnext_depth_sets_blocks_and_rejects_bad_depth():
    model = build_model("resnext32_16x4d", 10)
    assert len(model.stages) == 10
    assert len(build_model("resnext32_16x4d", 10, depth=29).stages) == 9
    with pytest.raises(ConfigError, match="depth"):
        build_model("resnext32_16x4d", 10, depth=30)


def test_cifar_stem_keeps_resolution_and_torchvision_keys():
    import torchvision

    model = build_model("resnet18", 10, cifar_stem=True)
    assert model.conv1.stride == (1, 1)
    assert set(model.state_dict()) == set(torchvision.models.resnet18().state_dict())


def test_unknown_architecture_and_timm_without_timm():
    assert "small_cnn" in available_archs()
    with pytest.raises(ConfigError, match="unknown architecture"):
        build_model("vgg_of_dreams", 3)
    try:
        import timm  # noqa: F401
    except ImportError:
        with pytest.raises(ConfigError, match="timm"):
            build_model("timm:resnet18", 3)
    else:
        model = build_model("timm:resnet18", 3)
        assert head_module(model, "timm:resnet18").out_features == 3
