"""Untrusted checkpoints, safetensors, path escapes, the run lock and leftovers (issue 7).

End to end through ``dtprobe analyze`` (``dtprobe.cli.main``): a checkpoint that would run code
when unpickled is refused and its payload never runs; ``.safetensors`` checkpoints analyse to
the same numbers as the ``torch.save`` files they were converted from, under every file naming
and through the manifest; a sha256 mismatch refuses that checkpoint only (cached results of the
recorded file are not trusted for a changed file); symbolic links out of the run directory are
refused unless ``--follow-symlinks``; a second analysis waits on the run's lock or, with
``--no-wait``, says the run is busy; temporary files a killed writer left are removed and never
read as results or checkpoints.
"""

from __future__ import annotations

import builtins
import fcntl
import json
import os
import pickle
import shutil
import threading
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
from safetensors.torch import save_file

import checkpoints_manifest as cm
from dtprobe import analysis
from dtprobe import checkpoints as ck
from dtprobe.cli import main
from dtprobe.training import trainer
from tests.helpers import TINY, checkpoint_file, copy_run, train_tiny

DATA_ARGS = [a for k, v in TINY.items() for a in ("--dataset-param", f"{k}={v}")]
FAST = ["source_accuracy", "class_separation"]
RUN_ARGS = ["--device", "cpu", "--no-progress", "--no-plot", "--metrics", *FAST]
PLAIN = ["--arch", "small_cnn", "--num-classes", "6", "--dataset", "shapes", *DATA_ARGS,
         "--arch-param", "width=8", "--arch-param", "feature_dim=16"]
PLAIN_KW = dict(arch="small_cnn", num_classes=6, dataset="shapes", dataset_params=dict(TINY),
                arch_params={"width": 8, "feature_dim": 16})
KEY = ["epoch", "metric", "task", "layer"]
EPOCHS = [0, 1, 2]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny trained run (checkpoints at epochs 0, 1, 2) and its clean analysis table."""
    out = tmp_path_factory.mktemp("rel") / "run"
    train_tiny(out)
    clean = out.parent / "clean"
    shutil.copytree(out, clean)
    res = analysis.analyze(clean, metrics=FAST, device="cpu", progress=False, plot=False)
    return {"dir": out, "table": res.table}


def _state(run_dir: Path, epoch: int) -> dict[str, torch.Tensor]:
    return torch.load(checkpoint_file(run_dir, epoch), weights_only=True)["model"]


def _values(table: pd.DataFrame, epochs=None) -> pd.DataFrame:
    t = table if epochs is None else table[table["epoch"].isin(epochs)]
    t = t[~t["metric"].str.startswith("cka_")] if epochs is not None else t
    return t[[*KEY, "value"]].sort_values(KEY).reset_index(drop=True)


def _read(run_dir: Path) -> pd.DataFrame:
    return pd.read_csv(run_dir / "analysis" / "metrics.csv", keep_default_na=False)


# --------------------------------------------------------------------------- untrusted files
class _Payload:
    """Unpickling this calls exec(), which creates ``marker``: arbitrary code execution."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (builtins.exec, (f"open({self.marker!r}, 'w').close()",))


@pytest.mark.parametrize("layout", ["manifest", "file names"])
@pytest.mark.parametrize("how", ["torch.save", "raw pickle"])
def test_code_in_a_checkpoint_never_runs_through_analyze(run, tmp_path, capsys, layout, how):
    marker = tmp_path / "pwned"
    if layout == "manifest":
        run_dir = copy_run(run["dir"], tmp_path / "run")
        bad = checkpoint_file(run_dir, 1)
        args = RUN_ARGS
    else:
        run_dir = tmp_path / "run"
        run_dir.mkdir()
        for e in EPOCHS:
            shutil.copyfile(checkpoint_file(run["dir"], e), run_dir / f"ckpt_epoch_{e}.pth")
        bad = run_dir / "ckpt_epoch_1.pth"
        args = [*RUN_ARGS, *PLAIN]
    if how == "torch.save":
        torch.save({"model": _state(run["dir"], 1), "epoch": 1, "hook": _Payload(marker)}, bad)
    else:
        bad.write_bytes(pickle.dumps({"model": _Payload(marker)}))
    if layout == "manifest":  # the attacker controls the manifest too: its sha256 matches
        cm.record_checkpoint(run_dir, bad, epoch=1, step=1, replace=True)
    code = main(["analyze", str(run_dir), *args])
    err = capsys.readouterr().err
    assert code == 1
    assert not marker.exists(), "the checkpoint's code ran"
    failed = [ln for ln in err.splitlines() if ln.startswith("FAILED")]
    assert len(failed) == 1 and f"{bad}: refusing to unpickle it" in failed[0]
    assert "could run arbitrary code" in failed[0] and "re-save it" in failed[0]
    assert how != "torch.save" or "(it references exec)" in failed[0]
    failures = pd.read_csv(run_dir / "analysis" / "failures.csv")
    assert failures["epoch"].tolist() == [1] and "refusing" in failures["reason"].iloc[0]
    pd.testing.assert_frame_equal(_values(_read(run_dir), [0, 2]),
                                  _values(run["table"], [0, 2]))
    # Control: the payload is live, so the refusal is what kept it from running.
    pickle.loads(pickle.dumps(_Payload(marker)))
    assert marker.exists()


SAFETENSORS_NAMINGS = [n for n in ck.KNOWN_NAMINGS if n.endswith(".safetensors")]


@pytest.mark.parametrize("naming", SAFETENSORS_NAMINGS)
def test_safetensors_under_every_naming_gives_the_same_numbers(run, tmp_path, naming):
    run_dir = tmp_path / "st"
    (run_dir / "checkpoints").mkdir(parents=True)
    # Vary the layout too: DDP ("module.") and Lightning ("model.") key prefixes are stripped.
    prefix = {0: "", 1: "module.", 2: "model."}[SAFETENSORS_NAMINGS.index(naming) % 3]
    for e in EPOCHS:
        name = naming.replace("{epoch}", str(e)).replace("{step}", str(10 * e))
        where = run_dir / ("checkpoints" if e % 2 else "") / name
        save_file({prefix + k: v.contiguous() for k, v in _state(run["dir"], e).items()},
                  str(where), metadata={"epoch": str(e)})
    res = analysis.analyze(run_dir, metrics=FAST, device="cpu", progress=False, plot=False,
                           **PLAIN_KW)
    assert len(res.failures) == 0
    pd.testing.assert_frame_equal(_values(res.table), _values(run["table"]))


def test_safetensors_through_the_manifest_and_in_a_ckpt_named_file(run, tmp_path):
    run_dir = copy_run(run["dir"], tmp_path / "run")
    doc = json.loads((run_dir / "manifest.json").read_text())
    for entry in doc["checkpoints"]:
        e = entry["epoch"]
        # epoch 1 is safetensors content under a Lightning-style .ckpt name: content decides.
        rel = f"checkpoints/w_{e}.safetensors" if e != 1 else "checkpoints/epoch=1-step=8.ckpt"
        save_file({k: v.contiguous() for k, v in _state(run_dir, e).items()},
                  str(run_dir / rel))
        checkpoint_file(run_dir, e).unlink()
        entry["path"], entry["sha256"] = rel, cm.sha256_file(run_dir / rel)
    cm.write_manifest(run_dir, cm.Manifest.from_dict(doc))
    res = analysis.analyze(run_dir, metrics=FAST, device="cpu", progress=False, plot=False)
    assert len(res.failures) == 0
    pd.testing.assert_frame_equal(_values(res.table), _values(run["table"]))


def test_sha256_mismatch_refuses_that_checkpoint_even_when_results_are_cached(run, tmp_path,
                                                                               capsys):
    run_dir = copy_run(run["dir"], tmp_path / "run")
    assert main(["analyze", str(run_dir), *RUN_ARGS]) == 0  # features and parts cached
    state = _state(run_dir, 2)
    state["fc.bias"] += 1.0  # the file changes after it was recorded
    torch.save({"model": state, "epoch": 2}, checkpoint_file(run_dir, 2))
    code = main(["analyze", str(run_dir), *RUN_ARGS])
    err = capsys.readouterr().err
    assert code == 1
    line = next(ln for ln in err.splitlines() if ln.startswith("FAILED"))
    assert line.startswith(f"FAILED epoch 2: {checkpoint_file(run_dir, 2)}: sha256 ")
    assert "does not match the manifest" in line and "restore it or re-record" in line
    pd.testing.assert_frame_equal(_values(_read(run_dir), [0, 1]),
                                  _values(run["table"], [0, 1]))
    assert pd.read_csv(run_dir / "analysis" / "failures.csv")["epoch"].tolist() == [2]


# ------------------------------------------------------------------------------ path escapes
def test_symlinks_out_of_the_run_are_refused_unless_followed(run, tmp_path, capsys):
    run_dir = copy_run(run["dir"], tmp_path / "run")
    scratch = tmp_path / "scratch"
    shutil.move(run_dir / "checkpoints", scratch)  # checkpoints live on scratch storage
    (run_dir / "checkpoints").symlink_to(scratch, target_is_directory=True)
    code = main(["analyze", str(run_dir), *RUN_ARGS])
    err = capsys.readouterr().err
    assert code == 1 and "all 3 checkpoint(s) failed for one reason: " in err
    for line in (ln for ln in err.splitlines() if ln.startswith("FAILED")):
        assert "outside the run directory" in line and "--follow-symlinks" in line
    assert main(["analyze", str(run_dir), *RUN_ARGS, "--follow-symlinks"]) == 0
    pd.testing.assert_frame_equal(_values(_read(run_dir)), _values(run["table"]))


def test_one_file_symlinked_out_fails_alone_and_links_inside_are_fine(run, tmp_path, capsys):
    run_dir = copy_run(run["dir"], tmp_path / "run")
    outside = tmp_path / "secret.pt"
    shutil.move(checkpoint_file(run_dir, 1), outside)
    checkpoint_file(run_dir, 1).symlink_to(outside)
    inside = run_dir / "store" / "e2.pt"
    inside.parent.mkdir()
    shutil.move(checkpoint_file(run_dir, 2), inside)
    checkpoint_file(run_dir, 2).symlink_to(inside)
    assert main(["analyze", str(run_dir), *RUN_ARGS]) == 1
    failures = pd.read_csv(run_dir / "analysis" / "failures.csv")
    assert failures["epoch"].tolist() == [1]
    assert f"resolves to {outside}" in failures["reason"].iloc[0]
    assert sorted(_read(run_dir)["epoch"].unique()) == [0, 2]
    # The same without a manifest: one bad link does not stop the others being found.
    plain = tmp_path / "plain"
    plain.mkdir()
    shutil.copyfile(checkpoint_file(run["dir"], 0), plain / "model_0.pth")
    (plain / "model_1.pth").symlink_to(outside)
    assert main(["analyze", str(plain), *RUN_ARGS, *PLAIN]) == 1
    assert pd.read_csv(plain / "analysis" / "failures.csv")["epoch"].tolist() == [1]
    capsys.readouterr()


def test_manifest_paths_are_checked_when_planning(run, tmp_path):
    run_dir = copy_run(run["dir"], tmp_path / "run")
    for bad in ("../x.pt", "/abs/x.pt", "a/../../x.pt", "C:/x.pt", "a\\x.pt"):
        doc = json.loads((run_dir / "manifest.json").read_text())
        doc["checkpoints"][0]["path"] = bad
        (run_dir / "manifest.json").write_text(json.dumps(doc))
        with pytest.raises(cm.ManifestError, match=r"checkpoints\[0\]\.path must be a relative"):
            analysis.plan_run(run_dir)


# ------------------------------------------------------------------------------------- lock
def _hold_lock(run_dir: Path) -> int:
    (run_dir / "analysis").mkdir(exist_ok=True)
    fd = os.open(run_dir / "analysis" / analysis.LOCK_FILE, os.O_CREAT | os.O_RDWR, 0o644)
    fcntl.flock(fd, fcntl.LOCK_EX)
    os.write(fd, b"31337 cluster-node-7\n")
    return fd


def _release(fd: int) -> None:
    fcntl.flock(fd, fcntl.LOCK_UN)
    os.close(fd)


def test_no_wait_says_the_run_is_busy(run, tmp_path, capsys):
    run_dir = copy_run(run["dir"], tmp_path / "run")
    fd = _hold_lock(run_dir)
    try:
        code = main(["analyze", str(run_dir), *RUN_ARGS, "--no-wait"])
    finally:
        _release(fd)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert err[0].startswith(f"dtprobe analyze: error: {run_dir}: run is busy: another dtprobe "
                             "analyze (pid 31337 on cluster-node-7) is analysing it")
    assert not (run_dir / "analysis" / "metrics.csv").exists()
    assert main(["analyze", str(run_dir), *RUN_ARGS, "--no-wait"]) == 0  # free again


def test_second_analysis_waits_for_the_lock_and_says_so(run, tmp_path, capsys):
    run_dir = copy_run(run["dir"], tmp_path / "run")
    fd = _hold_lock(run_dir)
    result = {}
    worker = threading.Thread(target=lambda: result.setdefault("code", main(
        ["analyze", str(run_dir), *RUN_ARGS])))
    worker.start()
    seen = ""
    try:
        deadline = time.monotonic() + 60
        while "waiting" not in seen:
            assert time.monotonic() < deadline and worker.is_alive()
            time.sleep(0.02)
            seen += capsys.readouterr().err
        assert "another dtprobe analyze (pid 31337 on cluster-node-7) is analysing this run; " \
               "waiting for it to finish" in seen
        time.sleep(0.3)
        assert worker.is_alive() and not (run_dir / "analysis" / "metrics.csv").exists()
    finally:
        _release(fd)
    worker.join(120)
    assert result["code"] == 0 and "lock obtained after" in capsys.readouterr().err
    pd.testing.assert_frame_equal(_values(_read(run_dir)), _values(run["table"]))
    assert not (run_dir / "analysis" / analysis.LOCK_FILE).exists()  # removed on release


def test_compare_never_writes_into_the_other_run(run, tmp_path):
    this = copy_run(run["dir"], tmp_path / "this")
    other = copy_run(run["dir"], tmp_path / "other")
    before = sorted(p.relative_to(other) for p in other.rglob("*"))
    res = analysis.analyze(this, metrics=FAST, device="cpu", progress=False, plot=False,
                           compare=[other])
    assert sorted(p.relative_to(other) for p in other.rglob("*")) == before
    cka = res.table[res.table["metric"] == "cka_to_run"]
    assert cka["epoch"].tolist() == EPOCHS
    assert cka["value"].tolist() == pytest.approx([1.0] * 3)  # same weights, same features


# ------------------------------------------------------------------------- leftovers, parts
def test_leftover_temp_files_are_removed_and_never_read(run, tmp_path, capsys):
    run_dir = copy_run(run["dir"], tmp_path / "run")
    assert main(["analyze", str(run_dir), *RUN_ARGS]) == 0
    out = run_dir / "analysis"
    parts = sorted((out / "parts").glob("*.json"))
    leftovers = [out / ".metrics.csv.4242.tmp", out / "parts" / ".epoch_000001.json.k2j.tmp",
                 out / "features" / "0123abcd.safetensors.4242.tmp",
                 out / ".tradeoff.png.4242.tmp"]
    for path in leftovers:
        path.write_text("partial")
    (out / "metrics.csv").unlink()
    parts[0].write_text('{"key": "00", "ro')  # torn by something outside dtprobe
    assert main(["analyze", str(run_dir), *RUN_ARGS]) == 0
    out_text = capsys.readouterr().out
    assert "metrics: 1 computed, 2 reused" in out_text
    assert not any(p.exists() for p in leftovers)
    pd.testing.assert_frame_equal(_values(_read(run_dir)), _values(run["table"]))


def test_temporary_checkpoint_files_are_never_taken_for_checkpoints(run, tmp_path):
    run_dir = tmp_path / "plain"
    (run_dir / "checkpoints").mkdir(parents=True)
    for e in EPOCHS:
        shutil.copyfile(checkpoint_file(run["dir"], e), checkpoint_file(run_dir, e))
    junk = ["checkpoints/.epoch_0003.pt.4242.tmp", "checkpoints/epoch_0004.pt.tmp",
            "epoch_0005.pt.partial", "checkpoints/epoch_0006.pt~", ".epoch_0007.pt"]
    for rel in junk:
        (run_dir / rel).write_bytes(b"half a checkpoint")
    for pattern in (None, "epoch_{epoch}*", "checkpoints/*{epoch}*"):
        series = ck.infer_checkpoint_series(run_dir, pattern=pattern)
        assert [c.epoch for c in series] == EPOCHS, pattern
    res = analysis.analyze(run_dir, metrics=FAST, device="cpu", progress=False, plot=False,
                           pattern="epoch_{epoch}*", **PLAIN_KW)
    assert len(res.failures) == 0 and sorted(res.table["epoch"].unique()) == EPOCHS


def test_trainer_removes_its_own_leftovers_only(tmp_path):
    (tmp_path / "checkpoints").mkdir()
    ours = [tmp_path / "checkpoints" / ".epoch_0002.pt.77.tmp", tmp_path / ".resume_state.pt.7.tmp",
            tmp_path / ".manifest.json.abc123.tmp", tmp_path / ".train_log.csv.7.tmp"]
    theirs = [tmp_path / "notes.tmp", tmp_path / "checkpoints" / "epoch_0002.pt",
              tmp_path / ".hidden"]
    for p in ours + theirs:
        p.write_text("x")
    removed = trainer.remove_stale_temp_files(tmp_path)
    assert sorted(removed) == sorted(ours)
    assert all(p.exists() for p in theirs)


def test_manifest_writer_removes_temp_files_of_a_killed_writer(tmp_path):
    m = cm.create_manifest(run_name="r", model=cm.ModelSpec("small_cnn", 6), dataset="shapes")
    cm.write_manifest(tmp_path, m)
    stale = tmp_path / ".manifest.json.x1y2z3.tmp"
    stale.write_text('{"format": "checkpoints-man')
    other = tmp_path / ".other.json.x1y2z3.tmp"
    other.write_text("not ours")
    cm.append_checkpoint(tmp_path, cm.CheckpointEntry(epoch=1, step=1, path="a.pt"))
    assert not stale.exists() and other.exists()
    assert cm.read_manifest(tmp_path).epochs == [1]


def test_oversized_manifest_is_refused_unread(tmp_path, monkeypatch):
    from checkpoints_manifest import storage

    (tmp_path / "manifest.json").write_text(" " * 2048)
    monkeypatch.setattr(storage, "MAX_MANIFEST_BYTES", 1024)
    with pytest.raises(cm.ManifestError, match="larger than any manifest"):
        cm.read_manifest(tmp_path)
