"""Datasets, by name: ``load_dataset(name, **params) -> DatasetBundle``.

Importing this package registers the built-in loaders: the embedded ``shapes``
(default; shows the discriminability-transferability trade-off on a CPU),
``digits`` and the procedural transfer target ``textures``, and the real
datasets read from local paths (``cifar10``, ``cifar100``, ``cinic10``,
``stl10``, ``imagefolder``).  A new dataset is one module with a function
decorated by :func:`register_dataset`.  Downstream (transfer) datasets of an
analysis are named by specs (:mod:`dtprobe.data.spec`) and prepared for the
source model by :mod:`dtprobe.data.transfer`.
"""

from dtprobe.data import digits, real, shapes, textures  # noqa: F401  (registration)
from dtprobe.data.base import DatasetBundle, Split
from dtprobe.data.registry import available_datasets, load_dataset, register_dataset

__all__ = ["DatasetBundle", "Split", "available_datasets", "load_dataset", "register_dataset"]
