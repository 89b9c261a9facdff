"""Inference engines for feature extraction (``extract_features(..., engine=...)``).

=========  =====================================================================================
engine     what runs the forward passes
=========  =====================================================================================
eager      PyTorch itself, on the BatchNorm-folded inference copy (the default; CPU and CUDA)
onnx       ONNX Runtime's CPU provider, on an ONNX export of the same folded copy
           (:mod:`dtprobe.features.engines.onnx`; ``pip install 'dtprobe[onnx]'``)
=========  =====================================================================================

Every engine returns what the eager path returns (``features``, ``logits``, ``layer:<name>``).
A non-eager engine checks its outputs against the eager network on the first images of every
call, and hands the call back to the eager path, with a warning, when they disagree or the
network cannot be exported.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from dtprobe.errors import ConfigError

__all__ = ["ENGINES", "check_engine", "run_engine"]

#: Engine names accepted by ``extract_features(engine=...)`` and ``dtprobe analyze --engine``.
ENGINES = ("eager", "onnx")


def check_engine(engine: str, device: torch.device | str | None = None,
                 amp: bool | None = None) -> None:
    """Raise :class:`ConfigError` (one line) unless ``engine`` can run here.

    Parameters
    ----------
    engine : one of :data:`ENGINES`.
    device : where the extraction runs; ``"onnx"`` needs the CPU.
    amp : the ``amp`` option of the extraction; ``"onnx"`` runs in float32 only.
    """
    if not isinstance(engine, str) or engine not in ENGINES:
        raise ConfigError(f"--engine must be one of {', '.join(ENGINES)}, got {engine!r}")
    if engine == "eager":
        return
    from dtprobe.features.engines import onnx as onnx_engine

    onnx_engine.require_onnxruntime()
    if device is not None and torch.device(device).type != "cpu":
        raise ConfigError(f"--engine onnx runs on the CPU (ONNX Runtime's CPU provider), not "
                          f"{device}; pass --device cpu, or --engine eager")
    if amp:
        raise ConfigError("--engine onnx computes in float32; bf16 autocast (amp=True) needs "
                          "engine='eager'")


def run_engine(engine: str, model: nn.Module, head: nn.Module, images, *,
               batch_size: int, layers: Sequence[str], fold_batchnorm: bool
               ) -> dict[str, torch.Tensor] | None:
    """Outputs of ``model`` over ``images`` computed by ``engine`` (see
    :func:`dtprobe.features.engines.onnx.extract_onnx`), or ``None`` when the caller must run the
    eager
    path instead (a warning says why)."""
    from dtprobe.features.engines import onnx as onnx_engine

    if engine != "onnx":  # check_engine ran first; nothing else reaches here
        raise ConfigError(f"--engine must be one of {', '.join(ENGINES)}, got {engine!r}")
    return onnx_engine.extract_onnx(model, head, images, batch_size=batch_size, layers=layers,
                                    fold_batchnorm=fold_batchnorm)
