"""Hugging Face ``Trainer``: a callback that records each ``checkpoint-STEP/`` in a manifest.

Example
-------
>>> from dtprobe.integrations.huggingface import ManifestCallback          # doctest: +SKIP
>>> cb = ManifestCallback(arch="mypkg.models:build", num_classes=10, dataset="cifar10")
>>> Trainer(model, args, callbacks=[cb], ...).train()
>>> # then: dtprobe analyze OUTPUT_DIR

The run directory is ``TrainingArguments.output_dir``. Each save's weight file
(``model.safetensors``, else ``pytorch_model.bin``) is recorded with the global step; its
``epoch`` is the number of completed epochs with ``save_strategy="epoch"`` and the ordinal of the
save otherwise (Hugging Face names checkpoints by step, and several may fall in one epoch).
With ``save_initial=True`` (default) the weights before the first update are written to
``checkpoint-0/model.safetensors`` as epoch 0. ``pip install 'dtprobe[huggingface]'``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import checkpoints_manifest as cm
from dtprobe.integrations._spec import RunSpec, require
from dtprobe.integrations.loop import save_and_record

__all__ = ["ManifestCallback"]  # noqa: F822 (built lazily by __getattr__)

_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


def _callback_base() -> type:
    return require("transformers", "huggingface").TrainerCallback


class _ManifestCallbackMixin:
    def __init__(self, *, arch: str, num_classes: int, dataset: str | Mapping[str, Any],
                 arch_params: Mapping[str, Any] | None = None, penultimate: str | None = None,
                 training: Mapping[str, Any] | None = None, seed: int | None = None,
                 run_dir: str | os.PathLike[str] | None = None,
                 save_initial: bool = True) -> None:
        self.spec = RunSpec(run_dir, arch, num_classes, dataset, arch_params, penultimate,
                            dict(training or {}), seed)
        self.save_initial = save_initial
        self._saves = 0

    def _run_dir(self, args: Any) -> Path:
        return Path(self.spec.run_dir if self.spec.run_dir is not None else args.output_dir)

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None,
                       **kwargs: Any) -> None:
        if not (self.save_initial and state.is_world_process_zero and state.global_step == 0
                and model is not None):
            return
        run = self._run_dir(args)
        self.spec.ensure(run)
        save_and_record(run, model, run / "checkpoint-0" / "model.safetensors", epoch=0, step=0)

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if not state.is_world_process_zero:
            return
        run = self._run_dir(args)
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        weights = next((folder / f for f in _WEIGHT_FILES if (folder / f).is_file()), None)
        if weights is None:
            raise cm.ManifestError(str(cm.manifest_path(run)),
                                   f"{folder} holds none of {', '.join(_WEIGHT_FILES)}; "
                                   "save the model weights with the checkpoint")
        self._saves += 1
        by_epoch = str(getattr(args, "save_strategy", "")).lower().endswith("epoch")
        epoch = int(round(state.epoch or 0)) if by_epoch else self._saves
        self.spec.ensure(run)
        metrics = {"epoch_fraction": float(state.epoch or 0.0)}
        cm.record_checkpoint(run, weights, epoch=epoch, step=int(state.global_step),
                             metrics=metrics, replace=True)


def __getattr__(name: str) -> Any:
    if name == "ManifestCallback":
        base = _callback_base()
        cls = type("ManifestCallback", (_ManifestCallbackMixin, base), {
            "__doc__": "Hugging Face ``TrainerCallback`` that writes a dtprobe manifest entry for "
                       "every checkpoint the ``Trainer`` saves (see the module docstring)."})
        globals()["ManifestCallback"] = cls
        return cls
    raise AttributeError(name)
