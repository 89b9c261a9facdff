"""Checkpoint series inference for runs without a manifest: which files are checkpoints, in which
epoch order (:func:`infer_checkpoint_series`), and how to rebuild the model (:func:`infer_run`).

Layering: :mod:`~dtprobe.checkpoints.naming` and :mod:`~dtprobe.checkpoints.reader` <-
:mod:`~dtprobe.checkpoints.layouts` <- this module.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dtprobe.checkpoints import layouts
from dtprobe.checkpoints.naming import (
    CHECKPOINT_SUBDIR,
    CHECKPOINT_SUFFIXES,
    KNOWN_NAMINGS,
    KNOWN_PATTERNS,
    is_temporary_name,
    template_regex,
)
from dtprobe.checkpoints.reader import (
    PLANNED_DIGEST,
    LoadedCheckpoint,
    load_checkpoint,
    read_checkpoint_bytes,
    resolve_inside,
)
from dtprobe.errors import CheckpointError, ConfigError, UnsafeCheckpointError


# --------------------------------------------------------------------------------- inference
@dataclass(frozen=True)
class InferredCheckpoint:
    """One checkpoint found by file name.

    Attributes
    ----------
    epoch : int
        Epochs completed (0 = initialisation) where the layout's convention is known
        (Lightning's ``epoch=3`` is 4 here), else the number as written; see
        :mod:`dtprobe.checkpoints.layouts` and ``epoch_basis``.
    step : int or None
        Global step from the name or the framework's records, where known.
    path : Path
        ``run_dir / relpath``.
    relpath : str
        Path relative to the run directory, with forward slashes.
    naming : str
        The naming scheme that matched, e.g. ``"ckpt_epoch_{epoch}.pth"``.
    layout : str
        The :data:`dtprobe.checkpoints.layouts.LAYOUTS` entry (``"lightning"``, ``"hf_trainer"``
        ...).
    source_epoch : float or None
        The framework's own epoch number (name or records), before conversion.
    epoch_basis : str
        Where ``epoch`` came from: ``"name"``, ``"metadata"`` or ``"order"``.
    """

    epoch: int
    step: int | None
    path: Path
    relpath: str = ""
    naming: str = ""
    layout: str = "generic"
    source_epoch: float | None = None
    epoch_basis: str = "name"
    sha256: str | None = None  # with trust_pickles: digest of the bytes planned from
    #: the file's plain metadata read while inferring the series (reused, never re-read)
    meta: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)


class CheckpointSeries(list):
    """The checkpoints of a run, sorted by epoch (a ``list`` of :class:`InferredCheckpoint`).

    Attributes
    ----------
    run_dir : Path
        The run directory searched.
    ignored : list of str
        Checkpoint-like files (``.pt``, ``.pth``, ``.ckpt`` ...) that match no
        naming, such as ``last.ckpt`` or ``best.pth``.
    message : str
        When nothing matched: which files were found and how to fix it; else ``""``.
    epoch_note : str
        What the epoch numbers mean for this run (what epoch 0 is), for tables and charts.
    """

    def __init__(self, items: list[InferredCheckpoint], run_dir: Path, ignored: list[str],
                 message: str = "", epoch_note: str = ""):
        super().__init__(items)
        self.run_dir = run_dir
        self.ignored = ignored
        self.message = message
        self.epoch_note = epoch_note

    @property
    def layouts(self) -> list[str]:
        """Layouts present (:data:`dtprobe.checkpoints.layouts.LAYOUTS`), in order of first
        appearance."""
        return list(dict.fromkeys(c.layout for c in self))

    @property
    def namings(self) -> list[str]:
        """Naming schemes present, in order of first appearance."""
        return list(dict.fromkeys(c.naming for c in self))


def _list_files(root: Path, depth: int) -> list[str]:
    """Relative POSIX paths of files under ``root`` at exactly ``depth`` directory levels."""
    found: list[str] = []

    def walk(directory: Path, prefix: str, level: int) -> None:
        try:
            entries = sorted(os.scandir(directory), key=lambda e: e.name)
        except (FileNotFoundError, NotADirectoryError, PermissionError):
            return
        for entry in entries:
            try:
                if level == depth:
                    if entry.is_file():
                        found.append(prefix + entry.name)
                elif entry.is_dir():
                    walk(Path(entry.path), f"{prefix}{entry.name}/", level + 1)
            except OSError:
                continue

    walk(root, "", 0)
    return found


def _candidates(run_dir: Path, pattern: str | None) -> tuple[list[str], list[tuple[str, Any]]]:
    names, namings = _all_candidates(run_dir, pattern)
    return [n for n in names if not is_temporary_name(n)], namings


def _all_candidates(run_dir: Path,
                    pattern: str | None) -> tuple[list[str], list[tuple[str, Any]]]:
    if pattern is None:
        names = _list_files(run_dir, 0) + [f"{CHECKPOINT_SUBDIR}/{n}" for n in
                                            _list_files(run_dir / CHECKPOINT_SUBDIR, 0)]
        return names, KNOWN_PATTERNS
    text = pattern.replace("\\", "/")
    if text.startswith("/") or ".." in text.split("/") or re.match(r"[A-Za-z]:", text):
        raise ConfigError(f"--pattern {pattern!r}: must be relative to the run directory "
                          "without '..'")
    regex = template_regex(text, "--pattern")
    depth = text.count("/")
    names = _list_files(run_dir, depth)
    if depth == 0:
        names += [f"{CHECKPOINT_SUBDIR}/{n}" for n in _list_files(run_dir / CHECKPOINT_SUBDIR, 0)]
    return names, [(text, regex)]


def _match(relpath: str, namings: list[tuple[str, Any]], subdir_ok: bool
           ) -> tuple[str, re.Match[str]] | None:
    in_subdir = subdir_ok and relpath.startswith(CHECKPOINT_SUBDIR + "/")
    name = relpath.split("/", 1)[1] if in_subdir else None
    for template, regex in namings:
        for candidate in (relpath, name):
            if candidate is not None and (m := regex.fullmatch(candidate)) is not None:
                return template, m
    return None


def infer_checkpoint_series(run_dir: str | os.PathLike[str], pattern: str | None = None, *,
                            allow_empty: bool = False, allow_symlinks: bool = False,
                            epoch_from: str = "auto",
                            trust_pickles: bool = False) -> CheckpointSeries:
    """Find a run's checkpoints from its framework's layout and file names (no manifest).

    Looks in ``run_dir`` and ``run_dir/checkpoints`` for the names in
    :data:`KNOWN_NAMINGS` (``ckpt_epoch_{epoch}.pth`` of the CTC reference code,
    Lightning's ``epoch={epoch}-step={step}.ckpt`` (also with metric suffixes),
    ``checkpoint_{epoch}.pt``, ``checkpoint-{epoch}.pth.tar``, ``model_{epoch}.pth``,
    ``epoch_{epoch}.pt``, ``epoch_003.ckpt`` and the same with ``.safetensors``), then, when
    none is there, in the framework folders below it (Lightning ``lightning_logs/version_N/
    checkpoints/``, Hugging Face ``checkpoint-STEP/``, accelerate ``checkpoints/checkpoint_I/``,
    timm's experiment folder): the list and the epoch conventions are in
    :mod:`dtprobe.checkpoints.layouts`. Temporary and partial files left by an interrupted writer
    (:func:`is_temporary_name`) are never taken for checkpoints.

    Parameters
    ----------
    run_dir : path-like
        The run directory.
    pattern : str, optional
        Use only this naming: a glob (``*``, ``?``, ``[...]``) relative to
        ``run_dir`` with an ``{epoch}`` and optionally a ``{step}`` placeholder,
        e.g. ``"weights/ep{epoch}.pt"``. Without ``/`` it is also tried in
        ``run_dir/checkpoints``. Its numbers are taken as written.
    allow_empty : bool, default False
        Return an empty series (with the explanation in ``.message``) instead
        of raising when nothing matches.
    allow_symlinks : bool, default False
        Accept files whose symbolic links point outside ``run_dir``.
    epoch_from : {"auto", "name", "metadata", "order"}, default "auto"
        Where epochs come from (:func:`dtprobe.checkpoints.layouts.assign_epochs`).
    trust_pickles : bool, default False
        Read the records of files the safe loader refuses (``--trust-pickles``).

    Returns
    -------
    CheckpointSeries
        Sorted by epoch; non-matching checkpoint-like files are listed in ``.ignored``;
        ``.epoch_note`` says what epoch 0 means.

    Raises
    ------
    CheckpointError
        If two files give the same epoch (two namings, or two files of one
        naming), if a file resolves outside the run directory, or (unless
        ``allow_empty``) if nothing matches; the message says how to fix it.
    ConfigError
        If ``pattern`` or ``epoch_from`` is malformed.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise CheckpointError(f"{run_dir}: no such run directory")
    names, namings = _candidates(run_dir, pattern)
    found: list[layouts.Found] = []
    ignored: list[str] = []
    for rel in names:
        hit = _match(rel, namings, subdir_ok=pattern is None or "/" not in pattern)
        extra = None
        if hit is None and pattern is None:
            extra = layouts.flat_match(rel.rsplit("/", 1)[-1])
        if hit is None and extra is None:
            if rel.lower().endswith(CHECKPOINT_SUFFIXES):
                ignored.append(rel)
            continue
        if hit is not None:
            template, m = hit
            step = m.groupdict().get("step")
            layout = "generic" if pattern else layouts.naming_layout(template)
            found.append(layouts.Found(rel, layout, template, int(m.group("epoch")),
                                       None if step is None else int(step)))
        else:
            template, number, step_number, layout = extra
            found.append(layouts.Found(rel, layout, template, number, step_number))
    if not found and pattern is None and not ignored:
        deep = [n for n in layouts.walk_files(run_dir) if not is_temporary_name(n)]
        found = layouts.nested_checkpoints(run_dir, deep)
    for item in found:
        if trust_pickles:  # read once, hashed: the load must see these bytes (see peek_bytes)
            item.meta, item.sha256 = layouts.peek_bytes(run_dir / item.relpath)
        else:
            item.meta = layouts.peek(run_dir / item.relpath)
        if pattern is None:
            item.layout = layouts.refine(item, run_dir)
    assigned, note = layouts.assign_epochs(found, run_dir, epoch_from)
    by_epoch: dict[int, list[InferredCheckpoint]] = {}
    for a in assigned:
        item = InferredCheckpoint(
            epoch=a.epoch, step=a.step,
            path=resolve_inside(run_dir, a.found.relpath, allow_symlinks=allow_symlinks),
            relpath=a.found.relpath, naming=a.found.naming, layout=a.found.layout,
            source_epoch=a.source_epoch, epoch_basis=a.basis, sha256=a.found.sha256,
            meta=a.found.meta)
        by_epoch.setdefault(item.epoch, []).append(item)
    for epoch, items in sorted(by_epoch.items()):
        if len(items) > 1:
            files = ", ".join(f"{c.relpath} [{c.naming}]" for c in items[:4])
            raise CheckpointError(
                f"{run_dir}: ambiguous checkpoint series: epoch {epoch} has {len(items)} files "
                f"({files}); keep one file per epoch, pass --pattern {items[0].naming!r} to use "
                "one naming, or write a manifest that lists the files "
                "(see checkpoints_manifest/README.md)")
    series = [items[0] for _, items in sorted(by_epoch.items())]
    message = "" if series else _nothing_found(run_dir, names, ignored, pattern)
    if message and not allow_empty:
        raise CheckpointError(message)
    return CheckpointSeries(series, run_dir, ignored, message, note if series else "")


def _suggest_pattern(relpath: str) -> str:
    """A ``--pattern`` for files named like ``relpath``: its last number becomes ``{epoch}``."""
    folder, _, base = relpath.rpartition("/")
    numbers = list(re.finditer(r"[0-9]+", base))
    if not numbers:
        return (folder + "/" if folder else "") + "NAME_{epoch}.pth"
    last = numbers[-1]
    templ = base[:last.start()] + "{epoch}" + base[last.end():]
    return (folder + "/" if folder else "") + templ


def _nothing_found(run_dir: Path, names: list[str], ignored: list[str],
                   pattern: str | None) -> str:
    wanted = repr(pattern) if pattern else "a known checkpoint naming (" + ", ".join(
        KNOWN_NAMINGS[:6]) + ", ...)"
    if not ignored and not pattern:
        # Checkpoints one folder down (other than checkpoints/) are a common layout.
        deeper = [n for n in _list_files(run_dir, 1) if not n.startswith(CHECKPOINT_SUBDIR + "/")
                  and n.lower().endswith(CHECKPOINT_SUFFIXES) and not is_temporary_name(n)]
        deeper += [n for n in _list_files(run_dir, 2) if n.lower().endswith(CHECKPOINT_SUFFIXES)
                   and not is_temporary_name(n)]
        if deeper:
            listing = ", ".join(deeper[:4]) + (f" (+{len(deeper) - 4} more)"
                                               if len(deeper) > 4 else "")
            return (f"{run_dir}: no checkpoint files of a known layout "
                    "(see dtprobe/checkpoints/layouts.py), "
                    f"but found {listing}; pass --pattern '{_suggest_pattern(deeper[0])}' "
                    "describing their names (or --epoch-from order), or write a manifest "
                    "(see checkpoints_manifest/README.md)")
    shown = ignored or names
    if shown:
        listing = ", ".join(shown[:6]) + (f" (+{len(shown) - 6} more)" if len(shown) > 6 else "")
        numbered = next((n for n in shown if re.search(r"[0-9]", n.rsplit("/", 1)[-1])), None)
        suggestion = _suggest_pattern(numbered) if numbered else "NAME_{epoch}.pth"
        return (f"{run_dir}: found files {listing} but none matches {wanted}; pass "
                f"--pattern '{suggestion}' describing your file names, or write a manifest "
                "(see checkpoints_manifest/README.md)")
    where = (f"{run_dir} or {run_dir / CHECKPOINT_SUBDIR}" if not pattern or "/" not in pattern
             else run_dir)
    return (f"{where}: no checkpoint files matching {wanted}; point to the run directory that "
            "holds the checkpoints, or pass --pattern")


# ------------------------------------------------------------------------- whole-run inference
@dataclass
class InferredRun:
    """A run without a manifest: its checkpoints and how to rebuild its model.

    Attributes
    ----------
    series : CheckpointSeries
        The checkpoints, with epochs and steps (:mod:`dtprobe.checkpoints.layouts`).
    arch, num_classes, arch_kwargs : the model, from the flags, else from the files' records
        (:func:`dtprobe.checkpoints.layouts.model_hints`), else recognised from the weights' names
        and
        shapes (:func:`dtprobe.checkpoints.layouts.guess_from_keys`); ``arch``/``num_classes`` are
        None
        when nothing says them.
    origin : str
        Where the architecture came from (``"flags"``, ``"Lightning hyper_parameters"`` ...).
    """

    series: CheckpointSeries
    arch: str | None
    num_classes: int | None
    arch_kwargs: dict[str, Any]
    origin: str


def infer_run(run_dir: str | os.PathLike[str], *, pattern: str | None = None,
              epoch_from: str = "auto", arch: str | None = None,
              num_classes: int | None = None, arch_params: Mapping[str, Any] | None = None,
              trust_pickles: bool = False) -> InferredRun:
    """Series and model of a manifest-free run; flags given override what the files say.

    The last readable checkpoint is read (safely; ``trust_pickles`` as in
    :func:`load_checkpoint`) when the architecture or class count is not given. A refusal to
    unpickle is raised (it names ``--trust-pickles``): the run's files cannot be read either.

    Raises
    ------
    CheckpointError
        As :func:`infer_checkpoint_series`, or the last checkpoint is refused or unreadable
        while the flags leave the model unknown.
    """
    series = infer_checkpoint_series(run_dir, pattern=pattern, allow_symlinks=True,
                                     epoch_from=epoch_from, trust_pickles=trust_pickles)
    kwargs = dict(arch_params or {})
    if arch is not None and num_classes is not None:
        return InferredRun(series, arch, num_classes, kwargs, "flags")
    loaded = None
    for item in reversed(series):  # the last file that reads (a damaged one fails later alone)
        try:
            blob = read_checkpoint_bytes(item.path, expected_sha256=item.sha256,
                                         recorded_by=PLANNED_DIGEST)
            loaded = load_checkpoint(item.path, finite=False, trust_pickles=trust_pickles,
                                     data=blob)
        except UnsafeCheckpointError:
            raise
        except CheckpointError:
            continue
        last = item.path
        break
    if loaded is None:
        return InferredRun(series, arch, num_classes, kwargs, "flags")
    hints = layouts.model_hints(loaded.source, last)
    if arch is None and hints.arch is None:
        guessed = layouts.guess_from_keys(loaded.source)
        if guessed.arch is not None:
            hints = layouts.ModelHints(guessed.arch, hints.num_classes or guessed.num_classes,
                                       guessed.kwargs, guessed.origin)
    if hints.num_classes is None and (arch or hints.arch):
        hints = layouts.ModelHints(hints.arch, _head_classes(loaded, arch or hints.arch),
                                   hints.kwargs, hints.origin)
    origin = "flags" if arch is not None and num_classes is not None else hints.origin
    merged = {**(hints.kwargs if arch is None else {}), **kwargs}
    return InferredRun(series, arch or hints.arch, num_classes or hints.num_classes, merged,
                       origin or "flags")


def _head_classes(loaded: LoadedCheckpoint, arch: str | None) -> int | None:
    """Rows of the head weight (``<head>.weight`` under any prefix) of a named architecture."""
    from dtprobe.models import get_arch
    from dtprobe.models.registry import AUTO_HEAD

    if arch is None:
        return None
    try:
        head = get_arch(arch).head
    except Exception:  # noqa: BLE001 - an unknown name is reported when the plan is checked
        return None
    if head == AUTO_HEAD:
        return None
    suffix = f"{head}.weight"
    from dtprobe.checkpoints.state_dict import candidates

    for candidate in candidates(loaded.source):
        weight = candidate.state.get(suffix)
        if weight is not None and weight.dim() == 2:
            return int(weight.shape[0])
    return None
