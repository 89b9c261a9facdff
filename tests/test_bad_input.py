"""Bad input through ``dtprobe analyze`` (issue 7): one clear line each, nothing else lost.

A bad *checkpoint* (truncated, corrupt, missing, tampered, wrong shapes or architecture, NaN/Inf
weights, NaN features, not a state dict ...) is reported on one ``FAILED`` line naming the file
and what to do, recorded in ``analysis/failures.csv`` with its reason, the other checkpoints are
analysed (their rows equal a clean analysis) and the exit status is 1.

A bad *run* or *option* (no checkpoints, manifest not JSON or against the schema, duplicate
epochs, paths escaping the run, unknown dataset path, parameters or layers ...) prints exactly
one line ``dtprobe analyze: error: ...`` without a traceback and exits 2; ``--debug`` raises
instead, so the traceback shows.

Hypothesis fuzzes the checkpoint reader with damaged files and the path guard with arbitrary
strings: nothing escapes but the project's :class:`~dtprobe.errors.CheckpointError`.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import shutil
from collections import OrderedDict
from pathlib import Path

import pandas as pd
import pytest
import torch
import torchvision
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save as safetensors_bytes
from safetensors.torch import save_file
from torch import nn

import checkpoints_manifest as cm
from dtprobe import checkpoints as ck
from dtprobe.checkpoints import reader
from dtprobe.cli import main
from dtprobe.errors import CheckpointError, ConfigError
from dtprobe.models import build_model
from tests.helpers import TINY, checkpoint_file, copy_run, train_tiny

DATA_ARGS = [a for k, v in TINY.items() for a in ("--dataset-param", f"{k}={v}")]
FAST = ["--metrics", "source_accuracy", "class_separation"]
RUN_ARGS = ["--device", "cpu", "--no-progress", "--no-plot", *FAST]
EPOCHS = [0, 1, 2]
TRIED: list[str] = []  # every bad input exercised, for the close note


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny trained run with checkpoints at epochs 0, 1, 2 and its clean analysis."""
    out = tmp_path_factory.mktemp("bad") / "run"
    train_tiny(out)
    clean = out.parent / "clean"
    shutil.copytree(out, clean)
    assert main(["analyze", str(clean), *RUN_ARGS]) == 0
    return {"dir": out, "table": _table(clean)}


def _table(run_dir: Path) -> pd.DataFrame:
    return pd.read_csv(run_dir / "analysis" / "metrics.csv", keep_default_na=False)


def _rerecord(run_dir: Path, epoch: int, path: Path | None = None) -> None:
    """Record the (damaged) file's digest in the manifest, as a writer that saved it would."""
    path = path or checkpoint_file(run_dir, epoch)
    entry = cm.read_manifest(run_dir).get(epoch)
    new = cm.entry_for_file(run_dir, path, epoch=epoch, step=entry.step)
    cm.append_checkpoint(run_dir, new, replace=True)


def _state(run_dir: Path, epoch: int) -> dict[str, torch.Tensor]:
    return torch.load(checkpoint_file(run_dir, epoch), weights_only=True)["model"]


def _save_state(run_dir: Path, epoch: int, state: dict) -> None:
    torch.save({"model": state, "epoch": epoch}, checkpoint_file(run_dir, epoch))
    _rerecord(run_dir, epoch)


# ------------------------------------------------------------------------ damaged checkpoints
def _truncate(run_dir, e):
    p = checkpoint_file(run_dir, e)
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
    _rerecord(run_dir, e)


def _empty(run_dir, e):
    checkpoint_file(run_dir, e).write_bytes(b"")
    _rerecord(run_dir, e)


def _garbage(run_dir, e):
    p = checkpoint_file(run_dir, e)
    p.write_bytes(bytes((i * 131 + 7) % 256 for i in range(p.stat().st_size)))
    _rerecord(run_dir, e)


def _broken_zip_directory(run_dir, e):
    p = checkpoint_file(run_dir, e)
    data = bytearray(p.read_bytes())
    data[-120:] = b"\x00" * 120  # the zip's central directory
    p.write_bytes(bytes(data))
    _rerecord(run_dir, e)


def _missing(run_dir, e):
    checkpoint_file(run_dir, e).unlink()


def _tampered(run_dir, e):  # replaced after it was recorded: the manifest's sha256 differs
    shutil.copyfile(checkpoint_file(run_dir, 0 if e else 1), checkpoint_file(run_dir, e))


def _narrower(run_dir, e):  # saved from a model with another width: shape mismatch
    _save_state(run_dir, e, build_model("small_cnn", 6, in_channels=3, width=4,
                                        feature_dim=16).state_dict())


def _other_arch(run_dir, e):  # a ResNet-18 checkpoint in a small-CNN run
    _save_state(run_dir, e, torchvision.models.resnet18(num_classes=6).state_dict())


def _nan_weights(run_dir, e):
    state = _state(run_dir, e)
    state["embed.0.weight"][0, 0] = float("nan")
    _save_state(run_dir, e, state)


def _inf_weights(run_dir, e):
    state = _state(run_dir, e)
    state["fc.bias"][1] = float("inf")
    _save_state(run_dir, e, state)


def _nan_features(run_dir, e):  # finite weights, but a negative BN variance gives sqrt(<0)
    state = _state(run_dir, e)
    state["features.0.1.running_var"].fill_(-1.0)
    _save_state(run_dir, e, state)


def _not_a_state_dict(run_dir, e):
    torch.save([torch.ones(3)], checkpoint_file(run_dir, e))
    _rerecord(run_dir, e)


def _no_tensors(run_dir, e):
    torch.save({"epoch": e, "note": "weights forgotten"}, checkpoint_file(run_dir, e))
    _rerecord(run_dir, e)


def _directory(run_dir, e):
    checkpoint_file(run_dir, e).unlink()
    checkpoint_file(run_dir, e).mkdir()


def _bad_safetensors(run_dir, e):
    target = run_dir / "checkpoints" / f"epoch_{e:04d}.safetensors"
    save_file({k: v.contiguous() for k, v in _state(run_dir, e).items()}, str(target))
    target.write_bytes(target.read_bytes()[:-50])
    doc = json.loads((run_dir / "manifest.json").read_text())
    for entry in doc["checkpoints"]:
        if entry["epoch"] == e:
            entry["path"], entry["sha256"] = f"checkpoints/{target.name}", cm.sha256_file(target)
    (run_dir / "manifest.json").write_text(json.dumps(doc))


def _pickled_code(run_dir, e):
    class Payload:
        def __reduce__(self):
            return (os.system, ("echo pwned > /dev/null",))

    checkpoint_file(run_dir, e).write_bytes(pickle.dumps({"model": Payload()}))
    _rerecord(run_dir, e)


def _unreadable(run_dir, e, monkeypatch):
    path = checkpoint_file(run_dir, e)
    if os.geteuid() != 0:
        path.chmod(0)
        return
    # root reads any file: make opening this one fail as it would for a user.

    real_open = reader._open_checkpoint

    def guarded_open(file):
        if Path(file) == path:
            raise PermissionError(13, "Permission denied", str(file))
        return real_open(file)

    monkeypatch.setattr(reader, "_open_checkpoint", guarded_open)


PER_CHECKPOINT = [
    ("truncated", _truncate, "truncated or corrupt", "copy it again"),
    ("empty file", _empty, "truncated or corrupt", "copy it again"),
    ("random bytes", _garbage, "cannot read the checkpoint", "re-save it"),
    ("corrupt zip directory", _broken_zip_directory, "truncated or corrupt", "copy it again"),
    ("missing file", _missing, "checkpoint file is missing", "restore it"),
    ("sha256 mismatch", _tampered, "does not match the manifest", "restore it"),
    ("shape mismatch", _narrower, "shape mismatch", "pass the right --arch"),
    ("wrong architecture", _other_arch, "missing keys", "pass the right --arch"),
    ("NaN weights", _nan_weights, "contain NaN/Inf (diverged run?)", "drop this checkpoint"),
    ("Inf weights", _inf_weights, "contain NaN/Inf (diverged run?)", "drop this checkpoint"),
    ("NaN features", _nan_features, "NaN/Inf", "(diverged run?); this checkpoint is skipped"),
    ("not a state dict", _not_a_state_dict, "holds a list, not a state dict", "save"),
    ("no tensors", _no_tensors, "no weight tensors found", "re-save it"),
    ("directory instead of file", _directory, "is not a file", "fix the checkpoint path"),
    ("truncated safetensors", _bad_safetensors, "truncated or corrupt", "copy it again"),
    ("pickle that runs code", _pickled_code, "refusing to unpickle it", "re-save it"),
    ("unreadable file", _unreadable, "Permission denied", "readable"),
]


@pytest.mark.parametrize("what, damage, reason, fix", PER_CHECKPOINT,
                         ids=[c[0] for c in PER_CHECKPOINT])
def test_one_bad_checkpoint_fails_alone(run, tmp_path, capsys, monkeypatch, what, damage,
                                        reason, fix):
    run_dir = copy_run(run["dir"], tmp_path / "run", with_analysis=True)
    bad = 1
    if damage is _unreadable:
        damage(run_dir, bad, monkeypatch)
    else:
        damage(run_dir, bad)
    TRIED.append(what)
    code = main(["analyze", str(run_dir), *RUN_ARGS])
    captured = capsys.readouterr()
    assert code == 1, captured.err
    assert "Traceback" not in captured.err
    failed = [line for line in captured.err.splitlines() if line.startswith("FAILED")]
    assert len(failed) == 1, captured.err
    line = failed[0]
    assert line.startswith(f"FAILED epoch {bad}: ") and "checkpoints/epoch_0001." in line
    assert reason in line and fix in line, line
    assert "1 of 3 checkpoint(s) failed" in captured.err
    failures = pd.read_csv(run_dir / "analysis" / "failures.csv")
    assert failures["epoch"].tolist() == [bad] and reason in failures["reason"].iloc[0]
    assert failures["path"].iloc[0].startswith(str(run_dir / "checkpoints" / "epoch_0001."))
    # The other checkpoints are analysed, with the values of a clean analysis.
    table = _table(run_dir)
    assert sorted(table["epoch"].unique()) == [0, 2]
    keep = ["epoch", "metric", "task", "layer", "value"]
    clean = run["table"]
    clean = clean[clean["epoch"] != bad]
    per_epoch = ~clean["metric"].str.startswith("cka_")
    got = table[~table["metric"].str.startswith("cka_")]
    pd.testing.assert_frame_equal(got[keep].reset_index(drop=True),
                                  clean[per_epoch][keep].reset_index(drop=True))


def test_every_checkpoint_failing_names_no_chart_and_writes_no_empty_table(run, tmp_path,
                                                                          capsys):
    run_dir = copy_run(run["dir"], tmp_path / "run", with_analysis=True)
    TRIED.append("architecture options that fit no checkpoint")
    code = main(["analyze", str(run_dir), "--device", "cpu", "--no-progress", *FAST,
                 "--arch-param", "width=4"])  # plotting on: still no chart named
    out, err = capsys.readouterr()
    # Every checkpoint failed for the same reason: the exit line says it (not "the others").
    [last] = [ln for ln in err.splitlines() if "for one reason" in ln]
    assert code == 1 and "all 3 checkpoint(s) failed for one reason: " in last
    assert "no weights in it fit" in last
    assert "the others were analysed" not in err and "chart" not in out
    assert len([ln for ln in err.splitlines() if ln.startswith("FAILED")]) == 3
    assert pd.read_csv(run_dir / "analysis" / "failures.csv")["epoch"].tolist() == [2, 0, 1]
    assert not (run_dir / "analysis" / "metrics.csv").exists()
    assert not (run_dir / "analysis" / "tradeoff.png").exists()


def test_a_checkpoint_fixed_later_is_analysed_on_the_next_run(run, tmp_path, capsys):
    run_dir = copy_run(run["dir"], tmp_path / "run", with_analysis=True)
    saved = checkpoint_file(run_dir, 2).read_bytes()
    checkpoint_file(run_dir, 2).unlink()
    assert main(["analyze", str(run_dir), *RUN_ARGS]) == 1
    checkpoint_file(run_dir, 2).write_bytes(saved)
    assert main(["analyze", str(run_dir), *RUN_ARGS]) == 0
    capsys.readouterr()
    assert not (run_dir / "analysis" / "failures.csv").exists()
    assert sorted(_table(run_dir)["epoch"].unique()) == EPOCHS


# ------------------------------------------------------------------------------ bad runs
def _no_manifest_run(tmp_path: Path, run: dict) -> Path:
    d = tmp_path / "plain"
    d.mkdir()
    for e in EPOCHS:
        shutil.copyfile(checkpoint_file(run["dir"], e), d / f"ckpt_epoch_{e}.pth")
    return d


PLAIN = ["--arch", "small_cnn", "--num-classes", "6", "--dataset", "shapes", *DATA_ARGS,
         "--arch-param", "width=8", "--arch-param", "feature_dim=16"]


def _manifest_edit(edit):
    def make(tmp_path, run):
        d = copy_run(run["dir"], tmp_path / "run", with_analysis=True)
        doc = json.loads((d / "manifest.json").read_text())
        text = edit(doc)
        (d / "manifest.json").write_text(text if isinstance(text, str) else json.dumps(doc))
        return d, []
    return make


def _set_path(value):
    def edit(doc):
        doc["checkpoints"][1]["path"] = value
    return edit


def _dup_epoch(doc):
    doc["checkpoints"][1]["epoch"] = 0


def _no_checkpoints(doc):
    doc["checkpoints"] = []


def _bad_classes(doc):
    doc["model"]["num_classes"] = 0


def _plain(extra_files=(), args=PLAIN, keep_ckpts=True):
    def make(tmp_path, run):
        d = _no_manifest_run(tmp_path, run)
        if not keep_ckpts:
            for p in d.iterdir():
                p.unlink()
        for name in extra_files:
            (d / name).parent.mkdir(parents=True, exist_ok=True)
            (d / name).write_bytes(b"x")
        return d, list(args)
    return make


def _with(args):
    def make(tmp_path, run):
        return copy_run(run["dir"], tmp_path / "run", with_analysis=True), list(args)
    return make


def _nonexistent(tmp_path, run):
    return tmp_path / "no-such-run", []


def _a_file(tmp_path, run):
    f = tmp_path / "manifest.json"
    f.write_text("{}")
    return f, []


def _read_only(tmp_path, run, monkeypatch):
    d = copy_run(run["dir"], tmp_path / "run", with_analysis=True)
    d.chmod(0o555)
    if os.geteuid() == 0:  # root writes anywhere: make creating the folder fail as for a user
        real_mkdir = Path.mkdir

        def mkdir(self, *args, **kwargs):
            if self == d / "analysis":
                raise PermissionError(13, "Permission denied", str(self))
            return real_mkdir(self, *args, **kwargs)

        monkeypatch.setattr(Path, "mkdir", mkdir)
    return d, []


def _arg_not_kv(tmp_path, run):
    return (copy_run(run["dir"], tmp_path / "run", with_analysis=True),
            ["--dataset-param", "n_train"])


WHOLE_RUN = [
    ("nonexistent run directory", _nonexistent, "no such run directory"),
    ("run directory is a file", _a_file, "is a file, not a run directory"),
    ("empty run directory", _plain(keep_ckpts=False), "no checkpoint files matching"),
    ("files but none matching", _plain(["notes.txt", "weights.bin"], keep_ckpts=False),
     "found files weights.bin but none matches a known checkpoint naming"),
    ("checkpoints in an unexpected subfolder", _plain(["weights/snap3.pt"], keep_ckpts=False),
     "found weights/snap3.pt; pass --pattern 'weights/snap{epoch}.pt'"),
    ("pattern matching nothing", _plain(args=[*PLAIN, "--pattern", "snap_{epoch}.pt"]),
     "found files ckpt_epoch_0.pth, ckpt_epoch_1.pth, ckpt_epoch_2.pth but none matches "
     "'snap_{epoch}.pt'"),
    ("pattern without {epoch}", _plain(args=[*PLAIN, "--pattern", "ckpt.pth"]),
     "has no {epoch} placeholder"),
    ("duplicate epochs in file names", _plain(["model_1.pth"]), "ambiguous checkpoint series"),
    ("no manifest and no flags", _plain(args=[]), "pass --arch --num-classes --dataset"),
    ("manifest not JSON", _manifest_edit(lambda doc: "{not json"), "not valid JSON"),
    ("manifest schema violation", _manifest_edit(_bad_classes),
     "model.num_classes must be an int >= 1, got 0"),
    ("manifest duplicate epochs", _manifest_edit(_dup_epoch), "each epoch may appear once"),
    ("manifest path with ..", _manifest_edit(_set_path("../elsewhere/x.pt")),
     "no '..' components"),
    ("manifest absolute path", _manifest_edit(_set_path("/etc/passwd")), "(not absolute)"),
    ("manifest with no checkpoints", _manifest_edit(_no_checkpoints), "lists no checkpoints"),
    ("nonexistent dataset path", _with(["--dataset", "cifar10", "--data-root",
                                        "/nonexistent/cifar"]), "/nonexistent/cifar"),
    ("unknown dataset", _with(["--dataset", "imagenet42"]), "unknown dataset 'imagenet42'"),
    ("unknown dataset parameter", _with(["--dataset-param", "colour_noise=1"]),
     "fix --dataset-param"),
    ("bad dataset parameter value", _with(["--dataset-param", "n_train=abc"]),
     "n_train='abc' must be an integer"),
    ("parameter not KEY=VALUE", _arg_not_kv, "--dataset-param expects KEY=VALUE"),
    ("unknown architecture", _with(["--arch", "vgg99"]), "unknown architecture 'vgg99'"),
    ("unknown architecture parameter", _with(["--arch-param", "depth=3"]), "fix --arch-param"),
    ("architecture that does not fit the images", _with(["--arch-param", "in_channels=1"]),
     "cannot process the shapes images"),
    ("unknown layer", _with(["--layers", "features.99"]), "--layers features.99: no such module"),
    ("batch size 0", _with(["--batch-size", "0"]),
     "--batch-size: expected 'auto' or an integer >= 1"),
    ("unknown metric", _with(["--metrics", "accuracy_of_vibes"]), "unknown metric(s)"),
    ("compare with a missing run", _with(["--compare", "/nonexistent/other"]),
     "/nonexistent/other: no such run directory"),
    ("CUDA requested without CUDA", _with(["--device", "cuda"]), "CUDA is not available"),
    ("read-only run directory", _read_only, "cannot create the analysis folder"),
]


@pytest.mark.parametrize("what, make, expected", WHOLE_RUN, ids=[c[0] for c in WHOLE_RUN])
def test_user_error_is_one_line_without_traceback_exit_2(run, tmp_path, capsys, monkeypatch,
                                                         what, make, expected):
    if what == "CUDA requested without CUDA" and torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    if make is _read_only:
        run_dir, extra = make(tmp_path, run, monkeypatch)
    else:
        run_dir, extra = make(tmp_path, run)
    TRIED.append(what)
    args = ["--device", "cpu", "--no-progress", "--no-plot", *FAST]
    if "--device" in extra:
        args = args[2:]
    if "--metrics" in extra:
        args = args[:-3]
    code = main(["analyze", str(run_dir), *args, *extra])
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert code == 2, captured.err
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("dtprobe analyze: error: ") and expected in lines[0], lines[0]
    assert "Traceback" not in captured.err + captured.out
    assert not (run_dir / "analysis" / "metrics.csv").exists()


def test_debug_shows_the_traceback(run, tmp_path):
    with pytest.raises(ConfigError, match="no such run directory") as info:
        main(["--debug", "analyze", str(tmp_path / "missing")])
    assert info.traceback  # the exception propagates: Python prints its traceback
    bad = _manifest_edit(lambda doc: "{not json")(tmp_path, run)[0]
    with pytest.raises(cm.ManifestError, match="not valid JSON"):
        main(["--debug", "analyze", str(bad), "--device", "cpu"])


def test_train_user_errors_are_one_line(tmp_path, capsys):
    TRIED.append("train --resume of a run whose resume state is gone")
    out = tmp_path / "r"
    out.mkdir()
    m = cm.create_manifest(run_name="r", model=cm.ModelSpec("small_cnn", 6),
                           dataset=cm.DatasetSpec("shapes", dict(TINY)))
    m.add_checkpoint(cm.CheckpointEntry(epoch=0, step=0, path="checkpoints/epoch_0000.pt"))
    cm.write_manifest(out, m)
    code = main(["train", "--out", str(out), "--resume", "--device", "cpu", "--no-progress",
                 *DATA_ARGS])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "resume_state.pt: missing" in err[0]


# ------------------------------------------------------------------------------ fuzzing
def _tiny_state() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(OrderedDict(conv=nn.Conv2d(3, 4, 3), bn=nn.BatchNorm2d(4),
                                      fc=nn.Linear(4, 2)))
    return {k: v.contiguous() for k, v in model.state_dict().items()}


def _serialised() -> dict[str, bytes]:
    state = _tiny_state()
    zipped, legacy = io.BytesIO(), io.BytesIO()
    torch.save({"model": state, "epoch": 3}, zipped)
    torch.save({"model": state, "epoch": 3}, legacy, _use_new_zipfile_serialization=False)
    return {"zip": zipped.getvalue(), "legacy": legacy.getvalue(),
            "safetensors": safetensors_bytes(state, metadata={"epoch": "3"})}


VALID = _serialised()
EDIT = st.one_of(
    st.tuples(st.just("truncate"), st.floats(0, 1), st.binary(max_size=0)),
    st.tuples(st.just("overwrite"), st.floats(0, 1), st.binary(min_size=1, max_size=64)),
    st.tuples(st.just("insert"), st.floats(0, 1), st.binary(min_size=1, max_size=16)),
    st.tuples(st.just("flip"), st.floats(0, 1), st.binary(min_size=1, max_size=1)),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(fmt=st.sampled_from(sorted(VALID)), edits=st.lists(EDIT, min_size=1, max_size=3),
       suffix=st.sampled_from([".pt", ".safetensors", ".ckpt"]))
def test_fuzz_damaged_checkpoint_files(tmp_path_factory, fmt, edits, suffix):
    data = bytearray(VALID[fmt])
    for op, where, payload in edits:
        at = int(where * len(data))
        if op == "truncate":
            del data[at:]
        elif op == "overwrite":
            data[at:at + len(payload)] = payload
        elif op == "insert":
            data[at:at] = payload
        elif data:
            data[min(at, len(data) - 1)] ^= payload[0] | 1
    path = tmp_path_factory.mktemp("fz") / f"ckpt_epoch_1{suffix}"
    path.write_bytes(bytes(data))
    try:
        loaded = ck.load_checkpoint(path)
    except CheckpointError as exc:
        message = str(exc)
        assert message.startswith(f"{path}: ") and "\n" not in message
        return
    assert loaded.state_dict and all(isinstance(v, torch.Tensor)
                                     for v in loaded.state_dict.values())


@settings(max_examples=200, deadline=None)
@given(rel=st.text(st.characters(blacklist_categories=("Cs",)), max_size=40))
def test_fuzz_path_guard(tmp_path_factory, rel):
    root = tmp_path_factory.mktemp("guard")
    run_dir = root / "run"
    (run_dir / "sub").mkdir(parents=True)
    try:
        target = ck.resolve_inside(run_dir, rel)
    except CheckpointError as exc:
        assert "\n" not in str(exc)
        return
    real = target.resolve()
    assert real == run_dir.resolve() or run_dir.resolve() in real.parents


def test_count_of_bad_inputs_tried():
    """Reports how many bad inputs this module exercised (printed with ``pytest -s``)."""
    expected = {c[0] for c in PER_CHECKPOINT} | {c[0] for c in WHOLE_RUN}
    ran = set(TRIED)
    assert ran <= expected | {"architecture options that fit no checkpoint",
                              "train --resume of a run whose resume state is gone"}
    print(f"\n[bad-input] distinct bad inputs tried: {len(ran)} (+ fuzzed damaged checkpoint "
          "files and path strings)")
