"""Metrics for nuclei segmentation.

The metric functions (pure numpy) are exported here and import neither torch nor detectron2;
the detectron2 evaluator is imported from :mod:`sharp_fpn.evaluation.evaluators`.
"""
from .metrics import (
    DSB_THRESHOLDS,
    DSBCounts,
    dataset_dsb_score,
    dsb_score,
    dsb_threshold_counts,
    foreground_dice,
    foreground_iou,
    labels_from_instances,
)

__all__ = [
    "DSB_THRESHOLDS",
    "DSBCounts",
    "dataset_dsb_score",
    "dsb_score",
    "dsb_threshold_counts",
    "foreground_dice",
    "foreground_iou",
    "labels_from_instances",
]
