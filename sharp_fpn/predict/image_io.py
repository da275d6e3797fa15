"""Reading microscopy images of any common kind and bringing them to what the models saw.

The models were trained on 8-bit, 3-channel images (DSB2018's PNGs, the synthetic set), so
every input is brought to an ``(H, W, 3)`` uint8 RGB array (:func:`normalise`):

* **bit depth**: 8-bit images are used as they are. Any other depth (16-bit, 32-bit, float)
  is stretched linearly per image so that its 0.1st percentile becomes 0 and its 99.9th
  percentile 255 (values outside are clipped), the percentiles taken jointly over the colour
  channels so the colour balance is kept. Dividing by 257 instead would leave most
  microscopy images nearly black (cameras rarely fill their 16-bit range: 12-bit sensors,
  dim fluorescence), and min/max would let a few hot pixels decide the contrast. Where the
  two percentiles coincide (almost constant images) min/max is used; a constant image
  becomes black.
* **channels**: grayscale is replicated to three channels; an alpha channel is dropped
  (gray + alpha keeps the gray); RGB stays RGB. The model's own channel order
  (``INPUT.FORMAT``, BGR for detectron2's models) is applied later, by the predictor.
* **formats**: TIFF through tifffile (channels-last or planar ``(C, H, W)``), PNG, JPEG, BMP
  through OpenCV (8- and 16-bit). A file holding a stack of planes (``(Z, H, W)``, more than
  four "channels") is refused: one 2-D image per file.

The per-nucleus table measures intensities on the image as stored (:attr:`LoadedImage.
intensity`: the raw values of a single-channel image, the mean of the colour channels of a
colour image, never the stretched 8-bit version), so 16-bit quantification is not lost.
"""
from __future__ import annotations

import glob
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, List, Optional, Sequence, Tuple

import cv2
import numpy as np
import tifffile

__all__ = [
    "IMAGE_SUFFIXES",
    "STRETCH_PERCENTILES",
    "ImageError",
    "ImageReadError",
    "LoadedImage",
    "expand_inputs",
    "load_image",
    "normalise",
    "read_pixels",
]

#: File name endings taken from a folder given as input (case-insensitive).
IMAGE_SUFFIXES: Tuple[str, ...] = (".png", ".tif", ".tiff", ".jpg", ".jpeg", ".bmp")
_TIFF_SUFFIXES = (".tif", ".tiff")
#: Percentiles mapped to 0 and 255 when an image is not 8-bit (see the module docstring).
STRETCH_PERCENTILES: Tuple[float, float] = (0.1, 99.9)
_GLOB_CHARS = set("*?[")


class ImageError(Exception):
    """A problem with one input image (the run reports it, skips the image, goes on)."""


class ImageReadError(ImageError):
    """A file that cannot be read as one 2-D image; the message names the file and why."""


@dataclass
class LoadedImage:
    """One input image, as stored and as the model sees it.

    Attributes:
        path: the file.
        dtype: the stored sample type (``uint8``, ``uint16``, ...).
        channels: stored channels: 1 (gray), 2 (gray + alpha), 3 (RGB) or 4 (RGBA).
        rgb: ``(H, W, 3)`` uint8, normalised (module docstring).
        intensity: ``(H, W)`` float64 in the stored units: the single channel, or the mean
            of the colour channels (alpha excluded).
        stretch: ``(low, high)`` stored values mapped to 0 and 255, or None for 8-bit input.
    """

    path: Path
    dtype: np.dtype
    channels: int
    rgb: np.ndarray
    intensity: np.ndarray
    stretch: Optional[Tuple[float, float]]

    @property
    def shape(self) -> Tuple[int, int]:
        """``(H, W)`` in pixels."""
        return self.rgb.shape[:2]


def read_pixels(path: Path) -> np.ndarray:
    """The stored samples of one image file, channels last in RGB(A) order.

    Returns:
        ``(H, W)`` for one channel or ``(H, W, C)`` with ``C`` in 1..4, in the file's dtype.

    Raises:
        ImageReadError: the file is missing, cannot be decoded, or does not hold one 2-D
            image (a stack of planes, an empty image, an unsupported sample type).
    """
    path = Path(path)
    if not path.is_file():
        raise ImageReadError(f"{path}: no such file")
    if path.suffix.lower() in _TIFF_SUFFIXES:
        try:
            pixels = tifffile.imread(path)
        except Exception as e:  # tifffile raises many types for corrupt files
            raise ImageReadError(f"{path}: not a readable TIFF ({type(e).__name__}: {e})") from e
        pixels = _channels_last(np.asarray(pixels), path)
    else:
        data = np.fromfile(path, dtype=np.uint8)
        pixels = cv2.imdecode(data, cv2.IMREAD_UNCHANGED) if data.size else None
        if pixels is None:
            raise ImageReadError(
                f"{path}: cannot be decoded as an image (empty, truncated, or not a "
                f"PNG/JPEG/BMP file)"
            )
        if pixels.ndim == 3 and pixels.shape[2] == 3:
            pixels = cv2.cvtColor(pixels, cv2.COLOR_BGR2RGB)
        elif pixels.ndim == 3 and pixels.shape[2] == 4:
            pixels = cv2.cvtColor(pixels, cv2.COLOR_BGRA2RGBA)
    if pixels.size == 0:
        raise ImageReadError(f"{path}: the image has no pixels (shape {pixels.shape})")
    if pixels.dtype == np.bool_:
        pixels = pixels.astype(np.uint8) * 255
    if not (np.issubdtype(pixels.dtype, np.integer) or np.issubdtype(pixels.dtype, np.floating)):
        raise ImageReadError(f"{path}: unsupported sample type {pixels.dtype}")
    if np.issubdtype(pixels.dtype, np.floating) and not np.isfinite(pixels).all():
        raise ImageReadError(f"{path}: the image holds NaN or infinite values")
    return pixels


def _channels_last(pixels: np.ndarray, path: Path) -> np.ndarray:
    """``(H, W)``, ``(H, W, C)`` or planar ``(C, H, W)`` (C <= 4) -> ``(H, W[, C])``."""
    if pixels.ndim == 2:
        return pixels
    if pixels.ndim == 3 and pixels.shape[2] <= 4:
        return pixels
    if pixels.ndim == 3 and pixels.shape[0] <= 4:
        return np.moveaxis(pixels, 0, -1)
    raise ImageReadError(
        f"{path}: has shape {pixels.shape}, a stack of planes rather than one 2-D image; "
        f"save one gray, RGB or RGBA image per file"
    )


def normalise(pixels: np.ndarray) -> Tuple[np.ndarray, Optional[Tuple[float, float]]]:
    """Stored samples -> the model's input kind, ``(H, W, 3)`` uint8 RGB.

    Args:
        pixels: ``(H, W)`` or ``(H, W, C)``, ``C`` in 1..4 (gray, gray + alpha, RGB, RGBA),
            any integer or float dtype.

    Returns:
        ``(rgb, stretch)``: the image, and the ``(low, high)`` stored values mapped to 0 and
        255 (None when the input was 8-bit and is used as it is).
    """
    colour = _colour_channels(pixels)  # (H, W, 1) or (H, W, 3)
    stretch = None
    if colour.dtype != np.uint8:
        low, high = (float(v) for v in np.percentile(colour, STRETCH_PERCENTILES))
        if high <= low:
            low, high = float(colour.min()), float(colour.max())
        stretch = (low, high)
        if colour.dtype.kind == "u" and colour.dtype.itemsize <= 2:
            # one table entry per possible value: no float copy of a large image
            table = _stretched(np.arange(np.iinfo(colour.dtype).max + 1, dtype=np.float64),
                               low, high)
            colour = table[colour]
        else:
            colour = _stretched(colour.astype(np.float64), low, high)
    if colour.shape[2] == 1:
        colour = np.repeat(colour, 3, axis=2)
    return np.ascontiguousarray(colour), stretch


def _stretched(values: np.ndarray, low: float, high: float) -> np.ndarray:
    """``values`` mapped linearly from ``[low, high]`` to ``[0, 255]``, clipped, rounded, uint8;
    all 0 when ``high <= low`` (a constant image)."""
    if high <= low:
        return np.zeros(values.shape, dtype=np.uint8)
    return np.rint(np.clip((values - low) / (high - low), 0.0, 1.0) * 255.0).astype(np.uint8)


def _colour_channels(pixels: np.ndarray) -> np.ndarray:
    """``(H, W, 1)`` gray or ``(H, W, 3)`` RGB view of the samples, alpha dropped."""
    if pixels.ndim == 2:
        return pixels[:, :, None]
    channels = pixels.shape[2]
    if channels in (1, 2):  # gray, gray + alpha
        return pixels[:, :, :1]
    return pixels[:, :, :3]  # RGB, RGBA


def load_image(path: Path) -> LoadedImage:
    """Read and normalise one image (see the module docstring).

    Raises:
        ImageReadError: naming the file and the reason it cannot be used.
    """
    pixels = read_pixels(path)
    rgb, stretch = normalise(pixels)
    colour = _colour_channels(pixels)
    if colour.shape[2] == 1:
        intensity = colour[:, :, 0].astype(np.float64)
    else:
        intensity = colour.mean(axis=2, dtype=np.float64)
    channels = 1 if pixels.ndim == 2 else pixels.shape[2]
    return LoadedImage(Path(path), pixels.dtype, channels, rgb, intensity, stretch)


def expand_inputs(specs: Iterable[str]) -> Tuple[List[Path], List[Tuple[str, str]]]:
    """Files, folders and glob patterns -> image files, in the given order, each once.

    A folder contributes the files directly inside it whose names end in
    :data:`IMAGE_SUFFIXES`, sorted; a pattern (``*``, ``?``, ``[``; ``**`` recurses) its
    matching files, sorted; a file is taken whatever its name (reading it tells whether it
    is an image).

    Returns:
        ``(files, problems)``: the files, and ``(spec, reason)`` for each input that gave
        none (missing path, pattern matching nothing, folder without images).
    """
    files: List[Path] = []
    problems: List[Tuple[str, str]] = []
    seen = set()

    def add(found: Sequence[Path]) -> None:
        for path in found:
            key = path.resolve()
            if key not in seen:
                seen.add(key)
                files.append(path)

    for spec in specs:
        path = Path(spec)
        if path.is_dir():
            found = sorted(
                p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
            )
            if not found:
                problems.append(
                    (spec, f"folder holds no image file ({', '.join(IMAGE_SUFFIXES)})")
                )
            add(found)
        elif path.is_file():
            add([path])
        elif _GLOB_CHARS & set(spec):
            found = sorted(Path(p) for p in glob.glob(spec, recursive=True) if Path(p).is_file())
            if not found:
                problems.append((spec, "pattern matches no file"))
            add(found)
        else:
            problems.append((spec, "no such file or folder"))
    return files, problems
