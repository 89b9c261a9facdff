"""``shapes``: the embedded, procedurally rendered default dataset.

Each image shows one coloured shape (the **source label**) on a grey,
cluttered, noisy background.  Four more properties of the shape are drawn
independently of it and of each other, and serve as **downstream tasks** (the
``factors`` of every :class:`~dtprobe.data.base.Split`):

``colour``
    hue bin of the shape's fill (``n_colours`` equally spaced hues with jitter;
    saturation and brightness vary freely).
``position``
    cell of a ``position_grid x position_grid`` grid holding the shape's centre.
``size``
    bin of the shape's radius (``n_sizes`` bins between 12 % and 28 % of the
    image side).
``orientation``
    bin of the rotation angle **modulo the shape's rotational symmetry**
    (``n_orientations`` bins over 90 deg for a square, 120 deg for a triangle,
    72 deg for the star, 360 deg for the open ring, half-disc, ...), so every
    orientation class is a visible property of the image.

Bins are sampled with a margin around their edges (values near the bin
centres), so every factor is determined by the image, yet none is needed by
the shape task.  Nuisances make the task non-trivial: the grey background has
a luminance close to the shape's (the shape stands out mostly by its chroma,
so early features must see colour), a brightness gradient and a sinusoidal
texture; ``clutter`` grey discs and strokes; Gaussian pixel noise (``noise``).

Training on the shape label with plain cross-entropy makes the penultimate
features increasingly invariant to the factors: source accuracy rises while
downstream linear probes, after an early peak, keep falling, the
discriminability-transferability trade-off of Kornblith et al. (2021) and Cui
et al. (2022) on two CPU cores in minutes.  Measured with ``small_cnn``
(width 32), 6000 training images, SGD (momentum 0.9, lr 0.05, cosine, batch
128, weight decay 5e-4, random 2 px shifts), logistic-regression probes on
standardised penultimate features (test accuracy, chance 0.17 / 0.11):
shape accuracy 0.17 -> 0.41 (epoch 6) -> 0.83 (epoch 18) -> 0.88 (epoch 30);
colour probe 0.84 (epoch 3) -> 0.38 (6) -> 0.26 (12) -> 0.21 (30); position
probe 0.58 (epoch 3) -> 0.50 (9) -> 0.34 (15) -> 0.37 (30).  The size and
orientation probes rise instead (shape features carry them).

Rendering is vectorised numpy: every shape is a signed distance function of
rotated, scaled pixel coordinates, anti-aliased by clipping the distance in
pixel units, so generating the default 8000 images at 32 px takes about two
seconds of CPU time.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from dtprobe.data.base import DatasetBundle, check_int, check_noise, normalised_splits
from dtprobe.data.registry import register_dataset
from dtprobe.errors import DatasetError
from dtprobe.references import with_references

__doc__ = with_references(__doc__, "kornblith2021", "cui2022")

__all__ = ["SHAPE_NAMES", "SHAPES_PRESETS", "load_shapes", "render_shapes"]

Array = np.ndarray


# ----------------------------------------------------------------------------------------------
# Signed distance functions in shape-local coordinates (u, v); negative inside, unit ~ radius.
# ----------------------------------------------------------------------------------------------

def _box(u: Array, v: Array, cu: float, cv: float, hu: float, hv: float) -> Array:
    """Chebyshev distance to an axis-aligned box centred at (cu, cv) with half sides (hu, hv)."""
    return np.maximum(np.abs(u - cu) - hu, np.abs(v - cv) - hv)


def _polygon(u: Array, v: Array, sides: int, apothem: float) -> Array:
    """Regular polygon with one vertex pointing along +v."""
    d = np.full(u.shape, -np.inf, dtype=u.dtype)
    for k in range(sides):
        a = math.pi / 2 + math.pi / sides + 2 * math.pi * k / sides
        d = np.maximum(d, u * math.cos(a) + v * math.sin(a))
    return d - apothem


def _sdf_square(u: Array, v: Array) -> Array:
    return _box(u, v, 0.0, 0.0, 0.72, 0.72)


def _sdf_triangle(u: Array, v: Array) -> Array:
    return _polygon(u, v, 3, 0.55)


def _sdf_cross(u: Array, v: Array) -> Array:
    return np.minimum(_box(u, v, 0.0, 0.0, 0.9, 0.3), _box(u, v, 0.0, 0.0, 0.3, 0.9))


def _sdf_star(u: Array, v: Array) -> Array:
    rho = np.hypot(u, v)
    frac = np.mod(np.arctan2(u, v) * (5 / (2 * math.pi)), 1.0)
    tip = 2 * np.abs(frac - 0.5)  # 1 at the five tips, 0 between them
    return rho - (0.45 + 0.6 * tip)


def _sdf_ring(u: Array, v: Array) -> Array:
    """An open ring ("C"): the gap breaks the circle's symmetry, so its orientation is visible."""
    ring = np.abs(np.hypot(u, v) - 0.7) - 0.27
    slot = np.maximum(np.abs(v) - 0.3, -u)
    return np.maximum(ring, -slot)


def _sdf_halfdisc(u: Array, v: Array) -> Array:
    w = v + 0.4
    return np.maximum(np.hypot(u, w) - 1.0, -w)


def _sdf_ell(u: Array, v: Array) -> Array:
    return np.minimum(_box(u, v, -0.45, 0.0, 0.28, 0.85), _box(u, v, 0.0, -0.57, 0.73, 0.28))


def _sdf_hexagon(u: Array, v: Array) -> Array:
    return _polygon(u, v, 6, 0.78)


@dataclass(frozen=True)
class _Shape:
    name: str
    sdf: Callable[[Array, Array], Array]
    period: float  # smallest rotation (degrees) mapping the shape onto itself


_SHAPES: tuple[_Shape, ...] = (
    _Shape("square", _sdf_square, 90.0),
    _Shape("triangle", _sdf_triangle, 120.0),
    _Shape("cross", _sdf_cross, 90.0),
    _Shape("star", _sdf_star, 72.0),
    _Shape("ring", _sdf_ring, 360.0),
    _Shape("halfdisc", _sdf_halfdisc, 360.0),
    _Shape("ell", _sdf_ell, 360.0),
    _Shape("hexagon", _sdf_hexagon, 60.0),
)

SHAPE_NAMES: tuple[str, ...] = tuple(s.name for s in _SHAPES)
"""All renderable shapes in label order; ``n_shapes`` takes the first ``n_shapes``."""

SHAPES_PRESETS: dict[str, dict[str, Any]] = {
    "default": {"n_train": 6000, "n_test": 2000, "image_size": 32},
    "fast": {"n_train": 600, "n_test": 200, "image_size": 16},
}
"""Named size presets; explicit keyword arguments override them."""

_RADIUS_RANGE = (0.12, 0.28)  # shape radius as a fraction of the image side
_CENTRE_MARGIN = 0.18  # centres lie in [margin, 1 - margin] of the image side
_LUMA_CONTRAST = 0.2  # grey background level = shape luminance +- up to this


# ----------------------------------------------------------------------------------------------
# Rendering
# ----------------------------------------------------------------------------------------------

def _hsv_to_rgb(h: Array, s: Array, v: Array) -> Array:
    """Vectorised HSV -> RGB for arrays of shape ``(n,)`` in [0, 1]; returns ``(n, 3)``."""
    h6 = np.mod(h, 1.0) * 6.0
    k = np.stack([np.mod(5 + h6, 6), np.mod(3 + h6, 6), np.mod(1 + h6, 6)], axis=1)
    ramp = np.clip(np.minimum(k, 4 - k), 0.0, 1.0)
    return (v[:, None] * (1 - s[:, None] * ramp)).astype(np.float32)


def _binned(rng: np.random.Generator, index: Array, n_bins: int, jitter: float) -> Array:
    """A value in [0, 1) near the centre of bin ``index`` (at most ``jitter`` bin widths off)."""
    return (index + 0.5 + rng.uniform(-jitter, jitter, size=index.shape)) / n_bins


def _balanced(rng: np.random.Generator, n: int, k: int) -> Array:
    """``n`` labels in ``range(k)``, as equal in count as possible, in random order."""
    return rng.permutation(np.arange(n) % k).astype(np.int64)


def _balanced_within(rng: np.random.Generator, groups: Array, k: int) -> Array:
    """Labels in ``range(k)``, balanced (to within one) inside every group, in random order."""
    out = np.empty(groups.shape, dtype=np.int64)
    for g in np.unique(groups):
        idx = np.flatnonzero(groups == g)
        out[idx] = rng.permutation((np.arange(idx.size) + rng.integers(k)) % k)
    return out


def _coverage(d_pixels: Array) -> Array:
    """Anti-aliased coverage in [0, 1] from a signed distance in pixels."""
    return np.clip(0.5 - d_pixels, 0.0, 1.0)


def _paint(canvas: Array, alpha: Array, rgb: Array) -> None:
    """Alpha-blend per-image colours ``rgb (n, 3)`` into ``canvas (n, 3, S, S)`` in place."""
    a = alpha[:, None]
    canvas *= 1 - a
    canvas += a * rgb[:, :, None, None]


def render_shapes(
    n: int,
    *,
    rng: np.random.Generator,
    image_size: int = 32,
    n_shapes: int = 6,
    n_colours: int = 6,
    position_grid: int = 3,
    n_sizes: int = 3,
    n_orientations: int = 4,
    noise: float = 0.2,
    clutter: int = 3,
    chunk: int = 1024,
    return_masks: bool = False,
) -> tuple[Array, Array, dict[str, Array]] | tuple[Array, Array, dict[str, Array], Array]:
    """Render ``n`` shape images with numpy.

    Parameters
    ----------
    n : number of images.
    rng : the random generator (all randomness comes from it, so a seeded generator gives
        identical output).
    image_size : side of the square images in pixels.
    n_shapes : number of source classes (the first ``n_shapes`` of :data:`SHAPE_NAMES`).
    n_colours, position_grid, n_sizes, n_orientations : number of classes of the downstream
        factors (``position`` has ``position_grid ** 2`` classes).
    noise : standard deviation of the additive Gaussian pixel noise (intensities in [0, 1]).
    clutter : number of grey distractor discs and strokes painted behind the shape.
    chunk : images rendered per vectorised batch (bounds temporary memory).
    return_masks : also return the shape's anti-aliased coverage ``(n, image_size, image_size)``
        in [0, 1] (the shape is painted last, over the clutter), e.g. for checks or segmentation.

    Returns
    -------
    images : ``(n, 3, image_size, image_size)`` float32 in [0, 1].
    labels : ``(n,)`` int64 shape index.
    factors : ``colour``, ``position``, ``size``, ``orientation``, each ``(n,)`` int64.
    masks : only with ``return_masks``.
    """
    S = image_size
    labels = _balanced(rng, n, n_shapes)
    factors = {
        "colour": _balanced_within(rng, labels, n_colours),
        "position": _balanced_within(rng, labels, position_grid**2),
        "size": _balanced_within(rng, labels, n_sizes),
        "orientation": _balanced_within(rng, labels, n_orientations),
    }
    # Continuous parameters, each near the centre of its factor's bin.
    hue = _binned(rng, factors["colour"], n_colours, 0.3)
    sat = rng.uniform(0.6, 1.0, n)
    val = rng.uniform(0.5, 1.0, n)
    fg = _hsv_to_rgb(hue, sat, val)
    row, col = np.divmod(factors["position"], position_grid)
    span = 1.0 - 2 * _CENTRE_MARGIN
    cx = _CENTRE_MARGIN + span * _binned(rng, col, position_grid, 0.35)
    cy = _CENTRE_MARGIN + span * _binned(rng, row, position_grid, 0.35)
    lo, hi = _RADIUS_RANGE
    radius = lo + (hi - lo) * _binned(rng, factors["size"], n_sizes, 0.3)
    period = np.array([s.period for s in _SHAPES[:n_shapes]])[labels]
    theta = np.deg2rad(period * _binned(rng, factors["orientation"], n_orientations, 0.35))

    # Grey background close to the shape's luminance: the shape differs from it mostly in
    # chroma, so the network must see colour to find the shape, yet the hue itself is useless.
    # A linear brightness gradient and a low-frequency sinusoidal texture; grey clutter.
    luminance = fg @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    level = np.clip(luminance + rng.uniform(-_LUMA_CONTRAST, _LUMA_CONTRAST, n), 0.05, 0.95)
    bg = np.repeat(level[:, None], 3, axis=1).astype(np.float32)
    grad = np.repeat(rng.uniform(-0.15, 0.15, (n, 1, 2)), 3, axis=1).astype(np.float32)
    tex_freq = rng.uniform(1.0, 4.0, (n, 2)) * 2 * np.pi
    tex_phase = rng.uniform(0, 2 * np.pi, n)
    tex_amp = rng.uniform(0.0, 0.1, n)
    clut_kind = rng.integers(0, 2, (n, clutter))  # 0 disc, 1 stroke
    clut_xy = rng.uniform(0.05, 0.95, (n, clutter, 2))
    clut_r = rng.uniform(0.03, 0.06, (n, clutter))
    clut_len = rng.uniform(0.12, 0.3, (n, clutter))
    clut_ang = rng.uniform(0, np.pi, (n, clutter))
    clut_rgb = np.repeat(rng.uniform(0.1, 0.9, (n, clutter, 1)), 3, axis=2).astype(np.float32)

    f32 = np.float32
    cx, cy, radius, theta = cx.astype(f32), cy.astype(f32), radius.astype(f32), theta.astype(f32)
    tex_freq, tex_phase, tex_amp = tex_freq.astype(f32), tex_phase.astype(f32), tex_amp.astype(f32)
    clut_xy, clut_r = clut_xy.astype(f32), clut_r.astype(f32)
    clut_len, clut_ang = clut_len.astype(f32), clut_ang.astype(f32)

    grid = (np.arange(S, dtype=np.float32) + 0.5) / S
    gy, gx = np.meshgrid(grid, grid, indexing="ij")  # (S, S): row = y, column = x
    images = np.empty((n, 3, S, S), dtype=np.float32)
    masks = np.empty((n, S, S), dtype=np.float32) if return_masks else None
    for start in range(0, n, chunk):
        sl = slice(start, min(start + chunk, n))
        m = sl.stop - sl.start
        dx = gx[None] - 0.5
        dy = gy[None] - 0.5
        canvas = (bg[sl, :, None, None] + grad[sl, :, 0, None, None] * dx[:, None]
                  + grad[sl, :, 1, None, None] * dy[:, None])
        tex = np.sin(tex_freq[sl, 0, None, None] * gx[None] + tex_freq[sl, 1, None, None] * gy[None]
                     + tex_phase[sl, None, None])
        canvas = canvas + (tex_amp[sl, None, None] * tex)[:, None]

        for j in range(clutter):
            px = gx[None] - clut_xy[sl, j, 0, None, None]
            py = gy[None] - clut_xy[sl, j, 1, None, None]
            disc = np.hypot(px, py) - clut_r[sl, j, None, None]
            # Stroke: a capsule of half-width r/2 along a segment through the centre.
            c, s = np.cos(clut_ang[sl, j])[:, None, None], np.sin(clut_ang[sl, j])[:, None, None]
            along = np.clip(px * c + py * s, -clut_len[sl, j, None, None] / 2,
                            clut_len[sl, j, None, None] / 2)
            stroke = np.hypot(px - along * c, py - along * s) - clut_r[sl, j, None, None] / 2
            d = np.where(clut_kind[sl, j, None, None] == 0, disc, stroke)
            _paint(canvas, _coverage(d * S), clut_rgb[sl, j])

        # The shape: rotate and scale pixel coordinates into its local frame.
        px = gx[None] - cx[sl, None, None]
        py = gy[None] - cy[sl, None, None]
        c, s = np.cos(theta[sl])[:, None, None], np.sin(theta[sl])[:, None, None]
        r = radius[sl, None, None]
        u = (px * c + py * s) / r
        v = (-px * s + py * c) / r
        v = -v  # image rows grow downwards; make +v point up
        d = np.empty((m, S, S), dtype=np.float32)
        lab = labels[sl]
        for k in range(n_shapes):
            idx = np.flatnonzero(lab == k)
            if idx.size:
                d[idx] = _SHAPES[k].sdf(u[idx], v[idx])
        alpha = _coverage(d * r * S)
        _paint(canvas, alpha, fg[sl])
        if masks is not None:
            masks[sl] = alpha

        if noise > 0:
            canvas += np.float32(noise) * rng.standard_normal(canvas.shape, dtype=np.float32)
        images[sl] = np.clip(canvas, 0.0, 1.0)
    if masks is not None:
        return images, labels, factors, masks
    return images, labels, factors


# ----------------------------------------------------------------------------------------------
# Loader
# ----------------------------------------------------------------------------------------------

@register_dataset("shapes")
def load_shapes(
    n_train: int | None = None,
    n_test: int | None = None,
    image_size: int | None = None,
    seed: int = 0,
    n_shapes: int = 6,
    n_colours: int = 6,
    position_grid: int = 3,
    n_sizes: int = 3,
    n_orientations: int = 4,
    noise: float = 0.2,
    clutter: int = 3,
    preset: str = "default",
) -> DatasetBundle:
    """Build the seeded ``shapes`` dataset (source: shape; factors: colour, position, size,
    orientation).

    Parameters
    ----------
    n_train, n_test : split sizes (``None``: from ``preset``; default 6000 / 2000).
    image_size : image side in pixels (``None``: from ``preset``; default 32).
    seed : random seed; the same parameters always give identical tensors.  The train and test
        splits use independent streams derived from it, so changing ``n_test`` leaves the
        training images unchanged.
    n_shapes : source classes, 2..8, the first ``n_shapes`` of :data:`SHAPE_NAMES`.
    n_colours, position_grid, n_sizes, n_orientations : classes of the downstream factors
        (``position`` has ``position_grid ** 2``).
    noise : standard deviation of the Gaussian pixel noise on [0, 1] intensities.
    clutter : grey distractor discs/strokes per image.
    preset : ``"default"`` (6000 / 2000 images, 32 px) or ``"fast"`` (600 / 200, 16 px, for
        tests).  Explicit arguments override the preset.

    Returns
    -------
    DatasetBundle
        Images normalised with the training split's per-channel mean and std; ``params`` holds
        every resolved argument (no ``preset``), so ``load_dataset("shapes", **bundle.params)``
        rebuilds the identical bundle.

    Notes
    -----
    Every factor is sampled independently of the others and balanced within every shape
    class (each factor class occurs equally often, to within one image, for every shape): no
    factor is a function of the label, and the chance level of each probe is ``1 / classes``.
    Memory: ``(n_train + n_test) x 3 x image_size^2 x 4`` bytes (98 MB at the defaults).

    References
    ----------
    Kornblith et al., NeurIPS 2021; Cui et al., ECCV 2022 (the discriminability-transferability
    trade-off this dataset is built to show).
    """
    if preset not in SHAPES_PRESETS:
        raise DatasetError(f"shapes: unknown preset {preset!r}; choose one of "
                           f"{', '.join(SHAPES_PRESETS)}")
    base = SHAPES_PRESETS[preset]
    n_train = check_int("shapes", "n_train", base["n_train"] if n_train is None else n_train, 1)
    n_test = check_int("shapes", "n_test", base["n_test"] if n_test is None else n_test, 1)
    image_size = check_int("shapes", "image_size", base["image_size"] if image_size is None
                           else image_size, 8)
    seed = check_int("shapes", "seed", seed, 0)
    n_shapes = check_int("shapes", "n_shapes", n_shapes, 2)
    if n_shapes > len(_SHAPES):
        raise DatasetError(f"shapes: n_shapes={n_shapes} but only {len(_SHAPES)} shapes exist "
                           f"({', '.join(SHAPE_NAMES)})")
    n_colours = check_int("shapes", "n_colours", n_colours, 2)
    position_grid = check_int("shapes", "position_grid", position_grid, 2)
    n_sizes = check_int("shapes", "n_sizes", n_sizes, 2)
    n_orientations = check_int("shapes", "n_orientations", n_orientations, 2)
    clutter = check_int("shapes", "clutter", clutter, 0)
    noise = check_noise("shapes", noise)

    params: dict[str, Any] = dict(
        n_train=n_train, n_test=n_test, image_size=image_size, seed=seed, n_shapes=n_shapes,
        n_colours=n_colours, position_grid=position_grid, n_sizes=n_sizes,
        n_orientations=n_orientations, noise=noise, clutter=clutter)
    render_kw = {k: v for k, v in params.items() if k not in ("n_train", "n_test", "seed")}
    train_rng, test_rng = (np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(2))
    x_tr, y_tr, f_tr = render_shapes(n_train, rng=train_rng, **render_kw)
    x_te, y_te, f_te = render_shapes(n_test, rng=test_rng, **render_kw)

    train, test, mean, std = normalised_splits((x_tr, y_tr, f_tr), (x_te, y_te, f_te))

    return DatasetBundle(
        name="shapes",
        params=params,
        train=train,
        test=test,
        num_classes=n_shapes,
        factor_classes={"colour": n_colours, "position": position_grid**2, "size": n_sizes,
                        "orientation": n_orientations},
        class_names=list(SHAPE_NAMES[:n_shapes]),
        mean=mean,
        std=std,
    )
