"""Feature extraction for checkpoint series, with an on-disk cache.

One forward pass per image and checkpoint yields the logits, the penultimate features (the
head's input) and any requested intermediate layers (global-average-pooled). Results are cached
under ``RUN_DIR/analysis/features/`` keyed by checkpoint sha256 + dataset + split + layers, so
adding a metric or a checkpoint never re-runs the network for what is already there.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from dtprobe.models.tap import PenultimateTap
from dtprobe.training.distributed import autocast

CACHE_VERSION = 1


def _pool(t: torch.Tensor) -> torch.Tensor:
    # Convolutional maps are summarised by their spatial mean (as in most CKA studies).
    return t.mean(dim=tuple(range(2, t.ndim))) if t.ndim > 2 else t.flatten(1)


@torch.inference_mode()
def extract_features(model: nn.Module, head: nn.Module, images: torch.Tensor, *,
                     device: torch.device, batch_size: int = 512,
                     layers: Sequence[str] = ()) -> dict[str, torch.Tensor]:
    """Run ``model`` over ``images`` once and collect its outputs.

    Parameters
    ----------
    model, head : the network and its classification head (its input = penultimate features).
    images : (n, C, H, W) float tensor, normalised, on the CPU (pinned when ``device`` is CUDA).
    device : where to run; on CUDA, bf16 autocast and channels_last are used.
    batch_size : images per forward pass.
    layers : dotted module names whose outputs are also returned (pooled to (n, channels)).

    Returns
    -------
    dict with ``features`` (n, d) and ``logits`` (n, C) as float32 CPU tensors, plus
    ``layer:<name>`` entries for each requested layer.
    """
    model.eval()
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    tap = PenultimateTap(head)
    captured: dict[str, torch.Tensor] = {}
    handles = []
    for name in layers:
        module = model.get_submodule(name)
        handles.append(module.register_forward_hook(
            lambda _m, _a, out, name=name: captured.__setitem__(name, _pool(out))))
    chunks: dict[str, list[torch.Tensor]] = {}
    try:
        for start in range(0, images.shape[0], batch_size):
            x = images[start:start + batch_size].to(device, non_blocking=True)
            if device.type == "cuda":
                x = x.contiguous(memory_format=torch.channels_last)
            with autocast(device):
                logits = model(x)
            outs = {"features": tap.features, "logits": logits}
            outs.update({f"layer:{k}": v for k, v in captured.items()})
            for key, val in outs.items():
                chunks.setdefault(key, []).append(val.float().cpu())
    finally:
        tap.remove()
        for h in handles:
            h.remove()
    return {k: torch.cat(v) for k, v in chunks.items()}


def cache_key(checkpoint_sha256: str, dataset_key: str, split: str, layers: Sequence[str]) -> str:
    payload = json.dumps([CACHE_VERSION, checkpoint_sha256, dataset_key, split, sorted(layers)])
    return hashlib.sha256(payload.encode()).hexdigest()[:32]


def dataset_key(name: str, params: dict) -> str:
    """A stable string identifying a dataset (name + its generating parameters)."""
    return f"{name}:{json.dumps(params, sort_keys=True, default=str)}"


class FeatureCache:
    """Safetensors files under ``root`` keyed by :func:`cache_key` (no pickle involved).

    ``reuse=False`` ignores existing entries (they are recomputed and overwritten); features are
    always written, because the across-epoch metrics stream them back from disk.
    """

    def __init__(self, root: Path | str, reuse: bool = True):
        self.root = Path(root)
        self.reuse = reuse
        self._fresh: set[str] = set()

    def _path(self, key: str) -> Path:
        return self.root / f"{key}.safetensors"

    def get(self, key: str) -> dict[str, torch.Tensor] | None:
        path = self._path(key)
        if (not self.reuse and key not in self._fresh) or not path.exists():
            return None
        try:
            return load_file(path)
        except Exception:  # a torn or foreign file is a cache miss, never an error
            return None

    def put(self, key: str, tensors: dict[str, torch.Tensor]) -> None:
        self._fresh.add(key)
        self.root.mkdir(parents=True, exist_ok=True)
        path = self._path(key)
        tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
        save_file({k: v.contiguous() for k, v in tensors.items()}, tmp)
        os.replace(tmp, path)
