"""Centred kernel alignment (CKA): similarity of two representations of the same inputs.

CKA (Kornblith et al. 2019) compares representations ``X`` (n x d1) and ``Y``
(n x d2) of the same ``n`` inputs through the Hilbert-Schmidt independence
criterion, ``CKA = HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L))`` for Gram matrices
``K``, ``L``.  dtprobe uses it to show how fast features drift between
checkpoints.

* **Linear CKA** needs no ``n x n`` Gram: with column-centred features,
  ``CKA = ||Y^T X||_F^2 / (||X^T X||_F ||Y^T Y||_F)``.
* **Debiased CKA** replaces HSIC by the unbiased estimator of Song et al.
  (2012), ``HSIC_1(K, L) = [tr(K~ L~) + (1^T K~ 1)(1^T L~ 1)/((n-1)(n-2))
  - (2/(n-2)) 1^T K~ L~ 1] / (n(n-3))`` with ``K~`` the Gram with its
  diagonal set to zero.  ``HSIC_1`` is unchanged by centring the features,
  and after centring ``K~ 1 = -diag(K)`` and ``1^T K~ 1 = -tr(K)``, so the
  linear version needs only ``||Y^T X||_F^2`` and the row norms: ``O(n d^2)``.
* **Minibatch CKA** (Nguyen, Raghu and Kornblith 2021) sums ``HSIC_1`` over
  minibatches for every pair of representations and normalises at the end
  (:class:`MinibatchCKA`).

Numerics (the failure modes seen in public code are guarded against):

* Inputs of any float dtype are converted to float64 chunk by chunk and
  centred in float64 *before* any product, so float32 ReLU features with a
  large offset give the float64 answer.
* The cross-products ``||X_i^T X_j||_F^2`` are accumulated either in feature
  space (``d_i x d_j`` blocks) or from ``n x n`` Gram blocks, whichever needs
  fewer operations, in sample chunks bounded by ``_MEMORY_BUDGET`` bytes.
* A representation whose self-HSIC is not positive (a constant layer, or a
  debiased estimate ``<= 0`` from few samples) gets CKA ``NaN`` and a
  :class:`RuntimeWarning`; no square root of a negative number is ever taken.
  Debiased CKA of two valid representations may fall slightly outside
  ``[-1, 1]`` because ``HSIC_1`` is an unbiased, not a positive, estimator.

References
----------
Kornblith, S., Norouzi, M., Lee, H., Hinton, G. (2019). Similarity of neural
network representations revisited. ICML 2019.

Song, L., Smola, A., Gretton, A., Bedo, J., Borgwardt, K. (2012). Feature
selection via dependence maximization. JMLR 13, 1393-1434.

Chance level: CKA of *independent* representations is not 0 at finite ``n``;
biased linear CKA of unrelated Gaussian features grows like ``sqrt(d1 d2) / n``
(and with width alone), so a raw score says little without a baseline.
:func:`cka_permutation_null` shuffles the rows of one side to give the value
expected by chance at this ``n`` and ``d`` and a permutation p-value.  Where ``n``
is small relative to the widths (say ``n < 10 d``), prefer ``debiased=True``:
the unbiased HSIC estimator (Song et al. 2012) removes the finite-``n`` bias, so
its chance level is near 0 and scores of different widths stay comparable.

Nguyen, T., Raghu, M., Kornblith, S. (2021). Do wide and deep networks learn
the same things? Uncovering how neural network representations vary with
width and depth. ICLR 2021.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from dtprobe.errors import ConfigError, MetricInputError
from dtprobe.metrics._validation import (
    ArrayLike,
    check_features,
    ldexp,
    pow2_rescale,
    pow2_scale_exponent,
)
from dtprobe.metrics.registry import register_similarity

__all__ = ["linear_cka", "rbf_cka", "cka_matrix", "MinibatchCKA", "CKANull",
           "cka_permutation_null", "DEFAULT_PERMUTATIONS"]

#: Bytes of float64 work space the chunked computations aim to stay under. 64 MiB is as fast
#: as larger budgets (E = 20, n = 10k, d = 512: 27 s vs 31 s at 256 MiB) and keeps the peak
#: memory of an analysis flat in the number of checkpoints (benchmarks/memory.py).
_MEMORY_BUDGET = 64 * 2**20
#: A layer whose centred energy is below this fraction of its raw energy is constant.
_CONSTANT_RATIO = 1e-24
_METHODS = ("auto", "features", "gram")
#: Chunk bytes of the permutation null's passes (one per permutation): smaller chunks than
#: ``_MEMORY_BUDGET`` stay in the allocator's heap and the caches (n = 40k, d = 512, 20
#: permutations: 8.7 s against 13.7 s at 64 MiB, and 10.0 s for the unchunked float64 copies).
_PERMUTATION_BUDGET = 16 * 2**20


# --------------------------------------------------------------------------- input handling


def _raw_layer(x: ArrayLike, name: str, min_samples: int) -> torch.Tensor:
    """Validate one representation without upcasting all of it (chunks are upcast later)."""
    return check_features(x, name, min_samples=min_samples, dtype=None)


def _check_option(method: str, chunk: int | None) -> None:
    if method not in _METHODS:
        raise ConfigError(f"method={method!r} is not one of {', '.join(_METHODS)}")
    if chunk is not None and (not isinstance(chunk, int | np.integer) or chunk < 1):
        raise ConfigError(f"chunk={chunk!r} must be a positive number of samples or None")


class _Centred:
    """One representation, centred in float64; served whole (small) or in sample chunks."""

    def __init__(self, raw: torch.Tensor, device: torch.device, cache: bool, chunk: int) -> None:
        self.raw, self.device = raw, device
        self.n, self.d = raw.shape
        self.constant = False
        self._full: torch.Tensor | None = None
        # CKA is scale-free: divide by an exact power of two near the largest magnitude so that
        # sums of squares of features near 1e+-200 neither overflow nor underflow
        self.exponent = pow2_scale_exponent(*(raw[c0:c0 + chunk]
                                              for c0 in range(0, self.n, chunk)))
        if cache:
            full = ldexp(raw.to(device=device, dtype=torch.float64), -self.exponent)
            self.mean = full.mean(dim=0)
            raw_energy = float((full**2).sum())
            self._full = full - self.mean
            self.rowsq = (self._full**2).sum(dim=1)
        else:
            total = torch.zeros(self.d, dtype=torch.float64, device=device)
            raw_energy = 0.0
            for c0 in range(0, self.n, chunk):
                block = self._scaled(c0, c0 + chunk)
                total += block.sum(dim=0)
                raw_energy += float((block**2).sum())
            self.mean = total / self.n
            self.rowsq = torch.cat([(self.block(c0, c0 + chunk) ** 2).sum(dim=1)
                                    for c0 in range(0, self.n, chunk)])
        if float(self.rowsq.sum()) <= _CONSTANT_RATIO * raw_energy:
            # Zero variance: treat the centred features as exactly zero, not round-off noise.
            self.constant = True
            self.rowsq = torch.zeros_like(self.rowsq)
            if self._full is not None:
                self._full = torch.zeros_like(self._full)

    def block(self, c0: int, c1: int) -> torch.Tensor:
        if self.constant:
            return torch.zeros(min(c1, self.n) - c0, self.d, dtype=torch.float64,
                               device=self.device)
        if self._full is not None:
            return self._full[c0:c1]
        return self._scaled(c0, c1) - self.mean

    def rows(self, index: torch.Tensor) -> torch.Tensor:
        """Centred float64 rows ``index`` (any order), e.g. one chunk of a permutation."""
        if self.constant:
            return torch.zeros(index.numel(), self.d, dtype=torch.float64, device=self.device)
        if self._full is not None:
            return self._full[index]
        raw = self.raw[index.to(self.raw.device)].to(device=self.device, dtype=torch.float64)
        return ldexp(raw, -self.exponent) - self.mean

    def _scaled(self, c0: int, c1: int) -> torch.Tensor:
        return ldexp(self.raw[c0:c1].to(device=self.device, dtype=torch.float64), -self.exponent)


# --------------------------------------------------------------------------- linear engine


def _cross_products(layers: list[torch.Tensor], method: str, chunk: int | None,
                    ) -> tuple[torch.Tensor, torch.Tensor, list[bool], list[int]]:
    """Centred cross-product statistics of E representations of the same n samples.

    Returns ``T`` (E x E, ``T_ij = ||X_i^T X_j||_F^2 = tr(K_i K_j)`` of centred
    features), ``a`` (E x n, squared row norms of the centred features, i.e.
    ``diag(K_i)``), a per-layer "constant" flag, all float64 on the device
    of the first layer, and per layer the exponent ``e_i`` of the exact scaling:
    the statistics are those of ``X_i * 2**-e_i``.
    """
    n = layers[0].shape[0]
    device = layers[0].device
    n_layers = len(layers)
    dims = [t.shape[1] for t in layers]
    sum_d = sum(dims)
    cost_gram = n * (sum_d + n_layers * n_layers)
    cost_feat = sum_d * sum_d + sum(d * d for d in dims)
    use_gram = method == "gram" or (method == "auto" and cost_gram < cost_feat)

    cache = 8 * n * sum_d <= _MEMORY_BUDGET
    if chunk is None:
        if use_gram:
            chunk = min(math.isqrt(max(_MEMORY_BUDGET // (8 * n_layers), 1)),
                        max(_MEMORY_BUDGET // (16 * sum_d), 1))
        else:
            chunk = max(_MEMORY_BUDGET // (8 * sum_d), 1)
        chunk = max(min(chunk, n), 1)
    cent = [_Centred(t, device, cache, chunk) for t in layers]
    starts = list(range(0, n, chunk))
    T = torch.zeros(n_layers, n_layers, dtype=torch.float64, device=device)

    if use_gram:
        # T_ij = sum over sample blocks (p, q) of <K_i[p, q], K_j[p, q]>; K symmetric, so q >= p
        # with off-diagonal blocks counted twice.
        for pi, p0 in enumerate(starts):
            rows = [c.block(p0, p0 + chunk) for c in cent]
            for q0 in starts[pi:]:
                cols = q0 + chunk
                v = torch.stack([(r @ c.block(q0, cols).T).reshape(-1) for r, c in zip(rows, cent,
                                                                                       strict=True)])
                T += (1.0 if q0 == p0 else 2.0) * (v @ v.T)
    else:
        # Feature space: accumulate X_i^T X_j over sample chunks, pairs packed to fit the budget.
        pairs = [(i, j) for i in range(n_layers) for j in range(i, n_layers)]
        groups: list[list[tuple[int, int]]] = []
        used = _MEMORY_BUDGET + 1
        for i, j in pairs:
            size = 8 * dims[i] * dims[j]
            if used + size > _MEMORY_BUDGET and (not groups or groups[-1]):
                groups.append([])
                used = 0
            groups[-1].append((i, j))
            used += size
        for group in groups:
            acc = [torch.zeros(dims[i], dims[j], dtype=torch.float64, device=device)
                   for i, j in group]
            needed = sorted({k for pair in group for k in pair})
            for c0 in starts:
                blocks = {k: cent[k].block(c0, c0 + chunk) for k in needed}
                for a_ij, (i, j) in zip(acc, group, strict=True):
                    a_ij += blocks[i].T @ blocks[j]
            for a_ij, (i, j) in zip(acc, group, strict=True):
                T[i, j] = T[j, i] = (a_ij**2).sum()
    a = torch.stack([c.rowsq for c in cent])
    return T, a, [c.constant for c in cent], [c.exponent for c in cent]


def _hsic_from_stats(T: torch.Tensor, a: torch.Tensor, debiased: bool) -> torch.Tensor:
    """HSIC matrix (up to a common positive factor when biased) from ``_cross_products``."""
    if not debiased:
        return T  # biased HSIC = T / (n-1)^2; the factor cancels in CKA
    n = a.shape[1]
    A = a @ a.T  # (K~1).(L~1) after centring, and sum_i K_ii L_ii
    t = a.sum(dim=1)  # -(1^T K~ 1) after centring
    return (T - A + torch.outer(t, t) / ((n - 1) * (n - 2)) - 2.0 / (n - 2) * A) / (n * (n - 3))


def _normalise(hsic: torch.Tensor, names: Sequence[str], constant: Sequence[bool],
               debiased: bool, stacklevel: int) -> np.ndarray:
    """CKA_ij = HSIC_ij / sqrt(HSIC_ii HSIC_jj), NaN (with a warning) where a self-HSIC is <= 0."""
    h = hsic.detach().to("cpu", torch.float64).numpy()
    diag = np.diag(h).copy()
    bad = [k for k in range(len(diag)) if constant[k] or not diag[k] > 0]
    if bad:
        why = ", ".join(f"{names[k]} ({'constant' if constant[k] else 'HSIC_1 <= 0'})"
                        for k in bad)
        kind = "debiased " if debiased else ""
        warnings.warn(f"{kind}CKA is undefined for {why}; returning NaN for its pairs"
                      + (" (too few samples for the unbiased estimator?)" if debiased and
                         any(not constant[k] for k in bad) else ""),
                      RuntimeWarning, stacklevel=stacklevel)
    ok = np.ones(len(diag), dtype=bool)
    ok[bad] = False
    root = np.sqrt(np.where(ok, diag, 1.0))
    out = h / np.outer(root, root)
    out = (out + out.T) / 2.0
    out[~ok, :] = np.nan
    out[:, ~ok] = np.nan
    idx = np.flatnonzero(ok)
    out[idx, idx] = 1.0
    return out


def _linear_cka_matrix(layers: Sequence[ArrayLike], names: Sequence[str], debiased: bool,
                       method: str, chunk: int | None, stacklevel: int) -> np.ndarray:
    _check_option(method, chunk)
    min_samples = 4 if debiased else 2
    raw = [_raw_layer(x, nm, min_samples) for x, nm in zip(layers, names, strict=True)]
    n = raw[0].shape[0]
    for t, nm in zip(raw, names, strict=True):
        if t.shape[0] != n:
            raise MetricInputError(f"{nm} has {t.shape[0]} samples but {names[0]} has {n}; CKA "
                                   "compares representations of the same inputs")
    T, a, constant, _ = _cross_products(raw, method, chunk)  # the scaling cancels in CKA
    return _normalise(_hsic_from_stats(T, a, debiased), names, constant, debiased,
                      stacklevel + 1)


# --------------------------------------------------------------------------- public functions


def linear_cka(x: ArrayLike, y: ArrayLike, debiased: bool = False, *, method: str = "auto",
               chunk: int | None = None) -> float:
    """Linear CKA between two representations of the same inputs (Kornblith et al. 2019).

    Parameters
    ----------
    x : array_like or torch.Tensor, shape (n_samples, d1)
        First representation (numpy or torch, CPU or CUDA, any float dtype).
    y : array_like or torch.Tensor, shape (n_samples, d2)
        Second representation of the same samples, in the same order.
    debiased : bool, default False
        Use the unbiased HSIC estimator of Song et al. (2012) (needs ``n >= 4``).
    method : {"auto", "features", "gram"}, default "auto"
        ``"features"`` evaluates ``||Y^T X||_F^2`` from ``d1 x d2``
        cross-products (no ``n x n`` matrix); ``"gram"`` from ``n x n`` Gram
        blocks, cheaper when ``n`` is smaller than the feature dimensions;
        ``"auto"`` picks the one with fewer operations.  Same value either way.
    chunk : int, optional
        Samples per chunk (bounds memory); chosen automatically when omitted.

    Returns
    -------
    float
        ``||Y^T X||_F^2 / (||X^T X||_F ||Y^T Y||_F)`` of the column-centred
        features (float64), or its debiased counterpart.  NaN with a
        :class:`RuntimeWarning` when a representation is constant or (debiased)
        its self-HSIC estimate is ``<= 0``.

    Raises
    ------
    MetricInputError
        Wrong shapes, NaN/Inf, different numbers of samples or too few samples.

    References
    ----------
    Kornblith, S., Norouzi, M., Lee, H., Hinton, G. (2019). Similarity of
    neural network representations revisited. ICML 2019, Eq. 5 and Sec. 4.

    Song, L., Smola, A., Gretton, A., Bedo, J., Borgwardt, K. (2012). Feature
    selection via dependence maximization. JMLR 13, Theorem 1.

    Examples
    --------
    >>> import numpy as np
    >>> np.random.seed(1337); X = np.random.randn(100, 10); Y = np.random.randn(100, 10) + X
    >>> round(linear_cka(X, Y), 5), round(linear_cka(X, Y, debiased=True), 5)
    (0.55761, 0.51346)
    """
    return float(_linear_cka_matrix([x, y], ["x", "y"], debiased, method, chunk, 3)[0, 1])


def cka_matrix(features: Sequence[ArrayLike], debiased: bool = False,
               chunk: int | None = None, *, method: str = "auto") -> np.ndarray:
    """Linear CKA between every pair of a list of representations, in one pass.

    Typical use: the penultimate features of every checkpoint on one fixed
    evaluation set, giving the epoch x epoch similarity map.

    Parameters
    ----------
    features : sequence of array_like or torch.Tensor, each (n_samples, d_e)
        ``E`` representations of the same samples (dimensions may differ).
        Computation runs on the device of the first one.
    debiased : bool, default False
        Use the unbiased HSIC estimator of Song et al. (2012).
    chunk : int, optional
        Samples per chunk; each representation is converted to float64 one
        chunk at a time, so memory stays near ``_MEMORY_BUDGET`` (64 MiB)
        besides the inputs.  Chosen automatically when omitted.
    method : {"auto", "features", "gram"}, default "auto"
        How ``||X_i^T X_j||_F^2`` is accumulated: ``d_i x d_j`` feature
        cross-products (cost ``~ n (sum d)^2 / 2``) or ``n x n`` Gram blocks
        shared by all pairs (cost ``~ n^2 (sum d + E^2) / 2``); ``"auto"``
        takes the cheaper.

    Returns
    -------
    numpy.ndarray, shape (E, E), float64
        Symmetric matrix with ones on the diagonal; rows and columns of a
        constant representation (or, debiased, one with self-HSIC ``<= 0``)
        are NaN, with a :class:`RuntimeWarning`.

    Raises
    ------
    MetricInputError
        An empty list, wrong shapes, NaN/Inf or different numbers of samples.

    References
    ----------
    Kornblith, S., Norouzi, M., Lee, H., Hinton, G. (2019). Similarity of
    neural network representations revisited. ICML 2019.
    """
    layers = list(features)
    if not layers:
        raise MetricInputError("cka_matrix needs at least one representation, got an empty list")
    names = [f"features[{k}]" for k in range(len(layers))]
    return _linear_cka_matrix(layers, names, debiased, method, chunk, 3)


def _rbf_gram(x: torch.Tensor, sigma_frac: float) -> torch.Tensor | None:
    """Gaussian Gram with bandwidth ``sigma_frac * sqrt(median squared distance)``, or None."""
    xc = x - x.mean(dim=0)
    sq = (xc**2).sum(dim=1)
    d2 = (sq[:, None] + sq[None, :] - 2.0 * (xc @ xc.T)).clamp_min_(0.0)
    d2.fill_diagonal_(0.0)
    flat = d2.reshape(-1)
    m = flat.numel()
    if m % 2:
        median = flat.kthvalue((m + 1) // 2).values
    else:
        median = (flat.kthvalue(m // 2).values + flat.kthvalue(m // 2 + 1).values) / 2.0
    if float(median) <= 0.0:
        return None
    return torch.exp(-d2 / (2.0 * sigma_frac**2 * median))


def _gram_hsic(k: torch.Tensor, l_: torch.Tensor, debiased: bool) -> torch.Tensor:
    """HSIC of two n x n Grams: <HKH, HLH> (biased, up to 1/(n-1)^2) or Song's HSIC_1."""
    n = k.shape[0]
    if not debiased:
        kc = k - k.mean(dim=0, keepdim=True) - k.mean(dim=1, keepdim=True) + k.mean()
        return (kc * l_).sum()
    kt = k.clone().fill_diagonal_(0.0)
    lt = l_.clone().fill_diagonal_(0.0)
    rk, rl = kt.sum(dim=1), lt.sum(dim=1)
    return ((kt * lt).sum() + rk.sum() * rl.sum() / ((n - 1) * (n - 2))
            - 2.0 / (n - 2) * (rk @ rl)) / (n * (n - 3))


def rbf_cka(x: ArrayLike, y: ArrayLike, sigma_frac: float = 0.5, debiased: bool = False) -> float:
    """CKA with Gaussian (RBF) kernels (Kornblith et al. 2019).

    Parameters
    ----------
    x : array_like or torch.Tensor, shape (n_samples, d1)
        First representation (numpy or torch, CPU or CUDA).
    y : array_like or torch.Tensor, shape (n_samples, d2)
        Second representation of the same samples.
    sigma_frac : float, default 0.5
        Bandwidth as a fraction of the median pairwise distance, separately for
        ``x`` and ``y``: ``k(a, b) = exp(-||a - b||^2 / (2 sigma^2))`` with
        ``sigma^2 = sigma_frac^2 * median(D^2)``, where the median runs over
        all ``n^2`` entries of the squared-distance matrix ``D^2``, zero
        diagonal included, as in the authors' Colab notebook.
    debiased : bool, default False
        Use the unbiased HSIC estimator of Song et al. (2012) (needs ``n >= 4``).

    Returns
    -------
    float
        RBF CKA in float64.  Builds ``n x n`` Grams (memory ``O(n^2)``).  NaN
        with a :class:`RuntimeWarning` when a median distance is zero (mostly
        duplicate rows) or a self-HSIC is ``<= 0``.

    Raises
    ------
    MetricInputError
        Wrong shapes, NaN/Inf, different numbers of samples or too few samples.
    ConfigError
        ``sigma_frac`` not positive.

    References
    ----------
    Kornblith, S., Norouzi, M., Lee, H., Hinton, G. (2019). Similarity of
    neural network representations revisited. ICML 2019, Sec. 4 (RBF CKA).

    Examples
    --------
    >>> import numpy as np
    >>> np.random.seed(1337); X = np.random.randn(100, 10); Y = np.random.randn(100, 10) + X
    >>> round(rbf_cka(X, Y, 0.5), 5)
    0.65483
    """
    if not sigma_frac > 0 or not math.isfinite(sigma_frac):
        raise ConfigError(f"sigma_frac={sigma_frac!r} must be a positive number")
    min_samples = 4 if debiased else 2
    xt = check_features(x, "x", min_samples=min_samples)
    yt = check_features(y, "y", min_samples=min_samples, device=xt.device)
    # exact power-of-two rescaling: the median-distance bandwidth makes RBF CKA scale-free,
    # and this keeps the squared distances of features near 1e+-200 finite and nonzero
    (xt,), (yt,) = pow2_rescale(xt), pow2_rescale(yt)
    if xt.shape[0] != yt.shape[0]:
        raise MetricInputError(f"y has {yt.shape[0]} samples but x has {xt.shape[0]}; CKA "
                               "compares representations of the same inputs")
    grams = [_rbf_gram(xt, sigma_frac), _rbf_gram(yt, sigma_frac)]
    if any(g is None for g in grams):
        which = " and ".join(nm for nm, g in zip("xy", grams, strict=True) if g is None)
        warnings.warn(f"rbf_cka: median pairwise distance of {which} is 0 (mostly duplicate "
                      "rows); returning NaN", RuntimeWarning, stacklevel=2)
        return float("nan")
    k, l_ = grams
    hsic = torch.stack([torch.stack([_gram_hsic(a, b, debiased) for b in (k, l_)])
                        for a in (k, l_)])
    return float(_normalise(hsic, ["x", "y"], [False, False], debiased, 3)[0, 1])


# --------------------------------------------------------------------------- minibatch CKA


class MinibatchCKA:
    """Minibatch linear CKA accumulator (Nguyen, Raghu and Kornblith 2021).

    Each :meth:`update` adds, in float64, the unbiased ``HSIC_1`` of Song et
    al. (2012) of the batch for every pair of representations, including each
    with itself; :meth:`result` divides the summed cross terms by the square
    root of the summed self terms,
    ``CKA_ij = S(X_i, Y_j) / sqrt(S(X_i, X_i) S(Y_j, Y_j))`` with
    ``S(A, B) = sum_b HSIC_1(A^b, B^b)`` over the batches ``b``.
    Every batch counts (not only the last), and batch sizes may differ
    (each at least 4).

    Two modes, fixed by the first update:

    * ``update(x_batch, y_batch)``: ``x_batch`` and ``y_batch`` are arrays or
      sequences of arrays (layers); the result is a float for two arrays or
      a ``(len(xs), len(ys))`` matrix.
    * ``update(x_batch)``: ``x_batch`` is a sequence of arrays; the result is
      their symmetric ``(E, E)`` CKA matrix.

    Attributes
    ----------
    n_batches_ : int
        Number of batches accumulated so far.
    n_samples_ : int
        Number of samples accumulated so far.
    hsic_ : numpy.ndarray or None
        Summed ``HSIC_1`` over batches for all representations (x layers then
        y layers), float64.

    References
    ----------
    Nguyen, T., Raghu, M., Kornblith, S. (2021). Do wide and deep networks
    learn the same things? ICLR 2021, Sec. 3.1 (minibatch CKA).

    Song, L., Smola, A., Gretton, A., Bedo, J., Borgwardt, K. (2012). Feature
    selection via dependence maximization. JMLR 13.

    Examples
    --------
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> x = rng.normal(size=(512, 8)); y = x @ rng.normal(size=(8, 4))
    >>> acc = MinibatchCKA()
    >>> for b in range(0, 512, 128):
    ...     _ = acc.update(x[b:b + 128], y[b:b + 128])
    >>> 0.0 < acc.result() <= 1.0
    True
    """

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> MinibatchCKA:
        """Forget all accumulated batches."""
        self.n_batches_ = 0
        self.n_samples_ = 0
        self._sum: torch.Tensor | None = None
        self._shape: tuple[int | None, int | None, tuple[int, ...]] | None = None
        self._constant: list[bool] = []
        self._exponents: list[int] | None = None
        return self

    @staticmethod
    def _as_list(batch: ArrayLike | Sequence[ArrayLike]) -> tuple[list[ArrayLike], bool]:
        if isinstance(batch, torch.Tensor | np.ndarray):
            return [batch], True
        if isinstance(batch, Sequence) and batch and not isinstance(batch, str):
            return list(batch), False
        raise MetricInputError("MinibatchCKA.update expects an array/tensor or a non-empty list "
                               "of them (one per layer)")

    def update(self, x_batch: ArrayLike | Sequence[ArrayLike],
               y_batch: ArrayLike | Sequence[ArrayLike] | None = None) -> MinibatchCKA:
        """Add one minibatch (the same samples, in the same order, for every representation).

        Parameters
        ----------
        x_batch : array, tensor or sequence of them, each (batch, d)
            Representations ``X_i`` of this batch.
        y_batch : array, tensor or sequence of them, optional
            Representations ``Y_j`` of this batch; omit to compare the
            ``x_batch`` representations with one another.

        Returns
        -------
        MinibatchCKA
            ``self``.

        Raises
        ------
        MetricInputError
            A batch with fewer than 4 samples, NaN/Inf, mismatched sample
            counts, or a change of layer count, dimension or mode.
        """
        xs, x_single = self._as_list(x_batch)
        if y_batch is None:
            ys, y_single = [], False
        else:
            ys, y_single = self._as_list(y_batch)
        names = ([f"x_batch[{k}]" for k in range(len(xs))] if not x_single else ["x_batch"])
        names += ([f"y_batch[{k}]" for k in range(len(ys))] if not y_single else ["y_batch"])
        raw = [_raw_layer(t, nm, 4) for t, nm in zip(xs + ys, names, strict=True)]
        n = raw[0].shape[0]
        for t, nm in zip(raw, names, strict=True):
            if t.shape[0] != n:
                raise MetricInputError(f"{nm} has {t.shape[0]} rows but {names[0]} has {n}; every "
                                       "representation of a batch must hold the same samples")
        shape = (len(xs), len(ys) if y_batch is not None else None,
                 tuple(t.shape[1] for t in raw))
        if self._shape is None:
            self._shape = shape
            self._single = x_single and y_single
            self._constant = [True] * len(raw)
        elif shape != self._shape:
            raise MetricInputError(f"MinibatchCKA.update got layers/dimensions {shape} after "
                                   f"{self._shape}; call reset() to start a new comparison")
        T, a, constant, exps = _cross_products(raw, "auto", None)
        batch_hsic = _hsic_from_stats(T, a, debiased=True)
        # HSIC_ij is bilinear in K_i ~ 2**(-2 e_i): bring every batch to the first batch's
        # scale (exact powers of two) before summing
        if self._exponents is None:
            self._exponents = exps
        shift = torch.tensor([2 * (e - e0) for e, e0 in zip(exps, self._exponents, strict=True)],
                             dtype=torch.float64, device=batch_hsic.device)
        batch_hsic = batch_hsic * torch.pow(2.0, shift[:, None] + shift[None, :])
        if self._sum is None:
            self._sum = batch_hsic
        else:
            self._sum = self._sum + batch_hsic.to(self._sum.device)
        self._constant = [c and k for c, k in zip(self._constant, constant, strict=True)]
        self.n_batches_ += 1
        self.n_samples_ += n
        return self

    @property
    def hsic_(self) -> np.ndarray | None:
        """Summed ``HSIC_1`` over batches, x layers then y layers (float64), or None."""
        if self._sum is None:
            return None
        # undo the exact power-of-two scaling the sums are kept at (it cancels in CKA)
        e = np.asarray(self._exponents, dtype=np.float64)
        return self._sum.detach().cpu().numpy() * np.exp2(2 * e[:, None] + 2 * e[None, :])

    def result(self) -> float | np.ndarray:
        """Minibatch CKA from the accumulated ``HSIC_1`` sums.

        Returns
        -------
        float or numpy.ndarray
            A float for ``update(x, y)`` with two arrays, else the
            ``(len(xs), len(ys))`` cross matrix, or the symmetric ``(E, E)``
            matrix when no ``y_batch`` was given.  Entries of a representation
            that was constant in every batch, or whose summed self-HSIC is
            ``<= 0``, are NaN with a :class:`RuntimeWarning`.

        Raises
        ------
        MetricInputError
            Called before any :meth:`update`.
        """
        if self._sum is None or self._shape is None:
            raise MetricInputError("MinibatchCKA.result() called before any update(); add "
                                   "batches first")
        n_x, n_y, _ = self._shape
        names = [f"x[{k}]" for k in range(n_x)] + [f"y[{k}]" for k in range(n_y or 0)]
        full = _normalise(self._sum, names, self._constant, True, 3)
        if n_y is None:
            return full
        cross = full[:n_x, n_x:]
        return float(cross[0, 0]) if self._single else cross

    def score(self) -> float | np.ndarray:
        """Alias of :meth:`result` (scikit-learn naming)."""
        return self.result()


# --------------------------------------------------------------------------- permutation null

#: Permutations of the analysis' null (p-values resolve to 1/21 ~ 0.048).
DEFAULT_PERMUTATIONS = 20


@dataclass(frozen=True)
class CKANull:
    """Linear CKA with its permutation null (rows of ``y`` shuffled).

    Attributes
    ----------
    score : CKA of the pair as given.
    null_mean, null_std : mean and standard deviation (``ddof = 1``) of the CKA of the
        permuted pairs: the value expected by chance at this ``n`` and ``d``.
    null_quantile : the ``quantile`` (default 0.95) of the permuted values.
    p_value : ``(1 + #{null >= score}) / (1 + n_permutations)`` (never 0).
    n_permutations, debiased, seed : how it was computed.
    expected : the exact mean of the null over *all* permutations (biased CKA only, NaN for
        debiased): ``E_pi tr(K P L P^T) = tr(K) tr(L) / (n - 1)`` for centred Grams, since
        ``E L_{pi(i) pi(i)} = tr(L) / n`` and, off the diagonal, ``E L_{pi(i) pi(j)} =
        (1^T L 1 - tr L) / (n (n - 1)) = -tr(L) / (n (n - 1))``; so the chance level is
        ``||X||_F^2 ||Y||_F^2 / ((n - 1) ||X^T X||_F ||Y^T Y||_F)`` with no sampling error.
    """

    score: float
    null_mean: float
    null_std: float
    null_quantile: float
    p_value: float
    n_permutations: int
    debiased: bool
    seed: int
    expected: float = float("nan")

    def as_params(self) -> dict[str, float | int | bool]:
        """The null's fields for a results-table ``params`` object."""
        return {"null_mean": self.null_mean, "null_std": self.null_std,
                "null_q95": self.null_quantile, "p_value": self.p_value,
                "n_permutations": self.n_permutations, "null": "permute_rows_of_y",
                "null_seed": self.seed, "null_expected": self.expected}


def cka_permutation_null(x: ArrayLike, y: ArrayLike, *, n_permutations: int = DEFAULT_PERMUTATIONS,
                         debiased: bool = False, seed: int = 0,
                         quantile: float = 0.95) -> CKANull:
    """Linear CKA and its permutation null distribution (rows of ``y`` shuffled).

    Shuffling the rows of one side breaks the pairing of samples but keeps each
    representation's own structure, so the permuted CKA values are what the score would be
    for unrelated representations of the same size.  Only the cross term changes under a
    permutation; the self terms are computed once.  Unless ``n^2 < d1 d2`` (then from the
    ``n x n`` Grams), every term is accumulated from float64 chunks of ``_PERMUTATION_BUDGET``
    bytes (the permuted side's rows gathered chunk by chunk): memory is ``O(d1 d2)`` besides
    the inputs, time ``O(n_permutations n d1 d2)``, on the device of ``x``.

    Parameters
    ----------
    x : array_like or torch.Tensor, shape (n_samples, d1)
        First representation (numpy or torch, CPU or CUDA, any float dtype; float64 inside).
    y : array_like or torch.Tensor, shape (n_samples, d2)
        Second representation of the same samples.
    n_permutations : int, default 20
        Number of shuffles (the smallest attainable p-value is ``1 / (1 + n_permutations)``).
    debiased : bool, default False
        Debiased CKA (needs ``n >= 4``); its null is centred near 0.
    seed : int, default 0
        Seed of the permutations (reproducible).
    quantile : float, default 0.95
        Quantile of the null reported as ``null_quantile``.

    Returns
    -------
    CKANull
        Score, null mean/std/quantile and p-value.  NaN fields (with the usual
        :class:`RuntimeWarning`) when a representation is constant.

    Raises
    ------
    MetricInputError
        As :func:`linear_cka`.
    ConfigError
        ``n_permutations < 1`` or ``quantile`` outside ``[0, 1]``.

    References
    ----------
    Kornblith, S., Norouzi, M., Lee, H., Hinton, G. (2019). Similarity of neural network
    representations revisited. ICML 2019 (CKA).

    Good, P. (2005). Permutation, Parametric, and Bootstrap Tests of Hypotheses, 3rd ed.,
    Springer (the ``(1 + b) / (1 + N)`` p-value).
    """
    if isinstance(n_permutations, bool) or not isinstance(n_permutations, int) \
            or n_permutations < 1:
        raise ConfigError(f"n_permutations={n_permutations!r} must be a positive integer")
    if not 0.0 <= quantile <= 1.0:
        raise ConfigError(f"quantile={quantile!r} must lie in [0, 1]")
    min_samples = 4 if debiased else 2
    # kept in their own dtype: float64 chunks are made on the fly, so at n = 300k, d = 2048 no
    # float64 copy of either side (5 GB each) is held, let alone a permuted one
    a = _raw_layer(x, "x", min_samples)
    b = _raw_layer(y, "y", min_samples).to(device=a.device)
    if a.shape[0] != b.shape[0]:
        raise MetricInputError(f"y has {b.shape[0]} samples but x has {a.shape[0]}; CKA "
                               "compares representations of the same inputs")
    n, d1, d2 = a.shape[0], a.shape[1], b.shape[1]
    use_gram = n * n < d1 * d2  # then the n x n Grams are smaller than one d1 x d2 product
    chunk = n if use_gram else max(1, min(n, _PERMUTATION_BUDGET // (8 * (d1 + d2))))
    cx, cy = _Centred(a, a.device, use_gram, chunk), _Centred(b, a.device, use_gram, chunk)
    starts = range(0, n, chunk)
    if use_gram:
        xc, yc = cx.block(0, n), cy.block(0, n)
        k_, l_ = xc @ xc.T, yc @ yc.T
        t_xx, t_yy = (k_**2).sum(), (l_**2).sum()
    else:  # d x d cross-products accumulated over sample chunks
        gx = torch.zeros(d1, d1, dtype=torch.float64, device=a.device)
        gy = torch.zeros(d2, d2, dtype=torch.float64, device=a.device)
        for c0 in starts:
            xb, yb = cx.block(c0, c0 + chunk), cy.block(c0, c0 + chunk)
            gx += xb.T @ xb
            gy += yb.T @ yb
        t_xx, t_yy = (gx**2).sum(), (gy**2).sum()
        del gx, gy

    def cka_at(perm: torch.Tensor | None) -> float:
        ay = cy.rowsq if perm is None else cy.rowsq[perm]
        if use_gram:
            lp = l_ if perm is None else l_[perm][:, perm]
            t_xy = (k_ * lp).sum()
        else:  # ||Y_perm^T X||_F^2 from chunks of permuted rows of y
            cross = torch.zeros(d2, d1, dtype=torch.float64, device=a.device)
            for c0 in starts:
                yb = (cy.block(c0, c0 + chunk) if perm is None
                      else cy.rows(perm[c0:c0 + chunk]))
                cross += yb.T @ cx.block(c0, c0 + chunk)
            t_xy = (cross**2).sum()
        T = torch.stack([torch.stack([t_xx, t_xy]), torch.stack([t_xy, t_yy])])
        hsic = _hsic_from_stats(T, torch.stack([cx.rowsq, ay]), debiased)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # warned once below
            return float(_normalise(hsic, ["x", "y"], [cx.constant, cy.constant], debiased,
                                    4)[0, 1])

    score = float(_linear_cka_matrix([a, b], ["x", "y"], debiased, "auto", None, 3)[0, 1])
    gen = torch.Generator().manual_seed(seed)
    null = np.array([cka_at(torch.randperm(n, generator=gen).to(a.device))
                     for _ in range(n_permutations)])
    if math.isnan(score) or np.isnan(null).all():
        nan = float("nan")
        return CKANull(score, nan, nan, nan, nan, n_permutations, debiased, seed)
    expected = float("nan") if debiased else float(
        cx.rowsq.sum() * cy.rowsq.sum() / ((n - 1) * torch.sqrt(t_xx * t_yy)))
    std = float(null.std(ddof=1)) if n_permutations > 1 else float("nan")
    p = (1 + int((null >= score).sum())) / (1 + n_permutations)
    return CKANull(score, float(null.mean()), std, float(np.quantile(null, quantile)), p,
                   n_permutations, debiased, seed, expected)


# --------------------------------------------------------------------------- registry metadata

_CKA_INVARIANCES = ("sample_permutation", "translation", "orthogonal", "isotropic_scaling")


@register_similarity("linear_cka", invariances=_CKA_INVARIANCES,
                     params={"kernel": "linear", "debiased": False},
                     description="linear CKA (Kornblith et al. 2019); always computed as "
                                 "cka_to_final/previous/run with a permutation null")
def _linear_cka_similarity(x: torch.Tensor, y: torch.Tensor) -> float:
    return linear_cka(x, y)


@register_similarity("debiased_cka", invariances=_CKA_INVARIANCES,
                     params={"kernel": "linear", "debiased": True},
                     description="debiased linear CKA (Song et al. 2012 HSIC); use for small n")
def _debiased_cka_similarity(x: torch.Tensor, y: torch.Tensor) -> float:
    return linear_cka(x, y, debiased=True)
