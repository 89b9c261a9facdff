"""Integrity seals for dtprobe's on-disk caches (features, per-checkpoint metric rows).

A cache entry is reused only if it carries a seal that this user's dtprobe made for exactly
this content under exactly this key: an HMAC-SHA256 with a secret key that never leaves the
user's cache folder (``$DTPROBE_CACHE_KEY``, else ``$XDG_CACHE_HOME/dtprobe/cache-key`` or
``~/.cache/dtprobe/cache-key``, created 0600 on first use). A forged, edited, truncated or
foreign entry (another user's, or one copied in with a run) fails the check and is recomputed,
never reported. Run directories are shared, so a plain content hash stored beside the content
would not do: whoever can write the entry can also write its hash.

If no key file can be kept (read-only home), a key for this process only is used: caches then
help within one analysis but are recomputed by the next one.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import os
import secrets
import stat
import tempfile
import threading
from pathlib import Path

import checkpoints_manifest as cm

_KEY_BYTES = 32
_lock = threading.Lock()
_cached: dict[str, bytes] = {}


def key_path() -> Path:
    """Where the secret key is kept."""
    explicit = os.environ.get("DTPROBE_CACHE_KEY")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "dtprobe" / "cache-key"


def _read_key(path: Path) -> bytes | None:
    try:
        flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
        fd = os.open(path, flags)
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        # Only a regular file of ours that nobody else can read or write is a secret.
        if (not stat.S_ISREG(st.st_mode) or st.st_mode & 0o077
                or (hasattr(os, "getuid") and st.st_uid != os.getuid())):
            return None
        data = os.read(fd, 4 * _KEY_BYTES)
    finally:
        os.close(fd)
    return data if len(data) >= _KEY_BYTES else None


def _create_key(path: Path) -> bytes | None:
    """Write a new random key with 0600, atomically and without replacing one that a concurrent
    process created first (``os.link`` fails if the name exists)."""
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".cache-key.", suffix=cm.TEMP_SUFFIX, dir=path.parent)
    except OSError:
        return None
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(secrets.token_bytes(_KEY_BYTES))
            fh.flush()
            os.fsync(fh.fileno())
        with contextlib.suppress(FileExistsError):
            os.link(tmp, path)
    except OSError:
        return None
    finally:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
    return _read_key(path)


def secret_key() -> bytes:
    """This user's cache key (created on first use; per process if it cannot be stored)."""
    path = str(key_path())
    with _lock:
        if path not in _cached:
            key = _read_key(Path(path)) or _create_key(Path(path))
            _cached[path] = key if key is not None else secrets.token_bytes(_KEY_BYTES)
        return _cached[path]


def seal(key: str, *chunks: bytes | memoryview) -> str:
    """Hex HMAC-SHA256 of ``chunks`` bound to the cache ``key`` (length-prefixed, so chunk
    boundaries cannot be shifted)."""
    mac = hmac.new(secret_key(), digestmod=hashlib.sha256)
    for part in (key.encode("utf-8"), *chunks):
        mac.update(len(part).to_bytes(8, "little"))
        mac.update(part)
    return mac.hexdigest()


def verify(key: str, expected: object, *chunks: bytes | memoryview) -> bool:
    """Whether ``expected`` is the :func:`seal` of ``chunks`` under ``key`` (constant time)."""
    return isinstance(expected, str) and hmac.compare_digest(seal(key, *chunks), expected)
