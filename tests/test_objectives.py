"""Objective losses against float64 references written from the papers' formulas (values and
gradients), degenerate inputs, and the registry. The Kornblith et al. (2021) losses are also
checked against their authors' TensorFlow formulas in ``test_objectives_reference.py``."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dtprobe.errors import ConfigError
from dtprobe.training.objectives import (
    ObjectiveContext,
    available_objectives,
    build_objective,
)
from dtprobe.training.objectives.contrastive import nt_xent_loss, supcon_loss
from dtprobe.training.objectives.kornblith import (
    cosine_logits,
    label_smoothing_loss,
    logit_norm_loss,
    sigmoid_loss,
    squared_error_loss,
)
from dtprobe.training.objectives.trex import Projector

B, K, D = 7, 4, 5


def _data(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(B, K, generator=g, dtype=torch.float64) * 2
    y = torch.tensor([0, 1, 2, 3, 1, 1, 0])
    return z, y


def _grad(fn, x: torch.Tensor) -> tuple[float, torch.Tensor]:
    x = x.clone().requires_grad_(True)
    value = fn(x)
    (g,) = torch.autograd.grad(value, x)
    return float(value.detach()), g


def _close(ours, ref, x, **kw):
    v1, g1 = _grad(ours, x)
    v2, g2 = _grad(ref, x)
    assert v1 == pytest.approx(v2, rel=1e-10, abs=1e-12)
    torch.testing.assert_close(g1, g2, rtol=1e-9, atol=1e-12, **kw)


# ---------------------------------------------------------------- loop references (float64)

def _log_softmax_row(row):
    m = max(float(v) for v in row)
    lse = m + torch.log(sum(torch.exp(v - m) for v in row))
    return [v - lse for v in row]


def ref_ce(z, y):
    return sum(-_log_softmax_row(z[i])[int(y[i])] for i in range(len(y))) / len(y)


def ref_label_smoothing(z, y, a):
    total = 0
    for i in range(len(y)):
        lp = _log_softmax_row(z[i])
        total = total - sum(((1 - a) * (k == int(y[i])) + a / K) * lp[k] for k in range(K))
    return total / len(y) / (1 - a)  # the authors weight it by 1 / (1 - a)


def ref_sigmoid(z, y):
    total = 0
    for i in range(len(y)):
        for k in range(K):
            s = 1 / (1 + torch.exp(-(z[i, k] - math.log(K))))  # the authors' -log K shift
            t = 1.0 if k == int(y[i]) else 0.0
            total = total - (t * torch.log(s) + (1 - t) * torch.log(1 - s))
    return total / len(y)


def ref_logit_norm(z, y, tau):
    rows = [z[i] / (tau * torch.sqrt(sum(v * v for v in z[i]))) for i in range(len(y))]
    return ref_ce(torch.stack(rows), y)


def ref_cosine(h, w, b, y, tau):
    """Class weights normalised, features not, bias kept (the authors' final layer)."""
    rows = []
    for i in range(len(y)):
        rows.append(torch.stack([(sum(h[i, d] * w[k, d] for d in range(h.shape[1]))
                                  / torch.sqrt(sum(v * v for v in w[k])) + b[k]) / tau
                                 for k in range(w.shape[0])]))
    return ref_ce(torch.stack(rows), y)


def ref_squared(z, y, kappa, m, scale):
    total = 0
    for i in range(len(y)):
        for k in range(K):
            if k == int(y[i]):
                total = total + kappa * (z[i, k] - m) ** 2
            else:
                total = total + z[i, k] ** 2
    return scale * total / len(y)  # no division by K (the authors' form)


def _sim(a, b):
    return sum(a[d] * b[d] for d in range(len(a)))


def ref_supcon(e, y, tau):
    """Khosla et al. 2020, Eq. 2 (L_out), over the 2B views in e (already normalised)."""
    n = len(e)
    total = 0
    for i in range(n):
        denom = sum(torch.exp(_sim(e[i], e[a]) / tau) for a in range(n) if a != i)
        pos = [p for p in range(n) if p != i and int(y[p]) == int(y[i])]
        total = total - sum(torch.log(torch.exp(_sim(e[i], e[p]) / tau) / denom)
                            for p in pos) / len(pos)
    return total / n


def ref_nt_xent(e, tau):
    n = len(e)
    b = n // 2
    total = 0
    for i in range(n):
        j = i + b if i < b else i - b
        denom = sum(torch.exp(_sim(e[i], e[a]) / tau) for a in range(n) if a != i)
        total = total - torch.log(torch.exp(_sim(e[i], e[j]) / tau) / denom)
    return total / n


# -------------------------------------------------------------------------- Kornblith losses

def test_softmax_and_label_smoothing_match_reference():
    z, y = _data()
    _close(lambda x: F.cross_entropy(x, y), lambda x: ref_ce(x, y), z)
    _close(lambda x: label_smoothing_loss(x, y, 0.1), lambda x: ref_label_smoothing(x, y, 0.1), z)
    assert float(label_smoothing_loss(z, y, 0.0)) == pytest.approx(float(ref_ce(z, y)))


def test_sigmoid_matches_reference():
    z, y = _data(1)
    _close(lambda x: sigmoid_loss(x, y), lambda x: ref_sigmoid(x, y), z)


def test_logit_norm_matches_reference_and_zero_logits_are_finite():
    z, y = _data(2)
    _close(lambda x: logit_norm_loss(x, y, 0.04), lambda x: ref_logit_norm(x, y, 0.04), z)
    zero = torch.zeros(3, K, dtype=torch.float64, requires_grad=True)
    loss = logit_norm_loss(zero, y[:3], 0.04)
    loss.backward()
    assert float(loss) == pytest.approx(math.log(K))  # documented: uniform prediction
    assert torch.equal(zero.grad, torch.zeros_like(zero))


def test_cosine_softmax_matches_reference_and_zero_norm_is_documented_value():
    g = torch.Generator().manual_seed(3)
    h = torch.randn(B, D, generator=g, dtype=torch.float64)
    w = torch.randn(K, D, generator=g, dtype=torch.float64)
    b = torch.randn(K, generator=g, dtype=torch.float64)
    _, y = _data()
    _close(lambda x: F.cross_entropy(cosine_logits(x, w, b, 0.05), y),
           lambda x: ref_cosine(x, w, b, y, 0.05), h)
    _close(lambda x: F.cross_entropy(cosine_logits(h, x, b, 0.05), y),
           lambda x: ref_cosine(h, x, b, y, 0.05), w)
    _close(lambda x: F.cross_entropy(cosine_logits(h, w, x, 0.05), y),
           lambda x: ref_cosine(h, w, x, y, 0.05), b)
    w0 = w.clone()
    w0[1] = 0  # a class weight that decayed to zero
    w0.requires_grad_(True)
    loss = F.cross_entropy(cosine_logits(h, w0, b, 0.05), y)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(w0.grad).all()
    assert torch.equal(w0.grad[1], torch.zeros(D, dtype=torch.float64))
    torch.testing.assert_close(cosine_logits(h, w0, b, 0.05)[:, 1].detach(),
                               (b[1] / 0.05).expand(B))


def test_squared_error_matches_reference():
    z, y = _data(4)
    _close(lambda x: squared_error_loss(x, y, 9.0, 60.0, 10.0),
           lambda x: ref_squared(x, y, 9.0, 60.0, 10.0), z)


def _ctx(num_classes=K, feature_dim=D, n=B):
    model = nn.Sequential(nn.Linear(3, feature_dim), nn.ReLU(), nn.Linear(feature_dim,
                                                                          num_classes))
    model.double()
    return ObjectiveContext(model=model, head=model[2], feature_dim=feature_dim,
                            num_classes=num_classes, num_samples=n,
                            train_labels=torch.arange(n) % num_classes,
                            device=torch.device("cpu"), head_name="2")


def _call(obj, h, y, **views):
    logits = obj_head(obj)(h)
    return obj(images=None, features=h, logits=logits, labels=y, indices=torch.arange(len(y)),
               epoch=1, **views)


def obj_head(obj):
    return obj._head


def test_extra_l2_and_logit_penalty_match_reference():
    ctx = _ctx()
    _, y = _data()
    h = torch.randn(B, D, dtype=torch.float64)
    obj = build_objective("extra_l2", ctx)
    w = ctx.head.weight

    loss, terms = _call(obj, h, y)
    (g_ours,) = torch.autograd.grad(loss, w)
    z = ctx.head(h)
    ref = ref_ce(z, y) + 8e-4 * sum(float(v) ** 2 for v in w.detach().flatten()) / 2
    assert float(loss) == pytest.approx(float(ref), rel=1e-10)
    w_ref = w.detach().clone().requires_grad_(True)
    ref_t = ref_ce(h @ w_ref.T + ctx.head.bias.detach(), y) + 8e-4 * (w_ref ** 2).sum() / 2
    (g_ref,) = torch.autograd.grad(ref_t, w_ref)
    torch.testing.assert_close(g_ours, g_ref, rtol=1e-9, atol=1e-12)
    assert set(terms) == {"ce", "final_l2_loss"}

    obj = build_objective("logit_penalty", ctx)
    z = torch.randn(B, K, dtype=torch.float64)
    _close(lambda x: obj(images=None, features=h, logits=x, labels=y, indices=None,
                         epoch=1)[0],
           lambda x: ref_ce(x, y) + 6e-4 * sum((x[i] ** 2).sum() for i in range(B)) / B / 2, z)


def test_dropout_keeps_expected_fraction_and_is_ce_at_eval():
    ctx = _ctx(feature_dim=2000)
    obj = build_objective("dropout", ctx)
    h = torch.rand(B, 2000, dtype=torch.float64) + 0.5
    _, y = _data()
    seen = []
    handle = ctx.head.register_forward_pre_hook(lambda m, a: seen.append(a[0].detach()))
    torch.manual_seed(0)
    obj(images=None, features=h, logits=ctx.head(h), labels=y, indices=None, epoch=1)
    handle.remove()
    dropped = seen[-1]
    kept = dropped != 0
    assert abs(float(kept.double().mean()) - 0.7) < 0.02
    torch.testing.assert_close(dropped[kept], (h / 0.7)[kept])
    obj.eval()
    loss, _ = obj(images=None, features=h, logits=ctx.head(h), labels=y, indices=None, epoch=1)
    assert float(loss) == pytest.approx(float(F.cross_entropy(ctx.head(h), y)))


def test_cosine_softmax_export_makes_argmax_the_cosine_prediction():
    ctx = _ctx()
    obj = build_objective("cosine_softmax", ctx)
    with torch.no_grad():
        ctx.head.bias.uniform_(-5, 5)
    h = torch.randn(50, D, dtype=torch.float64)
    state = obj.export_model_state(ctx.model.state_dict())
    fresh = _ctx().model
    fresh.load_state_dict(state)
    pred = fresh[2](h).argmax(1)
    torch.testing.assert_close(pred, obj.eval_logits(h, None).argmax(1))


def test_sigmoid_leaves_the_head_alone():
    """The authors shift the logits inside the loss; the head's initialisation is untouched."""
    ctx = _ctx()
    before = ctx.head.bias.detach().clone()
    build_objective("sigmoid", ctx)
    assert torch.equal(ctx.head.bias.detach(), before)


# -------------------------------------------------------------------- contrastive losses

def _views(seed=5, n=6, d=4):
    g = torch.Generator().manual_seed(seed)
    e1 = F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=1)
    e2 = F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=1)
    return e1, e2


def test_supcon_matches_khosla_formula():
    e1, e2 = _views()
    y = torch.tensor([0, 1, 0, 2, 1, 0])
    e = torch.cat([e1, e2])
    _close(lambda x: supcon_loss(x[:6], x[6:], y, 0.1),
           lambda x: ref_supcon(x, torch.cat([y, y]), 0.1), e)


def test_nt_xent_matches_simclr_formula():
    e1, e2 = _views(6)
    e = torch.cat([e1, e2])
    _close(lambda x: nt_xent_loss(x[:6], x[6:], 0.5), lambda x: ref_nt_xent(x, 0.5), e)


def test_supcon_one_class_batch_and_temperature_extremes_are_finite():
    e1, e2 = _views(7)
    one = torch.zeros(6, dtype=torch.long)
    x = torch.cat([e1, e2]).requires_grad_(True)
    loss = supcon_loss(x[:6], x[6:], one, 0.1)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(x.grad).all()
    # No negatives: every other view is a positive, so the value is >= log(2B - 1).
    assert float(loss) >= math.log(11) - 1e-12
    for tau in (1e-3, 1e6):
        for fn in (supcon_loss, nt_xent_loss):
            a = e1.float().clone().requires_grad_(True)
            args = (a, e2.float(), one, tau) if fn is supcon_loss else (a, e2.float(), tau)
            value = fn(*args)
            value.backward()
            assert torch.isfinite(value) and torch.isfinite(a.grad).all()
    assert float(nt_xent_loss(e1, e2, 1e6)) == pytest.approx(math.log(11), rel=1e-5)
    with pytest.raises(ConfigError, match="tau"):
        build_objective("supcon", _ctx(), {"tau": 1e-5})
    with pytest.raises(ConfigError, match="tau"):
        build_objective("ce_simclr", _ctx(), {"tau": 0.0})


# ------------------------------------------------------- Islam et al.'s released objectives

def _authors_islam_step(obj, ctx, h, x2, y, mode, tau=0.07, weight=0.5, m=0.9):
    """One training step of asrafulashiq/transfer_broad written out: momentum update of the key
    encoder (k = m k + (1 - m) q), keys normalize(mlp_k(enc_k(x2))); MoCo InfoNCE (positive
    q.k, negatives the queue before enqueueing, target 0); enqueue at the pointer (modulo);
    queue SupCon after enqueueing: -sum_{same label} log_softmax(q @ queue / T) / (count +
    1e-5), batch mean."""
    import copy as _copy

    model_k, heads_k = _copy.deepcopy(obj.model_k), _copy.deepcopy(obj.heads_k)
    with torch.no_grad():
        for live, key in ((ctx.model, model_k), (obj.heads, heads_k)):
            for p, q in zip(live.parameters(), key.parameters(), strict=True):
                q.copy_(q * m + p * (1 - m))
    queues = {k[6:]: v.clone() for k, v in obj.named_buffers() if k.startswith("queue_")
              and k not in ("queue_labels", "queue_ptr")}
    qlab = obj.queue_labels.clone()
    ptr = int(obj.queue_ptr)
    hk = ctx.feature_fn(model_k, x2)
    loss = 0
    q = {k: _authors_l2norm(mlp(h)) for k, mlp in obj.heads.items()}
    k = {key: _authors_l2norm(mlp(hk)).detach() for key, mlp in heads_k.items()}
    if "ssl" in q:
        lpos = (q["ssl"] * k["ssl"]).sum(1, keepdim=True)
        lneg = q["ssl"] @ queues["ssl"].clone().T  # the queue before enqueueing
        loss = loss + weight * F.cross_entropy(torch.cat([lpos, lneg], 1) / tau,
                                               torch.zeros(len(y), dtype=torch.long))
    idx = [(ptr + i) % len(qlab) for i in range(len(y))]
    for key in queues:
        queues[key][idx] = k[key]
    qlab[idx] = y
    if "sup" in q:
        logits = q["sup"] @ queues["sup"].T / tau
        mask = (y[:, None] == qlab[None, :]).double()
        per = -(torch.log_softmax(logits, -1) * mask).sum(-1) / (mask.sum(-1) + 1e-5)
        loss = loss + per.mean()
    if mode == "ce_ssl":
        loss = loss + F.cross_entropy(ctx.head(h), y)
    else:
        loss = loss + F.cross_entropy(ctx.head(h.detach()), y)
    return loss, queues, qlab


@pytest.mark.parametrize("mode", ["supcon", "ce_ssl", "supcon_ssl"])
def test_islam_objectives_equal_the_authors_step(mode):
    ctx = _trex_ctx(2)
    obj = build_objective(f"islam_{mode}", ctx, {"queue_size": 9, "momentum": 0.9,
                                                   "proj_dim": 4})
    obj.double().train()
    obj.queue_ptr.fill_(6)
    obj.queue_labels[:4] = torch.tensor([0, 1, 2, 1])  # some labelled keys already
    x, x2 = torch.randn(5, 4, dtype=torch.float64), torch.randn(5, 4, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 2, 1])
    h = ctx.feature_fn(ctx.model, x).detach().requires_grad_(True)
    ref, queues, qlab = _authors_islam_step(obj, ctx, h, x2, y, mode)
    loss, terms = obj(images=x, features=h, logits=ctx.head(h), labels=y, indices=None,
                      epoch=1, images2=x2, features2=None, logits2=None)
    assert float(loss.detach()) == pytest.approx(float(ref.detach()), rel=1e-12)
    g1 = torch.autograd.grad(loss, h, retain_graph=True)[0]
    g2 = torch.autograd.grad(ref, h)[0]
    torch.testing.assert_close(g1, g2, rtol=1e-10, atol=1e-12)
    for key, want in queues.items():
        torch.testing.assert_close(getattr(obj, f"queue_{key}"), want.detach())
    assert torch.equal(obj.queue_labels, qlab) and int(obj.queue_ptr) == (6 + 5) % 9
    assert set(terms) >= ({"supcon"} if "sup" in mode else set()) | (
        {"moco"} if "ssl" in mode else set())


def test_supcon_matches_hobbitlong_reference_at_base_temperature():
    """HobbitLong/SupContrast ``losses.py`` (Khosla et al.'s reference code), contrast_mode
    'all', two views: logits over all 2B views without self, positives = same label, mean
    log-probability over positives, times -(T / base_T); dtprobe's in-batch ``supcon`` equals
    it at T = base_T (its default 0.1 with base_T 0.1)."""
    e1, e2 = _views(9)
    y = torch.tensor([0, 1, 0, 2, 1, 0])
    feats = torch.stack([e1, e2], 1)  # [bsz, n_views, d]
    contrast = torch.cat(torch.unbind(feats, 1), 0)
    mask = (y[:, None] == y[None, :]).double().repeat(2, 2)
    logits = contrast @ contrast.T / 0.1
    logits = logits - logits.max(1, keepdim=True).values
    not_self = 1 - torch.eye(12, dtype=torch.float64)
    mask = mask * not_self
    log_prob = logits - torch.log((torch.exp(logits) * not_self).sum(1, keepdim=True) + 1e-9)
    ref = (-(0.1 / 0.1) * (mask * log_prob).sum(1) / mask.sum(1)).view(2, 6).mean()
    # (their +1e-9 inside the log moves the value by ~1e-8 relative)
    assert float(supcon_loss(e1, e2, y, 0.1)) == pytest.approx(float(ref), rel=1e-7)


# ------------------------------------------------------------------------------ t-ReX

def test_trex_projector_structure():
    p = Projector(16, hidden=32, layers=2, out_dim=256)
    kinds = [type(m).__name__ for m in p.mlp]
    assert kinds == ["Linear", "BatchNorm1d", "GELU"] * 2
    assert p.out.out_features == 256 and p.out.bias is None
    h = torch.randn(5, 16)
    p.eval()
    torch.testing.assert_close(p(h), p(h * 7.0))  # L2-normalised input


def _trex_ctx(seed=0, n=10, k=3, d=6):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, d), nn.ReLU(), nn.Linear(d, k)).double()

    def feature_fn(m, x):
        return m[1](m[0](x))

    return ObjectiveContext(model=model, head=model[2], feature_dim=d, num_classes=k,
                            num_samples=n, train_labels=torch.arange(n) % k,
                            device=torch.device("cpu"), seed=seed, feature_fn=feature_fn,
                            head_name="2")


def _authors_l2norm(x):
    return x / x.norm(dim=1, keepdim=True).clamp(min=1e-12)


def test_trex_star_step_equals_authors_memory_and_ema():
    """naver/trex ``trex.py``: class weights = L2-normalised per-class sums of the memory;
    logits = normalize(g(h)) @ weights.T / tau (no gradient through the weights); then the EMA
    copy (momentum m) is updated and its projector output on the global crop is enqueued at the
    pointer, truncated at the end of the memory, the pointer wrapping to 0."""
    ctx = _trex_ctx()
    obj = build_objective("trex_star", ctx, {"hidden": 8, "layers": 2, "out_dim": 5,
                                             "bank_size": 13, "local_crops": 0, "ema": 0.9})
    obj.train()
    obj.double()
    obj.bank_ptr.fill_(9)
    x = torch.randn(6, 4, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 2, 1, 0])
    h = ctx.feature_fn(ctx.model, x).requires_grad_(True)
    memory, memory_y = obj.bank.clone(), obj.bank_labels.clone()
    shadow = [p.detach().clone() for p in (*obj.model_ema.parameters(),
                                            *obj.projector_ema.parameters())]
    live = [p.detach().clone() for p in (*ctx.model.parameters(), *obj.projector.parameters())]
    import copy as _copy
    proj_ref = _copy.deepcopy(obj.projector)

    loss, terms = obj(images=x, features=h, logits=ctx.head(h), labels=y,
                      indices=torch.arange(6), epoch=1)

    w = torch.zeros(3, 5, dtype=torch.float64).index_add(0, memory_y, memory)
    w = _authors_l2norm(w)
    logits = _authors_l2norm(proj_ref(h)) @ w.T / 0.1
    ref = F.cross_entropy(logits, y) + F.cross_entropy(ctx.head(h.detach()), y)
    assert float(loss.detach()) == pytest.approx(float(ref.detach()), rel=1e-12)
    g1 = torch.autograd.grad(loss, h, retain_graph=True)[0]
    g2 = torch.autograd.grad(ref, h)[0]
    torch.testing.assert_close(g1, g2, rtol=1e-10, atol=1e-12)
    # EMA update, then the EMA forward of the global crop fills slots 9..12 (4 of 6 rows).
    expected = [0.9 * s_ + 0.1 * l_ for s_, l_ in zip(shadow, live, strict=True)]
    got = [p.detach() for p in (*obj.model_ema.parameters(), *obj.projector_ema.parameters())]
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    z_ema = obj.projector_ema(ctx.feature_fn(obj.model_ema, x)).detach()
    torch.testing.assert_close(obj.bank[9:13], z_ema[:4])
    assert torch.equal(obj.bank[:9], memory[:9])
    assert torch.equal(obj.bank_labels[9:13], y[:4]) and int(obj.bank_ptr) == 0


def test_trex_cosine_classifier_is_bias_free_and_multicrop_is_one_ce():
    """The trainable t-ReX: ``normalize(g(h)) @ normalize(W).T / tau``; with crops the projector
    runs once on all crops' features and one CE is taken with the labels repeated."""
    ctx = _trex_ctx(1)
    obj = build_objective("trex", ctx, {"hidden": 8, "layers": 3, "out_dim": 5,
                                        "local_crops": 2})
    obj.double().train()
    assert obj.classifier.bias is None and len(obj.projector.mlp) == 9
    h = torch.randn(4, 6, dtype=torch.float64)
    h2, h3 = torch.randn(4, 6, dtype=torch.float64), torch.randn(4, 6, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 0])
    loss, _ = obj(images=None, features=h, labels=y, features2=h2, features3=h3,
                  logits2=None, logits3=None)
    z = obj.projector(torch.cat([h, h2, h3]))
    logits = _authors_l2norm(z) @ _authors_l2norm(obj.classifier.weight).T / 0.1
    ref = F.cross_entropy(logits, y.repeat(3)) + F.cross_entropy(ctx.head(h), y)
    assert float(loss.detach()) == pytest.approx(float(ref.detach()), rel=1e-12)


def test_trex_defaults_are_the_authors_script():
    specs = available_objectives()
    for name in ("trex", "trex_star"):
        d = specs[name].defaults
        assert (d["hidden"], d["layers"], d["out_dim"], d["tau"], d["local_crops"]) == \
            (2048, 3, 256, 0.1, 8)
    assert specs["trex_star"].defaults["bank_size"] == 8192
    assert specs["trex_star"].defaults["ema"] == 0.999
    p = Projector(64, hidden=512, layers=1, out_dim=32)
    w = p.mlp[0].weight
    assert abs(float(w.std()) - 0.02) < 0.002 and float(w.abs().max()) < 0.1
    assert torch.equal(p.mlp[0].bias, torch.zeros(512))


# ---------------------------------------------------------------------------- registry

KORNBLITH_DEFAULTS = {"label_smoothing": {"alpha": 0.1}, "extra_l2": {"lam": 8e-4},
                      "dropout": {"keep_prob": 0.7}, "logit_penalty": {"beta": 6e-4},
                      "logit_norm": {"tau": "auto"}, "cosine_softmax": {"tau": "auto"},
                      "squared_error": {"kappa": "auto", "M": "auto", "scale": "auto"}}


def test_registry_has_every_objective_with_paper_defaults():
    specs = available_objectives()
    expected = {"ce", "label_smoothing", "sigmoid", "extra_l2", "dropout", "logit_penalty",
                "logit_norm", "cosine_softmax", "squared_error", "supcon", "ce_simclr",
                "supcon_simclr", "trex", "trex_star", "ctc", "islam_supcon", "islam_ce_ssl",
                "islam_supcon_ssl"}
    assert expected <= set(specs)
    for name, defaults in KORNBLITH_DEFAULTS.items():
        assert {k: specs[name].defaults[k] for k in defaults} == defaults
        assert "Kornblith" in specs[name].paper
    for name in specs:
        assert specs[name].paper and specs[name].description


def test_temperatures_derive_from_the_class_count():
    """tau ln K is held at the authors' (tau 0.04 / 0.05 at 1001 outputs); from 1001 classes on
    their value; a given tau is used as given and recorded as not derived."""
    from dtprobe.training.objectives.kornblith import temperature_default

    for name, authors in (("logit_norm", 0.04), ("cosine_softmax", 0.05)):
        for k in (2, 6, 10, 100, 1000):
            assert temperature_default(name, k) * math.log(k) == pytest.approx(
                authors * math.log(1001), rel=1e-12)
        assert temperature_default(name, 1001) == temperature_default(name, 21843) == authors
        obj = build_objective(name, _ctx(num_classes=6))
        assert obj.hparams == {"tau": pytest.approx(authors * math.log(1001) / math.log(6)),
                               "derived_from_K": True}
        assert build_objective(name, _ctx(num_classes=6), {"tau": authors}).hparams == \
            {"tau": authors, "derived_from_K": False}
    assert round(temperature_default("logit_norm", 6), 3) == 0.154
    assert round(temperature_default("cosine_softmax", 6), 3) == 0.193
    with pytest.raises(ConfigError, match="tau"):
        build_objective("cosine_softmax", _ctx(), {"tau": -1.0})


def test_unknown_objective_or_parameter_is_one_line_error():
    with pytest.raises(ConfigError, match="unknown --objective 'nope'"):
        build_objective("nope", _ctx())
    with pytest.raises(ConfigError, match="not a parameter of label_smoothing.*alpha=0.1"):
        build_objective("label_smoothing", _ctx(), {"alpah": 0.2})
    with pytest.raises(ConfigError, match="keep_prob"):
        build_objective("dropout", _ctx(), {"keep_prob": 1.5})


def test_objective_configs_record_hyperparameters():
    obj = build_objective("label_smoothing", _ctx(), {"alpha": 0.2})
    assert obj.config() == {"objective": "label_smoothing", "alpha": 0.2}
    trex = build_objective("trex", _ctx(), {"hidden": 8})
    assert "BEFORE" in trex.config()["analysed_features"]
    assert np.isclose(trex.config()["tau"], 0.1)


def test_islam_queue_keeps_the_authors_fraction_of_the_training_set():
    """queue_size=auto: 64,000 keys for ImageNet's 1,281,167 images (5 %), the same fraction of a
    smaller training set (at least 256 keys, at most 64,000); a given size is used as given."""
    from dtprobe.training.objectives.contrastive import islam_queue_default

    assert islam_queue_default(1_281_167) == 64000
    assert islam_queue_default(10_000_000) == 64000
    assert islam_queue_default(6000) == round(64000 * 6000 / 1_281_167) == 300
    assert islam_queue_default(50_000) == 2498
    assert islam_queue_default(100) == 256
    ctx = _ctx()
    ctx.feature_fn = lambda model, x: x  # the trainer's feature function
    obj = build_objective("islam_supcon", ctx)
    assert obj.hparams["queue_size"] == 256 and len(obj.queue_labels) == 256
    assert build_objective("islam_supcon", ctx, {"queue_size": 9}).hparams["queue_size"] == 9
    with pytest.raises(ConfigError, match="queue_size"):
        build_objective("islam_supcon", ctx, {"queue_size": "many"})
