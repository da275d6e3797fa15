"""Rescale images so their nuclei have the size the model was trained on (``--diameter``).

A model's config says the median nucleus diameter of its training images
(``INPUT.NUCLEUS_DIAMETER``, px; 0 when not known). An image whose nuclei are ``d`` px across is
predicted at ``scale = NUCLEUS_DIAMETER / d``, its labels brought back to the image's own size
(nearest neighbour), so every output (labels, overlay, measurements) is of the original image.

``d`` is given (``--diameter``), or estimated per image (:func:`predict_at_scale`): a first
pass at scale 1, the median equivalent diameter of the nuclei found (at least
:data:`MIN_NUCLEI_TO_ESTIMATE`); when the scale that asks for is outside :data:`KEEP_RANGE` a
second pass at that scale, else the first pass stands. Scales are clamped to
:data:`SCALE_LIMITS`. A model that does not know its diameter predicts at scale 1 and a given
diameter is refused (:func:`check_diameter`).

No torch, no detectron2: the model is a callable.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Optional, Tuple

import cv2
import numpy as np

__all__ = [
    "KEEP_RANGE",
    "MIN_NUCLEI_TO_ESTIMATE",
    "SCALE_LIMITS",
    "ScaleChoice",
    "Scaled",
    "check_diameter",
    "clamp_scale",
    "compact_labels",
    "diameter_of_areas",
    "estimated_scale",
    "median_diameter",
    "predict_at_scale",
    "resize_labels",
    "scale_image",
]

#: Nuclei a first pass must find for their median diameter to be an estimate.
MIN_NUCLEI_TO_ESTIMATE = 3
#: Estimated scales inside this range keep the first pass (scale 1).
KEEP_RANGE = (0.8, 1.25)
#: Least and largest scale an image is predicted at.
SCALE_LIMITS = (0.25, 4.0)

#: ``diameter_source`` values of summary.csv.
GIVEN, ESTIMATED, TOO_FEW, UNKNOWN = ("given", "estimated", "too few nuclei to estimate",
                                      "model has no nucleus diameter")


@dataclass(frozen=True)
class ScaleChoice:
    """How an image was scaled: ``diameter`` (px in the image; None when neither given nor
    estimated), ``source`` (given, estimated, or why neither), ``scale`` (the image was
    predicted at ``scale`` times its size), ``passes`` (model runs)."""

    diameter: Optional[float]
    source: str
    scale: float
    passes: int = 1


@dataclass
class Scaled:
    """The nuclei of an image at its own size: ``labels`` (H, W) int32 1..K, ``scores`` (K,),
    ``prediction`` (what the model gave for the pass kept, at its scale), ``choice``."""

    labels: np.ndarray
    scores: np.ndarray
    prediction: Any
    choice: ScaleChoice


def check_diameter(diameter: Optional[float], model_diameter: float) -> None:
    """ValueError, one line naming ``--diameter``, unless ``diameter`` is None, or a finite
    number > 0 for a model that knows its nucleus diameter."""
    if diameter is None:
        return
    if not math.isfinite(diameter) or diameter <= 0:
        raise ValueError(f"--diameter must be a number of pixels > 0, got {diameter}")
    if not model_diameter or model_diameter <= 0:
        raise ValueError(f"--diameter {diameter:g}: this model does not say the nucleus diameter "
                         f"it was trained on (INPUT.NUCLEUS_DIAMETER is 0), so there is nothing "
                         f"to rescale to; leave --diameter out, or set INPUT.NUCLEUS_DIAMETER")


def clamp_scale(scale: float) -> float:
    low, high = SCALE_LIMITS
    return float(min(max(scale, low), high))


def scale_image(rgb: np.ndarray, scale: float) -> np.ndarray:
    """``rgb`` resized by ``scale`` (area averaging to shrink, bilinear to enlarge)."""
    if scale == 1.0:
        return rgb
    height, width = rgb.shape[:2]
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    method = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
    return np.ascontiguousarray(cv2.resize(rgb, size, interpolation=method))


def resize_labels(labels: np.ndarray, shape: Tuple[int, int]) -> np.ndarray:
    """A label image resized to ``shape`` by nearest neighbour (pixel centres)."""
    if labels.shape == tuple(shape):
        return labels
    rows = np.minimum(((np.arange(shape[0]) + 0.5) * labels.shape[0] / shape[0]).astype(np.intp),
                      labels.shape[0] - 1)
    cols = np.minimum(((np.arange(shape[1]) + 0.5) * labels.shape[1] / shape[1]).astype(np.intp),
                      labels.shape[1] - 1)
    return labels[rows[:, None], cols[None, :]]


def compact_labels(labels: np.ndarray, scores: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Labels renumbered 1..K in their order where some vanished (a resize), scores kept
    with them."""
    present = np.unique(labels)
    present = present[present > 0]
    if present.size == scores.size:
        return labels.astype(np.int32, copy=False), scores
    lookup = np.zeros(max(int(labels.max()), scores.size) + 1, dtype=np.int32)
    lookup[present] = np.arange(1, present.size + 1, dtype=np.int32)
    return lookup[labels], scores[present - 1]


def median_diameter(labels: np.ndarray,
                    min_count: int = MIN_NUCLEI_TO_ESTIMATE) -> Optional[float]:
    """The median equivalent diameter (``2 sqrt(area / pi)``, px) of the nuclei of ``labels``,
    None for fewer than ``min_count``."""
    areas = np.bincount(labels.ravel())[1:]
    return diameter_of_areas(areas[areas > 0], min_count)


def diameter_of_areas(areas: np.ndarray,
                      min_count: int = MIN_NUCLEI_TO_ESTIMATE) -> Optional[float]:
    """The median equivalent diameter (px) of nuclei of these ``areas`` (px), None for fewer
    than ``min_count``."""
    areas = np.asarray(areas, dtype=np.float64)
    if areas.size < min_count:
        return None
    return float(np.median(2.0 * np.sqrt(areas / np.pi)))


def estimated_scale(model_diameter: float, estimate: float) -> float:
    """The scale a first pass's ``estimate`` (px) asks for: 1 when ``model_diameter /
    estimate`` lies in :data:`KEEP_RANGE` (the first pass stands), else that ratio clamped."""
    needed = model_diameter / estimate
    return 1.0 if KEEP_RANGE[0] <= needed <= KEEP_RANGE[1] else clamp_scale(needed)


def _at_scale(predict: Callable[[np.ndarray], Any], rgb: np.ndarray, scale: float):
    prediction = predict(scale_image(rgb, scale))
    labels = resize_labels(prediction.labels, rgb.shape[:2])
    labels, scores = compact_labels(labels, np.asarray(prediction.scores))
    return labels, scores, prediction


def predict_at_scale(predict: Callable[[np.ndarray], Any], rgb: np.ndarray,
                     model_diameter: float, diameter: Optional[float] = None) -> Scaled:
    """Run ``predict`` (an ``(h, w, 3)`` image -> an object with ``labels`` and ``scores``) on
    ``rgb`` at the scale its nuclei need (module docstring); the labels at ``rgb``'s size."""
    check_diameter(diameter, model_diameter)
    if not model_diameter or model_diameter <= 0:
        labels, scores, prediction = _at_scale(predict, rgb, 1.0)
        return Scaled(labels, scores, prediction, ScaleChoice(None, UNKNOWN, 1.0))
    if diameter is not None:
        scale = clamp_scale(model_diameter / diameter)
        labels, scores, prediction = _at_scale(predict, rgb, scale)
        return Scaled(labels, scores, prediction, ScaleChoice(float(diameter), GIVEN, scale))
    labels, scores, prediction = _at_scale(predict, rgb, 1.0)
    estimate = median_diameter(labels)
    if estimate is None:
        return Scaled(labels, scores, prediction, ScaleChoice(None, TOO_FEW, 1.0))
    scale = estimated_scale(model_diameter, estimate)
    if scale == 1.0:
        return Scaled(labels, scores, prediction, ScaleChoice(estimate, ESTIMATED, 1.0))
    labels, scores, prediction = _at_scale(predict, rgb, scale)
    return Scaled(labels, scores, prediction, ScaleChoice(estimate, ESTIMATED, scale, passes=2))
