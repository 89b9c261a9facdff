"""The pipeline: plan -> data -> features -> metrics -> table, for a run or one torchrun shard."""

from __future__ import annotations

import inspect
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pandas as pd
import torch

import checkpoints_manifest as cm
from dtprobe.analysis.data import EvalData, prepare_data, samples_record
from dtprobe.analysis.downstream import (
    analyse_downstream,
    downstream_specs,
    extract_ahead,
    load_downstream,
    preload_downstream,
)
from dtprobe.analysis.epoch_metrics import cacheable, epoch_metrics, part_key
from dtprobe.analysis.features import (
    LoadedCheckpoint,
    check_model,
    checkpoint_features,
    resolve_layers,
    test_key,
)
from dtprobe.analysis.locks import ensure_analysis_dirs, remove_stale_temp_files, run_lock
from dtprobe.analysis.plan import AnalysisOptions, PlannedCheckpoint, RunPlan, check_plan, plan_run
from dtprobe.analysis.resume import EpochFeatures, PartStore
from dtprobe.analysis.rows import (
    FAILURE_COLUMNS,
    finalise_table,
    note,
    save_tradeoff_chart,
    with_setting,
)
from dtprobe.analysis.sharding import extract_share, shard_mode
from dtprobe.analysis.similarity import cka_rows, compare_rows
from dtprobe.features.cache import FeatureCache
from dtprobe.metrics.registry import MetricSpec, resolve_metrics
from dtprobe.runtime.isolation import contain
from dtprobe.runtime.progress import tqdm
from dtprobe.table import (
    ANALYSIS_DIR,
    CKA_FILE,
    DOWNSTREAM_PARAM,
    FAILURES_FILE,
    FEATURES_DIR,
    METRICS_FILE,
    PARTS_DIR,
)


@dataclass
class AnalysisStats:
    """What one analysis did: how many checkpoints were analysed or failed, and how much work
    was done afresh versus reused from an earlier (possibly interrupted) analysis."""

    checkpoints: int = 0
    analysed: int = 0
    failed: int = 0
    features_extracted: int = 0
    features_reused: int = 0
    metrics_computed: int = 0
    metrics_reused: int = 0
    seconds: float = 0.0
    downstream_failed: int = 0  # downstream datasets that could not be loaded
    images_skipped: int = 0  # source files left out by skip_bad_images (analysis/samples.json)

    def summary(self) -> str:
        """One line for the terminal."""
        return (f"analysed {self.analysed}/{self.checkpoints} checkpoints in {self.seconds:.1f}s "
                f"(features: {self.features_extracted} extracted, {self.features_reused} "
                f"reused; metrics: {self.metrics_computed} computed, {self.metrics_reused} "
                f"reused){f'; {self.failed} failed' if self.failed else ''}"
                + (f"; {self.downstream_failed} downstream dataset(s) failed"
                   if self.downstream_failed else "")
                + (f"; {self.images_skipped} undecodable image(s) skipped (listed in "
                   "analysis/samples.json)" if self.images_skipped else ""))


def failure_reason(ckpt: PlannedCheckpoint, exc: Exception) -> str:
    """The one-line failures.csv reason for an exception raised while handling ``ckpt``
    (raised again if it is not this checkpoint's failure: see :mod:`dtprobe.runtime.isolation`).

    A :class:`DtprobeError` already names the file and the fix; anything else (an unexpected
    failure deep in torch or a metric, on content no check foresaw) is still only this
    checkpoint's failure: the others are analysed."""
    return contain(exc, str(ckpt.path), "this checkpoint is skipped (re-save it, or report the "
                   "file if it is a plain state dict)").reason


def open_checkpoint(plan: RunPlan, ckpt: PlannedCheckpoint, data: EvalData,
                    device: torch.device, opts: AnalysisOptions) -> LoadedCheckpoint:
    """``ckpt`` opened for every extraction of this analysis (read and hashed once; BatchNorm
    folded once, checked on the source's test images)."""
    return LoadedCheckpoint(plan, ckpt, opts, data.bundle.in_channels, device, data.test_images)


def process_checkpoint(plan: RunPlan, ckpt: PlannedCheckpoint, data: EvalData,
                       cache: FeatureCache, parts: PartStore, specs: Sequence[MetricSpec],
                       device: torch.device, opts: AnalysisOptions,
                       stats: AnalysisStats | None = None,
                       loaded: LoadedCheckpoint | None = None):
    """Features (cached) and per-epoch metric rows (stored atomically) of one checkpoint;
    ``loaded``: the checkpoint already opened (:func:`open_checkpoint`), else opened here."""
    if loaded is None:
        with open_checkpoint(plan, ckpt, data, device, opts) as own:
            return process_checkpoint(plan, ckpt, data, cache, parts, specs, device, opts,
                                      stats, own)
    stats = stats if stats is not None else AnalysisStats()
    feats, state = checkpoint_features(plan, ckpt, data, cache, device, opts, loaded)
    if state is None:
        stats.features_reused += 1
    else:
        stats.features_extracted += 1
    key = part_key(ckpt, data, specs, opts)
    part = parts.get(ckpt.epoch, key)
    if part is None:
        state = loaded.load()  # the head's weights (loaded once, with the features)
        part = epoch_metrics(plan, ckpt, feats, data, specs, opts, state)
        if cacheable(part):  # a metric's unexpected failure is tried again next time
            parts.put(ckpt.epoch, key, part)
        stats.metrics_computed += 1
    else:
        stats.metrics_reused += 1
    return feats, part


def stamp_settings(rows: list[dict[str, Any]], settings: dict[str, Any]) -> None:
    """Add ``settings`` (:meth:`EvalData.row_settings`: the evaluation transform, the sizes and
    digest of the subset's sample ids) to the ``params`` of every row measured on the source
    images, so that rows of analyses on different images can be told apart; downstream rows
    carry their own dataset's settings instead."""
    for row in rows:
        if f'"{DOWNSTREAM_PARAM}"' not in (row.get("params") or ""):
            for key, value in settings.items():
                row["params"] = with_setting(row.get("params"), key, value)


def _extract_shares(plan: RunPlan, data: EvalData, cache: FeatureCache, opts: AnalysisOptions,
                    dist) -> None:
    """This rank's rows of every checkpoint's images of ``data`` into part files."""
    for ckpt in plan.checkpoints:
        try:
            extract_share(plan, ckpt, data, cache, dist.device, opts, dist.rank,
                          dist.world_size)
        except Exception as exc:  # rank 0 meets the same error again and records it
            note(f"[rank {dist.rank}] epoch {ckpt.epoch}: {failure_reason(ckpt, exc)}")


def _run_shard(plan: RunPlan, opts: AnalysisOptions, specs: Sequence[MetricSpec], dist) -> None:
    """Under torchrun: this rank analyses checkpoints rank, rank + world, ... into the shared
    feature cache and part store; rank 0 then merges them into the one table.

    The ranks hold the run's lock shared (another analysis of the run waits for them; they
    always wait for it, since one rank stopping would leave the others at the barrier)."""
    analysis_dir = plan.run_dir / ANALYSIS_DIR
    with run_lock(analysis_dir, wait=True, shared=True):
        data = prepare_data(plan, dist.device, opts)
        opts = resolve_layers(plan, data, opts)
        cache = FeatureCache(analysis_dir / FEATURES_DIR, opts.use_cache)
        parts = PartStore(analysis_dir / PARTS_DIR, reuse=opts.use_cache)
        if opts.image_shards > 1:  # every checkpoint, this rank's rows; rank 0 assembles
            _extract_shares(plan, data, cache, opts, dist)
            for spec in downstream_specs(opts, data) if opts.downstream else []:
                try:  # each downstream dataset, one at a time, likewise
                    ds = load_downstream(spec, data, dist.device)
                except Exception as exc:  # rank 0 meets it again and records it
                    contain(exc, f"downstream dataset {spec.text}")
                    continue
                if ds.problem is None:
                    _extract_shares(plan, ds.data, cache, opts, dist)
                del ds
            return
        mine = []
        for ckpt in plan.checkpoints[dist.rank::dist.world_size]:
            try:
                process_checkpoint(plan, ckpt, data, cache, parts, specs, dist.device, opts)
                mine.append(ckpt)
            except Exception as exc:  # rank 0 meets the same error again and records it
                note(f"[rank {dist.rank}] epoch {ckpt.epoch}: {failure_reason(ckpt, exc)}")
        if opts.downstream:  # failures are recorded by rank 0, which meets them again
            analyse_downstream(plan, mine, data, cache, analysis_dir / PARTS_DIR, dist.device,
                               opts)


def analyze_plan(plan: RunPlan, opts: AnalysisOptions):
    """Analyse a resolved run; returns a :class:`dtprobe.results.Results` (``None`` on ranks > 0
    of a torchrun launch, where rank 0 writes the merged table).

    ``results.stats`` (:class:`AnalysisStats`) says how much was computed afresh and how much
    reused from an earlier, possibly interrupted, analysis.
    """
    from dtprobe.results.core import Results
    from dtprobe.runtime.distributed import init_from_env

    specs = resolve_metrics(opts.metrics)
    opts = opts.resolved()  # options built by AnalysisOptions.build come back as they are
    check_plan(plan, opts)
    if opts.downstream_metrics is not None:
        resolve_metrics(list(opts.downstream_metrics))  # unknown names: one line listing all
    others = [_plan_other(o, opts) for o in opts.compare]
    dist = init_from_env(opts.device)
    device = dist.device
    opts = replace(opts, device=device)  # under torchrun, this rank's GPU
    analysis_dir = plan.run_dir / ANALYSIS_DIR
    mode = shard_mode(opts.shard, len(plan.checkpoints), dist.world_size)
    if dist.enabled and mode == "images":
        opts = replace(opts, image_shards=dist.world_size)
    if dist.enabled:
        if dist.is_main:
            ensure_analysis_dirs(analysis_dir)
        dist.barrier()
        _run_shard(plan, opts, specs, dist)
        dist.barrier()
        if not dist.is_main:
            dist.shutdown()
            return None
    stats = AnalysisStats(checkpoints=len(plan.checkpoints))
    with run_lock(analysis_dir, wait=opts.wait):
        t0 = time.perf_counter()
        remove_stale_temp_files(analysis_dir)
        data = prepare_data(plan, device, opts)
        stats.images_skipped = len(data.bundle.skipped)
        for gone in data.bundle.skipped:
            note(f"skipped {gone['split']} image {gone['id']}: {gone['reason']}")
        opts = resolve_layers(plan, data, opts)
        check_model(plan, data, opts)
        downstream_specs(opts, data)  # a name repeating a source task: refused before any work
        cache = FeatureCache(analysis_dir / FEATURES_DIR, opts.use_cache)
        parts = PartStore(analysis_dir / PARTS_DIR, reuse=opts.use_cache)
        rows: list[dict[str, Any]] = []
        failures: list[dict[str, Any]] = []
        analysed: list[PlannedCheckpoint] = []
        test_feats = EpochFeatures(cache, dtype=opts.feature_dtype)
        # Downstream datasets read from an image store hold no images in memory: loaded now,
        # each checkpoint's features on them are extracted while it is open (one read, one
        # model load per checkpoint); the others are loaded one at a time afterwards.
        ahead = preload_downstream(data, device, opts) if opts.downstream else {}
        # The final checkpoint goes first so that it can stay pinned for CKA-to-final.
        order = plan.checkpoints[-1:] + plan.checkpoints[:-1]
        bar = tqdm(order, desc=f"analyze {plan.name}", unit="ckpt", disable=not opts.progress)
        for ckpt in bar:
            bar.set_postfix(epoch=ckpt.epoch)
            try:
                with open_checkpoint(plan, ckpt, data, device, opts) as loaded:
                    extract_ahead(plan, ckpt, ahead, cache, analysis_dir / PARTS_DIR, device,
                                  opts, loaded, stats)
                    feats, part = process_checkpoint(plan, ckpt, data, cache, parts, specs,
                                                     device, opts, stats, loaded)
            except Exception as exc:  # one bad file must not end the analysis (any class)
                reason = failure_reason(ckpt, exc)
                failures.append({"run": plan.name, "epoch": ckpt.epoch, "path": str(ckpt.path),
                                 "reason": reason})
                note(f"FAILED epoch {ckpt.epoch}: {reason}")
                continue
            rows.extend(part)
            analysed.append(ckpt)
            test_feats.add(ckpt.epoch, test_key(ckpt, data, opts), feats["test"])
            del feats
        pairwise = [s for s in specs if s.similarity is not None]
        similarity, matrix = cka_rows(plan, plan.checkpoints, test_feats, pairwise, opts.seed)
        rows.extend(similarity)
        for other in others:
            rows.extend(compare_rows(plan, test_feats, other, data, device, opts, pairwise))
        if opts.downstream:
            analysed.sort(key=lambda c: c.epoch)
            ds_rows, ds_failures = analyse_downstream(plan, analysed, data, cache,
                                                      analysis_dir / PARTS_DIR, device, opts,
                                                      stats, ahead)
            rows.extend(ds_rows)
            failures.extend(ds_failures)
        stamp_settings(rows, data.row_settings())
        table = finalise_table(rows, feature_dtype=opts.feature_dtype)
        if not table.empty:  # every checkpoint failed: no empty table (an earlier one stays)
            cm.atomic_write_text(analysis_dir / METRICS_FILE, table.to_csv(index=False))
        cka_path = analysis_dir / CKA_FILE
        if not matrix.empty:
            cm.atomic_write_text(cka_path, matrix.to_csv())
        elif cka_path.exists():
            cka_path.unlink()
        failure_path = analysis_dir / FAILURES_FILE
        failure_table = pd.DataFrame(failures, columns=FAILURE_COLUMNS)
        if failures:
            cm.atomic_write_text(failure_path, failure_table.to_csv(index=False))
        elif failure_path.exists():
            failure_path.unlink()
        stats.analysed = len(test_feats)
        stats.downstream_failed = sum(1 for f in failures if f["epoch"] == "")
        stats.failed = len(failures) - stats.downstream_failed
        stats.seconds = time.perf_counter() - t0
        if opts.progress:
            tqdm.write(f"{plan.name}: {stats.summary()}")
        _write_series_record(plan, analysis_dir / "checkpoints.json")
        cm.atomic_write_text(analysis_dir / "samples.json", samples_record(data))
        if opts.plot and not table.empty:
            save_tradeoff_chart(table, analysis_dir / "tradeoff.png", epoch_note=plan.epoch_note)
    dist.shutdown()
    results = Results(table, manifests={plan.name: plan.manifest or {}},
                      cka={plan.name: matrix} if not matrix.empty else {},
                      sources={plan.name: plan.run_dir}, failures=failure_table)
    results.stats = stats
    results.epoch_notes = {plan.name: plan.epoch_note}
    return results


def _plan_other(run_dir: str, opts: AnalysisOptions) -> RunPlan:
    """A ``--compare`` run: with a manifest as it says; without one, with the flags given for
    the analysed run (architecture, data, pattern, epoch source, weight choice)."""
    if (Path(run_dir) / cm.MANIFEST_NAME).exists():
        return plan_run(run_dir, follow_symlinks=opts.follow_symlinks)
    return plan_run(run_dir, follow_symlinks=opts.follow_symlinks, **opts.plan_flags)


def _write_series_record(plan: RunPlan, path: Path) -> None:
    """``analysis/checkpoints.json``: layout, what epoch 0 means, the model's origin, the load
    options (``trust_pickles`` included) and which weights each file gave. Entries not loaded
    this time (features reused) keep what an earlier analysis recorded for the same file."""
    record = plan.record()
    try:
        earlier = json.loads(path.read_text())
        before = {(c["path"], c.get("epoch")): c.get("loaded")
                  for c in earlier.get("checkpoints", [])} \
            if earlier.get("load") == record["load"] else {}
    except (OSError, ValueError, AttributeError, TypeError, KeyError):
        before = {}
    for entry in record["checkpoints"]:
        if entry["loaded"] is None:
            entry["loaded"] = before.get((entry["path"], entry["epoch"]))
    cm.atomic_write_text(path, json.dumps(record, indent=1, default=str) + "\n")


def analyze(path: str | Path, *, metrics: list[str] | None = None, device: str = "auto",
            arch: str | None = None, num_classes: int | None = None,
            arch_params: dict[str, Any] | None = None, dataset: str | None = None,
            dataset_params: dict[str, Any] | None = None, pattern: str | None = None,
            compare: Sequence[str | Path] = (), layers: Sequence[str] = (),
            batch_size: int | str = "auto", feature_dtype: str = "float32",
            engine: str = "eager", use_cache: bool = True, progress: bool = True,
            plot: bool = True, seed: int = 0, probe_protocol: str = "kornblith2019",
            wait: bool = True, follow_symlinks: bool = False, epoch_from: str = "auto",
            weights: str = "auto",
            strip_prefix: str | None = None, trust_pickles: bool = False,
            downstream: Sequence[Any] = (), downstream_metrics: Sequence[str] | None = None,
            max_samples: int | None = None, image_store: str | Path | None = "auto",
            memory_budget: int | str | None = None, shard: str = "auto",
            fewshot_shots: Sequence[int] = (1, 5, 10, 25), fewshot_draws: int = 5,
            finetune: bool = False, finetune_recipe: dict[str, Any] | None = None,
            skip_bad_images: bool = False, options: AnalysisOptions | None = None):
    """Analyse every checkpoint of the run in ``path``.

    Parameters
    ----------
    path : run directory (with ``manifest.json``, or checkpoint files named by epoch).
    metrics : registered metric names (see ``dtprobe list``); ``None`` gives the default set.
    device : ``"auto"`` (CUDA when present), ``"cpu"`` or ``"cuda:N"``.
    arch, num_classes, arch_params, dataset, dataset_params, pattern : how to rebuild the model
        and which data to use when the run has no manifest (they override the manifest if given).
    compare : other run directories; adds ``cka_to_run`` rows at matching epochs.
    layers : dotted module names (or ``"auto"``: the architecture's block outputs, see
        :func:`dtprobe.models.layers.block_layers`) analysed besides the penultimate features:
        per layer and epoch the probes, class separation and RankMe, CKA to the final epoch's same
        layer and, with ``compare``, CKA between the runs layer by layer. Spatial outputs are
        global-average pooled; rows carry the layer name in ``layer``.
    batch_size : images per forward pass during extraction; ``"auto"`` picks one that fits.
    feature_dtype : ``"float32"``, ``"float16"`` or ``"bfloat16"``: the precision in which
        features and layer outputs are cached (logits stay float32). Half precision halves
        the feature files; every metric still computes on float32/float64 copies, of values
        rounded to about 3 (float16) or 2 (bfloat16) significant digits. Part of the cache key
        and recorded in each row's ``params`` (``feature_dtype``) when not float32.
    engine : ``"eager"`` (PyTorch) or ``"onnx"`` (ONNX Runtime on the CPU; needs
        ``device="cpu"`` and ``pip install 'dtprobe[onnx]'``): what runs the forward passes of
        the extraction (:mod:`dtprobe.features.engines`). The onnx engine exports each checkpoint
        once
        and is checked against eager on the first images of every extraction (to 1e-4
        relative; eager again, with a warning, if it disagrees), so both share the feature
        cache.
    use_cache : reuse features cached under ``RUN_DIR/analysis/features``.
    progress, plot : progress bar and summary line; ``analysis/tradeoff.png``.
    seed : seed of the stochastic estimators (probe splits, MI estimators).
    probe_protocol : the linear probe's protocol: ``"kornblith2019"`` (default; 45 values of
        C in [1e-6, 1e5], full sweep, refit) or ``"short"`` (9 values in [1e-3, 10], early
        stop; faster).  See :data:`dtprobe.metrics.probes.PROBE_PROTOCOLS`.
    wait : if another process is analysing the run, wait for it (default) instead of raising
        :class:`RunBusyError`.
    follow_symlinks : accept checkpoint files reached through symbolic links that lead out of
        the run directory (e.g. checkpoints on scratch storage); refused by default.
    epoch_from : for runs without a manifest: ``"auto"``, ``"name"``, ``"metadata"`` or
        ``"order"`` (see :mod:`dtprobe.checkpoints.layouts`).
    weights : ``"auto"``, ``"raw"``, ``"ema"`` or the key/prefix holding the weights;
        strip_prefix : keep only keys with this prefix (see :mod:`dtprobe.checkpoints.state_dict`).
    trust_pickles : opt-in to unpickle files the safe loader refuses (only for trusted files);
        recorded in ``analysis/checkpoints.json``.
    downstream : transfer datasets, as specs ``"DATASET[:KEY=VALUE,...]"`` (e.g. ``"digits"``,
        ``"cinic10:root=/data/cinic10"``, ``"imagefolder:root=/data/pets,name=pets"``; see
        :mod:`dtprobe.data.spec`). Each is prepared for the source model's input
        (:mod:`dtprobe.data.transfer`) and adds, per checkpoint, rows with ``task`` = its name:
        linear and kNN probe accuracy and the transferability scores (see
        :mod:`dtprobe.analysis.downstream`), plus per-epoch ``transfer_accuracy_mean`` and
        ``transfer_log_odds_mean`` over the set.
    downstream_metrics : metrics computed on each downstream dataset (default
        :data:`dtprobe.analysis.downstream.DOWNSTREAM_METRICS`).
    max_samples : keep a stable class-stratified subset of at most this many images per split,
        of the source and of each downstream dataset (the same images for every checkpoint;
        :mod:`dtprobe.data.subsets`). Rows then carry ``"samples": "N_TRAIN+N_TEST:DIGEST"``
        in ``params``, and ``analysis/samples.json`` lists the ids.
    image_store : where folder datasets are decoded once into uint8 image stores
        (:mod:`dtprobe.data.store`): ``"auto"`` (``$DTPROBE_IMAGE_STORE``, else
        ``~/.cache/dtprobe/images``), a folder, or ``None``/``"none"`` to decode into memory.
    shard : under torchrun, what the ranks split: ``"checkpoints"`` (rank r analyses
        checkpoints r, r + W, ...), ``"images"`` (every rank extracts its share of the rows of
        every checkpoint; rank 0 assembles them) or ``"auto"`` (images when the run has fewer
        checkpoints than ranks); see :mod:`dtprobe.analysis.sharding`.
    skip_bad_images : folder datasets (source and downstream) leave out the files that cannot
        be decoded, listed in ``analysis/samples.json`` and the summary, instead of failing
        (the default: one bad file fails its dataset, on one line naming it).
    memory_budget : most memory the analysis may hold, in bytes or as ``"512M"``/``"8G"``
        (default: three quarters of the memory available); an analysis that would exceed it
        is refused before any work, with the options that would fit
        (:mod:`dtprobe.analysis.memory`).
    fewshot_shots, fewshot_draws : images per class and seeded draws of the few-shot metrics
        (``fewshot_ridge``, ``fewshot_ncm``; :mod:`dtprobe.metrics.fewshot`).
    finetune : also fine-tune the whole network of every checkpoint on every downstream
        dataset (fixed recipe, :mod:`dtprobe.training.finetune`): ``finetune_accuracy`` rows.
    finetune_recipe : entries of that recipe to replace (e.g. ``{"lr_grid": (0.01,)}`` on a
        slow CPU); recorded in the rows' params.
    options : the options already built by :meth:`AnalysisOptions.build` (the command line's,
        or reused across calls), instead of the keywords above.

    Returns
    -------
    Results
        ``.table`` is the tidy DataFrame also written to ``RUN_DIR/analysis/metrics.csv``;
        ``.failures`` lists checkpoints that could not be analysed (also in
        ``analysis/failures.csv``), each with a one-line reason (a downstream dataset that
        could not be loaded has an empty epoch); ``.stats`` is an :class:`AnalysisStats`.

    Raises
    ------
    DtprobeError, checkpoints_manifest.ManifestError
        For problems with the run as a whole (no checkpoints, invalid manifest, bad options,
        run busy with ``wait=False``). Problems with single checkpoints do not raise: they are
        reported in ``.failures``.

    Notes
    -----
    Follows the trade-off across training of Kornblith et al. (NeurIPS 2021) and Cui et al.
    (ECCV 2022). Killing an analysis loses nothing: running it again reuses every feature file
    and per-checkpoint part already written and ends with the same table.
    """
    given = {k: v for k, v in locals().items() if k not in ("path", "options")}
    if options is None:  # the documented keywords into the one options object, built there
        options = AnalysisOptions.build(**given)
    elif any(not _is_default(k, v) for k, v in given.items()):
        raise TypeError("analyze: pass either options= or the option keywords, not both")
    plan = plan_run(path, follow_symlinks=options.follow_symlinks, **options.plan_flags)
    return analyze_plan(plan, options.for_run(plan))


def _is_default(name: str, value: Any) -> bool:
    default = inspect.signature(analyze).parameters[name].default
    return value is default or (type(value) is type(default) and value == default)
