"""The classical nuclei pipeline users compare a learned model against: threshold + watershed.

:func:`segment` labels the nuclei of one image with no training at all, the way a
scikit-image user would:

1. **the nuclear signal** (:func:`nuclear_signal`), chosen per image: on a dark background
   (fluorescence) the intensity; on a light background (brightfield, H&E: dark purple nuclei)
   the hematoxylin channel of :func:`skimage.color.rgb2hed` when the image has colour, the
   inverted darkness when it is gray. The signal is stretched between its
   :data:`LOW_PERCENTILE` and :data:`HIGH_PERCENTILE` percentiles to [0, 1];
2. a light Gaussian smoothing (sigma :data:`SMOOTH_FRACTION` of the nucleus diameter, at least
   :data:`MIN_SMOOTH_SIGMA` px);
3. Otsu's threshold on the signal raised to :data:`SIGNAL_GAMMA` (0.7): the power
   compresses bright nuclei so that the dim ones of a field whose brightness varies ~10x still
   clear the threshold; holes filled, objects smaller than :data:`MIN_AREA_FRACTION` of a
   nucleus of the expected diameter removed;
4. a distance-transform watershed: markers are the peaks of the (slightly smoothed) distance
   transform found by :func:`skimage.feature.peak_local_max` at least
   :data:`MIN_DISTANCE_FRACTION` x diameter apart, flooded over the negated distance inside
   the foreground.

The expected diameter is ``diameter`` when given, else estimated from the foreground
(:func:`estimate_diameter`: twice the median largest inscribed radius of its connected pieces).

The constants were tuned on sharp-fpn's synthetic nuclei only (seeded images of every style,
never a real image), by a small grid search of the mean DSB2018 score
(:func:`sharp_fpn.metrics.dsb_score`) over 8 images of 256 x 256 per style (synthetic v1,
seeds 1000-1007, fluorescence and H&E): 0.55 / 0.60 (fluorescence / H&E) before tuning,
0.64 / 0.75 with the values below. scikit-image and scipy
only: no torch, no detectron2.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
from scipy import ndimage
from skimage.color import rgb2hed
from skimage.feature import peak_local_max
from skimage.filters import threshold_otsu
from skimage.segmentation import watershed

__all__ = ["estimate_diameter", "modality", "nuclear_signal", "segment"]

LOW_PERCENTILE, HIGH_PERCENTILE = 1.0, 99.5
"""Percentiles of the signal mapped to 0 and 1 (robust to hot pixels and saturated nuclei)."""
BRIGHT_BACKGROUND = 0.5
"""A median gray level (0..1) above this means a light background: brightfield or H&E."""
COLOUR_SATURATION = 0.08
"""Mean saturation (HSV, 0..1) above which a light-background image is read as stained colour
(hematoxylin channel); below, as gray brightfield (inverted darkness)."""
SMOOTH_FRACTION = 0.05
"""Gaussian sigma as a fraction of the expected nucleus diameter (tuned: 0, 0.05, 0.08, 0.12;
more smoothing merged neighbours and cost up to 0.25 of DSB score)."""
MIN_SMOOTH_SIGMA = 1.0
"""Smallest smoothing sigma (px)."""
SIGNAL_GAMMA = 0.7
"""The signal is raised to this power before Otsu's threshold (tuned: 0.5, 0.7, 1.0)."""
MIN_AREA_FRACTION = 0.15
"""Objects smaller than this fraction of a disc of the expected diameter are removed."""
MIN_DISTANCE_FRACTION = 0.2
"""Watershed markers are at least this fraction of the expected diameter apart (tuned: 0.15 to
0.4)."""
DEFAULT_DIAMETER = 20.0
"""The diameter (px) used when the foreground is empty or too small to estimate one."""


def _as_float_rgb(image: np.ndarray) -> np.ndarray:
    """(H, W) or (H, W, C) of any dtype -> (H, W, 3) float64 in [0, 1]."""
    image = np.asarray(image)
    if image.ndim == 2:
        image = image[..., None]
    if image.ndim != 3 or image.shape[2] not in (1, 2, 3, 4):
        raise ValueError(f"expected an (H, W) or (H, W, C) image, C in 1..4, got {image.shape}")
    colour = image[..., :3] if image.shape[2] >= 3 else image[..., :1]
    if np.issubdtype(colour.dtype, np.integer):
        colour = colour.astype(np.float64) / float(np.iinfo(colour.dtype).max)
    elif colour.dtype == np.bool_:
        colour = colour.astype(np.float64)
    else:
        colour = colour.astype(np.float64)
        top = float(colour.max()) if colour.size else 1.0
        if top > 1.0:
            colour = colour / top
    if colour.shape[2] == 1:
        colour = np.repeat(colour, 3, axis=2)
    return colour


def modality(image: np.ndarray) -> str:
    """``"fluorescence"`` (bright nuclei on dark), ``"stained"`` (colour on light: H&E,
    purple brightfield) or ``"brightfield"`` (gray, dark nuclei on light) for one image."""
    rgb = _as_float_rgb(image)
    gray = rgb.mean(axis=2)
    if float(np.median(gray)) <= BRIGHT_BACKGROUND:
        return "fluorescence"
    top, bottom = rgb.max(axis=2), rgb.min(axis=2)
    saturation = np.where(top > 0, (top - bottom) / np.maximum(top, 1e-9), 0.0)
    return "stained" if float(saturation.mean()) > COLOUR_SATURATION else "brightfield"


def _stretch(signal: np.ndarray) -> np.ndarray:
    low, high = np.percentile(signal, [LOW_PERCENTILE, HIGH_PERCENTILE])
    if high <= low:
        return np.zeros_like(signal)
    return np.clip((signal - low) / (high - low), 0.0, 1.0)


def nuclear_signal(image: np.ndarray) -> np.ndarray:
    """(H, W) float64 in [0, 1], high on nuclei: intensity, hematoxylin or inverted darkness
    as :func:`modality` decides."""
    rgb = _as_float_rgb(image)
    kind = modality(rgb)
    if kind == "fluorescence":
        signal = rgb.mean(axis=2)
    elif kind == "stained":
        signal = rgb2hed(rgb)[..., 0]
    else:
        signal = 1.0 - rgb.mean(axis=2)
    return _stretch(signal)


def _foreground(signal: np.ndarray, sigma: float) -> np.ndarray:
    smooth = ndimage.gaussian_filter(signal, sigma) ** SIGNAL_GAMMA
    if float(smooth.max()) <= float(smooth.min()):
        return np.zeros(signal.shape, dtype=bool)
    return ndimage.binary_fill_holes(smooth > threshold_otsu(smooth))


def estimate_diameter(foreground: np.ndarray) -> float:
    """The typical nucleus diameter (px) of a foreground mask: twice the median, over its
    connected pieces, of the largest distance to the background (a touching cluster is about
    one nucleus wide, so it counts like one). :data:`DEFAULT_DIAMETER` when there is none."""
    pieces, count = ndimage.label(foreground)
    if count == 0:
        return DEFAULT_DIAMETER
    distance = ndimage.distance_transform_edt(foreground)
    radii = ndimage.maximum(distance, pieces, index=np.arange(1, count + 1))
    radii = np.asarray(radii)[np.asarray(radii) >= 2.0]  # specks are not nuclei
    if radii.size == 0:
        return DEFAULT_DIAMETER
    return float(2.0 * np.median(radii))


def segment(rgb: np.ndarray, diameter: Optional[float] = None) -> np.ndarray:
    """Label the nuclei of one image by threshold and distance-transform watershed.

    Args:
        rgb: ``(H, W, 3)`` uint8 RGB (as :func:`sharp_fpn.predict.image_io.normalise` makes);
            ``(H, W)`` gray, RGBA, 16-bit or float images are read too.
        diameter: expected nucleus diameter in px; estimated from the image when None.

    Returns:
        ``(H, W)`` int32 label image: 0 background, 1..K the nuclei.
    """
    if diameter is not None and not float(diameter) > 0:
        raise ValueError(f"diameter must be > 0 px, got {diameter}")
    signal = nuclear_signal(rgb)
    guess = float(diameter) if diameter is not None else DEFAULT_DIAMETER
    foreground = _foreground(signal, max(MIN_SMOOTH_SIGMA, SMOOTH_FRACTION * guess))
    if diameter is None:
        estimated = estimate_diameter(foreground)
        if abs(estimated - guess) > 0.25 * guess:  # smooth again at the image's own scale
            guess = estimated
            foreground = _foreground(signal, max(MIN_SMOOTH_SIGMA, SMOOTH_FRACTION * guess))
    min_area = MIN_AREA_FRACTION * np.pi / 4.0 * guess**2
    pieces, count = ndimage.label(foreground)
    if count:
        areas = np.bincount(pieces.ravel())
        foreground = (areas >= min_area)[pieces] & foreground
        pieces, count = ndimage.label(foreground)
    if count == 0:
        return np.zeros(signal.shape, dtype=np.int32)
    distance = ndimage.distance_transform_edt(foreground)
    distance = ndimage.gaussian_filter(distance, 1.0)
    peaks = peak_local_max(distance, min_distance=max(1, int(round(MIN_DISTANCE_FRACTION * guess))),
                           labels=pieces, exclude_border=False)
    markers = np.zeros(signal.shape, dtype=np.int32)
    markers[tuple(peaks.T)] = np.arange(1, len(peaks) + 1)
    # every piece gets at least one marker (a piece too flat for a peak keeps its own label)
    unmarked = np.setdiff1d(np.arange(1, count + 1), np.unique(pieces[markers > 0]))
    if unmarked.size:
        extra = np.isin(pieces, unmarked)
        markers[extra] = (pieces[extra] + len(peaks)).astype(np.int32)
    labels = watershed(-distance, markers, mask=foreground)
    # consecutive ids 1..K
    ids = np.unique(labels)
    ids = ids[ids > 0]
    lookup = np.zeros(int(labels.max()) + 1, dtype=np.int32)
    lookup[ids] = np.arange(1, ids.size + 1, dtype=np.int32)
    return lookup[labels]
