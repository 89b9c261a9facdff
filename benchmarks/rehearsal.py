"""A CPU rehearsal at ImageNet shape: ``dtprobe analyze`` end to end vs pure forward passes.

Issue 23, item 4. A generated ImageFolder of JPEGs of about 160 px (odd sizes and aspect
ratios, ``--classes`` classes, 80 % train / 20 % val), a torchvision ResNet-50 with that many
classes evaluated at 128 px, ``--checkpoints`` checkpoints saved as torchvision's reference
``train.py`` saves them (``model_E.pth`` with ``args.model``, ``args.val_resize_size=146``,
``args.val_crop_size=128``: dtprobe reads its evaluation transform from them, ImageNet's
``crop_pct = 0.875`` at 128 px), and one downstream ImageFolder (10 classes).

Measured in one run, each step in a fresh subprocess with the same thread count:

1. **store build**: decoding every split once into the image store (one-off per dataset and
   transform);
2. **analysis**: ``dtprobe analyze`` (the CLI) of every checkpoint, source and downstream,
   reading the built stores: checkpoint loading and hashing, extraction, metrics, tables;
3. **pure forward**: dtprobe's own forward passes of the same checkpoints over the same images
   (the same stores, the same batch size, ``inference_mode``), nothing else: the floor the
   analysis is compared with (goal: analysis / forward <= 1.3);
4. **peak RSS**: ``VmHWM`` of step 2 vs the same analysis of a folder with a quarter of the
   images (goal: <= 1.10x).

``python -m benchmarks.rehearsal --images 20000 --checkpoints 5`` is the full size of the issue
(hours on two cores); the row in BENCHMARKS.md says which size was run.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks import cpu_model, run_python

METRICS = ["source_accuracy", "class_separation", "neural_collapse", "rankme", "linear_cka"]
DOWNSTREAM_METRICS = ["probe_accuracy", "logme"]
SIZE, RESIZE = 128, 146  # floor(128 / 0.875)

_PEAK = """
def _hwm():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
"""

_BUILD = _PEAK + """
import json, sys, time, torch
torch.set_num_threads(int(sys.argv[4]))
from dtprobe.data import load_dataset
t0, c0 = time.perf_counter(), time.process_time()
load_dataset("imagefolder", root=sys.argv[1], image_size=128, resize_size=146, store=sys.argv[3],
             progress=False)
load_dataset("imagefolder", root=sys.argv[2], image_size=128, resize_size=146, store=sys.argv[3],
             progress=False)
print("@@" + json.dumps({"seconds": time.perf_counter() - t0, "cpu": time.process_time() - c0,
                         "peak": _hwm()}))
"""

_ANALYZE = _PEAK + """
import json, sys, time, torch
torch.set_num_threads(int(sys.argv[1]))
from dtprobe.cli import main
t0, c0 = time.perf_counter(), time.process_time()
rc = main(sys.argv[2:])
print("@@" + json.dumps({"rc": rc, "seconds": time.perf_counter() - t0,
                         "cpu": time.process_time() - c0, "peak": _hwm()}))
"""

_FORWARD = _PEAK + """
import argparse, glob, json, sys, time, torch
torch.set_num_threads(int(sys.argv[4]))
from dtprobe.data import load_dataset
from dtprobe.features.extract import auto_batch_size
from dtprobe.models import build_model
t0, c0 = time.perf_counter(), time.process_time()
src = load_dataset("imagefolder", root=sys.argv[1], image_size=128, resize_size=146,
                   store=sys.argv[3])
down = load_dataset("imagefolder", root=sys.argv[2], image_size=128, resize_size=146,
                    store=sys.argv[3])
sets = [src.train.images, src.test.images, down.train.images, down.test.images]
rows = 0
for path in sorted(glob.glob(sys.argv[5] + "/model_*.pth")):
    model = build_model("resnet50", num_classes=src.num_classes)
    with torch.serialization.safe_globals([argparse.Namespace]):
        state = torch.load(path, map_location="cpu", weights_only=True)["model"]
    model.load_state_dict(state)
    model.eval()
    with torch.inference_mode():
        for images in sets:
            b = auto_batch_size(images, torch.device("cpu"))
            for s in range(0, len(images), b):
                model(images.normalise(images.raw(s, s + b)))
                rows += min(b, len(images) - s)
print("@@" + json.dumps({"seconds": time.perf_counter() - t0, "cpu": time.process_time() - c0,
                         "peak": _hwm(), "rows": rows}))
"""


def _report(proc) -> dict:
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("@@"))
    return json.loads(line[2:])


def make_folder(root: Path, n: int, classes: int, seed: int, val_share: float = 0.2) -> Path:
    """``n`` JPEGs about 160 px (sides 140..200, both orientations) in ``classes`` classes."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    tints = rng.integers(40, 216, (classes, 3))
    per = max(2, n // classes)
    n_val = max(1, int(round(per * val_share)))
    for c in range(classes):
        for i in range(per):
            split = "val" if i < n_val else "train"
            d = root / split / f"c{c:03d}"
            d.mkdir(parents=True, exist_ok=True)
            w, h = (int(v) for v in rng.integers(140, 201, 2))
            yy, xx = np.mgrid[0:h, 0:w]
            img = tints[c][None, None, :] + 30 * np.sin((xx + 3 * c) / (5 + c % 7))[..., None]
            img = img + 20 * np.cos(yy / (4 + i % 5))[..., None] + rng.normal(0, 12, (h, w, 3))
            Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(
                d / f"{i:05d}.jpg", quality=90)
    return root


def make_run(run: Path, classes: int, checkpoints: int) -> Path:
    """Seeded ResNet-50 weights saved as torchvision's reference train.py saves them."""
    import argparse as ap

    import torch

    from dtprobe.models import build_model

    run.mkdir(parents=True, exist_ok=True)
    args = ap.Namespace(model="resnet50", val_resize_size=RESIZE, val_crop_size=SIZE,
                        interpolation="bilinear", num_classes=classes)
    for epoch in range(checkpoints):
        torch.manual_seed(epoch)
        model = build_model("resnet50", num_classes=classes)
        torch.save({"model": model.state_dict(), "epoch": epoch, "args": args},
                   run / f"model_{epoch}.pth")
    return run


def analyze_args(run: Path, source: Path, down: Path, stores: Path) -> list[str]:
    return ["analyze", str(run), "--dataset", "imagefolder", "--data-root", str(source),
            "--image-store", str(stores), "--no-progress", "--no-plot", "--device", "cpu",
            "--metrics", *METRICS, "--downstream", f"imagefolder:root={down},name=down",
            "--downstream-metrics", *DOWNSTREAM_METRICS]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=20000, help="source JPEGs (train + val)")
    p.add_argument("--classes", type=int, default=100)
    p.add_argument("--checkpoints", type=int, default=5)
    p.add_argument("--downstream", type=int, default=2000, help="downstream JPEGs")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--work", default=None, help="folder for data and stores (default: temp)")
    p.add_argument("--json", default=None, help="write the measurements here")
    args = p.parse_args(argv)
    work = Path(args.work or tempfile.mkdtemp(prefix="dtprobe-rehearsal-"))
    t = str(args.threads)
    out: dict = {"cpu": cpu_model(), "threads": args.threads, "images": args.images,
                 "classes": args.classes, "checkpoints": args.checkpoints,
                 "downstream": args.downstream}
    t0 = time.perf_counter()
    big = make_folder(work / "source", args.images, args.classes, 0)
    small = make_folder(work / "source_quarter", args.images // 4, args.classes, 0)
    down = make_folder(work / "down", args.downstream, 10, 1)
    run = make_run(work / "run", args.classes, args.checkpoints)
    small_run = work / "run_quarter"
    shutil.copytree(run, small_run)
    out["generate_s"] = time.perf_counter() - t0
    stores = work / "stores"
    def step(name: str, code: str, *argv: str, env: dict | None = None) -> dict:
        load = os.getloadavg()[0]
        started = time.strftime("%H:%M:%S", time.gmtime())
        result = _report(run_python(code, *argv, timeout=36000, env=env))
        result.update(started_utc=started, load_before=load, load_after=os.getloadavg()[0])
        print(f"{name}: {json.dumps(result)}", flush=True)  # each step as it ends
        return result

    build = step("store build", _BUILD, str(big), str(down), str(stores), t)
    step("store build (quarter)", _BUILD, str(small), str(down), str(stores), t)
    out["store_build_s"] = build["seconds"]
    env = {"OMP_NUM_THREADS": t}
    ana = step("analysis", _ANALYZE, t, *analyze_args(run, big, down, stores), env=env)
    fwd = step("pure forward", _FORWARD, str(big), str(down), str(stores), t, str(run),
               env=env)
    quarter = step("analysis (quarter)", _ANALYZE, t,
                   *analyze_args(small_run, small, down, stores), env=env)
    if ana["rc"] != 0 or quarter["rc"] != 0:
        raise RuntimeError(f"dtprobe analyze failed: {ana} {quarter}")
    samples = json.loads((run / "analysis" / "samples.json").read_text())
    record = json.loads((run / "analysis" / "checkpoints.json").read_text())
    out.update(analysis_s=ana["seconds"], forward_s=fwd["seconds"], forward_rows=fwd["rows"],
               time_ratio=ana["seconds"] / fwd["seconds"],
               analysis_cpu_s=ana["cpu"], forward_cpu_s=fwd["cpu"],
               cpu_ratio=ana["cpu"] / fwd["cpu"], steps={"build": build, "analysis": ana,
                                                         "forward": fwd, "quarter": quarter},
               peak_mib=ana["peak"] / 2**20,
               peak_quarter_mib=quarter["peak"] / 2**20,
               memory_ratio=ana["peak"] / quarter["peak"],
               n_train=samples["train"]["n"], n_test=samples["test"]["n"],
               eval_transform=record.get("eval_transform"))
    print(json.dumps(out, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1) + "\n")
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)
    os.sync()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
