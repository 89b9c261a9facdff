"""Hugging Face ``transformers`` image classifiers rebuilt from a checkpoint's ``config.json``.

``--arch hf:<folder>`` (set automatically for a Trainer ``checkpoint-STEP/`` folder) builds
``AutoModelForImageClassification.from_config`` from ``<folder>/config.json`` with no download
and no weights; a forward hook makes the module return the logits tensor, so the
penultimate feature is the input of the last ``nn.Linear`` (the classifier), as for every
architecture.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from dtprobe.errors import ConfigError
from dtprobe.models.registry import AUTO_HEAD, ArchSpec, register_arch_prefix

PREFIX = "hf:"


def _logits(module: nn.Module, args: Any, output: Any) -> Any:
    return getattr(output, "logits", output)


def hf_arch(name: str) -> ArchSpec:
    """The :class:`ArchSpec` of ``hf:<folder with config.json>``."""
    folder = Path(name[len(PREFIX):])
    if not (folder / "config.json").is_file():
        raise ConfigError(f"--arch {name!r}: no config.json in {folder}")
    try:
        from transformers import AutoConfig, AutoModelForImageClassification
    except ImportError:
        raise ConfigError(f"architecture {name!r} needs transformers: "
                          "pip install 'dtprobe[frameworks]'") from None

    def builder(num_classes: int, in_channels: int = 3, **kwargs: Any) -> nn.Module:
        config = AutoConfig.from_pretrained(str(folder), local_files_only=True)
        if getattr(config, "num_labels", None) != num_classes:
            config.num_labels = num_classes
            config.id2label = {i: str(i) for i in range(num_classes)}
            config.label2id = {str(i): i for i in range(num_classes)}
        if hasattr(config, "num_channels"):
            config.num_channels = in_channels
        for key, value in kwargs.items():
            setattr(config, key, value)
        model = AutoModelForImageClassification.from_config(config)
        model.register_forward_hook(_logits)
        return model

    return ArchSpec(name, builder, AUTO_HEAD, f"transformers model from {folder}/config.json")


# Not cached: the folder's config.json may change between runs.
register_arch_prefix(PREFIX, hf_arch, cache=False)
