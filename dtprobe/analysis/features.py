"""Features: verify and load one checkpoint safely, extract its features once (cached).

Checkpoints load only through :mod:`dtprobe.checkpoints.reader` (``weights_only`` or safetensors),
from
the very bytes whose sha256 was verified; NaN/Inf features or a model that does not fit the data
fail only that checkpoint, with a one-line :class:`CheckpointError`.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch

from dtprobe.analysis.data import EvalData, enforce_budget
from dtprobe.analysis.plan import AnalysisOptions, PlannedCheckpoint, RunPlan
from dtprobe.analysis.shares import assemble
from dtprobe.checkpoints import reader as ckpt_io
from dtprobe.checkpoints.fitting import load_weights
from dtprobe.errors import CheckpointError, ConfigError, first_line
from dtprobe.features.extract import (
    FEATURE_DTYPES,
    FOLD_CHECK_IMAGES,
    cache_key,
    extract_features,
    feature_dtype_tag,
    for_compute,
    for_storage,
)
from dtprobe.features.prepare import inference_model
from dtprobe.models import build_model, get_arch, head_module
from dtprobe.models.layers import block_layers, describe_layers, penultimate_source


def build_for_plan(plan: RunPlan, in_channels: int) -> torch.nn.Module:
    kwargs = dict(plan.arch_kwargs)
    if plan.manifest is None:
        kwargs.setdefault("in_channels", in_channels)
    return build_model(plan.arch, plan.num_classes, **kwargs)


def plan_head(model: torch.nn.Module, plan: RunPlan) -> torch.nn.Linear:
    if plan.head is None:
        return head_module(model, plan.arch)
    try:
        head = model.get_submodule(plan.head)
    except AttributeError:
        raise ConfigError(f"the manifest's model.penultimate {plan.head!r} is not a module of "
                          f"{plan.arch}; fix the manifest") from None
    if not isinstance(head, torch.nn.Linear):
        raise ConfigError(f"the manifest's model.penultimate {plan.head!r} of {plan.arch} is a "
                          f"{type(head).__name__}, expected nn.Linear; fix the manifest")
    return head


def check_model(plan: RunPlan, data: EvalData, opts: AnalysisOptions) -> None:
    """Build the architecture once (random weights) and run two test images through it, so that
    an architecture that does not fit the data, or a ``--layers`` name it lacks, is one clear
    :class:`ConfigError` before any checkpoint is read."""
    model = build_for_plan(plan, data.bundle.in_channels)
    head = plan_head(model, plan)
    names = {name for name, _ in model.named_modules() if name}
    unknown = [layer for layer in opts.layers if layer not in names]
    if unknown:
        import difflib

        guesses = sorted({g for u in unknown for g in difflib.get_close_matches(u, names, 3)})
        blocks = block_layers(model, plan.head or get_arch(plan.arch).head)
        raise ConfigError(f"--layers {' '.join(unknown)}: no such module in {plan.arch}"
                          + (f" (did you mean {', '.join(guesses)}?)" if guesses else "")
                          + f"; its blocks are {' '.join(blocks) or '(none found)'}, and "
                          "`dtprobe layers RUN` lists every module")
    try:
        # shapes only: the BatchNorm folding (a copy of the model) would check nothing more
        outputs = extract_features(model, head, data.test_images[:2], device=torch.device("cpu"),
                                   batch_size=2, layers=opts.layers, fold_batchnorm=False)
    except RuntimeError as exc:
        raise ConfigError(f"{plan.arch} cannot process the {plan.dataset} images "
                          f"({first_line(str(exc))}); pass a matching --arch / "
                          "--arch-param or --dataset") from None
    # what one image costs in features, logits and layer outputs, for --memory-budget
    from dtprobe.metrics.registry import resolve_metrics

    pixel_inputs = any(spec.name.startswith("mi_xt") for spec in resolve_metrics(opts.metrics))
    data.values_per_image = sum(v[0].numel() for v in outputs.values())
    measure_forward(model, data, opts)
    held = FEATURE_DTYPES[opts.feature_dtype].itemsize  # EpochFeatures holds the cache dtype
    enforce_budget(data, data.values_per_image, f"the analysis of {plan.name}", pixel_inputs,
                   held)


def measure_forward(model: torch.nn.Module, data: EvalData, opts: AnalysisOptions) -> None:
    """Record on ``data`` what one forward pass holds on the host, for ``--memory-budget``
    (:mod:`dtprobe.analysis.memory`): the model's weights, every module's output per image
    and the images per batch (none on a GPU, where the batch lives in device memory)."""
    from dtprobe.analysis.memory import activation_bytes
    from dtprobe.features.extract import auto_batch_size
    from dtprobe.runtime.devices import resolve_device

    data.model_bytes = sum(t.numel() * t.element_size()
                           for t in (*model.parameters(), *model.buffers()))
    data.activations_per_image = activation_bytes(model, data.test_images[:2].float().cpu())
    device = resolve_device(opts.device)
    if device.type != "cpu":
        data.host_batch = 0
    elif opts.batch_size == "auto":
        data.host_batch = auto_batch_size(data.test_images, device)
    else:
        data.host_batch = int(opts.batch_size)


def plan_layers(plan: RunPlan, data: EvalData
                ) -> tuple[torch.nn.Module, list[tuple[str, tuple[int, ...], bool]], list[str]]:
    """The plan's model (random weights), its modules described from one forward pass
    (:func:`~dtprobe.models.layers.describe_layers`) and the blocks ``--layers auto`` picks."""
    model = build_for_plan(plan, data.bundle.in_channels)
    head = plan_head(model, plan)
    described = describe_layers(model, head, data.test_images[:2].float().cpu())
    blocks = block_layers(model, plan.head or get_arch(plan.arch).head,
                          penultimate_source(described))
    return model, described, blocks


def resolve_layers(plan: RunPlan, data: EvalData, opts: AnalysisOptions) -> AnalysisOptions:
    """Replace ``auto`` in ``opts.layers`` by the architecture's block outputs
    (:func:`dtprobe.models.layers.block_layers`); other names are kept in order."""
    if "auto" not in opts.layers:
        return opts
    _, _, blocks = plan_layers(plan, data)
    layers: list[str] = []
    for name in opts.layers:
        for resolved in (blocks if name == "auto" else [name]):
            if resolved not in layers:
                layers.append(resolved)
    return replace(opts, layers=layers)


def read_checkpoint(plan: RunPlan, ckpt: PlannedCheckpoint,
                    opts: AnalysisOptions) -> ckpt_io.CheckpointBytes:
    """Read the checkpoint file once, verified: the bytes that are hashed are the bytes loaded.

    Refuses (with :class:`CheckpointError`) a path found unsafe while planning, a missing or
    non-regular file, a file reached through a link out of the run directory (checked again on
    the open file, not only while planning; allowed with ``follow_symlinks``) and content
    whose sha256 differs from the manifest's, or from the digest this analysis already keyed
    its cached features and rows by (a file swapped mid-analysis). Sets ``ckpt.digest``.
    """
    if ckpt.error is not None:
        raise CheckpointError(ckpt.error)
    blob = ckpt_io.read_checkpoint_bytes(
        ckpt.path, expected_sha256=ckpt.digest or ckpt.sha256, run_dir=plan.run_dir,
        allow_symlinks=opts.follow_symlinks,
        recorded_by=ckpt.sha256_from if ckpt.sha256 else "the bytes this analysis read before")
    ckpt.digest = blob.sha256
    return blob


def load_model(plan: RunPlan, ckpt: PlannedCheckpoint, in_channels: int, opts: AnalysisOptions,
               blob: ckpt_io.CheckpointBytes | None = None
               ) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    """The model with this checkpoint's weights, and those weights under the model's names.

    The weights are searched for in the file (:func:`dtprobe.checkpoints.load_weights`, with
    the plan's ``--weights``/``--strip-prefix``/``--trust-pickles``); what was taken is
    recorded in ``ckpt.loaded``.
    """
    blob = blob if blob is not None else read_checkpoint(plan, ckpt, opts)
    # NaN/Inf is checked on the weights chosen (raw and EMA may differ), in load_weights.
    loaded = ckpt_io.load_checkpoint(ckpt.path, finite=False, data=blob,
                                     trust_pickles=plan.load.trust_pickles)
    model = build_for_plan(plan, in_channels)
    chosen = load_weights(model, loaded, ckpt.path, weights=plan.load.weights,
                                  strip_prefix=plan.load.strip_prefix,
                                  key_maps=get_arch(plan.arch).key_maps, arch=plan.arch)
    ckpt.loaded = {**chosen.record(), "trusted_pickle": loaded.trusted}
    return model, chosen.state


class LoadedCheckpoint:
    """One checkpoint, read and hashed once, its model built, loaded and prepared for inference
    once, for every extraction of this analysis: the source's splits and every downstream
    dataset's (:mod:`dtprobe.analysis.pipeline`).

    Opening reads the file (:func:`read_checkpoint`: verified, ``ckpt.digest`` set, the key of
    every cached feature and row); the model is loaded on first use from those very bytes,
    which are then freed. Its BatchNorm is folded once (:func:`~dtprobe.features.prepare.
    inference_model`), checked on ``probe`` (the source's first test images, so that the
    decision, and with it the source's features, do not depend on which downstream datasets
    are analysed), and the folded copy runs every extraction. The weights under the model's
    names (``state``) are what the source metrics read the head from.
    """

    def __init__(self, plan: RunPlan, ckpt: PlannedCheckpoint, opts: AnalysisOptions,
                 in_channels: int, device: torch.device, probe: Any):
        self.plan, self.ckpt, self.opts = plan, ckpt, opts
        self.in_channels, self.device, self.probe = in_channels, device, probe
        # The keys need the verified digest: the file is read now unless this analysis has
        # already hashed it (then it is read only if the model is needed, and checked again
        # against that digest: a file swapped mid-analysis fails, see read_checkpoint).
        self.blob: ckpt_io.CheckpointBytes | None = (
            read_checkpoint(plan, ckpt, opts) if ckpt.digest is None else None)
        self.model: torch.nn.Module | None = None
        self.head: torch.nn.Module | None = None
        self.net: torch.nn.Module | None = None
        self.net_head: torch.nn.Module | None = None
        self.state: dict[str, torch.Tensor] | None = None

    def __enter__(self) -> LoadedCheckpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Free the file's bytes, the model and its inference copy."""
        self.blob = self.model = self.head = self.net = self.net_head = self.state = None

    def load(self) -> dict[str, torch.Tensor]:
        """The model with the checkpoint's weights (once), and those weights."""
        if self.state is None:
            blob = self.blob if self.blob is not None else read_checkpoint(
                self.plan, self.ckpt, self.opts)
            self.blob = None
            model, self.state = load_model(self.plan, self.ckpt, self.in_channels, self.opts,
                                           blob)
            del blob
            # the tensors are copies: the file's bytes are freed before extraction
            self.model = model.to(self.device).eval()
            self.head = plan_head(self.model, self.plan)
        return self.state

    def _inference_copy(self) -> tuple[torch.nn.Module, torch.nn.Module, bool]:
        """The network every eager extraction runs (BatchNorm folded once) and whether it is
        a folded copy (which extraction then leaves as it is)."""
        if self.net is None:
            self.load()
            probe = self.probe[:FOLD_CHECK_IMAGES].to(self.device)
            self.net, self.net_head, folded = inference_model(self.model, self.head,
                                                              self.opts.layers, probe)
            if folded and probe.ndim == 4:  # as extract_features formats its own copy
                self.net = self.net.to(memory_format=torch.channels_last)
        return self.net, self.net_head, self.net is not self.model

    def extract(self, images: Any, split: str, opts: AnalysisOptions) -> dict[str, torch.Tensor]:
        """Outputs on ``images`` as the feature cache stores them (:func:`extract_for_cache`)."""
        self.load()
        if opts.engine != "eager":  # the engine exports from the eager model itself
            return extract_for_cache(self.model, self.head, images, self.ckpt, split,
                                     self.device, opts)
        net, net_head, folded = self._inference_copy()
        return extract_for_cache(net, net_head, images, self.ckpt, split, self.device, opts,
                                 fold_batchnorm=not folded, reference=self.model)


def _extract(model: torch.nn.Module, head: torch.nn.Module, images: Any,
             ckpt: PlannedCheckpoint, device: torch.device,
             opts: AnalysisOptions, fold_batchnorm: bool = True,
             reference: torch.nn.Module | None = None) -> dict[str, torch.Tensor]:
    try:
        return extract_features(model, head, images, device=device,
                                batch_size=opts.batch_size, layers=opts.layers,
                                engine=opts.engine, fold_batchnorm=fold_batchnorm)
    except RuntimeError as exc:
        text = str(exc)
        if isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in text.lower():
            raise CheckpointError(f"{ckpt.path}: out of memory while extracting features; "
                                  f"lower --batch-size (now {opts.batch_size})") from None
        if not _outputs_finite(reference if reference is not None else model, images[:8],
                               device):
            # Some numerical step choked on NaN/Inf activations: a diverged checkpoint.
            raise CheckpointError(f"{ckpt.path}: the images give NaN/Inf outputs (diverged "
                                  "run?); this checkpoint is skipped") from None
        raise CheckpointError(f"{ckpt.path}: the model failed on the images "
                              f"({first_line(text)}); check --arch / --arch-param "
                              "against this checkpoint") from None


@torch.no_grad()
def _outputs_finite(model: torch.nn.Module, images: torch.Tensor, device: torch.device) -> bool:
    """Whether a plain eval-mode forward pass of ``images`` gives finite outputs."""
    model.eval()
    try:
        return bool(torch.isfinite(model(images.to(device))).all())
    except RuntimeError:
        return True  # it fails for another reason: let that reason be reported


def extract_for_cache(model: torch.nn.Module, head: torch.nn.Module, images: Any,
                      ckpt: PlannedCheckpoint, split: str, device: torch.device,
                      opts: AnalysisOptions, fold_batchnorm: bool = True,
                      reference: torch.nn.Module | None = None) -> dict[str, torch.Tensor]:
    """Outputs of ``model`` on ``images`` as the feature cache stores them (``--feature-dtype``),
    refusing NaN/Inf features (a diverged run) and values beyond the dtype's range with a
    one-line :class:`CheckpointError`. ``fold_batchnorm=False`` with a model already folded
    (:class:`LoadedCheckpoint`), whose eager original is ``reference``."""
    feats = _extract(model, head, images, ckpt, device, opts, fold_batchnorm, reference)
    bad = ~torch.isfinite(feats["features"]).all(dim=1)
    if bad.any():
        raise CheckpointError(f"{ckpt.path}: {int(bad.sum())} {split} images give NaN/Inf "
                              "features (diverged run?); this checkpoint is skipped")
    try:
        return for_storage(feats, opts.feature_dtype)
    except ValueError as exc:
        raise CheckpointError(f"{ckpt.path}: {split} {exc}; analyse with "
                              "--feature-dtype bfloat16 or float32") from None


def features_key(ckpt: PlannedCheckpoint, data: EvalData, split: str,
                 opts: AnalysisOptions) -> str:
    """Cache key of one checkpoint's features on one split (layers and dtype included): the
    one recipe, keyed by the digest the analysis verified (:func:`read_checkpoint`)."""
    if ckpt.cache_digest is None:  # a key is never made of a file not read and hashed
        raise RuntimeError(f"{ckpt.path}: features keyed before the file was verified")
    return cache_key(ckpt.cache_digest, data.key, split, opts.layers,
                     feature_dtype_tag(opts.feature_dtype))


def checkpoint_features(plan: RunPlan, ckpt: PlannedCheckpoint, data: EvalData, cache: Any,
                        device: torch.device, opts: AnalysisOptions,
                        loaded: LoadedCheckpoint | None = None,
                        ) -> tuple[dict[str, dict[str, torch.Tensor]],
                                    dict[str, torch.Tensor] | None]:
    """Train/test features, logits and layer outputs of one checkpoint (from cache when present).

    ``loaded``: the checkpoint already opened for this analysis (read and hashed once, model
    loaded and folded once for every dataset); without it, the file is opened here.
    Returns the features and the checkpoint's state dict if it had to be loaded (else None).
    """
    if loaded is None:
        with LoadedCheckpoint(plan, ckpt, opts, data.bundle.in_channels, device,
                              data.test_images) as own:
            return checkpoint_features(plan, ckpt, data, cache, device, opts, own)
    out: dict[str, dict[str, torch.Tensor]] = {}
    todo = []
    for split in ("train", "test"):
        # layer outputs of both splits: the per-layer probes fit on train and score on test
        key = features_key(ckpt, data, split, opts)
        hit = cache.get(key)
        if hit is None and opts.image_shards > 1:  # written by the ranks of a torchrun launch
            n = len(data.bundle.train if split == "train" else data.bundle.test)
            hit = assemble(cache, key, n, opts.image_shards)
        if hit is None:
            todo.append((split, key))
        else:
            out[split] = for_compute(hit)  # metrics compute on float32 (or float64) copies
    state = None
    for split, key in todo:
        images = data.train_images if split == "train" else data.test_images
        feats = loaded.extract(images, split, opts)
        state = loaded.state
        cache.put(key, feats)
        # what a later analysis reads back from the cache, so that both give one table
        out[split] = for_compute(feats)
    return out, state


def test_key(ckpt: PlannedCheckpoint, data: EvalData, opts: AnalysisOptions) -> str:
    """Cache key of the test features (:func:`features_key`)."""
    return features_key(ckpt, data, "test", opts)

