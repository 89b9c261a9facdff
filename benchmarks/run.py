"""Run the dtprobe benchmark suite: ``python -m benchmarks.run [--quick] [--threads N]``.

Every benchmark measures dtprobe and its baseline side by side in this one run and checks
that their outputs agree; the table gives each ratio against its goal. ``--quick`` runs
small sizes in a minute or two (the CI smoke test). Timings are reported, never asserted:
the exit status is 1 only when some outputs disagree.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from benchmarks import Row, cpu_model, markdown_table, set_threads

BENCHMARKS = ("separation", "cka", "probe", "extraction", "gpu_extraction", "memory", "training",
              "live", "objectives", "diagnostics", "downstream", "feature_dtype",
              "onnx_engine")


def machine() -> str:
    """One line describing where the numbers were taken."""
    import torch

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    gpu = (torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU")
    return (f"{cpu_model()}, {cores} CPU cores, {gpu}; Python {platform.python_version()}, "
            f"torch {torch.__version__}, threads {torch.get_num_threads()}")


def run_all(names: Sequence[str] = BENCHMARKS, quick: bool = False,
            log=print) -> list[Row]:
    """Run the named benchmark modules in order; returns all their rows."""
    rows: list[Row] = []
    for name in names:
        module = importlib.import_module(f"benchmarks.{name}")
        t0 = time.perf_counter()
        log(f"[{name}] running{' (quick)' if quick else ''} ...")
        new = module.run(quick=quick)
        log(f"[{name}] done in {time.perf_counter() - t0:.1f}s")
        rows.extend(new)
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__)
    parser.add_argument("--quick", action="store_true",
                        help="small sizes (a minute or two); checks agreement only")
    parser.add_argument("--only", nargs="+", choices=BENCHMARKS, default=None,
                        help="run only these benchmarks")
    parser.add_argument("--threads", type=int, default=None,
                        help="threads for torch / BLAS / OpenMP, the same for dtprobe and "
                             "every baseline (default: all cores)")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows as JSON")
    parser.add_argument("--markdown", type=Path, default=None,
                        help="also write the table as Markdown")
    args = parser.parse_args(argv)
    if args.threads is not None and args.threads < 1:
        parser.error("--threads must be >= 1")
    threads = args.threads or (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                               else os.cpu_count() or 1)
    set_threads(threads)
    where = machine()
    print(f"machine: {where}", flush=True)
    t0 = time.perf_counter()
    rows = run_all(args.only or BENCHMARKS, quick=args.quick,
                   log=lambda m: print(m, file=sys.stderr, flush=True))
    elapsed = time.perf_counter() - t0
    table = markdown_table(rows)
    command = "python -m benchmarks.run" + (" --quick" if args.quick else "") + (
        f" --threads {args.threads}" if args.threads else "")
    print()
    print(table)
    print(f"\n{command}: {elapsed:.0f} s on {where}")
    if args.markdown:
        args.markdown.write_text(f"{table}\n\n`{command}` ({elapsed:.0f} s) on {where}\n")
    if args.json:
        args.json.write_text(json.dumps({"machine": where, "command": command,
                                         "seconds": elapsed, "quick": args.quick,
                                         "rows": [r.to_dict() for r in rows]}, indent=2))
    bad = [r.name for r in rows if not r.agree_ok]
    if bad:
        print(f"\nOUTPUTS DISAGREE: {', '.join(bad)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
