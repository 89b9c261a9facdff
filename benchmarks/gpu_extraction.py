"""GPU extraction throughput: dtprobe's engine against the pure forward pass (needs CUDA).

ResNet-50 at 224 px, bf16 autocast, channels-last, one batch size for both:

- pure forward: the same batch already resident on the GPU, ``model(x)`` in a loop under
  ``torch.inference_mode`` (no data movement, no outputs kept): the rate the network itself
  allows, in images per second;
- dtprobe: ``extract_features`` over host images in pinned memory (copies overlapped with
  compute on a side stream, features and logits gathered on the device, one transfer back).

Goal: the engine keeps at least 85% of the pure forward rate. Skipped (reported as such)
on machines without CUDA.

Reference: He, K., Zhang, X., Ren, S., Sun, J. (2016). Deep residual learning for image
recognition. CVPR 2016 (ResNet-50).
"""

from __future__ import annotations

import time

import torch

from benchmarks import Row
from dtprobe.features.extract import extract_features
from dtprobe.models import build_model

TOLERANCE = 5e-2  # bf16 outputs, relative to the largest absolute value
GOAL = 0.85


def _pure_forward_rate(model: torch.nn.Module, x: torch.Tensor, n_batches: int) -> float:
    """Images per second of ``model(x)`` repeated ``n_batches`` times on the device."""
    with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16):
        for _ in range(3):
            model(x)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(n_batches):
            model(x)
        torch.cuda.synchronize()
    return n_batches * x.shape[0] / (time.perf_counter() - t0)


def run(quick: bool = False) -> list[Row]:
    side, batch, n_batches = (64, 32, 4) if quick else (224, 256, 16)
    n = batch * n_batches
    sizes = f"resnet50, {n:,} images at {side} px, batch {batch}, bf16"
    name = "GPU extraction vs pure forward"
    if not torch.cuda.is_available():
        return [Row(name=name, sizes=sizes, unit="img/s", kind="rate", goal=GOAL, skipped=True,
                    baseline="pure forward rate",
                    note=("skipped: no CUDA device here; goal: engine rate >= "
                          f"{GOAL:.0%} of the pure forward rate"))]
    device = torch.device("cuda")
    torch.manual_seed(0)
    model = build_model("resnet50", 1000).to(device).eval()
    model = model.to(memory_format=torch.channels_last)
    gen = torch.Generator().manual_seed(0)
    host = torch.randn(n, 3, side, side, generator=gen).pin_memory()
    x = host[:batch].to(device).contiguous(memory_format=torch.channels_last)
    pure = _pure_forward_rate(model, x, n_batches)
    extract_features(model, model.fc, host[:batch], device=device, batch_size=batch)  # warm-up
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = extract_features(model, model.fc, host, device=device, batch_size=batch)
    engine = n / (time.perf_counter() - t0)
    with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16):
        ref = model(x).float().cpu()
    diff = float((out["logits"][:batch] - ref).abs().max() / ref.abs().max())
    ratio = engine / pure
    return [Row(
        name=name, sizes=sizes, ours=engine, base=pure, unit="img/s", kind="rate",
        goal=GOAL, baseline="pure forward rate (batch resident on the GPU)",
        agreement=f"logits max rel diff {diff:.1e} vs model(x) (tol {TOLERANCE:g})",
        agree_ok=diff <= TOLERANCE,
        note=f"engine {engine:.0f} img/s = {ratio:.0%} of the pure forward {pure:.0f} img/s")]
