"""The in-memory dataset bundle every part of dtprobe consumes.

Evaluation data is decoded and transformed once into tensors and reused for
every checkpoint; the source label drives training and the source head, the
``factors`` are downstream tasks labelled on the same images.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from dtprobe.errors import DatasetError


@dataclass
class Split:
    """One split: images, source labels, downstream factors and stable sample ids.

    ``images`` are normalised float32 ``(n, C, H, W)``, or a
    :class:`~dtprobe.data.pixels.RawImages` (uint8 pixels in memory or in an image store,
    normalised when indexed). ``sample_ids`` name each image stably (a folder image's path
    relative to the dataset root, ``split:index`` for array datasets); ``None`` where a loader
    does not provide them.
    """

    images: Any
    labels: torch.Tensor
    factors: dict[str, torch.Tensor] = field(default_factory=dict)
    sample_ids: list[str] | None = None

    def __len__(self) -> int:
        return int(self.labels.shape[0])


@dataclass
class DatasetBundle:
    """A dataset ready for training and analysis.

    Attributes
    ----------
    name, params : registry name and the keyword arguments that rebuild it (recorded in manifests).
    train, test : the two splits.
    num_classes : number of source classes.
    factor_classes : downstream task name -> number of classes.
    class_names : names of the source classes.
    mean, std : per-channel normalisation already applied to ``images``.
    skipped : files left out because they could not be decoded (``skip_bad_images``), each
        ``{"split", "id", "reason"}``; empty otherwise.
    """

    name: str
    params: dict[str, Any]
    train: Split
    test: Split
    num_classes: int
    factor_classes: dict[str, int]
    class_names: list[str]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    skipped: list[dict[str, str]] = field(default_factory=list)

    @property
    def in_channels(self) -> int:
        return int(self.train.images.shape[1])

    @property
    def image_size(self) -> int:
        return int(self.train.images.shape[-1])


# Shared by the generated datasets (shapes, textures): argument checks and normalised splits.

def check_int(dataset: str, name: str, value: Any, minimum: int) -> int:
    """``value`` as an ``int >= minimum``, else a one-line :class:`DatasetError`."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise DatasetError(f"{dataset}: {name}={value!r} must be an integer >= {minimum}")
    return int(value)


def check_noise(dataset: str, noise: float) -> float:
    """``noise`` as a finite float ``>= 0``, else a one-line :class:`DatasetError`."""
    if not np.isfinite(noise) or noise < 0:
        raise DatasetError(f"{dataset}: noise={noise!r} must be a finite number >= 0")
    return float(noise)


def normalised_splits(
    train: tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]],
    test: tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]],
) -> tuple[Split, Split, tuple[float, ...], tuple[float, ...]]:
    """Float ``(images, labels, factors)`` splits normalised with the train split's
    per-channel mean and std (float64 statistics; a constant channel keeps std 1)."""
    mean = train[0].mean(axis=(0, 2, 3), dtype=np.float64)
    std = train[0].std(axis=(0, 2, 3), dtype=np.float64)
    std = np.where(std > 0, std, 1.0)

    def split(x: np.ndarray, y: np.ndarray, f: dict[str, np.ndarray]) -> Split:
        x = (x - mean[None, :, None, None].astype(np.float32)) / std[None, :, None, None].astype(
            np.float32)
        return Split(images=torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)),
                     labels=torch.from_numpy(y),
                     factors={k: torch.from_numpy(v) for k, v in f.items()})

    return (split(*train), split(*test), tuple(float(m) for m in mean),
            tuple(float(s) for s in std))
