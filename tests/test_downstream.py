"""Downstream datasets as a second analysis axis (issue 10).

Covered: spec parsing and its one-line errors; the preprocessing rule against a per-image
reference; the procedural ``textures`` target; Kendall tau against scipy; the aggregates; and,
on a tiny trained run, downstream features equal to a slow reference path, a killed analysis
resuming to the same table, the manifest-free path, and each bad input of the issue (missing
then fixed dataset, unknown name/parameter, one class, too few images).
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from dtprobe import analysis
from dtprobe.analysis.downstream import aggregate_rows, load_downstream
from dtprobe.cli import main
from dtprobe.data import load_dataset
from dtprobe.data.spec import DownstreamSpec, parse_downstream, parse_downstreams
from dtprobe.data.transfer import LUMA, SourceInput, prepare_for_source
from dtprobe.errors import ConfigError
from dtprobe.features.extract import FeatureCache, cache_key
from dtprobe.results import kendall_tau, load_results, score_rank_correlation
from dtprobe.training.trainer import TrainConfig, train
from tests.helpers import copy_run

TINY = {"n_train": 240, "n_test": 120, "image_size": 16}
ARCH = {"width": 8, "feature_dim": 16}
FAST = ["source_accuracy"]
DS_FAST = ["probe_accuracy", "knn_accuracy", "logme", "leep"]
TEX = "textures:n_train=120,n_test=60"
ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------ specs
def test_spec_parsing_and_canonical_text():
    s = parse_downstream("imagefolder:root=/data/pets, max_per_class=5 ,name=pets")
    assert s == DownstreamSpec("imagefolder", {"root": "/data/pets", "max_per_class": 5}, "pets")
    assert s.text == "imagefolder:max_per_class=5,root=/data/pets,name=pets"
    assert parse_downstream(s.text) == s
    assert parse_downstream("digits") == DownstreamSpec("digits", {}, "digits")
    assert parse_downstream({"dataset": "textures", "seed": 3}).params == {"seed": 3}


@pytest.mark.parametrize("spec, message", [
    ("nosuch:root=/x", r"unknown dataset 'nosuch'; available: .*cinic10.*digits.*textures"),
    ("cinic10:rooot=/x", r"unknown parameter\(s\) rooot of dataset 'cinic10'; valid: root, "
                         r"download, include_valid, image_size, max_per_class, max_samples, "
                         r"resize_size, skip_bad_images, name"),
    ("digits:image_size", r"'image_size' is not KEY=VALUE"),
    ("digits:name=a/b", r"name='a/b' must be letters"),
    ("", r"expects DATASET\[:KEY=VALUE"),
])
def test_bad_spec_is_one_line_listing_the_valid_choices(spec, message):
    with pytest.raises(ConfigError, match=message) as info:
        parse_downstream(spec)
    assert "\n" not in str(info.value)


def test_spec_names_must_be_unique_and_not_a_source_task():
    with pytest.raises(ConfigError, match="two datasets are named 'digits'"):
        parse_downstreams(["digits", "digits:seed=1"])
    with pytest.raises(ConfigError, match="name 'colour' is also a task of the source"):
        parse_downstreams(["digits:name=colour"], reserved=["colour", "size"])
    assert [s.name for s in parse_downstreams(["digits", "digits:seed=1,name=d1"])] == \
        ["digits", "d1"]


# ---------------------------------------------------------------------------- preprocessing
def _reference_pixel_pipeline(img: np.ndarray, mean_in, std_in, target: SourceInput):
    """One image, from the definition: unnormalise, convert channels, resize, renormalise."""
    x = img.astype(np.float64) * np.asarray(std_in)[:, None, None] + \
        np.asarray(mean_in)[:, None, None]
    if x.shape[0] == 1 and target.channels == 3:
        x = np.repeat(x, 3, axis=0)
    elif x.shape[0] == 3 and target.channels == 1:
        x = sum(w * x[i] for i, w in enumerate(LUMA))[None]
    t = torch.from_numpy(x)[None]
    if t.shape[-2:] != (target.height, target.width):
        t = F.interpolate(t, size=(target.height, target.width), mode="bilinear",
                          align_corners=False, antialias=True).clamp(0, 1)
    x = t[0].numpy()
    return (x - np.asarray(target.mean)[:, None, None]) / np.asarray(target.std)[:, None, None]


@pytest.mark.parametrize("channels, size", [(3, 12), (1, 20), (3, 32)])
def test_prepare_for_source_follows_the_written_rule(channels, size):
    bundle = load_dataset("textures", n_train=12, n_test=6, image_size=16)
    target = SourceInput(channels, size, size, tuple([0.3, 0.4, 0.5][:channels]),
                         tuple([0.2, 0.25, 0.3][:channels]))
    out = prepare_for_source(bundle, target)
    assert out.train.images.shape == (12, channels, size, size)
    assert out.mean == target.mean and out.factor_classes == {}
    assert torch.equal(out.test.labels, bundle.test.labels)
    for i in (0, 5):
        ref = _reference_pixel_pipeline(bundle.test.images[i].numpy(), bundle.mean, bundle.std,
                                        target)
        np.testing.assert_allclose(out.test.images[i].numpy(), ref, atol=2e-5)


def test_prepare_refuses_undefined_channel_conversion():
    bundle = load_dataset("textures", n_train=6, n_test=6, image_size=8)
    with pytest.raises(Exception, match="only 1 <-> 3 is defined"):
        prepare_for_source(bundle, SourceInput(2, 8, 8, (0.0, 0.0), (1.0, 1.0)))


def test_textures_are_seeded_balanced_and_rebuildable():
    a = load_dataset("textures", n_train=60, n_test=30, image_size=16, seed=2)
    b = load_dataset("textures", **a.params)
    assert torch.equal(a.train.images, b.train.images)
    assert a.train.labels.bincount().tolist() == [10] * 6
    assert not torch.equal(a.train.images, load_dataset("textures", n_train=60, n_test=30,
                                                         image_size=16, seed=3).train.images)
    assert a.num_classes == 6 and torch.isfinite(a.train.images).all()


# ------------------------------------------------------------------------- table statistics
def test_kendall_tau_matches_scipy_with_ties():
    from scipy.stats import kendalltau

    rng = np.random.default_rng(0)
    for _ in range(20):
        x = rng.integers(0, 4, 9).astype(float)
        y = rng.integers(0, 5, 9).astype(float)
        expected = kendalltau(x, y).statistic
        got = kendall_tau(x, y)
        assert (math.isnan(expected) and math.isnan(got)) or got == pytest.approx(expected)
    assert kendall_tau([1, 2, 3], [1, 2, 3]) == pytest.approx(1.0)
    assert math.isnan(kendall_tau([1.0], [2.0]))


def _row(epoch, metric, task, value, params):
    return {"run": "r", "epoch": epoch, "step": None, "metric": metric, "task": task,
            "layer": "", "value": value, "estimator": "", "params": json.dumps(params)}


def test_aggregates_and_rank_correlation_from_rows():
    acc = {"a": [0.5, 0.8, 0.6], "b": [0.9, 0.99, 0.95]}
    score = {"a": [1.0, 3.0, 2.0], "b": [3.0, 2.0, 1.0]}
    rows = [_row(e, "probe_accuracy", ds, acc[ds][e], {"downstream": ds})
            for ds in acc for e in range(3)]
    rows += [_row(e, "logme", ds, score[ds][e], {"downstream": ds}) for ds in acc for e in range(3)]
    rows += [_row(e, "probe_accuracy", "colour", 0.1, {}) for e in range(3)]  # a source task
    rows += [_row(e, "source_accuracy", "", 0.1 * e, {}) for e in range(3)]
    agg = aggregate_rows(rows, ["a", "b", "c"])
    mean = {r["epoch"]: r["value"] for r in agg if r["metric"] == "transfer_accuracy_mean"}
    lo = {r["epoch"]: r["value"] for r in agg if r["metric"] == "transfer_log_odds_mean"}
    for e in range(3):
        assert mean[e] == pytest.approx((acc["a"][e] + acc["b"][e]) / 2)
        logit = [math.log(p / (1 - p)) for p in (acc["a"][e], acc["b"][e])]
        assert lo[e] == pytest.approx(sum(logit) / 2)
    assert json.loads(agg[0]["params"])["missing"] == ["c"]
    tau = score_rank_correlation(pd.DataFrame(rows))
    get = {(r.dataset, r.score): r.tau for r in tau.itertuples()}
    assert get[("a", "logme")] == pytest.approx(1.0)
    assert get[("b", "logme")] == pytest.approx(kendall_tau(score["b"], acc["b"]))
    assert get[("mean", "logme")] == pytest.approx((1.0 + get[("b", "logme")]) / 2)
    assert get[("a", "source_accuracy")] == pytest.approx(kendall_tau([0, .1, .2], acc["a"]))
    assert "colour" not in set(tau["dataset"])


# ----------------------------------------------------------------------------- on a tiny run
@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("ds") / "run"
    train(TrainConfig(out=str(out), dataset="shapes", dataset_params=dict(TINY),
                      arch="small_cnn", arch_params=dict(ARCH), epochs=2, batch_size=64,
                      save_every=1, seed=0, device="cpu", progress=False))
    return out


def _analyze(run_dir: Path, downstream, **kw):
    return analysis.analyze(run_dir, metrics=FAST, device="cpu", progress=False, plot=False,
                            downstream=downstream, downstream_metrics=DS_FAST, **kw)


def _table(run_dir: Path) -> pd.DataFrame:
    return pd.read_csv(run_dir / "analysis" / "metrics.csv", keep_default_na=False)


def _image_folder(root: Path, classes: dict[str, int], test: dict[str, int] | None = None,
                  seed: int = 0) -> Path:
    from PIL import Image

    rng = np.random.default_rng(seed)
    for split, counts in (("train", classes), ("val", test or classes)):
        for k, (cls, n) in enumerate(counts.items()):
            (root / split / cls).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                arr = (rng.random((20, 24, 3)) * 80 + 60 * k).clip(0, 255).astype(np.uint8)
                Image.fromarray(arr).save(root / split / cls / f"{i:03d}.png")
    return root


@pytest.fixture(scope="module")
def reference(run, tmp_path_factory):
    """An uninterrupted analysis with two downstream datasets."""
    d = copy_run(run, tmp_path_factory.mktemp("ref") / "run")
    res = _analyze(d, ["digits", TEX])
    return {"dir": d, "res": res, "csv": (d / "analysis" / "metrics.csv").read_bytes()}


def test_downstream_rows_are_one_task_per_dataset_and_never_mix(reference):
    t = reference["res"].table
    assert reference["res"].downstream_datasets() == ["digits", "textures"]
    for ds in ("digits", "textures"):
        rows = t[t["task"] == ds]
        assert sorted(rows["metric"].unique()) == sorted(DS_FAST)
        assert sorted(rows["epoch"].unique()) == [0, 1, 2]
        assert all(json.loads(p)["downstream"].startswith(ds) for p in rows["params"])
        assert rows["value"].notna().all()
    agg = t[t["metric"] == "transfer_accuracy_mean"].set_index("epoch")["value"]
    probe = t[(t["metric"] == "probe_accuracy")].pivot(index="epoch", columns="task",
                                                       values="value")
    np.testing.assert_allclose(agg.sort_index(), probe[["digits", "textures"]].mean(axis=1))
    assert len(reference["res"].transfer()) == 3


def test_downstream_features_equal_a_slow_reference_path(reference, run):
    """Features in the cache = the checkpoint's penultimate features of digits rendered by hand
    (8x8 -> source side, grey -> RGB, source normalisation), one image at a time in float64."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    import checkpoints_manifest as cm
    from dtprobe.models import build_model

    d = reference["dir"]
    manifest = cm.read_manifest(d)
    entry = manifest.checkpoints[-1]
    source = load_dataset("shapes", **manifest.dataset.params)
    # explicit preprocessing, from the raw sklearn arrays
    raw = load_digits()
    _, idx_test = train_test_split(np.arange(len(raw.target)), test_size=0.25,
                                   stratify=raw.target, random_state=0)
    idx_test.sort()
    x = torch.from_numpy(raw.images[idx_test].astype(np.float64) / 16.0)[:, None]
    x = F.interpolate(x, size=(16, 16), mode="bilinear", align_corners=False).clamp(0, 1)
    x = x.repeat(1, 3, 1, 1)
    mean = torch.tensor(source.mean, dtype=torch.float64)[None, :, None, None]
    std = torch.tensor(source.std, dtype=torch.float64)[None, :, None, None]
    x = (x - mean) / std
    model = build_model("small_cnn", 6, **manifest.model.kwargs).double().eval()
    state = torch.load(d / entry.path, weights_only=True)["model"]
    model.load_state_dict({k: v.double() if v.is_floating_point() else v
                           for k, v in state.items()})
    captured = []
    hook = model.get_submodule(manifest.model.penultimate).register_forward_hook(
        lambda m, inp, out: captured.append(inp[0].detach()))
    with torch.no_grad():
        for i in range(0, len(x), 97):  # chunks of odd size: any batching gives the same
            for j in range(i, min(i + 97, len(x))):
                model(x[j:j + 1])
    hook.remove()
    ref = torch.cat(captured)
    # the analysis's cached features of the same checkpoint and split
    from dtprobe.analysis.data import EvalData

    src = EvalData(source, "", source.train.images, source.test.images, torch.empty(0))
    ds = load_downstream(parse_downstream("digits"), src, torch.device("cpu"))
    key = cache_key(cm.sha256_file(d / entry.path), ds.data.key, "test", [])
    cached = FeatureCache(d / "analysis" / "features").get(key)
    assert cached is not None, "downstream features not in the run's feature cache"
    assert cached["features"].shape == ref.shape
    torch.testing.assert_close(cached["features"].double(), ref, atol=1e-4, rtol=1e-4)


def test_second_analysis_reuses_every_downstream_part(reference, tmp_path):
    d = reference["dir"]
    res = _analyze(d, ["digits", TEX])
    assert res.stats.metrics_computed == 0 and res.stats.features_extracted == 0
    assert (d / "analysis" / "metrics.csv").read_bytes() == reference["csv"]


def test_interrupted_downstream_work_is_recomputed_to_the_same_table(reference, run, tmp_path):
    """What a kill can leave (some downstream parts and features written, others not, a
    stale temporary file) resumes to the byte-identical table (fast, in-process variant of
    the SIGKILL test below)."""
    d = copy_run(reference["dir"], tmp_path / "run")
    shutil.copytree(reference["dir"] / "analysis", d / "analysis")
    parts = d / "analysis" / "parts"
    dropped = sorted(p for p in parts.iterdir() if "downstream-textures" in p.name)[1:]
    for p in dropped:
        p.unlink()
    feats = sorted((d / "analysis" / "features").iterdir())
    feats[0].unlink()
    (parts / "epoch_000001.downstream-digits.json.123.tmp").write_text('{"key": "x", "ro')
    (d / "analysis" / "metrics.csv").unlink()
    res = _analyze(d, ["digits", TEX])
    assert (d / "analysis" / "metrics.csv").read_bytes() == reference["csv"]
    assert res.stats.metrics_computed == len(dropped)
    assert not list(parts.glob("*.tmp"))


@pytest.mark.slow
def test_killed_analysis_with_downstream_resumes_to_the_same_table(reference, run, tmp_path):
    d = copy_run(run, tmp_path / "run")
    argv = [sys.executable, "-m", "dtprobe", "analyze", str(d), "--device", "cpu",
            "--no-progress", "--no-plot", "--metrics", *FAST, "--downstream", "digits", TEX,
            "--downstream-metrics", *DS_FAST]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    parts = d / "analysis" / "parts"
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 180
    while proc.poll() is None and not (parts.is_dir() and any(
            p.name.endswith(".json") and "downstream-digits" in p.name
            for p in parts.iterdir())):
        assert time.monotonic() < deadline, "the analysis never reached the downstream datasets"
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = sorted(p.name for p in parts.iterdir() if "downstream" in p.name)
    assert not (d / "analysis" / "metrics.csv").exists() or proc.returncode == 0
    res = _analyze(d, ["digits", TEX])
    assert (d / "analysis" / "metrics.csv").read_bytes() == reference["csv"]
    if proc.returncode != 0:  # killed mid-way: the parts written before were reused
        assert res.stats.metrics_reused >= len(done) >= 1


def test_manifest_free_path_with_downstream(run, tmp_path, capsys):
    d = tmp_path / "plain"
    shutil.copytree(run / "checkpoints", d)
    folder = _image_folder(tmp_path / "pets", {"cat": 6, "dog": 6}, {"cat": 3, "dog": 3})
    argv = ["analyze", str(d), "--arch", "small_cnn", "--num-classes", "6", "--dataset",
            "shapes", *[a for k, v in TINY.items() for a in ("--dataset-param", f"{k}={v}")],
            *[a for k, v in ARCH.items() for a in ("--arch-param", f"{k}={v}")],
            "--device", "cpu", "--no-progress", "--no-plot", "--metrics", *FAST,
            "--downstream", f"imagefolder:root={folder},name=pets",
            "--downstream-metrics", "probe_accuracy", "knn_accuracy"]
    assert main(argv) == 0
    t = _table(d)
    pets = t[t["task"] == "pets"]
    assert sorted(pets["metric"].unique()) == ["knn_accuracy", "probe_accuracy"]
    assert len(pets) == 2 * 3 and pets["value"].astype(float).between(0, 1).all()
    assert "imagefolder:" in json.loads(pets["params"].iloc[0])["downstream"]


def test_missing_dataset_is_one_line_others_analysed_and_retried_when_fixed(run, tmp_path,
                                                                           capsys):
    d = copy_run(run, tmp_path / "run")
    folder = tmp_path / "pets"
    argv = ["analyze", str(d), "--device", "cpu", "--no-progress", "--no-plot", "--metrics",
            *FAST, "--downstream", TEX, f"imagefolder:root={folder},name=pets",
            "--downstream-metrics", "probe_accuracy"]
    assert main(argv) == 1  # finished, with a failure recorded
    err = capsys.readouterr().err
    line = [x for x in err.splitlines() if "FAILED downstream dataset" in x]
    assert len(line) == 1 and "pets" in line[0] and "missing train/" in line[0]
    assert "expected ROOT/train/<class>" in line[0]
    t = _table(d)
    assert (t["task"] == "textures").sum() == 3 and not (t["task"] == "pets").any()
    assert (t["metric"] == "source_accuracy").sum() == 3
    failures = pd.read_csv(d / "analysis" / "failures.csv", keep_default_na=False)
    assert failures["epoch"].tolist() == [""] and "pets" in failures["path"].iloc[0]
    assert load_results(d).failures["reason"].str.contains("missing train/").all()
    # fixed on disk: the next analysis picks it up and the failure is gone
    _image_folder(folder, {"cat": 5, "dog": 5})
    assert main(argv) == 0
    t = _table(d)
    assert (t["task"] == "pets").sum() == 3
    assert not (d / "analysis" / "failures.csv").exists()


def test_malformed_dataset_on_disk_fails_only_that_dataset(run, tmp_path, capsys):
    d = copy_run(run, tmp_path / "run")
    folder = _image_folder(tmp_path / "bad", {"a": 3, "b": 3})
    (folder / "train" / "a" / "000.png").write_bytes(b"not a png")
    res = _analyze(d, [TEX, f"imagefolder:root={folder},name=bad"])
    assert len(res.failures) == 1 and "cannot decode image" in res.failures["reason"].iloc[0]
    assert (res.table["task"] == "textures").any() and res.stats.downstream_failed == 1


@pytest.mark.parametrize("spec, message", [
    ("nosuch", r"unknown dataset 'nosuch'; available: "),
    ("digits:colour=3", r"unknown parameter\(s\) colour of dataset 'digits'; valid: image_size"),
    ("digits:name=colour", r"also a task of the source dataset"),
])
def test_cli_unknown_name_or_parameter_is_one_line_exit_2(run, tmp_path, capsys, spec, message):
    d = copy_run(run, tmp_path / "run")
    code = main(["analyze", str(d), "--device", "cpu", "--no-progress", "--no-plot",
                 "--metrics", *FAST, "--downstream", spec])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert re.search(message, err), err


@pytest.mark.parametrize("counts, test_counts, reason", [
    ({"only": 6}, None, "has 1 class; a probe needs at least 2"),
    ({"a": 1, "b": 4}, {"a": 2, "b": 2}, "class 0 has 1 training image"),
])
def test_one_class_or_too_few_images_give_nan_rows_saying_why(run, tmp_path, counts,
                                                             test_counts, reason):
    d = copy_run(run, tmp_path / "run")
    folder = _image_folder(tmp_path / "tiny", counts, test_counts)
    res = _analyze(d, [f"imagefolder:root={folder},name=tiny"])
    rows = res.table[res.table["task"] == "tiny"]
    assert len(rows) == len(DS_FAST) * 3 and rows["value"].isna().all()
    assert all(reason in json.loads(p)["error"] for p in rows["diagnostics"])
    assert len(res.failures) == 0
    agg = res.table[res.table["metric"] == "transfer_accuracy_mean"]
    assert agg["value"].isna().all()
    assert "no downstream dataset has a finite" in json.loads(agg["diagnostics"].iloc[0])["error"]


def test_charts_and_report_use_the_downstream_datasets(reference, tmp_path):
    import matplotlib.pyplot as plt

    from dtprobe.plotting import iter_figures, plot_tradeoff, plot_transfer_tradeoff

    res = reference["res"]
    for dataset in (None, "digits", "textures"):
        ax = plot_transfer_tradeoff(res, dataset=dataset)
        assert ax.get_title().startswith("Discriminability vs transfer")
        plt.close(ax.figure)
    with pytest.raises(ConfigError, match="no downstream dataset 'pets' in the results; "
                                          "available: digits"):
        plot_transfer_tradeoff(res, dataset="pets")
    names = []
    for name, _, fig in iter_figures(res):
        names.append(name)
        plt.close(fig)
    assert "tradeoff_transfer" in names
    # the source's own mean over tasks (plot_tradeoff's default) leaves downstream rows out
    t = res.table
    src = t[t["metric"] == "source_accuracy"]
    colour = src.assign(metric="probe_accuracy", task="colour", value=0.125, params="")
    ax = plot_tradeoff(pd.concat([t, colour], ignore_index=True))
    np.testing.assert_allclose(ax.lines[0].get_ydata(), 0.125)
    assert "[colour]" in ax.get_ylabel()
    plt.close("all")
    html = res.write_report(tmp_path / "r.html").read_text()
    assert "Transfer to other datasets" in html and "Kendall" in html
    assert "mean log-odds" in html and "digits" in html
