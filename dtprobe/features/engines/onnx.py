"""ONNX Runtime engine for CPU feature extraction (``extract_features(..., engine="onnx")``).

The network is exported from the same inference copy the eager engine runs (eval-mode
BatchNorm folded into the convolutions, :func:`dtprobe.features.extract.inference_model`), wrapped
in a
module whose outputs are ``(logits, penultimate features, *pooled layer outputs)``, so that the
graph needs no hooks. The export (``torch.onnx.export``, TorchScript tracer, batch axis
dynamic) is kept in memory and run by an ``onnxruntime.InferenceSession`` on the CPU provider
with as many intra-op threads as torch uses. ONNX Runtime then applies its own graph
optimisations (fusions, blocked ``NCHWc`` convolution layouts) at session creation.

The weights differ between checkpoints, so every checkpoint is exported once: the session is
kept for later calls on the same model object while none of its parameters or buffers has
changed (the train and test splits of one checkpoint share one export). Each call checks the
session against the eager network on its first :data:`CHECK_IMAGES` images: every output must
agree to :data:`TOLERANCE` relative to its largest magnitude (a kept session that fails the
check, e.g. after weights were written through ``.data``, is first replaced by a fresh
export). When the export fails (the architecture is then not tried again in this process) or
the outputs disagree, the call returns ``None`` after a warning and the caller extracts
eagerly.
:func:`export_stats` counts exports and the seconds they cost (export + session creation).

References
----------
ONNX Runtime developers (2021). ONNX Runtime. https://onnxruntime.ai (CPU execution
provider, graph optimisations).

Bai, J., Lu, F., Zhang, K. et al. (2019). ONNX: Open Neural Network Exchange.
https://github.com/onnx/onnx (operator set 17).
"""

from __future__ import annotations

import contextlib
import inspect
import io
import itertools
import os
import sys
import time
import warnings
import weakref
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from dtprobe.data.pixels import is_raw
from dtprobe.errors import ConfigError, first_line
from dtprobe.features.prepare import Taps, inference_model

__all__ = ["CHECK_IMAGES", "TOLERANCE", "OnnxNetwork", "export_onnx", "export_stats",
           "extract_onnx", "require_onnxruntime", "reset_export_stats"]

#: Largest ``max |onnx - eager| / max |eager|`` accepted on any output (float32 rounding of
#: a reordered computation is ~1e-6; a wrong graph is O(1)).
TOLERANCE = 1e-4
#: Images of every call run through both engines before the ONNX session is trusted.
CHECK_IMAGES = 4
#: ONNX operator set of the export (supported by onnxruntime >= 1.14 and torch >= 1.13).
OPSET = 17

_INPUT = "images"
_STATS = {"exports": 0, "export_seconds": 0.0, "reused": 0, "fallbacks": 0}
#: The last exported network, reused while its model object and weights are unchanged.
_LAST: dict[str, Any] = {}
#: Architectures (class, parameter shapes, layers, input shape) whose export failed: later
#: checkpoints go to the eager engine without trying again.
_UNEXPORTABLE: set[tuple] = set()


def require_onnxruntime():
    """The ``onnxruntime`` module, or a one-line :class:`ConfigError` saying how to install it.

    ONNX Runtime's telemetry (1.2x on Linux) writes, when the module is imported, a session file
    ``$TMPDIR/.ses`` opened with ``O_CREAT | O_TRUNC`` and no ``O_NOFOLLOW`` (a link planted
    there in a shared ``/tmp`` is written through) and a database under ``~/.cache/Microsoft``;
    dtprobe writes nothing outside the run except through its atomic writer, so the import is
    made with ``ORT_DISABLE_TELEMETRY=1`` (an explicit setting of yours is kept).
    """
    os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
    try:
        import onnxruntime
    except ImportError:
        raise ConfigError("--engine onnx needs onnxruntime: pip install 'dtprobe[onnx]'") \
            from None
    return onnxruntime


def export_stats() -> dict[str, float]:
    """Counters since the last :func:`reset_export_stats`: ``exports`` (networks exported),
    ``export_seconds`` (their export + session creation time), ``reused`` (calls served by the
    previous export) and ``fallbacks`` (calls handed back to the eager engine)."""
    return dict(_STATS)


def reset_export_stats() -> None:
    """Zero the counters of :func:`export_stats` and forget the kept session."""
    _STATS.update(exports=0, export_seconds=0.0, reused=0, fallbacks=0)
    _LAST.clear()
    _UNEXPORTABLE.clear()


class _Outputs(nn.Module):
    """``net`` with its penultimate features and pooled layer outputs as forward outputs."""

    def __init__(self, net: nn.Module, head: nn.Module, layers: Sequence[str]):
        super().__init__()
        self.net = net
        self.head = [head]  # a list: not a second registration of a submodule of ``net``
        self.layers = list(layers)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        taps = Taps(self.net, self.head[0], self.layers)
        try:
            outs = taps.run(self.net, x, x.device)
        finally:
            taps.remove()
        return (outs["logits"], outs["features"], *(outs[f"layer:{k}"] for k in self.layers))


def _output_names(layers: Sequence[str]) -> list[str]:
    return ["logits", "features", *(f"layer:{k}" for k in layers)]


def export_onnx(net: nn.Module, head: nn.Module, layers: Sequence[str],
                example: torch.Tensor) -> bytes:
    """ONNX bytes of ``net``'s ``(logits, features, *layer outputs)`` with a dynamic batch axis.

    Parameters
    ----------
    net : the network to export (in eval mode, on the CPU), e.g. an inference copy.
    head : its classification head; the features are the head's input, flattened.
    layers : dotted module names whose outputs are added, pooled as in
        :func:`dtprobe.features.extract.extract_features`.
    example : a CPU batch of input images to trace with.

    Returns
    -------
    bytes
        The serialised ``ModelProto`` (input ``"images"``; outputs ``"logits"``,
        ``"features"``, ``"layer:<name>"``).

    Raises
    ------
    Exception
        Whatever the exporter raises for a network it cannot export.
    """
    names = _output_names(layers)
    kwargs: dict[str, Any] = dict(
        input_names=[_INPUT], output_names=names, opset_version=OPSET,
        dynamic_axes={name: {0: "batch"} for name in (_INPUT, *names)})
    if "dynamo" in inspect.signature(torch.onnx.export).parameters:
        # The TorchScript tracer exports small_cnn in ~0.05 s; the torch.export-based exporter
        # took ~4 s, paid again for every checkpoint.
        kwargs["dynamo"] = False
    buf = io.BytesIO()
    with torch.no_grad(), warnings.catch_warnings(), _native_stdout_silenced():
        warnings.simplefilter("ignore")  # tracer and deprecation warnings; the check decides
        torch.onnx.export(_Outputs(net, head, layers).eval(), (example,), buf, **kwargs)
    return buf.getvalue()


@contextlib.contextmanager
def _native_stdout_silenced():
    """File descriptor 1 pointed at the null device for the duration.

    The TorchScript exporter leaves its C++ log switched on (torch 2.14) and, when an export
    fails, writes the whole traced graph to the process's stdout before raising: hundreds of
    lines for a network, where the caller shows one warning.
    """
    try:
        sys.stdout.flush()
        saved = os.dup(1)
    except (OSError, ValueError):  # no stdout to protect
        yield
        return
    try:
        null = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(null, 1)
        finally:
            os.close(null)
        yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)


class OnnxNetwork:
    """An ``onnxruntime.InferenceSession`` (CPU provider) over :func:`export_onnx` bytes.

    Parameters
    ----------
    data : the ONNX model bytes.
    layers : the layer names it was exported with (their outputs follow the features).
    threads : intra-op threads (default: ``torch.get_num_threads()``).
    """

    def __init__(self, data: bytes, layers: Sequence[str], threads: int | None = None):
        ort = require_onnxruntime()
        options = ort.SessionOptions()
        options.intra_op_num_threads = int(threads or torch.get_num_threads())
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3  # errors only: no notes on unused initializers
        self.session = ort.InferenceSession(data, sess_options=options,
                                            providers=["CPUExecutionProvider"])
        self.names = _output_names(layers)

    def __call__(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Outputs of one CPU batch, keyed as :func:`dtprobe.features.extract.extract_features` keys
        them."""
        try:
            arrays = self.session.run(None, {_INPUT: x.detach().contiguous().numpy()})
        except Exception as exc:  # onnxruntime's errors are not RuntimeErrors
            raise RuntimeError(f"onnxruntime: {exc}") from exc
        return dict(zip(self.names, (torch.from_numpy(a) for a in arrays), strict=True))


def _host_batch(images, start: int, end: int) -> torch.Tensor:
    """Normalised CPU images ``[start, end)`` (raw uint8 pixels normalised here)."""
    if is_raw(images):
        return images.normalise(images.raw(start, end).cpu())
    return images[start:end].cpu().contiguous()


def _fingerprint(model: nn.Module) -> tuple:
    """Identity, storage and version counter of every parameter and buffer: any in-place
    update (``load_state_dict``, an optimiser step) or replacement changes it."""
    return tuple((id(t), t.data_ptr(), t._version)
                 for t in itertools.chain(model.parameters(), model.buffers()))


def _architecture(model: nn.Module, layers: Sequence[str], probe: torch.Tensor) -> tuple:
    return (type(model).__module__, type(model).__qualname__,
            tuple((k, tuple(v.shape)) for k, v in model.state_dict().items()),
            tuple(layers), tuple(probe.shape[1:]), probe.dtype)


def _key(model: nn.Module, head: nn.Module, layers: Sequence[str], probe: torch.Tensor,
         fold_batchnorm: bool) -> tuple:
    return (id(head), tuple(layers), tuple(probe.shape[1:]), probe.dtype, fold_batchnorm,
            torch.get_num_threads(), _fingerprint(model))


def _kept(model: nn.Module, head: nn.Module, layers: Sequence[str], probe: torch.Tensor,
          fold_batchnorm: bool) -> OnnxNetwork | None:
    """The kept session if it was exported from this model object with these weights."""
    kept = _LAST.get("model")
    if (kept is not None and kept() is model
            and _LAST.get("key") == _key(model, head, layers, probe, fold_batchnorm)):
        return _LAST["network"]
    return None


def _network(model: nn.Module, head: nn.Module, layers: Sequence[str], probe: torch.Tensor,
             fold_batchnorm: bool) -> OnnxNetwork:
    """The session for ``model``'s current weights: the kept one, or a fresh export."""
    network = _kept(model, head, layers, probe, fold_batchnorm)
    if network is not None:
        _STATS["reused"] += 1
        return network
    _LAST.clear()
    key = _key(model, head, layers, probe, fold_batchnorm)
    t0 = time.perf_counter()
    net, net_head = model, head
    if fold_batchnorm:
        net, net_head, _ = inference_model(model, head, layers, probe)
    network = OnnxNetwork(export_onnx(net, net_head, layers, probe), layers)
    _STATS["exports"] += 1
    _STATS["export_seconds"] += time.perf_counter() - t0
    _LAST.update(model=weakref.ref(model), key=key, network=network)
    return network


def _disagreement(ref: dict[str, torch.Tensor], new: dict[str, torch.Tensor]
                  ) -> tuple[float, str]:
    """Largest ``max |new - ref| / max |ref|`` over the outputs, and which output it is."""
    worst, where = 0.0, ""
    for name, a in ref.items():
        b = new.get(name)
        if b is None or b.shape != a.shape:
            return float("inf"), name
        a, b = a.float(), b.float()
        scale = max(float(a.abs().max()) if a.numel() else 0.0, 1e-12)
        diff = float((a - b).abs().max()) / scale if a.numel() else 0.0
        if not diff <= worst:  # also catches NaN
            worst, where = diff, name
    return worst, where


def _fallback(reason: str) -> None:
    _STATS["fallbacks"] += 1
    _LAST.clear()
    warnings.warn(f"engine='onnx': {reason}; extracting with the eager engine instead",
                  RuntimeWarning, stacklevel=5)  # extract_features' caller


def extract_onnx(model: nn.Module, head: nn.Module, images, *, batch_size: int,
                 layers: Sequence[str] = (), fold_batchnorm: bool = True
                 ) -> dict[str, torch.Tensor] | None:
    """Features, logits and pooled layer outputs of ``model`` over ``images`` via ONNX Runtime.

    Parameters
    ----------
    model : the network, in eval mode, on the CPU.
    head : its classification head (the features are its input).
    images : normalised float tensor ``(n, ...)`` or :class:`~dtprobe.data.pixels.RawImages`
        (normalised here, batch by batch).
    batch_size : images per ``InferenceSession.run``.
    layers : dotted module names whose outputs are also returned, pooled to (n, channels).
    fold_batchnorm : export the BatchNorm-folded inference copy (as the eager engine runs it).

    Returns
    -------
    dict of str to torch.Tensor, or None
        ``features``, ``logits`` and ``layer:<name>`` as float32 CPU tensors; ``None`` (after
        a :class:`RuntimeWarning`) when the network could not be exported or the session
        disagrees with the eager network on the first images by more than
        :data:`TOLERANCE`, and also (silently) when the eager network fails on those images
        or gives NaN/Inf there, so that the caller's eager path reports what it reports.
    """
    n = int(images.shape[0])
    probe = _host_batch(images, 0, min(n, CHECK_IMAGES))
    taps = Taps(model, head, layers)
    try:
        with torch.inference_mode():
            ref = taps.run(model, probe, probe.device)
    except Exception:  # the eager path raises its own, familiar error for this
        return None
    finally:
        taps.remove()
    if not all(bool(torch.isfinite(v).all()) for v in ref.values()):
        return None  # a diverged checkpoint: the eager path's NaN checks handle it
    arch = _architecture(model, layers, probe)
    if arch in _UNEXPORTABLE:
        _fallback(f"{type(model).__name__} could not be exported (an earlier checkpoint)")
        return None
    for _ in range(2):
        reused = _kept(model, head, layers, probe, fold_batchnorm) is not None
        try:
            network = _network(model, head, layers, probe, fold_batchnorm)
            got = network(probe)
        except Exception as exc:  # noqa: BLE001 - any exporter or session failure: run eagerly
            _UNEXPORTABLE.add(arch)
            _fallback(f"{type(model).__name__} could not be exported or loaded "
                      f"({type(exc).__name__}: {first_line(str(exc))})")
            return None
        worst, where = _disagreement(ref, got)
        if worst <= TOLERANCE or not reused:
            break
        # Weights written through ``.data`` keep their version counter: the kept session is
        # stale, not wrong. Export these weights afresh.
        _LAST.clear()
    if not worst <= TOLERANCE:
        _fallback(f"the exported {type(model).__name__} disagrees with eager on {where} "
                  f"(max rel diff {worst:.1e} > {TOLERANCE:g} on the first {probe.shape[0]} "
                  "images)")
        return None
    out: dict[str, torch.Tensor] = {}
    for start in range(0, n, batch_size):
        end = min(n, start + batch_size)
        for name, val in network(_host_batch(images, start, end)).items():
            buf = out.get(name)
            if buf is None:
                buf = out[name] = torch.empty((n, *val.shape[1:]), dtype=torch.float32)
            buf[start:end].copy_(val)
    return {k: out[k] for k in ("features", "logits", *(f"layer:{k}" for k in layers))}
