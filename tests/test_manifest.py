"""Tests of the dependency-free run manifest (``checkpoints_manifest``)."""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import re
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import checkpoints_manifest as cm

REPO = Path(__file__).resolve().parents[1]
README = REPO / "checkpoints_manifest" / "README.md"
SHA_A = "a" * 64


def _doc(**overrides) -> dict:
    """A valid manifest document (as decoded JSON) with two checkpoints listed out of order."""
    doc = {
        "format": "checkpoints-manifest",
        "version": 1,
        "run_name": "run-a",
        "created": "2024-05-01T09:30:00+00:00",
        "model": {"arch": "resnet18", "kwargs": {"cifar_stem": True}, "num_classes": 10,
                  "penultimate": "fc"},
        "dataset": {"name": "cifar10", "params": {"root": "data"}},
        "training": {"objective": "ctc", "lr": 0.05, "ctc": {"alpha": 0.5}},
        "seed": 3,
        "checkpoints": [
            {"epoch": 4, "step": 400, "path": "checkpoints/ckpt_epoch_4.pth", "sha256": SHA_A,
             "metrics": {"train_loss": 1.5, "train_acc": 0.5}, "time": 1714556400.5},
            {"epoch": 2, "step": 200, "path": "checkpoints/ckpt_epoch_2.pth", "sha256": None,
             "metrics": {}, "time": "2024-05-01T10:02:11Z"},
        ],
    }
    doc.update(overrides)
    return doc


def _write_doc(run_dir: Path, doc) -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / "manifest.json"
    path.write_text(doc if isinstance(doc, str) else json.dumps(doc))
    return path


def _new_manifest() -> cm.Manifest:
    return cm.create_manifest(run_name="run-a",
                              model=cm.ModelSpec("small_cnn", 4, penultimate="fc"),
                              dataset=cm.DatasetSpec("shapes", {"n_train": 60}),
                              training={"objective": "ce", "lr": 0.1}, seed=0)


def _tmp_leftovers(run_dir: Path) -> list[str]:
    return sorted(p.name for p in run_dir.iterdir() if p.name.endswith(".tmp"))


# ------------------------------------------------------------------------------ round trip
def test_round_trip_preserves_everything_and_sorts(tmp_path):
    path = _write_doc(tmp_path, _doc())
    m = cm.read_manifest(tmp_path)
    assert [c.epoch for c in m.checkpoints] == [2, 4]  # sorted by (epoch, step)
    assert m.model == cm.ModelSpec("resnet18", 10, {"cifar_stem": True}, "fc")
    assert m.dataset.params == {"root": "data"} and m.training["ctc"] == {"alpha": 0.5}
    assert m.seed == 3 and m.run_name == "run-a" and m.epochs == [2, 4]
    assert m.get(4).metrics == {"train_loss": 1.5, "train_acc": 0.5} and m.get(3) is None
    assert m.get(2).timestamp() == pytest.approx(1714557731.0)
    cm.write_manifest(tmp_path, m)
    again = cm.read_manifest(path)  # a file path works as well as the run directory
    assert again == m
    on_disk = json.loads(path.read_text())
    assert list(on_disk)[:3] == ["format", "version", "run_name"]
    assert on_disk["checkpoints"][0]["epoch"] == 2


def test_create_manifest_accepts_mappings_and_a_bare_dataset_name(tmp_path):
    m = cm.create_manifest(run_name="r", model={"arch": "resnet18", "num_classes": 100},
                           dataset="cifar100", seed=None)
    assert m.model.kwargs == {} and m.model.penultimate is None
    assert m.dataset == cm.DatasetSpec("cifar100")
    assert m.checkpoints == [] and m.created.endswith("+00:00")
    cm.write_manifest(tmp_path / "new" / "run", m)  # creates the run directory
    assert cm.read_manifest(tmp_path / "new" / "run") == m


def test_unknown_keys_are_kept_at_every_level(tmp_path):
    doc = _doc(future_top={"x": [1, 2]})
    doc["model"]["future_model"] = "m"
    doc["dataset"]["future_ds"] = 1
    doc["checkpoints"][0]["future_entry"] = {"k": None}
    _write_doc(tmp_path, doc)
    m = cm.read_manifest(tmp_path)
    assert m.extra == {"future_top": {"x": [1, 2]}}
    assert m.model.extra == {"future_model": "m"} and m.dataset.extra == {"future_ds": 1}
    assert m.get(4).extra == {"future_entry": {"k": None}}
    cm.append_checkpoint(tmp_path, cm.CheckpointEntry(epoch=6, step=600, path="c6.pth"))
    written = json.loads((tmp_path / "manifest.json").read_text())
    assert written["future_top"] == {"x": [1, 2]} and written["model"]["future_model"] == "m"
    assert written["dataset"]["future_ds"] == 1
    assert written["checkpoints"][1]["future_entry"] == {"k": None}


def test_non_finite_metrics_are_written_as_null_and_read_as_nan(tmp_path):
    cm.write_manifest(tmp_path, _new_manifest())
    cm.append_checkpoint(tmp_path, cm.CheckpointEntry(
        epoch=1, step=10, path="a.pth", metrics={"loss": math.nan, "grad": math.inf, "acc": 1}))
    text = (tmp_path / "manifest.json").read_text()
    assert "NaN" not in text and "Infinity" not in text  # strict JSON for other languages
    assert json.loads(text)["checkpoints"][0]["metrics"] == {"loss": None, "grad": None, "acc": 1}
    metrics = cm.read_manifest(tmp_path).get(1).metrics
    assert math.isnan(metrics["loss"]) and math.isnan(metrics["grad"])
    assert metrics["acc"] == 1.0 and isinstance(metrics["acc"], float)


def test_non_finite_numbers_in_free_form_fields_are_written_as_null(tmp_path):
    doc = _doc(training={"lr": float("nan"), "grid": [1.0, float("inf")]})
    (tmp_path / "manifest.json").write_text(json.dumps(doc))  # Python's json writes NaN tokens
    m = cm.read_manifest(tmp_path)
    assert math.isnan(m.training["lr"])
    cm.append_checkpoint(tmp_path, cm.CheckpointEntry(epoch=9, step=9, path="e9.pth"))
    written = json.loads((tmp_path / "manifest.json").read_text(),
                         parse_constant=lambda c: pytest.fail(f"non-standard JSON {c}"))
    assert written["training"] == {"lr": None, "grid": [1.0, None]}


def test_path_normalisation_and_sha_case(tmp_path):
    doc = _doc()
    doc["checkpoints"][0]["path"] = "./checkpoints/./ckpt_epoch_4.pth"
    doc["checkpoints"][0]["sha256"] = "ABCDEF" + "0" * 58
    _write_doc(tmp_path, doc)
    entry = cm.read_manifest(tmp_path).get(4)
    assert entry.path == "checkpoints/ckpt_epoch_4.pth"
    assert entry.sha256 == "abcdef" + "0" * 58


def test_sha256_file_matches_hashlib(tmp_path):
    f = tmp_path / "x.bin"
    f.write_bytes(b"abc")
    assert cm.sha256_file(f) == ("ba7816bf8f01cfea414140de5dae2223"
                                 "b00361a396177a9cb410ff61f20015ad")
    big = os.urandom(3 * (1 << 20) + 17)  # crosses the 1 MiB chunk boundary
    f.write_bytes(big)
    assert cm.sha256_file(f) == hashlib.sha256(big).hexdigest()


# ------------------------------------------------------------------------------ validation
def _set(path: str, value):
    """Mutation setting a dotted/indexed field of the document (``value`` is deep-copied)."""

    def mutate(doc):
        parts = re.findall(r"[^.\[\]]+", path)
        target = doc
        for part in parts[:-1]:
            target = target[int(part)] if isinstance(target, list) else target[part]
        last = parts[-1]
        if isinstance(target, list):
            target[int(last)] = copy.deepcopy(value)
        else:
            target[last] = copy.deepcopy(value)
        return doc

    return mutate


def _drop(path: str):
    def mutate(doc):
        parts = path.split(".")
        target = doc
        for part in parts[:-1]:
            target = target[int(part)] if part.isdigit() else target[part]
        del target[parts[-1]]
        return doc

    return mutate


INVALID = [
    (_set("format", "other"), 'format must be "checkpoints-manifest", got "other"'),
    (_drop("format"), "format must be"),
    (_set("version", 2), "version 2 is newer than this reader supports"),
    (_set("version", "1"), 'version must be a positive int, got "1"'),
    (_set("version", True), "version must be a positive int, got true"),
    (_drop("run_name"), "missing required field run_name"),
    (_set("run_name", ""), 'run_name must be a non-empty string, got ""'),
    (_set("created", "yesterday"), 'created must be an ISO-8601 timestamp string, got "yesterday"'),
    (_drop("model"), "missing required field model"),
    (_set("model", [1]), "model must be a JSON object, got [1]"),
    (_set("model.arch", 5), "model.arch must be a non-empty string, got 5"),
    (_drop("model.num_classes"), "missing required field model.num_classes"),
    (_set("model.num_classes", 0), "model.num_classes must be an int >= 1, got 0"),
    (_set("model.num_classes", 10.0), "model.num_classes must be an int >= 1, got 10.0"),
    (_set("model.kwargs", [1, 2]), "model.kwargs must be a JSON object, got [1, 2]"),
    (_set("model.penultimate", "fc..x"), 'model.penultimate must be a dotted module name'),
    (_set("model.penultimate", 3), "model.penultimate must be a dotted module name"),
    (_drop("dataset.name"), "missing required field dataset.name"),
    (_set("dataset.params", "root=data"), 'dataset.params must be a JSON object, got "root=data"'),
    (_set("training", [1]), "training must be a JSON object, got [1]"),
    (_set("seed", 1.5), "seed must be an int or null, got 1.5"),
    (_set("seed", "0"), 'seed must be an int or null, got "0"'),
    (_drop("checkpoints"), "missing required field checkpoints"),
    (_set("checkpoints", {}), "checkpoints must be a JSON array, got {}"),
    (_set("checkpoints[1]", 7), "checkpoints[1] must be a JSON object, got 7"),
    (_set("checkpoints[1].epoch", "a"), 'checkpoints[1].epoch must be an int >= 0, got "a"'),
    (_set("checkpoints[1].epoch", -1), "checkpoints[1].epoch must be an int >= 0, got -1"),
    (_set("checkpoints[1].epoch", 2.0), "checkpoints[1].epoch must be an int >= 0, got 2.0"),
    (_set("checkpoints[0].epoch", False), "checkpoints[0].epoch must be an int >= 0, got false"),
    (_drop("checkpoints.0.step"), "missing required field checkpoints[0].step"),
    (_set("checkpoints[0].step", None), "checkpoints[0].step must be an int >= 0, got null"),
    (_drop("checkpoints.1.path"), "missing required field checkpoints[1].path"),
    (_set("checkpoints[0].path", "/etc/passwd"), "checkpoints[0].path must be a relative POSIX "
                                                 "path inside the run directory (not absolute)"),
    (_set("checkpoints[0].path", "../other/x.pth"), "checkpoints[0].path must be a relative POSIX "
                                                    "path inside the run directory (no '..' "),
    (_set("checkpoints[0].path", "a/b/../../../x.pth"), "(no '..' components)"),
    (_set("checkpoints[0].path", "C:/weights/x.pth"), "checkpoints[0].path"),
    (_set("checkpoints[0].path", "sub\\x.pth"), "(use forward slashes)"),
    (_set("checkpoints[0].path", "a//x.pth"), "(no empty components)"),
    (_set("checkpoints[0].path", ""), "checkpoints[0].path"),
    (_set("checkpoints[0].path", "."), "(must name a file)"),
    (_set("checkpoints[0].path", 3), "checkpoints[0].path"),
    (_set("checkpoints[0].sha256", "abc"), 'checkpoints[0].sha256 must be 64 hexadecimal '
                                           'characters (a sha256 digest) or null, got "abc"'),
    (_set("checkpoints[0].metrics", [1]), "checkpoints[0].metrics must be a JSON object"),
    (_set("checkpoints[0].metrics", {"loss": "high"}),
     'checkpoints[0].metrics.loss must be a number (or null for NaN), got "high"'),
    (_set("checkpoints[0].metrics", {"ok": True}), "checkpoints[0].metrics.ok must be a number"),
    (_set("checkpoints[0].time", "noon"), "checkpoints[0].time must be seconds since the Unix"),
    (_set("checkpoints[0].time", -5), "checkpoints[0].time must be seconds since the Unix"),
    (_set("checkpoints[1].epoch", 4), "checkpoints[1].epoch 4 duplicates checkpoints[0]; each "
                                      "epoch may appear once"),
    (_set("checkpoints[1].path", "checkpoints/ckpt_epoch_4.pth"),
     "checkpoints[1].path 'checkpoints/ckpt_epoch_4.pth' duplicates checkpoints[0]"),
]


@pytest.mark.parametrize("mutate, expected", INVALID, ids=[e for _, e in INVALID])
def test_each_invalid_field_is_named(tmp_path, mutate, expected):
    path = _write_doc(tmp_path, mutate(_doc()))
    with pytest.raises(cm.ManifestError) as info:
        cm.read_manifest(tmp_path)
    message = str(info.value)
    assert message.startswith(f"{path}: ")
    assert expected in message
    assert "\n" not in message
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize("content, expected", [
    ("{not json", "not valid JSON (Expecting property name enclosed in double quotes at line 1"),
    ("", "not valid JSON"),
    ("[1, 2]", "the top level must be a JSON object, got [1, 2]"),
    ('{"format": "checkpoints-manifest", "format": "x"}', "duplicate key 'format'"),
    ("[" * 100_000 + "]" * 100_000, "not valid JSON"),
    (b"\xff\xfe{}", "not UTF-8 text"),
    ("{\"a\": " + "9" * 5000 + "}", "not valid JSON"),
])
def test_undecodable_documents(tmp_path, content, expected):
    path = tmp_path / "manifest.json"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    with pytest.raises(cm.ManifestError, match=re.escape(expected)) as info:
        cm.read_manifest(tmp_path)
    assert str(info.value).startswith(f"{path}: ")


def test_utf8_bom_is_accepted(tmp_path):
    (tmp_path / "manifest.json").write_bytes(b"\xef\xbb\xbf" + json.dumps(_doc()).encode())
    assert cm.read_manifest(tmp_path).run_name == "run-a"


def test_missing_manifest(tmp_path):
    with pytest.raises(cm.ManifestError, match="manifest.json: no such manifest"):
        cm.read_manifest(tmp_path)


def test_in_memory_validation_names_source():
    with pytest.raises(cm.ManifestError, match=r"^<dict>: checkpoint.epoch must be an int >= 0"):
        cm.CheckpointEntry.from_dict({"epoch": "x", "step": 0, "path": "a.pth"})
    with pytest.raises(cm.ManifestError, match="<new manifest>: model.num_classes must be"):
        cm.create_manifest(run_name="r", model={"arch": "a", "num_classes": -1}, dataset="d")


def test_invalid_manifest_is_not_written(tmp_path):
    cm.write_manifest(tmp_path, _new_manifest())
    before = (tmp_path / "manifest.json").read_bytes()
    bad = _new_manifest()
    bad.training = {"not_json": {1, 2}}
    with pytest.raises(cm.ManifestError, match="cannot be written as strict JSON"):
        cm.write_manifest(tmp_path, bad)
    bad = _new_manifest()
    bad.checkpoints = [cm.CheckpointEntry(epoch=1, step=0, path="../escape.pth")]
    with pytest.raises(cm.ManifestError, match=r"checkpoints\[0\].path"):
        cm.write_manifest(tmp_path, bad)
    assert (tmp_path / "manifest.json").read_bytes() == before
    assert _tmp_leftovers(tmp_path) == []


# ------------------------------------------------------------------------------ appending
def test_append_replace_and_conflicts(tmp_path):
    cm.write_manifest(tmp_path, _new_manifest())
    cm.append_checkpoint(tmp_path, cm.CheckpointEntry(epoch=2, step=20, path="e2.pth",
                                                      metrics={"loss": 1.0}))
    cm.append_checkpoint(tmp_path, {"epoch": 1, "step": 10, "path": "e1.pth"})
    with pytest.raises(cm.ManifestError, match=r"epoch 2 is already recorded \(e2.pth\); pass "
                                               "replace=True"):
        cm.append_checkpoint(tmp_path, cm.CheckpointEntry(epoch=2, step=21, path="e2b.pth"))
    with pytest.raises(cm.ManifestError, match="'e1.pth' of the new epoch 3 is already used by "
                                               "epoch 1"):
        cm.append_checkpoint(tmp_path, cm.CheckpointEntry(epoch=3, step=30, path="e1.pth"))
    with pytest.raises(cm.ManifestError, match=r"new checkpoint.path must be a relative"):
        cm.append_checkpoint(tmp_path, cm.CheckpointEntry(epoch=3, step=30, path="/abs.pth"))
    m = cm.append_checkpoint(tmp_path, cm.CheckpointEntry(epoch=2, step=22, path="e2.pth",
                                                          metrics={"loss": 0.5}), replace=True)
    assert [(c.epoch, c.step) for c in m.checkpoints] == [(1, 10), (2, 22)]
    assert cm.read_manifest(tmp_path) == m
    assert m.get(2).metrics == {"loss": 0.5}
    assert _tmp_leftovers(tmp_path) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["manifest.json"]  # no lock file left


def test_lock_file_removed_and_still_exclusive_across_processes(tmp_path):
    """Writers that remove the lock file on release still exclude each other: 4 processes x 25
    appends lose no entry (a waiter that locked a removed file retries), and no lock stays."""
    import multiprocessing as mp

    cm.write_manifest(tmp_path, _new_manifest())
    ctx = mp.get_context("fork")
    procs = [ctx.Process(target=_append_many, args=(str(tmp_path), w)) for w in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0, 0, 0]
    epochs = sorted(c.epoch for c in cm.read_manifest(tmp_path).checkpoints)
    assert epochs == list(range(100))
    assert not (tmp_path / cm.LOCK_NAME).exists()


def _append_many(run_dir: str, worker: int) -> None:
    for i in range(25):
        e = worker * 25 + i
        cm.append_checkpoint(run_dir, cm.CheckpointEntry(epoch=e, step=e, path=f"e{e}.pth"))


def test_append_needs_an_existing_manifest(tmp_path):
    with pytest.raises(cm.ManifestError, match="no such manifest"):
        cm.append_checkpoint(tmp_path, cm.CheckpointEntry(epoch=1, step=1, path="a.pth"))
    with pytest.raises(cm.ManifestError, match="no such run directory"):
        cm.append_checkpoint(tmp_path / "nope", cm.CheckpointEntry(epoch=1, step=1, path="a.pth"))


def test_failed_replace_leaves_old_manifest_and_no_temp_file(tmp_path, monkeypatch):
    cm.write_manifest(tmp_path, _new_manifest())
    before = (tmp_path / "manifest.json").read_bytes()

    def broken_replace(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(cm.ManifestError, match="cannot write it .No space left on device."):
        cm.append_checkpoint(tmp_path, cm.CheckpointEntry(epoch=1, step=1, path="a.pth"))
    assert (tmp_path / "manifest.json").read_bytes() == before
    assert _tmp_leftovers(tmp_path) == []


def test_rewrite_keeps_file_permissions(tmp_path):
    cm.write_manifest(tmp_path, _new_manifest())
    path = tmp_path / "manifest.json"
    assert path.stat().st_mode & 0o777 == 0o644
    path.chmod(0o664)
    cm.append_checkpoint(tmp_path, cm.CheckpointEntry(epoch=1, step=1, path="a.pth"))
    assert path.stat().st_mode & 0o777 == 0o664


def test_concurrent_appends_from_threads_lose_nothing(tmp_path):
    cm.write_manifest(tmp_path, _new_manifest())
    errors: list[BaseException] = []

    def worker(k: int) -> None:
        try:
            for i in range(10):
                epoch = k * 100 + i
                cm.append_checkpoint(tmp_path, cm.CheckpointEntry(
                    epoch=epoch, step=epoch, path=f"w{k}/e{i}.pth", metrics={"k": k}))
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    epochs = cm.read_manifest(tmp_path).epochs
    assert epochs == sorted(k * 100 + i for k in range(6) for i in range(10))
    assert _tmp_leftovers(tmp_path) == []


def test_concurrent_appends_from_processes_lose_nothing(tmp_path):
    cm.write_manifest(tmp_path, _new_manifest())
    script = textwrap.dedent("""
        import sys
        import checkpoints_manifest as cm
        run, k = sys.argv[1], int(sys.argv[2])
        for i in range(15):
            e = k * 1000 + i
            cm.append_checkpoint(run, cm.CheckpointEntry(epoch=e, step=e, path=f"p{k}/{i}.pt"))
    """)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    procs = [subprocess.Popen([sys.executable, "-c", script, str(tmp_path), str(k)], env=env,
                              stderr=subprocess.PIPE) for k in range(3)]
    for p in procs:
        _, err = p.communicate(timeout=60)
        assert p.returncode == 0, err.decode()
    epochs = cm.read_manifest(tmp_path).epochs
    assert epochs == sorted(k * 1000 + i for k in range(3) for i in range(15))
    assert _tmp_leftovers(tmp_path) == []


def test_entry_for_file_and_record_checkpoint(tmp_path, monkeypatch):
    run = tmp_path / "run"
    cm.write_manifest(run, _new_manifest())
    (run / "ck").mkdir()
    f = run / "ck" / "model_3.pth"
    f.write_bytes(b"weights")

    class Scalar:  # stands in for a 0-d tensor / NumPy scalar
        def __float__(self):
            return 0.25

    m = cm.record_checkpoint(run, f, epoch=3, step=30, metrics={"acc": Scalar(), "loss": 2})
    entry = m.get(3)
    assert entry.path == "ck/model_3.pth" and entry.sha256 == hashlib.sha256(b"weights").hexdigest()
    assert entry.metrics == {"acc": 0.25, "loss": 2.0} and isinstance(entry.time, float)
    monkeypatch.chdir(run)  # relative paths are taken from the current directory
    assert cm.entry_for_file(".", "ck/model_3.pth", epoch=3, step=30).path == "ck/model_3.pth"
    outside = tmp_path / "elsewhere.pth"
    outside.write_bytes(b"x")
    with pytest.raises(cm.ManifestError, match="is not inside the run directory"):
        cm.entry_for_file(run, outside, epoch=1, step=1)
    with pytest.raises(cm.ManifestError, match="cannot hash it"):
        cm.entry_for_file(run, run / "missing.pth", epoch=1, step=1)
    with pytest.raises(cm.ManifestError, match="metrics.acc must be a number"):
        cm.entry_for_file(run, f, epoch=1, step=1, metrics={"acc": "high"})


# ------------------------------------------------------------------------------ README
def _readme_block(lang: str) -> str:
    match = re.search(rf"```{lang}\n(.*?)```", README.read_text(), re.DOTALL)
    assert match, f"README has no {lang} block"
    return match.group(1)


def test_readme_example_json_is_a_valid_manifest():
    m = cm.parse_manifest(_readme_block("json"), "README.md")
    assert m.epochs == [2, 4] and m.model.penultimate == "fc"
    assert m.training["ctc"]["nce_k"] == 16384


def test_readme_training_loop_example_runs(tmp_path, monkeypatch):
    torch = pytest.importorskip("torch")
    code = _readme_block("python")
    assert len(code.strip().splitlines()) <= 16
    model = torch.nn.Linear(3, 2)
    namespace = {"epochs": 2, "model": model, "loader": [0, 1, 2], "optimizer": None,
                 "train_one_epoch": lambda m, loader, opt: (0.5, 0.75)}
    monkeypatch.chdir(tmp_path)
    exec(compile(code, str(README), "exec"), namespace)
    m = cm.read_manifest(tmp_path / "runs" / "my-run")
    assert m.epochs == [1, 2] and [c.step for c in m.checkpoints] == [3, 6]
    assert m.get(2).path == "checkpoints/ckpt_epoch_2.pth"
    assert m.get(2).sha256 == cm.sha256_file(tmp_path / "runs/my-run/checkpoints/ckpt_epoch_2.pth")


# ------------------------------------------------------------------------------ fuzzing
JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                 max_size=4),
    max_leaves=12,
)
FIELDS = ["format", "version", "run_name", "created", "model", "model.arch", "model.kwargs",
          "model.num_classes", "model.penultimate", "dataset", "dataset.name", "dataset.params",
          "training", "seed", "checkpoints", "checkpoints[0]", "checkpoints[0].epoch",
          "checkpoints[1].step", "checkpoints[0].path", "checkpoints[1].sha256",
          "checkpoints[0].metrics", "checkpoints[1].time", "checkpoints[1].epoch"]


def _check_only_manifest_error(text: str | bytes) -> None:
    try:
        m = cm.parse_manifest(text, "fuzz.json")
    except cm.ManifestError as exc:
        assert str(exc).startswith("fuzz.json: ") and "\n" not in str(exc)
        return
    # Whatever is accepted can be written, and writing is idempotent.
    text = m.to_json("fuzz.json")
    assert cm.parse_manifest(text, "fuzz.json").to_json("fuzz.json") == text


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(doc=JSON)
def test_fuzz_random_json_documents(doc):
    _check_only_manifest_error(json.dumps(doc))


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(edits=st.lists(st.tuples(st.sampled_from(FIELDS), JSON), min_size=1, max_size=3),
       drop=st.sampled_from([None, *FIELDS]))
def test_fuzz_mutated_manifests(edits, drop):
    doc = _doc()
    for field, value in edits:
        try:
            _set(field, value)(doc)
        except (KeyError, IndexError, TypeError, ValueError):
            pass  # the parent was replaced by a non-container in an earlier edit
    if drop is not None:
        try:
            _drop(drop.replace("[", ".").replace("]", ""))(doc)
        except (KeyError, IndexError, TypeError, ValueError):
            pass
    _check_only_manifest_error(json.dumps(doc))


@settings(max_examples=100, deadline=None)
@given(raw=st.binary(max_size=200) | st.text(max_size=200))
def test_fuzz_raw_bytes_and_text(raw):
    _check_only_manifest_error(raw)
