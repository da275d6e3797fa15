"""Instance and foreground metrics for nuclei segmentation, in pure numpy.

* :func:`dsb_score` is the 2018 Data Science Bowl challenge metric (SPEC section 4): for one
  image and each IoU threshold ``t`` in 0.50, 0.55, ..., 0.95, a predicted nucleus matches a
  true one when their IoU is strictly greater than ``t``; the image scores the mean over the
  thresholds of ``TP(t) / (TP(t) + FP(t) + FN(t))``. Kaggle then averages over images
  (:func:`dataset_dsb_score`).
* :func:`foreground_iou` and :func:`foreground_dice` compare the union of the predicted
  instances with the union of the true ones (the paper's Table 2 IoU / Dice).
* :func:`labels_from_instances` turns possibly overlapping instance masks (as Mask R-CNN
  predicts them) into the non-overlapping label image the DSB metric expects.

All inputs are numpy arrays of shape ``(H, W)`` (pixels); scores are fractions in [0, 1].
Nothing here imports torch or detectron2.
"""
from __future__ import annotations

from typing import Iterable, NamedTuple, Optional, Tuple

import numpy as np

__all__ = [
    "DSB_THRESHOLDS",
    "DSBCounts",
    "dsb_threshold_counts",
    "dsb_score",
    "dataset_dsb_score",
    "foreground_iou",
    "foreground_dice",
    "labels_from_instances",
]

#: IoU thresholds of the DSB2018 metric, 0.50 to 0.95 in steps of 0.05, each the double
#: nearest to its decimal value, so that an IoU of exactly 13/20 is *not* above 0.65.
DSB_THRESHOLDS: Tuple[float, ...] = tuple(round(0.5 + 0.05 * k, 2) for k in range(10))


class DSBCounts(NamedTuple):
    """Matching counts of one image at every DSB threshold; each array has shape ``(10,)``.

    ``tp[k] + fn[k]`` is the number of true nuclei and ``tp[k] + fp[k]`` the number of
    predicted ones, at every threshold ``thresholds[k]``.
    """

    thresholds: np.ndarray  # (10,) float64, IoU thresholds
    tp: np.ndarray  # (10,) int64, matched pairs (IoU > threshold)
    fp: np.ndarray  # (10,) int64, predicted nuclei left unmatched
    fn: np.ndarray  # (10,) int64, true nuclei left unmatched

    def precision(self) -> np.ndarray:
        """Per-threshold ``TP / (TP + FP + FN)``, shape ``(10,)``; 1.0 where all three are 0."""
        total = self.tp + self.fp + self.fn
        return np.where(total > 0, self.tp / np.maximum(total, 1), 1.0)


def _check_label_image(labels: np.ndarray, name: str) -> None:
    if not isinstance(labels, np.ndarray):
        raise ValueError(f"{name} must be a numpy array, got {type(labels).__name__}")
    if labels.ndim != 2:
        raise ValueError(f"{name} must be a 2-D (H, W) label image, got shape {labels.shape}")
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(
            f"{name} must have an integer dtype (0 = background, k > 0 = nucleus k), "
            f"got {labels.dtype}; convert a binary mask with .astype(np.int32)"
        )
    if labels.size and labels.min() < 0:
        raise ValueError(f"{name} has negative labels (min {labels.min()}); labels must be >= 0")


def _consecutive(labels: np.ndarray) -> Tuple[np.ndarray, int]:
    """Relabel to 0 (background) and 1..n; returns the flat int64 relabelled image and n."""
    values, inverse = np.unique(labels.ravel(), return_inverse=True)
    inverse = inverse.astype(np.int64).ravel()
    if values.size == 0:  # zero-pixel image
        return inverse, 0
    if values[0] != 0:  # no background pixel: first label must become 1
        inverse += 1
        return inverse, int(values.size)
    return inverse, int(values.size) - 1


def _match_ious(true_labels: np.ndarray, pred_labels: np.ndarray) -> Tuple[np.ndarray, int, int]:
    """IoUs of all overlapping (true, predicted) nucleus pairs, from the overlap histogram.

    Returns ``(ious, n_true, n_pred)``: ``ious`` has one float64 entry per pair of nuclei that
    share at least one pixel (pairs that do not overlap have IoU 0 and can never match).
    """
    _check_label_image(true_labels, "true_labels")
    _check_label_image(pred_labels, "pred_labels")
    if true_labels.shape != pred_labels.shape:
        raise ValueError(
            f"true_labels has shape {true_labels.shape} but pred_labels has shape "
            f"{pred_labels.shape}; they must be label images of the same (H, W)"
        )
    true_ids, n_true = _consecutive(true_labels)
    pred_ids, n_pred = _consecutive(pred_labels)
    # hist[i, j] = number of pixels with true label i and predicted label j (0 = background).
    hist = np.bincount(
        true_ids * (n_pred + 1) + pred_ids, minlength=(n_true + 1) * (n_pred + 1)
    ).reshape(n_true + 1, n_pred + 1)
    true_area = hist[1:, :].sum(axis=1)  # (n_true,)
    pred_area = hist[:, 1:].sum(axis=0)  # (n_pred,)
    inter = hist[1:, 1:]
    rows, cols = np.nonzero(inter)
    overlap = inter[rows, cols]
    ious = overlap / (true_area[rows] + pred_area[cols] - overlap)
    return ious, n_true, n_pred


def dsb_threshold_counts(true_labels: np.ndarray, pred_labels: np.ndarray) -> DSBCounts:
    """TP, FP and FN of one image at each DSB threshold (for reports and debugging).

    Args:
        true_labels: ``(H, W)`` integer label image of the ground truth, 0 = background; the
            labels need not be consecutive.
        pred_labels: ``(H, W)`` integer label image of the prediction, same convention.

    Since a threshold ``t >= 0.5`` admits at most one partner per nucleus (two nuclei with
    IoU > 0.5 to the same mask would each cover more than half of it, and labels do not
    overlap), ``TP(t)`` is simply the number of pairs with IoU > t.
    """
    ious, n_true, n_pred = _match_ious(true_labels, pred_labels)
    thresholds = np.asarray(DSB_THRESHOLDS, dtype=np.float64)
    tp = (ious[None, :] > thresholds[:, None]).sum(axis=1).astype(np.int64)
    return DSBCounts(thresholds=thresholds, tp=tp, fp=n_pred - tp, fn=n_true - tp)


def dsb_score(true_labels: np.ndarray, pred_labels: np.ndarray) -> float:
    """The DSB2018 challenge score of one image, in [0, 1].

    Mean over the thresholds 0.50, 0.55, ..., 0.95 of ``TP(t) / (TP(t) + FP(t) + FN(t))``,
    a match being IoU > t (strict). Both images empty gives 1.0; exactly one empty gives 0.0.

    Args:
        true_labels: ``(H, W)`` integer label image, 0 = background, nucleus ids > 0 (any
            values, not necessarily consecutive).
        pred_labels: ``(H, W)`` integer label image of the prediction. Labels are exclusive
            by construction; use :func:`labels_from_instances` for overlapping masks.

    Raises:
        ValueError: if the arrays are not 2-D, differ in shape, are not of an integer dtype,
            or hold negative labels.
    """
    return float(dsb_threshold_counts(true_labels, pred_labels).precision().mean())


def dataset_dsb_score(pairs: Iterable[Tuple[np.ndarray, np.ndarray]]) -> float:
    """The DSB2018 score of a data set: the mean of :func:`dsb_score` over its images.

    Args:
        pairs: ``(true_labels, pred_labels)`` per image, each ``(H_i, W_i)`` integer arrays.

    Raises:
        ValueError: if ``pairs`` is empty (the mean of no image is undefined).
    """
    scores = [dsb_score(true, pred) for true, pred in pairs]
    if not scores:
        raise ValueError("dataset_dsb_score got no (true_labels, pred_labels) pair")
    return float(np.mean(scores))


def _foreground_areas(true_mask: np.ndarray, pred_mask: np.ndarray) -> Tuple[int, int, int]:
    """``(|T & P|, |T|, |P|)`` in pixels, any non-zero value counting as foreground."""
    true_mask = np.asarray(true_mask)
    pred_mask = np.asarray(pred_mask)
    if true_mask.shape != pred_mask.shape:
        raise ValueError(
            f"true_mask has shape {true_mask.shape} but pred_mask has shape {pred_mask.shape}"
        )
    true_fg = true_mask != 0
    pred_fg = pred_mask != 0
    return int(np.count_nonzero(true_fg & pred_fg)), int(true_fg.sum()), int(pred_fg.sum())


def foreground_iou(true_mask: np.ndarray, pred_mask: np.ndarray) -> float:
    """Foreground IoU ``|T & P| / |T | P|`` in [0, 1] of two masks of the same shape.

    Any non-zero pixel is foreground, so label images may be passed as they are: the
    union of the predicted instances is compared with the union of the true ones. Both
    masks empty gives 1.0.
    """
    inter, true_area, pred_area = _foreground_areas(true_mask, pred_mask)
    union = true_area + pred_area - inter
    return 1.0 if union == 0 else inter / union


def foreground_dice(true_mask: np.ndarray, pred_mask: np.ndarray) -> float:
    """Foreground Dice ``2 |T & P| / (|T| + |P|)`` in [0, 1]; same conventions as
    :func:`foreground_iou` (non-zero = foreground, both empty gives 1.0)."""
    inter, true_area, pred_area = _foreground_areas(true_mask, pred_mask)
    total = true_area + pred_area
    return 1.0 if total == 0 else 2.0 * inter / total


def labels_from_instances(masks: np.ndarray, scores: Optional[np.ndarray] = None) -> np.ndarray:
    """Flatten possibly overlapping instance masks into one non-overlapping label image.

    Instances are ranked by decreasing score (ties, and ``scores=None``, keep the given
    order) and get labels 1..N in that rank: label 1 is the best-scoring instance. Each pixel
    goes to the best-ranked instance covering it, 0 where none does. An instance whose pixels
    are all taken by better ones therefore disappears from the label image.

    Args:
        masks: ``(N, H, W)`` bool masks (integer masks are read as ``!= 0``); N may be 0.
        scores: ``(N,)`` confidences, or None to rank the instances in the given order.

    Returns:
        ``(H, W)`` int32 label image, values in 0..N.

    Raises:
        ValueError: if ``masks`` is not 3-D or is floating point (threshold soft masks
            first), or ``scores`` does not have shape ``(N,)`` or holds NaN.
    """
    masks = np.asarray(masks)
    if masks.ndim != 3:
        raise ValueError(f"masks must have shape (N, H, W), got {masks.shape}")
    if not (masks.dtype == np.bool_ or np.issubdtype(masks.dtype, np.integer)):
        raise ValueError(
            f"masks must be bool or integer, got {masks.dtype}; threshold soft masks first"
        )
    n = masks.shape[0]
    if scores is None:
        order = np.arange(n)
    else:
        scores = np.asarray(scores, dtype=np.float64)
        if scores.shape != (n,):
            raise ValueError(f"scores must have shape ({n},) to match masks, got {scores.shape}")
        if np.isnan(scores).any():
            raise ValueError("scores contain NaN")
        order = np.argsort(-scores, kind="stable")
    # Paint the worst-ranked instance first so that better ones overwrite it; one (H, W)
    # temporary at a time, as N full-size masks can already take hundreds of MB.
    labels = np.zeros(masks.shape[1:], dtype=np.int32)
    for label in range(n, 0, -1):
        np.putmask(labels, masks[order[label - 1]] != 0, label)
    return labels
