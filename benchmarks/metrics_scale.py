"""Metrics at scale (issue 14): peak memory and time of each default metric at two sizes.

Every default per-checkpoint metric of ``dtprobe analyze`` (and the two similarity measures
every analysis computes between checkpoints: linear CKA with its permutation null, and mutual
k-NN) runs on synthetic Gaussian class clusters at ``n`` and ``4 n`` samples (default 10,000
and 40,000, ``d = 512``, ``K = 100``), in a fresh Python process per metric and size. The
child process

1. builds the data (train and test splits of ``n`` rows each, float32, a linear source head,
   a 10-class downstream task, 192 "pixel" inputs per test image),
2. resets the kernel's peak-RSS counter (``open('/proc/self/clear_refs', 'w').write('5')``)
   and reads its current RSS,
3. runs the metric once (timed) and reads ``VmHWM`` from ``/proc/self/status``.

Before step 2 free heap pages are handed back to the kernel (glibc ``malloc_trim``), so the
RSS read counts only live memory and pages the metric reuses from the heap count again.

The metric's peak memory is ``VmHWM - RSS before``: what it allocates on top of the inputs.
``tracemalloc`` cannot be used: it does not see torch's allocations. A metric that is linear
in ``n`` has memory ratio ~4 between the two sizes (a quadratic one ~16); capped estimators
(the Renyi MI subsample) stay near 1. Time ratios are measured side by side in the same
process; kNN-based metrics (TwoNN, mutual k-NN) are exact and ``O(n^2 d)`` in time (~16),
with memory bounded by blocks. One process per size, so that memory freed by one size and
kept by the allocator cannot hide the next size's allocations.

``python -m benchmarks.metrics_scale`` prints the table (about 4 minutes on 2 CPU cores);
``--quick`` runs tiny sizes as a smoke test (seconds), ``--metrics`` picks a subset.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from benchmarks import run_python

#: Default per-checkpoint metrics plus the similarities every analysis computes.
DEFAULT_ENTRIES = ("source_accuracy", "class_separation", "neural_collapse", "cdnv", "rankme",
                   "alpha_req", "twonn", "mi_xt", "mi_ty", "probe_accuracy", "linear_cka_null",
                   "mutual_knn")
FULL_SIZES, QUICK_SIZES = (10_000, 40_000), (500, 2_000)
FULL_DIM, QUICK_DIM = 512, 32
FULL_CLASSES, QUICK_CLASSES = 100, 10
PIXELS = 192  # flattened "input" width of the I(X;T) rows (an 8 x 8 x 3 image)


@dataclass
class Data:
    """One synthetic analysis problem: the per-checkpoint view and a second representation."""

    view: object  # dtprobe.metrics.registry.EpochView
    other: torch.Tensor  # (n, d) test features of "another checkpoint"


def make_data(n: int, d: int, k: int, seed: int = 0) -> Data:
    """Gaussian class clusters (unit noise, class means ~3 noise units from the origin)."""
    from dtprobe.metrics.registry import EpochView, FeatureSplit

    gen = torch.Generator().manual_seed(seed)
    means = 3.0 * torch.randn(k, d, generator=gen) / d ** 0.5 * 2.0
    weight = means.clone()
    bias = -0.5 * (means * means).sum(dim=1)

    def split(offset: int) -> FeatureSplit:
        g = torch.Generator().manual_seed(seed + offset)
        labels = torch.randint(0, k, (n,), generator=g)
        x = means[labels] + torch.randn(n, d, generator=g) / d ** 0.5 * 2.0
        logits = x @ weight.T + bias
        return FeatureSplit(x, labels, {"coarse": labels % 10}, logits)

    train, test = split(1), split(2)
    g = torch.Generator().manual_seed(seed + 3)
    # "pixels": a noisy copy of the first feature coordinates (independent noise when d is small)
    base = test.features[:, :PIXELS] if d >= PIXELS else torch.zeros(n, PIXELS)
    test.inputs = base + 0.1 * torch.randn(n, PIXELS, generator=g)
    rot = torch.linalg.qr(torch.randn(d, d, generator=g))[0]
    other = test.features @ rot + 0.3 * torch.randn(n, d, generator=g) / d ** 0.5
    view = EpochView(epoch=0, train=train, test=test, head_weight=weight, head_bias=bias)
    return Data(view, other.contiguous())


def _entry(name: str) -> Callable[[Data], object]:
    """The call that the analysis makes for ``name``."""
    from dtprobe.metrics import cka_permutation_null
    from dtprobe.metrics.registry import available_metrics

    # cka_to_final / cka_to_previous rows (dtprobe.analysis.similarity)
    if name == "linear_cka_null":
        return lambda data: cka_permutation_null(data.view.test.features, data.other)
    spec = available_metrics()[name]
    if spec.similarity is not None:
        func = spec.similarity.func
        return lambda data: func(data.view.test.features, data.other)
    return lambda data: spec.func(data.view)


def _status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _trim_heap() -> None:
    """Give free heap pages back to the kernel (glibc ``malloc_trim``), so that the RSS read
    before a call counts only live memory: pages the call then reuses are counted again."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
        return True
    except OSError:
        return False


def measure_in_process(name: str, sizes: Sequence[int], d: int, k: int) -> list[dict]:
    """Run ``name`` at each size in this process; peak memory above the inputs and time."""
    import gc
    import warnings

    call = _entry(name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # warm-up: imports and first-call costs (above the Renyi cap: its first eigensolve of a
        # 500 x 500 Gram costs seconds once)
        call(make_data(600, min(d, 16), 4, seed=9))
    out = []
    for n in sizes:
        data = make_data(n, d, k)
        gc.collect()
        _trim_heap()
        ok = _reset_peak()
        before = _status_kb("VmRSS")
        t0 = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            call(data)
        seconds = time.perf_counter() - t0
        peak = _status_kb("VmHWM")
        extra = (peak - before) / 1024 if ok and peak is not None and before is not None else None
        inputs = sum(t.numel() * t.element_size() for t in (
            data.view.train.features, data.view.test.features, data.other)) / 2**20
        out.append({"n": n, "seconds": seconds, "peak_mb": extra, "inputs_mb": inputs})
        del data
    return out


_CHILD = """
import json, sys, torch
torch.set_num_threads(int(sys.argv[5]))
from benchmarks.metrics_scale import measure_in_process
sizes = [int(s) for s in sys.argv[2].split(",")]
print("@@" + json.dumps(measure_in_process(sys.argv[1], sizes, int(sys.argv[3]),
                                           int(sys.argv[4]))))
"""


def measure(name: str, sizes: Sequence[int], d: int, k: int, threads: int) -> list[dict]:
    """:func:`measure_in_process` in a fresh Python process per size (its own peak counter)."""
    out = []
    for n in sizes:
        proc = run_python(_CHILD, name, str(n), str(d), str(k), str(threads))
        line = [ln for ln in proc.stdout.splitlines() if ln.startswith("@@")][-1]
        out.extend(json.loads(line[2:]))
    return out


def _fmt_mb(v: float | None) -> str:
    return "-" if v is None else f"{v:,.1f} MB"


def _fmt_s(v: float) -> str:
    return f"{v * 1000:.0f} ms" if v < 1 else f"{v:.2f} s"


def table(results: dict[str, list[dict]]) -> str:
    """Markdown table: time and peak memory at each size and their ratios."""
    first = next(iter(results.values()))
    n0, n1 = first[0]["n"], first[-1]["n"]
    head = (f"| metric | time n={n0:,} | time n={n1:,} | time ratio | peak n={n0:,} | "
            f"peak n={n1:,} | memory ratio |\n|---|---|---|---|---|---|---|")
    lines = [head]
    for name, (a, b) in ((k, (v[0], v[-1])) for k, v in results.items()):
        mem = ("-" if a["peak_mb"] is None or b["peak_mb"] is None or a["peak_mb"] <= 0
               else f"{b['peak_mb'] / a['peak_mb']:.1f}")
        lines.append(f"| {name} | {_fmt_s(a['seconds'])} | {_fmt_s(b['seconds'])} | "
                     f"{b['seconds'] / max(a['seconds'], 1e-9):.1f} | {_fmt_mb(a['peak_mb'])} | "
                     f"{_fmt_mb(b['peak_mb'])} | {mem} |")
    inputs = ", ".join(f"n={r['n']:,}: {r['inputs_mb']:.0f} MB" for r in first)
    return "\n".join(lines) + f"\n\nInputs held by every child (float32 features): {inputs}."


def run(quick: bool = False, entries: Sequence[str] = DEFAULT_ENTRIES, threads: int | None = None,
        log: Callable[[str], None] = lambda m: print(m, file=sys.stderr, flush=True), *,
        sizes: Sequence[int] | None = None, d: int | None = None, k: int | None = None
        ) -> dict[str, list[dict]]:
    """Measure every entry at ``sizes`` (default: 10,000 and 40,000; ``quick``: 500 and 2,000)."""
    sizes = sizes or (QUICK_SIZES if quick else FULL_SIZES)
    d = d or (QUICK_DIM if quick else FULL_DIM)
    k = k or (QUICK_CLASSES if quick else FULL_CLASSES)
    threads = threads or torch.get_num_threads()
    results = {}
    for name in entries:
        t0 = time.perf_counter()
        results[name] = measure(name, sizes, d, k, threads)
        log(f"[metrics_scale] {name}: {time.perf_counter() - t0:.1f} s")
    return results


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.metrics_scale",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test")
    parser.add_argument("--metrics", nargs="*", default=list(DEFAULT_ENTRIES),
                        help="entries to measure (default: the default metrics, linear_cka_null "
                             "and mutual_knn)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads of each child (default: all)")
    parser.add_argument("--sizes", type=int, nargs="+", default=None,
                        help="sample counts (default 10000 40000; --quick 500 2000)")
    parser.add_argument("--dim", type=int, default=None, help="feature width (default 512)")
    parser.add_argument("--classes", type=int, default=None, help="classes (default 100)")
    args = parser.parse_args(argv)
    t0 = time.perf_counter()
    results = run(args.quick, args.metrics, args.threads, sizes=args.sizes, d=args.dim,
                  k=args.classes)
    print(table(results))
    first = next(iter(results.values()))
    d = args.dim or (QUICK_DIM if args.quick else FULL_DIM)
    k = args.classes or (QUICK_CLASSES if args.quick else FULL_CLASSES)
    print(f"\n{time.perf_counter() - t0:.0f} s; d={d}, K={k}, sizes "
          f"{', '.join(str(r['n']) for r in first)}, "
          f"{args.threads or torch.get_num_threads()} threads, torch {torch.__version__}, "
          f"{os.cpu_count()} CPUs")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
