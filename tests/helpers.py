"""Set-up shared by test files and benchmarks: the tiny trained run, a generated ImageFolder,
run copies, BatchNorm statistics.

Imported as ``from tests.helpers import ...`` (``python -m pytest`` and ``python -m
benchmarks...`` run from the repository root), by the tests and by the benchmarks that build
the same data (:mod:`benchmarks.memory_paths`); it imports nothing from ``benchmarks`` and the
package never imports it. Fixtures stay in each file; this module holds only plain functions
and constants.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from dtprobe.training.trainer import TrainConfig, train

#: The smallest shapes dataset that still trains (as the ``tiny_shapes_params`` fixture).
TINY = {"n_train": 240, "n_test": 120, "image_size": 16}


def tiny_config(out: Path, **overrides: Any) -> TrainConfig:
    """A small CNN on :data:`TINY` shapes for 2 epochs, a checkpoint every epoch, seed 0, on
    the CPU; ``overrides`` replace any of these settings (``epochs=3``, ``dataset=...``)."""
    cfg: dict[str, Any] = dict(
        out=str(out), dataset="shapes", dataset_params=dict(TINY), arch="small_cnn",
        arch_params={"width": 8, "feature_dim": 16}, epochs=2, batch_size=64, save_every=1,
        seed=0, device="cpu", progress=False)
    cfg.update(overrides)
    return TrainConfig(**cfg)


def train_tiny(out: Path, **extra: Any) -> Path:
    """Train :func:`tiny_config` into ``out`` (checkpoints at epochs 0, 1, 2); returns ``out``."""
    train(tiny_config(out, **extra))
    return out


def copy_run(src: Path, dst: Path, *, with_analysis: bool = False) -> Path:
    """Copy the run folder ``src`` to ``dst`` (without its ``analysis/`` unless asked)."""
    ignore = None if with_analysis else shutil.ignore_patterns("analysis")
    shutil.copytree(src, dst, ignore=ignore)
    return dst


def checkpoint_file(run_dir: Path, epoch: int) -> Path:
    """The trainer's checkpoint file of ``epoch`` in ``run_dir``."""
    return run_dir / "checkpoints" / f"epoch_{epoch:04d}.pt"


def randomise_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial BatchNorm statistics and affine parameters, so folding is really tested."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                c = m.num_features
                m.running_mean.copy_(torch.rand(c, generator=gen) - 0.5)
                m.running_var.copy_(torch.rand(c, generator=gen) * 1.5 + 0.5)
                m.weight.copy_(torch.rand(c, generator=gen) + 0.5)
                m.bias.copy_(torch.rand(c, generator=gen) * 0.4 - 0.2)
    return model.eval()


def make_folder(root: Path, per_class: int, size: int = 24, classes: int = 4, seed: int = 0,
                val: int | None = None) -> Path:
    """A JPEG ImageFolder (train/ and val/) of noisy tinted ``size x (size + 5)`` images."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for split, n in (("train", per_class), ("val", val or max(2, per_class // 2))):
        for c in range(classes):
            d = root / split / f"class{c}"
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                img = np.zeros((size, size + 5, 3), np.uint8)
                img[..., c % 3] = 90 + 40 * (c // 3)
                img = np.clip(img + rng.integers(0, 80, img.shape), 0, 255).astype(np.uint8)
                Image.fromarray(img).save(d / f"{i:05d}.jpg", quality=85)
    return root
