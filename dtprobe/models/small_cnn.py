"""A small VGG-style CNN for the embedded 32 px datasets (fast on two CPU cores)."""

from __future__ import annotations

from torch import nn

from dtprobe.models.registry import register_arch


def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout),
                         nn.ReLU(inplace=True))


class SmallCNN(nn.Module):
    """Three conv stages (each two 3x3 convs + BN + ReLU, then 2x2 max-pool), global average pool,
    a ``feature_dim`` ReLU embedding (the penultimate layer) and a linear head ``fc``."""

    def __init__(self, num_classes: int, in_channels: int = 3, width: int = 32,
                 feature_dim: int = 128):
        super().__init__()
        w = width
        self.features = nn.Sequential(
            _block(in_channels, w), _block(w, w), nn.MaxPool2d(2),
            _block(w, 2 * w), _block(2 * w, 2 * w), nn.MaxPool2d(2),
            _block(2 * w, 4 * w), _block(4 * w, 4 * w),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.embed = nn.Sequential(nn.Linear(4 * w, feature_dim), nn.ReLU(inplace=True))
        self.fc = nn.Linear(feature_dim, num_classes)

    def forward(self, x):
        return self.fc(self.embed(self.features(x)))


@register_arch("small_cnn", head="fc")
def small_cnn(num_classes: int, in_channels: int = 3, width: int = 32,
              feature_dim: int = 128) -> nn.Module:
    """Small CNN for the embedded datasets (penultimate: ``feature_dim``-d ReLU embedding)."""
    return SmallCNN(num_classes, in_channels=in_channels, width=width, feature_dim=feature_dim)
