"""Cost and peak memory of ``dtprobe analyze`` with 0, 1 and 3 downstream datasets.

One synthetic run (seeded random ``small_cnn`` weights per epoch, as in :mod:`benchmarks.memory`)
is analysed three times in fresh subprocesses, each reporting its own time and high-water mark
(``VmHWM``): without downstream datasets, with ``digits`` only, and with ``digits``, ``textures``
and an ``imagefolder`` of PNG files written for the benchmark (a disk loader, as for real
datasets). Each downstream dataset adds, per checkpoint, one extraction of its train + test
images and the eight transfer metrics (linear and kNN probes, LogME, H-score, TransRate, GBC,
LEEP, NCE). Datasets are the outer loop of the analysis, so one dataset's images and one
checkpoint's features are in memory at a time: peak memory should stay flat in the number of
datasets (the row's goal), while time grows with it.

The agreement check: the source metrics and CKA rows are identical in the three tables, and the
``digits`` rows identical in the 1- and 3-dataset tables (adding datasets changes nothing else).
"""

from __future__ import annotations

import json
import re
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

from benchmarks import Row, run_python
from benchmarks.memory import _CHILD, make_run, make_series, peak_kb

METRICS = ["source_accuracy", "class_separation", "rankme"]
GOAL = 1.10


def _png_folder(root: Path, n_per_class: int, image_size: int) -> Path:
    """An ImageFolder (train/ and val/) of rendered textures, 6 classes."""
    from PIL import Image

    from dtprobe.data.textures import TEXTURE_NAMES, render_textures

    for split, seed in (("train", 0), ("val", 1)):
        x, y = render_textures(n_per_class * len(TEXTURE_NAMES),
                               rng=np.random.default_rng(seed), image_size=image_size)
        for i, (img, label) in enumerate(zip(x, y, strict=True)):
            d = root / split / TEXTURE_NAMES[label]
            d.mkdir(parents=True, exist_ok=True)
            arr = (img.transpose(1, 2, 0) * 255).round().astype(np.uint8)
            Image.fromarray(arr).save(d / f"{i:05d}.png")
    return root


def _analyze(*args: str) -> dict:
    """``dtprobe analyze`` in a fresh subprocess: its peak memory and the analysis's own time
    (the ``analysed N/N checkpoints in X s`` line, without interpreter start and imports)."""
    proc = run_python(_CHILD, *args)
    out = json.loads([ln for ln in proc.stdout.splitlines() if ln.startswith("@@")][-1][2:])
    if out["rc"] != 0:
        raise RuntimeError(f"dtprobe analyze exited {out['rc']}: {proc.stderr[-2000:]}")
    found = re.search(r"checkpoints in ([0-9.]+)s", proc.stdout)
    out["analysis_s"] = float(found.group(1)) if found else out["seconds"]
    return out


def _key(t: pd.DataFrame) -> pd.DataFrame:
    return t.set_index(["epoch", "metric", "task", "layer"])["value"].sort_index()


def run(quick: bool = False) -> list[Row]:
    if quick:
        n_ckpt, per_class = 3, 10
        params = {"n_train": 300, "n_test": 100, "image_size": 16}
        arch_kwargs = {"in_channels": 3, "width": 8, "feature_dim": 64}
        textures = "textures:n_train=120,n_test=60"
    else:
        n_ckpt, per_class = 4, 100
        params = {"n_train": 2000, "n_test": 1000, "image_size": 16}
        arch_kwargs = {"in_channels": 3, "width": 8, "feature_dim": 512}
        textures = "textures"
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        files, k = make_series(root, n_ckpt, params, arch_kwargs)
        folder = _png_folder(root / "pets", per_class, 24)
        sets = {0: [], 1: ["digits"],
                3: ["digits", textures, f"imagefolder:root={folder},name=pets"]}
        out = {}
        for n, specs in sets.items():
            run_dir = make_run(root / f"run{n}", files, k, params, arch_kwargs)
            extra = ["--downstream", *specs] if specs else []
            out[n] = _analyze(str(run_dir), *METRICS, *extra)  # argv after --metrics
            out[n]["table"] = pd.read_csv(run_dir / "analysis" / "metrics.csv",
                                          keep_default_na=False)
    source = {n: _key(o["table"][(o["table"]["task"] == "")
                                 & ~o["table"]["metric"].str.startswith("transfer_")])
              for n, o in out.items()}
    diff = max(float((source[n] - source[0]).abs().max()) for n in (1, 3))
    d1 = _key(out[1]["table"][out[1]["table"]["task"] == "digits"])
    d3 = _key(out[3]["table"][out[3]["table"]["task"] == "digits"])
    diff = max(diff, float((d1 - d3.loc[d1.index]).abs().max()))
    n_rows = {n: int((o["table"]["task"].isin(["digits", "textures", "pets"])).sum())
              for n, o in out.items()}
    mb = {n: peak_kb(o) / 1024 for n, o in out.items()}
    sec = {n: o["analysis_s"] for n, o in out.items()}
    sizes = (f"{n_ckpt} ckpts, small_cnn (d={arch_kwargs['feature_dim']}), shapes "
             f"{params['n_train']:,}+{params['n_test']:,} at {params['image_size']} px; "
             f"digits 1,347+450, {textures}, imagefolder {6 * per_class}+{6 * per_class} PNGs")
    agreement = (f"source metrics + CKA identical with 0/1/3 datasets, digits rows identical "
                 f"with 1/3: max abs diff {diff:.1e}")
    return [
        Row(name="analysis cost, 3 downstream datasets vs 0", sizes=sizes, ours=sec[3],
            base=sec[0], unit="s", kind="factor", goal=None, baseline="no downstream datasets",
            agreement=agreement, agree_ok=diff == 0.0,
            note=(f"1 dataset (digits): {sec[1]:.1f} s; downstream rows: {n_rows[1]} and "
                  f"{n_rows[3]}; analysis time inside one lock, without interpreter start")),
        Row(name="peak RSS, 3 downstream datasets vs 0", sizes=sizes, ours=mb[3], base=mb[0],
            unit="MB", kind="factor", goal=GOAL, baseline="no downstream datasets",
            agreement=agreement, agree_ok=diff == 0.0,
            note=f"1 dataset (digits): {mb[1]:.0f} MB"),
    ]
