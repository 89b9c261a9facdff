"""Tests of the dataset loaders: embedded ``shapes`` / ``digits`` and real datasets from disk."""

from __future__ import annotations

import math
import pickle

import numpy as np
import pytest
import torch

from dtprobe.data import (
    DatasetBundle,
    Split,
    available_datasets,
    load_dataset,
    register_dataset,
)
from dtprobe.data import shapes as shapes_mod
from dtprobe.data.digits import digit_style_factors
from dtprobe.errors import DatasetError

# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------


def _assert_same(a: DatasetBundle, b: DatasetBundle) -> None:
    assert a.params == b.params
    for sa, sb in ((a.train, b.train), (a.test, b.test)):
        assert torch.equal(sa.images[:], sb.images[:])
        assert torch.equal(sa.labels, sb.labels)
        assert sa.factors.keys() == sb.factors.keys()
        for k in sa.factors:
            assert torch.equal(sa.factors[k], sb.factors[k])
    assert a.mean == b.mean and a.std == b.std


def _check_bundle(b: DatasetBundle) -> None:
    """Structural invariants every loader must satisfy."""
    for s in (b.train, b.test):
        assert isinstance(s, Split)
        assert s.images.dtype == torch.float32 and s.images.ndim == 4
        assert s.images.shape[0] == len(s) == s.labels.shape[0]
        assert s.labels.dtype == torch.int64
        assert int(s.labels.min()) >= 0 and int(s.labels.max()) < b.num_classes
        assert torch.isfinite(s.images[:]).all()
        assert set(s.factors) == set(b.factor_classes)
        for k, f in s.factors.items():
            assert f.dtype == torch.int64 and f.shape == s.labels.shape
            assert int(f.min()) >= 0 and int(f.max()) < b.factor_classes[k]
    assert len(b.class_names) == b.num_classes
    assert len(b.mean) == len(b.std) == b.in_channels
    # Normalised with the training split's own statistics.
    x = b.train.images[:].double()  # normalised float32 (RawImages normalise on use)
    assert torch.allclose(x.mean(dim=(0, 2, 3)), torch.zeros(b.in_channels, dtype=torch.float64),
                          atol=1e-3)
    assert torch.allclose(x.std(dim=(0, 2, 3), unbiased=False),
                          torch.ones(b.in_channels, dtype=torch.float64), atol=1e-3)


def _label_predicts_factor(labels: torch.Tensor, factor: torch.Tensor) -> float:
    """Accuracy of the best map label -> factor (majority factor class within each label)."""
    lab, fac = labels.numpy(), factor.numpy()
    hits = 0
    for c in np.unique(lab):
        hits += np.bincount(fac[lab == c]).max()
    return hits / len(lab)


# ----------------------------------------------------------------------------------------------
# registry
# ----------------------------------------------------------------------------------------------


def test_registry_lists_builtins_and_rejects_unknown():
    names = available_datasets()
    for n in ("shapes", "digits", "cifar10", "cifar100", "cinic10", "stl10", "imagefolder"):
        assert n in names
    with pytest.raises(DatasetError, match="unknown dataset 'nope'.*shapes"):
        load_dataset("nope")


def test_register_dataset_adds_a_loader():
    @register_dataset("_test_tiny")
    def tiny(n: int = 4) -> DatasetBundle:
        s = Split(images=torch.zeros(n, 1, 8, 8), labels=torch.zeros(n, dtype=torch.int64))
        return DatasetBundle("_test_tiny", {"n": n}, s, s, 1, {}, ["x"], (0.0,), (1.0,))

    assert "_test_tiny" in available_datasets()
    assert len(load_dataset("_test_tiny", n=3).train) == 3


# ----------------------------------------------------------------------------------------------
# shapes
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fast_shapes() -> DatasetBundle:
    return load_dataset("shapes", preset="fast", image_size=32)


def test_shapes_structure(fast_shapes):
    b = fast_shapes
    _check_bundle(b)
    assert b.train.images.shape == (600, 3, 32, 32) and b.test.images.shape == (200, 3, 32, 32)
    assert b.num_classes == 6 and b.class_names == list(shapes_mod.SHAPE_NAMES[:6])
    assert b.factor_classes == {"colour": 6, "position": 9, "size": 3, "orientation": 4}
    assert b.image_size == 32 and b.in_channels == 3


def test_shapes_deterministic_and_params_round_trip(fast_shapes):
    again = load_dataset("shapes", **fast_shapes.params)
    _assert_same(fast_shapes, again)
    assert "preset" not in fast_shapes.params
    assert fast_shapes.params["n_train"] == 600 and fast_shapes.params["image_size"] == 32


def test_shapes_seeds_differ(fast_shapes):
    other = load_dataset("shapes", **{**fast_shapes.params, "seed": 1})
    assert not torch.equal(other.train.images, fast_shapes.train.images)
    assert not torch.equal(other.train.labels, fast_shapes.train.labels)


def test_shapes_train_split_does_not_depend_on_test_size(fast_shapes):
    other = load_dataset("shapes", **{**fast_shapes.params, "n_test": 50})
    assert torch.equal(other.train.labels, fast_shapes.train.labels)
    assert torch.equal(other.train.images, fast_shapes.train.images)
    assert len(other.test) == 50


def test_shapes_factors_are_balanced_and_not_functions_of_the_label(fast_shapes):
    for split in (fast_shapes.train, fast_shapes.test):
        n_cls = fast_shapes.num_classes
        assert torch.equal(torch.bincount(split.labels, minlength=n_cls).min(),
                           torch.tensor(len(split) // n_cls))
        for name, k in fast_shapes.factor_classes.items():
            f = split.factors[name]
            counts = torch.bincount(f, minlength=k)
            assert counts.min() >= 0.9 * len(split) / k  # every class present, balanced
            # Every factor class occurs equally often (to within one) for every shape class ...
            joint = torch.zeros(n_cls, k, dtype=torch.int64)
            joint.index_put_((split.labels, f), torch.ones_like(f), accumulate=True)
            assert (joint.max(dim=1).values - joint.min(dim=1).values <= 1).all(), name
            assert (joint > 0).all(), name
            # ... so knowing the shape barely beats the factor's chance level.
            assert _label_predicts_factor(split.labels, f) < 1 / k + 0.05, name


def test_shapes_factors_are_mutually_independent(fast_shapes):
    f = fast_shapes.train.factors
    names = list(f)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            assert _label_predicts_factor(f[a], f[b]) < 1 / fast_shapes.factor_classes[b] + 0.12


def test_shapes_preset_and_overrides():
    b = load_dataset("shapes", preset="fast", n_train=60, n_test=30, n_shapes=3, n_colours=2,
                     position_grid=2, n_sizes=2, n_orientations=2, clutter=0, noise=0.0)
    _check_bundle(b)
    assert b.train.images.shape == (60, 3, 16, 16)
    assert b.factor_classes == {"colour": 2, "position": 4, "size": 2, "orientation": 2}
    assert b.params["n_train"] == 60 and b.params["image_size"] == 16


@pytest.mark.parametrize("kwargs, match", [
    ({"preset": "huge"}, "unknown preset 'huge'"),
    ({"n_train": 0}, "n_train=0"),
    ({"n_shapes": 9}, "n_shapes=9 but only 8"),
    ({"image_size": 4}, "image_size=4"),
    ({"noise": -1.0}, "noise=-1.0"),
    ({"n_colours": 2.5}, "n_colours=2.5"),
])
def test_shapes_bad_parameters(kwargs, match):
    with pytest.raises(DatasetError, match=match):
        load_dataset("shapes", **{"preset": "fast", **kwargs})


def _rotated_mask(shape: shapes_mod._Shape, degrees: float, n: int = 201) -> np.ndarray:
    g = np.linspace(-1.3, 1.3, n, dtype=np.float64)
    v, u = np.meshgrid(g, g, indexing="ij")
    a = math.radians(degrees)
    ur, vr = u * math.cos(a) + v * math.sin(a), -u * math.sin(a) + v * math.cos(a)
    return shape.sdf(ur, vr) < 0


@pytest.mark.parametrize("shape", shapes_mod._SHAPES, ids=lambda s: s.name)
def test_shape_orientation_is_defined_modulo_its_symmetry(shape):
    """Rotating by the declared period is invisible; any smaller rotation divisor is visible."""
    base = _rotated_mask(shape, 0.0)
    assert base.mean() > 0.2  # a solid shape of comparable area
    assert (base != _rotated_mask(shape, shape.period)).mean() < 0.005
    for k in (2, 3, 4, 5):
        if (360 / shape.period) * k <= 12:
            assert (base != _rotated_mask(shape, shape.period / k)).mean() > 0.02, k


def test_render_shapes_factors_show_in_pixels():
    """Position and size factors are readable from the rendered shape's own pixels."""
    x, y, f, mask = shapes_mod.render_shapes(360, rng=np.random.default_rng(3), image_size=48,
                                             return_masks=True)
    assert x.dtype == np.float32 and x.min() >= 0 and x.max() <= 1
    assert mask.shape == (360, 48, 48) and mask.min() >= 0 and mask.max() <= 1
    rows, cols = np.mgrid[0:48, 0:48]
    area = mask.sum(axis=(1, 2))
    cy = (mask * rows).sum(axis=(1, 2)) / area
    cx = (mask * cols).sum(axis=(1, 2)) / area
    col, row = f["position"] % 3, f["position"] // 3
    assert np.all(np.diff([np.median(cx[col == c]) for c in range(3)]) > 4)
    assert np.all(np.diff([np.median(cy[row == r]) for r in range(3)]) > 4)
    for k in range(6):  # pixel area grows with the size bin, for every shape
        med = [np.median(area[(y == k) & (f["size"] == s)]) for s in range(3)]
        assert np.all(np.diff(med) > 0), (k, med)
    # The shape's fill takes its colour class's hue: pixels well inside the mask are brightest
    # in the channel the hue bin points to (bins 0, 2, 4 of 6 = red, green, blue).
    inside = mask > 0.99
    for c, channel in ((0, 0), (2, 1), (4, 2)):
        sel = np.flatnonzero(f["colour"] == c)
        fill = np.stack([x[i][:, inside[i]].mean(axis=1) for i in sel])
        assert (fill.argmax(axis=1) == channel).mean() > 0.8


# ----------------------------------------------------------------------------------------------
# digits
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits() -> DatasetBundle:
    return load_dataset("digits", image_size=16)


def test_digits_structure_and_stratified_split(digits):
    _check_bundle(digits)
    assert digits.train.images.shape[1:] == (1, 16, 16)
    assert len(digits.train) + len(digits.test) == 1797
    assert len(digits.test) == math.ceil(0.25 * 1797)
    frac = (torch.bincount(digits.test.labels, minlength=10)
            / torch.bincount(torch.cat([digits.train.labels, digits.test.labels]), minlength=10))
    assert float((frac - 0.25).abs().max()) < 0.02
    assert digits.factor_classes == {"ink": 3, "slant": 3}


def test_digits_factors_are_not_functions_of_the_digit(digits):
    labels = torch.cat([digits.train.labels, digits.test.labels])
    for name in ("ink", "slant"):
        f = torch.cat([digits.train.factors[name], digits.test.factors[name]])
        for c in range(10):
            counts = torch.bincount(f[labels == c], minlength=3)
            assert counts.max() - counts.min() <= 1, (name, c, counts)  # within-class terciles


def test_digit_style_factors_follow_their_definition():
    img = np.zeros((6, 8, 8))
    labels = np.zeros(6, dtype=np.int64)
    for i in range(6):
        img[i, :, 3] = 1 + i  # more ink for higher i, upright
    f = digit_style_factors(img, labels)
    np.testing.assert_array_equal(f["ink"], [0, 0, 1, 1, 2, 2])
    # Slant: a stroke whose column grows with the row (leaning right) ranks above a vertical one.
    lean = np.zeros((3, 8, 8))
    for r in range(8):
        lean[0, r, 4] = 1  # vertical
        lean[1, r, 2 + r // 3] = 1  # mild right lean
        lean[2, r, 7 - r] = 1  # strong left lean (column falls as row grows)
    s = digit_style_factors(lean, np.zeros(3, dtype=np.int64))["slant"]
    np.testing.assert_array_equal(s, [1, 2, 0])


def test_digits_round_trip_channels_and_seed(digits):
    _assert_same(digits, load_dataset("digits", **digits.params))
    rgb = load_dataset("digits", image_size=8, channels=3, seed=1)
    assert rgb.train.images.shape[1:] == (3, 8, 8)
    assert not torch.equal(rgb.test.labels[:50], digits.test.labels[:50]) or not torch.equal(
        rgb.test.factors["ink"], digits.test.factors["ink"])


@pytest.mark.parametrize("kwargs", [{"channels": 2}, {"image_size": 4}, {"test_fraction": 1.0}])
def test_digits_bad_parameters(kwargs):
    with pytest.raises(DatasetError, match="digits: "):
        load_dataset("digits", **kwargs)


# ----------------------------------------------------------------------------------------------
# real datasets: error messages
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name, expect", [
    ("cifar10", "missing cifar-10-batches-py/ (expected ROOT/cifar-10-batches-py/data_batch_1..5"),
    ("cifar100", "missing cifar-100-python/ (expected ROOT/cifar-100-python/train, test"),
    ("stl10", "missing stl10_binary/ (expected ROOT/stl10_binary/train_X.bin"),
    ("cinic10", "missing train/ (expected ROOT/train/<class>/*.png"),
    ("imagefolder", "missing train/ (expected ROOT/train/<class>/"),
])
def test_real_missing_root_gives_one_line(tmp_path, name, expect):
    root = tmp_path / "nothing-here"
    with pytest.raises(DatasetError) as info:
        load_dataset(name, root=str(root))
    msg = str(info.value)
    assert "\n" not in msg
    assert msg.startswith(f"{name}: {root}")
    assert expect in msg
    assert "--data-root" in msg
    with pytest.raises(DatasetError, match=f"{name}: no data root given"):
        load_dataset(name)


# ----------------------------------------------------------------------------------------------
# real datasets: tiny fakes in the on-disk layouts
# ----------------------------------------------------------------------------------------------


def _write_pickle(path, obj, protocol=2):
    with open(path, "wb") as fh:
        pickle.dump(obj, fh, protocol=protocol)


@pytest.fixture()
def fake_cifar10(tmp_path):
    rng = np.random.default_rng(0)
    d = tmp_path / "cifar-10-batches-py"
    d.mkdir()
    images, labels = [], []
    for i in range(1, 6):
        x = rng.integers(0, 256, (20, 3072), dtype=np.uint8)
        y = [int(v) for v in rng.integers(0, 10, 20)]
        _write_pickle(d / f"data_batch_{i}", {"batch_label": f"batch {i}", "data": x,
                                              "labels": y})
        images.append(x)
        labels += y
    x_te = rng.integers(0, 256, (10, 3072), dtype=np.uint8)
    y_te = [int(v) for v in rng.integers(0, 10, 10)]
    _write_pickle(d / "test_batch", {"data": x_te, "labels": y_te})
    names = [f"c{i}" for i in range(10)]
    _write_pickle(d / "batches.meta", {"label_names": names, "num_vis": 3072})
    return tmp_path, np.concatenate(images), np.asarray(labels), x_te, np.asarray(y_te), names


def test_cifar10_round_trip(fake_cifar10):
    root, x, y, x_te, y_te, names = fake_cifar10
    b = load_dataset("cifar10", root=str(root))
    _check_bundle(b)
    assert b.class_names == names and b.num_classes == 10 and b.factor_classes == {}
    assert b.train.images.shape == (100, 3, 32, 32) and len(b.test) == 10
    np.testing.assert_array_equal(b.train.labels.numpy(), y)
    np.testing.assert_array_equal(b.test.labels.numpy(), y_te)
    mean = torch.tensor(b.mean)[None, :, None, None]
    std = torch.tensor(b.std)[None, :, None, None]
    pixels = (b.train.images[:] * std + mean) * 255
    np.testing.assert_allclose(pixels.numpy(), x.reshape(-1, 3, 32, 32), atol=1e-3)
    again = load_dataset("cifar10", **b.params)
    _assert_same(b, again)
    # root may also be the batches folder itself
    inner = load_dataset("cifar10", root=str(root / "cifar-10-batches-py"))
    assert torch.equal(inner.train.images[:], b.train.images[:])


def test_cifar10_resize_and_cap(fake_cifar10):
    root, _, y, *_ = fake_cifar10
    b = load_dataset("cifar10", root=str(root), image_size=16, max_per_class=3)
    _check_bundle(b)
    assert b.train.images.shape[1:] == (3, 16, 16)
    counts = torch.bincount(b.train.labels, minlength=10)
    expect = np.minimum(np.bincount(y, minlength=10), 3)
    np.testing.assert_array_equal(counts.numpy(), expect)


def test_cifar10_malformed_files(fake_cifar10):
    root, *_ = fake_cifar10
    d = root / "cifar-10-batches-py"
    (d / "data_batch_3").write_bytes(b"not a pickle")
    with pytest.raises(DatasetError, match=r"cifar10: cannot read .*data_batch_3.*--download"):
        load_dataset("cifar10", root=str(root))
    (d / "data_batch_3").unlink()
    with pytest.raises(DatasetError, match=r"lacks data_batch_3 \(expected ROOT/cifar-10"):
        load_dataset("cifar10", root=str(root))


class _Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_cifar_pickles_cannot_run_code(fake_cifar10, capsys):
    root, *_ = fake_cifar10
    _write_pickle(root / "cifar-10-batches-py" / "test_batch", {"data": _Evil(), "labels": []})
    with pytest.raises(DatasetError, match=r"refusing to unpickle (__builtin__|builtins)\.print"):
        load_dataset("cifar10", root=str(root))
    assert "pwned" not in capsys.readouterr().out


def test_cifar10_wrong_shape(fake_cifar10):
    root, *_ = fake_cifar10
    _write_pickle(root / "cifar-10-batches-py" / "test_batch",
                  {"data": np.zeros((4, 100), np.uint8), "labels": [0, 1, 2, 3]})
    with pytest.raises(DatasetError, match=r"'data' has shape \(4, 100\), expected \(n, 3072\)"):
        load_dataset("cifar10", root=str(root))


def test_cifar100_fine_and_coarse(tmp_path):
    rng = np.random.default_rng(1)
    d = tmp_path / "cifar-100-python"
    d.mkdir()
    for split, n in (("train", 40), ("test", 12)):
        _write_pickle(d / split, {"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                                  "fine_labels": [int(v) for v in rng.integers(0, 100, n)],
                                  "coarse_labels": [int(v) for v in rng.integers(0, 20, n)]})
    _write_pickle(d / "meta", {"fine_label_names": [f"f{i}" for i in range(100)],
                               "coarse_label_names": [f"g{i}" for i in range(20)]})
    fine = load_dataset("cifar100", root=str(tmp_path))
    coarse = load_dataset("cifar100", root=str(tmp_path), coarse=True)
    _check_bundle(fine)
    _check_bundle(coarse)
    assert fine.num_classes == 100 and fine.factor_classes == {"coarse": 20}
    assert coarse.num_classes == 20 and coarse.factor_classes == {"fine": 100}
    assert torch.equal(fine.train.labels, coarse.train.factors["fine"])
    assert torch.equal(coarse.train.labels, fine.train.factors["coarse"])
    assert coarse.class_names[:2] == ["g0", "g1"]
    _assert_same(coarse, load_dataset("cifar100", **coarse.params))


def test_stl10_binary_layout(tmp_path):
    rng = np.random.default_rng(2)
    d = tmp_path / "stl10_binary"
    d.mkdir()
    truth = {}
    for split, n in (("train", 6), ("test", 4)):
        x = rng.integers(0, 256, (n, 3, 96, 96), dtype=np.uint8)
        y = rng.integers(1, 11, n).astype(np.uint8)
        # STL-10 stores each channel column-major.
        (d / f"{split}_X.bin").write_bytes(x.transpose(0, 1, 3, 2).tobytes())
        (d / f"{split}_y.bin").write_bytes(y.tobytes())
        truth[split] = (x, y)
    (d / "class_names.txt").write_text("\n".join(f"k{i}" for i in range(10)) + "\n")
    b = load_dataset("stl10", root=str(tmp_path))
    _check_bundle(b)
    assert b.class_names[0] == "k0" and b.train.images.shape == (6, 3, 96, 96)
    np.testing.assert_array_equal(b.train.labels.numpy(), truth["train"][1].astype(int) - 1)
    mean = torch.tensor(b.mean)[None, :, None, None]
    std = torch.tensor(b.std)[None, :, None, None]
    np.testing.assert_allclose(((b.test.images[:] * std + mean) * 255).numpy(), truth["test"][0],
                               atol=1e-3)
    small = load_dataset("stl10", root=str(tmp_path), image_size=32)
    assert small.train.images.shape == (6, 3, 32, 32)
    (d / "test_X.bin").write_bytes(b"\x00" * 100)
    with pytest.raises(DatasetError, match="stl10: .*test_X.bin has 100 bytes"):
        load_dataset("stl10", root=str(tmp_path))


def _write_images(root, split, classes, n, size, fmt="PNG", rng=None):
    from PIL import Image

    rng = rng or np.random.default_rng(0)
    for c in classes:
        (root / split / c).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            w, h = size if isinstance(size, tuple) else (size, size)
            arr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
            Image.fromarray(arr).save(root / split / c / f"{i:03d}.{fmt.lower()}", fmt)


def test_cinic10_folder_layout(tmp_path):
    classes = ["airplane", "bird", "cat"]
    for split, n in (("train", 3), ("valid", 2), ("test", 2)):
        _write_images(tmp_path, split, classes, n, 32)
    b = load_dataset("cinic10", root=str(tmp_path))
    _check_bundle(b)
    assert b.class_names == classes and len(b.train) == 9 and len(b.test) == 6
    assert b.train.images.shape[1:] == (3, 32, 32)
    bigger = load_dataset("cinic10", root=str(tmp_path), include_valid=True, max_per_class=1)
    assert len(bigger.train) == 6 and len(bigger.test) == 3
    _assert_same(bigger, load_dataset("cinic10", **bigger.params))
    (tmp_path / "test" / "bird" / "000.png").write_bytes(b"garbage")
    with pytest.raises(DatasetError, match=r"cinic10: cannot decode image .*000\.png"):
        load_dataset("cinic10", root=str(tmp_path))


def test_imagefolder_resizes_and_checks_classes(tmp_path):
    classes = ["n01", "n02"]
    rng = np.random.default_rng(4)
    _write_images(tmp_path, "train", classes, 3, (40, 30), "JPEG", rng)
    _write_images(tmp_path, "val", classes, 2, (25, 50), "PNG", rng)
    b = load_dataset("imagefolder", root=str(tmp_path), image_size=16)
    _check_bundle(b)
    assert b.train.images.shape == (6, 3, 16, 16) and b.test.images.shape == (4, 3, 16, 16)
    assert b.class_names == classes and b.params["test_split"] == "val"
    _assert_same(b, load_dataset("imagefolder", **b.params))
    (tmp_path / "val" / "n99").mkdir()
    with pytest.raises(DatasetError, match="imagefolder: .*class folder\\(s\\) n99 not in the "
                                           "training split"):
        load_dataset("imagefolder", root=str(tmp_path), image_size=16)
    flat = tmp_path / "flat"
    (flat / "train").mkdir(parents=True)
    (flat / "val").mkdir()
    with pytest.raises(DatasetError, match="imagefolder: .*train has no class subfolders"):
        load_dataset("imagefolder", root=str(flat))
