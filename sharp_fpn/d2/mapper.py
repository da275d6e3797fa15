"""Training and evaluation read images exactly as prediction does.

detectron2's loaders read an image with PIL and convert it to 8-bit RGB, which clips a 16-bit
image at 255: a 16-bit DSB2018 image, whose values are mostly far above 255, reached the model
99.7 % white in training, while ``tools/predict.py`` stretched the same file to 0..255
(:mod:`sharp_fpn.predict.image_io`). Here every loader of sharp-fpn (:class:`NucleiDatasetMapper`
for Mask R-CNN, :class:`~.semantic_data.SemanticNucleiMapper` for the semantic models) reads
through :func:`read_image`, which is predict's reader: :func:`sharp_fpn.predict.image_io.
load_image` (any bit depth, gray/RGB/RGBA, PNG/TIFF/JPEG; its normalisation, whatever it
becomes, applies to training too), then the config's channel order. An 8-bit image gives the
same pixels as detectron2's reader did (``read_image`` of detectron2 also applies a JPEG's
EXIF orientation, which predict does not: the annotations' sizes are those of the stored
image, so training and prediction now agree on that too).
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import numpy as np
import torch
from detectron2.config import configurable
from detectron2.data import DatasetMapper
from detectron2.data import detection_utils as utils
from detectron2.data import transforms as T

from .augment import recipe_augmentations, uses_recipe
from .config import check_value
from ..predict.image_io import load_image, percentile_normalise

__all__ = ["IMAGE_FORMATS", "NORMALIZATIONS", "NucleiDatasetMapper", "check_image_format",
           "normalization", "read_image"]

#: ``INPUT.FORMAT`` values the readers support (those of every sharp-fpn config).
IMAGE_FORMATS = ("BGR", "RGB")
#: ``INPUT.NORMALIZE`` values: off, or the per-image percentile normalisation.
NORMALIZATIONS = ("", "percentile")


def normalization(cfg) -> Optional[Tuple[float, float]]:
    """The percentiles ``INPUT.NORMALIZE`` maps to 0 and 255, or None when it is off."""
    check_value("INPUT.NORMALIZE", cfg.INPUT.NORMALIZE, cfg.INPUT.NORMALIZE in NORMALIZATIONS,
                f"one of {NORMALIZATIONS}")
    if not cfg.INPUT.NORMALIZE:
        return None
    low, high = (float(v) for v in cfg.INPUT.NORMALIZE_PERCENTILES)
    check_value("INPUT.NORMALIZE_PERCENTILES", [low, high], 0.0 <= low < high <= 100.0,
                "[low, high] percentiles with 0 <= low < high <= 100")
    return low, high


def check_image_format(image_format: str) -> str:
    """``image_format`` if the readers support it; else ValueError naming ``INPUT.FORMAT``."""
    if image_format not in IMAGE_FORMATS:
        raise ValueError(
            f"INPUT.FORMAT: sharp-fpn reads images as {' or '.join(IMAGE_FORMATS)}, got "
            f"{image_format!r}"
        )
    return image_format


def read_image(file_name: str, image_format: str) -> np.ndarray:
    """The image file as a model of ``image_format`` gets it: ``(H, W, 3)`` uint8.

    The pixels are predict's (:func:`~sharp_fpn.predict.image_io.load_image`, its ``rgb``),
    channels in ``image_format`` order (``"BGR"`` or ``"RGB"``).

    Raises:
        ImageReadError: the file cannot be read as one 2-D image (the message names it).
        ValueError: ``image_format`` is not supported.
    """
    check_image_format(image_format)
    rgb = load_image(Path(file_name)).rgb
    if image_format == "BGR":
        return np.ascontiguousarray(rgb[:, :, ::-1])
    return rgb


class NucleiDatasetMapper(DatasetMapper):
    """detectron2's :class:`DatasetMapper` with the image read by :func:`read_image`.

    Everything else is detectron2's: the augmentations of ``INPUT.*`` (``from_config``),
    the annotations turned into ``Instances`` (its ``_transform_annotations``), a
    ``sem_seg_file_name`` read as a label map, proposals, and what is dropped at test time.
    The shipped models' recipe adds, when its keys are set: the geometric augmentations of
    :mod:`.augment` (``INPUT.RESCALE_RANGE``, ``CROP``, ``DIHEDRAL``) in place of detectron2's,
    then in training the photometric ones (``INPUT.PHOTOMETRIC``:
    :class:`sharp_fpn.data.augment.PhotometricAugmentation`), then in training and at test the
    per-image percentile normalisation (``INPUT.NORMALIZE``), which the predictor applies too.
    """

    @configurable
    def __init__(
        self,
        is_train: bool = True,
        *,
        photometric: Optional[Any] = None,
        normalize: Optional[Tuple[float, float]] = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(is_train, **kwargs)
        check_image_format(self.image_format)
        self.photometric = photometric
        self.normalize = normalize

    @classmethod
    def from_config(cls, cfg, is_train: bool = True) -> Dict[str, Any]:
        ret = super().from_config(cfg, is_train)
        if uses_recipe(cfg):
            ret["augmentations"] = recipe_augmentations(cfg, is_train)
        if is_train and cfg.INPUT.PHOTOMETRIC:
            from ..data.augment import PhotometricAugmentation

            ret["photometric"] = PhotometricAugmentation()
        ret["normalize"] = normalization(cfg)
        return ret

    def _intensities(self, image: np.ndarray) -> np.ndarray:
        """The photometric augmentation (training) and the normalisation, in that order."""
        if self.photometric is not None:
            bgr = self.image_format == "BGR"
            rgb = self.photometric(image[:, :, ::-1] if bgr else image)
            image = np.ascontiguousarray(rgb[:, :, ::-1]) if bgr else rgb
        if self.normalize is not None:
            image = percentile_normalise(image, self.normalize)[0]
        return image

    def __call__(self, dataset_dict: Dict[str, Any]) -> Dict[str, Any]:
        record = copy.deepcopy(dataset_dict)  # its annotations are transformed in place
        image = read_image(record["file_name"], self.image_format)
        utils.check_image_size(record, image)
        label_map = None
        if "sem_seg_file_name" in record:  # a label map: values are classes, not intensities
            label_map = utils.read_image(record.pop("sem_seg_file_name"), "L").squeeze(2)
        augmented = T.AugInput(image, sem_seg=label_map)
        transforms = self.augmentations(augmented)
        image, label_map = self._intensities(augmented.image), augmented.sem_seg
        shape = image.shape[:2]
        record["image"] = torch.as_tensor(np.ascontiguousarray(image.transpose(2, 0, 1)))
        if label_map is not None:
            record["sem_seg"] = torch.as_tensor(label_map.astype("long"))
        if self.proposal_topk is not None:
            utils.transform_proposals(record, shape, transforms, proposal_topk=self.proposal_topk)
        if not self.is_train:
            record.pop("annotations", None)
            record.pop("sem_seg_file_name", None)
            return record
        if "annotations" in record:
            self._transform_annotations(record, transforms, shape)
        return record
