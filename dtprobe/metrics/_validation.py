"""Shared input checks for the pure metric functions.

Metrics accept numpy arrays or torch tensors (CPU or CUDA) and compute in
float64 on the input's device, so the same code path serves notebooks and the
GPU analysis engine.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from dtprobe.errors import MetricInputError

ArrayLike = Any  # numpy.ndarray | torch.Tensor

#: Entries per block of the NaN/Inf check of :func:`check_features` (``isfinite`` holds about
#: 7 bytes of temporaries per entry: 7 MB per block).
_CHECK_ELEMENTS = 1 << 20


def as_numpy(x: ArrayLike) -> np.ndarray:
    """``np.asarray(x)``, copied when it has negative strides (``x[:, ::-1]``), which torch
    cannot view."""
    arr = np.asarray(x)
    return arr.copy() if any(stride < 0 for stride in arr.strides) else arr


def as_tensor(x: ArrayLike, *, dtype: torch.dtype = torch.float64, device=None) -> torch.Tensor:
    """Return ``x`` as a ``dtype`` tensor (on its own device unless ``device`` is given)."""
    if isinstance(x, torch.Tensor):
        t = x.detach()
    else:
        t = torch.as_tensor(as_numpy(x))
    return t.to(dtype=dtype, device=device if device is not None else t.device)


def check_features(x: ArrayLike, name: str = "features", *, min_samples: int = 2,
                   device=None, dtype: torch.dtype | None = torch.float64) -> torch.Tensor:
    """Validate a 2-D feature matrix and return it as ``dtype`` (float64 by default).

    ``dtype=None`` keeps a floating input's own precision (integers become float64), for
    callers that upcast chunk by chunk to bound memory. Raises :class:`MetricInputError` for
    complex values, a wrong shape, too few rows, no columns or non-finite values, naming the
    argument.
    """
    t = x.detach() if isinstance(x, torch.Tensor) else torch.as_tensor(as_numpy(x))
    if t.is_complex():
        raise MetricInputError(f"{name} is complex; pass real-valued features")
    if dtype is not None:
        t = t.to(dtype=dtype)
    elif not t.is_floating_point():
        t = t.to(torch.float64)
    if device is not None:
        t = t.to(device)
    if t.ndim == 1:
        t = t[:, None]
    if t.ndim != 2:
        raise MetricInputError(f"{name} must be a 2-D (n_samples, n_features) array, got shape "
                               f"{tuple(t.shape)}")
    if t.shape[0] < min_samples:
        raise MetricInputError(f"{name} has {t.shape[0]} samples; this metric needs at least "
                               f"{min_samples}")
    if t.shape[1] == 0:
        raise MetricInputError(f"{name} has no feature columns")
    # in row blocks: a mask of the whole matrix would be n x d bytes (600 MB at 300k x 2048)
    step = max(1, _CHECK_ELEMENTS // t.shape[1])
    finite = torch.cat([torch.isfinite(t[s:s + step]).all(dim=1)
                        for s in range(0, t.shape[0], step)])
    if not bool(finite.all()):
        bad = int((~finite).sum())
        raise MetricInputError(f"{name} contains NaN/Inf in {bad} of {t.shape[0]} rows "
                               "(diverged checkpoint?); drop or fix those rows first")
    return t


def check_labels(y: ArrayLike, n: int, name: str = "labels", *, min_classes: int = 2,
                 device=None) -> tuple[torch.Tensor, int]:
    """Validate integer class labels of length ``n``.

    Returns the labels re-indexed to ``0..C-1`` (as int64) and the number of
    classes ``C``; raises :class:`MetricInputError` when fewer than
    ``min_classes`` classes are present.
    """
    t = as_tensor(y, dtype=torch.float64, device=device).reshape(-1)
    if t.shape[0] != n:
        raise MetricInputError(f"{name} has {t.shape[0]} entries but features have {n} rows")
    if not torch.isfinite(t).all() or not torch.equal(t, t.round()):
        raise MetricInputError(f"{name} must be integer class labels")
    classes, inverse = torch.unique(t.long(), return_inverse=True)
    if classes.numel() < min_classes:
        raise MetricInputError(f"{name} has {classes.numel()} distinct class(es); this metric "
                               f"needs at least {min_classes}")
    return inverse, int(classes.numel())


def pow2_scale_exponent(*xs: torch.Tensor) -> int:
    """Exponent ``e`` with ``max |x| * 2**-e`` in [0.5, 1) over all of ``xs`` (0 if all zero)."""
    peak = max((float(x.abs().amax()) for x in xs if x.numel()), default=0.0)
    if not peak > 0 or not np.isfinite(peak):
        return 0
    return int(np.frexp(peak)[1])


def ldexp(x: torch.Tensor, e: int) -> torch.Tensor:
    """``x * 2**e``, exact for floating ``x`` unless the result leaves the normal range."""
    if e == 0:
        return x
    # two factors, so that 2**e itself never over- or underflows (|e| may exceed 1023); the
    # second in place, so the result is the only full-size tensor made
    half = e // 2
    return torch.mul(x, 2.0 ** half).mul_(2.0 ** (e - half))


def pow2_rescale(*xs: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Divide ``xs`` by one common power of two so that their largest magnitude is in [0.5, 1).

    The factor is exact, so any metric invariant to a common scale gives bit-for-bit the
    same value on the rescaled input, while sums of squares and products can no longer
    over- or underflow for features of magnitude 1e+-200.
    """
    e = pow2_scale_exponent(*xs)
    return tuple(ldexp(x, -e) for x in xs)


def rowwise_pow2_rescale(x: torch.Tensor) -> torch.Tensor:
    """Divide each row by a power of two so that its largest magnitude is in [0.5, 1).

    Exact (directions, hence cosines, are unchanged bit for bit) and keeps row norms of
    features near 1e+-200 representable. All-zero rows stay zero.
    """
    peak = x.abs().amax(dim=1, keepdim=True)
    _, e = torch.frexp(peak)
    e = e.to(x.dtype)
    half = torch.floor(e / 2)
    return x * torch.pow(2.0, -half) * torch.pow(2.0, half - e)
