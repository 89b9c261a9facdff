"""Source-task accuracy of a checkpoint's own classification head."""

from __future__ import annotations

import torch

from dtprobe.metrics._validation import ArrayLike, as_tensor, check_labels
from dtprobe.metrics.registry import EpochView, MetricValue, register_metric


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
    return [MetricValue("source_accuracy", top1_accuracy(view.test.logits, view.test.labels),
                        estimator="head-top1", params={"split": "test"})]
