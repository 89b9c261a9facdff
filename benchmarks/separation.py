"""Class separation R^2 (Kornblith et al. 2021): dtprobe's O(n d) closed form against the
pairwise definition, evaluated exactly in float64 torch blocks.

The definition averages the cosine distance ``1 - cos(x_m, x_n)`` over all ordered pairs
(``m = n`` included), within each class and over every class pair, classes weighted equally:
``R^2 = 1 - d_within / d_total``. The baseline forms the cosine-similarity matrix block by
block (``b x n`` float64 blocks, never ``n x n`` at once) and reduces each block to per-class
sums with one-hot matrix products, which is the fastest exact way to evaluate the definition
as written.

Reference: Kornblith, S., Chen, T., Lee, H., Norouzi, M. (2021). Why do better loss functions
lead to less transferable features? NeurIPS 2021.
"""

from __future__ import annotations

import torch

from benchmarks import Row, timed
from dtprobe.metrics.separation import class_separation

TOLERANCE = 1e-9


def pairwise_class_separation(features: torch.Tensor, labels: torch.Tensor,
                              block: int = 1024) -> float:
    """R^2 from the pairwise definition: sums of ``1 - cos`` over all ordered pairs."""
    z = features.to(torch.float64)
    z = z / torch.linalg.vector_norm(z, dim=1, keepdim=True)
    classes, y = torch.unique(labels, return_inverse=True)
    k = classes.numel()
    onehot = torch.nn.functional.one_hot(y, k).to(torch.float64)  # (n, K)
    counts = onehot.sum(dim=0)
    sums = torch.zeros(k, k, dtype=torch.float64)  # sums[j, k] = sum_{m in j, n in k} (1 - cos)
    for s in range(0, z.shape[0], block):
        dist = 1.0 - z[s:s + block] @ z.T  # (b, n) cosine distances
        sums += onehot[s:s + block].T @ (dist @ onehot)
    d_within = (torch.diagonal(sums) / (k * counts**2)).sum()
    d_total = (sums / (k * k * torch.outer(counts, counts))).sum()
    return float(1.0 - d_within / d_total)


def make_features(n: int, d: int, k: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Penultimate-like float32 features: ReLU of class means plus noise, uneven classes."""
    gen = torch.Generator().manual_seed(seed)
    weights = torch.linspace(1.0, 2.0, k)
    labels = torch.multinomial(weights, n, replacement=True, generator=gen)
    means = torch.randn(k, d, generator=gen)
    x = torch.relu(means[labels] + 1.5 * torch.randn(n, d, generator=gen) + 0.5)
    return x.float(), labels


def run(quick: bool = False) -> list[Row]:
    n, d, k = (2000, 64, 10) if quick else (10_000, 512, 10)
    x, y = make_features(n, d, k)
    class_separation(x[:100], y[:100])  # warm-up (first-call overheads)
    ours_s, ours = timed(lambda: class_separation(x, y), repeat=3)
    base_s, base = timed(lambda: pairwise_class_separation(x, y), repeat=1)
    diff = abs(ours - base)
    return [Row(
        name="class separation R^2", sizes=f"n={n:,}, d={d}, K={k}", ours=ours_s, base=base_s,
        goal=100, baseline="pairwise definition, float64 torch blocks",
        agreement=f"abs diff {diff:.1e} (tol {TOLERANCE:g}); R^2={ours:.4f}",
        agree_ok=diff <= TOLERANCE)]
