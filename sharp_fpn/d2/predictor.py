"""A trained detectron2 model (Mask R-CNN or semantic) as a nucleus labeller for whole images.

:class:`NucleiPredictor` runs the model on each tile (:mod:`.tiling`) as the model's own test
pipeline runs it on an image (:func:`inference_augmentations`): the tile in the config's
``INPUT.FORMAT``, resized as at test time (Mask R-CNN: ``ResizeShortestEdge(INPUT.
MIN_SIZE_TEST, INPUT.MAX_SIZE_TEST)``, as ``DefaultPredictor``; the semantic models:
``Resize(INPUT.SEMANTIC.SIZE)``, as their test mapper), the outputs brought back to the tile's
size. All tiles of an image have the same size, so the model sees every part of the image at
the same scale; choose ``tile`` near the size of the images the model was trained on (``tile=0``
predicts the whole image at once). :func:`input_scale` says how much that resize shrinks or
enlarges an image (``tools/predict.py`` uses it to keep ``--tile 0`` from shrinking a large
image to the model's input size). A tile whose model run fails raises
:class:`sharp_fpn.predict.tiling.TileError` naming the tile (the run reports the image as failed and goes on).

Everything a user gives is checked before any work, each failure one line naming the file or
option: the config (:func:`load_config`: missing, malformed, unknown keys), the weights
(missing, empty, corrupt, or not fitting the config), the device (:func:`check_device`).

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
import yaml
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import CfgNode
from detectron2.data import transforms as T
from detectron2.modeling import build_model
from detectron2.modeling.meta_arch import GeneralizedRCNN
from detectron2.structures import Instances
from skimage.measure import label as connected_components
from tqdm import tqdm

from .checkpoint import fit_problem
from .engine import ConfigError, get_config
from .mapper import normalization
from .semantic import is_semantic  # also registers the necks and meta-architectures
from .semantic_data import build_semantic_augmentation
from ..predict.image_io import percentile_normalise
from ..predict.tiling import (
    InstanceSet,
    Tile,
    TileError,
    keep_largest_components,
    stitch_cores,
    stitch_instances,
    tile_grid,
)

__all__ = [
    "SEMANTIC_THRESHOLD",
    "NucleiPredictor",
    "Prediction",
    "check_device",
    "check_weights_file",
    "input_scale",
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
    ``opts`` (``["KEY", value, ...]``).

    Raises:
        ConfigError: in one line naming the file: it is missing, not a readable yaml mapping,
            names a missing ``_BASE_``, or has a key or value that does not fit (an option of
            ``opts`` likewise).
    """
    if isinstance(config, CfgNode):
        cfg = config.clone()
        cfg.defrost()
        if opts:
            try:
                cfg.merge_from_list(list(opts))
            except (AssertionError, KeyError, ValueError, TypeError) as e:
                raise ConfigError(f"command-line options: {_one_line(e)}") from None
        return cfg
    path = os.fspath(config)
    if not os.path.exists(path):
        raise ConfigError(f"{path}: no such config file")
    if not os.path.isfile(path):
        raise ConfigError(f"{path}: is a folder, not a config file")
    try:
        return get_config(path, opts or [])
    except ConfigError:
        raise
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid yaml ({_one_line(e)})") from None
    except OSError as e:  # a _BASE_ that is missing or unreadable
        raise ConfigError(f"{path}: {e.strerror or e}: {e.filename}") from None
    except Exception as e:  # noqa: BLE001  yacs: a list instead of a mapping, a bad value type...
        raise ConfigError(f"{path}: not a usable config ({type(e).__name__}: {_one_line(e)})") \
            from None


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


def check_device(device: str) -> str:
    """``device`` if torch can put a tensor there, else ValueError in one line (``--device``)."""
    try:
        torch.empty(1, device=device)
    except Exception as e:  # noqa: BLE001  RuntimeError, AssertionError (no CUDA build)...
        available = "cpu" + (f", cuda:0..{torch.cuda.device_count() - 1}"
                             if torch.cuda.is_available() else "")
        raise ValueError(f"--device {device}: not usable here ({_one_line(e)}); available: "
                         f"{available}") from None
    return device


def check_weights_file(path: Union[str, os.PathLike]) -> str:
    """``path`` as a string if it is a non-empty file, else a one-line error naming it."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such weights file")
    if not os.path.isfile(path):
        raise ValueError(f"{path}: is a folder, not a weights file")
    if os.path.getsize(path) == 0:
        raise ValueError(f"{path}: the weights file is empty")
    return path


def input_scale(cfg: CfgNode, height: int, width: int) -> float:
    """How much the model's test-time resize (:func:`inference_augmentations`) scales an
    image of ``height x width`` pixels: the smaller of the two axes' factors (< 1: shrunk)."""
    image = np.broadcast_to(np.zeros((1, 1, 3), np.uint8), (height, width, 3))  # no memory
    scale = 1.0
    for augmentation in inference_augmentations(cfg):
        transform = augmentation.get_transform(image)
        for t in getattr(transform, "transforms", [transform]):
            if isinstance(t, T.ResizeTransform):
                scale *= min(t.new_h / t.h, t.new_w / t.w)
                image = np.broadcast_to(image[:1, :1], (t.new_h, t.new_w, 3))
    return scale


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
        ValueError: ``weights`` is empty, not a readable checkpoint, or does not fit the model
            the config describes; the config's ``INPUT.FORMAT`` is not RGB or BGR, or its Mask
            R-CNN predicts no masks; ``device`` is not usable; a threshold is not in [0, 1].
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
        for name, value in (("score_threshold", score_threshold),
                            ("min_kept_fraction", min_kept_fraction)):
            if not 0.0 <= float(value) <= 1.0:  # NaN fails too
                raise ValueError(f"{name} must be in [0, 1], got {value}")
        cfg = load_config(cfg)
        if device:
            cfg.MODEL.DEVICE = device
        check_device(cfg.MODEL.DEVICE)
        cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST = float(score_threshold)
        cfg.freeze()
        if cfg.INPUT.FORMAT not in ("RGB", "BGR"):
            raise ValueError(f"INPUT.FORMAT: expected 'RGB' or 'BGR', got {cfg.INPUT.FORMAT!r}")
        if not is_semantic(cfg) and not cfg.MODEL.MASK_ON:
            raise ValueError(f"{cfg.MODEL.META_ARCHITECTURE} with MODEL.MASK_ON off predicts no "
                             f"masks: no nuclei to label")
        if weights is not None:
            weights = check_weights_file(weights)
        self.cfg = cfg
        self.weights = weights
        self.score_threshold = float(score_threshold)
        self.min_kept_fraction = float(min_kept_fraction)
        self.model = build_model(cfg).eval()
        if weights is None:
            logger.warning("no weights given: the model keeps its random initialisation")
        else:
            self._load_weights(weights)
        self.augmentations = T.AugmentationList(inference_augmentations(cfg))
        self.normalize = normalization(cfg)

    def input_scale(self, height: int, width: int) -> float:
        """:func:`input_scale` of this model's config."""
        return input_scale(self.cfg, height, width)

    def _load_weights(self, path: str) -> None:
        checkpointer = DetectionCheckpointer(self.model)
        try:
            checkpoint = checkpointer._load_file(path)  # noqa: SLF001 (also reads .pkl)
            if not isinstance(checkpoint.get("model"), dict):
                raise ValueError("it holds no model parameters")
            incompatible = checkpointer._load_model(checkpoint)  # noqa: SLF001
        except Exception as e:  # noqa: BLE001  pickle, zip, EOF, type errors of a corrupt file
            raise ValueError(f"{path}: not a readable checkpoint ({type(e).__name__}: "
                             f"{_one_line(e)[:200]})") from None
        model_name = f"{self.cfg.MODEL.META_ARCHITECTURE}, {self.cfg.MODEL.BACKBONE.NAME}"
        problem = fit_problem(incompatible, path, model_name)
        if problem:
            raise ValueError(problem)

    def model_input(self, rgb: np.ndarray) -> torch.Tensor:
        """``(h, w, 3)`` uint8 RGB -> the model's ``(3, h', w')`` float32 input: channels in
        ``INPUT.FORMAT`` order, resized as the model's test pipeline resizes images."""
        image = rgb[:, :, ::-1] if self.cfg.INPUT.FORMAT == "BGR" else rgb
        resized = T.AugInput(np.ascontiguousarray(image))
        self.augmentations(resized)
        return torch.as_tensor(
            np.ascontiguousarray(resized.image.transpose(2, 0, 1)), dtype=torch.float32
        )

    def prepare(self, rgb: np.ndarray) -> np.ndarray:
        """The whole image as the model's training saw images: ``INPUT.NORMALIZE`` applied
        (once per image, before tiling, so that every tile shares one intensity scale)."""
        if self.normalize is None:
            return rgb
        return percentile_normalise(rgb, self.normalize)[0]

    @torch.no_grad()
    def run_model(self, rgb: np.ndarray) -> Dict[str, Any]:
        """The model's output for one ``(h, w, 3)`` uint8 RGB image (or tile), at its size.

        A Mask R-CNN's instances keep their ``M x M`` mask probabilities (``pred_masks``
        ``(N, 1, M, M)``, boxes in the tile's pixels): :meth:`instance_set` pastes each into
        its box only, never ``N`` full-tile masks (``sharp_fpn.predict.tiling.paste_in_boxes``).
        Other models return what their ``forward`` returns.
        """
        height, width = rgb.shape[:2]
        inputs = [{"image": self.model_input(rgb), "height": height, "width": width}]
        if not isinstance(self.model, GeneralizedRCNN):
            return self.model(inputs)[0]
        found = self.model.inference(inputs, do_postprocess=False)[0]
        in_height, in_width = found.image_size
        boxes = found.pred_boxes.clone()
        boxes.scale(width / in_width, height / in_height)  # as detector_postprocess does
        boxes.clip((height, width))
        keep = boxes.nonempty()
        out = Instances((height, width))
        out.pred_boxes = boxes[keep]
        out.scores = found.scores[keep]
        out.pred_classes = found.pred_classes[keep]
        if found.has("pred_masks"):
            out.pred_masks = found.pred_masks[keep]
        return {"instances": out}

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
        rgb = self.prepare(rgb)
        tiles = tile_grid(shape[0], shape[1], tile, overlap)
        # each tile's output is reduced at once (cropped masks, one map): full-tile masks of
        # hundreds of instances in every tile would not fit in memory together
        sets: List[InstanceSet] = []
        maps: List[np.ndarray] = []
        bar = tqdm(tiles, desc="tiles", unit="tile", leave=False,
                   disable=not progress or len(tiles) == 1)
        for k, t in enumerate(bar, 1):
            try:
                output = self.run_model(rgb[t.slices])
                if "instances" in output and not maps:
                    sets.append(self.instance_set(output, t))
                elif "sem_seg" in output and not sets:
                    maps.append(self.probability_map(output, t))
                else:
                    raise ValueError(
                        f"{self.cfg.MODEL.META_ARCHITECTURE} returned {sorted(output)}; expected "
                        f"'instances' (Mask R-CNN) or 'sem_seg' (nucleus probabilities)"
                    )
            except Exception as e:  # noqa: BLE001  out of memory, a model error: name the tile
                raise TileError(
                    f"tile {k}/{len(tiles)} (rows {t.top}-{t.bottom}, columns {t.left}-"
                    f"{t.right}): {type(e).__name__}: {_one_line(e)}"
                ) from e
        if sets:
            labels, scores = stitch_instances(shape, tiles, sets, self.min_kept_fraction)
            return Prediction(keep_largest_components(labels), scores, "instances", len(tiles))
        labels, scores = semantic_labels(stitch_cores(shape, tiles, maps))
        return Prediction(labels, scores, "semantic", len(tiles))

    def instance_set(self, output: Dict[str, Any], tile: Tile) -> InstanceSet:
        """The model's output on one tile (:meth:`run_model`) as the tile's
        :class:`~sharp_fpn.predict.tiling.InstanceSet`: kept to the score threshold, masks
        pasted per box (what :meth:`predict` stitches, and the large-image path too)."""
        instances = output["instances"].to("cpu")
        if not instances.has("pred_masks"):
            raise ValueError(
                f"{self.cfg.MODEL.META_ARCHITECTURE} predicts no masks (MODEL.MASK_ON is off)"
            )
        masks = instances.pred_masks.numpy()
        scores = instances.scores.numpy()
        keep = scores >= self.score_threshold
        if masks.ndim == 4:  # (N, 1, M, M) probabilities over the boxes (run_model)
            boxes = instances.pred_boxes.tensor.numpy()
            return InstanceSet.from_box_masks(boxes[keep], masks[keep, 0], scores[keep],
                                              tile.shape)
        if masks.shape[1:] != tile.shape:
            raise ValueError(f"pred_masks are {masks.shape[1:]} for a tile of {tile.shape}")
        return InstanceSet.from_masks(masks[keep], scores[keep])

    def probability_map(self, output: Dict[str, Any], tile: Tile) -> np.ndarray:
        """A semantic model's output on one tile (:meth:`run_model`) as the tile's ``(h, w)``
        nucleus probabilities (what :meth:`predict` stitches by cores, and the large-image
        path too)."""
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
