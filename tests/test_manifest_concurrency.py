"""Several processes and ranks writing one manifest at once (issue 25, item 7): no entry lost,
none duplicated, and under torch.distributed only rank 0 writes."""

from __future__ import annotations

import multiprocessing as mp
import os
import socket
import time
from pathlib import Path

import pytest
import torch

import checkpoints_manifest as cm

WRITERS, EACH = 4, 20
SPEC = dict(arch="small_cnn", num_classes=6, dataset="shapes",
            arch_params={"width": 4, "feature_dim": 8})


def _ctx():
    return mp.get_context("spawn")  # a fresh interpreter per writer, as separate jobs would be


def _run(target, args_list, timeout: float = 120) -> None:
    procs = [_ctx().Process(target=target, args=args) for args in args_list]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout)
    assert [p.exitcode for p in procs] == [0] * len(procs)


def _recorder_writer(run: str, wid: int, barrier) -> None:
    from dtprobe.integrations import CheckpointRecorder
    from dtprobe.models.registry import build_model

    torch.manual_seed(wid)
    model = build_model("small_cnn", num_classes=6, width=4, feature_dim=8)
    rec = CheckpointRecorder(run, folder=f"w{wid}", **SPEC)
    barrier.wait()  # all start together, on a run with no manifest yet
    for i in range(EACH):
        rec.save(model, epoch=wid * EACH + i, step=i)


def _record_writer(run: str, wid: int, barrier) -> None:
    run_dir = Path(run)
    barrier.wait()
    for i in range(EACH):
        f = run_dir / f"p{wid}_{i}.bin"
        cm.atomic_write_bytes(f, f"{wid}-{i}".encode())
        cm.record_checkpoint(run_dir, f, epoch=wid * EACH + i, step=i)


def _check(run: Path) -> cm.Manifest:
    m = cm.read_manifest(run)
    epochs = [c.epoch for c in m.checkpoints]
    assert len(epochs) == WRITERS * EACH
    assert sorted(epochs) == list(range(WRITERS * EACH))
    assert len({c.path for c in m.checkpoints}) == WRITERS * EACH
    for c in m.checkpoints:  # each entry names the bytes in its file
        assert cm.sha256_file(run / c.path) == c.sha256
    leftovers = [p.name for p in run.iterdir() if p.name.startswith(".")]
    assert leftovers == []  # no lock file or temporary file stays behind
    return m


def test_recorders_in_four_processes_creating_one_manifest_lose_nothing(tmp_path):
    run = tmp_path / "run"  # not created: the first save of every writer creates it
    barrier = _ctx().Barrier(WRITERS)
    _run(_recorder_writer, [(str(run), w, barrier) for w in range(WRITERS)])
    m = _check(run)
    assert m.model.arch == "small_cnn" and m.model.kwargs == SPEC["arch_params"]


def test_record_checkpoint_from_four_processes_loses_nothing(tmp_path):
    run = tmp_path / "run"
    cm.write_manifest(run, cm.create_manifest(run_name="r", model=cm.ModelSpec("small_cnn", 6),
                                              dataset="shapes"))
    barrier = _ctx().Barrier(WRITERS)
    _run(_record_writer, [(str(run), w, barrier) for w in range(WRITERS)])
    _check(run)


def _pruner(run: str, barrier) -> None:
    from dtprobe.integrations.lightning import _forget

    barrier.wait()
    for i in range(EACH):  # Lightning's top-k pruning of files written before the race
        _forget(Path(run), str(Path(run) / f"old{i}.bin"))


def test_lightning_pruning_while_others_append_loses_no_appended_entry(tmp_path):
    run = tmp_path / "run"
    cm.write_manifest(run, cm.create_manifest(run_name="r", model=cm.ModelSpec("small_cnn", 6),
                                              dataset="shapes"))
    for i in range(EACH):
        f = run / f"old{i}.bin"
        f.write_bytes(b"old%d" % i)
        cm.record_checkpoint(run, f, epoch=1000 + i, step=i)
    barrier = _ctx().Barrier(WRITERS)
    args = [(str(run), w, barrier) for w in range(WRITERS - 1)]
    procs = [_ctx().Process(target=_record_writer, args=a) for a in args]
    procs.append(_ctx().Process(target=_pruner, args=(str(run), barrier)))
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0] * len(procs)
    m = cm.read_manifest(run)
    assert sorted(c.epoch for c in m.checkpoints) == list(range((WRITERS - 1) * EACH))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank(run: str, rank: int, world: int, port: int) -> None:
    import torch.distributed as dist

    from dtprobe.integrations import CheckpointRecorder
    from dtprobe.models.registry import build_model

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.manual_seed(rank)  # different weights per rank: a rank > 0 file would show
        model = build_model("small_cnn", num_classes=6, width=4, feature_dim=8)
        rec = CheckpointRecorder(run, **SPEC)
        shas = []
        for epoch in range(3):
            for turn in range(world):  # rank 0 first: a later rank that wrote would replace it
                if turn == rank:
                    path = rec.save(model, epoch=epoch, step=epoch)
                    assert path.name == f"epoch_{epoch:04d}.safetensors"
                    if rank == 0:
                        shas.append(cm.sha256_file(path))
                dist.barrier()
        if rank == 0:
            Path(run, "rank0.sha").write_text(" ".join(shas))
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed missing")
def test_under_torch_distributed_only_rank_0_writes(tmp_path):
    run = tmp_path / "run"
    port = _free_port()
    _run(_rank, [(str(run), r, 2, port) for r in range(2)])
    m = cm.read_manifest(run)
    assert [c.epoch for c in m.checkpoints] == [0, 1, 2]
    files = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert files == [f"epoch_{e:04d}.safetensors" for e in range(3)]
    assert [c.sha256 for c in m.checkpoints] == (run / "rank0.sha").read_text().split()


def test_two_writers_creating_the_manifest_at_once_keep_both_entries(tmp_path, monkeypatch):
    """Writer A has seen "no manifest" and is building one when writer B creates it and
    appends: A must not then write its empty manifest over B's entry (it did before the check
    and the creation shared one lock)."""
    import threading

    from dtprobe.integrations import loop

    run = tmp_path / "run"
    b_done, real_create = threading.Event(), cm.create_manifest
    first = {"a": True}

    def slow_create(**kwargs):
        if first.pop("a", False):  # writer A only: give B time to finish, if it can
            b_done.wait(1.0)
        return real_create(**kwargs)

    monkeypatch.setattr(loop.cm, "create_manifest", slow_create)

    def writer_b():
        loop.ensure_manifest(run, **SPEC)
        (run / "b.bin").write_bytes(b"b")
        cm.record_checkpoint(run, run / "b.bin", epoch=7, step=7)
        b_done.set()

    a = threading.Thread(target=loop.ensure_manifest, args=(run,), kwargs=SPEC)
    a.start()
    while first:  # A is inside create_manifest (past its look at the run directory)
        time.sleep(0.001)
    b = threading.Thread(target=writer_b)
    b.start()
    a.join(30)
    b.join(30)
    assert [c.epoch for c in cm.read_manifest(run).checkpoints] == [7]


def test_update_manifest_is_a_locked_read_modify_write(tmp_path):
    run = tmp_path / "run"
    assert cm.update_manifest(run, lambda m: None) is None
    assert not (run / "manifest.json").exists()
    made = cm.update_manifest(run, lambda m: cm.create_manifest(
        run_name="r", model=cm.ModelSpec("small_cnn", 6), dataset="shapes"))
    assert cm.read_manifest(run).run_name == made.run_name == "r"
    with pytest.raises(cm.ManifestError, match="run_name"):  # validated before it is written
        cm.update_manifest(run, lambda m: cm.Manifest.from_dict(
            {**m.to_dict(), "run_name": 5}, "<dict>"))
    assert cm.read_manifest(run).run_name == "r"
