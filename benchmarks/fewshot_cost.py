"""What few-shot transfer adds to a checkpoint's analysis at the demo's sizes (issue 24).

Trains a one-epoch run with the demo's data and architecture (``shapes``, 4000/1000 images at
32 px, ``small_cnn`` width 16, 128-d features), then analyses its two checkpoints as the demo
does (default metrics, ``--downstream digits textures``, whose default metrics now include
``fewshot_ridge`` and ``fewshot_ncm``: 4 shot counts x 5 draws each) without a cache, timing
every registered metric adapter inside that same analysis. Prints the few-shot adapters' share
of the per-checkpoint analysis time, next to the linear probe's.

Usage::

    nice -n 10 python -m benchmarks.fewshot_cost --out runs/fewshot_cost
"""

from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict
from dataclasses import replace
from pathlib import Path

from dtprobe.analysis import analyze
from dtprobe.demo import DEMO_ARCH, DEMO_DATA, DEMO_DOWNSTREAM, fixed_threads
from dtprobe.metrics import registry
from dtprobe.training.sweep import run_is_complete
from dtprobe.training.trainer import TrainConfig, train


def timed_analysis(run_dir: Path) -> dict[str, float]:
    spent: dict[str, float] = defaultdict(float)
    registry.available_metrics()
    saved = dict(registry._REGISTRY)

    def wrap(name, func):
        def timed(view):
            t0 = time.perf_counter()
            try:
                return func(view)
            finally:
                spent[name] += time.perf_counter() - t0
        return timed

    for name, spec in saved.items():
        registry._REGISTRY[name] = replace(spec, func=wrap(name, spec.func))
    try:
        t0 = time.perf_counter()
        res = analyze(run_dir, device="cpu", progress=False, plot=False, use_cache=False,
                      downstream=DEMO_DOWNSTREAM)
        total = time.perf_counter() - t0
    finally:
        registry._REGISTRY.clear()
        registry._REGISTRY.update(saved)
    n = res.stats.checkpoints
    out = {"checkpoints": n, "analysis_s_per_checkpoint": total / n}
    out.update({f"{k}_s_per_checkpoint": v / n for k, v in sorted(spent.items())})
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("runs/fewshot_cost"))
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    run_dir = args.out / "run"
    with fixed_threads(args.threads):
        cfg = TrainConfig(out=str(run_dir), dataset="shapes", dataset_params=dict(DEMO_DATA),
                          arch="small_cnn", arch_params=dict(DEMO_ARCH), epochs=1,
                          save_every=1, seed=0, device="cpu", progress=False)
        if not run_is_complete(run_dir, 1):
            train(cfg)
        out = timed_analysis(run_dir)
    few = out.get("fewshot_ridge_s_per_checkpoint", 0) + out.get("fewshot_ncm_s_per_checkpoint",
                                                                 0)
    out["fewshot_share"] = few / out["analysis_s_per_checkpoint"]
    out["probe_share"] = (out.get("probe_accuracy_s_per_checkpoint", 0)
                          / out["analysis_s_per_checkpoint"])
    (args.out / "fewshot_cost.json").write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
