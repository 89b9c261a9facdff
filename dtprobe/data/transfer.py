"""Preparing a downstream dataset for a source model: channels, resolution, normalisation.

Kornblith et al. (2019, 2021) evaluate transfer with the *source* preprocessing: the frozen network
sees target images the way it saw its training images. :func:`prepare_for_source` applies that
rule to a loaded :class:`~dtprobe.data.base.DatasetBundle`, in this order:

1. **Undo the target's own normalisation** (every loader normalises with its training split's
   per-channel mean and std): ``x = x * std_target + mean_target``, pixel intensities in [0, 1].
2. **Channels.** Equal counts: unchanged. 1 -> 3: the grey channel repeated. 3 -> 1: luma
   ``Y = 0.299 R + 0.587 G + 0.114 B`` (ITU-R BT.601). Other combinations are refused.
3. **Resolution.** When the target's side differs from the source's, the image is resized to the
   source's ``H x W`` with bilinear interpolation (``align_corners=False``, antialiased, so
   shrinking averages over the covered pixels), then clipped to [0, 1]. The aspect ratio is not
   kept; every registered loader emits square images (``imagefolder`` resizes the shorter side
   and centre-crops), so nothing is distorted. To decode once at the right size,
   :func:`source_loader_params` passes the source's side as ``image_size`` (and its channel
   count as ``channels``) to loaders that take them, unless the spec sets them: steps 2-3 are
   then no-ops.
4. **Normalise with the source's statistics**: ``(x - mean_source) / std_source``, the
   per-channel mean and std the source model was trained with (recorded in its bundle).

Images held as uint8 pixels (:class:`~dtprobe.data.pixels.RawImages`: every folder and array
dataset on disk) are not converted here at all: steps 1-4 are applied per batch when the images
are used (:meth:`RawImages.converted`), from the exact pixel values ``x / 255``, so memory stays
the uint8 pixels (or one batch, read from an image store) whatever the two sizes. Images made as
float32 tensors (the generated datasets) are converted in chunks, in float32, so the transient
memory is a few MB above the images.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F

from dtprobe.data.base import DatasetBundle, Split
from dtprobe.data.pixels import is_raw
from dtprobe.errors import DatasetError
from dtprobe.references import with_references

__doc__ = with_references(__doc__, "kornblith2019transfer", "kornblith2021")

__all__ = ["LUMA", "SourceInput", "prepare_for_source", "source_loader_params"]

LUMA = (0.299, 0.587, 0.114)
"""ITU-R BT.601 luma weights for RGB -> grey."""

_CHUNK = 1024


@dataclass(frozen=True)
class SourceInput:
    """What the source model takes: channels, side ``H x W`` and normalisation statistics."""

    channels: int
    height: int
    width: int
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @classmethod
    def of(cls, bundle: DatasetBundle) -> SourceInput:
        """The input of a model trained on ``bundle``."""
        _, c, h, w = bundle.train.images.shape
        return cls(int(c), int(h), int(w), tuple(float(m) for m in bundle.mean),
                   tuple(float(s) for s in bundle.std))

    @property
    def tag(self) -> str:
        """A stable string for cache keys (features depend on the preprocessing)."""
        return "source-input:" + json.dumps([self.channels, self.height, self.width,
                                             [round(m, 8) for m in self.mean],
                                             [round(s, 8) for s in self.std]])


def source_loader_params(loader_params: list[str], params: dict[str, Any],
                         target: SourceInput) -> dict[str, Any]:
    """``params`` plus ``image_size``/``channels`` of the source where the loader takes them and
    the spec left them unset (decode once at the source's size; see the module docstring)."""
    out = dict(params)
    if "image_size" in loader_params and "image_size" not in out and target.height == target.width:
        out["image_size"] = target.height
    if "channels" in loader_params and "channels" not in out and target.channels in (1, 3):
        out["channels"] = target.channels
    return out


def _convert(x: torch.Tensor, mean_in: torch.Tensor, std_in: torch.Tensor,
             target: SourceInput) -> torch.Tensor:
    x = x.float() * std_in[None, :, None, None] + mean_in[None, :, None, None]
    c = x.shape[1]
    if c != target.channels:
        if c == 1:
            x = x.expand(-1, target.channels, -1, -1)
        else:  # 3 -> 1
            w = torch.tensor(LUMA, dtype=x.dtype)[None, :, None, None]
            x = (x * w).sum(dim=1, keepdim=True)
    if tuple(x.shape[-2:]) != (target.height, target.width):
        x = F.interpolate(x, size=(target.height, target.width), mode="bilinear",
                          align_corners=False, antialias=True).clamp_(0.0, 1.0)
    mean = torch.tensor(target.mean, dtype=x.dtype)[None, :, None, None]
    std = torch.tensor(target.std, dtype=x.dtype)[None, :, None, None]
    return ((x - mean) / std).contiguous()


def prepare_for_source(bundle: DatasetBundle, target: SourceInput) -> DatasetBundle:
    """Return ``bundle`` with its images prepared for a model of input ``target``.

    Labels are kept; the bundle's own factors are dropped (a downstream dataset is one task,
    its label). ``mean``/``std`` of the result are the source's. See the module docstring for
    the rule.

    Raises
    ------
    DatasetError
        A channel conversion other than 1 -> 3 or 3 -> 1 is needed.
    """
    c = bundle.in_channels
    if c != target.channels and (c, target.channels) not in ((1, 3), (3, 1)):
        raise DatasetError(f"{bundle.name}: cannot turn {c}-channel images into the source's "
                           f"{target.channels} channels (only 1 <-> 3 is defined)")
    if len(target.mean) != target.channels or len(target.std) != target.channels:
        raise DatasetError(f"{bundle.name}: the source statistics have {len(target.mean)} "
                           f"channels but its images {target.channels}")
    if is_raw(bundle.train.images) and is_raw(bundle.test.images):
        # uint8 pixels: converted per batch on use (steps 1-4 on the exact intensities; no
        # float copy of the images is ever made)
        def restat(s: Split) -> Split:
            return Split(images=s.images.converted(target.channels,
                                                   (target.height, target.width),
                                                   target.mean, target.std),
                         labels=s.labels.clone(), factors={}, sample_ids=s.sample_ids)

        return replace(bundle, train=restat(bundle.train), test=restat(bundle.test),
                       factor_classes={}, mean=target.mean, std=target.std)
    mean_in = torch.tensor(bundle.mean, dtype=torch.float32)
    std_in = torch.tensor(bundle.std, dtype=torch.float32)

    def split(s: Split) -> Split:
        n = len(s)
        out = torch.empty((n, target.channels, target.height, target.width),
                          dtype=torch.float32)
        for start in range(0, n, _CHUNK):
            out[start:start + _CHUNK] = _convert(s.images[start:start + _CHUNK], mean_in,
                                                 std_in, target)
        return Split(images=out, labels=s.labels.clone(), factors={}, sample_ids=s.sample_ids)

    return replace(bundle, train=split(bundle.train), test=split(bundle.test), factor_classes={},
                   mean=target.mean, std=target.std)
