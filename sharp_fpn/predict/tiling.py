"""Tiles with overlap, and stitching per-tile predictions into one image (numpy, scikit-image).

Large images are predicted tile by tile. Along each axis, ``n`` tiles of ``tile`` pixels are
spread evenly so that neighbours overlap by at least ``overlap`` pixels (every tile has the
same size, so the model sees every tile at the same scale). Each tile *owns* a core: the
overlap between two neighbours is split at its middle, and the image border belongs to the
tile touching it. The cores partition the image.

Instances (Mask R-CNN): a tile keeps exactly the instances whose box centre lies in its core
(:func:`stitch_instances`). Why this is exact for every nucleus whose extent along each axis is
at most the overlap (``e <= overlap``): take two neighbours along one axis, the first ending at
``b1``, the second starting at ``a2``, overlap ``o = b1 - a2 >= overlap``, core boundary ``m =
(a2 + b1) / 2``. A nucleus ``[s, s + e)`` with its centre ``c >= m`` starts at ``c - e / 2 >= m
- o / 2 = a2``, so the second tile sees it whole; with ``c < m`` it ends before ``m + o / 2 =
b1``, so the first tile sees it whole. A tile that sees it cut by its border sees a piece
``[a2, s + e)`` whose centre ``(a2 + s + e) / 2 < (a2 + b1) / 2 = m`` lies outside its core
(symmetrically for the first tile), so a cut piece is never kept; in 2-D a piece cut along one
axis has its centre outside the core along that axis. Every tile that sees the nucleus whole
computes the same centre, which lies in exactly one core: the nucleus is kept once, whole.
Larger nuclei may be cut or kept twice; the residual overlaps are then resolved by score as
:func:`sharp_fpn.metrics.labels_from_instances` does (better instances take the
disputed pixels), so the label image never holds overlapping nuclei; an instance left with
too little of its own mask can be dropped as a duplicate (``min_kept_fraction``). Choose
``overlap`` at least the largest nucleus diameter.

Dense maps (semantic models): every pixel is taken from the tile whose core holds the pixel's
centre (:func:`stitch_cores`); the labels are then found once on the whole map, so nothing is
cut at all, provided the model's view around a pixel (its receptive field) ends within half
the overlap.

Coordinates: ``(row, column)``, pixel ``(y, x)`` covers ``[y, y + 1) x [x, x + 1)``; boxes are
``(top, left, bottom, right)`` with bottom and right exclusive.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, NamedTuple, Optional, Sequence, Tuple

import cv2
import numpy as np
from skimage.measure import label as connected_components

from .image_io import ImageError

__all__ = [
    "InstanceSet",
    "Stitched",
    "Tile",
    "TileError",
    "axis_spans",
    "keep_largest_components",
    "paste_in_boxes",
    "stitch_cores",
    "stitch_instances",
    "tile_grid",
]


class TileError(ImageError):
    """The model failed on one tile (the message names the tile; the run names the image)."""


@dataclass(frozen=True)
class Tile:
    """One tile: the pixels ``[top, bottom) x [left, right)`` and the core it owns.

    ``core`` = ``(top, left, bottom, right)`` in continuous image coordinates (half-integers
    where an overlap has odd width); the cores of a grid partition the image.
    """

    top: int
    left: int
    bottom: int
    right: int
    core: Tuple[float, float, float, float]

    @property
    def shape(self) -> Tuple[int, int]:
        """``(height, width)`` of the tile in pixels."""
        return self.bottom - self.top, self.right - self.left

    @property
    def slices(self) -> Tuple[slice, slice]:
        """Index of the tile in the image: ``image[tile.slices]``."""
        return slice(self.top, self.bottom), slice(self.left, self.right)

    def owns(self, y: np.ndarray, x: np.ndarray) -> np.ndarray:
        """Whether image points ``(y, x)`` (arrays of the same shape) lie in the core."""
        top, left, bottom, right = self.core
        return (y >= top) & (y < bottom) & (x >= left) & (x < right)


def axis_spans(length: int, tile: int, overlap: int) -> List[Tuple[int, int]]:
    """Tile spans ``[start, end)`` along one axis of ``length`` pixels.

    The fewest tiles of ``tile`` pixels whose neighbours overlap by at least ``overlap``,
    spread evenly from ``0`` to ``length``. ``tile <= 0`` or ``tile >= length``: one span,
    the whole axis.

    Raises:
        ValueError: ``overlap`` is negative or not smaller than ``tile``.
    """
    if length <= 0:
        raise ValueError(f"axis length must be positive, got {length}")
    if tile <= 0 or tile >= length:
        return [(0, length)]
    if not 0 <= overlap < tile:
        raise ValueError(f"overlap must be in [0, tile) = [0, {tile}), got {overlap}")
    count = math.ceil((length - overlap) / (tile - overlap))
    # even spacing <= tile - overlap (module docstring), so every overlap is >= `overlap`
    starts = [round(k * (length - tile) / (count - 1)) for k in range(count)]
    return [(start, start + tile) for start in starts]


def _axis_cores(spans: Sequence[Tuple[int, int]], length: int) -> List[Tuple[float, float]]:
    """Core ``[low, high)`` of each span: overlaps split at their middle, borders included."""
    bounds = [0.0]
    bounds += [(nxt[0] + cur[1]) / 2 for cur, nxt in zip(spans[:-1], spans[1:])]
    bounds.append(float(length))
    return list(zip(bounds[:-1], bounds[1:]))


def tile_grid(height: int, width: int, tile: int, overlap: int) -> List[Tile]:
    """Row-major tiles of a ``(height, width)`` image (see :func:`axis_spans`); ``tile <= 0``
    gives one tile, the whole image."""
    rows = axis_spans(height, tile, overlap)
    cols = axis_spans(width, tile, overlap)
    row_cores = _axis_cores(rows, height)
    col_cores = _axis_cores(cols, width)
    return [
        Tile(top, left, bottom, right, (core_y[0], core_x[0], core_y[1], core_x[1]))
        for (top, bottom), core_y in zip(rows, row_cores)
        for (left, right), core_x in zip(cols, col_cores)
    ]


@dataclass
class InstanceSet:
    """Instances found in one tile, each mask cut to its tight box (tile coordinates).

    Attributes:
        boxes: ``(N, 4)`` int64 ``(top, left, bottom, right)``, bottom/right exclusive.
        masks: ``N`` bool arrays, ``masks[i].shape == (bottom - top, right - left)``.
        scores: ``(N,)`` float64 confidences.
    """

    boxes: np.ndarray
    masks: List[np.ndarray]
    scores: np.ndarray

    def __len__(self) -> int:
        return len(self.masks)

    @classmethod
    def from_masks(cls, masks: np.ndarray, scores: np.ndarray) -> "InstanceSet":
        """From full-tile masks ``(N, h, w)`` (non-zero = inside) and scores ``(N,)``;
        instances with an empty mask are dropped."""
        masks = np.asarray(masks)
        scores = np.asarray(scores, dtype=np.float64)
        if masks.ndim != 3 or scores.shape != (masks.shape[0],):
            raise ValueError(
                f"masks must be (N, h, w) and scores (N,), got {masks.shape} and {scores.shape}"
            )
        boxes, crops, kept = [], [], []
        for i, mask in enumerate(masks):
            rows = np.flatnonzero(mask.any(axis=1))
            if rows.size == 0:
                continue
            cols = np.flatnonzero(mask.any(axis=0))
            box = (rows[0], cols[0], rows[-1] + 1, cols[-1] + 1)
            boxes.append(box)
            crops.append(mask[box[0] : box[2], box[1] : box[3]] != 0)
            kept.append(scores[i])
        return cls(np.asarray(boxes, dtype=np.int64).reshape(-1, 4), crops,
                   np.asarray(kept, dtype=np.float64))

    @classmethod
    def from_box_masks(
        cls,
        boxes: np.ndarray,
        probabilities: np.ndarray,
        scores: np.ndarray,
        shape: Tuple[int, int],
        threshold: float = 0.5,
    ) -> "InstanceSet":
        """From Mask R-CNN's own output: ``(N, 4)`` float ``(x0, y0, x1, y1)`` boxes in the
        tile's pixels, ``(N, M, M)`` mask probabilities over each box and ``(N,)`` scores
        (:func:`paste_in_boxes`); instances left with an empty mask are dropped."""
        scores = np.asarray(scores, dtype=np.float64)
        pasted = paste_in_boxes(boxes, probabilities, shape, threshold)
        kept = [i for i, (box, _) in enumerate(pasted) if box is not None]
        return cls(np.asarray([pasted[i][0] for i in kept], dtype=np.int64).reshape(-1, 4),
                   [pasted[i][1] for i in kept], scores[kept])

    def centres(self) -> Tuple[np.ndarray, np.ndarray]:
        """Box centres ``(y, x)``, each ``(N,)`` float64, tile coordinates."""
        return (self.boxes[:, 0] + self.boxes[:, 2]) / 2, (self.boxes[:, 1] + self.boxes[:, 3]) / 2


def paste_in_boxes(
    boxes: np.ndarray, probabilities: np.ndarray, shape: Tuple[int, int], threshold: float = 0.5
) -> List[Tuple[Optional[Tuple[int, int, int, int]], Optional[np.ndarray]]]:
    """Each low-resolution mask brought to its box: ``(tight box, bool crop)`` per instance,
    ``(None, None)`` where nothing reaches ``threshold``.

    The pixels are those detectron2's ``paste_masks_in_image`` gives (bilinear sampling of
    the ``M x M`` probabilities at each pixel centre, ``align_corners=False``, zero outside the
    mask, then ``>= threshold``), computed only over each box (``cv2.remap``), never as ``N``
    full-size masks: 500 nuclei of a 1024 x 1024 tile would be 500 MB of masks and most of the
    time of a prediction.

    Args:
        boxes: ``(N, 4)`` ``(x0, y0, x1, y1)`` in pixels of an image of ``shape`` (H, W).
        probabilities: ``(N, M, M')`` mask probabilities, row 0 at ``y0``, column 0 at ``x0``.
        threshold: a pixel belongs to the nucleus where its probability is at least this.
    """
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    probabilities = np.asarray(probabilities, dtype=np.float32)
    if probabilities.ndim != 3 or len(probabilities) != len(boxes):
        raise ValueError(f"expected (N, M, M) probabilities for {len(boxes)} boxes, got "
                         f"{probabilities.shape}")
    height, width = shape
    out: List[Tuple[Optional[Tuple[int, int, int, int]], Optional[np.ndarray]]] = []
    for (x0, y0, x1, y1), mask in zip(boxes, probabilities):
        left, right = max(math.floor(x0) - 1, 0), min(math.ceil(x1) + 1, width)
        top, bottom = max(math.floor(y0) - 1, 0), min(math.ceil(y1) + 1, height)
        if right <= left or bottom <= top or x1 <= x0 or y1 <= y0:
            out.append((None, None))
            continue
        m_rows, m_cols = mask.shape
        xs = ((np.arange(left, right) + 0.5 - x0) / (x1 - x0) * m_cols - 0.5).astype(np.float32)
        ys = ((np.arange(top, bottom) + 0.5 - y0) / (y1 - y0) * m_rows - 0.5).astype(np.float32)
        map_x = np.broadcast_to(xs[None, :], (ys.size, xs.size))
        map_y = np.broadcast_to(ys[:, None], (ys.size, xs.size))
        sampled = cv2.remap(mask, np.ascontiguousarray(map_x), np.ascontiguousarray(map_y),
                            cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=0.0)
        inside = sampled >= threshold
        rows = np.flatnonzero(inside.any(axis=1))
        if rows.size == 0:
            out.append((None, None))
            continue
        cols = np.flatnonzero(inside.any(axis=0))
        crop = inside[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
        out.append(((top + int(rows[0]), left + int(cols[0]), top + int(rows[-1]) + 1,
                     left + int(cols[-1]) + 1), crop))
    return out


class Stitched(NamedTuple):
    """A label image and the score of each label."""

    labels: np.ndarray  # (H, W) int32, 0 background, 1..K nuclei by decreasing score
    scores: np.ndarray  # (K,) float64, scores[k - 1] is the score of label k


def stitch_instances(
    shape: Tuple[int, int],
    tiles: Sequence[Tile],
    sets: Sequence[InstanceSet],
    min_kept_fraction: float = 0.0,
) -> Stitched:
    """One label image from the instances found in each tile (module docstring).

    Each tile keeps the instances whose box centre lies in its core. The kept instances are
    ranked by decreasing score (ties: tile order, then order within the tile) and, best first,
    each takes the pixels of its mask that no better instance took. An instance left with no
    pixel, or with less than ``min_kept_fraction`` of its mask, is dropped (it takes nothing);
    the others are numbered 1..K in rank order. With ``min_kept_fraction=0`` and one tile this
    is :func:`~sharp_fpn.metrics.labels_from_instances` without its empty labels.

    Args:
        shape: ``(H, W)`` of the image.
        tiles: the tiles, e.g. from :func:`tile_grid`.
        sets: ``sets[k]`` holds the instances of ``tiles[k]``, in its coordinates.
        min_kept_fraction: in [0, 1]. Mask R-CNN often returns a second, lower-scoring
            detection of a nucleus that NMS let through; painting it under the better one
            leaves a sliver beside the nucleus. Requiring each instance to keep, say, half of
            its mask drops such duplicates instead.
    """
    if len(tiles) != len(sets):
        raise ValueError(f"got {len(tiles)} tiles but {len(sets)} instance sets")
    if not 0.0 <= min_kept_fraction <= 1.0:
        raise ValueError(f"min_kept_fraction must be in [0, 1], got {min_kept_fraction}")
    boxes, masks, scores = [], [], []
    for tile, found in zip(tiles, sets):
        if len(found) == 0:
            continue
        height, width = tile.shape
        if (found.boxes[:, :2] < 0).any() or (found.boxes[:, 2] > height).any() or (
            found.boxes[:, 3] > width
        ).any():
            raise ValueError(f"instance boxes reach outside their {height}x{width} tile {tile}")
        y, x = found.centres()
        keep = np.flatnonzero(tile.owns(y + tile.top, x + tile.left))
        offset = np.array([tile.top, tile.left, tile.top, tile.left])
        boxes.extend(found.boxes[keep] + offset)
        masks.extend(found.masks[i] for i in keep)
        scores.extend(found.scores[keep])
    labels = np.zeros(shape, dtype=np.int32)
    kept_scores: List[float] = []
    for i in np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable"):
        top, left, bottom, right = boxes[i]
        region = labels[top:bottom, left:right]
        free = masks[i] & (region == 0)
        count = int(free.sum())
        if count == 0 or count < min_kept_fraction * masks[i].sum():
            continue
        kept_scores.append(scores[i])
        region[free] = len(kept_scores)
    return Stitched(labels, np.asarray(kept_scores, dtype=np.float64))


def keep_largest_components(labels: np.ndarray) -> np.ndarray:
    """Each label reduced to its largest 8-connected piece; the other pieces become background.

    A nucleus is one connected region, but a predicted mask can have stray pieces (a mask
    reaching into a neighbour's box, a remainder split in two by a better instance), which
    would put a nucleus' centroid between its pieces. Ties keep the piece met first in raster
    order. ``(H, W)`` integer labels in, a new array of the same dtype out; labels keep their
    numbers.
    """
    pieces = connected_components(labels, background=0, connectivity=2)
    count = int(pieces.max())
    if count == 0:
        return labels.copy()
    flat = pieces.ravel()
    owner = np.zeros(count + 1, dtype=np.int64)
    owner[flat] = labels.ravel()
    size = np.bincount(flat, minlength=count + 1)
    ids = np.arange(1, count + 1)
    # by label, then largest first, then first met; keep the first piece of each label
    order = ids[np.lexsort((ids, -size[1:], owner[1:]))]
    first = np.ones(order.size, dtype=bool)
    first[1:] = owner[order[1:]] != owner[order[:-1]]
    keep = np.zeros(count + 1, dtype=bool)
    keep[order[first]] = True
    return np.where(keep[pieces], labels, 0).astype(labels.dtype)


def stitch_cores(
    shape: Tuple[int, int], tiles: Sequence[Tile], maps: Sequence[np.ndarray],
    out: Optional[np.ndarray] = None,
) -> np.ndarray:
    """One dense map from per-tile maps: each pixel from the tile whose core holds its centre.

    Args:
        shape: ``(H, W)`` of the image.
        tiles: the tiles (their cores must partition the image, as :func:`tile_grid`'s do).
        maps: ``maps[k]`` of shape ``tiles[k].shape`` (any dtype; trailing dims allowed).
        out: array to fill, ``(H, W, ...)``; default a new one of ``maps[0]``'s dtype.

    Returns:
        The ``(H, W, ...)`` map.
    """
    if len(tiles) != len(maps) or not maps:
        raise ValueError(f"got {len(tiles)} tiles and {len(maps)} maps; need as many, >= 1")
    if out is None:
        out = np.zeros(tuple(shape) + maps[0].shape[2:], dtype=maps[0].dtype)
    for tile, values in zip(tiles, maps):
        if values.shape[:2] != tile.shape:
            raise ValueError(f"map of shape {values.shape} for a tile of shape {tile.shape}")
        top, left, bottom, right = tile.core
        # pixel y is owned when top <= y + 0.5 < bottom
        y0, y1 = math.ceil(top - 0.5), math.ceil(bottom - 0.5)
        x0, x1 = math.ceil(left - 0.5), math.ceil(right - 0.5)
        out[y0:y1, x0:x1] = values[y0 - tile.top : y1 - tile.top, x0 - tile.left : x1 - tile.left]
    return out
