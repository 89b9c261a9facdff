"""Tests of safe checkpoint loading, state-dict unwrapping and file-name inference."""

from __future__ import annotations

import argparse
import builtins
import os
import pickle
import re
import tempfile
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file
from torch import nn

import checkpoints_manifest as cm
from dtprobe import checkpoints as ck
from dtprobe.checkpoints import layouts
from dtprobe.errors import CheckpointError, ConfigError, DtprobeError


def _tiny() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(OrderedDict(conv=nn.Conv2d(3, 4, 3), bn=nn.BatchNorm2d(4),
                                     flat=nn.Flatten(), fc=nn.Linear(4, 2)))


def _touch(run: Path, *names: str) -> None:
    for name in names:
        (run / name).parent.mkdir(parents=True, exist_ok=True)
        (run / name).write_bytes(b"")


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------------ name inference
NAMINGS = [
    ("ckpt_epoch_{e}.pth", None),
    ("epoch={e}-step={s}.ckpt", "step"),
    ("checkpoint_{e}.pt", None),
    ("checkpoint-{e}.pth.tar", None),
    ("model_{e}.pth", None),
    ("epoch_{e:04d}.pt", None),
    ("ckpt_epoch_{e}.safetensors", None),
    ("epoch={e}-step={s}.safetensors", "step"),
    ("checkpoint_{e}.safetensors", None),
    ("checkpoint-{e}.safetensors", None),
    ("model_{e}.safetensors", None),
    ("epoch_{e}.safetensors", None),
]


@pytest.mark.parametrize("template, has_step", NAMINGS, ids=[t for t, _ in NAMINGS])
@pytest.mark.parametrize("subdir", ["", "checkpoints/"])
def test_each_known_naming(tmp_path, template, has_step, subdir):
    epochs = [10, 2, 1]  # numeric, not lexical, order expected
    for e in epochs:
        _touch(tmp_path, subdir + template.format(e=e, s=e * 50))
    _touch(tmp_path, "last.ckpt", "notes.txt", subdir + "best.pth")
    series = ck.infer_checkpoint_series(tmp_path)
    # Lightning counts epochs from 0 after the first epoch: epoch=e is e+1 epochs completed.
    shift = 1 if template.startswith("epoch=") and template.endswith(".ckpt") else 0
    assert [c.epoch for c in series] == [1 + shift, 2 + shift, 10 + shift]
    assert [c.source_epoch for c in series] == [1, 2, 10]
    assert [c.step for c in series] == ([50, 100, 500] if has_step else [None] * 3)
    for c in series:
        assert c.path == tmp_path / c.relpath and c.path.exists()
        assert c.relpath.startswith(subdir)
    assert sorted(series.ignored) == sorted(["last.ckpt", subdir + "best.pth"])
    assert series.message == ""


def test_lightning_versioned_duplicate_is_ambiguous(tmp_path):
    _touch(tmp_path, "epoch=3-step=300.ckpt", "epoch=3-step=300-v1.ckpt", "epoch=4-step=400.ckpt")
    with pytest.raises(CheckpointError, match=r"epoch 4 has 2 files \(epoch=3-step"):
        ck.infer_checkpoint_series(tmp_path)


def test_two_namings_for_one_epoch_is_ambiguous(tmp_path):
    _touch(tmp_path, "checkpoint_3.pt", "model_3.pth", "model_4.pth")
    with pytest.raises(CheckpointError) as info:
        ck.infer_checkpoint_series(tmp_path)
    msg = str(info.value)
    assert msg.startswith(f"{tmp_path}: ambiguous checkpoint series: epoch 3 has 2 files")
    assert "checkpoint_3.pt [checkpoint_{epoch}.pt]" in msg
    assert "model_3.pth [model_{epoch}.pth]" in msg
    assert "--pattern" in msg and "write a manifest" in msg and "\n" not in msg
    # The suggested fix works: one naming only.
    series = ck.infer_checkpoint_series(tmp_path, pattern="model_{epoch}.pth")
    assert [c.epoch for c in series] == [3, 4]


@pytest.mark.parametrize("names", [
    ("model_3.pth", "model_003.pth"),                       # one naming, two files
    ("model_3.pth", "checkpoints/model_3.pth"),             # run dir and checkpoints/ subdir
    ("model_3.pth", "model_3.safetensors"),                 # two formats
])
def test_two_files_for_one_epoch_is_ambiguous(tmp_path, names):
    _touch(tmp_path, *names)
    with pytest.raises(CheckpointError, match=r"epoch 3 has 2 files"):
        ck.infer_checkpoint_series(tmp_path)


def test_mixed_namings_with_distinct_epochs_are_accepted(tmp_path):
    _touch(tmp_path, "model_1.pth", "checkpoint_2.pt", "checkpoints/ckpt_epoch_3.pth")
    series = ck.infer_checkpoint_series(tmp_path)
    assert [c.epoch for c in series] == [1, 2, 3]
    assert series.namings == ["model_{epoch}.pth", "checkpoint_{epoch}.pt",
                              "ckpt_epoch_{epoch}.pth"]


def test_nothing_matches_reports_the_files_found(tmp_path):
    _touch(tmp_path, "last.ckpt", "best.pth", "readme.txt")
    with pytest.raises(CheckpointError) as info:
        ck.infer_checkpoint_series(tmp_path)
    msg = str(info.value)
    assert msg.startswith(f"{tmp_path}: found files best.pth, last.ckpt but none matches a known "
                          "checkpoint naming (ckpt_epoch_{epoch}.pth")
    assert "--pattern" in msg and "manifest" in msg
    series = ck.infer_checkpoint_series(tmp_path, allow_empty=True)
    assert list(series) == [] and series.message == msg
    assert series.ignored == ["best.pth", "last.ckpt"]


def test_empty_and_missing_run_directories(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint files matching"):
        ck.infer_checkpoint_series(tmp_path)
    with pytest.raises(CheckpointError, match="no such run directory"):
        ck.infer_checkpoint_series(tmp_path / "missing")


def test_non_ascii_digits_do_not_count_as_epochs(tmp_path):
    _touch(tmp_path, "model_\u0663.pth", "model_\uff11.pth")  # Arabic-Indic 3, full-width 1
    series = ck.infer_checkpoint_series(tmp_path, allow_empty=True)
    assert list(series) == [] and len(series.ignored) == 2


def test_explicit_patterns(tmp_path):
    _touch(tmp_path, "weights/ep1.pt", "weights/ep12.pt", "weights/other.pt", "ep5.pt",
           "run_7_seed0.bin", "run_8_seed1.bin", "checkpoints/run_9_x.bin",
           "s{2}.pt", "step_3_100.pt")
    series = ck.infer_checkpoint_series(tmp_path, "weights/ep{epoch}.pt")
    assert [c.epoch for c in series] == [1, 12]
    series = ck.infer_checkpoint_series(tmp_path, pattern="run_{epoch}_*.bin")
    assert [(c.epoch, c.relpath) for c in series] == [
        (7, "run_7_seed0.bin"), (8, "run_8_seed1.bin"), (9, "checkpoints/run_9_x.bin")]
    series = ck.infer_checkpoint_series(tmp_path, pattern="step_{epoch}_{step}.pt")
    assert [(c.epoch, c.step) for c in series] == [(3, 100)]
    assert [c.epoch for c in ck.infer_checkpoint_series(tmp_path, "weights/e?{epoch}.pt")] == [
        1, 12]
    assert [c.epoch for c in ck.infer_checkpoint_series(tmp_path, "[e]p{epoch}.pt")] == [5]


@pytest.mark.parametrize("pattern, message", [
    ("weights.pt", "has no {epoch} placeholder"),
    ("w_{epoch}_{epoch}.pt", "only one {epoch}"),
    ("w_{foo}.pt", "only one {epoch}"),
    ("w_{epoch.pt", "only one {epoch}"),
    ("w}_{epoch}.pt", "unmatched"),
    ("../x_{epoch}.pt", "without '..'"),
    ("/abs/x_{epoch}.pt", "must be relative"),
])
def test_bad_patterns(tmp_path, pattern, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        ck.infer_checkpoint_series(tmp_path, pattern=pattern)


# --------------------------------------------------------------------------- path safety
def test_resolve_inside(tmp_path):
    run = tmp_path / "run"
    (run / "sub").mkdir(parents=True)
    outside = tmp_path / "outside.pth"
    outside.write_bytes(b"x")
    assert ck.resolve_inside(run, "sub/a.pth") == run / "sub" / "a.pth"
    for bad, why in [("/etc/passwd", "is absolute"), ("../outside.pth", "contains '..'"),
                     ("sub/../../outside.pth", "contains '..'"), ("", "is empty")]:
        with pytest.raises(CheckpointError, match=re.escape(why)):
            ck.resolve_inside(run, bad)
    (run / "link.pth").symlink_to(outside)
    (run / "linkdir").symlink_to(tmp_path, target_is_directory=True)
    (run / "inner.pth").symlink_to(run / "sub")
    for link in ("link.pth", "linkdir/outside.pth"):
        with pytest.raises(CheckpointError, match="outside the run directory"):
            ck.resolve_inside(run, link)
        assert ck.resolve_inside(run, link, allow_symlinks=True) == run / link
    assert ck.resolve_inside(run, "inner.pth") == run / "inner.pth"  # link staying inside


def test_inference_refuses_symlinks_out_of_the_run(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (tmp_path / "secret.pth").write_bytes(b"x")
    (run / "model_1.pth").symlink_to(tmp_path / "secret.pth")
    with pytest.raises(CheckpointError, match="outside the run directory"):
        ck.infer_checkpoint_series(run)
    assert [c.epoch for c in ck.infer_checkpoint_series(run, allow_symlinks=True)] == [1]


def test_verify_sha256(tmp_path):
    f = tmp_path / "a.pt"
    f.write_bytes(b"abc")
    ck.verify_sha256(f, cm.sha256_file(f).upper())
    with pytest.raises(CheckpointError, match="does not match the manifest"):
        ck.verify_sha256(f, "0" * 64)
    with pytest.raises(CheckpointError, match="checkpoint file is missing"):
        ck.verify_sha256(tmp_path / "b.pt", "0" * 64)


# ------------------------------------------------------------------------ state dicts
def _wrap_variants(sd: dict) -> dict[str, object]:
    return {
        "plain": sd,
        "model": {"model": sd, "epoch": 3, "optimizer": {"state": {}, "param_groups": []}},
        "state_dict": {"state_dict": sd, "global_step": 7},
        "net": {"net": sd},
        "model_state_dict": {"model_state_dict": sd, "optimizer_state_dict": {}},
        "module": {"module": sd},
        "nested": {"state_dict": {"model": sd}},
        "ddp": {"model": {f"module.{k}": v for k, v in sd.items()}},
        "lightning": {"state_dict": {f"model.{k}": v for k, v in sd.items()}, "epoch": 1},
        "ddp+lightning": {f"module.model.{k}": v for k, v in sd.items()},
        "with_non_tensors": {**sd, "note": "hello", "lr": 0.1},
    }


@pytest.mark.parametrize("variant", list(_wrap_variants({})))
def test_unwrapping_and_prefix_stripping(tmp_path, variant):
    model = _tiny()
    sd = model.state_dict()
    path = tmp_path / "ck.pt"
    torch.save(_wrap_variants(sd)[variant], path)
    loaded = ck.load_state_dict(path)
    assert _same(loaded, dict(sd))
    fresh = nn.Sequential(OrderedDict(conv=nn.Conv2d(3, 4, 3), bn=nn.BatchNorm2d(4),
                                      flat=nn.Flatten(), fc=nn.Linear(4, 2)))
    ck.load_into_model(fresh, loaded, path)
    assert _same(fresh.state_dict(), dict(sd))


def test_prefix_is_kept_unless_every_key_has_it(tmp_path):
    sd = {"module.a": torch.ones(1), "b": torch.zeros(1)}
    torch.save(sd, tmp_path / "x.pt")
    assert set(ck.load_state_dict(tmp_path / "x.pt")) == {"module.a", "b"}


def test_resnet18_checkpoint_loads_into_fresh_resnet18(tmp_path):
    torch.manual_seed(1)
    trained = torchvision.models.resnet18(num_classes=10)
    with torch.no_grad():  # make BatchNorm statistics non-default so loading is observable
        for m in trained.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    path = tmp_path / "ckpt_epoch_7.pth"
    torch.save({"model": trained.state_dict(), "epoch": 7}, path)
    fresh = torchvision.models.resnet18(num_classes=10)
    ck.load_into_model(fresh, ck.load_state_dict(path), path)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(fresh.eval()(x), trained.eval()(x))
    assert ck.read_checkpoint_meta(path) == {"epoch": 7}
    assert [c.epoch for c in ck.infer_checkpoint_series(tmp_path)] == [7]


def test_metadata_with_options_and_numpy_scalars(tmp_path):
    sd = _tiny().state_dict()
    path = tmp_path / "ck.pth"
    torch.save({"opt": argparse.Namespace(lr=0.05, model="resnet18", save=Path("/runs/a")),
                "model": sd, "optimizer": torch.optim.SGD(_tiny().parameters(), 0.1).state_dict(),
                "epoch": 12, "accuracy": torch.tensor(81.5), "best_acc": np.float64(0.5),
                "hist": np.arange(3)}, path)
    loaded = ck.load_checkpoint(path)
    assert _same(loaded.state_dict, dict(sd)) and loaded.unwrapped == ("model",)
    assert loaded.meta == {"opt": {"lr": 0.05, "model": "resnet18", "save": "/runs/a"},
                           "epoch": 12, "accuracy": 81.5, "best_acc": 0.5}
    assert type(loaded.meta["best_acc"]) is float


def test_num_batches_tracked_may_be_missing(tmp_path):
    sd = {k: v for k, v in _tiny().state_dict().items() if not k.endswith("num_batches_tracked")}
    torch.save(sd, tmp_path / "old.pt")
    ck.load_into_model(_tiny(), ck.load_state_dict(tmp_path / "old.pt"), tmp_path / "old.pt")


def test_safetensors(tmp_path):
    sd = {k: v.contiguous() for k, v in _tiny().state_dict().items()}
    path = tmp_path / "model_5.safetensors"
    save_file({f"module.{k}": v for k, v in sd.items()}, str(path),
              metadata={"epoch": "5", "note": "ctc run", "lr": "0.05"})
    assert _same(ck.load_state_dict(path), sd)
    assert ck.read_checkpoint_meta(path) == {"epoch": 5, "note": "ctc run", "lr": 0.05}
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 40])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        ck.load_state_dict(path)
    save_file({}, str(path))
    with pytest.raises(CheckpointError, match="holds no tensors"):
        ck.load_state_dict(path)


# ---------------------------------------------------------------------------- refusals
class _Payload:
    """Unpickling this calls exec(), which creates ``marker``: arbitrary code execution."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (builtins.exec, (f"open({self.marker!r}, 'w').close()",))


@pytest.mark.parametrize("how", ["torch.save", "nested-in-state-dict", "numpy-object-array",
                                 "in-saved-options", "pickle-protocol-0", "pickle-protocol-1",
                                 "pickle-protocol-2", "pickle-default-protocol",
                                 "named-safetensors", "legacy-torch.save"])
def test_malicious_pickle_is_refused_and_never_runs(tmp_path, how):
    marker = tmp_path / "pwned"
    payload = _Payload(marker)
    path = tmp_path / "ckpt_epoch_1.pth"
    if how == "torch.save":
        torch.save({"model": payload, "epoch": 1}, path)
    elif how == "nested-in-state-dict":
        torch.save({"model": {"w": torch.ones(2), "hook": payload}}, path)
    elif how == "numpy-object-array":  # NumPy arrays are accepted, their objects are not
        torch.save({"model": {"w": torch.ones(2)}, "hist": np.array([payload], dtype=object)},
                   path)
    elif how == "in-saved-options":  # argparse.Namespace is accepted, its contents are not
        torch.save({"model": {"w": torch.ones(2)}, "opt": argparse.Namespace(x=payload)}, path)
    elif how == "named-safetensors":  # a pickle disguised as safetensors is never unpickled
        path = tmp_path / "model_1.safetensors"
        path.write_bytes(pickle.dumps({"model": payload}))
    elif how == "legacy-torch.save":
        torch.save({"model": payload}, path, _use_new_zipfile_serialization=False)
    else:
        protocol = (int(how[-1]) if how[-1].isdigit() else pickle.DEFAULT_PROTOCOL)
        path.write_bytes(pickle.dumps(payload, protocol=protocol))
    for load in (ck.load_state_dict, ck.read_checkpoint_meta, ck.load_checkpoint):
        with pytest.raises(CheckpointError) as info:
            load(path)
        msg = str(info.value)
        # The content decides, not the name: a pickle named .safetensors is refused as one.
        assert msg.startswith(f"{path}: refusing to unpickle it")
        assert "not a plain weights file" in msg
        assert "torch.save(model.state_dict()" in msg
        assert "\n" not in msg
    assert not marker.exists()
    # Control: the payload is live, so the refusal above is what kept it from running.
    control = tmp_path / "control"
    pickle.loads(pickle.dumps(_Payload(control)))
    assert control.exists()


@pytest.mark.parametrize("cut", [0, 10, 200, 0.5, -12])
def test_truncated_files(tmp_path, cut):
    path = tmp_path / "ck.pt"
    torch.save({"model": _tiny().state_dict(), "epoch": 2}, path)
    data = path.read_bytes()
    n = int(len(data) * cut) if isinstance(cut, float) else (cut if cut >= 0 else len(data) + cut)
    path.write_bytes(data[:n])
    with pytest.raises(CheckpointError, match=re.escape(f"{path}: cannot read the checkpoint "
                                                        "(truncated or corrupt file?")):
        ck.load_state_dict(path)


def test_legacy_format_truncated_and_random_bytes(tmp_path):
    path = tmp_path / "legacy.pt"
    torch.save({"model": _tiny().state_dict()}, path, _use_new_zipfile_serialization=False)
    assert _same(ck.load_state_dict(path), dict(_tiny().state_dict()))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        ck.load_state_dict(path)
    path.write_bytes(os.urandom(4096))
    with pytest.raises(CheckpointError):
        ck.load_state_dict(path)


@pytest.mark.parametrize("content, message", [
    (torch.ones(3), "holds a Tensor, not a state dict"),
    ([torch.ones(3)], "holds a list, not a state dict"),
    ({"encoder": {"w": 1}, "epoch": 2}, "no weight tensors found (top-level keys: 'encoder', "
                                        "'epoch')"),
])
def test_content_that_is_not_a_state_dict(tmp_path, content, message):
    torch.save(content, tmp_path / "x.pt")
    with pytest.raises(CheckpointError, match=re.escape(message)):
        ck.load_state_dict(tmp_path / "x.pt")


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(CheckpointError, match="checkpoint file is missing"):
        ck.load_state_dict(tmp_path / "nope.pt")
    with pytest.raises(CheckpointError, match="is not a file"):
        ck.load_state_dict(tmp_path)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_weights_are_refused(tmp_path, bad):
    sd = _tiny().state_dict()
    sd["fc.weight"][0, 1] = bad
    torch.save({"model": sd}, tmp_path / "x.pt")
    with pytest.raises(CheckpointError, match=r"'fc.weight' contain NaN/Inf \(diverged run\?\)"):
        ck.load_state_dict(tmp_path / "x.pt")
    assert ck.load_state_dict(tmp_path / "x.pt", finite=False).keys() == sd.keys()


def test_large_finite_weights_are_not_mistaken_for_divergence(tmp_path):
    sd = {"w": torch.full((8,), 3e38), "h": torch.full((4,), 60000.0, dtype=torch.float16)}
    torch.save(sd, tmp_path / "x.pt")  # both sums overflow to inf, yet every value is finite
    assert _same(ck.load_state_dict(tmp_path / "x.pt"), sd)


# ------------------------------------------------------------------------- load_into_model
def test_shape_mismatch_message(tmp_path):
    path = tmp_path / "ck.pth"
    torch.save({"model": torchvision.models.resnet18(num_classes=10).state_dict()}, path)
    with pytest.raises(CheckpointError) as info:
        ck.load_into_model(torchvision.models.resnet18(num_classes=100), ck.load_state_dict(path),
                           path)
    msg = str(info.value)
    assert msg.startswith(f"{path}: weights do not fit the ResNet that was built")
    assert "shape mismatch: fc.weight (checkpoint (10, 512), model (100, 512))" in msg
    assert "pass the right --arch / --num-classes" in msg and "\n" not in msg
    assert isinstance(info.value, DtprobeError)


def test_missing_and_unexpected_keys_message():
    sd = {f"encoder.{k}": v for k, v in _tiny().state_dict().items()}
    with pytest.raises(CheckpointError) as info:
        ck.load_into_model(_tiny(), sd, "run/ck.pt")
    msg = str(info.value)
    assert "missing keys: conv.weight, conv.bias, bn.weight (+" in msg
    assert "unexpected keys: encoder.conv.weight" in msg
    assert "extra prefix 'encoder.'" in msg and "--arch / --num-classes" in msg
    partial = dict(_tiny().state_dict())
    del partial["fc.bias"]
    with pytest.raises(CheckpointError, match=r"missing keys: fc.bias;|missing keys: fc.bias\)"):
        ck.load_into_model(_tiny(), partial, "run/ck.pt")


# ---------------------------------------------------------------------------------- fuzzing
FRAGMENTS = st.sampled_from([
    "ckpt_epoch_", "model_", "checkpoint_", "checkpoint-", "epoch=", "-step=", "epoch_", "last",
    "best", "-v1", ".pth", ".pt", ".ckpt", ".tar", ".safetensors", ".pth.tar", "0", "1", "12",
    "007", "99999999999999999999", "\u0663", "=", "-", "_", " ", "{epoch}", "*", "[", "]", ".",
])
NEAR_MISS = st.tuples(
    st.sampled_from(["ckpt_epoch_{e}.pth", "epoch={e}-step={s}.ckpt", "epoch={e}-step={s}-v1.ckpt",
                     "checkpoint_{e}.pt", "checkpoint-{e}.pth.tar", "model_{e}.safetensors",
                     "epoch_{e}.pt", "model_{e}.pt", "Model_{e}.pth", "model_{e}.pth.bak",
                     "epoch={e}.ckpt", "checkpoint_{e}.pth.tar"]),
    st.from_regex(r"[0-9]{1,3}", fullmatch=True) | st.sampled_from(["", "x", "-1", "1.5",
                                                                     "\u0663", "00"]),
    st.integers(0, 10**6),
).map(lambda t: t[0].format(e=t[1], s=t[2]))
NAME = st.one_of(
    NEAR_MISS,
    st.lists(FRAGMENTS, min_size=1, max_size=6).map("".join),
    st.text(st.characters(blacklist_characters="/\x00", blacklist_categories=("Cs",)),
            min_size=1, max_size=30),
).filter(lambda n: n not in (".", "..") and len(n.encode()) < 200)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(files=st.lists(st.tuples(NAME, st.booleans()), max_size=8))
def test_fuzz_inference_on_random_file_names(files):
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp)
        created = set()
        for name, in_subdir in files:
            rel = f"checkpoints/{name}" if in_subdir else name
            try:
                _touch(run, rel)
                created.add(rel)
            except OSError:
                continue  # e.g. a name the filesystem refuses, or "checkpoints" as a file
        try:
            series = ck.infer_checkpoint_series(run, allow_empty=True)
        except CheckpointError as exc:
            assert str(exc) and "\n" not in str(exc)
            return
        epochs = [c.epoch for c in series]
        assert epochs == sorted(set(epochs))
        for c in series:
            assert c.relpath in created and c.path.exists() and c.epoch >= 0
            assert c.naming in ck.KNOWN_NAMINGS + layouts.EXTRA_NAMINGS
        matched = {c.relpath for c in series}
        assert set(series.ignored) <= created and not set(series.ignored) & matched
        for rel in created:  # every file is matched, reported as ignored, or not checkpoint-like
            if ck.is_temporary_name(rel):  # a writer's leftover is never a checkpoint
                assert rel not in matched and rel not in series.ignored
                continue
            assert rel in matched or rel in series.ignored or not rel.lower().endswith(
                (".pt", ".pth", ".ckpt", ".tar", ".bin", ".safetensors", ".pkl", ".pickle"))
        assert bool(series.message) == (len(series) == 0)


@settings(max_examples=100, deadline=None)
@given(pattern=st.text(max_size=20), files=st.lists(NAME, max_size=4))
def test_fuzz_patterns(pattern, files):
    with tempfile.TemporaryDirectory() as tmp:
        for name in files:
            try:
                _touch(Path(tmp), name)
            except OSError:
                continue
        try:
            series = ck.infer_checkpoint_series(tmp, pattern=pattern, allow_empty=True)
        except (CheckpointError, ConfigError) as exc:
            assert "\n" not in str(exc)
            return
        assert [c.epoch for c in series] == sorted({c.epoch for c in series})
