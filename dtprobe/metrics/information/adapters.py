"""Analysis adapters: ``I(X;T)`` and ``I(T;Y)`` of each checkpoint's test split.

``X`` is ``view.test.inputs`` (flattened normalised pixels; when it holds fewer rows than the
features, its rows are taken to be the first rows of the split), ``T`` the penultimate test
features and ``Y`` the test labels. Every adapter emits rows named ``mi_xt`` or ``mi_ty`` with
the estimator in the ``estimator`` column and its parameters (unit included) in ``params``, so
estimators can be compared in one tidy table. Without inputs, ``I(X;T)`` adapters return no
row. The default pair uses the matrix-based Renyi estimator on a fixed seeded subsample of
:data:`DEFAULT_SAMPLES` rows so it stays fast; the other estimators are opt-in
(``--metrics mi_xt_kde`` ...).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from dtprobe.metrics.information.binning import binning_mi
from dtprobe.metrics.information.kde import kde_mi
from dtprobe.metrics.information.ksg import ksg_mi
from dtprobe.metrics.information.neural import infonce_mi, mine_mi
from dtprobe.metrics.information.renyi import renyi_mi
from dtprobe.metrics.registry import EpochView, MetricValue, register_metric

DEFAULT_SAMPLES = 500
"""Rows used by the default Renyi adapters (three 500 x 500 eigensolves per checkpoint)."""

VARIANT_SAMPLES = 2000
"""Rows used by the opt-in estimators (KDE, binning, KSG, MINE, InfoNCE)."""


def _xt(view: EpochView) -> tuple[torch.Tensor, torch.Tensor] | None:
    x = view.test.inputs
    if x is None:
        return None
    x = x.reshape(x.shape[0], -1)
    return x, view.test.features[: x.shape[0]]


def _ty(view: EpochView) -> tuple[torch.Tensor, torch.Tensor]:
    return view.test.features, view.test.labels


def _register(name: str, quantity: str, estimator: Callable[..., Any], settings: dict[str, Any],
              *, default: bool = False, description: str) -> None:
    metric = "mi_xt" if quantity == "xt" else "mi_ty"
    pick = _xt if quantity == "xt" else _ty

    def adapter(view: EpochView) -> list[MetricValue]:
        pair = pick(view)
        if pair is None:
            return []
        res = estimator(*pair, seed=view.seed, **settings)
        return [MetricValue(metric, float(res.value), estimator=res.estimator,
                            params={**res.params, "unit": res.unit},
                            diagnostics=dict(res.diagnostics))]

    adapter.__name__ = adapter.__qualname__ = f"_{name}"
    adapter.__doc__ = description
    register_metric(name, default=default, description=description, rows=(metric,))(adapter)


_RENYI = {"alpha": 1.01, "sigma": "scott", "max_samples": DEFAULT_SAMPLES}
_register("mi_xt", "xt", renyi_mi, _RENYI, default=True,
          description="I(X;T) test inputs vs features, matrix Renyi (alpha 1.01, Scott width)")
_register("mi_ty", "ty", renyi_mi, _RENYI, default=True,
          description="I(T;Y) test features vs labels, matrix Renyi (alpha 1.01, Scott width)")

_KDE = {"noise_var": 0.1, "bound": "upper", "max_samples": VARIANT_SAMPLES}
_BINNING = {"n_bins": 30, "max_samples": VARIANT_SAMPLES}
_NEURAL = {"max_samples": VARIANT_SAMPLES}
for _q, _what in (("xt", "I(X;T)"), ("ty", "I(T;Y)")):
    _register(f"mi_{_q}_kde", _q, kde_mi, _KDE,
              description=f"{_what}, KDE pairwise-distance upper bound (noise_var 0.1)")
    _register(f"mi_{_q}_binning", _q, binning_mi, _BINNING,
              description=f"{_what}, plug-in MI of 30-bin discretised features")
    _register(f"mi_{_q}_mine", _q, mine_mi, _NEURAL,
              description=f"{_what}, MINE Donsker-Varadhan bound (as in the CTC paper)")
    _register(f"mi_{_q}_infonce", _q, infonce_mi, _NEURAL,
              description=f"{_what}, InfoNCE bound with a separable critic")
_register("mi_ty_ksg", "ty", ksg_mi, {"k": 3, "max_samples": VARIANT_SAMPLES},
          description="I(T;Y), Ross (2014) k-NN estimator, k = 3")
