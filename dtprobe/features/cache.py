"""The feature cache: keys (checkpoint x dataset x split x layers x dtype), storage dtypes, and
sealed safetensors files (HMAC, :mod:`~dtprobe.features.integrity`) written atomically.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from checkpoints_manifest import atomic_write_bytes, read_regular_file
from dtprobe.checkpoints.reader import split_safetensors
from dtprobe.errors import ConfigError
from dtprobe.features import integrity

#: Version of the cache key recipe and file layout; bumping it invalidates every cached file.
CACHE_VERSION = 1

def cache_key(checkpoint_sha256: str, dataset_key: str, split: str, layers: Sequence[str],
              transform: str = "") -> str:
    """Key of one checkpoint's features on one dataset split.

    Parameters
    ----------
    checkpoint_sha256 : digest of the checkpoint file (or another unique id of its weights).
    dataset_key : :func:`dataset_key` of the evaluation data.
    split : ``"train"`` or ``"test"``.
    layers : extra layers extracted (order does not matter).
    transform : optional tag of any input transform not captured by ``dataset_key``; the
        empty default leaves the key as in earlier versions, so existing caches stay valid.
    """
    parts: list = [CACHE_VERSION, checkpoint_sha256, dataset_key, split, sorted(layers)]
    if transform:
        parts.append(transform)
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:32]


def dataset_key(name: str, params: dict) -> str:
    """A stable string identifying a dataset (name + its generating parameters)."""
    return f"{name}:{json.dumps(params, sort_keys=True, default=str)}"


#: Storage precisions of cached features and layer outputs (``--feature-dtype``).
FEATURE_DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "float16": torch.float16,
                                          "bfloat16": torch.bfloat16}


def resolve_feature_dtype(name: str) -> torch.dtype:
    """The torch dtype of a ``--feature-dtype`` name; :class:`ConfigError` for any other."""
    if not isinstance(name, str) or name not in FEATURE_DTYPES:
        raise ConfigError(f"--feature-dtype {name!r}: pass one of {', '.join(FEATURE_DTYPES)}")
    return FEATURE_DTYPES[name]


def feature_dtype_tag(name: str) -> str:
    """The :func:`cache_key` ``transform`` tag of a storage dtype: empty for float32 (the keys
    of earlier versions), so that half-precision and float32 features never share a key."""
    resolve_feature_dtype(name)
    return "" if name == "float32" else f"dtype={name}"


def for_storage(tensors: dict[str, torch.Tensor], name: str) -> dict[str, torch.Tensor]:
    """``tensors`` as cached with ``--feature-dtype name``: ``features`` and ``layer:*`` in that
    dtype; ``logits`` stay float32, so that the source accuracy (an argmax, often between
    near-tied logits) and the logit-based scores (LEEP, NCE) are not changed by storage.

    Raises
    ------
    ValueError
        A finite value does not fit the dtype (float16 overflows beyond 65504).
    """
    dtype = resolve_feature_dtype(name)
    out = {}
    for key, value in tensors.items():
        if key == "logits" or not value.is_floating_point() or value.dtype == dtype:
            out[key] = value
            continue
        cast = value.to(dtype)
        if not bool(torch.isfinite(cast).all()) and bool(torch.isfinite(value).all()):
            peak = float(value.abs().max())
            raise ValueError(f"{key} reaches |x| = {peak:.3g}, beyond the {name} range "
                             f"({torch.finfo(dtype).max:.6g})")
        out[key] = cast
    return out


def for_compute(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Cached tensors as the metrics read them: half-precision entries cast to float32 (exact:
    every float16 and bfloat16 value is a float32 value)."""
    return {k: v.float() if v.dtype in (torch.float16, torch.bfloat16) else v
            for k, v in tensors.items()}


_REQUIRED = ("features", "logits")


class FeatureCache:
    """Safetensors files under ``root`` keyed by :func:`cache_key` (no pickle involved).

    ``reuse=False`` ignores existing entries (they are recomputed and overwritten); features are
    always written, because the across-epoch metrics stream them back from disk. Files are
    written atomically under an unpredictable temporary name, then renamed
    (:func:`checkpoints_manifest.atomic_writer`), so a reader never sees a partial file and a
    link planted in the folder is never written through. Each file is sealed
    (:mod:`dtprobe.features.integrity`: an HMAC of its tensors bound to its key, with this user's
    secret
    key), and read back only as a regular file of bounded size; a torn, foreign, forged or
    inconsistent file (missing ``features``/``logits``, rows that disagree) is a cache miss,
    never an error and never a result.
    """

    def __init__(self, root: Path | str, reuse: bool = True):
        self.root = Path(root)
        self.reuse = reuse
        self._fresh: set[str] = set()

    def _path(self, key: str) -> Path:
        return self.root / f"{key}.safetensors"

    def __contains__(self, key: str) -> bool:
        return self.get(key) is not None

    def get(self, key: str) -> dict[str, torch.Tensor] | None:
        """The cached tensors of ``key``, or ``None`` (absent, ignored, torn, forged, foreign)."""
        path = self._path(key)
        if not self.reuse and key not in self._fresh:
            return None
        try:
            data = read_regular_file(path, MAX_CACHE_BYTES, "feature file")
            if not _sealed(key, data):
                return None
            tensors = load_safetensors(data)
        except Exception:  # absent, torn, foreign or forged: a cache miss, never an error
            return None
        if any(k not in tensors for k in _REQUIRED):
            return None
        n = tensors["features"].shape[0] if tensors["features"].ndim else -1
        if any(t.ndim == 0 or t.shape[0] != n for t in tensors.values()):
            return None
        return tensors

    def written(self, key: str) -> bool:
        """Whether ``key`` was written by this cache object (in this analysis)."""
        return key in self._fresh

    def remove(self, key: str) -> None:
        """Delete the entry ``key`` if present (e.g. part files once their whole is cached)."""
        self._fresh.discard(key)
        self._path(key).unlink(missing_ok=True)

    def put(self, key: str, tensors: dict[str, torch.Tensor]) -> None:
        """Store ``tensors`` under ``key`` atomically (temporary file, then rename), sealed."""
        self._fresh.add(key)
        self.root.mkdir(parents=True, exist_ok=True)
        contiguous = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
        # The seal covers the tensor entries and bytes, which adding metadata leaves unchanged.
        header, body = split_safetensors(save_safetensors(contiguous))
        mac = integrity.seal(key, _canonical(header), body)
        atomic_write_bytes(self._path(key), save_safetensors(
            contiguous, metadata={"dtprobe_key": key, "dtprobe_mac": mac}))


#: Largest feature file read back (features of a few hundred thousand images).
MAX_CACHE_BYTES = 16 << 30


def _canonical(header: dict) -> bytes:
    """The tensor entries of a header (names, dtypes, shapes, offsets), metadata left out."""
    return json.dumps({k: v for k, v in header.items() if k != "__metadata__"},
                      sort_keys=True).encode()


def _sealed(key: str, data: bytes) -> bool:
    header, body = split_safetensors(data)
    meta = header.get("__metadata__") or {}
    return (isinstance(meta, dict) and meta.get("dtprobe_key") == key
            and integrity.verify(key, meta.get("dtprobe_mac"), _canonical(header), body))
