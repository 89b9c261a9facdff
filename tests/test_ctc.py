"""Tests of contrastive temporal coding (dtprobe.training.objectives.ctc / memory_bank).

Every loss is checked in float64 against a slow re-computation written from the definitions
(Wu et al. 2018 instance discrimination; Tian et al. 2020 CRD binary NCE) with explicit loops.
"""

from __future__ import annotations

import io
import math
import os

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from scipy import stats
from torch import nn

from dtprobe.errors import CheckpointError, ConfigError
from dtprobe.training.objectives.ctc import PRESETS, CTCConfig, CTCObjective
from dtprobe.training.objectives.memory_bank import (
    OtherClassSampler,
    all_gather_rows,
    crd_nce_loss,
    estimate_log_z,
    gather_scores,
    momentum_update,
)

D_IN, FEAT, C, N, PROJ = 12, 6, 3, 30, 4
DT = torch.float64


def _labels() -> torch.Tensor:
    base = torch.tensor([0] * 12 + [1] * 10 + [2] * 8)
    return base[torch.randperm(N, generator=torch.Generator().manual_seed(3))]


LABELS = _labels()
IMAGES = torch.randn(N, 3, 2, 2, generator=torch.Generator().manual_seed(4), dtype=DT)


def feature_fn(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    return model[0](images)


def make_model(seed: int = 0) -> nn.Module:
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Sequential(nn.Flatten(), nn.Linear(D_IN, FEAT), nn.Tanh()),
                          nn.Linear(FEAT, C)).to(DT)
    torch.random.set_rng_state(gen_state)
    return model


def make_objective(**overrides) -> CTCObjective:
    kwargs = {"stage_two_epoch": 2, "proj_dim": PROJ, "nce_k": 8, "refresh_banks": False}
    kwargs.update(overrides)
    refresh = kwargs.pop("refresh_batches", None)
    return CTCObjective(CTCConfig(**kwargs), N, FEAT, LABELS, feature_fn,
                        refresh_batches=refresh).double()


def step_inputs(model: nn.Module, idx: torch.Tensor) -> dict:
    features = feature_fn(model, IMAGES[idx])
    return {"images": IMAGES[idx], "features": features, "logits": model[1](features),
            "labels": LABELS[idx], "indices": idx}


def sgd_step(model: nn.Module, objective: CTCObjective, idx: torch.Tensor, epoch: int) -> dict:
    params = list(model.parameters()) + objective.trainable_parameters()
    loss, terms = objective(**step_inputs(model, idx), epoch=epoch)
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    with torch.no_grad():
        for p, g in zip(params, grads, strict=True):
            if g is not None:
                p -= 0.5 * g
    return terms


# ------------------------------------------------------------------ slow references

def ref_normalise(vec: list) -> list:
    norm = torch.sqrt(sum(x * x for x in vec))
    return [x / norm for x in vec]


def ref_project(weight, bias, f_row) -> list:
    out = []
    for d in range(weight.shape[0]):
        out.append(sum(weight[d, j] * f_row[j] for j in range(weight.shape[1])) + bias[d])
    return ref_normalise(out)


def ref_dot(a: list, b_row) -> torch.Tensor:
    return sum(a[d] * b_row[d] for d in range(len(a)))


def ref_neg_log_softmax(row: list, target: int) -> torch.Tensor:
    m = max(float(x.detach()) for x in row)
    lse = m + torch.log(sum(torch.exp(x - m) for x in row))
    return lse - row[target]


def ref_cross_entropy(logits, labels) -> torch.Tensor:
    rows = [ref_neg_log_softmax([logits[i, c] for c in range(logits.shape[1])], int(labels[i]))
            for i in range(logits.shape[0])]
    return sum(rows) / len(rows)


def ref_binary_nce(scores: list[list], tau: float, z: float, n_data: int) -> torch.Tensor:
    """-(1/B) sum_b [log h(pos) + sum_k log(1 - h(neg_k))], h = P / (P + K/N), P = e^{s/tau}/Z."""
    total = 0.0
    for row in scores:
        k = len(row) - 1
        noise = k / n_data
        p_pos = torch.exp(row[0] / tau) / z
        total = total + torch.log(p_pos / (p_pos + noise))
        for s in row[1:]:
            p = torch.exp(s / tau) / z
            total = total + torch.log(noise / (p + noise))
    return -total / len(scores)


# ------------------------------------------------------------------ stage 1

def test_instance_discrimination_value_and_gradient():
    obj = make_objective()
    obj.start_epoch(1, make_model())
    idx = torch.tensor([3, 17, 5, 29])
    gen = torch.Generator().manual_seed(11)
    feats = torch.randn(4, FEAT, generator=gen, dtype=DT, requires_grad=True)
    logits = torch.randn(4, C, generator=gen, dtype=DT, requires_grad=True)
    bank = obj.bank_instance.clone()
    loss, terms = obj(images=IMAGES[idx], features=feats, logits=logits, labels=LABELS[idx],
                      indices=idx, epoch=1)
    params = [feats, logits, obj.projector.weight, obj.projector.bias]
    grads = torch.autograd.grad(loss, params)

    f, lg, w, b = (p.detach().clone().requires_grad_(True) for p in params)
    tau, alpha = obj.cfg.tau1, obj.cfg.alpha
    inst = []
    for i in range(4):
        z = ref_project(w, b, f[i])
        row = [ref_dot(z, bank[j]) / tau for j in range(N)]
        inst.append(ref_neg_log_softmax(row, int(idx[i])))
    ref_inst = sum(inst) / 4
    ref_ce = ref_cross_entropy(lg, LABELS[idx])
    ref_total = ref_ce + alpha * ref_inst
    ref_grads = torch.autograd.grad(ref_total, [f, lg, w, b])

    assert set(terms) == {"ce", "instance"}
    assert terms["instance"] == pytest.approx(float(ref_inst.detach()), rel=1e-12)
    assert terms["ce"] == pytest.approx(float(ref_ce.detach()), rel=1e-12)
    torch.testing.assert_close(loss, ref_total.detach(), rtol=1e-12, atol=1e-12)
    for got, want in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    assert grads[2].abs().sum() > 0  # the stage-1 projector receives a gradient


def test_stage1_bank_update_touches_only_batch_rows():
    obj = make_objective()
    model = make_model()
    obj.start_epoch(1, model)
    idx = torch.tensor([4, 9, 21])
    before = {name: getattr(obj, name).clone()
              for name in ("bank_instance", "bank_current", "bank_snapshot")}
    inputs = step_inputs(model, idx)
    obj(**inputs, epoch=1)
    with torch.no_grad():
        z = torch.nn.functional.normalize(obj.projector(inputs["features"]), dim=1)
    m1 = obj.cfg.m1
    for row, i in enumerate(idx.tolist()):
        mixed = m1 * before["bank_instance"][i] + (1 - m1) * z[row]
        torch.testing.assert_close(obj.bank_instance[i], mixed / mixed.norm(), rtol=0, atol=1e-14)
    untouched = torch.ones(N, dtype=torch.bool)
    untouched[idx] = False
    assert torch.equal(obj.bank_instance[untouched], before["bank_instance"][untouched])
    assert torch.equal(obj.bank_current, before["bank_current"])
    assert torch.equal(obj.bank_snapshot, before["bank_snapshot"])


# ------------------------------------------------------------------ stage 2

def _enter_stage_two(obj: CTCObjective, model: nn.Module) -> None:
    for epoch in (1, 2):
        obj.start_epoch(epoch, model)
        sgd_step(model, obj, torch.arange(epoch, N, 3), epoch)
    obj.start_epoch(3, model)


def test_nce_value_and_gradient():
    obj = make_objective(nce_k=5)
    model = make_model()
    _enter_stage_two(obj, model)
    idx = torch.tensor([0, 7, 13, 22, 28])
    gen = torch.Generator().manual_seed(12)
    feats = torch.randn(5, FEAT, generator=gen, dtype=DT, requires_grad=True)
    logits = torch.randn(5, C, generator=gen, dtype=DT, requires_grad=True)
    sample = obj.sampler(idx, draw=obj.draws)
    bank_cur, bank_snap = obj.bank_current.clone(), obj.bank_snapshot.clone()
    with torch.no_grad():
        snap_feats = feature_fn(obj.snapshot, IMAGES[idx])
    loss, terms = obj(images=IMAGES[idx], features=feats, logits=logits, labels=LABELS[idx],
                      indices=idx, epoch=3)
    params = [feats, logits, obj.embed_current.weight, obj.embed_current.bias,
              obj.embed_snapshot.weight, obj.embed_snapshot.bias]
    grads = torch.autograd.grad(loss, params)

    f, lg, w1, b1, w2, b2 = (p.detach().clone().requires_grad_(True) for p in params)
    tau, beta = obj.cfg.tau2, obj.cfg.beta
    s1, s2 = [], []
    for i in range(5):
        v1 = ref_project(w1, b1, f[i])
        v2 = ref_project(w2, b2, snap_feats[i])
        s1.append([ref_dot(v1, bank_snap[int(j)]) for j in sample[i]])
        s2.append([ref_dot(v2, bank_cur[int(j)]) for j in sample[i]])

    def z_of(scores):  # CRD: Z = N * mean exp(s / tau), a constant
        flat = [float(s.detach()) for row in scores for s in row]
        return N * sum(math.exp(s / tau) for s in flat) / len(flat)

    ref_nce = ref_binary_nce(s1, tau, z_of(s1), N) + ref_binary_nce(s2, tau, z_of(s2), N)
    ref_ce = ref_cross_entropy(lg, LABELS[idx])
    ref_total = ref_ce + beta * ref_nce
    ref_grads = torch.autograd.grad(ref_total, [f, lg, w1, b1, w2, b2])

    assert set(terms) == {"ce", "nce"}
    assert terms["nce"] == pytest.approx(float(ref_nce.detach()), rel=1e-12)
    torch.testing.assert_close(loss, ref_total.detach(), rtol=1e-12, atol=1e-12)
    for got, want in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    assert grads[4].abs().sum() > 0  # W_2 (snapshot projector) is trained


def test_nce_z_fixed_after_first_stage_two_batch():
    obj = make_objective()
    model = make_model()
    _enter_stage_two(obj, model)
    assert obj.get_extra_state()["log_z"] == [None, None]
    sgd_step(model, obj, torch.tensor([1, 2, 3]), 3)
    log_z = obj.get_extra_state()["log_z"]
    assert all(isinstance(z, float) for z in log_z)
    sgd_step(model, obj, torch.tensor([4, 5, 6, 7]), 3)
    assert obj.get_extra_state()["log_z"] == log_z


def test_crd_nce_pure_function_matches_ratio_form():
    gen = torch.Generator().manual_seed(5)
    scores = torch.rand(3, 7, generator=gen, dtype=DT) * 2 - 1
    log_z = estimate_log_z(scores, 0.2, 50)
    flat = scores.reshape(-1)
    assert log_z == pytest.approx(math.log(50 * torch.exp(flat / 0.2).mean().item()), rel=1e-12)
    got = crd_nce_loss(scores, 0.2, log_z, 50)
    rows = [[scores[i, k] for k in range(7)] for i in range(3)]
    want = ref_binary_nce(rows, 0.2, math.exp(log_z), 50)
    assert float(got) == pytest.approx(float(want), rel=1e-12)


def test_gather_scores_paths_agree():
    gen = torch.Generator().manual_seed(6)
    bank = torch.nn.functional.normalize(torch.randn(40, 5, generator=gen, dtype=DT), dim=1)
    v = torch.nn.functional.normalize(torch.randn(3, 5, generator=gen, dtype=DT), dim=1)
    small = torch.randint(0, 40, (3, 4), generator=gen)   # gather path (4 * 4 < 40)
    large = torch.randint(0, 40, (3, 12), generator=gen)  # matmul path (4 * 12 >= 40)
    for idx in (small, large):
        want = torch.stack([torch.stack([v[i] @ bank[j] for j in idx[i]]) for i in range(3)])
        torch.testing.assert_close(gather_scores(v, bank, idx), want, rtol=1e-14, atol=1e-14)


def test_stage_switch_snapshot_frozen_and_terms():
    obj = make_objective()
    model = make_model()
    for epoch in (1, 2):
        obj.start_epoch(epoch, model)
        assert obj.snapshot is None
        terms = sgd_step(model, obj, torch.arange(epoch, N, 4), epoch)
        assert set(terms) == {"ce", "instance"}
    weights_at_switch = {k: v.clone() for k, v in model.state_dict().items()}
    obj.start_epoch(3, model)
    snap = obj.snapshot
    assert snap is not None and snap is not model
    assert not snap.training
    assert all(not p.requires_grad for p in snap.parameters())
    for key, value in snap.state_dict().items():
        assert torch.equal(value, weights_at_switch[key])
    bank_instance = obj.bank_instance.clone()
    obj.train()
    for step in range(3):
        terms = sgd_step(model, obj, torch.arange(step, N, 5), 3)
        assert set(terms) == {"ce", "nce"}
    assert obj.snapshot is snap and not snap.training
    for key, value in snap.state_dict().items():
        assert torch.equal(value, weights_at_switch[key])
    assert not torch.equal(model.state_dict()["0.1.weight"], weights_at_switch["0.1.weight"])
    assert all(p.grad is None for p in snap.parameters())
    assert torch.equal(obj.bank_instance, bank_instance)  # stage-1 bank idle in stage 2
    obj.start_epoch(4, model)
    assert obj.snapshot is snap  # taken once


def test_stage_two_without_start_epoch_is_an_error():
    obj = make_objective()
    model = make_model()
    with pytest.raises(RuntimeError, match="start_epoch"):
        obj(**step_inputs(model, torch.tensor([0, 1])), epoch=3)


def test_bank_refresh_at_stage_two():
    def batches():
        return [(IMAGES[i:i + 8], torch.arange(i, min(i + 8, N))) for i in range(0, N, 8)]

    obj = make_objective(refresh_banks=True, refresh_batches=batches)
    model = make_model()
    _enter_stage_two(obj, model)
    with torch.no_grad():
        feats = feature_fn(model, IMAGES)
        want_cur = torch.nn.functional.normalize(obj.embed_current(feats), dim=1)
        want_snap = torch.nn.functional.normalize(obj.embed_snapshot(feats), dim=1)
    torch.testing.assert_close(obj.bank_current, want_cur, rtol=0, atol=1e-14)
    torch.testing.assert_close(obj.bank_snapshot, want_snap, rtol=0, atol=1e-14)
    assert obj.get_extra_state()["banks_refreshed"]


def test_refresh_requested_without_source_warns():
    obj = make_objective(refresh_banks=True)
    model = make_model()
    obj.start_epoch(1, model)
    obj.start_epoch(2, model)
    with pytest.warns(UserWarning, match="refresh_batches"):
        obj.start_epoch(3, model)


# ------------------------------------------------------------------ memory bank

def test_momentum_update_rows_and_duplicates():
    gen = torch.Generator().manual_seed(7)
    bank = torch.nn.functional.normalize(torch.randn(10, 4, generator=gen, dtype=DT), dim=1)
    values = torch.randn(4, 4, generator=gen, dtype=DT)
    idx = torch.tensor([2, 7, 5, 7])  # 7 twice: the last occurrence wins
    old = bank.clone()
    new = momentum_update(bank, idx, values, 0.9)
    assert torch.equal(bank, old)  # out of place
    for i, row in ((2, 0), (5, 2), (7, 3)):
        mixed = 0.9 * old[i] + 0.1 * values[row]
        torch.testing.assert_close(new[i], mixed / mixed.norm(), rtol=0, atol=1e-15)
    keep = [i for i in range(10) if i not in (2, 5, 7)]
    assert torch.equal(new[keep], old[keep])
    torch.testing.assert_close(new.norm(dim=1), torch.ones(10, dtype=DT), rtol=0, atol=1e-14)
    overwrite = momentum_update(bank, torch.tensor([1]), values[:1], 0.0)
    torch.testing.assert_close(overwrite[1], values[0] / values[0].norm(), rtol=0, atol=1e-15)


# ------------------------------------------------------------------ sampler

def test_sampler_other_classes_only_and_clipping():
    sampler = OtherClassSampler(LABELS, 1000, seed=0)
    assert sampler.clipped and sampler.num_negatives == N - 12
    out = sampler(torch.arange(N), draw=0)
    assert out.shape == (N, N - 12 + 1)
    assert torch.equal(out[:, 0], torch.arange(N))
    assert not (LABELS[out[:, 1:]] == LABELS[:, None]).any()
    small = OtherClassSampler(LABELS, 5, seed=0)
    assert not small.clipped and small(torch.arange(N), draw=0).shape == (N, 6)
    with pytest.warns(UserWarning, match="exceeds the smallest other-class pool"):
        obj = make_objective(nce_k=1000)
    assert obj.num_negatives == N - 12 and obj.config()["nce_k_effective"] == N - 12


def test_sampler_uniform_over_other_class_samples():
    sampler = OtherClassSampler(LABELS, 8, seed=1)
    for cls in range(3):
        anchors = torch.nonzero(LABELS == cls).flatten()
        anchors = anchors.repeat(4000 // anchors.numel() + 1)[:4000]
        negatives = sampler(anchors, draw=cls)[:, 1:].flatten()
        counts = torch.bincount(negatives, minlength=N)
        assert counts[LABELS == cls].sum() == 0
        observed = counts[LABELS != cls].numpy()
        assert stats.chisquare(observed).pvalue > 1e-3


def test_sampler_counter_seeding():
    sampler = OtherClassSampler(LABELS, 8, seed=2)
    idx = torch.arange(10)
    assert torch.equal(sampler(idx, draw=4), sampler(idx, draw=4))
    assert not torch.equal(sampler(idx, draw=4), sampler(idx, draw=5))
    assert not torch.equal(sampler(idx, draw=4, rank=0), sampler(idx, draw=4, rank=1))
    assert torch.equal(OtherClassSampler(LABELS, 8, seed=2)(idx, draw=4), sampler(idx, draw=4))


def test_sampler_single_class_rejected():
    with pytest.raises(ConfigError, match="two classes"):
        OtherClassSampler(torch.zeros(5, dtype=torch.long), 3, seed=0)


# ------------------------------------------------------------------ config

def test_presets_and_config_validation():
    t = CTCConfig.from_preset("transferability")
    assert (t.alpha, t.tau1, t.m1, t.beta, t.tau2, t.m2) == (0.5, 0.10, 0.9, 1.0, 0.10, 0.9)
    d = CTCConfig.from_preset("discriminability", stage_two_epoch=20)
    assert (d.alpha, d.tau1, d.m1, d.beta, d.tau2, d.m2) == (0.1, 0.50, 0.9, 1.0, 0.40, 0.9)
    assert d.stage_two_epoch == 20 and d.preset == "discriminability"
    assert set(PRESETS) == {"transferability", "discriminability"}
    with pytest.raises(ConfigError, match="unknown CTC preset"):
        CTCConfig.from_preset("fast")
    with pytest.raises(ConfigError, match="unknown CTC option"):
        CTCConfig.from_preset("transferability", temperature=0.1)
    for bad in ({"tau1": 0.0}, {"m2": 1.0}, {"alpha": -1.0}, {"nce_k": 0},
                {"stage_two_epoch": -1}, {"proj_dim": 0}):
        with pytest.raises(ConfigError):
            CTCConfig(**bad)
    cfg = make_objective().config()
    assert cfg["objective"] == "ctc" and cfg["tau2"] == 0.10 and cfg["num_samples"] == N


def test_freeze_stage1_projector():
    obj = make_objective(freeze_stage1_projector=True)
    ids = {id(p) for p in obj.trainable_parameters()}
    assert not ids & {id(p) for p in obj.projector.parameters()}
    assert {id(p) for p in obj.embed_current.parameters()} <= ids
    assert {id(p) for p in obj.embed_snapshot.parameters()} <= ids
    weight = obj.projector.weight.clone()
    model = make_model()
    obj.start_epoch(1, model)
    sgd_step(model, obj, torch.arange(0, N, 2), 1)
    assert torch.equal(obj.projector.weight, weight)
    trained = make_objective()
    assert {id(p) for p in trained.projector.parameters()} <= {
        id(p) for p in trained.trainable_parameters()}


def test_batch_validation_errors():
    obj = make_objective()
    model = make_model()
    obj.start_epoch(1, model)
    inputs = step_inputs(model, torch.tensor([0, 1, 2]))
    with pytest.raises(ConfigError, match="indices must lie"):
        obj(**{**inputs, "indices": torch.tensor([0, 1, N])}, epoch=1)
    with pytest.raises(ConfigError, match="do not match train_labels"):
        obj(**{**inputs, "labels": (inputs["labels"] + 1) % C}, epoch=1)
    with pytest.raises(ConfigError, match="shape"):
        obj(**{**inputs, "features": inputs["features"][:, :2]}, epoch=1)
    with pytest.raises(ConfigError, match="num_samples"):
        CTCObjective(CTCConfig(), N + 1, FEAT, LABELS, feature_fn)


# ------------------------------------------------------------------ resume

def _roundtrip(state: dict) -> dict:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def _assert_same_next_step(a_obj, a_model, b_obj, b_model, idx, epoch):
    a_loss, a_terms = a_obj(**step_inputs(a_model, idx), epoch=epoch)
    b_loss, b_terms = b_obj(**step_inputs(b_model, idx), epoch=epoch)
    assert torch.equal(a_loss, b_loss) and a_terms == b_terms
    for name in ("bank_instance", "bank_current", "bank_snapshot"):
        assert torch.equal(getattr(a_obj, name), getattr(b_obj, name))


def test_state_dict_round_trip_in_stage_two():
    obj = make_objective()
    model = make_model()
    _enter_stage_two(obj, model)
    for step in range(3):
        sgd_step(model, obj, torch.arange(step, N, 4), 3)
    saved = _roundtrip({"objective": obj.state_dict(), "model": model.state_dict()})
    assert any(k.startswith("snapshot.") for k in saved["objective"])

    fresh_model = make_model(seed=99)
    fresh_model.load_state_dict(saved["model"])
    fresh = make_objective()
    fresh.load_state_dict(saved["objective"])
    fresh.start_epoch(4, fresh_model)
    for key, value in obj.snapshot.state_dict().items():
        assert torch.equal(fresh.snapshot.state_dict()[key], value)
    assert not torch.equal(fresh.snapshot.state_dict()["0.1.weight"],
                           fresh_model.state_dict()["0.1.weight"])
    assert fresh.draws == obj.draws
    obj.start_epoch(4, model)
    _assert_same_next_step(obj, model, fresh, fresh_model, torch.tensor([2, 11, 19, 27]), 4)
    # the same negatives were drawn: the counter advanced identically
    assert fresh.draws == obj.draws


def test_state_dict_round_trip_in_stage_one_then_switch():
    obj = make_objective()
    model = make_model()
    obj.start_epoch(1, model)
    sgd_step(model, obj, torch.arange(0, N, 3), 1)
    saved = _roundtrip({"objective": obj.state_dict(), "model": model.state_dict()})
    assert not any(k.startswith("snapshot.") for k in saved["objective"])
    fresh_model = make_model(seed=5)
    fresh_model.load_state_dict(saved["model"])
    fresh = make_objective()
    fresh.load_state_dict(saved["objective"])
    for o, m in ((obj, model), (fresh, fresh_model)):
        o.start_epoch(2, m)
    _assert_same_next_step(obj, model, fresh, fresh_model, torch.tensor([1, 4, 8]), 2)
    for o, m in ((obj, model), (fresh, fresh_model)):
        o.start_epoch(3, m)
    _assert_same_next_step(obj, model, fresh, fresh_model, torch.tensor([0, 5, 9]), 3)


def test_resume_errors():
    obj = make_objective()
    model = make_model()
    _enter_stage_two(obj, model)
    sgd_step(model, obj, torch.arange(0, N, 2), 3)
    state = obj.state_dict()
    no_snapshot = {k: v for k, v in state.items() if not k.startswith("snapshot.")}
    with pytest.raises(CheckpointError, match="no snapshot weights"):
        make_objective().load_state_dict(no_snapshot)
    bigger = CTCObjective(CTCConfig(stage_two_epoch=2, proj_dim=PROJ, nce_k=8),
                          N + 2, FEAT, torch.cat([LABELS, LABELS[:2]]), feature_fn)
    with pytest.raises(CheckpointError, match="training samples"):
        bigger.load_state_dict(state)
    stage_one = make_objective()
    with pytest.raises(CheckpointError, match="needs the snapshot"):
        stage_one.start_epoch(5, make_model())
    with pytest.raises(CheckpointError, match="stage_two_epoch=2"):
        make_objective(stage_two_epoch=4).load_state_dict(state)


def test_losses_ignore_autocast():
    obj = make_objective().float()
    model = make_model().float()
    obj.start_epoch(1, model)
    idx = torch.tensor([1, 6, 12, 25])
    with torch.no_grad():
        features = feature_fn(model, IMAGES[idx].float())
        logits = model[1](features)
    inputs = {"images": IMAGES[idx].float(), "features": features, "logits": logits,
              "labels": LABELS[idx], "indices": idx}
    bank = obj.bank_instance.clone()
    _, plain = obj(**inputs, epoch=1)
    obj.bank_instance = bank
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, mixed = obj(**inputs, epoch=1)
    assert mixed["instance"] == plain["instance"]


# ------------------------------------------------------------------ distributed

def _dist_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world)
    try:
        torch.set_num_threads(1)
        rows = all_gather_rows(torch.full((3 - rank, 2), float(rank)))
        obj = make_objective()
        model = make_model()
        obj.start_epoch(1, model)
        idx = [torch.tensor([0, 5, 11]), torch.tensor([2, 5, 20, 28])][rank]
        obj(**step_inputs(model, idx), epoch=1)
        bank_stage1 = obj.bank_instance.clone()
        obj.start_epoch(2, model)
        obj.start_epoch(3, model)
        loss, _ = obj(**step_inputs(model, idx + 1), epoch=3)
        loss.backward()
        local_grad = obj.embed_current.weight.grad.clone()
        obj.all_reduce_gradients()
        torch.save({"rows": rows, "stage1": bank_stage1, "current": obj.bank_current,
                    "snapshot": obj.bank_snapshot, "log_z": obj.get_extra_state()["log_z"],
                    "local_grad": local_grad, "grad": obj.embed_current.weight.grad},
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_distributed_banks_stay_identical(tmp_path):
    # fork: the children reuse the parent's imports (spawn would re-import torch in each)
    mp.start_processes(_dist_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2,
                       join=True, start_method="fork")
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert torch.equal(r0["rows"], torch.tensor([[0.0, 0.0]] * 3 + [[1.0, 1.0]] * 2))
    for key in ("stage1", "current", "snapshot"):
        assert torch.equal(r0[key], r1[key])
    assert r0["log_z"] == r1["log_z"]
    assert not torch.equal(r0["local_grad"], r1["local_grad"])
    assert torch.equal(r0["grad"], r1["grad"])
    torch.testing.assert_close(r0["grad"], (r0["local_grad"] + r1["local_grad"]) / 2)
    # stage-1 bank = single-process update with both ranks' batch, rank order, last one wins
    obj = make_objective()
    model = make_model()
    idx = torch.tensor([0, 5, 11, 2, 5, 20, 28])
    with torch.no_grad():
        z = torch.nn.functional.normalize(obj.projector(feature_fn(model, IMAGES[idx])), dim=1)
    want = momentum_update(obj.bank_instance, idx, z, obj.cfg.m1)
    torch.testing.assert_close(r0["stage1"], want, rtol=0, atol=1e-14)
    assert not np.allclose(r0["stage1"][5].numpy(), obj.bank_instance[5].numpy())
