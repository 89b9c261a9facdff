"""Decoding image files to uint8 arrays, in parallel DataLoader worker processes.

The evaluation transform
------------------------
One rule for every folder dataset, pixel-identical to torchvision's PIL pipeline
``ImageFolder`` loader + ``Resize(R)`` + ``CenterCrop(C)`` (bilinear, which PIL always
antialiases), so that a model evaluated by dtprobe sees the pixels its training script's
validation loop saw:

1. the file is opened with PIL and converted to RGB (``img.convert("RGB")``, as
   ``torchvision.datasets.folder.pil_loader``). **EXIF orientation is not applied**: neither
   torchvision's PIL loader nor ``Resize``/``CenterCrop`` apply it (``decode_image``'s
   ``apply_exif_orientation`` defaults to False as well), and matching the pixels the
   framework's own evaluation saw matters more than the camera's intent;
2. the shorter side is resized to ``R`` and the longer one to ``int(R * long / short)``
   (truncated, as torchvision computes it), with PIL's bilinear filter (or bicubic, which
   many timm models record in their ``pretrained_cfg``); an image whose shorter side already
   is ``R`` is not resampled;
3. the centre ``C x C`` square is cropped, its top-left corner at
   ``int(round((h - C) / 2))``, ``int(round((w - C) / 2))`` (Python's round-half-even, as
   torchvision).

``R = C`` (the default) is dtprobe's former square rule; the ImageNet convention is
``R = 256, C = 224`` (:data:`IMAGENET_EVAL`). ``C = None`` keeps the file's size (all files
must then share it).

Files a real folder holds
-------------------------
Decoding is bounded in time and memory whatever a file holds. A file is opened with
``O_NONBLOCK`` and refused unless it is a regular file (a FIFO or a device named ``x.jpg``
would block or never end); files over :data:`MAX_FILE_BYTES` are refused unread; the image
size in the header is checked against :data:`MAX_PIXELS` *before* any pixel is decoded (a
decompression bomb, or a header that claims an enormous image, is refused without decoding
it). Any failure is a one-line :class:`~dtprobe.errors.DatasetError` naming the file and the
reason. Workers decode independent files, so the result is the same for any number of workers.
"""

from __future__ import annotations

import os
import stat
import warnings
from collections.abc import Iterator, Sequence

import numpy as np
import torch

from dtprobe.errors import DatasetError

__all__ = ["DECODER_TAG", "IMAGENET_EVAL", "INTERPOLATIONS", "MAX_FILE_BYTES", "MAX_PIXELS",
           "decode_batches", "decode_image", "default_workers", "resized_size"]

#: Names the decoding rule in image store keys: change it when the rule changes.
DECODER_TAG = "pil-rgb-torchvision-resize-centercrop-v2"
#: ``(resize_size, image_size)`` of the ImageNet evaluation convention (torchvision's
#: ``Resize(256) + CenterCrop(224)``; timm's ``crop_pct=0.875`` at 224 px).
IMAGENET_EVAL = (256, 224)
#: Resampling filters of ``Resize`` (torchvision's ``InterpolationMode`` names).
INTERPOLATIONS = ("bilinear", "bicubic")
#: Largest ``width x height`` decoded (PIL's own decompression-bomb warning threshold): a file
#: whose header claims more is refused before any pixel is decoded.
MAX_PIXELS = 89_478_485
#: Largest file opened (far above any photograph; a larger "image" is refused unread).
MAX_FILE_BYTES = 256 << 20


def resized_size(width: int, height: int, resize: int) -> tuple[int, int]:
    """``(w, h)`` after torchvision's ``Resize(resize)``: shorter side ``resize``, longer side
    ``int(resize * long / short)`` (truncated)."""
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = resize, int(resize * long / short)
    return (new_short, new_long) if width <= height else (new_long, new_short)


def _open_regular(path: str) -> int:
    """A read-only descriptor of ``path`` if it is a regular file of bounded size.

    ``O_NONBLOCK`` makes opening a FIFO without a writer return at once instead of blocking;
    the type is then checked on the opened descriptor (no race with a rename in between).
    """
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            kind = ("a FIFO" if stat.S_ISFIFO(st.st_mode) else "a socket"
                    if stat.S_ISSOCK(st.st_mode) else "a device"
                    if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode) else "not a file")
            raise ValueError(f"{kind}, not a regular file")
        if st.st_size > MAX_FILE_BYTES:
            raise ValueError(f"{st.st_size} bytes, more than the {MAX_FILE_BYTES >> 20} MiB "
                             "an image file may have")
        if st.st_size == 0:
            raise ValueError("empty file")
        os.set_blocking(fd, True)  # a regular file: ordinary reads from here on
    except BaseException:
        os.close(fd)
        raise
    return fd


def decode_image(name: str, path: str, size: int | None, resize: int | None = None,
                 interpolation: str = "bilinear") -> np.ndarray:
    """One image file as uint8 ``(3, C, C)`` (``C = size``; see the module docstring).

    Parameters
    ----------
    name : dataset name, for messages.
    path : the file.
    size : centre-crop side ``C`` (``None``: the file's own size, no resize).
    resize : shorter side ``R`` before the crop (``None``: ``C``); at least ``C``.
    interpolation : ``"bilinear"`` or ``"bicubic"`` (:data:`INTERPOLATIONS`).

    Raises
    ------
    DatasetError
        One line naming the file and why it cannot be decoded.
    """
    from PIL import Image

    resize = size if resize is None else resize
    try:
        fd = _open_regular(path)
        with os.fdopen(fd, "rb") as fh, warnings.catch_warnings():
            # our own limit is checked below; PIL's warning would only repeat it
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(fh)
            w, h = im.size  # from the header: nothing is decoded yet
            if w < 1 or h < 1 or w * h > MAX_PIXELS:
                im.close()
                raise ValueError(f"its header says {w}x{h} pixels, more than the "
                                 f"{MAX_PIXELS} dtprobe decodes (a decompression bomb?)")
            with im:
                rgb = im.convert("RGB")
        if size is not None:
            assert resize is not None
            nw, nh = resized_size(w, h, resize)
            if (nw, nh) != (w, h):
                rgb = rgb.resize((nw, nh), Image.BICUBIC if interpolation == "bicubic"
                                 else Image.BILINEAR)
            top, left = int(round((nh - size) / 2.0)), int(round((nw - size) / 2.0))
            rgb = rgb.crop((left, top, left + size, top + size))
        arr = np.asarray(rgb, dtype=np.uint8)
    except Exception as err:  # noqa: BLE001 - any failure on a user file is one line naming it
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        if isinstance(err, OSError) and err.strerror:
            reason = err.strerror
        if type(err).__name__ == "UnidentifiedImageError":  # PIL names the file object
            reason = "cannot identify it as an image PIL reads"
        raise DatasetError(f"{name}: cannot decode image {path} ({reason}); remove or replace "
                           "it, or leave it out with --skip-bad-images (skip_bad_images=true)"
                           ) from None
    return np.ascontiguousarray(arr.transpose(2, 0, 1))


class _Files(torch.utils.data.Dataset):
    """Decoded files; a decoding error is returned as text (re-raised by the parent on one
    line, instead of the DataLoader's wrapped worker traceback)."""

    def __init__(self, name: str, paths: Sequence[str], size: int | None, resize: int | None,
                 interpolation: str):
        self.name, self.paths, self.size, self.resize = name, paths, size, resize
        self.interpolation = interpolation

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[int, np.ndarray | str]:
        try:
            return i, decode_image(self.name, self.paths[i], self.size, self.resize,
                                   self.interpolation)
        except DatasetError as err:
            return i, str(err)


def _collate(items: list[tuple[int, np.ndarray | str]]) -> list[tuple[int, np.ndarray | str]]:
    return items  # stacked in the parent, which knows what to skip


def default_workers() -> int:
    """Decoding processes: one per usable core, at most 8 (0, i.e. in-process, on one core)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - macOS
        cores = os.cpu_count() or 1
    return 0 if cores <= 1 else min(8, cores)


def decode_batches(name: str, paths: Sequence[str], size: int | None,
                   workers: int | None = None, batch_size: int = 64,
                   resize: int | None = None,
                   skipped: list[tuple[int, str]] | None = None,
                   interpolation: str = "bilinear") -> Iterator[np.ndarray]:
    """uint8 ``(m, 3, C, C)`` batches of ``paths`` in order, decoded by ``workers`` processes
    (default :func:`default_workers`; 0 decodes in this process).

    A file that cannot be decoded raises a one-line :class:`DatasetError` naming it, unless
    ``skipped`` is a list: then its ``(index, reason)`` is appended there and the file is left
    out of the batches (which then hold only the decodable files, in order). Images of another
    size than the first (``size=None``) are refused on one line naming the file.
    """
    workers = default_workers() if workers is None else workers
    if len(paths) < 4 * batch_size:
        workers = 0  # a few images: starting processes costs more than it saves
    loader = torch.utils.data.DataLoader(
        _Files(name, paths, size, resize, interpolation), batch_size=batch_size, shuffle=False,
        num_workers=workers, collate_fn=_collate, prefetch_factor=2 if workers else None,
        persistent_workers=False)
    first: tuple[int, ...] | None = None
    for items in loader:
        good = []
        for i, item in items:
            if isinstance(item, str):
                if skipped is None:
                    raise DatasetError(item if item.startswith(f"{name}:") else f"{name}: {item}")
                skipped.append((i, item))
                continue
            first = item.shape if first is None else first
            if item.shape != first:
                raise DatasetError(f"{name}: {paths[i]} is {item.shape[2]}x{item.shape[1]}, "
                                   f"others are {first[2]}x{first[1]}; pass image_size to "
                                   "resize")
            good.append(item)
        if good:
            yield np.stack(good)
