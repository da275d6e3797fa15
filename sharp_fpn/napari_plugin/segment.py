"""Segment the nuclei of an image array as ``tools/predict.py`` segments an image file.

The napari widget's work, without Qt or napari: a layer's data in, the label image, the scores
and the per-nucleus table out. The rules it keeps:

* **The same path as predict**: the pixels are brought to the model's 8-bit RGB input by
  :mod:`sharp_fpn.predict.image_io` (gray, gray + alpha, RGB, RGBA; 16-bit and float stretched
  per image, 8-bit used as stored), the model is a :class:`~sharp_fpn.d2.predictor.
  NucleiPredictor`, the tile is predict's default for the model (:func:`~sharp_fpn.predict.run.
  default_tile`) unless given, ``tile=0`` falls back to 512-px tiles where predict's does, and
  the nucleus size is handled by :func:`~sharp_fpn.predict.scale.predict_at_scale` (the
  diameter given, or estimated per image). The table is predict's ``<stem>_nuclei.csv``
  (:func:`~sharp_fpn.predict.outputs.nuclei_table`). So the labels equal those predict writes
  for the same pixels with the same options.
* **Planes**: an image of more than two (non-colour) dimensions is segmented at one plane, the
  one napari shows (``current_step``); :attr:`Segmentation.plane` says which.
* **Models**: :func:`load_predictor` builds a zoo model (the default when no name is given, its
  weights checked against the zoo's sha256) or a config + weights pair, once per process for
  the same files and options.

Everything is checked before the model runs, each failure one line: the options
(:func:`~sharp_fpn.predict.run.check_options`), the diameter, the model files, the data.
"""
from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from ..predict.image_io import LoadedImage, StoredImage, loaded_image
from ..predict.outputs import MAX_LABELS, nuclei_table
from ..predict.run import (
    DEFAULT_TILE,
    tile_for,
    check_options,
    default_tile,
    model_diameter,
)
from ..predict.scale import ScaleChoice, check_diameter, median_diameter, predict_at_scale

if TYPE_CHECKING:  # detectron2 glue, imported when a model is built
    from ..d2.predictor import NucleiPredictor

__all__ = [
    "Segmentation",
    "image_plane",
    "load_predictor",
    "model_names",
    "segment",
]

_PathLike = Union[str, "os.PathLike[str]"]
_CACHE: Dict[Tuple[Any, ...], "NucleiPredictor"] = {}
_CACHE_LOCK = threading.Lock()


@dataclass
class Segmentation:
    """The nuclei of one image (or plane).

    Attributes:
        labels: ``(H, W)`` uint16, 0 background, ``1..K`` the nuclei (predict's label image).
        scores: ``(K,)``, ``scores[k - 1]`` the score of nucleus ``k``.
        table: one row per nucleus, predict's ``<stem>_nuclei.csv`` columns.
        choice: how the image was scaled for the model (diameter, its source, the scale).
        tile: the tile side used (0: the whole image in one tile); note: why, when not asked.
        plane: the index of the plane segmented in the leading dimensions of the data (None
            for a 2-D image).
        diameter: the nuclei's diameter in pixels: given or estimated, else the median of those
            found, else the model's training diameter (0 when none is known).
    """

    labels: np.ndarray
    scores: np.ndarray
    table: List[Dict[str, Any]]
    choice: ScaleChoice
    tile: int
    note: Optional[str]
    plane: Optional[Tuple[int, ...]]
    diameter: float

    @property
    def count(self) -> int:
        return int(self.scores.size)


def model_names() -> Tuple[List[str], Optional[str]]:
    """``(names, default)``: the zoo's models (:mod:`sharp_fpn.model_zoo`) by name, and its
    default (None when it has none)."""
    from .. import model_zoo

    return [m.name for m in model_zoo.list_models()], model_zoo.default_model_name()


def _model_files(model: Optional[str], config: Optional[_PathLike],
                 weights: Optional[_PathLike]) -> Tuple[str, str]:
    """(config, weights) as ``tools/predict.py``'s ``--model`` / ``--config-file`` and
    ``--weights`` give them."""
    if model is not None and (config or weights):
        raise ValueError("a zoo model is picked: give no config or weights with it")
    if bool(config) != bool(weights):
        given, missing = ("config", "weights") if config else ("weights", "config")
        raise ValueError(f"the {given} file needs the {missing} file too (or neither, for the "
                         f"model zoo's default model)")
    if config:
        return os.fspath(config), os.fspath(weights)
    from .. import model_zoo

    config_file, weights_file = model_zoo.resolve(model)
    return str(config_file), str(weights_file)


def load_predictor(model: Optional[str] = None, config: Optional[_PathLike] = None,
                   weights: Optional[_PathLike] = None, *, score_threshold: float = 0.5,
                   min_kept_fraction: float = 0.5, device: str = "cpu") -> "NucleiPredictor":
    """The model to segment with, built once per process for the same files and options.

    Args:
        model: a zoo model's name; None (and no ``config``): the zoo's default.
        config, weights: a trained model's config (yaml) and checkpoint, both or neither.
        score_threshold, min_kept_fraction, device: as ``tools/predict.py``'s options.

    Raises:
        ValueError: one file without the other, a threshold out of [0, 1], a config, weights
            file or device that cannot be used (one line naming it).
        sharp_fpn.model_zoo.ZooError: no such zoo model, no default, weights not the zoo's.
        FileNotFoundError: the weights file is missing.
    """
    check_options(DEFAULT_TILE, 0, score_threshold, min_kept_fraction)
    config_file, weights_file = _model_files(model, config, weights)
    from ..d2.predictor import NucleiPredictor, check_device, check_weights_file, load_config

    check_weights_file(weights_file)
    check_device(device)
    key = (os.path.realpath(config_file), os.path.realpath(weights_file),
           os.stat(config_file).st_mtime_ns if os.path.isfile(config_file) else None,
           os.stat(weights_file).st_mtime_ns, float(score_threshold), float(min_kept_fraction),
           device)
    with _CACHE_LOCK:
        if key not in _CACHE:
            _CACHE.clear()  # one model at a time: a model is tens of MB
            _CACHE[key] = NucleiPredictor(load_config(config_file), weights_file, device=device,
                                          score_threshold=score_threshold,
                                          min_kept_fraction=min_kept_fraction)
        return _CACHE[key]


def image_plane(data: Any, rgb: bool, position: Optional[Sequence[float]] = None
                ) -> Tuple[np.ndarray, Optional[Tuple[int, ...]]]:
    """The 2-D image of a napari image layer's ``data`` to segment, and its plane.

    Args:
        data: ``(..., H, W)`` (gray) or ``(..., H, W, C)`` with ``rgb`` (C of 3 or 4), any
            numeric dtype; a NumPy, Dask or Zarr array (only the plane is read).
        rgb: whether the last axis is colour (the layer's ``rgb``).
        position: where napari is, in the layer's data coordinates, one per non-colour axis
            (``layer.world_to_data(viewer.dims.point)``); its leading entries, rounded and
            kept inside the data, pick the plane (the first plane when None).

    Returns:
        ``(pixels, plane)``: ``(H, W)`` or ``(H, W, C)``; ``plane`` the indices along the
        leading axes (None for a 2-D image).

    Raises:
        ValueError: data that is not numeric, not at least 2-D (3-D for colour), or colour
            that is not RGB or RGBA.
    """
    shape = tuple(getattr(data, "shape", ()))
    image_dims = 3 if rgb else 2
    if len(shape) < image_dims:
        raise ValueError(f"an image layer of shape {shape} is not "
                         f"{'a colour image' if rgb else 'an image'} (expected {'(..., H, W, 3 or 4)' if rgb else '(..., H, W)'})")
    dtype = np.dtype(getattr(data, "dtype", np.float64))
    if dtype.kind not in "buif":
        raise ValueError(f"an image layer of {dtype} values cannot be segmented (expected "
                         f"integer or float samples)")
    if rgb and shape[-1] not in (3, 4):
        raise ValueError(f"a colour image layer with {shape[-1]} channels cannot be "
                         f"segmented (expected RGB or RGBA)")
    leading = len(shape) - image_dims
    plane: Optional[Tuple[int, ...]] = None
    if leading:
        steps = list(position)[:leading] if position is not None else []
        steps += [0] * (leading - len(steps))
        plane = tuple(int(min(max(round(float(s)), 0), n - 1))
                      for s, n in zip(steps, shape[:leading]))
        data = data[plane]
    pixels = np.asarray(data)
    if dtype.kind == "b":
        pixels = pixels.astype(np.uint8) * np.uint8(255)  # a mask: nuclei white
    return np.ascontiguousarray(pixels), plane


def _loaded_image(pixels: np.ndarray, name: str, stretch: bool) -> LoadedImage:
    """The pixels as predict's reader gives an image file's (image_io's normalisation)."""
    colour = "gray" if pixels.ndim == 2 else ("RGB" if pixels.shape[2] == 3 else "RGBA")
    return loaded_image(Path(name), StoredImage(pixels, colour, "YX" if pixels.ndim == 2 else "YXS"),
                   stretch)


def segment(predictor: "NucleiPredictor", pixels: np.ndarray, *,
            diameter: Optional[float] = None, tile: Optional[int] = None, overlap: int = 64,
            stretch: bool = True, name: str = "image",
            plane: Optional[Tuple[int, ...]] = None) -> Segmentation:
    """Label the nuclei of one 2-D image as ``tools/predict.py`` labels an image file.

    Args:
        predictor: the model (:func:`load_predictor`).
        pixels: ``(H, W)`` gray or ``(H, W, 3|4)`` RGB(A), any integer or float dtype
            (:func:`image_plane` of a layer).
        diameter: the nuclei's diameter in pixels (``--diameter``); None: estimated per image
            where the model knows its training diameter.
        tile, overlap: tiling in pixels (``--tile``, ``--overlap``); None: predict's default for
            the model; 0: the whole image (512-px tiles where the model would shrink it more).
        stretch: the per-image stretch of non-8-bit data (False: ``--no-stretch``).
        name: what error messages call the image (the layer's name).
        plane: the plane ``pixels`` is of (:func:`image_plane`), kept in the result.

    Raises:
        ValueError: an option out of range, a diameter the model cannot use, a shape predict
            does not read, more nuclei than a uint16 label image numbers (one line).
        sharp_fpn.predict.tiling.TileError: the model failed on a tile (naming it).
    """
    if pixels.ndim not in (2, 3) or (pixels.ndim == 3 and pixels.shape[2] not in (3, 4)):
        raise ValueError(f"{name}: an image of shape {pixels.shape} is not gray, RGB or RGBA")
    cfg = predictor.cfg
    if tile is None:
        tile = default_tile(cfg)
    check_options(tile, overlap, predictor.score_threshold, predictor.min_kept_fraction)
    trained = model_diameter(cfg)
    if diameter is not None:
        check_diameter(float(diameter), trained)
    image = _loaded_image(pixels, name, stretch)
    used: Dict[str, Any] = {}

    def run_model(rgb: np.ndarray):
        used["tile"], used["note"] = tile_for(cfg, rgb.shape[:2], tile)
        return predictor.predict(rgb, tile=used["tile"], overlap=overlap, progress=False)

    scaled = predict_at_scale(run_model, image.rgb, trained, diameter)
    count = int(scaled.scores.size)
    if count > MAX_LABELS:
        raise ValueError(f"{name}: {count} nuclei do not fit a uint16 label image (at most "
                         f"{MAX_LABELS})")
    labels = scaled.labels.astype(np.uint16)
    size = scaled.choice.diameter or median_diameter(scaled.labels, 1) or trained
    return Segmentation(labels=labels, scores=np.asarray(scaled.scores, dtype=np.float64),
                        table=nuclei_table(scaled.labels, scaled.scores, image.intensity),
                        choice=scaled.choice, tile=used["tile"], note=used["note"],
                        plane=plane, diameter=float(size or 0.0))
