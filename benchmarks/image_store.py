"""Decode-once image store vs decoding per checkpoint, on a generated JPEG ImageFolder.

    python -m benchmarks.image_store                 # 20,000 images at 128 px, 3 checkpoints
    python -m benchmarks.image_store --quick         # 400 images: a smoke run (seconds)

The benchmark writes its own ImageFolder of JPEG files (noisy tinted images, 10 classes, made
once under ``--folder``), then, side by side in one run:

1. **per-checkpoint decode** (the baseline a notebook would write): for each of ``E``
   checkpoints, a ``torchvision.datasets.ImageFolder`` with Resize + CenterCrop + ToTensor +
   Normalize, read by a ``DataLoader`` with one worker per core, forward pass per batch;
2. **decode once** (dtprobe): the first analysis builds the uint8 store (its cost is reported
   on its own), then every checkpoint streams it through
   :func:`dtprobe.features.extract.extract_features`;
3. **peak memory**: the store path in a fresh process at 1/4 and all of the images (the same
   folder, ``max_samples``), as the peak resident memory above the process's start (VmHWM
   after a reset): it must not grow with the number of images.

Features of the two paths are compared on the first checkpoint (their decoders differ:
torchvision resizes with antialiasing on tensors, dtprobe with PIL's draft + bilinear; the
agreement column reports the correlation of the features, not equality).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks import PEAK_RSS_CODE
from checkpoints_manifest import atomic_write_text

ROOT = Path(__file__).resolve().parents[1]


def make_folder(root: Path, images: int, size: int, classes: int = 10) -> Path:
    """``images`` JPEGs split 80/20 into train/ and val/ (skipped if already there)."""
    from PIL import Image

    marker = root / f".made-{images}-{size}"
    if marker.exists():
        return root
    rng = np.random.default_rng(0)
    per_class = images // classes
    for c in range(classes):
        for i in range(per_class):
            split = "train" if i < per_class * 4 // 5 else "val"
            d = root / split / f"class{c:02d}"
            d.mkdir(parents=True, exist_ok=True)
            img = np.zeros((size, size + size // 4, 3), np.uint8)
            img[..., c % 3] = 60 + 18 * c
            img = np.clip(img + rng.integers(0, 90, img.shape, dtype=np.int64), 0, 255)
            Image.fromarray(img.astype(np.uint8)).save(d / f"{i:06d}.jpg", quality=90)
    atomic_write_text(marker, "ok\n")
    return root


def _models(count: int, classes: int) -> list[torch.nn.Module]:
    from dtprobe.models import build_model

    out = []
    for seed in range(count):
        torch.manual_seed(seed)
        out.append(build_model("small_cnn", classes, in_channels=3).eval())
    return out


def per_checkpoint_decode(folder: Path, models, size: int, workers: int,
                          mean, std) -> tuple[float, torch.Tensor]:
    """Seconds for all checkpoints with a torchvision DataLoader decoding every time."""
    from torchvision import datasets, transforms

    from dtprobe.models import head_module
    from dtprobe.models.tap import PenultimateTap

    tf = transforms.Compose([transforms.Resize(size), transforms.CenterCrop(size),
                             transforms.ToTensor(), transforms.Normalize(mean, std)])
    first = None
    t0 = time.perf_counter()
    for k, model in enumerate(models):
        ds = datasets.ImageFolder(str(folder / "val"), transform=tf)
        loader = torch.utils.data.DataLoader(ds, batch_size=128, num_workers=workers)
        tap = PenultimateTap(head_module(model, "small_cnn"))
        feats = []
        with torch.inference_mode():
            for x, _ in loader:
                model(x)
                feats.append(tap.features.clone())
        tap.remove()
        if k == 0:
            first = torch.cat(feats)
    return time.perf_counter() - t0, first


def decode_once(folder: Path, models, size: int, store: Path) -> tuple[float, float, torch.Tensor]:
    """(seconds to build the store, seconds for all checkpoints from it, first features)."""
    from dtprobe.data import load_dataset
    from dtprobe.features.extract import extract_features
    from dtprobe.models import head_module

    t0 = time.perf_counter()
    bundle = load_dataset("imagefolder", root=str(folder), image_size=size, store=store)
    build = time.perf_counter() - t0
    first = None
    t0 = time.perf_counter()
    for k, model in enumerate(models):
        out = extract_features(model, head_module(model, "small_cnn"), bundle.test.images,
                               device="cpu")
        if k == 0:
            first = out["features"]
    return build, time.perf_counter() - t0, first


def peak_rss(folder: Path, size: int, store: Path, max_samples: int | None) -> int:
    """Peak resident bytes above the start of a fresh process extracting one checkpoint from
    the store (built beforehand) with ``max_samples`` images per split."""
    script = PEAK_RSS_CODE + textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(ROOT)!r})
        import torch
        from dtprobe.data import load_dataset
        from dtprobe.features.extract import extract_features
        from dtprobe.models import build_model, head_module
        kw = dict(root={str(folder)!r}, image_size={size}, store={str(store)!r})
        if {max_samples!r} is not None:
            kw["max_samples"] = {max_samples!r}
        model = build_model("small_cnn", 10, in_channels=3).eval()
        head = head_module(model, "small_cnn")
        warm = load_dataset(**{{**kw, "max_samples": 8}}, name="imagefolder")
        extract_features(model, head, warm.test.images, device="cpu")
        reset_peak()
        start = status("VmRSS")
        bundle = load_dataset("imagefolder", **kw)
        for images in (bundle.train.images, bundle.test.images):
            extract_features(model, head, images, device="cpu")
        print(status("VmHWM") - start, len(bundle.train) + len(bundle.test))
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         check=True, env={**os.environ, "TQDM_DISABLE": "1"})
    return int(out.stdout.split()[0])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--images", type=int, default=20_000)
    p.add_argument("--pixels", type=int, default=128, help="side of the generated JPEGs")
    p.add_argument("--size", type=int, default=64, help="side the analysis decodes to")
    p.add_argument("--checkpoints", type=int, default=3)
    p.add_argument("--folder", default=None, help="where the ImageFolder is generated")
    p.add_argument("--quick", action="store_true", help="400 images, 2 checkpoints")
    p.add_argument("--json", default=None, help="write the numbers here")
    args = p.parse_args(argv)
    if args.quick:
        args.images, args.pixels, args.size, args.checkpoints = 400, 48, 32, 2
    os.environ.setdefault("TQDM_DISABLE", "1")
    from dtprobe.data.decode import default_workers

    workers = default_workers()
    tmp = Path(tempfile.mkdtemp(prefix="dtprobe-bench-store-"))
    folder = Path(args.folder or tmp / "folder")
    t0 = time.perf_counter()
    make_folder(folder, args.images, args.pixels)
    made = time.perf_counter() - t0
    store = tmp / "stores"
    models = _models(args.checkpoints, 10)
    from dtprobe.data import load_dataset

    stats = load_dataset("imagefolder", root=str(folder), image_size=args.size, max_samples=64)
    naive, f_naive = per_checkpoint_decode(folder, models, args.size, workers, stats.mean,
                                           stats.std)
    build, streamed, f_store = decode_once(folder, models, args.size, store)
    corr = float(np.corrcoef(f_naive.flatten().numpy(), f_store.flatten().numpy())[0, 1])
    quarter = max(8, args.images // 20)  # a quarter of the val split (a fifth of the images)
    load_dataset("imagefolder", root=str(folder), image_size=args.size, store=store,
                 max_samples=quarter)  # built here, so the fresh processes only read
    rss_small = peak_rss(folder, args.size, store, quarter)
    rss_full = peak_rss(folder, args.size, store, None)
    n_val = len(list((folder / "val").rglob("*.jpg")))
    result = {
        "images": args.images, "val_images": n_val, "checkpoints": args.checkpoints,
        "pixels": args.pixels, "size": args.size, "workers": workers,
        "generate_s": made, "per_checkpoint_decode_s": naive, "store_build_s": build,
        "store_extract_s": streamed, "speedup_per_checkpoint": naive / streamed,
        "speedup_with_build": naive / (build + streamed), "feature_correlation": corr,
        "peak_rss_quarter_mb": rss_small / 2**20, "peak_rss_full_mb": rss_full / 2**20,
        "peak_rss_ratio": rss_full / max(1, rss_small), "torch": torch.__version__,
        "threads": torch.get_num_threads(), "load_average": os.getloadavg()[0],
    }
    print("| images (val) | checkpoints | per-checkpoint decode | store: build once | "
          "store: all checkpoints | ratio | ratio incl. build | peak RSS 1/4 -> all |")
    print("|---|---|---|---|---|---|---|---|")
    print(f"| {args.images} ({n_val}) at {args.pixels} px -> {args.size} px | "
          f"{args.checkpoints} | {naive:.1f} s | {build:.1f} s | {streamed:.1f} s | "
          f"{naive / streamed:.1f}x | {naive / (build + streamed):.1f}x | "
          f"{rss_small / 2**20:.0f} MiB -> {rss_full / 2**20:.0f} MiB "
          f"({rss_full / max(1, rss_small):.2f}) |")
    print(f"features of the two decoders correlate at {corr:.4f}; workers {workers}; "
          f"threads {torch.get_num_threads()}; load average {os.getloadavg()[0]:.1f}")
    if args.json:
        atomic_write_text(args.json, json.dumps(result, indent=1) + "\n")
    return 0 if corr > 0.9 else 1


if __name__ == "__main__":
    sys.exit(main())
