"""Safe loading of checkpoint series: state-dict unwrapping, model loading, file-name inference.

dtprobe follows a network through its training run (the discriminability-
transferability trade-off of Kornblith et al. 2021 and Cui et al. 2022), so it
loads many checkpoint files, often written by someone else's code. This module
is the single place where that happens, and it never executes code from a file:

* ``.safetensors`` files are read with :mod:`safetensors`;
* everything else goes through ``torch.load(path, map_location="cpu",
  weights_only=True)``, whose restricted unpickler builds only tensors and plain
  containers. A few data-only classes common in research checkpoints are also
  accepted (``argparse.Namespace`` for saved command-line options, NumPy scalars,
  arrays and dtypes, ``pathlib`` paths): constructing them runs no user code.
  Anything else is refused with :class:`~dtprobe.errors.CheckpointError`.

Checkpoints saved as ``{"model": state_dict, "epoch": e, ...}`` (or under
``state_dict``, ``net``, ``model_state_dict``, ``module``), with DDP
``module.``, ``torch.compile`` ``_orig_mod.`` or Lightning ``model.`` key prefixes, load like
plain state dicts. Where the model is known, :func:`load_weights` searches the file for the
weights that fit it exactly (:mod:`dtprobe.checkpoints.state_dict`: any nesting key or wrapper
prefix,
EMA or raw weights). Runs without a manifest are found by their framework's layout and file
names (:func:`infer_checkpoint_series`, :mod:`dtprobe.checkpoints.layouts`).

Files whose pickle references classes (e.g. Lightning ``hyper_parameters`` holding modules)
are refused; ``trust_pickles=True`` (``--trust-pickles``) is the explicit opt-in that unpickles
such a file in full, for files the user trusts. It is never the default.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import hashlib
import io
import json
import os
import pathlib
import re
import stat
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import torch
from torch import Tensor

import checkpoints_manifest
from dtprobe.checkpoints.state_dict import BOOKKEEPING_KEYS, tensor_dicts
from dtprobe.errors import CheckpointError, UnsafeCheckpointError, first_line
from dtprobe.references import with_references

__doc__ = with_references(__doc__, "kornblith2021", "cui2022")

__all__ = [
    "PREFIXES",
    "WRAPPER_KEYS",
    "LoadedCheckpoint",
    "ALLOWED_DTYPES",
    "CheckpointBytes",
    "check_finite",
    "check_tensors",
    "load_checkpoint",
    "load_state_dict",
    "read_checkpoint_bytes",
    "read_checkpoint_meta",
    "resolve_inside",
    "safe_torch_load",
    "split_safetensors",
    "verify_sha256",
]

#: Keys under which training scripts nest the model's state dict, tried in this order.
WRAPPER_KEYS: tuple[str, ...] = ("model", "state_dict", "net", "model_state_dict", "module")
#: Key prefixes stripped when *every* key carries them (DDP, Lightning, torch.compile), without a
#: model to fit; :func:`load_weights` searches every prefix (:mod:`dtprobe.checkpoints.state_dict`).
PREFIXES: tuple[str, ...] = ("module.", "model.", "_orig_mod.")

_FIX = "re-save it with torch.save(model.state_dict(), path) (or as .safetensors)"
_TRUST = "or, if you trust this file and the code it names, pass --trust-pickles"
_UNSAFE_MARKERS = ("Unsupported global", "Can only create new object", "unrecognized function",
                   "Can only build", "Unsupported operand", "Can only append", "Can only extend",
                   "Can only set items", "not an allowed global",
                   "unsupported GLOBAL")


# ----------------------------------------------------------------------------------- safety
def resolve_inside(run_dir: str | os.PathLike[str], relpath: str | os.PathLike[str], *,
                   allow_symlinks: bool = False) -> Path:
    """``run_dir / relpath``, refusing paths that escape the run directory.

    Parameters
    ----------
    run_dir : path-like
        The run directory.
    relpath : path-like
        A path relative to it (e.g. from a manifest). Absolute paths and ``..``
        components are refused.
    allow_symlinks : bool, default False
        If False, the path is also refused when symbolic links make it resolve
        to a location outside ``run_dir``. If True, only the lexical checks apply
        (for runs whose checkpoints are symlinked from scratch storage).

    Returns
    -------
    Path
        ``run_dir / relpath`` (not resolved; the file need not exist).

    Raises
    ------
    CheckpointError
        If the path is empty, absolute, contains ``..`` or resolves outside ``run_dir``.
    """
    text = os.fspath(relpath)
    if not text or "\x00" in text:
        raise CheckpointError(f"{run_dir}: checkpoint path {text!r} is empty or contains NUL; "
                              "fix the manifest entry")
    rel = Path(text)
    if rel.is_absolute() or rel.anchor or PurePosixPath(text).is_absolute():
        raise CheckpointError(f"{run_dir}: checkpoint path {text!r} is absolute; paths must be "
                              "relative to the run directory (fix the manifest entry)")
    if ".." in rel.parts or ".." in PurePosixPath(text).parts:
        raise CheckpointError(f"{run_dir}: checkpoint path {text!r} contains '..'; paths must "
                              "stay inside the run directory (fix the manifest entry)")
    target = Path(run_dir) / rel
    if not allow_symlinks:
        try:
            base = Path(run_dir).resolve()
            real = target.resolve()
        except (OSError, RuntimeError) as exc:  # RuntimeError: symlink loop (Python < 3.13)
            raise CheckpointError(f"{target}: cannot resolve the path ({exc}); remove the "
                                  "broken symbolic link") from None
        if real != base and base not in real.parents:
            raise CheckpointError(f"{target}: resolves to {real}, outside the run directory "
                                  f"{base} (symbolic link?); copy the file into the run "
                                  "directory or allow symlinks explicitly")
    return target


def verify_sha256(path: str | os.PathLike[str], expected: str) -> None:
    """Check that ``path`` has the sha256 digest ``expected`` (hex, any case).

    Raises
    ------
    CheckpointError
        If the file is missing, unreadable or its digest differs.
    """
    try:
        actual = checkpoints_manifest.sha256_file(path)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: checkpoint file is missing; restore it or remove its "
                              "manifest entry") from None
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read it ({exc.strerror or exc}); check that the "
                              "file is readable") from None
    if actual != expected.lower():
        raise CheckpointError(f"{path}: sha256 {actual[:12]}... does not match the manifest "
                              f"({expected.lower()[:12]}...); the file changed after it was "
                              "recorded or is corrupt: restore it or re-record its entry")


# ----------------------------------------------------------------------------------- loading
@dataclass
class LoadedCheckpoint:
    """A checkpoint file read safely.

    Attributes
    ----------
    state_dict : dict of str to Tensor
        The model weights, unwrapped and with DDP/Lightning prefixes stripped.
    meta : dict
        Plain-data items stored beside the weights (``epoch``, ``step``,
        ``best_acc``, saved options ...), converted to JSON-like Python values.
    unwrapped : tuple of str
        The wrapper keys descended through (e.g. ``("model",)``).
    stripped : tuple of str
        The key prefixes removed (e.g. ``("module.",)``).
    source : object
        Everything the file holds (the ``torch.load`` result, or the safetensors tensors), for
        :func:`load_weights` to search.
    trusted : bool
        Whether it was unpickled in full with ``trust_pickles=True``.
    """

    state_dict: dict[str, Tensor]
    meta: dict[str, Any]
    unwrapped: tuple[str, ...] = ()
    stripped: tuple[str, ...] = ()
    source: Any = None
    trusted: bool = False


def _data_only_globals() -> list[Any]:
    """Classes and functions that only rebuild data, accepted in addition to torch's defaults."""
    allowed: list[Any] = [argparse.Namespace, pathlib.PosixPath, pathlib.PurePosixPath,
                          pathlib.PureWindowsPath]
    try:
        import numpy as np
    except ImportError:  # pragma: no cover - numpy is a dependency of torch's users
        return allowed
    scalar = np.float64(0).__reduce__()[0]
    reconstruct = np.arange(1).__reduce__()[0]
    for module in ("numpy.core.multiarray", "numpy._core.multiarray"):
        allowed += [(scalar, f"{module}.scalar"), (reconstruct, f"{module}._reconstruct")]
    allowed += [np.ndarray, np.dtype]
    for code in np.typecodes["All"]:
        if code not in "OV":
            allowed.append(type(np.dtype(code)))
    return allowed


@contextlib.contextmanager
def allow_data_only_globals() -> Iterator[None]:
    """Context in which ``torch.load(weights_only=True)`` also builds the data-only classes."""
    safe_globals = getattr(torch.serialization, "safe_globals", None)
    if safe_globals is None:  # torch < 2.5: only torch's own allowlist
        yield
        return
    with safe_globals(_data_only_globals()):
        yield


#: A checkpoint file larger than this is refused unread (it is read into memory once, so that
#: the bytes hashed are the bytes loaded); override with ``DTPROBE_MAX_CHECKPOINT_BYTES``.
MAX_CHECKPOINT_BYTES = int(os.environ.get("DTPROBE_MAX_CHECKPOINT_BYTES", 32 << 30))
#: Most elements one tensor may claim (2**33 float32 values are 32 GiB).
MAX_TENSOR_ELEMENTS = 1 << 33
#: Tensor dtypes accepted as weights; float8, complex, quantized and other exotic types are refused.
ALLOWED_DTYPES = frozenset({torch.float16, torch.bfloat16, torch.float32, torch.float64,
                            torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64,
                            torch.bool})


@dataclass(frozen=True)
class CheckpointBytes:
    """The content of a checkpoint file, read once, and the sha256 of exactly these bytes.

    Everything dtprobe derives from a checkpoint (weights, cached features, cache keys) comes
    from ``data``, so a file swapped after it was read cannot be analysed under the digest of
    the bytes that were verified.
    """

    path: Path
    data: bytes
    sha256: str


def _inside(real: str, base: str) -> bool:
    return real == base or real.startswith(base.rstrip(os.sep) + os.sep)


def _opened_path(fd: int) -> str | None:
    """The real path of an open file descriptor (Linux ``/proc``), or None where unknown."""
    try:
        return os.path.realpath(os.readlink(f"/proc/self/fd/{fd}"))
    except OSError:
        return None


#: Who recorded the digest a ``--trust-pickles`` file must still have when it is loaded.
PLANNED_DIGEST = "the bytes read while planning (--trust-pickles)"


def read_checkpoint_bytes(path: str | os.PathLike[str], *, expected_sha256: str | None = None,
                          run_dir: str | os.PathLike[str] | None = None,
                          allow_symlinks: bool = False,
                          limit: int | None = None,
                          recorded_by: str = "the manifest") -> CheckpointBytes:
    """Read a checkpoint file once into memory and hash those bytes.

    Parameters
    ----------
    path : path-like
        The checkpoint file.
    expected_sha256 : str, optional
        Digest the manifest recorded; the bytes read must have it.
    run_dir : path-like, optional
        The run directory. Unless ``allow_symlinks``, the file actually opened must lie inside
        it: this is checked on the open file itself (``/proc/self/fd`` on Linux, the resolved
        path just after opening elsewhere), so a link swapped in after planning is caught.
    allow_symlinks : bool, default False
        Accept a file reached through symbolic links that lead out of ``run_dir``.
    limit : int, optional
        Largest size read (default :data:`MAX_CHECKPOINT_BYTES`).
    recorded_by : str
        Who recorded ``expected_sha256``, for the mismatch message.

    Returns
    -------
    CheckpointBytes

    Raises
    ------
    CheckpointError
        Missing, not a regular file (directory, FIFO, device), a symbolic-link loop, outside
        the run directory, larger than ``limit``, unreadable, or a digest mismatch.
    """
    path = Path(path)
    limit = MAX_CHECKPOINT_BYTES if limit is None else limit
    check_inside = run_dir is not None and not allow_symlinks
    try:
        fd = _open_checkpoint(path)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: checkpoint file is missing; restore it or remove it "
                              "from the series (or its manifest entry)") from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise CheckpointError(f"{path}: is a symbolic link loop; remove or fix the broken "
                                  "link") from None
        raise _unreadable(path, exc) from None
    try:
        if check_inside:
            # The file actually opened (so a link swapped in after any earlier check is seen);
            # where /proc is unavailable, the path resolved just after opening.
            real = _opened_path(fd) or os.path.realpath(path)
            base = os.path.realpath(run_dir)
            if not _inside(real, base):
                raise CheckpointError(f"{path}: resolves to {real}, outside the run directory "
                                      f"{base} (symbolic link?); copy the file into the run "
                                      "directory or allow symlinks explicitly")
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            raise CheckpointError(f"{path}: is not a file but a directory; point to the "
                                  "checkpoint file itself (fix the checkpoint path)")
        if not stat.S_ISREG(st.st_mode):
            raise CheckpointError(f"{path}: is not a regular file (FIFO, device or socket); "
                                  "point to the checkpoint file itself")
        if st.st_size > limit:
            raise CheckpointError(f"{path}: is {st.st_size / 2**30:.1f} GiB, larger than the "
                                  f"{limit / 2**30:.1f} GiB limit; raise "
                                  "DTPROBE_MAX_CHECKPOINT_BYTES if it is genuine")
        data = _read_all(fd, path, limit)
    finally:
        os.close(fd)
    digest = hashlib.sha256(data).hexdigest()
    if expected_sha256 is not None and digest != expected_sha256.lower():
        raise CheckpointError(f"{path}: sha256 {digest[:12]}... does not match {recorded_by} "
                              f"({expected_sha256.lower()[:12]}...); the file changed after it "
                              "was recorded or is corrupt: restore it or re-record its entry")
    return CheckpointBytes(path, data, digest)


def _open_checkpoint(path: Path) -> int:
    # Non-blocking, so that a FIFO planted at a checkpoint's name cannot hang the analysis.
    return os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))


def _read_all(fd: int, path: Path, limit: int) -> bytes:
    chunks: list[bytes] = []
    total = 0
    try:
        while chunk := os.read(fd, min(64 << 20, limit + 1 - total)):
            chunks.append(chunk)
            total += len(chunk)
            if total > limit:
                raise CheckpointError(f"{path}: grew past the {limit / 2**30:.1f} GiB limit "
                                      "while being read; wait until its writer is done")
    except MemoryError:
        raise _out_of_memory(path, total) from None
    except OSError as exc:
        raise _unreadable(path, exc) from None
    return b"".join(chunks)


def _pickle_globals(data: bytes) -> list[str] | None:
    """Globals a raw pickle references (``module.name``), or None if ``data`` is no pickle.

    A static scan of the opcodes (:mod:`pickletools`, nothing is executed); it tells a crafted
    pickle of any protocol (0 included, which has no marker byte) from random bytes.
    """
    import pickletools

    found: list[str] = []
    strings: list[str] = []
    try:
        for opcode, arg, _ in pickletools.genops(data):
            if opcode.name in ("GLOBAL", "INST"):
                found.append(str(arg).replace(" ", "."))
            elif opcode.name == "STACK_GLOBAL" and len(strings) >= 2:
                found.append(f"{strings[-2]}.{strings[-1]}")
            elif isinstance(arg, str):
                strings.append(arg)
            if opcode.name == "STOP":
                return found
    except Exception:  # noqa: BLE001 - any parse failure means: not a (complete) pickle
        return found if found else None
    return found if found else None


_TORCH_GLOBALS = ("torch.", "collections.OrderedDict", "builtins.set", "builtins.frozenset",
                  "builtins.bytearray", "_codecs.encode")


def _unsafe_globals(data: bytes) -> list[str]:
    return [g for g in (_pickle_globals(data) or []) if not g.startswith(_TORCH_GLOBALS)]


def _refused(path: Path, detail: str) -> CheckpointError:
    return UnsafeCheckpointError(f"{path}: refusing to unpickle it{detail}: not a plain weights "
                                 f"file, so loading it could run arbitrary code; {_FIX}, "
                                 f"{_TRUST}")


def _refusal(path: Path, exc: BaseException, data: bytes) -> CheckpointError | None:
    """A one-line refusal if ``exc`` is torch's weights-only unpickler rejecting content."""
    text = str(exc)
    unsafe = _unsafe_globals(data) if data[:2] != b"PK" else []
    if unsafe:
        return _refused(path, f" (it references {unsafe[0]})")
    if not any(marker in text for marker in _UNSAFE_MARKERS):
        return None
    detail = ""
    match = re.search(r"GLOBAL (\S+) was not an allowed global|unsupported GLOBAL (\S+)", text)
    if match:
        detail = f" (it references {match.group(1) or match.group(2)})"
    elif data[:2] != b"PK" and _pickle_globals(data) is None:
        return None  # random bytes read as pickle opcodes: corrupt, not crafted
    elif (match := re.search(r"Unsupported operand (\d+)", text)) is not None:
        detail = f" (pickle opcode {match.group(1)} is not allowed)"
    elif (match := re.search(r"(?:unrecognized function|but got) (.+?)(?: which|$)", text,
                             re.MULTILINE)) is not None:
        detail = f" (it needs {match.group(1).strip()})"
    return _refused(path, detail)


def _corrupt(path: Path, exc: BaseException) -> CheckpointError:
    text = str(exc)
    if "WeightsUnpickler error:" in text:  # skip torch's generic preamble
        text = text.split("WeightsUnpickler error:", 1)[1]
    reason = first_line(text, 200)
    reason = reason.split(". ", 1)[0]  # torch appends paragraphs of advice after the cause
    what = f"{type(exc).__name__}: {reason}" if reason else f"it ends early, {type(exc).__name__}"
    return CheckpointError(f"{path}: cannot read the checkpoint (truncated or corrupt file? "
                           f"{what}); copy it again or {_FIX}")


def _unreadable(path: Path, exc: OSError) -> CheckpointError:
    return CheckpointError(f"{path}: cannot read it ({exc.strerror or exc}); check that the file "
                           "exists and is readable")


def _out_of_memory(path: Path, size: int | None = None) -> CheckpointError:
    if size is None:
        try:
            size = path.stat().st_size
        except OSError:
            size = None
    shown = "unknown size" if size is None else f"{size / 2**20:.1f} MiB"
    return CheckpointError(f"{path}: ran out of memory reading it ({shown} file); it is corrupt "
                           "(sizes in it are wrong) or larger than the available memory")


def _unknown_format(path: Path, data: bytes) -> CheckpointError | None:
    """A clear message for content that is no checkpoint at all, or None if it may be one."""
    if not data:
        return CheckpointError(f"{path}: cannot read the checkpoint (truncated or corrupt file? "
                               f"it is empty, 0 bytes); copy it again or {_FIX}")
    if data[:6] == b"\x93NUMPY":
        header = data[:4096]
        if re.search(rb"'descr':\s*'\|O'", header) or b"'descr': [" in header:
            return _refused(path, " (a NumPy .npy file of Python objects, stored as a pickle)")
        return CheckpointError(f"{path}: is a NumPy .npy array, not a checkpoint; {_FIX}")
    if data[:2] == b"PK" or _pickle_globals(data) is not None or data[:1] == b"\x80":
        return None
    head = data[:8].hex(" ")
    return CheckpointError(f"{path}: cannot read the checkpoint: not a torch.save, safetensors "
                           f"or pickle file (it starts with bytes {head}); copy it again or "
                           f"{_FIX}")


def torch_load_bytes(data: bytes, path: Path) -> Any:
    """``torch.load(..., weights_only=True)`` of the bytes already read (never the path again)."""
    unknown = _unknown_format(path, data)
    if unknown is not None:
        raise unknown
    try:
        with allow_data_only_globals(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. "Detected pickle protocol 4 ..."
            return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except MemoryError:
        raise _out_of_memory(path, len(data)) from None
    except Exception as exc:  # any failure to parse a user's file is a user-facing error
        refusal = _refusal(path, exc, data)
        raise (refusal or _corrupt(path, exc)) from None


def safe_torch_load(path: str | os.PathLike[str]) -> Any:
    """Read a ``torch.save`` file once and ``torch.load`` it with ``weights_only=True``.

    For files dtprobe wrote itself that hold more than weights (the trainer's resume state);
    every failure is one :class:`CheckpointError` line (unsafe content refused, truncated or
    corrupt file, missing).
    """
    blob = read_checkpoint_bytes(path)
    return torch_load_bytes(blob.data, blob.path)


def _is_safetensors(data: bytes, path: Path) -> bool:
    """Whether the content is safetensors: an 8-byte little-endian header length, then a JSON
    object of that length. ``torch.save`` files start with a zip (``PK``) or pickle marker."""
    if len(data) >= 9 and data[8:9] == b"{":
        size = int.from_bytes(data[:8], "little")
        if 2 <= size <= len(data) - 8:
            try:
                return isinstance(json.loads(data[8:8 + size]), dict)
            except (ValueError, RecursionError):
                pass
    if data[:2] == b"PK" or data[:1] == b"\x80":
        return False
    return path.suffix == ".safetensors" and bool(data)  # let safetensors say what is wrong


def split_safetensors(data: bytes) -> tuple[dict[str, Any], memoryview]:
    """Header and tensor bytes of safetensors content: the one reader of the format's header.

    The format is an 8-byte little-endian header length, that many bytes of JSON (an object:
    tensor name -> dtype, shape and offsets, plus an optional ``__metadata__`` of strings), then
    the tensor bytes. Used for checkpoints, the feature cache and checkpoint peeking.

    Parameters
    ----------
    data : bytes
        The content, or (to read the header alone) its first ``8 + header length`` bytes.

    Returns
    -------
    header : dict
    body : memoryview
        The bytes after the header.

    Raises
    ------
    ValueError
        Truncated content, or a header that is not a JSON object.
    """
    size = int.from_bytes(data[:8], "little")
    if len(data) < 8 or size > len(data) - 8:
        raise ValueError(f"header of {size} bytes in a file of {len(data)} bytes")
    header = json.loads(data[8:8 + size])
    if not isinstance(header, dict):
        raise ValueError("the header is not a JSON object")
    return header, memoryview(data)[8 + size:]


def _safetensors_header(data: bytes) -> dict[str, Any]:
    header, _ = split_safetensors(data)
    meta = header.get("__metadata__") or {}
    if not isinstance(meta, dict):
        raise ValueError("__metadata__ is not a JSON object")
    return meta


def _safetensors_load(data: bytes, path: Path) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Tensors and header metadata of safetensors content (the bytes already read).

    Metadata values are strings in the format; they are kept as inert data (numbers parsed,
    nothing else interpreted)."""
    from safetensors.torch import load as load_safetensors

    try:
        header = _safetensors_header(data)
        tensors: dict[str, Tensor] = dict(load_safetensors(data))
    except MemoryError:
        raise _out_of_memory(path, len(data)) from None
    except Exception as exc:
        raise _corrupt(path, exc) from None
    meta: dict[str, Any] = {}
    for key, value in header.items():
        try:
            parsed = json.loads(value)
        except (TypeError, ValueError, RecursionError):
            parsed = value
        meta[str(key)] = parsed if isinstance(parsed, (int, float, bool)) else value
    return tensors, meta


def check_tensors(state_dict: Mapping[str, Tensor], path: str | os.PathLike[str]) -> None:
    """Refuse tensors that are not plain, self-consistent weights, before anything uses them.

    Checked: a strided (dense) layout, not quantized, on the CPU (not the ``meta`` device, which
    holds no data), a dtype in :data:`ALLOWED_DTYPES` (float8, complex, quantized types are
    refused), at most :data:`MAX_TENSOR_ELEMENTS` elements, and a storage large enough for the
    shape, strides and offset (a stride-0 view may not claim billions of elements it does not
    store).

    Raises
    ------
    CheckpointError
        Naming the file, the tensor and what is wrong with it.
    """
    for key, value in state_dict.items():
        problem = _tensor_problem(value)
        if problem is not None:
            raise CheckpointError(f"{path}: tensor {key!r} {problem}; re-save the model as "
                                  "plain dense float weights with torch.save(model.state_dict(), "
                                  "path) (or as .safetensors)")


def _tensor_problem(t: Tensor) -> str | None:
    if t.is_quantized:
        return f"is quantized ({str(t.dtype).replace('torch.', '')}), dequantize it first"
    if t.layout != torch.strided:
        return f"has the {str(t.layout).replace('torch.', '')} layout, not a dense tensor"
    if t.device.type == "meta":
        return "is on the meta device and holds no data"
    if t.device.type != "cpu":
        return f"is on {t.device}, not the CPU"
    if t.dtype not in ALLOWED_DTYPES:
        return f"has dtype {str(t.dtype).replace('torch.', '')}, which cannot be analysed"
    numel = 1
    for size in t.shape:
        numel *= int(size)
    if numel > MAX_TENSOR_ELEMENTS:
        return f"claims {numel:.3g} elements, more than any weight tensor"
    if numel == 0:
        return None
    needed = t.storage_offset() + 1 + sum((int(n) - 1) * int(st)
                                          for n, st in zip(t.shape, t.stride(), strict=True))
    stored = t.untyped_storage().nbytes() // t.element_size()
    if any(int(st) < 0 for st in t.stride()) or needed > stored:
        return (f"has shape {tuple(t.shape)} and strides {tuple(t.stride())} that need "
                f"{needed} elements but its storage holds {stored}")
    if numel > max(stored, 1) * 16 and numel > 1 << 24:
        return (f"claims {numel:.3g} elements but stores only {stored} (a stride-0 view); "
                "save a contiguous tensor")
    return None


_SKIP = object()


def _plain(value: Any, depth: int = 0) -> Any:
    """JSON-like copy of a small metadata value, or ``_SKIP`` for weights, optimiser states etc."""
    if type(value).__module__ == "numpy" and getattr(value, "ndim", 1) == 0:
        return value.item()  # NumPy scalar (np.float64 would otherwise pass as a float)
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, Tensor):
        return value.item() if value.dim() == 0 else _SKIP
    if isinstance(value, pathlib.PurePath):
        return str(value)
    if depth >= 3:
        return _SKIP
    if isinstance(value, argparse.Namespace):
        value = vars(value)
    if isinstance(value, Mapping):
        out = {}
        for key, item in value.items():
            plain = _plain(item, depth + 1)
            if not isinstance(key, str) or plain is _SKIP:
                return _SKIP
            out[key] = plain
        return out
    if isinstance(value, (list, tuple)):
        items = [_plain(item, depth + 1) for item in value]
        return _SKIP if any(item is _SKIP for item in items) or len(items) > 64 else items
    return _SKIP


def _strip_prefixes(state: dict[str, Tensor]) -> tuple[dict[str, Tensor], tuple[str, ...]]:
    # Counters such as AveragedModel's ``n_averaged`` are not weights and carry no prefix.
    state = {k: v for k, v in state.items() if k.rsplit(".", 1)[-1] not in BOOKKEEPING_KEYS}
    stripped: list[str] = []
    changed = True
    while changed and state:
        changed = False
        for prefix in PREFIXES:
            if all(key.startswith(prefix) and len(key) > len(prefix) for key in state):
                state = {key[len(prefix):]: val for key, val in state.items()}
                stripped.append(prefix)
                changed = True
    return state, tuple(stripped)


def _unwrap(obj: Any, path: Path) -> tuple[dict[str, Tensor], dict[str, Any], tuple[str, ...]]:
    if isinstance(obj, Tensor) or not isinstance(obj, Mapping):
        raise CheckpointError(f"{path}: holds a {type(obj).__name__}, not a state dict; save "
                              "model.state_dict() (optionally inside a dict under 'model')")
    top = obj
    chain: list[str] = []
    current: Mapping[Any, Any] = obj
    while True:
        key = next((k for k in WRAPPER_KEYS if isinstance(current.get(k), Mapping)), None)
        if key is None:
            break
        chain.append(key)
        current = current[key]
    state = {k: v for k, v in current.items() if isinstance(k, str) and isinstance(v, Tensor)}
    if not state:
        # Weights under another key (e.g. only ``model_ema``): the first tensor mapping found
        # by the documented search of dtprobe.checkpoints.state_dict.
        found = tensor_dicts(top)
        if found:
            where, state = found[0]
            chain = list(where)
    if not state:
        keys = ", ".join(repr(k) for k in list(top)[:8]) or "none"
        raise CheckpointError(f"{path}: no weight tensors found (top-level keys: {keys}); expected "
                              "a state dict, or a dict holding one under "
                              f"{'/'.join(WRAPPER_KEYS)}; {_FIX}")
    meta: dict[str, Any] = {}
    for key, value in top.items():
        if not isinstance(key, str) or (chain and key == chain[0]):
            continue
        if not chain and isinstance(value, Tensor):
            continue  # a flat state dict: its tensors are weights, not metadata
        plain = _plain(value)
        if plain is not _SKIP:
            meta[key] = plain
    return state, meta, tuple(chain)


def _all_finite(tensor: Tensor) -> bool:
    # A NaN or Inf anywhere makes the sum non-finite, and a reduction is far cheaper than an
    # elementwise isfinite; a non-finite sum can also be an overflow, so confirm elementwise.
    with torch.no_grad():
        return bool(torch.isfinite(tensor.sum())) or bool(torch.isfinite(tensor).all())


def check_finite(state_dict: Mapping[str, Tensor], path: str | os.PathLike[str]) -> None:
    """Refuse weights containing NaN or Inf (a diverged run).

    Raises
    ------
    CheckpointError
        Naming the file, the first bad tensor and how many are affected.
    """
    bad = [key for key, val in state_dict.items()
           if (val.is_floating_point() or val.is_complex()) and val.numel()
           and not _all_finite(val)]
    if bad:
        more = f" and {len(bad) - 1} more tensors" if len(bad) > 1 else ""
        raise CheckpointError(f"{path}: weights {bad[0]!r}{more} contain NaN/Inf (diverged "
                              "run?); drop this checkpoint from the series or retrain")


def trusted_torch_load_bytes(data: bytes, path: Path) -> Any:
    """Full unpickling, only for ``trust_pickles=True``: the file's classes are imported and run."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.load(io.BytesIO(data), map_location="cpu", weights_only=False)
    except (ImportError, AttributeError) as exc:
        raise CheckpointError(f"{path}: --trust-pickles: the file needs code that cannot be "
                              f"imported ({first_line(str(exc))}); run from the folder of the "
                              "training code or add it to PYTHONPATH") from None
    except Exception as exc:  # noqa: BLE001 - any failure of the user's pickle is theirs
        raise _corrupt(path, exc) from None


def load_checkpoint(path: str | os.PathLike[str], *, finite: bool = True,
                    data: CheckpointBytes | None = None,
                    trust_pickles: bool = False) -> LoadedCheckpoint:
    """Read a checkpoint file safely: weights plus plain-data metadata.

    Parameters
    ----------
    path : path-like
        A safetensors file (read with safetensors) or any ``torch.save`` file
        (read with ``torch.load(..., weights_only=True)`` only). The content
        decides, not the suffix: a ``.ckpt`` holding safetensors loads too.
    finite : bool, default True
        Refuse weights that contain NaN/Inf.
    data : CheckpointBytes, optional
        The file's content as already read (and verified) by :func:`read_checkpoint_bytes`;
        the tensors are then built from exactly these bytes and the file is not read again.
    trust_pickles : bool, default False
        Opt-in for a file the safe unpickler refuses (it references classes, e.g. Lightning
        ``hyper_parameters`` holding modules): unpickle it in full, which runs code named in
        the file. Only for files the user trusts; files the safe loader accepts are loaded
        safely either way.

    Returns
    -------
    LoadedCheckpoint
        The unwrapped, prefix-stripped state dict (tensors only) and metadata.

    Raises
    ------
    CheckpointError
        If the file is missing, unsafe to unpickle, truncated/corrupt, holds no
        tensors or malformed ones (:func:`check_tensors`), or (with ``finite``)
        contains NaN/Inf.
    """
    path = Path(path)
    blob = data if data is not None else read_checkpoint_bytes(path)
    # The content decides, not the name: a ``.ckpt`` may hold safetensors and vice versa.
    if _is_safetensors(blob.data, path):
        state, meta = _safetensors_load(blob.data, path)
        if not state:
            raise CheckpointError(f"{path}: holds no tensors; {_FIX}")
        chain: tuple[str, ...] = ()
        source: Any = state
        trusted = False
    else:
        trusted = False
        try:
            source = torch_load_bytes(blob.data, path)
        except UnsafeCheckpointError:
            if not trust_pickles:
                raise
            source, trusted = trusted_torch_load_bytes(blob.data, path), True  # explicit opt-in
        state, meta, chain = _unwrap(source, path)
    check_tensors(state, path)
    state, stripped = _strip_prefixes(state)
    if finite:
        check_finite(state, path)
    return LoadedCheckpoint(state, meta, chain, stripped, source, trusted)


def load_state_dict(path: str | os.PathLike[str], *, finite: bool = True,
                    data: CheckpointBytes | None = None) -> dict[str, Tensor]:
    """The model weights of a checkpoint file, read safely (see :func:`load_checkpoint`).

    Parameters
    ----------
    path : path-like
        Checkpoint file (``.safetensors`` or a ``torch.save`` file).
    finite : bool, default True
        Refuse weights that contain NaN/Inf.

    Returns
    -------
    dict of str to Tensor
        CPU tensors, unwrapped from ``model``/``state_dict``/``net``/
        ``model_state_dict``/``module`` and stripped of ``module.``/``model.``
        prefixes shared by every key; non-tensor entries dropped.

    Raises
    ------
    CheckpointError
        Unsafe pickle, truncated or corrupt file, no tensors, NaN/Inf weights.
    """
    return load_checkpoint(path, finite=finite, data=data).state_dict


def read_checkpoint_meta(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Plain-data items saved beside the weights (e.g. ``epoch``, ``step``, ``best_acc``, ``opt``).

    For ``torch.save`` files these are the top-level non-weight entries
    (scalar tensors and NumPy scalars become Python numbers, ``argparse``
    namespaces become dicts; optimiser states and other large values are
    left out). For ``.safetensors`` files they are the header metadata, with
    numeric strings converted to numbers.

    Raises
    ------
    CheckpointError
        As :func:`load_checkpoint` (NaN/Inf weights are not checked here).
    """
    return load_checkpoint(path, finite=False).meta
