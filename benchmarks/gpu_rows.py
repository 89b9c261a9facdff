"""GPU rows (issue 14): extraction vs the pure forward pass; the linear probe on GPU vs CPU.

``python -m benchmarks.gpu_rows`` needs one CUDA device and finishes in a few minutes:

(a) ResNet-50 (torchvision architecture, random weights, nothing downloaded) at 224 px, bf16:
    images per second of :func:`dtprobe.features.extract.extract_features` over synthetic uint8
    images
    normalised once on the host (pinned; ImageNet mean and std), against a pure ``model(x)``
    loop under bf16 autocast on one batch already resident on the GPU, at the same batch size.
    The ratio is the fraction of the network's own rate the engine keeps (copies, BatchNorm
    folding check, output gathering included).
(b) :func:`dtprobe.metrics.probes.linear_probe` (the Kornblith et al. 2019 protocol, default
    C grid) on synthetic Gaussian class clusters, 2048 features, 1000 classes: on the GPU at
    ``--probe-n`` training rows (default 100,000), and on the GPU and the CPU side by side at
    the largest size the CPU finishes in about ``--cpu-budget`` seconds (estimated from a timed
    matrix product and the GPU run's iteration count; the size used is printed). Both devices
    get the same rows; their test accuracies must agree.

Without CUDA it refuses (exit 2). ``--quick`` runs tiny sizes on whatever is there (the CPU
stands in for the GPU when there is none): a smoke test of the code, not a measurement.
Not part of ``benchmarks.run`` (which must run everywhere); ``benchmarks/gpu_extraction.py``
is the suite's GPU row.

References
----------
He, K., Zhang, X., Ren, S., Sun, J. (2016). Deep residual learning for image recognition.
CVPR 2016 (ResNet-50).

Kornblith, S., Shlens, J., Le, Q. V. (2019). Do better ImageNet models transfer better?
CVPR 2019 (linear-probe protocol).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from benchmarks import Row, markdown_table
from checkpoints_manifest import atomic_write_text

REFUSAL = "no CUDA device; this script measures GPU rows (--quick runs a CPU smoke test)"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
LOGIT_TOLERANCE = 5e-2  # bf16 outputs, relative to the largest absolute logit
ACCURACY_TOLERANCE = 0.01  # GPU vs CPU probe: same protocol, same rows, float64-verified fits
#: Typical distance between two class means, in units of the noise's standard deviation: the
#: nearest true mean classifies ~90% of the rows at d = 2048, K = 1000 (measured).
CLUSTER_DISTANCE = 6.4


@dataclass(frozen=True)
class Sizes:
    side: int  # image side, px
    batch: int
    n_batches: int
    probe_n: int  # training rows of the GPU probe
    probe_d: int
    probe_k: int


FULL = Sizes(side=224, batch=256, n_batches=16, probe_n=100_000, probe_d=2048, probe_k=1000)
QUICK = Sizes(side=32, batch=4, n_batches=2, probe_n=600, probe_d=32, probe_k=10)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def synthetic_images(n: int, side: int, seed: int = 0) -> torch.Tensor:
    """``n`` random uint8 RGB images, normalised with the ImageNet mean and std (float32)."""
    gen = torch.Generator().manual_seed(seed)
    raw = torch.randint(0, 256, (n, 3, side, side), dtype=torch.uint8, generator=gen)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (raw.float().div_(255) - mean) / std


def _pure_forward_rate(model: torch.nn.Module, x: torch.Tensor, n_batches: int,
                       device: torch.device) -> float:
    """Images per second of ``model(x)`` repeated ``n_batches`` times, bf16 autocast on CUDA."""
    amp = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    with torch.inference_mode(), amp:
        for _ in range(2):
            model(x)
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(n_batches):
            model(x)
        _sync(device)
    return n_batches * x.shape[0] / (time.perf_counter() - t0)


def extraction_row(device: torch.device, sizes: Sizes) -> Row:
    """Row (a): extract_features vs the pure forward loop, ResNet-50, same batch size."""
    from dtprobe.features.extract import extract_features, inference_model
    from dtprobe.models import build_model

    n, batch = sizes.batch * sizes.n_batches, sizes.batch
    torch.manual_seed(0)
    model = build_model("resnet50", 1000).to(device).eval()  # torchvision, random weights
    model = model.to(memory_format=torch.channels_last)
    host = synthetic_images(n, sizes.side)
    if device.type == "cuda":
        host = host.pin_memory()
    x = host[:batch].to(device).contiguous(memory_format=torch.channels_last)
    pure = _pure_forward_rate(model, x, sizes.n_batches, device)
    extract_features(model, model.fc, host[:batch], device=device, batch_size=batch)  # warm-up
    _sync(device)
    t0 = time.perf_counter()
    out = extract_features(model, model.fc, host, device=device, batch_size=batch)
    seconds = time.perf_counter() - t0
    engine = n / seconds
    t0 = time.perf_counter()  # the per-call fixed cost inside that time: fold + its check
    inference_model(model, model.fc, (), host[:4].to(device))
    _sync(device)
    fold = time.perf_counter() - t0
    amp = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    with torch.inference_mode(), amp:
        ref = model(x).float().cpu()
    diff = float((out["logits"][:batch] - ref).abs().max() / ref.abs().max())
    precision = "bf16" if device.type == "cuda" else "float32 (CPU)"
    return Row(
        name="extract_features vs pure forward (ResNet-50)",
        sizes=(f"{n:,} images at {sizes.side} px (uint8 -> normalised), batch {batch}, "
               f"{precision}"),
        ours=engine, base=pure, unit="img/s", kind="rate", goal=0.85,
        baseline="model(x) loop, batch resident on the device",
        agreement=f"logits max rel diff {diff:.1e} vs model(x) (tol {LOGIT_TOLERANCE:g})",
        agree_ok=diff <= LOGIT_TOLERANCE,
        note=(f"engine {engine:,.0f} img/s = {engine / pure:.0%} of the pure forward "
              f"{pure:,.0f} img/s; the call took {seconds:.2f} s, of which about {fold:.2f} s "
              f"is the once-per-call BatchNorm folding and its check (without it "
              f"{n / max(seconds - fold, 1e-9):,.0f} img/s)"))


def probe_data(n: int, d: int, k: int, seed: int = 0
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gaussian class clusters: ``n`` training and ``n // 5`` test rows of ``d`` features, ``k``
    balanced classes (unit noise, means ``CLUSTER_DISTANCE`` apart on average), on the CPU."""
    gen = torch.Generator().manual_seed(seed)
    means = torch.randn(k, d, generator=gen) * (CLUSTER_DISTANCE / math.sqrt(2 * d))
    out = []
    for rows in (n, max(k, n // 5)):
        y = torch.arange(rows) % k
        y = y[torch.randperm(rows, generator=gen)]
        out += [means[y] + torch.randn(rows, d, generator=gen), y]
    return out[0], out[1], out[2], out[3]


def timed_probe(data, device: torch.device):
    """Seconds and :class:`ProbeResult` of ``linear_probe`` with the data on ``device``, after
    a small warm-up fit there (library loading, CUDA context and kernels are not timed)."""
    from dtprobe.metrics.probes import linear_probe

    small = probe_data(200, 8, 4, seed=2)
    linear_probe(*(t.to(device) for t in small))
    xtr, ytr, xte, yte = (t.to(device) for t in data)
    _sync(device)
    t0 = time.perf_counter()
    res = linear_probe(xtr, ytr, xte, yte)
    _sync(device)
    return time.perf_counter() - t0, res


def cpu_rows_per_second(d: int, k: int, rows: int = 4096) -> float:
    """Rows per second of one float32 logits + gradient product pair on the CPU (the bulk of
    an L-BFGS iteration of the probe)."""
    x, w = torch.randn(rows, d), torch.randn(d, k)
    best = math.inf
    for _ in range(3):
        t0 = time.perf_counter()
        z = x @ w
        _ = x.T @ z
        best = min(best, time.perf_counter() - t0)
    return rows / best


def cpu_size(sizes: Sizes, iterations: int, budget_s: float) -> int:
    """Largest training size (a multiple of the classes, at most ``sizes.probe_n``) whose
    ``iterations`` the CPU is estimated to finish in ``budget_s``: an iteration costs about 4
    float32 product pairs (line searches, float64 verification; measured 3.6-3.7x on the CPU
    at n = 4,000-8,000, d = 512-1,024)."""
    if budget_s <= 0:
        return sizes.probe_n
    rate = cpu_rows_per_second(sizes.probe_d, sizes.probe_k)
    n = int(budget_s * rate / (4.0 * max(1, iterations)))
    n = max(sizes.probe_k * 10, n // sizes.probe_k * sizes.probe_k)
    return min(sizes.probe_n, n)


def probe_rows(device: torch.device, sizes: Sizes, cpu_budget_s: float,
               cpu_n: int | None = None) -> list[Row]:
    """Rows (b): the probe on ``device`` at full size; ``device`` vs CPU at the CPU's size."""
    d, k = sizes.probe_d, sizes.probe_k
    full = probe_data(sizes.probe_n, d, k)
    gpu_s, gpu = timed_probe(full, device)
    rows = [Row(name=f"linear probe on {device.type}",
                sizes=f"n={sizes.probe_n:,} (+{len(full[2]):,} test), d={d}, K={k}",
                ours=gpu_s, base=None, unit="s", goal=None,
                agreement=f"test acc {gpu.test_accuracy:.4f}, C {gpu.best_c:g}, "
                          f"{gpu.n_iter_total} L-BFGS iterations, converged {gpu.converged}",
                agree_ok=bool(gpu.converged))]
    n = cpu_n or (cpu_size(sizes, gpu.n_iter_total, cpu_budget_s) if device.type == "cuda"
                  else sizes.probe_n)
    data = full if n == sizes.probe_n else probe_data(n, d, k, seed=1)
    if n == sizes.probe_n:
        dev_s, dev = gpu_s, gpu
    else:
        dev_s, dev = timed_probe(data, device)
    cpu_s, cpu = timed_probe(data, torch.device("cpu"))
    gap = abs(dev.test_accuracy - cpu.test_accuracy)
    rows.append(Row(
        name=f"linear probe, {device.type} vs CPU", sizes=f"n={n:,} (+{len(data[2]):,} test), "
        f"d={d}, K={k}, default C grid", ours=dev_s, base=cpu_s, unit="s", kind="speedup",
        goal=None, baseline=f"CPU, {torch.get_num_threads()} threads",
        agreement=(f"test acc {dev.test_accuracy:.4f} vs {cpu.test_accuracy:.4f} (tol "
                   f"{ACCURACY_TOLERANCE:g}); C {dev.best_c:g} vs {cpu.best_c:g}"),
        agree_ok=gap <= ACCURACY_TOLERANCE,
        note=(f"n used on both devices: {n:,}"
              + ("" if n == sizes.probe_n else
                 (" (--cpu-n" if cpu_n else
                  f" (the CPU's estimated size for ~{cpu_budget_s:.0f} s")
                 + f"; the {device.type} alone ran n={sizes.probe_n:,})")
              + f"; iterations {dev.n_iter_total} vs {cpu.n_iter_total}")))
    return rows


def run(quick: bool = False, cpu_budget_s: float = 120.0, cpu_n: int | None = None,
        log=print) -> list[Row]:
    """Both row families; :class:`RuntimeError` without CUDA unless ``quick``."""
    if not torch.cuda.is_available() and not quick:
        raise RuntimeError(REFUSAL)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    sizes = QUICK if quick else FULL
    log(f"[gpu_rows] extraction on {device} ...")
    rows = [extraction_row(device, sizes)]
    log(f"[gpu_rows] probe on {device} and the CPU ...")
    rows += probe_rows(device, sizes, cpu_budget_s, cpu_n)
    if device.type != "cuda":
        for r in rows:
            r.note = ("CPU smoke run (--quick, no CUDA): not a GPU measurement"
                      + (f"; {r.note}" if r.note else ""))
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_rows",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="tiny sizes, CPU allowed: a smoke test in seconds, not a "
                             "measurement")
    parser.add_argument("--cpu-budget", type=float, default=120.0, metavar="SECONDS",
                        help="about how long the CPU probe may take (sets its n)")
    parser.add_argument("--cpu-n", type=int, default=None,
                        help="training rows of the side-by-side probe (default: from "
                             "--cpu-budget)")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows as JSON")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available() and not args.quick:
        print(f"python -m benchmarks.gpu_rows: {REFUSAL}", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    rows = run(args.quick, args.cpu_budget, args.cpu_n,
               log=lambda m: print(m, file=sys.stderr, flush=True))
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    print(markdown_table(rows))
    print(f"\n{time.perf_counter() - t0:.0f} s on {gpu}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} CPU threads")
    if args.json:
        atomic_write_text(args.json, json.dumps(
            {"gpu": gpu, "rows": [r.to_dict() for r in rows]}, indent=2))
    return 0 if all(r.agree_ok for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
