"""Planning: which checkpoints to analyse, how to rebuild the model and data, and the options.

``plan_run`` resolves a run directory (manifest, or file names plus flags) into a :class:`RunPlan`;
``check_plan`` validates names and parameters before any work is done.
"""

from __future__ import annotations

import errno
import functools
import hashlib
import inspect
import math
import os
import typing
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import torch

import checkpoints_manifest as cm
from checkpoints_manifest.schema import MAX_CLASSES
from dtprobe.analysis.memory import parse_size
from dtprobe.analysis.shares import SHARD_MODES
from dtprobe.checkpoints import layouts
from dtprobe.checkpoints.reader import PLANNED_DIGEST
from dtprobe.checkpoints.series import infer_run
from dtprobe.data import load_dataset
from dtprobe.data.registry import available_datasets
from dtprobe.data.spec import DownstreamSpec, parse_downstreams
from dtprobe.errors import ConfigError, DatasetError, first_line
from dtprobe.features.cache import FEATURE_DTYPES
from dtprobe.features.engines import ENGINES, check_engine
from dtprobe.models import get_arch
from dtprobe.runtime.devices import resolve_device


@dataclass
class PlannedCheckpoint:
    """One checkpoint of the series.

    ``sha256`` is the digest the manifest recorded (verified before use; without a manifest,
    with ``--trust-pickles``, that of the bytes the plan was read from), ``error`` a reason
    found while planning why the file must not be used (e.g. a symbolic link out of the run
    directory): the checkpoint is then reported as failed and the others are analysed.
    ``digest`` is the file's actual sha256 once it was checked in this analysis;
    ``cache_digest`` combines it with ``variant``, the non-default weight choice such as
    ``--weights ema``, so that cached features of two choices never mix.
    ``source_epoch``/``epoch_basis`` say where ``epoch`` came from for runs without a manifest
    (:mod:`dtprobe.checkpoints.layouts`); ``loaded`` records which weights of the file were loaded
    (:meth:`dtprobe.checkpoints.state_dict.Candidate.record`).
    """

    epoch: int
    step: int | None
    path: Path
    sha256: str | None = None
    error: str | None = None
    digest: str | None = None
    variant: str = ""
    source_epoch: float | None = None
    epoch_basis: str = "manifest"
    loaded: dict[str, Any] | None = None
    sha256_from: str = "the manifest"  # who recorded ``sha256`` (--trust-pickles: planning)

    @property
    def cache_digest(self) -> str | None:
        """``digest``, combined with ``variant`` when there is one: the key of cached work."""
        if self.digest is None or not self.variant:
            return self.digest
        return hashlib.sha256(f"{self.digest}|{self.variant}".encode()).hexdigest()


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
    load: LoadOptions = field(default_factory=lambda: LoadOptions())
    epoch_note: str = ""
    layouts: list[str] = field(default_factory=list)
    model_origin: str = "manifest"
    #: Which framework record gave the folder dataset's evaluation transform ("" for none).
    transform_origin: str = ""

    def record(self) -> dict[str, Any]:
        """How the series and model were found, for ``analysis/checkpoints.json``."""
        return {"run": self.name, "layouts": self.layouts, "epoch_note": self.epoch_note,
                "model": {"arch": self.arch, "num_classes": self.num_classes,
                          "kwargs": self.arch_kwargs, "origin": self.model_origin},
                "eval_transform": {"params": {k: v for k, v in self.dataset_params.items()
                                              if k in layouts.TRANSFORM_PARAMS},
                                   "origin": self.transform_origin or "flags or defaults"},
                "load": self.load.record(),
                "checkpoints": [{"epoch": c.epoch, "step": c.step, "path": str(c.path),
                                 "source_epoch": c.source_epoch, "epoch_basis": c.epoch_basis,
                                 "loaded": c.loaded} for c in self.checkpoints]}


@dataclass(frozen=True)
class LoadOptions:
    """How weights are taken from each file (``--weights``, ``--strip-prefix``,
    ``--trust-pickles``; see :func:`dtprobe.checkpoints.load_weights`)."""

    weights: str = "auto"
    strip_prefix: str | None = None
    trust_pickles: bool = False

    @property
    def variant(self) -> str:
        """Non-default choices, folded into cache keys (``""`` for the defaults)."""
        parts = []
        if self.weights != "auto":
            parts.append(f"weights={self.weights}")
        if self.strip_prefix:
            parts.append(f"strip={self.strip_prefix}")
        return ",".join(parts)

    def record(self) -> dict[str, Any]:
        return {"weights": self.weights, "strip_prefix": self.strip_prefix,
                "trust_pickles": self.trust_pickles}


#: The options of :func:`plan_run` that say how to find and rebuild a run (``--arch``,
#: ``--dataset`` ...): kept on :attr:`AnalysisOptions.plan_flags` and applied again to
#: ``--compare`` runs without a manifest.
PLAN_FLAGS = ("arch", "num_classes", "arch_params", "dataset", "dataset_params", "pattern",
              "epoch_from", "weights", "strip_prefix", "trust_pickles")
#: Fields the analysis sets itself, never a caller.
_DERIVED_FIELDS = ("plan_flags", "image_shards")


@dataclass
class AnalysisOptions:
    """Every option of one analysis, built once (:meth:`build`) from the keyword arguments of
    :func:`dtprobe.analysis.analyze` or from the command line, then passed down unchanged:
    ``downstream`` holds parsed :class:`~dtprobe.data.spec.DownstreamSpec` and ``device`` a
    resolved :class:`torch.device` (under torchrun, this rank's)."""

    metrics: list[str] | None = None
    #: ``"auto"``, ``"cpu"``, ``"cuda:N"`` as given; a :class:`torch.device` once built.
    device: str | torch.device = "auto"
    batch_size: int | str = "auto"
    #: Storage dtype of cached features and layer outputs (dtprobe.features.extract.FEATURE_DTYPES);
    #: metrics read them back as float32.
    feature_dtype: str = "float32"
    #: What runs the extraction's forward passes (dtprobe.features.engines.ENGINES): "eager" or
    #: "onnx".
    engine: str = "eager"
    layers: list[str] = field(default_factory=list)
    compare: list[str] = field(default_factory=list)
    use_cache: bool = True
    progress: bool = True
    plot: bool = True
    seed: int = 0
    #: Linear-probe protocol (dtprobe.metrics.probes.PROBE_PROTOCOLS): "kornblith2019" (the
    #: papers' 45-value sweep, default) or "short" (9 values, early stop).
    probe_protocol: str = "kornblith2019"
    wait: bool = True
    follow_symlinks: bool = False
    # Downstream datasets (spec strings, mappings or DownstreamSpec; see dtprobe.data.spec) and
    # the metrics computed on each (None: analysis.downstream.DOWNSTREAM_METRICS).
    downstream: list[Any] = field(default_factory=list)
    downstream_metrics: list[str] | None = None
    #: The flags given for the analysed run, applied to ``--compare`` runs without a manifest.
    plan_flags: dict[str, Any] = field(default_factory=dict)
    #: ``--image-store``: "auto" (the default folder, :func:`dtprobe.data.store.default_store_dir`),
    #: a folder, or None / "none" to decode folder datasets into memory.
    image_store: str | None = "auto"
    #: ``--memory-budget`` in bytes (None: :func:`dtprobe.analysis.memory.default_budget`).
    memory_budget: int | None = None
    #: ``--skip-bad-images``: folder datasets (source and downstream) leave out undecodable
    #: files instead of failing (:mod:`dtprobe.data.decode`).
    skip_bad_images: bool = False
    #: ``--max-samples``: a stable class-stratified subset per split (source and downstream).
    max_samples: int | None = None
    #: ``--shard``: how torchrun ranks split the work (:mod:`dtprobe.analysis.sharding`).
    shard: str = "auto"
    #: Ranks whose image shares are assembled from part files (set for ``--shard images``).
    image_shards: int = 1
    #: ``--fewshot-shots`` / ``--fewshot-draws``: settings of the few-shot metrics
    #: (:mod:`dtprobe.metrics.fewshot`; defaults equal its FEWSHOT_SHOTS and FEWSHOT_DRAWS).
    fewshot_shots: tuple[int, ...] = (1, 5, 10, 25)
    fewshot_draws: int = 5
    #: ``--finetune``: also fine-tune every checkpoint on every downstream dataset
    #: (:mod:`dtprobe.analysis.finetune`).
    finetune: bool = False
    #: Entries of the fine-tune recipe replaced (None: FINETUNE_RECIPE as it is); recorded in
    #: the rows' params and their part keys.
    finetune_recipe: dict[str, Any] | None = None

    @classmethod
    def build(cls, **kwargs: Any) -> AnalysisOptions:
        """The options from the keyword arguments of :func:`dtprobe.analysis.analyze` (its
        documented types: sequences, paths, sizes such as ``"8G"``), converted, parsed and
        resolved here once: downstream specs parsed, memory budget in bytes, device resolved.
        The :data:`PLAN_FLAGS` among them go to :attr:`plan_flags`.

        Raises
        ------
        ConfigError
            A bad downstream spec, memory budget or device (one line naming the option).
        TypeError
            A keyword that is no option of an analysis.
        """
        known = {f.name for f in fields(cls)} - set(_DERIVED_FIELDS)
        unknown = sorted(set(kwargs) - known - set(PLAN_FLAGS))
        if unknown:
            raise TypeError(f"unexpected analysis option(s): {', '.join(unknown)}")
        flags = {name: kwargs.pop(name) for name in PLAN_FLAGS if name in kwargs}
        # each conversion is written once, here; absent keywords keep the field defaults
        convert: dict[str, Callable[[Any], Any]] = {
            "metrics": lambda v: list(v) if v else None,
            "layers": list,
            "compare": lambda v: [str(c) for c in v],
            "downstream": parse_downstreams,
            "downstream_metrics": lambda v: None if v is None else list(v),
            "image_store": lambda v: None if v is None else str(v),
            "memory_budget": lambda v: None if v is None else parse_size(v),
            "fewshot_shots": lambda v: tuple(int(k) for k in v),
            "fewshot_draws": int,
            "skip_bad_images": bool,
            "finetune": bool,
            "finetune_recipe": lambda v: dict(v) if v else None,
        }
        values = {k: convert.get(k, lambda v: v)(v) for k, v in kwargs.items()}
        return cls(**values, plan_flags=flags).resolved()

    def resolved(self) -> AnalysisOptions:
        """These options with the downstream specs parsed and the device resolved (itself when
        they already are: what :meth:`build` made is never parsed or resolved again)."""
        parsed = all(isinstance(s, DownstreamSpec) for s in self.downstream)
        if parsed and isinstance(self.device, torch.device):
            return self
        return replace(self, device=resolve_device(self.device),
                       downstream=self.downstream if parsed
                       else parse_downstreams(self.downstream))

    def for_run(self, plan: RunPlan) -> AnalysisOptions:
        """The options with the analysed run's data in :attr:`plan_flags` when no
        ``dataset`` was given: a compared run without a manifest is evaluated on it."""
        if self.plan_flags.get("dataset") is not None:
            return self
        return replace(self, plan_flags={**self.plan_flags, "dataset": plan.dataset,
                                         "dataset_params": plan.dataset_params})


def _symlink_problem(run_dir: Path, relpath: str, follow_symlinks: bool,
                     base: str | None = None,
                     real_dir: Callable[[str], str] = os.path.realpath) -> str | None:
    """Why ``run_dir/relpath`` must not be used (it leaves the run directory), or None.

    A pre-screen while planning (one ``realpath`` per entry, so that a manifest of 100,000
    checkpoints plans in about a second); the file actually opened is checked again when it is
    read (:func:`dtprobe.checkpoints.read_checkpoint_bytes`), so a link swapped in after
    planning is caught too. ``base`` is ``realpath(run_dir)`` and ``real_dir`` a (cached)
    ``realpath`` for the folders, both supplied by the caller so that they are computed once.
    """
    if follow_symlinks:
        return None
    base = base if base is not None else os.path.realpath(run_dir)
    target = os.path.join(run_dir, relpath)
    folder, name = os.path.split(target)
    real = os.path.realpath(target) if os.path.islink(target) else os.path.join(
        real_dir(folder), name)
    if real == base or real.startswith(base.rstrip(os.sep) + os.sep):
        return None
    try:
        os.stat(target)
    except OSError as exc:
        if exc.errno == errno.ELOOP:  # following links would not help: no --follow-symlinks
            return f"{target}: is a symbolic link loop; remove or fix the broken link"
    return (f"{target}: resolves to {real}, outside the run directory {base} (symbolic link?); "
            "copy the file into the run directory, or pass --follow-symlinks if that is intended")


def _manifest_params(params: dict[str, Any]) -> dict[str, Any]:
    """The manifest's dataset parameters, minus what only the user may decide: a manifest
    saying ``download: true`` never makes dtprobe download anything (only ``--download``)."""
    return {k: v for k, v in params.items() if k != "download"}


#: Architecture families whose names a file may give: dtprobe builds them from installed
#: libraries with fixed entry points, without importing code the file names.
_SAFE_ARCH_FAMILIES = ("timm:", "torchvision:", "hf:")


def _refuse_code_named_by_file(arch: str, source: Path) -> None:
    """A ``package.module:callable`` architecture read from a run's files would import and call
    code that the file (possibly someone else's) chose: only the user's own ``--arch`` may."""
    if ":" in arch and not arch.startswith(_SAFE_ARCH_FAMILIES):
        raise ConfigError(f"{source}: model.arch {arch!r} names code to import; dtprobe imports "
                          f"code only when you name it yourself: pass --arch {arch} (after "
                          "checking it is code you trust)")


def plan_run(run_dir: str | Path, *, arch: str | None = None, num_classes: int | None = None,
             arch_params: dict[str, Any] | None = None, dataset: str | None = None,
             dataset_params: dict[str, Any] | None = None, pattern: str | None = None,
             name: str | None = None, follow_symlinks: bool = False,
             epoch_from: str = "auto", weights: str = "auto", strip_prefix: str | None = None,
             trust_pickles: bool = False) -> RunPlan:
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
    epoch_from : for runs without a manifest, where epochs come from: ``"auto"``, ``"name"``,
        ``"metadata"`` or ``"order"`` (:mod:`dtprobe.checkpoints.layouts`).
    weights, strip_prefix, trust_pickles : which weights to take from each file
        (:class:`LoadOptions`).

    Without a manifest, the layout of the framework that wrote the run is recognised
    (:mod:`dtprobe.checkpoints.layouts`), and the architecture and class count come from the
    flags, else
    from the files' records, else from the weights' names and shapes
    (:func:`dtprobe.checkpoints.infer_run`); only ``--dataset`` is always needed.

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
    load = LoadOptions(weights or "auto", strip_prefix or None, bool(trust_pickles))
    manifest_path = run_dir / cm.MANIFEST_NAME
    if manifest_path.exists():
        manifest = cm.read_manifest(run_dir)
        base = os.path.realpath(run_dir)
        real_dir = functools.lru_cache(maxsize=4096)(os.path.realpath)
        entries = [PlannedCheckpoint(c.epoch, c.step, run_dir / c.path, c.sha256,
                                     _symlink_problem(run_dir, c.path, follow_symlinks, base,
                                                      real_dir),
                                     variant=load.variant, source_epoch=c.epoch)
                   for c in manifest.checkpoints]
        if not entries:
            raise ConfigError(f"{manifest_path}: lists no checkpoints yet; train first (or "
                              "record checkpoints with checkpoints_manifest.record_checkpoint)")
        if arch is None:
            _refuse_code_named_by_file(manifest.model.arch, manifest_path)
        kwargs = dict(manifest.model.kwargs)
        kwargs.update(arch_params or {})
        return RunPlan(run_dir, name or manifest.run_name, arch or manifest.model.arch, kwargs,
                       num_classes or manifest.model.num_classes,
                       dataset or manifest.dataset.name,
                       dataset_params if dataset_params is not None else _manifest_params(
                           manifest.dataset.params),
                       entries, manifest.to_dict(), manifest.model.penultimate, load,
                       "epoch = as recorded in manifest.json (dtprobe: epochs completed, "
                       "0 = initialisation)", ["manifest"], "manifest")
    # Links are checked per checkpoint below, so that one bad link fails only its checkpoint.
    run = infer_run(run_dir, pattern=pattern, epoch_from=epoch_from, arch=arch,
                            num_classes=num_classes, arch_params=arch_params,
                            trust_pickles=load.trust_pickles)
    missing = [flag for flag, val in (("--arch", run.arch), ("--num-classes", run.num_classes),
                                      ("--dataset", dataset)) if val is None]
    if missing:
        said = "" if dataset is None or missing == ["--dataset"] else (
            " (its files do not say the architecture or the number of classes)")
        raise ConfigError(f"{run_dir} has no manifest.json{said}; pass {' '.join(missing)} to "
                          "say how to rebuild the model and which data to use (or write a "
                          "manifest: see checkpoints_manifest/README.md)")
    # the evaluation transform the framework's records say (flags override them)
    params, transform_origin = _recorded_transform(dataset, dict(dataset_params or {}),
                                                   run, load.trust_pickles)
    entries = [PlannedCheckpoint(c.epoch, c.step, Path(c.path), sha256=c.sha256,
                                 sha256_from="the manifest" if c.sha256 is None
                                 else PLANNED_DIGEST,
                                 error=_symlink_problem(run_dir, c.relpath, follow_symlinks),
                                 variant=load.variant, source_epoch=c.source_epoch,
                                 epoch_basis=c.epoch_basis)
               for c in run.series]
    return RunPlan(run_dir, name or run_dir.name, run.arch, run.arch_kwargs,
                   int(run.num_classes), dataset, params, entries, None, None,
                   load, run.series.epoch_note, run.series.layouts, run.origin,
                   transform_origin)


def _recorded_transform(dataset: str, params: dict[str, Any], run: Any,
                        trust_pickles: bool) -> tuple[dict[str, Any], str]:
    """:func:`dtprobe.checkpoints.layouts.with_recorded_transform` on the run's last checkpoint."""
    if dataset not in available_datasets() or not len(run.series):
        return params, ""
    from dtprobe.data.spec import loader_parameters

    last = run.series[-1]
    return layouts.with_recorded_transform(params, loader_parameters(dataset), Path(last.path),
                                           trust_pickles, meta=getattr(last, "meta", None))


def _check_call(func: Any, what: str, fix: str, *args: Any, **kwargs: Any) -> None:
    """Raise :class:`ConfigError` if ``func`` cannot be called with these arguments."""
    try:
        inspect.signature(func).bind(*args, **kwargs)
    except TypeError as exc:
        raise ConfigError(f"{what}: {exc}; {fix}") from None
    except ValueError:  # no signature available (builtin): let the call itself tell
        return


#: Largest value of an integer dataset / architecture parameter, by name (default below).
INT_LIMITS: dict[str, int] = {
    "seed": 2**63 - 1, "n_train": 1_000_000, "n_test": 1_000_000, "max_per_class": 1_000_000,
    "max_samples": 100_000_000,
    "image_size": 1024, "channels": 64, "in_channels": 64,
}
_DEFAULT_INT_LIMIT = 1 << 16
#: Most bytes of decoded images a dataset may ask for (n images x size^2 x channels x float32).
MAX_DATASET_BYTES = 64 << 30
#: Most parameters a model may have (counted on the meta device, before anything is allocated).
MAX_MODEL_PARAMETERS = 1 << 32


def _accepted_types(func: Any, name: str) -> set[type] | None:
    """Python types a parameter's annotation (or default) allows, or None if unknown."""
    try:
        param = inspect.signature(func, eval_str=True).parameters.get(name)
    except (TypeError, ValueError, NameError, SyntaxError):
        return None
    if param is None or param.kind == param.VAR_KEYWORD:
        return None
    annotation = param.annotation
    if annotation is inspect.Parameter.empty:
        default = param.default
        return None if default in (inspect.Parameter.empty, None) else {type(default)}
    args = typing.get_args(annotation) or (annotation,)
    out = set()
    for arg in args:
        if arg is type(None) or arg is None:
            out.add(type(None))
        elif arg in (int, float, bool, str):
            out.add(arg)
        elif arg is os.PathLike or typing.get_origin(arg) is os.PathLike:
            out.add(str)
        else:
            return None  # something richer: let the callee check it
    return out


def _check_value(func: Any, name: str, value: Any, what: str, fix: str) -> None:
    """Refuse a parameter value of the wrong JSON type or out of range, before any work."""
    types = _accepted_types(func, name)
    shown = _show_value(value)
    if isinstance(value, bool):
        kind: type = bool
    elif isinstance(value, int):
        kind = int
    else:
        kind = type(value)
    if types is not None and kind not in types and not (kind is int and float in types):
        words = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}
        names = [words[t] for t in (int, float, bool, str) if t in types]
        names += ["null"] if type(None) in types else []
        raise ConfigError(f"{what}: {name}={shown} must be {' or '.join(names)}; {fix}")
    if kind is int:
        limit = INT_LIMITS.get(name, _DEFAULT_INT_LIMIT)
        low = -limit if name == "seed" else 0
        if not low <= value <= limit:
            raise ConfigError(f"{what}: {name}={shown} must be an integer in [{low}, {limit}]; "
                              f"{fix}")
    elif kind is float and not (math.isfinite(value) and abs(value) <= 1e9):
        raise ConfigError(f"{what}: {name}={shown} must be a finite number; {fix}")
    elif kind is str and (len(value) > 4096 or "\x00" in value):
        raise ConfigError(f"{what}: {name}={shown} must be a string of at most 4096 characters "
                          f"without NUL; {fix}")
    elif kind in (list, dict):
        raise ConfigError(f"{what}: {name}={shown} must be a single value; {fix}")


def _show_value(value: Any) -> str:
    """A bad value, short: huge integers by their digit count, long strings cut."""
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) > 10**15:
        return f"an integer of {len(str(abs(value)))} digits"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _dataset_bytes(params: dict[str, Any]) -> int:
    n = sum(int(params.get(k) or 0) for k in ("n_train", "n_test"))
    size = int(params.get("image_size") or 0)
    channels = max(3, int(params.get("channels") or 0))
    return n * size * size * channels * 4


def _count_parameters(plan: RunPlan, kwargs: dict[str, Any]) -> int | None:
    """Parameters of the architecture, built on the meta device (no memory), or None."""
    from dtprobe.models import build_model

    try:
        with torch.device("meta"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = build_model(plan.arch, plan.num_classes, **kwargs)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"architecture {plan.arch!r}: cannot be built with these options "
                          f"({first_line(str(exc), 120)}); fix --arch-param (or the "
                          "manifest's model.kwargs)") from None
    except Exception:  # noqa: BLE001 - an architecture that cannot be built on meta: skip
        return None
    return sum(p.numel() for p in model.parameters())


def check_plan(plan: RunPlan, opts: AnalysisOptions) -> None:
    """Validate what can be checked before any work: dataset and architecture names, the type
    and range of every parameter (whether from flags or from the manifest), the memory the
    dataset and the model would take, batch size. Raises :class:`ConfigError` with one line
    naming the option."""
    if opts.batch_size != "auto" and (not isinstance(opts.batch_size, int)
                                      or isinstance(opts.batch_size, bool)
                                      or not 1 <= opts.batch_size <= 1 << 20):
        raise ConfigError(f"--batch-size must be 'auto' or an integer in [1, {1 << 20}], got "
                          f"{_show_value(opts.batch_size)}")
    if opts.feature_dtype not in FEATURE_DTYPES:
        raise ConfigError(f"--feature-dtype must be one of {', '.join(FEATURE_DTYPES)}, got "
                          f"{_show_value(opts.feature_dtype)}")
    if opts.engine != "eager":  # check_engine also refuses unknown names, in one line
        # resolve_device returns a built option's device as it is
        check_engine(opts.engine, resolve_device(opts.device) if opts.engine in ENGINES
                     else None)
    from dtprobe.data.subsets import check_max_samples

    if opts.shard not in SHARD_MODES:
        raise ConfigError(f"--shard {opts.shard!r}: choose one of {', '.join(SHARD_MODES)}")
    try:
        check_max_samples("--max-samples", opts.max_samples)
    except DatasetError as exc:
        raise ConfigError(str(exc)) from None
    if (isinstance(plan.num_classes, bool) or not isinstance(plan.num_classes, int)
            or not 1 <= plan.num_classes <= MAX_CLASSES):
        raise ConfigError(f"--num-classes (or the manifest's model.num_classes) must be an int "
                          f"in [1, {MAX_CLASSES}], got "
                          f"{_show_value(plan.num_classes)}")
    from dtprobe.data import registry as data_registry

    if plan.dataset not in available_datasets():
        load_dataset(plan.dataset)  # raises the registry's DatasetError naming the choices
    loader = getattr(data_registry, "_DATASETS", {}).get(plan.dataset)
    data_fix = "fix --dataset-param (or the manifest's dataset.params)"
    if loader is not None:
        params = dict(plan.dataset_params)
        if "store" in params:
            raise ConfigError(f"dataset {plan.dataset!r}: 'store' is not a dataset parameter; "
                              "pass --image-store DIR")
        if "progress" in params:
            raise ConfigError(f"dataset {plan.dataset!r}: 'progress' is not a dataset "
                              "parameter; pass --no-progress")
        if "max_samples" in params and "max_samples" not in inspect.signature(loader).parameters:
            try:  # generic: applied by the registry after loading
                check_max_samples(plan.dataset, params.pop("max_samples"))
            except DatasetError as exc:
                raise ConfigError(f"{exc}; {data_fix}") from None
        _check_call(loader, f"dataset {plan.dataset!r}", data_fix, **params)
        for name, value in params.items():
            _check_value(loader, name, value, f"dataset {plan.dataset!r}", data_fix)
        need = _dataset_bytes(plan.dataset_params)
        if need > MAX_DATASET_BYTES:
            raise ConfigError(f"dataset {plan.dataset!r}: these sizes would need "
                              f"{need / 2**30:.0f} GiB of images (limit "
                              f"{MAX_DATASET_BYTES >> 30} GiB); {data_fix}")
    spec = get_arch(plan.arch)
    kwargs = dict(plan.arch_kwargs)
    if plan.manifest is None:
        kwargs.setdefault("in_channels", 3)
    arch_fix = "fix --arch-param (or the manifest's model.kwargs)"
    _check_call(spec.builder, f"architecture {plan.arch!r}", arch_fix,
                num_classes=plan.num_classes, **kwargs)
    for name, value in kwargs.items():
        _check_value(spec.builder, name, value, f"architecture {plan.arch!r}", arch_fix)
    count = _count_parameters(plan, kwargs)
    if count is not None and count > MAX_MODEL_PARAMETERS:
        raise ConfigError(f"architecture {plan.arch!r}: these options give {count:.3g} "
                          f"parameters (limit {MAX_MODEL_PARAMETERS:.3g}); {arch_fix}")
