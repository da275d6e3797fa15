"""Data for the semantic nuclei models: the paper's pre-processing as a detectron2 mapper.

pytorch-nested-unet (the code base UNet# grew from) ORs the masks of an image into one, resizes
images to 96x96 and augments with RandomRotate90, Flip and one of (HSV shift, brightness,
contrast); the paper lists the same (SPEC section 2). :class:`SemanticNucleiMapper` does that
on the registered instance datasets: its ``"sem_seg"`` is the union of the image's nucleus
masks (``sharp_fpn.d2.semantic_evaluator.union_mask``), so no extra label files are needed.
Images are read as prediction reads them (:func:`.mapper.read_image`: 16-bit images stretched
to 8 bits, not clipped); normalization happens in the model (``MODEL.PIXEL_MEAN``,
``MODEL.PIXEL_STD``).
"""
from __future__ import annotations

import copy
from typing import Any, Dict, List, Sequence

import cv2
import numpy as np
import torch
from detectron2.config import configurable
from detectron2.data import detection_utils as utils
from detectron2.data import transforms as T
from fvcore.transforms.transform import NoOpTransform, Transform

from .mapper import check_image_format, read_image
from .semantic_evaluator import union_mask

__all__ = [
    "HSVShiftTransform",
    "RandomChoice",
    "RandomHSVShift",
    "RandomRotate90",
    "Rot90Transform",
    "SemanticNucleiMapper",
    "build_semantic_augmentation",
]

#: albumentations' HueSaturationValue defaults (pytorch-nested-unet's), OpenCV's uint8 HSV
#: units: hue in 0..179, saturation and value in 0..255.
HSV_SHIFT_LIMITS = (20, 30, 20)
#: Range of the brightness and contrast factors (albumentations' default limit 0.2).
INTENSITY_RANGE = (0.8, 1.2)


class Rot90Transform(Transform):
    """Rotate by ``k`` quarter turns counter-clockwise, as ``np.rot90(image, k)``.

    An ``(h, w, ...)`` image becomes ``(w, h, ...)`` for odd ``k``. Exact: no interpolation.
    """

    def __init__(self, k: int, h: int, w: int):
        """
        Args:
            k: quarter turns, any int (taken modulo 4).
            h, w: size of the images it will be applied to.
        """
        super().__init__()
        self._set_attributes({"k": k % 4, "h": h, "w": w})

    def apply_image(self, img: np.ndarray) -> np.ndarray:
        """``(h, w)`` or ``(h, w, C)`` -> rotated, contiguous."""
        return np.ascontiguousarray(np.rot90(img, self.k))

    def apply_coords(self, coords: np.ndarray) -> np.ndarray:
        """``(N, 2)`` absolute ``(x, y)`` -> their place in the rotated image.

        One quarter turn of a ``w``-wide image maps ``(x, y)`` to ``(y, w - x)``.
        """
        coords = np.asarray(coords, dtype=np.float64).copy()
        width = self.w
        for turn in range(self.k):
            coords = np.stack([coords[:, 1], width - coords[:, 0]], axis=1)
            width = self.h if turn % 2 == 0 else self.w
        return coords

    def apply_segmentation(self, segmentation: np.ndarray) -> np.ndarray:
        return self.apply_image(segmentation)


class RandomRotate90(T.Augmentation):
    """Rotate by 0, 1, 2 or 3 quarter turns, each with probability 1/4 (albumentations')."""

    def get_transform(self, image: np.ndarray) -> Transform:
        k = int(np.random.randint(4))
        if k == 0:
            return NoOpTransform()
        return Rot90Transform(k, image.shape[0], image.shape[1])


class HSVShiftTransform(Transform):
    """Add constant shifts to the hue (cyclic), saturation and value of a uint8 colour image.

    Units are OpenCV's uint8 HSV: hue in 0..179 (2 degrees a step), saturation and value in
    0..255 (clipped). Geometry and segmentations are unchanged.
    """

    def __init__(self, hue: int, saturation: int, value: int, image_format: str = "BGR"):
        """
        Args:
            hue, saturation, value: the shifts.
            image_format: channel order of the images, ``"BGR"`` or ``"RGB"``.
        """
        super().__init__()
        if image_format not in ("BGR", "RGB"):
            raise ValueError(f"HSV shifts need a BGR or RGB image, got format {image_format!r}")
        self._set_attributes(
            {"hue": hue, "saturation": saturation, "value": value, "image_format": image_format}
        )

    def apply_image(self, img: np.ndarray) -> np.ndarray:
        """``(H, W, 3)`` uint8 -> the shifted image, same shape and dtype."""
        if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
            raise ValueError(
                f"HSVShiftTransform takes (H, W, 3) uint8 images, got {img.dtype} {img.shape}"
            )
        to_hsv, from_hsv = (
            (cv2.COLOR_BGR2HSV, cv2.COLOR_HSV2BGR)
            if self.image_format == "BGR"
            else (cv2.COLOR_RGB2HSV, cv2.COLOR_HSV2RGB)
        )
        hsv = cv2.cvtColor(np.ascontiguousarray(img), to_hsv).astype(np.int16)
        hsv[..., 0] = (hsv[..., 0] + self.hue) % 180
        hsv[..., 1] = np.clip(hsv[..., 1] + self.saturation, 0, 255)
        hsv[..., 2] = np.clip(hsv[..., 2] + self.value, 0, 255)
        return cv2.cvtColor(hsv.astype(np.uint8), from_hsv)

    def apply_coords(self, coords: np.ndarray) -> np.ndarray:
        return coords

    def apply_segmentation(self, segmentation: np.ndarray) -> np.ndarray:
        return segmentation


class RandomHSVShift(T.Augmentation):
    """Shift hue, saturation and value by uniform random integers within ``+-limits``."""

    def __init__(self, limits: Sequence[int] = HSV_SHIFT_LIMITS, image_format: str = "BGR"):
        super().__init__()
        self._init({"limits": tuple(limits), "image_format": image_format})

    def get_transform(self, image: np.ndarray) -> Transform:
        hue, saturation, value = (int(np.random.randint(-m, m + 1)) for m in self.limits)
        return HSVShiftTransform(hue, saturation, value, self.image_format)


class RandomChoice(T.Augmentation):
    """Apply one of ``augmentations``, chosen uniformly (albumentations' ``OneOf`` at p=1)."""

    def __init__(self, augmentations: Sequence[T.Augmentation]):
        super().__init__()
        if not augmentations:
            raise ValueError("RandomChoice needs at least one augmentation")
        self.augmentations = list(augmentations)

    def __call__(self, aug_input: T.AugInput) -> Transform:
        return self.augmentations[int(np.random.randint(len(self.augmentations)))](aug_input)

    def __repr__(self) -> str:
        return f"RandomChoice({self.augmentations})"


def build_semantic_augmentation(cfg, is_train: bool) -> List[T.Augmentation]:
    """The paper's pre-processing from ``INPUT.SEMANTIC.*``, in the order applied.

    Always: a fixed-size resize to ``SIZE`` (when given). Training adds, each when enabled:
    ``RandomRotate90``; horizontal and vertical flips (probability 1/2 each); one of HSV shift,
    brightness or contrast. Resizing first keeps the other steps cheap (a quarter turn or a flip
    of a resized image is the resize of the turned or flipped image, up to interpolation).
    """
    c = cfg.INPUT.SEMANTIC
    augmentations: List[T.Augmentation] = []
    if c.SIZE:
        if len(c.SIZE) != 2 or min(c.SIZE) < 1:
            raise ValueError(
                f"INPUT.SEMANTIC.SIZE: expected [height, width] or [], got {list(c.SIZE)}"
            )
        augmentations.append(T.Resize(tuple(c.SIZE)))
    if not is_train:
        return augmentations
    if c.ROTATE90:
        augmentations.append(RandomRotate90())
    if c.FLIP:
        augmentations.append(T.RandomFlip(horizontal=True, vertical=False))
        augmentations.append(T.RandomFlip(horizontal=False, vertical=True))
    if c.COLOR_JITTER:
        augmentations.append(
            RandomChoice(
                [
                    RandomHSVShift(HSV_SHIFT_LIMITS, cfg.INPUT.FORMAT),
                    T.RandomBrightness(*INTENSITY_RANGE),
                    T.RandomContrast(*INTENSITY_RANGE),
                ]
            )
        )
    return augmentations


class SemanticNucleiMapper:
    """Dataset dict of an instance dataset -> input of ``SemanticNucleiSegmentor``.

    Returns a copy of the dict with:

    - ``"image"``: ``(3, h, w)`` uint8 tensor in ``INPUT.FORMAT``, read as predict reads the
      file (:func:`.mapper.read_image`), augmented;
    - ``"sem_seg"`` (training only): ``(h, w)`` int64 tensor, 1 where any nucleus of the image
      is (the OR of its instance masks), transformed with the image;
    - ``"height"``, ``"width"``: the original size (the model's output size), as before.

    In training the ``"annotations"`` are dropped once turned into ``"sem_seg"``; at test time
    they are kept for the evaluator, which scores at the original size.
    """

    @configurable
    def __init__(
        self, is_train: bool, *, augmentations: Sequence[T.Augmentation], image_format: str
    ):
        self.is_train = is_train
        self.augmentations = T.AugmentationList(list(augmentations))
        self.image_format = check_image_format(image_format)

    @classmethod
    def from_config(cls, cfg, is_train: bool = True) -> Dict[str, Any]:
        return {
            "is_train": is_train,
            "augmentations": build_semantic_augmentation(cfg, is_train),
            "image_format": cfg.INPUT.FORMAT,
        }

    def __call__(self, dataset_dict: Dict[str, Any]) -> Dict[str, Any]:
        record = copy.copy(dataset_dict)  # the annotations are read, never changed
        image = read_image(record["file_name"], self.image_format)
        utils.check_image_size(record, image)
        sem_seg = None
        if self.is_train:
            height, width = image.shape[:2]
            annotations = record.pop("annotations", [])
            sem_seg = union_mask(annotations, height, width, record["file_name"]).astype(np.uint8)
        aug_input = T.AugInput(image, sem_seg=sem_seg)
        self.augmentations(aug_input)
        record["image"] = torch.as_tensor(np.ascontiguousarray(aug_input.image.transpose(2, 0, 1)))
        if sem_seg is not None:
            record["sem_seg"] = torch.as_tensor(aug_input.sem_seg.astype(np.int64))
        return record

    def __repr__(self) -> str:
        return f"SemanticNucleiMapper(is_train={self.is_train}, {self.augmentations})"
