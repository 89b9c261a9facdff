"""Dataset registry: ``load_dataset(name, **params)``; adding a dataset is one file."""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable
from dataclasses import replace

import torch

from dtprobe.data.base import DatasetBundle, Split
from dtprobe.data.pixels import is_raw
from dtprobe.data.subsets import check_max_samples, stable_subset
from dtprobe.errors import DatasetError

_DATASETS: dict[str, Callable[..., DatasetBundle]] = {}

#: Parameters every dataset takes: loaders that do not declare them get them applied here.
GENERIC_PARAMS = ("max_samples",)
#: Loader arguments that say how the analysis keeps the images (the image-store folder, the
#: progress bar while it is built), not what the images are: never dataset parameters.
RUNTIME_PARAMS: tuple[str, ...] = ("store", "progress")


def register_dataset(name: str):
    def decorator(loader: Callable[..., DatasetBundle]) -> Callable[..., DatasetBundle]:
        _DATASETS[name] = loader
        return loader

    return decorator


def available_datasets() -> list[str]:
    import dtprobe.data  # noqa: F401  (registers built-ins)

    return sorted(_DATASETS)


def dataset_loader(name: str) -> Callable[..., DatasetBundle]:
    """The loader registered as ``name`` (a ``KeyError`` for an unregistered name)."""
    available_datasets()
    return _DATASETS[name]


def _accepts(loader: Callable[..., DatasetBundle], name: str) -> bool:
    return name in inspect.signature(loader).parameters


def supports_store(name: str) -> bool:
    """Whether dataset ``name`` can decode into an image store (folder datasets)."""
    available_datasets()
    return name in _DATASETS and _accepts(_DATASETS[name], "store")


def _subset_split(split: Split, max_samples: int) -> Split:
    keep = stable_subset(split.sample_ids, split.labels.numpy(), max_samples)
    index = torch.from_numpy(keep)
    images = split.images.subset(index) if is_raw(split.images) else split.images[index]
    return Split(images=images, labels=split.labels[index],
                 factors={k: v[index] for k, v in split.factors.items()},
                 sample_ids=[split.sample_ids[i] for i in keep])


def _with_ids(split: Split, name: str) -> Split:
    if split.sample_ids is not None:
        return split
    return replace(split, sample_ids=[f"{name}:{i}" for i in range(len(split))])


def load_dataset(name: str, store: str | os.PathLike | None = None, progress: bool = True,
                 **params) -> DatasetBundle:
    """Load dataset ``name``; ``params`` are its loader's keyword arguments (kept in manifests).

    ``max_samples`` (a stable class-stratified subset per split, :mod:`dtprobe.data.subsets`)
    is accepted by every dataset: loaders that take it choose before decoding, the others are
    subset after loading. ``store`` (a folder of image stores, :mod:`dtprobe.data.store`) is
    passed to loaders that can decode into one and ignored by the others (their images are
    made in memory); it is not a parameter of the images, so it is not recorded in ``params``.
    ``progress`` (the progress bar while a store is built) likewise, to loaders that show one.
    """
    names = available_datasets()
    if name not in _DATASETS:
        raise DatasetError(f"unknown dataset {name!r}; available: {', '.join(names)}")
    loader = _DATASETS[name]
    if store is not None and _accepts(loader, "store"):
        params = {**params, "store": store}
    if not progress and _accepts(loader, "progress"):
        params = {**params, "progress": False}
    cap = None
    if "max_samples" in params and not _accepts(loader, "max_samples"):
        cap = check_max_samples(name, params.pop("max_samples"))
    bundle = loader(**params)
    train, test = _with_ids(bundle.train, "train"), _with_ids(bundle.test, "test")
    if cap is None:
        return replace(bundle, train=train, test=test)
    return replace(bundle, params={**bundle.params, "max_samples": cap},
                   train=_subset_split(train, cap), test=_subset_split(test, cap))
