"""Contrastive temporal coding (CTC; Cui et al. 2022): the two-stage objective.

Stage 1 (epochs ``1..S``, ``S = stage_two_epoch``)
    ``loss = CE + alpha * L_inst``. ``z = L2norm(W_p f(x))``; ``L_inst`` is the exact softmax
    over a memory bank holding one entry per training sample, temperature ``tau1``, target the
    sample's own index (non-parametric instance discrimination, Wu et al. 2018). After the
    loss is formed the bank rows of the batch move to ``L2norm(m1 * bank + (1 - m1) * z)``.
Stage 2 (epochs ``S+1..end``)
    At :meth:`CTCObjective.start_epoch` ``(S + 1)`` a frozen copy of the model (eval mode, no
    gradients) becomes the temporal partner. ``v1 = L2norm(W_1 f_current(x))``,
    ``v2 = L2norm(W_2 f_snapshot(x))``; two banks (current, snapshot); positive = the sample's
    own bank entry, ``K`` negatives drawn uniformly from samples of *other* classes; CRD binary
    NCE (Tian et al. 2020) for ``v1`` against the snapshot bank and ``v2`` against the current
    bank, temperature ``tau2``; both banks then updated with momentum ``m2``.
    ``loss = CE + beta * (L_nce(v1) + L_nce(v2))``.

Choices, each matching the authors' released code (DTennant/dt-tradeoff) unless noted:

* NCE normalisation: CRD's constant ``Z = N * mean(exp(s / tau2))``, estimated once on the first
  stage-2 batch (one ``Z`` per direction) and then fixed; noise probability ``1 / N``.
* Bank refresh: when stage 2 starts the two stage-2 banks are overwritten (momentum 0) with
  ``W_1 f_snapshot(x)`` and ``W_2 f_snapshot(x)`` over the training set, as the README's
  ``--update_memory_bank`` flag (used by both presets) does. Needs ``refresh_batches``.
* Negatives: ``K`` distinct samples drawn uniformly from the other-class pool (without
  replacement, as the reference draws them), ``K`` clipped to the smallest pool. Sampled per
  rank in distributed runs. ``negatives_with_replacement=True`` draws i.i.d. instead, which in
  the paper's setting (``K = 16384`` from 49,500 CIFAR-100 samples) repeats about 15% of them.
* Defect fixed: the reference never gave the stage-1 projector ``W_p`` to the optimiser, so it
  stayed at its random initialisation; here it is trained unless
  ``freeze_stage1_projector=True`` reproduces that behaviour.
* Banks start as seeded random unit vectors (the reference: unnormalised uniform noise).

Distributed runs: bank updates use the embeddings and indices all-gathered from every rank, so
the banks stay identical everywhere; ``Z`` is averaged over ranks. Do not wrap the objective in
DDP (its banks are replaced every step and are already synchronised); call
:meth:`CTCObjective.all_reduce_gradients` after ``backward`` so the projectors stay in sync.

Mixed precision: the projections, scores and losses run with autocast disabled, in the banks'
dtype (float32 by default); only the snapshot's forward pass follows the caller's autocast.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from dtprobe.errors import CheckpointError, ConfigError
from dtprobe.references import with_references
from dtprobe.training.objectives.base import Objective, ObjectiveContext
from dtprobe.training.objectives.memory_bank import (
    OtherClassSampler,
    all_gather_rows,
    crd_nce_loss,
    distributed_rank,
    estimate_log_z,
    gather_scores,
    instance_discrimination_loss,
    is_distributed,
    momentum_update,
    random_unit_bank,
)
from dtprobe.training.objectives.registry import register_objective

__doc__ = with_references(__doc__, "cui2022", "wu2018", "tian2020")

__all__ = ["CTCConfig", "CTCObjective", "PRESETS"]

FeatureFn = Callable[[nn.Module, torch.Tensor], torch.Tensor]
BatchSource = Callable[[], Iterable[tuple[torch.Tensor, torch.Tensor]]]

#: Hyperparameter presets from the README of the authors' code (Cui et al. 2022).
PRESETS: dict[str, dict[str, float]] = {
    "transferability": {"alpha": 0.5, "tau1": 0.10, "m1": 0.9,
                        "beta": 1.0, "tau2": 0.10, "m2": 0.9},
    "discriminability": {"alpha": 0.1, "tau1": 0.50, "m1": 0.9,
                         "beta": 1.0, "tau2": 0.40, "m2": 0.9},
}

#: The defaults of :class:`CTCConfig` (its loss weights, temperatures and momenta): the
#: "transferability" preset, whose values are stated in :data:`PRESETS` alone.
_DEFAULT_PRESET = PRESETS["transferability"]

_STATE_VERSION = 1


@dataclass(frozen=True)
class CTCConfig:
    """Hyperparameters of contrastive temporal coding (Cui et al. 2022).

    Defaults are the "transferability" preset with the paper's ``K = 16384``, 128-d
    projections and ``S = 200`` (of 300 epochs).

    Attributes
    ----------
    stage_two_epoch : int
        ``S``: last epoch of stage 1; stage 2 runs from ``S + 1``. ``0`` skips stage 1.
    alpha, tau1, m1 : float
        Stage 1: weight, temperature and bank momentum of instance discrimination.
    beta, tau2, m2 : float
        Stage 2: weight, temperature and bank momentum of the binary NCE.
    proj_dim : int
        Dimension of every projection (``W_p``, ``W_1``, ``W_2``).
    nce_k : int
        Requested number of negatives ``K`` per anchor (clipped to the smallest other-class pool).
    freeze_stage1_projector : bool
        Keep ``W_p`` at its random initialisation (reproduces the reference code's defect).
    refresh_banks : bool
        Overwrite the stage-2 banks with snapshot embeddings when stage 2 starts.
    seed : int
        Seeds the projector initialisation, the banks and the negative sampler.
    preset : str or None
        Name of the preset these values came from (recorded only).
    alpha_warmup_epochs : int
        Linear ramp of the stage-1 weight, ``alpha * min(1, epoch / alpha_warmup_epochs)``
        (0: no ramp, the reference code's behaviour). Lets CE lift the model above chance
        before instance discrimination weighs in, on short runs.
    negatives_with_replacement : bool
        Draw the stage-2 negatives i.i.d. (default: without replacement, as the reference).
    """

    stage_two_epoch: int = 200
    alpha: float = _DEFAULT_PRESET["alpha"]
    tau1: float = _DEFAULT_PRESET["tau1"]
    m1: float = _DEFAULT_PRESET["m1"]
    beta: float = _DEFAULT_PRESET["beta"]
    tau2: float = _DEFAULT_PRESET["tau2"]
    m2: float = _DEFAULT_PRESET["m2"]
    proj_dim: int = 128
    nce_k: int = 16384
    freeze_stage1_projector: bool = False
    refresh_banks: bool = True
    seed: int = 0
    preset: str | None = None
    alpha_warmup_epochs: int = 0
    negatives_with_replacement: bool = False

    def __post_init__(self) -> None:
        if int(self.stage_two_epoch) != self.stage_two_epoch or self.stage_two_epoch < 0:
            raise ConfigError(f"CTC stage_two_epoch={self.stage_two_epoch} must be an integer >= 0")
        for name in ("tau1", "tau2"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ConfigError(f"CTC {name}={value} must be a positive temperature")
        for name in ("m1", "m2"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise ConfigError(f"CTC bank momentum {name}={value} must lie in [0, 1)")
        for name in ("alpha", "beta"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ConfigError(f"CTC loss weight {name}={value} must be >= 0")
        if self.proj_dim < 1:
            raise ConfigError(f"CTC proj_dim={self.proj_dim} must be >= 1")
        if self.nce_k < 1:
            raise ConfigError(f"CTC nce_k={self.nce_k} must be >= 1")

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> CTCConfig:
        """Config from a README preset ("transferability" or "discriminability") plus overrides.

        Parameters
        ----------
        name : str
            Preset name, see :data:`PRESETS`.
        **overrides
            Any other :class:`CTCConfig` field (e.g. ``stage_two_epoch=20, nce_k=4096``).
        """
        if name not in PRESETS:
            raise ConfigError(f"unknown CTC preset {name!r}; choose one of: {', '.join(PRESETS)}")
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(overrides) - fields)
        if unknown:
            raise ConfigError(f"unknown CTC option(s) {', '.join(unknown)}; "
                              f"valid: {', '.join(sorted(fields))}")
        return cls(**{**PRESETS[name], "preset": name, **overrides})


def _unwrap(model: nn.Module) -> nn.Module:
    """Strip DataParallel / DistributedDataParallel / torch.compile wrappers."""
    while True:
        if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            model = model.module
            continue
        inner = getattr(model, "_orig_mod", None)
        if isinstance(inner, nn.Module):
            model = inner
            continue
        return model


def _autocast_off(device: torch.device) -> contextlib.AbstractContextManager:
    """Disable autocast on ``device`` (no-op where autocast does not exist)."""
    try:
        return torch.autocast(device_type=device.type, enabled=False)
    except (RuntimeError, ValueError):
        return contextlib.nullcontext()


def _freeze(model: nn.Module) -> nn.Module:
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
        p.grad = None
    return model


class CTCObjective(Objective):
    """Contrastive temporal coding objective (Cui et al. 2022); see the module docstring.

    Parameters
    ----------
    config : CTCConfig
        Hyperparameters.
    num_samples : int
        ``N``, number of training samples (bank rows); dataset indices run over ``0..N-1``.
    feature_dim : int
        Dimension of the penultimate features.
    train_labels : torch.Tensor
        ``(N,)`` class label of every training sample, in index order (negative pools).
    feature_fn : callable
        ``feature_fn(model, images) -> (B, feature_dim)`` penultimate features; called on the
        frozen snapshot (a deep copy of the unwrapped model), so it must not rely on state
        bound to the original model instance.
    refresh_batches : callable, optional
        ``refresh_batches() -> iterable of (images, indices)`` over the training set (this
        rank's shard when distributed); used to refresh the stage-2 banks when stage 2 starts.

    Notes
    -----
    The objective's buffers (banks) must live on the model's device: move it with
    ``objective.to(device)`` before training. Logged terms are unweighted: ``ce`` and
    ``instance`` in stage 1, ``ce`` and ``nce`` (both directions summed) in stage 2.
    """

    name = "ctc"

    def __init__(self, config: CTCConfig, num_samples: int, feature_dim: int,
                 train_labels: torch.Tensor, feature_fn: FeatureFn, *,
                 refresh_batches: BatchSource | None = None):
        super().__init__()
        if not isinstance(config, CTCConfig):
            raise ConfigError("CTCObjective config must be a CTCConfig, "
                              f"got {type(config).__name__}")
        labels = torch.as_tensor(train_labels).reshape(-1)
        if labels.is_floating_point():
            raise ConfigError("CTC train_labels must be integer class labels")
        if int(num_samples) != labels.numel():
            raise ConfigError(f"CTC num_samples={num_samples} but train_labels holds "
                              f"{labels.numel()} labels; pass one label per training sample")
        if int(feature_dim) < 1:
            raise ConfigError(f"CTC feature_dim={feature_dim} must be >= 1")
        self.cfg = config
        self.num_samples = int(num_samples)
        self.feature_dim = int(feature_dim)
        self.feature_fn = feature_fn
        self.refresh_batches = refresh_batches

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            self.projector = nn.Linear(feature_dim, config.proj_dim)        # W_p, stage 1
            self.embed_current = nn.Linear(feature_dim, config.proj_dim)    # W_1, stage 2
            self.embed_snapshot = nn.Linear(feature_dim, config.proj_dim)   # W_2, stage 2
        if config.freeze_stage1_projector:
            self.projector.requires_grad_(False)

        self.sampler = OtherClassSampler(labels, config.nce_k, seed=config.seed,
                                         replace=config.negatives_with_replacement)
        if self.sampler.clipped:
            warnings.warn(f"CTC nce_k={config.nce_k} exceeds the smallest other-class pool; "
                          f"using K={self.sampler.num_negatives}", stacklevel=2)
        self.register_buffer("train_labels", labels.long().clone(), persistent=False)
        n, d = self.num_samples, config.proj_dim
        self.register_buffer("bank_instance", random_unit_bank(n, d, config.seed))
        self.register_buffer("bank_current", random_unit_bank(n, d, config.seed + 1))
        self.register_buffer("bank_snapshot", random_unit_bank(n, d, config.seed + 2))

        self._draws = 0
        self._log_z: list[float | None] = [None, None]
        self._snapshot_epoch: int | None = None
        self._banks_refreshed = False
        self._pending_snapshot: dict[str, torch.Tensor] | None = None
        self._validate_next = True
        object.__setattr__(self, "_snapshot", None)   # not a registered submodule

    # ---------------------------------------------------------------- public API

    @property
    def snapshot(self) -> nn.Module | None:
        """The frozen temporal partner (``None`` before stage 2)."""
        return self._snapshot

    @property
    def num_negatives(self) -> int:
        """Effective ``K`` after clipping to the smallest other-class pool."""
        return self.sampler.num_negatives

    @property
    def draws(self) -> int:
        """Number of negative draws so far (the sampler's counter)."""
        return self._draws

    def alpha_at(self, epoch: int) -> float:
        """Stage-1 weight at ``epoch``: ``alpha * min(1, epoch / alpha_warmup_epochs)``."""
        ramp = self.cfg.alpha_warmup_epochs
        return self.cfg.alpha * (1.0 if ramp <= 0 else min(1.0, epoch / ramp))

    def stage(self, epoch: int) -> int:
        """1 for epochs ``<= stage_two_epoch``, else 2."""
        return 1 if epoch <= self.cfg.stage_two_epoch else 2

    def trainable_parameters(self) -> list[nn.Parameter]:
        """``W_p`` (unless frozen), ``W_1`` and ``W_2`` with their biases."""
        modules = [self.embed_current, self.embed_snapshot]
        if not self.cfg.freeze_stage1_projector:
            modules.insert(0, self.projector)
        return [p for m in modules for p in m.parameters()]

    def config(self) -> dict[str, Any]:
        """Hyperparameters and the derived choices, for the run manifest."""
        return {
            "objective": self.name,
            **dataclasses.asdict(self.cfg),
            "num_samples": self.num_samples,
            "feature_dim": self.feature_dim,
            "nce_k_effective": self.num_negatives,
            "nce_normalisation": "crd_constant_z",
            "nce_noise_probability": "1/num_samples",
            "negative_sampling": ("iid_uniform_other_classes_per_rank"
                                  if self.cfg.negatives_with_replacement else
                                  "uniform_without_replacement_other_classes_per_rank"),
            "bank_init": "seeded_random_unit",
        }

    def start_epoch(self, epoch: int, model: nn.Module) -> None:
        """Before each (1-based) epoch; at ``stage_two_epoch + 1`` take the frozen snapshot.

        When resuming inside stage 2 the snapshot is rebuilt from the weights restored by
        :meth:`load_state_dict` (a deep copy of ``model`` receives them).
        """
        self._validate_next = True
        if epoch <= self.cfg.stage_two_epoch or self._snapshot is not None:
            return
        base = _unwrap(model)
        if self._pending_snapshot is not None:
            snapshot = _freeze(copy.deepcopy(base))
            snapshot.load_state_dict(self._pending_snapshot)
            self._pending_snapshot = None
            object.__setattr__(self, "_snapshot", snapshot)
            return
        if epoch != self.cfg.stage_two_epoch + 1:
            raise CheckpointError(
                f"CTC stage 2 at epoch {epoch} needs the snapshot taken at epoch "
                f"{self.cfg.stage_two_epoch + 1}, but the objective state has none; resume from "
                "a checkpoint saved with its CTC state, or restart the run")
        object.__setattr__(self, "_snapshot", _freeze(copy.deepcopy(base)))
        self._snapshot_epoch = int(epoch)
        self._log_z = [None, None]
        if self.cfg.refresh_banks:
            if self.refresh_batches is None:
                warnings.warn("CTC refresh_banks=True but no refresh_batches was given; the "
                              "stage-2 banks start from their random initialisation",
                              stacklevel=2)
            else:
                self.refresh_banks(self.refresh_batches())

    @torch.no_grad()
    def refresh_banks(self, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Overwrite the stage-2 banks with ``L2norm(W_1 f_snap(x))`` and ``L2norm(W_2 f_snap(x))``.

        The reference code's ``--update_memory_bank`` step at the start of stage 2 (the
        snapshot equals the current model then). In distributed runs every rank must iterate
        the same number of batches (each its own shard).

        Parameters
        ----------
        batches : iterable of (images, indices)
            The training set (with its usual transform).
        """
        snapshot = self._require_snapshot()
        device = self.bank_current.device
        for images, indices in batches:
            features = self.feature_fn(snapshot, images.to(device, non_blocking=True))
            self._check_features(features)
            with _autocast_off(device):
                v1 = self._embed(self.embed_current, features)
                v2 = self._embed(self.embed_snapshot, features)
            self._write_banks("bank_current", "bank_snapshot", indices, v1, v2, momentum=0.0)
        self._banks_refreshed = True

    def forward(self, *, images: torch.Tensor, features: torch.Tensor, logits: torch.Tensor,
                labels: torch.Tensor, indices: torch.Tensor,
                epoch: int) -> tuple[torch.Tensor, dict[str, float]]:
        """Total CTC loss for one batch and its unweighted terms (see the module docstring).

        Parameters
        ----------
        images : torch.Tensor
            The batch as fed to the model (stage 2 runs the snapshot on it).
        features : torch.Tensor
            ``(B, feature_dim)`` penultimate features of the current model, with gradient.
        logits : torch.Tensor
            ``(B, C)`` head output.
        labels : torch.Tensor
            ``(B,)`` source labels.
        indices : torch.Tensor
            ``(B,)`` dataset indices ``0..N-1``.
        epoch : int
            Current (1-based) epoch; selects the stage.

        Returns
        -------
        (torch.Tensor, dict)
            Scalar total loss and ``{"ce", "instance"}`` or ``{"ce", "nce"}`` as floats.
        """
        indices = indices.reshape(-1).to(device=self.bank_instance.device, dtype=torch.long)
        if self._validate_next:
            self._validate_batch(features, labels, indices)
            self._validate_next = False
        logits = logits if logits.dtype == torch.float64 else logits.float()
        ce = F.cross_entropy(logits, labels)
        if self.stage(epoch) == 1:
            with _autocast_off(features.device):
                z = self._embed(self.projector, features)
                instance = instance_discrimination_loss(z, self.bank_instance, indices,
                                                        self.cfg.tau1)
            self._write_bank("bank_instance", indices, z, self.cfg.m1)
            total = ce + self.alpha_at(epoch) * instance
            return total, {"ce": float(ce.detach()), "instance": float(instance.detach())}

        snapshot = self._require_snapshot()
        if snapshot.training:
            snapshot.eval()
        with torch.no_grad():
            snapshot_features = self.feature_fn(snapshot, images)
        sample_idx = self.sampler(indices, draw=self._draws, rank=distributed_rank())
        self._draws += 1
        with _autocast_off(features.device):
            v1 = self._embed(self.embed_current, features)
            v2 = self._embed(self.embed_snapshot, snapshot_features.detach())
            scores_v1 = gather_scores(v1, self.bank_snapshot, sample_idx)  # v1 vs snapshot bank
            scores_v2 = gather_scores(v2, self.bank_current, sample_idx)   # v2 vs current bank
            if self._log_z[0] is None or self._log_z[1] is None:
                self._log_z = [self._shared_log_z(scores_v1), self._shared_log_z(scores_v2)]
            nce = (crd_nce_loss(scores_v1, self.cfg.tau2, self._log_z[0], self.num_samples)
                   + crd_nce_loss(scores_v2, self.cfg.tau2, self._log_z[1], self.num_samples))
        self._write_banks("bank_current", "bank_snapshot", indices, v1, v2, self.cfg.m2)
        total = ce + self.cfg.beta * nce
        return total, {"ce": float(ce.detach()), "nce": float(nce.detach())}

    # ---------------------------------------------------------------- internals

    def _require_snapshot(self) -> nn.Module:
        if self._snapshot is None:
            raise RuntimeError("CTC stage 2 needs start_epoch(stage_two_epoch + 1, model) to be "
                               "called before the first stage-2 batch")
        return self._snapshot

    def _embed(self, linear: nn.Linear, features: torch.Tensor) -> torch.Tensor:
        out = linear(features.to(linear.weight.dtype))
        return F.normalize(out.to(self.bank_instance.dtype), dim=1)

    def _write_bank(self, name: str, indices: torch.Tensor, values: torch.Tensor,
                    momentum: float) -> None:
        all_indices = all_gather_rows(indices.reshape(-1).to(self.bank_instance.device))
        all_values = all_gather_rows(values.detach())
        setattr(self, name, momentum_update(getattr(self, name), all_indices, all_values, momentum))

    def _write_banks(self, name1: str, name2: str, indices: torch.Tensor, values1: torch.Tensor,
                     values2: torch.Tensor, momentum: float) -> None:
        all_indices = all_gather_rows(indices.reshape(-1).to(self.bank_instance.device))
        both = all_gather_rows(torch.cat([values1.detach(), values2.detach()], dim=1))
        d = values1.shape[1]
        setattr(self, name1, momentum_update(getattr(self, name1), all_indices, both[:, :d],
                                             momentum))
        setattr(self, name2, momentum_update(getattr(self, name2), all_indices, both[:, d:],
                                             momentum))

    def _shared_log_z(self, scores: torch.Tensor) -> float:
        log_z = estimate_log_z(scores, self.cfg.tau2, self.num_samples)
        if is_distributed():
            z = torch.tensor([math.exp(log_z)], dtype=torch.float64, device=scores.device)
            dist.all_reduce(z)
            log_z = math.log(float(z.item()) / dist.get_world_size())
        return log_z

    def _check_features(self, features: torch.Tensor) -> None:
        if features.ndim != 2 or features.shape[1] != self.feature_dim:
            raise ConfigError("CTC expected penultimate features of shape "
                              f"(B, {self.feature_dim}), got {tuple(features.shape)}; "
                              "check feature_dim / feature_fn")

    def _validate_batch(self, features: torch.Tensor, labels: torch.Tensor,
                        indices: torch.Tensor) -> None:
        self._check_features(features)
        if features.device != self.bank_instance.device:
            raise ConfigError(f"CTC banks live on {self.bank_instance.device} but the features "
                              f"are on {features.device}; call objective.to(device)")
        if indices.numel() != features.shape[0]:
            raise ConfigError(f"CTC got {indices.numel()} indices for {features.shape[0]} "
                              "samples; the loader must yield one dataset index per sample")
        if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= self.num_samples):
            raise ConfigError(f"CTC dataset indices must lie in [0, {self.num_samples}); got "
                              f"[{int(indices.min())}, {int(indices.max())}]")
        if not labels.is_floating_point() and labels.ndim == 1:
            expected = self.train_labels.index_select(0, indices)
            if not torch.equal(expected, labels.to(expected.device, torch.long)):
                raise ConfigError("CTC dataset indices do not match train_labels: the loader "
                                  "must yield each sample's index into the training set")

    # ---------------------------------------------------------------- state

    def get_extra_state(self) -> dict[str, Any]:
        return {
            "version": _STATE_VERSION,
            "num_samples": self.num_samples,
            "draws": self._draws,
            "log_z": list(self._log_z),
            "snapshot_epoch": self._snapshot_epoch,
            "banks_refreshed": self._banks_refreshed,
            "nce_k_effective": self.num_negatives,
        }

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self._draws = int(state["draws"])
        self._log_z = [None if z is None else float(z) for z in state["log_z"]]
        epoch = state["snapshot_epoch"]
        self._snapshot_epoch = None if epoch is None else int(epoch)
        self._banks_refreshed = bool(state["banks_refreshed"])

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self._snapshot is not None:
            for key, value in self._snapshot.state_dict(keep_vars=keep_vars).items():
                destination[prefix + "snapshot." + key] = value
        elif self._pending_snapshot is not None:
            for key, value in self._pending_snapshot.items():
                destination[prefix + "snapshot." + key] = value

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        extra = state_dict.get(prefix + "_extra_state")
        if isinstance(extra, dict):
            if extra.get("version") != _STATE_VERSION:
                raise CheckpointError(f"CTC objective state has version {extra.get('version')}, "
                                      f"this dtprobe reads version {_STATE_VERSION}")
            saved_epoch = extra.get("snapshot_epoch")
            if saved_epoch is not None and int(saved_epoch) != self.cfg.stage_two_epoch + 1:
                raise CheckpointError(f"CTC objective state began stage 2 at epoch {saved_epoch} "
                                      f"but this run has stage_two_epoch="
                                      f"{self.cfg.stage_two_epoch}; resume with "
                                      f"stage_two_epoch={int(saved_epoch) - 1}")
            if int(extra.get("num_samples", -1)) != self.num_samples:
                raise CheckpointError(f"CTC objective state was saved for "
                                      f"{extra.get('num_samples')} training samples, this run has "
                                      f"{self.num_samples}; resume with the same training set")
        snap_prefix = prefix + "snapshot."
        pending = {key[len(snap_prefix):]: state_dict.pop(key)
                   for key in list(state_dict) if key.startswith(snap_prefix)}
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
        if self._snapshot_epoch is None:
            object.__setattr__(self, "_snapshot", None)
            self._pending_snapshot = None
            unexpected_keys.extend(snap_prefix + key for key in pending)
            return
        if not pending:
            raise CheckpointError(f"CTC objective state says stage 2 began at epoch "
                                  f"{self._snapshot_epoch} but holds no snapshot weights; the "
                                  "checkpoint is incomplete, resume from another one")
        if self._snapshot is not None:
            self._snapshot.load_state_dict(pending)
        else:
            self._pending_snapshot = {k: v.detach().clone() for k, v in pending.items()}


# ------------------------------------------------------------------------------ registry

def _register() -> None:
    @register_objective("ctc", paper="Cui et al. 2022 (contrastive temporal coding)")
    def _ctc(ctx: ObjectiveContext, preset: str = "transferability",
             stage_two_epoch: int | None = None, alpha: float | None = None,
             tau1: float | None = None, m1: float | None = None, beta: float | None = None,
             tau2: float | None = None, m2: float | None = None,
             proj_dim: int = CTCConfig.proj_dim, nce_k: int = CTCConfig.nce_k,
             freeze_stage1_projector: bool = CTCConfig.freeze_stage1_projector,
             refresh_banks: bool = CTCConfig.refresh_banks,
             alpha_warmup_epochs: int = CTCConfig.alpha_warmup_epochs,
             negatives_with_replacement: bool = CTCConfig.negatives_with_replacement,
             ) -> Objective:
        """two-stage CE + instance discrimination, then CE + temporal NCE (None = from preset)"""
        # the defaults are CTCConfig's, read from it (one place states them)
        options: dict[str, Any] = {k: v for k, v in dict(
            alpha=alpha, tau1=tau1, m1=m1, beta=beta, tau2=tau2, m2=m2).items() if v is not None}
        s = stage_two_epoch if stage_two_epoch is not None else max(1, round(ctx.epochs * 2 / 3))
        cfg = CTCConfig.from_preset(preset, stage_two_epoch=int(s), proj_dim=int(proj_dim),
                                    nce_k=int(nce_k), seed=ctx.seed,
                                    freeze_stage1_projector=bool(freeze_stage1_projector),
                                    refresh_banks=bool(refresh_banks),
                                    alpha_warmup_epochs=int(alpha_warmup_epochs),
                                    negatives_with_replacement=bool(negatives_with_replacement),
                                    **options)
        return CTCObjective(cfg, num_samples=ctx.num_samples, feature_dim=ctx.feature_dim,
                            train_labels=ctx.train_labels, feature_fn=ctx.feature_fn,
                            refresh_batches=ctx.refresh_batches)


_register()
