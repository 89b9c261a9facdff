"""torchvision ResNets, optionally with the CIFAR stem (3x3 stride-1 conv, no max-pool) for 32 px.

State-dict keys stay those of torchvision, so checkpoints written by other code load unchanged;
the CTC paper's ``ResNet18`` (CIFAR stem, ``shortcut``/``linear`` names) loads through
:data:`RESNETV2_KEYS`.
Reference: He et al., "Deep Residual Learning for Image Recognition", CVPR 2016.
"""

from __future__ import annotations

import torchvision
from torch import nn

from dtprobe.models.registry import KeyMap, register_arch

#: The CIFAR ResNets of the CTC / CRD reference code (``models/resnetv2.py`` of dt-tradeoff) are
#: torchvision's network with the CIFAR stem; only names differ: ``shortcut`` for
#: ``downsample`` and ``linear`` for ``fc``.
RESNETV2_KEYS = KeyMap("dt-tradeoff/CRD resnetv2", (
    (r"^(layer\d+\.\d+)\.shortcut\.", r"\1.downsample."), (r"^linear\.", "fc.")))
_VARIANTS = ({}, {"cifar_stem": True})


def _resnet(factory, num_classes: int, in_channels: int = 3, cifar_stem: bool = False) -> nn.Module:
    model = factory(weights=None, num_classes=num_classes)
    if cifar_stem:
        model.conv1 = nn.Conv2d(in_channels, 64, 3, stride=1, padding=1, bias=False)
        model.maxpool = nn.Identity()
    elif in_channels != 3:
        model.conv1 = nn.Conv2d(in_channels, 64, 7, stride=2, padding=3, bias=False)
    return model


@register_arch("resnet18", head="fc", key_maps=(RESNETV2_KEYS,), variants=_VARIANTS)
def resnet18(num_classes: int, in_channels: int = 3, cifar_stem: bool = False) -> nn.Module:
    """torchvision ResNet-18 (512-d penultimate); ``cifar_stem=True`` for 32 px images."""
    return _resnet(torchvision.models.resnet18, num_classes, in_channels, cifar_stem)


@register_arch("resnet50", head="fc", key_maps=(RESNETV2_KEYS,), variants=_VARIANTS)
def resnet50(num_classes: int, in_channels: int = 3, cifar_stem: bool = False) -> nn.Module:
    """torchvision ResNet-50 (2048-d penultimate); ``cifar_stem=True`` for 32 px images."""
    return _resnet(torchvision.models.resnet50, num_classes, in_channels, cifar_stem)
