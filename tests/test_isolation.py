"""Isolation that does not depend on exception classes (issue 25, part 1).

Every place where one item (a checkpoint, a downstream dataset, a checkpoint on one dataset, a
metric, a similarity measure, a compared checkpoint) fails alone is made to fail with an
exception class no library would list (``Weird``); the rest must be analysed and the failure
recorded on one line. Then the cases that must *not* be contained (Ctrl-C, a full disk), out of
memory (its own message), ``--debug`` (the traceback kept), and the real decompression-bomb
folder end to end.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import struct
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from dtprobe import analysis
from dtprobe.analysis import downstream, pipeline, similarity
from dtprobe.cli import main
from dtprobe.metrics import registry
from dtprobe.runtime import isolation
from tests.helpers import copy_run, train_tiny

FAST = ["source_accuracy", "class_separation"]
RUN_ARGS = ["--device", "cpu", "--no-progress", "--no-plot", "--metrics", *FAST]
TEX = "textures:n_train=60,n_test=30"
DS_FAST = ["probe_accuracy"]


class Weird(Exception):
    """An exception class no isolation site could have listed."""


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("iso") / "run"
    train_tiny(out)
    return out


def _fail_epoch_1(monkeypatch, make_exc) -> None:
    """Make feature extraction of the epoch-1 checkpoint raise ``make_exc()``."""
    real = pipeline.checkpoint_features

    def failing(plan, ckpt, *args, **kwargs):
        if ckpt.epoch == 1:
            raise make_exc()
        return real(plan, ckpt, *args, **kwargs)

    monkeypatch.setattr(pipeline, "checkpoint_features", failing)


def _table(run_dir: Path) -> pd.DataFrame:
    return pd.read_csv(run_dir / "analysis" / "metrics.csv", keep_default_na=False)


def _failures(run_dir: Path) -> pd.DataFrame:
    return pd.read_csv(run_dir / "analysis" / "failures.csv", keep_default_na=False)


def _analyze(run_dir: Path, **kw):
    kw = {"metrics": FAST, "device": "cpu", "progress": False, "plot": False, **kw}
    return analysis.analyze(run_dir, **kw)


# ------------------------------------------------------------------------ the classifier
def test_contain_classifies_by_what_happened_not_by_class():
    f = isolation.contain(Weird("odd\nthing"), "file.pt", "it is skipped")
    assert not f.expected and f.exception == "Weird"
    assert f.reason.startswith("file.pt: unexpected Weird (odd thing); it is skipped")
    assert "\n" not in f.reason
    from dtprobe.errors import DatasetError

    f = isolation.contain(DatasetError("x: cannot read it; fix it"), "file.pt")
    assert f.expected and f.reason == "x: cannot read it; fix it"
    f = isolation.contain(MemoryError(), "file.pt")
    assert "out of memory" in f.reason and "--batch-size" in f.reason and not f.expected
    f = isolation.contain(OSError(errno.EACCES, "denied"), "img.png")  # the item's, not the disk's
    assert "PermissionError" in f.reason
    f = isolation.contain(OSError("image file is truncated"), "img.png")  # errno None (PIL)
    assert "truncated" in f.reason
    for exc in (OSError(errno.ENOSPC, "No space left on device"),
                OSError(errno.EROFS, "Read-only file system"), KeyboardInterrupt(),
                SystemExit(3)):
        with pytest.raises(type(exc)):
            isolation.contain(exc, "file.pt")


# ------------------------------------------------------------------------------ each site
def test_weird_exception_in_one_checkpoint_fails_it_alone(run, tmp_path, capsys, monkeypatch):
    run_dir = copy_run(run, tmp_path / "run")
    _fail_epoch_1(monkeypatch, lambda: Weird("a library's own error class"))
    code = main(["analyze", str(run_dir), *RUN_ARGS, "--no-cache"])
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err
    assert sorted(_table(run_dir)["epoch"].unique()) == [0, 2]
    (reason,) = _failures(run_dir)["reason"]
    assert "unexpected Weird (a library's own error class)" in reason
    assert "this checkpoint is skipped" in reason and "\n" not in reason


def test_weird_exception_loading_one_downstream_dataset(run, tmp_path, monkeypatch):
    run_dir = copy_run(run, tmp_path / "run")
    real = downstream.load_downstream

    def odd(spec, *args, **kwargs):
        if spec.name == "bad":
            raise Weird("cannot load")
        return real(spec, *args, **kwargs)

    monkeypatch.setattr(downstream, "load_downstream", odd)
    res = _analyze(run_dir, downstream=[f"{TEX},name=bad", f"{TEX},name=good"],
                   downstream_metrics=DS_FAST)
    tasks = set(res.table["task"])
    assert "good" in tasks and "bad" not in tasks
    assert set(res.table["epoch"]) == {0, 1, 2} and "source_accuracy" in set(res.table["metric"])
    (row,) = res.failures.to_dict("records")
    assert row["epoch"] == "" and "unexpected Weird (cannot load)" in row["reason"]
    assert res.stats.failed == 0 and res.stats.downstream_failed == 1


def test_weird_exception_on_one_checkpoint_of_one_dataset(run, tmp_path, monkeypatch):
    run_dir = copy_run(run, tmp_path / "run")
    real = downstream.process_downstream

    def odd(plan, ckpt, ds, *args, **kwargs):
        if ckpt.epoch == 1 and ds.spec.name == "a":
            raise Weird("only here")
        return real(plan, ckpt, ds, *args, **kwargs)

    monkeypatch.setattr(downstream, "process_downstream", odd)
    res = _analyze(run_dir, downstream=[f"{TEX},name=a", f"{TEX},name=b"],
                   downstream_metrics=DS_FAST)
    t = res.table
    assert sorted(t[t["task"] == "a"]["epoch"]) == [0, 2]
    assert sorted(t[t["task"] == "b"]["epoch"]) == [0, 1, 2]
    (row,) = res.failures.to_dict("records")
    assert row["epoch"] == 1 and row["reason"].startswith("downstream a: ")
    assert "unexpected Weird (only here)" in row["reason"]


def test_weird_exception_in_one_metric_costs_that_metric_only_and_is_retried(run, tmp_path,
                                                                            monkeypatch):
    run_dir = copy_run(run, tmp_path / "run")
    spec = registry._REGISTRY["class_separation"]

    def odd(view):
        raise Weird("inside the metric")

    monkeypatch.setitem(registry._REGISTRY, "class_separation",
                        dataclasses.replace(spec, func=odd))
    with pytest.warns(UserWarning, match="unexpected Weird"):
        res = _analyze(run_dir, layers=["features.4"])
    t = res.table
    bad = t[t["metric"] == "class_separation"]
    assert len(bad) == 6 and bad["value"].isna().all()  # 3 epochs x (penultimate + features.4)
    assert all(json.loads(d)["exception"] == "Weird" for d in bad["diagnostics"])
    good = t[t["metric"] == "source_accuracy"]
    assert len(good) == 3 and np.isfinite(good["value"]).all()
    assert res.failures.empty
    # the metric is fixed: the next analysis computes it (nothing was cached with the failure)
    monkeypatch.setitem(registry._REGISTRY, "class_separation", spec)
    res = _analyze(run_dir, layers=["features.4"])
    again = res.table[res.table["metric"] == "class_separation"]
    assert len(again) == 6 and np.isfinite(again["value"]).all()
    assert res.stats.metrics_computed == 3 and res.stats.features_reused == 3


def test_weird_exception_in_one_similarity_measure():
    spec = registry.resolve_metrics(["cka_debiased"])[0] if "cka_debiased" in \
        registry.available_metrics() else next(
            s for s in registry.available_metrics().values() if s.similarity is not None
            and s.name != "linear_cka")

    def odd(x, y):
        raise Weird("no")

    broken = dataclasses.replace(spec, similarity=dataclasses.replace(spec.similarity, func=odd))
    x = torch.randn(20, 4)
    (row,) = similarity.similarity_measure_rows({"run": "r"}, "to_final", x, x, [broken], {})
    assert np.isnan(row["value"]) and row["estimator"] == "error"
    assert "unexpected Weird (no)" in json.loads(row["params"])["error"]


def test_weird_exception_in_one_compared_checkpoint(run, tmp_path, monkeypatch, capsys):
    run_dir = copy_run(run, tmp_path / "a" / "run")
    other = copy_run(run, tmp_path / "b" / "run")
    real = similarity.checkpoint_features

    def odd(plan, ckpt, *args, **kwargs):
        if plan.run_dir == other and ckpt.epoch == 1:
            raise Weird("other run")
        return real(plan, ckpt, *args, **kwargs)

    monkeypatch.setattr(similarity, "checkpoint_features", odd)
    res = _analyze(run_dir, compare=[other])
    rows = res.table[res.table["metric"] == "cka_to_run"]
    assert sorted(rows["epoch"]) == [0, 2]
    assert "unexpected Weird (other run)" in capsys.readouterr().err


def test_parts_and_image_store_reads_treat_any_exception_as_a_miss(tmp_path, monkeypatch):
    import checkpoints_manifest as cm
    from dtprobe.analysis.resume import PartStore
    from dtprobe.data import store

    parts = PartStore(tmp_path / "parts")
    parts.put(1, "k", [])

    def odd(*args, **kwargs):
        raise Weird("read")

    monkeypatch.setattr(cm, "read_regular_file", odd)
    assert parts.get(1, "k") is None
    footer = b"{}"  # a well-formed tail, so that reading reaches the footer's parser
    (tmp_path / "s.u8").write_bytes(b"x" * 64 + footer + len(footer).to_bytes(8, "little")
                                    + store.MAGIC)
    monkeypatch.setattr(store, "json", type("J", (), {"loads": staticmethod(odd)}))
    assert store._open_verified(tmp_path / "s.u8", "k") is None


# ------------------------------------------------------------- what is not contained
def test_ctrl_c_and_a_full_disk_still_end_the_analysis(run, tmp_path, monkeypatch, capsys):
    run_dir = copy_run(run, tmp_path / "run")
    raised = {"exc": KeyboardInterrupt()}
    _fail_epoch_1(monkeypatch, lambda: raised["exc"])
    assert main(["analyze", str(run_dir), *RUN_ARGS]) == 130
    raised["exc"] = OSError(errno.ENOSPC, "No space left on device")
    assert main(["analyze", str(run_dir), *RUN_ARGS]) == 2
    err = capsys.readouterr().err
    assert "free some space" in err and "Traceback" not in err


def test_out_of_memory_reaching_a_checkpoint_says_what_to_lower(run, tmp_path, monkeypatch):
    run_dir = copy_run(run, tmp_path / "run")
    _fail_epoch_1(monkeypatch, lambda: torch.cuda.OutOfMemoryError(
        "CUDA out of memory. Tried to allocate 2 GiB"))
    res = _analyze(run_dir)
    (reason,) = res.failures["reason"]
    assert "out of memory" in reason and "--batch-size" in reason
    assert "unexpected" not in reason
    assert sorted(res.table["epoch"].unique()) == [0, 2]


def test_debug_prints_the_traceback_of_a_contained_failure(run, tmp_path, monkeypatch, capsys):
    run_dir = copy_run(run, tmp_path / "run")
    _fail_epoch_1(monkeypatch, lambda: Weird("deep"))
    try:
        assert main(["--debug", "analyze", str(run_dir), *RUN_ARGS]) == 1
    finally:
        isolation.set_debug(False)
    err = capsys.readouterr().err
    assert "Traceback" in err and "Weird: deep" in err
    assert sorted(_table(run_dir)["epoch"].unique()) == [0, 2]


# --------------------------------------------------- the decompression bomb, end to end
def _png_claiming(path: Path, width: int, height: int) -> None:
    """A PNG whose header claims ``width x height`` pixels (the data is a few bytes)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data)))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
                     + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b""))


@pytest.mark.parametrize("store", ["none", "stores"])
def test_decompression_bomb_folder_fails_alone(run, tmp_path, capsys, store):
    from PIL import Image

    folder = tmp_path / "bomb"
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in range(2):
            d = folder / split / f"c{c}"
            d.mkdir(parents=True)
            for i in range(3):
                Image.fromarray(rng.integers(0, 255, (20, 20, 3), np.uint8)).save(d / f"{i}.png")
    _png_claiming(folder / "train" / "c0" / "bomb.png", 65_000, 65_000)
    run_dir = copy_run(run, tmp_path / "run")
    image_store = "none" if store == "none" else str(tmp_path / store)
    code = main(["analyze", str(run_dir), *RUN_ARGS, "--image-store", image_store,
                 "--downstream", f"imagefolder:root={folder},image_size=16,name=bombs", TEX,
                 "--downstream-metrics", *DS_FAST])
    out = capsys.readouterr()
    assert code == 1 and "Traceback" not in out.err
    table = _table(run_dir)
    assert {"source_accuracy", "class_separation"} <= set(table["metric"])
    assert sorted(table[table["task"] == "textures"]["epoch"]) == [0, 1, 2]
    assert "bombs" not in set(table["task"])
    (row,) = _failures(run_dir).to_dict("records")
    assert row["epoch"] == "" and "decompression bomb" in row["reason"].lower()
    assert "1 downstream dataset or checkpoint x dataset failure(s)" in out.err
    assert "checkpoint(s) failed" not in out.err
