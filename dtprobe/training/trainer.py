"""The bundled trainer: writes a checkpoint series plus a manifest, with CE or CTC.

CE and CTC runs made with the same seed differ only in the objective: the data order,
augmentation, optimiser (SGD with momentum) and schedule (linear warm-up, then cosine) are
identical, which the CTC paper's reference code did not guarantee.
"""

from __future__ import annotations

import contextlib
import csv
import math
import os
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import checkpoints_manifest as cm
from dtprobe.data import DatasetBundle, load_dataset
from dtprobe.devices import resolve_device
from dtprobe.errors import ConfigError
from dtprobe.models import build_model, get_arch, head_module
from dtprobe.models.tap import PenultimateTap, penultimate_features
from dtprobe.progress import tqdm
from dtprobe.training import distributed as dist_utils
from dtprobe.training.objectives import CrossEntropyObjective, Objective

RESUME_FILE = "resume_state.pt"


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
    weight_decay: float = 5e-4
    warmup_epochs: int = 1
    augment: str = "auto"
    save_every: int = 2
    seed: int = 0
    device: str = "auto"
    objective: str = "ce"
    ctc: dict[str, Any] = field(default_factory=dict)
    resume: bool = False
    stop_after: int | None = None
    progress: bool = True
    run_name: str | None = None


def _lr_at(step: int, total_steps: int, warmup_steps: int, base_lr: float) -> float:
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return base_lr * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def _augment(images: torch.Tensor, mode: str, generator: torch.Generator) -> torch.Tensor:
    """Random crop with 4 px (1/8) zero padding and/or horizontal flip, drawn from ``generator``."""
    if mode == "none":
        return images
    n, _, h, w = images.shape
    pad = max(1, h // 8)
    padded = F.pad(images, (pad, pad, pad, pad))
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    rows = (dy[:, None] + torch.arange(h)[None, :])  # (n, h)
    cols = (dx[:, None] + torch.arange(w)[None, :])  # (n, w)
    batch_idx = torch.arange(n)[:, None, None, None]
    chan_idx = torch.arange(images.shape[1])[None, :, None, None]
    out = padded[batch_idx, chan_idx, rows[:, None, :, None], cols[:, None, None, :]]
    if "flip" in mode:
        flip = torch.rand(n, generator=generator) < 0.5
        out[flip] = out[flip].flip(-1)
    return out


def _epoch_generator(seed: int, epoch: int) -> torch.Generator:
    # Seeded per epoch, so data order and augmentation depend only on (seed, epoch): CE and CTC see
    # the same batches, and a resumed run replays exactly what an uninterrupted one would.
    return torch.Generator().manual_seed(seed * 1_000_003 + epoch)


def build_objective(cfg: TrainConfig, bundle: DatasetBundle, model: nn.Module,
                    device: torch.device) -> Objective:
    if cfg.objective == "ce":
        return CrossEntropyObjective()
    if cfg.objective == "ctc":
        from dtprobe.training.ctc import CTCConfig, CTCObjective

        options = dict(cfg.ctc)
        preset = options.pop("preset", "transferability")
        options.setdefault("seed", cfg.seed)
        options.setdefault("stage_two_epoch", max(1, round(cfg.epochs * 2 / 3)))
        ctc_cfg = CTCConfig.from_preset(preset, **options)
        head = head_module(model, cfg.arch)
        with torch.no_grad():
            probe = bundle.train.images[:2]
            was_training = model.training
            model.eval()
            feature_dim = penultimate_features(model, head, probe.to(device)).shape[1]
            model.train(was_training)

        def feature_fn(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
            return penultimate_features(m, head_module(m, cfg.arch), x)

        def refresh_batches():
            # Un-augmented pass over the training set, used once when stage 2 starts to fill both
            # banks with current embeddings (the reference code's --update_memory_bank).
            n = len(bundle.train)
            for start in range(0, n, 512):
                idx = torch.arange(start, min(n, start + 512))
                yield bundle.train.images[idx].to(device), idx.to(device)

        return CTCObjective(ctc_cfg, num_samples=len(bundle.train), feature_dim=feature_dim,
                            train_labels=bundle.train.labels, feature_fn=feature_fn,
                            refresh_batches=refresh_batches).to(device)
    raise ConfigError(f"unknown objective {cfg.objective!r}; use 'ce' or 'ctc'")


@torch.no_grad()
def evaluate_accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor,
                      device: torch.device, batch_size: int = 512) -> float:
    """Top-1 accuracy of ``model``'s own head (eval mode)."""
    was_training = model.training
    model.eval()
    correct = 0
    for start in range(0, len(labels), batch_size):
        x = images[start:start + batch_size].to(device, non_blocking=True)
        with dist_utils.autocast(device):
            pred = model(x).argmax(1).cpu()
        correct += int((pred == labels[start:start + batch_size]).sum())
    model.train(was_training)
    return correct / max(1, len(labels))


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
        self.objective = build_objective(cfg, self.bundle, self.model, self.device)
        params = list(self.model.parameters()) + list(self.objective.trainable_parameters())
        self.optimizer = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum,
                                         weight_decay=cfg.weight_decay)
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

    def _training_record(self) -> dict[str, Any]:
        record = asdict(self.cfg)
        for transient in ("resume", "stop_after", "progress", "device", "out"):
            record.pop(transient, None)
        record["augment"] = self.augment
        record["objective_config"] = self.objective.config()
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
    def _save(self, epoch: int, metrics: dict[str, float]) -> None:
        """Checkpoint file, then resume state, then manifest entry: a kill between any two steps
        leaves a run that ``--resume`` continues and a manifest that names only complete files."""
        if not self.dist.is_main:
            return
        rel = f"checkpoints/epoch_{epoch:04d}.pt"
        path = self.out / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        _atomic_torch_save({"model": self.model.state_dict(), "epoch": epoch, "step": self.step},
                           path)
        entry = cm.CheckpointEntry(epoch=epoch, step=self.step, path=rel,
                                   sha256=cm.sha256_file(path), metrics=metrics, time=time.time())
        _atomic_torch_save({
            "epoch": epoch, "step": self.step,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "objective": self.objective.state_dict(),
            "torch_rng": torch.get_rng_state(),
            "entry": entry.to_dict(),
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
        try:
            state = torch.load(state_path, map_location=self.device, weights_only=True)
        except Exception as exc:  # written atomically, so only damage from outside gets here
            raise ConfigError(f"{state_path}: cannot read the resume state ({type(exc).__name__}: "
                              f"{str(exc).splitlines()[0] if str(exc) else ''}); restore it or "
                              "train into a new --out") from None
        manifest = cm.read_manifest(self.out)
        epochs = {c.epoch for c in manifest.checkpoints}
        if state["epoch"] not in epochs and self.dist.is_main:
            # Killed after the checkpoint and its resume state were written, before the manifest
            # entry: the file is complete (written atomically), so record it now.
            cm.append_checkpoint(self.out, cm.CheckpointEntry.from_dict(state["entry"]),
                                 replace=True)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if len(state["objective"]):
            self.objective.load_state_dict(state["objective"])
        torch.set_rng_state(state["torch_rng"].cpu())
        self.step = int(state["step"])
        return int(state["epoch"]) + 1

    # -------------------------------------------------------------- training
    def _run_epoch(self, epoch: int) -> dict[str, float]:
        cfg, bundle = self.cfg, self.bundle
        self.objective.start_epoch(epoch, self.model)
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
                aug = _augment(bundle.train.images[global_idx], self.augment, gen)
                idx = global_idx[self.dist.rank::self.dist.world_size]
                images = aug[self.dist.rank::self.dist.world_size]
                if len(idx) == 0:
                    continue
                lr = _lr_at(self.step, self.total_steps, self.warmup_steps, cfg.lr)
                for group in self.optimizer.param_groups:
                    group["lr"] = lr
                x = images.to(self.device, non_blocking=True)
                if self.device.type == "cuda":
                    x = x.to(memory_format=torch.channels_last)
                y = bundle.train.labels[idx].to(self.device, non_blocking=True)
                with dist_utils.autocast(self.device):
                    logits = self.ddp_model(x)
                loss, terms = self.objective(images=x, features=tap.features.float(),
                                             logits=logits.float(), labels=y,
                                             indices=idx.to(self.device), epoch=epoch)
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"loss became {float(loss)} at epoch {epoch}; "
                                             "lower --lr")
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if self.dist.enabled and hasattr(self.objective, "all_reduce_gradients"):
                    self.objective.all_reduce_gradients()  # projectors live outside DDP
                self.optimizer.step()
                self.step += 1
                k = len(idx)
                seen += k
                correct += int((logits.argmax(1) == y).sum())
                terms = {"loss": float(loss.detach()), **terms}
                for key, val in terms.items():
                    sums[key] = sums.get(key, 0.0) + val * k
                bar.set_postfix(loss=f"{sums['loss'] / seen:.3f}", acc=f"{correct / seen:.3f}")
        finally:
            tap.remove()
        totals = self.dist.all_reduce_sums({**sums, "_seen": seen, "_correct": correct})
        seen = max(1.0, totals.pop("_seen"))
        out = {f"train_{k}": v / seen for k, v in totals.items() if k != "_correct"}
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
        if cfg.resume and self._can_resume():
            start = self._try_resume()
        elif self.dist.is_main:
            if (self.out / "manifest.json").exists() and not cfg.resume:
                raise ConfigError(f"{self.out}/manifest.json exists; pass --resume to continue "
                                  "that run or choose another --out")
            self.out.mkdir(parents=True, exist_ok=True)
            self._new_manifest()
            test_acc = evaluate_accuracy(self.model, self.bundle.test.images,
                                         self.bundle.test.labels, self.device)
            self._save(0, {"test_acc": test_acc})
        self.dist.barrier()
        log_path = self.out / "train_log.csv"
        for epoch in range(start, cfg.epochs + 1):
            t0 = time.perf_counter()
            metrics = self._run_epoch(epoch)
            metrics["test_acc"] = evaluate_accuracy(self.model, self.bundle.test.images,
                                                    self.bundle.test.labels, self.device)
            metrics["epoch_seconds"] = time.perf_counter() - t0
            if self.dist.is_main:
                _append_log(log_path, epoch, metrics)
                terms = " ".join(f"{k[6:]}={v:.4f}" for k, v in metrics.items()
                                 if k.startswith("train_") and k not in ("train_acc", "train_loss"))
                tqdm.write(f"[{self.out.name}] epoch {epoch:3d}/{cfg.epochs} "
                           f"loss {metrics['train_loss']:.4f} acc {metrics['train_acc']:.3f} "
                           f"test_acc {metrics['test_acc']:.3f} {terms} "
                           f"({metrics['epoch_seconds']:.1f}s)")
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
    if path.exists():
        with open(path, newline="") as fh:
            rows = [r for r in csv.DictReader(fh) if int(r["epoch"]) < epoch]
    rows.append({"epoch": epoch, **metrics})
    fields = list(dict.fromkeys(k for r in rows for k in r))
    with _atomic_open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)


def _temp_name(path: Path) -> Path:
    # Hidden and ending in ".tmp": never taken for a checkpoint by file-name inference, and
    # recognisable as a leftover of a killed writer (see remove_stale_temp_files).
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


@contextlib.contextmanager
def _atomic_open(path: Path, mode: str, **kwargs: Any) -> Iterator[Any]:
    """Write to a temporary file beside ``path``, fsync it, then rename it over ``path``: a kill
    at any moment leaves the old file or the new one, never a partial one."""
    tmp = _temp_name(path)
    try:
        with open(tmp, mode, **kwargs) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    _fsync_dir(path.parent)


def _fsync_dir(directory: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _atomic_torch_save(obj: Any, path: Path) -> None:
    with _atomic_open(path, "wb") as fh:
        torch.save(obj, fh)


def remove_stale_temp_files(run_dir: Path) -> list[Path]:
    """Delete temporary files that writers killed mid-save left in ``run_dir`` and
    ``run_dir/checkpoints`` (hidden ``.NAME.PID.tmp`` files; a kill can never leave a partial
    checkpoint, resume state, log or manifest under its real name). Returns what was removed."""
    removed: list[Path] = []
    for directory in (run_dir, run_dir / "checkpoints"):
        try:
            entries = list(os.scandir(directory))
        except OSError:
            continue
        for entry in entries:
            if (entry.name.startswith(".") and entry.name.endswith(".tmp")
                    and entry.is_file(follow_symlinks=False)):
                with contextlib.suppress(OSError):
                    os.unlink(entry.path)
                    removed.append(Path(entry.path))
    return removed


def train(cfg: TrainConfig) -> Path:
    """Train a run as described by ``cfg``; returns the run directory."""
    return Trainer(cfg).fit()
