"""Source-task accuracy of a checkpoint's own classification head, and the Wilson interval
every test accuracy of dtprobe carries (:func:`accuracy_interval`)."""

from __future__ import annotations

import math

import torch

from dtprobe.errors import ConfigError
from dtprobe.metrics._validation import ArrayLike, as_tensor, check_labels
from dtprobe.metrics.registry import EpochView, MetricValue, register_metric

#: Confidence level and method of the intervals recorded with every test accuracy (source
#: head, linear and kNN probes, fine-tuning).
CI_LEVEL = 0.95
CI_METHOD = f"wilson-{CI_LEVEL * 100:.0f}"


def accuracy_interval(accuracy: float, n: int, level: float = CI_LEVEL) -> tuple[float, float]:
    """Wilson score confidence interval of an accuracy measured on ``n`` test samples.

    The test samples are treated as independent Bernoulli trials; the interval is

    .. math:: \\frac{\\hat p + z^2/2n \\pm z\\sqrt{\\hat p(1-\\hat p)/n + z^2/4n^2}}{1 + z^2/n}

    with ``z`` the two-sided normal quantile of ``level``.  Unlike the normal (Wald)
    interval it stays inside [0, 1] and is not degenerate at 0 or 100% accuracy.  It covers
    test-set sampling noise only, not the variation from the probe's own seed.

    Returns
    -------
    (low, high) : floats; ``(nan, nan)`` when ``n`` is 0 or the accuracy is NaN.

    References
    ----------
    .. [1] E. B. Wilson, "Probable inference, the law of succession, and statistical
       inference", JASA 22 (1927).
    .. [2] L. D. Brown, T. T. Cai, A. DasGupta, "Interval Estimation for a Binomial
       Proportion", Statistical Science 16 (2001) (recommends Wilson over Wald).
    """
    if not 0.0 < float(level) < 1.0:
        raise ConfigError(f"level must be in (0, 1), got {level}")
    p = float(accuracy)
    if int(n) <= 0 or not math.isfinite(p):
        return float("nan"), float("nan")
    from scipy.stats import norm

    z = float(norm.ppf(0.5 + float(level) / 2.0))
    n = int(n)
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)




def top1_accuracy(logits: ArrayLike, labels: ArrayLike) -> float:
    """Fraction of rows whose arg-max logit equals the label.

    Parameters
    ----------
    logits : (n, C) scores of the source head.
    labels : (n,) integer labels in ``0..C-1``.

    Returns
    -------
    float in [0, 1].
    """
    scores = as_tensor(logits, dtype=torch.float32)
    y = as_tensor(labels, dtype=torch.int64, device=scores.device).reshape(-1)
    check_labels(y, scores.shape[0], min_classes=1)
    return float((scores.argmax(dim=1) == y).double().mean())


@register_metric("source_accuracy", default=True,
                 description="top-1 accuracy of the checkpoint's own head on the source test split")
def _source_accuracy(view: EpochView) -> list[MetricValue]:
    if view.test.logits is None:
        return []
    accuracy = top1_accuracy(view.test.logits, view.test.labels)
    n_test = int(view.test.logits.shape[0])
    low, high = accuracy_interval(accuracy, n_test, CI_LEVEL)
    return [MetricValue("source_accuracy", accuracy, estimator="head-top1",
                        params={"split": "test", "ci_method": CI_METHOD},
                        diagnostics={"n_test": n_test, "ci_low": low, "ci_high": high})]
