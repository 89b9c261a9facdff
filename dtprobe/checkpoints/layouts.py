"""Where training frameworks put their checkpoints, and what their epoch numbers mean.

:func:`discover` finds a run's checkpoint files without a manifest and reads epoch and step
from the framework's own records. Layouts, searched in this order (see :data:`LAYOUTS`):

1. **Flat names** in the run directory or its ``checkpoints/`` folder: the names of
   :data:`dtprobe.checkpoints.KNOWN_NAMINGS` (CTC reference code ``ckpt_epoch_{e}.pth``,
   Lightning ``epoch={e}-step={s}.ckpt`` and ``epoch={e}-val_acc=0.71.ckpt``, timm
   ``checkpoint-{e}.pth.tar``, torchvision ``model_{e}.pth``, dtprobe ``epoch_{e}.pt``,
   ``epoch_003.ckpt`` ...).
2. **Framework folders** below the run directory, when step 1 finds nothing:
   Lightning ``[*/]lightning_logs/version_N/checkpoints/*.ckpt`` (all versions, resumed runs
   continue in a new version), Hugging Face Trainer ``[*/]checkpoint-STEP/`` (weights in
   ``model.safetensors`` or ``pytorch_model.bin``, records in ``trainer_state.json``),
   accelerate ``[*/]checkpoints/checkpoint_I/`` (``model.safetensors``), and flat names one
   or two folders down (timm's ``output/train/<experiment>/``) when exactly one folder has them.

Epochs in dtprobe are **epochs completed** (0 = the initialisation, before any training).
Each layout says how its numbers map to that (:attr:`Layout.offset`) and what its records hold:

- Lightning, timm and torchvision's reference script count epochs from 0 *after* the first
  epoch, so their ``e`` is ``e + 1`` here;
- the CTC reference code and dtprobe count from 1 (0 is the initialisation);
- Hugging Face's ``checkpoint-STEP`` holds a global step (the epoch comes from
  ``trainer_state.json``, ``epoch`` = epochs completed, possibly fractional), accelerate's
  ``checkpoint_I`` a save index (no epoch at all: the series is numbered in order);
- files of other names keep their number as written (whether 0 is the initialisation is
  unknown, which the run's epoch note says).

``epoch_from`` (``--epoch-from``) overrides the source: ``"name"`` (the number in the file or
folder name, with the layout's offset), ``"metadata"`` (the framework's records: Lightning's
``epoch``/``global_step`` in the file, ``trainer_state.json``, safetensors metadata, the
``epoch`` entry of timm/torchvision/CTC files), ``"order"`` (1, 2, ... in save order) or
``"auto"`` (each layout's best source, in that order of preference).
"""

from __future__ import annotations

import io
import json
import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from dtprobe.checkpoints import reader
from dtprobe.checkpoints.naming import KNOWN_PATTERNS, is_temporary_name
from dtprobe.errors import CheckpointError, ConfigError, UnsafeCheckpointError
from dtprobe.table import ANALYSIS_DIR

EPOCH_SOURCES = ("auto", "name", "metadata", "order")
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "model.bin", "model.pt",
                "model.pth", "diffusion_pytorch_model.safetensors")
_SKIP_DIRS = {ANALYSIS_DIR, ".git", "__pycache__", "wandb", "tensorboard", "logs_tb", "runs_tb"}
_MAX_DEPTH, _MAX_ENTRIES = 5, 20000


@dataclass(frozen=True)
class Layout:
    """A framework's checkpoint layout.

    Attributes
    ----------
    name : str
        Registry name (``"lightning"``, ``"hf_trainer"`` ...).
    framework : str
        Who writes it.
    example : str
        A path it matches, relative to the run directory.
    number : {"epoch", "step", "index"}
        What the number in the name counts.
    offset : int
        Added to the framework's epoch to give epochs completed.
    records : str
        Where epoch/step records are read from.
    """

    name: str
    framework: str
    example: str
    number: str
    offset: int
    records: str


LAYOUTS: dict[str, Layout] = {layout.name: layout for layout in (
    Layout("ctc", "CTC / CRD / SupCon reference code", "ckpt_epoch_2.pth", "epoch", 0,
           "file: epoch"),
    Layout("dtprobe", "dtprobe train", "checkpoints/epoch_0002.pt", "epoch", 0,
           "manifest.json (file: epoch, step)"),
    Layout("lightning", "PyTorch Lightning ModelCheckpoint",
           "lightning_logs/version_0/checkpoints/epoch=3-step=120.ckpt", "epoch", 1,
           "file: epoch, global_step"),
    Layout("hf_trainer", "Hugging Face Trainer", "checkpoint-500/model.safetensors", "step", 0,
           "trainer_state.json: epoch, global_step; config.json"),
    Layout("accelerate", "accelerate save_state (automatic_checkpoint_naming)",
           "checkpoints/checkpoint_0/model.safetensors", "index", 0, "none"),
    Layout("timm", "timm train.py CheckpointSaver",
           "output/train/20240101-000000-resnet18-32/checkpoint-3.pth.tar", "epoch", 1,
           "file: epoch, arch, args"),
    Layout("torchvision", "torchvision references/classification/train.py", "model_3.pth",
           "epoch", 1, "file: epoch, args.model"),
    Layout("safetensors", "plain safetensors (save_file with metadata)", "epoch_3.safetensors",
           "epoch", 0, "header metadata: epoch, step"),
    Layout("generic", "any name with an epoch number", "weights-epoch_003.ckpt", "epoch", 0,
           "file: epoch, step (when present)"),
)}


@dataclass
class Found:
    """One checkpoint file a layout matched, before epochs are assigned."""

    relpath: str
    layout: str
    naming: str
    number: int | None = None
    step: int | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    sha256: str | None = None  # of the bytes ``meta`` came from (peek_bytes)


# --------------------------------------------------------------------------- reading records
def peek(path: Path) -> dict[str, Any]:
    """Plain metadata of a checkpoint without reading its tensors (``{}`` when unreadable).

    ``torch.save`` files are opened with ``weights_only=True`` and ``mmap=True`` (tensor data
    stays on disk); safetensors files by their JSON header only. Errors are left to the real
    load, which reports them per checkpoint. With ``--trust-pickles``, :func:`peek_bytes`
    reads instead.
    """

    try:
        with open(path, "rb") as fh:
            header = _safetensors_header(fh)
        if header is not None:
            return _header_metadata(header)
        import warnings

        import torch

        with reader.allow_data_only_globals(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001 - any failure is reported by the real load later
        return {}
    return _metadata(obj)


def _header_metadata(header: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in (header.get("__metadata__") or {}).items():
        try:
            out[key] = json.loads(value)
        except Exception:  # any class: metadata that is not JSON stays text
            out[key] = value
    return out


def peek_bytes(path: Path) -> tuple[dict[str, Any], str | None]:
    """:func:`peek` for ``--trust-pickles``: the file is read once into memory and hashed, and
    its metadata comes from those bytes (unpickled in full only when the safe loader refuses
    them); returns ``(metadata, sha256)``, ``({}, None)`` when unreadable.

    The analysis then loads the file only if it still has this digest, so the metadata that
    planned the series (its epochs) and the weights analysed come from the same bytes, and a
    file rewritten in between fails alone instead of being unpickled under another file's plan.
    """
    try:
        blob = reader.read_checkpoint_bytes(path)
    except Exception:  # any class: reported by the real load later
        return {}, None
    try:
        header = _safetensors_header(io.BytesIO(blob.data))
        if header is not None:
            return _header_metadata(header), blob.sha256
        try:
            obj = reader.torch_load_bytes(blob.data, path)
        except UnsafeCheckpointError:
            obj = reader.trusted_torch_load_bytes(blob.data, path)
    except Exception:  # any class: reported by the real load later (same digest)
        return {}, blob.sha256
    return _metadata(obj), blob.sha256


def _metadata(obj: Any) -> dict[str, Any]:
    if not isinstance(obj, Mapping):
        return {}
    return {k: v for k, v in obj.items() if isinstance(k, str)}


def _safetensors_header(fh: BinaryIO, limit: int = 100 * 2**20) -> dict[str, Any] | None:
    """The JSON header of safetensors content (8-byte little-endian length, then JSON) read
    from ``fh``, or None when it is not one; only the header is read."""
    head = fh.read(8)
    if len(head) < 8:
        return None
    size = int.from_bytes(head, "little")
    if not 2 <= size <= limit:
        return None
    text = fh.read(size)
    if len(text) != size or not text.startswith(b"{"):
        return None
    try:
        header, _ = reader.split_safetensors(head + text)
    except Exception:  # any class (RecursionError, MemoryError ...): not a safetensors file
        return None
    return header


def _number(value: Any) -> float | None:
    try:
        number = float(value.item() if hasattr(value, "item") else value)
    except Exception:  # any class (OverflowError of 10**400 ...): no number
        return None
    return number if math.isfinite(number) else None


def _trainer_state(folder: Path) -> dict[str, Any]:
    try:
        state = json.loads((folder / "trainer_state.json").read_text())
    except Exception:  # any class (a nesting RecursionError ...): no hints from it
        return {}
    return state if isinstance(state, dict) else {}


# ------------------------------------------------------------------------------ discovery
def walk_files(run_dir: Path) -> list[str]:
    """Relative POSIX paths of files below ``run_dir`` (bounded depth and count)."""
    found: list[str] = []

    def walk(directory: Path, prefix: str, level: int) -> None:
        try:
            entries = sorted(os.scandir(directory), key=lambda e: e.name)
        except OSError:
            return
        for entry in entries:
            if len(found) >= _MAX_ENTRIES:
                return
            try:
                if entry.is_dir():
                    if level < _MAX_DEPTH and entry.name not in _SKIP_DIRS \
                            and not entry.name.startswith("."):
                        walk(Path(entry.path), f"{prefix}{entry.name}/", level + 1)
                elif entry.is_file():
                    found.append(prefix + entry.name)
            except OSError:
                continue

    walk(run_dir, "", 0)
    return found


_LIGHTNING_DIR = re.compile(r"(?:.*/)?version_(?P<version>\d+)/checkpoints/")
_LIGHTNING_NAME = re.compile(r"epoch=(?P<epoch>\d+)(?:-step=(?P<step>\d+))?(?:[-_][^/]*)?\.ckpt")
_HF = re.compile(r"(?:.*/)?checkpoint-(?P<step>\d+)/(?P<file>[^/]+)")
_ACCELERATE = re.compile(r"(?:.*/)?checkpoint_(?P<index>\d+)/(?P<file>[^/]+)")


def nested_checkpoints(run_dir: Path, names: list[str]) -> list[Found]:
    """Framework folders below the run directory (step 2 of the module docstring)."""

    lightning = [Found(n, "lightning", "lightning_logs/version_N/checkpoints/epoch={epoch}*.ckpt",
                       int(m.group("epoch")), _int(m.group("step")))
                 for n in names
                 if _LIGHTNING_DIR.match(n) and (m := _LIGHTNING_NAME.fullmatch(
                     n.rsplit("/", 1)[-1])) is not None]
    if lightning:
        return lightning
    hf = _folder_weights(names, _HF, "hf_trainer", "checkpoint-{step}/")
    if hf:
        return hf
    accelerate = _folder_weights(names, _ACCELERATE, "accelerate", "checkpoint_{index}/")
    if accelerate:
        return accelerate
    # Flat names one or two folders down (timm's output/train/<experiment>/, run sub-folders).
    by_folder: dict[str, list[Found]] = {}
    for n in names:
        folder, _, base = n.rpartition("/")
        if not folder or folder.count("/") > 2 or is_temporary_name(base):
            continue
        hit = flat_match(base)
        if hit is not None:
            naming, number, step, layout = hit
            by_folder.setdefault(folder, []).append(Found(n, layout, f"{folder}/{naming}", number,
                                                          step))
    if len(by_folder) > 1:
        listing = ", ".join(sorted(by_folder)[:4])
        raise CheckpointError(f"{run_dir}: checkpoints of several runs below it ({listing}); "
                              "pass one of these folders as the run directory")
    return next(iter(by_folder.values()), [])


def _int(text: str | None) -> int | None:
    return None if text is None else int(text)


def _folder_weights(names: list[str], regex: re.Pattern[str], layout: str,
                    naming: str) -> list[Found]:
    folders: dict[str, list[str]] = {}
    for n in names:
        m = regex.fullmatch(n)
        if m is not None:
            folders.setdefault(n[: m.start("file")], []).append(m.group("file"))
    out = []
    for folder, files in folders.items():
        weights = next((w for w in WEIGHT_FILES if w in files), None)
        if weights is None:
            continue
        m = regex.fullmatch(folder + weights)
        number = int(m.group("step" if "step" in regex.groupindex else "index"))
        out.append(Found(folder + weights, layout, naming + weights, number,
                         number if layout == "hf_trainer" else None))
    return out


#: Flat names beyond KNOWN_NAMINGS: Lightning names with metric suffixes, ``epoch_003.ckpt``,
#: ``epoch3.pt``, ``ep_3.pth``; the first one that matches decides.
_EXTRA_NAMES: tuple[tuple[str, re.Pattern[str], str], ...] = (
    ("epoch={epoch}-*.ckpt", _LIGHTNING_NAME, "lightning"),
    ("*epoch{epoch}*", re.compile(r"(?:[^/]*[_.-])?epoch[_=-]?(?P<epoch>\d+)"
                                   r"(?:[_=-][^/]*)?\.(?:pt|pth|ckpt|bin|tar|safetensors)"),
     "generic"),
    ("*ep{epoch}*", re.compile(r"(?:[^/]*[_.-])?ep[_=-]?(?P<epoch>\d+)"
                               r"(?:[_=-][^/]*)?\.(?:pt|pth|ckpt|bin|tar|safetensors)"),
     "generic"),
)


#: The templates of :data:`_EXTRA_NAMES` (documentation, tests).
EXTRA_NAMINGS: tuple[str, ...] = tuple(t for t, _, _ in _EXTRA_NAMES)


def flat_match(base: str) -> tuple[str, int, int | None, str] | None:
    """``(naming, number, step, layout)`` of a flat checkpoint file name, or None."""

    for template, regex in KNOWN_PATTERNS:
        m = regex.fullmatch(base)
        if m is not None:
            step = m.groupdict().get("step")
            return template, int(m.group("epoch")), _int(step), naming_layout(template)
    for template, regex, layout in _EXTRA_NAMES:
        m = regex.fullmatch(base)
        if m is not None:
            step = re.search(r"(?:^|[_.-])step[_=-]?(\d+)", base)
            return template, int(m.group("epoch")), _int(step and step.group(1)), layout
    return None


def naming_layout(template: str) -> str:
    """The layout a flat naming belongs to (before folder evidence refines it)."""
    if template.endswith(".safetensors"):
        return "safetensors"  # converted files: their metadata, else the number as written
    if template.startswith("ckpt_epoch_"):
        return "ctc"
    if template.startswith("epoch={epoch}"):
        return "lightning"
    if template == "epoch_{epoch}.pt":
        return "dtprobe"
    return "generic"


def refine(found: Found, run_dir: Path) -> str:
    """A ``generic`` flat file's layout, from what its folder and file say (timm, torchvision)."""
    folder = (run_dir / found.relpath).parent
    base = found.relpath.rsplit("/", 1)[-1]
    if found.layout == "generic" and base.startswith("checkpoint-") and (
            (folder / "args.yaml").exists() or (folder / "summary.csv").exists()
            or ("arch" in found.meta and "version" in found.meta)):
        return "timm"
    if found.layout == "generic" and base.startswith("model_") and (
            (folder / "checkpoint.pth").exists() or _args(found.meta).get("model")):
        return "torchvision"
    return found.layout


def _args(meta: Mapping[str, Any]) -> dict[str, Any]:
    args = meta.get("args")
    if args is None:
        return {}
    if isinstance(args, Mapping):
        return dict(args)
    return dict(vars(args)) if hasattr(args, "__dict__") else {}


# ------------------------------------------------------------------------ epoch assignment
@dataclass
class Assigned:
    """A file with its epoch (epochs completed), step and where they came from."""

    found: Found
    epoch: int
    step: int | None
    source_epoch: float | None
    basis: str


def _meta_epoch(found: Found, run_dir: Path) -> tuple[float | None, int | None]:
    """(framework epoch, step) from the framework's records, either possibly None."""
    if found.layout == "hf_trainer":
        state = _trainer_state((run_dir / found.relpath).parent)
        return _number(state.get("epoch")), _int_or_none(state.get("global_step"))
    meta = found.meta
    epoch = _number(meta.get("epoch")) if "epoch" in meta else None
    step = next((_int_or_none(meta[k]) for k in ("global_step", "step") if k in meta), None)
    return epoch, step


def _int_or_none(value: Any) -> int | None:
    number = _number(value)
    return None if number is None or number != int(number) else int(number)


def assign_epochs(items: list[Found], run_dir: Path, epoch_from: str = "auto"
                  ) -> tuple[list[Assigned], str]:
    """Epochs (completed) and steps of ``items``; returns them and the run's epoch note.

    Raises
    ------
    ConfigError
        ``epoch_from`` is not one of :data:`EPOCH_SOURCES`.
    CheckpointError
        The requested source is not available for some file (the message names it and the
        ``--epoch-from`` choice that works).
    """
    if epoch_from not in EPOCH_SOURCES:
        raise ConfigError(f"--epoch-from {epoch_from!r}: choose one of "
                          f"{', '.join(EPOCH_SOURCES)}")
    out: list[Assigned] = []
    for f in items:
        layout = LAYOUTS[f.layout]
        meta_epoch, meta_step = _meta_epoch(f, run_dir)
        step = f.step if f.step is not None else meta_step
        if f.layout == "hf_trainer":
            step = meta_step if meta_step is not None else f.number
        offset = layout.offset
        by_name = f.number if layout.number == "epoch" else None
        if f.layout == "hf_trainer" and meta_epoch is not None and meta_epoch != int(meta_epoch):
            meta_epoch = None if epoch_from == "auto" else meta_epoch  # saved mid-epoch
        source = {"name": by_name, "metadata": meta_epoch, "order": None}
        if epoch_from == "auto":
            preferred = ["metadata", "name"] if f.layout in ("lightning", "hf_trainer",
                                                              "safetensors") else ["name",
                                                                                   "metadata"]
            basis = next((b for b in preferred if source[b] is not None), "order")
        else:
            basis = epoch_from
        value = source.get(basis)
        if basis != "order" and value is None:
            what = {"name": f"its {layout.number if layout.number != 'epoch' else 'name'} "
                            "holds no epoch number" if by_name is None else "",
                    "metadata": "no epoch is recorded for it"}[basis]
            raise CheckpointError(f"{run_dir / f.relpath}: --epoch-from {basis}: {what}; pass "
                                  "--epoch-from order (1, 2, ... in save order) or "
                                  f"{'metadata' if basis == 'name' else 'name'}")
        if basis == "metadata" and value is not None and value != int(value):
            raise CheckpointError(f"{run_dir / f.relpath}: recorded epoch {value} is not a whole "
                                  "number (saved mid-epoch); pass --epoch-from order")
        epoch = None if value is None else int(value) + (offset if layout.name != "hf_trainer"
                                                         or basis == "name" else 0)
        out.append(Assigned(f, -1 if epoch is None else epoch, step, value, basis))
    if any(a.basis == "order" for a in out):
        out.sort(key=lambda a: (a.step if a.step is not None else -1,
                                a.found.number if a.found.number is not None else -1,
                                a.found.relpath))
        for i, a in enumerate(out, start=1):
            a.epoch, a.basis = i, "order"
    return sorted(out, key=lambda a: a.epoch), epoch_note(out)


def epoch_note(items: list[Assigned]) -> str:
    """What the epoch numbers of a run mean (what epoch 0 is), for tables and charts."""
    if not items:
        return ""
    layouts = sorted({a.found.layout for a in items})
    bases = {a.basis for a in items}
    who = ", ".join(LAYOUTS[name].framework for name in layouts)
    if bases == {"order"}:
        return (f"epoch = position in the series (1 = first checkpoint saved; {who} records no "
                "whole epoch)")
    known = all(LAYOUTS[n].name != "generic" for n in layouts)
    shifted = [n for n in layouts if LAYOUTS[n].offset]
    if not known:
        return "epoch as written in the file names (whether 0 is the initialisation is unknown)"
    text = "epoch = epochs completed (0 = initialisation)"
    if shifted:
        text += "; " + ", ".join(LAYOUTS[n].framework for n in shifted) + \
            " count from 0 after the first epoch: their epoch e is e+1 here"
    return text


# ---------------------------------------------------------------- architecture from records
@dataclass(frozen=True)
class ModelHints:
    """Architecture and class count a checkpoint states, and where that was read.

    Attributes
    ----------
    arch : str or None
        A name :func:`dtprobe.models.get_arch` accepts.
    num_classes : int or None
    kwargs : dict
        Architecture keyword arguments (e.g. ``cifar_stem`` from a recognised key set).
    origin : str
        Which record said it (``"timm arch"``, ``"Lightning hyper_parameters"``, ``"keys"`` ...).
    """

    arch: str | None = None
    num_classes: int | None = None
    kwargs: dict[str, Any] = field(default_factory=dict)
    origin: str = ""


_ARCH_FIELDS = ("arch", "architecture", "model_name", "backbone", "model", "net", "network")
_CLASS_FIELDS = ("num_classes", "n_classes", "num_labels", "nb_classes", "classes")


def _known_arch(name: Any) -> str | None:
    from dtprobe.models import get_arch

    if not isinstance(name, str) or not name or "/" in name:
        return None
    if ":" in name and not name.startswith(("timm:", "torchvision:")):
        return None  # never import code a file names (package.module:callable is a flag only)
    try:
        get_arch(name)
    except Exception:  # noqa: BLE001 - not a name dtprobe can build
        return None
    return name


def _classes(record: Mapping[str, Any]) -> int | None:
    for key in _CLASS_FIELDS:
        value = _int_or_none(record.get(key)) if not isinstance(record.get(key), bool) else None
        if value is not None and value > 0:
            return value
    return None


def model_hints(source: Any, checkpoint: Path) -> ModelHints:
    """What the checkpoint (or its folder's ``config.json``) says about the model.

    Reads, in order: timm's ``arch`` (+ ``args.num_classes``) as ``timm:<arch>``; torchvision's
    reference-script ``args.model``; Lightning's ``hyper_parameters`` (``arch``/``model_name``/
    ``backbone``... and ``num_classes``/``n_classes``/``num_labels``); a Hugging Face
    ``config.json`` beside the weights (``hf:<folder>``). Returns empty hints when none applies.
    """
    record = source if isinstance(source, Mapping) else {}
    args = _args(record)
    if isinstance(record.get("arch"), str) and "version" in record:
        # timm's CheckpointSaver stores the class name as 'arch'; train.py's args.model is the
        # model name timm.create_model takes.
        name = args.get("model") if isinstance(args.get("model"), str) else record["arch"]
        arch = _known_arch(f"timm:{name}")
        if arch:
            return ModelHints(arch, _classes(args), {}, "timm checkpoint args.model")
    if isinstance(args.get("model"), str):
        name = args["model"]
        arch = _known_arch(name) or _known_arch(f"torchvision:{name}")
        if arch:
            return ModelHints(arch, _classes(args), {}, "torchvision args.model")
    hparams = record.get("hyper_parameters")
    if isinstance(hparams, Mapping):
        arch = next((a for k in _ARCH_FIELDS if (a := _known_arch(hparams.get(k)))), None)
        classes = _classes(hparams)
        if arch or classes:
            return ModelHints(arch, classes, {}, "Lightning hyper_parameters")
    config = checkpoint.parent / "config.json"
    if config.is_file():
        try:
            data = json.loads(config.read_text())
        except Exception:  # any class (a nesting RecursionError ...): no hints from it
            data = {}
        if isinstance(data, dict) and data.get("model_type"):
            labels = data.get("id2label")
            classes = len(labels) if isinstance(labels, dict) and labels else _classes(data)
            return ModelHints(f"hf:{checkpoint.parent}", classes, {}, "Hugging Face config.json")
    return ModelHints()


def guess_from_keys(source: Any, in_channels: tuple[int, ...] = (3, 1)) -> ModelHints:
    """Recognise a registered architecture from the weights' names and shapes alone."""
    from dtprobe.checkpoints.state_dict import candidates
    from dtprobe.models import guess_arch

    found = candidates(source)
    has_raw = any(not c.ema for c in found)
    for candidate in found:
        if candidate.ema and has_raw:
            continue
        for channels in in_channels:
            guesses = guess_arch(candidate.state, in_channels=channels)
            if guesses:
                g = guesses[0]
                return ModelHints(g.arch, g.num_classes, dict(g.kwargs),
                                  f"parameter names and shapes ({candidate.describe()})")
    return ModelHints()


# ------------------------------------------------------------------ evaluation transform records
@dataclass
class TransformHints:
    """What a checkpoint's framework records say about its evaluation transform.

    ``image_size`` is the centre crop (the model's input side), ``resize_size`` the shorter
    side before it, ``interpolation`` the resize filter; None where the records do not say.
    ``origin`` names the record (``"torchvision args.val_resize_size/val_crop_size"`` ...).
    """

    image_size: int | None = None
    resize_size: int | None = None
    interpolation: str | None = None
    origin: str = ""

    def params(self) -> dict[str, Any]:
        """The folder-dataset parameters they give (:func:`dtprobe.data.load_dataset`)."""
        out: dict[str, Any] = {}
        if self.image_size is not None:
            out["image_size"] = self.image_size
            if self.resize_size is not None and self.resize_size >= self.image_size:
                out["resize_size"] = self.resize_size
        if self.interpolation in ("bilinear", "bicubic"):
            out["interpolation"] = self.interpolation
        return out


def _side(value: Any) -> int | None:
    """A square side from an int or a ``(C, H, W)``/``(H, W)`` size with ``H == W``."""
    if isinstance(value, (list, tuple)) and value:
        sides = [_int_or_none(v) for v in value[-2:]]
        return sides[0] if len(set(sides)) == 1 else None
    return None if isinstance(value, bool) else _int_or_none(value)


def _pct(value: Any) -> float | None:
    number = _number(value)
    return number if number is not None and 0 < number <= 1 else None


def _timm_registry_cfg(model: Any) -> dict[str, Any]:
    """timm's own pretrained_cfg of model name ``model`` (empty without timm or the name)."""
    if not isinstance(model, str) or not model:
        return {}
    try:
        from timm.models import get_pretrained_cfg
    except Exception:  # noqa: BLE001 - timm missing or broken: its records cannot be read
        return {}
    try:
        cfg = get_pretrained_cfg(model)
    except Exception:  # noqa: BLE001 - an unknown name
        return {}
    return cfg.to_dict() if hasattr(cfg, "to_dict") else {}


def eval_transform_hints(source: Any, checkpoint: Path) -> TransformHints:
    """The evaluation transform a checkpoint's framework records say, in order:

    - torchvision's reference ``train.py`` ``args.val_resize_size``/``val_crop_size`` (and
      ``args.interpolation``): the transform its evaluation used;
    - timm: ``train.py``'s ``args`` (``img_size``/``input_size``, ``crop_pct``,
      ``interpolation``) over a ``pretrained_cfg`` (in the checkpoint, in a ``config.json``
      beside it, else timm's registry entry for ``args.model`` when timm is installed), with
      timm's rule ``resize = floor(size / crop_pct)``; only ``crop_mode="center"`` maps to a
      shorter-side resize and centre crop (other modes give no hints).

    Returns empty hints when no record says it.
    """
    record = source if isinstance(source, Mapping) else {}
    args = _args(record)
    if args.get("val_crop_size") is not None or args.get("val_resize_size") is not None:
        interp = args.get("interpolation")
        return TransformHints(_side(args.get("val_crop_size")),
                              _side(args.get("val_resize_size")),
                              interp if isinstance(interp, str) else None,
                              "torchvision args.val_resize_size/val_crop_size")
    cfg: Any = record.get("pretrained_cfg")
    origin = "timm pretrained_cfg in the checkpoint"
    config = checkpoint.parent / "config.json"
    if not isinstance(cfg, Mapping) and config.is_file():
        try:
            data = json.loads(config.read_text())
        except (OSError, ValueError):
            data = {}
        cfg = data.get("pretrained_cfg") if isinstance(data, dict) else None
        origin = "timm pretrained_cfg in config.json"
    is_timm = isinstance(record.get("arch"), str) and "version" in record
    if not isinstance(cfg, Mapping) and is_timm:
        cfg = _timm_registry_cfg(args.get("model") or record.get("arch"))
        origin = "timm registry pretrained_cfg of args.model"
    cfg = dict(cfg) if isinstance(cfg, Mapping) else {}
    size = (_side(args.get("img_size")) or _side(args.get("input_size"))
            or _side(cfg.get("input_size")))
    pct = _pct(args.get("crop_pct")) or _pct(cfg.get("crop_pct"))
    interp = args.get("interpolation") or cfg.get("interpolation")
    if not (cfg or (is_timm and (size or pct))):
        return TransformHints()
    if cfg.get("crop_mode", "center") != "center":
        return TransformHints()
    if size is None:
        return TransformHints()
    if pct is None and is_timm:
        pct = 0.875  # timm's DEFAULT_CROP_PCT when neither the args nor the cfg say
    resize = math.floor(size / pct) if pct else None
    if any(args.get(k) for k in ("img_size", "input_size", "crop_pct")):
        origin = "timm train.py args" + (f" over {origin}" if cfg else "")
    return TransformHints(size, resize, interp if isinstance(interp, str) else None, origin)


#: Folder-dataset parameters that state an evaluation transform: a user who sets any of them
#: chooses it, and the records are not used.
TRANSFORM_PARAMS = ("image_size", "resize_size", "preset", "interpolation")


def with_recorded_transform(params: Mapping[str, Any], accepted: Sequence[str],
                            checkpoint: Path | None, trust_pickles: bool = False,
                            meta: Mapping[str, Any] | None = None
                            ) -> tuple[dict[str, Any], str]:
    """``params`` plus the evaluation transform the checkpoint's records say
    (:func:`eval_transform_hints`), for a loader taking ``accepted`` parameters; unchanged when
    the loader has no ``resize_size``, when ``params`` set any of :data:`TRANSFORM_PARAMS`
    (flags override the records), or when no record says it. Also returns the origin.
    ``meta``: the checkpoint's metadata when the caller already read it (the series inference
    did), so the file is not read (or, with ``trust_pickles``, unpickled) again."""
    out = dict(params)
    if (checkpoint is None or "resize_size" not in accepted
            or any(k in out for k in TRANSFORM_PARAMS)):
        return out, ""
    if not meta:
        meta = peek_bytes(checkpoint)[0] if trust_pickles else peek(checkpoint)
    hints = eval_transform_hints(meta, checkpoint)
    found = {k: v for k, v in hints.params().items() if k in accepted}
    if not found:
        return out, ""
    return {**out, **found}, hints.origin
