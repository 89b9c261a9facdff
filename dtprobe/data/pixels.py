"""Raw uint8 images normalised on use: the compact form of a split's images.

A :class:`RawImages` stands where a :class:`~dtprobe.data.base.Split` holds a float32 tensor:
indexing it (``images[a:b]``, ``images[idx]``) returns normalised float32 images, exactly the
values the in-memory loaders compute (``(x / 255 - mean) / std`` in float32, in that order), so
code written for tensors keeps working. Feature extraction reads the raw pixels instead
(:meth:`RawImages.raw`), moves a quarter of the bytes to the device and normalises there
(:meth:`RawImages.normalise`). The pixels live in memory (a uint8 tensor) or in an
:class:`~dtprobe.data.store.ImageStore` on disk, read one batch at a time.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from dtprobe.data.store import ImageStore

__all__ = ["RawImages", "is_raw"]

_CHUNK = 1024  # rows per copy when moving a store to a device


class RawImages:
    """uint8 ``(n, C, H, W)`` pixels plus the per-channel ``mean``/``std`` that normalise them.

    Parameters
    ----------
    pixels : a uint8 tensor ``(n, C, H, W)`` in memory, or an :class:`ImageStore`.
    mean, std : per-channel statistics of intensities in [0, 1].
    """

    ndim = 4
    dtype = torch.float32  # what indexing returns

    def __init__(self, pixels: torch.Tensor | ImageStore, mean: Sequence[float],
                 std: Sequence[float]):
        self.pixels = pixels
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self._stats: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    # ------------------------------------------------------------------ tensor-like surface
    @property
    def shape(self) -> torch.Size:
        if isinstance(self.pixels, ImageStore):
            return torch.Size((self.pixels.n, *self.pixels.shape))
        return self.pixels.shape

    def __len__(self) -> int:
        return int(self.shape[0])

    @property
    def device(self) -> torch.device:
        """Where the pixels are (a store is read on the CPU)."""
        return torch.device("cpu") if self.stored else self.pixels.device

    @property
    def stored(self) -> bool:
        """Whether the pixels are read from a store on disk (not held in memory)."""
        return isinstance(self.pixels, ImageStore)

    @property
    def nbytes(self) -> int:
        """Bytes held in memory (0 for a store: only the batch being read is resident)."""
        return 0 if self.stored else int(self.pixels.nbytes)

    def is_pinned(self) -> bool:
        return False

    def size(self, dim: int | None = None):
        return self.shape if dim is None else self.shape[dim]

    def __getitem__(self, key) -> torch.Tensor:
        """Normalised float32 images of a slice, an int or an index tensor/array."""
        if isinstance(key, slice):
            start, stop, step = key.indices(len(self))
            if step == 1:
                return self.normalise(self.raw(start, stop))
            key = np.arange(start, stop, step)
        if isinstance(key, int):
            return self.normalise(self.raw(key, key + 1))[0]
        return self.normalise(self.take(key))

    # ------------------------------------------------------------------------ raw access
    def raw(self, start: int, stop: int) -> torch.Tensor:
        """uint8 pixels of rows ``[start, stop)`` (a CPU tensor)."""
        if isinstance(self.pixels, ImageStore):
            return torch.from_numpy(self.pixels.read(start, stop))
        return self.pixels[start:stop]

    def take(self, index) -> torch.Tensor:
        """uint8 pixels of the rows ``index`` (any order; read in runs from a store)."""
        idx = np.asarray(index.cpu() if isinstance(index, torch.Tensor) else index,
                         dtype=np.int64).reshape(-1)
        if not isinstance(self.pixels, ImageStore):
            return self.pixels[torch.from_numpy(idx)]
        out = np.empty((len(idx), *self.pixels.shape), dtype=np.uint8)
        order = np.argsort(idx, kind="stable")
        sorted_idx = idx[order]
        # contiguous runs of the sorted rows are read with one pread each
        breaks = np.flatnonzero(np.diff(sorted_idx) != 1) + 1
        for run in np.split(np.arange(len(idx)), breaks):
            if len(run):
                block = self.pixels.read(int(sorted_idx[run[0]]), int(sorted_idx[run[-1]]) + 1)
                out[order[run]] = block
        return torch.from_numpy(out)

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        """float32 ``(x / 255 - mean) / std`` of uint8 ``x``, on ``x``'s device."""
        stats = self._stats.get(x.device)
        if stats is None:  # made once per device: no host-to-device copy per batch
            stats = tuple(torch.tensor(v, dtype=torch.float32, device=x.device)[None, :, None, None]
                          for v in (self.mean, self.std))
            self._stats[x.device] = stats
        m, s = stats
        return x.float().div_(255).sub_(m).div_(s)

    # ------------------------------------------------------------------------- variants
    def with_stats(self, mean: Sequence[float], std: Sequence[float]) -> RawImages:
        """The same pixels normalised with other statistics (e.g. a source model's)."""
        return RawImages(self.pixels, mean, std)

    def rows(self, start: int, stop: int) -> RawImages:
        """Rows ``[start, stop)`` as RawImages (a view: nothing is read or copied)."""
        if isinstance(self.pixels, ImageStore):
            return RawImages(self.pixels.rows(start, stop), self.mean, self.std)
        return RawImages(self.pixels[start:stop], self.mean, self.std)

    def in_memory(self) -> RawImages:
        """The same images with the pixels read into a uint8 tensor."""
        if not self.stored:
            return self
        return RawImages(self.raw(0, len(self)).clone(), self.mean, self.std)

    def to(self, device: torch.device | str) -> RawImages:
        """The pixels moved to ``device`` (a store is copied in chunks, never whole on the host)."""
        if not self.stored:
            return RawImages(self.pixels.to(device), self.mean, self.std)
        out = torch.empty(tuple(self.shape), dtype=torch.uint8, device=device)
        for start in range(0, len(self), _CHUNK):
            out[start:start + _CHUNK].copy_(self.raw(start, start + _CHUNK))
        return RawImages(out, self.mean, self.std)

    def __repr__(self) -> str:
        where = f"store {self.pixels.path.name}" if self.stored else "memory"
        return f"RawImages({tuple(self.shape)}, uint8 in {where})"


def is_raw(images: object) -> bool:
    """Whether ``images`` is a :class:`RawImages` (else a float32 tensor)."""
    return isinstance(images, RawImages)
