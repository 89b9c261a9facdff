"""The run lock (one analysis of a run at a time) and clean-up of files a killed analysis left."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import socket
import stat
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import checkpoints_manifest as cm
from dtprobe.errors import ConfigError, RunBusyError
from dtprobe.table import FEATURES_DIR, PARTS_DIR

LOCK_FILE = ".lock"
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)


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

    Notes
    -----
    ``analysis/.lock`` exists only while an analysis runs: the last holder deletes it before
    releasing it, and a process that locked a file deleted meanwhile sees that the path no
    longer names its file (inode check) and locks the new one, so removal is race-free.
    """
    ensure_analysis_dirs(analysis_dir)
    lock_path = analysis_dir / LOCK_FILE
    mode = fcntl.LOCK_SH if shared else fcntl.LOCK_EX
    announced = False
    while True:
        fd = _open_lock_file(analysis_dir, lock_path)
        try:
            try:
                fcntl.flock(fd, mode | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _lock_holder(fd)
                if not wait:
                    raise RunBusyError(f"{analysis_dir.parent}: run is busy: another dtprobe "
                                       f"analyze{holder} is analysing it; wait for it to finish, "
                                       "or re-run without --no-wait to queue behind it") from None
                if not announced:
                    print(f"{analysis_dir.parent}: another dtprobe analyze{holder} is analysing "
                          "this run; waiting for it to finish ...", file=sys.stderr, flush=True)
                    announced = True
                t0 = time.monotonic()
                fcntl.flock(fd, mode)
                print(f"{analysis_dir.parent}: lock obtained after {time.monotonic() - t0:.1f}s; "
                      "continuing", file=sys.stderr, flush=True)
            # The last holder deletes the file as it releases it (below): a lock on a file that
            # is no longer the one at lock_path excludes nobody, so start again on the new file.
            try:
                here, mine = os.stat(lock_path, follow_symlinks=False), os.fstat(fd)
            except FileNotFoundError:
                continue
            if (here.st_ino, here.st_dev) != (mine.st_ino, mine.st_dev):
                continue
            if not shared:
                os.ftruncate(fd, 0)
                os.pwrite(fd, f"{os.getpid()} {socket.gethostname()}\n".encode(), 0)
            try:
                yield
            finally:
                # Delete the lock file only while holding it exclusively: a shared holder gets
                # that only if it is the last one, so other workers never lose their lock.
                with contextlib.suppress(OSError):
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    os.unlink(lock_path)
            return
        finally:
            with contextlib.suppress(OSError):
                fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)


def _open_lock_file(analysis_dir: Path, lock_path: Path) -> int:
    try:  # never through a link planted at the lock's name (O_NOFOLLOW)
        fd = os.open(lock_path, os.O_CREAT | os.O_RDWR | _NOFOLLOW | _CLOEXEC, 0o644)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise ConfigError(f"{lock_path}: is a symbolic link; dtprobe never writes through "
                              "links: remove it and re-run") from None
        raise ConfigError(f"{analysis_dir}: cannot create the analysis lock "
                          f"({exc.strerror or exc}); analyse a writable copy of the run") from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
        os.close(fd)
        raise ConfigError(f"{lock_path}: is not a plain file of its own (a hard link or a "
                          "device?); dtprobe writes its pid there: remove it and re-run")
    return fd


def _inside(real: str, base: str) -> bool:
    return real == base or real.startswith(base.rstrip(os.sep) + os.sep)


def ensure_analysis_dirs(analysis_dir: Path) -> None:
    """Create ``RUN_DIR/analysis`` and its ``features``/``parts`` folders, refusing any of them
    that is not a real folder inside the run (a symbolic link out of the run would make the
    analysis write, and delete temporary files, elsewhere).

    Raises
    ------
    ConfigError
        A folder is a link leading out of the run or not a folder, or cannot be created
        (read-only run directory).
    """
    base = os.path.realpath(analysis_dir.parent)
    for folder in (analysis_dir, analysis_dir / FEATURES_DIR, analysis_dir / PARTS_DIR):
        if os.path.islink(folder) and not _inside(os.path.realpath(folder), base):
            raise ConfigError(f"{folder}: is a symbolic link to {os.path.realpath(folder)}, "
                              "outside the run; dtprobe writes analysis results only inside the "
                              "run: remove the link and re-run")
        try:
            folder.mkdir(parents=folder == analysis_dir, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"{folder}: cannot create the analysis folder "
                              f"({exc.strerror or exc}); analyse a writable copy of the run"
                              ) from None
        if not folder.is_dir() or not _inside(os.path.realpath(folder), base):
            raise ConfigError(f"{folder}: is not a folder inside the run; remove it and re-run")


def remove_stale_temp_files(analysis_dir: Path) -> int:
    """Delete temporary files that a killed analysis left in ``analysis_dir`` and its
    ``parts``/``features`` folders (every file is written to a ``*.tmp`` name first and renamed,
    so only such files can be partial). Call only while holding the exclusive :func:`run_lock`.

    Returns
    -------
    int
        The number of files removed.
    """
    # only dtprobe writes here: any temporary name it ever used (cm.is_temp_name)
    folders = (analysis_dir, analysis_dir / PARTS_DIR, analysis_dir / FEATURES_DIR)
    return len(cm.remove_temp_files(folders, cm.is_temp_name))

