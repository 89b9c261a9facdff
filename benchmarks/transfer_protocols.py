"""Linear probe vs few-shot vs fine-tuning over epochs, on the demo's setting (issue 24).

Trains (or reuses) the demo's CE and CTC runs (``dtprobe.demo.demo_configs``: ``shapes``,
4000 training images, 16 epochs, checkpoints every 2 epochs) for each seed, analyses them with
the downstream ``digits`` dataset (the demo's transfer target whose linear probe falls late in
training), the linear probe, few-shot ridge/NCM and ``--finetune``, and writes a markdown table:
per protocol, the peak (epoch) and last value, and the CTC - CE difference at the last epoch.
Every analysis also records the wall time of its fine-tunes and of one training epoch, for the
cost table in BENCHMARKS.md.

Usage::

    nice -n 10 python -m benchmarks.transfer_protocols --out runs/protocols --seeds 0 1
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import pandas as pd

from dtprobe.analysis import analyze
from dtprobe.demo import demo_configs, fixed_threads
from dtprobe.sweep import run_is_complete
from dtprobe.training.trainer import train

PROTOCOLS = {"probe_accuracy": "linear probe", "fewshot_ridge_10shot": "10-shot ridge",
             "fewshot_ncm_10shot": "10-shot NCM", "finetune_accuracy": "fine-tuned"}


def run_all(out: Path, seeds: list[int], downstream: str, threads: int) -> pd.DataFrame:
    frames = []
    timing = {}
    with fixed_threads(threads):
        for seed in seeds:
            for name, cfg in demo_configs(out / f"seed{seed}", seed=seed, device="cpu").items():
                run_dir = Path(cfg.out)
                if not run_is_complete(run_dir, cfg.epochs):
                    cfg.resume = (run_dir / "manifest.json").exists()
                    cfg.progress = False
                    t0 = time.perf_counter()
                    train(cfg)
                    timing[f"train {name} seed {seed} (s, {cfg.epochs} epochs)"] = round(
                        time.perf_counter() - t0, 1)
                t0 = time.perf_counter()
                res = analyze(run_dir, metrics=["source_accuracy"], device="cpu",
                              progress=False, plot=False, seed=0, downstream=[downstream],
                              downstream_metrics=["probe_accuracy", "fewshot_ridge",
                                                  "fewshot_ncm"], finetune=True)
                timing[f"analyze {name} seed {seed} (s)"] = round(time.perf_counter() - t0, 1)
                t = res.table.copy()
                t["objective"], t["seed"] = name, seed
                frames.append(t)
    (out / "timing.json").write_text(json.dumps(timing, indent=1) + "\n")
    return pd.concat(frames, ignore_index=True)


def summary(table: pd.DataFrame, downstream: str) -> str:
    rows = table[(table["task"] == downstream) & (table["layer"] == "")]
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
        lines.append(f"| {obj.upper()} | {seed} | " + " | ".join(cells) + " |")
    diffs = []
    for metric, label in PROTOCOLS.items():
        d = [last[("ctc", s, metric)] - last[("ce", s, metric)]
             for s in sorted(set(rows["seed"]))
             if ("ctc", s, metric) in last and ("ce", s, metric) in last]
        if d:
            diffs.append(f"{label} {', '.join(f'{x:+.3f}' for x in d)}")
    lines.append("")
    lines.append("Last epoch, CTC minus CE per seed: " + "; ".join(diffs) + ".")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("runs/protocols"))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--downstream", default="digits")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    table = run_all(args.out, args.seeds, args.downstream, args.threads)
    table.to_csv(args.out / "protocols.csv", index=False)
    text = summary(table, args.downstream)
    (args.out / "protocols.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
