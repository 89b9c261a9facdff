"""Named training recipes: the training facts of a paper's released code, applied to any objective.

A recipe fixes *how* a run is regularised, initialised and checkpointed, not the objective:
``dtprobe train --recipe kornblith2021 --objective label_smoothing`` trains label smoothing the
way Kornblith et al. (2021) trained every one of their objectives. The manifest's ``training``
record holds the recipe's name and every resolved value (``recipe``, ``recipe_resolved``).

``kornblith2021`` (google-research/google-research ``loss_functions_transfer/load_model.py`` and
``resnet_model.py``):

* weight decay ``8e-5`` added to the loss as ``wd * l2_loss`` (``tf.nn.l2_loss(v) =
  ||v||^2 / 2``) over every trainable variable except BatchNorm variables and biases. Its
  gradient is ``wd * v``, which is exactly what ``torch.optim.SGD(weight_decay=wd)`` adds
  before momentum, so dtprobe applies it through the optimiser on two parameter groups
  (decayed: every parameter that is neither a normalisation layer's nor named ``bias``;
  not decayed: the rest). An objective's own trainable parameters follow the same rule.
* the final dense layer's kernel initialised from ``N(0, 0.01^2)`` (``stddev=.01``), its bias 0
  (``tf.layers.dense``'s default).
* the checkpoints hold the exponential moving average of the weights (the authors' released
  checkpoints are restored from the ``/ExponentialMovingAverage`` shadow of *every* global
  variable, BatchNorm moving statistics included). dtprobe keeps the shadow of every
  floating-point parameter and buffer and writes it as the checkpoint the analysis reads; the raw
  weights stay in the resume state. The released code does not state the decay; dtprobe uses
  TensorFlow's ``ExponentialMovingAverage(decay, num_updates=step)`` convention of the TPU
  reference trainers, ``d_t = min(decay, (1 + t) / (10 + t))`` with ``decay = 0.9999``. With
  ``num_updates`` the cap ``0.9999`` binds only after about 90,000 steps (the paper's ResNet-50
  runs had about 28,000), so on both ImageNet and small data the shadow averages over roughly
  the last ninth of the steps so far. ``ema_decay`` (``--recipe-param``) changes the cap.

Not part of the recipe (the released code does not contain the training script): the
optimiser's learning rate, schedule, batch size and epochs stay dtprobe's flags.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from dtprobe.errors import ConfigError

#: Module types whose parameters are never decayed (the authors exclude ``batch_normalization``).
NORM_LAYERS: tuple[type[nn.Module], ...] = (nn.modules.batchnorm._NormBase, nn.GroupNorm,
                                            nn.LayerNorm)


@dataclass(frozen=True)
class Recipe:
    """A named set of training facts (see the module docstring)."""

    name: str
    source: str
    weight_decay: float
    decay_excludes_norm_and_bias: bool
    head_init_std: float | None
    ema_decay: float | None
    ema_num_updates: bool

    def resolved(self) -> dict[str, Any]:
        """Everything the recipe sets, for the manifest."""
        out = asdict(self)
        out["weight_decay_convention"] = ("wd * l2_loss(v) = wd * ||v||^2 / 2 added to the loss "
                                          "(SGD weight_decay=wd), non-norm non-bias parameters")
        out["head_init"] = (f"weight ~ N(0, {self.head_init_std}^2), bias 0"
                            if self.head_init_std is not None else "architecture default")
        out["checkpoint_weights"] = ("exponential moving average (every float parameter and "
                                     "buffer)" if self.ema_decay is not None else "raw")
        return out


RECIPES: dict[str, Recipe] = {
    "kornblith2021": Recipe(
        name="kornblith2021",
        source=("Kornblith et al. 2021, google-research/google-research loss_functions_transfer "
                "(load_model.py, resnet_model.py)"),
        weight_decay=8e-5, decay_excludes_norm_and_bias=True, head_init_std=0.01,
        ema_decay=0.9999, ema_num_updates=True),
}


def get_recipe(name: str | None, params: dict[str, Any] | None = None) -> Recipe | None:
    """The recipe ``name`` with ``params`` (``ema_decay``) applied; ``None`` for no recipe.

    Raises
    ------
    ConfigError
        Unknown recipe or parameter, or an EMA decay outside ``[0, 1)``.
    """
    params = dict(params or {})
    if name is None:
        if params:
            raise ConfigError("--recipe-param needs --recipe (available: "
                              f"{', '.join(RECIPES)})")
        return None
    if name not in RECIPES:
        raise ConfigError(f"unknown --recipe {name!r}; available: {', '.join(RECIPES)}")
    recipe = RECIPES[name]
    unknown = sorted(set(params) - {"ema_decay"})
    if unknown:
        raise ConfigError(f"--recipe-param {', '.join(unknown)}: not a parameter of recipe "
                          f"{name} (valid: ema_decay={recipe.ema_decay})")
    if "ema_decay" in params:
        d = params["ema_decay"]
        if not (isinstance(d, (int, float)) and not isinstance(d, bool) and 0 <= d < 1):
            raise ConfigError(f"--recipe-param ema_decay={d!r} must lie in [0, 1)")
        recipe = Recipe(**{**asdict(recipe), "ema_decay": float(d)})
    return recipe


def is_decayed(module: nn.Module, param_name: str) -> bool:
    """Whether the parameter ``param_name`` of ``module`` (its owner) is weight-decayed under the
    authors' rule: neither a normalisation layer's variable nor a bias."""
    return not isinstance(module, NORM_LAYERS) and param_name != "bias"


def split_decay(modules: list[nn.Module]) -> tuple[list[nn.Parameter], list[nn.Parameter],
                                                   list[str]]:
    """The trainable parameters of ``modules``: ``(decayed, not_decayed, decayed_names)``; a
    parameter shared by two modules is listed once."""
    decayed: list[nn.Parameter] = []
    kept: list[nn.Parameter] = []
    names: list[str] = []
    seen: set[int] = set()
    for root_index, root in enumerate(modules):
        for mod_name, module in root.named_modules():
            for p_name, p in module.named_parameters(recurse=False):
                if id(p) in seen or not p.requires_grad:
                    continue
                seen.add(id(p))
                full = f"{mod_name}.{p_name}" if mod_name else p_name
                if is_decayed(module, p_name):
                    decayed.append(p)
                    names.append(full if root_index == 0 else f"objective.{full}")
                else:
                    kept.append(p)
    return decayed, kept, names


def init_head(head: nn.Linear, std: float, generator: torch.Generator | None = None) -> None:
    """Kernel from ``N(0, std^2)``, bias 0 (the authors' final dense layer)."""
    with torch.no_grad():
        head.weight.normal_(0.0, std, generator=generator)
        if head.bias is not None:
            head.bias.zero_()


class WeightEMA:
    """Exponential moving average of a model's floating-point state (parameters and buffers),
    TensorFlow's ``ExponentialMovingAverage`` convention.

    After optimiser step ``t`` (1-based), ``shadow = d_t shadow + (1 - d_t) value`` with
    ``d_t = min(decay, (1 + t) / (10 + t))`` when ``num_updates`` (else ``d_t = decay``);
    integer buffers (BatchNorm's batch counter) are copied. The shadow starts at the initial
    weights.
    """

    def __init__(self, model: nn.Module, decay: float, num_updates: bool = True):
        self.decay = float(decay)
        self.num_updates = bool(num_updates)
        self.shadow = {k: v.detach().clone() for k, v in model.state_dict().items()}

    def rate(self, step: int) -> float:
        """The decay ``d_t`` applied after step ``step``."""
        if self.num_updates:
            return min(self.decay, (1.0 + step) / (10.0 + step))
        return self.decay

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        d = self.rate(step)
        for key, value in model.state_dict().items():
            shadow = self.shadow[key]
            if shadow.is_floating_point():
                shadow.mul_(d).add_(value.detach().to(shadow.dtype), alpha=1.0 - d)
            else:
                shadow.copy_(value)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.clone() for k, v in self.shadow.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        missing = set(self.shadow) ^ set(state)
        if missing:
            raise KeyError(f"EMA state does not fit the model ({sorted(missing)[:3]})")
        for k, v in state.items():
            self.shadow[k].copy_(v)
