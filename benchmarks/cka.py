"""Temporal CKA matrix: dtprobe's ``cka_matrix`` against the PyPI CKA packages, pair by pair.

The temporal CKA matrix compares the penultimate features of every pair of E checkpoints on
the same n images (Kornblith et al. 2019). dtprobe computes it in one pass from centred
feature cross-products ``||X_i^T X_j||_F^2`` (float64, chunked, no ``n x n`` Gram). The
baselines are what a user of the public packages would loop over the ``E (E - 1) / 2``
epoch pairs:

- ``ckatorch`` (``ckatorch.cka_base``, linear kernel, biased HSIC): two ``n x n`` float64
  Grams per pair, centred, then a Frobenius inner product. Compared with dtprobe's default
  (biased) linear CKA.
- ``torch-cka`` (``torch_cka.CKA``'s HSIC, the unbiased ``HSIC_1`` of Song et al. 2012 on
  zero-diagonal linear Grams, i.e. debiased CKA; it runs in float32, as that package does):
  three ``n x n`` matrix products per pair. Compared with dtprobe's debiased linear CKA. It
  is given column-centred features (``HSIC_1`` is unchanged by centring) so that its float32
  result is not spoiled by cancellation.

When a package is not installed, its documented per-pair formula is evaluated instead
(marked "formula" in the table). At full size a pair of the baselines takes minutes, so
each is timed on a few pairs and the per-pair time is multiplied by ``E (E - 1) / 2``
(stated in the row's note); agreement is checked on the pairs that were computed.

References
----------
Kornblith, S., Norouzi, M., Lee, H., Hinton, G. (2019). Similarity of neural network
representations revisited. ICML 2019.

Song, L., Smola, A., Gretton, A., Bedo, J., Borgwardt, K. (2012). Feature selection via
dependence maximization. JMLR 13.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from benchmarks import Row, timed
from dtprobe.metrics.cka import cka_matrix, linear_cka

TOLERANCE = 1e-5


def make_epochs(n_epochs: int, n: int, d: int, seed: int = 0) -> list[torch.Tensor]:
    """Penultimate-like float32 features of a drifting network: a random walk in feature
    space through ReLU, so CKA decays smoothly with the epoch distance."""
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(n, d, generator=gen)
    drift = torch.zeros(n, d)
    out = []
    for _ in range(n_epochs):
        drift += 0.3 * torch.randn(n, d, generator=gen)
        out.append(torch.relu(base + drift + 0.3).float())
    return out


# ------------------------------------------------------------------------------- baselines
def _ckatorch_pair() -> tuple[Callable[[torch.Tensor, torch.Tensor], float], str]:
    try:
        from ckatorch import cka_base
    except ImportError:
        return _gram_cka_formula, "ckatorch formula (package not installed)"
    return (lambda x, y: float(cka_base(x, y, kernel="linear"))), "ckatorch.cka_base loop"


def _gram_cka_formula(x: torch.Tensor, y: torch.Tensor) -> float:
    """ckatorch's documented per-pair computation: n x n Grams, centred with H = I - 11^T/n,
    normalised Frobenius inner product (float64)."""
    x, y = x.double(), y.double()
    n = x.shape[0]
    h = torch.eye(n, dtype=torch.float64) - 1.0 / n
    k = h @ (x @ x.T) @ h
    ll = h @ (y @ y.T) @ h
    return float((k * ll).sum() / (torch.linalg.norm(k) * torch.linalg.norm(ll)))


def _torch_cka_pair() -> tuple[Callable[[torch.Tensor, torch.Tensor], float], str]:
    try:
        from torch_cka import CKA
    except ImportError:
        return _unbiased_cka_formula, "torch-cka formula (package not installed)"
    inst = CKA.__new__(CKA)  # only its HSIC method is used; it reads ``self.device``
    inst.device = "cpu"

    def pair(x: torch.Tensor, y: torch.Tensor) -> float:
        x = (x - x.mean(dim=0)).float()
        y = (y - y.mean(dim=0)).float()
        k = x @ x.T
        k.fill_diagonal_(0.0)
        ll = y @ y.T
        ll.fill_diagonal_(0.0)
        hxy, hxx, hyy = inst._HSIC(k, ll), inst._HSIC(k, k), inst._HSIC(ll, ll)
        return hxy / math.sqrt(hxx * hyy)

    return pair, "torch_cka.CKA HSIC loop (float32)"


def _unbiased_cka_formula(x: torch.Tensor, y: torch.Tensor) -> float:
    """torch-cka's documented per-pair computation: HSIC_1 of zero-diagonal Grams (float32)."""
    def hsic(k: torch.Tensor, ll: torch.Tensor) -> float:
        n = k.shape[0]
        ones = torch.ones(n, 1)
        value = torch.trace(k @ ll) + (ones.T @ k @ ones * (ones.T @ ll @ ones)).item() / (
            (n - 1) * (n - 2)) - (ones.T @ k @ ll @ ones).item() * 2 / (n - 2)
        return float(value) / (n * (n - 3))

    x = (x - x.mean(dim=0)).float()
    y = (y - y.mean(dim=0)).float()
    k = (x @ x.T).fill_diagonal_(0.0)
    ll = (y @ y.T).fill_diagonal_(0.0)
    return hsic(k, ll) / math.sqrt(hsic(k, k) * hsic(ll, ll))


# ------------------------------------------------------------------------------------ run
def _loop(pair_fn, feats, pairs) -> tuple[float, dict[tuple[int, int], float]]:
    """Mean seconds per pair over ``pairs`` and the values."""
    values = {}
    total = 0.0
    for i, j in pairs:
        seconds, values[(i, j)] = timed(lambda i=i, j=j: pair_fn(feats[i], feats[j]))
        total += seconds
    return total / len(pairs), values


def run(quick: bool = False) -> list[Row]:
    n_epochs, n, d = (4, 500, 32) if quick else (20, 10_000, 512)
    feats = make_epochs(n_epochs, n, d)
    n_pairs = n_epochs * (n_epochs - 1) // 2
    all_pairs = [(i, j) for i in range(n_epochs) for j in range(i + 1, n_epochs)]
    cka_matrix([f[:200] for f in feats[:3]])  # warm-up
    ours_s, matrix = timed(lambda: cka_matrix(feats))
    sizes = f"E={n_epochs}, n={n:,}, d={d}"
    rows = []

    fn, label = _ckatorch_pair()
    pairs = all_pairs if quick else [(0, 1), (0, n_epochs - 1)]
    per_pair, values = _loop(fn, feats, pairs)
    diff = max(abs(v - float(matrix[i, j])) for (i, j), v in values.items())
    rows.append(Row(
        name="temporal CKA matrix vs ckatorch", sizes=sizes, ours=ours_s,
        base=per_pair * n_pairs, goal=20, baseline=label,
        agreement=f"max abs diff {diff:.1e} on {len(pairs)} pairs (tol {TOLERANCE:g})",
        agree_ok=diff <= TOLERANCE,
        note=(f"baseline timed on {len(pairs)} of {n_pairs} pairs "
              f"({per_pair:.2f} s per pair) x {n_pairs} pairs"
              if len(pairs) < n_pairs else "")))

    fn, label = _torch_cka_pair()
    pairs = all_pairs if quick else [(0, n_epochs - 1)]
    ours_s, debiased = timed(lambda: cka_matrix(feats, debiased=True))
    per_pair, values = _loop(fn, feats, pairs)
    diff = max(abs(v - float(debiased[i, j])) for (i, j), v in values.items())
    # and the one-pair API gives the matrix entry
    i, j = pairs[0]
    diff = max(diff, abs(linear_cka(feats[i], feats[j], debiased=True) - debiased[i, j]))
    rows.append(Row(
        name="temporal CKA matrix (debiased) vs torch-cka", sizes=sizes, ours=ours_s,
        base=per_pair * n_pairs, goal=20, baseline=label,
        agreement=f"max abs diff {diff:.1e} on {len(pairs)} pair(s) (tol {TOLERANCE:g})",
        agree_ok=diff <= TOLERANCE,
        note=(f"baseline timed on {len(pairs)} of {n_pairs} pairs ({per_pair:.1f} s per "
              f"pair) x {n_pairs} pairs" if len(pairs) < n_pairs else "")))
    return rows
