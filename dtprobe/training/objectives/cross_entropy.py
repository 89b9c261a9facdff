"""Softmax cross-entropy, the baseline every objective is compared with (Kornblith et al. 2021).
"""

from __future__ import annotations

from dtprobe.references import with_references
from dtprobe.training.objectives.base import Objective, ObjectiveContext
from dtprobe.training.objectives.registry import register_objective

__doc__ = with_references(__doc__, "kornblith2021")


class CrossEntropyObjective(Objective):
    """Softmax cross-entropy on the source labels (the baseline every objective is compared with).

    ``L = -log softmax(z)_y`` with ``z = W h + b`` (Kornblith et al. 2021, Table 1, "Softmax").
    """


@register_objective("ce", paper="Kornblith et al. 2021 (softmax baseline)",
                    description="softmax cross-entropy (the baseline)")
def _ce(ctx: ObjectiveContext) -> Objective:
    return CrossEntropyObjective()
