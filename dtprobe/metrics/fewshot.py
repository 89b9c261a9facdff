"""Few-shot linear transfer on frozen features: k labelled images per class, closed form.

The cheap transfer number of recent vision papers (1, 5, 10 and 25 shots; big_vision's
``fewshot_lsr`` evaluator) and the third protocol of Islam et al. (2021), next to the linear
probe (:mod:`dtprobe.metrics.probes`) and full fine-tuning (:mod:`dtprobe.training.finetune`).
For each draw, ``k`` training images per class are chosen, a classifier is fitted on their
features and scored on the whole test split; the row is the mean over draws.

Classifiers
-----------
``ridge``
    Least squares to ``2 * one_hot - 1`` targets with an L2 penalty ``lam`` on the weights and
    an unpenalised intercept, on features standardised with the shots' own mean and standard
    deviation (+1e-5, as big_vision); prediction ``argmax``. big_vision fixes ``lam`` (and
    handles the bias as a constant feature of 100, almost unpenalised); here ``lam`` is chosen
    per draw by exact leave-one-out squared error over a log grid, from one eigendecomposition
    of the centred Gram (``n <= d``) or covariance (``n > d``) matrix, so every grid value costs
    a rescale. The intercept is exact: with centred features ``Xc`` the hat matrix is
    ``11^T / n + Xc (Xc^T Xc + lam I)^-1 Xc^T``. This is scikit-learn's ``RidgeClassifierCV``
    rule (leave-one-out mean squared error) and fit (``RidgeClassifier``) on standardised
    features.
``ncm``
    Nearest class mean: the test image goes to the class whose mean shot feature is nearest in
    Euclidean distance (scikit-learn's ``NearestCentroid``), on the raw features.

Draws
-----
Shots are chosen by the subsets' hash rule (:mod:`dtprobe.data.subsets`): for draw ``j`` the
``k`` images of each class with the smallest ``sha256("fewshot-{seed}-{j}:{sample_id}")`` are
taken. A draw depends only on the sample ids (not on file order or the machine), the same
images are used at every checkpoint, and the shots are nested (the 5 shots of a draw contain its
1 shot). Every draw's ids are identified by a digest recorded with the row.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from dtprobe.data.subsets import sample_ids_digest, sample_ranks
from dtprobe.errors import MetricInputError
from dtprobe.metrics._validation import ArrayLike, check_features, check_labels
from dtprobe.metrics.registry import EpochView, MetricValue, register_metric
from dtprobe.references import with_references

__doc__ = with_references(
    __doc__,
    ("islam2021", "(linear, fine-tuning and few-shot transfer)"),
    ("kolesnikov2020",
     "; google-research/big_vision, ``big_vision/evaluators/fewshot_lsr.py`` (closed-form "
     "few-shot least squares)"),
    ("rifkin2007", "(leave-one-out residuals ``e_i / (1 - H_ii)`` from one eigendecomposition)"),
    ("wang2019", "(nearest class mean on frozen features)"),
)

__all__ = ["FEWSHOT_DRAWS", "FEWSHOT_SHOTS", "RIDGE_RATIOS", "FewShotResult", "FewShotRidge",
           "NearestClassMean", "draw_shots", "fewshot_accuracy"]

#: Shots per class of the registered metrics (big_vision's and Islam et al.'s 1, 5, 10, 25).
FEWSHOT_SHOTS: tuple[int, ...] = (1, 5, 10, 25)
#: Seeded draws per shot count (big_vision uses 3).
FEWSHOT_DRAWS = 5
#: Ridge penalties as multiples of the mean squared norm of a centred, standardised shot
#: (``trace(Xc^T Xc) / n``, about the feature dimension): 17 values, 1e-4 .. 1e4.
RIDGE_RATIOS: tuple[float, ...] = tuple(float(r) for r in np.logspace(-4, 4, 17))
#: Added to the shots' standard deviation before dividing (big_vision's constant).
STD_EPS = 1e-5
#: Level of the interval over draws (Student t on the draws' accuracies).
DRAW_CI_LEVEL = 0.95
CLASSIFIERS = ("ridge", "ncm")
_PREDICT_ROWS = 4096  # test rows upcast to float64 at a time


def _features(x: ArrayLike, name: str, min_samples: int = 1) -> np.ndarray:
    return check_features(x, name, min_samples=min_samples).cpu().numpy()


def _host(x: ArrayLike) -> np.ndarray:
    """``x`` as a numpy array on the host, dtype kept."""
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def _float64_rows(x: ArrayLike) -> np.ndarray:
    """``x`` (tensor or array) as a float64 numpy array; used on bounded row blocks."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=np.float64)


class FewShotRidge:
    """Ridge regression classifier with its penalty chosen by exact leave-one-out error.

    Parameters
    ----------
    ratios : candidate penalties, as multiples of ``trace(Xc^T Xc) / n`` of the standardised,
        centred training features (scale-free across layers and widths).
    standardize : standardise with the training mean and ``std + 1e-5`` first.

    Attributes
    ----------
    classes_ : sorted class labels.
    alpha_ : the chosen penalty (absolute, on the standardised features).
    ratio_ : the chosen entry of ``ratios``.
    loo_mse_ : leave-one-out mean squared error (per sample, summed over the ``+-1`` target
        columns) of every candidate, in the order of ``ratios``.
    alphas_ : the absolute penalties tried.
    coef_ : ``(d, C)`` weights on the standardised features; ``intercept_`` : ``(C,)``.

    Notes
    -----
    With ``Xc = X - mean`` and ``Yc = Y - mean``, the fit is ``W = Xc^T (Xc Xc^T + lam I)^-1 Yc``
    (``n <= d``) or ``(Xc^T Xc + lam I)^-1 Xc^T Yc`` (``n > d``), intercept ``mean(Y) - mean(X) W``.
    One ``eigh`` of the smaller Gram matrix gives the fit and the hat diagonal
    ``H_ii = 1/n + sum_j U_ij^2 s_j / (s_j + lam)`` for every ``lam``; the leave-one-out residual
    is ``(Y_i - Yhat_i) / (1 - H_ii)`` (Rifkin & Lippert 2007). Ties in the error go to the
    larger penalty.
    """

    def __init__(self, ratios: Sequence[float] = RIDGE_RATIOS, standardize: bool = True):
        self.ratios = ratios
        self.standardize = standardize

    def fit(self, X: ArrayLike, y: ArrayLike) -> FewShotRidge:
        x = _features(X, "few-shot features", min_samples=2)
        labels = _host(y).reshape(-1)
        idx, n_classes = check_labels(labels, x.shape[0], "few-shot labels")
        self.classes_ = np.unique(labels)
        ratios = np.asarray(self.ratios, dtype=np.float64)
        if ratios.ndim != 1 or ratios.size == 0 or not np.all(ratios > 0):
            raise MetricInputError("ridge ratios must be a non-empty list of positive numbers")
        # torch float64 on the CPU: its eigh and products follow torch's thread setting (numpy's
        # OpenBLAS threads oversubscribe a busy machine: eigh of 250 x 250 took 1.1 s vs 0.03 s)
        xt = torch.from_numpy(x)
        n = xt.shape[0]
        mean = xt.mean(dim=0)
        scale = xt.std(dim=0, unbiased=False) + STD_EPS if self.standardize \
            else torch.ones(xt.shape[1], dtype=torch.float64)
        xc = (xt - mean) / scale
        targets = 2.0 * torch.eye(n_classes, dtype=torch.float64)[idx] - 1.0
        y_mean = targets.mean(dim=0)
        yc = targets - y_mean
        size = float((xc * xc).sum()) / n
        if size <= 0:  # every shot identical: only the intercept is left
            size = 1.0
        alphas = ratios * size
        gram = n <= xc.shape[1]
        if gram:
            s, u = torch.linalg.eigh(xc @ xc.T)       # (n,), (n, n)
            proj = u.T @ yc                            # U^T Yc
            lift = xc.T @ u                            # W = lift diag(1/(s+lam)) proj
            sq = u * u
        else:
            s, v = torch.linalg.eigh(xc.T @ xc)       # (d,), (d, d)
            proj = v.T @ (xc.T @ yc)
            lift = v
            u = xc @ v                                 # H = 1/n + (Xc V) diag(1/(s+lam)) (Xc V)^T
            sq = u * u
        s = s.clamp_min(0.0)  # round-off below zero on a rank-deficient Gram
        mse = np.empty(len(alphas))
        for i, lam in enumerate(alphas):
            # Gram: H = 1/n + U diag(s/(s+lam)) U^T; covariance: (Xc V) diag(1/(s+lam)) (Xc V)^T
            weight = s / (s + lam) if gram else 1.0 / (s + lam)
            fitted = u @ (weight[:, None] * proj)
            h = 1.0 / n + sq @ weight
            resid = (yc - fitted) / (1.0 - h)[:, None]
            mse[i] = float((resid * resid).sum(dim=1).mean())
        # the largest penalty among the minima (numerically equal errors: the smoother fit)
        best = int(np.flatnonzero(mse <= mse.min() * (1 + 1e-12))[-1])
        lam = float(alphas[best])
        self.alphas_, self.loo_mse_ = alphas, mse
        self.alpha_, self.ratio_ = lam, float(ratios[best])
        self.mean_, self.scale_ = mean.numpy(), scale.numpy()
        self.coef_ = (lift @ ((1.0 / (s + lam))[:, None] * proj)).numpy()
        self.intercept_ = y_mean.numpy()  # on centred inputs: Yhat = y_mean + (x - mean) W
        return self

    def decision_function(self, X: ArrayLike) -> np.ndarray:
        out = []
        mean, scale = torch.from_numpy(self.mean_), torch.from_numpy(self.scale_)
        coef, bias = torch.from_numpy(self.coef_), torch.from_numpy(self.intercept_)
        for start in range(0, int(X.shape[0]), _PREDICT_ROWS):
            rows = torch.from_numpy(_float64_rows(X[start:start + _PREDICT_ROWS]))
            out.append((((rows - mean) / scale) @ coef + bias).numpy())
        return np.concatenate(out) if out else np.empty((0, len(self.classes_)))

    def predict(self, X: ArrayLike) -> np.ndarray:
        return self.classes_[np.argmax(self.decision_function(X), axis=1)]

    def score(self, X: ArrayLike, y: ArrayLike) -> float:
        return float(np.mean(self.predict(X) == _host(y).reshape(-1)))


class NearestClassMean:
    """Nearest class mean (Euclidean) on the raw features, as scikit-learn's ``NearestCentroid``.

    Attributes
    ----------
    classes_ : sorted class labels; ``centroids_`` : ``(C, d)`` class means.
    """

    def fit(self, X: ArrayLike, y: ArrayLike) -> NearestClassMean:
        x = _features(X, "few-shot features", min_samples=2)
        labels = _host(y).reshape(-1)
        idx, n_classes = check_labels(labels, x.shape[0], "few-shot labels")
        self.classes_ = np.unique(labels)
        onehot = np.eye(n_classes)[idx.numpy()]
        self.centroids_ = (onehot.T @ x) / onehot.sum(axis=0)[:, None]
        return self

    def predict(self, X: ArrayLike) -> np.ndarray:
        cent = torch.from_numpy(self.centroids_)
        c2 = (cent * cent).sum(dim=1)
        out = []
        for start in range(0, int(X.shape[0]), _PREDICT_ROWS):
            rows = torch.from_numpy(_float64_rows(X[start:start + _PREDICT_ROWS]))
            # ||x - c||^2 up to ||x||^2, which does not change the argmin (torch: see fit)
            out.append(torch.argmin(c2[None, :] - 2.0 * rows @ cent.T, dim=1).numpy())
        pick = np.concatenate(out) if out else np.empty(0, dtype=np.int64)
        return self.classes_[pick]

    def score(self, X: ArrayLike, y: ArrayLike) -> float:
        return float(np.mean(self.predict(X) == _host(y).reshape(-1)))


def draw_key(seed: int, draw: int) -> str:
    """The hash key of draw ``draw`` (see the module notes)."""
    return f"fewshot-{seed}-{draw}"


def draw_shots(sample_ids: Sequence[str], labels: ArrayLike, shots: int, draw: int = 0,
               seed: int = 0) -> np.ndarray:
    """Indices (ascending) of ``shots`` samples per class, chosen by the subsets' hash rule.

    Parameters
    ----------
    sample_ids : one stable id per sample (unique within the split).
    labels : class of each sample.
    shots : samples per class; every class must have at least that many.
    draw, seed : which draw (key ``"fewshot-{seed}-{draw}"``).

    Raises
    ------
    MetricInputError
        A class has fewer than ``shots`` samples, or ids and labels differ in length.
    """
    labels = np.asarray(labels).reshape(-1)
    if len(sample_ids) != len(labels):
        raise MetricInputError(f"few-shot: {len(sample_ids)} sample ids for {len(labels)} labels")
    ranks = sample_ranks(sample_ids, draw_key(seed, draw))
    return _pick(ranks, labels, shots)


def _pick(ranks: np.ndarray, labels: np.ndarray, shots: int) -> np.ndarray:
    classes, counts = np.unique(labels, return_counts=True)
    if int(shots) < 1:
        raise MetricInputError(f"few-shot: shots={shots} must be at least 1")
    if counts.min() < shots:
        small = classes[counts.argmin()]
        raise MetricInputError(f"few-shot {shots}-shot: class {small} has {int(counts.min())} "
                               f"training image(s), fewer than {shots}; use fewer shots "
                               "(--fewshot-shots) or a larger training split")
    keep = []
    for c in classes:
        members = np.flatnonzero(labels == c)
        keep.append(members[np.argsort(ranks[members], kind="stable")[:shots]])
    return np.sort(np.concatenate(keep)).astype(np.int64)


@dataclass
class FewShotResult:
    """Few-shot accuracy of one classifier at one shot count, over the draws.

    ``accuracy`` is the mean over draws; ``ci_low``/``ci_high`` a Student-t interval of that
    mean over draws (NaN with one draw); ``alphas``/``ratios`` the ridge penalty each draw chose
    (empty for ``ncm``); ``draw_digests`` the :func:`dtprobe.data.subsets.sample_ids_digest` of
    each draw's shot ids.
    """

    classifier: str
    shots: int
    accuracy: float
    draw_accuracies: list[float]
    ci_low: float
    ci_high: float
    n_train: int
    n_test: int
    draw_digests: list[str] = field(default_factory=list)
    alphas: list[float] = field(default_factory=list)
    ratios: list[float] = field(default_factory=list)
    at_grid_edge: int = 0
    error: str | None = None


def draw_interval(values: Sequence[float], level: float = DRAW_CI_LEVEL) -> tuple[float, float]:
    """Student-t interval of the mean of ``values`` (NaN, NaN with fewer than two)."""
    v = np.asarray(values, dtype=np.float64)
    if v.size < 2:
        return float("nan"), float("nan")
    from scipy.stats import t

    half = float(t.ppf(0.5 + level / 2, v.size - 1)) * float(v.std(ddof=1)) / math.sqrt(v.size)
    return float(v.mean() - half), float(v.mean() + half)


def fewshot_accuracy(train_x: ArrayLike, train_y: ArrayLike, test_x: ArrayLike,
                     test_y: ArrayLike, sample_ids: Sequence[str] | None = None,
                     shots: Sequence[int] = FEWSHOT_SHOTS, draws: int = FEWSHOT_DRAWS,
                     seed: int = 0, classifiers: Sequence[str] = CLASSIFIERS,
                     ratios: Sequence[float] = RIDGE_RATIOS,
                     ) -> dict[tuple[str, int], FewShotResult]:
    """Few-shot test accuracy of each classifier at each shot count, over seeded draws.

    Parameters
    ----------
    train_x, train_y : features and labels of the training split the shots are drawn from.
    test_x, test_y : the test split every fitted classifier is scored on (all of it).
    sample_ids : stable ids of the training samples (default ``"train:<index>"``).
    shots : samples per class; a shot count above the smallest class gives a result with
        ``error`` set and NaN accuracy, the other counts are still computed.
    draws : number of draws per shot count (keys ``"fewshot-{seed}-{j}"``, ``j < draws``).
    classifiers : any of ``"ridge"``, ``"ncm"``.
    ratios : ridge penalty grid (:class:`FewShotRidge`).

    Returns
    -------
    dict
        ``(classifier, shots) -> FewShotResult``.

    Raises
    ------
    MetricInputError
        Fewer than two classes in the training split, NaN/Inf features, mismatched shapes, an
        unknown classifier or no draws.

    References
    ----------
    .. [1] A. Islam et al., "A broad study on the transferability of visual representations
       with contrastive learning", ICCV 2021.
    .. [2] google-research/big_vision, ``evaluators/fewshot_lsr.py``.
    """
    unknown = [c for c in classifiers if c not in CLASSIFIERS]
    if unknown:
        raise MetricInputError(f"few-shot: unknown classifier(s) {unknown}; use "
                               f"{', '.join(CLASSIFIERS)}")
    if isinstance(draws, bool) or int(draws) < 1:
        raise MetricInputError(f"few-shot: draws={draws} must be at least 1")
    n = int(train_x.shape[0])
    labels = _host(train_y).reshape(-1)
    test_labels = _host(test_y).reshape(-1)
    if labels.shape[0] != n or test_labels.shape[0] != int(test_x.shape[0]):
        raise MetricInputError("few-shot: features and labels differ in length")
    check_labels(labels, n, "few-shot training labels")  # one class: one line
    if test_labels.size == 0:
        raise MetricInputError("few-shot: the test split is empty")
    _check_finite(train_x, "few-shot training features")
    _check_finite(test_x, "few-shot test features")
    ids = list(sample_ids) if sample_ids is not None else [f"train:{i}" for i in range(n)]
    if len(ids) != n:
        raise MetricInputError(f"few-shot: {len(ids)} sample ids for {n} training samples")
    ranks = [sample_ranks(ids, draw_key(seed, j)) for j in range(int(draws))]
    out: dict[tuple[str, int], FewShotResult] = {}
    for k in shots:
        picks: list[np.ndarray] = []
        try:
            picks = [_pick(r, labels, int(k)) for r in ranks]
        except MetricInputError as exc:
            for clf in classifiers:
                out[(clf, int(k))] = FewShotResult(clf, int(k), float("nan"), [], float("nan"),
                                                   float("nan"), 0, int(test_labels.size),
                                                   error=str(exc))
            continue
        digests = [sample_ids_digest([ids[i] for i in p]) for p in picks]
        for clf in classifiers:
            accs, alphas, chosen = [], [], []
            edge = 0
            for p in picks:
                shot_x = _take(train_x, p)
                if clf == "ridge":
                    model = FewShotRidge(ratios).fit(shot_x, labels[p])
                    alphas.append(model.alpha_)
                    chosen.append(model.ratio_)
                    edge += model.ratio_ in (float(ratios[0]), float(ratios[-1]))
                else:
                    model = NearestClassMean().fit(shot_x, labels[p])
                accs.append(model.score(test_x, test_labels))
            low, high = draw_interval(accs)
            out[(clf, int(k))] = FewShotResult(
                clf, int(k), float(np.mean(accs)), accs, low, high, len(picks[0]),
                int(test_labels.size), digests, alphas, chosen, edge)
    return out


def _check_finite(x: ArrayLike, name: str) -> None:
    """One-line error for NaN/Inf in ``x``, checked in row blocks (no float64 copy of it)."""
    for start in range(0, int(x.shape[0]), _PREDICT_ROWS):
        block = x[start:start + _PREDICT_ROWS]
        ok = bool(torch.isfinite(block).all()) if isinstance(block, torch.Tensor) \
            else bool(np.isfinite(np.asarray(block, dtype=np.float64)).all())
        if not ok:
            raise MetricInputError(f"{name} contain NaN/Inf (diverged checkpoint?); drop or fix "
                                   "those rows first")


def _take(x: Any, p: np.ndarray) -> Any:
    """Rows ``p`` of a tensor (indexed on its own device) or of an array."""
    if isinstance(x, torch.Tensor):
        return x[torch.as_tensor(p, device=x.device)]
    return np.asarray(x)[p]


# --- analysis adapters ------------------------------------------------------------------------

#: Settings every registered few-shot row records (``view.options`` may override
#: ``fewshot_shots`` and ``fewshot_draws``).
FEWSHOT_METRIC_SETTINGS: dict[str, Any] = {"ridge_ratio_min": RIDGE_RATIOS[0],
                                           "ridge_ratio_max": RIDGE_RATIOS[-1],
                                           "ridge_grid_size": len(RIDGE_RATIOS),
                                           "ridge_selection": "leave-one-out-mse",
                                           "standardize": "shots mean, std+1e-5",
                                           "ncm_distance": "euclidean",
                                           "interval": "student-t-95 over draws",
                                           "draw_rule": "per class, the k sample ids with the "
                                                        "smallest sha256('fewshot-SEED-DRAW:' "
                                                        "+ id)"}


def fewshot_metric_name(classifier: str, shots: int) -> str:
    """Results-table metric of ``classifier`` at ``shots`` (``fewshot_ridge_5shot``)."""
    return f"fewshot_{classifier}_{int(shots)}shot"


def row_metric_names(metric: str, options: dict[str, Any] | None = None) -> list[str]:
    """The results-table metrics registered metric ``metric`` writes (``[metric]`` unless it
    is a few-shot metric, which writes one per shot count)."""
    if metric not in ("fewshot_ridge", "fewshot_ncm"):
        return [metric]
    shots = (options or {}).get("fewshot_shots", FEWSHOT_SHOTS)
    return [fewshot_metric_name(metric.split("_", 1)[1], k) for k in shots]


def _rows(view: EpochView, classifier: str) -> list[MetricValue]:
    opts = getattr(view, "options", None) or {}
    shots = tuple(int(k) for k in opts.get("fewshot_shots", FEWSHOT_SHOTS))
    draws = int(opts.get("fewshot_draws", FEWSHOT_DRAWS))
    rows = []
    estimator = "ridge-loo" if classifier == "ridge" else "nearest-class-mean"
    for task in sorted(view.train.factors):
        if task not in view.test.factors:
            raise MetricInputError(f"few-shot: downstream task {task!r} has train labels but no "
                                   "test labels; label both splits")
        try:
            results = fewshot_accuracy(view.train.features, view.train.factors[task],
                                       view.test.features, view.test.factors[task],
                                       view.train.sample_ids, shots=shots, draws=draws,
                                       seed=view.seed, classifiers=(classifier,))
        except MetricInputError as exc:  # one class, NaN features: every shot count fails
            results = {(classifier, k): FewShotResult(classifier, k, float("nan"), [],
                                                      float("nan"), float("nan"), 0, 0,
                                                      error=str(exc)) for k in shots}
            warnings.warn(f"{task}: {exc}", stacklevel=2)
        counts = np.bincount(_host(view.test.factors[task]).reshape(-1).astype(np.int64)
                             .clip(0)) if len(view.test.factors[task]) else np.zeros(1)
        chance = float(counts.max() / max(counts.sum(), 1))
        for k in shots:
            res = results[(classifier, k)]
            params = {**FEWSHOT_METRIC_SETTINGS, "shots": k, "draws": draws, "seed": view.seed,
                      "classifier": classifier}
            if classifier == "ncm":
                params = {key: v for key, v in params.items() if not key.startswith("ridge")}
            name = fewshot_metric_name(classifier, k)
            if res.error is not None:
                if res.n_test:  # per shot count (a class too small); else warned above
                    warnings.warn(f"{task}: {res.error}", stacklevel=2)
                rows.append(MetricValue(name, float("nan"), task=task, estimator="error",
                                        params=params, diagnostics={"error": res.error}))
                continue
            diag: dict[str, Any] = {"draw_accuracies": res.draw_accuracies,
                                    "ci_low": res.ci_low, "ci_high": res.ci_high,
                                    "n_train": res.n_train, "n_test": res.n_test,
                                    "draw_ids_sha256": res.draw_digests, "chance": chance}
            if classifier == "ridge":
                diag.update(ridge_alphas=res.alphas, ridge_ratios=res.ratios,
                            ridge_at_grid_edge=res.at_grid_edge)
            rows.append(MetricValue(name, res.accuracy, task=task, estimator=estimator,
                                    params=params, diagnostics=diag))
    return rows


@register_metric("fewshot_ridge",
                 description="few-shot (1/5/10/25 per class) ridge accuracy per task, penalty by "
                             "leave-one-out (big_vision fewshot_lsr; Islam 2021)",
                 rows=tuple(fewshot_metric_name("ridge", k) for k in FEWSHOT_SHOTS))
def _fewshot_ridge(view: EpochView) -> list[MetricValue]:
    """Few-shot closed-form ridge accuracy of every downstream task, mean over draws."""
    return _rows(view, "ridge")


@register_metric("fewshot_ncm",
                 description="few-shot (1/5/10/25 per class) nearest-class-mean accuracy per task",
                 rows=tuple(fewshot_metric_name("ncm", k) for k in FEWSHOT_SHOTS))
def _fewshot_ncm(view: EpochView) -> list[MetricValue]:
    """Few-shot nearest-class-mean accuracy of every downstream task, mean over draws."""
    return _rows(view, "ncm")
