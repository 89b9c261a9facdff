"""Kornblith et al. (2021) objectives against the authors' released formulas.

Each reference below is written in float64 torch from reading the authors' TensorFlow code
(google-research/google-research ``loss_functions_transfer/losses.py``, ``resnet_model.py``,
``load_model.py``), with TensorFlow's conventions spelt out: ``tf.losses.*`` reduce with
``SUM_BY_NONZERO_WEIGHTS`` (sum of ``loss * weight`` over the weight-broadcast loss tensor,
divided by the number of its non-zero weights), ``tf.nn.l2_loss(x) = sum(x ** 2) / 2``,
``tf.nn.l2_normalize(x) = x / sqrt(max(sum(x ** 2), 1e-12))``, ``softmax_cross_entropy(...,
label_smoothing=a)`` smooths the one-hot labels to ``t (1 - a) + a / K`` and
``sigmoid_cross_entropy`` is the elementwise ``max(x, 0) - x t + log(1 + exp(-|x|))``.
dtprobe's objective (the registered one, through its head) must agree in value and gradient to
float64 round-off on random inputs that no other test uses.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from dtprobe.training.objectives import ObjectiveContext, build_objective
from dtprobe.training.objectives.kornblith import (
    AUTHORS_HYPERPARAMETERS,
    squared_error_defaults,
    temperature_default,
)

N, K, D = 11, 7, 9


# ------------------------------------------------------------ TensorFlow conventions, float64

def tf_weighted_mean(losses: torch.Tensor, weights) -> torch.Tensor:
    """``tf.losses.compute_weighted_loss`` with the default ``SUM_BY_NONZERO_WEIGHTS``."""
    w = torch.as_tensor(weights, dtype=losses.dtype).expand_as(losses)
    return (losses * w).sum() / (w != 0).sum()


def tf_softmax_xent(onehot, logits, weights=1.0, label_smoothing=0.0):
    k = logits.shape[1]
    t = onehot * (1 - label_smoothing) + label_smoothing / k if label_smoothing else onehot
    per = torch.stack([-(t[i] * (logits[i] - torch.logsumexp(logits[i], 0))).sum()
                       for i in range(len(logits))])
    return tf_weighted_mean(per, weights)


def tf_sigmoid_xent(onehot, logits, weights=1.0):
    x = logits
    per = torch.clamp(x, min=0) - x * onehot + torch.log1p(torch.exp(-x.abs()))
    return tf_weighted_mean(per, weights)


def tf_l2_loss(x):
    return (x * x).sum() / 2


def tf_l2_normalize(x, axis):
    return x / torch.sqrt(torch.clamp((x * x).sum(axis, keepdim=True), min=1e-12))


# ---------------------------------------------------------- the authors' losses (losses.py)

def authors_softmax(t, z):
    return tf_softmax_xent(t, z)


def authors_label_smoothing(t, z, alpha):
    return tf_softmax_xent(t, z, 1.0 / (1 - alpha), label_smoothing=alpha)


def authors_extra_final_layer_l2(t, z, kernel, lambda_):
    return tf_softmax_xent(t, z) + lambda_ * tf_l2_loss(kernel)


def authors_logit_penalty(t, z, beta):
    return tf_softmax_xent(t, z) + tf_weighted_mean(beta * (z ** 2).sum(-1) / 2, 1.0)


def authors_logit_normalization(t, z, tau):
    return tf_softmax_xent(t, tf_l2_normalize(z, -1) / tau)


def authors_cosine_softmax(t, h, kernel_dk, bias, tau):
    """resnet_model.py builds ``h @ l2_normalize(kernel, 0) + bias``; losses.py divides by tau."""
    final_layer = h @ tf_l2_normalize(kernel_dk, 0) + bias[None, :]
    return tf_softmax_xent(t, final_layer / tau)


def authors_sigmoid(t, z):
    k = z.shape[1]
    return tf_sigmoid_xent(t, z - math.log(k), 1.0 * k)


def authors_squared_error(t, z, kappa, m, loss_scale):
    correct = ((z * t).sum(-1) - m) ** 2
    other = ((z * (1.0 - t)) ** 2).sum(-1)
    return tf_weighted_mean(loss_scale * (kappa * correct + other), 1.0)


# --------------------------------------------------------------------------------- harness

def _problem(seed: int):
    g = torch.Generator().manual_seed(seed)
    model = nn.Sequential(nn.Linear(3, D), nn.ReLU(), nn.Linear(D, K)).double()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64))
    h = torch.randn(N, D, generator=g, dtype=torch.float64) * 1.5
    y = torch.randint(0, K, (N,), generator=g)
    y[:K] = torch.arange(K)  # every class present
    ctx = ObjectiveContext(model=model, head=model[2], feature_dim=D, num_classes=K,
                           num_samples=N, train_labels=y, device=torch.device("cpu"),
                           head_name="2")
    return ctx, h, y


def _ours(name, ctx, h, y, params=None):
    obj = build_objective(name, ctx, params or {})
    obj.train()
    loss, _ = obj(images=None, features=h, logits=ctx.head(h), labels=y,
                  indices=torch.arange(len(y)), epoch=1)
    return loss


def _compare(ours: torch.Tensor, ref: torch.Tensor, params: list[torch.Tensor]) -> None:
    assert float(ours.detach()) == pytest.approx(float(ref.detach()), rel=1e-12, abs=1e-12)
    g_ours = torch.autograd.grad(ours, params, retain_graph=True)
    g_ref = torch.autograd.grad(ref, params, retain_graph=True)
    for a, b in zip(g_ours, g_ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def _head_and_features(ctx, h):
    h = h.clone().requires_grad_(True)
    return h, [ctx.head.weight, ctx.head.bias, h]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_label_smoothing_equals_authors(seed):
    ctx, h, y = _problem(seed)
    h, params = _head_and_features(ctx, h)
    t = nn.functional.one_hot(y, K).double()
    ref = authors_label_smoothing(t, ctx.head(h), 0.1)
    _compare(_ours("label_smoothing", ctx, h, y), ref, params)
    ref = authors_label_smoothing(t, ctx.head(h), 0.35)
    _compare(_ours("label_smoothing", ctx, h, y, {"alpha": 0.35}), ref, params)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sigmoid_equals_authors(seed):
    ctx, h, y = _problem(seed)
    h, params = _head_and_features(ctx, h)
    t = nn.functional.one_hot(y, K).double()
    _compare(_ours("sigmoid", ctx, h, y), authors_sigmoid(t, ctx.head(h)), params)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_extra_final_layer_l2_equals_authors(seed):
    ctx, h, y = _problem(seed)
    h, params = _head_and_features(ctx, h)
    t = nn.functional.one_hot(y, K).double()
    # tf.layers.dense's kernel is (in, out): the transpose of torch's weight, same l2_loss.
    ref = authors_extra_final_layer_l2(t, ctx.head(h), ctx.head.weight.T, 8e-4)
    _compare(_ours("extra_l2", ctx, h, y), ref, params)
    ref = authors_extra_final_layer_l2(t, ctx.head(h), ctx.head.weight.T, 0.3)
    _compare(_ours("extra_l2", ctx, h, y, {"lam": 0.3}), ref, params)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_logit_penalty_equals_authors(seed):
    ctx, h, y = _problem(seed)
    h, params = _head_and_features(ctx, h)
    t = nn.functional.one_hot(y, K).double()
    _compare(_ours("logit_penalty", ctx, h, y), authors_logit_penalty(t, ctx.head(h), 6e-4),
             params)
    _compare(_ours("logit_penalty", ctx, h, y, {"beta": 0.05}),
             authors_logit_penalty(t, ctx.head(h), 0.05), params)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_logit_normalization_equals_authors(seed):
    ctx, h, y = _problem(seed)
    h, params = _head_and_features(ctx, h)
    t = nn.functional.one_hot(y, K).double()
    _compare(_ours("logit_norm", ctx, h, y, {"tau": 0.04}),
             authors_logit_normalization(t, ctx.head(h), 0.04), params)
    # the default derives tau from K: the authors' 0.04 with tau ln K held at theirs (K = 1001)
    _compare(_ours("logit_norm", ctx, h, y),
             authors_logit_normalization(t, ctx.head(h), 0.04 * math.log(1001) / math.log(K)),
             params)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_cosine_softmax_equals_authors(seed):
    ctx, h, y = _problem(seed)
    h, params = _head_and_features(ctx, h)
    t = nn.functional.one_hot(y, K).double()
    # resnet_model.py: kernel (in, out) normalised per output column, features not normalised,
    # bias kept; torch's weight is (out, in), so its rows are the authors' columns.
    ref = authors_cosine_softmax(t, h, ctx.head.weight.T, ctx.head.bias, 0.05)
    _compare(_ours("cosine_softmax", ctx, h, y, {"tau": 0.05}), ref, params)
    ref = authors_cosine_softmax(t, h, ctx.head.weight.T, ctx.head.bias,
                                 0.05 * math.log(1001) / math.log(K))
    _compare(_ours("cosine_softmax", ctx, h, y), ref, params)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_squared_error_equals_authors(seed):
    ctx, h, y = _problem(seed)
    h, params = _head_and_features(ctx, h)
    t = nn.functional.one_hot(y, K).double()
    authors = {"kappa": 9.0, "M": 60.0, "scale": 10.0}
    _compare(_ours("squared_error", ctx, h, y, authors),
             authors_squared_error(t, ctx.head(h), 9.0, 60.0, 10.0), params)
    # The default at K = 7 is Hui & Belkin's small-K setting, in the same formula.
    _compare(_ours("squared_error", ctx, h, y),
             authors_squared_error(t, ctx.head(h), 1.0, 1.0, 1.0 / K), params)


def test_dropout_is_the_authors_penultimate_dropout():
    """resnet_model.py: ``tf.nn.dropout(h, keep_prob)`` on the pooled features in training only
    (inverted: kept units scaled by 1/keep_prob), then the dense layer and plain softmax."""
    ctx, h, y = _problem(3)
    t = nn.functional.one_hot(y, K).double()
    obj = build_objective("dropout", ctx)
    torch.manual_seed(5)
    loss, _ = obj(images=None, features=h, logits=ctx.head(h), labels=y, indices=None, epoch=1)
    # Recover the mask dtprobe drew from the same generator state and apply the authors' form.
    torch.manual_seed(5)
    dropped = nn.functional.dropout(h, p=0.3, training=True)
    mask = dropped != 0
    ref = authors_softmax(t, ctx.head(torch.where(mask, h / 0.7, torch.zeros_like(h))))
    assert float(loss) == pytest.approx(float(ref), rel=1e-12)
    obj.eval()
    loss, _ = obj(images=None, features=h, logits=ctx.head(h), labels=y, indices=None, epoch=1)
    assert float(loss) == pytest.approx(float(authors_softmax(t, ctx.head(h))), rel=1e-12)


def test_defaults_are_the_authors_values():
    from dtprobe.training.objectives import available_objectives

    specs = available_objectives()
    # load_model.py's LOSS_HYPERPARAMETERS, written here from the file
    assert AUTHORS_HYPERPARAMETERS == {
        "label_smoothing": {"alpha": 0.1}, "dropout": {"keep_prob": 0.7},
        "extra_l2": {"lam": 8e-4}, "logit_penalty": {"beta": 6e-4}, "logit_norm": {"tau": 0.04},
        "cosine_softmax": {"tau": 0.05},
        "squared_error": {"kappa": 9.0, "M": 60.0, "scale": 10.0}}
    for name, values in AUTHORS_HYPERPARAMETERS.items():
        if name in ("squared_error", "logit_norm", "cosine_softmax"):  # derived from K
            continue
        assert {k: specs[name].defaults[k] for k in values} == values
    assert temperature_default("logit_norm", 1001) == 0.04
    assert temperature_default("cosine_softmax", 1001) == 0.05
    assert squared_error_defaults(1001) == {"kappa": 9.0, "M": 60.0, "scale": 10.0}
    assert squared_error_defaults(6) == {"kappa": 1.0, "M": 1.0, "scale": 1.0 / 6}


def test_exported_heads_output_the_authors_outputs():
    """``model(x)`` of a saved checkpoint equals the authors' ``outputs`` tensor (the logits
    their loss applies softmax/sigmoid to): cosine softmax's scaled cosine, sigmoid's shift."""
    for name in ("cosine_softmax", "sigmoid"):
        ctx, h, y = _problem(4)
        obj = build_objective(name, ctx, {"tau": 0.05} if name == "cosine_softmax" else {})
        state = obj.export_model_state(ctx.model.state_dict())
        fresh = _problem(4)[0].model
        fresh.load_state_dict(state)
        got = fresh[2](h)
        if name == "cosine_softmax":
            want = (h @ tf_l2_normalize(ctx.head.weight.T, 0) + ctx.head.bias) / 0.05
        else:
            want = ctx.head(h) - math.log(K)
        torch.testing.assert_close(got, want.detach(), rtol=1e-12, atol=1e-12)
