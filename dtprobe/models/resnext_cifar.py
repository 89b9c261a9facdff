"""dtprobe's generic CIFAR ResNeXt, ``resnext_cifar``: 64-ch stem, ``(depth - 2) / 3`` bottlenecks.

This is *not* the CTC paper's network (that one is ``ctc_resnext32_16x4d`` in
:mod:`dtprobe.models.ctc_resnext`: 32-channel stem, three stages of 5 bottlenecks, its own
key names). It was registered as ``resnext32_16x4d`` before; that name still builds it, with a
deprecation warning.

Three stages of bottleneck blocks with grouped 3x3 convolutions (Xie et al. 2017), a 3x3
stride-1 stem and no max-pool. With ``cardinality`` C and ``base_width`` w the grouped
convolution of stage s has ``C * w * 2**s`` channels and the block output twice that, so
16x4d gives 128/256/512 channels and a 512-d penultimate feature. ``depth`` counts
weighted layers (3 per block plus stem and head): ``(depth - 2) / 3`` blocks, spread over the
three stages as evenly as possible with the extra blocks in the first stages
(depth 32 -> 4, 3, 3 blocks; depth 29 -> 3, 3, 3, the ResNeXt-29 of the ResNeXt paper).

Reference: Xie, Girshick, Dollar, Tu, He. "Aggregated Residual Transformations for Deep Neural
Networks." CVPR 2017.
"""

from __future__ import annotations

from torch import nn

from dtprobe.errors import ConfigError
from dtprobe.models.registry import register_alias, register_arch


class GroupedBottleneck(nn.Module):
    def __init__(self, cin: int, group_width: int, cardinality: int, stride: int):
        super().__init__()
        cout = 2 * group_width
        self.body = nn.Sequential(
            nn.Conv2d(cin, group_width, 1, bias=False), nn.BatchNorm2d(group_width),
            nn.ReLU(inplace=True),
            nn.Conv2d(group_width, group_width, 3, stride=stride, padding=1, groups=cardinality,
                      bias=False),
            nn.BatchNorm2d(group_width), nn.ReLU(inplace=True),
            nn.Conv2d(group_width, cout, 1, bias=False), nn.BatchNorm2d(cout))
        self.shortcut = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False),
                                          nn.BatchNorm2d(cout))
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        return self.relu(self.body(x) + self.shortcut(x))


class ResNeXtCIFAR(nn.Module):
    def __init__(self, num_classes: int, depth: int = 32, cardinality: int = 16,
                 base_width: int = 4, in_channels: int = 3):
        super().__init__()
        if depth < 11 or (depth - 2) % 3:
            raise ConfigError(f"resnext depth={depth}: use 3 * blocks + 2 with at least 3 blocks "
                              "(e.g. 29 or 32)")
        blocks = (depth - 2) // 3
        per_stage = [blocks // 3 + (1 if s < blocks % 3 else 0) for s in range(3)]
        self.stem = nn.Sequential(nn.Conv2d(in_channels, 64, 3, padding=1, bias=False),
                                  nn.BatchNorm2d(64), nn.ReLU(inplace=True))
        layers, cin = [], 64
        for stage, count in enumerate(per_stage):
            width = cardinality * base_width * 2 ** stage
            for b in range(count):
                stride = 2 if stage > 0 and b == 0 else 1
                layers.append(GroupedBottleneck(cin, width, cardinality, stride))
                cin = 2 * width
        self.stages = nn.Sequential(*layers)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x):
        return self.fc(self.pool(self.stages(self.stem(x))))


@register_arch("resnext_cifar", head="fc")
def resnext_cifar(num_classes: int, in_channels: int = 3, depth: int = 32,
                  cardinality: int = 16, base_width: int = 4) -> nn.Module:
    """Generic CIFAR ResNeXt: 64-ch stem, (depth-2)/3 bottlenecks, 512-d (not the paper's net)."""
    return ResNeXtCIFAR(num_classes, depth=depth, cardinality=cardinality,
                        base_width=base_width, in_channels=in_channels)


register_alias("resnext32_16x4d", "resnext_cifar",
               "it builds dtprobe's generic CIFAR ResNeXt (64-ch stem, 4/3/3 bottlenecks), not the "
               "CTC paper's network, which is 'ctc_resnext32_16x4d'")
