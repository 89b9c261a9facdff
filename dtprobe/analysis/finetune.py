"""Fine-tuned transfer rows (``--finetune``): one full-network fine-tune per checkpoint x
downstream dataset (:func:`dtprobe.training.finetune.finetune`, fixed recipe).

Each finished fine-tune is stored at once as its own part (``parts/epoch_E.finetune-NAME.json``,
atomic, keyed by the checkpoint's content, the dataset, the recipe and the seed), so a killed
analysis loses at most the fine-tune in progress and a finished one is never redone. Under
torchrun with checkpoint sharding (``--shard checkpoints``, the default when there are at least
as many checkpoints as ranks) every rank fine-tunes its own checkpoints and rank 0 reuses their
parts; with ``--shard images`` rank 0 does every fine-tune.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch

from dtprobe.analysis.features import load_model
from dtprobe.analysis.plan import AnalysisOptions, PlannedCheckpoint, RunPlan
from dtprobe.analysis.resume import PartStore
from dtprobe.analysis.rows import note
from dtprobe.errors import ConfigError, MetricInputError
from dtprobe.metrics.accuracy import CI_LEVEL, CI_METHOD, accuracy_interval
from dtprobe.metrics.registry import MetricValue
from dtprobe.models import head_name
from dtprobe.training.finetune import FINETUNE_RECIPE, finetune

FINETUNE_VERSION = 1
FINETUNE_METRIC = "finetune_accuracy"


class FineTunePartStore(PartStore):
    """The fine-tuned row of one checkpoint on one downstream dataset."""

    def __init__(self, root: Path, name: str, reuse: bool = True):
        super().__init__(root, reuse=reuse)
        self.name = name

    def _path(self, epoch: int) -> Path:
        return self.root / f"epoch_{epoch:06d}.finetune-{self.name}.json"


def recipe(opts: AnalysisOptions) -> dict[str, Any]:
    """The fine-tune recipe of this analysis: :data:`FINETUNE_RECIPE` with
    ``opts.finetune_recipe``'s entries replaced (unknown keys refused)."""
    extra = dict(opts.finetune_recipe or {})
    unknown = sorted(set(extra) - set(FINETUNE_RECIPE))
    if unknown:
        raise ConfigError(f"finetune_recipe: unknown key(s) {', '.join(unknown)}; the recipe has "
                          f"{', '.join(FINETUNE_RECIPE)}")
    return {**FINETUNE_RECIPE, **extra}


def finetune_key(ckpt: PlannedCheckpoint, ds: Any, opts: AnalysisOptions) -> str:
    fields = [FINETUNE_VERSION, ckpt.cache_digest, ds.data.key, ds.spec.text,
              json.dumps(recipe(opts), sort_keys=True, default=str), opts.seed, ds.problem]
    return hashlib.sha256(json.dumps(fields).encode()).hexdigest()


def _value(ds: Any, opts: AnalysisOptions, res: Any = None, error: str | None = None,
           device: str = "") -> MetricValue:
    params = {**recipe(opts), "seed": opts.seed}
    if error is not None:
        return MetricValue(FINETUNE_METRIC, float("nan"), task=ds.spec.name, estimator="error",
                           params=params, diagnostics={"error": error})
    diag = {"best_lr": res.best_lr, "val_accuracy": {str(k): v for k, v in
                                                     res.val_accuracy.items()},
            "test_accuracy_by_lr": {str(k): v for k, v in res.test_by_lr.items()},
            "diverged_lrs": res.diverged, "n_train": res.n_train, "n_val": res.n_val,
            "head_train_accuracy": res.head_train_accuracy,
            "n_test": res.n_test, "steps": res.steps, "seconds": round(res.seconds, 3),
            "device": device}
    if res.error is not None:
        diag["error"] = res.error
        return MetricValue(FINETUNE_METRIC, float("nan"), task=ds.spec.name,
                           estimator="error", params=params, diagnostics=diag)
    labels = ds.data.bundle.test.labels
    if labels.numel():
        diag["chance"] = float(torch.bincount(labels.long().clamp_min(0)).max()) / labels.numel()
    diag["ci_low"], diag["ci_high"] = accuracy_interval(res.test_accuracy, res.n_test, CI_LEVEL)
    return MetricValue(FINETUNE_METRIC, res.test_accuracy, task=ds.spec.name,
                       estimator="finetune-sgd", params={**params, "ci_method": CI_METHOD},
                       diagnostics=diag)


def finetune_rows(plan: RunPlan, ckpt: PlannedCheckpoint, ds: Any, in_channels: int,
                  parts: FineTunePartStore, device: torch.device, opts: AnalysisOptions,
                  row_fn: Any) -> list[dict[str, Any]]:
    """The fine-tuned row of ``ckpt`` on ``ds``: reused from ``parts`` when its key matches,
    else fine-tuned now and stored. ``row_fn(value)`` makes the table row (the downstream
    rows' rule)."""
    key = finetune_key(ckpt, ds, opts)
    rows = parts.get(ckpt.epoch, key)
    if rows is not None:
        return rows
    if ds.problem is not None:
        value = _value(ds, opts, error=ds.problem)
    else:
        model, _ = load_model(plan, ckpt, in_channels, opts)
        head = plan.head or head_name(model, plan.arch)
        b = ds.data.bundle
        try:
            res = finetune(model, head, ds.data.train_images, b.train.labels,
                           ds.data.test_images, b.test.labels, seed=opts.seed, device=device,
                           recipe=recipe(opts))
        except MetricInputError as exc:
            value = _value(ds, opts, error=str(exc))
        except RuntimeError as exc:  # e.g. out of memory: a NaN row now, retried next time
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            reason = f"fine-tune failed ({first}); the next analysis tries it again"
            note(f"epoch {ckpt.epoch}: downstream {ds.spec.name}: {reason}")
            return [row_fn(_value(ds, opts, error=reason))]
        else:
            value = _value(ds, opts, res, device=str(device))
            if res.error is not None:
                note(f"epoch {ckpt.epoch}: downstream {ds.spec.name}: {res.error}")
        del model
    rows = [row_fn(value)]
    parts.put(ckpt.epoch, key, rows)
    return rows


__all__ = ["FINETUNE_METRIC", "FineTunePartStore", "finetune_key", "finetune_rows"]
