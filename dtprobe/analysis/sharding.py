"""Image sharding under torchrun: the ranks split the images of every checkpoint.

Checkpoint sharding (rank r of W analyses checkpoints r, r + W, ...) leaves ranks idle when a
run has fewer checkpoints than ranks (a ResNet-50 with 5 checkpoints on 8 GPUs). Then each
rank extracts its contiguous share of the rows of both splits of *every* checkpoint
(:func:`row_range`) and writes it to the feature cache as a part file; rank 0, building the
table, finds the parts, concatenates them in row order and caches the whole
(:func:`assemble`), so everything after extraction (metrics, CKA, the table) is the
single-process code on the same features. The parts are removed once the whole is cached.

``--shard auto`` (the default) shards images when the run has fewer checkpoints than ranks,
checkpoints otherwise; ``--shard images`` / ``--shard checkpoints`` force one.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import torch

from dtprobe.analysis.data import EvalData
from dtprobe.analysis.features import (
    extract_for_cache,
    features_key,
    load_model,
    plan_head,
    read_checkpoint,
)
from dtprobe.analysis.plan import AnalysisOptions, PlannedCheckpoint, RunPlan
from dtprobe.data.pixels import is_raw
from dtprobe.errors import ConfigError

__all__ = ["SHARD_MODES", "assemble", "extract_share", "part_key", "row_range",
           "shard_mode"]

SHARD_MODES = ("auto", "checkpoints", "images")


def shard_mode(choice: str, checkpoints: int, world_size: int) -> str:
    """``"images"`` or ``"checkpoints"`` for ``--shard choice`` (see the module docstring)."""
    if choice not in SHARD_MODES:
        raise ConfigError(f"--shard {choice!r}: choose one of {', '.join(SHARD_MODES)}")
    if choice == "auto":
        return "images" if world_size > 1 and checkpoints < world_size else "checkpoints"
    return choice


def row_range(n: int, part: int, parts: int) -> tuple[int, int]:
    """Rows ``[start, stop)`` of share ``part`` of ``parts`` (sizes differ by at most one)."""
    return n * part // parts, n * (part + 1) // parts


def part_key(key: str, part: int, parts: int, n: int) -> str:
    """Cache key of share ``part`` of ``parts`` of the ``n`` rows cached under ``key``."""
    text = json.dumps(["rows", key, part, parts, n])
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def image_rows(images: Any, start: int, stop: int) -> Any:
    """Rows ``[start, stop)`` of a float tensor or :class:`RawImages`, as a view."""
    return images.rows(start, stop) if is_raw(images) else images[start:stop]


def assemble(cache: Any, key: str, n: int, parts: int) -> dict[str, torch.Tensor] | None:
    """The whole of ``key`` from its ``parts`` part files (cached under ``key`` and the parts
    removed), or None when a part is missing or does not fit (then the caller extracts)."""
    pieces = []
    for part in range(parts):
        start, stop = row_range(n, part, parts)
        if stop == start:
            continue  # more ranks than rows: an empty share writes nothing
        hit = cache.get(part_key(key, part, parts, n))
        if hit is None or int(hit["features"].shape[0]) != stop - start:
            return None
        pieces.append(hit)
    if not pieces:
        return None
    if set(pieces[0]) != set().union(*pieces):
        return None
    whole = {name: torch.cat([p[name] for p in pieces]) for name in pieces[0]}
    cache.put(key, whole)
    for part in range(parts):
        cache.remove(part_key(key, part, parts, n))
    return whole


def extract_share(plan: RunPlan, ckpt: PlannedCheckpoint, data: EvalData, cache: Any,
                  device: torch.device, opts: AnalysisOptions, part: int, parts: int) -> None:
    """Extract this rank's rows of both splits of ``ckpt`` into part files (skipping what is
    cached already, whole or as this part)."""
    # verified first: the cache keys are the file's checked sha256, as rank 0 will compute them
    blob = read_checkpoint(plan, ckpt, opts)
    todo = []
    for split, images in (("train", data.train_images), ("test", data.test_images)):
        key = features_key(ckpt, data, split, opts)
        n = len(images)
        pk = part_key(key, part, parts, n)
        if cache.get(key) is None and cache.get(pk) is None:
            todo.append((split, image_rows(images, *row_range(n, part, parts)), pk))
    if not todo:
        return
    model, _ = load_model(plan, ckpt, data.bundle.in_channels, opts, blob)
    del blob
    model = model.to(device)
    head = plan_head(model, plan)
    for split, images, pk in todo:
        if len(images):
            cache.put(pk, extract_for_cache(model, head, images, ckpt, split, device, opts))
