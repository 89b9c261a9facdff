"""Reading, atomic writing and locked appending of ``RUN_DIR/manifest.json``.

Writes go to a temporary file in the run directory, are flushed and fsync'ed,
then renamed over the manifest with :func:`os.replace`, so a reader sees either
the old or the new manifest, never a partial one, even if the writer is killed.
Read-modify-write updates (:func:`append_checkpoint`, :func:`update_manifest`)
hold an exclusive lock on ``RUN_DIR/.manifest.json.lock`` (``fcntl.flock`` on
POSIX; an ``O_CREAT | O_EXCL`` lock file elsewhere), so concurrent writers
(threads or processes) do not lose each other's entries.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import stat
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import IO, Any

from checkpoints_manifest.schema import (
    MANIFEST_NAME,
    CheckpointEntry,
    Manifest,
    ManifestError,
    check_json_text,
)

try:  # POSIX
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

LOCK_NAME = ".manifest.json.lock"
LOCK_TIMEOUT_S = 120.0
#: A manifest larger than this is refused unread (a real one is well under 1 KiB per
#: checkpoint, so this holds tens of thousands of checkpoints).
MAX_MANIFEST_BYTES = 32 << 20
_CHUNK = 1 << 20
#: Ending of every temporary file the atomic writers create (``.NAME.<random>.tmp``).
TEMP_SUFFIX = ".tmp"
_DEFAULT_MODE = 0o644
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_mkstemp = tempfile.mkstemp  # O_CREAT | O_EXCL | O_NOFOLLOW, random name (indirection for tests)
_thread_locks: dict[str, threading.Lock] = {}
_thread_locks_guard = threading.Lock()


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex sha256 digest of a file, read in 1 MiB chunks.

    Parameters
    ----------
    path : path-like
        File to hash.

    Returns
    -------
    str
        64 lower-case hexadecimal characters.
    """
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def manifest_path(run_dir_or_file: str | os.PathLike[str]) -> Path:
    """``RUN_DIR/manifest.json`` for a directory; a file path is returned unchanged."""
    path = Path(run_dir_or_file)
    return path / MANIFEST_NAME if path.is_dir() else path


class _DuplicateKey(Exception):
    pass


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)  # built in C; only a short dict means a key was repeated
    if len(out) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise _DuplicateKey(key)
            seen.add(key)
    return out


def parse_manifest(text: str | bytes, source: str = "<string>") -> Manifest:
    """Parse and validate manifest JSON text; every problem raises :class:`ManifestError`."""
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8-sig")
        except UnicodeDecodeError as exc:
            raise ManifestError(source, f"not UTF-8 text (byte {exc.start}); a manifest is a "
                                        "UTF-8 JSON file") from None
    elif text.startswith("\ufeff"):
        text = text[1:]
    try:
        data = json.loads(text, object_pairs_hook=_no_duplicate_keys)
    except _DuplicateKey as exc:
        raise ManifestError(source, f"duplicate key {str(exc)!r} in a JSON object") from None
    except json.JSONDecodeError as exc:
        raise ManifestError(source, f"not valid JSON ({exc.msg} at line {exc.lineno} column "
                                    f"{exc.colno})") from None
    except RecursionError:
        raise ManifestError(source, "not valid JSON (nested too deeply)") from None
    except ValueError as exc:  # e.g. an integer literal beyond Python's digit limit
        raise ManifestError(source, f"not valid JSON ({exc})") from None
    check_json_text(text, source, data)  # depth, lone surrogates: on the text, fast when big
    return Manifest.from_dict(data, source, scan=False)


def read_manifest(run_dir_or_file: str | os.PathLike[str]) -> Manifest:
    """Read and validate a manifest.

    Parameters
    ----------
    run_dir_or_file : path-like
        A run directory (``manifest.json`` inside it is read) or the manifest file itself.

    Returns
    -------
    Manifest
        The validated manifest, checkpoints sorted by ``(epoch, step)``.

    Raises
    ------
    ManifestError
        If the file is missing or unreadable, is not JSON, has the wrong format
        tag or version, or a field is missing, ill-typed, duplicated or unsafe.
        The message names the file and the field.
    """
    path = manifest_path(run_dir_or_file)
    try:
        raw = read_regular_file(path, MAX_MANIFEST_BYTES, "manifest")
    except FileNotFoundError:
        raise ManifestError(str(path), "no such manifest; write one with write_manifest() (see "
                                       "checkpoints_manifest/README.md)") from None
    except ValueError as exc:  # a FIFO, a device, a directory or a file far too large
        raise ManifestError(str(path), f"{exc}; this is not a checkpoints manifest") from None
    except OSError as exc:
        raise ManifestError(str(path), f"cannot read it ({exc.strerror or exc})") from None
    return parse_manifest(raw, str(path))


def _link_reason(exc: OSError) -> str:
    if exc.errno == errno.ELOOP:
        return "it is a symbolic link, which dtprobe never writes through"
    return exc.strerror or str(exc)


def _thread_lock(lock_path: Path) -> threading.Lock:
    key = os.path.abspath(lock_path)
    with _thread_locks_guard:
        return _thread_locks.setdefault(key, threading.Lock())


@contextlib.contextmanager
def manifest_lock(run_dir: str | os.PathLike[str],
                  timeout: float = LOCK_TIMEOUT_S) -> Iterator[None]:
    """Exclusive lock on the manifest of ``run_dir`` for a read-modify-write update.

    Threads of one process serialise on an in-process lock; processes on
    ``fcntl.flock`` of ``RUN_DIR/.manifest.json.lock``, which the holder removes
    before it releases the lock (a waiter that then holds the lock on the removed
    file sees that the path no longer names its file and retries), so no lock file
    stays behind. Without ``fcntl`` an ``O_CREAT | O_EXCL`` lock file is created
    and removed again.

    Raises
    ------
    ManifestError
        If the lock is not obtained within ``timeout`` seconds.
    """
    lock_path = Path(run_dir) / LOCK_NAME
    deadline = time.monotonic() + timeout
    tlock = _thread_lock(lock_path)
    if not tlock.acquire(timeout=max(timeout, 0.0)):
        raise ManifestError(str(lock_path), f"timed out after {timeout:.0f}s waiting for the "
                                            "manifest lock held by another thread")
    try:
        if fcntl is not None:
            while True:
                try:  # never through a link planted at the lock's name
                    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | _NOFOLLOW, _DEFAULT_MODE)
                except OSError as exc:
                    raise ManifestError(str(lock_path), f"cannot open the manifest lock "
                                        f"({_link_reason(exc)}); remove it if it is a symbolic "
                                        "link, or make the run directory writable") from None
                try:
                    while True:
                        try:
                            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                            break
                        except BlockingIOError:
                            if time.monotonic() > deadline:
                                raise ManifestError(str(lock_path), f"timed out after "
                                                    f"{timeout:.0f}s waiting for another process "
                                                    "that is writing the manifest") from None
                            time.sleep(0.005)
                    # The holder before us removes the file as it releases it (below): if our
                    # file is no longer the one at lock_path we locked a removed file, so retry.
                    try:
                        here = os.stat(lock_path, follow_symlinks=False)
                    except FileNotFoundError:
                        continue
                    mine = os.fstat(fd)
                    if (here.st_ino, here.st_dev) != (mine.st_ino, mine.st_dev):
                        continue
                    try:
                        yield
                    finally:
                        # unlink while still holding the lock, so no run keeps a stale lock file
                        with contextlib.suppress(OSError):
                            os.unlink(lock_path)
                        fcntl.flock(fd, fcntl.LOCK_UN)
                    break
                finally:
                    os.close(fd)
        else:  # pragma: no cover - exercised on Windows only
            while True:
                try:
                    fd = os.open(lock_path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, _DEFAULT_MODE)
                    break
                except FileExistsError:
                    if time.monotonic() > deadline:
                        raise ManifestError(str(lock_path), f"still locked after {timeout:.0f}s; "
                                            "if no other process is writing the manifest, delete "
                                            "this file") from None
                    time.sleep(0.01)
            try:
                yield
            finally:
                os.close(fd)
                os.unlink(lock_path)
    finally:
        tlock.release()


def _fsync_dir(directory: Path) -> None:
    if os.name != "posix":  # pragma: no cover
        return
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # pragma: no cover - some filesystems refuse opening directories
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def _tmp_prefix(path: Path) -> str:
    return f".{path.name}."


def is_own_temp_name(name: str) -> bool:
    """Whether ``name`` is a temporary file of the atomic writers (``.NAME.<random>.tmp``).

    The test for folders shared with other programs (a run directory): a user's ``notes.tmp``
    is not ours.
    """
    return name.startswith(".") and name.endswith(TEMP_SUFFIX)


def is_temp_name(name: str) -> bool:
    """Whether ``name`` is any temporary name a dtprobe writer ever used: ``*.tmp`` or
    ``*.tmp.*`` (earlier versions wrote ``NAME.<pid>.tmp``, not hidden).

    The test for folders that only dtprobe writes (``analysis/``, its ``parts``/``features``).
    """
    return name.endswith(TEMP_SUFFIX) or TEMP_SUFFIX + "." in name


def remove_temp_files(directories: Iterable[str | os.PathLike[str]],
                      is_temp: Callable[[str], bool] = is_own_temp_name) -> list[Path]:
    """Delete the regular files (never through a link) named ``is_temp`` in ``directories``.

    The one clean-up of what writers killed between writing and renaming leave behind. Call it
    only while no other process can be writing there (under the folder's lock).

    Parameters
    ----------
    directories : folders to clean (missing or unreadable ones are skipped).
    is_temp : which names are temporary: :func:`is_own_temp_name` (default; shared folders)
        or :func:`is_temp_name` (folders only dtprobe writes).

    Returns
    -------
    list of Path
        The files removed.
    """
    removed: list[Path] = []
    for directory in directories:
        try:
            entries = list(os.scandir(directory))
        except OSError:
            continue
        for entry in entries:
            if is_temp(entry.name):
                with contextlib.suppress(OSError):
                    if entry.is_file(follow_symlinks=False):
                        os.unlink(entry.path)
                        removed.append(Path(entry.path))
    return removed


def remove_stale_temp_files(path: str | os.PathLike[str]) -> list[Path]:
    """Delete temporary files that :func:`atomic_write_text` left for ``path`` when its writer
    was killed between writing and renaming (``.NAME.<random>.tmp`` beside ``path``).

    Call it only while no other process can be writing ``path`` (e.g. under
    :func:`manifest_lock`). Returns the files removed.
    """
    path = Path(path)
    prefix = _tmp_prefix(path)
    return remove_temp_files([path.parent],
                             lambda name: name.startswith(prefix) and is_own_temp_name(name))


@contextlib.contextmanager
def atomic_writer(path: str | os.PathLike[str], mode: str = "wb", *,
                  encoding: str | None = None, newline: str | None = None,
                  errors: str | None = None, file_mode: int | None = None) -> Iterator[IO[Any]]:
    """Open a file object whose content replaces ``path`` atomically when the block ends.

    The data goes to a new temporary file beside ``path`` with an unpredictable name
    (``.NAME.<random>.tmp``, created by :func:`tempfile.mkstemp` with ``O_CREAT | O_EXCL``
    and ``O_NOFOLLOW``, mode 0600), so a symbolic link planted at any name cannot redirect
    the write; it is flushed, fsync'ed and renamed over ``path`` with :func:`os.replace`,
    which replaces a link planted at ``path`` itself instead of writing through it. A reader
    sees the old or the new content, never a mix, even if the writer is killed (``SIGKILL``)
    at any moment; a kill can at most leave the hidden temporary file (see
    :func:`remove_stale_temp_files`). If the block raises, nothing is replaced.

    Parameters
    ----------
    path : path-like
        The file to (re)place; its directory must exist.
    mode : {"wb", "w"}
        Binary or text file object.
    encoding, newline, errors : str, optional
        For text mode (UTF-8, ``"\\n"`` and ``"strict"`` by default).
    file_mode : int, optional
        Permission bits of the new file; default: those of the regular file it replaces,
        else 0644.
    """
    if mode not in ("wb", "w"):
        raise ValueError(f"mode must be 'wb' or 'w', got {mode!r}")
    path = Path(path)
    if file_mode is None:
        try:
            st = os.lstat(path)
            file_mode = st.st_mode & 0o777 if stat.S_ISREG(st.st_mode) else _DEFAULT_MODE
        except FileNotFoundError:
            file_mode = _DEFAULT_MODE
    fd, tmp = _mkstemp(prefix=_tmp_prefix(path), suffix=TEMP_SUFFIX, dir=path.parent)
    try:
        if mode == "w":
            fh = os.fdopen(fd, "w", encoding=encoding or "utf-8", errors=errors or "strict",
                           newline="\n" if newline is None else newline)
        else:
            fh = os.fdopen(fd, "wb")
        with fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
            if hasattr(os, "fchmod"):
                os.fchmod(fh.fileno(), file_mode)
            else:  # pragma: no cover - Windows
                os.chmod(tmp, file_mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``path`` atomically and without following links (see
    :func:`atomic_writer`)."""
    with atomic_writer(path, "wb") as fh:
        fh.write(data)


def atomic_write_text(path: str | os.PathLike[str], text: str,
                      errors: str = "backslashreplace") -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically and without following links.

    A reader sees the old or the new content, never a mix, even if the writer is killed
    (``SIGKILL``) at any moment; a kill can at most leave a hidden ``.NAME.<random>.tmp`` file
    beside ``path`` (see :func:`remove_stale_temp_files`). The new file keeps the permission
    bits of the file it replaces (0644 for a new file). See :func:`atomic_writer`. Characters
    UTF-8 cannot encode (lone surrogates from undecodable file names) are written as
    ``\\udcXX`` escapes by default instead of failing the write.
    """
    with atomic_writer(path, "w", errors=errors) as fh:
        fh.write(text)


def read_regular_file(path: str | os.PathLike[str], limit: int, what: str = "file") -> bytes:
    """The bytes of ``path``, read once, only if it is a regular file of at most ``limit`` bytes.

    A FIFO, device (``/dev/zero``), socket or directory is refused without reading it (the
    file is opened non-blocking, so a FIFO cannot hang the reader), and a file larger than
    ``limit``, or one that grows past it while being read, is refused; ``what`` names the kind
    of file in that message.

    Raises
    ------
    FileNotFoundError, OSError
        As :func:`os.open`.
    ValueError
        If the file is not a regular file or is larger than ``limit`` (the message says which).
    """
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ValueError(f"is not a regular file ({_file_kind(st.st_mode)})")
        if st.st_size > limit:
            raise ValueError(f"is {_size(st.st_size)}, larger than any {what} ({_size(limit)} "
                             "limit)")
        chunks = []
        total = 0
        while True:
            chunk = os.read(fd, min(_CHUNK * 16, limit + 1 - total))
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
            if total > limit:
                raise ValueError(f"grew past the {_size(limit)} limit while being read, larger "
                                 f"than any {what}")
        return b"".join(chunks)
    finally:
        os.close(fd)


def _size(n: int) -> str:
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift:
            return f"{n / (1 << shift):.1f} {unit}"
    return f"{n} bytes"


def _file_kind(st_mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISSOCK, "a socket")):
        if test(st_mode):
            return name
    return "not a plain file"


def _write_unlocked(run_dir: Path, manifest: Manifest) -> Path:
    path = run_dir / MANIFEST_NAME
    text = manifest.to_json(str(path))
    remove_stale_temp_files(path)  # left by a writer killed mid-write; we hold the lock
    try:
        atomic_write_text(path, text)
    except OSError as exc:
        raise ManifestError(str(path), f"cannot write it ({exc.strerror or exc})") from None
    return path


def _as_run_dir(run_dir: str | os.PathLike[str]) -> Path:
    run_dir = Path(run_dir)
    if run_dir.name == MANIFEST_NAME and not run_dir.is_dir():
        raise ManifestError(str(run_dir), "pass the run directory, not the manifest file")
    return run_dir


def write_manifest(run_dir: str | os.PathLike[str], manifest: Manifest) -> Path:
    """Validate ``manifest`` and write it atomically to ``RUN_DIR/manifest.json``.

    Parameters
    ----------
    run_dir : path-like
        Run directory (created if missing).
    manifest : Manifest
        The manifest to write (validated first; nothing is written if it is invalid).

    Returns
    -------
    Path
        The manifest file.

    Raises
    ------
    ManifestError
        If the manifest is invalid or cannot be written.
    """
    run_dir = _as_run_dir(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    with manifest_lock(run_dir):
        return _write_unlocked(run_dir, manifest)


def update_manifest(run_dir: str | os.PathLike[str],
                    change: Callable[[Manifest | None], Manifest | None]) -> Manifest | None:
    """Locked read-modify-write of ``RUN_DIR/manifest.json`` with any change.

    ``change`` receives the current manifest (``None`` when there is none yet) and returns the
    manifest to write, or ``None`` to leave the file as it is. The read, ``change`` and the
    atomic write all happen under :func:`manifest_lock`, so writers in other threads or
    processes (other ranks, other jobs, a pruning callback) neither lose nor duplicate each
    other's entries: each sees the manifest the previous one wrote. ``change`` must not itself
    take the lock (no :func:`write_manifest` or :func:`append_checkpoint` inside it).

    Parameters
    ----------
    run_dir : path-like
        Run directory (created if missing).
    change : callable
        ``Manifest | None -> Manifest | None``.

    Returns
    -------
    Manifest or None
        The manifest as written, else the one read (``None`` if there is none).

    Raises
    ------
    ManifestError
        If the existing manifest is invalid, the new one is invalid or cannot be written, or
        the lock is not obtained in time.
    """
    run_dir = _as_run_dir(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / MANIFEST_NAME
    with manifest_lock(run_dir):
        current = read_manifest(path) if os.path.lexists(path) else None
        new = change(current)
        if new is None:
            return current
        _write_unlocked(run_dir, new)
        return new


def append_checkpoint(run_dir: str | os.PathLike[str], entry: CheckpointEntry | Mapping[str, Any],
                      *, replace: bool = False) -> Manifest:
    """Add one checkpoint entry to ``RUN_DIR/manifest.json`` (locked, atomic read-modify-write).

    Parameters
    ----------
    run_dir : path-like
        Run directory holding an existing manifest.
    entry : CheckpointEntry or mapping
        The new entry; its ``path`` is relative to ``run_dir``.
    replace : bool, default False
        Replace an existing entry of the same epoch instead of raising.

    Returns
    -------
    Manifest
        The manifest as written.

    Raises
    ------
    ManifestError
        If there is no valid manifest, the entry is invalid, its epoch is
        already recorded (and ``replace`` is False) or its path is used by
        another epoch.
    """
    run_dir = _as_run_dir(run_dir)
    if not run_dir.is_dir():
        raise ManifestError(str(run_dir / MANIFEST_NAME), "no such run directory; write the "
                                                          "manifest first with write_manifest()")
    with manifest_lock(run_dir):
        manifest = read_manifest(run_dir / MANIFEST_NAME)
        if isinstance(entry, Mapping):
            entry = CheckpointEntry.from_dict(entry, str(run_dir / MANIFEST_NAME),
                                              "new checkpoint")
        manifest.add_checkpoint(entry, replace=replace, source=str(run_dir / MANIFEST_NAME))
        _write_unlocked(run_dir, manifest)
    return manifest


def entry_for_file(run_dir: str | os.PathLike[str], file: str | os.PathLike[str], *, epoch: int,
                   step: int, metrics: Mapping[str, float] | None = None,
                   saved_at: float | str | None = None,
                   sha256: str | None = None) -> CheckpointEntry:
    """Describe a checkpoint file that lies inside ``run_dir``: relative path, sha256, time.

    Parameters
    ----------
    run_dir : path-like
        Run directory.
    file : path-like
        The checkpoint file, as you would open it (absolute, or relative to the
        current directory); it must lie inside ``run_dir``.
    epoch, step : int
        Epoch and optimiser step of the weights.
    metrics : mapping, optional
        Training-time numbers to record.
    saved_at : float or str, optional
        Save time; defaults to ``time.time()``.
    sha256 : str, optional
        Digest of the bytes the writer wrote, when it has them: the entry is then bound to
        what was written, and the file is not read back. Default: hash the file.

    Returns
    -------
    CheckpointEntry
        Validated entry ready for :func:`append_checkpoint`.

    Raises
    ------
    ManifestError
        If the file is outside ``run_dir``, missing, or a field is invalid.
    """
    rel = os.path.relpath(os.path.abspath(file), os.path.abspath(run_dir))
    rel = rel.replace(os.sep, "/")
    if rel == ".." or rel.startswith("../") or os.path.isabs(rel):
        raise ManifestError(str(file), f"is not inside the run directory {run_dir}; save "
                                       "checkpoints under the run directory")
    if sha256 is not None:
        if not os.path.isfile(file):
            raise ManifestError(str(file), "is missing or not a regular file; write it first")
        digest = sha256
    else:
        try:
            digest = sha256_file(file)
        except OSError as exc:
            raise ManifestError(str(file), f"cannot hash it ({exc.strerror or exc})") from None
    entry = CheckpointEntry(epoch=epoch, step=step, path=rel, sha256=digest,
                            metrics=_numbers(metrics or {}, str(file)),
                            time=time.time() if saved_at is None else saved_at)
    return CheckpointEntry.from_dict(entry.to_dict(), str(file), "checkpoint")


def _numbers(metrics: Mapping[str, Any], source: str) -> dict[str, Any]:
    """Metric values as Python floats (accepts 0-d tensors and NumPy scalars via ``float()``)."""
    out: dict[str, Any] = {}
    for key, value in metrics.items():
        if isinstance(value, (bool, int, float)) or not hasattr(value, "__float__"):
            out[key] = value  # validated (and rejected if not a number) by CheckpointEntry
            continue
        try:
            out[key] = float(value)
        except (TypeError, ValueError, RuntimeError):
            raise ManifestError(source, f"metric {key!r} is not a single number",
                                f"metrics.{key}") from None
    return out


def record_checkpoint(run_dir: str | os.PathLike[str], file: str | os.PathLike[str], *,
                      epoch: int, step: int, metrics: Mapping[str, float] | None = None,
                      replace: bool = False, sha256: str | None = None) -> Manifest:
    """Hash ``file`` (or take the writer's ``sha256`` of the bytes it wrote) and append its
    entry to the manifest: :func:`entry_for_file` + :func:`append_checkpoint` in one call (for
    training scripts)."""
    entry = entry_for_file(run_dir, file, epoch=epoch, step=step, metrics=metrics,
                           sha256=sha256)
    return append_checkpoint(run_dir, entry, replace=replace)
