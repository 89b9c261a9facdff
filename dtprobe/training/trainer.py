"""The bundled trainer: writes a checkpoint series plus a manifest, with any registered objective.

Runs made with the same seed differ only in the objective (``--objective``, see
:mod:`dtprobe.training.objectives.base`): the data order, augmentation, optimiser (SGD with
momentum)
and schedule are identical, which the CTC paper's reference code did not guarantee. An
objective that needs a second view of each image (SupCon, SimCLR joints) or extra crops
(t-ReX multi-crop) gets them from its own generator, so its first view is still the one
every other objective sees; the manifest records the views.

Schedules (``schedule``)
    ``"default"`` (the default): linear warm-up over ``warmup_epochs``, then one cosine to 0
    over the whole run, one weight decay throughout.
    ``"reference"``: the CTC reference code's two-phase recipe, for every objective (so the CE
    baseline gets it too): epochs ``1..S`` a cosine from ``lr`` towards 0 with no warm-up and
    weight decay ``stage1_weight_decay`` (default 1e-3, the README presets' value); epochs
    ``S+1..end`` a restart at ``0.1 * lr`` with its own cosine and ``weight_decay``.
    ``S = switch_epoch`` (default: CTC's ``stage_two_epoch``, else 2/3 of the run).

A NaN, Inf or exploding loss or gradient (``|loss| > max_loss``) stops the run before the
optimiser step with one line naming the epoch, the objective and the last good checkpoint
(:class:`~dtprobe.errors.TrainingDivergedError`); checkpoints already saved are intact.
"""

from __future__ import annotations

import contextlib
import copy
import csv
import hashlib
import io
import math
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

import checkpoints_manifest as cm
from dtprobe.checkpoints import reader as ckpt_io
from dtprobe.data import DatasetBundle, load_dataset
from dtprobe.errors import CheckpointError, ConfigError, TrainingDivergedError, first_line
from dtprobe.models import build_model, get_arch, head_module
from dtprobe.models.tap import PenultimateTap, penultimate_features
from dtprobe.runtime import distributed as dist_utils
from dtprobe.runtime.devices import resolve_device
from dtprobe.runtime.progress import tqdm
from dtprobe.training.augment import contrastive_view, shift_flip
from dtprobe.training.objectives import build_objective as build_registered_objective
from dtprobe.training.objectives.base import Objective, ObjectiveContext
from dtprobe.training.recipes import WeightEMA, get_recipe, init_head, split_decay

RESUME_FILE = "resume_state.pt"
DEFAULT_WEIGHT_DECAY = 5e-4
_RESUME_KEYS = ("epoch", "step", "model", "optimizer", "objective", "torch_rng", "entry")


@dataclass
class TrainConfig:
    """Everything that defines a training run (recorded in the manifest's ``training`` field)."""

    out: str = "runs/shapes-ce"
    dataset: str = "shapes"
    dataset_params: dict[str, Any] = field(default_factory=dict)
    arch: str = "small_cnn"
    arch_params: dict[str, Any] = field(default_factory=dict)
    epochs: int = 30
    batch_size: int = 128
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float | None = None  # None: the recipe's value, else 5e-4
    warmup_epochs: int = 1
    augment: str = "auto"
    save_every: int = 2
    seed: int = 0
    device: str = "auto"
    objective: str = "ce"
    objective_params: dict[str, Any] = field(default_factory=dict)
    ctc: dict[str, Any] = field(default_factory=dict)
    schedule: str = "default"
    recipe: str | None = None
    recipe_params: dict[str, Any] = field(default_factory=dict)
    switch_epoch: int | None = None
    stage1_weight_decay: float | None = None
    max_loss: float = 1e8
    resume: bool = False
    stop_after: int | None = None
    progress: bool = True
    run_name: str | None = None


def _lr_at(step: int, total_steps: int, warmup_steps: int, base_lr: float) -> float:
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return base_lr * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def reference_schedule(step: int, steps_per_epoch: int, epochs: int, switch_epoch: int,
                       base_lr: float) -> float:
    """The CTC reference code's two-phase learning rate at (0-based) ``step``: a cosine from
    ``base_lr`` over epochs ``1..S``, then a restart at ``0.1 * base_lr`` with its own cosine
    over epochs ``S+1..epochs``; no warm-up (Cui et al. 2022, DTennant/dt-tradeoff)."""
    s1 = steps_per_epoch * switch_epoch
    if step < s1:
        return base_lr * 0.5 * (1.0 + math.cos(math.pi * step / s1))
    s2 = max(1, steps_per_epoch * (epochs - switch_epoch))
    return 0.1 * base_lr * 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - s1) / s2)))


def _grad_norm(params: list[nn.Parameter]) -> torch.Tensor:
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    return torch.nn.utils.get_total_norm(grads)


_augment = shift_flip  # the source-task augmentation (kept under its old name)


def _epoch_generator(seed: int, epoch: int) -> torch.Generator:
    # Seeded per epoch, so data order and augmentation depend only on (seed, epoch): CE and CTC see
    # the same batches, and a resumed run replays exactly what an uninterrupted one would.
    return torch.Generator().manual_seed(seed * 1_000_003 + epoch)


def objective_params(cfg: TrainConfig) -> dict[str, Any]:
    """The objective's parameters: ``objective_params``, plus the legacy ``ctc`` dict for CTC."""
    params = dict(cfg.ctc) if cfg.objective == "ctc" else {}
    params.update(cfg.objective_params)
    if cfg.objective == "ctc" and cfg.schedule == "reference" and cfg.switch_epoch is not None:
        params.setdefault("stage_two_epoch", cfg.switch_epoch)
    return params


def build_objective(cfg: TrainConfig, bundle: DatasetBundle, model: nn.Module,
                    device: torch.device) -> Objective:
    """The registered objective ``cfg.objective`` for ``model`` (see ``dtprobe list``)."""
    head = head_module(model, cfg.arch)
    with torch.no_grad():
        was_training = model.training
        model.eval()
        feature_dim = penultimate_features(model, head, bundle.train.images[:2].to(device)).shape[1]
        model.train(was_training)

    def feature_fn(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return penultimate_features(m, head_module(m, cfg.arch), x)

    def refresh_batches():
        # Un-augmented pass over the training set, used once when CTC's stage 2 starts to fill
        # both banks with current embeddings (the reference code's --update_memory_bank).
        n = len(bundle.train)
        for start in range(0, n, 512):
            idx = torch.arange(start, min(n, start + 512))
            yield bundle.train.images[idx].to(device), idx.to(device)

    ctx = ObjectiveContext(model=model, head=head, feature_dim=int(feature_dim),
                           num_classes=bundle.num_classes, num_samples=len(bundle.train),
                           train_labels=bundle.train.labels, device=device, seed=cfg.seed,
                           epochs=cfg.epochs, feature_fn=feature_fn,
                           refresh_batches=refresh_batches, head_name=get_arch(cfg.arch).head)
    return build_registered_objective(cfg.objective, ctx, objective_params(cfg))


#: Log column: fraction of test images whose penultimate features are all exactly 0.
DEAD_FEATURES_COLUMN = "test_dead_feature_rows"


@torch.no_grad()
def evaluate_accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor,
                      device: torch.device, batch_size: int = 512,
                      objective: Objective | None = None, head: nn.Module | None = None,
                      feature_stats: dict[str, float] | None = None) -> float:
    """Top-1 accuracy of ``model``'s own head (eval mode), or of ``objective.eval_logits``.

    With ``head`` and a ``feature_stats`` dict, also stores there the fraction of images whose
    penultimate features (the head's input) are all exactly 0 (:data:`DEAD_FEATURES_COLUMN`).
    """
    was_training = model.training
    model.eval()
    correct = dead = 0
    tapped = head is not None and (objective is not None or feature_stats is not None)
    tap = PenultimateTap(head) if tapped else None
    try:
        for start in range(0, len(labels), batch_size):
            x = images[start:start + batch_size].to(device, non_blocking=True)
            with dist_utils.autocast(device):
                logits = model(x)
            if tap is not None:
                dead += int((tap.features.flatten(1) == 0).all(dim=1).sum())
            if tap is not None and objective is not None:
                logits = objective.eval_logits(tap.features.float(), logits.float())
            correct += int((logits.argmax(1).cpu() == labels[start:start + batch_size]).sum())
    finally:
        if tap is not None:
            tap.remove()
    model.train(was_training)
    if feature_stats is not None and tap is not None:
        feature_stats[DEAD_FEATURES_COLUMN] = dead / max(1, len(labels))
    return correct / max(1, len(labels))


#: Train-log columns ``uninformative_<term>``: the value ``train_<term>`` takes when the model's
#: outputs carry no information about the input (``Objective.uninformative_losses``).
UNINFORMATIVE_PREFIX = "uninformative_"
#: The per-epoch training log in the run folder.
TRAIN_LOG_FILE = "train_log.csv"
#: A term within this relative distance of that value for :data:`STUCK_EPOCHS` epochs in a row
#: is stuck (a collapse is exact: 1e-5 to 2e-4 was seen; a model that learns leaves by > 2e-3).
STUCK_RTOL = 1e-3
STUCK_EPOCHS = 3


def stuck_terms(log: list[dict[str, float]]) -> dict[str, float]:
    """The terms that stayed at their no-information value over the last :data:`STUCK_EPOCHS`
    epochs of ``log`` (one metrics dict per epoch, oldest first), with that value."""
    if len(log) < STUCK_EPOCHS:
        return {}
    recent = log[-STUCK_EPOCHS:]
    stuck = {}
    for key, floor in recent[-1].items():
        if not key.startswith(UNINFORMATIVE_PREFIX):
            continue
        term = key[len(UNINFORMATIVE_PREFIX):]
        if all(key in m and abs(m.get(f"train_{term}", math.inf) - m[key])
               <= STUCK_RTOL * abs(m[key]) for m in recent):
            stuck[term] = floor
    return stuck


def stuck_loss_message(run: str, epoch: int, stuck: dict[str, float]) -> str:
    """The one line said when loss terms stay at their no-information value."""
    terms = ", ".join(f"{t} = {v:.4f}" for t, v in stuck.items())
    return (f"[{run}] WARNING: epochs {epoch - STUCK_EPOCHS + 1}-{epoch}: the loss terms stayed "
            "at their value when the model's outputs carry no information about the input "
            f"({terms}; columns {UNINFORMATIVE_PREFIX}* of {TRAIN_LOG_FILE}): the model is "
            "learning nothing from them (a collapsed head or projection gives no gradient); "
            "try another --lr or tau, another objective or dataset (README: 'stuck-loss "
            "warning')")


def dead_embedding_message(run: str, epoch: int) -> str:
    """The one line said when every test image's penultimate features are 0."""
    return (f"[{run}] WARNING: at epoch {epoch} every test image's penultimate features are 0 "
            "(a dead ReLU embedding): this objective is not training this architecture and "
            "the analysis's metrics of these checkpoints will be degenerate; try a lower --lr, "
            "another objective, or an architecture with BatchNorm before its last ReLU")


class Trainer:
    """Train one run and write ``cfg.out/manifest.json`` plus its checkpoints.

    Parameters
    ----------
    cfg : TrainConfig
        The run definition; ``cfg.objective`` selects ``"ce"`` or ``"ctc"``.
    """

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg

    # ----------------------------------------------------------------- setup
    def _setup(self) -> None:
        cfg = self.cfg
        self.dist = dist_utils.init_from_env(cfg.device)
        self.device = self.dist.device if self.dist.enabled else resolve_device(cfg.device)
        self.out = Path(cfg.out)
        self.recipe = get_recipe(cfg.recipe, cfg.recipe_params)
        torch.manual_seed(cfg.seed)
        try:
            self.bundle = load_dataset(cfg.dataset, **cfg.dataset_params)
        except TypeError as exc:  # an unknown --dataset-param
            raise ConfigError(f"--dataset-param for {cfg.dataset}: {exc}") from exc
        spec = get_arch(cfg.arch)
        arch_params = {"in_channels": self.bundle.in_channels, **cfg.arch_params}
        self.arch_params = arch_params
        try:
            model = build_model(cfg.arch, self.bundle.num_classes, **arch_params)
        except TypeError as exc:  # an unknown --arch-param
            raise ConfigError(f"--arch-param for {cfg.arch}: {exc}") from exc
        self.model = model.to(self.device)
        if self.device.type == "cuda":
            self.model = self.model.to(memory_format=torch.channels_last)
        self.head = head_module(self.model, cfg.arch)
        self.head_name = spec.head
        if self.recipe is not None and self.recipe.head_init_std is not None:
            init_head(self.head, self.recipe.head_init_std)  # global RNG, seeded above
        self.objective = build_objective(cfg, self.bundle, self.model, self.device)
        self.train_params = (list(self.model.parameters())
                             + list(self.objective.trainable_parameters()))
        if cfg.schedule not in ("default", "reference"):
            raise ConfigError(f"--schedule {cfg.schedule!r}: choose 'default' or 'reference'")
        self.switch_epoch = self._switch_epoch()
        self.decayed_names: list[str] | None = None
        if self.recipe is not None and self.recipe.decay_excludes_norm_and_bias:
            decayed, kept, self.decayed_names = split_decay([self.model, self.objective])
            groups = [{"params": decayed, "decay": True}, {"params": kept, "decay": False,
                                                            "weight_decay": 0.0}]
        else:
            groups = [{"params": self.train_params, "decay": True}]
        self.optimizer = torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum,
                                         weight_decay=self._weight_decay(1))
        self.ema = (WeightEMA(self.model, self.recipe.ema_decay, self.recipe.ema_num_updates)
                    if self.recipe is not None and self.recipe.ema_decay is not None else None)
        self._eval_model: nn.Module | None = None
        self.ddp_model = self.dist.wrap(self.model)
        n = len(self.bundle.train)
        self.per_rank_batch = max(1, cfg.batch_size // self.dist.world_size)
        self.steps_per_epoch = math.ceil(n / cfg.batch_size)
        self.total_steps = self.steps_per_epoch * cfg.epochs
        self.warmup_steps = self.steps_per_epoch * cfg.warmup_epochs
        self.augment = cfg.augment
        if self.augment == "auto":
            self.augment = "none" if cfg.dataset in ("shapes", "digits") else "crop-flip"
        self.step = 0

    def _switch_epoch(self) -> int | None:
        cfg = self.cfg
        if cfg.schedule != "reference":
            return None
        s = cfg.switch_epoch
        if s is None:
            s = getattr(getattr(self.objective, "cfg", None), "stage_two_epoch", None)
        if s is None:
            s = max(1, round(cfg.epochs * 2 / 3))
        if not 1 <= int(s) < cfg.epochs:
            raise ConfigError(f"--switch-epoch {s} must lie in 1..{cfg.epochs - 1} (the last "
                              "epoch of stage 1)")
        return int(s)

    def _weight_decay(self, epoch: int) -> float:
        cfg = self.cfg
        if self.switch_epoch is not None and epoch <= self.switch_epoch:
            return 1e-3 if cfg.stage1_weight_decay is None else cfg.stage1_weight_decay
        return self._base_weight_decay()

    def _base_weight_decay(self) -> float:
        """``weight_decay``, else the recipe's, else :data:`DEFAULT_WEIGHT_DECAY`."""
        if self.cfg.weight_decay is not None:
            return self.cfg.weight_decay
        return self.recipe.weight_decay if self.recipe is not None else DEFAULT_WEIGHT_DECAY

    def _lr(self) -> float:
        cfg = self.cfg
        if self.switch_epoch is not None:
            return reference_schedule(self.step, self.steps_per_epoch, cfg.epochs,
                                      self.switch_epoch, cfg.lr)
        return _lr_at(self.step, self.total_steps, self.warmup_steps, cfg.lr)

    def _last_good_checkpoint(self) -> str:
        try:
            entries = cm.read_manifest(self.out).checkpoints
        except Exception:  # noqa: BLE001 - only for the message
            return "none"
        return str(self.out / entries[-1].path) if entries else "none"

    def _diverged(self, epoch: int, what: str, value: float, terms: dict[str, float]) -> None:
        shown = " ".join(f"{k}={v:.4g}" for k, v in terms.items())
        raise TrainingDivergedError(
            f"epoch {epoch}: objective {self.cfg.objective} {what} became {value:.4g} "
            f"({shown}); last good checkpoint: {self._last_good_checkpoint()}; lower --lr or "
            "change --objective-param, then train again (--resume continues from it)")

    def _extra_views(self, epoch: int, images: torch.Tensor, b: int) -> list[torch.Tensor]:
        """Views beyond the first, from their own generator (view 1 stays CE's)."""
        n_extra = self.objective.views - 1
        if n_extra <= 0:
            return []
        gen = torch.Generator().manual_seed((self.cfg.seed * 1_000_003 + epoch) * 7 + 1
                                            + 1_000_000_007 * b)
        make = getattr(self.objective, "extra_views", None)
        if make is not None:
            return make(images, gen)
        return [contrastive_view(images, gen) for _ in range(n_extra)]

    def _training_record(self) -> dict[str, Any]:
        record = asdict(self.cfg)
        for transient in ("resume", "stop_after", "progress", "device", "out"):
            record.pop(transient, None)
        record["augment"] = self.augment
        record["objective_config"] = self.objective.config()
        record["objective_params"] = objective_params(self.cfg)
        record["analysed_features"] = self.objective.analysed_features
        record["views"] = self.objective.views
        if self.switch_epoch is not None:
            record["schedule_resolved"] = {
                "switch_epoch": self.switch_epoch, "warmup_epochs": 0,
                "stage1": {"lr": self.cfg.lr, "weight_decay": self._weight_decay(1)},
                "stage2": {"lr": 0.1 * self.cfg.lr, "weight_decay": self._base_weight_decay()}}
        record["weight_decay"] = self._base_weight_decay()
        if self.recipe is not None:
            record["recipe_resolved"] = {**self.recipe.resolved(),
                                         "weight_decay": self._base_weight_decay(),
                                         "decayed_parameters": self.decayed_names}
        record["world_size"] = self.dist.world_size
        return record

    def _new_manifest(self) -> None:
        cm.write_manifest(self.out, cm.create_manifest(
            run_name=self.cfg.run_name or self.out.name,
            model=cm.ModelSpec(arch=self.cfg.arch, kwargs=self.arch_params,
                               num_classes=self.bundle.num_classes, penultimate=self.head_name),
            dataset=cm.DatasetSpec(name=self.bundle.name, params=self.bundle.params),
            training=self._training_record(), seed=self.cfg.seed))

    # ----------------------------------------------------------- checkpoints
    def _checkpoint_state(self) -> dict[str, torch.Tensor]:
        """The weights written for the analysis: the EMA shadow under a recipe with EMA."""
        return self.ema.state_dict() if self.ema is not None else self.model.state_dict()

    def _evaluate(self) -> dict[str, float]:
        """``test_acc`` of the weights the checkpoint holds (plus ``test_acc_raw``, the trained
        weights, when the checkpoint holds their EMA)."""
        images, labels = self.bundle.test.images, self.bundle.test.labels
        stats: dict[str, float] = {}
        raw = evaluate_accuracy(self.model, images, labels, self.device,
                                objective=self.objective, head=self.head, feature_stats=stats)
        if self.ema is None:
            return {"test_acc": raw, **stats}
        if self._eval_model is None:
            self._eval_model = copy.deepcopy(self.model)
        # The exported state makes the plain head's argmax the objective's prediction.
        self._eval_model.load_state_dict(self.objective.export_model_state(self.ema.state_dict()))
        ema = evaluate_accuracy(self._eval_model, images, labels, self.device)
        return {"test_acc": ema, "test_acc_raw": raw, **stats}

    def _save(self, epoch: int, metrics: dict[str, float]) -> None:
        """Checkpoint file, then resume state, then manifest entry: a kill between any two steps
        leaves a run that ``--resume`` continues and a manifest that names only complete files."""
        if not self.dist.is_main:
            return
        rel = f"checkpoints/epoch_{epoch:04d}.pt"
        path = self.out / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        # Hash the bytes written, not the file read back (which another process could swap).
        digest = _atomic_torch_save(
            {"model": self.objective.export_model_state(self._checkpoint_state()),
             "epoch": epoch, "step": self.step}, path)
        entry = cm.CheckpointEntry(epoch=epoch, step=self.step, path=rel,
                                   sha256=digest, metrics=metrics, time=time.time())
        _atomic_torch_save({
            "epoch": epoch, "step": self.step,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "objective": self.objective.state_dict(),
            "torch_rng": torch.get_rng_state(),
            "entry": entry.to_dict(),
            **({"ema": self.ema.state_dict()} if self.ema is not None else {}),
        }, self.out / RESUME_FILE)
        cm.append_checkpoint(self.out, entry, replace=True)

    def _can_resume(self) -> bool:
        """Whether ``--resume`` has saved state to continue from.

        A run killed before its first checkpoint was complete has nothing to continue: it is
        started afresh (that is what resuming it means). A run whose manifest lists checkpoints
        but whose resume state is gone cannot be continued exactly, which is an error.
        """
        if (self.out / RESUME_FILE).exists():
            return True
        manifest_file = self.out / cm.MANIFEST_NAME
        if manifest_file.exists() and cm.read_manifest(self.out).checkpoints:
            raise ConfigError(f"{self.out / RESUME_FILE}: missing, so the run cannot be continued "
                              "although its manifest lists checkpoints; restore the file or "
                              "train into a new --out")
        if self.dist.is_main:
            tqdm.write(f"[{self.out.name}] nothing was saved yet; starting the run from scratch")
        return False

    def _try_resume(self) -> int:
        """Restore the latest resume state; return the epoch to start from (1-based)."""
        state_path = self.out / RESUME_FILE
        if not state_path.exists():
            raise ConfigError(f"{state_path}: nothing to resume; start the run without --resume")
        try:  # written atomically, so only damage from outside gets here
            state = ckpt_io.safe_torch_load(state_path)
        except CheckpointError as exc:  # keep the reason, not the advice for weight files
            reason = str(exc).removeprefix(f"{state_path}: ").split("; ")[0]
            raise ConfigError(f"{state_path}: cannot use the resume state ({reason}); restore "
                              "it or train into a new --out") from None
        missing = [k for k in _RESUME_KEYS if not isinstance(state, dict) or k not in state]
        if missing:
            raise ConfigError(f"{state_path}: not a resume state written by dtprobe train (no "
                              f"{', '.join(missing[:3])}); restore it or train into a new --out")
        manifest = cm.read_manifest(self.out)
        epochs = {c.epoch for c in manifest.checkpoints}
        if state["epoch"] not in epochs and self.dist.is_main:
            # Killed after the checkpoint and its resume state were written, before the manifest
            # entry: the file is complete (written atomically), so record it now.
            cm.append_checkpoint(self.out, cm.CheckpointEntry.from_dict(state["entry"]),
                                 replace=True)
        try:
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
            if len(state["objective"]):
                self.objective.load_state_dict(state["objective"])
            if self.ema is not None:
                self.ema.load_state_dict(state["ema"])
            torch.set_rng_state(state["torch_rng"].cpu())
            self.step = int(state["step"])
            return int(state["epoch"]) + 1
        except (RuntimeError, KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ConfigError(f"{state_path}: the resume state does not fit this run "
                              f"({type(exc).__name__}: {first_line(str(exc), 120)}); "
                              "restore it or train into a new --out") from None

    # -------------------------------------------------------------- training
    def _run_epoch(self, epoch: int) -> dict[str, float]:
        cfg, bundle = self.cfg, self.bundle
        self.objective.start_epoch(epoch, self.model)
        self.objective.train()
        wd = self._weight_decay(epoch)  # the reference schedule resets it at the switch
        for group in self.optimizer.param_groups:
            if group.get("decay", True):  # the recipe's no-decay group stays at 0
                group["weight_decay"] = wd
        self.ddp_model.train()
        gen = _epoch_generator(cfg.seed, epoch)
        order = torch.randperm(len(bundle.train), generator=gen)
        tap = PenultimateTap(self.head)
        sums: dict[str, float] = {}
        seen = correct = 0
        batches = range(self.steps_per_epoch)
        bar = tqdm(batches, desc=f"epoch {epoch}/{cfg.epochs}", leave=False,
                   disable=not (cfg.progress and self.dist.is_main))
        try:
            for b in bar:
                global_idx = order[b * cfg.batch_size:(b + 1) * cfg.batch_size]
                raw = bundle.train.images[global_idx]
                aug = _augment(raw, self.augment, gen)
                extra = [v[self.dist.rank::self.dist.world_size]
                         for v in self._extra_views(epoch, raw, b)]
                idx = global_idx[self.dist.rank::self.dist.world_size]
                images = aug[self.dist.rank::self.dist.world_size]
                if len(idx) == 0:
                    continue
                lr = self._lr()
                for group in self.optimizer.param_groups:
                    group["lr"] = lr
                x = images.to(self.device, non_blocking=True)
                if self.device.type == "cuda":
                    x = x.to(memory_format=torch.channels_last)
                y = bundle.train.labels[idx].to(self.device, non_blocking=True)
                with dist_utils.autocast(self.device):
                    logits = self.ddp_model(x)
                features = tap.features.float()
                views: dict[str, torch.Tensor] = {}
                for v, view in enumerate(extra, start=2):
                    view = view.to(self.device)
                    with dist_utils.autocast(self.device):
                        views[f"logits{v}"] = self.ddp_model(view).float()
                    views[f"features{v}"] = tap.features.float()
                    views[f"images{v}"] = view  # for momentum (key) encoders
                loss, terms = self.objective(images=x, features=features,
                                             logits=logits.float(), labels=y,
                                             indices=idx.to(self.device), epoch=epoch, **views)
                value = float(loss.detach())
                if not math.isfinite(value) or abs(value) > cfg.max_loss:
                    self._diverged(epoch, "loss", value, terms)
                if self.dist.enabled:
                    # Objectives that score their own head transform (cosine softmax, SupCon,
                    # t-ReX) leave some model outputs unused; DDP needs a gradient for every
                    # parameter, and 0 * logits gives exactly zero.
                    loss = loss + 0.0 * logits.float().sum()
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if self.dist.enabled:
                    self.objective.all_reduce_gradients()  # projectors live outside DDP
                grad_norm = float(_grad_norm(self.train_params))
                if not math.isfinite(grad_norm):
                    self._diverged(epoch, "gradient norm", grad_norm, terms)
                self.optimizer.step()
                self.step += 1
                if self.ema is not None:
                    self.ema.update(self.model, self.step)
                k = len(idx)
                seen += k
                correct += int((logits.argmax(1) == y).sum())
                floors = self.objective.uninformative_losses(k, self.bundle.num_classes)
                for term in terms.keys() & floors.keys():  # weighted like the term itself
                    key = UNINFORMATIVE_PREFIX + term
                    sums[key] = sums.get(key, 0.0) + floors[term] * k
                terms = {"loss": float(loss.detach()), **terms}
                for key, val in terms.items():
                    sums[key] = sums.get(key, 0.0) + val * k
                bar.set_postfix(loss=f"{sums['loss'] / seen:.3f}", acc=f"{correct / seen:.3f}")
        finally:
            tap.remove()
        totals = self.dist.all_reduce_sums({**sums, "_seen": seen, "_correct": correct})
        seen = max(1.0, totals.pop("_seen"))
        out = {(k if k.startswith(UNINFORMATIVE_PREFIX) else f"train_{k}"): v / seen
               for k, v in totals.items() if k != "_correct"}
        out["train_acc"] = totals["_correct"] / seen
        out["lr"] = lr
        return out

    def fit(self) -> Path:
        """Train and return the run directory."""
        self._setup()
        cfg = self.cfg
        start = 1
        if self.dist.is_main:
            remove_stale_temp_files(self.out)
        if cfg.resume and self.dist.is_main and self.out.is_dir():
            check_writable(self.out)  # before an epoch of work, not when saving it
        if cfg.resume and self._can_resume():
            start = self._try_resume()
        elif self.dist.is_main:
            if (self.out / cm.MANIFEST_NAME).exists() and not cfg.resume:
                raise ConfigError(f"{self.out}/manifest.json exists; pass --resume to continue "
                                  "that run or choose another --out")
            self.out.mkdir(parents=True, exist_ok=True)
            self._new_manifest()
            self._save(0, self._evaluate())
        self.dist.barrier()
        log_path = self.out / TRAIN_LOG_FILE
        dead_said = stuck_said = False
        history: list[dict[str, float]] = []
        for epoch in range(start, cfg.epochs + 1):
            t0 = time.perf_counter()
            metrics = self._run_epoch(epoch)
            metrics.update(self._evaluate())
            metrics["epoch_seconds"] = time.perf_counter() - t0
            if self.dist.is_main:
                _append_log(log_path, epoch, metrics)
                terms = " ".join(f"{k[6:]}={v:.4f}" for k, v in metrics.items()
                                 if k.startswith("train_") and k not in ("train_acc", "train_loss"))
                tqdm.write(f"[{self.out.name}] epoch {epoch:3d}/{cfg.epochs} "
                           f"loss {metrics['train_loss']:.4f} acc {metrics['train_acc']:.3f} "
                           f"test_acc {metrics['test_acc']:.3f} {terms} "
                           f"({metrics['epoch_seconds']:.1f}s)")
                if metrics.get(DEAD_FEATURES_COLUMN) == 1.0 and not dead_said:
                    # finite loss (log K), so no divergence fires: say it once, go on
                    tqdm.write(dead_embedding_message(self.out.name, epoch))
                    dead_said = True
                history.append(metrics)
                stuck = stuck_terms(history)
                if stuck and not stuck_said:  # finite loss again: say it once, go on
                    tqdm.write(stuck_loss_message(self.out.name, epoch, stuck))
                    stuck_said = True
            stopping = cfg.stop_after is not None and epoch >= cfg.stop_after
            if epoch % cfg.save_every == 0 or epoch == cfg.epochs or stopping:
                self._save(epoch, metrics)
            self.dist.barrier()
            if stopping:
                break
        self.dist.shutdown()
        return self.out


def _append_log(path: Path, epoch: int, metrics: dict[str, float]) -> None:
    rows: list[dict[str, Any]] = []
    if path.exists() and not path.is_symlink():  # never read a planted link's target
        try:
            text = cm.read_regular_file(path, 64 << 20, "training log").decode("utf-8")
            rows = [r for r in csv.DictReader(io.StringIO(text, newline=""))
                    if int(r["epoch"]) < epoch]
        except (OSError, ValueError, KeyError, TypeError):  # damaged from outside: start anew
            rows = []
    rows.append({"epoch": epoch, **metrics})
    fields = list(dict.fromkeys(k for r in rows for k in r))
    with _atomic_open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)


@contextlib.contextmanager
def _atomic_open(path: Path, mode: str, **kwargs: Any) -> Iterator[Any]:
    """Write to a temporary file beside ``path``, fsync it, then rename it over ``path``: a kill
    at any moment leaves the old file or the new one, never a partial one. The temporary name
    is hidden, unpredictable and created exclusively (:func:`checkpoints_manifest.atomic_writer`),
    so a link planted in the run directory cannot redirect the write."""
    with cm.atomic_writer(path, "wb" if "b" in mode else "w", **kwargs) as fh:
        yield fh


def check_writable(run_dir: Path) -> None:
    """Refuse, before any training, a run directory that cannot take the next checkpoint.

    ``run_dir`` and ``run_dir/checkpoints`` must be real directories (not symbolic links, which
    would send the checkpoints out of the run) in which a file can be created.

    Raises
    ------
    ConfigError
        Naming the directory and the fix.
    """
    for directory in (run_dir, run_dir / "checkpoints"):
        if directory.is_symlink() and directory != run_dir:
            raise ConfigError(f"{directory}: is a symbolic link; the trainer writes checkpoints "
                              "only into a real folder of the run (replace the link by a folder)")
        if not directory.exists():
            continue
        try:
            with cm.atomic_writer(directory / ".write_test", "wb"):
                raise _Probe
        except _Probe:
            pass
        except OSError as exc:
            raise ConfigError(f"{directory}: cannot write there ({exc.strerror or exc}); resume "
                              "a writable copy of the run (or free disk space)") from None


class _Probe(Exception):
    """Raised inside the write probe so that nothing is renamed into place."""


def _atomic_torch_save(obj: Any, path: Path) -> str:
    """``torch.save`` to ``path`` atomically; returns the sha256 of the bytes written."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    data = buf.getbuffer()
    cm.atomic_write_bytes(path, data)
    return hashlib.sha256(data).hexdigest()


def remove_stale_temp_files(run_dir: Path) -> list[Path]:
    """Delete temporary files that writers killed mid-save left in ``run_dir`` and
    ``run_dir/checkpoints`` (hidden ``.NAME.PID.tmp`` files; a kill can never leave a partial
    checkpoint, resume state, log or manifest under its real name). Returns what was removed."""
    # a run directory is shared with the user's files: only the atomic writers' own names
    return cm.remove_temp_files([run_dir, run_dir / "checkpoints"], cm.is_own_temp_name)


def train(cfg: TrainConfig) -> Path:
    """Train a run as described by ``cfg``; returns the run directory."""
    return Trainer(cfg).fit()
