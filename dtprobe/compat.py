"""Old import paths of modules that moved in the 0.2 layout, kept working for a release.

``import dtprobe.extract`` (or ``from dtprobe.layouts import peek``) gives the module at its new
home, the *same* module object (so monkeypatching either name patches both), with a
:class:`DeprecationWarning` naming the new path. No file stands at the old paths: the aliases are
resolved by a finder on :data:`sys.meta_path`, installed by ``import dtprobe``.

Packages that took a former module's name (``dtprobe.checkpoints``, ``dtprobe.plotting``,
``dtprobe.results``, ``dtprobe.training.objectives``) need no alias: their ``__init__``
re-exports the former module's public names.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
import warnings
from types import ModuleType

#: Former module path -> its new home.
MOVED_MODULES: dict[str, str] = {
    "dtprobe.layouts": "dtprobe.checkpoints.layouts",
    "dtprobe.state_dict": "dtprobe.checkpoints.state_dict",
    "dtprobe.extract": "dtprobe.features.extract",
    "dtprobe.engines": "dtprobe.features.engines",
    "dtprobe.engines.onnx": "dtprobe.features.engines.onnx",
    "dtprobe.integrity": "dtprobe.features.integrity",
    "dtprobe.report": "dtprobe.results.report",
    "dtprobe.uncertainty": "dtprobe.results.uncertainty",
    "dtprobe.export": "dtprobe.results.export",
    "dtprobe.layer_plots": "dtprobe.plotting.layer_charts",
    "dtprobe.devices": "dtprobe.runtime.devices",
    "dtprobe.progress": "dtprobe.runtime.progress",
    "dtprobe.sweep": "dtprobe.training.sweep",
    "dtprobe.training.distributed": "dtprobe.runtime.distributed",
    "dtprobe.training.kornblith": "dtprobe.training.objectives.kornblith",
    "dtprobe.training.contrastive": "dtprobe.training.objectives.contrastive",
    "dtprobe.training.trex": "dtprobe.training.objectives.trex",
    "dtprobe.training.ctc": "dtprobe.training.objectives.ctc",
    "dtprobe.training.memory_bank": "dtprobe.training.objectives.memory_bank",
    "dtprobe.analysis.table": "dtprobe.analysis.rows",
    "dtprobe.analysis.cka": "dtprobe.analysis.similarity",
    "dtprobe.analysis.stores": "dtprobe.analysis.resume",
}


class _AliasLoader(importlib.abc.Loader):
    def __init__(self, old: str, new: str) -> None:
        self.old, self.new = old, new

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType:
        warnings.warn(f"{self.old} moved to {self.new}; import it from there (the old path "
                      "goes in the next release)", DeprecationWarning, stacklevel=3)
        return importlib.import_module(self.new)

    def exec_module(self, module: ModuleType) -> None:
        """Nothing to run: the module was imported at its new home."""


class MovedModuleFinder(importlib.abc.MetaPathFinder):
    """Finds the former paths in :data:`MOVED_MODULES` (and nothing else)."""

    def find_spec(self, fullname: str, path: object = None,
                  target: ModuleType | None = None) -> importlib.machinery.ModuleSpec | None:
        new = MOVED_MODULES.get(fullname)
        if new is None:
            return None
        return importlib.util.spec_from_loader(fullname, _AliasLoader(fullname, new))


def install() -> None:
    """Put the finder first on :data:`sys.meta_path` (once), before the path finder could load
    a second copy of a moved submodule (``dtprobe.engines.onnx``) under its old name."""
    if not any(isinstance(f, MovedModuleFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, MovedModuleFinder())
