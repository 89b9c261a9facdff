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
import math
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Literal

import torch
from torch import nn

from dtprobe.data.pixels import RawImages, is_raw
from dtprobe.errors import ConfigError
from dtprobe.features.cache import (  # noqa: F401  (re-exported: dtprobe.extract's names)
    CACHE_VERSION,
    FEATURE_DTYPES,
    FeatureCache,
    cache_key,
    dataset_key,
    feature_dtype_tag,
    for_compute,
    for_storage,
    resolve_feature_dtype,
)
from dtprobe.features.engines import check_engine, run_engine
from dtprobe.features.prepare import Taps, inference_model

__all__ = ["CACHE_VERSION", "FEATURE_DTYPES", "FeatureCache", "auto_batch_size", "cache_key",
           "dataset_key", "extract_features", "feature_dtype_tag", "for_compute", "for_storage",
           "inference_model", "resolve_feature_dtype"]

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
FOLD_CHECK_IMAGES = 4


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
        What runs the forward passes (:mod:`dtprobe.features.engines`). ``"onnx"``: ONNX Runtime
        on the
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
        ``engine`` is unknown or cannot run here (see
        :func:`dtprobe.features.engines.check_engine`).
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
        probe = images[:FOLD_CHECK_IMAGES].to(device)
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

    taps = Taps(net, net_head, layers)
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


def _run_range(net: nn.Module, taps: Taps, images: Images, size: int,
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
