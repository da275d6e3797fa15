"""The geometric augmentations of the shipped models' recipe, as detectron2 augmentations.

``INPUT.RESCALE_RANGE [lo, hi]`` (training) replaces ``ResizeShortestEdge``: every image is
rescaled by a factor drawn log-uniformly in ``[lo, hi]`` of its own size, so nuclei of 6 to 60
px become 4 to 90 px and the model meets each size at many magnifications; then the crop of
``INPUT.CROP`` (an absolute size bounds the cost of an iteration), then ``INPUT.DIHEDRAL``: a
horizontal flip, a vertical flip and a transpose, each with probability 1/2, which together
give the 8 rotations and reflections of the square, all exact on pixels, masks and boxes. At
test time a recipe model sees each image at its own size (``INPUT.MIN_SIZE_TEST 0``), after
``tools/predict.py --diameter`` has brought its nuclei to the training size.
"""
from __future__ import annotations

from typing import List

import numpy as np
from detectron2.data import transforms as T
from fvcore.transforms.transform import Transform

from .config import check_value

__all__ = ["RandomRescale", "RandomTranspose", "TransposeTransform", "recipe_augmentations",
           "uses_recipe"]


class RandomRescale(T.Augmentation):
    """Resize by a factor log-uniform in ``[low, high]`` of the image's own size."""

    def __init__(self, low: float, high: float) -> None:
        super().__init__()
        if not 0 < low <= high:
            raise ValueError(f"rescale range must be 0 < low <= high, got [{low}, {high}]")
        self.low, self.high = float(low), float(high)

    def get_transform(self, image: np.ndarray) -> Transform:
        h, w = image.shape[:2]
        factor = float(np.exp(np.random.uniform(np.log(self.low), np.log(self.high))))
        new_h, new_w = max(1, int(round(h * factor))), max(1, int(round(w * factor)))
        return T.ResizeTransform(h, w, new_h, new_w)


class TransposeTransform(Transform):
    """Swap rows and columns (a reflection about the main diagonal)."""

    def apply_image(self, img: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(np.swapaxes(img, 0, 1))

    def apply_coords(self, coords: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(coords[:, ::-1])

    def apply_segmentation(self, segmentation: np.ndarray) -> np.ndarray:
        return self.apply_image(segmentation)

    def inverse(self) -> Transform:
        return TransposeTransform()


class RandomTranspose(T.Augmentation):
    """:class:`TransposeTransform` with probability ``prob``."""

    def __init__(self, prob: float = 0.5) -> None:
        super().__init__()
        self.prob = prob

    def get_transform(self, image: np.ndarray) -> Transform:
        return TransposeTransform() if np.random.rand() < self.prob else T.NoOpTransform()


def uses_recipe(cfg) -> bool:
    """Whether ``cfg`` trains with the recipe's geometric augmentations (RESCALE_RANGE set)."""
    return len(cfg.INPUT.RESCALE_RANGE) > 0


def recipe_augmentations(cfg, is_train: bool) -> List[T.Augmentation]:
    """The recipe's augmentations (module docstring); at test time none but the test resize."""
    if not is_train:
        return [T.ResizeShortestEdge([cfg.INPUT.MIN_SIZE_TEST] * 2, cfg.INPUT.MAX_SIZE_TEST)]
    scale = list(cfg.INPUT.RESCALE_RANGE)
    check_value("INPUT.RESCALE_RANGE", scale, len(scale) == 2 and 0 < scale[0] <= scale[1],
                "[low, high] with 0 < low <= high, or [] for detectron2's resize")
    augmentations: List[T.Augmentation] = [RandomRescale(*scale)]
    if cfg.INPUT.CROP.ENABLED:
        augmentations.append(T.RandomCrop(cfg.INPUT.CROP.TYPE, cfg.INPUT.CROP.SIZE))
    if cfg.INPUT.DIHEDRAL:
        augmentations += [T.RandomFlip(horizontal=True, vertical=False),
                          T.RandomFlip(horizontal=False, vertical=True), RandomTranspose()]
    elif cfg.INPUT.RANDOM_FLIP != "none":
        augmentations.append(T.RandomFlip(horizontal=cfg.INPUT.RANDOM_FLIP == "horizontal",
                                          vertical=cfg.INPUT.RANDOM_FLIP == "vertical"))
    return augmentations
