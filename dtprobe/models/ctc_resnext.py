"""The CIFAR ResNeXt of the CTC paper's reference code (Cui et al. 2022), with its key names.

The network the paper trained (``resnext32_16x4d`` in the dt-tradeoff code, after Xie et al.
2017): a 3x3 stem with 32 channels (``conv_1_3x3``, ``bn_1``), three stages
(``stage_1`` .. ``stage_3``) of ``(depth - 2) // 6`` bottlenecks each (5 for depth 32) with
outputs ``32 * widen``, ``64 * widen``, ``128 * widen`` channels (128/256/512 for widen 4),
global average pooling and a linear ``classifier``: about 1.06M parameters and a 512-d
penultimate feature for 16x4d. Bottleneck ``stage_s.stage_s_bottleneck_b`` holds
``conv_reduce``/``bn_reduce`` (1x1), ``conv_conv``/``bn`` (grouped 3x3, carrying the stage's
stride) and ``conv_expand``/``bn_expand`` (1x1); its grouped width is
``cardinality * int(base_width * out / (64 * widen))``, and only a block whose input and output
widths differ has a projection shortcut (``shortcut.shortcut_conv``, ``shortcut.shortcut_bn``).

Checkpoints of that code (``ckpt_epoch_{e}.pth`` holding ``{"epoch", "model", "accuracy"}``,
``module.`` keys under DataParallel) load into this module unchanged.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from dtprobe.errors import ConfigError
from dtprobe.models.registry import register_arch
from dtprobe.references import with_references

__doc__ = with_references(__doc__, "cui2022", "xie2017")


class CTCBottleneck(nn.Module):
    """ResNeXt bottleneck (type C) with the reference code's attribute names."""

    def __init__(self, cin: int, cout: int, stride: int, cardinality: int, base_width: int,
                 widen: int):
        super().__init__()
        width = cardinality * int(base_width * cout / (widen * 64.0))
        self.conv_reduce = nn.Conv2d(cin, width, 1, bias=False)
        self.bn_reduce = nn.BatchNorm2d(width)
        self.conv_conv = nn.Conv2d(width, width, 3, stride=stride, padding=1,
                                   groups=cardinality, bias=False)
        self.bn = nn.BatchNorm2d(width)
        self.conv_expand = nn.Conv2d(width, cout, 1, bias=False)
        self.bn_expand = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if cin != cout:  # as in the reference: a stride without a width change keeps identity
            self.shortcut.add_module("shortcut_conv", nn.Conv2d(cin, cout, 1, stride=stride,
                                                                bias=False))
            self.shortcut.add_module("shortcut_bn", nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn_reduce(self.conv_reduce(x)), inplace=True)
        out = F.relu(self.bn(self.conv_conv(out)), inplace=True)
        out = self.bn_expand(self.conv_expand(out))
        return F.relu(self.shortcut(x) + out, inplace=True)


class CTCResNeXt(nn.Module):
    """CIFAR ResNeXt of the CTC reference code (see the module docstring)."""

    def __init__(self, num_classes: int, cardinality: int = 16, depth: int = 32,
                 base_width: int = 4, widen: int = 4, in_channels: int = 3):
        super().__init__()
        if depth < 8 or (depth - 2) % 6:
            raise ConfigError(f"ctc_resnext depth={depth}: use 6 * blocks + 2 (e.g. 29 or 32 "
                              "as in the reference code, which floors (depth - 2) / 6)")
        blocks = (depth - 2) // 6
        widths = [32, 32 * widen, 64 * widen, 128 * widen]
        self.conv_1_3x3 = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)
        self.bn_1 = nn.BatchNorm2d(widths[0])
        for s in range(1, 4):
            stage = nn.Sequential()
            for b in range(blocks):
                cin = widths[s - 1] if b == 0 else widths[s]
                stride = (1 if s == 1 else 2) if b == 0 else 1
                stage.add_module(f"stage_{s}_bottleneck_{b}",
                                 CTCBottleneck(cin, widths[s], stride, cardinality, base_width,
                                               widen))
            self.add_module(f"stage_{s}", stage)
        self.classifier = nn.Linear(widths[3], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn_1(self.conv_1_3x3(x)), inplace=True)
        x = self.stage_3(self.stage_2(self.stage_1(x)))
        return self.classifier(F.adaptive_avg_pool2d(x, 1).flatten(1))


# The reference code's four presets (cardinality x base width), all depth 32, widen 4.
_PRESETS = ((16, 4), (4, 16), (8, 8), (32, 2))


@register_arch("ctc_resnext32_16x4d", head="classifier",
               variants=tuple({"cardinality": c, "base_width": w} for c, w in _PRESETS))
def ctc_resnext32_16x4d(num_classes: int, in_channels: int = 3, cardinality: int = 16,
                        depth: int = 32, base_width: int = 4, widen: int = 4) -> nn.Module:
    """The CTC paper's CIFAR ResNeXt32-16x4d (32-ch stem, 3 x 5 bottlenecks, ~1.06M params)."""
    return CTCResNeXt(num_classes, cardinality=cardinality, depth=depth, base_width=base_width,
                      widen=widen, in_channels=in_channels)
