"""Security and crash isolation (issue 17): one test group per attack class.

1. writing through planted links (every name dtprobe writes, the analysis folder, temp names);
2. verify-then-use races and forged cache entries (the bytes hashed are the bytes loaded; caches
   are sealed; ``--no-cache`` reuses nothing);
3. one malformed checkpoint (float8, meta, sparse, quantized, stride-0 giant, any exception)
   fails alone;
4. hostile manifests (FIFO, /dev/zero, surrogates, huge or ill-typed numbers, nesting, download);
5. environment errors (disk full, read-only resume, closed pipe) and links re-checked at use;
6. messages (unsafe pickles refused as such, short resume-state line, clear lines for empty /
   random files, quantized reason whole, loops without --follow-symlinks, no 401-digit numbers).
"""

from __future__ import annotations

import errno
import io
import json
import os
import pickle
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import checkpoints_manifest as cm
from checkpoints_manifest import storage
from dtprobe import checkpoints as ck
from dtprobe.analysis import AnalysisOptions, analyze_plan, plan_run
from dtprobe.analysis.plan import check_plan
from dtprobe.analysis.resume import PartStore
from dtprobe.checkpoints import reader
from dtprobe.cli import main
from dtprobe.errors import CheckpointError, ConfigError
from dtprobe.features.extract import FeatureCache
from dtprobe.training.trainer import train
from tests.helpers import TINY, checkpoint_file, copy_run, tiny_config

FAST = ["--metrics", "source_accuracy", "class_separation"]
RUN_ARGS = ["--device", "cpu", "--no-progress", *FAST]
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny trained run (epochs 0, 1, 2) and the table of its clean analysis."""
    out = tmp_path_factory.mktemp("sec") / "run"
    train(tiny_config(out))
    clean = out.parent / "clean"
    shutil.copytree(out, clean)
    assert main(["analyze", str(clean), *RUN_ARGS]) == 0
    return {"dir": clean, "table": _table(clean)}  # with its feature cache and parts


def _table(run_dir: Path) -> pd.DataFrame:
    return pd.read_csv(run_dir / "analysis" / "metrics.csv", keep_default_na=False)


def _values(table: pd.DataFrame) -> pd.DataFrame:
    keep = table[~table["metric"].str.startswith("cka_")]
    return keep[["epoch", "metric", "task", "layer", "value"]].reset_index(drop=True)


def _rerecord(run_dir: Path, epoch: int) -> None:
    entry = cm.read_manifest(run_dir).get(epoch)
    cm.append_checkpoint(run_dir, cm.entry_for_file(run_dir, checkpoint_file(run_dir, epoch),
                                                    epoch=epoch, step=entry.step), replace=True)


def _state(run_dir: Path, epoch: int) -> dict[str, torch.Tensor]:
    return torch.load(checkpoint_file(run_dir, epoch), weights_only=True)["model"]


def _one_line_error(capsys, code: int) -> str:
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 2, err
    assert "Traceback" not in err
    errors = [ln for ln in lines if ": error: " in ln]
    assert len(errors) == 1, err
    return errors[0]


# ============================================================ 1. writing through planted links
def _victim(tmp_path: Path) -> Path:
    victim = tmp_path / "outside" / "precious.txt"
    victim.parent.mkdir(exist_ok=True)
    victim.write_text("do not touch\n")
    return victim


@pytest.mark.parametrize("name", ["metrics.csv", "failures.csv", "cka_matrix.csv",
                                  "tradeoff.png", "parts/epoch_000001.json"])
def test_links_planted_at_result_names_are_replaced_not_written_through(run, tmp_path, name):
    run_dir = copy_run(run["dir"], tmp_path / "run", with_analysis=True)
    victim = _victim(tmp_path)
    target = run_dir / "analysis" / name
    target.parent.mkdir(parents=True, exist_ok=True)
    target.unlink(missing_ok=True)
    target.symlink_to(victim)
    if name == "failures.csv":  # make one checkpoint fail so that failures.csv is written
        checkpoint_file(run_dir, 1).write_bytes(b"")
        _rerecord(run_dir, 1)
    code = main(["analyze", str(run_dir), *RUN_ARGS, "--no-cache"])
    assert code in (0, 1)
    assert victim.read_text() == "do not touch\n"
    assert not target.is_symlink() and target.is_file()


def test_links_planted_at_feature_names_and_old_temp_names_are_never_followed(run, tmp_path):
    run_dir = copy_run(run["dir"], tmp_path / "run", with_analysis=True)
    victim = _victim(tmp_path)
    features = run_dir / "analysis" / "features"
    names = [p.name for p in features.iterdir()]
    for name in names:
        (features / name).unlink()
        (features / name).symlink_to(victim)
    # The temp names of earlier versions were predictable (NAME.<pid>.tmp): plant them all.
    analysis_dir = run_dir / "analysis"
    for final in ("metrics.csv", "tradeoff.png", "cka_matrix.csv"):
        (analysis_dir / f".{final}.{os.getpid()}.tmp").symlink_to(victim)
    assert main(["analyze", str(run_dir), *RUN_ARGS]) == 0
    assert victim.read_text() == "do not touch\n"
    assert all((features / n).is_file() and not (features / n).is_symlink() for n in names)
    pd.testing.assert_frame_equal(_values(_table(run_dir)), _values(run["table"]))


def test_lock_planted_as_link_is_refused_and_its_target_untouched(run, tmp_path, capsys):
    run_dir = copy_run(run["dir"], tmp_path / "run", with_analysis=True)
    victim = _victim(tmp_path)
    (run_dir / "analysis" / ".lock").unlink(missing_ok=True)
    (run_dir / "analysis" / ".lock").symlink_to(victim)
    line = _one_line_error(capsys, main(["analyze", str(run_dir), *RUN_ARGS]))
    assert ".lock: is a symbolic link" in line and "remove it" in line
    assert victim.read_text() == "do not touch\n"


def test_lock_planted_as_hard_link_is_refused(run, tmp_path, capsys):
    run_dir = copy_run(run["dir"], tmp_path / "run", with_analysis=True)
    victim = _victim(tmp_path)
    (run_dir / "analysis" / ".lock").unlink(missing_ok=True)
    os.link(victim, run_dir / "analysis" / ".lock")
    line = _one_line_error(capsys, main(["analyze", str(run_dir), *RUN_ARGS]))
    assert "not a plain file of its own" in line
    assert victim.read_text() == "do not touch\n"


@pytest.mark.parametrize("folder", ["analysis", "analysis/features", "analysis/parts"])
def test_analysis_folders_linked_out_of_the_run_are_refused(run, tmp_path, capsys, folder):
    run_dir = copy_run(run["dir"], tmp_path / "run", with_analysis=True)
    elsewhere = tmp_path / "elsewhere"
    shutil.copytree(run_dir / folder, elsewhere)
    before = sorted(p.name for p in elsewhere.rglob("*"))
    (elsewhere / ".metrics.csv.1.tmp").write_text("a stale temp name: must not be deleted")
    shutil.rmtree(run_dir / folder)
    (run_dir / folder).symlink_to(elsewhere, target_is_directory=True)
    line = _one_line_error(capsys, main(["analyze", str(run_dir), *RUN_ARGS]))
    assert "outside the run" in line and "remove the link" in line
    assert sorted(p.name for p in elsewhere.rglob("*")) == sorted(before + [".metrics.csv.1.tmp"])


def test_analysis_folder_linked_inside_the_run_is_fine(run, tmp_path):
    run_dir = copy_run(run["dir"], tmp_path / "run", with_analysis=True)
    (run_dir / "analysis").rename(run_dir / "results_store")
    (run_dir / "analysis").symlink_to(run_dir / "results_store", target_is_directory=True)
    assert main(["analyze", str(run_dir), *RUN_ARGS]) == 0


def test_atomic_writer_replaces_a_planted_link_and_uses_unpredictable_names(tmp_path,
                                                                           monkeypatch):
    victim = _victim(tmp_path)
    path = tmp_path / "out.txt"
    path.symlink_to(victim)
    seen = []
    real = storage._mkstemp

    def spy(**kwargs):
        fd, name = real(**kwargs)
        seen.append(name)
        return fd, name

    monkeypatch.setattr(storage, "_mkstemp", spy)
    cm.atomic_write_text(path, "new\n")
    cm.atomic_write_bytes(path, b"newer\n")
    assert victim.read_text() == "do not touch\n"
    assert path.read_bytes() == b"newer\n" and not path.is_symlink()
    assert len(set(seen)) == 2 and all(str(os.getpid()) not in Path(s).name for s in seen)


def test_manifest_lock_planted_as_link_is_refused(tmp_path):
    victim = _victim(tmp_path)
    run_dir = tmp_path / "r"
    cm.write_manifest(run_dir, cm.create_manifest(run_name="r", model=cm.ModelSpec("m", 2),
                                                  dataset="shapes"))
    (run_dir / cm.LOCK_NAME).unlink(missing_ok=True)  # removed on release since issue 16
    (run_dir / cm.LOCK_NAME).symlink_to(victim)
    with pytest.raises(cm.ManifestError, match="symbolic link"):
        cm.append_checkpoint(run_dir, {"epoch": 0, "step": 0, "path": "a.pt"})
    assert victim.read_text() == "do not touch\n"


def test_train_resume_never_writes_through_planted_links(tmp_path):
    run_dir = tmp_path / "run"
    train(tiny_config(run_dir, epochs=1))
    victim = _victim(tmp_path)
    planted = [run_dir / "checkpoints" / "epoch_0002.pt", run_dir / "train_log.csv",
               run_dir / "resume_state.pt.tmp"]
    (run_dir / "train_log.csv").unlink()
    for pid in range(os.getpid() - 2, os.getpid() + 3):  # the old predictable temp names
        planted.append(run_dir / "checkpoints" / f".epoch_0002.pt.{pid}.tmp")
        planted.append(run_dir / f".resume_state.pt.{pid}.tmp")
    for link in planted:
        link.symlink_to(victim)
    train(tiny_config(run_dir, epochs=2, resume=True))
    assert victim.read_text() == "do not touch\n"
    ckpt = run_dir / "checkpoints" / "epoch_0002.pt"
    assert ckpt.is_file() and not ckpt.is_symlink()
    assert cm.read_manifest(run_dir).get(2).sha256 == cm.sha256_file(ckpt)


def test_train_refuses_a_checkpoints_folder_linked_elsewhere(tmp_path):
    run_dir = tmp_path / "run"
    train(tiny_config(run_dir, epochs=1))
    elsewhere = tmp_path / "elsewhere"
    (run_dir / "checkpoints").rename(elsewhere)
    (run_dir / "checkpoints").symlink_to(elsewhere, target_is_directory=True)
    before = sorted(p.name for p in elsewhere.iterdir())
    with pytest.raises(ConfigError, match="checkpoints: is a symbolic link"):
        train(tiny_config(run_dir, epochs=2, resume=True))
    assert sorted(p.name for p in elsewhere.iterdir()) == before


# ======================================================= 2. verify-then-use races and caches
def test_load_uses_the_verified_bytes_not_the_path_again(run, tmp_path):
    run_dir = copy_run(run["dir"], tmp_path / "run", with_analysis=True)
    blob = ck.read_checkpoint_bytes(checkpoint_file(run_dir, 1))
    # swapped after it was hashed
    shutil.copyfile(checkpoint_file(run_dir, 2), checkpoint_file(run_dir, 1))
    state = ck.load_state_dict(checkpoint_file(run_dir, 1), data=blob)
    original = _state(run["dir"], 1)
    assert all(torch.equal(state[k], original[k]) for k in original)
    with pytest.raises(CheckpointError, match="does not match the manifest"):
        ck.read_checkpoint_bytes(checkpoint_file(run_dir, 1), expected_sha256=blob.sha256)


def test_file_swapped_right_after_it_was_read_is_analysed_as_verified(run, tmp_path,
                                                                      monkeypatch):
    run_dir = copy_run(run["dir"], tmp_path / "run", with_analysis=True)
    shutil.rmtree(run_dir / "analysis", ignore_errors=True)
    swapped = []
    real_read = reader._read_all

    def read_then_swap(fd, path, limit):
        data = real_read(fd, path, limit)
        if Path(path) == checkpoint_file(run_dir, 1) and not swapped:
            shutil.copyfile(checkpoint_file(run_dir, 2), tmp_path / "swap")
            os.replace(tmp_path / "swap", checkpoint_file(run_dir, 1))  # the attacker's swap
            swapped.append(True)
        return data

    monkeypatch.setattr(reader, "_read_all", read_then_swap)
    assert main(["analyze", str(run_dir), *RUN_ARGS]) == 0
    assert swapped
    pd.testing.assert_frame_equal(_values(_table(run_dir)), _values(run["table"]))


def _swap_on_second_read(run_dir: Path, monkeypatch) -> list:
    """From its second read on, checkpoint 1's file holds checkpoint 2's bytes."""
    calls: list = []
    real_read = reader._read_all

    def swapped(fd, path, limit):
        if Path(path) == checkpoint_file(run_dir, 1):
            calls.append(path)
            if len(calls) >= 2:
                data = checkpoint_file(run_dir, 2).read_bytes()  # what the swapped file now holds
                real_read(fd, path, limit)
                return data
        return real_read(fd, path, limit)

    monkeypatch.setattr(reader, "_read_all", swapped)
    return calls


def _unrecorded_copy(run, tmp_path) -> Path:
    """The run with its features cached, its parts gone and no digest in the manifest: only
    the analysis's own digest protects it."""
    run_dir = copy_run(run["dir"], tmp_path / "run", with_analysis=True)
    shutil.rmtree(run_dir / "analysis" / "parts")
    doc = json.loads((run_dir / "manifest.json").read_text())
    for entry in doc["checkpoints"]:
        entry["sha256"] = None
    (run_dir / "manifest.json").write_text(json.dumps(doc))
    return run_dir


def test_features_cached_parts_missing_read_once_from_the_hashed_bytes(run, tmp_path,
                                                                        monkeypatch):
    """The head's weights come from the very bytes whose digest keyed the cached features: the
    file is read once, so a swap after that read cannot mix two checkpoints."""
    run_dir = _unrecorded_copy(run, tmp_path)
    calls = _swap_on_second_read(run_dir, monkeypatch)
    assert main(["analyze", str(run_dir), *RUN_ARGS]) == 0
    assert len(calls) == 1
    pd.testing.assert_frame_equal(_values(_table(run_dir)), _values(run["table"]))


def test_file_swapped_during_the_analysis_fails_instead_of_mixing_weights(run, tmp_path,
                                                                        monkeypatch, capsys):
    """A later read (a downstream dataset held in memory needs the model after the source's
    pass let it go) must match the digest of the first."""
    run_dir = _unrecorded_copy(run, tmp_path)
    calls = _swap_on_second_read(run_dir, monkeypatch)
    code = main(["analyze", str(run_dir), *RUN_ARGS, "--downstream", "digits",
                 "--downstream-metrics", "logme"])
    err = capsys.readouterr().err
    assert len(calls) == 2
    assert code == 1 and "FAILED epoch 1: downstream digits" in err and "does not match" in err
    table = _table(run_dir)
    down = table[table["task"] == "digits"]
    assert sorted(down["epoch"].unique()) == [0, 2]  # none of the swapped file's
    source = table[table["task"] != "digits"]  # epoch 1's own, from the bytes first hashed
    pd.testing.assert_frame_equal(
        _values(source[~source["metric"].str.startswith("transfer_")]).reset_index(drop=True),
        _values(run["table"]))


def test_forged_part_is_recomputed_not_reported(run, tmp_path):
    run_dir = copy_run(run["dir"], tmp_path / "run", with_analysis=True)
    part = run_dir / "analysis" / "parts" / "epoch_000001.json"
    doc = json.loads(part.read_text())
    for row in doc["rows"]:
        row["value"] = 0.123456  # forged: key kept, seal not recomputable without the secret
    part.write_text(json.dumps(doc))
    assert main(["analyze", str(run_dir), *RUN_ARGS]) == 0
    pd.testing.assert_frame_equal(_values(_table(run_dir)), _values(run["table"]))
    assert 0.123456 not in _table(run_dir)["value"].tolist()


def test_forged_or_moved_feature_file_is_a_cache_miss(tmp_path):
    cache = FeatureCache(tmp_path)
    good = {"features": torch.randn(5, 3), "logits": torch.randn(5, 2)}
    cache.put("a", good)
    assert torch.equal(cache.get("a")["features"], good["features"])
    data = (tmp_path / "a.safetensors").read_bytes()
    (tmp_path / "b.safetensors").write_bytes(data)  # a sealed entry under another key
    assert cache.get("b") is None
    from safetensors.torch import load as load_bytes
    from safetensors.torch import save as save_bytes

    header = json.loads(data[8:8 + int.from_bytes(data[:8], "little")])
    forged = {k: torch.zeros_like(v) for k, v in load_bytes(data).items()}
    (tmp_path / "a.safetensors").write_bytes(save_bytes(forged, metadata=header["__metadata__"]))
    assert cache.get("a") is None
    (tmp_path / "a.safetensors").unlink()
    os.mkfifo(tmp_path / "a.safetensors")  # never blocks, never an error
    assert cache.get("a") is None


def test_part_store_seal_and_no_reuse(tmp_path):
    store = PartStore(tmp_path)
    rows = [{"run": "r", "epoch": 1, "step": 1, "metric": "m", "task": "", "layer": "",
             "value": 0.5, "estimator": "e", "params": "{}"}]
    store.put(1, "k", rows)
    assert store.get(1, "k") == rows
    assert store.get(1, "other") is None
    assert PartStore(tmp_path, reuse=False).get(1, "k") is None


def test_no_cache_reuses_neither_features_nor_parts(run, tmp_path):
    run_dir = copy_run(run["dir"], tmp_path / "run", with_analysis=True)
    plan = plan_run(run_dir)
    results = analyze_plan(plan, AnalysisOptions(metrics=FAST[1:], device="cpu", progress=False,
                                                 plot=False, use_cache=False))
    assert results.stats.features_reused == 0 and results.stats.metrics_reused == 0
    assert results.stats.metrics_computed == 3


# ================================================================ 3. one bad checkpoint alone
def _quantized(state):
    key = next(k for k, v in state.items() if v.is_floating_point() and v.dim() > 1)
    state[key] = torch.quantize_per_tensor(state[key], 0.1, 0, torch.qint8)
    return state


MALFORMED = {
    "float8": (lambda s: {**s, "fc.weight": s["fc.weight"].to(torch.float8_e4m3fn)},
               "has dtype float8_e4m3fn"),
    "meta": (lambda s: {**s, "fc.weight": torch.empty_like(s["fc.weight"], device="meta")},
             "is on the meta device"),
    "sparse": (lambda s: {**s, "fc.weight": s["fc.weight"].to_sparse()}, "sparse_coo layout"),
    "quantized": (_quantized, "is quantized (qint8), dequantize it first"),
    "complex": (lambda s: {**s, "fc.weight": s["fc.weight"].to(torch.complex64)},
                "has dtype complex64"),
    "stride-0 giant": (lambda s: {**s, "fc.weight": torch.zeros(1).expand(2**18, 2**18)},
                       "elements, more than any weight tensor"),
}


@pytest.mark.parametrize("kind", sorted(MALFORMED))
def test_malformed_tensor_fails_only_its_checkpoint(run, tmp_path, capsys, kind):
    run_dir = copy_run(run["dir"], tmp_path / "run", with_analysis=True)
    damage, reason = MALFORMED[kind]
    with torch.no_grad(), pytest.warns() if kind == "quantized" else _nothing():
        state = damage(_state(run_dir, 1))
    torch.save({"model": state, "epoch": 1}, checkpoint_file(run_dir, 1))
    if kind == "stride-0 giant":
        # a small file claiming 6.9e10 elements
        assert checkpoint_file(run_dir, 1).stat().st_size < 1 << 20
    _rerecord(run_dir, 1)
    code = main(["analyze", str(run_dir), *RUN_ARGS, "--no-plot"])
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err, err
    failures = pd.read_csv(run_dir / "analysis" / "failures.csv")
    assert failures["epoch"].tolist() == [1]
    assert reason in failures["reason"].iloc[0], failures["reason"].iloc[0]
    assert sorted(_table(run_dir)["epoch"].unique()) == [0, 2]


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_any_unexpected_exception_is_a_failure_row(run, tmp_path, capsys, monkeypatch):
    from dtprobe.analysis import pipeline

    run_dir = copy_run(run["dir"], tmp_path / "run", with_analysis=True)
    real = pipeline.epoch_metrics

    def boom(plan, ckpt, *args, **kwargs):
        if ckpt.epoch == 1:
            raise KeyError(1602629666)
        return real(plan, ckpt, *args, **kwargs)

    monkeypatch.setattr(pipeline, "epoch_metrics", boom)
    code = main(["analyze", str(run_dir), *RUN_ARGS, "--no-cache", "--no-plot"])
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err
    reason = pd.read_csv(run_dir / "analysis" / "failures.csv")["reason"].iloc[0]
    assert "unexpected KeyError" in reason and "this checkpoint is skipped" in reason
    assert sorted(_table(run_dir)["epoch"].unique()) == [0, 2]


def test_tensor_checks_catch_inconsistent_storage():
    t = torch.zeros(4)
    view = t.as_strided((2, 2), (2, 1), 0)
    assert reader._tensor_problem(view) is None
    assert reader._tensor_problem(t[1:].view(3)) is None
    assert "stride-0" in reader._tensor_problem(torch.zeros(1).expand(2**13, 2**12))
    assert reader._tensor_problem(torch.zeros(0)) is None


# =========================================================================== 4. hostile manifests
def _manifest_doc(**changes) -> dict:
    doc = {"format": "checkpoints-manifest", "version": 1, "run_name": "r",
           "created": "2024-01-01T00:00:00+00:00",
           "model": {"arch": "small_cnn", "num_classes": 6,
                     "kwargs": {"width": 8, "feature_dim": 16}},
           "dataset": {"name": "shapes", "params": dict(TINY)},
           "checkpoints": [{"epoch": 0, "step": 0, "path": "checkpoints/epoch_0000.pt"}]}
    for dotted, value in changes.items():
        node = doc
        *head, last = dotted.split(".")
        for key in head:
            node = node[int(key)] if isinstance(node, list) else node[key]
        if isinstance(node, list):
            node[int(last)] = value
        else:
            node[last] = value
    return doc


def _deep(levels: int) -> list:
    value: list = [1]
    for _ in range(levels):
        value = [value]
    return value


def test_fifo_manifest_is_refused_without_blocking(tmp_path):
    os.mkfifo(tmp_path / "manifest.json")
    result: list = []
    thread = threading.Thread(target=lambda: result.append(_catch(cm.read_manifest, tmp_path)),
                              daemon=True)
    thread.start()
    thread.join(20)
    assert not thread.is_alive(), "reading a FIFO manifest blocked"
    assert "not a regular file (a FIFO)" in str(result[0])


def _catch(func, *args):
    try:
        func(*args)
    except Exception as exc:  # noqa: BLE001
        return exc
    return None


def test_manifest_linked_to_a_device_is_refused(tmp_path):
    (tmp_path / "manifest.json").symlink_to("/dev/zero")
    with pytest.raises(cm.ManifestError, match="a character device"):
        cm.read_manifest(tmp_path)


@pytest.mark.parametrize("changes, expected", [
    ({"checkpoints.0.step": 2**64}, "checkpoints[0].step must be an int <= 9223372036854775807"),
    ({"checkpoints.0.epoch": -1}, "checkpoints[0].epoch must be an int >= 0"),
    ({"model.num_classes": 10**12}, "model.num_classes must be an int <= 1000000"),
    ({"run_name": "a\ud800b"}, "not valid Unicode"),
    ({"model.kwargs": {"w\udcff": 1}}, "not a valid string"),
    ({"checkpoints.0.path": "checkpoints/\udcffx.pt"}, "checkpoints[0].path holds a string "
                                                       "that is not valid Unicode"),
    ({"checkpoints.0.path": "checkpoints/a\nb.pt"}, "no NUL or control characters"),
    ({"seed": 2**70}, "seed must be an int of magnitude"),
    ({"version": 10**400}, "version an integer of 401 digits is newer"),
    ({"training": {"a": _deep(40)}}, "nested more than 32 levels"),
])
def test_hostile_manifest_fields_are_one_line_errors(tmp_path, changes, expected):
    text = json.dumps(_manifest_doc(**changes))  # lone surrogates as \\udXXX escapes
    (tmp_path / "manifest.json").write_text(text, encoding="utf-8")
    with pytest.raises(cm.ManifestError) as info:
        cm.read_manifest(tmp_path)
    message = str(info.value)
    assert expected in message and "\n" not in message and len(message) < 400, message


@pytest.mark.parametrize("kwargs, expected", [
    ({"width": "wide"}, "width='wide' must be an integer"),
    ({"width": -8}, "width=-8 must be an integer in [0, 65536]"),
    ({"width": 8.5}, "width=8.5 must be an integer"),
    ({"width": 2**40}, "must be an integer in [0, 65536]"),
    ({"width": 4096, "feature_dim": 65536}, "parameters (limit"),
])
def test_hostile_model_kwargs_are_refused_before_building(run, tmp_path, capsys, kwargs,
                                                          expected):
    run_dir = copy_run(run["dir"], tmp_path / "run", with_analysis=True)
    doc = json.loads((run_dir / "manifest.json").read_text())
    doc["model"]["kwargs"] = kwargs
    (run_dir / "manifest.json").write_text(json.dumps(doc))
    line = _one_line_error(capsys, main(["analyze", str(run_dir), *RUN_ARGS]))
    assert expected in line and "model.kwargs" in line, line


@pytest.mark.parametrize("params, expected", [
    ({"n_train": 10**9}, "n_train=1000000000 must be an integer in [0, 1000000]"),
    ({"n_train": 1_000_000, "n_test": 1_000_000, "image_size": 1024}, "GiB of images"),
    ({"noise": "loud"}, "noise='loud' must be a number"),
    ({"n_train": [1, 2]}, "must be an integer"),
])
def test_hostile_dataset_params_are_refused_before_building(run, tmp_path, capsys, params,
                                                            expected):
    run_dir = copy_run(run["dir"], tmp_path / "run", with_analysis=True)
    doc = json.loads((run_dir / "manifest.json").read_text())
    doc["dataset"]["params"] = {**TINY, **params}
    (run_dir / "manifest.json").write_text(json.dumps(doc))
    line = _one_line_error(capsys, main(["analyze", str(run_dir), *RUN_ARGS]))
    assert expected in line, line


def test_huge_num_classes_flag_is_refused(run, tmp_path):
    plan = plan_run(copy_run(run["dir"], tmp_path / "run", with_analysis=True), num_classes=10**13)
    with pytest.raises(ConfigError, match=r"must be an int in \[1, 1000000\]"):
        check_plan(plan, AnalysisOptions())


def test_download_in_a_manifest_never_downloads(run, tmp_path):
    run_dir = copy_run(run["dir"], tmp_path / "run", with_analysis=True)
    doc = json.loads((run_dir / "manifest.json").read_text())
    doc["dataset"]["params"]["download"] = True
    (run_dir / "manifest.json").write_text(json.dumps(doc))
    assert "download" not in plan_run(run_dir).dataset_params
    assert plan_run(run_dir, dataset_params={"download": True}).dataset_params["download"]


def test_undecodable_names_are_written_not_crashed_on(run, tmp_path, capsys):
    run_dir = Path(os.fsdecode(os.fsencode(str(tmp_path)) + b"/run\xff"))
    shutil.copytree(run["dir"], run_dir)
    checkpoint_file(run_dir, 1).write_bytes(b"")
    _rerecord(run_dir, 1)
    code = main(["analyze", str(run_dir), *RUN_ARGS, "--no-plot"])
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err
    assert "\\udcff" in (run_dir / "analysis" / "failures.csv").read_text()


def test_large_manifest_plans_in_linear_time(tmp_path, monkeypatch):
    """100,000 entries: one realpath per folder, not two full resolves per entry."""
    doc = _manifest_doc()
    doc["checkpoints"] = [{"epoch": i, "step": i, "path": f"checkpoints/e{i}.pt"}
                          for i in range(20_000)]
    (tmp_path / "manifest.json").write_text(json.dumps(doc))
    calls = []
    real = os.path.realpath
    monkeypatch.setattr(os.path, "realpath", lambda p, *a, **k: calls.append(p) or real(p))
    plan = plan_run(tmp_path)
    assert len(plan.checkpoints) == 20_000
    assert len(calls) < 10


# ============================================================= 5. environment errors and links
def test_disk_full_during_analyze_is_one_line_exit_2(run, tmp_path, capsys, monkeypatch):
    run_dir = copy_run(run["dir"], tmp_path / "run", with_analysis=True)

    def full(**kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", kwargs.get("dir"))

    monkeypatch.setattr(storage, "_mkstemp", full)
    line = _one_line_error(capsys, main(["analyze", str(run_dir), *RUN_ARGS, "--no-cache"]))
    assert "No space left on device" in line and "free some space" in line


def test_read_only_resume_is_refused_before_an_epoch(tmp_path, capsys, monkeypatch):
    run_dir = tmp_path / "run"
    train(tiny_config(run_dir, epochs=1))
    log = (run_dir / "train_log.csv").read_text()

    def read_only(**kwargs):
        raise OSError(errno.EROFS, "Read-only file system", kwargs.get("dir"))

    monkeypatch.setattr(storage, "_mkstemp", read_only)
    from dtprobe.training import trainer

    epochs_run = []
    monkeypatch.setattr(trainer.Trainer, "_run_epoch",
                        lambda self, epoch: epochs_run.append(epoch) or {})
    code = main(["train", "--out", str(run_dir), "--resume", "--epochs", "2", "--device", "cpu",
                 "--no-progress"])
    line = _one_line_error(capsys, code)
    assert "Read-only file system" in line and "writable copy" in line
    assert epochs_run == [] and (run_dir / "train_log.csv").read_text() == log


def _closed_stdout(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "dtprobe", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, cwd=cwd, env=env)
    proc.stdout.close()  # the reader went away, as with `| head -1`
    err = proc.stderr.read().decode()
    proc.wait(timeout=300)
    return subprocess.CompletedProcess(args, proc.returncode, "", err)


def test_closed_pipe_exits_2_quietly(run, tmp_path):
    listed = _closed_stdout(["list"], tmp_path)
    assert listed.returncode == 2 and "Traceback" not in listed.stderr, listed.stderr
    assert "BrokenPipe" not in listed.stderr
    run_dir = copy_run(run["dir"], tmp_path / "run", with_analysis=True)
    analysed = _closed_stdout(["analyze", str(run_dir), *RUN_ARGS, "--no-plot"], tmp_path)
    assert analysed.returncode == 2 and "Traceback" not in analysed.stderr, analysed.stderr
    assert (run_dir / "analysis" / "metrics.csv").exists()


def test_link_swapped_in_after_planning_is_caught_at_use(run, tmp_path):
    run_dir = copy_run(run["dir"], tmp_path / "run", with_analysis=True)
    doc = json.loads((run_dir / "manifest.json").read_text())
    for entry in doc["checkpoints"]:
        entry["sha256"] = None
    (run_dir / "manifest.json").write_text(json.dumps(doc))
    plan = plan_run(run_dir)
    outside = tmp_path / "outside.pt"
    shutil.copyfile(checkpoint_file(run_dir, 1), outside)
    checkpoint_file(run_dir, 1).unlink()
    checkpoint_file(run_dir, 1).symlink_to(outside)  # after planning checked the links
    results = analyze_plan(plan, AnalysisOptions(metrics=FAST[1:], device="cpu", progress=False,
                                                 plot=False))
    assert results.failures["epoch"].tolist() == [1]
    assert "outside the run directory" in results.failures["reason"].iloc[0]


# ================================================================================== 6. messages
class _Payload:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


@pytest.mark.parametrize("how", ["protocol-0", "protocol-1", "npy-object"])
def test_pickle_payloads_of_every_form_are_refused_as_unsafe(tmp_path, how):
    path = tmp_path / "x.pt"
    if how == "npy-object":
        buf = io.BytesIO()
        np.save(buf, np.array([_Payload()], dtype=object), allow_pickle=True)
        path.write_bytes(buf.getvalue())
    else:
        path.write_bytes(pickle.dumps({"model": _Payload()}, protocol=int(how[-1])))
    with pytest.raises(CheckpointError, match="refusing to unpickle it") as info:
        ck.load_checkpoint(path)
    assert "truncated or corrupt" not in str(info.value)


@pytest.mark.parametrize("content, expected", [
    (b"", "it is empty, 0 bytes"),
    (bytes(range(256)) * 8, "not a torch.save, safetensors or pickle file"),
    (b"PK\x03\x04" + b"\x00" * 40, "cannot read the checkpoint (truncated or corrupt file?"),
])
def test_damaged_files_get_a_clear_line(tmp_path, content, expected):
    path = tmp_path / "x.pt"
    path.write_bytes(content)
    with pytest.raises(CheckpointError) as info:
        ck.load_checkpoint(path)
    message = str(info.value)
    assert expected in message and "\n" not in message
    assert "Invalid argument" not in message and "KeyError" not in message


def test_poisoned_resume_state_is_one_short_line(tmp_path, capsys):
    run_dir = tmp_path / "run"
    train(tiny_config(run_dir, epochs=1))
    (run_dir / "resume_state.pt").write_bytes(pickle.dumps({"epoch": _Payload()}))
    code = main(["train", "--out", str(run_dir), "--resume", "--epochs", "2", "--device", "cpu",
                 "--no-progress"])
    line = _one_line_error(capsys, code)
    assert "cannot use the resume state (refusing to unpickle it" in line
    assert "weights_only" not in line and len(line) < 400


def test_symlink_loop_does_not_suggest_following_links(run, tmp_path):
    run_dir = copy_run(run["dir"], tmp_path / "run", with_analysis=True)
    checkpoint_file(run_dir, 1).unlink()
    checkpoint_file(run_dir, 1).symlink_to(checkpoint_file(run_dir, 1))
    results = analyze_plan(plan_run(run_dir), AnalysisOptions(metrics=FAST[1:], device="cpu",
                                                              progress=False, plot=False))
    reason = results.failures["reason"].iloc[0]
    assert "symbolic link loop" in reason and "--follow-symlinks" not in reason


def test_safetensors_metadata_payloads_are_inert_data(tmp_path):
    from safetensors.torch import save_file

    marker = tmp_path / "pwned"
    save_file({"w": torch.ones(2)}, str(tmp_path / "x.safetensors"),
              metadata={"cmd": f"__import__('os').system('touch {marker}')", "epoch": "3"})
    loaded = ck.load_checkpoint(tmp_path / "x.safetensors")
    assert loaded.meta == {"cmd": f"__import__('os').system('touch {marker}')", "epoch": 3}
    assert not marker.exists()


def test_manifest_cannot_make_dtprobe_import_code(tmp_path):
    """A manifest's model.arch of the form package.module:callable would import and call code a
    downloaded run chose; only the user's own --arch may name code."""
    import checkpoints_manifest as cm
    from dtprobe.analysis.plan import plan_run
    from dtprobe.errors import ConfigError

    run = tmp_path / "hostile"
    cm.write_manifest(run, cm.create_manifest(
        run_name="x", model=cm.ModelSpec("subprocess:Popen", 6), dataset="shapes"))
    (run / "e0.pt").write_bytes(b"0")
    cm.record_checkpoint(run, run / "e0.pt", epoch=0, step=0)
    with pytest.raises(ConfigError, match="names code to import.*pass --arch subprocess:Popen"):
        plan_run(run)
    # the user naming it explicitly is the opt-in (planning only; nothing is imported here)
    assert plan_run(run, arch="small_cnn").arch == "small_cnn"
