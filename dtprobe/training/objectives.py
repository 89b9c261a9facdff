"""Training objectives: the base class, the build context and the registry.

The trainer is objective-agnostic. An objective is an ``nn.Module`` that maps one batch
(images, penultimate features, logits, labels, dataset indices; for two-view objectives the
second view's features and logits as well) to a total loss and a dict of named loss terms for
logging. Its ``state_dict`` holds everything needed to resume (memory banks, projectors,
snapshots). Adding an objective is one decorated factory in its family module::

    @register_objective("label_smoothing", paper="Szegedy et al. 2016; Kornblith et al. 2021",
                        defaults={"alpha": 0.1})
    def _label_smoothing(ctx: ObjectiveContext, alpha: float) -> Objective: ...

Families: :mod:`dtprobe.training.kornblith` (the 9 objectives of Kornblith et al. 2021,
Table 1), :mod:`dtprobe.training.contrastive` (SupCon and the joint SimCLR objectives of Islam
et al. 2021), :mod:`dtprobe.training.trex` (t-ReX and t-ReX*, Sariyildiz et al. 2023) and
:mod:`dtprobe.training.ctc` (CTC, Cui et al. 2022).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from dtprobe.errors import ConfigError


class Objective(nn.Module):
    """Base class: plain softmax cross-entropy on the source labels.

    Class attributes
    ----------------
    name : registry name (recorded in the manifest).
    views : number of augmented views of each image the objective needs (1 or 2); a second view
        is drawn with its own generator, so view 1 stays identical to what CE sees.
    analysed_features : what the analysis reads, recorded in the manifest.
    """

    name = "ce"
    views = 1
    analysed_features = "penultimate (input of the classification head)"

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Extra parameters the optimiser must train (e.g. projection heads)."""
        return [p for p in self.parameters() if p.requires_grad]

    def start_epoch(self, epoch: int, model: nn.Module) -> None:
        """Hook called before each (1-based) epoch; CTC takes its temporal snapshot here."""

    def config(self) -> dict[str, Any]:
        """Hyperparameters, recorded in the run manifest."""
        return {"objective": self.name, **getattr(self, "hparams", {})}

    def eval_logits(self, features: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """Scores used for the source accuracy (default: the head's logits)."""
        return logits

    def export_model_state(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The model state written to an analysis checkpoint (default: unchanged). An objective
        whose predictions are not the head's plain logits (cosine softmax) rewrites the head
        here so that ``model(x).argmax(1)`` gives its predictions."""
        return state

    def all_reduce_gradients(self) -> None:
        """Average the objective's own parameters' gradients over ranks (they live outside DDP)."""
        if not (dist.is_available() and dist.is_initialized()):
            return
        world = dist.get_world_size()
        for p in self.trainable_parameters():
            if p.grad is not None:
                dist.all_reduce(p.grad)
                p.grad.div_(world)

    def forward(self, *, images: torch.Tensor, features: torch.Tensor, logits: torch.Tensor,
                labels: torch.Tensor, indices: torch.Tensor, epoch: int,
                **views: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        ce = F.cross_entropy(logits.float(), labels)
        return ce, {"ce": float(ce.detach())}


class CrossEntropyObjective(Objective):
    """Softmax cross-entropy on the source labels (the baseline every objective is compared with).

    ``L = -log softmax(z)_y`` with ``z = W h + b`` (Kornblith et al. 2021, Table 1, "Softmax").
    """


@dataclass
class ObjectiveContext:
    """What a factory may use to build its objective.

    Attributes
    ----------
    model : the (unwrapped) network, already on ``device``.
    head : its classification head (``nn.Linear``; input = penultimate features).
    feature_dim, num_classes, num_samples : shapes of the problem.
    train_labels : ``(N,)`` labels of the training split in index order.
    device : where training runs.
    seed : the run's seed.
    epochs : number of training epochs.
    feature_fn : ``feature_fn(model, images) -> features`` (penultimate), for snapshots.
    refresh_batches : un-augmented ``(images, indices)`` batches over the training set.
    head_name : dotted name of ``head`` in ``model`` (state-dict prefix).
    """

    model: nn.Module
    head: nn.Linear
    feature_dim: int
    num_classes: int
    num_samples: int
    train_labels: torch.Tensor
    device: torch.device
    seed: int = 0
    epochs: int = 1
    feature_fn: Callable[[nn.Module, torch.Tensor], torch.Tensor] | None = None
    refresh_batches: Callable[[], Iterable[tuple[torch.Tensor, torch.Tensor]]] | None = None
    head_name: str = "fc"


@dataclass(frozen=True)
class ObjectiveSpec:
    """A registered objective: its factory, the paper it comes from and its default parameters."""

    name: str
    factory: Callable[..., Objective]
    paper: str
    defaults: dict[str, Any] = field(default_factory=dict)
    description: str = ""


_OBJECTIVES: dict[str, ObjectiveSpec] = {}


def register_objective(name: str, *, paper: str, description: str = ""):
    """Register ``factory(ctx, **params) -> Objective`` as objective ``name``.

    The factory's keyword defaults are the objective's documented defaults (shown by
    ``dtprobe list`` and recorded in the manifest).
    """

    def decorator(factory: Callable[..., Objective]) -> Callable[..., Objective]:
        sig = inspect.signature(factory)
        defaults = {k: p.default for k, p in list(sig.parameters.items())[1:]
                    if p.default is not inspect.Parameter.empty}
        doc = description or (factory.__doc__ or "").strip().splitlines()[0]
        _OBJECTIVES[name] = ObjectiveSpec(name, factory, paper, defaults, doc)
        return factory

    return decorator


def _load_families() -> None:
    # Importing a family module registers its objectives.
    from dtprobe.training import contrastive, ctc, kornblith, trex  # noqa: F401, I001


def available_objectives() -> dict[str, ObjectiveSpec]:
    """Every registered objective by name."""
    _load_families()
    order = ["objectives", "kornblith", "contrastive", "trex", "ctc"]

    def rank(spec: ObjectiveSpec) -> int:
        family = spec.factory.__module__.rsplit(".", 1)[-1]
        return order.index(family) if family in order else len(order)

    return {s.name: s for s in sorted(_OBJECTIVES.values(), key=rank)}


def get_objective(name: str) -> ObjectiveSpec:
    specs = available_objectives()
    if name not in specs:
        raise ConfigError(f"unknown --objective {name!r}; available: {', '.join(specs)}")
    return specs[name]


def build_objective(name: str, ctx: ObjectiveContext, params: dict[str, Any] | None = None
                    ) -> Objective:
    """Build objective ``name`` with ``params`` overriding its defaults.

    Raises
    ------
    ConfigError
        Unknown objective or parameter, or a parameter out of range.
    """
    spec = get_objective(name)
    params = check_objective_params(name, params)
    objective = spec.factory(ctx, **{**spec.defaults, **params})
    objective.name = name
    return objective.to(ctx.device)


#: Every integer parameter of an objective is a size or a count (projection widths, bank sizes,
#: epochs): bounded here; each factory checks its own finer range.
_INT_LIMIT = 2**31 - 1
_KINDS = {"bool": "true or false", "int": f"an integer in [0, {_INT_LIMIT}]",
          "float": "a finite number", "str": "text", "None": "null"}


def _fits(value: Any, kind: str) -> bool:
    if kind == "None":
        return value is None
    if kind == "bool":
        return isinstance(value, bool)
    if kind == "int":
        return (isinstance(value, int) and not isinstance(value, bool)
                and 0 <= value <= _INT_LIMIT)
    if kind == "float":
        return (isinstance(value, (int, float)) and not isinstance(value, bool)
                and math.isfinite(value))
    return isinstance(value, str)


def _param_kinds(spec: ObjectiveSpec, key: str) -> list[str]:
    """The simple types a factory parameter takes, from its annotation (``float | None``) or,
    without one, its default's type; empty when the annotation is anything else."""
    param = inspect.signature(spec.factory).parameters[key]
    note = param.annotation
    if note is inspect.Parameter.empty:
        default = spec.defaults[key]
        note = "None" if default is None else type(default).__name__
    kinds = [k.strip() for k in (note if isinstance(note, str) else
                                 getattr(note, "__name__", str(note))).split("|")]
    return kinds if all(k in _KINDS for k in kinds) else []


def check_objective_params(name: str, params: dict[str, Any] | None) -> dict[str, Any]:
    """``params`` of objective ``name``, checked before anything is built: every key is one
    of its parameters and every value has a type the factory declares (a bool for a bool, an
    integer for an int, a finite number for a float, text for a str, null where ``None`` is
    allowed; integers are sizes or counts, so in ``[0, 2**31 - 1]``). The factory then checks
    its finer ranges. One-line :class:`ConfigError` otherwise."""
    spec = get_objective(name)
    params = dict(params or {})
    unknown = sorted(set(params) - set(spec.defaults), key=str)
    if unknown:
        valid = ", ".join(f"{k}={v}" for k, v in spec.defaults.items()) or "none"
        raise ConfigError(f"--objective-param {', '.join(map(str, unknown))}: not a parameter "
                          f"of {name} (valid, with defaults: {valid})")
    for key, value in params.items():
        kinds = _param_kinds(spec, key)
        if kinds and not any(_fits(value, k) for k in kinds):
            shown = repr(value) if len(repr(value)) <= 40 else repr(value)[:37] + "..."
            raise ConfigError(f"--objective-param {key}={shown} for {name} must be "
                              f"{' or '.join(_KINDS[k] for k in kinds)} "
                              f"(default {spec.defaults[key]!r})")
    return params


def check_positive(objective: str, **values: float) -> None:
    """One-line :class:`ConfigError` for a non-positive or non-finite hyperparameter."""
    for key, value in values.items():
        if not (isinstance(value, (int, float)) and value == value and 0 < value < float("inf")):
            raise ConfigError(f"--objective-param {key}={value!r} for {objective} must be a "
                              "positive finite number")


def check_range(objective: str, key: str, value: float, lo: float, hi: float,
                *, hi_open: bool = False) -> None:
    ok = isinstance(value, (int, float)) and lo <= value
    ok = ok and (value < hi if hi_open else value <= hi)
    if not ok:
        bracket = ")" if hi_open else "]"
        raise ConfigError(f"--objective-param {key}={value!r} for {objective} must lie in "
                          f"[{lo}, {hi}{bracket}")


def safe_normalize(x: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Rows of ``x`` divided by their L2 norm; rows with norm <= ``eps`` become exactly 0 with a
    zero gradient (``F.normalize`` would return 0 with a gradient of order ``1/eps``, which
    turns weights into inf/NaN one step later)."""
    norm = x.norm(dim=-1, keepdim=True)
    ok = norm > eps
    return torch.where(ok, x / torch.where(ok, norm, torch.ones_like(norm)), torch.zeros_like(x))


@register_objective("ce", paper="Kornblith et al. 2021 (softmax baseline)",
                    description="softmax cross-entropy (the baseline)")
def _ce(ctx: ObjectiveContext) -> Objective:
    return CrossEntropyObjective()
