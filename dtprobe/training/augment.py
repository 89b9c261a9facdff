"""Batch augmentations drawn from an explicit generator (so a run replays exactly on resume).

:func:`shift_flip` is the trainer's source-task augmentation (identical for every objective).
:func:`contrastive_view` draws the extra view that two-view objectives (SupCon, SimCLR joints)
need, following SimCLR's recipe (Chen et al. 2020) scaled to small images; its parameters are
:data:`CONTRASTIVE_VIEW` and are recorded in the manifest.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

#: The second view of two-view objectives, recorded in the run manifest.
CONTRASTIVE_VIEW: dict[str, Any] = {
    "recipe": "SimCLR (Chen et al. 2020), on normalised images",
    "random_resized_crop_scale": (0.5, 1.0), "aspect_ratio": (3 / 4, 4 / 3),
    "hflip_p": 0.5, "color_jitter_p": 0.8, "brightness": 0.4, "contrast": 0.4,
    "saturation": 0.4, "grayscale_p": 0.2,
}


def shift_flip(images: torch.Tensor, mode: str, generator: torch.Generator) -> torch.Tensor:
    """Random crop with 1/8 zero padding (``"crop"``) and/or horizontal flip (``"-flip"``)."""
    if mode == "none":
        return images
    n, _, h, w = images.shape
    pad = max(1, h // 8)
    padded = F.pad(images, (pad, pad, pad, pad))
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    rows = (dy[:, None] + torch.arange(h)[None, :])  # (n, h)
    cols = (dx[:, None] + torch.arange(w)[None, :])  # (n, w)
    batch_idx = torch.arange(n)[:, None, None, None]
    chan_idx = torch.arange(images.shape[1])[None, :, None, None]
    out = padded[batch_idx, chan_idx, rows[:, None, :, None], cols[:, None, None, :]]
    if "flip" in mode:
        flip = torch.rand(n, generator=generator) < 0.5
        out[flip] = out[flip].flip(-1)
    return out


def random_resized_crop(images: torch.Tensor, generator: torch.Generator,
                        scale: tuple[float, float], ratio: tuple[float, float],
                        size: int | None = None, hflip_p: float = 0.5) -> torch.Tensor:
    """Crop a random box of area fraction ``U(scale)`` and aspect ``logU(ratio)``, resize it to
    ``size`` (default: the input size) bilinearly, flip horizontally with ``hflip_p``."""
    n, _, h, w = images.shape
    size = size or h
    area = torch.empty(n).uniform_(*scale, generator=generator)
    log_r = torch.empty(n).uniform_(math.log(ratio[0]), math.log(ratio[1]), generator=generator)
    aspect = torch.exp(log_r)
    sx = torch.sqrt(area * aspect).clamp(max=1.0)   # half-widths in [-1, 1] coordinates
    sy = torch.sqrt(area / aspect).clamp(max=1.0)
    cx = (torch.rand(n, generator=generator) * 2 - 1) * (1 - sx)
    cy = (torch.rand(n, generator=generator) * 2 - 1) * (1 - sy)
    flip = torch.where(torch.rand(n, generator=generator) < hflip_p, -1.0, 1.0)
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0] = sx * flip
    theta[:, 0, 2] = cx
    theta[:, 1, 1] = sy
    theta[:, 1, 2] = cy
    grid = F.affine_grid(theta, [n, images.shape[1], size, size], align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="border",
                         align_corners=False)


def color_jitter(images: torch.Tensor, generator: torch.Generator, p: float, brightness: float,
                 contrast: float, saturation: float, grayscale_p: float) -> torch.Tensor:
    """Brightness/contrast/saturation factors ``U(1 - s, 1 + s)`` applied with probability ``p``,
    then grey-scale with ``grayscale_p`` (colour steps only for 3-channel images)."""
    n, c = images.shape[:2]
    out = images
    apply = (torch.rand(n, generator=generator) < p).float()[:, None, None, None]

    def factor(s: float) -> torch.Tensor:
        f = torch.empty(n).uniform_(1 - s, 1 + s, generator=generator)[:, None, None, None]
        return apply * f + (1 - apply)

    out = out * factor(brightness)
    mean = out.mean(dim=(1, 2, 3), keepdim=True)
    out = (out - mean) * factor(contrast) + mean
    gray_sat = factor(saturation)
    gray_p = (torch.rand(n, generator=generator) < grayscale_p).float()[:, None, None, None]
    if c == 3:
        gray = out.mean(dim=1, keepdim=True)
        out = gray + (out - gray) * gray_sat
        out = gray_p * out.mean(dim=1, keepdim=True).expand_as(out) + (1 - gray_p) * out
    return out


def contrastive_view(images: torch.Tensor, generator: torch.Generator,
                     size: int | None = None, scale: tuple[float, float] | None = None
                     ) -> torch.Tensor:
    """One SimCLR-style view of every image (:data:`CONTRASTIVE_VIEW`)."""
    v = CONTRASTIVE_VIEW
    out = random_resized_crop(images, generator, scale or v["random_resized_crop_scale"],
                              v["aspect_ratio"], size=size, hflip_p=v["hflip_p"])
    return color_jitter(out, generator, v["color_jitter_p"], v["brightness"], v["contrast"],
                        v["saturation"], v["grayscale_p"])
