"""The in-memory dataset bundle every part of dtprobe consumes.

Evaluation data is decoded and transformed once into tensors and reused for
every checkpoint; the source label drives training and the source head, the
``factors`` are downstream tasks labelled on the same images.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


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
