"""PyTorch Lightning: a ``ModelCheckpoint`` that records every file it writes in a manifest.

Example
-------
>>> from dtprobe.integrations.lightning import ManifestModelCheckpoint    # doctest: +SKIP
>>> ckpt = ManifestModelCheckpoint("runs/r18", arch="resnet18", num_classes=10,
...                                dataset="cifar10", every_n_epochs=2, save_top_k=-1)
>>> lightning.Trainer(callbacks=[ckpt], ...).fit(module)
>>> # then: dtprobe analyze runs/r18

Epochs: the manifest's ``epoch`` counts *completed* epochs, so the file Lightning names
``epoch=0-step=50.ckpt`` (saved at the end of its first epoch) is epoch 1, and with
``save_initial=True`` (default) the weights before the first update are saved as ``init.ckpt``,
epoch 0 -- the reference point of every trade-off chart. Step-based saving
(``every_n_train_steps``) records the ordinal of each save as its epoch and the global step as
its step. Keep ``save_top_k=-1``: files Lightning deletes later (top-k pruning) are also dropped
from the manifest, and an analysis then has fewer points. ``last.ckpt`` copies are not recorded
(they duplicate an epoch).

Works with ``lightning.pytorch`` and with the older ``pytorch_lightning`` package (whichever is
installed; ``lightning`` first): ``pip install 'dtprobe[lightning]'``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import checkpoints_manifest as cm
from dtprobe.integrations._spec import RunSpec, require

__all__ = ["ManifestModelCheckpoint", "manifest_checkpoint_class"]  # noqa: F822 (lazy)

_CLASSES: dict[str, type] = {}


def _base_module() -> Any:
    try:
        return require("lightning.pytorch", "lightning")
    except ImportError:
        try:
            return require("pytorch_lightning", "lightning")
        except ImportError:
            raise ImportError("neither lightning nor pytorch_lightning is installed; install "
                              "one with `pip install 'dtprobe[lightning]'`") from None


def manifest_checkpoint_class(package: str | None = None) -> type:
    """The ``ModelCheckpoint`` subclass for ``package`` (``"lightning.pytorch"`` or
    ``"pytorch_lightning"``; default: whichever is installed)."""
    pl = require(package, "lightning") if package else _base_module()
    name = pl.__name__
    if name not in _CLASSES:
        _CLASSES[name] = _build(pl.callbacks.ModelCheckpoint)
    return _CLASSES[name]


def _build(base: type) -> type:
    class ManifestModelCheckpoint(base):
        """``ModelCheckpoint`` that records each checkpoint file in ``RUN_DIR/manifest.json``.

        Parameters
        ----------
        run_dir : the run directory (holds ``manifest.json``; the default ``dirpath`` is
            ``RUN_DIR/checkpoints``, and any ``dirpath`` must lie inside it).
        arch, num_classes, dataset, arch_params, penultimate, training, seed : recorded in the
            manifest so that ``dtprobe analyze RUN`` rebuilds the model with no flags.
        save_initial : also save the weights before the first update as epoch 0.
        **kwargs : ``ModelCheckpoint`` arguments (``every_n_epochs``, ``save_top_k`` ...).
        """

        def __init__(self, run_dir: str | os.PathLike[str], *, arch: str, num_classes: int,
                     dataset: str | Mapping[str, Any],
                     arch_params: Mapping[str, Any] | None = None,
                     penultimate: str | None = None, training: Mapping[str, Any] | None = None,
                     seed: int | None = None, save_initial: bool = True, **kwargs: Any) -> None:
            kwargs.setdefault("dirpath", str(Path(run_dir) / "checkpoints"))
            kwargs.setdefault("save_top_k", -1)
            super().__init__(**kwargs)
            self.run_dir = Path(run_dir)
            self.spec = RunSpec(run_dir, arch, num_classes, dataset, arch_params, penultimate,
                                dict(training or {}), seed)
            self.save_initial = save_initial
            self._saves = 0

        def _record(self, filepath: str, epoch: int, step: int) -> None:
            self.spec.ensure(self.run_dir)
            try:
                Path(filepath).resolve().relative_to(self.run_dir.resolve())
            except ValueError:
                raise cm.ManifestError(str(cm.manifest_path(self.run_dir)),
                                       f"checkpoint {filepath} is outside the run directory "
                                       f"{self.run_dir}; put dirpath inside it") from None
            cm.record_checkpoint(self.run_dir, filepath, epoch=epoch, step=step, replace=True)

        def on_train_start(self, trainer: Any, pl_module: Any) -> None:
            super().on_train_start(trainer, pl_module)
            if (self.save_initial and trainer.global_step == 0 and trainer.is_global_zero
                    and self.dirpath is not None):
                path = os.path.join(self.dirpath, "init" + self.FILE_EXTENSION)
                trainer.save_checkpoint(path)
                self._record(path, 0, 0)

        def _save_checkpoint(self, trainer: Any, filepath: str) -> None:
            super()._save_checkpoint(trainer, filepath)
            if not trainer.is_global_zero:
                return
            if Path(filepath).stem.startswith(self.CHECKPOINT_NAME_LAST or "last"):
                return  # a copy of an epoch that is (or will be) recorded under its own name
            self._saves += 1
            step_based = bool(getattr(self, "_every_n_train_steps", 0))
            epoch = self._saves if step_based else int(trainer.current_epoch) + 1
            self._record(filepath, epoch, int(trainer.global_step))

        def _remove_checkpoint(self, trainer: Any, filepath: str) -> None:
            super()._remove_checkpoint(trainer, filepath)
            if trainer.is_global_zero and cm.manifest_path(self.run_dir).exists():
                _forget(self.run_dir, filepath)

    return ManifestModelCheckpoint


def _forget(run_dir: Path, filepath: str) -> None:
    """Drop the manifest entry of a file Lightning deleted (top-k pruning)."""
    rel = Path(os.path.relpath(Path(filepath).resolve(), run_dir.resolve())).as_posix()

    def drop(manifest: cm.Manifest | None) -> cm.Manifest | None:
        if manifest is None:
            return None
        kept = [c for c in manifest.checkpoints if c.path != rel]
        if len(kept) == len(manifest.checkpoints):
            return None
        manifest.checkpoints = kept
        return manifest

    # read and write under one lock: a read outside it lost entries that another process
    # (another job, a recorder) appended between this read and this write
    cm.update_manifest(run_dir, drop)


def __getattr__(name: str) -> Any:
    if name == "ManifestModelCheckpoint":
        return manifest_checkpoint_class()
    raise AttributeError(name)
