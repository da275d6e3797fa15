"""Synthetic nuclei images written in DSB2018's own layout.

The project's embedded default data: a generator that needs no download and writes exactly what
the Kaggle 2018 Data Science Bowl ships (SPEC section 4)::

    <out>/<split>/<ImageId>/images/<ImageId>.png   8-bit RGBA
    <out>/<split>/<ImageId>/masks/<k>.png          8-bit grayscale, 0/255, one per nucleus
    <out>/<split>_labels.csv                       ImageId,EncodedPixels (one row per nucleus)

Images imitate the two families that dominate DSB2018: grayscale fluorescence (bright nuclei on
a dark, unevenly lit background, R = G = B) and H&E-like histology (hematoxylin-purple nuclei on
eosin-pink tissue, rendered through Beer-Lambert optical density). Nuclei are irregular
ellipses 6 to 38 px across, clustered and touching but never overlapping: they are rasterized
into one label image, so every pixel belongs to at most one nucleus, and each written mask is a
single 4-connected region of at least :data:`MIN_NUCLEUS_AREA` pixels. One image in each block
of :data:`EMPTY_BLOCK` consecutive indices, at a random position, has no nucleus and appears in
the CSV with the run ``1 1``, as in the real file.

This is version 1, kept byte for byte. Version 2 (:mod:`sharp_fpn.data.synthetic_v2`, chosen
with ``version=2`` in :func:`plan_images`, :func:`generate_image` and :func:`write_dataset`)
imitates DSB2018 more closely: denser, touching, more varied nuclei and three styles.

Everything is a function of ``(seed, index)`` through :class:`numpy.random.SeedSequence`, and PNGs
are written by OpenCV with fixed settings and no metadata, so the same seed gives the same bytes
whatever the number of worker processes.
"""
from __future__ import annotations

import hashlib
import multiprocessing
import os
import shutil
import tempfile
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Union

import cv2
import numpy as np
from scipy import ndimage
from tqdm import tqdm

from sharp_fpn.data import rle
from sharp_fpn.outdir import OutputConflict, OutputDir
from sharp_fpn.utils import worker_count, write_csv_atomic

TOOL = "make_synthetic_nuclei"
"""The writer's name in an output folder's record (:mod:`sharp_fpn.outdir`)."""

STYLES: tuple[str, ...] = ("fluorescence", "he")
"""Version 1's styles (version 2's: :data:`STYLES_V2`)."""
VERSIONS: tuple[int, ...] = (1, 2)
"""Generator versions: 1 this module's images, 2 :mod:`sharp_fpn.data.synthetic_v2`'s."""
FLUORESCENCE_FRACTION = 0.7
"""Share of fluorescence images when the style is not forced (the rest are H&E-like)."""

DSB2018_STAGE1_TRAIN_SIZES: dict[tuple[int, int], int] = {
    (256, 256): 334,
    (256, 320): 112,
    (520, 696): 92,
    (360, 360): 91,
    (1024, 1024): 16,
    (512, 640): 13,
    (603, 1272): 6,
    (260, 347): 5,
    (1040, 1388): 1,
}
"""(height, width) -> number of images in DSB2018 stage1_train (670 in all)."""

EMPTY_BLOCK = 20
"""One image in each block of this many consecutive indices has no nucleus (5%)."""
MIN_NUCLEUS_AREA = 20
"""Nuclei left with fewer pixels than this after occlusion and clipping are dropped."""
MIN_DIAMETER, MAX_DIAMETER = 6.0, 38.0
"""Bounds (px) on a nucleus' drawn major axis, so masks measure about 5 to 40 px across."""
MIN_SIDE = 16
"""Smallest accepted image height or width (px)."""
MAX_NUCLEI = 300
"""Cap on the nuclei drawn into one image (DSB2018's busiest image has a few hundred)."""
_IMAGE_PNG = [cv2.IMWRITE_PNG_COMPRESSION, 3]
# Masks are mostly zeros: unfiltered rows and zlib's run-length strategy write them ~5x faster
# than the default adaptive filters, and smaller. (IMWRITE_PNG_FILTER is OpenCV >= 4.10.)
_MASK_PNG = [
    cv2.IMWRITE_PNG_COMPRESSION, 1, cv2.IMWRITE_PNG_STRATEGY, cv2.IMWRITE_PNG_STRATEGY_RLE
]
if hasattr(cv2, "IMWRITE_PNG_FILTER"):
    _MASK_PNG += [cv2.IMWRITE_PNG_FILTER, cv2.IMWRITE_PNG_FILTER_NONE]

_ID_SALT = "sharp-fpn synthetic nuclei v1"
_PLAN_KEY, _IMAGE_KEY, _EMPTY_KEY = 0, 1, 2  # SeedSequence spawn keys: independent streams

# Beer-Lambert optical density per unit stain, RGB: the reference H&E stain vectors of
# Macenko et al. (2009), whose eosin gives tissue pink rather than the magenta of pure eosin.
_HEMATOXYLIN_OD = np.array([0.6500, 0.7040, 0.2860], dtype=np.float32)
_EOSIN_OD = np.array([0.2159, 0.8012, 0.5581], dtype=np.float32)


@dataclass(frozen=True)
class ImagePlan:
    """What one synthetic image will be: its index, DSB-like id, size, style, emptiness."""

    index: int
    image_id: str
    height: int
    width: int
    style: str
    empty: bool
    version: int = 1


def image_id(seed: int, index: int) -> str:
    """64-hex-character image id (like DSB2018's), a sha256 of the seed and the index."""
    return hashlib.sha256(f"{_ID_SALT}|seed={seed}|index={index}".encode()).hexdigest()


def parse_sizes(text: str) -> Optional[list[tuple[int, int]]]:
    """Parse ``"256x256,96x128"`` (height x width) into ``[(256, 256), (96, 128)]``.

    ``"default"`` returns None, meaning DSB2018's own size distribution
    (:data:`DSB2018_STAGE1_TRAIN_SIZES`). Raises ValueError naming the bad item.
    """
    if text.strip().lower() == "default":
        return None
    sizes = []
    for item in text.split(","):
        parts = item.strip().lower().split("x")
        if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
            raise ValueError(f"size {item.strip()!r} is not HEIGHTxWIDTH, e.g. 256x320")
        sizes.append((int(parts[0]), int(parts[1])))
    _check_sizes(sizes)
    return sizes


def _check_sizes(sizes: Sequence[tuple[int, int]]) -> None:
    if not sizes:
        raise ValueError("sizes is empty: give at least one HEIGHTxWIDTH, or None for DSB2018's")
    for h, w in sizes:
        if h < MIN_SIDE or w < MIN_SIDE:
            raise ValueError(f"size {h}x{w} is too small: height and width must be >= {MIN_SIDE}")


def plan_images(
    num_images: int,
    seed: int,
    sizes: Optional[Sequence[tuple[int, int]]] = None,
    style: Union[None, str, Sequence[str]] = None,
    version: int = 1,
) -> list[ImagePlan]:
    """Decide each image's size, style and emptiness; cheap, no pixels.

    Args:
        num_images: how many images (>= 1).
        seed: non-negative integer; image ``i`` depends only on ``(seed, i)``.
        sizes: (height, width) pairs drawn uniformly, or None for DSB2018's stage1_train
            distribution (:data:`DSB2018_STAGE1_TRAIN_SIZES`, weighted by count).
        style: ``"fluorescence"`` or ``"he"`` to force one style, None for the 70/30 mix.
            Version 2: None (its mix), one of :data:`STYLES_V2`, or a tuple of them (a uniform
            mix of those).
        version: 1 (this module's images) or 2 (:mod:`sharp_fpn.data.synthetic_v2`).
    """
    _check_version(version)
    if version == 2:
        from . import synthetic_v2

        return synthetic_v2.plan_images(num_images, seed, sizes, style)
    if num_images < 1:
        raise ValueError(f"num_images must be >= 1, got {num_images}")
    if seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed}")
    if style is not None and style not in STYLES:
        raise ValueError(f"style {style!r} is not one of {STYLES} (or None for the mix)")
    choices, weights = size_choices(sizes)
    empty = empty_indices(num_images, seed, _EMPTY_KEY)
    plans = []
    for i in range(num_images):
        rng = _rng(seed, _PLAN_KEY, i)
        h, w = choices[int(rng.choice(len(choices), p=weights))]
        fluo = rng.random() < FLUORESCENCE_FRACTION
        plans.append(
            ImagePlan(
                index=i,
                image_id=image_id(seed, i),
                height=h,
                width=w,
                style=style or ("fluorescence" if fluo else "he"),
                empty=i in empty,
            )
        )
    return plans


def _check_version(version: int) -> None:
    if version not in VERSIONS:
        raise ValueError(f"version {version!r} is not one of {VERSIONS}")


def size_choices(
    sizes: Optional[Sequence[tuple[int, int]]],
) -> tuple[list[tuple[int, int]], np.ndarray]:
    """The (height, width) choices and their probabilities: ``sizes`` uniformly, or DSB2018's
    stage1_train distribution for None."""
    if sizes is None:
        choices = list(DSB2018_STAGE1_TRAIN_SIZES)
        weights = np.array(list(DSB2018_STAGE1_TRAIN_SIZES.values()), dtype=np.float64)
    else:
        _check_sizes(sizes)
        choices = [(int(h), int(w)) for h, w in sizes]
        weights = np.ones(len(choices))
    return choices, weights / weights.sum()


def empty_indices(num_images: int, seed: int, stream: int) -> set[int]:
    """One index per block of :data:`EMPTY_BLOCK`, at a position drawn from ``stream``."""
    n_blocks = -(-num_images // EMPTY_BLOCK)
    return {
        b * EMPTY_BLOCK + int(_rng(seed, stream, b).integers(EMPTY_BLOCK))
        for b in range(n_blocks)
    }


def _rng(seed: int, stream: int, index: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(stream, index)))


# --------------------------------------------------------------------------------------------
# Layout: where the nuclei are


def _nucleus_outline(rng: np.random.Generator, diameter: float) -> np.ndarray:
    """Vertices (N, 2) as (x, y) offsets of an irregular ellipse of major axis ``diameter``.

    Polar radius of a randomly oriented ellipse (axis ratio 0.55..1), perturbed by a few low
    harmonics, then scaled so no vertex lies beyond ``diameter / 2`` of the centre.
    """
    a = diameter / 2.0
    b = max(a * rng.uniform(0.55, 1.0), min(a, 2.8))  # small nuclei stay roundish
    n = max(16, int(2.0 * np.pi * a))
    t = np.linspace(0.0, 2.0 * np.pi, n, endpoint=False)
    r = a * b / np.sqrt((b * np.cos(t)) ** 2 + (a * np.sin(t)) ** 2)
    amplitude = rng.uniform(0.02, 0.10)
    for k in range(2, 6):
        r *= 1.0 + amplitude / (k - 1) * np.cos(k * t + rng.uniform(0.0, 2.0 * np.pi))
    r *= a / r.max()
    angle = t + rng.uniform(0.0, np.pi)
    return np.stack([r * np.cos(angle), r * np.sin(angle)], axis=1)


def _rasterize(outline: np.ndarray, cy: float, cx: float) -> tuple[np.ndarray, int, int]:
    """Fill ``outline`` centred at (cy, cx); returns (bool patch, patch top row, left column)."""
    half = int(np.ceil(np.abs(outline).max())) + 2
    top, left = int(np.floor(cy)) - half, int(np.floor(cx)) - half
    patch = np.zeros((2 * half + 1, 2 * half + 1), dtype=np.uint8)
    shift = 4  # sub-pixel vertex precision: coordinates in 1/16 px
    pts = (outline + [cx - left, cy - top]) * (1 << shift)
    cv2.fillPoly(patch, [np.rint(pts).astype(np.int32)], 1, lineType=cv2.LINE_8, shift=shift)
    return patch.astype(bool), top, left


def _place(
    outline: np.ndarray, cy: float, cx: float, labels: np.ndarray
) -> Optional[tuple[np.ndarray, np.ndarray]]:
    """``outline`` filled at (cy, cx) and clipped to ``labels``: (the view of ``labels`` under
    it, the bool patch over that view), or None when it lies wholly outside."""
    patch, top, left = _rasterize(outline, cy, cx)
    height, width = labels.shape
    y0, x0 = max(top, 0), max(left, 0)
    y1, x1 = min(top + patch.shape[0], height), min(left + patch.shape[1], width)
    if y0 >= y1 or x0 >= x1:
        return None
    return labels[y0:y1, x0:x1], patch[y0 - top : y1 - top, x0 - left : x1 - left]


def _layout(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """Label image (H, W) int32: 0 background, 1..K nuclei, each one 4-connected region.

    Nuclei are drawn around random cluster centres (and some anywhere). Each new nucleus goes
    behind those already placed and keeps only the free pixels; it is kept when at most a fifth
    of it is hidden, what remains is one 4-connected region of at least
    :data:`MIN_NUCLEUS_AREA` pixels (after clipping at the image border too), so neighbours
    touch along the occlusion line and placed nuclei are never altered.
    """
    max_d = min(MAX_DIAMETER, min(height, width) - 4.0)
    typical = float(np.exp(rng.uniform(np.log(11.0), np.log(32.0))))
    coverage = float(np.exp(rng.uniform(np.log(0.02), np.log(0.2))))
    mean_area = np.pi / 4.0 * typical**2 * 0.8
    n_target = int(np.clip(round(coverage * height * width / mean_area), 1, MAX_NUCLEI))
    n_clusters = max(1, round(n_target / rng.uniform(4.0, 15.0)))
    centres = rng.uniform([0.0, 0.0], [height, width], size=(n_clusters, 2))
    spreads = typical * rng.uniform(0.8, 2.5, size=n_clusters)
    clustered = rng.uniform(0.3, 0.95)

    labels = np.zeros((height, width), dtype=np.int32)
    placed = 0
    for attempt in range(4 * n_target):
        if placed == n_target:
            break
        d = float(np.clip(typical * np.exp(rng.normal(0.0, 0.2)), MIN_DIAMETER, max_d))
        outline = _nucleus_outline(rng, d)
        if placed == 0:  # the first one lies wholly inside the image
            cy = rng.uniform(d / 2 + 1, height - d / 2 - 1)
            cx = rng.uniform(d / 2 + 1, width - d / 2 - 1)
        elif rng.random() < clustered:
            k = int(rng.integers(n_clusters))
            cy, cx = centres[k] + rng.normal(0.0, spreads[k], size=2)
        else:
            cy, cx = rng.uniform(0.0, height), rng.uniform(0.0, width)
        placed_here = _place(outline, cy, cx, labels)
        if placed_here is None:
            continue
        window, whole = placed_here
        free = whole & (window == 0)
        area = int(free.sum())
        if area < MIN_NUCLEUS_AREA or area < 0.8 * whole.sum():
            continue
        if cv2.connectedComponents(free.astype(np.uint8), connectivity=4)[0] != 2:
            continue  # background + exactly one piece
        placed += 1
        window[free] = placed
    return labels


# --------------------------------------------------------------------------------------------
# Rendering: what the microscope sees


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], sigma: float) -> np.ndarray:
    """Gaussian-filtered white noise (float32), rescaled to zero mean and unit variance."""
    noise = rng.standard_normal(shape, dtype=np.float32)
    noise = cv2.GaussianBlur(noise, (0, 0), sigmaX=sigma, borderType=cv2.BORDER_REFLECT)
    return (noise - noise.mean()) / max(float(noise.std()), 1e-6)


def _illumination(rng: np.random.Generator, shape: tuple[int, int], strength: float) -> np.ndarray:
    """Smooth multiplicative field around 1: a linear ramp plus a bicubic coarse-grid bump."""
    h, w = shape
    yy = np.linspace(-0.5, 0.5, h, dtype=np.float32)[:, None]
    xx = np.linspace(-0.5, 0.5, w, dtype=np.float32)[None, :]
    angle = rng.uniform(0.0, 2.0 * np.pi)
    ramp = np.cos(angle) * xx + np.sin(angle) * yy
    grid = rng.standard_normal((3, 3)).astype(np.float32)
    bump = cv2.resize(grid, (w, h), interpolation=cv2.INTER_CUBIC) / 3.0
    return np.clip(1.0 + strength * (ramp + bump), 0.2, None)


def _blur_small(image: np.ndarray, sigma: float) -> np.ndarray:
    """Large-sigma Gaussian blur done at reduced resolution (cheap halos and haze)."""
    h, w = image.shape[:2]
    factor = max(1, int(sigma // 4))
    small_size = (max(1, w // factor), max(1, h // factor))
    small = cv2.resize(image, small_size, interpolation=cv2.INTER_AREA)
    small = cv2.GaussianBlur(small, (0, 0), sigmaX=sigma / factor, borderType=cv2.BORDER_REFLECT)
    return cv2.resize(small, (w, h), interpolation=cv2.INTER_LINEAR)


def _nucleus_fields(
    rng: np.random.Generator, labels: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """Per-pixel nucleus quantities shared by both styles.

    Returns (edge, texture, amount, size): ``edge`` in [0, 1] rises from 0 at a nucleus' border
    (against background or a neighbour) to 1 inside; ``texture`` is chromatin-like noise (fine
    grain, coarse mottling and bright chromocentres, about unit scale); ``amount`` is each
    nucleus' random stain/dye load painted over its pixels (0 on background); ``size`` is the
    mean nucleus diameter (px), 10 when there is none.
    """
    shape = labels.shape
    fg = labels > 0
    count = int(labels.max())
    padded = np.pad(labels, 1, mode="edge")
    border = fg & (
        (padded[:-2, 1:-1] != labels)
        | (padded[2:, 1:-1] != labels)
        | (padded[1:-1, :-2] != labels)
        | (padded[1:-1, 2:] != labels)
    )
    size = float(2.0 * np.sqrt(np.count_nonzero(fg) / max(count, 1) / np.pi)) if count else 10.0
    inside = (fg & ~border).astype(np.uint8)
    dist = cv2.distanceTransform(inside, cv2.DIST_L2, 3)
    edge = np.clip((dist + 1.0) / (0.25 * size + 1.0), 0.0, 1.0).astype(np.float32)

    fine = _smooth_noise(rng, shape, rng.uniform(0.7, 1.5))
    coarse = _smooth_noise(rng, shape, max(1.5, 0.2 * size))
    spots = (rng.random(shape, dtype=np.float32) < rng.uniform(0.003, 0.02)).astype(np.float32)
    spots = cv2.GaussianBlur(spots, (0, 0), sigmaX=1.2) * 2.0 * np.pi * 1.2**2
    texture = (
        rng.uniform(0.05, 0.2) * fine
        + rng.uniform(0.05, 0.2) * coarse
        + rng.uniform(0.0, 0.5) * spots
    )
    loads = np.concatenate(([0.0], rng.lognormal(0.0, 0.3, size=count))).astype(np.float32)
    return edge, texture, loads[labels], size


def _render_fluorescence(rng: np.random.Generator, labels: np.ndarray) -> np.ndarray:
    """Grayscale fluorescence image (H, W) uint8: bright nuclei on a dark uneven background."""
    shape = labels.shape
    edge, texture, amount, size = _nucleus_fields(rng, labels)
    signal = amount * (0.35 + 0.65 * edge) * np.clip(1.0 + texture, 0.2, None)
    fg = (labels > 0).astype(np.float32)
    haze = rng.uniform(0.0, 0.12) * _blur_small(fg, 0.6 * size)  # out-of-focus / cytoplasm glow
    peak = rng.uniform(0.2, 0.95)  # display level of a typical nucleus: many DSB images are dim
    background = rng.uniform(0.0, 0.08)
    light = _illumination(rng, shape, rng.uniform(0.2, 0.8))
    image = (peak * (signal + haze) + background) * light
    image = cv2.GaussianBlur(image, (0, 0), sigmaX=rng.uniform(0.6, 1.6))
    photons = float(np.exp(rng.uniform(np.log(80.0), np.log(3000.0))))  # per full-scale level
    image = rng.poisson(np.clip(image, 0.0, None) * photons).astype(np.float32) / photons
    image += rng.normal(0.0, rng.uniform(0.002, 0.01), size=shape).astype(np.float32)
    return np.clip(np.rint(image * 255.0), 0, 255).astype(np.uint8)


def _render_he(rng: np.random.Generator, labels: np.ndarray) -> np.ndarray:
    """H&E-like RGB image (H, W, 3) uint8: purple nuclei in pink tissue, by optical density."""
    shape = labels.shape
    edge, texture, amount, size = _nucleus_fields(rng, labels)
    fg = (labels > 0).astype(np.float32)

    fibres = cv2.GaussianBlur(
        rng.standard_normal(shape, dtype=np.float32),
        (0, 0),
        sigmaX=rng.uniform(1.0, 3.0),
        sigmaY=rng.uniform(1.0, 3.0),
    )
    fibres /= max(float(fibres.std()), 1e-6)
    lumen = _smooth_noise(rng, shape, rng.uniform(10.0, 30.0))
    open_space = np.clip((lumen - rng.uniform(0.8, 2.5)) * 2.0, 0.0, 1.0)  # pale gaps in tissue
    eosin = rng.uniform(0.12, 0.4) * np.clip(1.0 + 0.2 * fibres, 0.3, None)
    eosin = eosin * (1.0 - 0.85 * open_space) + rng.uniform(0.0, 0.25) * _blur_small(fg, 0.7 * size)

    rim = 1.0 - edge  # nuclear membrane and peripheral chromatin stain darker
    hema = rng.uniform(0.45, 1.1) * amount * (0.85 + 0.35 * rim) * np.clip(1.0 + texture, 0.3, None)
    hema = hema + rng.uniform(0.0, 0.06) * (1.0 - open_space)  # faint counterstain everywhere

    od = hema[..., None] * _HEMATOXYLIN_OD + eosin[..., None] * _EOSIN_OD
    white = rng.uniform(225.0, 250.0) + rng.uniform(-6.0, 6.0, size=3)
    rgb = white.astype(np.float32) * np.power(np.float32(10.0), -od)
    rgb *= _illumination(rng, shape, rng.uniform(0.05, 0.2))[..., None]
    rgb = cv2.GaussianBlur(rgb, (0, 0), sigmaX=rng.uniform(0.5, 1.2))
    rgb += rng.normal(0.0, rng.uniform(1.5, 5.0), size=rgb.shape).astype(np.float32)
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)


def generate_image(
    rng: np.random.Generator, height: int, width: int, style: str, empty: bool = False,
    version: int = 1,
) -> tuple[np.ndarray, np.ndarray]:
    """Draw one synthetic microscopy image and its nuclei.

    Args:
        rng: the only source of randomness.
        height, width: image size in pixels (each >= :data:`MIN_SIDE`).
        style: ``"fluorescence"`` (gray, bright on dark) or ``"he"`` (H&E-like colour).
        empty: draw no nucleus (background only).
        version: 1, or 2 for :func:`sharp_fpn.data.synthetic_v2.generate_image` (styles
            :data:`STYLES_V2`; a 16-bit fluorescence frame comes back as (H, W) uint16 gray).

    Returns:
        ``rgba``: (H, W, 4) uint8, alpha 255 everywhere, R = G = B for fluorescence;
        ``labels``: (H, W) int32, 0 background and 1..K the nuclei (``labels == k`` is nucleus
        k's mask: one 4-connected region of at least :data:`MIN_NUCLEUS_AREA` pixels; K >= 1
        unless ``empty``).
    """
    _check_version(version)
    if version == 2:
        from . import synthetic_v2

        return synthetic_v2.generate_image(rng, height, width, style, empty)
    if style not in STYLES:
        raise ValueError(f"style {style!r} is not one of {STYLES}")
    _check_sizes([(height, width)])
    if empty:
        labels = np.zeros((height, width), dtype=np.int32)
    else:
        labels = _layout(rng, height, width)
    rgba = np.empty((height, width, 4), dtype=np.uint8)
    if style == "fluorescence":
        rgba[..., :3] = _render_fluorescence(rng, labels)[..., None]
    else:
        rgba[..., :3] = _render_he(rng, labels)
    rgba[..., 3] = 255
    return rgba, labels


# --------------------------------------------------------------------------------------------
# Writing: DSB2018's layout


def _write_png(path: Path, image: np.ndarray, params: list[int]) -> None:
    """Write a gray (H, W, 8- or 16-bit) or RGBA (H, W, 4) PNG with fixed OpenCV ``params``.

    OpenCV writes no timestamp or other metadata, so equal pixels give equal bytes.
    """
    if image.ndim == 3:
        image = cv2.cvtColor(image, cv2.COLOR_RGBA2BGRA)  # OpenCV stores channels as BGRA
    ok, data = cv2.imencode(".png", image, params)
    if not ok:
        raise OSError(f"could not encode {path} as PNG")
    path.write_bytes(data.tobytes())


def _encode_within_columns(mask: np.ndarray, x0: int, x1: int) -> str:
    """``rle.encode(mask)`` for a mask that is empty outside columns ``x0:x1``, in less time.

    Column-major, the full-height strip ``mask[:, x0:x1]`` is one contiguous stretch of the
    image's pixels starting at ``x0 * H``, so its runs are the image's runs shifted by that.
    """
    runs = np.array(rle.encode(mask[:, x0:x1]).split(), dtype=np.int64)
    runs[0::2] += x0 * mask.shape[0]
    return " ".join(map(str, runs.tolist()))


def _image_rng(seed: int, plan: ImagePlan) -> np.random.Generator:
    if plan.version == 2:
        from . import synthetic_v2

        return _rng(seed, synthetic_v2._IMAGE_KEY, plan.index)
    return _rng(seed, _IMAGE_KEY, plan.index)


def _make_image(plan: ImagePlan, seed: int, split_dir: Path) -> tuple[int, list[str]]:
    """Generate and write one image folder; returns (index, run-length string per nucleus)."""
    rgba, labels = generate_image(
        _image_rng(seed, plan), plan.height, plan.width, plan.style, plan.empty, plan.version
    )
    folder = split_dir / plan.image_id
    (folder / "images").mkdir(parents=True)
    (folder / "masks").mkdir()
    _write_png(folder / "images" / f"{plan.image_id}.png", rgba, _IMAGE_PNG)
    runs = []
    mask = np.zeros(labels.shape, dtype=np.uint8)
    for k, box in enumerate(ndimage.find_objects(labels), start=1):
        mask[box][labels[box] == k] = 255
        _write_png(folder / "masks" / f"{k}.png", mask, _MASK_PNG)
        runs.append(_encode_within_columns(mask, box[1].start, box[1].stop))
        mask[box] = 0
    return plan.index, runs


def write_dataset(
    out_dir: str | os.PathLike,
    num_images: int,
    seed: int,
    split: str = "stage1_train",
    sizes: Optional[Sequence[tuple[int, int]]] = None,
    style: Union[None, str, Sequence[str]] = None,
    workers: Optional[int] = None,
    overwrite: bool = False,
    progress: bool = True,
    own_folder: bool = False,
    version: int = 1,
) -> list[str]:
    """Write ``num_images`` synthetic images in DSB2018's layout; returns their ids by index.

    Writes ``out_dir/<split>/<id>/images/<id>.png``, ``out_dir/<split>/<id>/masks/<k>.png``
    (k = 1..K) and ``out_dir/<split>_labels.csv`` (rows sorted by ImageId, then k; an image
    without nuclei gets the single run ``1 1``). Everything is first written into a temporary
    folder inside ``out_dir`` and moved into place when complete.

    Outputs follow :mod:`sharp_fpn.outdir`: both go on ``out_dir``'s record as
    ``make_synthetic_nuclei``'s, a later run replaces them, and anything else in their way (a
    non-empty ``<split>`` folder or a ``<split>_labels.csv`` this writer did not make) is
    refused with :class:`~sharp_fpn.outdir.OutputConflict` unless ``overwrite``. The folder is
    locked while the run writes: a second run into it is refused while the first lives.

    Args:
        out_dir: dataset root (created if missing).
        num_images, seed, sizes, style, version: see :func:`plan_images`.
        split: folder and CSV name prefix, e.g. ``stage1_train``.
        workers: processes to use (:func:`~sharp_fpn.utils.worker_count`: None = every core
            this process may use; at most one per image). The output does not depend on it.
        overwrite: replace an existing ``<split>`` folder or ``<split>_labels.csv`` that
            this writer did not make (the tools' ``--overwrite``).
        progress: show a tqdm bar (when there are at least 20 images).
        own_folder: also refuse (unless ``overwrite``) an ``out_dir`` that holds files, hidden
            ones aside, when this writer has never written there: the tool's rule, so that a
            data set never lands among a user's own files.
    """
    if not split or split.startswith(".") or "/" in split or os.sep in split:
        raise ValueError(f"split {split!r} must be a plain folder name, e.g. stage1_train")
    plans = plan_images(num_images, seed, sizes, style, version)
    workers = min(worker_count(workers), num_images)  # plan_images checked num_images >= 1
    out = Path(out_dir)
    if own_folder and not overwrite:
        _check_own_folder(out, split)
    folder = OutputDir(out, TOOL, overwrite=overwrite)
    with folder.lock():
        return _write_locked(folder, plans, seed, split, workers, progress)


def _check_own_folder(out: Path, split: str) -> None:
    """Refuse an ``out`` holding visible files when this writer never wrote there."""
    if not out.is_dir():
        return  # missing (made), or a file (OutputDir says so)
    others = sorted(p.name for p in out.iterdir() if not p.name.startswith("."))
    mine = OutputDir(out, TOOL)
    if others and not any(mine.owns(name) for name in others):
        shown = ", ".join(others[:3]) + (", ..." if len(others) > 3 else "")
        raise OutputConflict(
            f"{out}: holds files that make_synthetic_nuclei did not write ({shown}); choose a "
            f"new or empty folder, or pass --overwrite to write {split}/ and {split}_labels.csv "
            "among them"
        )


def _write_locked(
    folder: OutputDir, plans: list[ImagePlan], seed: int, split: str, workers: int,
    progress: bool,
) -> list[str]:
    """:func:`write_dataset`'s work, with ``folder`` locked."""
    out, num_images = folder.folder, len(plans)
    target, csv_target = out / split, out / f"{split}_labels.csv"
    folder.check(csv_target.name)
    in_the_way = target.is_file() or target.is_symlink() or (
        target.is_dir() and any(target.iterdir()))
    if in_the_way and not folder.overwrite and not folder.owns(split):
        raise OutputConflict(
            f"{target}: exists and is not empty (not written by make_synthetic_nuclei); choose "
            "another --out or --split, or pass --overwrite to replace it"
        )

    staging = Path(tempfile.mkdtemp(prefix=f".{split}.partial-", dir=out))
    try:
        split_dir = staging / split
        split_dir.mkdir()
        runs: dict[int, list[str]] = {}
        bar = tqdm(
            total=num_images, unit="img", desc=split, disable=not progress or num_images < 20
        )
        if workers == 1:
            for plan in plans:
                index, image_runs = _make_image(plan, seed, split_dir)
                runs[index] = image_runs
                bar.update()
        else:
            # Forked workers inherit OpenCV's thread count: one thread each, so none touches the
            # parent's thread pool (whose threads do not exist after fork; calling
            # cv2.setNumThreads in a child can hang), and the processes share out the cores.
            threads = cv2.getNumThreads()
            cv2.setNumThreads(1)
            try:
                biggest_first = sorted(plans, key=lambda p: -p.height * p.width)
                fork = multiprocessing.get_context("fork")
                with ProcessPoolExecutor(workers, mp_context=fork) as pool:
                    futures = [pool.submit(_make_image, p, seed, split_dir) for p in biggest_first]
                    for future in as_completed(futures):
                        index, image_runs = future.result()
                        runs[index] = image_runs
                        bar.update()
            finally:
                cv2.setNumThreads(threads)
        bar.close()

        staged_csv = staging / csv_target.name
        write_csv_atomic(
            staged_csv,
            (
                (plan.image_id, run)
                for plan in sorted(plans, key=lambda p: p.image_id)
                for run in runs[plan.index] or [rle.EMPTY_IMAGE_RUN]
            ),
            ("ImageId", "EncodedPixels"),
        )

        if target.exists() or target.is_symlink():
            target.rename(staging / f"{split}.old")
        folder.claim(split)  # on record before it is there (its old self moved out of the way)
        split_dir.rename(target)
        folder.claim(csv_target.name)
        os.replace(staged_csv, csv_target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return [p.image_id for p in plans]


def __getattr__(name: str):
    """Version 2's public names, also reachable from here (imported on first use)."""
    if name in ("STYLES_V2", "describe", "contact_sheet"):
        from . import synthetic_v2

        return getattr(synthetic_v2, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
