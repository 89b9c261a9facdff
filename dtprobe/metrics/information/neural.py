"""Variational lower bounds on mutual information estimated with trained networks.

* MINE (Belghazi et al. 2018): Donsker-Varadhan bound
  ``I(A;B) >= E_P[T(a, b)] - log E_{P_A x P_B}[exp T(a, b)]`` maximised over a statistics
  network ``T``, with the bias-corrected gradient that replaces the minibatch denominator of
  ``grad log E[e^T]`` by an exponential moving average of ``E[e^T]`` -- the estimator the CTC
  paper (Cui et al. 2022) used for its information-plane plots.
* InfoNCE (van den Oord et al. 2018; Poole et al. 2019):
  ``I(A;B) >= E[ log( e^{f(a_i, b_i)} / ((1/K) sum_j e^{f(a_i, b_j)}) ) ]`` over batches of
  ``K`` pairs, with a separable critic ``f(a, b) = g(a) . h(b)``; it can never exceed
  ``log K``.

Inputs are standardised per column (continuous) or one-hot encoded (labels) before entering the
networks; MI is invariant to these invertible maps. Training runs on the inputs' device in
float32 with its own seeded generators (the global RNG state is restored afterwards). Values
are in nats.

Convergence. These estimators train for a fixed number of steps, so "converged" is a settling
test of the reported number itself (:func:`settled`): the final estimate is compared with the
same estimate (same samples and permutations) of the network as it was one tenth of the steps
earlier; a change beyond ``plateau_tol`` (relative; nats below 1 nat) means the number is still
moving, and the result then says ``converged: False`` with one
:class:`~dtprobe.metrics.convergence.EstimatorConvergenceWarning` line.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from dtprobe.errors import MetricInputError
from dtprobe.metrics._validation import ArrayLike
from dtprobe.metrics.convergence import warn_unconverged
from dtprobe.metrics.information._common import (
    MIResult,
    Variable,
    degenerate_result,
    prepare_pair,
    standardize,
)


def _network_input(v: Variable) -> torch.Tensor:
    return (v.one_hot() if v.discrete else standardize(v.data)).to(torch.float32)


def _mlp(in_dim: int, hidden: int, n_layers: int, out_dim: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    width = in_dim
    for _ in range(n_layers):
        layers += [nn.Linear(width, hidden), nn.ReLU()]
        width = hidden
    layers.append(nn.Linear(width, out_dim))
    return nn.Sequential(*layers)


def _check_training(steps: int, batch_size: int, lr: float, hidden: int, n_layers: int,
                    n_eval_perms: int) -> None:
    for name, value in (("steps", steps), ("batch_size", batch_size), ("hidden", hidden),
                        ("n_eval_perms", n_eval_perms)):
        if not isinstance(value, int) or value < 1:
            raise MetricInputError(f"{name} must be a positive integer, got {value!r}")
    if not isinstance(n_layers, int) or n_layers < 0:
        raise MetricInputError(f"n_layers must be a non-negative integer, got {n_layers!r}")
    if not (lr > 0 and math.isfinite(lr)):
        raise MetricInputError(f"lr must be a positive float, got {lr!r}")


#: Default tolerance of the settling test, relative (absolute in nats below 1 nat).
PLATEAU_TOL = 0.01


def settled(final: float, earlier: float, steps: int, tol: float = PLATEAU_TOL
            ) -> dict[str, Any]:
    """Settling test of a trained bound: did the reported estimate stop moving?

    ``final`` is the estimate after all ``steps``; ``earlier`` the same estimate (same
    samples, same permutations) from the network as it was ``max(1, steps // 10)`` steps
    before the end.  The estimate counts as converged when both are finite and
    ``|final - earlier| <= tol * max(|final|, 1)`` (relative, absolute in nats below 1 nat).

    Returns
    -------
    dict
        ``converged`` (bool), ``n_iter`` (steps), ``last_change`` (nats, ``final - earlier``)
        and ``settle_steps`` (the steps between the two evaluations).
    """
    change = final - earlier
    ok = math.isfinite(change) and abs(change) <= float(tol) * max(abs(final), 1.0)
    return {"converged": bool(ok), "n_iter": int(steps), "last_change": change,
            "settle_steps": max(1, steps // 10)}


def _report(name: str, diag: dict[str, Any], tol: float) -> None:
    if not diag["converged"]:
        warn_unconverged(name, f"the estimate still moved by {diag['last_change']:+.3g} nats "
                         f"over the last {diag['settle_steps']} of {diag['n_iter']} steps "
                         f"(tolerance {tol:g} relative, nats below 1)", "raise steps",
                         stacklevel=5)  # past _report, _final_estimate and the estimator


def _check_tol(tol: float) -> None:
    if not (isinstance(tol, (int, float)) and math.isfinite(tol) and tol >= 0):
        raise MetricInputError(f"plateau_tol must be a non-negative number, got {tol!r}")


def _fork_devices(device: torch.device) -> list[int]:
    return [device.index or 0] if device.type == "cuda" else []


class _Statistics(nn.Module):
    """MINE statistics network ``T(a, b)``: an MLP on the concatenated inputs."""

    def __init__(self, dim_a: int, dim_b: int, hidden: int, n_layers: int):
        super().__init__()
        self.net = _mlp(dim_a + dim_b, hidden, n_layers, 1)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat([a, b], dim=1)).squeeze(1)


def _dv_bound(net: _Statistics, a: torch.Tensor, b: torch.Tensor, perms: list[torch.Tensor],
              chunk: int) -> float:
    """DV bound with the joint term over all pairs and the marginal term over shuffled pairs."""
    with torch.no_grad():
        joint = torch.cat([net(a[i:i + chunk], b[i:i + chunk]) for i in range(0, len(a), chunk)])
        marg = torch.cat([net(a[i:i + chunk], b[p[i:i + chunk]])
                          for p in perms for i in range(0, len(a), chunk)])
        log_mean_exp = torch.logsumexp(marg.double(), 0) - math.log(marg.numel())
        return float(joint.double().mean() - log_mean_exp)


def _seeded_setup(va: Any, vb: Any, seed: int, build: Callable[[int, int], nn.Module]
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Generator, nn.Module]:
    """Network inputs of both views, the batch generator and the network ``build(dim_a,
    dim_b)``, initialised from ``seed`` without touching the global RNG streams."""
    xa, xb = _network_input(va), _network_input(vb)
    device = xa.device
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.random.fork_rng(devices=_fork_devices(device)):
        torch.manual_seed(seed)
        net = build(xa.shape[1], xb.shape[1]).to(device)
    return xa, xb, gen, net


def _final_estimate(name: str, net: nn.Module, snapshot: dict[str, Any], gen: torch.Generator,
                    n: int, n_eval_perms: int, steps: int, plateau_tol: float,
                    params: dict[str, Any],
                    evaluate: Callable[[list[torch.Tensor]], float]) -> MIResult:
    """The bound of the trained network on ``n_eval_perms`` re-pairings of all ``n`` samples,
    settled against the same bound of ``snapshot`` (the network a tenth of the steps
    earlier)."""
    device = next(net.parameters()).device
    perms = [torch.randperm(n, generator=gen, device=device) for _ in range(n_eval_perms)]
    value = evaluate(perms)
    net.load_state_dict(snapshot)
    diag = settled(value, evaluate(perms), steps, plateau_tol)
    _report(name, diag, plateau_tol)
    return MIResult(value, name, "nats", params, diag)


def mine_mi(a: ArrayLike, b: ArrayLike, *, hidden: int = 256, n_layers: int = 3,
            steps: int = 1000, batch_size: int = 256, lr: float = 1e-3, ema_rate: float = 0.01,
            n_eval_perms: int = 10, max_samples: int | None = None, seed: int = 0,
            plateau_tol: float = PLATEAU_TOL) -> MIResult:
    """MINE: Donsker-Varadhan lower bound on ``I(A;B)`` with a trained statistics network, nats.

    Parameters
    ----------
    a, b : (n, d) arrays/tensors, or (n,) integer labels (one-hot encoded)
    hidden : int
        Width of each hidden ReLU layer. The CTC paper used 1024; the default 256 is a speed
        compromise for CPUs (pass ``hidden=1024`` to match the paper).
    n_layers : int
        Number of hidden layers (paper: 3).
    steps : int
        Adam steps; each draws ``batch_size`` joint pairs and, for the marginal term, the same
        ``a`` rows paired with ``b`` rows of an independent random draw.
    batch_size : int
        Minibatch size (capped at ``n``).
    lr : float
        Adam learning rate.
    ema_rate : float
        Rate of the moving average of ``E[e^T]`` in the bias-corrected gradient (paper: 0.01).
    n_eval_perms : int
        The final estimate is the DV bound evaluated on all ``n`` samples (the samples the
        network was trained on, as in the CTC code; optimistic when ``n`` is small relative to
        the network), with the product-of-marginals term averaged over this many random
        re-pairings of ``b``.
    max_samples, seed : optional seeded subsample; ``seed`` also seeds initialisation and
        batches.
    plateau_tol : float
        Tolerance of the settling test (:func:`settled`).

    Returns
    -------
    MIResult
        Nats; ``params["final_train_bound"]`` is the last minibatch bound for diagnostics;
        ``diagnostics`` holds the settling test (``converged``, ``n_iter``, ``last_change``,
        ``settle_steps``).

    References
    ----------
    Belghazi et al. (2018), "Mutual information neural estimation", ICML.
    Cui et al. (2022), "Discriminability-transferability trade-off: an information-theoretic
    perspective", ECCV.
    """
    _check_training(steps, batch_size, lr, hidden, n_layers, n_eval_perms)
    _check_tol(plateau_tol)
    if not 0 < ema_rate <= 1:
        raise MetricInputError(f"ema_rate must be in (0, 1], got {ema_rate!r}")
    va, vb = prepare_pair(a, b, max_samples=max_samples, seed=seed)
    batch = min(batch_size, va.n)
    params = {"hidden": hidden, "n_layers": n_layers, "steps": steps, "batch_size": batch,
              "lr": lr, "ema_rate": ema_rate, "n_eval_perms": n_eval_perms, "n": va.n,
              "seed": seed, "max_samples": max_samples, "evaluation": "DV bound on all samples"}
    if (zero := degenerate_result(va, vb, "mine", params)) is not None:
        return zero
    xa, xb, gen, net = _seeded_setup(
        va, vb, seed, lambda da, db: _Statistics(da, db, hidden, n_layers))
    device = xa.device
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    log_ma: torch.Tensor | None = None
    log_rate, log_keep = math.log(ema_rate), math.log1p(-ema_rate) if ema_rate < 1 else -math.inf
    snap_at, snapshot = steps - max(1, steps // 10), None
    bound = torch.tensor(float("nan"))
    for step in range(steps):
        if step == snap_at:  # the network one tenth of the steps before the end
            snapshot = copy.deepcopy(net.state_dict())
        i = torch.randint(va.n, (batch,), generator=gen, device=device)
        j = torch.randint(va.n, (batch,), generator=gen, device=device)
        t_joint, t_marg = net(xa[i], xb[i]), net(xa[i], xb[j])
        log_mean_exp = torch.logsumexp(t_marg, 0) - math.log(batch)
        with torch.no_grad():
            current = log_mean_exp.detach()
            log_ma = current if log_ma is None else torch.logaddexp(log_keep + log_ma,
                                                                    log_rate + current)
        # d/dtheta of exp(lme - log_ma) = E[e^T grad T] / moving-average(E[e^T]): the
        # bias-corrected gradient of log E[e^T] (Belghazi et al. 2018, section 3.2).
        loss = -(t_joint.mean() - torch.exp(log_mean_exp - log_ma))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        bound = t_joint.detach().mean() - log_mean_exp.detach()  # no host sync per step
    params["final_train_bound"] = float(bound)
    return _final_estimate("mine", net, snapshot, gen, va.n, n_eval_perms, steps, plateau_tol,
                           params, lambda perms: _dv_bound(net, xa, xb, perms, chunk=4096))


class _SeparableCritic(nn.Module):
    """``f(a, b) = g(a) . h(b)``: all ``K x K`` scores of a batch from ``2 K`` network passes."""

    def __init__(self, dim_a: int, dim_b: int, hidden: int, n_layers: int, embed_dim: int):
        super().__init__()
        self.g = _mlp(dim_a, hidden, n_layers, embed_dim)
        self.h = _mlp(dim_b, hidden, n_layers, embed_dim)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return self.g(a) @ self.h(b).T


def _infonce(scores: torch.Tensor) -> torch.Tensor:
    """InfoNCE bound of one ``K x K`` score matrix whose diagonal holds the positive pairs."""
    k = scores.shape[0]
    return (scores.diagonal() - torch.logsumexp(scores, dim=1)).mean() + math.log(k)


def infonce_mi(a: ArrayLike, b: ArrayLike, *, hidden: int = 256, n_layers: int = 2,
               embed_dim: int = 64, steps: int = 1000, batch_size: int = 256, lr: float = 1e-3,
               n_eval_perms: int = 10, max_samples: int | None = None,
               seed: int = 0, plateau_tol: float = PLATEAU_TOL) -> MIResult:
    """InfoNCE lower bound on ``I(A;B)`` with a trained separable critic, in nats.

    Parameters
    ----------
    a, b : (n, d) arrays/tensors, or (n,) integer labels (one-hot encoded)
    hidden, n_layers : width and number of hidden ReLU layers of each of the two MLPs.
    embed_dim : int
        Dimension of the embeddings whose dot product is the critic.
    steps, batch_size, lr : Adam steps, batch size ``K`` (capped at ``n``), learning rate.
    n_eval_perms : int
        The final estimate averages the bound over this many random partitions of all ``n``
        samples into batches of ``K`` (a trailing partial batch is dropped).
    max_samples, seed, plateau_tol : as :func:`mine_mi`.

    Returns
    -------
    MIResult
        Nats; never above ``log K``, reported as ``params["cap"]`` -- when the estimate is
        close to the cap, the true MI may be much larger.  ``diagnostics`` holds the
        settling test (``converged``, ``n_iter``, ``last_change``, ``settle_steps``).

    References
    ----------
    van den Oord, Li & Vinyals (2018), "Representation learning with contrastive predictive
    coding", arXiv:1807.03748.
    Poole, Ozair, van den Oord, Alemi & Tucker (2019), "On variational bounds of mutual
    information", ICML.
    """
    _check_training(steps, batch_size, lr, hidden, n_layers, n_eval_perms)
    _check_tol(plateau_tol)
    if not isinstance(embed_dim, int) or embed_dim < 1:
        raise MetricInputError(f"embed_dim must be a positive integer, got {embed_dim!r}")
    va, vb = prepare_pair(a, b, max_samples=max_samples, seed=seed)
    batch = min(batch_size, va.n)
    params = {"hidden": hidden, "n_layers": n_layers, "embed_dim": embed_dim, "steps": steps,
              "batch_size": batch, "lr": lr, "n_eval_perms": n_eval_perms, "n": va.n,
              "seed": seed, "max_samples": max_samples, "cap": math.log(batch)}
    if (zero := degenerate_result(va, vb, "infonce", params)) is not None:
        return zero
    xa, xb, gen, critic = _seeded_setup(
        va, vb, seed, lambda da, db: _SeparableCritic(da, db, hidden, n_layers, embed_dim))
    device = xa.device
    opt = torch.optim.Adam(critic.parameters(), lr=lr)
    snap_at, snapshot = steps - max(1, steps // 10), None
    for step in range(steps):
        if step == snap_at:  # the critic one tenth of the steps before the end
            snapshot = copy.deepcopy(critic.state_dict())
        i = torch.randperm(va.n, generator=gen, device=device)[:batch]
        loss = -_infonce(critic(xa[i], xb[i]))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return _final_estimate("infonce", critic, snapshot, gen, va.n, n_eval_perms, steps,
                           plateau_tol, params,
                           lambda perms: _infonce_eval(critic, xa, xb, perms, batch))


def _infonce_eval(critic: _SeparableCritic, xa: torch.Tensor, xb: torch.Tensor,
                  perms: list[torch.Tensor], batch: int) -> float:
    """Mean InfoNCE bound over the batches of ``batch`` pairs of each permutation."""
    values = []
    with torch.no_grad():
        for perm in perms:
            for s in range(0, perm.numel() - batch + 1, batch):
                i = perm[s:s + batch]
                values.append(float(_infonce(critic(xa[i], xb[i]).double())))
    return sum(values) / len(values)
