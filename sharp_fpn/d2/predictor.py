"""A trained detectron2 model (Mask R-CNN or semantic) as a nucleus labeller for whole images.

:class:`NucleiPredictor` runs the model on each tile (:mod:`.tiling`) as the model's own test
pipeline runs it on an image (:func:`inference_augmentations`): the tile in the config's
``INPUT.FORMAT``, resized as at test time (Mask R-CNN: ``ResizeShortestEdge(INPUT.
MIN_SIZE_TEST, INPUT.MAX_SIZE_TEST)``, as ``DefaultPredictor``; the semantic models:
``Resize(INPUT.SEMANTIC.SIZE)``, as their test mapper), the outputs brought back to the tile's
size. All tiles of an image have the same size, so the model sees every part of the image at
the same scale; choose ``tile`` near the size of the images the model was trained on (``tile=0``
predicts the whole image at once).

What the model returns decides the labelling:

* ``"instances"`` (Mask R-CNN): instances scoring at least ``score_threshold`` with their
  pasted masks; per tile the instances owned by its core are kept and stitched
  (:func:`~.tiling.stitch_instances`), overlaps going to the better score, and an instance
  keeping less than ``min_kept_fraction`` of its mask dropped as a duplicate; each nucleus is
  then reduced to its largest 8-connected piece (:func:`~.tiling.keep_largest_components`).
* ``"sem_seg"`` (``(1, H, W)`` nucleus probabilities, the semantic meta-architecture): the
  probability maps of the tiles are stitched core by core (:func:`~.tiling.stitch_cores`),
  thresholded at 0.5 (``> 0.5`` is nucleus), and the 8-connected components are the nuclei
  (``skimage.measure.label``); a nucleus' score is its mean probability.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

import numpy as np
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import CfgNode
from detectron2.data import transforms as T
from detectron2.modeling import build_model
from skimage.measure import label as connected_components
from tqdm import tqdm

from .engine import get_config
from .semantic import is_semantic  # also registers the necks and meta-architectures
from .semantic_data import build_semantic_augmentation
from ..predict.tiling import (
    InstanceSet,
    Tile,
    keep_largest_components,
    stitch_cores,
    stitch_instances,
    tile_grid,
)

__all__ = [
    "SEMANTIC_THRESHOLD",
    "NucleiPredictor",
    "Prediction",
    "load_config",
    "model_label",
    "semantic_labels",
    "inference_augmentations",
]

logger = logging.getLogger(__name__)

#: Probability above which a pixel of a semantic model's output is nucleus.
SEMANTIC_THRESHOLD = 0.5


@dataclass
class Prediction:
    """The nuclei of one image.

    Attributes:
        labels: ``(H, W)`` int32, 0 background, ``1..K`` the nuclei.
        scores: ``(K,)`` float64, ``scores[k - 1]`` the confidence of nucleus ``k``
            (instance score, or mean probability for semantic models).
        kind: ``"instances"`` or ``"semantic"``: what the model predicted.
        tiles: how many tiles the image was cut into.
    """

    labels: np.ndarray
    scores: np.ndarray
    kind: str
    tiles: int

    @property
    def count(self) -> int:
        return int(self.scores.size)


def load_config(
    config: Union[CfgNode, str, os.PathLike], opts: Optional[List[str]] = None
) -> CfgNode:
    """A config object from a config (cloned) or a yaml file (with sharp-fpn's keys), plus
    ``opts`` (``["KEY", value, ...]``)."""
    if isinstance(config, CfgNode):
        cfg = config.clone()
        cfg.defrost()
        if opts:
            cfg.merge_from_list(list(opts))
        return cfg
    return get_config(os.fspath(config), opts or [])


def model_label(config_file: Union[str, os.PathLike]) -> str:
    """A short name for a model: its config file's stem, or for a training run's dumped
    ``config.yaml`` the run's folder name."""
    path = Path(config_file)
    return path.parent.name if path.stem == "config" else path.stem


def inference_augmentations(cfg: CfgNode) -> List[T.Augmentation]:
    """The test-time pre-processing of the model ``cfg`` builds, as its evaluation applies it:
    the semantic meta-architecture's test mapper (``INPUT.SEMANTIC.SIZE``), else detectron2's
    ``ResizeShortestEdge(INPUT.MIN_SIZE_TEST, INPUT.MAX_SIZE_TEST)``."""
    if is_semantic(cfg):
        return build_semantic_augmentation(cfg, is_train=False)
    return [T.ResizeShortestEdge([cfg.INPUT.MIN_SIZE_TEST] * 2, cfg.INPUT.MAX_SIZE_TEST)]


class NucleiPredictor:
    """A detectron2 model that labels the nuclei of ``(H, W, 3)`` uint8 RGB images.

    Args:
        cfg: the model's config (a ``CfgNode`` or a yaml file).
        weights: checkpoint file; None keeps the random initialisation (tests, benchmarks).
        device: ``"cpu"``, ``"cuda"``, ...; default the config's ``MODEL.DEVICE``.
        score_threshold: instances scoring below are dropped (instance models; it also
            becomes ``MODEL.ROI_HEADS.SCORE_THRESH_TEST`` so the model drops them early).
        min_kept_fraction: an instance that keeps less than this fraction of its mask after
            better instances took theirs is dropped as a duplicate
            (:func:`~.tiling.stitch_instances`).

    Raises:
        FileNotFoundError: ``weights`` is not a file.
        ValueError: the weights do not fit the model the config describes, or the config's
            ``INPUT.FORMAT`` is not RGB or BGR.
    """

    def __init__(
        self,
        cfg: Union[CfgNode, str, os.PathLike],
        weights: Optional[Union[str, os.PathLike]] = None,
        *,
        device: Optional[str] = None,
        score_threshold: float = 0.5,
        min_kept_fraction: float = 0.5,
    ) -> None:
        cfg = load_config(cfg)
        if device:
            cfg.MODEL.DEVICE = device
        cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST = float(score_threshold)
        cfg.freeze()
        if cfg.INPUT.FORMAT not in ("RGB", "BGR"):
            raise ValueError(f"INPUT.FORMAT: expected 'RGB' or 'BGR', got {cfg.INPUT.FORMAT!r}")
        self.cfg = cfg
        self.score_threshold = float(score_threshold)
        self.min_kept_fraction = float(min_kept_fraction)
        self.model = build_model(cfg).eval()
        if weights is None:
            logger.warning("no weights given: the model keeps its random initialisation")
        else:
            self._load_weights(os.fspath(weights))
        self.augmentations = T.AugmentationList(inference_augmentations(cfg))

    def _load_weights(self, path: str) -> None:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path}: no such weights file")
        checkpointer = DetectionCheckpointer(self.model)
        checkpoint = checkpointer._load_file(path)  # noqa: SLF001 (also reads detectron2 .pkl)
        incompatible = checkpointer._load_model(checkpoint)  # noqa: SLF001
        missing, shapes = incompatible.missing_keys, incompatible.incorrect_shapes
        if missing or shapes:
            examples = ", ".join(list(missing)[:3] + [name for name, *_ in shapes[:3]])
            raise ValueError(
                f"{path} does not fit the model of this config ({self.cfg.MODEL.META_ARCHITECTURE}"
                f", {self.cfg.MODEL.BACKBONE.NAME}): {len(missing)} parameters missing, "
                f"{len(shapes)} of another shape (e.g. {examples}); were the weights trained "
                f"with this config?"
            )

    def model_input(self, rgb: np.ndarray) -> torch.Tensor:
        """``(h, w, 3)`` uint8 RGB -> the model's ``(3, h', w')`` float32 input: channels in
        ``INPUT.FORMAT`` order, resized as the model's test pipeline resizes images."""
        image = rgb[:, :, ::-1] if self.cfg.INPUT.FORMAT == "BGR" else rgb
        resized = T.AugInput(np.ascontiguousarray(image))
        self.augmentations(resized)
        return torch.as_tensor(
            np.ascontiguousarray(resized.image.transpose(2, 0, 1)), dtype=torch.float32
        )

    @torch.no_grad()
    def run_model(self, rgb: np.ndarray) -> Dict[str, Any]:
        """The model's raw output for one ``(h, w, 3)`` uint8 RGB image (or tile), at its size."""
        height, width = rgb.shape[:2]
        return self.model([{"image": self.model_input(rgb), "height": height, "width": width}])[0]

    def predict(
        self, rgb: np.ndarray, tile: int = 512, overlap: int = 64, progress: bool = False
    ) -> Prediction:
        """Label the nuclei of a ``(H, W, 3)`` uint8 RGB image, tile by tile.

        Args:
            rgb: the image (:func:`~.image_io.normalise` makes one from any input).
            tile: tile side in pixels; 0 (or a side at least the image's) for one tile.
            overlap: minimum overlap of neighbouring tiles in pixels; nuclei up to this size
                are never cut nor duplicated (:mod:`.tiling`).
            progress: a tqdm bar over the tiles (when there are several).
        """
        if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
            raise ValueError(f"expected an (H, W, 3) uint8 RGB image, got {rgb.shape} {rgb.dtype}")
        shape = rgb.shape[:2]
        tiles = tile_grid(shape[0], shape[1], tile, overlap)
        # each tile's output is reduced at once (cropped masks, one map): full-tile masks of
        # hundreds of instances in every tile would not fit in memory together
        sets: List[InstanceSet] = []
        maps: List[np.ndarray] = []
        bar = tqdm(tiles, desc="tiles", unit="tile", leave=False,
                   disable=not progress or len(tiles) == 1)
        for t in bar:
            output = self.run_model(rgb[t.slices])
            if "instances" in output and not maps:
                sets.append(self._instance_set(output, t))
            elif "sem_seg" in output and not sets:
                maps.append(self._probabilities(output, t))
            else:
                raise ValueError(
                    f"{self.cfg.MODEL.META_ARCHITECTURE} returned {sorted(output)}; expected "
                    f"'instances' (Mask R-CNN) or 'sem_seg' (nucleus probabilities)"
                )
        if sets:
            labels, scores = stitch_instances(shape, tiles, sets, self.min_kept_fraction)
            return Prediction(keep_largest_components(labels), scores, "instances", len(tiles))
        labels, scores = semantic_labels(stitch_cores(shape, tiles, maps))
        return Prediction(labels, scores, "semantic", len(tiles))

    def _instance_set(self, output: Dict[str, Any], tile: Tile) -> InstanceSet:
        instances = output["instances"].to("cpu")
        if not instances.has("pred_masks"):
            raise ValueError(
                f"{self.cfg.MODEL.META_ARCHITECTURE} predicts no masks (MODEL.MASK_ON is off)"
            )
        masks = instances.pred_masks.numpy()
        if masks.shape[1:] != tile.shape:
            raise ValueError(f"pred_masks are {masks.shape[1:]} for a tile of {tile.shape}")
        scores = instances.scores.numpy()
        keep = scores >= self.score_threshold
        return InstanceSet.from_masks(masks[keep], scores[keep])

    def _probabilities(self, output: Dict[str, Any], tile: Tile) -> np.ndarray:
        probabilities = output["sem_seg"].to("cpu", torch.float32).numpy()
        if probabilities.shape != (1,) + tile.shape:
            raise ValueError(
                f"sem_seg is {probabilities.shape}; expected (1, {tile.shape[0]}, "
                f"{tile.shape[1]}) nucleus probabilities"
            )
        return probabilities[0]


def semantic_labels(probabilities: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """``(H, W)`` nucleus probabilities -> ``(labels, scores)``.

    Labels: the 8-connected components of ``probabilities > SEMANTIC_THRESHOLD``, ``(H, W)``
    int32 numbered 1..K in raster order of their first pixel; scores: ``(K,)`` float64, the
    mean probability of each component.
    """
    labels = connected_components(probabilities > SEMANTIC_THRESHOLD, connectivity=2)
    labels = labels.astype(np.int32)
    count = int(labels.max())
    sums = np.bincount(labels.ravel(), weights=probabilities.ravel(), minlength=count + 1)
    areas = np.bincount(labels.ravel(), minlength=count + 1)
    return labels, sums[1:] / np.maximum(areas[1:], 1)
