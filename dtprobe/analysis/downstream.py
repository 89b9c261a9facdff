"""Downstream datasets: the second axis of the analysis (checkpoint x dataset).

For every downstream spec (:mod:`dtprobe.data.spec`) the dataset is loaded once, prepared for
the source model's input (:mod:`dtprobe.data.transfer`: channels, resolution, the source's
normalisation), and then, for every checkpoint, its train/test features are extracted once into
the run's feature cache (key: checkpoint sha256, dataset key, split, preprocessing tag) and the
transfer metrics are computed on them:

- the Kornblith-protocol linear probe (``probe_accuracy``: the dataset's official train/test
  split, validation carved from train) and the weighted kNN probe (``knn_accuracy``);
- few-shot transfer (``fewshot_ridge``, ``fewshot_ncm``: k images per class drawn from the
  training split by sample-id hash, several draws; :mod:`dtprobe.metrics.fewshot`);
- the transferability scores LogME, H-score, TransRate, GBC (features) and LEEP, NCE (the source
  head's outputs on the target images), on the target's training split.

Rows carry ``task = <dataset name>`` and ``params["downstream"] = <canonical spec>``, so they
never mix with the source dataset's own factor tasks (names that would collide are refused).
Per epoch, :func:`aggregate_rows` adds the mean accuracy and the mean log-odds over the
downstream set (the aggregate of Sariyildiz et al. 2023, t-ReX).

Each checkpoint is read, hashed, loaded and BatchNorm-folded once per analysis
(:class:`~dtprobe.analysis.features.LoadedCheckpoint`): the datasets read from an image store
(folder datasets; no image held in memory) are loaded before the checkpoints
(:func:`preload_downstream`), and each checkpoint's features on them are extracted into the
feature cache while it is open for the source (:func:`extract_ahead`). Their metrics, and
everything for datasets held in memory, then run with datasets as the outer loop and
checkpoints the inner one: only one in-memory downstream dataset's images are held at a time
(memory flat in the number of datasets and of checkpoints), at the cost of reading each
checkpoint once more for each such dataset. Rows go to ``analysis/parts`` like the source rows
(one atomic JSON file per checkpoint and dataset), so a killed analysis resumes.

A dataset that cannot be loaded (missing or malformed on disk, or any other exception
while loading it: :mod:`dtprobe.runtime.isolation`) is reported on one line and recorded as a
failure with an empty epoch; the source metrics and every other dataset are still analysed,
and the next analysis tries it again. A dataset with one class, or too few images for the probe,
gives NaN rows whose ``params["error"]`` says why.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dtprobe.analysis.data import EvalData, enforce_budget, place_images
from dtprobe.analysis.epoch_metrics import (
    LAYER_METRICS,
    apply_metric,
    cacheable,
    layer_views,
    metric_options,
    metric_rows,
    rows_key,
)
from dtprobe.analysis.features import LoadedCheckpoint, checkpoint_features, features_key
from dtprobe.analysis.finetune import FineTunePartStore, finetune_rows
from dtprobe.analysis.plan import AnalysisOptions, PlannedCheckpoint, RunPlan
from dtprobe.analysis.resume import PartStore
from dtprobe.analysis.rows import note
from dtprobe.data import load_dataset
from dtprobe.data.registry import supports_store
from dtprobe.data.spec import DownstreamSpec, check_spec_names, loader_parameters
from dtprobe.data.transfer import SourceInput, prepare_for_source, source_loader_params
from dtprobe.features.cache import FeatureCache, dataset_key
from dtprobe.metrics.fewshot import row_metric_names
from dtprobe.metrics.registry import EpochView, FeatureSplit, MetricValue, available_metrics
from dtprobe.references import with_references
from dtprobe.runtime.isolation import contain
from dtprobe.table import DOWNSTREAM_PARAM

__doc__ = with_references(
    __doc__,
    ("kornblith2021", "(linear transfer to eight datasets)"),
    ("cui2022", "(CIFAR-100 -> CINIC-10)"),
    ("sariyildiz2023", "(t-ReX; mean log-odds)"),
)

DOWNSTREAM_METRICS: tuple[str, ...] = ("probe_accuracy", "knn_accuracy", "fewshot_ridge",
                                       "fewshot_ncm", "logme", "h_score", "transrate", "gbc",
                                       "leep", "nce")
"""Metrics computed per checkpoint and downstream dataset (registered adapters, one task)."""

DOWNSTREAM_VERSION = 2  # 2: the linear probe's default is the papers' 45-value protocol
LOG_ODDS_CLIP = 1e-4  # accuracies are clipped to [clip, 1 - clip] before the log-odds
MIN_TRAIN_PER_CLASS = 2  # one image to fit and one to validate the probe's C


@dataclass
class DownstreamData:
    """One downstream dataset prepared for the source model.

    ``data.key`` identifies the images (dataset key + preprocessing tag) in cache and part keys;
    ``problem`` is why no probe can be fitted (one class, too few images), else None.
    """

    spec: DownstreamSpec
    data: EvalData
    problem: str | None = None


def load_downstream(spec: DownstreamSpec, source: EvalData,
                    device: torch.device) -> DownstreamData:
    """Load ``spec`` and prepare it for a model trained on ``source`` (see
    :mod:`dtprobe.data.transfer` for the rule).

    Raises
    ------
    DtprobeError
        The dataset is missing or malformed on disk (the loader's one-line message).
    """
    target = SourceInput.of(source.bundle)
    params = source_loader_params(loader_parameters(spec.dataset), spec.params, target)
    if source.max_samples is not None:  # --max-samples applies unless the spec sets its own
        params.setdefault("max_samples", source.max_samples)
    if source.skip_bad_images and "skip_bad_images" in loader_parameters(spec.dataset):
        params.setdefault("skip_bad_images", True)
    store = source.store if supports_store(spec.dataset) else None
    bundle = prepare_for_source(load_dataset(spec.dataset, store=store,
                                             progress=source.progress, **params), target)
    name = spec.name
    bundle.train.factors = {name: bundle.train.labels}
    bundle.test.factors = {name: bundle.test.labels}
    bundle.factor_classes = {name: bundle.num_classes}
    train_images, test_images = place_images(bundle, device)
    key = f"{dataset_key(bundle.name, bundle.params)}|{target.tag}"
    data = EvalData(bundle, key, train_images, test_images, torch.empty(0, 0), store=store,
                    budget=source.budget, max_samples=source.max_samples,
                    # the same model on images of the same (converted) shape
                    activations_per_image=source.activations_per_image,
                    model_bytes=source.model_bytes, host_batch=source.host_batch,
                    skip_bad_images=source.skip_bad_images, progress=source.progress)
    return DownstreamData(spec, data, _problem(spec, bundle.train.labels, bundle.test.labels))


def _problem(spec: DownstreamSpec, train: torch.Tensor, test: torch.Tensor) -> str | None:
    if train.numel() == 0 or test.numel() == 0:
        return (f"downstream {spec.name}: {train.numel()} train / {test.numel()} test images; "
                "a probe needs both splits")
    classes, counts = torch.unique(train, return_counts=True)
    if classes.numel() < 2:
        return (f"downstream {spec.name}: its training split has {classes.numel()} class; a "
                "probe needs at least 2")
    if int(counts.min()) < MIN_TRAIN_PER_CLASS:
        small = int(classes[counts.argmin()])
        return (f"downstream {spec.name}: class {small} has {int(counts.min())} training image(s); "
                f"the probe needs at least {MIN_TRAIN_PER_CLASS} per class (one to fit, one to "
                "validate)")
    return None


class DownstreamPartStore(PartStore):
    """Rows of one checkpoint on one downstream dataset: ``parts/epoch_E.downstream-NAME.json``
    (same atomic writes and key checks as the source rows)."""

    def __init__(self, root: Path, name: str, reuse: bool = True):
        super().__init__(root, reuse=reuse)
        self.name = name

    def _path(self, epoch: int) -> Path:
        return self.root / f"epoch_{epoch:06d}.downstream-{self.name}.json"


def downstream_part_key(ckpt: PlannedCheckpoint, ds: DownstreamData, metrics: Sequence[str],
                        opts: AnalysisOptions) -> str:
    """Key of the rows of downstream dataset ``ds`` on ``ckpt`` (the one recipe,
    :func:`~dtprobe.analysis.epoch_metrics.rows_key`)."""
    return rows_key(DOWNSTREAM_VERSION, ckpt,
                    [ds.data.key, ds.spec.text, list(metrics), opts.seed, ds.problem], opts)


def _row(plan: RunPlan, ckpt: PlannedCheckpoint, ds: DownstreamData,
         v: MetricValue, view: EpochView | None = None, layer: str = "") -> dict[str, Any]:
    (row,) = metric_rows(plan, ckpt, [v], view)
    params = json.loads(row["params"]) if row["params"] else {}
    params[DOWNSTREAM_PARAM] = ds.spec.text
    params.update(ds.data.row_settings())  # transform, subset digest: as source rows
    row.update(task=ds.spec.name, layer=layer,
               params=json.dumps(params, sort_keys=True, default=str))
    return row


def _nan(metric: str, ds: DownstreamData, reason: str) -> MetricValue:
    return MetricValue(metric, float("nan"), task=ds.spec.name, estimator="error",
                       params={"error": reason})


def downstream_metrics(plan: RunPlan, ckpt: PlannedCheckpoint, ds: DownstreamData,
                       feats: dict[str, dict[str, torch.Tensor]] | None, metrics: Sequence[str],
                       opts: AnalysisOptions) -> list[dict[str, Any]]:
    """Rows of ``metrics`` for one checkpoint's features on one downstream dataset."""
    if ds.problem is not None or feats is None:
        reason = ds.problem or "no features"
        return [_row(plan, ckpt, ds, _nan(name, ds, reason)) for m in metrics
                for name in row_metric_names(m, metric_options(opts))]
    b = ds.data.bundle
    view = EpochView(
        epoch=ckpt.epoch,
        train=FeatureSplit(feats["train"]["features"], b.train.labels, b.train.factors,
                           feats["train"]["logits"], sample_ids=b.train.sample_ids),
        test=FeatureSplit(feats["test"]["features"], b.test.labels, b.test.factors,
                          feats["test"]["logits"], sample_ids=b.test.sample_ids),
        seed=opts.seed, probe_protocol=opts.probe_protocol, options=metric_options(opts))
    registry = available_metrics()
    rows = []
    for name in metrics:
        rows.extend(_row(plan, ckpt, ds, v, view)
                    for v in apply_metric(registry[name], view, ckpt.epoch,
                                          f"downstream {ds.spec.name}: ", ds.spec.name))
    # layer x epoch transfer: the feature-and-label metrics on each requested layer's outputs
    for layer, layer_view in layer_views(feats, b, opts.layers, ckpt.epoch, opts.seed,
                                         opts.probe_protocol, view.options):
        for name in metrics:
            if name in LAYER_METRICS:
                rows.extend(_row(plan, ckpt, ds, v, layer_view, layer)
                            for v in apply_metric(registry[name], layer_view, ckpt.epoch,
                                                  f"downstream {ds.spec.name}: ",
                                                  ds.spec.name))
    return rows


def process_downstream(plan: RunPlan, ckpt: PlannedCheckpoint, ds: DownstreamData,
                       cache: FeatureCache, parts: DownstreamPartStore, device: torch.device,
                       opts: AnalysisOptions, stats: Any = None,
                       source: EvalData | None = None) -> list[dict[str, Any]]:
    """Rows of one checkpoint on one downstream dataset: reused from ``parts`` when their key
    matches, else computed from features (cached; extracted when missing).

    The checkpoint is read only if this analysis has not hashed it yet (its rows and features
    are keyed by that digest) or if features must be extracted (:class:`LoadedCheckpoint`);
    ``source`` gives the images the BatchNorm folding is checked on (the source's, as for
    the source's own features)."""
    metrics = list(opts.downstream_metrics or DOWNSTREAM_METRICS)
    probe = (source if source is not None else ds.data).test_images
    with LoadedCheckpoint(plan, ckpt, opts, ds.data.bundle.in_channels, device,
                          probe) as loaded:
        key = downstream_part_key(ckpt, ds, metrics, opts)
        rows = parts.get(ckpt.epoch, key)
        if rows is not None:
            if stats is not None:
                stats.metrics_reused += 1
            return rows
        feats = None
        if ds.problem is None:
            feats, state = checkpoint_features(plan, ckpt, ds.data, cache, device, opts,
                                               loaded)
            if stats is not None:  # extracted ahead in this analysis: counted there
                fresh = cache.written(features_key(ckpt, ds.data, "test", opts))
                stats.features_reused += state is None and not fresh
                stats.features_extracted += state is not None
    # the model is let go before the metrics run
    rows = downstream_metrics(plan, ckpt, ds, feats, metrics, opts)
    if cacheable(rows):  # a metric's unexpected failure is tried again next time
        parts.put(ckpt.epoch, key, rows)
    if stats is not None:
        stats.metrics_computed += 1
    return rows


def preload_downstream(source: EvalData, device: torch.device, opts: AnalysisOptions,
                       ) -> dict[str, DownstreamData | Exception]:
    """The downstream datasets whose images are read from an image store (none held in
    memory), loaded before the checkpoints are: keyed by spec text, each a
    :class:`DownstreamData` or the exception loading it raised (recorded as that dataset's
    failure by :func:`analyse_downstream`, which does not load it again). The others are
    left to :func:`analyse_downstream`, one in memory at a time."""
    out: dict[str, DownstreamData | Exception] = {}
    if source.store is None:
        return out
    for spec in downstream_specs(opts, source):
        if not supports_store(spec.dataset):
            continue
        try:
            ds = load_downstream(spec, source, device)
            if source.values_per_image:
                enforce_budget(ds.data, source.values_per_image, f"downstream {spec.name}")
        except Exception as exc:  # noqa: BLE001 - classified and recorded when met again
            contain(exc, f"downstream dataset {spec.text}")  # environment errors go up now
            out[spec.text] = exc
            continue
        out[spec.text] = ds
    return out


def extract_ahead(plan: RunPlan, ckpt: PlannedCheckpoint,
                  preloaded: dict[str, DownstreamData | Exception], cache: FeatureCache,
                  parts_root: Path, device: torch.device, opts: AnalysisOptions,
                  loaded: LoadedCheckpoint, stats: Any = None) -> None:
    """Features of the open checkpoint ``loaded`` on every preloaded downstream dataset whose
    rows are not stored yet, into the feature cache, where :func:`process_downstream` finds
    them: the checkpoint is read, hashed, loaded and folded once for the source and every such
    dataset. A failure here is left for :func:`analyse_downstream` to meet and record."""
    metrics = list(opts.downstream_metrics or DOWNSTREAM_METRICS)
    for ds in preloaded.values():
        if isinstance(ds, Exception) or ds.problem is not None:
            continue
        parts = DownstreamPartStore(parts_root, ds.spec.name, reuse=opts.use_cache)
        if parts.get(ckpt.epoch, downstream_part_key(ckpt, ds, metrics, opts)) is not None:
            continue  # its rows are stored: no features needed
        try:
            _, state = checkpoint_features(plan, ckpt, ds.data, cache, device, opts, loaded)
        except Exception as exc:  # noqa: BLE001 - met again, and recorded, on this dataset
            contain(exc, str(ckpt.path))
            continue
        if stats is not None:
            stats.features_extracted += state is not None


def aggregate_rows(rows: Sequence[dict[str, Any]], names: Sequence[str]) -> list[dict[str, Any]]:
    """Per run and epoch: mean downstream probe accuracy and mean log-odds (t-ReX) over the
    downstream datasets ``names`` that have a finite probe accuracy at that epoch.

    The log-odds of an accuracy ``p`` is ``log(p / (1 - p))`` with ``p`` clipped to
    ``[LOG_ODDS_CLIP, 1 - LOG_ODDS_CLIP]``; averaging log-odds instead of accuracies weighs a
    gain from 0.98 to 0.99 like one from 0.5 to 0.67 (Sariyildiz et al. 2023).
    """
    wanted = set(names)
    by_epoch: dict[tuple[str, int], dict[str, Any]] = {}
    for r in rows:
        if r["metric"] != "probe_accuracy" or r["task"] not in wanted or r["layer"]:
            continue
        if f'"{DOWNSTREAM_PARAM}"' not in (r.get("params") or ""):
            continue
        slot = by_epoch.setdefault((r["run"], r["epoch"]), {"step": r["step"], "acc": {}})
        if math.isfinite(r["value"]):
            slot["acc"][r["task"]] = float(r["value"])
    out = []
    for (run, epoch), slot in sorted(by_epoch.items()):
        acc = slot["acc"]
        used = sorted(acc)
        missing = sorted(wanted - set(used))
        params = {"datasets": used, "n_datasets": len(used), "missing": missing}
        if used:
            mean_acc = sum(acc.values()) / len(used)
            clip = [min(max(acc[t], LOG_ODDS_CLIP), 1 - LOG_ODDS_CLIP) for t in used]
            mean_lo = sum(math.log(p / (1 - p)) for p in clip) / len(used)
        else:
            mean_acc = mean_lo = float("nan")
            params["error"] = "no downstream dataset has a finite probe accuracy at this epoch"
        error = params.pop("error", None)
        diag = json.dumps({"error": error}) if error else ""
        base = {"run": run, "epoch": epoch, "step": slot["step"], "task": "", "layer": "",
                "other_run": "", "diagnostics": diag}
        out.append({**base, "metric": "transfer_accuracy_mean", "value": mean_acc,
                    "estimator": "mean", "params": json.dumps(params, sort_keys=True)})
        out.append({**base, "metric": "transfer_log_odds_mean", "value": mean_lo,
                    "estimator": "mean-log-odds",
                    "params": json.dumps({**params, "clip": LOG_ODDS_CLIP}, sort_keys=True)})
    return out


def downstream_specs(opts: AnalysisOptions, source: EvalData) -> list[DownstreamSpec]:
    """The specs of ``opts.downstream`` (parsed once, by :meth:`AnalysisOptions.build`), checked
    against the source: their names may not repeat a source task."""
    specs = opts.resolved().downstream
    check_spec_names(specs, reserved=source.bundle.factor_classes)
    return specs


def analyse_downstream(plan: RunPlan, checkpoints: Sequence[PlannedCheckpoint],
                       source: EvalData, cache: FeatureCache, parts_root: Path,
                       device: torch.device, opts: AnalysisOptions, stats: Any = None,
                       preloaded: dict[str, DownstreamData | Exception] | None = None,
                       ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Rows of every checkpoint on every downstream dataset, plus the per-epoch aggregates, and
    the failures (a dataset that cannot be loaded: empty epoch; a checkpoint that fails on one
    dataset: its epoch). One dataset held in memory is loaded at a time; ``preloaded``
    (:func:`preload_downstream`: read from an image store) are taken from there, and let go
    as they are done."""
    specs = downstream_specs(opts, source)
    preloaded = preloaded if preloaded is not None else {}
    rows: list[dict[str, Any]] = []
    failures: list[dict[str, Any]] = []
    for spec in specs:
        try:
            early = preloaded.pop(spec.text, None)
            if isinstance(early, Exception):
                raise early
            ds = early if early is not None else load_downstream(spec, source, device)
            if source.values_per_image and early is None:  # one in memory at a time, checked
                enforce_budget(ds.data, source.values_per_image, f"downstream {spec.name}")
        except Exception as exc:  # any class: one dataset must not end the analysis
            reason = (f"downstream dataset {spec.text}: "
                      f"{contain(exc, '', 'this dataset is skipped').reason}")
            failures.append({"run": plan.name, "epoch": "", "path": spec.text,
                             "reason": reason})
            note(f"FAILED {reason}; the other datasets are analysed, and the next analysis "
                 "tries it again")
            continue
        for gone in ds.data.bundle.skipped:
            note(f"downstream {spec.name}: skipped {gone['split']} image {gone['id']}: "
                 f"{gone['reason']}")
        if ds.problem is not None:
            note(f"{ds.problem}; its rows are NaN")
        parts = DownstreamPartStore(parts_root, spec.name, reuse=opts.use_cache)
        tuned = FineTunePartStore(parts_root, spec.name, reuse=opts.use_cache)
        for ckpt in checkpoints:
            try:
                rows.extend(process_downstream(plan, ckpt, ds, cache, parts, device, opts, stats,
                                               source))
                if opts.finetune:  # opt-in: a training run per checkpoint and dataset
                    rows.extend(finetune_rows(
                        plan, ckpt, ds, source.bundle.in_channels, tuned, device, opts,
                        lambda v, c=ckpt, d=ds: _row(plan, c, d, v)))
            except Exception as exc:  # any class: this checkpoint on this dataset only
                reason = (f"downstream {spec.name}: "
                          f"{contain(exc, str(ckpt.path), 'skipped on this dataset').reason}")
                failures.append({"run": plan.name, "epoch": ckpt.epoch, "path": str(ckpt.path),
                                 "reason": reason})
                note(f"FAILED epoch {ckpt.epoch}: {reason}")
        del ds
    if specs:
        rows.extend(aggregate_rows(rows, [s.name for s in specs]))
    return rows, failures
