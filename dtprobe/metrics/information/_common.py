"""Shared pieces of the mutual-information estimators: result type, input preparation, units.

Every estimator works in **nats** (natural logarithm); :meth:`MIResult.to` converts to bits.
An argument is *discrete* (class labels) when it is a 1-D array of integer or boolean dtype;
anything else is continuous and is reshaped to ``(n, d)`` (a 1-D float array is one column,
arrays with more than two dimensions, e.g. images, are flattened per sample).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch

from dtprobe.errors import MetricInputError
from dtprobe.metrics._validation import ArrayLike, as_numpy, check_features

UNITS = ("nats", "bits")


@dataclass(frozen=True)
class MIResult:
    """One mutual-information estimate with everything needed to reproduce it.

    Attributes
    ----------
    value : float
        The estimate, in ``unit``.
    estimator : str
        Estimator name: ``"renyi"``, ``"kde"``, ``"binning"``, ``"ksg"``, ``"mine"`` or
        ``"infonce"``.
    unit : str
        ``"nats"`` (natural log, the default everywhere) or ``"bits"``.
    params : dict
        The estimator's parameters, including resolved data-dependent ones (kernel width,
        number of samples actually used, seed).
    diagnostics : dict
        Values computed with the estimate; the trained estimators (MINE, InfoNCE) record
        ``converged`` (their plateau test, see :func:`dtprobe.metrics.information.neural.
        plateau`) and ``n_iter`` (optimiser steps) here.
    """

    value: float
    estimator: str
    unit: str = "nats"
    params: dict[str, Any] = field(default_factory=dict)
    diagnostics: dict[str, Any] = field(default_factory=dict)

    def to(self, unit: str) -> MIResult:
        """Return the same estimate expressed in ``unit`` (``"nats"`` or ``"bits"``)."""
        check_unit(unit)
        if unit == self.unit:
            return self
        factor = 1.0 / math.log(2.0) if unit == "bits" else math.log(2.0)
        return replace(self, value=self.value * factor, unit=unit)

    def __float__(self) -> float:
        return float(self.value)


def check_unit(unit: str) -> None:
    if unit not in UNITS:
        raise MetricInputError(f"unit must be one of {UNITS}, got {unit!r}")


class DegenerateMIWarning(RuntimeWarning):
    """An input carries no information (constant features or a single class); MI is exactly 0."""


@dataclass(frozen=True)
class Variable:
    """A validated estimator input.

    ``data`` is ``(n, d)`` float64 for a continuous variable and ``(n,)`` int64 class codes
    ``0..n_classes-1`` for a discrete one.
    """

    data: torch.Tensor
    discrete: bool
    name: str
    n_classes: int = 0

    @property
    def n(self) -> int:
        return int(self.data.shape[0])

    @property
    def dim(self) -> int:
        return 1 if self.discrete else int(self.data.shape[1])

    @property
    def constant(self) -> bool:
        """True when every sample is identical (so the variable carries no information)."""
        if self.discrete:
            return self.n_classes < 2
        return bool((self.data == self.data[:1]).all())

    def take(self, index: torch.Tensor | None) -> Variable:
        """Rows ``index`` (all rows when ``index`` is None); discrete codes are re-indexed."""
        if index is None:
            return self
        data = self.data[index.to(self.data.device)]
        if self.discrete:
            _, data = torch.unique(data, return_inverse=True)
            return Variable(data, True, self.name, int(data.max()) + 1 if data.numel() else 0)
        return Variable(data, False, self.name)

    def upcast(self) -> Variable:
        """The same variable with continuous data in float64 (see :func:`prepare`)."""
        if self.discrete or self.data.dtype == torch.float64:
            return self
        return Variable(self.data.to(torch.float64), False, self.name)

    def one_hot(self) -> torch.Tensor:
        """``(n, C)`` float64 one-hot encoding of a discrete variable."""
        return torch.nn.functional.one_hot(self.data, self.n_classes).to(torch.float64)


def _is_integer(x: ArrayLike) -> bool:
    if isinstance(x, torch.Tensor):
        return not (x.is_floating_point() or x.is_complex())
    arr = np.asarray(x)
    return bool(np.issubdtype(arr.dtype, np.integer) or arr.dtype == np.bool_)


def prepare(x: ArrayLike, name: str, *, device: torch.device | None = None,
            upcast: bool = True) -> Variable:
    """Validate one estimator argument and classify it as discrete labels or continuous features.

    With ``upcast=False`` continuous data keep their own float dtype (validated all the same),
    so that a subsample can be taken before the float64 copy: :meth:`Variable.upcast` then
    gives the same values as ``upcast=True`` followed by :meth:`Variable.take`.

    Raises
    ------
    MetricInputError
        Wrong shape, fewer than 2 samples, or NaN/Inf values (naming ``name``).
    """
    ndim = x.ndim if isinstance(x, torch.Tensor) else np.ndim(x)
    if ndim == 1 and _is_integer(x):
        t = x.detach() if isinstance(x, torch.Tensor) else torch.as_tensor(as_numpy(x))
        t = t.to(device=device if device is not None else t.device).long()
        if t.shape[0] < 2:
            raise MetricInputError(f"{name} has {t.shape[0]} samples; mutual information needs "
                                   "at least 2")
        _, codes = torch.unique(t, return_inverse=True)
        return Variable(codes, True, name, int(codes.max()) + 1)
    if ndim == 0:
        raise MetricInputError(f"{name} must be an (n_samples, n_features) array or a 1-D label "
                               "vector, got a scalar")
    if ndim > 2:
        x = x.reshape(x.shape[0], -1)
    data = check_features(x, name, device=device, dtype=torch.float64 if upcast else None)
    return Variable(data, False, name)


def prepare_pair(a: ArrayLike, b: ArrayLike, *, min_samples: int = 2,
                 max_samples: int | None = None, seed: int = 0) -> tuple[Variable, Variable]:
    """Validate both arguments, put them on a common device, check they have the same rows and
    take the seeded subsample of :func:`subsample_index` (the same rows of both).

    Every row is validated, but only the subsample is converted to float64: an estimator
    capped at 2,000 rows of 300,000 x 2,048 features never makes a 5 GB copy.
    """
    device = next((x.device for x in (a, b) if isinstance(x, torch.Tensor)), None)
    va = prepare(a, "a", device=device, upcast=False)
    vb = prepare(b, "b", device=device, upcast=False)
    if va.n != vb.n:
        raise MetricInputError(f"a has {va.n} samples but b has {vb.n}; mutual information needs "
                               "paired samples (same rows)")
    if va.n < min_samples:
        raise MetricInputError(f"a and b have {va.n} samples; this estimator needs at least "
                               f"{min_samples}")
    idx = subsample_index(va.n, max_samples, seed)
    return va.take(idx).upcast(), vb.take(idx).upcast()


def subsample_index(n: int, max_samples: int | None, seed: int) -> torch.Tensor | None:
    """Seeded sorted subset of ``max_samples`` row indices, or None when all rows are used."""
    if max_samples is None or n <= max_samples:
        return None
    if max_samples < 2:
        raise MetricInputError(f"max_samples must be at least 2, got {max_samples}")
    rng = np.random.default_rng(seed)
    return torch.as_tensor(np.sort(rng.choice(n, size=max_samples, replace=False)))


def degenerate_result(va: Variable, vb: Variable, estimator: str,
                      params: dict[str, Any]) -> MIResult | None:
    """Exact zero (with a :class:`DegenerateMIWarning`) when either variable is constant."""
    const = [v.name for v in (va, vb) if v.constant]
    if not const:
        return None
    warnings.warn(f"{' and '.join(const)} is constant (identical rows or a single class): it "
                  "carries no information, returning MI = 0", DegenerateMIWarning, stacklevel=3)
    return MIResult(0.0, estimator, "nats", {**params, "n": va.n, "degenerate": "constant input"})


def plugin_entropy(codes: torch.Tensor) -> float:
    """Plug-in Shannon entropy (nats) of integer codes ``(n,)`` or of code rows ``(n, k)``."""
    dim = 0 if codes.ndim > 1 else None
    _, counts = torch.unique(codes, dim=dim, return_counts=True)
    p = counts.to(torch.float64) / codes.shape[0]
    return float(-(p * p.log()).sum())


def standardize(x: torch.Tensor) -> torch.Tensor:
    """Z-score each column; constant columns are centred and left with unit scale."""
    peak = x.abs().max(dim=0).values
    x = x / torch.where(peak > 0, peak, torch.ones_like(peak))
    std = x.std(dim=0, unbiased=False)
    std = torch.where(std > 0, std, torch.ones_like(std))
    return (x - x.mean(dim=0)) / std
