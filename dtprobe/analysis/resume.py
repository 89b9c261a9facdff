"""Stores that make an analysis resumable and its memory flat.

- :class:`PartStore`: per-checkpoint metric rows, written atomically, reused when their key matches;
- :class:`ReadThroughCache`: another run's feature cache read, this run's written (``--compare``);
- :class:`EpochFeatures`: epoch -> test features read back from the feature cache, few in memory.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

import checkpoints_manifest as cm
from dtprobe.analysis.rows import COLUMNS
from dtprobe.errors import DtprobeError
from dtprobe.features import integrity
from dtprobe.features.cache import FeatureCache, for_compute, for_storage

#: Largest per-checkpoint part file read back (a real one is a few KiB).
MAX_PART_BYTES = 16 << 20
# other_run and diagnostics are optional in a part: finalise_table fills them
_PART_REQUIRED = tuple(c for c in COLUMNS if c not in ("other_run", "diagnostics"))


class PartStore:
    """Per-checkpoint metric rows as small JSON files, reused when their key and seal match.

    Each file is written atomically (unpredictable temporary name, fsync, rename), so a file
    that exists is complete. It carries a seal (:mod:`dtprobe.features.integrity`: an HMAC of its
    rows
    bound to its key, with this user's secret key), so an edited, forged or foreign part is
    recomputed, never reported; so is one that cannot be read, is not a regular file of
    bounded size or does not hold the expected structure. ``reuse=False`` (``--no-cache``)
    recomputes every part.
    """

    def __init__(self, root: Path, reuse: bool = True):
        self.root = root
        self.reuse = reuse

    def _path(self, epoch: int) -> Path:
        return self.root / f"epoch_{epoch:06d}.json"

    @staticmethod
    def _rows_bytes(rows: list[dict[str, Any]]) -> bytes:
        return json.dumps(rows, sort_keys=True).encode()

    def get(self, epoch: int, key: str) -> list[dict[str, Any]] | None:
        if not self.reuse:
            return None
        try:
            doc = json.loads(cm.read_regular_file(self._path(epoch), MAX_PART_BYTES, "part"))
        except Exception:  # absent, torn, foreign (any class): a miss, never an error
            return None
        if not isinstance(doc, dict) or doc.get("key") != key:
            return None
        rows = doc.get("rows")
        if not isinstance(rows, list) or not all(
                isinstance(r, dict) and set(_PART_REQUIRED) <= set(r) for r in rows):
            return None
        if not integrity.verify(key, doc.get("seal"), self._rows_bytes(rows)):
            return None
        return rows

    def put(self, epoch: int, key: str, rows: list[dict[str, Any]]) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        seal = integrity.seal(key, self._rows_bytes(rows))
        cm.atomic_write_text(self._path(epoch), json.dumps({"key": key, "rows": rows,
                                                            "seal": seal}))


class ReadThroughCache:
    """Feature cache that reads ``primary`` then ``fallback`` but writes only ``primary``.

    Used for ``--compare``: the other run's cached features are reused, while new ones go to
    this run's own cache, so an analysis never writes into another run's directory (which may
    be under another analysis's lock, or read-only).
    """

    def __init__(self, primary: FeatureCache, fallback: FeatureCache):
        self.primary = primary
        self.fallback = fallback
        self.root = primary.root

    def get(self, key: str) -> dict[str, torch.Tensor] | None:
        hit = self.primary.get(key)
        return hit if hit is not None else self.fallback.get(key)

    def remove(self, key: str) -> None:
        self.primary.remove(key)

    def put(self, key: str, tensors: dict[str, torch.Tensor]) -> None:
        self.primary.put(key, tensors)


class EpochFeatures(Mapping):
    """epoch -> test-split features (penultimate + layers), read back from the feature cache.

    Holds at most ``keep`` epochs in memory (plus the final one, pinned), so the memory of an
    analysis does not grow with the number of checkpoints.
    """

    def __init__(self, cache: FeatureCache, keep: int = 3, dtype: str = "float32"):
        self.cache = cache
        self.keep = keep
        self.dtype = dtype
        self._keys: dict[int, str] = {}
        self._recent: OrderedDict[int, dict[str, torch.Tensor]] = OrderedDict()
        self.pinned: dict[int, dict[str, torch.Tensor]] = {}

    def _select(self, feats: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        # held in the cache's storage dtype (half the memory with --feature-dtype float16:
        # re-rounding values read from a half-precision cache is exact), float32 when read
        return for_storage({k: v for k, v in feats.items()
                            if k == "features" or k.startswith("layer:")}, self.dtype)

    def add(self, epoch: int, key: str, feats: dict[str, torch.Tensor]) -> None:
        self._keys[epoch] = key
        self._remember(epoch, self._select(feats))

    def pin(self, epoch: int) -> None:
        self.pinned[epoch] = self._held(epoch)

    def _remember(self, epoch: int, feats: dict[str, torch.Tensor]) -> None:
        self._recent[epoch] = feats
        self._recent.move_to_end(epoch)
        while len(self._recent) > self.keep:
            self._recent.popitem(last=False)

    def __getitem__(self, epoch: int) -> dict[str, torch.Tensor]:
        """float32 features of ``epoch`` (as checkpoint_features returns them)."""
        return for_compute(self._held(epoch))

    def _held(self, epoch: int) -> dict[str, torch.Tensor]:
        if epoch in self.pinned:
            return self.pinned[epoch]
        if epoch in self._recent:
            self._recent.move_to_end(epoch)
            return self._recent[epoch]
        feats = self.cache.get(self._keys[epoch])
        if feats is None:
            raise DtprobeError(f"cached features of epoch {epoch} vanished from "
                               f"{self.cache.root}; re-run the analysis")
        feats = self._select(feats)
        self._remember(epoch, feats)
        return feats

    def __contains__(self, epoch: object) -> bool:
        return epoch in self._keys

    def __iter__(self):
        return iter(sorted(self._keys))

    def __len__(self) -> int:
        return len(self._keys)

