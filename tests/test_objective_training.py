"""Every registered objective trains, records itself, resumes bit-exactly, stops cleanly on
divergence; the reference schedule; ``dtprobe sweep``."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from dataclasses import replace

import pandas as pd
import pytest
import torch

import checkpoints_manifest as cm
from dtprobe.cli import main
from dtprobe.errors import TrainingDivergedError
from dtprobe.training.objectives import available_objectives
from dtprobe.training.objectives.memory_bank import OtherClassSampler
from dtprobe.training.trainer import TrainConfig, reference_schedule, train

TINY_DATA = {"n_train": 120, "n_test": 60, "image_size": 16}
TINY_ARCH = {"width": 4, "feature_dim": 8}
SMALL_PARAMS = {"trex": {"hidden": 16}, "trex_star": {"hidden": 16, "bank_size": 48},
                "supcon": {"proj_dim": 8}, "ce_simclr": {"proj_dim": 8},
                "supcon_simclr": {"proj_dim": 8},
                "ctc": {"stage_two_epoch": 1, "nce_k": 8, "proj_dim": 8},
                "islam_supcon": {"queue_size": 64, "proj_dim": 8},
                "islam_ce_ssl": {"queue_size": 64, "proj_dim": 8},
                "islam_supcon_ssl": {"queue_size": 64, "proj_dim": 8}}
TERMS = {"ce": {"ce"}, "label_smoothing": {"label_smoothing"}, "sigmoid": {"sigmoid"},
         "extra_l2": {"ce", "final_l2_loss"}, "dropout": {"ce"},
         "logit_penalty": {"ce", "half_logit_sq_norm"},
         "logit_norm": {"logit_norm"}, "cosine_softmax": {"cosine_softmax"},
         "squared_error": {"squared_error"}, "supcon": {"supcon", "probe_ce"},
         "ce_simclr": {"ce", "simclr"}, "supcon_simclr": {"supcon", "probe_ce", "simclr"},
         "trex": {"projector_ce", "probe_ce"}, "trex_star": {"projector_ce", "probe_ce"},
         "islam_supcon": {"supcon", "probe_ce"}, "islam_ce_ssl": {"ce", "moco"},
         "islam_supcon_ssl": {"supcon", "moco", "probe_ce"},
         "ctc": {"ce", "nce"}}


AUTHORS_SE = {"kappa": 9.0, "M": 60.0, "scale": 10.0}  # Kornblith et al.'s ImageNet values


def _cfg(out, objective="ce", **kw) -> TrainConfig:
    base = dict(out=str(out), dataset="shapes", dataset_params=dict(TINY_DATA),
                arch="small_cnn", arch_params=dict(TINY_ARCH), epochs=2, batch_size=32,
                save_every=1, device="cpu", progress=False, objective=objective,
                objective_params=dict(SMALL_PARAMS.get(objective, {})))
    base.update(kw)
    return TrainConfig(**base)


@pytest.mark.parametrize("name", sorted(TERMS))
def test_objective_trains_and_records_itself(tmp_path, name):
    assert name in available_objectives()
    out = train(_cfg(tmp_path / name, name))
    manifest = cm.read_manifest(out)
    record = manifest.training
    assert record["objective"] == name and record["objective_config"]["objective"] == name
    assert record["objective_params"] == SMALL_PARAMS.get(name, {})
    assert "analysed_features" in record and record["views"] >= 1
    log = pd.read_csv(out / "train_log.csv")
    logged = {c[len("train_"):] for c in log.columns if c.startswith("train_")}
    assert TERMS[name] <= logged, logged
    assert log[[f"train_{t}" for t in TERMS[name]]].iloc[-1].notna().all()
    state = torch.load(out / manifest.checkpoints[-1].path, weights_only=True)["model"]
    assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())


def test_trex_manifest_says_features_are_taken_before_the_projector(tmp_path):
    out = train(_cfg(tmp_path / "t", "trex", epochs=1))
    record = cm.read_manifest(out).training
    assert "BEFORE the t-ReX projector" in record["analysed_features"]
    assert record["objective_config"]["hidden"] == 16
    state = torch.load(out / "checkpoints" / "epoch_0001.pt", weights_only=True)["model"]
    assert not any("projector" in k for k in state)  # expendable: not part of the model


def test_trex_multicrop_forwards_local_crops(tmp_path, monkeypatch):
    from dtprobe.training.objectives import trex

    shapes = []
    original = trex.TReX.forward

    def spy(self, **kw):
        shapes.append(sorted((k, tuple(v.shape)) for k, v in kw.items() if k.startswith("f")))
        return original(self, **kw)

    monkeypatch.setattr(trex.TReX, "forward", spy)
    out = train(_cfg(tmp_path / "mc", "trex", epochs=1,
                     objective_params={"hidden": 16, "local_crops": 2}))
    record = cm.read_manifest(out).training
    assert record["views"] == 3 and record["objective_config"]["local_crops"] == 2
    assert [k for k, _ in shapes[0]] == ["features", "features2", "features3"]


def test_sweep_helpers_on_a_synthetic_table(tmp_path):
    from dtprobe.training.sweep import expand_sweeps, final_metrics, kornblith_check, summarize

    rows = [("source_accuracy", "", 0.5), ("class_separation", "", 0.2),
            ("probe_accuracy", "colour", 0.8), ("probe_accuracy", "size", 0.6)]
    table = pd.DataFrame([{"run": "r", "epoch": e, "metric": m, "task": t, "layer": "",
                           "value": v + (0.1 if e == 2 else 0.0)}
                          for e in (0, 2) for m, t, v in rows])
    final = final_metrics(table)
    assert final["source_accuracy"] == pytest.approx(0.6)
    assert final["transfer"] == pytest.approx(0.8)  # mean of 0.9 and 0.7, last epoch
    runs = pd.DataFrame([
        {"objective": "ce", "seed": 0, "run": "a", "status": "ok", "source_accuracy": 0.5,
         "class_separation": 0.2, "transfer": 0.8},
        {"objective": "ce", "seed": 1, "run": "b", "status": "ok", "source_accuracy": 0.7,
         "class_separation": 0.4, "transfer": 0.6},
        {"objective": "ls", "seed": 0, "run": "c", "status": "ok", "source_accuracy": 0.9,
         "class_separation": 0.5, "transfer": 0.5},
        {"objective": "ls", "seed": 1, "run": "d", "status": "diverged"}])
    summary = summarize(runs)
    ce = summary.iloc[0]
    assert ce["source_accuracy"] == pytest.approx(0.6)
    assert ce["source_accuracy_std"] == pytest.approx(0.1414213562, rel=1e-6)  # ddof=1
    ls = summary.iloc[1]
    assert ls["seeds"] == 1 and ls["diverged"] == 1 and ls["transfer_std"] == 0.0
    check = kornblith_check(summary)
    assert check.iloc[0][["beats_ce", "more_separation", "worse_transfer"]].all()
    (tmp_path / "s" / "a").mkdir(parents=True)
    (tmp_path / "s" / "sweep.json").write_text(json.dumps({"runs": [
        {"objective": "ce", "seed": 0, "dir": "a", "status": "ok"},
        {"objective": "x", "seed": 0, "dir": "b", "status": "diverged"}]}))
    assert expand_sweeps([tmp_path / "s", tmp_path / "other"]) == [tmp_path / "s" / "a",
                                                                   tmp_path / "other"]


def test_two_view_objectives_leave_view_one_identical_to_ce(tmp_path, monkeypatch):
    import dtprobe.training.trainer as trainer

    seen: dict[str, list[torch.Tensor]] = {}
    original = trainer._augment

    def record(images, mode, gen):
        out = original(images, mode, gen)
        seen.setdefault(current, []).append(out.clone())
        return out

    monkeypatch.setattr(trainer, "_augment", record)
    for current in ("ce", "supcon_simclr"):
        train(_cfg(tmp_path / current, current, epochs=2, augment="crop-flip"))
    assert len(seen["ce"]) == len(seen["supcon_simclr"])
    for a, b in zip(seen["ce"], seen["supcon_simclr"], strict=True):
        assert torch.equal(a, b)
    record = cm.read_manifest(tmp_path / "supcon_simclr").training
    assert record["views"] == 2
    assert record["objective_config"]["view2_augmentation"]["random_resized_crop_scale"]


@pytest.mark.parametrize("name", ["dropout", "supcon_simclr", "trex_star", "cosine_softmax"])
def test_resume_is_bit_exact(tmp_path, name):
    full = train(_cfg(tmp_path / "full", name, epochs=3))
    part = _cfg(tmp_path / "part", name, epochs=3, stop_after=1)
    train(part)
    train(replace(part, stop_after=None, resume=True))
    a = torch.load(full / "checkpoints" / "epoch_0003.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "part" / "checkpoints" / "epoch_0003.pt", weights_only=True)["model"]
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_exploding_loss_stops_with_one_line_and_keeps_checkpoints(tmp_path, capsys):
    out = tmp_path / "se"
    with pytest.raises(TrainingDivergedError) as info:
        train(_cfg(out, "squared_error", objective_params=AUTHORS_SE))  # ImageNet values, K = 6
    msg = str(info.value)
    assert "\n" not in msg
    assert "epoch 1" in msg and "squared_error" in msg and "epoch_0000.pt" in msg
    manifest = cm.read_manifest(out)
    assert [c.epoch for c in manifest.checkpoints] == [0]
    assert cm.sha256_file(out / manifest.checkpoints[0].path) == manifest.checkpoints[0].sha256
    code = main(["train", "--out", str(tmp_path / "cli"), "--objective", "squared_error",
                 "--objective-param", "kappa=9", "--objective-param", "M=60",
                 "--objective-param", "scale=10",
                 "--epochs", "2", "--batch-size", "32", "--no-progress", "--device", "cpu",
                 *sum((["--dataset-param", f"{k}={v}"] for k, v in TINY_DATA.items()), []),
                 *sum((["--arch-param", f"{k}={v}"] for k, v in TINY_ARCH.items()), [])])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "last good checkpoint" in err[0]


def test_nan_loss_names_last_good_checkpoint(tmp_path, monkeypatch):
    import dtprobe.training.objectives.kornblith as kornblith

    calls = {"n": 0}
    original = kornblith.label_smoothing_loss

    def flaky(logits, labels, alpha):
        calls["n"] += 1
        loss = original(logits, labels, alpha)
        return loss * float("nan") if calls["n"] > 5 else loss  # 4 steps per epoch

    monkeypatch.setattr(kornblith, "label_smoothing_loss", flaky)
    with pytest.raises(TrainingDivergedError, match=r"epoch 2: objective label_smoothing loss "
                                                    r"became nan.*epoch_0001\.pt"):
        train(_cfg(tmp_path / "nan", "label_smoothing", epochs=3))
    assert [c.epoch for c in cm.read_manifest(tmp_path / "nan").checkpoints] == [0, 1]


def test_reference_schedule_values():
    # 10 steps per epoch, S = 4 of 6 epochs, lr 0.05
    assert reference_schedule(0, 10, 6, 4, 0.05) == pytest.approx(0.05)
    assert reference_schedule(20, 10, 6, 4, 0.05) == pytest.approx(0.025)
    assert reference_schedule(40, 10, 6, 4, 0.05) == pytest.approx(0.005)   # the restart
    assert reference_schedule(50, 10, 6, 4, 0.05) == pytest.approx(0.0025)
    assert reference_schedule(59, 10, 6, 4, 0.05) == pytest.approx(
        0.005 * 0.5 * (1 + math.cos(math.pi * 19 / 20)))


@pytest.mark.parametrize("name", ["ce", "ctc"])
def test_reference_schedule_training_resets_weight_decay(tmp_path, name):
    params = {"ctc": {"nce_k": 8, "proj_dim": 8}}.get(name, {})
    cfg = _cfg(tmp_path / name, name, epochs=4, schedule="reference", switch_epoch=2,
               objective_params=params, stop_after=2)
    train(cfg)
    state = torch.load(tmp_path / name / "resume_state.pt", weights_only=True)
    assert state["optimizer"]["param_groups"][0]["weight_decay"] == pytest.approx(1e-3)
    train(replace(cfg, stop_after=None, resume=True))
    state = torch.load(tmp_path / name / "resume_state.pt", weights_only=True)
    assert state["optimizer"]["param_groups"][0]["weight_decay"] == pytest.approx(5e-4)
    record = cm.read_manifest(tmp_path / name).training
    assert record["schedule"] == "reference"
    assert record["schedule_resolved"]["switch_epoch"] == 2
    if name == "ctc":
        assert record["objective_config"]["stage_two_epoch"] == 2
    log = pd.read_csv(tmp_path / name / "train_log.csv").set_index("epoch")
    steps = 4  # 120 images / batch 32
    assert log.loc[3, "lr"] == pytest.approx(reference_schedule(3 * steps - 1, steps, 4, 2, 0.05))
    assert log.loc[3, "lr"] < 0.005 + 1e-12


def test_stage_two_negatives_without_replacement():
    labels = torch.arange(60) % 3
    sampler = OtherClassSampler(labels, 40, seed=0)
    out = sampler(torch.arange(60), draw=0)
    for row in out:
        negatives = row[1:]
        assert len(set(negatives.tolist())) == 40
        assert (labels[negatives] != labels[row[0]]).all()
    repeats = OtherClassSampler(labels, 40, seed=0, replace=True)(torch.arange(60), draw=0)
    assert any(len(set(r[1:].tolist())) < 40 for r in repeats)


def test_ctc_flag_is_short_for_objective_ctc(tmp_path, capsys):
    common = ["--epochs", "1", "--no-progress", "--device", "cpu",
              *sum((["--dataset-param", f"{k}={v}"] for k, v in TINY_DATA.items()), []),
              *sum((["--arch-param", f"{k}={v}"] for k, v in TINY_ARCH.items()), [])]
    assert main(["train", "--out", str(tmp_path / "a"), "--ctc", "--nce-k", "8", *common]) == 0
    assert main(["train", "--out", str(tmp_path / "b"), "--objective", "ctc",
                 "--objective-param", "nce_k=8", *common]) == 0
    a = cm.read_manifest(tmp_path / "a").training["objective_config"]
    b = cm.read_manifest(tmp_path / "b").training["objective_config"]
    assert a == b
    assert main(["train", "--out", str(tmp_path / "c"), "--ctc", "--objective", "dropout",
                 *common]) == 2
    assert main(["train", "--out", str(tmp_path / "d"), "--objective", "dropout",
                 "--objective-param", "keep=0.5", *common]) == 2
    err = capsys.readouterr().err
    assert "--ctc is short for --objective ctc" in err and "keep_prob=0.7" in err
    capsys.readouterr()
    assert main(["list"]) == 0
    listing = capsys.readouterr().out
    assert "cosine_softmax" in listing and "tau=auto" in listing and "Kornblith" in listing


@pytest.mark.slow  # ~15 s alone, minutes on a busy machine; examples/objectives.ipynb covers CI
def test_sweep_trains_analyses_and_charts(tmp_path, capsys):
    out = tmp_path / "losses"
    args = ["sweep", "--objectives", "ce", "label_smoothing", "squared_error", "--seeds", "0", "1",
            "--out", str(out), "--epochs", "1", "--batch-size", "32", "--no-progress",
            "--device", "cpu", "--metrics", "source_accuracy", "class_separation", "probe_accuracy",
            *sum((["--dataset-param", f"{k}={v}"] for k, v in TINY_DATA.items()), []),
            *sum((["--arch-param", f"{k}={v}"] for k, v in TINY_ARCH.items()), []),
            "--param", "label_smoothing:alpha=0.2",
            "--param", "squared_error:scale=1e5"]  # loss > max_loss at the first step
    assert main(args) == 0
    index = json.loads((out / "sweep.json").read_text())["runs"]
    assert len(index) == 6
    assert {r["status"] for r in index if r["objective"] == "squared_error"} == {"diverged"}
    ls = cm.read_manifest(out / "label_smoothing-seed1")
    assert ls.training["objective_config"]["alpha"] == 0.2 and ls.seed == 1
    summary = pd.read_csv(out / "sweep_summary.csv")
    assert list(summary["objective"]) == ["ce", "label_smoothing", "squared_error"]
    ok = summary[summary["objective"] != "squared_error"]
    assert (ok["seeds"] == 2).all() and ok[["source_accuracy", "class_separation",
                                            "transfer"]].notna().all().all()
    runs = pd.read_csv(out / "sweep_runs.csv")
    ce = runs[(runs["objective"] == "ce")]
    assert ce["transfer"].mean() == pytest.approx(summary.loc[0, "transfer"])
    for chart in ("sweep_accuracy_vs_transfer", "sweep_separation_vs_transfer", "tradeoff"):
        assert (out / "figures" / f"{chart}.png").stat().st_size > 1000
    assert main(["report", str(out), "-o", str(tmp_path / "r.html")]) == 0
    html = (tmp_path / "r.html").read_text()
    assert "label_smoothing-seed1" in html
    # A second call reuses every run (nothing retrained).
    mtime = (out / "ce-seed0" / "checkpoints" / "epoch_0001.pt").stat().st_mtime
    assert main(args) == 0
    assert (out / "ce-seed0" / "checkpoints" / "epoch_0001.pt").stat().st_mtime == mtime


@pytest.mark.parametrize("name", [
    "trex_star", pytest.param("supcon_simclr", marks=pytest.mark.slow),
    pytest.param("cosine_softmax", marks=pytest.mark.slow)])
def test_objective_under_torchrun(tmp_path, name):
    out = tmp_path / name
    params = sum((["--objective-param", f"{k}={v}"]
                  for k, v in SMALL_PARAMS.get(name, {}).items()), [])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
           "2", "-m", "dtprobe", "train", "--out", str(out), "--objective", name, *params,
           "--epochs", "2", "--save-every", "1", "--batch-size", "32", "--device", "cpu",
           "--no-progress",
           *sum((["--dataset-param", f"{k}={v}"] for k, v in TINY_DATA.items()), []),
           *sum((["--arch-param", f"{k}={v}"] for k, v in TINY_ARCH.items()), [])]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    manifest = cm.read_manifest(out)
    assert manifest.training["world_size"] == 2
    assert [c.epoch for c in manifest.checkpoints] == [0, 1, 2]
    state = torch.load(out / "checkpoints" / "epoch_0002.pt", weights_only=True)["model"]
    assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())


@pytest.mark.slow
def test_objectives_benchmark_quick_rows():
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from benchmarks import objectives as bench

    rows = bench.run(quick=True)
    assert {r.name.split()[2] for r in rows} >= {"supcon", "trex_star", "ctc"}
    for row in rows:
        assert row.agree_ok and row.ours > 0 and row.base > 0 and row.ratio > 0


# ------------------------------------------------------- every objective with its defaults

# Only the sizes tied to the data set are shrunk: CTC's stage switch (its 16,384 other-class
# negatives are capped with a warning, tested in test_ctc) and the Islam et al. queues, which
# start as random keys: until real keys fill a queue the contrastive loss rises as its
# negatives get harder, so the 64,000-key default queue would not fill in 360 images.
TINY_ONLY = {"ctc": {"stage_two_epoch": 2}, "islam_supcon": {"queue_size": 64},
             "islam_ce_ssl": {"queue_size": 64}, "islam_supcon_ssl": {"queue_size": 64}}


def _train_losses(out, column: str = "train_loss") -> list[float]:
    return pd.read_csv(out / "train_log.csv")[column].tolist()


@pytest.mark.parametrize("name", sorted(TERMS))
def test_every_objective_trains_with_its_defaults(tmp_path, name):
    """Fast smoke version: the registered defaults (no SMALL_PARAMS), tiny data, 3 epochs:
    every epoch's loss is finite and the last is below the first."""
    cfg = _cfg(tmp_path / name, name, epochs=3, objective_params=dict(TINY_ONLY.get(name, {})),
               lr=0.05)
    out = train(cfg)
    assert all(math.isfinite(v) for v in _train_losses(out)), _train_losses(out)
    # CTC's total gains its NCE term at the stage switch; its CE term is comparable throughout.
    losses = _train_losses(out, "train_ce" if name == "ctc" else "train_loss")
    # A queue objective's first epoch still scores against random keys (see TINY_ONLY).
    first = 1 if name.startswith("islam_") else 0
    assert losses[-1] < losses[first], losses


#: On the embedded shapes the supervised contrastive term stays at its no-information value
#: (every projection equal: ln 255 in-batch, ln 300 for the queue) for 11-15 epochs run: the
#: initial features carry no shape signal for it to amplify (a probe on them is at chance).
SUPCON_STAYS_AT_NO_INFORMATION = {"supcon", "supcon_simclr", "islam_supcon", "islam_supcon_ssl"}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(TERMS))
def test_every_objective_trains_on_the_embedded_default(tmp_path, name, capsys):
    """``dtprobe train --objective NAME`` with the default data, model, lr and batch size (the
    embedded ``shapes``, 6,000 images at 32 px, ``small_cnn``): the first 3 epochs do not diverge
    and the loss falls, or, for the supervised contrastive term, the trainer says it is stuck
    at its no-information value (README: "stuck-loss warning")."""
    # the queue SupCon's first epoch still scores against random keys: one more epoch
    epochs = 4 if name in SUPCON_STAYS_AT_NO_INFORMATION else 3
    out = train(TrainConfig(out=str(tmp_path / name), objective=name, epochs=30,
                            stop_after=epochs, device="cpu", progress=False))
    losses = _train_losses(out)
    assert len(losses) == epochs and all(math.isfinite(v) for v in losses), losses
    said = [ln for ln in capsys.readouterr().out.splitlines() if "no information" in ln]
    if name in SUPCON_STAYS_AT_NO_INFORMATION:
        assert len(said) == 1 and "supcon = " in said[0], said
    else:
        assert losses[-1] < losses[0] and not said, (losses, said)


# ------------------------------------------------------------- the kornblith2021 recipe

def test_recipe_decays_non_norm_non_bias_parameters_as_l2_loss(tmp_path):
    from dtprobe.training.trainer import Trainer

    trainer = Trainer(_cfg(tmp_path / "r", "cosine_softmax", recipe="kornblith2021", epochs=1))
    trainer._setup()
    decayed_group, kept_group = trainer.optimizer.param_groups
    assert decayed_group["weight_decay"] == 8e-5 and kept_group["weight_decay"] == 0.0
    names = dict(trainer.model.named_parameters())
    decayed = {n for n, p in names.items() if any(p is q for q in decayed_group["params"])}
    kept = {n for n, p in names.items() if any(p is q for q in kept_group["params"])}
    bn = {n for n, m in trainer.model.named_modules() if isinstance(m, torch.nn.BatchNorm2d)}
    for n in names:
        owner = n.rsplit(".", 1)[0]
        is_norm_or_bias = owner in bn or n.endswith(".bias")
        assert (n in kept) == is_norm_or_bias and (n in decayed) != is_norm_or_bias, n
    assert "fc.weight" in decayed and "fc.bias" in kept  # cosine softmax's raw kernel decays
    assert trainer.decayed_names == sorted(decayed, key=list(names).index)

    # One SGD step equals a step on loss + wd * l2_loss(decayed) without optimiser decay.
    model = trainer.model
    x = trainer.bundle.train.images[:16]
    y = trainer.bundle.train.labels[:16]
    ref = {n: p.detach().clone() for n, p in model.named_parameters()}
    model.train()
    loss = torch.nn.functional.cross_entropy(model(x), y)
    trainer.optimizer.zero_grad()
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    trainer.optimizer.step()
    lr = trainer.optimizer.param_groups[0]["lr"]
    for n, p in model.named_parameters():
        # d/dw [wd * ||w||^2 / 2] = wd * w, only for decayed variables (tf.nn.l2_loss).
        g = grads[n] + (8e-5 * ref[n] if n in decayed else 0.0)
        torch.testing.assert_close(p.detach(), ref[n] - lr * g, rtol=1e-6, atol=1e-7)


def test_recipe_initialises_the_head_from_normal_001(tmp_path):
    from dtprobe.training.trainer import Trainer

    trainer = Trainer(_cfg(tmp_path / "r", "ce", recipe="kornblith2021", epochs=1,
                           arch_params={"width": 4, "feature_dim": 256}))
    trainer._setup()
    w = trainer.head.weight.detach()
    assert w.numel() == 6 * 256
    assert abs(float(w.mean())) < 0.002 and abs(float(w.std()) - 0.01) < 0.001
    assert torch.equal(trainer.head.bias.detach(), torch.zeros(6))


def test_weight_ema_follows_tensorflows_num_updates_rule():
    from dtprobe.training.recipes import WeightEMA

    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    ema = WeightEMA(model, decay=0.95, num_updates=True)
    shadow = {k: v.clone().double() for k, v in model.state_dict().items()}
    for t in range(1, 40):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        model(torch.randn(5, 3))  # moves the BatchNorm statistics too
        ema.update(model, t)
        d = min(0.95, (1 + t) / (10 + t))
        for k, v in model.state_dict().items():
            shadow[k] = d * shadow[k] + (1 - d) * v.double() if v.is_floating_point() \
                else v.double()
    for k, v in ema.state_dict().items():
        torch.testing.assert_close(v.double(), shadow[k], rtol=1e-5, atol=1e-6)


def test_recipe_checkpoints_hold_the_ema_and_the_manifest_records_it(tmp_path):
    from dtprobe.training.trainer import Trainer

    trainer = Trainer(_cfg(tmp_path / "r", "sigmoid", recipe="kornblith2021", epochs=2,
                           recipe_params={"ema_decay": 0.9}))
    out = trainer.fit()
    manifest = cm.read_manifest(out)
    saved = torch.load(out / manifest.checkpoints[-1].path, weights_only=True)["model"]
    want = trainer.objective.export_model_state(trainer.ema.state_dict())
    raw = trainer.objective.export_model_state(trainer.model.state_dict())
    assert saved.keys() == want.keys()
    for k in saved:
        assert torch.equal(saved[k], want[k]), k
    assert not torch.equal(saved["fc.weight"], raw["fc.weight"])  # not the trained weights
    resume = torch.load(out / "resume_state.pt", weights_only=True)
    assert torch.equal(resume["model"]["fc.weight"], trainer.model.state_dict()["fc.weight"])
    record = manifest.training
    assert record["recipe"] == "kornblith2021" and record["weight_decay"] == 8e-5
    resolved = record["recipe_resolved"]
    assert resolved["ema_decay"] == 0.9 and resolved["head_init_std"] == 0.01
    assert "fc.weight" in resolved["decayed_parameters"]
    assert "fc.bias" not in resolved["decayed_parameters"]
    log = pd.read_csv(out / "train_log.csv")
    assert {"test_acc", "test_acc_raw"} <= set(log.columns)
    # bit-exact resume carries the EMA
    part = _cfg(tmp_path / "part", "sigmoid", recipe="kornblith2021", epochs=2, stop_after=1,
                recipe_params={"ema_decay": 0.9})
    train(part)
    train(replace(part, stop_after=None, resume=True))
    again = torch.load(tmp_path / "part" / "checkpoints" / "epoch_0002.pt",
                       weights_only=True)["model"]
    for k in saved:
        assert torch.equal(saved[k], again[k]), k


def test_recipe_errors_are_one_line(tmp_path):
    from dtprobe.errors import ConfigError

    with pytest.raises(ConfigError, match="unknown --recipe 'nope'"):
        train(_cfg(tmp_path / "a", recipe="nope"))
    with pytest.raises(ConfigError, match="ema_decay=1.5"):
        train(_cfg(tmp_path / "b", recipe="kornblith2021", recipe_params={"ema_decay": 1.5}))
    with pytest.raises(ConfigError, match="needs --recipe"):
        train(_cfg(tmp_path / "c", recipe_params={"ema_decay": 0.5}))
