"""Dataset registry: ``load_dataset(name, **params)``; adding a dataset is one file."""

from __future__ import annotations

from collections.abc import Callable

from dtprobe.data.base import DatasetBundle
from dtprobe.errors import DatasetError

_DATASETS: dict[str, Callable[..., DatasetBundle]] = {}


def register_dataset(name: str):
    def decorator(loader: Callable[..., DatasetBundle]) -> Callable[..., DatasetBundle]:
        _DATASETS[name] = loader
        return loader

    return decorator


def available_datasets() -> list[str]:
    import dtprobe.data  # noqa: F401  (registers built-ins)

    return sorted(_DATASETS)


def load_dataset(name: str, **params) -> DatasetBundle:
    """Load dataset ``name``; ``params`` are its loader's keyword arguments (kept in manifests)."""
    names = available_datasets()
    if name not in _DATASETS:
        raise DatasetError(f"unknown dataset {name!r}; available: {', '.join(names)}")
    return _DATASETS[name](**params)
