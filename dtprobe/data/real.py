"""Real image datasets, loaded from local paths: CIFAR-10/100, CINIC-10, STL-10, ImageFolder.

Nothing is fetched unless ``download=True`` is passed.  Each loader decodes a
whole split once into uint8 pixels ``(n, 3, S, S)`` (in memory, or for folder
datasets in an image store on disk), because dtprobe reuses the same evaluation
images for every checkpoint; they are normalised (and resized to ``image_size``
where asked) per batch when used (:class:`~dtprobe.data.pixels.RawImages`), so
no float32 copy of a split is ever made.  Memory of the pixels held in memory
is ``n x 3 x S^2`` bytes:

=============  ========================  =================================
dataset        images (train + test)     uint8 at native size
=============  ========================  =================================
cifar10/100    50 000 + 10 000, 32 px    184 MB
cinic10        90 000 + 90 000, 32 px    553 MB (``max_per_class`` caps it)
stl10          5 000 + 8 000, 96 px      359 MB (kept at 96 px when resized)
imagefolder    ImageNet, 1.28 M + 50 k   use ``--image-store`` (one batch resident)
=============  ========================  =================================

Images are normalised with the per-channel mean and std of the loaded
training split (recorded in the bundle).  The source label is the dataset's
class; ``factors`` are empty except for CIFAR-100, whose other label
granularity (coarse superclass for the fine task, fine class for the coarse
task) is a downstream factor on the same images.  Downstream tasks on a
*different* image set (e.g. CIFAR-100 source, CINIC-10 target, as in Cui et
al. 2022) do not fit a :class:`~dtprobe.data.base.Split`, whose factors label
the same images; the analysis must load the target as its own bundle.

CIFAR and STL-10 files are parsed here rather than through
``torchvision.datasets``, whose classes refuse any file whose md5 differs from
the release (so subsets and test fixtures cannot be read); folders are listed
with ImageFolder's conventions (sorted class subfolders, image extensions)
without importing torchvision, which is only used (lazily) to download.  CIFAR's pickles are
read with an unpickler that only admits numpy arrays, so a tampered file
cannot run code.
"""

from __future__ import annotations

import json
import os
import pickle
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

import checkpoints_manifest as cm
from dtprobe.data.base import DatasetBundle, Split
from dtprobe.data.decode import (
    DECODER_TAG,
    IMAGENET_EVAL,
    INTERPOLATIONS,
    decode_batches,
    decode_image,
)
from dtprobe.data.pixels import RawImages
from dtprobe.data.registry import register_dataset
from dtprobe.data.store import (
    ImageStore,
    histogram_statistics,
    open_or_build,
    pixel_histogram,
    store_key,
)
from dtprobe.data.subsets import check_max_samples, stable_subset
from dtprobe.errors import DatasetError
from dtprobe.features import integrity
from dtprobe.references import with_references

__doc__ = with_references(
    __doc__,
    ("krizhevsky2009", "(CIFAR)"),
    "darlow2018",
    ("coates2011", "(STL-10)"),
    ("cui2022", "(CIFAR-100 source, CINIC-10 target)"),
)

__all__ = ["load_cifar10", "load_cifar100", "load_cinic10", "load_imagefolder", "load_stl10"]

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                   "ship", "truck")
_CHUNK = 2048
_IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
_FIX = "pass --data-root or --download"


# ----------------------------------------------------------------------------------------------
# Shared helpers
# ----------------------------------------------------------------------------------------------

def _root(name: str, root: str | os.PathLike | None, layout: str, fix: str = _FIX) -> Path:
    if root is None or str(root) == "":
        raise DatasetError(f"{name}: no data root given (expected {layout}); {fix}")
    return Path(root).expanduser().resolve()


def _check_size(name: str, image_size: int | None) -> int | None:
    if image_size is None:
        return None
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 8:
        raise DatasetError(f"{name}: image_size={image_size!r} must be an integer >= 8 or None")
    return image_size


def _check_cap(name: str, max_per_class: int | None) -> int | None:
    if max_per_class is None:
        return None
    if (isinstance(max_per_class, bool) or not isinstance(max_per_class, int)
            or max_per_class < 1):
        raise DatasetError(f"{name}: max_per_class={max_per_class!r} must be an integer >= 1 "
                           "or None")
    return max_per_class


def _check_common(name: str, root: str | os.PathLike | None, layout: str,
                  image_size: int | None, max_per_class: int | None
                  ) -> tuple[Path, int | None, int | None]:
    """The checked arguments every array and folder loader takes: root, size, cap."""
    return _root(name, root, layout), _check_size(name, image_size), _check_cap(name, max_per_class)


def _cap_indices(labels: np.ndarray, max_per_class: int | None) -> np.ndarray:
    """Indices keeping the first ``max_per_class`` samples of each class, in file order."""
    if max_per_class is None:
        return np.arange(len(labels))
    keep = np.zeros(len(labels), dtype=bool)
    for c in np.unique(labels):
        keep[np.flatnonzero(labels == c)[:max_per_class]] = True
    return np.flatnonzero(keep)


Pixels = np.ndarray | ImageStore


def _float_statistics(x: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and std (float64) of float images (resized splits: a
    :class:`RawImages` converting on use), summed per chunk."""
    total = torch.zeros(x.shape[1], dtype=torch.float64)
    total_sq = torch.zeros(x.shape[1], dtype=torch.float64)
    for start in range(0, len(x), _CHUNK):
        chunk = x[start:start + _CHUNK].double()
        total += chunk.sum(dim=(0, 2, 3))
        total_sq += chunk.square().sum(dim=(0, 2, 3))
    count = x.shape[0] * x.shape[2] * x.shape[3]
    mean = total / count
    std = (total_sq / count - mean.square()).clamp_min(0).sqrt()
    return mean, torch.where(std > 0, std, torch.ones_like(std))


def _bundle(
    name: str,
    params: dict[str, Any],
    train: tuple[Pixels, np.ndarray],
    test: tuple[Pixels, np.ndarray],
    class_names: Sequence[str],
    image_size: int | None,
    factors: tuple[dict[str, np.ndarray], dict[str, np.ndarray]] = ({}, {}),
    factor_classes: dict[str, int] | None = None,
    sample_ids: tuple[list[str] | None, list[str] | None] = (None, None),
    skipped: list[dict[str, str]] | None = None,
) -> DatasetBundle:
    """uint8 splits, normalised on use with the train split's per-channel statistics, as a
    bundle.

    Images stay uint8 pixels (:class:`RawImages`, in memory or in an image store): a quarter of
    float32, and a resize to ``image_size`` is applied per batch on use (bilinear,
    antialiased), never to the whole split at once. Statistics of images that are not resized
    come from exact pixel histograms (the same floats in memory and from a store); those of
    resized images from the resized float images, summed per chunk in float64.
    """
    if isinstance(train[0], ImageStore) and isinstance(test[0], ImageStore):
        mean, std = histogram_statistics(train[0].histogram)
        x_train: Any = RawImages(train[0], mean.tolist(), std.tolist())
        x_test: Any = RawImages(test[0], mean.tolist(), std.tolist())
    else:
        pixels = np.asarray(train[0])
        tr = torch.from_numpy(np.ascontiguousarray(pixels))
        te = torch.from_numpy(np.ascontiguousarray(np.asarray(test[0])))
        size = None if image_size is None else (image_size, image_size)
        c = tr.shape[1]
        unit = RawImages(tr, [0.0] * c, [1.0] * c, size=size)  # intensities in [0, 1]
        if unit.converts:
            mean, std = _float_statistics(unit)
        else:
            # not resized: exact statistics from the pixel values, as an image store has them
            mean, std = histogram_statistics(pixel_histogram(pixels))
        x_train = RawImages(tr, mean.tolist(), std.tolist(), size=size)
        x_test = RawImages(te, mean.tolist(), std.tolist(), size=size)

    def split(x: Any, y: np.ndarray, f: dict[str, np.ndarray], ids: list[str] | None) -> Split:
        return Split(images=x, labels=torch.from_numpy(np.asarray(y, dtype=np.int64)),
                     factors={k: torch.from_numpy(np.asarray(v, dtype=np.int64))
                              for k, v in f.items()}, sample_ids=ids)

    return DatasetBundle(
        name=name, params=params,
        train=split(x_train, train[1], factors[0], sample_ids[0]),
        test=split(x_test, test[1], factors[1], sample_ids[1]),
        num_classes=len(class_names),
        factor_classes=dict(factor_classes or {}),
        class_names=list(class_names),
        mean=tuple(float(v) for v in mean), std=tuple(float(v) for v in std),
        skipped=list(skipped or []),
    )


def _with_subset(params: dict[str, Any], max_samples: int | None) -> dict[str, Any]:
    """``params`` plus ``max_samples`` when set (left out when unset, so that the dataset keys of
    feature caches written before subsets existed stay valid)."""
    return params if max_samples is None else {**params, "max_samples": max_samples}


def _array_subset(labels: np.ndarray, split: str, max_per_class: int | None,
                  max_samples: int | None) -> tuple[np.ndarray, list[str]]:
    """Indices kept of an array split (first ``max_per_class`` per class, then the stable
    ``max_samples`` subset) and their sample ids ``split:index`` (index in the file)."""
    keep = _cap_indices(labels, max_per_class)
    ids = [f"{split}:{i}" for i in keep]
    chosen = stable_subset(ids, labels[keep], max_samples)
    return keep[chosen], [ids[i] for i in chosen]


def _array_bundle(
    name: str,
    params: dict[str, Any],
    train: tuple[np.ndarray, np.ndarray],
    test: tuple[np.ndarray, np.ndarray],
    class_names: Sequence[str],
    image_size: int | None,
    max_per_class: int | None,
    max_samples: int | None,
    factors: tuple[dict[str, np.ndarray], dict[str, np.ndarray]] = ({}, {}),
    factor_classes: dict[str, int] | None = None,
) -> DatasetBundle:
    """The bundle of two whole array splits (CIFAR, STL-10) cut to ``max_per_class`` and the
    stable ``max_samples`` subset; ``params`` gain ``max_per_class`` and ``max_samples``."""
    max_samples = check_max_samples(name, max_samples)
    keep_tr, ids_tr = _array_subset(train[1], "train", max_per_class, max_samples)
    keep_te, ids_te = _array_subset(test[1], "test", max_per_class, max_samples)
    params = _with_subset({**params, "max_per_class": max_per_class}, max_samples)
    return _bundle(name, params, (train[0][keep_tr], train[1][keep_tr]),
                   (test[0][keep_te], test[1][keep_te]), class_names, image_size,
                   factors=({k: v[keep_tr] for k, v in factors[0].items()},
                            {k: v[keep_te] for k, v in factors[1].items()}),
                   factor_classes=factor_classes, sample_ids=(ids_tr, ids_te))


def _check_label_range(name: str, d: Path, labels: Sequence[np.ndarray], n: int,
                       what: str = "labels") -> None:
    """Every label of ``labels`` (the splits read from ``d``) in ``0..n-1``."""
    for y in labels:
        if y.size and (y.min() < 0 or y.max() >= n):
            raise DatasetError(f"{name}: {what} in {d} outside 0..{n - 1}; "
                               "re-download it with --download")


def _download(name: str, root: Path, fetch: Any) -> None:
    """Run ``fetch()``; network or disk trouble becomes one line naming ``root``."""
    try:
        fetch()
    except Exception as err:  # network / disk trouble, reported on one line
        raise DatasetError(f"{name}: download into {root} failed ({type(err).__name__}: "
                           f"{err})") from None


# ----------------------------------------------------------------------------------------------
# CIFAR-10 / CIFAR-100 (python pickle batches)
# ----------------------------------------------------------------------------------------------

class _ArrayUnpickler(pickle.Unpickler):
    """Unpickler admitting only plain containers and numpy arrays (CIFAR's batch format)."""

    _ALLOWED = {
        ("numpy._core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "scalar"),
        ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str) -> Any:
        if module.startswith("numpy.core"):  # pickles written by numpy < 2
            module = "numpy._core" + module[len("numpy.core"):]
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to unpickle {module}.{name}")
        return super().find_class(module, name)


def _read_pickle(name: str, path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as fh:
            obj = _ArrayUnpickler(fh, encoding="latin1").load()
    except Exception as err:  # any parse failure of a user file is a dataset error
        raise DatasetError(f"{name}: cannot read {path} ({type(err).__name__}: {err}); "
                           "re-download it with --download") from None
    if not isinstance(obj, dict):
        raise DatasetError(f"{name}: {path} holds a {type(obj).__name__}, expected a CIFAR "
                           "batch dict; re-download it with --download")
    return {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in obj.items()}


def _cifar_batch(name: str, path: Path, label_keys: Sequence[str]) -> tuple[np.ndarray, ...]:
    batch = _read_pickle(name, path)
    missing = [k for k in ("data", *label_keys) if k not in batch]
    if missing:
        raise DatasetError(f"{name}: {path} lacks key(s) {', '.join(missing)}; "
                           "re-download it with --download")
    data = np.asarray(batch["data"], dtype=np.uint8)
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise DatasetError(f"{name}: {path} 'data' has shape {data.shape}, expected (n, 3072); "
                           "re-download it with --download")
    labels = [np.asarray(batch[k], dtype=np.int64) for k in label_keys]
    if any(lab.shape != (data.shape[0],) for lab in labels):
        raise DatasetError(f"{name}: {path} has {data.shape[0]} images but labels of another "
                           "length; re-download it with --download")
    return (data.reshape(-1, 3, 32, 32), *labels)


def _locate(name: str, root: Path, folder: str, files: Sequence[str], layout: str,
               download: bool, downloader: Any) -> Path:
    """``root/folder`` (or ``root`` itself when it holds ``files``), downloading if asked."""
    def complete(d: Path) -> bool:
        return all((d / f).is_file() for f in files)

    for d in (root / folder, root):
        if complete(d):
            return d
    if download:
        _download(name, root, lambda: downloader(root=str(root), download=True))
        if complete(root / folder):
            return root / folder
    d = root / folder
    if not d.is_dir():
        raise DatasetError(f"{name}: {root} missing {folder}/ (expected {layout}); {_FIX}")
    absent = [f for f in files if not (d / f).is_file()]
    raise DatasetError(f"{name}: {d} lacks {', '.join(absent)} (expected {layout}); {_FIX}")


@register_dataset("cifar10")
def load_cifar10(
    root: str | os.PathLike | None = None,
    download: bool = False,
    image_size: int | None = None,
    max_per_class: int | None = None,
    max_samples: int | None = None,
) -> DatasetBundle:
    """CIFAR-10 from ``root/cifar-10-batches-py`` (Krizhevsky 2009).

    Parameters
    ----------
    root : directory holding ``cifar-10-batches-py/`` (or that folder itself).
    download : fetch and extract the official archive into ``root`` if files are missing.
    image_size : resize to this side (``None``: keep 32 px).
    max_per_class : keep only the first images of each class in each split (memory cap).
    max_samples : a stable class-stratified subset of at most this many images per split
        (:mod:`dtprobe.data.subsets`), after ``max_per_class``.

    Returns
    -------
    DatasetBundle
        10 classes, no factors; ``params`` rebuild it without downloading.
    """
    name = "cifar10"
    layout = "ROOT/cifar-10-batches-py/data_batch_1..5, test_batch"
    root_p, image_size, max_per_class = _check_common(name, root, layout, image_size,
                                                      max_per_class)
    train_files = [f"data_batch_{i}" for i in range(1, 6)]

    def fetch(**kw: Any) -> None:
        from torchvision.datasets import CIFAR10
        CIFAR10(**kw)

    d = _locate(name, root_p, "cifar-10-batches-py", [*train_files, "test_batch"], layout,
                   download, fetch)
    parts = [_cifar_batch(name, d / f, ["labels"]) for f in train_files]
    x_tr = np.concatenate([p[0] for p in parts])
    y_tr = np.concatenate([p[1] for p in parts])
    x_te, y_te = _cifar_batch(name, d / "test_batch", ["labels"])
    names: Sequence[str] = CIFAR10_CLASSES
    if (d / "batches.meta").is_file():
        names = [str(n) for n in _read_pickle(name, d / "batches.meta").get("label_names", names)]
    _check_label_range(name, d, (y_tr, y_te), len(names))
    return _array_bundle(name, dict(root=str(root_p), image_size=image_size), (x_tr, y_tr),
                         (x_te, y_te), names, image_size, max_per_class, max_samples)


@register_dataset("cifar100")
def load_cifar100(
    root: str | os.PathLike | None = None,
    download: bool = False,
    coarse: bool = False,
    image_size: int | None = None,
    max_per_class: int | None = None,
    max_samples: int | None = None,
) -> DatasetBundle:
    """CIFAR-100 from ``root/cifar-100-python`` (Krizhevsky 2009).

    Parameters
    ----------
    root : directory holding ``cifar-100-python/`` (or that folder itself).
    download : fetch and extract the official archive into ``root`` if files are missing.
    coarse : source label = the 20 superclasses, with the 100 fine classes as factor ``fine``;
        otherwise (default) source = the 100 fine classes with factor ``coarse`` (20 classes).
    image_size : resize to this side (``None``: keep 32 px).
    max_per_class : keep only the first images of each source class in each split.
    max_samples : a stable class-stratified subset of at most this many images per split
        (:mod:`dtprobe.data.subsets`), after ``max_per_class``.

    Returns
    -------
    DatasetBundle
        The source task of Cui et al. (2022) (fine labels), with the other granularity as a
        downstream factor.
    """
    name = "cifar100"
    layout = "ROOT/cifar-100-python/train, test, meta"
    root_p, image_size, max_per_class = _check_common(name, root, layout, image_size,
                                                      max_per_class)
    if not isinstance(coarse, bool):
        raise DatasetError(f"cifar100: coarse={coarse!r} must be True or False")

    def fetch(**kw: Any) -> None:
        from torchvision.datasets import CIFAR100
        CIFAR100(**kw)

    d = _locate(name, root_p, "cifar-100-python", ["train", "test"], layout, download, fetch)
    keys = ["fine_labels", "coarse_labels"]
    x_tr, fine_tr, coarse_tr = _cifar_batch(name, d / "train", keys)
    x_te, fine_te, coarse_te = _cifar_batch(name, d / "test", keys)
    fine_names = [f"fine_{i}" for i in range(100)]
    coarse_names = [f"coarse_{i}" for i in range(20)]
    if (d / "meta").is_file():
        meta = _read_pickle(name, d / "meta")
        fine_names = [str(n) for n in meta.get("fine_label_names", fine_names)]
        coarse_names = [str(n) for n in meta.get("coarse_label_names", coarse_names)]
    src, other = ("coarse", "fine") if coarse else ("fine", "coarse")
    labels = {"fine": (fine_tr, fine_te, fine_names), "coarse": (coarse_tr, coarse_te,
                                                                 coarse_names)}
    for key, (a, b, n_) in labels.items():
        _check_label_range(name, d, (a, b), len(n_), f"{key} labels")
    y_tr, y_te, names = labels[src]
    o_tr, o_te, o_names = labels[other]
    return _array_bundle(name, dict(root=str(root_p), coarse=coarse, image_size=image_size),
                         (x_tr, y_tr), (x_te, y_te), names, image_size, max_per_class,
                         max_samples, factors=({other: o_tr}, {other: o_te}),
                         factor_classes={other: len(o_names)})


# ----------------------------------------------------------------------------------------------
# STL-10 (binary files)
# ----------------------------------------------------------------------------------------------

def _stl_split(name: str, d: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    x_path, y_path = d / f"{split}_X.bin", d / f"{split}_y.bin"
    raw = np.fromfile(x_path, dtype=np.uint8)
    per = 3 * 96 * 96
    if raw.size == 0 or raw.size % per:
        raise DatasetError(f"{name}: {x_path} has {raw.size} bytes, not a multiple of {per} "
                           "(3 x 96 x 96); re-download it with --download")
    labels = np.fromfile(y_path, dtype=np.uint8).astype(np.int64) - 1
    if labels.shape != (raw.size // per,) or labels.min() < 0 or labels.max() > 9:
        raise DatasetError(f"{name}: {y_path} does not hold {raw.size // per} labels in 1..10; "
                           "re-download it with --download")
    # Stored column-major per channel: (n, c, w, h) -> (n, c, h, w).
    return raw.reshape(-1, 3, 96, 96).transpose(0, 1, 3, 2), labels


@register_dataset("stl10")
def load_stl10(
    root: str | os.PathLike | None = None,
    download: bool = False,
    image_size: int | None = None,
    max_per_class: int | None = None,
    max_samples: int | None = None,
) -> DatasetBundle:
    """STL-10's labelled splits from ``root/stl10_binary`` (Coates et al. 2011).

    Parameters
    ----------
    root : directory holding ``stl10_binary/`` (or that folder itself).
    download : fetch and extract the official archive (2.6 GB) into ``root`` if missing.
    image_size : resize to this side (``None``: keep 96 px; 32 matches CIFAR models).
    max_per_class : keep only the first images of each class in each split.
    max_samples : a stable class-stratified subset of at most this many images per split
        (:mod:`dtprobe.data.subsets`), after ``max_per_class``.

    Returns
    -------
    DatasetBundle
        10 classes (5000 train, 8000 test images), no factors.
    """
    name = "stl10"
    layout = "ROOT/stl10_binary/train_X.bin, train_y.bin, test_X.bin, test_y.bin"
    root_p, image_size, max_per_class = _check_common(name, root, layout, image_size,
                                                      max_per_class)

    def fetch(**kw: Any) -> None:
        from torchvision.datasets import STL10
        STL10(split="train", **kw)

    files = ["train_X.bin", "train_y.bin", "test_X.bin", "test_y.bin"]
    d = _locate(name, root_p, "stl10_binary", files, layout, download, fetch)
    x_tr, y_tr = _stl_split(name, d, "train")
    x_te, y_te = _stl_split(name, d, "test")
    names = [f"class_{i}" for i in range(10)]
    if (d / "class_names.txt").is_file():
        lines = [s.strip() for s in (d / "class_names.txt").read_text().splitlines() if s.strip()]
        if len(lines) == 10:
            names = lines
    return _array_bundle(name, dict(root=str(root_p), image_size=image_size), (x_tr, y_tr),
                         (x_te, y_te), names, image_size, max_per_class, max_samples)


# ----------------------------------------------------------------------------------------------
# Folder layouts: CINIC-10 and ImageNet-style ImageFolder
# ----------------------------------------------------------------------------------------------

def _list_folder(name: str, d: Path, class_to_idx: dict[str, int] | None,
                 layout: str) -> tuple[list[str], np.ndarray, dict[str, int]]:
    """Sorted image files of a class-per-subfolder split (classes from ``class_to_idx``).

    Classes are the sorted subfolder names, as in ``torchvision.datasets.ImageFolder``. Every
    entry that is not a folder and has an image extension is listed, as ImageFolder does: a
    FIFO or a device named ``x.jpg`` is then refused by the decoder on one line naming it,
    rather than silently left out.
    """
    classes = sorted(e.name for e in os.scandir(d) if e.is_dir() and not e.name.startswith("."))
    if not classes:
        raise DatasetError(f"{name}: {d} has no class subfolders (expected {layout})")
    if class_to_idx is None:
        class_to_idx = {c: i for i, c in enumerate(classes)}
    unknown = sorted(set(classes) - set(class_to_idx))
    if unknown:
        raise DatasetError(f"{name}: {d} has class folder(s) {', '.join(unknown[:5])} not in the "
                           f"training split (expected {layout})")
    paths: list[str] = []
    labels: list[int] = []
    for cls in classes:
        files = sorted(e.path for e in os.scandir(d / cls)
                       if not e.is_dir() and e.name.lower().endswith(_IMG_EXTENSIONS))
        paths += files
        labels += [class_to_idx[cls]] * len(files)
    if not paths:
        raise DatasetError(f"{name}: no images ({', '.join(_IMG_EXTENSIONS[:4])}, ...) under {d} "
                           f"(expected {layout})")
    return paths, np.asarray(labels, dtype=np.int64), class_to_idx


@dataclass(frozen=True)
class _Decoding:
    """How a folder split is decoded: crop side ``size`` (None: the files' own size), shorter
    side ``resize`` before the crop, and whether undecodable files are skipped."""

    size: int | None
    resize: int | None
    skip: bool = False
    interpolation: str = "bilinear"

    @property
    def key(self) -> list[Any]:
        """What of the decoding goes into a store key (the filter only when not bilinear, so
        that keys of the default rule do not change with it)."""
        out: list[Any] = [DECODER_TAG, self.size, self.resize]
        return out if self.interpolation == "bilinear" else [*out, self.interpolation]

    def batches(self, name: str, paths: Sequence[str],
                skipped: list[tuple[int, str]] | None = None) -> Any:
        return decode_batches(name, paths, self.size, resize=self.resize, skipped=skipped,
                              interpolation=self.interpolation)


def _decode(name: str, paths: Sequence[str], how: _Decoding
            ) -> tuple[np.ndarray, list[tuple[int, str]]]:
    """Decode images to uint8 ``(n, 3, S, S)`` in memory (:mod:`dtprobe.data.decode`'s rule,
    in parallel worker processes), and the ``(index, reason)`` of the files skipped."""
    out: np.ndarray | None = None
    skipped: list[tuple[int, str]] = []
    start = 0
    for batch in how.batches(name, paths, skipped if how.skip else None):
        if out is None:
            out = np.empty((len(paths), *batch.shape[1:]), dtype=np.uint8)
        out[start:start + len(batch)] = batch
        start += len(batch)
    if out is None:
        raise DatasetError(f"{name}: none of the {len(paths)} images near {paths[0]} can be "
                           f"decoded (first: {skipped[0][1]})")
    if start < len(out):
        out.resize((start, *out.shape[1:]), refcheck=False)  # shrunk in place: no copy
    return out, skipped


def _shape(name: str, paths: Sequence[str], how: _Decoding) -> tuple[int, int, int]:
    """``(3, S, S)`` of the decoded images (the first decodable file's with ``size=None``)."""
    if how.size is not None:
        return (3, how.size, how.size)
    for p in paths:
        try:
            return tuple(decode_image(name, p, None).shape)  # type: ignore[return-value]
        except DatasetError:
            if not how.skip:
                raise
    raise DatasetError(f"{name}: none of the {len(paths)} images near {paths[0]} can be "
                       "decoded")


def _skip_record_path(folder: Path, stem: str, key: str) -> Path:
    return folder / f"{stem}-{key}.skipped.json"


def _read_skip_record(path: Path, key: str) -> list[tuple[int, str]] | None:
    """The sealed list of files skipped when the store ``key`` was built, or None."""
    try:
        record = json.loads(path.read_text())
        body = json.dumps(record["skipped"], sort_keys=True).encode()
        if record.get("key") != key or not integrity.verify(key, record.get("mac"), body):
            return None
        return [(int(i), str(r)) for i, r in record["skipped"]]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _stored(name: str, split: str, root: Path, paths: Sequence[str], how: _Decoding,
            store: str | os.PathLike, progress: bool = True
            ) -> tuple[ImageStore, list[tuple[int, str]]]:
    """The split decoded once into an image store (:mod:`dtprobe.data.store`), keyed by the
    decoder, its parameters and each file's path, size and modification time; plus the
    ``(index, reason)`` of the files skipped (``how.skip``).

    With ``how.skip`` the files that cannot be decoded are only known after decoding, while a
    store is written with its image count: the split is decoded once into a temporary file of
    the good images, the store is built from it, and the list of skipped files is kept next to
    the store, sealed like it (:mod:`dtprobe.features.integrity`), so that later analyses (and other
    torchrun ranks, which wait on a lock) read it instead of decoding again.
    """
    try:
        listing = [(os.path.relpath(p, root), st.st_size, st.st_mtime_ns)
                   for p in paths for st in (os.stat(p),)]
    except OSError as err:
        raise DatasetError(f"{name}: cannot read {err.filename} ({err.strerror}); the folder "
                           "changed while listing it, run again") from None
    folder = Path(store).expanduser()
    stem = f"{name}-{split}"
    skipped: list[tuple[int, str]] = []
    if how.skip:
        all_key = store_key(name, *how.key, listing, "skip-bad-images")
        record = _skip_record_path(folder, stem, all_key)
        found = _read_skip_record(record, all_key)
        if found is None:
            found = _build_skipping(name, split, paths, listing, how, folder, stem, record,
                                    all_key, progress)
        skipped = found
    bad = {i for i, _ in skipped}
    good = [i for i in range(len(paths)) if i not in bad]
    good_paths = [paths[i] for i in good] if bad else paths
    shape = _shape(name, good_paths, how)
    key = store_key(name, *how.key, [listing[i] for i in good])
    return _open_or_build(name, split, folder, stem, key, shape, len(good_paths),
                          lambda: how.batches(name, good_paths), progress), skipped


def _open_or_build(name: str, split: str, folder: Path, stem: str, key: str,
                   shape: tuple[int, int, int], n: int, make: Any,
                   progress: bool = True) -> ImageStore:
    """The store ``key``, built from ``make()`` when absent, with a progress bar while it is
    built unless ``progress`` is off (``--no-progress``)."""
    bar: list[Any] = []

    def start() -> None:
        from dtprobe.runtime.progress import tqdm

        bar.append(tqdm(total=n, unit="img", desc=f"{name}/{split}: decoding once into the "
                        "image store", disable=not progress))

    try:
        return open_or_build(folder, stem, key, n, shape, make,
                             progress=lambda k: bar[0].update(k) if bar else None,
                             on_build=start)
    finally:
        for b in bar:
            b.close()


def _build_skipping(name: str, split: str, paths: Sequence[str], listing: list[Any],
                    how: _Decoding, folder: Path, stem: str, record: Path,
                    all_key: str, progress: bool = True) -> list[tuple[int, str]]:
    """Decode once, skipping bad files, into the store of the good ones; seal the skip list."""
    import fcntl
    import tempfile

    try:
        folder.mkdir(parents=True, exist_ok=True)
        lock = os.open(f"{record}.lock", os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0),
                       0o600)
    except OSError as exc:
        raise DatasetError(f"cannot write the image store in {folder} ({exc.strerror or exc}); "
                           "pass --image-store DIR with a writable folder, or --image-store "
                           "none to decode into memory") from None
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        found = _read_skip_record(record, all_key)  # written by another process meanwhile
        if found is not None:
            return found
        skipped: list[tuple[int, str]] = []
        with tempfile.TemporaryFile(dir=folder) as tmp:
            shape: tuple[int, ...] | None = None
            count = 0
            for batch in how.batches(name, paths, skipped):
                shape = tuple(batch.shape[1:])
                tmp.write(memoryview(np.ascontiguousarray(batch)).cast("B"))
                count += len(batch)
            if shape is None:
                raise DatasetError(f"{name}: none of the {len(paths)} images near {paths[0]} "
                                   f"can be decoded (first: {skipped[0][1]})")
            row = int(np.prod(shape))

            def batches() -> Any:
                for start in range(0, count, 256):
                    m = min(256, count - start)
                    tmp.seek(start * row)
                    data = np.frombuffer(tmp.read(m * row), dtype=np.uint8)
                    yield data.reshape(m, *shape)

            bad = {i for i, _ in skipped}
            key = store_key(name, *how.key,
                            [listing[i] for i in range(len(paths)) if i not in bad])
            _open_or_build(name, split, folder, stem, key, shape, count,  # type: ignore[arg-type]
                           batches, progress)
        body = json.dumps([list(s) for s in skipped], sort_keys=True).encode()
        cm.atomic_write_text(record, json.dumps({
            "key": all_key, "skipped": [list(s) for s in skipped],
            "mac": integrity.seal(all_key, body)}) + "\n")
        return skipped
    finally:
        os.close(lock)


def _folder_split(name: str, root: Path, dirs: Sequence[Path], split: str,
                  class_to_idx: dict[str, int] | None, layout: str, how: _Decoding,
                  max_per_class: int | None, max_samples: int | None,
                  store: str | os.PathLike | None, progress: bool = True
                  ) -> tuple[Pixels, np.ndarray, dict[str, int], list[str], list[dict[str, str]]]:
    """One split of a folder dataset, from the class folders of ``dirs`` (capped at
    ``max_per_class`` files each, then the stable ``max_samples`` subset of them all): pixels
    (in memory, or an image store in the folder ``store``), labels, the class index, the
    sample ids (paths relative to ``root``) and the files skipped (``how.skip``; their ids are
    left out of the sample ids). Only the chosen files are decoded."""
    paths: list[str] = []
    labels_parts = []
    for d in dirs:
        found, labels, class_to_idx = _list_folder(name, d, class_to_idx, layout)
        keep = _cap_indices(labels, max_per_class)
        paths += [found[i] for i in keep]
        labels_parts.append(labels[keep])
    labels = np.concatenate(labels_parts)
    ids = [os.path.relpath(p, root) for p in paths]
    keep = stable_subset(ids, labels, max_samples)
    paths, labels, ids = [paths[i] for i in keep], labels[keep], [ids[i] for i in keep]
    assert class_to_idx is not None
    if store is not None:
        pixels: Pixels
        pixels, skipped = _stored(name, split, root, paths, how, store, progress)
    else:
        pixels, skipped = _decode(name, paths, how)
    if skipped:
        bad = {i for i, _ in skipped}
        good = [i for i in range(len(paths)) if i not in bad]
        labels, ids = labels[good], [ids[i] for i in good]
    gone = [{"split": split, "id": os.path.relpath(paths[i], root), "reason": _short(r, paths[i])}
            for i, r in skipped]
    return pixels, labels, class_to_idx, ids, gone


def _short(reason: str, path: str) -> str:
    """The reason a file was skipped, without the dataset name, path and fix around it."""
    head = f"cannot decode image {path} ("
    if head in reason:
        reason = reason.split(head, 1)[1].rsplit("); remove or replace", 1)[0]
    return reason


_CINIC_URL = "https://datashare.ed.ac.uk/bitstream/handle/10283/3192/CINIC-10.tar.gz"


@register_dataset("cinic10")
def load_cinic10(
    root: str | os.PathLike | None = None,
    download: bool = False,
    include_valid: bool = False,
    image_size: int | None = None,
    max_per_class: int | None = None,
    max_samples: int | None = None,
    resize_size: int | None = None,
    skip_bad_images: bool = False,
    store: str | os.PathLike | None = None,
    progress: bool = True,
) -> DatasetBundle:
    """CINIC-10 from ``root/{train,valid,test}/<class>/*.png`` (Darlow et al. 2018).

    Parameters
    ----------
    root : directory holding ``train/``, ``valid/``, ``test/`` (or ``CINIC-10/`` with them).
    download : fetch and extract the official archive (0.7 GB) into ``root`` if missing.
    include_valid : append the 90 000 ``valid`` images to the training split.
    image_size : resize to this side (``None``: keep 32 px).
    max_per_class : keep only the first files (sorted by name) of each class in each split;
        decoding the full 180 000 images takes minutes and 2.2 GB.
    max_samples : a stable class-stratified subset of at most this many images per split.
    resize_size, skip_bad_images : as for ``load_imagefolder``.
    store : a folder of image stores: decode once, read per batch (see ``load_imagefolder``).
    progress : a progress bar while a store is built (see ``load_imagefolder``).

    Returns
    -------
    DatasetBundle
        10 CIFAR-10 classes, no factors; the transfer target of Cui et al. (2022).
    """
    name = "cinic10"
    layout = "ROOT/train/<class>/*.png, ROOT/valid/..., ROOT/test/<class>/*.png"
    root_p, image_size, max_per_class = _check_common(name, root, layout, image_size,
                                                      max_per_class)

    def find() -> Path | None:
        for d in (root_p, root_p / "CINIC-10"):
            if (d / "train").is_dir() and (d / "test").is_dir():
                return d
        return None

    d = find()
    if d is None and download:
        from torchvision.datasets.utils import download_and_extract_archive
        _download(name, root_p, lambda: download_and_extract_archive(_CINIC_URL, str(root_p)))
        d = find()
    if d is None:
        missing = "train/" if not (root_p / "train").is_dir() else "test/"
        raise DatasetError(f"{name}: {root_p} missing {missing} (expected {layout}); {_FIX}")
    if include_valid and not (d / "valid").is_dir():
        raise DatasetError(f"{name}: {d} missing valid/ (expected {layout}); pass "
                           "include_valid=False or re-download")
    max_samples = check_max_samples(name, max_samples)
    how = _decoding(name, image_size, resize_size, skip_bad_images)
    train_dirs = [d / "train", d / "valid"] if include_valid else [d / "train"]
    x_tr, y_tr, c2i, ids_tr, bad_tr = _folder_split(name, d, train_dirs, "train", None, layout,
                                                    how, max_per_class, max_samples, store,
                                                    progress)
    x_te, y_te, _, ids_te, bad_te = _folder_split(name, d, [d / "test"], "test", c2i, layout,
                                                  how, max_per_class, max_samples, store,
                                                  progress)
    params = _with_decoding(dict(root=str(root_p), include_valid=include_valid,
                                 image_size=image_size, max_per_class=max_per_class), how,
                            max_samples)
    return _bundle(name, params, (x_tr, y_tr), (x_te, y_te), sorted(c2i, key=c2i.get),
                   None, sample_ids=(ids_tr, ids_te), skipped=bad_tr + bad_te)


#: Named evaluation transforms of ``load_imagefolder(preset=...)``: ``(resize_size, image_size)``.
PRESETS = {"imagenet": IMAGENET_EVAL}


@register_dataset("imagefolder")
def load_imagefolder(
    root: str | os.PathLike | None = None,
    image_size: int | None = None,
    max_per_class: int | None = None,
    test_split: str | None = None,
    max_samples: int | None = None,
    resize_size: int | None = None,
    preset: str | None = None,
    interpolation: str = "bilinear",
    skip_bad_images: bool = False,
    store: str | os.PathLike | None = None,
    progress: bool = True,
) -> DatasetBundle:
    """Any ImageNet-style folder: ``root/train/<class>/*`` and ``root/val/<class>/*``.

    Images are decoded as torchvision's ``ImageFolder`` with ``Resize(resize_size)`` and
    ``CenterCrop(image_size)`` decode them, pixel for pixel (:mod:`dtprobe.data.decode`; EXIF
    orientation is not applied, as there).

    Parameters
    ----------
    root : directory holding ``train/`` and ``val/`` (or ``test/``), one subfolder per class.
    image_size : side of the centre crop, the model's input (default 64, or the preset's).
    max_per_class : keep only the first files (sorted by name) of each class in each split.
    test_split : name of the evaluation folder (``None``: ``val``, else ``test``).
    max_samples : keep a stable class-stratified subset of at most this many images per split
        (:mod:`dtprobe.data.subsets`); only those files are decoded.
    resize_size : the shorter side is resized to this before the crop (default
        ``image_size``: the crop is the whole shorter side). ImageNet models are evaluated
        with 256 then 224.
    preset : ``"imagenet"``: ``resize_size=256, image_size=224`` where they are not given.
    interpolation : resampling filter of the resize, ``"bilinear"`` (torchvision's default)
        or ``"bicubic"`` (recorded by many timm models).
    skip_bad_images : leave out files that cannot be decoded (listed in the bundle's
        ``skipped`` and in ``analysis/samples.json``; their ids are not in the subset digest)
        instead of failing the dataset on the first one (default).
    store : a folder of image stores (:mod:`dtprobe.data.store`): each split is decoded once
        into a uint8 file there and read back per batch (images become
        :class:`~dtprobe.data.pixels.RawImages`; memory is a batch, not the split). ``None``
        (default) decodes into memory. Not part of ``params``: the images are the same either
        way.
    progress : a progress bar on stderr while a store is built (``dtprobe analyze
        --no-progress`` turns it off). Not part of ``params``.

    Returns
    -------
    DatasetBundle
        Classes = the sorted subfolders of ``train/``; no factors. ``params`` record the
        resolved ``image_size`` and (when it differs from it) ``resize_size``.
    """
    name = "imagefolder"
    layout = "ROOT/train/<class>/*.jpg and ROOT/val/<class>/*.jpg (or ROOT/test/<class>/...)"
    fix = "pass --data-root"
    root_p = _root(name, root, layout, fix)
    if preset is not None:
        if preset not in PRESETS:
            raise DatasetError(f"{name}: preset={preset!r} is not one of "
                               f"{', '.join(sorted(PRESETS))}")
        resize_size = PRESETS[preset][0] if resize_size is None else resize_size
        image_size = PRESETS[preset][1] if image_size is None else image_size
    checked = _check_size(name, 64 if image_size is None else image_size)
    if checked is None:
        raise DatasetError(f"{name}: image_size must be an integer >= 8 (folder images vary in "
                           "size)")
    how = _decoding(name, checked, resize_size, skip_bad_images, interpolation)
    max_per_class = _check_cap(name, max_per_class)
    if not (root_p / "train").is_dir():
        raise DatasetError(f"{name}: {root_p} missing train/ (expected {layout}); {fix}")
    if test_split is None:
        test_split = next((s for s in ("val", "test") if (root_p / s).is_dir()), "val")
    if not (root_p / test_split).is_dir():
        raise DatasetError(f"{name}: {root_p} missing {test_split}/ (expected {layout}); {fix}")
    max_samples = check_max_samples(name, max_samples)
    x_tr, y_tr, c2i, ids_tr, bad_tr = _folder_split(name, root_p, [root_p / "train"], "train",
                                                    None, layout, how, max_per_class,
                                                    max_samples, store, progress)
    x_te, y_te, _, ids_te, bad_te = _folder_split(name, root_p, [root_p / test_split],
                                                  test_split, c2i, layout, how, max_per_class,
                                                  max_samples, store, progress)
    params = _with_decoding(dict(root=str(root_p), image_size=checked,
                                 max_per_class=max_per_class, test_split=test_split), how,
                            max_samples)
    return _bundle(name, params, (x_tr, y_tr), (x_te, y_te), sorted(c2i, key=c2i.get), None,
                   sample_ids=(ids_tr, ids_te), skipped=bad_tr + bad_te)


def _decoding(name: str, size: int | None, resize_size: int | None,
              skip_bad_images: bool, interpolation: str = "bilinear") -> _Decoding:
    """The checked decoding parameters of a folder dataset."""
    if not isinstance(skip_bad_images, bool):
        raise DatasetError(f"{name}: skip_bad_images={skip_bad_images!r} must be true or false")
    if interpolation not in INTERPOLATIONS:
        raise DatasetError(f"{name}: interpolation={interpolation!r} must be one of "
                           f"{', '.join(INTERPOLATIONS)}")
    if resize_size is not None:
        if (isinstance(resize_size, bool) or not isinstance(resize_size, int)
                or not 8 <= resize_size <= 4096):
            raise DatasetError(f"{name}: resize_size={resize_size!r} must be an integer in "
                               "[8, 4096] or None")
        if size is None:
            raise DatasetError(f"{name}: resize_size needs image_size (the crop after it)")
        if resize_size < size:
            raise DatasetError(f"{name}: resize_size={resize_size} is smaller than "
                               f"image_size={size}; the crop must fit in the resized image "
                               "(e.g. resize_size=256 with image_size=224)")
    return _Decoding(size, None if resize_size == size else resize_size, skip_bad_images,
                     interpolation)


def _with_decoding(params: dict[str, Any], how: _Decoding,
                   max_samples: int | None) -> dict[str, Any]:
    """``params`` plus the decoding options that differ from the defaults (left out at their
    defaults, so that the dataset keys of caches written before they existed stay valid)."""
    out = dict(params)
    if how.resize is not None:
        out["resize_size"] = how.resize
    if how.interpolation != "bilinear":
        out["interpolation"] = how.interpolation
    if how.skip:
        out["skip_bad_images"] = True
    return _with_subset(out, max_samples)
