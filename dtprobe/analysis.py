"""The analysis pipeline: run directory -> features per checkpoint -> metrics -> tidy table.

``analyze(run_dir)`` resolves the checkpoint series (manifest, or file names plus flags),
loads each checkpoint safely, extracts features once (cached), computes the registered
per-epoch metrics and the across-epoch CKA, and writes ``RUN_DIR/analysis/``:

- ``metrics.csv``: the tidy table (``run, epoch, step, metric, task, layer, value, estimator,
  params``);
- ``cka_matrix.csv``: the epoch x epoch linear CKA matrix of the penultimate features;
- ``failures.csv``: checkpoints that could not be analysed, with the reason (if any);
- ``tradeoff.png``: source accuracy and downstream probe accuracy against epoch.

Reliability (the checkpoints are often someone else's files, analysed on shared machines where
jobs get killed):

- checkpoints load only through :mod:`dtprobe.checkpoints` (``weights_only`` or safetensors),
  after their manifest sha256 is verified and their path is checked to stay inside the run
  directory (symbolic links out of it only with ``follow_symlinks``);
- a checkpoint that cannot be used (missing, corrupt, unsafe, wrong shapes, NaN/Inf weights or
  features) is recorded in ``failures.csv`` with its one-line reason and the others are analysed;
- features (``analysis/features/``) and per-checkpoint rows (``analysis/parts/``) are written
  atomically as they are computed, so an analysis killed at any moment (even ``SIGKILL``)
  resumes where it stopped, recomputes only what is missing and ends with the same table;
- an exclusive lock on ``analysis/.lock`` serialises analyses of one run: a second one waits
  (saying so), or with ``wait=False`` stops with "run is busy".
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import inspect
import json
import os
import socket
import sys
import time
import warnings
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

import checkpoints_manifest as cm
from dtprobe import checkpoints as ckpt_io
from dtprobe.data import DatasetBundle, load_dataset
from dtprobe.data.registry import available_datasets
from dtprobe.errors import (
    CheckpointError,
    ConfigError,
    DtprobeError,
    MetricInputError,
    RunBusyError,
)
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
FAILURE_COLUMNS = ["run", "epoch", "path", "reason"]
PARTS_VERSION = 1
MAX_MI_INPUTS = 2000  # test images whose flattened pixels are kept as X for I(X;T)
LOCK_FILE = ".lock"


@dataclass
class PlannedCheckpoint:
    """One checkpoint of the series.

    ``sha256`` is the digest the manifest recorded (verified before use), ``error`` a reason
    found while planning why the file must not be used (e.g. a symbolic link out of the run
    directory): the checkpoint is then reported as failed and the others are analysed.
    ``digest`` is the file's actual sha256 once it was checked in this analysis.
    """

    epoch: int
    step: int | None
    path: Path
    sha256: str | None = None
    error: str | None = None
    digest: str | None = None


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
    batch_size: int | str = "auto"
    layers: list[str] = field(default_factory=list)
    compare: list[str] = field(default_factory=list)
    use_cache: bool = True
    progress: bool = True
    plot: bool = True
    seed: int = 0
    wait: bool = True
    follow_symlinks: bool = False


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

    def summary(self) -> str:
        """One line for the terminal."""
        return (f"analysed {self.analysed}/{self.checkpoints} checkpoints in {self.seconds:.1f}s "
                f"(features: {self.features_extracted} extracted, {self.features_reused} "
                f"reused; metrics: {self.metrics_computed} computed, {self.metrics_reused} "
                f"reused){f'; {self.failed} failed' if self.failed else ''}")


# ------------------------------------------------------------------------------------ planning
def _symlink_problem(run_dir: Path, relpath: str, follow_symlinks: bool) -> str | None:
    """Why ``run_dir/relpath`` must not be used (it leaves the run directory), or None."""
    try:
        ckpt_io.resolve_inside(run_dir, relpath, allow_symlinks=follow_symlinks)
    except CheckpointError as exc:
        hint = "" if follow_symlinks else " (pass --follow-symlinks if that is intended)"
        return f"{exc}{hint}"
    return None


def plan_run(run_dir: str | Path, *, arch: str | None = None, num_classes: int | None = None,
             arch_params: dict[str, Any] | None = None, dataset: str | None = None,
             dataset_params: dict[str, Any] | None = None, pattern: str | None = None,
             name: str | None = None, follow_symlinks: bool = False) -> RunPlan:
    """Resolve the checkpoint series of ``run_dir`` from its manifest, or from file names + flags.

    Flags given explicitly override what the manifest says (e.g. analyse on another dataset).

    Parameters
    ----------
    run_dir : the run directory (``manifest.json`` inside, or checkpoint files named by epoch).
    arch, num_classes, arch_params, dataset, dataset_params : how to rebuild the model and
        which data to use (required without a manifest; they override the manifest).
    pattern : file-name glob with ``{epoch}`` for runs without a manifest.
    name : run name in the results (default: the manifest's, or the directory name).
    follow_symlinks : accept checkpoints whose symbolic links lead out of the run directory
        (e.g. to scratch storage). Without it such a checkpoint is refused (reported as failed).

    Returns
    -------
    RunPlan

    Raises
    ------
    ConfigError
        Not a directory, missing flags, a manifest with no checkpoints.
    CheckpointError
        No checkpoint file found, or an ambiguous series (two files for one epoch).
    checkpoints_manifest.ManifestError
        The manifest is not JSON or violates the schema (including paths that are absolute,
        contain ``..`` or repeat an epoch).
    """
    run_dir = Path(run_dir)
    if not run_dir.exists():
        raise ConfigError(f"{run_dir}: no such run directory; pass the folder that holds "
                          "manifest.json or the checkpoint files")
    if not run_dir.is_dir():
        raise ConfigError(f"{run_dir}: is a file, not a run directory; pass the folder that "
                          "holds manifest.json or the checkpoint files")
    manifest_path = run_dir / cm.MANIFEST_NAME
    if manifest_path.exists():
        manifest = cm.read_manifest(run_dir)
        entries = [PlannedCheckpoint(c.epoch, c.step, run_dir / c.path, c.sha256,
                                     _symlink_problem(run_dir, c.path, follow_symlinks))
                   for c in manifest.checkpoints]
        if not entries:
            raise ConfigError(f"{manifest_path}: lists no checkpoints yet; train first (or "
                              "record checkpoints with checkpoints_manifest.record_checkpoint)")
        kwargs = dict(manifest.model.kwargs)
        kwargs.update(arch_params or {})
        return RunPlan(run_dir, name or manifest.run_name, arch or manifest.model.arch, kwargs,
                       num_classes or manifest.model.num_classes,
                       dataset or manifest.dataset.name,
                       dataset_params if dataset_params is not None else dict(
                           manifest.dataset.params),
                       entries, manifest.to_dict(), manifest.model.penultimate)
    # Links are checked per checkpoint below, so that one bad link fails only its checkpoint.
    series = ckpt_io.infer_checkpoint_series(run_dir, pattern=pattern, allow_symlinks=True)
    missing = [flag for flag, val in (("--arch", arch), ("--num-classes", num_classes),
                                      ("--dataset", dataset)) if val is None]
    if missing:
        raise ConfigError(f"{run_dir} has no manifest.json; pass {' '.join(missing)} to say how "
                          "to rebuild the model and which data to use (or write a manifest: see "
                          "checkpoints_manifest/README.md)")
    entries = [PlannedCheckpoint(c.epoch, c.step, Path(c.path),
                                 error=_symlink_problem(run_dir, c.relpath, follow_symlinks))
               for c in series]
    return RunPlan(run_dir, name or run_dir.name, arch, dict(arch_params or {}), int(num_classes),
                   dataset, dict(dataset_params or {}), entries)


def _check_call(func: Any, what: str, fix: str, *args: Any, **kwargs: Any) -> None:
    """Raise :class:`ConfigError` if ``func`` cannot be called with these arguments."""
    try:
        inspect.signature(func).bind(*args, **kwargs)
    except TypeError as exc:
        raise ConfigError(f"{what}: {exc}; {fix}") from None
    except ValueError:  # no signature available (builtin): let the call itself tell
        return


def check_plan(plan: RunPlan, opts: AnalysisOptions) -> None:
    """Validate what can be checked before any work: dataset and architecture names and their
    parameters, batch size. Raises :class:`ConfigError` with one line naming the option."""
    if opts.batch_size != "auto" and (not isinstance(opts.batch_size, int) or opts.batch_size < 1):
        raise ConfigError(f"--batch-size must be 'auto' or an integer >= 1, got "
                          f"{opts.batch_size!r}")
    from dtprobe.data import registry as data_registry

    if plan.dataset not in available_datasets():
        load_dataset(plan.dataset)  # raises the registry's DatasetError naming the choices
    loader = getattr(data_registry, "_DATASETS", {}).get(plan.dataset)
    if loader is not None:
        _check_call(loader, f"dataset {plan.dataset!r}",
                    "fix --dataset-param (or the manifest's dataset.params)",
                    **plan.dataset_params)
    spec = get_arch(plan.arch)
    kwargs = dict(plan.arch_kwargs)
    if plan.manifest is None:
        kwargs.setdefault("in_channels", 3)
    _check_call(spec.builder, f"architecture {plan.arch!r}",
                "fix --arch-param (or the manifest's model.kwargs)",
                num_classes=plan.num_classes, **kwargs)


# ------------------------------------------------------------------------------------ storage
def _lock_holder(fd: int) -> str:
    try:
        text = os.pread(fd, 200, 0).decode("utf-8", "replace").split()
    except OSError:
        return ""
    return f" (pid {text[0]} on {text[1]})" if len(text) >= 2 else ""


@contextlib.contextmanager
def run_lock(analysis_dir: Path, wait: bool = True, shared: bool = False) -> Iterator[None]:
    """Lock ``analysis_dir`` so that two analyses of one run never interleave their writes.

    Parameters
    ----------
    analysis_dir : ``RUN_DIR/analysis`` (created if missing).
    wait : if another process holds the lock, wait for it (printing that to stderr) instead of
        raising :class:`RunBusyError`.
    shared : take a shared lock (the per-rank workers of one torchrun analysis, which write
        only atomically renamed files); an exclusive holder excludes them and vice versa.

    Raises
    ------
    RunBusyError
        ``wait=False`` and the run is being analysed by another process.
    ConfigError
        The analysis folder cannot be created (read-only run directory).
    """
    try:
        analysis_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(analysis_dir / LOCK_FILE, os.O_CREAT | os.O_RDWR, 0o644)
    except OSError as exc:
        raise ConfigError(f"{analysis_dir}: cannot create the analysis folder "
                          f"({exc.strerror or exc}); analyse a writable copy of the run") from None
    mode = fcntl.LOCK_SH if shared else fcntl.LOCK_EX
    try:
        try:
            fcntl.flock(fd, mode | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _lock_holder(fd)
            if not wait:
                raise RunBusyError(f"{analysis_dir.parent}: run is busy: another dtprobe analyze"
                                   f"{holder} is analysing it; wait for it to finish, or re-run "
                                   "without --no-wait to queue behind it") from None
            print(f"{analysis_dir.parent}: another dtprobe analyze{holder} is analysing this "
                  "run; waiting for it to finish ...", file=sys.stderr, flush=True)
            t0 = time.monotonic()
            fcntl.flock(fd, mode)
            print(f"{analysis_dir.parent}: lock obtained after {time.monotonic() - t0:.1f}s; "
                  "continuing", file=sys.stderr, flush=True)
        if not shared:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()} {socket.gethostname()}\n".encode(), 0)
        yield
    finally:
        with contextlib.suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def _is_temp(name: str) -> bool:
    return name.endswith(".tmp") or ".tmp." in name


def remove_stale_temp_files(analysis_dir: Path) -> int:
    """Delete temporary files that a killed analysis left in ``analysis_dir`` and its
    ``parts``/``features`` folders (every file is written to a ``*.tmp`` name first and renamed,
    so only such files can be partial). Call only while holding the exclusive :func:`run_lock`.

    Returns
    -------
    int
        The number of files removed.
    """
    removed = 0
    for directory in (analysis_dir, analysis_dir / "parts", analysis_dir / "features"):
        try:
            entries = list(os.scandir(directory))
        except OSError:
            continue
        for entry in entries:
            if _is_temp(entry.name) and entry.is_file(follow_symlinks=False):
                with contextlib.suppress(OSError):
                    os.unlink(entry.path)
                    removed += 1
    return removed


class PartStore:
    """Per-checkpoint metric rows as small JSON files, reused when their key matches.

    Each file is written atomically (temporary file, fsync, rename), so a file that exists is
    complete; one that cannot be read or does not hold the expected structure is recomputed.
    """

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
        except (OSError, ValueError):
            return None
        if not isinstance(doc, dict) or doc.get("key") != key:
            return None
        rows = doc.get("rows")
        if not isinstance(rows, list) or not all(
                isinstance(r, dict) and set(COLUMNS) <= set(r) for r in rows):
            return None
        return rows

    def put(self, epoch: int, key: str, rows: list[dict[str, Any]]) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        cm.atomic_write_text(self._path(epoch), json.dumps({"key": key, "rows": rows}))


class ReadThroughCache:
    """Feature cache that reads ``primary`` then ``fallback`` but writes only ``primary``.

    Used for ``--compare``: the other run's cached features are reused, while new ones go to
    this run's own cache, so an analysis never writes into another run's directory (which may
    be under another analysis's lock, or read-only).
    """

    def __init__(self, primary: FeatureCache, fallback: FeatureCache):
        self.primary = primary
        self.fallback = fallback
        self.root = primary.root

    def get(self, key: str) -> dict[str, torch.Tensor] | None:
        hit = self.primary.get(key)
        return hit if hit is not None else self.fallback.get(key)

    def put(self, key: str, tensors: dict[str, torch.Tensor]) -> None:
        self.primary.put(key, tensors)


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
        # Resident on the GPU when they fit in a quarter of free memory (no copies per
        # checkpoint); pinned host memory otherwise, for overlapped transfers.
        free = torch.cuda.mem_get_info(device)[0]
        size = train_images.nbytes + test_images.nbytes
        move = (lambda t: t.to(device)) if size < free // 4 else (lambda t: t.pin_memory())
        train_images, test_images = move(train_images), move(test_images)
    # X for I(X;T): the first test images' pixels; MI adapters pair them with the first rows of
    # the test features, so these must stay the leading rows.
    n_mi = min(MAX_MI_INPUTS, len(bundle.test))
    return EvalData(bundle, dataset_key(bundle.name, bundle.params), train_images, test_images,
                    bundle.test.images[:n_mi].flatten(1))


def _build(plan: RunPlan, in_channels: int) -> torch.nn.Module:
    kwargs = dict(plan.arch_kwargs)
    if plan.manifest is None:
        kwargs.setdefault("in_channels", in_channels)
    return build_model(plan.arch, plan.num_classes, **kwargs)


def _head(model: torch.nn.Module, plan: RunPlan) -> torch.nn.Linear:
    if plan.head is None:
        return head_module(model, plan.arch)
    try:
        head = model.get_submodule(plan.head)
    except AttributeError:
        raise ConfigError(f"the manifest's model.penultimate {plan.head!r} is not a module of "
                          f"{plan.arch}; fix the manifest") from None
    if not isinstance(head, torch.nn.Linear):
        raise ConfigError(f"the manifest's model.penultimate {plan.head!r} of {plan.arch} is a "
                          f"{type(head).__name__}, expected nn.Linear; fix the manifest")
    return head


def check_model(plan: RunPlan, data: EvalData, opts: AnalysisOptions) -> None:
    """Build the architecture once (random weights) and run two test images through it, so that
    an architecture that does not fit the data, or a ``--layers`` name it lacks, is one clear
    :class:`ConfigError` before any checkpoint is read."""
    model = _build(plan, data.bundle.in_channels)
    head = _head(model, plan)
    names = {name for name, _ in model.named_modules() if name}
    unknown = [layer for layer in opts.layers if layer not in names]
    if unknown:
        shown = ", ".join(sorted(names, key=lambda n: (n.count("."), n))[:8])
        raise ConfigError(f"--layers {' '.join(unknown)}: no such module in {plan.arch}; "
                          f"available include {shown}")
    try:
        extract_features(model, head, data.test_images[:2], device=torch.device("cpu"),
                         batch_size=2)
    except RuntimeError as exc:
        raise ConfigError(f"{plan.arch} cannot process the {plan.dataset} images "
                          f"({ckpt_io._first_line(str(exc))}); pass a matching --arch / "
                          "--arch-param or --dataset") from None


def _verify(ckpt: PlannedCheckpoint) -> str:
    """Check that the checkpoint file may be used; return its sha256.

    Refuses (with :class:`CheckpointError`) a path found unsafe while planning, a missing file
    and a file whose sha256 differs from the manifest's. Done once per analysis, before the
    cached features or metric rows of this file are trusted.
    """
    if ckpt.error is not None:
        raise CheckpointError(ckpt.error)
    if ckpt.digest is not None:
        return ckpt.digest
    if not ckpt.path.exists():
        raise CheckpointError(f"{ckpt.path}: checkpoint file is missing; restore it or remove "
                              "its entry from the manifest")
    if not ckpt.path.is_file():
        raise CheckpointError(f"{ckpt.path}: is not a file; fix the checkpoint path")
    if ckpt.sha256 is not None:
        ckpt_io.verify_sha256(ckpt.path, ckpt.sha256)
        ckpt.digest = ckpt.sha256.lower()
    else:
        try:
            ckpt.digest = cm.sha256_file(ckpt.path)
        except OSError as exc:
            raise CheckpointError(f"{ckpt.path}: cannot read it ({exc.strerror or exc}); check "
                                  "that the file is readable") from None
    return ckpt.digest


def _load_state(ckpt: PlannedCheckpoint) -> dict[str, torch.Tensor]:
    return ckpt_io.load_state_dict(ckpt.path)


def _load_model(plan: RunPlan, ckpt: PlannedCheckpoint, in_channels: int,
                state: dict[str, torch.Tensor]) -> torch.nn.Module:
    model = _build(plan, in_channels)
    ckpt_io.load_into_model(model, state, ckpt.path)
    return model


def _extract(model: torch.nn.Module, head: torch.nn.Module, images: torch.Tensor,
             ckpt: PlannedCheckpoint, device: torch.device,
             opts: AnalysisOptions) -> dict[str, torch.Tensor]:
    try:
        return extract_features(model, head, images, device=device,
                                batch_size=opts.batch_size, layers=opts.layers)
    except RuntimeError as exc:
        text = str(exc)
        if isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in text.lower():
            raise CheckpointError(f"{ckpt.path}: out of memory while extracting features; "
                                  f"lower --batch-size (now {opts.batch_size})") from None
        if not _outputs_finite(model, images[:8], device):
            # Some numerical step choked on NaN/Inf activations: a diverged checkpoint.
            raise CheckpointError(f"{ckpt.path}: the images give NaN/Inf outputs (diverged "
                                  "run?); this checkpoint is skipped") from None
        raise CheckpointError(f"{ckpt.path}: the model failed on the images "
                              f"({ckpt_io._first_line(text)}); check --arch / --arch-param "
                              "against this checkpoint") from None


@torch.no_grad()
def _outputs_finite(model: torch.nn.Module, images: torch.Tensor, device: torch.device) -> bool:
    """Whether a plain eval-mode forward pass of ``images`` gives finite outputs."""
    model.eval()
    try:
        return bool(torch.isfinite(model(images.to(device))).all())
    except RuntimeError:
        return True  # it fails for another reason: let that reason be reported


def _checkpoint_features(plan: RunPlan, ckpt: PlannedCheckpoint, data: EvalData, cache: Any,
                         device: torch.device, opts: AnalysisOptions,
                         ) -> tuple[dict[str, dict[str, torch.Tensor]],
                                    dict[str, torch.Tensor] | None]:
    """Train/test features, logits and layer outputs of one checkpoint (from cache when present).

    Returns the features and the checkpoint's state dict if it had to be loaded (else None).
    """
    digest = _verify(ckpt)
    out: dict[str, dict[str, torch.Tensor]] = {}
    todo = []
    for split in ("train", "test"):
        layers = opts.layers if split == "test" else []
        key = cache_key(digest, data.key, split, layers)
        hit = cache.get(key)
        if hit is None:
            todo.append((split, key, layers))
        else:
            out[split] = hit
    state = None
    if todo:
        state = _load_state(ckpt)
        model = _load_model(plan, ckpt, data.bundle.in_channels, state).to(device)
        head = _head(model, plan)
        for split, key, layers in todo:
            images = data.train_images if split == "train" else data.test_images
            feats = _extract(model, head, images, ckpt, device,
                             replace(opts, layers=layers))
            bad = ~torch.isfinite(feats["features"]).all(dim=1)
            if bad.any():
                raise CheckpointError(f"{ckpt.path}: {int(bad.sum())} {split} images give NaN/Inf "
                                      "features (diverged run?); this checkpoint is skipped")
            cache.put(key, feats)
            out[split] = feats
        del model
    return out, state


def _test_key(ckpt: PlannedCheckpoint, data: EvalData, opts: AnalysisOptions) -> str:
    return cache_key(ckpt.digest or str(ckpt.path), data.key, "test", opts.layers)


def _head_params(plan: RunPlan, state: dict[str, torch.Tensor],
                 ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    head = plan.head or get_arch(plan.arch).head
    return state.get(f"{head}.weight"), state.get(f"{head}.bias")


def _rows(plan: RunPlan, ckpt: PlannedCheckpoint, values) -> list[dict[str, Any]]:
    return [{"run": plan.name, "epoch": ckpt.epoch, "step": ckpt.step, "metric": v.metric,
             "task": v.task, "layer": getattr(v, "layer", ""), "value": float(v.value),
             "estimator": v.estimator, "params": v.params_json()} for v in values]


@contextlib.contextmanager
def _metric_threads(view: EpochView) -> Iterator[None]:
    """One intra-op thread for CPU metrics: their matrices are small (thousands x hundreds), so
    thread hand-offs cost more than they save, 7-30x more on a busy machine (measured on the
    demo's probes and Renyi MI); extraction keeps all threads."""
    if view.train.features.is_cuda:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _epoch_metrics(plan: RunPlan, ckpt: PlannedCheckpoint, feats, data: EvalData,
                   specs: Sequence[MetricSpec], opts: AnalysisOptions,
                   state: dict[str, torch.Tensor]) -> list[dict[str, Any]]:
    b = data.bundle
    weight, bias = _head_params(plan, state)
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
            with _metric_threads(view):
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
    payload = json.dumps([PARTS_VERSION, ckpt.digest, data.key, [s.name for s in specs],
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
                  other: RunPlan, data: EvalData, device: torch.device,
                  opts: AnalysisOptions) -> list[dict[str, Any]]:
    """Linear CKA between this run and ``other`` at matching epochs on the same test images."""
    if dataset_key(other.dataset, other.dataset_params) != dataset_key(plan.dataset,
                                                                        plan.dataset_params):
        # Compare on this run's data: the other model is evaluated on the same images.
        other.dataset, other.dataset_params = plan.dataset, plan.dataset_params
    cache = ReadThroughCache(FeatureCache(plan.run_dir / "analysis" / "features", opts.use_cache),
                             FeatureCache(other.run_dir / "analysis" / "features", opts.use_cache))
    rows = []
    for c in other.checkpoints:
        if c.epoch not in test_feats:
            continue
        try:
            feats, _ = _checkpoint_features(other, c, data, cache, device,
                                            AnalysisOptions(batch_size=opts.batch_size))
        except DtprobeError as exc:
            _report(f"compare: skipping {c.path}: {exc}")
            continue
        value = linear_cka(test_feats[c.epoch]["features"], feats["test"]["features"])
        rows.append({"run": plan.name, "epoch": c.epoch, "step": None, "metric": "cka_to_run",
                     "task": other.name, "layer": "", "value": float(value),
                     "estimator": "linear_cka",
                     "params": json.dumps({"kernel": "linear", "split": "test",
                                           "other_run": str(other.run_dir)})})
    return rows


def _report(message: str) -> None:
    tqdm.write(message, file=sys.stderr)


def _process_checkpoint(plan: RunPlan, ckpt: PlannedCheckpoint, data: EvalData,
                        cache: FeatureCache, parts: PartStore, specs: Sequence[MetricSpec],
                        device: torch.device, opts: AnalysisOptions,
                        stats: AnalysisStats | None = None):
    """Features (cached) and per-epoch metric rows (stored atomically) of one checkpoint."""
    stats = stats if stats is not None else AnalysisStats()
    feats, state = _checkpoint_features(plan, ckpt, data, cache, device, opts)
    if state is None:
        stats.features_reused += 1
    else:
        stats.features_extracted += 1
    key = _part_key(ckpt, data, specs, opts)
    part = parts.get(ckpt.epoch, key)
    if part is None:
        if state is None:
            state = _load_state(ckpt)
        part = _epoch_metrics(plan, ckpt, feats, data, specs, opts, state)
        parts.put(ckpt.epoch, key, part)
        stats.metrics_computed += 1
    else:
        stats.metrics_reused += 1
    return feats, part


def _run_shard(plan: RunPlan, opts: AnalysisOptions, specs: Sequence[MetricSpec], dist) -> None:
    """Under torchrun: this rank analyses checkpoints rank, rank + world, ... into the shared
    feature cache and part store; rank 0 then merges them into the one table.

    The ranks hold the run's lock shared (another analysis of the run waits for them; they
    always wait for it, since one rank stopping would leave the others at the barrier)."""
    analysis_dir = plan.run_dir / "analysis"
    with run_lock(analysis_dir, wait=True, shared=True):
        data = prepare_data(plan, dist.device)
        cache = FeatureCache(analysis_dir / "features", opts.use_cache)
        parts = PartStore(analysis_dir / "parts")
        for ckpt in plan.checkpoints[dist.rank::dist.world_size]:
            try:
                _process_checkpoint(plan, ckpt, data, cache, parts, specs, dist.device, opts)
            except DtprobeError as exc:  # rank 0 meets the same error again and records it
                _report(f"[rank {dist.rank}] epoch {ckpt.epoch}: {exc}")


def analyze_plan(plan: RunPlan, opts: AnalysisOptions):
    """Analyse a resolved run; returns a :class:`dtprobe.results.Results` (``None`` on ranks > 0
    of a torchrun launch, where rank 0 writes the merged table).

    ``results.stats`` (:class:`AnalysisStats`) says how much was computed afresh and how much
    reused from an earlier, possibly interrupted, analysis.
    """
    from dtprobe.results import Results
    from dtprobe.training.distributed import init_from_env

    specs = resolve_metrics(opts.metrics)
    check_plan(plan, opts)
    others = [plan_run(o, follow_symlinks=opts.follow_symlinks) for o in opts.compare]
    dist = init_from_env(opts.device)
    device = dist.device
    analysis_dir = plan.run_dir / "analysis"
    if dist.enabled:
        if dist.is_main:
            analysis_dir.mkdir(parents=True, exist_ok=True)
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
        data = prepare_data(plan, device)
        check_model(plan, data, opts)
        cache = FeatureCache(analysis_dir / "features", opts.use_cache)
        parts = PartStore(analysis_dir / "parts")
        rows: list[dict[str, Any]] = []
        failures: list[dict[str, Any]] = []
        test_feats = EpochFeatures(cache)
        # The final checkpoint goes first so that it can stay pinned for CKA-to-final.
        order = plan.checkpoints[-1:] + plan.checkpoints[:-1]
        bar = tqdm(order, desc=f"analyze {plan.name}", unit="ckpt", disable=not opts.progress)
        for ckpt in bar:
            bar.set_postfix(epoch=ckpt.epoch)
            try:
                feats, part = _process_checkpoint(plan, ckpt, data, cache, parts, specs, device,
                                                  opts, stats)
            except DtprobeError as exc:
                failures.append({"run": plan.name, "epoch": ckpt.epoch, "path": str(ckpt.path),
                                 "reason": str(exc)})
                _report(f"FAILED epoch {ckpt.epoch}: {exc}")
                continue
            rows.extend(part)
            test_feats.add(ckpt.epoch, _test_key(ckpt, data, opts), feats["test"])
            del feats
        cka_rows, matrix = _cka_rows(plan, plan.checkpoints, test_feats)
        rows.extend(cka_rows)
        for other in others:
            rows.extend(_compare_rows(plan, test_feats, other, data, device, opts))
        table = _finalise_table(rows)
        cm.atomic_write_text(analysis_dir / "metrics.csv", table.to_csv(index=False))
        cka_path = analysis_dir / "cka_matrix.csv"
        if not matrix.empty:
            cm.atomic_write_text(cka_path, matrix.to_csv())
        elif cka_path.exists():
            cka_path.unlink()
        failure_path = analysis_dir / "failures.csv"
        failure_table = pd.DataFrame(failures, columns=FAILURE_COLUMNS)
        if failures:
            cm.atomic_write_text(failure_path, failure_table.to_csv(index=False))
        elif failure_path.exists():
            failure_path.unlink()
        stats.analysed = len(test_feats)
        stats.failed = len(failures)
        stats.seconds = time.perf_counter() - t0
        if opts.progress:
            tqdm.write(f"{plan.name}: {stats.summary()}")
        if opts.plot and not table.empty:
            _save_tradeoff_chart(table, analysis_dir / "tradeoff.png")
    dist.shutdown()
    results = Results(table, manifests={plan.name: plan.manifest or {}},
                      cka={plan.name: matrix} if not matrix.empty else {},
                      sources={plan.name: plan.run_dir}, failures=failure_table)
    results.stats = stats
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
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        fig.savefig(tmp, dpi=130, bbox_inches="tight", format="png")
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def analyze(path: str | Path, *, metrics: list[str] | None = None, device: str = "auto",
            arch: str | None = None, num_classes: int | None = None,
            arch_params: dict[str, Any] | None = None, dataset: str | None = None,
            dataset_params: dict[str, Any] | None = None, pattern: str | None = None,
            compare: Sequence[str | Path] = (), layers: Sequence[str] = (),
            batch_size: int | str = "auto", use_cache: bool = True, progress: bool = True,
            plot: bool = True, seed: int = 0, wait: bool = True,
            follow_symlinks: bool = False):
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
    batch_size : images per forward pass during extraction; ``"auto"`` picks one that fits.
    use_cache : reuse features cached under ``RUN_DIR/analysis/features``.
    progress, plot : progress bar and summary line; ``analysis/tradeoff.png``.
    seed : seed of the stochastic estimators (probe splits, MI estimators).
    wait : if another process is analysing the run, wait for it (default) instead of raising
        :class:`RunBusyError`.
    follow_symlinks : accept checkpoint files reached through symbolic links that lead out of
        the run directory (e.g. checkpoints on scratch storage); refused by default.

    Returns
    -------
    Results
        ``.table`` is the tidy DataFrame also written to ``RUN_DIR/analysis/metrics.csv``;
        ``.failures`` lists checkpoints that could not be analysed (also in
        ``analysis/failures.csv``), each with a one-line reason; ``.stats`` is an
        :class:`AnalysisStats`.

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
    plan = plan_run(path, arch=arch, num_classes=num_classes, arch_params=arch_params,
                    dataset=dataset, dataset_params=dataset_params, pattern=pattern,
                    follow_symlinks=follow_symlinks)
    opts = AnalysisOptions(metrics=list(metrics) if metrics else None, device=device,
                           batch_size=batch_size, layers=list(layers),
                           compare=[str(c) for c in compare], use_cache=use_cache,
                           progress=progress, plot=plot, seed=seed, wait=wait,
                           follow_symlinks=follow_symlinks)
    return analyze_plan(plan, opts)
