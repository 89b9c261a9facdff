"""Planning: which checkpoints to analyse, how to rebuild the model and data, and the options.

``plan_run`` resolves a run directory (manifest, or file names plus flags) into a :class:`RunPlan`;
``check_plan`` validates names and parameters before any work is done.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import checkpoints_manifest as cm
from dtprobe import checkpoints as ckpt_io
from dtprobe.data import load_dataset
from dtprobe.data.registry import available_datasets
from dtprobe.errors import CheckpointError, ConfigError
from dtprobe.models import get_arch


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
    # Downstream datasets (spec strings, mappings or DownstreamSpec; see dtprobe.data.spec) and
    # the metrics computed on each (None: analysis.downstream.DOWNSTREAM_METRICS).
    downstream: list[Any] = field(default_factory=list)
    downstream_metrics: list[str] | None = None


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

