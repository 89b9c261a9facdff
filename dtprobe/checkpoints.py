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
weights that fit it exactly (:mod:`dtprobe.state_dict`: any nesting key or wrapper prefix,
EMA or raw weights). Runs without a manifest are found by their framework's layout and file
names (:func:`infer_checkpoint_series`, :mod:`dtprobe.layouts`).

Files whose pickle references classes (e.g. Lightning ``hyper_parameters`` holding modules)
are refused; ``trust_pickles=True`` (``--trust-pickles``) is the explicit opt-in that unpickles
such a file in full, for files the user trusts. It is never the default.

References
----------
.. [1] S. Kornblith, T. Chen, H. Lee, M. Norouzi, "Why do better loss functions
   lead to less transferable features?", NeurIPS 2021.
.. [2] Q. Cui, B. Zhao, Z.-M. Chen, B. Zhang, Y. Gao, "Discriminability-
   transferability trade-off: an information-theoretic perspective", ECCV 2022.
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
from torch import Tensor, nn

import checkpoints_manifest
from dtprobe import layouts
from dtprobe.errors import CheckpointError, ConfigError, UnsafeCheckpointError

__all__ = [
    "KNOWN_NAMINGS",
    "PREFIXES",
    "TEMP_SUFFIXES",
    "WRAPPER_KEYS",
    "CheckpointSeries",
    "InferredCheckpoint",
    "LoadedCheckpoint",
    "ALLOWED_DTYPES",
    "CheckpointBytes",
    "check_finite",
    "check_tensors",
    "infer_checkpoint_series",
    "is_temporary_name",
    "load_checkpoint",
    "load_into_model",
    "load_weights",
    "load_state_dict",
    "read_checkpoint_bytes",
    "read_checkpoint_meta",
    "resolve_inside",
    "safe_torch_load",
    "verify_sha256",
]

#: Keys under which training scripts nest the model's state dict, tried in this order.
WRAPPER_KEYS: tuple[str, ...] = ("model", "state_dict", "net", "model_state_dict", "module")
#: Key prefixes stripped when *every* key carries them (DDP, Lightning, torch.compile), without a
#: model to fit; :func:`load_weights` searches every prefix (:mod:`dtprobe.state_dict`).
PREFIXES: tuple[str, ...] = ("module.", "model.", "_orig_mod.")

#: File-name schemes recognised by :func:`infer_checkpoint_series` (``{epoch}``/``{step}`` are
#: decimal numbers, ``*`` any characters except ``/``).
KNOWN_NAMINGS: tuple[str, ...] = (
    "ckpt_epoch_{epoch}.pth",                  # CTC / CRD / SupCon research code
    "epoch={epoch}-step={step}.ckpt",          # PyTorch Lightning ModelCheckpoint
    "epoch={epoch}-step={step}-v*.ckpt",       # Lightning's de-duplicated names
    "checkpoint_{epoch}.pt",
    "checkpoint-{epoch}.pth.tar",
    "model_{epoch}.pth",
    "epoch_{epoch}.pt",                        # dtprobe's own trainer
    "ckpt_epoch_{epoch}.safetensors",
    "epoch={epoch}-step={step}.safetensors",
    "checkpoint_{epoch}.safetensors",
    "checkpoint-{epoch}.safetensors",
    "model_{epoch}.safetensors",
    "epoch_{epoch}.safetensors",
)
_CHECKPOINT_SUFFIXES = (".pt", ".pth", ".ckpt", ".tar", ".bin", ".safetensors", ".pkl", ".pickle")
_SUBDIR = "checkpoints"
#: File-name endings of partial or temporary files (an interrupted writer's leftovers).
TEMP_SUFFIXES: tuple[str, ...] = (".tmp", ".temp", ".part", ".partial", ".incomplete", ".swp",
                                  "~")
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
def _allow_data_only_globals() -> Iterator[None]:
    safe_globals = getattr(torch.serialization, "safe_globals", None)
    if safe_globals is None:  # torch < 2.5: only torch's own allowlist
        yield
        return
    with safe_globals(_data_only_globals()):
        yield


def _first_line(text: str, limit: int = 160) -> str:
    line = next((ln.strip() for ln in text.splitlines() if ln.strip()), "")
    return line if len(line) <= limit else line[: limit - 3] + "..."


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
    reason = _first_line(text, 200)
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


def _torch_load(data: bytes, path: Path) -> Any:
    """``torch.load(..., weights_only=True)`` of the bytes already read (never the path again)."""
    unknown = _unknown_format(path, data)
    if unknown is not None:
        raise unknown
    try:
        with _allow_data_only_globals(), warnings.catch_warnings():
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
    return _torch_load(blob.data, blob.path)


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


def _safetensors_header(data: bytes) -> dict[str, Any]:
    size = int.from_bytes(data[:8], "little")
    if len(data) < 8 or size > len(data) - 8:
        raise ValueError(f"header of {size} bytes in a file of {len(data)} bytes")
    header = json.loads(data[8:8 + size])
    if not isinstance(header, dict):
        raise ValueError("the header is not a JSON object")
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
    from dtprobe.state_dict import BOOKKEEPING_KEYS

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
        # by the documented search of dtprobe.state_dict.
        from dtprobe.state_dict import _tensor_dicts

        found = _tensor_dicts(top)
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


def _trusted_torch_load(data: bytes, path: Path) -> Any:
    """Full unpickling, only for ``trust_pickles=True``: the file's classes are imported and run."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.load(io.BytesIO(data), map_location="cpu", weights_only=False)
    except (ImportError, AttributeError) as exc:
        raise CheckpointError(f"{path}: --trust-pickles: the file needs code that cannot be "
                              f"imported ({_first_line(str(exc))}); run from the folder of the "
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
            source = _torch_load(blob.data, path)
        except UnsafeCheckpointError:
            if not trust_pickles:
                raise
            source, trusted = _trusted_torch_load(blob.data, path), True  # explicit opt-in
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


def _prefix_hint(missing: list[str], unexpected: list[str]) -> str:
    if not missing or not unexpected:
        return ""
    heads = {key.split(".", 1)[0] for key in unexpected if "." in key}
    if len(heads) == 1:
        prefix = heads.pop() + "."
        if {key[len(prefix):] for key in unexpected} >= set(missing):
            return f"; the checkpoint keys carry an extra prefix {prefix!r}"
    return ""


def _key_list(keys: list[str], limit: int = 3) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f" (+{len(keys) - limit} more)" if len(keys) > limit else "")


def load_weights(model: nn.Module, loaded: LoadedCheckpoint, path: str | os.PathLike[str], *,
                 weights: str = "auto", strip_prefix: str | None = None,
                 key_maps: tuple[Any, ...] = (), arch: str | None = None,
                 finite: bool = True) -> Any:
    """Find the weights in ``loaded`` that fit ``model`` exactly and load them.

    The search over nesting keys, bookkeeping entries, prefixes and the architecture's key
    renames is :func:`dtprobe.state_dict.resolve`'s (documented there); a candidate is taken
    only when every key and shape fits.

    Parameters
    ----------
    model : nn.Module
        Freshly built model.
    loaded : LoadedCheckpoint
        From :func:`load_checkpoint`.
    path : path-like
        The file, for messages.
    weights : {"auto", "raw", "ema"} or str
        ``--weights``: which weights to take.
    strip_prefix : str, optional
        ``--strip-prefix``: keep only keys with this prefix, removed.
    key_maps : tuple of KeyMap
        The architecture's rename maps.
    arch : str, optional
        The architecture's name, for messages.
    finite : bool, default True
        Refuse chosen weights that contain NaN/Inf.

    Returns
    -------
    dtprobe.state_dict.Candidate
        What was loaded and from where (``.record()`` for the results).

    Raises
    ------
    CheckpointError
        Nothing fits (the message names the keys found and the flag that fixes it), or the
        chosen weights hold NaN/Inf.
    """
    from dtprobe.state_dict import resolve

    source = loaded.source if loaded.source is not None else loaded.state_dict
    chosen = resolve(source, model, path, weights=weights, strip_prefix=strip_prefix,
                     key_maps=key_maps, arch=arch)
    check_tensors(chosen.state, path)  # e.g. EMA weights, not the default reading checked above
    if finite:
        check_finite(chosen.state, path)
    load_into_model(model, chosen.state, path)
    return chosen


def load_into_model(model: nn.Module, state_dict: Mapping[str, Tensor],
                    path: str | os.PathLike[str]) -> None:
    """Load ``state_dict`` into ``model`` strictly, with a one-line error when it does not fit.

    Missing ``*.num_batches_tracked`` BatchNorm counters (absent from old
    checkpoints) are tolerated; every other missing or unexpected key and every
    shape mismatch is an error.

    Parameters
    ----------
    model : nn.Module
        Freshly built model (architecture and number of classes from the manifest or flags).
    state_dict : mapping of str to Tensor
        Weights from :func:`load_state_dict`.
    path : path-like
        The checkpoint file, for the error message.

    Raises
    ------
    CheckpointError
        Naming the file, the first few offending keys and the fix
        ("pass the right --arch / --num-classes").
    """
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state_dict if k not in expected]
    mismatched = [f"{k} (checkpoint {tuple(state_dict[k].shape)}, model "
                  f"{tuple(expected[k].shape)})"
                  for k in expected if k in state_dict and state_dict[k].shape != expected[k].shape]
    if missing or unexpected or mismatched:
        parts = []
        if mismatched:
            parts.append(f"shape mismatch: {_key_list(mismatched, 2)}")
        if missing:
            parts.append(f"missing keys: {_key_list(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {_key_list(unexpected)}")
        raise CheckpointError(f"{path}: weights do not fit the {type(model).__name__} that was "
                              f"built ({'; '.join(parts)}{_prefix_hint(missing, unexpected)}); "
                              "pass the right --arch / --num-classes (and architecture options)")
    full = dict(state_dict)
    for key, value in expected.items():
        full.setdefault(key, value)  # only num_batches_tracked can be absent here
    try:
        model.load_state_dict(full, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"{path}: weights do not fit the model ({_first_line(str(exc))}); "
                              "pass the right --arch / --num-classes") from None


# --------------------------------------------------------------------------------- inference
@dataclass(frozen=True)
class InferredCheckpoint:
    """One checkpoint found by file name.

    Attributes
    ----------
    epoch : int
        Epochs completed (0 = initialisation) where the layout's convention is known
        (Lightning's ``epoch=3`` is 4 here), else the number as written; see
        :mod:`dtprobe.layouts` and ``epoch_basis``.
    step : int or None
        Global step from the name or the framework's records, where known.
    path : Path
        ``run_dir / relpath``.
    relpath : str
        Path relative to the run directory, with forward slashes.
    naming : str
        The naming scheme that matched, e.g. ``"ckpt_epoch_{epoch}.pth"``.
    layout : str
        The :data:`dtprobe.layouts.LAYOUTS` entry (``"lightning"``, ``"hf_trainer"`` ...).
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
        """Layouts present (:data:`dtprobe.layouts.LAYOUTS`), in order of first appearance."""
        return list(dict.fromkeys(c.layout for c in self))

    @property
    def namings(self) -> list[str]:
        """Naming schemes present, in order of first appearance."""
        return list(dict.fromkeys(c.naming for c in self))


def _template_regex(template: str, what: str) -> re.Pattern[str]:
    """Compile a file-name template with ``{epoch}``/``{step}`` and glob wildcards to a regex."""
    out: list[str] = []
    seen: set[str] = set()
    i = 0
    while i < len(template):
        ch = template[i]
        if ch == "{":
            end = template.find("}", i)
            name = template[i + 1:end] if end > 0 else ""
            if name not in ("epoch", "step") or name in seen:
                raise ConfigError(f"{what} {template!r}: only one {{epoch}} and at most one "
                                  "{step} placeholder are allowed (write braces nowhere else)")
            seen.add(name)
            out.append(f"(?P<{name}>[0-9]+)")
            i = end + 1
        elif ch == "}":
            raise ConfigError(f"{what} {template!r}: unmatched '}}'")
        elif ch == "*":
            out.append("[^/]*")
            i += 1
        elif ch == "?":
            out.append("[^/]")
            i += 1
        elif ch == "[" and (end := template.find("]", i + 2)) > 0:
            body = template[i + 1:end]
            negate = body.startswith("!")
            body = body[1:] if negate else body
            out.append("[" + ("^" if negate else "") + body.replace("\\", "\\\\") + "]")
            i = end + 1
        else:
            out.append(re.escape(ch))
            i += 1
    if "epoch" not in seen:
        raise ConfigError(f"{what} {template!r} has no {{epoch}} placeholder; e.g. "
                          "--pattern 'weights_{epoch}.pt'")
    try:
        return re.compile("".join(out))
    except re.error as exc:
        raise ConfigError(f"{what} {template!r}: invalid wildcard ({exc})") from None


_KNOWN = [(t, _template_regex(t, "naming")) for t in KNOWN_NAMINGS]


def is_temporary_name(name: str) -> bool:
    """Whether a file name is a writer's temporary or partial file, never a checkpoint.

    Hidden names (``.epoch_3.pt.123.tmp``, written before an atomic rename) and names
    ending in one of :data:`TEMP_SUFFIXES` (or holding ``.tmp.``) are what a process killed
    while saving leaves behind; file-name inference skips them even when ``--pattern``
    would match.

    Parameters
    ----------
    name : str
        A file name or a relative path (only the last component is looked at).

    Returns
    -------
    bool
    """
    base = name.replace("\\", "/").rsplit("/", 1)[-1]
    lower = base.lower()
    return base.startswith(".") or lower.endswith(TEMP_SUFFIXES) or ".tmp." in lower


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
        names = _list_files(run_dir, 0) + [f"{_SUBDIR}/{n}" for n in
                                            _list_files(run_dir / _SUBDIR, 0)]
        return names, _KNOWN
    text = pattern.replace("\\", "/")
    if text.startswith("/") or ".." in text.split("/") or re.match(r"[A-Za-z]:", text):
        raise ConfigError(f"--pattern {pattern!r}: must be relative to the run directory "
                          "without '..'")
    regex = _template_regex(text, "--pattern")
    depth = text.count("/")
    names = _list_files(run_dir, depth)
    if depth == 0:
        names += [f"{_SUBDIR}/{n}" for n in _list_files(run_dir / _SUBDIR, 0)]
    return names, [(text, regex)]


def _match(relpath: str, namings: list[tuple[str, Any]], subdir_ok: bool
           ) -> tuple[str, re.Match[str]] | None:
    name = relpath.split("/", 1)[1] if subdir_ok and relpath.startswith(_SUBDIR + "/") else None
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
    :mod:`dtprobe.layouts`. Temporary and partial files left by an interrupted writer
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
        Where epochs come from (:func:`dtprobe.layouts.assign_epochs`).
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
            if rel.lower().endswith(_CHECKPOINT_SUFFIXES):
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
        deep = [n for n in layouts._walk(run_dir) if not is_temporary_name(n)]
        found = layouts._nested(run_dir, deep)
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
            source_epoch=a.source_epoch, epoch_basis=a.basis, sha256=a.found.sha256)
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
        deeper = [n for n in _list_files(run_dir, 1) if not n.startswith(_SUBDIR + "/")
                  and n.lower().endswith(_CHECKPOINT_SUFFIXES) and not is_temporary_name(n)]
        deeper += [n for n in _list_files(run_dir, 2) if n.lower().endswith(_CHECKPOINT_SUFFIXES)
                   and not is_temporary_name(n)]
        if deeper:
            listing = ", ".join(deeper[:4]) + (f" (+{len(deeper) - 4} more)"
                                               if len(deeper) > 4 else "")
            return (f"{run_dir}: no checkpoint files of a known layout (see dtprobe/layouts.py), "
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
    where = f"{run_dir} or {run_dir / _SUBDIR}" if not pattern or "/" not in pattern else run_dir
    return (f"{where}: no checkpoint files matching {wanted}; point to the run directory that "
            "holds the checkpoints, or pass --pattern")


# ------------------------------------------------------------------------- whole-run inference
@dataclass
class InferredRun:
    """A run without a manifest: its checkpoints and how to rebuild its model.

    Attributes
    ----------
    series : CheckpointSeries
        The checkpoints, with epochs and steps (:mod:`dtprobe.layouts`).
    arch, num_classes, arch_kwargs : the model, from the flags, else from the files' records
        (:func:`dtprobe.layouts.model_hints`), else recognised from the weights' names and
        shapes (:func:`dtprobe.layouts.guess_from_keys`); ``arch``/``num_classes`` are None
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
    from dtprobe.state_dict import candidates

    for candidate in candidates(loaded.source):
        weight = candidate.state.get(suffix)
        if weight is not None and weight.dim() == 2:
            return int(weight.shape[0])
    return None
