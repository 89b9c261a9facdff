"""The model/data description every integration records (shared constructor arguments)."""

from __future__ import annotations

import importlib
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from dtprobe.integrations.loop import ensure_manifest


@dataclass
class RunSpec:
    """What ``dtprobe analyze`` needs to rebuild the model and data of a run."""

    run_dir: str | os.PathLike[str] | None
    arch: str
    num_classes: int
    dataset: str | Mapping[str, Any]
    arch_params: Mapping[str, Any] | None = None
    penultimate: str | None = None
    training: Mapping[str, Any] = field(default_factory=dict)
    seed: int | None = None

    def ensure(self, run_dir: str | os.PathLike[str]) -> None:
        ensure_manifest(run_dir, arch=self.arch, num_classes=self.num_classes,
                        dataset=self.dataset, arch_params=self.arch_params,
                        penultimate=self.penultimate, training=self.training, seed=self.seed)


def require(module: str, extra: str) -> Any:
    """Import ``module`` or raise an ImportError that names the extra to install."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ImportError(f"{module} is not installed; install it with "
                          f"`pip install 'dtprobe[{extra}]'`") from exc
