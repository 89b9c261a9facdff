"""Decode-once image stores, stable subsets and the memory budget (issue 14).

References are written from the definitions here: the in-memory float32 path of the same
loader (the store must give the very same floats), a brute-force stratified subset rule, and
the process's own peak resident memory read from /proc.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from benchmarks import PEAK_RSS_CODE
from dtprobe import analysis
from dtprobe.analysis.memory import check_budget, parse_size
from dtprobe.data import load_dataset
from dtprobe.data import store as store_mod
from dtprobe.data.pixels import RawImages
from dtprobe.data.subsets import sample_ids_digest, stable_subset
from dtprobe.errors import ConfigError, DatasetError
from dtprobe.training.trainer import train
from tests.helpers import copy_run, make_folder, tiny_config

REPO = Path(__file__).resolve().parents[1]
FAST = ["source_accuracy", "class_separation", "neural_collapse", "probe_accuracy", "linear_cka"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_folder(tmp_path_factory.mktemp("folder") / "data", per_class=60)


# ------------------------------------------------------------------------------- the store
def test_store_gives_the_in_memory_floats_and_statistics(folder, tmp_path):
    memory = load_dataset("imagefolder", root=str(folder), image_size=16)
    stored = load_dataset("imagefolder", root=str(folder), image_size=16, store=tmp_path)
    assert isinstance(stored.train.images, RawImages) and stored.train.images.stored
    assert stored.train.images.nbytes == 0  # nothing resident
    assert stored.mean == memory.mean and stored.std == memory.std
    assert stored.params == memory.params  # same images, same dataset key
    for a, b in ((memory.train, stored.train), (memory.test, stored.test)):
        assert torch.equal(a.images[:], b.images[:])
        assert not a.images.stored and a.images.nbytes == a.images.pixel_shape.numel()
        assert torch.equal(a.labels, b.labels) and a.sample_ids == b.sample_ids
        idx = torch.tensor([7, 3, 4, 5, 0, len(a) - 1, 3])  # any order, repeats
        assert torch.equal(a.images[idx], b.images[idx])
    assert stored.train.sample_ids[0] == "train/class0/00000.jpg"
    assert len(list(tmp_path.glob("*.u8"))) == 2


def test_store_is_built_once_then_reused(folder, tmp_path, monkeypatch):
    load_dataset("imagefolder", root=str(folder), image_size=16, store=tmp_path)
    stamps = {p: p.stat().st_mtime_ns for p in tmp_path.glob("*.u8")}
    calls = []
    monkeypatch.setattr(store_mod, "_write", lambda *a, **k: calls.append(a))
    store_mod._verified.clear()  # a new process: full verification again
    load_dataset("imagefolder", root=str(folder), image_size=16, store=tmp_path)
    assert calls == [] and stamps == {p: p.stat().st_mtime_ns for p in tmp_path.glob("*.u8")}


def test_tampered_or_forged_store_is_rebuilt_never_used(folder, tmp_path):
    ref = load_dataset("imagefolder", root=str(folder), image_size=16)
    load_dataset("imagefolder", root=str(folder), image_size=16, store=tmp_path)
    path = next(tmp_path.glob("imagefolder-train-*.u8"))
    data = bytearray(path.read_bytes())
    data[100] ^= 0xFF  # one pixel byte
    path.write_bytes(bytes(data))
    store_mod._verified.clear()
    again = load_dataset("imagefolder", root=str(folder), image_size=16, store=tmp_path)
    assert torch.equal(again.train.images[:], ref.train.images[:])  # rebuilt, not the bad byte
    # a store sealed for another key (e.g. copied under a new name) is refused
    other = tmp_path / "x"
    other.mkdir()
    key = store_mod.store_key("a")
    store_mod.open_or_build(other, "t", key, 2, (3, 2, 2), lambda: [np.zeros((2, 3, 2, 2),
                                                                             np.uint8)])
    src = next(other.glob("t-*.u8"))
    wrong = store_mod.store_key("b")
    src.rename(other / f"t-{wrong}.u8")
    assert store_mod._open_verified(other / f"t-{wrong}.u8", wrong) is None


def test_editing_an_image_makes_a_new_store(folder, tmp_path):
    work = tmp_path / "copy"
    import shutil

    shutil.copytree(folder, work)
    load_dataset("imagefolder", root=str(work), image_size=16, store=tmp_path / "s")
    victim = work / "train" / "class1" / "00003.jpg"
    from PIL import Image

    Image.fromarray(np.full((20, 20, 3), 255, np.uint8)).save(victim)
    bundle = load_dataset("imagefolder", root=str(work), image_size=16, store=tmp_path / "s")
    memory = load_dataset("imagefolder", root=str(work), image_size=16)
    assert torch.equal(bundle.train.images[:], memory.train.images[:])
    assert len(list((tmp_path / "s").glob("imagefolder-train-*.u8"))) == 2


def test_killed_build_leaves_no_trusted_store_and_the_next_build_cleans_up(tmp_path):
    script = textwrap.dedent(f"""
        import sys, time
        import numpy as np
        sys.path.insert(0, {str(REPO)!r})
        from dtprobe.data import store
        def batches():
            for i in range(100):
                if i == 5:
                    print("building", flush=True)
                    time.sleep(120)
                yield np.full((64, 3, 4, 4), i, np.uint8)
        store.open_or_build(sys.argv[1], "x", "k" * 32, 6400, (3, 4, 4), batches)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script, str(tmp_path)],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "building"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    final = tmp_path / f"x-{'k' * 32}.u8"
    assert not final.exists()
    leftovers = [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    assert len(leftovers) == 1  # the half-written temporary file, never opened as a store
    assert store_mod._open_verified(leftovers[0], "k" * 32) is None
    built = store_mod.open_or_build(tmp_path, "x", "k" * 32, 6400, (3, 4, 4),
                                    lambda: (np.full((64, 3, 4, 4), i, np.uint8)
                                             for i in range(100)))
    assert not leftovers[0].exists()
    assert built.read(64 * 7, 64 * 7 + 1)[0, 0, 0, 0] == 7 and built.n == 6400


def test_undecodable_image_is_one_line_naming_the_file(tmp_path):
    root = make_folder(tmp_path / "d", per_class=3)
    (root / "train" / "class2" / "00001.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(DatasetError, match=r"cannot decode image .*class2/00001\.jpg") as info:
        load_dataset("imagefolder", root=str(root), image_size=16, store=tmp_path / "s")
    assert "\n" not in str(info.value)
    assert not list((tmp_path / "s").glob("*.u8"))


# ------------------------------------------------------------------------------ subsets
def _reference_subset(ids, labels, m, seed=0):
    """Brute force from the definition: per-class quotas by largest remainder, then the
    smallest sha256(seed:id) within each class."""
    import hashlib

    labels = np.asarray(labels)
    classes, counts = np.unique(labels, return_counts=True)
    exact = [c * m / len(labels) for c in counts]
    quota = [int(np.floor(e)) for e in exact]
    rest = m - sum(quota)
    order = sorted(range(len(classes)), key=lambda k: (-(exact[k] - quota[k]), k))
    for k in order[:rest]:
        quota[k] += 1
    keep = []
    for k, c in enumerate(classes):
        members = [i for i in range(len(labels)) if labels[i] == c]
        members.sort(key=lambda i: (hashlib.sha256(f"{seed}:{ids[i]}".encode()).digest()[:8], i))
        keep += members[:quota[k]]
    return sorted(keep)


@pytest.mark.parametrize("m", [1, 7, 50, 99, 500])
def test_stable_subset_matches_the_definition(m):
    rng = np.random.default_rng(3)
    labels = rng.choice(5, size=300, p=[0.5, 0.2, 0.15, 0.1, 0.05])
    ids = [f"img{i:04d}.jpg" for i in range(300)]
    got = stable_subset(ids, labels, m)
    want = _reference_subset(ids, labels, min(m, 300)) if m < 300 else list(range(300))
    assert list(got) == want


def test_subset_depends_on_ids_not_order_and_survives_added_files():
    ids = [f"c{i % 3}/{i:04d}" for i in range(600)]
    labels = np.array([i % 3 for i in range(600)])
    base = {ids[i] for i in stable_subset(ids, labels, 60)}
    perm = np.random.default_rng(0).permutation(600)
    shuffled = {ids[perm[i]] for i in stable_subset([ids[p] for p in perm], labels[perm], 60)}
    assert shuffled == base
    more = ids + [f"c{i % 3}/new{i}" for i in range(6)]
    grown = {more[i] for i in stable_subset(more, np.array([i % 3 for i in range(600)]
                                                          + [i % 3 for i in range(6)]), 60)}
    assert len(base & grown) >= 54  # the newcomers displace at most a few


def test_max_samples_decodes_only_the_subset_and_is_recorded(folder, tmp_path):
    full = load_dataset("imagefolder", root=str(folder), image_size=16, store=tmp_path / "f")
    sub = load_dataset("imagefolder", root=str(folder), image_size=16, max_samples=20,
                       store=tmp_path)
    assert len(sub.train) == 20 and len(sub.test) == 20
    assert sub.params["max_samples"] == 20 and "max_samples" not in full.params
    pos = {s: i for i, s in enumerate(full.train.sample_ids)}
    rows = torch.tensor([pos[s] for s in sub.train.sample_ids])
    # the same pixels (normalised with the subset's own training statistics)
    assert torch.equal(sub.train.images.raw(0, 20), full.train.images.take(rows))
    assert sub.train.images.stored and sub.train.images.pixels.n == 20  # only 20 decoded
    assert torch.equal(sub.train.labels.bincount(), torch.tensor([5, 5, 5, 5]))
    # the generic path (a loader without max_samples) subsets after loading, the same rule
    shapes = load_dataset("shapes", n_train=100, n_test=50, image_size=16, max_samples=30)
    assert len(shapes.train) == 30 and shapes.params["max_samples"] == 30
    assert sample_ids_digest(shapes.train.sample_ids) == sample_ids_digest(
        load_dataset("shapes", n_train=100, n_test=50, image_size=16,
                     max_samples=30).train.sample_ids)


# ------------------------------------------------------------------------ memory budget
def test_parse_size_and_refusal_message():
    assert parse_size("512M") == 512 << 20 and parse_size("8G") == 8 << 30
    assert parse_size("1.5GiB") == int(1.5 * (1 << 30)) and parse_size(2 << 20) == 2 << 20
    for bad in ("lots", "-1G", "10", "1Q"):
        with pytest.raises(ConfigError, match="memory-budget"):
            parse_size(bad)
    with pytest.raises(ConfigError) as info:
        check_budget(64 << 20, 10_000, 5_000, 2048 + 1000, 0, "the analysis of r50", False)
    text = str(info.value)
    assert "--max-samples" in text and "r50" in text and "\n" not in text
    # the suggested subset fits
    n = int(text.split("--max-samples ")[1].split()[0])
    assert check_budget(64 << 20, n, n, 2048 + 1000, 0, "x", False) <= 64 << 20


# --------------------------------------------------------------------- analysis end to end
@pytest.fixture(scope="module")
def folder_run(folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("frun") / "run"
    train(tiny_config(out, dataset="imagefolder",
                      dataset_params={"root": str(folder), "image_size": 16}))
    return out


def _table(run_dir: Path) -> pd.DataFrame:
    return pd.read_csv(run_dir / "analysis" / "metrics.csv", keep_default_na=False)


@pytest.mark.parametrize("max_samples", [None, 40])
def test_store_analysis_equals_in_memory_analysis(folder_run, tmp_path, max_samples):
    a = copy_run(folder_run, tmp_path / "a")
    b = copy_run(folder_run, tmp_path / "b")
    analysis.analyze(a, metrics=FAST, device="cpu", progress=False, plot=False,
                     image_store=None, max_samples=max_samples)
    analysis.analyze(b, metrics=FAST, device="cpu", progress=False, plot=False,
                     image_store=tmp_path / "stores", memory_budget="256M",
                     max_samples=max_samples)
    ta, tb = _table(a), _table(b)
    assert len(ta) > 10
    pd.testing.assert_frame_equal(ta.drop(columns="run"), tb.drop(columns="run"))
    assert list((tmp_path / "stores").glob("imagefolder-*.u8"))


def test_max_samples_analysis_is_recorded_and_repeatable(folder_run, tmp_path):
    a = copy_run(folder_run, tmp_path / "a")
    analysis.analyze(a, metrics=FAST, device="cpu", progress=False, plot=False,
                     max_samples=40, image_store=tmp_path / "stores")
    table = _table(a)
    samples = json.loads((a / "analysis" / "samples.json").read_text())
    assert samples["train"]["n"] == 40 and len(samples["train"]["sample_ids"]) == 40
    tags = {json.loads(p)["samples"] for p in table["params"]}
    assert tags == {f"40+40:{_digest(samples)}"}
    first = table.copy()
    analysis.analyze(a, metrics=FAST, device="cpu", progress=False, plot=False,
                     max_samples=40, image_store=tmp_path / "stores", use_cache=False)
    pd.testing.assert_frame_equal(first, _table(a))


def _digest(samples):
    return sample_ids_digest(samples["train"]["sample_ids"] + ["|"]
                             + samples["test"]["sample_ids"])


def test_over_budget_in_memory_analysis_is_refused_before_any_work(folder_run, tmp_path,
                                                                   capsys):
    from dtprobe.cli import main

    a = copy_run(folder_run, tmp_path / "a")
    code = main(["analyze", str(a), "--device", "cpu", "--no-progress", "--image-store",
                 "none", "--memory-budget", "1M", "--metrics", "source_accuracy"])
    err = capsys.readouterr().err
    assert code == 2 and "--memory-budget 1.0 MiB" in err and "--image-store" in err
    assert not (a / "analysis" / "metrics.csv").exists()
    assert not list((a / "analysis" / "features").glob("*")) if (
        a / "analysis" / "features").exists() else True


def test_killed_analysis_during_store_build_loses_nothing(tmp_path):
    data = make_folder(tmp_path / "big", per_class=700, size=48)
    run = tmp_path / "run"
    train(tiny_config(run, epochs=1, dataset="imagefolder",
                      dataset_params={"root": str(data), "image_size": 16, "max_samples": 80}))
    # an earlier analysis (in memory, a subset) whose results must survive the kill
    analysis.analyze(run, metrics=["source_accuracy"], device="cpu", progress=False,
                     plot=False, image_store=None)
    before = (run / "analysis" / "metrics.csv").read_bytes()
    stores = tmp_path / "stores"
    cmd = [sys.executable, "-m", "dtprobe", "analyze", str(run), "--device", "cpu",
           "--no-progress", "--metrics", "source_accuracy", "--dataset-param",
           f"root={data}", "--dataset-param", "image_size=16", "--image-store", str(stores)]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not (stores.exists() and any(
            p.name.endswith(".tmp") for p in stores.iterdir())):
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert not list(stores.glob("*.u8")) or all(
        store_mod._open_verified(p, p.stem.rsplit("-", 1)[1]) is not None
        for p in stores.glob("*.u8"))  # only complete, verified stores exist
    assert (run / "analysis" / "metrics.csv").read_bytes() == before
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert not [p for p in stores.iterdir() if p.name.endswith(".tmp")]


def test_peak_memory_stays_under_the_budget_with_a_store(folder_run, folder, tmp_path):
    """Measured on a generated 20,004-image ImageFolder: the analysis's peak resident memory
    above its start (VmHWM after a reset), store build included, stays under a budget smaller
    than the images as float32 would take."""
    big = make_folder(tmp_path / "big", per_class=3334, size=20)  # 13,336 + 6,668 images
    float_bytes = (13336 + 6668) * 3 * 16 * 16 * 4  # 61 MB in memory as float32
    budget = 48 << 20
    assert float_bytes > budget
    run = copy_run(folder_run, tmp_path / "run")
    script = PEAK_RSS_CODE + textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(REPO)!r})
        import torch
        torch.set_num_threads(1)
        from dtprobe import analysis
        kw = dict(metrics={FAST!r}, device="cpu", progress=False, plot=False,
                  dataset_params={{"root": {str(big)!r}, "image_size": 16}},
                  image_store={str(tmp_path / 'stores')!r})
        # build the store and warm every code path once, then measure a fresh analysis
        analysis.analyze({str(run)!r}, max_samples=16, **kw)
        reset_peak()
        start = status("VmRSS")
        analysis.analyze({str(run)!r}, use_cache=False, memory_budget={budget}, **kw)
        print(status("VmHWM") - start, start)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    peak, _ = (int(v) for v in out.stdout.split())
    assert peak < budget, f"peak {peak / 2**20:.1f} MiB above start, budget 48 MiB"
    print(f"peak {peak / 2**20:.1f} MiB above start")


def test_downstream_over_budget_fails_only_that_dataset_and_subsets_are_stamped(folder_run,
                                                                                folder,
                                                                                tmp_path):
    a = copy_run(folder_run, tmp_path / "a")
    # textures is made in memory: 600 images x 3 x 16 x 16 float32 = 1.8 MB, which with one
    # forward pass (~3 MiB) and the model exceeds the 4 MiB budget the source fits in
    res = analysis.analyze(a, metrics=["source_accuracy"], device="cpu", progress=False,
                           plot=False, image_store=tmp_path / "stores", memory_budget="4M",
                           downstream=["textures:n_train=400,n_test=200,max_samples=600",
                                       f"imagefolder:root={folder},name=again"],
                           downstream_metrics=["probe_accuracy"], max_samples=24)
    reasons = list(res.failures["reason"])
    assert len(reasons) == 1 and "downstream dataset textures" in reasons[0]
    assert "--memory-budget" in reasons[0] and "--max-samples" in reasons[0]
    table = _table(a)
    again = table[table["task"] == "again"]
    assert len(again) and all(json.loads(p)["samples"].startswith("24+24:")
                              for p in again["params"])


@pytest.mark.parametrize("flags,message", [
    (["--max-samples", "0"], "--max-samples"),
    (["--memory-budget", "lots"], "--memory-budget"),
    (["--shard", "rows"], "--shard"),
    (["--image-store", "FILE/stores"], "cannot write the image store"),
])
def test_bad_scale_flags_are_one_line(folder_run, tmp_path, capsys, flags, message):
    from dtprobe.cli import main

    a = copy_run(folder_run, tmp_path / "a")
    (tmp_path / "FILE").write_text("a file, not a folder")
    flags = [f.replace("FILE", str(tmp_path / "FILE")) for f in flags]
    code = main(["analyze", str(a), "--device", "cpu", "--no-progress", "--metrics",
                 "source_accuracy", *flags])
    err = capsys.readouterr().err.strip()
    assert code == 2 and message in err and len(err.splitlines()) <= 3, err


def test_store_of_native_size_images_refuses_mixed_sizes_on_one_line(tmp_path):
    from PIL import Image

    root = tmp_path / "cinic"
    for split in ("train", "test"):
        for c in range(2):
            d = root / split / f"c{c}"
            d.mkdir(parents=True)
            for i in range(140):
                side = 32 if (split, c, i) != ("train", 1, 139) else 30
                Image.fromarray(np.full((side, side, 3), 40 * c, np.uint8)).save(
                    d / f"{i:03d}.png")
    bad = r"cinic10: .*c1/139\.png is 30x30, others are 32x32; pass image_size"
    with pytest.raises(DatasetError, match=bad) as info:
        load_dataset("cinic10", root=str(root), store=tmp_path / "s")
    assert "\n" not in str(info.value) and not list((tmp_path / "s").glob("*.u8"))
    ok = load_dataset("cinic10", root=str(root), image_size=32, store=tmp_path / "s")
    assert len(ok.train) == 280 and ok.train.images.shape[-1] == 32
