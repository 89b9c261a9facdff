"""Deterministic, stable subsets of a split: the same images for every checkpoint and analysis.

``--max-samples N`` keeps at most ``N`` images of each split, stratified by class (each class
keeps its share of the split, rounded by largest remainder, so no class vanishes while ``N`` is
at least the number of classes). Inside a class, the images kept are those whose *sample id*
(a folder image's path relative to the dataset root, an array dataset's ``split:index``) has
the smallest keyed hash ``sha256(seed:id)``. The choice therefore depends only on the ids, not
on file order, the machine or the number of workers, and adding images to a class swaps out only
the few whose hashes the newcomers undercut. The subset is identified by
:func:`sample_ids_digest`, recorded with the results so that two analyses can be compared.

Selection happens before decoding where the loader can (folder datasets list their files,
choose, then decode only the chosen ones), so a 50,000-image subset of a 1.28M-image training
folder costs 50,000 decodes.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np

from dtprobe.errors import DatasetError

__all__ = ["check_max_samples", "sample_ids_digest", "sample_ranks", "stable_subset"]


def check_max_samples(name: str, max_samples: int | None) -> int | None:
    """``max_samples`` validated (``None`` or an int >= 1), else a one-line DatasetError."""
    if max_samples is None:
        return None
    if isinstance(max_samples, bool) or not isinstance(max_samples, int) or max_samples < 1:
        raise DatasetError(f"{name}: max_samples={max_samples!r} must be an integer >= 1 or "
                           "None (pass --max-samples N)")
    return max_samples


def _rank(sample_id: str, seed: int | str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{sample_id}".encode()).digest()[:8], "big")


def sample_ranks(sample_ids: Sequence[str], key: int | str = 0) -> np.ndarray:
    """The hash rank of every sample id under ``key``: the first 8 bytes (big-endian) of
    ``sha256(f"{key}:{id}")`` as uint64. :func:`stable_subset` keeps the smallest ranks under
    its seed; other stable draws (few-shot shots: :mod:`dtprobe.metrics.fewshot`) use their
    own key."""
    return np.fromiter((_rank(s, key) for s in sample_ids), dtype=np.uint64,
                       count=len(sample_ids))


def _quotas(counts: np.ndarray, total: int) -> np.ndarray:
    """Per-class sizes summing to ``total``, proportional to ``counts`` (largest remainder;
    ties broken by class order), never above a class's count."""
    exact = counts * (total / counts.sum())
    quota = np.floor(exact).astype(np.int64)
    order = np.lexsort((np.arange(len(counts)), -(exact - quota)))
    for c in order[: total - int(quota.sum())]:
        quota[c] += 1
    return np.minimum(quota, counts)


def stable_subset(sample_ids: Sequence[str], labels: np.ndarray, max_samples: int | None,
                  seed: int = 0) -> np.ndarray:
    """Indices (ascending) of a class-stratified subset of at most ``max_samples`` samples.

    Parameters
    ----------
    sample_ids : one stable string per sample (unique within the split).
    labels : integer class of each sample.
    max_samples : size of the subset; ``None`` or at least ``len(labels)`` keeps every sample.
    seed : changes which samples are drawn (the default 0 is what ``--max-samples`` uses).

    Returns
    -------
    numpy.ndarray of int64
        Sorted indices into the split.
    """
    labels = np.asarray(labels)
    n = len(labels)
    if len(sample_ids) != n:
        raise ValueError(f"{len(sample_ids)} sample ids for {n} labels")
    if max_samples is None or max_samples >= n:
        return np.arange(n, dtype=np.int64)
    classes, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
    quota = _quotas(counts, max_samples)
    ranks = sample_ranks(sample_ids, seed)
    keep: list[np.ndarray] = []
    for c in range(len(classes)):
        members = np.flatnonzero(inverse == c)
        # stable sort on (rank, index): equal hashes (never in practice) stay deterministic
        keep.append(members[np.argsort(ranks[members], kind="stable")[: quota[c]]])
    return np.sort(np.concatenate(keep)).astype(np.int64)


def sample_ids_digest(sample_ids: Sequence[str]) -> str:
    """sha256 (hex, first 16 digits) of the ids in order: equal digests, equal images."""
    h = hashlib.sha256()
    for s in sample_ids:
        h.update(s.encode("utf-8", "surrogateescape"))
        h.update(b"\n")
    return h.hexdigest()[:16]
