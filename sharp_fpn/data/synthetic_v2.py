"""Synthetic nuclei, version 2: images meant to look like DSB2018's, in the same layout as v1.

:mod:`sharp_fpn.data.synthetic` (version 1) draws sparse, mostly separate nuclei of one size per
image. Version 2 adds what real DSB2018 images have and v1 lacks (issue 8):

* **layout**: sparse fields, clusters and dense monolayers; 5 to 40 % foreground, a fifth to
  two fifths of the nuclei touching a neighbour (shared boundaries, one label image, never an
  overlap); 1 to :data:`MAX_NUCLEI` nuclei; equivalent diameters of about 6 to 60 px whose
  median over a set is ~22 px, varying between images (magnification) as much as within one;
  a few small mitotic nuclei;
* **fluorescence** (gray): brightness varying ~10x within an image, saturated mitotic nuclei,
  dim and out-of-focus nuclei, chromatin texture, dark nucleoli, camera offset, Poisson and
  Gaussian noise, vignetting; about one image in :data:`SIXTEEN_BIT_EVERY` is a 16-bit camera
  frame (12- or 16-bit range, an offset of a few hundred counts), returned as (H, W) uint16;
* **he** (H&E histology): blue-purple textured nuclei, some vesicular (pale interior, dark rim,
  nucleolus), pink stroma with wavy fibres, white lumen, red blood cells (unlabelled), stain
  vectors varying between images, and a JPEG round trip for most images;
* **brightfield**: DSB's purple-on-white class: purple or dark nuclei on a near-white field
  with a faint cytoplasm and no stroma.

Everything is a function of ``(seed, index)`` (its own SeedSequence streams and id salt, so v2
ids never collide with v1's), and :func:`describe` measures a set's statistics.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Optional, Sequence, Union

import cv2
import numpy as np

from .synthetic import (
    DSB2018_STAGE1_TRAIN_SIZES,
    MIN_NUCLEUS_AREA,
    ImagePlan,
    _blur_small,
    _check_sizes,
    _illumination,
    _nucleus_fields,
    _nucleus_outline,
    _place,
    _rng,
    _smooth_noise,
    empty_indices,
    size_choices,
)

STYLES_V2: tuple[str, ...] = ("fluorescence", "he", "brightfield")
STYLE_MIX_V2: dict[str, float] = {"fluorescence": 0.55, "he": 0.30, "brightfield": 0.15}
"""Share of each style when the style is not forced (DSB2018 is mostly fluorescence)."""
SIXTEEN_BIT_EVERY = 4
"""About one fluorescence image in this many is a 16-bit camera frame."""
MAX_NUCLEI = 400
"""Cap on the nuclei of one image (DSB2018's busiest images hold a few hundred)."""
MIN_EQ_DIAMETER, MAX_EQ_DIAMETER = 6.0, 60.0
"""Targets (px) for the equivalent diameters of the nuclei."""
MEDIAN_EQ_DIAMETER = 29.5
"""Median, over images, of an image's typical equivalent diameter (px)."""

StyleArg = Union[None, str, Sequence[str]]

_ID_SALT = "sharp-fpn synthetic nuclei v2"
# SeedSequence spawn keys of v2's streams: distinct from v1's (0, 1, 2).
_PLAN_KEY, _IMAGE_KEY, _EMPTY_KEY, _SHEET_KEY = 10, 11, 12, 13
_MAJOR_PER_EQ = 1.0 / 0.88  # major axis / equivalent diameter of v1's irregular ellipses

# Optical densities (RGB, per unit stain). H&E: Macenko's reference vectors, jittered per image.
_HEMATOXYLIN_OD = np.array([0.6500, 0.7040, 0.2860], dtype=np.float32)
_EOSIN_OD = np.array([0.2159, 0.8012, 0.5581], dtype=np.float32)
_RBC_OD = np.array([0.07, 0.85, 0.62], dtype=np.float32)  # red cells: green and blue absorbed
_PURPLE_OD = np.array([0.45, 0.80, 0.25], dtype=np.float32)  # brightfield nuclear dyes
_DARK_OD = np.array([0.62, 0.66, 0.48], dtype=np.float32)


def image_id(seed: int, index: int) -> str:
    """64-hex-character id of v2 image ``index`` (its own salt: never a v1 id)."""
    return hashlib.sha256(f"{_ID_SALT}|seed={seed}|index={index}".encode()).hexdigest()


def style_choices(style: StyleArg) -> tuple[list[str], np.ndarray]:
    """(styles, probabilities) for ``style``: None is the v2 mix (:data:`STYLE_MIX_V2`), a name
    forces that style, a tuple of names is a uniform mix of them."""
    if style is None:
        names = list(STYLE_MIX_V2)
        p = np.array([STYLE_MIX_V2[n] for n in names], dtype=np.float64)
        return names, p / p.sum()
    names = [style] if isinstance(style, str) else list(style)
    if not names:
        raise ValueError(f"style is an empty sequence: give names from {STYLES_V2}, or None")
    for name in names:
        if name not in STYLES_V2:
            raise ValueError(f"style {name!r} is not one of {STYLES_V2} (or None for the mix)")
    names = list(dict.fromkeys(names))
    return names, np.full(len(names), 1.0 / len(names))


def plan_images(
    num_images: int,
    seed: int,
    sizes: Optional[Sequence[tuple[int, int]]] = None,
    style: StyleArg = None,
) -> list[ImagePlan]:
    """Version 2's :func:`sharp_fpn.data.synthetic.plan_images` (same arguments; ``style`` may
    also be a tuple of names, drawn uniformly)."""
    if num_images < 1:
        raise ValueError(f"num_images must be >= 1, got {num_images}")
    if seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed}")
    names, style_p = style_choices(style)
    choices, weights = size_choices(sizes)
    empty = empty_indices(num_images, seed, _EMPTY_KEY)
    plans = []
    for i in range(num_images):
        rng = _rng(seed, _PLAN_KEY, i)
        h, w = choices[int(rng.choice(len(choices), p=weights))]
        name = names[int(rng.choice(len(names), p=style_p))]
        plans.append(ImagePlan(i, image_id(seed, i), h, w, name, i in empty, version=2))
    return plans


# --------------------------------------------------------------------------------------------
# Layout


def _layout(
    rng: np.random.Generator, height: int, width: int, avoid: Optional[np.ndarray] = None
) -> tuple[np.ndarray, np.ndarray]:
    """(labels (H, W) int32, mitotic (K + 1,) bool indexed by label) of one v2 image.

    The scene is a sparse field, clusters or a dense monolayer. Each nucleus is either put
    against one already placed (it goes behind it and keeps the free pixels, so the two share a
    boundary) or put where it touches nobody; the share of the first kind sets how many
    nuclei touch. Every kept nucleus is one 4-connected region of at least
    :data:`MIN_NUCLEUS_AREA` pixels and placed nuclei are never altered. ``avoid``: a bool
    mask where no nucleus centre may lie (H&E lumen).
    """
    scene = ("sparse", "clustered", "dense")[int(rng.choice(3, p=[0.3, 0.4, 0.3]))]
    eq = float(np.exp(rng.normal(np.log(MEDIAN_EQ_DIAMETER), 0.38)))
    eq = float(np.clip(eq, 7.5, 50.0))
    spread = rng.uniform(0.12, 0.30)  # within-image sigma of log diameter
    coverage = {
        "sparse": lambda: np.exp(rng.uniform(np.log(0.04), np.log(0.12))),
        "clustered": lambda: rng.uniform(0.10, 0.25),
        "dense": lambda: rng.uniform(0.22, 0.42),
    }[scene]()
    p_touch = {"sparse": (0.02, 0.1), "clustered": (0.08, 0.22), "dense": (0.05, 0.16)}[scene]
    p_touch = rng.uniform(*p_touch)

    area = height * width
    mean_area = np.pi / 4.0 * eq**2 * np.exp(2 * spread**2)
    n_target = coverage * area / mean_area
    if n_target > MAX_NUCLEI:  # a big field: lower magnification would not fit, so larger
        eq = min(MAX_EQ_DIAMETER * 0.85, eq * np.sqrt(n_target / MAX_NUCLEI))
        mean_area = np.pi / 4.0 * eq**2 * np.exp(2 * spread**2)
        n_target = coverage * area / mean_area
    n_target = int(np.clip(round(n_target), 1, MAX_NUCLEI))
    max_major = min(MAX_EQ_DIAMETER * _MAJOR_PER_EQ, min(height, width) - 4.0)
    min_major = MIN_EQ_DIAMETER * _MAJOR_PER_EQ
    if scene == "clustered":
        n_clusters = max(1, round(n_target / rng.uniform(6.0, 25.0)))
        centres = rng.uniform([0.0, 0.0], [height, width], size=(n_clusters, 2))
        spreads = eq * np.sqrt(n_target / n_clusters) * rng.uniform(0.4, 0.9, size=n_clusters)
    mitotic_rate = rng.uniform(0.0, 0.04) if rng.random() < 0.7 else 0.0

    labels = np.zeros((height, width), dtype=np.int32)
    centres_placed: list[tuple[float, float, float]] = []
    mitotic = [False]
    cross = np.array([[0, 1, 0], [1, 1, 1], [0, 1, 0]], dtype=np.uint8)
    placed = 0
    for _ in range(6 * n_target):
        if placed == n_target:
            break
        is_mitotic = placed > 0 and rng.random() < mitotic_rate
        d = eq * _MAJOR_PER_EQ * float(np.exp(rng.normal(0.0, spread)))
        if is_mitotic:
            d *= rng.uniform(0.45, 0.65)
        d = float(np.clip(d, min_major, max_major))
        outline = _nucleus_outline(rng, d)
        touch = placed > 0 and rng.random() < p_touch
        if placed == 0:
            cy = rng.uniform(d / 2 + 1, height - d / 2 - 1)
            cx = rng.uniform(d / 2 + 1, width - d / 2 - 1)
        elif touch:
            py, px, pd = centres_placed[int(rng.integers(len(centres_placed)))]
            angle = rng.uniform(0.0, 2.0 * np.pi)
            dist = (pd + d) / 2.0 * rng.uniform(0.75, 0.95)
            cy, cx = py + dist * np.sin(angle), px + dist * np.cos(angle)
        elif scene == "clustered" and rng.random() < 0.85:
            k = int(rng.integers(len(centres)))
            cy, cx = centres[k] + rng.normal(0.0, spreads[k], size=2)
        else:
            cy, cx = rng.uniform(0.0, height), rng.uniform(0.0, width)
        iy, ix = int(cy), int(cx)
        if not (0 <= iy < height and 0 <= ix < width):
            continue
        if avoid is not None and avoid[iy, ix]:
            continue
        placed_here = _place(outline, cy, cx, labels)
        if placed_here is None:
            continue
        window, whole = placed_here
        if touch:
            free = whole & (window == 0)
            area_k = int(free.sum())
            if area_k < MIN_NUCLEUS_AREA or area_k < 0.75 * whole.sum():
                continue
            if cv2.connectedComponents(free.astype(np.uint8), connectivity=4)[0] != 2:
                continue
        else:
            grown = cv2.dilate(whole.astype(np.uint8), cross).astype(bool)
            if window[grown].any():
                continue  # it would touch or overlap a neighbour
            free = whole
            area_k = int(free.sum())
            if area_k < MIN_NUCLEUS_AREA:
                continue
            if cv2.connectedComponents(free.astype(np.uint8), connectivity=4)[0] != 2:
                continue  # clipped by the border into pieces
        placed += 1
        window[free] = placed
        centres_placed.append((cy, cx, d))
        mitotic.append(is_mitotic)
    return labels, np.array(mitotic, dtype=bool)


# --------------------------------------------------------------------------------------------
# Rendering


def _spots(rng: np.random.Generator, labels: np.ndarray, per_nucleus: float, sigma: float
           ) -> np.ndarray:
    """Blurred dots (peak ~1) at random nucleus pixels, about ``per_nucleus`` per nucleus."""
    flat = np.flatnonzero(labels.ravel())
    out = np.zeros(labels.shape, dtype=np.float32)
    count = int(labels.max())
    if not flat.size or not count:
        return out
    n = int(rng.poisson(per_nucleus * count))
    if n:
        out.ravel()[flat[rng.integers(flat.size, size=n)]] = 1.0
        out = cv2.GaussianBlur(out, (0, 0), sigmaX=sigma) * np.float32(2.0 * np.pi * sigma**2)
    return np.minimum(out, 1.0) * (labels > 0)


def _vignette(rng: np.random.Generator, shape: tuple[int, int], strength: float) -> np.ndarray:
    """Radial fall-off 1 - strength * r^2 (r = 1 at the corners), its centre off-centre a bit."""
    h, w = shape
    cy, cx = rng.uniform(0.35, 0.65) * h, rng.uniform(0.35, 0.65) * w
    yy = (np.arange(h, dtype=np.float32)[:, None] - cy) / (0.5 * np.hypot(h, w))
    xx = (np.arange(w, dtype=np.float32)[None, :] - cx) / (0.5 * np.hypot(h, w))
    return np.clip(1.0 - strength * (yy**2 + xx**2), 0.2, 1.0)


def _render_fluorescence(
    rng: np.random.Generator, labels: np.ndarray, mitotic: np.ndarray
) -> np.ndarray:
    """Gray fluorescence frame: (H, W) uint8, or uint16 for about one in four images."""
    shape = labels.shape
    count = int(labels.max())
    edge, texture, _, size = _nucleus_fields(rng, labels)
    bright = rng.lognormal(0.0, rng.uniform(0.5, 0.85), size=count + 1).astype(np.float32)
    out_of_focus = rng.random(count + 1) < rng.uniform(0.0, 0.25)
    bright[out_of_focus] *= rng.uniform(0.35, 0.8)
    bright = np.maximum(bright, np.float32(0.18))  # dim, yet above the noise of a fair camera
    bright[mitotic] = rng.uniform(3.0, 6.0) * np.median(bright[1:]) if count else 0.0
    bright[0] = 0.0
    flat = np.zeros(count + 1, dtype=np.float32)
    flat[mitotic] = 0.8  # condensed chromatin: compact and evenly bright
    shaping = 0.45 + 0.55 * edge
    signal = bright[labels] * (shaping + flat[labels] * (1.0 - shaping))
    signal *= np.clip(1.0 + texture * (1.0 - flat[labels]), 0.25, None)
    nucleoli = _spots(rng, labels, rng.uniform(0.5, 2.5), max(0.8, 0.07 * size))
    signal *= 1.0 - rng.uniform(0.3, 0.7) * nucleoli * (1.0 - flat[labels])
    if out_of_focus.any():
        blurred = cv2.GaussianBlur(signal, (0, 0), sigmaX=max(1.5, rng.uniform(0.08, 0.2) * size))
        weight = cv2.GaussianBlur(out_of_focus[labels].astype(np.float32), (0, 0),
                                  sigmaX=max(1.0, 0.1 * size))
        signal = signal * (1.0 - weight) + blurred * weight
    fg = (labels > 0).astype(np.float32)
    haze = rng.uniform(0.0, 0.1) * _blur_small(fg, 0.6 * size)
    light = _illumination(rng, shape, rng.uniform(0.1, 0.5)) * _vignette(
        rng, shape, rng.uniform(0.0, 0.6))
    background = rng.uniform(0.0, 0.06)
    relative = (signal + haze + background) * light
    relative = cv2.GaussianBlur(relative, (0, 0), sigmaX=rng.uniform(0.5, 1.3))

    sixteen = rng.random() < 1.0 / SIXTEEN_BIT_EVERY
    if sixteen:
        full = 4095.0 if rng.random() < 0.6 else 65535.0
        offset = rng.uniform(100.0, 500.0)
        level = rng.uniform(0.04, 0.4) * full  # counts above offset of a typical nucleus
        electrons = float(np.exp(rng.uniform(np.log(200.0), np.log(4000.0))))
        read_noise = rng.uniform(1.0, 4.0) * level / electrons
        dtype, top = np.uint16, 65535.0
    else:
        full = 255.0
        offset = rng.uniform(1.0, 14.0)
        level = rng.uniform(0.2, 0.6) * full
        electrons = float(np.exp(rng.uniform(np.log(60.0), np.log(2000.0))))
        read_noise = rng.uniform(0.5, 2.5)
        dtype, top = np.uint8, 255.0
    counts = rng.poisson(np.clip(relative, 0.0, None) * electrons).astype(np.float32)
    image = offset + counts * np.float32(level / electrons)
    image += rng.normal(0.0, read_noise, size=shape).astype(np.float32)
    return np.clip(np.rint(image), 0, min(full, top)).astype(dtype)


def _jitter_stain(rng: np.random.Generator, od: np.ndarray, amount: float) -> np.ndarray:
    v = np.clip(od * np.exp(rng.normal(0.0, amount, size=3)), 0.02, None).astype(np.float32)
    return v / np.float32(np.linalg.norm(v))


def _fibres(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    """Wavy strands in [0, 1]: zero crossings of anisotropically smoothed, rotated noise."""
    h, w = shape
    side = int(np.ceil(np.hypot(h, w))) + 2
    noise = rng.standard_normal((side, side), dtype=np.float32)
    noise = cv2.GaussianBlur(noise, (0, 0), sigmaX=rng.uniform(5.0, 12.0),
                             sigmaY=rng.uniform(1.0, 2.0))
    noise /= max(float(noise.std()), 1e-6)
    rot = cv2.getRotationMatrix2D((side / 2, side / 2), rng.uniform(0.0, 180.0), 1.0)
    rot[:, 2] -= [(side - w) / 2, (side - h) / 2]
    noise = cv2.warpAffine(noise, rot, (w, h), flags=cv2.INTER_LINEAR,
                           borderMode=cv2.BORDER_REFLECT)
    # Waves: displace the strands by a smooth random field (bundles bend, as collagen does).
    wave = rng.uniform(3.0, 10.0)
    dy = _blur_small(rng.standard_normal((h, w), dtype=np.float32), 16.0)
    dx = _blur_small(rng.standard_normal((h, w), dtype=np.float32), 16.0)
    scale = np.float32(wave / max(float(dy.std()), float(dx.std()), 1e-6))
    grid_y, grid_x = np.mgrid[0:h, 0:w].astype(np.float32)
    noise = cv2.remap(noise, grid_x + dx * scale, grid_y + dy * scale, cv2.INTER_LINEAR,
                      borderMode=cv2.BORDER_REFLECT)
    return np.exp(-((noise / rng.uniform(0.25, 0.5)) ** 2))


def _red_cells(rng: np.random.Generator, labels: np.ndarray, lumen: np.ndarray, size: float
               ) -> np.ndarray:
    """Red blood cell density (H, W) float32 in [0, 1]: small biconcave discs off the nuclei,
    in a few streams (vessels) and, more of them, in the lumen."""
    h, w = labels.shape
    out = np.zeros((h, w), dtype=np.float32)
    if rng.random() < 0.35:
        return out
    radius = max(2.5, 0.2 * size * rng.uniform(0.8, 1.2))
    n = int(rng.poisson(rng.uniform(0.0, 0.004) * h * w / (radius**2)))
    n = min(n, 400)
    vessels = rng.uniform([0, 0], [h, w], size=(max(1, n // 15 + 1), 2))
    for _ in range(n):
        if rng.random() < 0.6:
            cy, cx = vessels[int(rng.integers(len(vessels)))] + rng.normal(0, 4 * radius, 2)
        else:
            cy, cx = rng.uniform(0, h), rng.uniform(0, w)
        r = radius * rng.uniform(0.85, 1.15)
        centre = (int(round(cx * 16)), int(round(cy * 16)))
        cv2.circle(out, centre, int(round(r * 16)), 1.0, -1, cv2.LINE_AA, shift=4)
        cv2.circle(out, centre, int(round(r * 0.45 * 16)), 0.65, -1, cv2.LINE_AA, shift=4)
    out[labels > 0] = 0.0
    return out


def _jpeg(rng: np.random.Generator, rgb: np.ndarray, p: float) -> np.ndarray:
    """A JPEG encode/decode round trip (quality 60..95) with probability ``p``."""
    if rng.random() >= p:
        return rgb
    quality = int(rng.integers(60, 96))
    ok, data = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR),
                            [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise OSError("could not JPEG-encode a synthetic image")
    return cv2.cvtColor(cv2.imdecode(data, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)


def _to_rgb(rng: np.random.Generator, od: np.ndarray, white: float, noise: float
            ) -> np.ndarray:
    """Optical density (H, W, 3) -> 8-bit RGB under a slightly tinted lamp, blurred, noisy."""
    lamp = np.float32(white) + rng.uniform(-5.0, 5.0, size=3).astype(np.float32)
    rgb = lamp * np.power(np.float32(10.0), -od)
    rgb *= _illumination(rng, od.shape[:2], rng.uniform(0.03, 0.15))[..., None]
    rgb = cv2.GaussianBlur(rgb, (0, 0), sigmaX=rng.uniform(0.5, 1.1))
    rgb += rng.normal(0.0, noise, size=rgb.shape).astype(np.float32)
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)


def _lumen(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    """White space of H&E tissue (float32 in [0, 1]); none in about a third of the images."""
    if rng.random() < 0.35:
        return np.zeros(shape, dtype=np.float32)
    field = _smooth_noise(rng, shape, rng.uniform(12.0, 35.0))
    return np.clip((field - rng.uniform(0.6, 1.8)) * 3.0, 0.0, 1.0)


def _render_he(rng: np.random.Generator, labels: np.ndarray, lumen: np.ndarray) -> np.ndarray:
    """H&E-like (H, W, 3) uint8."""
    shape = labels.shape
    count = int(labels.max())
    edge, texture, _, size = _nucleus_fields(rng, labels)
    fg = (labels > 0).astype(np.float32)
    h_od = _jitter_stain(rng, _HEMATOXYLIN_OD, 0.12)
    e_od = _jitter_stain(rng, _EOSIN_OD, 0.12)

    stroma = rng.uniform(0.12, 0.38)
    fibres = _fibres(rng, shape)
    eosin = stroma * (0.35 + 0.65 * fibres + 0.15 * _smooth_noise(rng, shape, 2.0))
    eosin = np.clip(eosin, 0.0, None) * (1.0 - lumen)
    eosin += rng.uniform(0.05, 0.3) * _blur_small(fg, 0.6 * size) * (1.0 - lumen)  # cytoplasm
    rbc = _red_cells(rng, labels, lumen, size)

    load = rng.lognormal(0.0, 0.25, size=count + 1).astype(np.float32) * rng.uniform(0.3, 0.75)
    vesicular = (rng.random(count + 1) < rng.uniform(0.1, 0.7)).astype(np.float32)
    pale = rng.uniform(0.4, 0.7)
    interior = np.clip((edge - 0.3) / 0.7, 0.0, 1.0)
    v = vesicular[labels]
    hema = load[labels] * fg * (1.0 + 0.35 * (1.0 - edge)) * (1.0 - pale * v * interior)
    hema *= np.clip(1.0 + 1.6 * texture * (1.0 + v), 0.3, None)  # coarse chromatin
    hema += 0.8 * load[labels] * _spots(rng, labels, rng.uniform(0.3, 1.2),
                                        max(0.8, 0.07 * size)) * (0.3 + v)
    hema += rng.uniform(0.0, 0.05) * (1.0 - lumen)  # counterstain haze

    od = (hema[..., None] * h_od + eosin[..., None] * e_od
          + rng.uniform(0.6, 1.1) * rbc[..., None] * _RBC_OD)
    rgb = _to_rgb(rng, od, rng.uniform(228.0, 250.0), rng.uniform(1.5, 4.0))
    return _jpeg(rng, rgb, 0.6)


def _render_brightfield(rng: np.random.Generator, labels: np.ndarray) -> np.ndarray:
    """DSB's purple-on-white brightfield: (H, W, 3) uint8."""
    shape = labels.shape
    count = int(labels.max())
    edge, texture, _, size = _nucleus_fields(rng, labels)
    fg = (labels > 0).astype(np.float32)
    base = _PURPLE_OD if rng.random() < 0.7 else _DARK_OD
    stain = _jitter_stain(rng, base, 0.15)
    load = rng.lognormal(0.0, 0.3, size=count + 1).astype(np.float32) * rng.uniform(0.5, 1.3)
    dens = load[labels] * fg * (0.75 + 0.25 * edge + 0.2 * (1.0 - edge))
    dens *= np.clip(1.0 + 1.3 * texture, 0.3, None)
    dens += 0.5 * load[labels] * _spots(rng, labels, rng.uniform(0.2, 1.5), max(0.8, 0.07 * size))
    cytoplasm = rng.uniform(0.0, 0.12) * _blur_small(fg, rng.uniform(0.5, 1.0) * size)
    dens += cytoplasm + rng.uniform(0.0, 0.03) * (1.0 + 0.3 * _smooth_noise(rng, shape, 8.0))
    rgb = _to_rgb(rng, dens[..., None] * stain, rng.uniform(232.0, 252.0), rng.uniform(1.0, 3.0))
    return _jpeg(rng, rgb, 0.2)


def generate_image(
    rng: np.random.Generator, height: int, width: int, style: str, empty: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """One v2 image and its labels (see :func:`sharp_fpn.data.synthetic.generate_image`).

    Returns ``(image, labels)``: ``image`` is (H, W, 4) uint8 RGBA (alpha 255; R = G = B for
    fluorescence), or, for a 16-bit fluorescence frame, (H, W) uint16 gray; ``labels`` is
    (H, W) int32 as in version 1.
    """
    if style not in STYLES_V2:
        raise ValueError(f"style {style!r} is not one of {STYLES_V2}")
    _check_sizes([(height, width)])
    lumen = _lumen(rng, (height, width)) if style == "he" else None
    if empty:
        labels = np.zeros((height, width), dtype=np.int32)
        mitotic = np.zeros(1, dtype=bool)
    else:
        labels, mitotic = _layout(rng, height, width, None if lumen is None else lumen > 0.3)
    if style == "fluorescence":
        gray = _render_fluorescence(rng, labels, mitotic)
        if gray.dtype == np.uint16:
            return gray, labels
        rgb = np.repeat(gray[..., None], 3, axis=2)
    elif style == "he":
        rgb = _render_he(rng, labels, lumen)
    else:
        rgb = _render_brightfield(rng, labels)
    rgba = np.empty((height, width, 4), dtype=np.uint8)
    rgba[..., :3] = rgb
    rgba[..., 3] = 255
    return rgba, labels


# --------------------------------------------------------------------------------------------
# Statistics


def touching(labels: np.ndarray) -> np.ndarray:
    """Bool (K + 1,): nucleus k shares a boundary (a 4-adjacent pixel) with another nucleus."""
    out = np.zeros(int(labels.max()) + 1, dtype=bool)
    for a, b in ((labels[:, :-1], labels[:, 1:]), (labels[:-1, :], labels[1:, :])):
        pair = (a != b) & (a > 0) & (b > 0)
        out[a[pair]] = True
        out[b[pair]] = True
    out[0] = False
    return out


def describe(labels_list: Sequence[np.ndarray]) -> dict[str, float]:
    """Statistics of a set of label images (empty images count in ``images`` only).

    Keys: ``images``, ``empty_images``, ``nuclei`` (all of them), ``nuclei_per_image_mean``,
    ``_median``, ``_min``, ``_max``; ``foreground_mean``, ``_median``, ``_p5``, ``_p95`` (share of
    an image's pixels in a nucleus); ``touching_fraction`` (share of the nuclei with a 4-adjacent
    pixel of another nucleus); ``diameter_median``, ``_p5``, ``_p95`` (equivalent diameter
    2 sqrt(area / pi), px, over all nuclei); ``diameter_between_sd`` (sd over images of the log
    of their median diameter) and ``diameter_within_sd`` (mean over images of the sd of log
    diameter): magnification against variation within an image.
    """
    fg, counts, touch, diameters, medians, within = [], [], [], [], [], []
    empty = 0
    for labels in labels_list:
        labels = np.asarray(labels)
        areas = np.bincount(labels.ravel())[1:]
        areas = areas[areas > 0]
        if not areas.size:
            empty += 1
            continue
        fg.append(float(areas.sum()) / labels.size)
        counts.append(areas.size)
        t = touching(labels)[1:]
        touch.append((int(t.sum()), t.size))
        d = 2.0 * np.sqrt(areas / np.pi)
        diameters.append(d)
        medians.append(float(np.median(d)))
        if d.size > 1:
            within.append(float(np.std(np.log(d))))
    if not counts:
        return {"images": len(labels_list), "empty_images": empty, "nuclei": 0}
    d_all = np.concatenate(diameters)
    n_touch = sum(t for t, _ in touch)
    return {
        "images": len(labels_list),
        "empty_images": empty,
        "nuclei": int(sum(counts)),
        "nuclei_per_image_mean": float(np.mean(counts)),
        "nuclei_per_image_median": float(np.median(counts)),
        "nuclei_per_image_min": int(min(counts)),
        "nuclei_per_image_max": int(max(counts)),
        "foreground_mean": float(np.mean(fg)),
        "foreground_median": float(np.median(fg)),
        "foreground_p5": float(np.percentile(fg, 5)),
        "foreground_p95": float(np.percentile(fg, 95)),
        "touching_fraction": n_touch / max(1, sum(n for _, n in touch)),
        "diameter_median": float(np.median(d_all)),
        "diameter_p5": float(np.percentile(d_all, 5)),
        "diameter_p95": float(np.percentile(d_all, 95)),
        "diameter_between_sd": float(np.std(np.log(medians))),
        "diameter_within_sd": float(np.mean(within)) if within else 0.0,
    }


# --------------------------------------------------------------------------------------------
# Contact sheet


def _display(image: np.ndarray) -> np.ndarray:
    """8-bit RGB for a person: a 16-bit frame stretched from its 0.5th to 99.8th percentile."""
    if image.dtype == np.uint16:
        lo, hi = np.percentile(image, [0.5, 99.8])
        gray = np.clip((image.astype(np.float32) - lo) / max(hi - lo, 1.0) * 255.0, 0, 255)
        return np.repeat(gray.astype(np.uint8)[..., None], 3, axis=2)
    return image[..., :3]


def _cell(image: np.ndarray, labels: np.ndarray, cell: int) -> tuple[np.ndarray, np.ndarray]:
    """Centre square crop, resized to ``cell`` px: (RGB, labels by nearest neighbour)."""
    h, w = labels.shape
    side = min(h, w)
    y0, x0 = (h - side) // 2, (w - side) // 2
    rgb = _display(image)[y0 : y0 + side, x0 : x0 + side]
    lab = labels[y0 : y0 + side, x0 : x0 + side]
    rgb = cv2.resize(rgb, (cell, cell), interpolation=cv2.INTER_AREA)
    lab = cv2.resize(lab.astype(np.float32), (cell, cell), interpolation=cv2.INTER_NEAREST)
    return rgb, lab.astype(np.int32)


def _outlined(rgb: np.ndarray, labels: np.ndarray) -> np.ndarray:
    padded = np.pad(labels, 1, mode="edge")
    border = (labels > 0) & (
        (padded[:-2, 1:-1] != labels) | (padded[2:, 1:-1] != labels)
        | (padded[1:-1, :-2] != labels) | (padded[1:-1, 2:] != labels)
    )
    out = rgb.copy()
    out[border] = (255, 230, 0)
    return out


def contact_sheet(
    path: Union[str, os.PathLike],
    seed: int = 0,
    per_row: int = 6,
    cell: int = 192,
    outlines: bool = True,
    version: int = 2,
    sizes: Optional[Sequence[tuple[int, int]]] = None,
    styles: StyleArg = None,
) -> Path:
    """Write a PNG of a seeded sample, one row per style, for a person to compare with real
    images; returns its path. Each of ``per_row`` images is centre-cropped square and resized
    to ``cell`` px; with ``outlines`` each is followed by a copy with its nuclei outlined.
    ``sizes``: drawn from (default: DSB2018's sizes up to 700 px); ``styles``: a name or names
    (default: every style of ``version``). Written atomically (a temporary name, then a
    rename)."""
    from . import synthetic as v1
    from sharp_fpn.utils import atomic_write

    if per_row < 1 or cell < 16:
        raise ValueError(f"per_row must be >= 1 and cell >= 16, got {per_row} and {cell}")
    known = STYLES_V2 if version == 2 else v1.STYLES
    if styles is None:
        styles = known
    else:
        styles = (styles,) if isinstance(styles, str) else tuple(styles)
        unknown = [s for s in styles if s not in known]
        if unknown or not styles:
            raise ValueError(f"styles {styles!r}: each must be one of {known}")
    if sizes is None:
        choices = [s for s in DSB2018_STAGE1_TRAIN_SIZES if max(s) <= 700]
    else:
        _check_sizes(sizes)
        choices = list(sizes)
    gap = 4
    per_image = 2 if outlines else 1
    width = per_row * per_image * cell + (per_row * per_image - 1) * gap
    height = len(styles) * cell + (len(styles) - 1) * gap
    sheet = np.full((height, width, 3), 40, dtype=np.uint8)
    for row, style in enumerate(styles):
        for col in range(per_row):
            rng = _rng(seed, _SHEET_KEY, row * 1000 + col)
            h, w = choices[int(rng.integers(len(choices)))]
            image, labels = v1.generate_image(rng, h, w, style, version=version)
            rgb, lab = _cell(image, labels, cell)
            tiles = [rgb, _outlined(rgb, lab)] if outlines else [rgb]
            for j, tile in enumerate(tiles):
                x = (col * per_image + j) * (cell + gap)
                y = row * (cell + gap)
                sheet[y : y + cell, x : x + cell] = tile
    ok, data = cv2.imencode(".png", cv2.cvtColor(sheet, cv2.COLOR_RGB2BGR))
    if not ok:
        raise OSError(f"could not encode {path} as PNG")
    with atomic_write(path, "wb") as f:
        f.write(data.tobytes())
    return Path(path)
