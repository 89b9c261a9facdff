"""Binning (plug-in) estimates of mutual information (Shwartz-Ziv & Tishby 2017).

Each continuous variable is discretised into ``n_bins`` equal-width bins per dimension over its
range; each sample's tuple of bin indices is one symbol, and MI is the plug-in value
``H(A_b) + H(B_b) - H(A_b, B_b)`` of the empirical symbol frequencies. Labels are used as is.

What it measures: for a deterministic network and distinct inputs, ``H(T_b | X) = 0``, so the
binned ``I(X;T)`` is exactly ``H(binned T)``, the entropy of the binned representation
(bounded by ``log n``) -- a measure of how many bins the representation occupies, not of a
Shannon MI of the continuous ``T`` (Saxe et al. 2018; Goldfeld et al. 2019).
``I(T;Y) = H(T_b) - H(T_b | Y)`` and is at most ``H(Y)``. Values are in nats.
"""

from __future__ import annotations

import torch

from dtprobe.errors import MetricInputError
from dtprobe.metrics._validation import ArrayLike
from dtprobe.metrics.information._common import (
    MIResult,
    Variable,
    degenerate_result,
    plugin_entropy,
    prepare,
    prepare_pair,
)


def bin_indices(x: torch.Tensor, n_bins: int, *, per_dimension: bool = False) -> torch.Tensor:
    """Equal-width bin index of every entry of ``x`` ``(n, d)``: int64 in ``[0, n_bins)``.

    Bin ``k`` covers ``[lo + k w, lo + (k+1) w)`` with ``w = (hi - lo) / n_bins``; the maximum
    goes to the last bin. ``lo``/``hi`` are the minimum/maximum of the whole array (as in
    Shwartz-Ziv & Tishby) or of each column (``per_dimension=True``). A zero range puts every
    entry in bin 0.
    """
    if per_dimension:
        lo, hi = x.min(dim=0).values, x.max(dim=0).values
    else:
        lo, hi = x.min(), x.max()
    width = (hi - lo) / n_bins
    width = torch.where(width > 0, width, torch.ones_like(width))
    return torch.floor((x - lo) / width).long().clamp_(0, n_bins - 1)


def _symbols(v: Variable, n_bins: int, per_dimension: bool) -> torch.Tensor:
    """``(n,)`` int64 symbol per sample: the label, or the id of its tuple of bin indices."""
    if v.discrete:
        return v.data
    _, codes = torch.unique(bin_indices(v.data, n_bins, per_dimension=per_dimension), dim=0,
                            return_inverse=True)
    return codes


def _check(n_bins: int) -> None:
    if not isinstance(n_bins, int) or n_bins < 2:
        raise MetricInputError(f"n_bins must be an integer >= 2, got {n_bins!r}")


def binning_entropy(t: ArrayLike, *, n_bins: int = 30, per_dimension: bool = False) -> float:
    """Plug-in Shannon entropy, in nats, of ``t`` discretised into ``n_bins`` bins per dimension.

    Parameters
    ----------
    t : (n, d) array or tensor, or (n,) integer labels (used as is)
    n_bins : int
        Equal-width bins per dimension (Shwartz-Ziv & Tishby used 30).
    per_dimension : bool
        Bin range per column instead of the range of the whole array.

    Returns
    -------
    float
        Entropy in nats, at most ``log n``.

    References
    ----------
    Shwartz-Ziv & Tishby (2017), "Opening the black box of deep neural networks via
    information", arXiv:1703.00810.
    """
    _check(n_bins)
    v = prepare(t, "t")
    return plugin_entropy(_symbols(v, n_bins, per_dimension))


def binning_mi(a: ArrayLike, b: ArrayLike, *, n_bins: int = 30, per_dimension: bool = False,
               max_samples: int | None = None, seed: int = 0) -> MIResult:
    """Plug-in MI of the binned variables, ``H(A_b) + H(B_b) - H(A_b, B_b)``, in nats.

    Parameters
    ----------
    a, b : (n, d) arrays/tensors, or (n,) integer labels
        For ``I(X;T)`` pass the inputs and the representation: with distinct inputs the result
        equals ``H(binned T)``. For ``I(T;Y)`` pass the representation and the labels:
        ``H(T_b) - H(T_b | Y)``.
    n_bins : int
        Equal-width bins per dimension of every continuous argument.
    per_dimension : bool
        Bin each column over its own range instead of the array's range.
    max_samples, seed : optional seeded subsample (the plug-in entropy saturates at ``log n``,
        so compare values only at equal ``n``, reported in ``params``).

    Returns
    -------
    MIResult
        Nats; ``0 <= I <= min(H(A_b), H(B_b))``.

    References
    ----------
    Shwartz-Ziv & Tishby (2017), arXiv:1703.00810.
    Saxe et al. (2018), "On the information bottleneck theory of deep learning", ICLR.
    """
    _check(n_bins)
    va, vb = prepare_pair(a, b, max_samples=max_samples, seed=seed)
    params = {"n_bins": n_bins, "per_dimension": per_dimension, "n": va.n, "seed": seed,
              "max_samples": max_samples}
    if (zero := degenerate_result(va, vb, "binning", params)) is not None:
        return zero
    sa, sb = _symbols(va, n_bins, per_dimension), _symbols(vb, n_bins, per_dimension)
    h_a, h_b = plugin_entropy(sa), plugin_entropy(sb)
    h_ab = plugin_entropy(torch.stack([sa, sb], dim=1))
    params.update(entropy_a=h_a, entropy_b=h_b, joint_entropy=h_ab)
    return MIResult(max(h_a + h_b - h_ab, 0.0), "binning", "nats", params)
