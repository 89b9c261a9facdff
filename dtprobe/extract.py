"""Feature extraction for checkpoint series, with an on-disk cache.

One forward pass per image and checkpoint yields the logits, the penultimate features (the
head's input, as in Kornblith et al. 2021 and Cui et al. 2022, who measure the trade-off on
the penultimate layer) and any requested intermediate layers (global-average-pooled). The
engine is built so that an analysis costs little more than the forward passes themselves:

- the evaluation images are decoded once by the caller and reused for every checkpoint (CPU
  tensors, pinned for CUDA, or already resident on the device);
- each call works on an inference copy of the network: eval-mode BatchNorm folded into the
  preceding convolution (``torch.fx``; checked against the unfolded network on a few images,
  and skipped when the two disagree or the network cannot be traced) and channels-last memory
  format for 4-D inputs; the caller's model is only put in eval mode;
- ``torch.inference_mode``; bf16 autocast on CUDA (opt-in on CPUs with bf16 units);
- outputs are written into preallocated buffers (on the device for CUDA, one transfer at the
  end) instead of concatenating per-batch copies;
- on CUDA, host-to-device copies of the next batch run on a side stream from pinned memory
  while the current batch computes;
- ``batch_size="auto"``: on CUDA a large batch that halves on out-of-memory (the size that
  worked is remembered per architecture and image shape), on the CPU a cache-friendly size.

Results are cached under ``RUN_DIR/analysis/features/`` by :class:`FeatureCache`, keyed by
checkpoint sha256 + dataset + split + layers (+ an optional transform tag, which also carries a
half-precision storage dtype: :func:`feature_dtype_tag`), so adding a metric or a checkpoint
never re-runs the network for what is already there.

References
----------
Kornblith, S., Chen, T., Lee, H., Norouzi, M. (2021). Why do better loss functions lead to
less transferable features? NeurIPS 2021.

Cui, Q. et al. (2022). Discriminability-transferability trade-off: an information-theoretic
perspective. ECCV 2022.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import math
import warnings
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Literal

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import nn

from checkpoints_manifest import atomic_write_bytes, read_regular_file
from dtprobe import integrity
from dtprobe.data.pixels import RawImages, is_raw
from dtprobe.engines import check_engine, run_engine
from dtprobe.errors import ConfigError
from dtprobe.models.tap import PenultimateTap

__all__ = ["CACHE_VERSION", "FEATURE_DTYPES", "FeatureCache", "auto_batch_size", "cache_key",
           "dataset_key", "extract_features", "feature_dtype_tag", "for_compute", "for_storage",
           "inference_model", "resolve_feature_dtype"]

CACHE_VERSION = 1

BatchSize = int | Literal["auto"]
#: Images to extract from: normalised float tensors, or uint8 pixels normalised on the device.
Images = torch.Tensor | RawImages

#: Input elements per thread and batch on the CPU: ~1 MiB of float32 pixels per thread keeps
#: the early activations cache-resident (measured fastest for small_cnn at 32 px: 64-128).
_CPU_ELEMENTS_PER_THREAD = 1 << 18
#: First batch tried on CUDA holds at most this many input elements (1 GiB of float32).
_CUDA_START_ELEMENTS = 1 << 28
_CUDA_MAX_BATCH = 4096
#: Batch sizes that fitted after an out-of-memory halving, per architecture, parameter count,
#: image shape, device and layers.
_AUTO_BATCH: dict[tuple, int] = {}
#: Images used to check a BatchNorm-folded copy against the original network.
_FOLD_CHECK_IMAGES = 4


# --------------------------------------------------------------------------------- helpers
def _pool(t: torch.Tensor) -> torch.Tensor:
    """One vector per image: convolutional maps (N, C, H, W) are averaged over space, as in most
    CKA studies; token sequences (N, T, D) of vision transformers over their tokens."""
    if t.ndim == 3:
        return t.mean(dim=1)
    return t.mean(dim=tuple(range(2, t.ndim))) if t.ndim > 2 else t.flatten(1)


class _Taps:
    """Penultimate tap on ``head`` plus pooled forward hooks on ``layers`` of ``net``."""

    def __init__(self, net: nn.Module, head: nn.Module, layers: Sequence[str]):
        self.tap = PenultimateTap(head)
        self.captured: dict[str, torch.Tensor] = {}
        self.handles = []
        try:
            for name in layers:
                module = net.get_submodule(name)
                self.handles.append(module.register_forward_hook(
                    lambda _m, _a, out, name=name: self.captured.__setitem__(name, _pool(out))))
        except BaseException:
            self.remove()
            raise

    def run(self, net: nn.Module, x: torch.Tensor, device: torch.device,
            amp: bool = False) -> dict[str, torch.Tensor]:
        self.captured.clear()
        self.tap.features = None
        if amp:
            with torch.autocast(device.type, dtype=torch.bfloat16):
                logits = net(x)
        else:
            logits = net(x)
        if self.tap.features is None:
            raise RuntimeError("the head module was not called in forward(); pass the module "
                               "whose input is the penultimate layer")
        outs = {"features": self.tap.features, "logits": logits}
        outs.update({f"layer:{k}": v for k, v in self.captured.items()})
        return outs

    def remove(self) -> None:
        self.tap.remove()
        for h in self.handles:
            h.remove()
        self.handles = []


def _module_name(model: nn.Module, module: nn.Module) -> str | None:
    for name, m in model.named_modules():
        if m is module:
            return name
    return None


def _has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def _close(ref: dict[str, torch.Tensor], new: dict[str, torch.Tensor]) -> bool:
    if ref.keys() != new.keys():
        return False
    for key, a in ref.items():
        b = new[key]
        if a.shape != b.shape:
            return False
        a, b = a.float(), b.float()
        scale = float(a.abs().max()) if a.numel() else 0.0
        # Folding changes rounding only (~1e-6 relative in float32; TF32 convolutions on CUDA
        # give ~1e-3); a structural difference is O(1) of the output's scale.
        if not torch.allclose(a, b, rtol=1e-2, atol=1e-2 * scale + 1e-6):
            return False
    return True


_CONV_BN = {nn.Conv1d: nn.BatchNorm1d, nn.Conv2d: nn.BatchNorm2d, nn.Conv3d: nn.BatchNorm3d}


class _Tracer(torch.fx.Tracer):
    """``torch.fx`` tracer that keeps the head and the hooked layers as opaque leaf calls, so
    their hooks still fire in the traced copy."""

    def __init__(self, leaves: set[str]):
        super().__init__()
        self.leaves = leaves

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return (module_qualified_name in self.leaves
                or super().is_leaf_module(m, module_qualified_name))


def _fold_batchnorm(model: nn.Module, leaves: set[str]) -> tuple[nn.Module, int]:
    """Trace a deep copy of ``model`` and fold every eval BatchNorm into the conv feeding it.

    A pair is folded only when the conv's output feeds nothing but the BatchNorm, the conv
    module is called once, the BatchNorm tracks running statistics, and neither is a leaf
    (a hooked layer or the head). Returns the traced copy and the number of folded pairs.
    """
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    copy_ = copy.deepcopy(model)
    graph = _Tracer(leaves).trace(copy_)
    modules = dict(copy_.named_modules())
    calls: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    folded = 0
    for node in list(graph.nodes):
        if node.op != "call_module" or not node.args:
            continue
        src = node.args[0]
        if not isinstance(src, torch.fx.Node) or src.op != "call_module":
            continue
        conv, bn = modules.get(src.target), modules.get(node.target)
        if (type(conv) not in _CONV_BN or type(bn) is not _CONV_BN[type(conv)]
                or len(src.users) != 1 or calls[src.target] != 1
                or not bn.track_running_stats or bn.running_mean is None
                or src.target in leaves or node.target in leaves):
            continue
        parent_name, _, attr = src.target.rpartition(".")
        parent = copy_.get_submodule(parent_name) if parent_name else copy_
        setattr(parent, attr, fuse_conv_bn_eval(conv, bn))
        node.replace_all_uses_with(src)
        graph.erase_node(node)
        folded += 1
    return torch.fx.GraphModule(copy_, graph), folded


@torch.no_grad()
def inference_model(model: nn.Module, head: nn.Module, layers: Sequence[str] = (),
                    probe: torch.Tensor | None = None) -> tuple[nn.Module, nn.Module, bool]:
    """An inference copy of ``model`` with eval-mode BatchNorm folded into preceding convs.

    Folding ``y = gamma (W x + b - mu) / sqrt(var + eps) + beta`` into one convolution with
    weight ``W gamma / sqrt(var + eps)`` removes a full pass over every activation map; the
    result equals the original up to float rounding.

    Parameters
    ----------
    model : the network, in eval mode and on its device (not modified).
    head : its classification head (a submodule of ``model``).
    layers : dotted module names whose outputs will be hooked; they stay callable modules.
    probe : a few input images on the model's device; the folded copy is used only if its
        logits, penultimate features and layer outputs match the original's on them.

    Returns
    -------
    (net, net_head, folded) : the network to run, its head module, and whether folding took
    place. Without foldable BatchNorm, with a head outside ``model``, a network ``torch.fx``
    cannot trace, or any disagreement on ``probe``, this is ``(model, head, False)``.
    """
    name = _module_name(model, head)
    if not name or not _has_batchnorm(model) or model.training:
        return model, head, False
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fused, count = _fold_batchnorm(model, {name, *layers})
        if count == 0:
            return model, head, False
        fused_head = fused.get_submodule(name)
        for layer in layers:
            fused.get_submodule(layer)
    except Exception:  # untraceable control flow, a layer lost by tracing, ...
        return model, head, False
    fused.eval()
    if probe is not None:
        device = probe.device
        outs = []
        for net, hd in ((model, head), (fused, fused_head)):
            taps = _Taps(net, hd, layers)
            try:
                outs.append(taps.run(net, probe, device, amp=False))
            except Exception:
                return model, head, False
            finally:
                taps.remove()
        if not _close(*outs):
            return model, head, False
    return fused, fused_head, True


def auto_batch_size(images: Images, device: torch.device) -> int:
    """Starting batch size for ``batch_size="auto"``.

    On the CPU, about ``2**18`` input elements per thread (small batches keep activations in
    cache; 64 images of 3 x 32 x 32 per thread). On CUDA, up to ``2**28`` input elements
    (at most 4096 images); :func:`extract_features` halves it on out-of-memory.
    """
    n = max(1, int(images.shape[0]))
    per_image = max(1, math.prod(images.shape[1:]))
    if device.type == "cuda":
        budget, lo, hi = _CUDA_START_ELEMENTS, 1, _CUDA_MAX_BATCH
    else:
        budget, lo, hi = _CPU_ELEMENTS_PER_THREAD * torch.get_num_threads(), 8, 512
    size = 1 << max(0, int(math.log2(max(1, budget // per_image))))
    return max(1, min(n, max(lo, min(hi, size))))


def _use_amp(amp: bool | None, device: torch.device) -> bool:
    if amp is None:  # default: bf16 on CUDA devices that support it, full precision elsewhere
        return device.type == "cuda" and torch.cuda.is_bf16_supported()
    return bool(amp)


def _auto_key(model: nn.Module, images: Images, device: torch.device,
              layers: Sequence[str]) -> tuple:
    n_params = sum(p.numel() for p in model.parameters())
    return (type(model).__qualname__, n_params, tuple(images.shape[1:]), images.dtype,
            str(device), tuple(layers))


def _is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower()


class _Loader:
    """Device batches ``images[start:end]``; on CUDA the next one is copied on a side stream.

    Host images that are not pinned are staged through two reusable pinned buffers, so the
    copy is asynchronous without pinning the whole dataset. :class:`RawImages` travel as uint8
    (a quarter of the bytes; read from an image store one batch at a time) and are normalised
    on the device.
    """

    def __init__(self, images: Images, device: torch.device, channels_last: bool):
        self.images, self.device = images, device
        self.channels_last = channels_last
        self.raw = is_raw(images)
        self.async_copy = device.type == "cuda" and images.device.type == "cpu"
        self.stream = torch.cuda.Stream(device) if self.async_copy else None
        self.staging: list[torch.Tensor | None] = [None, None]
        self.events: list[torch.cuda.Event | None] = [None, None]
        self.turn = 0
        self.pool: ThreadPoolExecutor | None = None
        self.ahead: tuple[tuple[int, int], Future] | None = None

    def _host(self, start: int, end: int) -> torch.Tensor:
        if not self.raw:
            return self.images[start:end]
        if not self.images.stored:
            return self.images.raw(start, end)
        # An image store is read one batch ahead on a thread (pread releases the GIL), so
        # that disk reads overlap the forward pass instead of adding to it.
        ahead = self.ahead
        x = ahead[1].result() if ahead is not None and ahead[0] == (start, end) else \
            self.images.raw(start, end)
        n, size = len(self.images), end - start
        if end < n:
            nxt = (end, min(n, end + size))
            if self.pool is None:
                self.pool = ThreadPoolExecutor(1, thread_name_prefix="dtprobe-read")
            self.ahead = (nxt, self.pool.submit(self.images.raw, *nxt))
        else:
            self.ahead = None
        return x

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True)
            self.pool = None

    def _format(self, x: torch.Tensor) -> torch.Tensor:
        if self.raw:
            x = self.images.normalise(x)
        if self.channels_last and x.ndim == 4:
            return x.contiguous(memory_format=torch.channels_last)
        return x

    def _stage(self, start: int, end: int) -> torch.Tensor:
        """A pinned host copy of ``images[start:end]`` in a buffer no pending copy reads."""
        if self.images.is_pinned():
            return self.images[start:end]
        i, rows = self.turn, end - start
        if self.events[i] is not None:
            self.events[i].synchronize()  # the copy that last read this buffer has finished
        buf = self.staging[i]
        if buf is None or buf.shape[0] < rows:
            # raw pixels are staged at their stored shape (converted on the device)
            shape = self.images.pixel_shape if self.raw else self.images.shape
            buf = torch.empty((rows, *shape[1:]),
                              dtype=torch.uint8 if self.raw else self.images.dtype,
                              pin_memory=True)
            self.staging[i] = buf
        out = buf[:rows]
        out.copy_(self._host(start, end))
        return out

    def fetch(self, start: int, end: int):
        """Start bringing ``images[start:end]`` to the device; returns a handle for ``get``."""
        if not self.async_copy:
            return self._format(self._host(start, end).to(self.device))
        host = self._stage(start, end)
        with torch.cuda.stream(self.stream):
            x = host.to(self.device, non_blocking=True)
            event = torch.cuda.Event()
            event.record(self.stream)
        self.events[self.turn] = event
        self.turn = 1 - self.turn
        return x, event

    def get(self, handle) -> torch.Tensor:
        """The device tensor of a ``fetch`` handle, safe to use on the current stream."""
        if not self.async_copy:
            return handle
        x, event = handle
        current = torch.cuda.current_stream(self.device)
        current.wait_event(event)
        x.record_stream(current)
        return self._format(x)


def _batches(n: int, start: int, size: int) -> Iterator[tuple[int, int]]:
    for s in range(start, n, size):
        yield s, min(n, s + size)


# ------------------------------------------------------------------------------ extraction
def extract_features(model: nn.Module, head: nn.Module, images: Images, *,
                     device: torch.device | str, batch_size: BatchSize = "auto",
                     layers: Sequence[str] = (), fold_batchnorm: bool = True,
                     amp: bool | None = None, engine: str = "eager") -> dict[str, torch.Tensor]:
    """Run ``model`` over ``images`` once and collect its outputs.

    Parameters
    ----------
    model : nn.Module
        The network (on ``device``); it is put in eval mode. Folding and the channels-last
        format apply to an inference copy; only when no copy is made (nothing to fold) on
        CUDA is the model itself converted to channels-last (same values).
    head : nn.Module
        Its classification head, whose input is the penultimate representation.
    images : torch.Tensor, shape (n, ...), or RawImages
        Normalised inputs, on the CPU (pinned when ``device`` is CUDA, for asynchronous
        copies; unpinned tensors are staged through small pinned buffers) or already on
        ``device``; or :class:`~dtprobe.data.pixels.RawImages` (uint8 pixels in memory, on the
        device or in an image store), moved as uint8 and normalised on ``device``.
    device : torch.device or str
        Where to run.
    batch_size : int or "auto", default "auto"
        Images per forward pass. ``"auto"`` chooses one (see :func:`auto_batch_size`) and
        halves it on out-of-memory until a batch fits, resuming after the last complete
        batch (the size that fitted is remembered for later calls with the same
        architecture and image shape); an explicit size is used as given (an out-of-memory
        error propagates).
    layers : sequence of str
        Dotted module names whose outputs are also returned, pooled to (n, channels).
    fold_batchnorm : bool, default True
        Fold eval-mode BatchNorm into the preceding convolution when the folded network is
        verified to agree with the original (see :func:`inference_model`).
    amp : bool, optional
        bf16 autocast. Default (``None``): on for CUDA devices that support bf16, off on the
        CPU, where float32 keeps the outputs exact to rounding. ``True`` also enables it on
        the CPU: several times faster on CPUs with AMX / AVX-512-BF16 units, at bf16
        precision (about 3 significant digits).
    engine : {"eager", "onnx"}, default "eager"
        What runs the forward passes (:mod:`dtprobe.engines`). ``"onnx"``: ONNX Runtime on the
        CPU, exported from the same folded copy once per checkpoint and checked against the
        eager network on the first images (to 1e-4 relative) of every call; when the export
        fails or disagrees, a warning and the eager path. Needs ``device="cpu"``, float32
        (``amp`` not ``True``) and ``pip install 'dtprobe[onnx]'``.

    Returns
    -------
    dict of str to torch.Tensor
        ``features`` (n, d) and ``logits`` (n, C) as float32 CPU tensors, plus a
        ``layer:<name>`` entry for each requested layer.

    Raises
    ------
    ConfigError
        ``batch_size`` is neither a positive int nor ``"auto"``, ``images`` is empty, or
        ``engine`` is unknown or cannot run here (see :func:`dtprobe.engines.check_engine`).
    RuntimeError
        The model fails on the images (e.g. wrong input shape), or runs out of memory at
        an explicit ``batch_size``.

    References
    ----------
    Kornblith, S., Chen, T., Lee, H., Norouzi, M. (2021). Why do better loss functions lead
    to less transferable features? NeurIPS 2021 (penultimate-layer analysis).
    """
    device = torch.device(device)
    auto = batch_size == "auto"
    if not auto and (isinstance(batch_size, bool) or not isinstance(batch_size, int)
                     or batch_size < 1):
        raise ConfigError(f"batch_size={batch_size!r}: pass a positive integer or 'auto'")
    if images.ndim < 1 or images.shape[0] == 0:
        raise ConfigError("extract_features got no images; pass a non-empty (n, ...) tensor")
    n = int(images.shape[0])
    model.eval()
    if engine != "eager":
        check_engine(engine, device, amp)
        size = auto_batch_size(images, device) if auto else int(batch_size)
        out = run_engine(engine, model, head, images, batch_size=max(1, min(size, n)),
                         layers=layers, fold_batchnorm=fold_batchnorm)
        if out is not None:
            return out
    net, net_head = model, head
    channels_last = images.ndim == 4
    if fold_batchnorm:
        probe = images[:_FOLD_CHECK_IMAGES].to(device)
        net, net_head, folded = inference_model(model, head, layers, probe)
    else:
        folded = False
    if channels_last and folded:
        net = net.to(memory_format=torch.channels_last)
    elif channels_last and device.type == "cuda":
        # No private copy: convert the caller's model only where it pays most (as before);
        # on the CPU the input alone goes channels-last.
        net = net.to(memory_format=torch.channels_last)
    key = _auto_key(model, images, device, layers)
    if auto:
        size = _AUTO_BATCH.get(key) or auto_batch_size(images, device)
    else:
        size = int(batch_size)
    size = first = max(1, min(size, n))

    taps = _Taps(net, net_head, layers)
    out: dict[str, torch.Tensor] = {}
    progress = [0]  # rows completed
    try:
        while progress[0] < n:
            try:
                _run_range(net, taps, images, size, device, channels_last, out, progress,
                           _use_amp(amp, device))
            except RuntimeError as exc:
                if not (auto and _is_oom(exc) and size > 1):
                    raise
                size = max(1, size // 2)  # retry from the last complete batch
                if device.type == "cuda":
                    torch.cuda.empty_cache()
        if auto and size < first:
            _AUTO_BATCH[key] = size  # later checkpoints of this architecture start here
    finally:
        taps.remove()
    if device.type == "cuda":
        torch.cuda.current_stream(device).synchronize()
    return {k: v.cpu() if v.device.type != "cpu" else v for k, v in out.items()}


def _run_range(net: nn.Module, taps: _Taps, images: Images, size: int,
               device: torch.device, channels_last: bool, out: dict[str, torch.Tensor],
               progress: list[int], amp: bool) -> None:
    """Forward ``images[progress[0]:]`` in batches of ``size`` into preallocated ``out``.

    ``progress[0]`` is advanced after every batch, so that a caller retrying after an
    out-of-memory error resumes where the last complete batch ended.
    """
    n = int(images.shape[0])
    loader = _Loader(images, device, channels_last)
    ranges = list(_batches(n, progress[0], size))
    with torch.inference_mode(), contextlib.closing(loader):
        pending = loader.fetch(*ranges[0])
        for i, (s, e) in enumerate(ranges):
            x = loader.get(pending)
            if i + 1 < len(ranges):
                pending = loader.fetch(*ranges[i + 1])
            outs = taps.run(net, x, device, amp)
            for name, val in outs.items():
                buf = out.get(name)
                if buf is None:
                    buf = torch.empty((n, *val.shape[1:]), dtype=torch.float32,
                                      device=device)
                    out[name] = buf
                buf[s:e].copy_(val, non_blocking=True)
            progress[0] = e


# ----------------------------------------------------------------------------------- cache
def cache_key(checkpoint_sha256: str, dataset_key: str, split: str, layers: Sequence[str],
              transform: str = "") -> str:
    """Key of one checkpoint's features on one dataset split.

    Parameters
    ----------
    checkpoint_sha256 : digest of the checkpoint file (or another unique id of its weights).
    dataset_key : :func:`dataset_key` of the evaluation data.
    split : ``"train"`` or ``"test"``.
    layers : extra layers extracted (order does not matter).
    transform : optional tag of any input transform not captured by ``dataset_key``; the
        empty default leaves the key as in earlier versions, so existing caches stay valid.
    """
    parts: list = [CACHE_VERSION, checkpoint_sha256, dataset_key, split, sorted(layers)]
    if transform:
        parts.append(transform)
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:32]


def dataset_key(name: str, params: dict) -> str:
    """A stable string identifying a dataset (name + its generating parameters)."""
    return f"{name}:{json.dumps(params, sort_keys=True, default=str)}"


#: Storage precisions of cached features and layer outputs (``--feature-dtype``).
FEATURE_DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "float16": torch.float16,
                                          "bfloat16": torch.bfloat16}


def resolve_feature_dtype(name: str) -> torch.dtype:
    """The torch dtype of a ``--feature-dtype`` name; :class:`ConfigError` for any other."""
    if not isinstance(name, str) or name not in FEATURE_DTYPES:
        raise ConfigError(f"--feature-dtype {name!r}: pass one of {', '.join(FEATURE_DTYPES)}")
    return FEATURE_DTYPES[name]


def feature_dtype_tag(name: str) -> str:
    """The :func:`cache_key` ``transform`` tag of a storage dtype: empty for float32 (the keys
    of earlier versions), so that half-precision and float32 features never share a key."""
    resolve_feature_dtype(name)
    return "" if name == "float32" else f"dtype={name}"


def for_storage(tensors: dict[str, torch.Tensor], name: str) -> dict[str, torch.Tensor]:
    """``tensors`` as cached with ``--feature-dtype name``: ``features`` and ``layer:*`` in that
    dtype; ``logits`` stay float32, so that the source accuracy (an argmax, often between
    near-tied logits) and the logit-based scores (LEEP, NCE) are not changed by storage.

    Raises
    ------
    ValueError
        A finite value does not fit the dtype (float16 overflows beyond 65504).
    """
    dtype = resolve_feature_dtype(name)
    out = {}
    for key, value in tensors.items():
        if key == "logits" or not value.is_floating_point() or value.dtype == dtype:
            out[key] = value
            continue
        cast = value.to(dtype)
        if not bool(torch.isfinite(cast).all()) and bool(torch.isfinite(value).all()):
            peak = float(value.abs().max())
            raise ValueError(f"{key} reaches |x| = {peak:.3g}, beyond the {name} range "
                             f"({torch.finfo(dtype).max:.6g})")
        out[key] = cast
    return out


def for_compute(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Cached tensors as the metrics read them: half-precision entries cast to float32 (exact:
    every float16 and bfloat16 value is a float32 value)."""
    return {k: v.float() if v.dtype in (torch.float16, torch.bfloat16) else v
            for k, v in tensors.items()}


_REQUIRED = ("features", "logits")


class FeatureCache:
    """Safetensors files under ``root`` keyed by :func:`cache_key` (no pickle involved).

    ``reuse=False`` ignores existing entries (they are recomputed and overwritten); features are
    always written, because the across-epoch metrics stream them back from disk. Files are
    written atomically under an unpredictable temporary name, then renamed
    (:func:`checkpoints_manifest.atomic_writer`), so a reader never sees a partial file and a
    link planted in the folder is never written through. Each file is sealed
    (:mod:`dtprobe.integrity`: an HMAC of its tensors bound to its key, with this user's secret
    key), and read back only as a regular file of bounded size; a torn, foreign, forged or
    inconsistent file (missing ``features``/``logits``, rows that disagree) is a cache miss,
    never an error and never a result.
    """

    def __init__(self, root: Path | str, reuse: bool = True):
        self.root = Path(root)
        self.reuse = reuse
        self._fresh: set[str] = set()

    def _path(self, key: str) -> Path:
        return self.root / f"{key}.safetensors"

    def __contains__(self, key: str) -> bool:
        return self.get(key) is not None

    def get(self, key: str) -> dict[str, torch.Tensor] | None:
        """The cached tensors of ``key``, or ``None`` (absent, ignored, torn, forged, foreign)."""
        path = self._path(key)
        if not self.reuse and key not in self._fresh:
            return None
        try:
            data = read_regular_file(path, MAX_CACHE_BYTES, "feature file")
            if not _sealed(key, data):
                return None
            tensors = load_safetensors(data)
        except Exception:  # absent, torn, foreign or forged: a cache miss, never an error
            return None
        if any(k not in tensors for k in _REQUIRED):
            return None
        n = tensors["features"].shape[0] if tensors["features"].ndim else -1
        if any(t.ndim == 0 or t.shape[0] != n for t in tensors.values()):
            return None
        return tensors

    def remove(self, key: str) -> None:
        """Delete the entry ``key`` if present (e.g. part files once their whole is cached)."""
        self._fresh.discard(key)
        self._path(key).unlink(missing_ok=True)

    def put(self, key: str, tensors: dict[str, torch.Tensor]) -> None:
        """Store ``tensors`` under ``key`` atomically (temporary file, then rename), sealed."""
        self._fresh.add(key)
        self.root.mkdir(parents=True, exist_ok=True)
        contiguous = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
        # The seal covers the tensor entries and bytes, which adding metadata leaves unchanged.
        header, body = _split(save_safetensors(contiguous))
        mac = integrity.seal(key, _canonical(header), body)
        atomic_write_bytes(self._path(key), save_safetensors(
            contiguous, metadata={"dtprobe_key": key, "dtprobe_mac": mac}))


#: Largest feature file read back (features of a few hundred thousand images).
MAX_CACHE_BYTES = 16 << 30


def _split(data: bytes) -> tuple[dict, memoryview]:
    """Header (JSON object) and tensor bytes of safetensors content."""
    size = int.from_bytes(data[:8], "little")
    if len(data) < 8 or size > len(data) - 8:
        raise ValueError("truncated safetensors header")
    header = json.loads(data[8:8 + size])
    if not isinstance(header, dict):
        raise ValueError("safetensors header is not an object")
    return header, memoryview(data)[8 + size:]


def _canonical(header: dict) -> bytes:
    """The tensor entries of a header (names, dtypes, shapes, offsets), metadata left out."""
    return json.dumps({k: v for k, v in header.items() if k != "__metadata__"},
                      sort_keys=True).encode()


def _sealed(key: str, data: bytes) -> bool:
    header, body = _split(data)
    meta = header.get("__metadata__") or {}
    return (isinstance(meta, dict) and meta.get("dtprobe_key") == key
            and integrity.verify(key, meta.get("dtprobe_mac"), _canonical(header), body))
