"""The evaluation transform read from a framework's own records (issue 23).

torchvision's reference ``train.py`` saves ``args.val_resize_size/val_crop_size``; timm's
``train.py`` saves ``args`` (``img_size``, ``crop_pct``) and models carry a ``pretrained_cfg``
(``input_size``, ``crop_pct``, ``interpolation``, ``crop_mode``), whose eval transform is
``Resize(floor(size / crop_pct))`` + ``CenterCrop(size)`` (timm's transforms_factory). The
expected numbers below are worked out by hand from those definitions.
"""

from __future__ import annotations

import argparse
import json
import math

import torch

from dtprobe.analysis.plan import plan_run
from dtprobe.checkpoints.layouts import eval_transform_hints, with_recorded_transform


def _save(path, **record):
    torch.save({"model": {"fc.weight": torch.zeros(3, 4)}, **record}, path)
    return path


def test_torchvision_reference_args(tmp_path):
    args = argparse.Namespace(model="resnet50", val_resize_size=232, val_crop_size=224,
                              interpolation="bilinear", num_classes=3)
    hints = eval_transform_hints({"args": args}, tmp_path / "model_1.pth")
    assert (hints.image_size, hints.resize_size, hints.interpolation) == (224, 232, "bilinear")
    assert hints.params() == {"image_size": 224, "resize_size": 232,
                              "interpolation": "bilinear"}
    assert "torchvision" in hints.origin


def test_timm_args_over_pretrained_cfg(tmp_path):
    cfg = {"input_size": (3, 224, 224), "crop_pct": 0.95, "interpolation": "bicubic",
           "crop_mode": "center"}
    record = {"arch": "ResNet", "version": 2, "pretrained_cfg": cfg,
              "args": argparse.Namespace(model="resnet50", img_size=None, input_size=None,
                                         crop_pct=None, interpolation="")}
    hints = eval_transform_hints(record, tmp_path / "checkpoint-1.pth.tar")
    assert (hints.image_size, hints.resize_size) == (224, math.floor(224 / 0.95)) == (224, 235)
    assert hints.interpolation == "bicubic"
    record["args"] = argparse.Namespace(model="resnet50", img_size=128, input_size=None,
                                        crop_pct=0.875, interpolation="bilinear")
    hints = eval_transform_hints(record, tmp_path / "checkpoint-1.pth.tar")
    assert (hints.image_size, hints.resize_size, hints.interpolation) == (128, 146, "bilinear")
    assert hints.origin.startswith("timm train.py args")


def test_timm_config_json_and_other_crop_modes(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architecture": "vit_base_patch16_224",
        "pretrained_cfg": {"input_size": [3, 384, 384], "crop_pct": 1.0,
                           "interpolation": "bicubic", "crop_mode": "center"}}))
    hints = eval_transform_hints({}, tmp_path / "model.safetensors")
    assert (hints.image_size, hints.resize_size) == (384, 384)
    assert "config.json" in hints.origin
    (tmp_path / "config.json").write_text(json.dumps({"pretrained_cfg": {
        "input_size": [3, 224, 224], "crop_pct": 0.9, "crop_mode": "squash"}}))
    assert eval_transform_hints({}, tmp_path / "model.safetensors").params() == {}
    assert eval_transform_hints({"epoch": 3}, tmp_path / "x" / "m.pth").params() == {}


def test_flags_override_the_records(tmp_path):
    ckpt = _save(tmp_path / "model_1.pth", epoch=1, args=argparse.Namespace(
        model="resnet18", val_resize_size=160, val_crop_size=128))
    accepted = ["root", "image_size", "resize_size", "interpolation"]
    params, origin = with_recorded_transform({"root": "/d"}, accepted, ckpt)
    assert params == {"root": "/d", "image_size": 128, "resize_size": 160}
    assert "torchvision" in origin
    for given in ({"image_size": 64}, {"resize_size": 300}, {"preset": "imagenet"}):
        assert with_recorded_transform({"root": "/d", **given}, accepted, ckpt) == (
            {"root": "/d", **given}, "")
    assert with_recorded_transform({}, ["root", "image_size"], ckpt) == ({}, "")


def _torchvision_run(run):
    """Two resnet18 checkpoints as torchvision's reference ``train.py`` saves them (eval
    transform: resize 72, crop 64)."""
    from dtprobe.models import build_model

    run.mkdir()
    state = build_model("resnet18", num_classes=3).state_dict()
    for epoch in (0, 1):
        torch.save({"model": state, "epoch": epoch, "args": argparse.Namespace(
            model="resnet18", val_resize_size=72, val_crop_size=64, num_classes=3)},
            run / f"model_{epoch}.pth")
    return run


def test_plan_of_a_torchvision_run_takes_its_recorded_transform(tmp_path):
    run = _torchvision_run(tmp_path / "run")
    plan = plan_run(run, dataset="imagefolder", dataset_params={"root": "/data"})
    assert plan.dataset_params == {"root": "/data", "image_size": 64, "resize_size": 72}
    assert "torchvision" in plan.record()["eval_transform"]["origin"]
    plan = plan_run(run, dataset="imagefolder", dataset_params={"root": "/d", "image_size": 32})
    assert plan.dataset_params == {"root": "/d", "image_size": 32}


def test_recorded_transform_reuses_the_metadata_read_by_the_series(tmp_path, monkeypatch):
    """Planning reads each checkpoint's records once: the transform comes from the metadata the
    series inference already read, not from a second read of the last file."""
    from dtprobe.checkpoints import layouts

    run = _torchvision_run(tmp_path / "run")
    peeked: list[str] = []
    real = layouts.peek
    monkeypatch.setattr(layouts, "peek", lambda path: peeked.append(path.name) or real(path))
    plan = plan_run(run, dataset="imagefolder", dataset_params={"root": "/data"})
    assert plan.dataset_params == {"root": "/data", "image_size": 64, "resize_size": 72}
    assert sorted(peeked) == ["model_0.pth", "model_1.pth"]  # once each
