"""Raw uint8 images normalised on use: the compact form of a split's images.

A :class:`RawImages` stands where a :class:`~dtprobe.data.base.Split` holds a float32 tensor:
indexing it (``images[a:b]``, ``images[idx]``) returns normalised float32 images, exactly the
values the in-memory loaders compute (``(x / 255 - mean) / std`` in float32, in that order), so
code written for tensors keeps working. Feature extraction reads the raw pixels instead
(:meth:`RawImages.raw`), moves a quarter of the bytes to the device and normalises there
(:meth:`RawImages.normalise`). The pixels live in memory (a uint8 tensor) or in an
:class:`~dtprobe.data.store.ImageStore` on disk, read one batch at a time.

A :class:`RawImages` may also convert on use: another channel count (1 -> 3: the grey channel
repeated; 3 -> 1: ITU-R BT.601 luma) and another side (bilinear, antialiased, clipped to
[0, 1]), applied per batch to ``x / 255`` before the normalisation. Images resized to a
source model's input (:mod:`dtprobe.data.transfer`) or to a loader's ``image_size`` are thus
never held as float32: memory stays the uint8 pixels (or one batch, from a store).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from dtprobe.data.store import ImageStore

__all__ = ["RawImages", "is_raw"]

_CHUNK = 1024  # rows per copy when moving a store to a device

LUMA = (0.299, 0.587, 0.114)
"""ITU-R BT.601 luma weights for RGB -> grey."""


class RawImages:
    """uint8 ``(n, C, H, W)`` pixels plus the per-channel ``mean``/``std`` that normalise them.

    Parameters
    ----------
    pixels : a uint8 tensor ``(n, C, H, W)`` in memory, or an :class:`ImageStore`.
    mean, std : per-channel statistics of intensities in [0, 1] (of the converted images).
    channels : channel count after conversion (None: the pixels' own; only 1 <-> 3 differ).
    size : ``(H, W)`` after conversion (None: the pixels' own).
    """

    ndim = 4
    dtype = torch.float32  # what indexing returns

    def __init__(self, pixels: torch.Tensor | ImageStore, mean: Sequence[float],
                 std: Sequence[float], channels: int | None = None,
                 size: tuple[int, int] | None = None):
        self.pixels = pixels
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        c, h, w = self.pixel_shape[1:]
        self.channels = None if channels in (None, c) else int(channels)
        if self.channels is not None and (c, self.channels) not in ((1, 3), (3, 1)):
            raise ValueError(f"cannot turn {c}-channel images into {channels} channels (only "
                             "1 <-> 3 is defined)")
        self.size = None if size is None or tuple(size) == (h, w) else (int(size[0]),
                                                                         int(size[1]))
        self._stats: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    # ------------------------------------------------------------------ tensor-like surface
    @property
    def pixel_shape(self) -> torch.Size:
        """``(n, C, H, W)`` of the stored uint8 pixels (what :meth:`raw` returns)."""
        if isinstance(self.pixels, ImageStore):
            return torch.Size((self.pixels.n, *self.pixels.shape))
        return self.pixels.shape

    @property
    def converts(self) -> bool:
        """Whether use changes the channel count or the side (not only the normalisation)."""
        return self.channels is not None or self.size is not None

    @property
    def shape(self) -> torch.Size:
        """``(n, C, H, W)`` of the normalised images indexing returns."""
        n, c, h, w = self.pixel_shape
        out_c = c if self.channels is None else self.channels
        return torch.Size((n, out_c, *((h, w) if self.size is None else self.size)))

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
        """float32 ``(convert(x / 255) - mean) / std`` of uint8 ``x``, on ``x``'s device
        (``convert``: the channel and size conversion, when there is one)."""
        stats = self._stats.get(x.device)
        if stats is None:  # made once per device: no host-to-device copy per batch
            stats = tuple(torch.tensor(v, dtype=torch.float32, device=x.device)[None, :, None, None]
                          for v in (self.mean, self.std))
            self._stats[x.device] = stats
        m, s = stats
        return self.convert(x).sub_(m).div_(s)

    def convert(self, x: torch.Tensor) -> torch.Tensor:
        """float32 ``x / 255`` of uint8 ``x``, converted (channels, then side; clipped to
        [0, 1] after a resize), not normalised: intensities in [0, 1]."""
        x = x.float().div_(255)
        if self.channels is not None:
            if x.shape[1] == 1:
                x = x.expand(-1, self.channels, -1, -1)
            else:  # 3 -> 1
                w = torch.tensor(LUMA, dtype=x.dtype, device=x.device)[None, :, None, None]
                x = (x * w).sum(dim=1, keepdim=True)
        if self.size is not None:
            x = F.interpolate(x, size=self.size, mode="bilinear", align_corners=False,
                              antialias=True).clamp_(0.0, 1.0)
        elif self.channels is not None:
            x = x.contiguous()  # an expanded view must not be written in place
        return x

    # ------------------------------------------------------------------------- variants
    def with_stats(self, mean: Sequence[float], std: Sequence[float]) -> RawImages:
        """The same pixels normalised with other statistics (e.g. a source model's)."""
        return self._like(self.pixels, mean, std)

    def converted(self, channels: int | None, size: tuple[int, int] | None,
                  mean: Sequence[float], std: Sequence[float]) -> RawImages:
        """The same pixels converted on use to ``channels`` and ``size`` (None: the pixels'
        own) and normalised with ``mean``/``std`` (see the module docstring)."""
        return RawImages(self.pixels, mean, std, channels, size)

    def _like(self, pixels: torch.Tensor | ImageStore, mean: Sequence[float] | None = None,
              std: Sequence[float] | None = None) -> RawImages:
        return RawImages(pixels, self.mean if mean is None else mean,
                         self.std if std is None else std, self.channels, self.size)

    def rows(self, start: int, stop: int) -> RawImages:
        """Rows ``[start, stop)`` as RawImages (a view: nothing is read or copied)."""
        if isinstance(self.pixels, ImageStore):
            return self._like(self.pixels.rows(start, stop))
        return self._like(self.pixels[start:stop])

    def subset(self, index) -> RawImages:
        """The rows ``index`` as RawImages in memory (uint8: a quarter of float32)."""
        return self._like(self.take(index))

    def in_memory(self) -> RawImages:
        """The same images with the pixels read into a uint8 tensor."""
        if not self.stored:
            return self
        return self._like(self.raw(0, len(self)).clone())

    def to(self, device: torch.device | str) -> RawImages:
        """The pixels moved to ``device`` (a store is copied in chunks, never whole on the host)."""
        if not self.stored:
            return self._like(self.pixels.to(device))
        out = torch.empty(tuple(self.pixel_shape), dtype=torch.uint8, device=device)
        for start in range(0, len(self), _CHUNK):
            out[start:start + _CHUNK].copy_(self.raw(start, start + _CHUNK))
        return self._like(out)

    def __repr__(self) -> str:
        where = f"store {self.pixels.path.name}" if self.stored else "memory"
        conv = f", used as {tuple(self.shape[1:])}" if self.converts else ""
        return f"RawImages({tuple(self.pixel_shape)}, uint8 in {where}{conv})"


def is_raw(images: object) -> bool:
    """Whether ``images`` is a :class:`RawImages` (else a float32 tensor)."""
    return isinstance(images, RawImages)
