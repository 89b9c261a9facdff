"""Neighbourhood alignment of two representations: mutual k-NN and CKNNA (Huh et al. 2024).

Two representations of the same ``n`` inputs agree *locally* when each input
has the same nearest neighbours in both.  Huh et al. (2024) use two scores:

* **mutual k-NN alignment**: ``(1/n) sum_i |N_X(i) & N_Y(i)| / k`` with
  ``N_X(i)`` the ``k`` nearest neighbours of sample ``i`` (itself excluded)
  in representation ``X``.  In ``[0, 1]``; about ``k / (n - 1)`` for
  unrelated representations.
* **CKNNA** (centred kernel nearest-neighbour alignment): CKA restricted to
  the pairs that are neighbours in *both* spaces.  With Gram matrices
  ``K = X X^T`` and ``L = Y Y^T`` of the (L2-normalised) features and the
  mask ``alpha_ij = 1[j in N_K(i) and j in N_L(i)]``,
  ``Align(K, L) = HSIC_1(alpha o K, alpha o L)`` (the unbiased HSIC of Song
  et al. 2012, as in the authors' release; the masked kernels are not
  symmetric) and ``CKNNA = Align(K, L) / sqrt(Align(K, K) Align(L, L))``,
  where ``Align(K, K)`` masks with ``N_K`` alone.

Neighbours are found by cosine similarity of L2-normalised rows (the authors'
convention; ``metric="euclidean"`` is available for mutual k-NN) in row blocks
of bounded memory (64 MiB of similarities, 1 GiB on a CUDA device), so no
``n x n`` matrix is formed at any ``n``: memory is ``O(n d)`` (the float64
features and their normalised copy), time the exact search's ``O(n^2 d)``, on the
features' device.  The masked kernels have ``k`` entries per row, so CKNNA is
``O(n k d)`` once the neighbours are known (its kernel values are gathered in
blocks of pairs): no ``n x n`` Gram is formed either.

Ties: the neighbour sets are ill-defined when the ``k``-th and ``(k+1)``-th
similarities are equal (duplicate samples, quantised features).  Such rows are
counted and reported with a :class:`RuntimeWarning`; the tie is broken by
``torch.topk`` (an unspecified order), so the value is one of the admissible
ones, not a unique number.

References
----------
Huh, M., Cheung, B., Wang, T., Isola, P. (2024). The platonic representation
hypothesis. ICML 2024 (alignment metrics).

Song, L., Smola, A., Gretton, A., Bedo, J., Borgwardt, K. (2012). Feature
selection via dependence maximization. JMLR 13, 1393-1434.
"""

from __future__ import annotations

import warnings

import torch

from dtprobe.errors import ConfigError, MetricInputError
from dtprobe.metrics._validation import ArrayLike, check_features
from dtprobe.metrics.registry import register_similarity

__all__ = ["mutual_knn", "cknna", "knn_indices", "DEFAULT_TOPK"]

#: Huh et al. (2024) report k = 10.
DEFAULT_TOPK = 10
#: Bytes of float64 similarity rows one block may hold (as ``dtprobe.metrics.cka``).
_MEMORY_BUDGET = 64 * 2**20
#: The same on a CUDA device: at n = 300k, 64 MiB is a block of 27 rows, too few to keep a GPU
#: busy; 1 GiB gives 447 rows (the budget is fixed, so memory stays O(n d) all the same).
_CUDA_MEMORY_BUDGET = 2**30
#: Relative gap below which the k-th and (k+1)-th similarities count as tied.
_TIE_RTOL = 1e-12
_METRICS = ("cosine", "euclidean")


def _normalised(x: torch.Tensor, name: str, in_place: bool = False) -> torch.Tensor:
    norms = torch.linalg.vector_norm(x, dim=1, keepdim=True)
    zero = int((norms == 0).sum())
    if zero:
        raise MetricInputError(f"{name} has {zero} all-zero row(s); cosine neighbours are "
                               "undefined for them (drop them or use metric='euclidean')")
    return x.div_(norms) if in_place else x / norms


def knn_indices(x: torch.Tensor, k: int, metric: str = "cosine", *,
                name: str = "features") -> tuple[torch.Tensor, int]:
    """Indices of the ``k`` nearest neighbours of every row (itself excluded).

    Parameters
    ----------
    x : torch.Tensor, shape (n, d)
        Validated features (``check_features``), float64 or a lower float precision (then
        upcast here, so the caller need not hold a float64 copy of its own).
    k : int
        Number of neighbours, ``1 <= k <= n - 1`` (one more is looked at to detect ties when
        ``k <= n - 2``).
    metric : {"cosine", "euclidean", "inner"}
        Cosine similarity of the rows, Euclidean distance, or the raw inner product.

    Returns
    -------
    (torch.Tensor, int)
        ``(n, k)`` int64 neighbour indices, nearest first, and the number of rows whose
        ``k``-th neighbour is tied with the ``(k+1)``-th.
    """
    n = x.shape[0]
    sq = None
    owned = x.dtype != torch.float64  # then the float64 copy below is ours to overwrite
    x = x.to(torch.float64)
    if metric == "cosine":
        z = _normalised(x, name, in_place=owned)
    elif metric == "inner":  # raw inner products (the kernel of CKNNA without normalisation)
        z = x
    else:  # distances are translation invariant; centring limits cancellation
        mean = x.mean(dim=0)
        z = x.sub_(mean) if owned else x - mean
        sq = (z**2).sum(dim=1)
        neg_sq = -sq[None, :]
    device = x.device
    del x  # only z is needed below (the float64 input is not held next to it)
    budget = _CUDA_MEMORY_BUDGET if device.type == "cuda" else _MEMORY_BUDGET
    block = max(1, min(n, budget // (8 * n)))
    out = torch.empty(n, k, dtype=torch.int64, device=device)
    ties = 0
    for s in range(0, n, block):
        e = min(s + block, n)
        if sq is None:
            score = z[s:e] @ z.T
        else:  # larger is nearer: -||a - b||^2 = 2 a.b - |b|^2 - |a|^2; |a|^2 is constant per
            # row and cannot change its ranking, so one fused addmm gives the score
            score = torch.addmm(neg_sq.expand(e - s, n), z[s:e], z.T, alpha=2.0)
        rows = torch.arange(e - s, device=device)
        score[rows, rows + s] = -torch.inf
        vals, idx = torch.topk(score, min(k + 1, n - 1), dim=1)
        out[s:e] = idx[:, :k]
        if k + 1 > n - 1:  # every other sample is a neighbour: no boundary to be tied at
            continue
        scale = vals[:, :1].abs().clamp_min(torch.finfo(torch.float64).tiny) if sq is None else (
            sq[s:e, None] + sq.max()).clamp_min(torch.finfo(torch.float64).tiny)
        ties += int(((vals[:, k - 1] - vals[:, k]).abs() <= _TIE_RTOL * scale[:, 0]).sum())
    return out, ties


def _pair(x: ArrayLike, y: ArrayLike, topk: int, what: str,
          dtype: torch.dtype | None = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    a = check_features(x, "x", min_samples=3, dtype=dtype)
    b = check_features(y, "y", min_samples=3, device=a.device, dtype=dtype)
    if a.shape[0] != b.shape[0]:
        raise MetricInputError(f"x has {a.shape[0]} samples but y has {b.shape[0]}; {what} "
                               "compares representations of the same inputs")
    if isinstance(topk, bool) or not isinstance(topk, int) or not 1 <= topk <= a.shape[0] - 2:
        raise ConfigError(f"topk={topk!r} must be an integer in 1..n-2 = {a.shape[0] - 2} "
                          f"for {a.shape[0]} samples")
    return a, b


def _warn_ties(fn: str, ties: dict[str, int], n: int) -> None:
    bad = {k: v for k, v in ties.items() if v}
    if bad:
        where = ", ".join(f"{v} of {n} rows of {k}" for k, v in bad.items())
        warnings.warn(f"{fn}: the k-th nearest neighbour is tied in {where} (duplicate or "
                      "quantised samples?); ties are broken arbitrarily, so the value is one of "
                      "several admissible ones", RuntimeWarning, stacklevel=3)


def mutual_knn(x: ArrayLike, y: ArrayLike, topk: int = DEFAULT_TOPK, *,
               metric: str = "cosine") -> float:
    """Mutual k-nearest-neighbour alignment of two representations (Huh et al. 2024).

    Parameters
    ----------
    x : array_like or torch.Tensor, shape (n_samples, d1)
        First representation (numpy or torch, CPU or CUDA, any float dtype; computed in
        float64, so float16/bfloat16 give the value of the rounded features).
    y : array_like or torch.Tensor, shape (n_samples, d2)
        Second representation of the same samples in the same order.
    topk : int, default 10
        Neighbours per sample (the paper's k = 10); at most ``n - 2``.
    metric : {"cosine", "euclidean"}, default "cosine"
        Neighbours by cosine similarity (the authors' convention: L2-normalised rows) or by
        Euclidean distance.

    Returns
    -------
    float
        ``(1/n) sum_i |N_x(i) & N_y(i)| / topk`` in ``[0, 1]``; larger means more similar.
        Invariant to orthogonal maps and isotropic scaling of either side and to a joint
        permutation of the samples; with ``metric="euclidean"`` also to translations.
        A :class:`RuntimeWarning` reports rows whose k-th neighbour is tied.

    Raises
    ------
    MetricInputError
        Wrong shapes, NaN/Inf, different sample counts, fewer than 3 samples, or an
        all-zero row under the cosine metric.
    ConfigError
        ``topk`` outside ``1..n-2`` or an unknown ``metric``.

    References
    ----------
    Huh, M., Cheung, B., Wang, T., Isola, P. (2024). The platonic representation
    hypothesis. ICML 2024 (mutual nearest-neighbour metric).
    """
    if metric not in _METRICS:
        raise ConfigError(f"metric={metric!r} is not one of {', '.join(_METRICS)}")
    # kept in their own dtype: each search upcasts its side, so at most two float64 copies of
    # one side (it and its normalised rows) exist at a time
    a, b = _pair(x, y, topk, "mutual_knn", dtype=None)
    ia, ta = knn_indices(a, topk, metric, name="x")
    ib, tb = knn_indices(b, topk, metric, name="y")
    _warn_ties("mutual_knn", {"x": ta, "y": tb}, a.shape[0])
    shared = (ia[:, :, None] == ib[:, None, :]).any(dim=2).sum(dim=1)
    return float(shared.to(torch.float64).mean() / topk)


def _pair_values(z: torch.Tensor, r: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """Kernel values ``z[r_m] . z[c_m]`` of the listed pairs, in blocks of pairs: gathering all
    ``n k`` pairs at once would hold ``2 k`` copies of the features (50 GB at n = 300k,
    d = 2048, k = 10)."""
    out = torch.empty(r.numel(), dtype=z.dtype, device=z.device)
    step = max(1, _MEMORY_BUDGET // (16 * z.shape[1]))
    for s in range(0, r.numel(), step):
        out[s:s + step] = (z[r[s:s + step]] * z[c[s:s + step]]).sum(dim=1)
    return out


def _masked_hsic(rows: torch.Tensor, cols: torch.Tensor, kv: torch.Tensor, lv: torch.Tensor,
                 n: int) -> torch.Tensor:
    """Unbiased HSIC of two sparse n x n matrices with equal support (i, j) and values kv, lv.

    ``HSIC_1(A, B) = [sum_ij A_ij B_ji + (1^T A 1)(1^T B 1)/((n-1)(n-2))
    - 2/(n-2) 1^T A B 1] / (n (n-3))``; the diagonal is empty by construction.
    """
    key = rows * n + cols
    order = torch.argsort(key)
    skey = key[order]
    # tr(A B) = sum over pairs (i, j) whose transpose (j, i) is also in the support.
    tkey = cols * n + rows
    pos = torch.searchsorted(skey, tkey).clamp_max(skey.numel() - 1)
    hit = skey[pos] == tkey
    trace = (kv[hit] * lv[order[pos[hit]]]).sum()
    col_a = torch.zeros(n, dtype=kv.dtype, device=kv.device).index_add_(0, cols, kv)
    row_b = torch.zeros(n, dtype=lv.dtype, device=lv.device).index_add_(0, rows, lv)
    total = trace + kv.sum() * lv.sum() / ((n - 1) * (n - 2)) - 2.0 / (n - 2) * (col_a @ row_b)
    return total / (n * (n - 3))


def cknna(x: ArrayLike, y: ArrayLike, topk: int = DEFAULT_TOPK, *,
          normalize: bool = True) -> float:
    """Centred kernel nearest-neighbour alignment (CKNNA, Huh et al. 2024).

    Parameters
    ----------
    x : array_like or torch.Tensor, shape (n_samples, d1)
        First representation (numpy or torch, CPU or CUDA, any float dtype; computed in
        float64).
    y : array_like or torch.Tensor, shape (n_samples, d2)
        Second representation of the same samples in the same order.
    topk : int, default 10
        Neighbours per sample (``2 <= topk <= n - 2``; the authors require ``topk >= 2``).
    normalize : bool, default True
        L2-normalise the rows first (the authors' convention), so the kernels are cosine
        similarities.  With ``False`` the kernels are raw inner products (neighbours are
        still chosen by the kernel value).

    Returns
    -------
    float
        ``Align(K, L) / sqrt(Align(K, K) Align(L, L))`` (module docstring); larger means more
        similar, 1 for identical neighbourhoods and kernels.  Needs ``n >= 4`` (unbiased
        HSIC).  Invariant to orthogonal maps of either side and a joint permutation of the
        samples; to isotropic scaling when ``normalize`` is on.  Not invariant to
        translations (the kernels are not centred before masking).  NaN with a
        :class:`RuntimeWarning` when a self-alignment is not positive (too few neighbours
        or samples for the unbiased estimate).

    Raises
    ------
    MetricInputError
        Wrong shapes, NaN/Inf, different sample counts, fewer than 4 samples, all-zero rows
        with ``normalize``.
    ConfigError
        ``topk`` outside ``2..n-2``.

    References
    ----------
    Huh, M., Cheung, B., Wang, T., Isola, P. (2024). The platonic representation
    hypothesis. ICML 2024 (CKNNA).
    """
    a, b = _pair(x, y, topk, "cknna")
    n = a.shape[0]
    if n < 4:
        raise MetricInputError(f"x has {n} samples; cknna (unbiased HSIC) needs at least 4")
    if topk < 2:
        raise ConfigError(f"topk={topk} must be at least 2 for cknna (Huh et al. 2024)")
    if normalize:
        a, b = _normalised(a, "x"), _normalised(b, "y")
    # Neighbours by kernel value (largest inner product), self excluded.
    ia, ta = knn_indices(a, topk, "inner", name="x")
    ib, tb = knn_indices(b, topk, "inner", name="y")
    _warn_ties("cknna", {"x": ta, "y": tb}, n)
    rows = torch.arange(n, device=a.device)[:, None].expand(n, topk).reshape(-1)
    ca = ia.reshape(-1)
    cb = ib.reshape(-1)
    ka, lb = _pair_values(a, rows, ca), _pair_values(b, rows, cb)
    self_a = _masked_hsic(rows, ca, ka, ka, n)
    self_b = _masked_hsic(rows, cb, lb, lb, n)
    both = (ia[:, :, None] == ib[:, None, :]).any(dim=2).reshape(-1)
    r, c = rows[both], ca[both]
    cross = _masked_hsic(r, c, _pair_values(a, r, c), _pair_values(b, r, c), n)
    if not (float(self_a) > 0 and float(self_b) > 0):
        warnings.warn("cknna: a self-alignment is not positive (too few samples or neighbours "
                      "for the unbiased estimate); returning NaN", RuntimeWarning, stacklevel=2)
        return float("nan")
    return float(cross / torch.sqrt(self_a * self_b))


@register_similarity("mutual_knn", default=True,
                     invariances=("sample_permutation", "orthogonal", "isotropic_scaling"),
                     params={"topk": DEFAULT_TOPK, "metric": "cosine"},
                     description="mutual k-NN alignment, k=10 cosine (Huh et al. 2024)")
def _mutual_knn_similarity(x: torch.Tensor, y: torch.Tensor) -> float:
    return mutual_knn(x, y, DEFAULT_TOPK)


@register_similarity("cknna",
                     invariances=("sample_permutation", "orthogonal", "isotropic_scaling"),
                     params={"topk": DEFAULT_TOPK, "normalize": True, "hsic": "unbiased"},
                     description="CKNNA, k=10 (Huh et al. 2024)")
def _cknna_similarity(x: torch.Tensor, y: torch.Tensor) -> float:
    return cknna(x, y, DEFAULT_TOPK)
