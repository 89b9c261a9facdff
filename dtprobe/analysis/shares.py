"""Image shares under torchrun (the leaf half of :mod:`~dtprobe.analysis.sharding`): which rows
a rank extracts, the cache key of its part file, and assembling the parts into the whole.

Imports no analysis step, so the plan (``--shard``) and the feature step (reading assembled
parts) use it without depending on :mod:`~dtprobe.analysis.sharding`.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import torch

from dtprobe.data.pixels import is_raw
from dtprobe.errors import ConfigError

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
