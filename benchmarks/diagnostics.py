"""The diagnostics of issue 15 against naive implementations, side by side at n=10,000, d=512.

Each baseline is the straightforward implementation a reader would write from the paper (or
the style of the authors' release): full ``n x n`` distance or similarity matrices with a full
sort (TwoNN as in Ansuini et al.'s code, mutual k-NN and CKNNA as in Huh et al.'s), covariance
whitening for CCA (Raghu et al.'s ``cca_core`` style), scipy's orthogonal Procrustes solution,
loops over class pairs, and a loop of :func:`linear_cka` calls for the permutation null.  Every
row checks that the two agree.

References: Facco et al. 2017; Agrawal et al. 2022; Galanti et al. 2022; Wang & Isola 2020;
Huh et al. 2024; Williams et al. 2021; Raghu et al. 2017; Morcos et al. 2018; Li et al. 2021.
"""

from __future__ import annotations

import itertools
import math
import warnings

import numpy as np
import torch

from benchmarks import Row, timed
from dtprobe.metrics import (
    alpha_req,
    angular_shape_metric,
    cdnv,
    cka_permutation_null,
    cknna,
    class_mean_uniformity,
    linear_cka,
    mutual_knn,
    nleep,
    numerical_rank,
    procrustes_distance,
    pwcca,
    svcca,
    twonn,
)

# ------------------------------------------------------------------------------ naive versions


def naive_twonn(x: np.ndarray) -> float:
    """Ansuini et al. style: full pdist matrix, full row sort, CDF fit over 90 % of points."""
    from scipy.spatial.distance import pdist, squareform

    dist = np.sort(squareform(pdist(x)), axis=1)
    mu = np.sort(dist[:, 2] / dist[:, 1])
    n = len(mu)
    keep = int(np.floor(n * 0.9))
    xs = np.log(mu[:keep])
    ys = -np.log(1 - np.arange(1, keep + 1) / n)
    return float(xs @ ys / (xs @ xs))


def naive_alpha_req(x: np.ndarray) -> float:
    lam = np.sort(np.linalg.eigvalsh(np.cov(x, rowvar=False)))[::-1]
    lam = lam[lam > lam[0] * max(x.shape) * np.finfo(np.float64).eps]
    slope, _ = np.polyfit(np.log(np.arange(1, len(lam) + 1)), np.log(lam), 1)
    return float(-slope)


def naive_cdnv(x: np.ndarray, y: np.ndarray) -> float:
    vals = []
    for i, j in itertools.combinations(np.unique(y), 2):
        a, b = x[y == i], x[y == j]
        ma, mb = a.mean(0), b.mean(0)
        va, vb = ((a - ma) ** 2).sum(1).mean(), ((b - mb) ** 2).sum(1).mean()
        vals.append((va + vb) / (2 * ((ma - mb) ** 2).sum()))
    return float(np.mean(vals))


def naive_uniformity(x: np.ndarray, y: np.ndarray) -> float:
    mus = [x[y == c].mean(0) for c in np.unique(y)]
    g = np.mean(mus, axis=0)
    us = [(m - g) / np.linalg.norm(m - g) for m in mus]
    vals = [math.exp(-2 * ((a - b) ** 2).sum()) for a, b in itertools.combinations(us, 2)]
    return math.log(np.mean(vals))


def _dense_knn_mask(z: torch.Tensor, k: int) -> torch.Tensor:
    sim = z @ z.T
    sim.fill_diagonal_(-math.inf)
    idx = sim.argsort(dim=1, descending=True)[:, :k]
    return torch.zeros_like(sim).scatter_(1, idx, 1.0)


def naive_mutual_knn(x: torch.Tensor, y: torch.Tensor, k: int = 10) -> float:
    """Huh et al. style: dense similarity, full argsort, dense masks (float64)."""
    zx = x / x.norm(dim=1, keepdim=True)
    zy = y / y.norm(dim=1, keepdim=True)
    return float((_dense_knn_mask(zx, k) * _dense_knn_mask(zy, k)).sum(1).mean() / k)


def _dense_hsic1(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    n = a.shape[0]
    a = a.clone().fill_diagonal_(0)
    b = b.clone().fill_diagonal_(0)
    return ((a * b.T).sum() + a.sum() * b.sum() / ((n - 1) * (n - 2))
            - 2 * (a @ b).sum() / (n - 2)) / (n * (n - 3))


def naive_cknna(x: torch.Tensor, y: torch.Tensor, k: int = 10) -> float:
    """Huh et al. style: dense kernels, dense masks, dense unbiased HSIC (float32, as their
    GPU code runs; float64 dense would hold ~8 GB at n = 10,000)."""
    zx = (x / x.norm(dim=1, keepdim=True)).float()
    zy = (y / y.norm(dim=1, keepdim=True)).float()
    kx, ky = zx @ zx.T, zy @ zy.T
    mx, my = _dense_knn_mask(zx, k), _dense_knn_mask(zy, k)
    cross = _dense_hsic1(mx * my * kx, mx * my * ky)
    sx = _dense_hsic1(mx * kx, mx * kx)
    sy = _dense_hsic1(my * ky, my * ky)
    return float(cross / torch.sqrt(sx * sy))


def naive_procrustes(x: np.ndarray, y: np.ndarray) -> float:
    from scipy.linalg import orthogonal_procrustes

    a = x - x.mean(0)
    b = y - y.mean(0)
    a, b = a / np.linalg.norm(a), b / np.linalg.norm(b)
    r, _ = orthogonal_procrustes(b, a)
    return float(np.linalg.norm(a - b @ r))


def _whiten_cca(x: np.ndarray, y: np.ndarray):
    """Covariance-whitening CCA (cca_core style), float64 numpy."""
    x = x - x.mean(0)
    y = y - y.mean(0)
    sxx, syy, sxy = x.T @ x, y.T @ y, x.T @ y

    def inv_sqrt(c):
        w, v = np.linalg.eigh(c)
        keep = w > w.max() * 1e-12
        return (v[:, keep] / np.sqrt(w[keep])) @ v[:, keep].T

    wx, wy = inv_sqrt(sxx), inv_sqrt(syy)
    u, rho, _ = np.linalg.svd(wx @ sxy @ wy)
    return np.clip(rho, 0, 1), wx @ u, x


def naive_svcca(x: np.ndarray, y: np.ndarray, keep: float = 0.99) -> float:
    def reduce(a):
        a = a - a.mean(0)
        u, s, _ = np.linalg.svd(a, full_matrices=False)
        k = int(np.searchsorted(np.cumsum(s**2) / np.sum(s**2), keep) + 1)
        return u[:, :k] * s[:k]

    rx, ry = reduce(x), reduce(y)
    rho, _, _ = _whiten_cca(rx, ry)
    return float(rho[:min(rx.shape[1], ry.shape[1])].mean())


def naive_pwcca(x: np.ndarray, y: np.ndarray) -> float:
    rho, dirs, xc = _whiten_cca(x, y)
    m = min(x.shape[1], y.shape[1])
    h = xc @ dirs[:, :m]
    h /= np.linalg.norm(h, axis=0)
    alpha = np.abs(h.T @ xc).sum(1)
    return float((alpha / alpha.sum() * rho[:m]).sum())


def naive_nleep(x: np.ndarray, y: np.ndarray, seed: int = 0) -> float:
    from sklearn.decomposition import PCA
    from sklearn.mixture import GaussianMixture

    pca = PCA(n_components=0.8, svd_solver="full").fit(x)
    z = pca.transform(x) / np.sqrt(pca.explained_variance_[0] * (len(x) - 1))
    gmm = GaussianMixture(5 * len(np.unique(y)), covariance_type="diag",
                          random_state=seed).fit(z)
    theta = gmm.predict_proba(z)
    onehot = np.eye(len(np.unique(y)))[np.unique(y, return_inverse=True)[1]]
    joint = onehot.T @ theta / len(x)
    cond = joint / joint.sum(0, keepdims=True)
    return float(np.mean(np.log((theta @ cond.T)[np.arange(len(x)), y])))


def naive_cka_null(x: torch.Tensor, y: torch.Tensor, n: int = 20, seed: int = 0) -> float:
    gen = torch.Generator().manual_seed(seed)
    return float(np.mean([linear_cka(x, y[torch.randperm(len(y), generator=gen)])
                          for _ in range(n)]))


# ------------------------------------------------------------------------------ the suite


def make_pair(n: int, d: int, k: int, seed: int = 0):
    """Penultimate-like float32 features (ReLU of class means + noise) and a noisy rotation."""
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, k, (n,), generator=gen)
    means = torch.randn(k, d, generator=gen)
    x = torch.relu(means[labels] + 1.5 * torch.randn(n, d, generator=gen) + 0.5)
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=gen))
    y = torch.relu(x @ q + 0.5 * torch.randn(n, d, generator=gen))
    return x.float(), y.float(), labels


def run(quick: bool = False) -> list[Row]:
    n, d, k = (600, 32, 5) if quick else (10_000, 512, 10)
    x, y, labels = make_pair(n, d, k)
    lab = labels.numpy()
    sizes = f"n={n:,}, d={d}, K={k}"

    # Both sides start from the same float32 tensors: the baselines' float64 conversion is
    # timed, as dtprobe's input validation (upcast + finiteness check) is.
    def x64() -> np.ndarray:
        return x.double().numpy()

    def y64() -> np.ndarray:
        return y.double().numpy()

    cases = [
        ("twonn (Facco 2017)", lambda: twonn(x), lambda: naive_twonn(x64()),
         "scipy pdist + full row sort (Ansuini et al. style)", 1e-6),
        ("alpha_req (Agrawal 2022)", lambda: alpha_req(x), lambda: naive_alpha_req(x64()),
         "np.cov + eigvalsh + polyfit", 1e-6),
        ("numerical_rank", lambda: numerical_rank(x), lambda: np.linalg.matrix_rank(x64()),
         "np.linalg.matrix_rank", 0),
        ("cdnv (Galanti 2022)", lambda: cdnv(x, labels), lambda: naive_cdnv(x64(), lab),
         "loop over class pairs (numpy)", 1e-9),
        ("class_mean_uniformity", lambda: class_mean_uniformity(x, labels),
         lambda: naive_uniformity(x64(), lab), "loop over class pairs (numpy)", 1e-9),
        ("mutual_knn k=10 (Huh 2024)", lambda: mutual_knn(x, y),
         lambda: naive_mutual_knn(x.double(), y.double()),
         "dense n x n similarity + argsort (float64)", 1e-9),
        ("cknna k=10 (Huh 2024)", lambda: cknna(x, y), lambda: naive_cknna(x.double(), y.double()),
         "dense kernels, masks, n^3 unbiased HSIC (float32)", 1e-3),
        ("procrustes_distance (Williams 2021)", lambda: procrustes_distance(x, y),
         lambda: naive_procrustes(x64(), y64()), "scipy orthogonal_procrustes + residual", 1e-8),
        ("angular_shape_metric (Williams 2021)", lambda: angular_shape_metric(x, y),
         lambda: math.acos(1 - naive_procrustes(x64(), y64()) ** 2 / 2),
         "scipy orthogonal_procrustes + residual", 1e-6),
        ("svcca keep=0.99 (Raghu 2017)", lambda: svcca(x, y), lambda: naive_svcca(x64(), y64()),
         "SVD + covariance-whitening CCA (numpy)", 1e-6),
        ("pwcca (Morcos 2018)", lambda: pwcca(x, y), lambda: naive_pwcca(x64(), y64()),
         "covariance-whitening CCA + weights (numpy)", 1e-6),
        ("CKA permutation null, 20 shuffles", lambda: cka_permutation_null(x, y).null_mean,
         lambda: naive_cka_null(x, y), "loop of linear_cka on shuffled rows", 1e-10),
        ("nleep (Li 2021)", lambda: nleep(x, labels), lambda: naive_nleep(x64(), lab),
         "sklearn PCA + GaussianMixture + LEEP (numpy)", 1e-5),
    ]
    rows = []
    twonn(x[:50])  # warm-up
    for name, ours_fn, base_fn, baseline, tol in cases:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ours_s, ours = timed(ours_fn)
            base_s, base = timed(base_fn)
        diff = abs(float(ours) - float(base))
        rows.append(Row(name=name, sizes=sizes, ours=ours_s, base=base_s, goal=None,
                        baseline=baseline, agreement=f"abs diff {diff:.1e} (tol {tol:g}); "
                                                     f"value {float(ours):.4g}",
                        agree_ok=diff <= tol))
    return rows
