"""Any timm model by name (``--arch timm:<model_name>``), when timm is installed.

The head is timm's own classifier module (``model.pretrained_cfg["classifier"]``), so the
penultimate feature is whatever timm feeds its classifier (after global pooling). No weights
are downloaded: models are built with ``pretrained=False``.
"""

from __future__ import annotations

from torch import nn

from dtprobe.errors import ConfigError
from dtprobe.models.registry import ArchSpec, register_arch_prefix

PREFIX = "timm:"


def timm_arch(name: str) -> ArchSpec:
    """The :class:`ArchSpec` of ``timm:<model_name>``; raises ConfigError if unavailable."""
    try:
        import timm
    except ImportError:
        raise ConfigError(f"architecture {name!r} needs timm: "
                          "pip install 'dtprobe[timm]'") from None
    model_name = name[len(PREFIX):]
    if model_name not in timm.list_models():
        raise ConfigError(f"timm has no model {model_name!r} (see timm.list_models())")

    def builder(num_classes: int, in_channels: int = 3, **kwargs) -> nn.Module:
        return timm.create_model(model_name, pretrained=False, num_classes=num_classes,
                                 in_chans=in_channels, **kwargs)

    probe = builder(num_classes=2)
    head = probe.pretrained_cfg.get("classifier", "fc") if hasattr(probe, "pretrained_cfg") \
        else "fc"
    return ArchSpec(name, builder, head, f"timm model {model_name}")


register_arch_prefix(PREFIX, timm_arch)
