"""t-ReX and t-ReX* (Sariyildiz et al. 2023), as the authors' released code trains them.

The projector ``g`` maps the penultimate features ``h`` to the space where the classification
loss is computed and is thrown away after training: ``g(h) = Linear_256,nobias([Linear_2048,
BatchNorm1d, GELU] x 3 (L2norm(h)))``, every Linear initialised ``trunc_normal(std=0.02)`` with
zero bias. The analysed features are ``h``, taken *before* the projector (recorded in the
manifest as ``analysed_features``).

* ``trex`` (the authors' ``memory_size=0``): CE of a bias-free cosine classifier on the projector
  output, ``logits = normalize(g(h)) @ normalize(W).T / tau`` (``W`` a ``Linear(256, K,
  bias=False)`` with PyTorch's default initialisation).
* ``trex_star`` (the authors' training-script default, ``memory_size=8192``): the class weights
  are the L2-normalised per-class sums (equivalently means) of a memory of projector outputs;
  ``logits = normalize(g(h)) @ weights.T / tau``. The weights carry no gradient. After the
  logits are computed, the memory is filled (FIFO, a batch that overflows the end is truncated
  and the pointer wraps to 0) with the projector outputs of the *global* crop computed by an
  exponential-moving-average copy of the network and projector (momentum 0.999 per step, updated
  just before that forward, no gradient, in training mode as the authors' copy is). The memory
  starts as ``randn`` rows with uniformly random labels, as the authors'.
* Multi-crop (``local_crops``, default 8 as in the authors' script): extra random-resized crops
  of area scale ``(0.05, 0.25)`` at ``96/224`` of the image side (at least 8 px) pass through the
  network; the projector runs once on the features of all crops together (its BatchNorm sees
  them in one batch, as the authors' ``MultiCropWrapper``) and one CE is taken over all crops
  with the labels repeated.

Differences from the authors' recipe, kept on purpose: the global crop is the view every other
dtprobe objective sees (the source-task augmentation; the authors' global crop is a
RandomResizedCrop of scale 0.25-1 with colour jitter, blur and solarisation), so runs compare
objectives on identical data; the local crops are crop + flip only. The model's own head
``fc`` is fitted on the detached features ``h`` (term ``probe_ce``, no gradient reaches the
encoder), so every checkpoint's source accuracy is that of a linear classifier of the analysed
features. Optimiser, schedule and weight decay are the trainer's (the authors': SGD 0.1 x
batch/256, 10 warm-up epochs, cosine to 1e-6, weight decay 1e-4 on non-bias non-norm
parameters, 100 epochs). Under DDP the memory is filled with the embeddings all-gathered from
every rank, as the authors'.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn

from dtprobe.errors import ConfigError
from dtprobe.references import with_references
from dtprobe.training.augment import random_resized_crop
from dtprobe.training.objectives.base import (
    Objective,
    ObjectiveContext,
    check_positive,
    safe_normalize,
)
from dtprobe.training.objectives.memory_bank import all_gather_rows
from dtprobe.training.objectives.registry import register_objective

__doc__ = with_references(
    __doc__,
    ("sariyildiz2023",
     "; code: https://github.com/naver/trex (``trex.py``, ``main.py``, ``multi_crop.py``)"),
)

PAPER = "Sariyildiz et al. 2023"
LOCAL_SCALE = (0.05, 0.25)
LOCAL_SIDE = 96 / 224  # the authors' local crops: 96 px on 224 px images


def _wide(x: torch.Tensor) -> torch.Tensor:
    """``x`` in float32 at least (half-precision outputs widened, float64 kept)."""
    return x if x.dtype == torch.float64 else x.float()


class Projector(nn.Module):
    """``L2norm -> [Linear(hidden), BatchNorm1d, GELU] x layers -> Linear(out_dim, bias=False)``,
    Linear layers initialised ``trunc_normal(std=0.02)``, biases 0 (the authors' ``Projector``)."""

    def __init__(self, in_dim: int, hidden: int = 2048, layers: int = 3, out_dim: int = 256):
        super().__init__()
        blocks: list[nn.Module] = []
        d = in_dim
        for _ in range(layers):
            blocks += [nn.Linear(d, hidden), nn.BatchNorm1d(hidden), nn.GELU()]
            d = hidden
        self.mlp = nn.Sequential(*blocks)
        self.out = nn.Linear(d, out_dim, bias=False)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.out(self.mlp(safe_normalize(h)))


def memory_class_weights(memory: torch.Tensor, memory_labels: torch.Tensor,
                         num_classes: int) -> torch.Tensor:
    """L2-normalised per-class sums of the memory rows (a class with no row gives 0)."""
    sums = torch.zeros(num_classes, memory.shape[1], dtype=memory.dtype, device=memory.device)
    sums.index_add_(0, memory_labels, memory)
    return safe_normalize(sums)


def cosine_classifier_logits(z: torch.Tensor, weights: torch.Tensor, tau: float) -> torch.Tensor:
    """``normalize(z) @ normalize(weights).T / tau`` (bias-free)."""
    return safe_normalize(z) @ safe_normalize(weights).T / tau


class TReX(Objective):
    """t-ReX / t-ReX*; see the module docstring."""

    analysed_features = "penultimate, BEFORE the t-ReX projector (the projector is discarded)"

    def __init__(self, ctx: ObjectiveContext, *, prototypes: bool, hidden: int, layers: int,
                 out_dim: int, tau: float, bank_size: int, local_crops: int, ema: float):
        super().__init__()
        object.__setattr__(self, "_head", ctx.head)
        object.__setattr__(self, "_model", ctx.model)
        object.__setattr__(self, "_feature_fn", ctx.feature_fn)
        self.prototypes = prototypes
        self.num_classes = ctx.num_classes
        self.tau = float(tau)
        self.local_crops = int(local_crops)
        self.ema = float(ema)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(ctx.seed + 104729)
            self.projector = Projector(ctx.feature_dim, hidden, layers, out_dim)
            if prototypes:
                self.register_buffer("bank", torch.randn(bank_size, out_dim))
                self.register_buffer("bank_labels",
                                     torch.randint(0, ctx.num_classes, (bank_size,)))
            else:
                self.classifier = nn.Linear(out_dim, ctx.num_classes, bias=False)
        if prototypes:
            self.register_buffer("bank_ptr", torch.zeros((), dtype=torch.long))
            # The EMA copy of network + projector that fills the memory (no gradient).
            self.model_ema = copy.deepcopy(ctx.model)
            self.projector_ema = copy.deepcopy(self.projector)
            for p in [*self.model_ema.parameters(), *self.projector_ema.parameters()]:
                p.requires_grad_(False)
        self.views = 1 + self.local_crops
        self.hparams = {"hidden": hidden, "layers": layers, "out_dim": out_dim, "tau": tau,
                        "classifier": "class weights from a memory of EMA projector outputs"
                        if prototypes else "bias-free cosine classifier on the projector output",
                        "bank_size": bank_size if prototypes else None,
                        "ema": ema if prototypes else None,
                        "local_crops": local_crops,
                        "local_crop": {"scale": list(LOCAL_SCALE), "side": "96/224 of the image"}
                        if local_crops else None,
                        "analysed_features": self.analysed_features,
                        "model_head": "linear classifier on detached features, trained online"}

    def extra_views(self, images: torch.Tensor, generator: torch.Generator) -> list[torch.Tensor]:
        size = max(8, round(images.shape[-1] * LOCAL_SIDE))
        return [random_resized_crop(images, generator, LOCAL_SCALE, (3 / 4, 4 / 3), size=size)
                for _ in range(self.local_crops)]

    def _logits(self, z: torch.Tensor) -> torch.Tensor:
        if self.prototypes:
            weights = memory_class_weights(self.bank, self.bank_labels, self.num_classes)
            return cosine_classifier_logits(z, weights.to(z.dtype), self.tau)
        return cosine_classifier_logits(z, self.classifier.weight, self.tau)

    @torch.no_grad()
    def _update_ema(self) -> None:
        pairs = [(self._model, self.model_ema), (self.projector, self.projector_ema)]
        for live, shadow in pairs:
            for p, q in zip(live.parameters(), shadow.parameters(), strict=True):
                q.mul_(self.ema).add_(p.detach(), alpha=1.0 - self.ema)

    @torch.no_grad()
    def _enqueue(self, z: torch.Tensor, labels: torch.Tensor) -> None:
        z, labels = all_gather_rows(z.detach()), all_gather_rows(labels)
        n = len(self.bank)
        ptr = int(self.bank_ptr)
        take = min(len(z), n - ptr)  # the authors truncate a batch that overflows the end
        self.bank[ptr:ptr + take] = z[:take].to(self.bank.dtype)
        self.bank_labels[ptr:ptr + take] = labels[:take]
        self.bank_ptr.fill_((ptr + take) % n)

    def uninformative_losses(self, batch_size: int, num_classes: int) -> dict[str, float]:
        """ln K for both CE terms (the cosine classifier's best input-blind output is uniform)."""
        return {**super().uninformative_losses(batch_size, num_classes),
                "projector_ce": math.log(num_classes)}

    def forward(self, *, images, features, labels, **views):
        names = [k for k in views if k.startswith("features") and k[8:].isdigit()]
        crops = [views[k] for k in sorted(names, key=lambda k: int(k[8:]))]
        z = self.projector(torch.cat([features, *crops]))
        ce = F.cross_entropy(_wide(self._logits(z)), labels.repeat(1 + len(crops)))
        probe = F.cross_entropy(_wide(self._head(features.detach())), labels)
        if self.prototypes and self.training:
            self._update_ema()
            with torch.no_grad():
                z_ema = self.projector_ema(self._feature_fn(self.model_ema, images))
            self._enqueue(z_ema, labels)
        return ce + probe, {"projector_ce": float(ce.detach()), "probe_ce": float(probe.detach())}


def _make(ctx: ObjectiveContext, name: str, prototypes: bool, hidden: int, layers: int,
          out_dim: int, tau: float, bank_size: int, local_crops: int, ema: float) -> Objective:
    check_positive(name, tau=tau)
    for key, value, low in (("hidden", hidden, 1), ("layers", layers, 0),
                            ("out_dim", out_dim, 1), ("bank_size", bank_size, 1),
                            ("local_crops", local_crops, 0)):
        if int(value) != value or value < low:
            raise ConfigError(f"--objective-param {key}={value!r} for {name} must be an integer "
                              f">= {low}")
    if not (isinstance(ema, (int, float)) and 0 <= ema < 1):
        raise ConfigError(f"--objective-param ema={ema!r} for {name} must lie in [0, 1)")
    if prototypes and ctx.feature_fn is None:
        raise ConfigError(f"{name} needs the trainer's feature function (train it with "
                          "dtprobe train)")
    return TReX(ctx, prototypes=prototypes, hidden=int(hidden), layers=int(layers),
                out_dim=int(out_dim), tau=tau, bank_size=int(bank_size),
                local_crops=int(local_crops), ema=float(ema))


@register_objective("trex", paper=PAPER)
def _trex(ctx: ObjectiveContext, hidden: int = 2048, layers: int = 3, out_dim: int = 256,
          tau: float = 0.1, local_crops: int = 8) -> Objective:
    """CE of a cosine classifier through an expendable projector (features analysed before it)"""
    return _make(ctx, "trex", False, hidden, layers, out_dim, tau, 1, local_crops, 0.0)


@register_objective("trex_star", paper=PAPER)
def _trex_star(ctx: ObjectiveContext, hidden: int = 2048, layers: int = 3, out_dim: int = 256,
               tau: float = 0.1, bank_size: int = 8192, local_crops: int = 8,
               ema: float = 0.999) -> Objective:
    """t-ReX*: projector + class weights from a memory of EMA projector outputs"""
    return _make(ctx, "trex_star", True, hidden, layers, out_dim, tau, bank_size, local_crops,
                 ema)
