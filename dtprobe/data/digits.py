"""``digits``: scikit-learn's bundled 8x8 handwritten digits, upsampled, with style factors.

The source task is the digit (10 classes).  The downstream factors describe
*how* a digit was written, which the digit task does not need:

``ink``
    tercile of the total ink (sum of the 8x8 intensities) **within the digit's
    class**: light, medium or heavy strokes for that digit.
``slant``
    tercile, within the digit's class, of the shear moment ``mu11 / mu02`` of
    the 8x8 image (how far the column of ink moves per row: left-leaning,
    upright, right-leaning for that digit).

Ranking within each class makes every factor class occur equally often (to
within one image) for every digit, so a factor is never a function of the
label and a probe cannot score above chance from the digit alone; a raw
global tercile of ink would largely encode the digit (a ``1`` has less ink
than an ``8``).  Parity or "digit > 4" would be functions of the label and are
deliberately not offered.

The digits are too easy to show the discriminability-transferability trade-off
(probes saturate near 98 %, see DESIGN.md section 4); use ``shapes`` for that.
The set holds 1797 images, so memory is small:
``1797 x channels x image_size^2 x 4`` bytes (22 MB for 3 x 32 x 32).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from dtprobe.data.base import DatasetBundle, Split
from dtprobe.data.registry import register_dataset
from dtprobe.errors import DatasetError
from dtprobe.references import with_references

__doc__ = with_references(
    __doc__,
    ("alpaydin1998", "(the data bundled with scikit-learn)"),
    "kornblith2021",
)

__all__ = ["digit_style_factors", "load_digits_dataset"]


def _within_class_tercile(values: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Tercile (0, 1, 2) of ``values`` ranked separately inside each label class."""
    out = np.empty(len(values), dtype=np.int64)
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        rank = np.empty(idx.size, dtype=np.int64)
        rank[np.argsort(values[idx], kind="stable")] = np.arange(idx.size)
        out[idx] = (3 * rank) // idx.size
    return out


def digit_style_factors(images: np.ndarray, labels: np.ndarray) -> dict[str, np.ndarray]:
    """Style factors of 8x8 digit images.

    Parameters
    ----------
    images : ``(n, 8, 8)`` non-negative intensities.
    labels : ``(n,)`` digit labels; terciles are taken within each digit class.

    Returns
    -------
    dict
        ``ink`` and ``slant``, each ``(n,)`` int64 in {0, 1, 2}.
    """
    x = np.asarray(images, dtype=np.float64)
    mass = x.sum(axis=(1, 2))
    rows, cols = np.meshgrid(np.arange(x.shape[1]), np.arange(x.shape[2]), indexing="ij")
    safe = np.where(mass > 0, mass, 1.0)
    r_bar = (x * rows).sum(axis=(1, 2)) / safe
    c_bar = (x * cols).sum(axis=(1, 2)) / safe
    dr = rows[None] - r_bar[:, None, None]
    dc = cols[None] - c_bar[:, None, None]
    mu11 = (x * dr * dc).sum(axis=(1, 2))
    mu02 = (x * dr * dr).sum(axis=(1, 2))
    slant = mu11 / np.where(mu02 > 0, mu02, 1.0)
    return {"ink": _within_class_tercile(mass, labels),
            "slant": _within_class_tercile(slant, labels)}


@register_dataset("digits")
def load_digits_dataset(
    image_size: int = 32,
    channels: int = 1,
    test_fraction: float = 0.25,
    seed: int = 0,
) -> DatasetBundle:
    """Load scikit-learn's 8x8 digits, upsampled, with a stratified seeded split.

    Parameters
    ----------
    image_size : output side in pixels (bilinear upsampling of the 8x8 images; >= 8).
    channels : 1 (grey) or 3 (the grey image repeated, for RGB architectures).
    test_fraction : fraction of each digit class held out as the test split.
    seed : seed of the stratified split.

    Returns
    -------
    DatasetBundle
        Source label: the digit; factors ``ink`` and ``slant`` (3 classes each, see the module
        docstring); images normalised with the training split's per-channel mean and std.
        ``load_dataset("digits", **bundle.params)`` rebuilds it exactly.

    References
    ----------
    Alpaydin & Kaynak (1998), via :func:`sklearn.datasets.load_digits`.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 8:
        raise DatasetError(f"digits: image_size={image_size!r} must be an integer >= 8")
    if channels not in (1, 3):
        raise DatasetError(f"digits: channels={channels!r} must be 1 or 3")
    if not 0.0 < float(test_fraction) < 1.0:
        raise DatasetError(f"digits: test_fraction={test_fraction!r} must lie strictly between "
                           "0 and 1")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise DatasetError(f"digits: seed={seed!r} must be an integer >= 0")

    raw = load_digits()
    images8 = raw.images.astype(np.float32)
    labels = raw.target.astype(np.int64)
    factors = digit_style_factors(images8, labels)
    idx_train, idx_test = train_test_split(np.arange(len(labels)), test_size=float(test_fraction),
                                           stratify=labels, random_state=seed)
    idx_train.sort()
    idx_test.sort()

    x = torch.from_numpy(images8 / 16.0).unsqueeze(1)
    if image_size != 8:
        x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False)
    x = x.clamp_(0.0, 1.0).repeat(1, channels, 1, 1)
    x_train = x[torch.from_numpy(idx_train)]
    mean = x_train.double().mean(dim=(0, 2, 3))
    std = x_train.double().std(dim=(0, 2, 3), unbiased=False)
    std = torch.where(std > 0, std, torch.ones_like(std))
    x = ((x - mean.float()[None, :, None, None]) / std.float()[None, :, None, None]).contiguous()

    def split(idx: np.ndarray) -> Split:
        t = torch.from_numpy(idx)
        return Split(images=x[t].contiguous(), labels=torch.from_numpy(labels[idx]),
                     factors={k: torch.from_numpy(v[idx]) for k, v in factors.items()})

    params: dict[str, Any] = dict(image_size=image_size, channels=channels,
                                  test_fraction=float(test_fraction), seed=seed)
    return DatasetBundle(
        name="digits",
        params=params,
        train=split(idx_train),
        test=split(idx_test),
        num_classes=10,
        factor_classes={"ink": 3, "slant": 3},
        class_names=[str(d) for d in range(10)],
        mean=tuple(float(m) for m in mean),
        std=tuple(float(s) for s in std),
    )
