"""Decoding image files to uint8 arrays, in parallel DataLoader worker processes.

One rule for every folder dataset: the shorter side is resized to ``size`` (bilinear, PIL's
draft mode first downscales JPEGs by a power of two), then the centre ``size x size`` square is
cropped; ``size=None`` keeps the file's size (all files must then share it). Workers decode
independent files, so the result is the same for any number of workers.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence

import numpy as np
import torch

from dtprobe.errors import DatasetError

__all__ = ["DECODER_TAG", "decode_batches", "decode_image", "default_workers"]

#: Names the decoding rule in image store keys: change it when the rule changes.
DECODER_TAG = "pil-rgb-shorter-side-bilinear-centre-crop-v1"


def decode_image(name: str, path: str, size: int | None) -> np.ndarray:
    """One image file as uint8 ``(3, S, S)`` (see the module docstring)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            if size is not None:
                im.draft("RGB", (size, size))  # fast JPEG downscale by a power of two
            im = im.convert("RGB")
            if size is not None:
                w, h = im.size
                scale = size / min(w, h)
                nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
                im = im.resize((nw, nh), Image.BILINEAR, reducing_gap=3.0)
                left, top = (nw - size) // 2, (nh - size) // 2
                im = im.crop((left, top, left + size, top + size))
            arr = np.asarray(im, dtype=np.uint8)
    except (OSError, UnidentifiedImageError, ValueError) as err:
        raise DatasetError(f"{name}: cannot decode image {path} ({type(err).__name__}: "
                           f"{err}); remove or replace it") from None
    return np.ascontiguousarray(arr.transpose(2, 0, 1))


class _Files(torch.utils.data.Dataset):
    """Decoded files; a decoding error is returned as text (re-raised by the parent on one
    line, instead of the DataLoader's wrapped worker traceback)."""

    def __init__(self, name: str, paths: Sequence[str], size: int | None):
        self.name, self.paths, self.size = name, paths, size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[int, np.ndarray | str]:
        try:
            return i, decode_image(self.name, self.paths[i], self.size)
        except DatasetError as err:
            return i, str(err)


class _Collate:
    """Stacks a batch, or returns the one-line reason it cannot (naming the file)."""

    def __init__(self, paths: Sequence[str]):
        self.paths = paths

    def __call__(self, items: list[tuple[int, np.ndarray | str]]) -> np.ndarray | str:
        for _, item in items:
            if isinstance(item, str):
                return item
        first = items[0][1].shape
        for i, item in items:
            if item.shape != first:
                return (f"{self.paths[i]} is {item.shape[2]}x{item.shape[1]}, others are "
                        f"{first[2]}x{first[1]}; pass image_size to resize")
        return np.stack([item for _, item in items])


def default_workers() -> int:
    """Decoding processes: one per usable core, at most 8 (0, i.e. in-process, on one core)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - macOS
        cores = os.cpu_count() or 1
    return 0 if cores <= 1 else min(8, cores)


def decode_batches(name: str, paths: Sequence[str], size: int | None,
                   workers: int | None = None, batch_size: int = 64) -> Iterator[np.ndarray]:
    """uint8 ``(m, 3, S, S)`` batches of ``paths`` in order, decoded by ``workers`` processes
    (default :func:`default_workers`; 0 decodes in this process). Raises a one-line
    :class:`DatasetError` naming the first file that cannot be decoded."""
    workers = default_workers() if workers is None else workers
    if len(paths) < 4 * batch_size:
        workers = 0  # a few images: starting processes costs more than it saves
    loader = torch.utils.data.DataLoader(
        _Files(name, paths, size), batch_size=batch_size, shuffle=False, num_workers=workers,
        collate_fn=_Collate(paths), prefetch_factor=2 if workers else None,
        persistent_workers=False)
    for batch in loader:
        if isinstance(batch, str):
            raise DatasetError(batch if batch.startswith(f"{name}:") else f"{name}: {batch}")
        yield batch
