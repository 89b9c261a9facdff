"""The run-manifest data model: dataclasses, JSON conversion and validation.

A manifest records, for one training run, which file holds which checkpoint
(epoch, step, sha256, training metrics) and how to rebuild the network
(architecture, its keyword arguments, number of classes, the head whose input
is the penultimate feature).  dtprobe reads it to chart the
discriminability-transferability trade-off over training (Kornblith et al.
2021; Cui et al. 2022), but the format is plain JSON and this module depends on
the standard library only, so any training script can write one.

Validation is strict about the fields it knows (type, range, relative paths
that stay inside the run directory, one entry per epoch) and keeps unknown keys
untouched, so a newer writer's extra fields survive a round trip through an
older reader.

References
----------
.. [1] S. Kornblith, T. Chen, H. Lee, M. Norouzi, "Why do better loss functions
   lead to less transferable features?", NeurIPS 2021.
.. [2] Q. Cui, B. Zhao, Z.-M. Chen, B. Zhao, R. Song, J. Liang, B. Zhou, O. Yoshie,
   "Discriminability-transferability trade-off: an information-theoretic
   perspective", ECCV 2022.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

FORMAT = "checkpoints-manifest"
VERSION = 1
MANIFEST_NAME = "manifest.json"

_SHA256_RE = re.compile(r"[0-9a-fA-F]{64}")
_DOTTED_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z0-9_]+)*")
_DRIVE_RE = re.compile(r"[A-Za-z]:")
_CONTROL_RE = re.compile(r"[\x00-\x1f]")
#: Largest epoch / step / seed accepted (a signed 64-bit integer, what torch and NumPy store).
MAX_INT = 2**63 - 1
#: Longest string accepted in a known field (names, paths), in characters.
MAX_TEXT = 4096
#: Deepest nesting accepted anywhere in a manifest document.
MAX_DEPTH = 32
#: Most checkpoints one manifest may list.
MAX_CHECKPOINTS = 100_000
#: Most classes a model may have (ImageNet-21k has 21,841).
MAX_CLASSES = 1_000_000


class ManifestError(ValueError):
    """A manifest is missing, unreadable or invalid.

    The message is one line that names the file (or ``<dict>`` for in-memory
    data) and the offending field, e.g.
    ``runs/x/manifest.json: checkpoints[3].epoch must be an int >= 0, got "a"``.

    Attributes
    ----------
    source : str
        The file (or ``"<dict>"``) the error is about.
    field : str or None
        Dotted/indexed field name, when the error concerns one field.
    """

    def __init__(self, source: str, message: str | None = None, field: str | None = None):
        self.source = str(source)
        self.field = field
        super().__init__(self.source if message is None else f"{self.source}: {message}")


def utc_now_iso() -> str:
    """Current UTC time as ISO-8601 with seconds, e.g. ``2024-05-01T12:00:00+00:00``."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _show(value: Any, limit: int = 60) -> str:
    """Render a bad value for an error message (JSON where possible, shortened)."""
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) > 10**15:
        return f"an integer of {len(str(abs(value)))} digits"
    if isinstance(value, str):
        value = _printable(value)
    try:
        text = json.dumps(value, ensure_ascii=False, allow_nan=True, default=repr)
    except (TypeError, ValueError, RecursionError):
        try:
            text = repr(value)
        except (ValueError, RecursionError):
            text = f"a {type(value).__name__}"
    if isinstance(value, (dict, list)) and len(text) > limit:
        return f"a JSON {'object' if isinstance(value, dict) else 'array'} ({text[:limit - 20]}...)"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _printable(text: str) -> str:
    """``text`` with lone surrogates (undecodable bytes, invalid JSON escapes) made visible."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _bad_string(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def check_json_data(value: Any, source: str, name: str, depth: int = 0) -> None:
    """Refuse values no manifest can hold: nesting deeper than :data:`MAX_DEPTH`, strings (or
    keys) with lone surrogates (they cannot be written as UTF-8). Other non-JSON types are
    refused when the manifest is written (:meth:`Manifest.to_json`).

    Raises
    ------
    ManifestError
        Naming the field.
    """
    if depth > MAX_DEPTH:
        raise ManifestError(source, f"{name} is nested more than {MAX_DEPTH} levels deep", name)
    if isinstance(value, str):
        if _bad_string(value):
            raise ManifestError(source, f"{name} holds a string that is not valid Unicode "
                                        f"(lone surrogate): {_show(value)}", name)
    elif isinstance(value, Mapping):
        for key, item in value.items():
            if not isinstance(key, str) or _bad_string(key):
                raise ManifestError(source, f"{name} has a key that is not a valid string: "
                                            f"{_show(key)}", name)
            check_json_data(item, source, f"{name}.{key}" if name else key, depth + 1)
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            check_json_data(item, source, f"{name}[{i}]", depth + 1)


_STRING_RE = re.compile(r'"(?:[^"\\]|\\.)*"', re.DOTALL)
_BRACKET_RE = re.compile(r"[\[\]{}]")
_SURROGATE_ESCAPE_RE = re.compile(r"\\u[dD][89a-fA-F]")
_SURROGATE_RE = re.compile("[\ud800-\udfff]")


def check_json_text(text: str, source: str, data: Any) -> None:
    """:func:`check_json_data` for a document given as JSON text, without walking every value:
    nesting is measured on the brackets outside strings, and values are walked for lone
    surrogates only if the text has a surrogate escape or character (UTF-8 decoded text cannot
    hold one otherwise). ``data`` is the decoded document.
    """
    depth = deepest = 0
    for bracket in _BRACKET_RE.findall(_STRING_RE.sub("", text)):
        depth += 1 if bracket in "[{" else -1
        deepest = max(deepest, depth)
    if deepest > MAX_DEPTH + 1:  # the top-level object is level 0 of check_json_data
        raise ManifestError(source, f"the document is nested more than {MAX_DEPTH} levels deep "
                                    f"({deepest - 1})")
    if _SURROGATE_ESCAPE_RE.search(text) or _SURROGATE_RE.search(text):
        check_json_data(data, source, "")


class _Checker:
    """Validation helpers bound to one source name; every failure raises :class:`ManifestError`."""

    def __init__(self, source: str):
        self.source = source

    @classmethod
    def section(cls, data: Any, source: str, prefix: str) -> tuple[_Checker, dict[str, Any], str]:
        """A checker for ``source``, ``data`` checked as the object ``prefix``, and the prefix
        of its field names."""
        chk = cls(source)
        return chk, chk.obj(data, prefix), prefix + "."

    def fail(self, name: str, expected: str, value: Any) -> ManifestError:
        return ManifestError(self.source, f"{name} must be {expected}, got {_show(value)}", name)

    def obj(self, value: Any, name: str) -> dict[str, Any]:
        if not isinstance(value, Mapping):
            raise self.fail(name, "a JSON object", value)
        for key in value:
            if not isinstance(key, str):
                raise self.fail(f"{name} key", "a string", key)
        return dict(value)

    def required(self, data: Mapping[str, Any], key: str, prefix: str) -> Any:
        if key not in data:
            raise ManifestError(self.source, f"missing required field {prefix}{key}", prefix + key)
        return data[key]

    def text(self, value: Any, name: str) -> str:
        if not isinstance(value, str) or not value.strip():
            raise self.fail(name, "a non-empty string", value)
        if len(value) > MAX_TEXT:
            raise self.fail(name, f"a string of at most {MAX_TEXT} characters", value)
        return value

    def nonneg_int(self, value: Any, name: str, minimum: int = 0,
                   maximum: int = MAX_INT) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise self.fail(name, f"an int >= {minimum}", value)
        if value > maximum:
            raise self.fail(name, f"an int <= {maximum}", value)
        return int(value)

    def optional_int(self, value: Any, name: str) -> int | None:
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.fail(name, "an int or null", value)
        if abs(value) > MAX_INT:
            raise self.fail(name, f"an int of magnitude <= {MAX_INT} or null", value)
        return int(value)

    def iso_time(self, value: Any, name: str) -> str:
        if not isinstance(value, str) or _parse_iso(value) is None:
            raise self.fail(name, "an ISO-8601 timestamp string", value)
        return value

    def time(self, value: Any, name: str) -> float | str | None:
        if value is None:
            return None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            try:
                seconds = float(value)
            except OverflowError:
                seconds = math.inf
            if math.isfinite(seconds) and seconds >= 0:
                return seconds
        elif isinstance(value, str) and _parse_iso(value) is not None:
            return value
        raise self.fail(name, "seconds since the Unix epoch (>= 0), an ISO-8601 string or null",
                        value)

    def dotted(self, value: Any, name: str) -> str | None:
        if value is None:
            return None
        if not isinstance(value, str) or not _DOTTED_RE.fullmatch(value):
            raise self.fail(name, 'a dotted module name such as "fc" or "classifier.6", or null',
                            value)
        return value

    def sha256(self, value: Any, name: str) -> str | None:
        if value is None:
            return None
        if not isinstance(value, str) or not _SHA256_RE.fullmatch(value):
            raise self.fail(name, "64 hexadecimal characters (a sha256 digest) or null", value)
        return value.lower()

    def metrics(self, value: Any, name: str) -> dict[str, float]:
        out: dict[str, float] = {}
        for key, val in self.obj(value, name).items():
            if val is None:  # non-finite values are written as null
                out[key] = math.nan
                continue
            if isinstance(val, bool) or not isinstance(val, (int, float)):
                raise self.fail(f"{name}.{key}", "a number (or null for NaN)", val)
            try:
                out[key] = float(val)
            except OverflowError:
                raise self.fail(f"{name}.{key}", "a number representable as a float",
                                val) from None
        return out

    def relpath(self, value: Any, name: str) -> str:
        problem = _path_problem(value)
        if problem is not None:
            raise self.fail(name, f"a relative POSIX path inside the run directory ({problem})",
                            value)
        return _normalise_relpath(value)


def _parse_iso(text: str) -> datetime | None:
    candidate = text[:-1] + "+00:00" if text.endswith(("Z", "z")) else text
    try:
        return datetime.fromisoformat(candidate)
    except ValueError:
        return None


def _path_problem(value: Any) -> str | None:
    """Why ``value`` is not an acceptable checkpoint path, or None if it is."""
    if not isinstance(value, str) or not value:
        return "a non-empty string"
    if len(value) > MAX_TEXT:
        return f"at most {MAX_TEXT} characters"
    if _CONTROL_RE.search(value):
        return "no NUL or control characters"
    if _bad_string(value):
        return "valid Unicode, no lone surrogates"
    if "\\" in value:
        return "use forward slashes"
    if value.startswith("/") or _DRIVE_RE.match(value):
        return "not absolute"
    parts = value.split("/")
    if ".." in parts:
        return "no '..' components"
    if any(part == "" for part in parts):
        return "no empty components"
    if all(part == "." for part in parts):
        return "must name a file"
    return None


def _normalise_relpath(value: str) -> str:
    return "/".join(part for part in value.split("/") if part != ".")


def _merge_extra(known: dict[str, Any], extra: Any) -> dict[str, Any]:
    """``known`` fields, then the keys of ``extra`` they lack (an ``extra`` that is not a
    mapping adds nothing)."""
    out = dict(known)
    for key, val in (extra.items() if isinstance(extra, Mapping) else ()):
        if key not in out:
            out[key] = val
    return out


def _unknown(data: Mapping[str, Any], known: set[str]) -> dict[str, Any]:
    """The fields of ``data`` this reader does not know (kept in ``extra``, written back)."""
    return {k: v for k, v in data.items() if k not in known}


def _to_plain(value: Any) -> Any:
    """Dataclass -> dict (via ``to_dict``); anything else is returned unchanged for validation."""
    to_dict = getattr(value, "to_dict", None)
    return to_dict() if callable(to_dict) else value


def _json_metric(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _finite(value: Any) -> Any:
    """Copy of a JSON-like value with non-finite floats replaced by None (JSON has no NaN)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(item) for item in value]
    return value


@dataclass
class ModelSpec:
    """How to rebuild the network of a run.

    Attributes
    ----------
    arch : str
        Architecture name in the consumer's registry (for dtprobe: ``dtprobe list``).
    num_classes : int
        Number of source classes (>= 1), i.e. the output size of the head.
    kwargs : dict
        Extra keyword arguments for the architecture builder (JSON values).
    penultimate : str or None
        Dotted name of the head module whose *input* is the penultimate feature
        (e.g. ``"fc"``); None means the consumer's default for ``arch``.
    extra : dict
        Unknown keys found on read, written back unchanged.
    """

    arch: str
    num_classes: int
    kwargs: dict[str, Any] = field(default_factory=dict)
    penultimate: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (unknown keys from ``extra`` appended)."""
        return _merge_extra({"arch": self.arch, "kwargs": self.kwargs,
                             "num_classes": self.num_classes, "penultimate": self.penultimate},
                            self.extra)

    @classmethod
    def from_dict(cls, data: Any, source: str = "<dict>", prefix: str = "model") -> ModelSpec:
        """Validate ``data`` and build a :class:`ModelSpec`; raises :class:`ManifestError`."""
        chk, data, p = _Checker.section(data, source, prefix)
        known = {"arch", "kwargs", "num_classes", "penultimate"}
        return cls(
            arch=chk.text(chk.required(data, "arch", p), p + "arch"),
            num_classes=chk.nonneg_int(chk.required(data, "num_classes", p), p + "num_classes",
                                       minimum=1, maximum=MAX_CLASSES),
            kwargs=chk.obj(data.get("kwargs", {}), p + "kwargs"),
            penultimate=chk.dotted(data.get("penultimate"), p + "penultimate"),
            extra=_unknown(data, known),
        )


@dataclass
class DatasetSpec:
    """The source dataset a run was trained on.

    Attributes
    ----------
    name : str
        Dataset name in the consumer's registry (for dtprobe: ``shapes``, ``cifar10`` ...).
    params : dict
        Keyword arguments that rebuild it (JSON values).
    extra : dict
        Unknown keys found on read, written back unchanged.
    """

    name: str
    params: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (unknown keys from ``extra`` appended)."""
        return _merge_extra({"name": self.name, "params": self.params},
                            self.extra)

    @classmethod
    def from_dict(cls, data: Any, source: str = "<dict>", prefix: str = "dataset") -> DatasetSpec:
        """Validate ``data`` and build a :class:`DatasetSpec`; raises :class:`ManifestError`."""
        chk, data, p = _Checker.section(data, source, prefix)
        return cls(
            name=chk.text(chk.required(data, "name", p), p + "name"),
            params=chk.obj(data.get("params", {}), p + "params"),
            extra=_unknown(data, {"name", "params"}),
        )


@dataclass
class CheckpointEntry:
    """One saved checkpoint of the run.

    Attributes
    ----------
    epoch : int
        Training epoch the weights belong to (>= 0); unique within a manifest.
    step : int
        Optimiser steps taken when the file was saved (>= 0).
    path : str
        File location relative to the run directory, with forward slashes; it
        may not be absolute or contain ``..``.
    sha256 : str or None
        Hex digest of the file (:func:`sha256_file`); None if not recorded.
    metrics : dict of str to float
        Training-time numbers (e.g. ``train_loss``, ``train_acc``, CTC loss
        terms). Non-finite values are written as JSON ``null`` and read as NaN.
    time : float, str or None
        When it was saved: seconds since the Unix epoch (``time.time()``) or an
        ISO-8601 string.
    extra : dict
        Unknown keys found on read, written back unchanged.
    """

    epoch: int
    step: int
    path: str
    sha256: str | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    time: float | str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict; non-finite metric values become ``None`` (JSON ``null``)."""
        metrics = self.metrics
        if isinstance(metrics, Mapping):
            metrics = {k: _json_metric(v) for k, v in metrics.items()}
        return _merge_extra({"epoch": self.epoch, "step": self.step, "path": self.path,
                             "sha256": self.sha256, "metrics": metrics, "time": self.time},
                            self.extra)

    @classmethod
    def from_dict(cls, data: Any, source: str = "<dict>",
                  prefix: str = "checkpoint") -> CheckpointEntry:
        """Validate ``data`` and build a :class:`CheckpointEntry`; raises :class:`ManifestError`."""
        chk, data, p = _Checker.section(data, source, prefix)
        known = {"epoch", "step", "path", "sha256", "metrics", "time"}
        return cls(
            epoch=chk.nonneg_int(chk.required(data, "epoch", p), p + "epoch"),
            step=chk.nonneg_int(chk.required(data, "step", p), p + "step"),
            path=chk.relpath(chk.required(data, "path", p), p + "path"),
            sha256=chk.sha256(data.get("sha256"), p + "sha256"),
            metrics=chk.metrics(data.get("metrics", {}), p + "metrics"),
            time=chk.time(data.get("time"), p + "time"),
            extra=_unknown(data, known),
        )

    def timestamp(self) -> float | None:
        """``time`` as seconds since the Unix epoch (ISO strings without zone are taken as UTC)."""
        if self.time is None or isinstance(self.time, (int, float)):
            return None if self.time is None else float(self.time)
        parsed = _parse_iso(self.time)
        if parsed is None:
            return None
        if parsed.tzinfo is None:
            parsed = parsed.replace(tzinfo=timezone.utc)
        return parsed.timestamp()


@dataclass
class Manifest:
    """A run manifest (``RUN_DIR/manifest.json``, format ``checkpoints-manifest`` version 1).

    Attributes
    ----------
    run_name : str
        Human-readable name of the run.
    model : ModelSpec
        How to rebuild the network.
    dataset : DatasetSpec
        What it was trained on.
    training : dict
        Free-form training configuration (objective, lr, epochs, CTC parameters ...).
    seed : int or None
        Random seed of the run.
    created : str
        ISO-8601 creation time.
    checkpoints : list of CheckpointEntry
        Saved checkpoints, kept sorted by ``(epoch, step)``.
    extra : dict
        Unknown top-level keys found on read, written back unchanged.
    """

    run_name: str
    model: ModelSpec
    dataset: DatasetSpec
    training: dict[str, Any] = field(default_factory=dict)
    seed: int | None = None
    created: str = field(default_factory=utc_now_iso)
    checkpoints: list[CheckpointEntry] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    # ------------------------------------------------------------------ conversion
    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict in canonical key order (unknown keys from ``extra`` appended)."""
        checkpoints = self.checkpoints
        if isinstance(checkpoints, list):
            checkpoints = [_to_plain(c) for c in checkpoints]
        return _merge_extra({
            "format": FORMAT, "version": VERSION, "run_name": self.run_name,
            "created": self.created, "model": _to_plain(self.model),
            "dataset": _to_plain(self.dataset), "training": self.training, "seed": self.seed,
            "checkpoints": checkpoints,
        }, self.extra)

    @classmethod
    def from_dict(cls, data: Any, source: str = "<dict>", *, scan: bool = True) -> Manifest:
        """Validate a decoded manifest document; raises :class:`ManifestError` naming the field.

        ``scan=False`` skips the walk of :func:`check_json_data` (for text already checked
        by :func:`check_json_text`).

        Checks the format tag and version, every known field's type and range,
        that checkpoint paths are relative and stay inside the run directory,
        and that no epoch or path appears twice. Checkpoints come back sorted by
        ``(epoch, step)``; unknown keys are kept in ``extra``.
        """
        chk = _Checker(source)
        if not isinstance(data, Mapping):
            raise chk.fail("the top level", "a JSON object", data)
        data = chk.obj(data, "the top level")
        fmt = data.get("format")
        if fmt != FORMAT:
            raise ManifestError(source, f'format must be "{FORMAT}", got {_show(fmt)}; this is '
                                        "not a checkpoints manifest", "format")
        version = chk.required(data, "version", "")
        if isinstance(version, bool) or not isinstance(version, int) or version < 1:
            raise chk.fail("version", "a positive int", version)
        if version > VERSION:
            raise ManifestError(source, f"version {_show(version)} is newer than this reader "
                                        f"supports ({VERSION}); upgrade checkpoints_manifest",
                                "version")
        raw_ckpts = chk.required(data, "checkpoints", "")
        if not isinstance(raw_ckpts, list):
            raise chk.fail("checkpoints", "a JSON array", raw_ckpts)
        if len(raw_ckpts) > MAX_CHECKPOINTS:
            raise ManifestError(source, f"lists {len(raw_ckpts)} checkpoints, more than the "
                                        f"{MAX_CHECKPOINTS} one manifest may hold; split the run",
                                "checkpoints")
        if scan:
            check_json_data(data, source, "")
        entries = [CheckpointEntry.from_dict(item, source, f"checkpoints[{i}]")
                   for i, item in enumerate(raw_ckpts)]
        _check_unique(entries, source)
        known = {"format", "version", "run_name", "created", "model", "dataset", "training",
                 "seed", "checkpoints"}
        return cls(
            run_name=chk.text(chk.required(data, "run_name", ""), "run_name"),
            created=chk.iso_time(chk.required(data, "created", ""), "created"),
            model=ModelSpec.from_dict(chk.required(data, "model", ""), source),
            dataset=DatasetSpec.from_dict(chk.required(data, "dataset", ""), source),
            training=chk.obj(data.get("training", {}), "training"),
            seed=chk.optional_int(data.get("seed"), "seed"),
            checkpoints=sorted(entries, key=lambda c: (c.epoch, c.step)),
            extra=_unknown(data, known),
        )

    def to_json(self, source: str = "<manifest>") -> str:
        """Validated, indented JSON text (with trailing newline); raises :class:`ManifestError`."""
        data = self.to_dict()
        Manifest.from_dict(data, source)  # what we write must read back
        try:
            return json.dumps(_finite(data), indent=2, ensure_ascii=False,
                              allow_nan=False) + "\n"
        except (TypeError, ValueError) as exc:
            raise ManifestError(source, f"cannot be written as strict JSON ({exc}); keep "
                                        "training/kwargs/params values to str, int, float, "
                                        "bool, None, lists and dicts") from None
        except RecursionError:
            raise ManifestError(source, "cannot be written: a value is nested too deeply") from None

    def validated(self, source: str = "<manifest>") -> Manifest:
        """A normalised, validated copy (sorted checkpoints, lower-case digests)."""
        return Manifest.from_dict(json.loads(self.to_json(source)), source)

    # ------------------------------------------------------------------ queries / edits
    @property
    def epochs(self) -> list[int]:
        """Epochs with a checkpoint, ascending."""
        return sorted(c.epoch for c in self.checkpoints)

    def get(self, epoch: int) -> CheckpointEntry | None:
        """The entry for ``epoch``, or None."""
        return next((c for c in self.checkpoints if c.epoch == epoch), None)

    def add_checkpoint(self, entry: CheckpointEntry, *, replace: bool = False,
                       source: str = "<manifest>") -> None:
        """Insert ``entry`` in place (validated), keeping checkpoints sorted by ``(epoch, step)``.

        Raises
        ------
        ManifestError
            If the entry is invalid, its epoch is already recorded and ``replace``
            is False, or another epoch already uses its path.
        """
        entry = CheckpointEntry.from_dict(_to_plain(entry), source, "new checkpoint")
        kept = []
        for old in self.checkpoints:
            if old.epoch == entry.epoch:
                if not replace:
                    raise ManifestError(source, f"epoch {entry.epoch} is already recorded "
                                                f"({old.path}); pass replace=True to overwrite "
                                                "its entry", "checkpoints")
                continue
            if old.path == entry.path:
                raise ManifestError(source, f"path {entry.path!r} of the new epoch {entry.epoch} "
                                            f"is already used by epoch {old.epoch}; save each "
                                            "checkpoint to its own file", "checkpoints")
            kept.append(old)
        kept.append(entry)
        self.checkpoints = sorted(kept, key=lambda c: (c.epoch, c.step))


def _check_unique(entries: list[CheckpointEntry], source: str) -> None:
    seen_epoch: dict[int, int] = {}
    seen_path: dict[str, int] = {}
    for i, entry in enumerate(entries):
        if entry.epoch in seen_epoch:
            raise ManifestError(source, f"checkpoints[{i}].epoch {entry.epoch} duplicates "
                                        f"checkpoints[{seen_epoch[entry.epoch]}]; each epoch may "
                                        "appear once", f"checkpoints[{i}].epoch")
        if entry.path in seen_path:
            raise ManifestError(source, f"checkpoints[{i}].path {entry.path!r} duplicates "
                                        f"checkpoints[{seen_path[entry.path]}]; each checkpoint "
                                        "needs its own file", f"checkpoints[{i}].path")
        seen_epoch[entry.epoch] = i
        seen_path[entry.path] = i


def create_manifest(*, run_name: str, model: ModelSpec | Mapping[str, Any],
                    dataset: DatasetSpec | Mapping[str, Any] | str,
                    training: Mapping[str, Any] | None = None, seed: int | None = None,
                    created: str | None = None, **extra: Any) -> Manifest:
    """Build and validate a new manifest with no checkpoints (write it with ``write_manifest``).

    Parameters
    ----------
    run_name : str
        Name of the run.
    model : ModelSpec or mapping
        Architecture, ``num_classes``, builder ``kwargs`` and ``penultimate`` head name.
    dataset : DatasetSpec, mapping or str
        Source dataset (a bare string is the dataset name with no parameters).
    training : mapping, optional
        Free-form training configuration (objective, lr, epochs, CTC parameters ...).
    seed : int, optional
        Random seed of the run.
    created : str, optional
        ISO-8601 creation time; defaults to now (UTC).
    **extra
        Additional top-level keys, stored as they are.

    Returns
    -------
    Manifest
        Validated manifest.

    Raises
    ------
    ManifestError
        If a field is missing or ill-typed.
    """
    source = "<new manifest>"
    if isinstance(model, Mapping):
        model = ModelSpec.from_dict(model, source)
    if isinstance(dataset, str):
        dataset = DatasetSpec(name=dataset)
    elif isinstance(dataset, Mapping):
        dataset = DatasetSpec.from_dict(dataset, source)
    manifest = Manifest(run_name=run_name, model=model, dataset=dataset,
                        training=dict(training or {}), seed=seed,
                        created=created or utc_now_iso(), extra=dict(extra))
    return manifest.validated(source)
