"""Memory banks, contrastive losses and the other-class negative sampler used by CTC.

These are the building blocks of contrastive temporal coding (Cui et al. 2022): the non-parametric
instance discrimination of stage 1 (Wu et al. 2018) and the CRD-style binary NCE of stage 2
(Tian et al. 2020). Every function here is a pure tensor function except the sampler, whose only
state is its lookup tables; randomness comes from a counter-seeded ``torch.Generator`` so a draw is
reproducible from ``(seed, rank, draw)`` alone.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dtprobe.errors import ConfigError
from dtprobe.references import with_references
from dtprobe.runtime.distributed import all_gather_rows, distributed_rank, is_distributed

__doc__ = with_references(__doc__, "cui2022", "wu2018", "tian2020")

__all__ = [
    "OtherClassSampler",
    "all_gather_rows",
    "crd_nce_loss",
    "distributed_rank",
    "estimate_log_z",
    "gather_scores",
    "instance_discrimination_loss",
    "is_distributed",
    "momentum_update",
    "random_unit_bank",
]


# --------------------------------------------------------------------------------------------
# memory banks
# --------------------------------------------------------------------------------------------

def random_unit_bank(num_rows: int, dim: int, seed: int,
                     dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A ``(num_rows, dim)`` bank of random unit vectors (isotropic Gaussian, normalised).

    Seeded by ``seed`` alone (CPU generator), so every rank of a distributed run and every
    device starts from the same bank.
    """
    gen = torch.Generator().manual_seed(int(seed))
    bank = torch.randn(num_rows, dim, generator=gen, dtype=torch.float64)
    return F.normalize(bank, dim=1).to(dtype)


def _last_occurrence(indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Unique ``indices`` and, for each, the position of its last occurrence (deterministic)."""
    unique, inverse = torch.unique(indices, return_inverse=True)
    positions = torch.arange(indices.numel(), device=indices.device)
    last = torch.full((unique.numel(),), -1, dtype=torch.long, device=indices.device)
    last = last.scatter_reduce(0, inverse, positions, reduce="amax", include_self=True)
    return unique, last


def momentum_update(bank: torch.Tensor, indices: torch.Tensor, values: torch.Tensor,
                    momentum: float) -> torch.Tensor:
    """Momentum update of memory-bank rows, renormalised (memory bank of Wu et al. 2018).

    ``bank[i] <- (m * bank[i] + (1 - m) * v) / ||m * bank[i] + (1 - m) * v||`` for every
    ``(i, v)`` pair; untouched rows are unchanged. When an index occurs more than once the last
    occurrence wins (deterministic, so ranks that apply the same gathered batch stay identical).

    The result is a new tensor: the old bank may still be saved by autograd for the backward
    pass of the loss that read it, so it must not be modified in place.

    Parameters
    ----------
    bank : torch.Tensor
        ``(N, d)`` unit rows.
    indices : torch.Tensor
        ``(B,)`` long, rows to update.
    values : torch.Tensor
        ``(B, d)`` new embeddings (detached by this function).
    momentum : float
        ``m`` in ``[0, 1)``; ``0`` overwrites the rows with the normalised values.

    Returns
    -------
    torch.Tensor
        The updated ``(N, d)`` bank.
    """
    indices = indices.reshape(-1).to(device=bank.device, dtype=torch.long)
    values = values.detach().to(device=bank.device, dtype=bank.dtype)
    if indices.numel() == 0:
        return bank
    unique, last = _last_occurrence(indices)
    old_rows = bank.index_select(0, unique)
    mixed = momentum * old_rows + (1.0 - momentum) * values.index_select(0, last)
    return bank.index_copy(0, unique, F.normalize(mixed, dim=1))


# --------------------------------------------------------------------------------------------
# losses
# --------------------------------------------------------------------------------------------

def instance_discrimination_loss(z: torch.Tensor, bank: torch.Tensor, indices: torch.Tensor,
                                 temperature: float) -> torch.Tensor:
    """Non-parametric instance discrimination (Wu et al. 2018), exact softmax over the bank.

    ``-mean_b log softmax_j(z_b . bank_j / tau)[indices_b]``: each sample must pick its own
    memory-bank entry among all ``N``. The bank is treated as a constant (no gradient).

    Parameters
    ----------
    z : torch.Tensor
        ``(B, d)`` unit embeddings.
    bank : torch.Tensor
        ``(N, d)`` unit memory-bank rows.
    indices : torch.Tensor
        ``(B,)`` dataset indices of the samples (the targets).
    temperature : float
        ``tau1``.

    Returns
    -------
    torch.Tensor
        Scalar mean loss.
    """
    logits = z @ bank.detach().t() / temperature
    return F.cross_entropy(logits, indices.to(device=logits.device, dtype=torch.long))


def gather_scores(v: torch.Tensor, bank: torch.Tensor, sample_idx: torch.Tensor) -> torch.Tensor:
    """Dot products ``scores[b, k] = v_b . bank[sample_idx[b, k]]`` (bank detached).

    Two equivalent evaluation orders: when the draws cover a sizable part of the bank
    (``K + 1 >= N / 4``) one ``(B, N)`` matrix product plus a gather is cheaper than
    materialising the ``(B, K + 1, d)`` gathered rows; otherwise rows are gathered.
    """
    bank = bank.detach()
    if 4 * sample_idx.shape[1] >= bank.shape[0]:
        return (v @ bank.t()).gather(1, sample_idx)
    rows = bank.index_select(0, sample_idx.reshape(-1)).view(*sample_idx.shape, bank.shape[1])
    return torch.bmm(rows, v.unsqueeze(2)).squeeze(2)


def estimate_log_z(scores: torch.Tensor, temperature: float, num_samples: int) -> float:
    """CRD's one-off estimate of the NCE normalising constant, returned as ``log Z``.

    ``Z = N * mean(exp(scores / tau))`` over every entry of the first batch (positives
    included), then held fixed for the rest of training (Tian et al. 2020 and their
    released code; the same in the dt-tradeoff code). Computed with a log-sum-exp.
    """
    flat = scores.detach().double().reshape(-1) / temperature
    return float(math.log(num_samples) + torch.logsumexp(flat, 0) - math.log(flat.numel()))


def crd_nce_loss(scores: torch.Tensor, temperature: float, log_z: float,
                 num_samples: int) -> torch.Tensor:
    """CRD binary NCE loss (Tian et al. 2020): positive in column 0, K negatives after.

    With ``P(u | v) = exp(v . u / tau) / Z`` and uniform noise ``1 / N`` over the ``N`` bank
    entries, the posterior that a pair came from the data is
    ``h = P / (P + K / N)``, and the loss is
    ``-(1/B) sum_b [log h(v_b, u_b+) + sum_k log(1 - h(v_b, u_bk))]``.
    Evaluated as ``logsigmoid(log P - log(K/N))`` and ``logsigmoid(log(K/N) - log P)``, which
    equals the ratio form exactly but never divides by zero (the reference code adds
    ``1e-7`` to the denominators instead).

    Parameters
    ----------
    scores : torch.Tensor
        ``(B, K + 1)`` dot products of unit vectors; column 0 is the positive.
    temperature : float
        ``tau2``.
    log_z : float
        Log of the normalising constant ``Z`` (see :func:`estimate_log_z`).
    num_samples : int
        ``N``, the number of bank entries (defines the noise probability ``1/N``).

    Returns
    -------
    torch.Tensor
        Scalar loss (summed over the pair terms, averaged over the batch).
    """
    num_negatives = scores.shape[1] - 1
    if num_negatives < 1:
        raise ValueError("crd_nce_loss needs at least one negative column")
    log_p = scores / temperature - log_z
    log_noise = math.log(num_negatives / num_samples)
    positive = F.logsigmoid(log_p[:, 0] - log_noise)
    negative = F.logsigmoid(log_noise - log_p[:, 1:])
    return -(positive.sum() + negative.sum()) / scores.shape[0]


# --------------------------------------------------------------------------------------------
# negative sampling
# --------------------------------------------------------------------------------------------

class OtherClassSampler(nn.Module):
    """Draws, for each anchor, ``K`` distinct negatives uniformly from other classes.

    CTC's stage 2 contrasts a sample's current and snapshot embeddings against samples of other
    classes only (Cui et al. 2022, following CRD's class-aware sampling). Vectorised: the
    dataset indices are sorted by class once; the other-class pool of class ``c`` is that order
    with the contiguous block of class ``c`` cut out, so a uniform integer
    ``r in [0, N - n_c)`` maps to a pool member by skipping that block.

    ``K`` is clipped to the smallest other-class pool, ``N - max_c n_c`` (so every row has the
    same width); :attr:`num_negatives` is the effective value. By default each row is drawn
    *without* replacement, as the dt-tradeoff reference code does (``np.random.choice(...,
    replace=False)``): a uniformly random ``K``-subset of the pool, as the ``K`` smallest of
    i.i.d. uniform keys. ``replace=True`` draws i.i.d. (NCE's textbook assumption); that is not
    "nearly the same" in the paper's setting: with ``K = 16384`` from a pool of
    ``P = 49,500`` (CIFAR-100) the expected number of distinct draws is
    ``P (1 - (1 - 1/P)^K) = 13,950``, so about 15% of the negatives would be repeats.

    The lookup tables are non-persistent buffers (they move with ``.to(device)`` and are
    rebuilt from the labels, never saved). A draw is a function of ``(seed, rank, draw)`` only:
    the generator is re-seeded from those three numbers, so resuming needs just the draw counter
    and each rank of a distributed run samples its own stream.

    Parameters
    ----------
    labels : torch.Tensor
        ``(N,)`` integer class label of every training sample (index order).
    num_negatives : int
        Requested ``K``.
    seed : int
        Base seed.
    replace : bool
        Draw i.i.d. with replacement instead (the behaviour of dtprobe before 2026-12).
    """

    def __init__(self, labels: torch.Tensor, num_negatives: int, seed: int,
                 replace: bool = False):
        super().__init__()
        labels = torch.as_tensor(labels).reshape(-1).long().cpu()
        classes, class_ids, counts = torch.unique(labels, return_inverse=True, return_counts=True)
        if classes.numel() < 2:
            raise ConfigError("CTC stage 2 samples negatives from other classes, but the training "
                              "labels hold a single class; use a dataset with at least two classes")
        if num_negatives < 1:
            raise ConfigError(f"nce_k={num_negatives} must be >= 1")
        num_samples = labels.numel()
        self.requested_negatives = int(num_negatives)
        self.num_negatives = int(min(num_negatives, num_samples - int(counts.max())))
        self.num_samples = int(num_samples)
        self.seed = int(seed)
        self.replace = bool(replace)
        starts = torch.cumsum(counts, 0) - counts
        self.register_buffer("order", torch.argsort(class_ids, stable=True), persistent=False)
        self.register_buffer("sample_class", class_ids, persistent=False)
        self.register_buffer("class_start", starts, persistent=False)
        self.register_buffer("class_count", counts, persistent=False)

    @property
    def clipped(self) -> bool:
        """Whether the requested ``K`` exceeded the smallest other-class pool."""
        return self.num_negatives < self.requested_negatives

    def generator(self, draw: int, rank: int = 0) -> torch.Generator:
        """The generator for draw number ``draw`` on ``rank``, on this sampler's device."""
        state = np.random.SeedSequence([self.seed, int(rank), int(draw)]).generate_state(
            1, dtype=np.uint64)[0]
        gen = torch.Generator(device=self.order.device)
        gen.manual_seed(int(state) & 0x7FFF_FFFF_FFFF_FFFF)
        return gen

    def forward(self, indices: torch.Tensor, draw: int, rank: int = 0) -> torch.Tensor:
        """Sample ``(B, K + 1)`` dataset indices: column 0 is ``indices``, then ``K`` negatives.

        Parameters
        ----------
        indices : torch.Tensor
            ``(B,)`` dataset indices of the anchors.
        draw : int
            Draw counter (the caller increments it once per batch).
        rank : int
            Process rank (separate streams per rank).
        """
        device = self.order.device
        indices = indices.reshape(-1).to(device=device, dtype=torch.long)
        cls = self.sample_class.index_select(0, indices)
        count = self.class_count.index_select(0, cls).unsqueeze(1)
        start = self.class_start.index_select(0, cls).unsqueeze(1)
        pool = self.num_samples - count
        gen = self.generator(draw, rank)
        if self.replace:
            u = torch.rand(indices.numel(), self.num_negatives, generator=gen, device=device,
                           dtype=torch.float64)
            r = torch.minimum((u * pool).long(), pool - 1)
        else:
            # A uniform K-subset of 0..pool-1 per row: the K smallest of i.i.d. uniform keys,
            # keys beyond the row's pool set to 2 (never among the K smallest, as K <= pool).
            width = self.num_samples - int(self.class_count.min())
            keys = torch.rand(indices.numel(), width, generator=gen, device=device)
            keys = keys.masked_fill(torch.arange(width, device=device)[None, :] >= pool, 2.0)
            r = keys.topk(self.num_negatives, dim=1, largest=False).indices
        position = r + (r >= start).long() * count
        negatives = self.order[position]
        return torch.cat([indices.unsqueeze(1), negatives], dim=1)
