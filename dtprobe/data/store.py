"""Decode-once image store: a split's pixels as one uint8 file, streamed batch by batch.

Decoding JPEGs is the slow part of evaluating a checkpoint on a folder dataset, and holding a
decoded split as float32 does not fit in memory at ImageNet scale (50,000 validation images at
224 px are 30 GB). A store holds one split, decoded and resized once, as raw ``uint8``
``(n, C, H, W)`` pixels (a quarter of float32: 7.5 GB for that split); every checkpoint of every
analysis then reads batches of it from disk (:meth:`ImageStore.read`, plain ``pread`` into a
reused buffer, so resident memory is a batch, not the split) and normalises them on the device
(:class:`dtprobe.data.pixels.RawImages`).

Layout of a store file (little endian)::

    [pixels: n*C*H*W bytes][footer: JSON, UTF-8][footer length: 8 bytes][MAGIC: 8 bytes]

The footer records the key, ``n``, the image shape, the sha256 of the pixel bytes, the
per-channel pixel histogram the split's normalisation statistics are computed from, and an HMAC seal
(:mod:`dtprobe.features.integrity`, this user's secret key) over all of it.

Trust rules, as for the feature cache:

- a store is written to a hidden temporary file and renamed into place only when complete
  (:func:`checkpoints_manifest.atomic_writer`), under a lock so that concurrent analyses (or
  torchrun ranks) build it once; a build killed at any point leaves at most the temporary file,
  which is never opened as a store and is removed by the next build;
- opening verifies the seal and the sha256 of every pixel byte (once per process and file
  version); a torn, foreign, forged or stale file is rebuilt, never used;
- the folder must be this user's and not writable by others (:func:`check_store_folder`), and
  the build lock is opened without following links.

The key (:func:`store_key`) covers the decoder and its parameters and the source files' paths,
sizes and modification times, so editing, adding or removing an image makes a new store.
"""

from __future__ import annotations

import contextlib
import copy
import fcntl
import hashlib
import json
import os
import stat
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from checkpoints_manifest import atomic_writer, remove_stale_temp_files
from dtprobe.errors import DatasetError
from dtprobe.features import integrity

__all__ = ["STORE_VERSION", "ImageStore", "default_store_dir", "open_or_build", "store_key"]

STORE_VERSION = 1
MAGIC = b"DTPU8ST1"
_MAX_FOOTER = 1 << 20
_verified: set[tuple] = set()  # (path, inode, size, mtime_ns) verified in this process


def default_store_dir() -> Path:
    """``$DTPROBE_IMAGE_STORE``, else ``$XDG_CACHE_HOME/dtprobe/images`` (``~/.cache/...``)."""
    env = os.environ.get("DTPROBE_IMAGE_STORE")
    if env:
        return Path(env).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(cache) / "dtprobe" / "images"


def store_key(*parts: Any) -> str:
    """Key of a store: sha256 of the store version and ``parts`` (JSON)."""
    text = json.dumps([STORE_VERSION, *parts], sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def pixel_histogram(pixels: np.ndarray) -> np.ndarray:
    """Counts of each value 0..255 per channel, int64 ``(C, 256)``, of uint8 ``(m, C, H, W)``.

    Exact and independent of chunking and order, so a split's statistics
    (:func:`histogram_statistics`) are the same floats whether it is summed in memory or
    streamed into a store; the transient memory is a 256-row slice at a time.
    """
    channels = pixels.shape[1]
    hist = np.zeros((channels, 256), dtype=np.int64)
    for start in range(0, len(pixels), 256):
        block = pixels[start:start + 256]
        for c in range(channels):
            hist[c] += np.bincount(block[:, c].reshape(-1), minlength=256)
    return hist


def histogram_statistics(hist: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and std (float64) of intensities ``v / 255`` counted in ``hist``
    (a std of 0 becomes 1, so that normalising never divides by zero)."""
    h = torch.from_numpy(np.asarray(hist, dtype=np.float64))
    values = torch.arange(256, dtype=torch.float64) / 255
    count = h.sum(dim=1)
    mean = (h * values).sum(dim=1) / count
    var = ((h * values.square()).sum(dim=1) / count - mean.square()).clamp_min(0)
    std = var.sqrt()
    return mean, torch.where(std > 0, std, torch.ones_like(std))


class ImageStore:
    """A verified store file, read by row ranges. Use :func:`open_or_build` to get one.

    Attributes
    ----------
    path : the file.
    key : its key (:func:`store_key`).
    n, shape : number of images and ``(C, H, W)``.
    histogram : counts of each pixel value per channel (:func:`pixel_histogram`), from which
        loaders derive the normalisation statistics.
    """

    def __init__(self, path: Path, footer: dict[str, Any]):
        self.path = path
        self.key: str = footer["key"]
        self.n: int = int(footer["n"])
        self.shape: tuple[int, int, int] = tuple(int(v) for v in footer["shape"])  # type: ignore
        self.histogram = np.asarray(footer["histogram"], dtype=np.int64)
        self._first = 0  # first row of the file this object reads (see :meth:`rows`)
        self._fd: int | None = None

    def rows(self, start: int, stop: int) -> ImageStore:
        """A view of rows ``[start, stop)`` (e.g. one torchrun rank's share), reading the same
        file; its ``histogram`` stays the whole split's."""
        start, stop = max(0, start), min(self.n, stop)
        view = copy.copy(self)
        view._fd, view._first, view.n = None, self._first + start, max(0, stop - start)
        return view

    @property
    def row_bytes(self) -> int:
        c, h, w = self.shape
        return c * h * w

    @property
    def nbytes(self) -> int:
        return self.n * self.row_bytes

    def _file(self) -> int:
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        return self._fd

    def read(self, start: int, stop: int, out: np.ndarray | None = None) -> np.ndarray:
        """Rows ``[start, stop)`` as uint8 ``(m, C, H, W)`` (into ``out`` when given)."""
        start, stop = max(0, start), min(self.n, stop)
        rows = max(0, stop - start)
        if out is None:
            out = np.empty((rows, *self.shape), dtype=np.uint8)
        view = memoryview(out.reshape(-1)[: rows * self.row_bytes])
        offset, done = (self._first + start) * self.row_bytes, 0
        while done < len(view):
            got = os.preadv(self._file(), [view[done:]], offset + done)
            if got <= 0:
                raise DatasetError(f"{self.path}: image store ended early (truncated while in "
                                   "use?); delete it and run again to rebuild it")
            done += got
        return out[:rows]

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()


# ------------------------------------------------------------------------------------- reading
def _footer_bytes(footer: dict[str, Any]) -> bytes:
    return json.dumps({k: v for k, v in footer.items() if k != "mac"}, sort_keys=True).encode()


def _open_verified(path: Path, key: str) -> ImageStore | None:
    """The store at ``path`` if it is complete, sealed for ``key`` and intact, else None."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0))
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_size < 16:
            return None
        tail = os.pread(fd, 16, st.st_size - 16)
        length = int.from_bytes(tail[:8], "little")
        if tail[8:] != MAGIC or not 0 < length <= min(_MAX_FOOTER, st.st_size - 16):
            return None
        footer = json.loads(os.pread(fd, length, st.st_size - 16 - length))
        if (not isinstance(footer, dict) or footer.get("key") != key
                or not integrity.verify(key, footer.get("mac"), _footer_bytes(footer))):
            return None
        body = int(footer["n"]) * int(np.prod(footer["shape"]))
        if body != st.st_size - 16 - length:
            return None
        stamp = (str(path), st.st_ino, st.st_size, st.st_mtime_ns)
        if stamp not in _verified:
            digest, offset = hashlib.sha256(), 0
            while offset < body:
                block = os.pread(fd, min(8 << 20, body - offset), offset)
                if not block:
                    return None
                digest.update(block)
                offset += len(block)
            if digest.hexdigest() != footer.get("body_sha256"):
                return None
            _verified.add(stamp)
        return ImageStore(path, footer)
    except Exception:  # torn, truncated, forged or foreign (any class): rebuilt, never used
        return None
    finally:
        os.close(fd)


# ------------------------------------------------------------------------------------- writing
@contextlib.contextmanager
def _build_lock(path: Path) -> Iterator[None]:
    # O_NOFOLLOW: a link planted at the lock's name is refused (ELOOP), never followed to
    # create or open a file elsewhere
    fd = os.open(f"{path}.lock", os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0)
                 | getattr(os, "O_CLOEXEC", 0), 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _write(path: Path, key: str, n: int, shape: tuple[int, int, int],
           batches: Iterable[np.ndarray], progress: Callable[[int], None] | None) -> None:
    digest = hashlib.sha256()
    hist = np.zeros((shape[0], 256), dtype=np.int64)
    written = 0
    with atomic_writer(path, "wb") as fh:
        for batch in batches:
            batch = np.ascontiguousarray(batch, dtype=np.uint8)
            if batch.shape[1:] != shape or written + len(batch) > n:
                raise DatasetError(f"{path}: decoder gave a batch of shape {batch.shape}, "
                                   f"expected (m, {', '.join(map(str, shape))}) and {n} rows "
                                   "in all (a bug: please report it)")
            fh.write(memoryview(batch).cast("B"))
            digest.update(memoryview(batch).cast("B"))
            hist += pixel_histogram(batch)
            written += len(batch)
            if progress is not None:
                progress(len(batch))
        if written != n:
            raise DatasetError(f"{path}: decoder gave {written} images, expected {n}")
        footer = {"format": "dtprobe image store", "version": STORE_VERSION, "key": key,
                  "n": n, "shape": list(shape), "body_sha256": digest.hexdigest(),
                  "histogram": hist.tolist()}
        footer["mac"] = integrity.seal(key, _footer_bytes(footer))
        data = json.dumps(footer).encode()
        fh.write(data)
        fh.write(len(data).to_bytes(8, "little"))
        fh.write(MAGIC)


def check_store_folder(folder: Path) -> None:
    """Refuse (one-line :class:`DatasetError`) a store folder other users could write into or
    redirect: one owned by another user, writable by others, or reached through a symbolic link
    that another user owns. Such a user could not forge a store (the seal needs this user's key)
    but could plant links at the names of files still to be written, or replace stores."""
    fix = ("pass --image-store DIR with a private folder of yours (or --image-store none to "
           "decode into memory)")
    if folder.is_symlink() and folder.lstat().st_uid != os.geteuid():
        raise DatasetError(f"image store folder {folder} is a symbolic link owned by another "
                           f"user; {fix}")
    st = folder.stat()
    if st.st_uid != os.geteuid():
        raise DatasetError(f"image store folder {folder} belongs to another user; {fix}")
    if st.st_mode & stat.S_IWOTH:
        raise DatasetError(f"image store folder {folder} is writable by other users (mode "
                           f"{stat.S_IMODE(st.st_mode):o}); chmod o-w it, or {fix}")


def open_or_build(directory: str | os.PathLike, name: str, key: str, n: int,
                  shape: tuple[int, int, int], make_batches: Callable[[], Iterable[np.ndarray]],
                  progress: Callable[[int], None] | None = None,
                  on_build: Callable[[], None] | None = None) -> ImageStore:
    """The verified store ``key`` in ``directory``, built from ``make_batches()`` if needed.

    Parameters
    ----------
    directory : folder of stores (created if missing).
    name : readable prefix of the file name (e.g. ``imagefolder-train``).
    key : :func:`store_key` of the images.
    n, shape : number of images and ``(C, H, W)`` the batches must add up to.
    make_batches : called only when the store must be built; yields uint8 ``(m, C, H, W)``
        arrays in order.
    progress : called with each batch's row count while building.
    on_build : called once just before a build starts (e.g. to open a progress bar).

    Returns
    -------
    ImageStore

    Raises
    ------
    DatasetError
        The directory cannot be written (the message names it and the fix), or decoding fails.
    """
    folder = Path(directory).expanduser()
    path = folder / f"{name}-{key}.u8"
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DatasetError(f"cannot write the image store in {folder} ({exc.strerror or exc}); "
                           "pass --image-store DIR with a writable folder, or --image-store "
                           "none to decode into memory") from None
    check_store_folder(folder)
    store = _open_verified(path, key)
    if store is not None:
        return store
    try:
        with _build_lock(path):
            store = _open_verified(path, key)  # built by another process while we waited
            if store is not None:
                return store
            remove_stale_temp_files(path)  # left by a build that was killed
            if on_build is not None:
                on_build()
            _write(path, key, n, shape, make_batches(), progress)
    except OSError as exc:
        raise DatasetError(f"cannot write the image store in {folder} ({exc.strerror or exc}); "
                           "pass --image-store DIR with a writable folder, or --image-store "
                           "none to decode into memory") from None
    store = _open_verified(path, key)
    if store is None:
        raise DatasetError(f"{path}: the image store just written does not verify (disk "
                           "trouble?); delete it and run again")
    return store
