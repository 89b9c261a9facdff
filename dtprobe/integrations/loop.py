"""Record checkpoints of a plain training loop in a dtprobe manifest.

Example
-------
>>> from dtprobe.integrations import CheckpointRecorder           # doctest: +SKIP
>>> rec = CheckpointRecorder("runs/r18", arch="resnet18", num_classes=10, dataset="cifar10")
>>> for epoch in range(epochs + 1):                               # epoch 0 = initialisation
...     if epoch:
...         train_one_epoch(model)
...     rec.save(model, epoch=epoch, step=steps_so_far)
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import checkpoints_manifest as cm

__all__ = ["CheckpointRecorder", "ensure_manifest", "save_and_record"]


def ensure_manifest(run_dir: str | os.PathLike[str], *, arch: str, num_classes: int,
                    dataset: str | Mapping[str, Any], arch_params: Mapping[str, Any] | None = None,
                    penultimate: str | None = None, training: Mapping[str, Any] | None = None,
                    seed: int | None = None, run_name: str | None = None) -> cm.Manifest:
    """Return the run's manifest, creating ``RUN_DIR/manifest.json`` if it does not exist yet.

    An existing manifest is kept as it is (a resumed run appends to it); its model must be the
    one given, or :class:`checkpoints_manifest.ManifestError` is raised naming both.
    """
    run = Path(run_dir)
    path = str(run / cm.MANIFEST_NAME)

    def create_or_check(manifest: cm.Manifest | None) -> cm.Manifest | None:
        if manifest is None:
            return cm.create_manifest(
                run_name=run_name or run.resolve().name,
                model=cm.ModelSpec(arch, int(num_classes), dict(arch_params or {}),
                                   penultimate),
                dataset=cm.DatasetSpec(dataset) if isinstance(dataset, str) else dataset,
                training=dict(training or {}), seed=seed)
        if (manifest.model.arch, manifest.model.num_classes) != (arch, int(num_classes)):
            raise cm.ManifestError(path, f"the manifest describes {manifest.model.arch} with "
                                         f"{manifest.model.num_classes} classes, not {arch} with "
                                         f"{num_classes}; use another run directory", "model")
        return None  # kept as it is

    # check and create under the manifest lock: two processes starting one run at once must
    # not both see "no manifest" and the second overwrite the first's entries
    manifest = cm.update_manifest(run, create_or_check)
    if manifest is None:  # pragma: no cover - create_or_check always yields one
        raise cm.ManifestError(path, "was not created")
    return manifest


@dataclass(eq=False, kw_only=True)  # eq=False: recorders compare (and hash) by identity
class CheckpointRecorder:
    """Save a model's weights with safetensors and record the file in the run's manifest.

    Parameters
    ----------
    run_dir : run directory; ``manifest.json`` is created there on the first :meth:`save`.
    arch, num_classes, arch_params, penultimate : how dtprobe rebuilds the model (see
        ``dtprobe list``; ``arch`` may also be ``package.module:callable``).
    dataset : the source dataset name (or ``{"name": ..., "params": {...}}``).
    training, seed : free-form training configuration and seed, recorded as they are.
    folder : sub-folder of ``run_dir`` for the weight files.
    """

    run_dir: str | os.PathLike[str] = field(kw_only=False)
    arch: str
    num_classes: int
    dataset: str | Mapping[str, Any]
    arch_params: Mapping[str, Any] | None = None
    penultimate: str | None = None
    training: Mapping[str, Any] | None = None
    seed: int | None = None
    folder: str = "checkpoints"

    def save(self, model: Any, *, epoch: int, step: int = 0,
             metrics: Mapping[str, float] | None = None) -> Path:
        """Write ``model.state_dict()`` to ``FOLDER/epoch_{epoch:04d}.safetensors`` and record it.

        ``epoch`` counts completed epochs (0 = the initialisation, before any update), which is
        what dtprobe's charts put on their x axis. Returns the file's path.

        Under ``torch.distributed`` (DDP, torchrun) only rank 0 writes the file and the entry
        (the ranks hold the same weights); the others return the same path without writing, so
        a loop that calls ``save`` on every rank records each epoch once.
        """
        path = Path(self.run_dir) / self.folder / f"epoch_{int(epoch):04d}.safetensors"
        if _rank() != 0:
            return path
        ensure_manifest(self.run_dir, arch=self.arch, num_classes=self.num_classes,
                        dataset=self.dataset, arch_params=self.arch_params,
                        penultimate=self.penultimate, training=self.training, seed=self.seed)
        save_and_record(self.run_dir, model, path, epoch=epoch, step=step, metrics=metrics)
        return path


def _rank() -> int:
    """This process's rank under an initialised ``torch.distributed`` group, else 0."""
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def save_and_record(run_dir: str | os.PathLike[str], model: Any, path: Path, *, epoch: int,
                    step: int, metrics: Mapping[str, float] | None = None) -> None:
    """Write ``model.state_dict()`` as safetensors at ``path`` and record it in the manifest.

    Serialised in memory, written under an unpredictable temporary name and renamed (never
    through a planted link), and recorded with the digest of the bytes written: the manifest
    only ever names complete files, and exactly the bytes dtprobe wrote.
    """
    from safetensors.torch import save as save_safetensors

    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    data = save_safetensors(state, metadata={"epoch": str(int(epoch)), "step": str(int(step))})
    cm.atomic_write_bytes(path, data)
    cm.record_checkpoint(run_dir, path, epoch=int(epoch), step=int(step),
                         metrics=dict(metrics or {}), replace=True,
                         sha256=hashlib.sha256(data).hexdigest())
