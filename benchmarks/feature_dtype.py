"""Precision lost by a half-precision feature cache (``dtprobe analyze --feature-dtype``).

One small run is trained (embedded ``shapes``, ``small_cnn``), copied three times, and each
copy is analysed with the default metrics and one ``--feature-dtype``: float32 (the
reference), float16 and bfloat16. Per metric, the largest absolute difference from float32
over all rows (epochs x tasks x layers) is reported, and the same over the trained epochs only
(the first checkpoint is the initialisation, whose ReLU features are a large common offset
plus a small variation: rounding relative to the offset costs most there); per dtype, the
bytes of the feature cache against float32's.

The agreement check: the same rows (and the same NaN rows) under every dtype, and
``source_accuracy`` identical, since logits are cached in float32. Differences are
reported, not asserted (how much a metric moves depends on its conditioning).

``python -m benchmarks.feature_dtype [--quick]`` prints the per-metric table;
``python -m benchmarks.run --only feature_dtype`` gives the cache-size rows of the suite.
"""

from __future__ import annotations

import argparse
import math
import shutil
import tempfile
import time
from pathlib import Path

import pandas as pd

from benchmarks import Row, set_threads

DTYPES = ("float32", "float16", "bfloat16")
KEY = ["epoch", "metric", "task", "layer", "other_run"]


def _config(quick: bool) -> dict:
    if quick:
        return {"params": {"n_train": 240, "n_test": 120, "image_size": 16},
                "arch": {"width": 8, "feature_dim": 16}, "epochs": 2, "save_every": 1}
    # the demo's data and network (dtprobe.demo), fewer images and epochs: it learns the shapes
    return {"params": {"n_train": 2000, "n_test": 1000, "noise": 0.1},
            "arch": {"width": 16, "feature_dim": 128}, "epochs": 12, "save_every": 4}


def measure(quick: bool = False, layers: tuple[str, ...] = ()) -> dict:
    """Train one run, analyse it under each dtype; returns the tables, cache bytes and sizes."""
    from dtprobe import analysis
    from dtprobe.training.trainer import TrainConfig, train

    cfg = _config(quick)
    out: dict = {"tables": {}, "bytes": {}, "seconds": {}, "config": cfg}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        run = root / "run"
        train(TrainConfig(out=str(run), dataset="shapes", dataset_params=cfg["params"],
                          arch="small_cnn", arch_params=cfg["arch"], epochs=cfg["epochs"],
                          batch_size=128, save_every=cfg["save_every"], seed=0, device="cpu",
                          progress=False))
        for name in DTYPES:
            copy = root / name
            shutil.copytree(run, copy, ignore=shutil.ignore_patterns("analysis"))
            t0 = time.perf_counter()
            res = analysis.analyze(copy, device="cpu", progress=False, plot=False,
                                   layers=list(layers), feature_dtype=name)
            out["seconds"][name] = time.perf_counter() - t0
            out["tables"][name] = res.table
            out["bytes"][name] = sum(p.stat().st_size
                                     for p in (copy / "analysis" / "features").iterdir())
            out["checkpoints"] = res.stats.checkpoints
    return out


def differences(tables: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """Per metric: rows, float32 magnitude, and per half dtype the max abs / relative diff, over
    all epochs and over the trained ones (after the first checkpoint, the initialisation)."""
    ref = tables["float32"].set_index(KEY)["value"]
    epochs = ref.index.get_level_values("epoch")
    trained = epochs != epochs.min()
    scale = ref.abs().groupby(level="metric").max()
    out = pd.DataFrame({"rows": ref.groupby(level="metric").size(), "max_abs_float32": scale})
    for name in DTYPES[1:]:
        diff = (tables[name].set_index(KEY)["value"] - ref).abs().reindex(ref.index)
        worst = diff.groupby(level="metric").max()
        out[f"{name}_abs"] = worst
        out[f"{name}_rel"] = worst / scale.where(scale > 0)
        out[f"{name}_trained_abs"] = diff[trained].groupby(level="metric").max()
    return out.sort_values("float16_rel", na_position="last")


def _agreement(tables: dict[str, pd.DataFrame]) -> tuple[bool, str]:
    ref = tables["float32"].set_index(KEY)["value"]
    ok, words = True, []
    for name in DTYPES[1:]:
        vals = tables[name].set_index(KEY)["value"]
        same_rows = vals.index.equals(ref.index) and bool((vals.isna() == ref.isna()).all())
        src = (vals - ref)[ref.index.get_level_values("metric") == "source_accuracy"]
        exact = bool((src.abs().fillna(0) == 0).all())
        ok &= same_rows and exact
        words.append(f"{name}: {'same rows' if same_rows else 'ROWS DIFFER'}, source_accuracy "
                     f"{'identical' if exact else 'DIFFERS'}")
    return ok, "; ".join(words)


def run(quick: bool = False) -> list[Row]:
    got = measure(quick)
    cfg, tables = got["config"], got["tables"]
    diffs = differences(tables)
    ok, agreement = _agreement(tables)
    p, a = cfg["params"], cfg["arch"]
    sizes = (f"{got['checkpoints']} ckpts, small_cnn (d={a['feature_dim']}), shapes "
             f"{p['n_train']:,}+{p['n_test']:,} at {p.get('image_size', 32)} px, default metrics")
    rows = []
    for name in DTYPES[1:]:
        rel = diffs[f"{name}_rel"].dropna()
        worst = rel.idxmax() if len(rel) else "-"
        rows.append(Row(
            name=f"feature cache size, {name} vs float32", sizes=sizes,
            ours=got["bytes"][name] / 2**20, base=got["bytes"]["float32"] / 2**20, unit="MB",
            kind="factor", goal=None, baseline="float32 cache", agreement=agreement,
            agree_ok=ok,
            note=(f"cache {got['bytes'][name]:,} vs {got['bytes']['float32']:,} bytes "
                  f"({got['bytes'][name] / got['bytes']['float32']:.3f}); largest relative "
                  f"metric change {rel.max():.1e} ({worst}); CKA to final "
                  f"{diffs.loc['cka_to_final', f'{name}_abs']:.1e} abs")))
    return rows


def _fmt(x: float) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.1e}"


def markdown(got: dict) -> str:
    """The per-metric table and the cache-size line, as in BENCHMARKS.md."""
    diffs = differences(got["tables"])
    lines = ["| metric | rows | float32 max abs value | float16 | float16, trained epochs | "
             "bfloat16 | bfloat16, trained epochs |", "|---|---|---|---|---|---|---|"]
    for metric, r in diffs.iterrows():
        lines.append(f"| {metric} | {int(r['rows'])} | {r['max_abs_float32']:.3g} | "
                     f"{_fmt(r['float16_abs'])} | {_fmt(r['float16_trained_abs'])} | "
                     f"{_fmt(r['bfloat16_abs'])} | {_fmt(r['bfloat16_trained_abs'])} |")
    b = got["bytes"]
    lines.append("")
    lines.append("cache size: " + ", ".join(
        f"{n} {b[n]:,} bytes ({b[n] / b['float32']:.3f} of float32)" for n in DTYPES))
    ok, agreement = _agreement(got["tables"])
    lines.append(f"agreement: {agreement}")
    lines.append("analysis time: " + ", ".join(f"{n} {got['seconds'][n]:.1f} s" for n in DTYPES))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.feature_dtype",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny run (a few seconds)")
    parser.add_argument("--threads", type=int, default=1, help="torch / BLAS threads")
    parser.add_argument("--layers", nargs="*", default=[],
                        help="also analyse these layers (e.g. auto)")
    args = parser.parse_args(argv)
    set_threads(max(1, args.threads))
    t0 = time.perf_counter()
    got = measure(args.quick, tuple(args.layers))
    print(markdown(got))
    print(f"\n{time.perf_counter() - t0:.0f} s")
    return 0 if _agreement(got["tables"])[0] else 1


if __name__ == "__main__":
    raise SystemExit(main())
