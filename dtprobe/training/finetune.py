"""Full-network fine-tuning of one checkpoint on a downstream dataset, with a fixed recipe.

The second finding of Kornblith et al. (2021) is that the source loss matters little once the
whole network is fine-tuned; Islam et al. (2021) report fine-tuning next to linear and few-shot
transfer. :func:`finetune` measures it for one checkpoint: the source model (its weights as
loaded), its classification head replaced by a linear layer for the target classes set to the
closed-form ridge classifier of the frozen features (the linear-probe step of LP-FT, Kumar et al.
2022), then every weight trained.

The recipe (:data:`FINETUNE_RECIPE`, recorded in every row's ``params``) is fixed, short enough
for a CPU at the embedded default's sizes:

- a stratified validation split (20%, seeded) is carved from the target's training split;
- BatchNorm statistics are re-estimated on the images of the rest (one pass; at epoch 0 the
  stored statistics are the initial 0/1 and a head fitted on them explodes in train mode);
- the new head is the ridge classifier (penalty by leave-one-out) of the frozen penultimate
  features of the rest (eval mode, not standardised), so the short schedule starts from the
  linear probe's solution instead of spending its steps on a zero head (measured on the
  embedded default: with a zero head, 4 epochs at these rates left digits near chance,
  0.18-0.34, against 0.81-0.90 for the frozen linear probe); ``head_init="zeros"`` gives BiT's
  zero head;
- for each learning rate of a small grid, train on the rest with SGD (momentum 0.9, weight
  decay 5e-4), batch 64, a per-step cosine schedule from the learning rate to 0 over
  ``epochs`` epochs, no warm-up; BatchNorm in train mode while training, eval mode to score;
  light augmentation (the trainer's random shift with 1/8 zero padding, no flip: a flip changes
  the label of digits and orientations); the images are the target prepared for the source
  model (its resolution, channels and normalisation, :mod:`dtprobe.data.transfer`) and are
  indexed batch by batch (an image store is streamed, never held whole);
- the learning rate with the best validation accuracy (ties: the smaller) is chosen, and the
  test accuracy of the model trained at that rate is reported (no refit on train + validation,
  which would double the cost).

A fine-tune whose loss becomes NaN/Inf or exceeds :data:`MAX_LOSS` stops at once and that
learning rate is dropped; when every rate diverges the result carries a one-line ``error`` and a
NaN accuracy.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from dtprobe.errors import MetricInputError
from dtprobe.references import with_references
from dtprobe.training.augment import shift_flip

__doc__ = with_references(
    __doc__,
    ("kornblith2021", "(fine-tuning erases the differences between losses)"),
    ("islam2021", "(linear, fine-tuning and few-shot transfer)"),
    ("kornblith2019transfer",
     "(fine-tuning with a learning-rate grid chosen on a validation split)"),
    ("kumar2022", "(LP-FT: linear probe, then fine-tune)"),
)

__all__ = ["FINETUNE_RECIPE", "FineTuneResult", "finetune"]

#: The fixed recipe (recorded in every ``finetune_accuracy`` row).
FINETUNE_RECIPE: dict[str, Any] = {
    "optimizer": "sgd", "momentum": 0.9, "weight_decay": 5e-4, "nesterov": False,
    "epochs": 4, "batch_size": 64, "lr_grid": (0.003, 0.01, 0.03),
    "schedule": "cosine per step to 0, no warm-up", "val_fraction": 0.2,
    "augment": "crop", "head_init": "ridge on raw frozen features (LP-FT)",
    "batchnorm": "statistics re-estimated on the fit split, then train mode",
    "selection": "best validation accuracy (ties: smaller lr); no refit",
}
#: A loss above this (or NaN/Inf) stops the fine-tune at that learning rate as diverged.
MAX_LOSS = 1e4
_EVAL_BATCH = 512


@dataclass
class FineTuneResult:
    """Outcome of :func:`finetune`.

    ``test_accuracy`` is that of the learning rate chosen on validation (NaN with ``error``
    when every rate diverged); ``val_accuracy``/``test_by_lr`` map each rate tried to its
    accuracies (NaN for a diverged one); ``diverged`` lists the rates that diverged.
    """

    test_accuracy: float
    best_lr: float | None
    val_accuracy: dict[float, float]
    test_by_lr: dict[float, float]
    diverged: list[float] = field(default_factory=list)
    n_train: int = 0
    n_val: int = 0
    n_test: int = 0
    steps: int = 0
    seconds: float = 0.0
    error: str | None = None
    head_train_accuracy: float = float("nan")  # the LP-FT head before fine-tuning


def _split(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    from dtprobe.metrics.probes import stratified_split

    return stratified_split(labels, fraction, seed=seed)


def _replace_head(model: nn.Module, head: str, n_classes: int) -> nn.Linear:
    old = model.get_submodule(head)
    if not isinstance(old, nn.Linear):
        raise MetricInputError(f"fine-tune: head {head!r} is a {type(old).__name__}, expected "
                               "nn.Linear")
    new = nn.Linear(old.in_features, n_classes, bias=True).to(old.weight.device)
    nn.init.zeros_(new.weight)
    nn.init.zeros_(new.bias)
    parent_name, _, leaf = head.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, leaf, new)
    return new


@torch.no_grad()
def _recalibrate_batchnorm(model: nn.Module, images: Any, index: np.ndarray,
                           device: torch.device) -> None:
    """Re-estimate every BatchNorm's running statistics on the target images ``index`` (a
    cumulative average over one pass in train mode): the source's statistics (or, at epoch 0,
    the initial 0/1) do not describe the target, and the probe head is fitted on eval-mode
    features that must match what train-mode BatchNorm then computes."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return
    saved = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average over the pass
    model.train()
    try:
        for start in range(0, len(index), _EVAL_BATCH):
            rows = torch.as_tensor(index[start:start + _EVAL_BATCH])
            model(images[rows].to(device, torch.float32))
    finally:
        for m, momentum in zip(norms, saved, strict=True):
            m.momentum = momentum


@torch.no_grad()
def _probe_head(model: nn.Module, head: nn.Linear, images: Any, labels: torch.Tensor,
                index: np.ndarray, device: torch.device) -> float:
    """Set ``head`` to the closed-form ridge classifier of the frozen features of ``index``
    (penalty by leave-one-out, :class:`~dtprobe.metrics.fewshot.FewShotRidge`), folded back to
    raw features: the linear-probe step of LP-FT (Kumar et al. 2022). Returns its training
    accuracy."""
    from dtprobe.metrics.fewshot import FewShotRidge
    from dtprobe.models.tap import penultimate_features

    model.eval()
    feats = []
    for start in range(0, len(index), _EVAL_BATCH):
        rows = torch.as_tensor(index[start:start + _EVAL_BATCH])
        feats.append(penultimate_features(model, head, images[rows].to(device, torch.float32))
                     .double().cpu())
    x = torch.cat(feats)
    y = labels[torch.as_tensor(index)]
    # raw features (no per-feature standardisation): a near-constant feature, standardised and
    # folded back, gets a weight of ~1/std that blows up once the features move (measured: some
    # fine-tunes collapsed to chance from such a head)
    ridge = FewShotRidge(standardize=False).fit(x, y)
    coef = torch.as_tensor(ridge.coef_ / ridge.scale_[:, None])  # (d, C) on raw features
    bias = torch.as_tensor(ridge.intercept_) - torch.as_tensor(ridge.mean_) @ coef
    # ridge.classes_ are 0..C-1 here (labels re-indexed by the caller); a class absent from
    # the fit split keeps a zero row, i.e. never wins
    weight = torch.zeros_like(head.weight, dtype=torch.float64)
    full_bias = torch.full_like(head.bias, -1.0, dtype=torch.float64)
    cls = torch.as_tensor(ridge.classes_).long()
    weight[cls] = coef.T
    full_bias[cls] = bias
    head.weight.copy_(weight.to(head.weight))
    head.bias.copy_(full_bias.to(head.bias))
    return float(ridge.score(x, y))


@torch.no_grad()
def _accuracy(model: nn.Module, images: Any, labels: torch.Tensor, index: np.ndarray,
              device: torch.device) -> float:
    model.eval()
    correct = 0
    for start in range(0, len(index), _EVAL_BATCH):
        rows = torch.as_tensor(index[start:start + _EVAL_BATCH])
        x = images[rows].to(device, torch.float32)
        pred = model(x).argmax(dim=1).cpu()
        correct += int((pred == labels[rows]).sum())
    return correct / max(len(index), 1)


def _train_at(model: nn.Module, images: Any, labels: torch.Tensor, index: np.ndarray, lr: float,
              recipe: dict[str, Any], generator: torch.Generator, device: torch.device
              ) -> tuple[bool, int]:
    """Train ``model`` in place; returns (diverged, steps)."""
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=recipe["momentum"],
                          weight_decay=recipe["weight_decay"], nesterov=recipe["nesterov"])
    batch = int(recipe["batch_size"])
    per_epoch = math.ceil(len(index) / batch)
    total = per_epoch * int(recipe["epochs"])
    loss_fn = nn.CrossEntropyLoss()
    step = 0
    model.train()  # BatchNorm in train mode: its statistics adapt to the target images
    for _ in range(int(recipe["epochs"])):
        order = torch.as_tensor(index)[torch.randperm(len(index), generator=generator)]
        for start in range(0, len(order), batch):
            rows = order[start:start + batch]
            x = images[rows].to(torch.float32)
            x = shift_flip(x.cpu(), recipe["augment"], generator).to(device)
            for group in opt.param_groups:
                group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / total))
            loss = loss_fn(model(x), labels[rows].to(device))
            value = float(loss.detach())
            if not math.isfinite(value) or value > MAX_LOSS:
                return True, step
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
    return False, step


def finetune(model: nn.Module, head: str, train_images: Any, train_labels: torch.Tensor,
             test_images: Any, test_labels: torch.Tensor, *, seed: int = 0,
             recipe: dict[str, Any] | None = None, device: torch.device | str = "cpu",
             ) -> FineTuneResult:
    """Fine-tune every weight of ``model`` (a loaded checkpoint) on a target task.

    Parameters
    ----------
    model : the source network with its checkpoint's weights; not modified (copied per rate).
    head : dotted name of its classification head (an ``nn.Linear``), replaced by one for the
        target's classes (the ridge probe of the frozen features, or zeros).
    train_images, test_images : normalised ``(n, C, H, W)`` tensors or indexable image sets
        (:class:`~dtprobe.data.pixels.RawImages`), prepared for the source model.
    train_labels, test_labels : int64 target classes.
    seed : seeds the validation split, the data order and the augmentation.
    recipe : :data:`FINETUNE_RECIPE` with any entries replaced (tests use a shorter one).
    device : where to train.

    Returns
    -------
    FineTuneResult

    Raises
    ------
    MetricInputError
        Fewer than two target classes or too few images to hold out a validation split.
    """
    rec = {**FINETUNE_RECIPE, **(recipe or {})}
    device = torch.device(device)
    t0 = time.perf_counter()
    y_train = torch.as_tensor(train_labels).long().cpu()
    y_test = torch.as_tensor(test_labels).long().cpu()
    classes = torch.unique(y_train)
    if classes.numel() < 2:
        raise MetricInputError(f"fine-tune: the training split has {classes.numel()} class; "
                               "at least 2 are needed")
    # targets as 0..C-1 over the training classes (a test class absent from train counts wrong)
    lookup = {int(c): i for i, c in enumerate(classes.tolist())}
    y_train = torch.tensor([lookup[int(v)] for v in y_train.tolist()])
    y_test = torch.tensor([lookup.get(int(v), -1) for v in y_test.tolist()])
    fit_idx, val_idx = _split(y_train.numpy(), float(rec["val_fraction"]), seed)
    test_idx = np.arange(len(y_test))
    base = copy.deepcopy(model).to(device)
    new_head = _replace_head(base, head, int(classes.numel()))
    probe_acc = float("nan")
    if rec["head_init"] != "zeros":
        _recalibrate_batchnorm(base, train_images, fit_idx, device)
        probe_acc = _probe_head(base, new_head, train_images, y_train, fit_idx, device)
    start_state = copy.deepcopy(base.state_dict())
    val_acc: dict[float, float] = {}
    test_acc: dict[float, float] = {}
    diverged: list[float] = []
    steps = 0
    for i, lr in enumerate(rec["lr_grid"]):
        lr = float(lr)
        base.load_state_dict(start_state)
        gen = torch.Generator().manual_seed(seed * 1000 + i)
        bad, n = _train_at(base, train_images, y_train, fit_idx, lr, rec, gen, device)
        steps += n
        if bad:
            diverged.append(lr)
            val_acc[lr] = test_acc[lr] = float("nan")
            continue
        val_acc[lr] = _accuracy(base, train_images, y_train, val_idx, device)
        test_acc[lr] = _accuracy(base, test_images, y_test, test_idx, device)
    ok = [lr for lr in val_acc if lr not in diverged]
    result = FineTuneResult(float("nan"), None, val_acc, test_acc, diverged, len(fit_idx),
                            len(val_idx), len(test_idx), steps, head_train_accuracy=probe_acc)
    if not ok:
        result.error = (f"fine-tune diverged (NaN/Inf or loss > {MAX_LOSS:g}) at every learning "
                        f"rate {list(rec['lr_grid'])}; the checkpoint or the recipe's rates are "
                        "unusable for this dataset")
    else:
        best = max(ok, key=lambda lr: (val_acc[lr], -lr))
        result.best_lr, result.test_accuracy = best, test_acc[best]
    result.seconds = time.perf_counter() - t0
    return result
