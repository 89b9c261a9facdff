"""dtprobe: temporal representation diagnostics for checkpoint series.

Measures the discriminability-transferability trade-off (Kornblith et al. 2021; Cui et al. 2022)
across the checkpoints of a training run.

>>> import dtprobe
>>> res = dtprobe.analyze("runs/shapes-ce")        # doctest: +SKIP
>>> res.table.head()                                # doctest: +SKIP
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from dtprobe import compat

compat.install()  # old module paths (dtprobe.extract, dtprobe.layouts, ...) keep importing

__version__ = "0.1.0"
__all__ = ["analyze", "compare", "load_results", "train", "TrainConfig", "Results"]

if TYPE_CHECKING:  # pragma: no cover
    from dtprobe.analysis import analyze
    from dtprobe.results.core import Results, compare, load_results
    from dtprobe.training.trainer import TrainConfig, train

_LAZY = {"analyze": "dtprobe.analysis", "compare": "dtprobe.results.core",
         "load_results": "dtprobe.results.core", "Results": "dtprobe.results.core",
         "train": "dtprobe.training.trainer", "TrainConfig": "dtprobe.training.trainer"}


def __getattr__(name: str):
    # Lazy so that `import dtprobe` (and `dtprobe --help`) stays fast: torch loads on first use.
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'dtprobe' has no attribute {name!r}")
