"""Foreground IoU and Dice of a semantic (binary) nuclei model, as a detectron2 evaluator.

The semantic task of the paper (Table 1, Table 2's upper half) has one ground truth per image:
the union of its nucleus masks (pytorch-nested-unet ORs the masks of an image into one). The
registered datasets hold instance annotations (COCO json), so :func:`union_mask` builds it
from a dataset dict; the training mapper and this evaluator both use it.
"""
from __future__ import annotations

import logging
from typing import Any, Dict, List, Mapping, Optional, Sequence

import numpy as np

from .evaluators import PerImageEvaluator, annotation_mask
from ..metrics import foreground_dice, foreground_iou

__all__ = ["CSV_COLUMNS", "SemanticIoUEvaluator", "union_mask"]

logger = logging.getLogger(__name__)

#: Columns of ``semantic_per_image.csv``: IoU and Dice as fractions in [0, 1].
CSV_COLUMNS = ("file_name", "image_id", "iou", "dice")
CSV_NAME = "semantic_per_image.csv"


def union_mask(
    annotations: Sequence[Mapping[str, Any]], height: int, width: int, where: str = ""
) -> np.ndarray:
    """The OR of the instance masks of one image: a ``(height, width)`` bool mask.

    Args:
        annotations: detectron2/COCO annotations, each with a ``"segmentation"`` (RLE dict,
            polygons or a ``(height, width)`` array; see ``annotation_mask``). An image without
            annotations gives an all-background mask.
        height, width: the image's size in pixels.
        where: names the image in error messages.
    """
    mask = np.zeros((height, width), dtype=bool)
    for k, ann in enumerate(annotations):
        if "segmentation" not in ann:
            raise ValueError(f"{where}: annotation {k} has no 'segmentation'")
        mask |= annotation_mask(ann["segmentation"], height, width, where)
    return mask


class SemanticIoUEvaluator(PerImageEvaluator):
    """Per-image foreground IoU and Dice of ``output["sem_seg"] > threshold`` against the union
    of the image's true nucleus masks, averaged over images.

    The prediction is ``output["sem_seg"]``: ``(1, height, width)`` foreground probabilities at
    the original image size (``SemanticNucleiSegmentor``'s output). The ground truth is
    :func:`union_mask` of the input's ``"annotations"``, or, when the test mapper dropped them,
    of the dataset dict with the same ``"image_id"`` in ``DatasetCatalog.get(dataset_name)``.

    ``evaluate()`` returns ``{"semantic": {"IoU", "Dice", "num_images"}}``: means over images in
    percent, as the paper's Tables 1 and 2 (e.g. UNet# 92.67). An image where both the truth and
    the prediction are empty scores 100 (``foreground_iou``'s convention).
    """

    csv_name = CSV_NAME
    csv_columns = CSV_COLUMNS

    def __init__(
        self,
        dataset_name: str,
        threshold: float = 0.5,
        output_dir: Optional[str] = None,
        distributed: bool = True,
    ) -> None:
        """
        Args:
            dataset_name: name registered in ``DatasetCatalog``; read only when the inputs
                carry no annotations.
            threshold: a pixel is foreground where its probability is above it.
            output_dir: if given, ``evaluate()`` writes ``semantic_per_image.csv`` there (one
                row per image, for boxplots).
            distributed: gather the per-image values of all processes in ``evaluate()``; only
                the main process then returns results.
        """
        if not 0.0 <= threshold < 1.0:
            raise ValueError(f"threshold must be in [0, 1), got {threshold}")
        super().__init__(dataset_name, distributed, output_dir)
        self._threshold = float(threshold)

    def process(self, inputs: List[Dict[str, Any]], outputs: List[Dict[str, Any]]) -> None:
        """Score a batch: ``inputs`` are dataset dicts, ``outputs`` hold ``"sem_seg"``."""
        for record, output in zip(inputs, outputs):
            gt = self._ground_truth(record)
            where = str(gt.get("file_name", f"image_id {gt.get('image_id')!r}"))
            height, width = int(gt["height"]), int(gt["width"])
            truth = union_mask(gt["annotations"], height, width, where)
            probabilities = output["sem_seg"]
            if tuple(probabilities.shape) != (1, height, width):
                raise ValueError(
                    f"{where}: sem_seg has shape {tuple(probabilities.shape)}, expected "
                    f"(1, {height}, {width}); run sem_seg_postprocess to the original size"
                )
            prediction = (probabilities[0] > self._threshold).cpu().numpy()
            self._records.append(
                {
                    "file_name": str(gt.get("file_name", "")),
                    "image_id": gt.get("image_id", ""),
                    "iou": foreground_iou(truth, prediction),
                    "dice": foreground_dice(truth, prediction),
                }
            )

    def evaluate(self) -> Dict[str, Dict[str, float]]:
        """Means over all images (of all processes), in percent; ``{}`` off the main process
        or when no image was processed. Writes the per-image CSV when given an output_dir."""
        records = self._gathered_records()
        if records is None:
            return {}
        result = {
            "IoU": 100.0 * float(np.mean([r["iou"] for r in records])),
            "Dice": 100.0 * float(np.mean([r["dice"] for r in records])),
            "num_images": len(records),
        }
        logger.info(
            f"[SemanticIoUEvaluator] {self._dataset_name}: foreground IoU {result['IoU']:.2f}%, "
            f"Dice {result['Dice']:.2f}% over {len(records)} images (threshold {self._threshold})"
        )
        return {"semantic": result}
