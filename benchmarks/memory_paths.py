"""Peak memory on every data path: flat in the number of images, and within the budget.

Issue 23: a downstream ImageFolder decoded at another size than the source's grew memory with
its images (every image materialised as float32 at the source's size). Here a generated source
ImageFolder run (``small_cnn`` at 16 px, 2 checkpoints) is analysed with a downstream
ImageFolder of ``N`` images decoded at 32 px (so resized to the source's 16 px on use), over a
grid of options: image store or in memory, ``--layers auto``, an I(X;T) metric (pixels held),
``--max-samples``. Each configuration runs in a fresh subprocess that first runs the same
analysis once (every import, the store build, first-use caches: the import floor), then resets
its high-water mark (``/proc/self/clear_refs``) and measures the second analysis's peak
resident memory above that floor (``VmHWM - VmRSS`` at the start; large blocks are always
mapped with ``MALLOC_MMAP_THRESHOLD_`` fixed, so freed buffers leave the process and cannot
hide a later allocation), next to the largest memory estimate
(:func:`dtprobe.analysis.memory.check_budget`) that the analysis and its downstream dataset
were admitted under.

Two checks per configuration: the measured peak above the floor never exceeds the estimate
(so a budget that lets the analysis start is a budget it keeps); and, run at ``N`` and ``4 N``
downstream images with an image store, the processes' whole peak resident memory (``VmHWM``,
as the issue measured it) is within 1.10x: memory flat in the number of images. What still
grows above the floor is what the metrics need, the features (20 floats per image here, and
the probes' working copies), not the images. In memory, the uint8 pixels grow with ``N`` by
construction (counted by the budget as ``images``).

``python -m benchmarks.memory_paths [--n 2000]`` prints the table; the tests run a small grid.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from benchmarks import run_python
from tests.helpers import make_folder, train_tiny

#: The options of the grid: (label, analyze keyword arguments).
GRID: list[tuple[str, dict]] = [
    ("store", {}),
    ("memory", {"image_store": None}),
    ("store, layers auto", {"layers": ["auto"]}),
    ("store, mi_xt", {"metrics": ["source_accuracy", "mi_xt_binning"]}),
    ("memory, max-samples 300", {"image_store": None, "max_samples": 300}),
]

_CHILD = """
import json, sys
import torch
torch.set_num_threads(1)
from dtprobe import analysis
from dtprobe.analysis import data as data_mod
run, kw = sys.argv[1], json.loads(sys.argv[2])
needs = []
real = data_mod.check_budget
def recording(*a, **k):
    need = real(*a, **k)
    needs.append(need)
    return need
data_mod.check_budget = recording
def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024
# the same analysis once first: every import, store build and first-use cache is made, and
# freed buffers go back to the OS (MALLOC_MMAP_THRESHOLD_ is fixed: large blocks are mapped
# and unmapped, never kept in the heap), so the second run's growth is what it holds
analysis.analyze(run, use_cache=False, **kw)
needs.clear()
open("/proc/self/clear_refs", "w").write("5")
start = status("VmRSS")
analysis.analyze(run, use_cache=False, **kw)
print("@@" + json.dumps({"peak": status("VmHWM") - start, "floor": start,
                         "total": status("VmHWM"),
                         "need": max(needs) if needs else None, "checks": len(needs)}))
"""


def make_run(root: Path) -> Path:
    """A 2-checkpoint ``small_cnn`` run on a small 16 px source folder."""
    source = make_folder(root / "source", per_class=40, size=20)
    return train_tiny(root / "run", epochs=1, dataset="imagefolder",
                      dataset_params={"root": str(source), "image_size": 16})


def measure(run: Path, downstream: Path, stores: Path, options: dict) -> dict:
    """Peak above the floor and the largest admitted estimate of one configuration."""
    kw = {"metrics": ["source_accuracy", "linear_cka"], "device": "cpu", "progress": False,
          "plot": False, "image_store": str(stores), "memory_budget": "4G",
          "downstream": [f"imagefolder:root={downstream},image_size=32,name=down"],
          "downstream_metrics": ["probe_accuracy", "logme"], **options}
    proc = run_python(_CHILD, str(run), json.dumps(kw), timeout=1200,
                      env={"MALLOC_MMAP_THRESHOLD_": "131072"})
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("@@"))
    return json.loads(line[2:])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=2000, help="downstream images (train + val) of "
                   "the small folder; the large one has 4x")
    p.add_argument("--configs", type=int, default=len(GRID), help="first options of the grid")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        run = make_run(root)
        per = args.n // 4 * 2 // 3  # train images per class (val: half of them)
        small = make_folder(root / "small", per_class=per, size=40, val=per // 2)
        large = make_folder(root / "large", per_class=4 * per, size=40, val=2 * per, seed=1)
        print("| options | above floor N | above floor 4N | estimate 4N | VmHWM N | VmHWM 4N "
              "| VmHWM ratio |")
        print("|---|---|---|---|---|---|---|")
        for label, options in GRID[: args.configs]:
            a = measure(run, small, root / "stores", options)
            b = measure(run, large, root / "stores", options)
            mib = 2**20
            print(f"| {label} | {a['peak'] / mib:.1f} MiB | {b['peak'] / mib:.1f} MiB | "
                  f"{b['need'] / mib:.1f} MiB | {a['total'] / mib:.0f} MiB | "
                  f"{b['total'] / mib:.0f} MiB | {b['total'] / a['total']:.3f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
