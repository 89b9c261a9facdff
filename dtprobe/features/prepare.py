"""Model preparation for feature extraction: the inference copy (BatchNorm folded into the
convolutions, checked against the original) and the forward hooks that tap the features.

A leaf of :mod:`dtprobe.features`: used by :mod:`~dtprobe.features.extract` and by the engines.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Sequence

import torch
from torch import nn

from dtprobe.models.tap import PenultimateTap


def _pool(t: torch.Tensor) -> torch.Tensor:
    """One vector per image: convolutional maps (N, C, H, W) are averaged over space, as in most
    CKA studies; token sequences (N, T, D) of vision transformers over their tokens."""
    if t.ndim == 3:
        return t.mean(dim=1)
    return t.mean(dim=tuple(range(2, t.ndim))) if t.ndim > 2 else t.flatten(1)


class Taps:
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
        if not bool(torch.isfinite(a).all()):
            return False  # NaN/Inf outputs (a diverged checkpoint) cannot vouch for a fold
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


def _fold_batchnorm(model: nn.Module, head: str, keep: set[str]) -> tuple[nn.Module, int]:
    """Fold every eval BatchNorm into the conv feeding it, in a deep copy of the eager model.

    ``torch.fx`` traces the network (only the head kept opaque) to find the pairs: a pair is
    folded when the conv's output feeds nothing but the BatchNorm, each module is called
    once, the BatchNorm tracks running statistics, and the conv is not in ``keep`` (a
    requested layer whose own, pre-BatchNorm output must stay exact).  The copy keeps the
    module tree (the conv replaced by the folded conv, the BatchNorm by ``nn.Identity``), so
    forward hooks on any module still fire, and the set of folded pairs does not depend on
    which other layers are hooked: the penultimate features are computed by the same
    arithmetic whatever ``--layers`` asks for.  Returns the copy and the number of folded
    pairs.
    """
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    graph = _Tracer({head}).trace(model)
    modules = dict(model.named_modules())
    calls: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    pairs = []
    for node in graph.nodes:
        if node.op != "call_module" or len(node.args) != 1 or node.kwargs:
            continue
        src = node.args[0]
        if not isinstance(src, torch.fx.Node) or src.op != "call_module":
            continue
        conv, bn = modules.get(src.target), modules.get(node.target)
        if (type(conv) not in _CONV_BN or type(bn) is not _CONV_BN[type(conv)]
                or len(src.users) != 1 or calls[src.target] != 1 or calls[node.target] != 1
                or not bn.track_running_stats or bn.running_mean is None
                or src.target in keep or head in (src.target, node.target)):
            continue
        pairs.append((src.target, node.target))
    copy_ = copy.deepcopy(model)
    for conv_name, bn_name in pairs:
        conv, bn = copy_.get_submodule(conv_name), copy_.get_submodule(bn_name)
        fused = fuse_conv_bn_eval(conv, bn)
        for name, module in ((conv_name, fused), (bn_name, nn.Identity())):
            parent_name, _, attr = name.rpartition(".")
            setattr(copy_.get_submodule(parent_name) if parent_name else copy_, attr, module)
    return copy_, len(pairs)


@torch.no_grad()
def inference_model(model: nn.Module, head: nn.Module, layers: Sequence[str] = (),
                    probe: torch.Tensor | None = None) -> tuple[nn.Module, nn.Module, bool]:
    """An inference copy of ``model`` with eval-mode BatchNorm folded into preceding convs.

    Folding ``y = gamma (W x + b - mu) / sqrt(var + eps) + beta`` into one convolution with
    weight ``W gamma / sqrt(var + eps)`` removes a full pass over every activation map; the
    result equals the original up to float rounding.  Which pairs are folded, and whether
    the copy is used, do not depend on ``layers`` (except that a requested conv keeps its
    own output): a checkpoint's penultimate features are the same numbers whatever other
    layers are extracted with them.

    Parameters
    ----------
    model : the network, in eval mode and on its device (not modified).
    head : its classification head (a submodule of ``model``).
    layers : dotted module names whose outputs will be hooked.
    probe : a few input images on the model's device; the folded copy is used only if its
        logits and penultimate features match the original's on them.

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
            fused, count = _fold_batchnorm(model, name, set(layers))
        if count == 0:
            return model, head, False
        fused_head = fused.get_submodule(name)
        for layer in layers:
            fused.get_submodule(layer)
    except Exception:  # untraceable control flow, ...
        return model, head, False
    fused.eval()
    if probe is not None:
        device = probe.device
        outs = []
        # checked on the logits and penultimate features only, so that the decision does
        # not depend on the layers requested (a wrong fold shows in the logits)
        for net, hd in ((model, head), (fused, fused_head)):
            taps = Taps(net, hd, ())
            try:
                outs.append(taps.run(net, probe, device, amp=False))
            except Exception:
                return model, head, False
            finally:
                taps.remove()
        if not _close(*outs):
            return model, head, False
    return fused, fused_head, True
