"""Image stores in a cache folder shared by every run (issue 25, part 5).

Torn, truncated, forged and foreign stores are covered in ``tests/test_image_store.py``; here: a
full disk during the build, two builds of the same store at once, a link planted at the build
lock, and a store folder that another user could write into.
"""

from __future__ import annotations

import contextlib
import errno
import os
import threading
from pathlib import Path

import numpy as np
import pytest

from dtprobe.data import store
from dtprobe.errors import DatasetError

KEY = "k" * 32
SHAPE = (3, 4, 4)


def _batches(n_batches: int = 10, calls: list | None = None):
    def make():
        if calls is not None:
            calls.append(1)
        return (np.full((8, *SHAPE), i, np.uint8) for i in range(n_batches))
    return make


def test_full_disk_during_the_build_is_one_line_and_leaves_nothing(tmp_path, monkeypatch):
    real = store.atomic_writer

    class Full:
        def __init__(self, fh):
            self.fh, self.calls = fh, 0

        def write(self, data):
            self.calls += 1
            if self.calls == 3:
                raise OSError(errno.ENOSPC, "No space left on device")
            return self.fh.write(data)

    @contextlib.contextmanager
    def full_disk(path, mode="wb", **kw):
        with real(path, mode, **kw) as fh:
            yield Full(fh)

    monkeypatch.setattr(store, "atomic_writer", full_disk)
    with pytest.raises(DatasetError, match="No space left on device") as info:
        store.open_or_build(tmp_path, "x", KEY, 80, SHAPE, _batches())
    assert "\n" not in str(info.value) and "--image-store" in str(info.value)
    assert [p.name for p in tmp_path.iterdir()] == [f"x-{KEY}.u8.lock"]  # no store, no temp
    monkeypatch.setattr(store, "atomic_writer", real)
    built = store.open_or_build(tmp_path, "x", KEY, 80, SHAPE, _batches())
    assert built.n == 80 and built.read(72, 73)[0, 0, 0, 0] == 9


def test_two_builds_of_one_store_at_once_build_it_once(tmp_path):
    calls: list[int] = []
    results, errors = [], []
    gate = threading.Barrier(4)

    def build():
        try:
            gate.wait()
            results.append(store.open_or_build(tmp_path, "x", KEY, 80, SHAPE,
                                               _batches(calls=calls)))
        except Exception as exc:  # noqa: BLE001 - reported by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=build) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors and len(results) == 4 and len(calls) == 1
    assert all(r.n == 80 and r.read(8, 9)[0, 0, 0, 0] == 1 for r in results)


def test_a_link_planted_at_the_build_lock_is_not_followed(tmp_path):
    victim = tmp_path / "elsewhere" / "created-through-the-link"
    victim.parent.mkdir()
    folder = tmp_path / "stores"
    folder.mkdir(mode=0o700)
    (folder / f"x-{KEY}.u8.lock").symlink_to(victim)
    with pytest.raises(DatasetError, match="cannot write the image store"):
        store.open_or_build(folder, "x", KEY, 80, SHAPE, _batches())
    assert not victim.exists()


def test_a_store_folder_writable_by_others_is_refused_on_one_line(tmp_path):
    folder = tmp_path / "shared"
    folder.mkdir()
    folder.chmod(0o777)
    with pytest.raises(DatasetError, match="writable by other users") as info:
        store.open_or_build(folder, "x", KEY, 80, SHAPE, _batches())
    assert "\n" not in str(info.value) and "--image-store" in str(info.value)
    assert list(folder.iterdir()) == []
    folder.chmod(0o700)
    assert store.open_or_build(folder, "x", KEY, 80, SHAPE, _batches()).n == 80


def test_a_store_folder_of_another_user_is_refused(tmp_path, monkeypatch):
    folder = tmp_path / "theirs"
    folder.mkdir(mode=0o700)
    me = os.geteuid()
    monkeypatch.setattr(store.os, "geteuid", lambda: me + 1)
    with pytest.raises(DatasetError, match="belongs to another user"):
        store.open_or_build(folder, "x", KEY, 80, SHAPE, _batches())
    link = tmp_path / "link"
    link.symlink_to(folder)
    with pytest.raises(DatasetError, match="symbolic link owned by another user"):
        store.open_or_build(link, "x", KEY, 80, SHAPE, _batches())
    monkeypatch.setattr(store.os, "geteuid", lambda: me)
    assert store.open_or_build(Path(link), "x", KEY, 80, SHAPE, _batches()).n == 80
