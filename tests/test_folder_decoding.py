"""Folder datasets: ImageNet's evaluation transform and the files a real folder holds (issue 23).

The reference for the transform is torchvision's own PIL pipeline (``pil_loader`` +
``Resize(R)`` + ``CenterCrop(C)``), run here on generated JPEGs and PNGs of odd sizes and aspect
ratios; the decoder must give the very same pixels. Bad files are generated too: a FIFO, a
header claiming an enormous image, truncated and non-image files, each must fail in bounded time
with one line naming it (or be skipped with ``skip_bad_images``).
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import textwrap
import time
import zlib
from pathlib import Path

import numpy as np
import pytest

from dtprobe.data import load_dataset
from dtprobe.data.decode import MAX_PIXELS, decode_image, resized_size
from dtprobe.data.subsets import sample_ids_digest
from dtprobe.errors import DatasetError

REPO = Path(__file__).resolve().parents[1]
SIZES = [(161, 97), (97, 161), (300, 301), (257, 256), (224, 224), (1000, 333), (255, 511),
         (513, 255), (256, 999), (131, 130)]
TRANSFORMS = [(256, 224), (224, 224), (128, 128), (146, 128), (64, 64), (300, 224), (97, 96)]


def _torchvision(path: Path, resize: int, crop: int) -> np.ndarray:
    T = pytest.importorskip("torchvision.transforms")
    from torchvision.datasets.folder import pil_loader

    img = T.CenterCrop(crop)(T.Resize(resize)(pil_loader(str(path))))
    return np.asarray(img).transpose(2, 0, 1)


def _image(path: Path, w: int, h: int, seed: int, mode: str = "RGB") -> Path:
    from PIL import Image

    rng = np.random.default_rng(seed)
    # smooth gradients plus noise: resampling errors would show on both
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([(xx * 255 // max(1, w - 1)), (yy * 255 // max(1, h - 1)),
                     ((xx + yy) * 127 // max(1, w + h - 2))], axis=-1)
    arr = np.clip(base + rng.integers(-40, 40, (h, w, 3)), 0, 255).astype(np.uint8)
    Image.fromarray(arr).convert(mode).save(path)
    return path


@pytest.mark.parametrize("w,h", SIZES)
def test_decoder_is_pixel_identical_to_torchvision_resize_centercrop(tmp_path, w, h):
    path = _image(tmp_path / f"{w}x{h}.jpg", w, h, seed=w * h)
    for resize, crop in TRANSFORMS:
        ref = _torchvision(path, resize, crop)
        got = decode_image("t", str(path), crop, resize)
        assert got.shape == ref.shape == (3, crop, crop)
        assert np.array_equal(got, ref), (w, h, resize, crop)


@pytest.mark.parametrize("mode,suffix", [("L", ".png"), ("P", ".png"), ("RGBA", ".png"),
                                         ("CMYK", ".jpg"), ("L", ".jpg")])
def test_other_colour_modes_match_torchvision(tmp_path, mode, suffix):
    path = _image(tmp_path / f"m{suffix}", 203, 150, seed=1, mode=mode)
    for resize, crop in ((256, 224), (150, 150), (160, 128)):
        assert np.array_equal(decode_image("t", str(path), crop, resize),
                              _torchvision(path, resize, crop))


def test_resized_size_truncates_the_long_side_like_torchvision():
    F = pytest.importorskip("torchvision.transforms.functional")
    for w, h in SIZES + [(3, 7), (7, 3), (1281, 1000)]:
        for r in (8, 64, 224, 256):
            th, tw = F._compute_resized_output_size((h, w), [r])
            assert resized_size(w, h, r) == (tw, th)


def test_exif_orientation_is_not_applied_as_in_torchvision(tmp_path):
    from PIL import Image

    arr = np.zeros((60, 100, 3), np.uint8)
    arr[:, :50] = 255  # left half white: a rotation would move it
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    path = tmp_path / "rot.jpg"
    Image.fromarray(arr).save(path, exif=exif, quality=95)
    got = decode_image("t", str(path), 48, 60)
    assert np.array_equal(got, _torchvision(path, 60, 48))
    assert got[:, :, :10].mean() > 200 and got[:, :, -10:].mean() < 50  # not rotated


def _png_header_only(path: Path, w: int, h: int) -> Path:
    """A tiny PNG whose header claims ``w x h`` pixels (the classic decompression bomb)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\0" * 1024)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat)
                     + chunk(b"IEND", b""))
    return path


def _bad_files(d: Path) -> dict[str, str]:
    """Bad files in ``d``, each with a fragment its reason must contain."""
    good = _image(d / "good.jpg", 80, 60, seed=3)
    data = good.read_bytes()
    (d / "truncated.jpg").write_bytes(data[: len(data) // 3])
    (d / "text.jpg").write_text("not an image\n")
    (d / "empty.png").write_bytes(b"")
    _png_header_only(d / "bomb.png", 10000, 10000)  # over dtprobe's limit, under PIL's
    _png_header_only(d / "huge.png", 60000, 60000)  # over PIL's own limit too
    os.mkfifo(d / "fifo.jpg")
    return {"truncated.jpg": "truncat", "text.jpg": "cannot identify it as an image",
            "empty.png": "empty", "bomb.png": "10000x10000", "huge.png": "decompression bomb",
            "fifo.jpg": "FIFO"}


@pytest.mark.filterwarnings("error")  # no DecompressionBombWarning either: refused first
def test_bad_files_fail_fast_with_one_line_naming_them(tmp_path):
    for name, fragment in _bad_files(tmp_path).items():
        t0 = time.perf_counter()
        with pytest.raises(DatasetError) as info:
            decode_image("t", str(tmp_path / name), 32, None)
        msg = str(info.value)
        assert time.perf_counter() - t0 < 5
        assert "\n" not in msg and str(tmp_path / name) in msg and fragment in msg, msg
    assert 10000 * 10000 > MAX_PIXELS


def _folder(root: Path, bad: bool = True) -> Path:
    for split, n in (("train", 6), ("val", 4)):
        for c in range(2):
            d = root / split / f"c{c}"
            d.mkdir(parents=True)
            for i in range(n):
                _image(d / f"{i:02d}.jpg", 90 + 7 * i, 70 + 11 * c, seed=100 * c + i)
    if bad:
        (root / "train" / "c1" / "zz_truncated.jpg").write_bytes(
            (root / "train" / "c1" / "00.jpg").read_bytes()[:200])
        os.mkfifo(root / "val" / "c0" / "zz_fifo.jpg")
        _png_header_only(root / "train" / "c0" / "zz_bomb.png", 50000, 50000)
    return root


@pytest.mark.parametrize("stored", [False, True])
def test_a_bad_file_fails_its_dataset_by_default(tmp_path, stored):
    root = _folder(tmp_path / "data")
    with pytest.raises(DatasetError) as info:
        load_dataset("imagefolder", root=str(root), image_size=32,
                     store=str(tmp_path / "st") if stored else None)
    msg = str(info.value)
    assert "\n" not in msg and "zz_" in msg and "--skip-bad-images" in msg


def test_skip_bad_images_is_the_same_in_memory_and_in_the_store(tmp_path):
    root = _folder(tmp_path / "data")
    mem = load_dataset("imagefolder", root=str(root), image_size=32, resize_size=40,
                       skip_bad_images=True)
    st = load_dataset("imagefolder", root=str(root), image_size=32, resize_size=40,
                      skip_bad_images=True, store=str(tmp_path / "st"))
    again = load_dataset("imagefolder", root=str(root), image_size=32, resize_size=40,
                         skip_bad_images=True, store=str(tmp_path / "st"))
    clean = _folder(tmp_path / "clean", bad=False)
    ref = load_dataset("imagefolder", root=str(clean), image_size=32, resize_size=40)
    for b in (mem, st, again):
        assert sorted(s["id"] for s in b.skipped) == sorted([
            "train/c0/zz_bomb.png", "train/c1/zz_truncated.jpg", "val/c0/zz_fifo.jpg"])
        assert all(s["reason"] and "\n" not in s["reason"] for s in b.skipped)
        assert b.params["skip_bad_images"] is True and b.params["resize_size"] == 40
        assert b.train.sample_ids == ref.train.sample_ids  # bad ids are out
        assert b.test.sample_ids == ref.test.sample_ids
        assert np.array_equal(b.train.labels, ref.train.labels)
        assert np.array_equal(b.train.images[:].numpy(), ref.train.images[:].numpy())
        assert np.array_equal(b.test.images[:].numpy(), ref.test.images[:].numpy())
    assert st.train.images.stored and again.train.images.stored
    assert len(list((tmp_path / "st").glob("*.skipped.json"))) == 2


def test_skip_record_is_sealed(tmp_path):
    root = _folder(tmp_path / "data")
    kw = dict(root=str(root), image_size=32, skip_bad_images=True, store=str(tmp_path / "st"))
    load_dataset("imagefolder", **kw)
    for record in (tmp_path / "st").glob("*.skipped.json"):
        data = json.loads(record.read_text())
        data["skipped"] = []  # forged: claims nothing was skipped
        record.write_text(json.dumps(data))
    b = load_dataset("imagefolder", **kw)  # the forgery is ignored: decoded and listed again
    assert len(b.skipped) == 3


def test_imagenet_preset_and_resize_are_in_params_and_the_store_key(tmp_path):
    root = _folder(tmp_path / "data", bad=False)
    pre = load_dataset("imagefolder", root=str(root), preset="imagenet")
    assert pre.params["image_size"] == 224 and pre.params["resize_size"] == 256
    assert tuple(pre.train.images.shape[1:]) == (3, 224, 224)
    ref = _torchvision(Path(root / "train" / "c0" / "03.jpg"), 256, 224)
    from dtprobe.data.store import histogram_statistics, pixel_histogram  # noqa: F401

    idx = pre.train.sample_ids.index("train/c0/03.jpg")
    mean = np.asarray(pre.mean, np.float32)[:, None, None]
    std = np.asarray(pre.std, np.float32)[:, None, None]
    want = (ref.astype(np.float32) / 255 - mean) / std
    assert np.allclose(pre.train.images[idx].numpy(), want, atol=1e-5)
    square = load_dataset("imagefolder", root=str(root), image_size=64)
    assert "resize_size" not in square.params  # the former rule keeps its keys
    a = load_dataset("imagefolder", root=str(root), image_size=32, store=str(tmp_path / "st"))
    b = load_dataset("imagefolder", root=str(root), image_size=32, resize_size=48,
                     store=str(tmp_path / "st"))
    assert a.train.images.pixels.key != b.train.images.pixels.key
    assert not np.array_equal(a.train.images.raw(0, 4).numpy(), b.train.images.raw(0, 4).numpy())
    with pytest.raises(DatasetError, match="smaller than"):
        load_dataset("imagefolder", root=str(root), image_size=64, resize_size=32)
    with pytest.raises(DatasetError, match="preset"):
        load_dataset("imagefolder", root=str(root), preset="imagenet21k")


def test_bad_file_under_torchrun_workers_is_the_same_line(tmp_path):
    """Decoded by worker processes (as for a large folder), the reason is the same one line."""
    root = _folder(tmp_path / "data")
    code = textwrap.dedent(f"""
        from dtprobe.data.decode import decode_batches
        import glob, sys
        paths = sorted(glob.glob({str(root)!r} + "/*/*/*"))
        paths = (paths * 30)[:300]
        try:
            for _ in decode_batches("imagefolder", paths, 32, workers=2, batch_size=16):
                pass
        except Exception as e:
            print(type(e).__name__, str(e))
            sys.exit(3)
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 3, proc.stderr
    out = proc.stdout.strip()
    assert out.startswith("DatasetError imagefolder: cannot decode image") and "\n" not in out


def test_bicubic_matches_torchvision_and_is_in_params(tmp_path):
    T = pytest.importorskip("torchvision.transforms")
    from torchvision.datasets.folder import pil_loader

    path = _image(tmp_path / "b.jpg", 211, 150, seed=5)
    ref = T.CenterCrop(96)(T.Resize(110, interpolation=T.InterpolationMode.BICUBIC)(
        pil_loader(str(path))))
    got = decode_image("t", str(path), 96, 110, "bicubic")
    assert np.array_equal(got, np.asarray(ref).transpose(2, 0, 1))
    assert not np.array_equal(got, decode_image("t", str(path), 96, 110))
    root = _folder(tmp_path / "data", bad=False)
    b = load_dataset("imagefolder", root=str(root), image_size=32, interpolation="bicubic")
    assert b.params["interpolation"] == "bicubic"
    with pytest.raises(DatasetError, match="interpolation"):
        load_dataset("imagefolder", root=str(root), image_size=32, interpolation="lanczos")


def _train_on(root: Path, run: Path, **params) -> Path:
    """A small CNN (width 4) trained for one epoch on the folder ``root`` at 16 px."""
    from tests.helpers import train_tiny

    return train_tiny(run, epochs=1, batch_size=8, arch_params={"width": 4, "feature_dim": 8},
                      dataset="imagefolder",
                      dataset_params={"root": str(root), "image_size": 16, **params})


def test_analysis_rows_carry_the_transform_and_skipped_files_are_recorded(tmp_path):
    import pandas as pd

    from dtprobe import analysis

    run = _train_on(_folder(tmp_path / "data"), tmp_path / "run", resize_size=20,
                    skip_bad_images=True)
    analysis.analyze(run, metrics=["source_accuracy", "linear_cka"], device="cpu",
                     progress=False, plot=False, image_store=tmp_path / "stores")
    table = pd.read_csv(run / "analysis" / "metrics.csv", keep_default_na=False)
    samples = json.loads((run / "analysis" / "samples.json").read_text())
    assert sorted(s["id"] for s in samples["skipped"]) == [
        "train/c0/zz_bomb.png", "train/c1/zz_truncated.jpg", "val/c0/zz_fifo.jpg"]
    assert not any("zz_" in s for s in samples["train"]["sample_ids"])
    settings = [json.loads(p) for p in table["params"]]
    assert {s["eval_transform"] for s in settings} == {"resize=20,crop=16"}
    assert {s["samples"] for s in settings} == {"12+8:" + sample_ids_digest(
        samples["train"]["sample_ids"] + ["|"] + samples["test"]["sample_ids"])}


def test_cli_skip_bad_images_flag(tmp_path, capsys):
    from dtprobe.cli import main

    root = _folder(tmp_path / "data", bad=False)
    run = _train_on(root, tmp_path / "run")
    (root / "val" / "c1" / "zz_text.jpg").write_text("not a jpeg")
    base = ["analyze", str(run), "--device", "cpu", "--no-plot", "--metrics",
            "source_accuracy", "--image-store", str(tmp_path / "st")]
    assert main(base + ["--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after any progress bar
    assert "zz_text.jpg" in err and "--skip-bad-images" in err and "cannot identify" in err
    assert main(base + ["--skip-bad-images"]) == 0
    out = capsys.readouterr()
    assert "1 undecodable image(s) skipped" in out.out + out.err
    samples = json.loads((run / "analysis" / "samples.json").read_text())
    assert [s["id"] for s in samples["skipped"]] == ["val/c1/zz_text.jpg"]
