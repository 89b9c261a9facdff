"""Peak memory of ``dtprobe analyze`` for 10 against 40 checkpoints of one run.

An analysis must not hold every checkpoint's features: they stream to the feature cache and
only what the across-epoch metrics need stays in memory. Each configuration runs ``dtprobe
analyze`` (the CLI entry point, in-process) in a fresh Python subprocess, which reports its
own high-water mark (``VmHWM``; see :func:`peak_kb` for why not only ``ru_maxrss``). The
10-checkpoint run
holds the first 10 checkpoint files of the 40-checkpoint run, so their per-epoch metrics must
be identical, which is the agreement check; so must the CKA between those 10 epochs.

The series is synthetic (seeded random ``small_cnn`` weights per epoch, with a 512-d
penultimate layer so that one epoch's train + test features are ~8 MB and holding all 40
would add ~300 MB); memory does not depend on what the weights learned. Metrics are the cheap
ones (``source_accuracy class_separation rankme``) plus the CKA rows every analysis writes.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import pandas as pd
import torch

import checkpoints_manifest as cm
from benchmarks import Row, run_python
from dtprobe.data import load_dataset
from dtprobe.models import build_model

METRICS = ["source_accuracy", "class_separation", "rankme"]
TOLERANCE = 1e-9
GOAL = 1.10

_CHILD = """
import json, resource, sys, time
t0 = time.perf_counter()
if sys.argv[1] == "--floor":
    import torch, dtprobe.analysis, dtprobe.cli  # noqa: F401  (import cost only)
    rc = 0
else:
    from dtprobe.cli import main
    rc = main(["analyze", sys.argv[1], "--no-progress", "--device", "cpu", "--metrics",
               *sys.argv[2:]])
hwm = None
try:
    with open("/proc/self/status") as fh:
        hwm = [int(l.split()[1]) for l in fh if l.startswith("VmHWM:")][0]
except (OSError, IndexError):
    pass
print("@@" + json.dumps({"rc": rc, "vmhwm_kb": hwm, "seconds": time.perf_counter() - t0,
                         "maxrss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))
"""


def peak_kb(report: dict) -> int:
    """The child's own peak RSS: ``VmHWM`` of its address space where Linux gives it.

    ``getrusage(RUSAGE_SELF).ru_maxrss`` of a child is not enough on Linux: at ``exec`` the
    kernel folds the high-water mark of the address space being replaced (the parent's, as
    forked) into it, so every child would report at least the parent's RSS. ``VmHWM`` is the
    peak of the child's own address space; ``ru_maxrss`` is the fallback elsewhere.
    """
    return report["vmhwm_kb"] if report.get("vmhwm_kb") else report["maxrss_kb"]


def make_series(root: Path, n_ckpt: int, params: dict, arch_kwargs: dict) -> list[Path]:
    """Seeded small_cnn state dicts, one per epoch 0..n_ckpt-1."""
    bundle = load_dataset("shapes", **params)
    files = []
    (root / "files").mkdir(parents=True, exist_ok=True)
    for epoch in range(n_ckpt):
        torch.manual_seed(epoch)
        model = build_model("small_cnn", bundle.num_classes, **arch_kwargs)
        path = root / "files" / f"epoch_{epoch:04d}.pt"
        torch.save(model.state_dict(), path)
        files.append(path)
    return files, bundle.num_classes


def make_run(run_dir: Path, files: list[Path], num_classes: int, params: dict,
             arch_kwargs: dict) -> Path:
    """A run directory with a manifest listing ``files`` as epochs 0, 1, ..."""
    (run_dir / "checkpoints").mkdir(parents=True)
    cm.write_manifest(run_dir, cm.create_manifest(
        run_name=run_dir.name,
        model=cm.ModelSpec(arch="small_cnn", kwargs=arch_kwargs, num_classes=num_classes,
                           penultimate="fc"),
        dataset=cm.DatasetSpec(name="shapes", params=params), seed=0))
    for epoch, src in enumerate(files):
        dst = run_dir / "checkpoints" / src.name
        try:
            os.link(src, dst)
        except OSError:
            dst.write_bytes(src.read_bytes())
        cm.record_checkpoint(run_dir, dst, epoch=epoch, step=epoch)
    return run_dir


def _child(*args: str) -> dict:
    proc = run_python(_CHILD, *args)
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("@@")][-1]
    out = json.loads(line[2:])
    if out["rc"] not in (0,):
        raise RuntimeError(f"dtprobe analyze exited {out['rc']}: {proc.stderr[-2000:]}")
    return out


def run(quick: bool = False) -> list[Row]:
    if quick:
        small, large = 3, 6
        params = {"n_train": 300, "n_test": 100, "image_size": 16}
        arch_kwargs = {"in_channels": 3, "width": 8, "feature_dim": 64}
    else:
        small, large = 10, 40
        params = {"n_train": 3000, "n_test": 1000, "image_size": 16}
        arch_kwargs = {"in_channels": 3, "width": 8, "feature_dim": 512}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        files, k = make_series(root, large, params, arch_kwargs)
        runs = {e: make_run(root / f"run{e}", files[:e], k, params, arch_kwargs)
                for e in (small, large)}
        floor = None if quick else _child("--floor")  # quick: one subprocess fewer
        peaks = {e: _child(str(runs[e]), *METRICS) for e in (small, large)}
        tables = {e: pd.read_csv(runs[e] / "analysis" / "metrics.csv", keep_default_na=False)
                  for e in runs}
        ckas = {e: pd.read_csv(runs[e] / "analysis" / "cka_matrix.csv", index_col=0)
                for e in runs}
    diff = 0.0
    for metric in METRICS:
        a = tables[small][tables[small]["metric"] == metric].set_index(["epoch", "task"])
        b = tables[large][tables[large]["metric"] == metric].set_index(["epoch", "task"])
        if len(a) != small:
            raise RuntimeError(f"{metric}: expected {small} rows, got {len(a)}")
        diff = max(diff, float((a["value"] - b.loc[a.index, "value"]).abs().max()))
    sub = ckas[large].iloc[:small, :small].to_numpy()
    diff = max(diff, float(abs(sub - ckas[small].to_numpy()).max()))
    mb = {e: peak_kb(peaks[e]) / 1024 for e in peaks}
    floor_mb = peak_kb(floor) / 1024 if floor else None
    per_epoch = (params["n_train"] + params["n_test"]) * arch_kwargs["feature_dim"] * 4 / 2**20
    return [Row(
        name=f"peak RSS of dtprobe analyze, {large} vs {small} checkpoints",
        sizes=(f"{small} vs {large} ckpts, small_cnn (d={arch_kwargs['feature_dim']}), shapes "
               f"{params['n_train']:,}+{params['n_test']:,} images at {params['image_size']} px"),
        ours=mb[large], base=mb[small], unit="MB", kind="factor", goal=GOAL,
        baseline=f"{small} checkpoints",
        agreement=(f"per-epoch metrics and CKA of the shared {small} epochs: max abs diff "
                   f"{diff:.1e} (tol {TOLERANCE:g})"),
        agree_ok=diff <= TOLERANCE,
        note=((f"above the import floor ({floor_mb:.0f} MB: Python + torch + dtprobe): "
               f"{mb[large] - floor_mb:.0f} vs {mb[small] - floor_mb:.0f} MB; "
               if floor_mb is not None else "")
              + f"features {per_epoch:.1f} MB per epoch "
              f"(holding all {large} would add {per_epoch * large:.0f} MB); analyze took "
              f"{peaks[small]['seconds']:.1f} s and {peaks[large]['seconds']:.1f} s"))]
