"""Reading microscopy images by a stated rule, and bringing them to what the models saw.

The models were trained on 8-bit, 3-channel images (DSB2018's PNGs, the synthetic set), so
every input is brought to an ``(H, W, 3)`` uint8 RGB array (:func:`normalise`).

**What is read** (:func:`read_image`). A file is read by what it holds, whatever its name
(TIFF by its signature through tifffile; anything else through OpenCV: PNG, JPEG, BMP...), and
it must hold *one 2-D image*, as the file itself describes it:

* gray (one sample per pixel; a TIFF marked min-is-white is inverted to min-is-black);
* gray + alpha, RGB, RGBA only where the file says so: PNG's and JPEG's colour types, a TIFF's
  photometric interpretation ``RGB`` (3 samples, interleaved or planar) and its extra sample
  marked as alpha (gray + alpha, RGBA). Alpha is dropped; palette PNGs become RGB.
* Anything else is refused with a message saying what the file holds (its shape and axes as
  tifffile reads them): a TIFF of several pages or series (z-stacks, time series, ImageJ or
  OME hyperstacks, multi-channel images: ``CYX``, ``QYX``...), a TIFF whose samples are not
  marked RGB (two channels, RGB plus unmarked extra samples), palette TIFFs, other colour
  spaces, animated PNGs, GIFs. Choosing one channel or plane (``--channel``, ``--plane``) is
  not supported yet: save the channel or plane to segment as a file of its own.

  Note: ``tifffile.imwrite`` stores an array of shape ``(3, H, W)`` or ``(4, H, W)`` as planar
  RGB(A) unless told ``photometric="minisblack"``; such a file says RGB and is read as RGB.

**Bit depth** (:func:`stretch_range`). 8-bit images are used as they are. Any other depth
(16-bit, 32-bit, float) is stretched linearly per image so that its 0.1st percentile becomes 0
and its 99.9th percentile 255 (values outside are clipped), the percentiles taken jointly over
the colour channels so the colour balance is kept. Dividing by 257 would leave most microscopy
images nearly black (cameras rarely fill their 16-bit range), and min/max would let a few hot
pixels decide the contrast. But a percentile stretch alone would blow the noise of an empty
field (a negative control, an empty well) up to full contrast, and the model would find
"nuclei" in it. So the stretched range is never narrower than :data:`MIN_SPAN_NOISE` times the
image's noise (its standard deviation, estimated robustly from differences of neighbouring
pixels; at least one stored unit for integer images): an image whose contrast is noise only
stays dim (mode ``limited``) while an image with real structure is stretched as before
(``percentile``). ``stretch=False`` (``--no-stretch``) maps the sample type's whole range to
0..255 instead (uint16: value / 257; floats: 0..1), the same for every image.

**Channels**: gray is replicated to three channels; RGB stays RGB. The model's own channel
order (``INPUT.FORMAT``, BGR for detectron2's models) is applied later, by the predictor.

The per-nucleus table measures intensities on the image as stored (:attr:`LoadedImage.
intensity`: the raw values of a gray image, the mean of the colour channels of a colour image,
never the stretched 8-bit version), so 16-bit quantification is not lost.
"""
from __future__ import annotations

import glob
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterable, List, NamedTuple, Optional, Sequence, Set, Tuple

import cv2
import numpy as np
import tifffile

from ..outdir import LOCK_NAME, RECORD_NAME, recorded_outputs

__all__ = [
    "IMAGE_SUFFIXES",
    "MIN_SPAN_NOISE",
    "STRETCH_PERCENTILES",
    "ImageError",
    "ImageReadError",
    "Inputs",
    "LoadedImage",
    "StoredImage",
    "Stretch",
    "expand_inputs",
    "load_image",
    "noise_sigma",
    "normalise",
    "percentile_normalise",
    "percentile_range",
    "read_image",
    "read_pixels",
    "stretch_range",
]

#: File name endings taken from a folder given as input (case-insensitive).
IMAGE_SUFFIXES: Tuple[str, ...] = (".png", ".tif", ".tiff", ".jpg", ".jpeg", ".bmp")
#: Percentiles mapped to 0 and 255 when an image is not 8-bit (see the module docstring).
STRETCH_PERCENTILES: Tuple[float, float] = (0.1, 99.9)
#: The stretched range is at least this many noise standard deviations wide: noise alone
#: spans about 6 of them (0.1st to 99.9th percentile), so it takes at most ~40 of the 255
#: levels, about 6 levels per standard deviation.
MIN_SPAN_NOISE = 40.0
_GLOB_CHARS = set("*?[")
_TIFF_SIGNATURES = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_COLOUR_TYPES = {0: "gray", 2: "RGB", 3: "RGB", 4: "gray+alpha", 6: "RGBA"}
_NOT_YET = (
    "one 2-D gray or RGB(A) image per file is read (choosing a channel or plane, --channel or "
    "--plane, is not supported yet): save the channel or plane to segment as its own file"
)
_AXIS_WORDS = {"Z": "planes (z)", "C": "channels", "T": "time points", "Q": "pages",
               "I": "pages", "S": "samples per pixel", "R": "tiles", "E": "lambda planes",
               "H": "phases", "A": "angles", "P": "positions", "L": "exposures", "V": "views"}


class ImageError(Exception):
    """A problem with one input image (the run reports it, skips the image, goes on)."""


class ImageReadError(ImageError):
    """A file that cannot be read as one 2-D image; the message names the file and why."""


@dataclass(frozen=True)
class Stretch:
    """How stored values became 0..255.

    Attributes:
        mode: ``"none"`` (8-bit, used as stored), ``"percentile"`` (the percentile stretch),
            ``"limited"`` (the percentile range was narrower than :data:`MIN_SPAN_NOISE` noise
            standard deviations and was widened to that), ``"off"`` (the sample type's range,
            ``stretch=False``).
        low, high: stored values mapped to 0 and 255 (None for ``"none"``).
        noise: the estimated noise standard deviation in stored units (None unless measured).
    """

    mode: str
    low: Optional[float] = None
    high: Optional[float] = None
    noise: Optional[float] = None

    @property
    def range(self) -> Optional[Tuple[float, float]]:
        return None if self.low is None else (self.low, self.high)


@dataclass
class StoredImage:
    """One image as the file holds it.

    Attributes:
        pixels: ``(H, W)`` or ``(H, W, C)``, channels last in gray(+alpha) / RGB(A) order.
        colour: ``"gray"``, ``"gray+alpha"``, ``"RGB"`` or ``"RGBA"``.
        axes: the file's axes as read (tifffile's letters for a TIFF, e.g. ``YX``, ``YXS``,
            ``SYX`` for planar RGB; ``YX`` or ``YXS`` for other formats).
    """

    pixels: np.ndarray
    colour: str
    axes: str


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
        colour, axes: what was read (:class:`StoredImage`).
        stretching: how (:class:`Stretch`).
    """

    path: Path
    dtype: np.dtype
    channels: int
    rgb: np.ndarray
    intensity: np.ndarray
    stretch: Optional[Tuple[float, float]]
    colour: str = ""
    axes: str = ""
    stretching: Optional[Stretch] = None

    @property
    def shape(self) -> Tuple[int, int]:
        """``(H, W)`` in pixels."""
        return self.rgb.shape[:2]


def read_image(path: Path) -> StoredImage:
    """The one 2-D image ``path`` holds, by the rule of the module docstring.

    Raises:
        ImageReadError: the file is missing, cannot be decoded, or does not hold one 2-D gray
            or RGB(A) image; the message names the file, what it holds and what to do.
    """
    path = Path(path)
    if not path.is_file():
        raise ImageReadError(f"{path}: no such file")
    try:
        with open(path, "rb") as f:
            head = f.read(8)
    except OSError as e:
        raise ImageReadError(f"{path}: cannot be read ({e.strerror})") from None
    if head[:4] in _TIFF_SIGNATURES:
        stored = _read_tiff(path)
    elif head[:4] == b"GIF8":
        raise ImageReadError(f"{path}: a GIF (possibly animated) is not read; save it as PNG "
                             f"or TIFF")
    else:
        try:
            stored = _read_with_opencv(path)
        except ImageReadError:
            if path.suffix.lower() in (".tif", ".tiff"):
                raise ImageReadError(f"{path}: not a readable TIFF (it does not start like one, "
                                     f"nor is it another image format)") from None
            raise
    pixels = stored.pixels
    if pixels.size == 0:
        raise ImageReadError(f"{path}: the image has no pixels (shape {pixels.shape})")
    if pixels.dtype == np.bool_:
        stored.pixels = pixels = pixels.astype(np.uint8) * 255
    if not (np.issubdtype(pixels.dtype, np.integer) or np.issubdtype(pixels.dtype, np.floating)):
        raise ImageReadError(f"{path}: unsupported sample type {pixels.dtype}")
    if np.issubdtype(pixels.dtype, np.floating) and not np.isfinite(pixels).all():
        raise ImageReadError(f"{path}: the image holds NaN or infinite values")
    return stored


def read_pixels(path: Path) -> np.ndarray:
    """The stored samples of one image file (:func:`read_image`), channels last:
    ``(H, W)`` or ``(H, W, C)`` with ``C`` in 1..4, in the file's dtype."""
    return read_image(path).pixels


def _describe(shape: Sequence[int], axes: str) -> str:
    words = [f"{n} {_AXIS_WORDS.get(a, a + ' axis')}" for n, a in zip(shape, axes)
             if a not in "YX" and n > 1]
    return ", ".join(words)


def _read_tiff(path: Path) -> StoredImage:
    try:
        with tifffile.TiffFile(path) as tif:
            series = tif.series
            if not series:
                raise ImageReadError(f"{path}: a TIFF without any image")
            if len(series) > 1:
                shapes = "; ".join(f"{s.shape} {s.axes}" for s in series[:3])
                more = ", ..." if len(series) > 3 else ""
                raise ImageReadError(
                    f"{path}: holds {len(series)} images (pages or series of shapes and axes "
                    f"{shapes}{more}); {_NOT_YET}"
                )
            s = series[0]
            page = s.keyframe
            shape, axes = tuple(s.shape), s.axes
            photometric = tifffile.PHOTOMETRIC(page.photometric)
            extra = tuple(page.extrasamples)
            bits = int(page.bitspersample)
            layout = _tiff_layout(path, shape, axes, photometric, extra)
            pixels = np.asarray(s.asarray())
    except ImageReadError:
        raise
    except Exception as e:  # tifffile raises many types for corrupt files
        raise ImageReadError(
            f"{path}: not a readable TIFF ({type(e).__name__}: {' '.join(str(e).split())})"
        ) from e
    colour, kept_axes = layout
    pixels = pixels.reshape([n for n, a in zip(shape, axes) if a in kept_axes])
    if kept_axes == "SYX":
        pixels = np.moveaxis(pixels, 0, -1)
    if photometric == tifffile.PHOTOMETRIC.MINISWHITE:
        if pixels.dtype.kind != "u":
            raise ImageReadError(f"{path}: a min-is-white TIFF of {pixels.dtype} samples; "
                                 f"save it min-is-black")
        white = min(2 ** bits - 1, np.iinfo(pixels.dtype).max)
        pixels = pixels.copy()
        gray = pixels[..., 0] if pixels.ndim == 3 else pixels  # alpha is not inverted
        gray[...] = white - gray
    return StoredImage(pixels, colour, axes)


def _tiff_layout(
    path: Path, shape: Tuple[int, ...], axes: str, photometric, extra: tuple
) -> Tuple[str, str]:
    """``(colour, kept axes)`` of a TIFF series by the module's rule, or ImageReadError."""
    kept = "".join(a for n, a in zip(shape, axes) if a in "YX" or n > 1)
    held = f"shape {shape}, axes {axes}"
    others = kept.replace("Y", "").replace("X", "").replace("S", "")
    if others or kept.count("Y") != 1 or kept.count("X") != 1:
        raise ImageReadError(f"{path}: holds {_describe(shape, axes)} ({held}); {_NOT_YET}")
    P = tifffile.PHOTOMETRIC
    if photometric == P.PALETTE:
        raise ImageReadError(f"{path}: a palette-colour TIFF (colour indices, {held}); save it "
                             f"as gray or RGB")
    if photometric not in (P.MINISBLACK, P.MINISWHITE, P.RGB):
        raise ImageReadError(f"{path}: a TIFF in the {photometric.name} colour space ({held}); "
                             f"save it as gray or RGB")
    if "S" not in kept:
        if photometric == P.RGB:  # RGB with one sample: malformed
            raise ImageReadError(f"{path}: marked RGB but has one sample per pixel ({held})")
        return "gray", kept
    if kept not in ("YXS", "SYX"):
        raise ImageReadError(f"{path}: samples in an unexpected order ({held})")
    samples = shape[axes.index("S")]
    alpha = bool(extra) and tifffile.EXTRASAMPLE(extra[0]) in (
        tifffile.EXTRASAMPLE.ASSOCALPHA, tifffile.EXTRASAMPLE.UNASSALPHA)
    if photometric == P.RGB and samples == 3:
        return "RGB", kept
    if photometric == P.RGB and samples == 4 and alpha:
        return "RGBA", kept
    if photometric != P.RGB and samples == 2 and alpha:
        return "gray+alpha", kept
    marked = "marked RGB" if photometric == P.RGB else "not marked RGB"
    extras = ", ".join(tifffile.EXTRASAMPLE(e).name.lower() for e in extra) or "none"
    raise ImageReadError(
        f"{path}: holds {samples} channels per pixel, {marked} (extra samples: {extras}; "
        f"{held}); {_NOT_YET}"
    )


def _read_with_opencv(path: Path) -> StoredImage:
    data = np.fromfile(path, dtype=np.uint8)
    raw = data.tobytes()
    colour = None
    if raw[:8] == _PNG_SIGNATURE:
        colour = _PNG_COLOUR_TYPES.get(raw[25]) if len(raw) > 25 else None
        animation = raw.find(b"acTL")
        if 0 <= animation < max(raw.find(b"IDAT"), 0):
            frames = int.from_bytes(raw[animation + 4 : animation + 8], "big")
            raise ImageReadError(f"{path}: an animated PNG of {frames} frames; {_NOT_YET}")
    pixels = cv2.imdecode(data, cv2.IMREAD_UNCHANGED) if data.size else None
    if pixels is None:
        raise ImageReadError(
            f"{path}: cannot be decoded as an image (empty, truncated, or not a "
            f"PNG/TIFF/JPEG/BMP file)"
        )
    if pixels.ndim == 3 and pixels.shape[2] == 1:
        pixels = pixels[:, :, 0]
    if pixels.ndim == 2:
        return StoredImage(pixels, "gray", "YX")
    channels = pixels.shape[2]
    if channels == 3:
        return StoredImage(cv2.cvtColor(pixels, cv2.COLOR_BGR2RGB), "RGB", "YXS")
    if channels == 4:
        rgba = cv2.cvtColor(pixels, cv2.COLOR_BGRA2RGBA)
        if colour == "gray+alpha":  # OpenCV expands gray + alpha to BGRA
            return StoredImage(rgba[:, :, [0, 3]], "gray+alpha", "YXS")
        return StoredImage(rgba, "RGBA", "YXS")
    raise ImageReadError(f"{path}: {channels} channels per pixel (shape {pixels.shape}); "
                         f"{_NOT_YET}")


def noise_sigma(colour: np.ndarray) -> float:
    """A robust estimate of the noise standard deviation of ``(H, W[, C])`` samples, in their
    units: the median absolute difference of horizontally neighbouring pixels, scaled to a
    standard deviation (``1.4826 / sqrt(2)``), on at most ~512 evenly spaced rows. Structure
    (nuclei, edges) touches few neighbour pairs and barely moves the median."""
    values = colour if colour.ndim == 3 else colour[:, :, None]
    axis = 1 if values.shape[1] > 1 else 0
    if values.shape[axis] < 2:
        return 0.0
    if axis == 1:
        values = values[:: max(1, values.shape[0] // 512)]
    differences = np.abs(np.diff(values.astype(np.float64), axis=axis))
    return float(1.4826 * np.median(differences) / np.sqrt(2.0))


def _dtype_range(dtype: np.dtype) -> Tuple[float, float]:
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        return float(info.min), float(info.max)
    return 0.0, 1.0


def stretch_range(colour: np.ndarray, stretch: bool = True) -> Stretch:
    """The stored values to map to 0 and 255 for ``(H, W[, C])`` samples (module docstring).

    8-bit samples: mode ``"none"``. ``stretch=False``: the dtype's range (``"off"``).
    Otherwise the percentile range, widened to at least :data:`MIN_SPAN_NOISE` noise standard
    deviations (``"limited"`` when it was).
    """
    if colour.dtype == np.uint8:
        return Stretch("none")
    if not stretch:
        return Stretch("off", *_dtype_range(colour.dtype))
    return percentile_range(colour, STRETCH_PERCENTILES)


def percentile_range(colour: np.ndarray, percentiles: Sequence[float]) -> Stretch:
    """The ``(low, high)`` percentiles of ``(H, W[, C])`` samples (all channels together),
    widened to at least :data:`MIN_SPAN_NOISE` noise standard deviations (mode ``"limited"``
    when they were, else ``"percentile"``). Images over ~4 megapixels are measured on evenly
    spaced rows and columns."""
    step = max(1, int(np.sqrt(colour.shape[0] * colour.shape[1] / 4e6)))
    sample = colour[::step, ::step]
    low, high = (float(v) for v in np.percentile(sample, list(percentiles)))
    if high <= low:
        low, high = float(sample.min()), float(sample.max())
    noise = noise_sigma(sample)
    if np.issubdtype(colour.dtype, np.integer):
        floor = 1.0  # one stored unit
    else:  # about a hundred float32 steps at the image's magnitude
        floor = 1e-5 * max(abs(low), abs(high))
    span = MIN_SPAN_NOISE * max(noise, floor)
    if span > 0 and high - low < span:
        return Stretch("limited", low, low + span, noise)
    return Stretch("percentile", low, high, noise)


def normalise(
    pixels: np.ndarray, stretch: bool = True
) -> Tuple[np.ndarray, Optional[Tuple[float, float]]]:
    """Stored samples -> the model's input kind, ``(H, W, 3)`` uint8 RGB.

    Training and prediction read 16-bit images through this one function.

    Args:
        pixels: ``(H, W)`` or ``(H, W, C)``, ``C`` in 1..4 (gray, gray + alpha, RGB, RGBA),
            any integer or float dtype.
        stretch: the per-image stretch of non-8-bit images (module docstring); False maps the
            dtype's range to 0..255 (``--no-stretch``).

    Returns:
        ``(rgb, stretch)``: the image, and the ``(low, high)`` stored values mapped to 0 and
        255 (None when the input was 8-bit and is used as it is).
    """
    rgb, how = normalise_with(pixels, stretch)
    return rgb, how.range


def normalise_with(pixels: np.ndarray, stretch: bool = True) -> Tuple[np.ndarray, Stretch]:
    """:func:`normalise`, returning the whole :class:`Stretch` (mode, range, noise)."""
    colour = _colour_channels(pixels)  # (H, W, 1) or (H, W, 3)
    how = stretch_range(colour, stretch)
    if how.mode != "none":
        low, high = how.low, how.high
        if colour.dtype.kind == "u" and colour.dtype.itemsize <= 2:
            # one table entry per possible value: no float copy of a large image
            table = _stretched(np.arange(np.iinfo(colour.dtype).max + 1, dtype=np.float64),
                               low, high)
            colour = table[colour]
        else:
            colour = _stretched(colour.astype(np.float64), low, high)
    if colour.shape[2] == 1:
        colour = np.repeat(colour, 3, axis=2)
    return np.ascontiguousarray(colour), how


def percentile_normalise(
    rgb: np.ndarray, percentiles: Sequence[float] = (1.0, 99.8)
) -> Tuple[np.ndarray, Stretch]:
    """``(H, W, 3)`` uint8 -> the same with its ``percentiles`` (all channels together) mapped
    to 0 and 255 (:func:`percentile_range`: never a range narrower than
    :data:`MIN_SPAN_NOISE` noise standard deviations, so an empty field stays dim).

    The normalisation of ``INPUT.NORMALIZE "percentile"`` (the shipped models' recipe), done in
    training after the augmentations and in prediction on the whole image, as StarDist and
    Cellpose normalise: the model sees the same range whatever the camera, exposure or stain.
    """
    if rgb.ndim != 3 or rgb.dtype != np.uint8:
        raise ValueError(f"expected an (H, W, C) uint8 image, got {rgb.shape} {rgb.dtype}")
    how = percentile_range(rgb, percentiles)
    table = _stretched(np.arange(256, dtype=np.float64), how.low, how.high)
    return table[rgb], how


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


def load_image(path: Path, stretch: bool = True) -> LoadedImage:
    """Read (:func:`read_image`) and normalise (:func:`normalise`) one image.

    Raises:
        ImageReadError: naming the file and the reason it cannot be used.
    """
    stored = read_image(path)
    pixels = stored.pixels
    rgb, how = normalise_with(pixels, stretch)
    colour = _colour_channels(pixels)
    if colour.shape[2] == 1:
        intensity = colour[:, :, 0].astype(np.float64)
    else:
        intensity = colour.mean(axis=2, dtype=np.float64)
    channels = 1 if pixels.ndim == 2 else pixels.shape[2]
    return LoadedImage(Path(path), pixels.dtype, channels, rgb, intensity, how.range,
                       stored.colour, stored.axes, how)


class Inputs(NamedTuple):
    """What :func:`expand_inputs` found."""

    files: List[Path]  # the images, in the given order, each once
    problems: List[Tuple[str, str]]  # (spec, reason) for each input that gave no file
    skipped_outputs: List[Path]  # files left out: outputs of an earlier run of the tool


def _recorded_by(folder: Path, tool: str, cache: Dict[Path, Set[str]]) -> Set[str]:
    """Names ``tool`` put on record in ``folder`` (:mod:`sharp_fpn.outdir`'s record), cached."""
    if folder not in cache:
        cache[folder] = recorded_outputs(folder, tool)
    return cache[folder]


def expand_inputs(specs: Iterable[str], outputs_of: Optional[str] = "predict") -> Inputs:
    """Files, folders and glob patterns -> image files, in the given order, each once.

    A folder contributes the files directly inside it whose names end in
    :data:`IMAGE_SUFFIXES` (any case), sorted; a pattern (``*``, ``?``, ``[``; ``**``
    recurses) its matching files, sorted; a file is taken whatever its name (reading it tells
    whether it is an image). Files that the tool ``outputs_of`` wrote (its record in their
    folder, :mod:`sharp_fpn.outdir`) are left out, so that a run never reads its own outputs;
    so are the record and lock files themselves.

    Returns:
        :class:`Inputs`: ``(files, problems, skipped_outputs)``.
    """
    files: List[Path] = []
    problems: List[Tuple[str, str]] = []
    skipped: List[Path] = []
    seen = set()
    records: Dict[Path, Set[str]] = {}

    def add(found: Sequence[Path]) -> int:
        added = 0
        for path in found:
            key = path.resolve()
            if key in seen:
                continue
            seen.add(key)
            if path.name in (RECORD_NAME, LOCK_NAME) or (
                outputs_of and path.name in _recorded_by(key.parent, outputs_of, records)
            ):
                skipped.append(path)
                continue
            files.append(path)
            added += 1
        return added

    for spec in specs:
        path = Path(spec)
        if path.is_dir():
            found = sorted(
                p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
            )
            before = len(skipped)
            if not found:
                problems.append(
                    (spec, f"folder holds no image file ({', '.join(IMAGE_SUFFIXES)})")
                )
            elif not add(found) and len(skipped) - before == len(found):
                problems.append((spec, f"folder holds only outputs of an earlier {outputs_of} "
                                       f"run ({len(found)} files)"))
        elif path.is_file():
            add([path])
        elif _GLOB_CHARS & set(spec):
            found = sorted(Path(p) for p in glob.glob(spec, recursive=True) if Path(p).is_file())
            if not found:
                problems.append((spec, "pattern matches no file"))
            add(found)
        else:
            problems.append((spec, "no such file or folder"))
    return Inputs(files, problems, skipped)
