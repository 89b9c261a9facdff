"""Linear probe vs few-shot vs fine-tuning over epochs, CE vs label smoothing (issue 24).

Trains (or reuses) one run per objective and seed on the embedded ``shapes`` data with the
demo's architecture and schedule shape but a CPU-sized setting (:data:`SETTING`: 2000 training
images at 16 px, 16 epochs, a checkpoint every 4 epochs), analyses every checkpoint on the
downstream ``digits`` dataset (the demo's transfer target whose linear probe falls over
training; 600 images per split) with the linear probe, few-shot ridge/NCM and ``--finetune``
(the fixed recipe of :mod:`dtprobe.training.finetune`), and writes a markdown table: per
protocol, the peak (epoch) and last value, and the difference between the objectives at the
last epoch. ``timing_seed*.json`` record the training and analysis wall times (cost table of
BENCHMARKS.md).

Usage (one process per seed; each CPU-heavy)::

    nice -n 10 python -m benchmarks.transfer_protocols --out runs/protocols --seeds 0
    nice -n 10 python -m benchmarks.transfer_protocols --out runs/protocols --seeds 1
    python -m benchmarks.transfer_protocols --out runs/protocols --seeds 0 1 --table-only
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import pandas as pd

from dtprobe.analysis import analyze
from dtprobe.demo import DEMO_ARCH, fixed_threads
from dtprobe.results import load_results
from dtprobe.training.sweep import run_is_complete
from dtprobe.training.trainer import TrainConfig, train

SETTING = {"dataset_params": {"n_train": 2000, "n_test": 500, "image_size": 16, "noise": 0.1},
           "arch": "small_cnn", "arch_params": dict(DEMO_ARCH), "epochs": 16, "save_every": 4,
           "batch_size": 64}
OBJECTIVES = ("ce", "label_smoothing")
DOWNSTREAM = "digits:max_samples=600"
#: One learning rate instead of the recipe's three: the machine this was measured on was shared
#: (load average 15-20 on 2 cores) and three rates would not have finished in the time there was.
FINETUNE_RECIPE = {"lr_grid": (0.01,)}
PROTOCOLS = {"probe_accuracy": "linear probe", "fewshot_ridge_10shot": "10-shot ridge",
             "fewshot_ncm_10shot": "10-shot NCM", "finetune_accuracy": "fine-tuned"}


def run_all(out: Path, seeds: list[int], threads: int, table_only: bool) -> pd.DataFrame:
    frames = []
    timing_path = out / f"timing_seed{'_'.join(map(str, seeds))}.json"
    timing = json.loads(timing_path.read_text()) if timing_path.exists() else {}
    with fixed_threads(threads):
        for seed in seeds:
            for objective in OBJECTIVES:
                run_dir = out / f"seed{seed}" / objective
                if table_only:
                    t = load_results(run_dir).table.copy()
                else:
                    cfg = TrainConfig(out=str(run_dir), dataset="shapes", objective=objective,
                                      seed=seed, device="cpu", progress=False, **SETTING)
                    if not run_is_complete(run_dir, cfg.epochs):
                        cfg.resume = (run_dir / "manifest.json").exists()
                        t0 = time.perf_counter()
                        train(cfg)
                        timing[f"train {objective} seed {seed} (s, {cfg.epochs} epochs)"] = \
                            round(time.perf_counter() - t0, 1)
                    t0 = time.perf_counter()
                    res = analyze(run_dir, metrics=["source_accuracy"], device="cpu",
                                  progress=False, plot=False, seed=0, downstream=[DOWNSTREAM],
                                  downstream_metrics=["probe_accuracy", "fewshot_ridge",
                                                      "fewshot_ncm"], finetune=True,
                                  finetune_recipe=FINETUNE_RECIPE)
                    timing[f"analyze {objective} seed {seed} (s)"] = round(
                        time.perf_counter() - t0, 1)
                    timing_path.write_text(json.dumps(timing, indent=1) + "\n")
                    t = res.table.copy()
                t["objective"], t["seed"] = objective, seed
                frames.append(t)
    return pd.concat(frames, ignore_index=True)


def summary(table: pd.DataFrame, downstream: str) -> str:
    rows = table[(table["task"] == downstream.split(":")[0]) & (table["layer"] == "")]
    lines = ["| run | seed | " + " | ".join(f"{v}: peak (epoch) -> last"
                                            for v in PROTOCOLS.values()) + " |",
             "|---|---|" + "---|" * len(PROTOCOLS)]
    last: dict[tuple[str, int, str], float] = {}
    for (obj, seed), g in rows.groupby(["objective", "seed"]):
        cells = []
        for metric in PROTOCOLS:
            s = g[g["metric"] == metric].set_index("epoch")["value"].sort_index()
            if s.empty or s.isna().all():
                cells.append("n/a")
                continue
            peak = s.idxmax()
            last[(obj, seed, metric)] = float(s.iloc[-1])
            cells.append(f"{s.max():.3f} ({peak}) -> {s.iloc[-1]:.3f}")
        lines.append(f"| {obj} | {seed} | " + " | ".join(cells) + " |")
    diffs = []
    other = OBJECTIVES[1]
    for metric, label in PROTOCOLS.items():
        d = [last[(other, s, metric)] - last[("ce", s, metric)]
             for s in sorted(set(rows["seed"]))
             if (other, s, metric) in last and ("ce", s, metric) in last]
        if d:
            diffs.append(f"{label} {', '.join(f'{x:+.3f}' for x in d)}")
    lines.append("")
    lines.append(f"Last epoch, {other} minus CE per seed: " + "; ".join(diffs) + ".")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("runs/protocols"))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--table-only", action="store_true",
                   help="only read the finished runs' tables and write the summary")
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    table = run_all(args.out, args.seeds, args.threads, args.table_only)
    suffix = "" if args.table_only else "_seed" + "_".join(map(str, args.seeds))
    table.to_csv(args.out / f"protocols{suffix}.csv", index=False)
    text = summary(table, DOWNSTREAM)
    (args.out / f"protocols{suffix}.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
