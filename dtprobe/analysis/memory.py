"""Memory budget of an analysis (``--memory-budget``): what it holds, checked before any work.

An analysis holds, at its peak:

- the evaluation images, when they are in memory (float32 tensors, or uint8 pixels); images
  read from an image store (:mod:`dtprobe.data.store`) cost one batch;
- one checkpoint's train and test features (penultimate, logits and each ``--layers`` output,
  float32) and the test features of up to three more checkpoints (the final one, kept for
  CKA-to-final, and the two before the current one,
  :class:`~dtprobe.analysis.resume.EpochFeatures`);
- the metrics' working copies of the training features (standardised copies for the probes'
  solver, class means and scatter), counted as :data:`WORKSPACE_COPIES` copies;
- one forward pass (``batch``): a batch of images as read (uint8), converted to float32 at
  their stored and at the model's size (:class:`~dtprobe.data.pixels.RawImages`), and every
  module's output for it (measured per image on two images by :func:`activation_bytes`, an
  upper bound: without autograd most are freed as the pass goes on);
- the model (``model``): its parameters and buffers three times (the checkpoint file's bytes,
  read once to hash them, the state dict loaded from them, the model).

None of these grows with the number of checkpoints, layers kept on disk or downstream datasets
(those held in memory are loaded one at a time, and checked the same way; those read from an
image store, loaded together before the checkpoints, hold a batch each). Images held in memory
(``--image-store none``, array datasets) do grow with their number, as uint8 pixels, and are
counted as ``images``. :func:`check_budget` adds them up and
refuses, with the options that would fit, an analysis that would exceed the budget, instead
of letting the machine swap or the kernel kill it halfway.
"""

from __future__ import annotations

import math
import os
import re

from dtprobe.errors import ConfigError

__all__ = ["MODEL_COPIES", "WORKSPACE_COPIES", "activation_bytes", "batch_bytes",
           "check_budget", "default_budget", "estimate_bytes", "format_size", "parse_size"]

#: Working copies of the training features the metrics make at most at once (measured on the
#: analysis of a 3,000-image folder run: see tests/test_memory_budget.py).
WORKSPACE_COPIES = 3
#: Copies of the model's weights held while a checkpoint is loaded (file bytes, state dict,
#: model).
MODEL_COPIES = 3
#: Test features of other checkpoints held for the across-epoch metrics (the final one and
#: the two most recent before the current one: EpochFeatures keeps three).
HELD_CHECKPOINTS = 3
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?\s*$", re.IGNORECASE | re.ASCII)
MAX_BUDGET = 1 << 60  # 1024 TiB: beyond it, a typo


def shown_size(text: str | int) -> str:
    """``text`` as the errors of :func:`parse_size` quote it (long input shortened)."""
    text = str(text)
    return repr(text if len(text) <= 40 else text[:37] + "...")


def parse_size(text: str | int) -> int:
    """Bytes of a size such as ``512M``, ``8G``, ``1.5GiB`` or ``1048576`` (binary units).

    Raises
    ------
    ConfigError
        Not a positive size (the message shows the accepted forms).
    """
    if isinstance(text, int) and not isinstance(text, bool):
        value = text
    else:
        match = _SIZE.match(str(text))
        if not match:
            raise ConfigError(f"--memory-budget {shown_size(text)}: write a size such as 512M, "
                              "8G or 1.5G (binary units K, M, G, T)")
        number = float(match.group(1)) * _UNITS[match.group(2).lower()]
        value = int(number) if number <= MAX_BUDGET else MAX_BUDGET + 1  # no inf -> int
    if value < 1 << 20:
        raise ConfigError(f"--memory-budget {shown_size(text)}: at least 1M is needed")
    if value > MAX_BUDGET:
        raise ConfigError(f"--memory-budget {shown_size(text)}: larger than any machine's "
                          "memory (at most 1024T); write a size such as 512M, 8G or 1.5G")
    return value


def format_size(n: float) -> str:
    """``n`` bytes as a short human size (``1.5 GiB``)."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"  # pragma: no cover


def _available_memory() -> int | None:
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # pragma: no cover - exotic platforms
        return None


def default_budget() -> int:
    """Three quarters of the memory available now (8 GiB when it cannot be read)."""
    available = _available_memory()
    return int(available * 0.75) if available else 8 << 30


def activation_bytes(model, images) -> int:
    """Bytes of every module's output per image, measured on a forward pass of ``images``
    (a few float images) with hooks: the activations of a batch are at most this times the
    batch size."""
    import torch

    total = 0

    def hook(_module, _inputs, output) -> None:
        nonlocal total
        for t in output if isinstance(output, (tuple, list)) else (output,):
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()

    handles = [m.register_forward_hook(hook) for m in model.modules()]
    try:
        with torch.inference_mode():
            model.eval()(images)
    finally:
        for h in handles:
            h.remove()
    return -(-total // max(1, len(images)))


def batch_bytes(batch: int, pixel_shape, image_shape, activations_per_image: int) -> int:
    """Bytes of one forward pass of ``batch`` images: uint8 pixels ``pixel_shape`` (C, H, W),
    float32 copies at that shape and at the model's ``image_shape`` (two each: conversion
    intermediates), and the activations."""
    import math

    pixels = math.prod(pixel_shape)
    values = math.prod(image_shape)
    return batch * (pixels + 2 * 4 * pixels + 2 * 4 * values + activations_per_image)


def estimate_bytes(n_train: int, n_test: int, values_per_image: int,
                   resident_image_bytes: int, held_value_bytes: int = 4,
                   batch: int = 0, model: int = 0) -> dict[str, int]:
    """The parts of an analysis's peak memory (see the module docstring), in bytes.

    Parameters
    ----------
    n_train, n_test : images per split.
    values_per_image : floats extracted per image (feature dim + classes + layer dims).
    resident_image_bytes : bytes of the images held in memory (0 for an image store).
    held_value_bytes : bytes per value of the other checkpoints' held test features (2 with
        ``--feature-dtype float16``/``bfloat16``; logits are counted at that size too, a slight
        underestimate when there are many classes).
    batch : bytes of one forward pass (:func:`batch_bytes`).
    model : bytes of the model's parameters and buffers (held :data:`MODEL_COPIES` times).
    """
    per = 4 * values_per_image
    train, test = n_train * per, n_test * per
    return {"images": resident_image_bytes, "features": train + test,
            "held": HELD_CHECKPOINTS * n_test * held_value_bytes * values_per_image,
            "workspace": WORKSPACE_COPIES * train, "batch": batch,
            "model": MODEL_COPIES * model}


def check_budget(budget: int, n_train: int, n_test: int, values_per_image: int,
                 resident_image_bytes: int, what: str, can_store: bool,
                 held_value_bytes: int = 4, batch: int = 0, model: int = 0) -> int:
    """Raise :class:`ConfigError` if the analysis of ``what`` would hold more than ``budget``.

    Returns the estimated peak in bytes. The message names the largest ``--max-samples`` that
    would fit and, for folder datasets held in memory, ``--image-store``.
    """
    parts = estimate_bytes(n_train, n_test, values_per_image, resident_image_bytes,
                           held_value_bytes, batch, model)
    need = sum(parts.values())
    if need <= budget:
        return need
    fixed = parts["batch"] + parts["model"]  # not reduced by fewer images
    per_image = (need - fixed) / max(1, n_train + n_test)
    # --max-samples N caps each split: about 2N images in all
    fits = max(0, math.floor(max(0, budget - fixed) / per_image)) // 2 if per_image else 0
    fixes = []
    if resident_image_bytes and can_store:
        fixes.append("--image-store DIR (decode once to disk, read per batch)")
    if fits >= 1:
        fixes.append(f"--max-samples {fits} (a stable subset per split)")
    fixes.append("a larger --memory-budget")
    detail = ", ".join(f"{k} {format_size(v)}" for k, v in parts.items() if v)
    raise ConfigError(f"--memory-budget {format_size(budget)}: {what} needs about "
                      f"{format_size(need)} ({detail}; {n_train} + {n_test} images); pass "
                      + " or ".join(fixes))
