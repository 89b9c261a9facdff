"""Device selection shared by training and analysis."""

from __future__ import annotations

import torch

from dtprobe.errors import ConfigError


def resolve_device(spec: str | torch.device = "auto") -> torch.device:
    """``"auto"`` gives CUDA when available, else CPU; explicit specs are checked."""
    if isinstance(spec, torch.device):
        return spec
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except RuntimeError as exc:
        raise ConfigError(f"invalid --device {spec!r}: use auto, cpu, cuda or cuda:N") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {spec} requested but CUDA is not available; use --device cpu")
    return device
