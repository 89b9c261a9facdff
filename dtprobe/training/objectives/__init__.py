"""Training objectives: the base class, the registry, and one module per family.

The trainer is objective-agnostic. An objective is an ``nn.Module`` that maps one batch
(images, penultimate features, logits, labels, dataset indices; for two-view objectives the
second view's features and logits as well) to a total loss and a dict of named loss terms for
logging. Its ``state_dict`` holds everything needed to resume (memory banks, projectors,
snapshots). Adding an objective is one decorated factory in its family module::

    @register_objective("label_smoothing", paper="Szegedy et al. 2016; Kornblith et al. 2021",
                        defaults={"alpha": 0.1})
    def _label_smoothing(ctx: ObjectiveContext, alpha: float) -> Objective: ...

- :mod:`~dtprobe.training.objectives.base`: :class:`Objective`, :class:`ObjectiveContext`,
  parameter checks (imports no family and not the registry);
- :mod:`~dtprobe.training.objectives.registry`: ``register_objective`` and the look-ups
  (imports no family);
- families, registered by importing them here (as :mod:`dtprobe.data` and :mod:`dtprobe.models`
  do): :mod:`~.cross_entropy` (the softmax baseline), :mod:`~.kornblith` (the 9 objectives of
  Kornblith et al. 2021, as their released code computes them), :mod:`~.contrastive` (Islam et
  al. 2021's MoCo-based objectives as their code computes them, and the in-batch SupCon /
  SimCLR joints), :mod:`~.trex` (t-ReX and t-ReX*, Sariyildiz et al. 2023, as their code),
  :mod:`~.ctc` (CTC, Cui et al. 2022; memory banks in :mod:`~.memory_bank`).

Training facts that are not a loss (weight-decay convention, head initialisation, EMA
checkpoints) are named recipes: :mod:`dtprobe.training.recipes`.

``dtprobe.training.objectives`` (formerly one module) keeps its names: they are re-exported here.
"""

from __future__ import annotations

from dtprobe.training.objectives import (  # noqa: F401  (imported to register their objectives)
    contrastive,
    cross_entropy,
    ctc,
    kornblith,
    trex,
)
from dtprobe.training.objectives.base import (
    Objective,
    ObjectiveContext,
    check_positive,
    check_range,
    safe_normalize,
)
from dtprobe.training.objectives.cross_entropy import CrossEntropyObjective
from dtprobe.training.objectives.registry import (
    ObjectiveSpec,
    available_objectives,
    build_objective,
    check_objective_params,
    get_objective,
    register_objective,
)

__all__ = [
    "CrossEntropyObjective",
    "Objective",
    "ObjectiveContext",
    "ObjectiveSpec",
    "available_objectives",
    "build_objective",
    "check_objective_params",
    "check_positive",
    "check_range",
    "get_objective",
    "register_objective",
    "safe_normalize",
]
