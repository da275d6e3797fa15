"""What a biologist gets per image: a label TIFF, an outline overlay, a per-nucleus table.

As Cellpose and StarDist give them (SPEC section 5): a uint16 label image (0 = background,
one id per nucleus; opens in napari, Fiji, CellProfiler), the image with each nucleus'
outline drawn in a colour, and a CSV of per-nucleus measurements from
``skimage.measure.regionprops``. Every file is written under a temporary name and renamed
when whole (:func:`sharp_fpn.utils.atomic_write`).
"""
from __future__ import annotations

import io
from typing import Any, Dict, List

import numpy as np
import tifffile
from PIL import Image
from skimage.measure import regionprops
from skimage.segmentation import find_boundaries

from ..utils import PathLike, atomic_write

__all__ = [
    "MAX_LABELS",
    "OUTLINE_COLOURS",
    "TABLE_COLUMNS",
    "nuclei_table",
    "overlay_outlines",
    "write_label_tiff",
    "write_png",
]

#: The most nuclei a uint16 label image can number.
MAX_LABELS = np.iinfo(np.uint16).max

#: Columns of ``<stem>_nuclei.csv``: pixels and pixel coordinates (row = y, column = x);
#: ``bbox_max_*`` are exclusive (skimage's convention); ``mean_intensity`` is in the stored
#: image's units (:attr:`~.image_io.LoadedImage.intensity`); eccentricity of the ellipse with
#: the region's second moments (0 = circle).
TABLE_COLUMNS = (
    "label",
    "score",
    "area",
    "centroid_y",
    "centroid_x",
    "bbox_min_row",
    "bbox_min_col",
    "bbox_max_row",
    "bbox_max_col",
    "mean_intensity",
    "eccentricity",
)

#: Outline colours (RGB), nucleus ``k`` drawn in ``OUTLINE_COLOURS[(k - 1) % 8]`` so that
#: touching nuclei are told apart.
OUTLINE_COLOURS = np.array(
    [
        [255, 255, 0],
        [0, 255, 255],
        [255, 0, 255],
        [0, 255, 0],
        [255, 128, 0],
        [255, 64, 64],
        [64, 160, 255],
        [255, 255, 255],
    ],
    dtype=np.uint8,
)


def nuclei_table(
    labels: np.ndarray, scores: np.ndarray, intensity: np.ndarray
) -> List[Dict[str, Any]]:
    """One row per nucleus (:data:`TABLE_COLUMNS`), in label order.

    Args:
        labels: ``(H, W)`` integer label image, 0 background, nuclei ``1..K``.
        scores: ``(K,)``, the score of label ``k`` at index ``k - 1``.
        intensity: ``(H, W)`` intensities for ``mean_intensity``.
    """
    if labels.shape != intensity.shape:
        raise ValueError(f"labels {labels.shape} and intensity {intensity.shape} differ in shape")
    rows = []
    for region in regionprops(labels, intensity_image=intensity):
        cy, cx = region.centroid
        top, left, bottom, right = region.bbox
        rows.append(
            {
                "label": region.label,
                "score": round(float(scores[region.label - 1]), 4),
                "area": int(region.area),
                "centroid_y": round(float(cy), 3),
                "centroid_x": round(float(cx), 3),
                "bbox_min_row": top,
                "bbox_min_col": left,
                "bbox_max_row": bottom,
                "bbox_max_col": right,
                "mean_intensity": round(float(region.intensity_mean), 4),
                "eccentricity": round(float(region.eccentricity), 4),
            }
        )
    return rows


def overlay_outlines(rgb: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """``(H, W, 3)`` uint8 copy of ``rgb`` with each nucleus' outline (its own boundary
    pixels, ``find_boundaries(mode="inner")``) painted in its colour."""
    overlay = rgb.copy()
    outline = find_boundaries(labels, mode="inner") & (labels > 0)
    overlay[outline] = OUTLINE_COLOURS[(labels[outline] - 1) % len(OUTLINE_COLOURS)]
    return overlay


def write_label_tiff(path: PathLike, labels: np.ndarray) -> None:
    """Write ``labels`` as a zlib-compressed uint16 TIFF.

    Raises:
        ValueError: labels below 0 or above :data:`MAX_LABELS` (the message names ``path``).
    """
    if labels.size and (labels.min() < 0 or labels.max() > MAX_LABELS):
        raise ValueError(
            f"{path}: labels span {labels.min()}..{labels.max()}; a uint16 label image holds "
            f"0..{MAX_LABELS}"
        )
    buffer = io.BytesIO()  # tifffile wants a named file or a buffer, not a bare descriptor
    tifffile.imwrite(buffer, labels.astype(np.uint16), compression="zlib")
    with atomic_write(path, "wb") as f:
        f.write(buffer.getbuffer())


def write_png(path: PathLike, rgb: np.ndarray) -> None:
    """Write an ``(H, W, 3)`` uint8 RGB image as PNG."""
    with atomic_write(path, "wb") as f:
        Image.fromarray(rgb).save(f, format="PNG")
