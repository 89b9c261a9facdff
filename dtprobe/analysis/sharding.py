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

from typing import Any

import torch

from dtprobe.analysis.data import EvalData
from dtprobe.analysis.features import LoadedCheckpoint, features_key
from dtprobe.analysis.plan import AnalysisOptions, PlannedCheckpoint, RunPlan
from dtprobe.analysis.shares import (  # noqa: F401  (re-exported: this module's former names)
    SHARD_MODES,
    assemble,
    image_rows,
    part_key,
    row_range,
    shard_mode,
)

__all__ = ["SHARD_MODES", "assemble", "extract_share", "part_key", "row_range",
           "shard_mode"]

def extract_share(plan: RunPlan, ckpt: PlannedCheckpoint, data: EvalData, cache: Any,
                  device: torch.device, opts: AnalysisOptions, part: int, parts: int) -> None:
    """Extract this rank's rows of both splits of ``ckpt`` into part files (skipping what is
    cached already, whole or as this part)."""
    # verified first: the cache keys are the file's checked sha256, as rank 0 will compute them;
    # the folding is checked on the first test images of the whole split, the same on every rank
    with LoadedCheckpoint(plan, ckpt, opts, data.bundle.in_channels, device,
                          data.test_images) as loaded:
        for split, images in (("train", data.train_images), ("test", data.test_images)):
            key = features_key(ckpt, data, split, opts)
            n = len(images)
            pk = part_key(key, part, parts, n)
            if cache.get(key) is None and cache.get(pk) is None:
                rows = image_rows(images, *row_range(n, part, parts))
                if len(rows):
                    cache.put(pk, loaded.extract(rows, split, opts))
