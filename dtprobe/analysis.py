"""The analysis pipeline: run directory -> features per checkpoint -> metrics -> tidy table.

``analyze(run_dir)`` resolves the checkpoint series (manifest, or file names plus flags),
loads each checkpoint safely, extracts features once (cached), computes the registered
per-epoch metrics and the across-epoch CKA, and writes ``RUN_DIR/analysis/``:

- ``metrics.csv``: the tidy table (``run, epoch, step, metric, task, layer, value, estimator,
  params``);
- ``cka_matrix.csv``: the epoch x epoch linear CKA matrix of the penultimate features;
- ``failures.csv``: checkpoints that could not be analysed, with the reason (if any);
- ``tradeoff.png``: source accuracy and downstream probe accuracy against epoch.

Per-checkpoint rows are stored atomically in ``analysis/parts/`` as they are computed, so an
interrupted analysis resumes where it stopped and nothing computed is lost.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import time
import warnings
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

import checkpoints_manifest as cm
from dtprobe import checkpoints as ckpt_io
from dtprobe.data import DatasetBundle, load_dataset
from dtprobe.errors import CheckpointError, ConfigError, DtprobeError, MetricInputError
from dtprobe.extract import FeatureCache, cache_key, dataset_key, extract_features
from dtprobe.metrics import cka_matrix, linear_cka
from dtprobe.metrics.registry import (
    EpochView,
    FeatureSplit,
    MetricSpec,
    MetricValue,
    resolve_metrics,
)
from dtprobe.models import build_model, get_arch, head_module

COLUMNS = ["run", "epoch", "step", "metric", "task", "layer", "value", "estimator", "params"]
PARTS_VERSION = 1
MAX_MI_INPUTS = 2000  # test images whose flattened pixels are kept as X for I(X;T)


@dataclass
class PlannedCheckpoint:
    epoch: int
    step: int | None
    path: Path
    sha256: str | None = None


@dataclass
class RunPlan:
    """What to analyse: where the checkpoints are and how to rebuild the model and data."""

    run_dir: Path
    name: str
    arch: str
    arch_kwargs: dict[str, Any]
    num_classes: int
    dataset: str
    dataset_params: dict[str, Any]
    checkpoints: list[PlannedCheckpoint]
    manifest: dict[str, Any] | None = None
    head: str | None = None


@dataclass
class AnalysisOptions:
    metrics: list[str] | None = None
    device: str = "auto"
    batch_size: int = 512
    layers: list[str] = field(default_factory=list)
    compare: list[str] = field(default_factory=list)
    use_cache: bool = True
    progress: bool = True
    plot: bool = True
    seed: int = 0


# ------------------------------------------------------------------------------------ planning
def plan_run(run_dir: str | Path, *, arch: str | None = None, num_classes: int | None = None,
             arch_params: dict[str, Any] | None = None, dataset: str | None = None,
             dataset_params: dict[str, Any] | None = None, pattern: str | None = None,
             name: str | None = None) -> RunPlan:
    """Resolve the checkpoint series of ``run_dir`` from its manifest, or from file names + flags.

    Flags given explicitly override what the manifest says (e.g. analyse on another dataset).
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ConfigError(f"{run_dir}: no such run directory")
    manifest_path = run_dir / "manifest.json"
    if manifest_path.exists():
        manifest = cm.read_manifest(run_dir)
        entries = [PlannedCheckpoint(c.epoch, c.step, ckpt_io.resolve_inside(run_dir, c.path),
                                     c.sha256) for c in manifest.checkpoints]
        if not entries:
            raise ConfigError(f"{manifest_path}: lists no checkpoints yet; train first")
        kwargs = dict(manifest.model.kwargs)
        kwargs.update(arch_params or {})
        return RunPlan(run_dir, name or manifest.run_name, arch or manifest.model.arch, kwargs,
                       num_classes or manifest.model.num_classes,
                       dataset or manifest.dataset.name,
                       dataset_params if dataset_params is not None else dict(
                           manifest.dataset.params),
                       entries, manifest.to_dict(), manifest.model.penultimate)
    series = ckpt_io.infer_checkpoint_series(run_dir, pattern=pattern)
    missing = [flag for flag, val in (("--arch", arch), ("--num-classes", num_classes),
                                      ("--dataset", dataset)) if val is None]
    if missing:
        raise ConfigError(f"{run_dir} has no manifest.json; pass {' '.join(missing)} to say how "
                          "to rebuild the model and which data to use (or write a manifest: see "
                          "checkpoints_manifest/README.md)")
    entries = [PlannedCheckpoint(c.epoch, c.step, Path(c.path)) for c in series]
    return RunPlan(run_dir, name or run_dir.name, arch, dict(arch_params or {}), int(num_classes),
                   dataset, dict(dataset_params or {}), entries)


# ------------------------------------------------------------------------------------ storage
@contextlib.contextmanager
def run_lock(analysis_dir: Path, wait: bool = True) -> Iterator[None]:
    """Exclusive lock on ``analysis_dir`` so two analyses of one run never interleave writes."""
    analysis_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(analysis_dir / ".lock", os.O_CREAT | os.O_RDWR, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if not wait:
                raise DtprobeError(f"{analysis_dir.parent} is being analysed by another process; "
                                   "wait for it to finish") from None
            tqdm.write(f"{analysis_dir.parent}: another analysis holds the lock; waiting ...")
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


class PartStore:
    """Per-checkpoint metric rows as small JSON files, reused when their key matches."""

    def __init__(self, root: Path):
        self.root = root

    def _path(self, epoch: int) -> Path:
        return self.root / f"epoch_{epoch:06d}.json"

    def get(self, epoch: int, key: str) -> list[dict[str, Any]] | None:
        path = self._path(epoch)
        if not path.exists():
            return None
        try:
            doc = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            return None
        return doc["rows"] if doc.get("key") == key else None

    def put(self, epoch: int, key: str, rows: list[dict[str, Any]]) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        _atomic_write_text(self._path(epoch), json.dumps({"key": key, "rows": rows}))


# ------------------------------------------------------------------------------- computation
@dataclass
class EvalData:
    """The dataset decoded once and reused for every checkpoint."""

    bundle: DatasetBundle
    key: str
    train_images: torch.Tensor
    test_images: torch.Tensor
    mi_inputs: torch.Tensor


def prepare_data(plan: RunPlan, device: torch.device) -> EvalData:
    bundle = load_dataset(plan.dataset, **plan.dataset_params)
    train_images, test_images = bundle.train.images, bundle.test.images
    if device.type == "cuda":
        train_images, test_images = train_images.pin_memory(), test_images.pin_memory()
    gen = torch.Generator().manual_seed(0)
    n_mi = min(MAX_MI_INPUTS, len(bundle.test))
    mi_idx = torch.randperm(len(bundle.test), generator=gen)[:n_mi].sort().values
    return EvalData(bundle, dataset_key(bundle.name, bundle.params), train_images, test_images,
                    bundle.test.images[mi_idx].flatten(1))


def _load_model(plan: RunPlan, ckpt: PlannedCheckpoint, in_channels: int) -> torch.nn.Module:
    if not ckpt.path.exists():
        raise CheckpointError(f"{ckpt.path}: checkpoint file is missing; restore it or remove its "
                              "entry from the manifest")
    if ckpt.sha256 is not None:
        ckpt_io.verify_sha256(ckpt.path, ckpt.sha256)
    kwargs = dict(plan.arch_kwargs)
    if plan.manifest is None:
        kwargs.setdefault("in_channels", in_channels)
    model = build_model(plan.arch, plan.num_classes, **kwargs)
    state = ckpt_io.load_state_dict(ckpt.path)
    ckpt_io.load_into_model(model, state, ckpt.path)
    return model


def _checkpoint_features(plan: RunPlan, ckpt: PlannedCheckpoint, data: EvalData,
                         cache: FeatureCache, device: torch.device, opts: AnalysisOptions,
                         ) -> dict[str, dict[str, torch.Tensor]]:
    """Train/test features, logits and layer outputs of one checkpoint (from cache when present)."""
    if ckpt.sha256 is None:
        ckpt.sha256 = cm.sha256_file(ckpt.path) if ckpt.path.exists() else None
    out: dict[str, dict[str, torch.Tensor]] = {}
    todo = []
    for split in ("train", "test"):
        layers = opts.layers if split == "test" else []
        key = (_test_key(ckpt, data, opts) if split == "test"
               else cache_key(ckpt.sha256 or str(ckpt.path), data.key, split, layers))
        hit = cache.get(key)
        if hit is None:
            todo.append((split, key, layers))
        else:
            out[split] = hit
    if todo:
        model = _load_model(plan, ckpt, data.bundle.in_channels).to(device)
        head = head_module(model, plan.arch)
        for split, key, layers in todo:
            images = data.train_images if split == "train" else data.test_images
            feats = extract_features(model, head, images, device=device,
                                     batch_size=opts.batch_size, layers=layers)
            bad = ~torch.isfinite(feats["features"]).all(dim=1)
            if bad.any():
                raise CheckpointError(f"{ckpt.path}: {int(bad.sum())} {split} images give NaN/Inf "
                                      "features (diverged run?); this checkpoint is skipped")
            cache.put(key, feats)
            out[split] = feats
        del model
    return out


def _test_key(ckpt: PlannedCheckpoint, data: EvalData, opts: AnalysisOptions) -> str:
    return cache_key(ckpt.sha256 or str(ckpt.path), data.key, "test", opts.layers)


def _head_params(plan: RunPlan,
                 ckpt: PlannedCheckpoint) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    state = ckpt_io.load_state_dict(ckpt.path)
    head = plan.head or get_arch(plan.arch).head
    weight = state.get(f"{head}.weight")
    bias = state.get(f"{head}.bias")
    return weight, bias


def _rows(plan: RunPlan, ckpt: PlannedCheckpoint, values) -> list[dict[str, Any]]:
    return [{"run": plan.name, "epoch": ckpt.epoch, "step": ckpt.step, "metric": v.metric,
             "task": v.task, "layer": getattr(v, "layer", ""), "value": float(v.value),
             "estimator": v.estimator, "params": v.params_json()} for v in values]


def _epoch_metrics(plan: RunPlan, ckpt: PlannedCheckpoint, feats, data: EvalData,
                   specs: Sequence[MetricSpec], opts: AnalysisOptions) -> list[dict[str, Any]]:
    b = data.bundle
    weight, bias = _head_params(plan, ckpt)
    view = EpochView(
        epoch=ckpt.epoch,
        train=FeatureSplit(feats["train"]["features"], b.train.labels, b.train.factors,
                           feats["train"]["logits"]),
        test=FeatureSplit(feats["test"]["features"], b.test.labels, b.test.factors,
                          feats["test"]["logits"], inputs=data.mi_inputs),
        head_weight=weight, head_bias=bias, seed=opts.seed)
    rows = []
    for spec in specs:
        try:
            values = spec.func(view)
        except MetricInputError as exc:
            # A metric that cannot apply to this checkpoint (e.g. a class missing from a split)
            # leaves a NaN row that says why, instead of failing the whole checkpoint.
            warnings.warn(f"epoch {ckpt.epoch}: {spec.name}: {exc}", stacklevel=2)
            values = [MetricValue(spec.name, float("nan"), estimator="error",
                                  params={"error": str(exc)})]
        rows.extend(_rows(plan, ckpt, values))
    return rows


def _part_key(ckpt: PlannedCheckpoint, data: EvalData, specs: Sequence[MetricSpec],
              opts: AnalysisOptions) -> str:
    payload = json.dumps([PARTS_VERSION, ckpt.sha256, data.key, [s.name for s in specs],
                          opts.seed])
    return hashlib.sha256(payload.encode()).hexdigest()


class EpochFeatures(Mapping):
    """epoch -> test-split features (penultimate + layers), read back from the feature cache.

    Holds at most ``keep`` epochs in memory (plus the final one, pinned), so the memory of an
    analysis does not grow with the number of checkpoints.
    """

    def __init__(self, cache: FeatureCache, keep: int = 3):
        self.cache = cache
        self.keep = keep
        self._keys: dict[int, str] = {}
        self._recent: OrderedDict[int, dict[str, torch.Tensor]] = OrderedDict()
        self.pinned: dict[int, dict[str, torch.Tensor]] = {}

    @staticmethod
    def _select(feats: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v for k, v in feats.items() if k == "features" or k.startswith("layer:")}

    def add(self, epoch: int, key: str, feats: dict[str, torch.Tensor]) -> None:
        self._keys[epoch] = key
        self._remember(epoch, self._select(feats))

    def pin(self, epoch: int) -> None:
        self.pinned[epoch] = self[epoch]

    def _remember(self, epoch: int, feats: dict[str, torch.Tensor]) -> None:
        self._recent[epoch] = feats
        self._recent.move_to_end(epoch)
        while len(self._recent) > self.keep:
            self._recent.popitem(last=False)

    def __getitem__(self, epoch: int) -> dict[str, torch.Tensor]:
        if epoch in self.pinned:
            return self.pinned[epoch]
        if epoch in self._recent:
            self._recent.move_to_end(epoch)
            return self._recent[epoch]
        feats = self.cache.get(self._keys[epoch])
        if feats is None:
            raise DtprobeError(f"cached features of epoch {epoch} vanished from "
                               f"{self.cache.root}; re-run the analysis")
        feats = self._select(feats)
        self._remember(epoch, feats)
        return feats

    def __contains__(self, epoch: object) -> bool:
        return epoch in self._keys

    def __iter__(self):
        return iter(sorted(self._keys))

    def __len__(self) -> int:
        return len(self._keys)


def streamed_cka_matrix(store: Mapping[int, dict[str, torch.Tensor]], epochs: list[int],
                        budget_bytes: int = 1 << 30) -> np.ndarray:
    """Linear CKA between every pair of ``epochs``, loading at most two blocks of epochs at once.

    When all features fit in ``budget_bytes`` this is one :func:`cka_matrix` call; otherwise the
    matrix is filled block pair by block pair from the cache (memory bounded, same values).
    """
    if not epochs:
        return np.zeros((0, 0))
    first = store[epochs[0]]["features"]
    per_epoch = first.numel() * 8  # float64 once centred
    block = max(1, int(budget_bytes // (2 * per_epoch)))
    if block >= len(epochs):
        return np.asarray(cka_matrix([store[e]["features"] for e in epochs]))
    out = np.eye(len(epochs))
    starts = list(range(0, len(epochs), block))
    for bi in starts:
        for bj in starts:
            if bj < bi:
                continue
            idx = list(range(bi, min(bi + block, len(epochs))))
            if bj != bi:
                idx += list(range(bj, min(bj + block, len(epochs))))
            sub = np.asarray(cka_matrix([store[epochs[i]]["features"] for i in idx]))
            for a, ia in enumerate(idx):
                for b, ib in enumerate(idx):
                    out[ia, ib] = sub[a, b]
    return out


def _cka_rows(plan: RunPlan, epochs: list[PlannedCheckpoint],
              test_feats: Mapping[int, dict[str, torch.Tensor]]) -> tuple[list[dict], pd.DataFrame]:
    """CKA of each epoch to the final and to the previous one; the full epoch x epoch matrix."""
    rows: list[dict[str, Any]] = []
    ok = [c for c in epochs if c.epoch in test_feats]
    if not ok:
        return rows, pd.DataFrame()
    final = ok[-1]
    if isinstance(test_feats, EpochFeatures):
        test_feats.pin(final.epoch)
    params = {"kernel": "linear", "split": "test", "debiased": False}
    layer_keys = sorted(k for k in test_feats[final.epoch] if k.startswith("layer:"))
    for i, c in enumerate(ok):
        for key in ["features", *layer_keys]:
            layer = "" if key == "features" else key[len("layer:"):]
            value = linear_cka(test_feats[c.epoch][key], test_feats[final.epoch][key])
            rows.append({"run": plan.name, "epoch": c.epoch, "step": c.step,
                         "metric": "cka_to_final", "task": "", "layer": layer,
                         "value": float(value), "estimator": "linear_cka",
                         "params": json.dumps({**params, "reference_epoch": final.epoch})})
            if i > 0:
                prev = ok[i - 1]
                value = linear_cka(test_feats[c.epoch][key], test_feats[prev.epoch][key])
                rows.append({"run": plan.name, "epoch": c.epoch, "step": c.step,
                             "metric": "cka_to_previous", "task": "", "layer": layer,
                             "value": float(value), "estimator": "linear_cka",
                             "params": json.dumps({**params, "reference_epoch": prev.epoch})})
    names = [c.epoch for c in ok]
    matrix = streamed_cka_matrix(test_feats, names)
    return rows, pd.DataFrame(matrix, index=names, columns=names)


def _compare_rows(plan: RunPlan, test_feats: Mapping[int, dict[str, torch.Tensor]],
                  other_dir: str, data: EvalData, device: torch.device,
                  opts: AnalysisOptions) -> list[dict[str, Any]]:
    """Linear CKA between this run and ``other_dir`` at matching epochs on the same test images."""
    other = plan_run(other_dir)
    if dataset_key(other.dataset, other.dataset_params) != dataset_key(plan.dataset,
                                                                        plan.dataset_params):
        # Compare on this run's data: the other model is evaluated on the same images.
        other.dataset, other.dataset_params = plan.dataset, plan.dataset_params
    cache = FeatureCache(other.run_dir / "analysis" / "features", opts.use_cache)
    rows = []
    for c in other.checkpoints:
        if c.epoch not in test_feats:
            continue
        try:
            feats = _checkpoint_features(other, c, data, cache, device,
                                         AnalysisOptions(batch_size=opts.batch_size))
        except DtprobeError as exc:
            tqdm.write(f"compare: skipping {c.path}: {exc}")
            continue
        value = linear_cka(test_feats[c.epoch]["features"], feats["test"]["features"])
        rows.append({"run": plan.name, "epoch": c.epoch, "step": None, "metric": "cka_to_run",
                     "task": other.name, "layer": "", "value": float(value),
                     "estimator": "linear_cka",
                     "params": json.dumps({"kernel": "linear", "split": "test",
                                           "other_run": str(other.run_dir)})})
    return rows


def _process_checkpoint(plan: RunPlan, ckpt: PlannedCheckpoint, data: EvalData,
                        cache: FeatureCache, parts: PartStore, specs: Sequence[MetricSpec],
                        device: torch.device, opts: AnalysisOptions):
    """Features (cached) and per-epoch metric rows (stored atomically) of one checkpoint."""
    feats = _checkpoint_features(plan, ckpt, data, cache, device, opts)
    key = _part_key(ckpt, data, specs, opts)
    part = parts.get(ckpt.epoch, key)
    if part is None:
        part = _epoch_metrics(plan, ckpt, feats, data, specs, opts)
        parts.put(ckpt.epoch, key, part)
    return feats, part


def _run_shard(plan: RunPlan, opts: AnalysisOptions, specs: Sequence[MetricSpec], dist) -> None:
    """Under torchrun: this rank analyses checkpoints rank, rank + world, ... into the shared
    feature cache and part store; rank 0 then merges them into the one table."""
    analysis_dir = plan.run_dir / "analysis"
    data = prepare_data(plan, dist.device)
    cache = FeatureCache(analysis_dir / "features", opts.use_cache)
    parts = PartStore(analysis_dir / "parts")
    for ckpt in plan.checkpoints[dist.rank::dist.world_size]:
        try:
            _process_checkpoint(plan, ckpt, data, cache, parts, specs, dist.device, opts)
        except DtprobeError as exc:  # rank 0 meets the same error again and records it
            tqdm.write(f"[rank {dist.rank}] epoch {ckpt.epoch}: {exc}")


def analyze_plan(plan: RunPlan, opts: AnalysisOptions):
    """Analyse a resolved run; returns a :class:`dtprobe.results.Results` (``None`` on ranks > 0
    of a torchrun launch, where rank 0 writes the merged table)."""
    from dtprobe.results import Results
    from dtprobe.training.distributed import init_from_env

    specs = resolve_metrics(opts.metrics)
    dist = init_from_env(opts.device)
    device = dist.device
    analysis_dir = plan.run_dir / "analysis"
    if dist.enabled:
        analysis_dir.mkdir(parents=True, exist_ok=True)
        dist.barrier()
        _run_shard(plan, opts, specs, dist)
        dist.barrier()
        if not dist.is_main:
            dist.shutdown()
            return None
    with run_lock(analysis_dir):
        data = prepare_data(plan, device)
        cache = FeatureCache(analysis_dir / "features", opts.use_cache)
        parts = PartStore(analysis_dir / "parts")
        rows: list[dict[str, Any]] = []
        failures: list[dict[str, Any]] = []
        test_feats = EpochFeatures(cache)
        t0 = time.perf_counter()
        # The final checkpoint goes first so that it can stay pinned for CKA-to-final.
        order = plan.checkpoints[-1:] + plan.checkpoints[:-1]
        bar = tqdm(order, desc=f"analyze {plan.name}", unit="ckpt", disable=not opts.progress)
        for ckpt in bar:
            bar.set_postfix(epoch=ckpt.epoch)
            try:
                feats, part = _process_checkpoint(plan, ckpt, data, cache, parts, specs, device,
                                                  opts)
            except DtprobeError as exc:
                failures.append({"run": plan.name, "epoch": ckpt.epoch, "path": str(ckpt.path),
                                 "reason": str(exc)})
                tqdm.write(f"FAILED epoch {ckpt.epoch}: {exc}")
                continue
            rows.extend(part)
            test_feats.add(ckpt.epoch, _test_key(ckpt, data, opts), feats["test"])
            del feats
        cka_rows, matrix = _cka_rows(plan, plan.checkpoints, test_feats)
        rows.extend(cka_rows)
        for other in opts.compare:
            rows.extend(_compare_rows(plan, test_feats, other, data, device, opts))
        table = _finalise_table(rows)
        _atomic_write_text(analysis_dir / "metrics.csv", table.to_csv(index=False))
        if not matrix.empty:
            _atomic_write_text(analysis_dir / "cka_matrix.csv", matrix.to_csv())
        failure_path = analysis_dir / "failures.csv"
        if failures:
            _atomic_write_text(failure_path, pd.DataFrame(failures).to_csv(index=False))
        elif failure_path.exists():
            failure_path.unlink()
        if opts.progress:
            tqdm.write(f"analysed {len(test_feats)}/{len(plan.checkpoints)} checkpoints of "
                       f"{plan.name} in {time.perf_counter() - t0:.1f}s")
        if opts.plot and not table.empty:
            _save_tradeoff_chart(table, analysis_dir / "tradeoff.png")
    dist.shutdown()
    results = Results(table, manifests={plan.name: plan.manifest or {}},
                      cka={plan.name: matrix} if not matrix.empty else {})
    results.failures = pd.DataFrame(failures, columns=["run", "epoch", "path", "reason"])
    return results


def _finalise_table(rows: list[dict[str, Any]]) -> pd.DataFrame:
    table = pd.DataFrame(rows, columns=COLUMNS)
    table["task"] = table["task"].fillna("")
    table["layer"] = table["layer"].fillna("")
    table["step"] = table["step"].astype("Int64")
    return table.sort_values(["epoch", "metric", "task", "layer"],
                             kind="stable").reset_index(drop=True)


def _save_tradeoff_chart(table: pd.DataFrame, path: Path) -> None:
    import matplotlib.pyplot as plt

    from dtprobe.plotting import plot_tradeoff_over_epochs

    fig = plot_tradeoff_over_epochs(table).figure
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.png")
    fig.savefig(tmp, dpi=130, bbox_inches="tight")
    plt.close(fig)
    os.replace(tmp, path)


def analyze(path: str | Path, *, metrics: list[str] | None = None, device: str = "auto",
            arch: str | None = None, num_classes: int | None = None,
            arch_params: dict[str, Any] | None = None, dataset: str | None = None,
            dataset_params: dict[str, Any] | None = None, pattern: str | None = None,
            compare: Sequence[str | Path] = (), layers: Sequence[str] = (),
            batch_size: int = 512, use_cache: bool = True, progress: bool = True,
            plot: bool = True, seed: int = 0):
    """Analyse every checkpoint of the run in ``path``.

    Parameters
    ----------
    path : run directory (with ``manifest.json``, or checkpoint files named by epoch).
    metrics : registered metric names (see ``dtprobe list``); ``None`` gives the default set.
    device : ``"auto"`` (CUDA when present), ``"cpu"`` or ``"cuda:N"``.
    arch, num_classes, arch_params, dataset, dataset_params, pattern : how to rebuild the model
        and which data to use when the run has no manifest (they override the manifest if given).
    compare : other run directories; adds ``cka_to_run`` rows at matching epochs.
    layers : dotted module names for layer-wise CKA (in addition to the penultimate features).
    batch_size : images per forward pass during extraction.
    use_cache : reuse features cached under ``RUN_DIR/analysis/features``.

    Returns
    -------
    Results
        ``.table`` is the tidy DataFrame also written to ``RUN_DIR/analysis/metrics.csv``.
    """
    plan = plan_run(path, arch=arch, num_classes=num_classes, arch_params=arch_params,
                    dataset=dataset, dataset_params=dataset_params, pattern=pattern)
    opts = AnalysisOptions(metrics=list(metrics) if metrics else None, device=device,
                           batch_size=batch_size, layers=list(layers),
                           compare=[str(c) for c in compare], use_cache=use_cache,
                           progress=progress, plot=plot, seed=seed)
    return analyze_plan(plan, opts)
