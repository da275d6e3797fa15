"""Reading microscopy images by a stated rule, and bringing them to what the models saw.

The models were trained on 8-bit, 3-channel images (DSB2018's PNGs, the synthetic set), so
every input is brought to an ``(H, W, 3)`` uint8 RGB array (:func:`normalise`).

**What is read** (:func:`read_image`). A file is read by what it holds, whatever its name
(TIFF by its signature through tifffile; anything else through OpenCV: PNG, JPEG, BMP...), and
it must hold *one 2-D image* (or a stack of them, below), as the file itself describes it:

* gray (one sample per pixel; a TIFF marked min-is-white is inverted to min-is-black);
* gray + alpha, RGB, RGBA only where the file says so: PNG's and JPEG's colour types, a TIFF's
  photometric interpretation ``RGB`` (3 samples, interleaved or planar) and its extra sample
  marked as alpha (gray + alpha, RGBA). Alpha is dropped; palette PNGs become RGB.
* **Stacks and channels** (:func:`read_planes`, what predict reads): a TIFF series (a
  multi-page TIFF of equal pages, an ImageJ or OME hyperstack) or an OME-Zarr image (a
  ``.zarr`` / ``.ome.zarr`` folder, NGFF 0.4 or 0.5: its highest-resolution level) is read as
  ``N`` 2-D planes: every axis but Y, X, the channel axis (``C``, or samples not marked as
  colour) and the colour samples, flattened in stored order (z, time, pages). A file of several
  channels needs one picked (``channel``, ``--channel``): by its name (OME ``Channel Name``,
  OME-Zarr ``omero`` labels; exact, else the one case-insensitive match) or its index; without
  it, or with a channel the file does not have, it is refused naming the file and listing its
  channels. ``--channel`` on an RGB image picks red, green or blue (0, 1, 2); a gray image
  without channel names is read as it is, whatever ``--channel`` says.
* **Pixel size**: OME ``PhysicalSizeX/Y`` (with their units), an ImageJ TIFF's X/YResolution
  with its ``unit`` (µm, nm, mm...), an OME-Zarr's ``scale`` transform with its axes' units;
  none from a plain TIFF's resolution (mostly a printer's dpi).
* :func:`read_image` (training, and any one-image reader) takes one 2-D image only and refuses
  a stack, naming its planes.
* Anything else is refused with a message saying what the file holds (its shape and axes as
  tifffile reads them): a TIFF of several series of different shapes, a file with two channel
  axes, palette TIFFs, other colour spaces, animated PNGs, GIFs.

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
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterable, List, NamedTuple, Optional, Sequence, Set, Tuple, Union
from xml.etree import ElementTree

import cv2
import numpy as np
import tifffile

from ..outdir import LOCK_NAME, RECORD_NAME, recorded_outputs

__all__ = [
    "ChannelSpec",
    "IMAGE_SUFFIXES",
    "ImageError",
    "ImageReadError",
    "Inputs",
    "LoadedImage",
    "MIN_SPAN_NOISE",
    "PixelSize",
    "Planes",
    "STRETCH_PERCENTILES",
    "StoredImage",
    "Stretch",
    "arrange_planes",
    "colour_channels",
    "expand_inputs",
    "imagej_pixel_size",
    "is_zarr",
    "load_image",
    "load_planes",
    "loaded_image",
    "noise_sigma",
    "normalise",
    "ome_channels_and_pixel_size",
    "percentile_normalise",
    "percentile_range",
    "read_image",
    "read_pixels",
    "read_planes",
    "scale_to_uint8",
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
    "one 2-D gray or RGB(A) image, or one stack of such planes, per file is read (several "
    "images of different shapes, or two channel axes, are not supported yet; --channel picks "
    "a channel): save the image to segment as its own file"
)
_ONE_IMAGE = (
    "one 2-D image is read here (tools/predict.py segments stacks plane by plane, and "
    "--channel picks a channel): save the plane or channel to use as its own file"
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
        plane: the plane's index in a file of several (:func:`load_planes`), else None;
        planes: how many the file holds; plane_axes: the axes they run along.
        channel, channel_name: the channel picked (``--channel``), None / "" when none was.
        pixel_size: µm per pixel (:class:`PixelSize`), None when not known.
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
    plane: Optional[int] = None
    planes: int = 1
    plane_axes: str = ""
    channel: Optional[int] = None
    channel_name: str = ""
    pixel_size: Optional["PixelSize"] = None

    @property
    def shape(self) -> Tuple[int, int]:
        """``(H, W)`` in pixels."""
        return self.rgb.shape[:2]


def read_pixels(path: Path) -> np.ndarray:
    """The stored samples of one image file (:func:`read_image`), channels last:
    ``(H, W)`` or ``(H, W, C)`` with ``C`` in 1..4, in the file's dtype."""
    return read_image(path).pixels


def _describe(shape: Sequence[int], axes: str) -> str:
    words = [f"{n} {_AXIS_WORDS.get(a, a + ' axis')}" for n, a in zip(shape, axes)
             if a not in "YX" and n > 1]
    return ", ".join(words)


@dataclass(frozen=True)
class PixelSize:
    """The size of one pixel in micrometres (``x`` across columns, ``y`` down rows), and where
    it came from: ``"OME PhysicalSizeX/Y"``, ``"ImageJ resolution"``, ``"OME-Zarr scale"`` or
    ``"--pixel-size"``."""

    x: float
    y: float
    source: str


@dataclass
class Planes:
    """What one file holds, as :func:`read_planes` reads it.

    Attributes:
        pixels: ``(N, H, W)`` or ``(N, H, W, C)``: the file's ``N`` 2-D planes (z planes, time
            points, pages: every axis but the channel, colour, Y and X axes, flattened in the
            stored order), colour last (gray(+alpha) / RGB(A) order).
        colour: ``"gray"``, ``"gray+alpha"``, ``"RGB"`` or ``"RGBA"``.
        axes: the file's axes as read (tifffile's letters; an OME-Zarr's axis names).
        plane_axes: the letters of the axes flattened into ``N`` (``""`` for one plane).
        channel: the channel picked (``--channel``), None when none was.
        channel_names: the file's channel names (OME ``Channel Name``, OME-Zarr ``omero``
            labels; empty when the file names none).
        pixel_size: as the file gives it (None when it does not).
    """

    pixels: np.ndarray
    colour: str
    axes: str
    plane_axes: str = ""
    channel: Optional[int] = None
    channel_names: Tuple[str, ...] = ()
    pixel_size: Optional[PixelSize] = None

    @property
    def count(self) -> int:
        return int(self.pixels.shape[0])

    def plane(self, k: int) -> StoredImage:
        return StoredImage(self.pixels[k], self.colour, self.axes)


ChannelSpec = Union[int, str, None]

#: Lengths in micrometres of the units OME, OME-Zarr and ImageJ files name.
_UNITS_UM = {"µm": 1.0, "um": 1.0, "micron": 1.0, "microns": 1.0, "micrometer": 1.0,
             "micrometre": 1.0, "\\u00b5m": 1.0, "μm": 1.0, "nm": 1e-3, "nanometer": 1e-3,
             "nanometre": 1e-3, "mm": 1e3, "millimeter": 1e3, "millimetre": 1e3, "cm": 1e4,
             "centimeter": 1e4, "m": 1e6, "meter": 1e6, "å": 1e-4, "angstrom": 1e-4}


def _to_um(value, unit) -> Optional[float]:
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    factor = _UNITS_UM.get(str(unit).strip().lower())
    if factor is None or not value > 0 or not math.isfinite(value):
        return None
    return value * factor


def ome_channels_and_pixel_size(xml: Optional[str]) -> Tuple[Tuple[str, ...], Optional[PixelSize]]:
    """Channel names and pixel size of an OME-XML's first image."""
    if not xml:
        return (), None
    try:
        root = ElementTree.fromstring(xml)
    except ElementTree.ParseError:
        return (), None
    pixels = next((e for e in root.iter() if e.tag.rsplit("}", 1)[-1] == "Pixels"), None)
    if pixels is None:
        return (), None
    names = tuple(c.get("Name", "") for c in pixels if c.tag.rsplit("}", 1)[-1] == "Channel")
    x = _to_um(pixels.get("PhysicalSizeX"), pixels.get("PhysicalSizeXUnit", "µm"))
    y = _to_um(pixels.get("PhysicalSizeY"), pixels.get("PhysicalSizeYUnit", "µm"))
    size = None
    if x or y:
        size = PixelSize(x or y, y or x, "OME PhysicalSizeX/Y")
    return names, size


def imagej_pixel_size(tif, page) -> Optional[PixelSize]:
    """The pixel size of an ImageJ TIFF (its resolution tags in its ``unit``), in µm; None
    when the file gives no unit or no resolution."""
    meta = tif.imagej_metadata or {}
    unit = meta.get("unit")
    if not unit:
        return None
    sizes = []
    for tag in ("XResolution", "YResolution"):
        value = page.tags.get(tag)
        if value is None:
            return None
        num, den = value.value
        sizes.append(_to_um(den / num if num else 0, unit))
    if not all(sizes):
        return None
    return PixelSize(sizes[0], sizes[1], "ImageJ resolution")


def _channel_index(path: Path, spec: ChannelSpec, count: int,
                   names: Sequence[str]) -> int:
    """The index ``spec`` names among ``count`` channels, or ImageReadError listing them."""
    names = list(names) if len(names) == count else []
    if isinstance(spec, str):
        if spec in names:
            return names.index(spec)
        lowered = [n.lower() for n in names]
        if spec.lower() in lowered and lowered.count(spec.lower()) == 1:
            return lowered.index(spec.lower())
        if spec.strip().isdigit():
            spec = int(spec)
    if isinstance(spec, (int, np.integer)) and not isinstance(spec, bool) and 0 <= spec < count:
        return int(spec)
    raise ImageReadError(
        f"{path}: has no channel {spec!r}; it has {_channel_list(count, names)}")


def _channel_list(count: int, names: Sequence[str]) -> str:
    names = list(names) if len(names) == count else []
    items = [f"{i} ({names[i]})" if names and names[i] else str(i) for i in range(count)]
    return f"{count} channel{'s' if count != 1 else ''}: " + ", ".join(items)


def arrange_planes(path: Path, pixels: np.ndarray, axes: str, photometric, extra: tuple,
             names: Sequence[str], channel: ChannelSpec) -> Planes:
    """A stored array of ``axes`` -> :class:`Planes` (the module docstring's rule)."""
    shape = tuple(pixels.shape)
    held = f"shape {shape}, axes {axes}"
    P = tifffile.PHOTOMETRIC
    if photometric == P.PALETTE:
        raise ImageReadError(f"{path}: a palette-colour TIFF (colour indices, {held}); save it "
                             f"as gray or RGB")
    if photometric not in (P.MINISBLACK, P.MINISWHITE, P.RGB):
        raise ImageReadError(f"{path}: a TIFF in the {photometric.name} colour space ({held}); "
                             f"save it as gray or RGB")
    if axes.count("Y") != 1 or axes.count("X") != 1 or len(set(axes)) != len(axes):
        raise ImageReadError(f"{path}: holds {_describe(shape, axes)} ({held}); {_NOT_YET}")
    size = dict(zip(axes, shape))
    samples = size.get("S", 1)
    colour, colour_axis, channel_axis = "gray", None, None
    if photometric == P.RGB and samples == 1:
        raise ImageReadError(f"{path}: marked RGB but has one sample per pixel ({held})")
    if samples > 1:
        alpha = bool(extra) and tifffile.EXTRASAMPLE(extra[0]) in (
            tifffile.EXTRASAMPLE.ASSOCALPHA, tifffile.EXTRASAMPLE.UNASSALPHA)
        if photometric == P.RGB and samples == 3:
            colour, colour_axis = "RGB", "S"
        elif photometric == P.RGB and samples == 4 and alpha:
            colour, colour_axis = "RGBA", "S"
        elif photometric != P.RGB and samples == 2 and alpha:
            colour, colour_axis = "gray+alpha", "S"
        else:
            channel_axis = "S"
    if "C" in size and (size["C"] > 1 or channel_axis is None):
        if channel_axis is not None:
            raise ImageReadError(f"{path}: holds {_describe(shape, axes)} ({held}); {_NOT_YET}")
        channel_axis = "C"
    count = size[channel_axis] if channel_axis else 1
    if channel_axis and count > 1 and channel is None:
        if channel_axis == "S":
            marked = "marked RGB" if photometric == P.RGB else "not marked RGB"
            extras = ", ".join(tifffile.EXTRASAMPLE(e).name.lower() for e in extra) or "none"
            what = f"{count} channels per pixel, {marked} (extra samples: {extras}; {held})"
        else:
            what = f"{_describe(shape, axes)} ({held})"
        raise ImageReadError(f"{path}: holds {what}; {_channel_list(count, names)}; pick the "
                             f"nuclear one with --channel INDEX or NAME")
    work = pixels
    letters = list(axes)
    picked: Optional[int] = None
    if channel is not None:
        if channel_axis:
            picked = _channel_index(path, channel, count, names)
            work = np.take(work, picked, axis=letters.index(channel_axis))
            letters.remove(channel_axis)
        elif colour in ("RGB", "RGBA"):
            picked = _channel_index(path, channel, 3, ("red", "green", "blue"))
            work = np.take(work, picked, axis=letters.index("S"))
            letters.remove("S")
            colour, colour_axis = "gray", None
        elif len(names) == 1:  # one named channel: the name must be it
            picked = _channel_index(path, channel, 1, names)
        # else one gray channel, unnamed (a PNG among OME-TIFFs): the image, as it is
    elif channel_axis:  # one channel: its axis has size 1
        work = np.take(work, 0, axis=letters.index(channel_axis))
        letters.remove(channel_axis)
    planes = [a for a in letters if a not in ("Y", "X", colour_axis)]
    order = ([letters.index(a) for a in planes] + [letters.index("Y"), letters.index("X")]
             + ([letters.index(colour_axis)] if colour_axis else []))
    work = np.transpose(work, order)
    height, width = work.shape[len(planes)], work.shape[len(planes) + 1]
    work = work.reshape((-1, height, width) + work.shape[len(planes) + 2:])
    plane_axes = "".join(a for a in planes if size[a] > 1)
    return Planes(work, colour, axes, plane_axes, picked,
                  tuple(names) if len(names) == count else ())


def _read_tiff(path: Path, channel: ChannelSpec = None) -> Planes:
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
            names, pixel_size = ome_channels_and_pixel_size(tif.ome_metadata) if tif.is_ome else ((), None)
            if pixel_size is None and tif.is_imagej:
                pixel_size = imagej_pixel_size(tif, page)
            # refuse what cannot be read before reading all of it
            arrange_planes(path, np.broadcast_to(np.uint8(0), shape), axes, photometric, extra,
                     names, channel)
            pixels = np.asarray(s.asarray()).reshape(shape)
    except ImageReadError:
        raise
    except Exception as e:  # tifffile raises many types for corrupt files
        raise ImageReadError(
            f"{path}: not a readable TIFF ({type(e).__name__}: {' '.join(str(e).split())})"
        ) from e
    planes = arrange_planes(path, pixels, axes, photometric, extra, names, channel)
    planes.pixel_size = pixel_size
    if photometric == tifffile.PHOTOMETRIC.MINISWHITE:
        if planes.pixels.dtype.kind != "u":
            raise ImageReadError(f"{path}: a min-is-white TIFF of {planes.pixels.dtype} "
                                 f"samples; save it min-is-black")
        white = min(2 ** bits - 1, np.iinfo(planes.pixels.dtype).max)
        values = planes.pixels.copy()
        gray = values[..., 0] if planes.colour == "gray+alpha" else values  # alpha stays
        gray[...] = white - gray
        planes.pixels = values
    return planes


def is_zarr(path: Path) -> bool:
    """Whether ``path`` is a Zarr folder (named ``*.zarr``, or holding Zarr metadata)."""
    path = Path(path)
    return path.is_dir() and (path.name.lower().endswith(".zarr") or any(
        (path / n).is_file() for n in (".zattrs", ".zgroup", "zarr.json")))


class ZarrHeader(NamedTuple):
    """What an OME-Zarr image's metadata says of its highest-resolution level."""

    array: Any  # the level's zarr array (nothing read yet)
    level: str  # its path in the group
    axes: str  # one letter an axis (TCZYX...), "?" for a longer name
    pixel_size: Optional[PixelSize]  # from the scale transforms, in µm where the unit says
    names: Tuple[str, ...]  # the omero channel labels


def zarr_header(path: Path, suffix: str = "") -> ZarrHeader:
    """The highest resolution level of the OME-Zarr image ``path`` (``multiscales``, NGFF
    0.4/0.5), from its metadata alone: the reader's and the large-image path's one rule.

    Raises:
        ImageReadError: no multiscales metadata (``suffix`` is added to the message), or axes
            that do not match the array; zarr's own errors pass through.
    """
    import zarr

    group = zarr.open_group(str(path), mode="r")
    attrs = dict(group.attrs)
    meta = attrs.get("ome", attrs)
    scales = meta.get("multiscales")
    if not scales:
        raise ImageReadError(f"{path}: a Zarr without OME multiscales metadata (not an "
                             f"OME-Zarr image){suffix}")
    scale = scales[0]
    level = scale["datasets"][0]
    array = group[level["path"]]
    named = scale.get("axes") or list("tczyx"[-array.ndim:])
    letters = [str(a["name"] if isinstance(a, dict) else a) for a in named]
    units = [a.get("unit") if isinstance(a, dict) else None for a in named]
    axes = "".join(a.upper() if len(a) == 1 else "?" for a in letters)
    if len(axes) != array.ndim:
        raise ImageReadError(f"{path}: its axes {letters} do not match its array's "
                             f"{array.ndim} dimensions")
    factors = [1.0] * array.ndim
    for transforms in (scale.get("coordinateTransformations") or [],
                       level.get("coordinateTransformations") or []):
        for t in transforms:
            if t.get("type") == "scale" and len(t.get("scale", [])) == array.ndim:
                factors = [f * float(v) for f, v in zip(factors, t["scale"])]
    pixel_size = None
    if "Y" in axes and "X" in axes:
        y = _to_um(factors[axes.index("Y")], units[axes.index("Y")] or "")
        x = _to_um(factors[axes.index("X")], units[axes.index("X")] or "")
        if x and y:
            pixel_size = PixelSize(x, y, "OME-Zarr scale")
    channels = (meta.get("omero") or {}).get("channels") or []
    names = tuple(str(c.get("label", "")) for c in channels if isinstance(c, dict))
    return ZarrHeader(array, str(level["path"]), axes, pixel_size, names)


def _read_zarr(path: Path, channel: ChannelSpec = None) -> Planes:
    """The highest-resolution level of an OME-Zarr image (:func:`zarr_header`)."""
    try:
        head = zarr_header(path, f"; {_NOT_YET}")
        array, axes, pixel_size, names = head.array, head.axes, head.pixel_size, head.names
        arrange_planes(path, np.broadcast_to(np.uint8(0), array.shape), axes,
                 tifffile.PHOTOMETRIC.MINISBLACK, (), names, channel)
        pixels = np.asarray(array[...])
    except ImageReadError:
        raise
    except Exception as e:  # zarr, numcodecs and json raise many types
        raise ImageReadError(
            f"{path}: not a readable OME-Zarr image ({type(e).__name__}: "
            f"{' '.join(str(e).split())})") from e
    planes = arrange_planes(path, pixels, axes, tifffile.PHOTOMETRIC.MINISBLACK, (), names, channel)
    planes.pixel_size = pixel_size
    return planes


def read_planes(path: Path, channel: ChannelSpec = None) -> Planes:
    """Every 2-D plane ``path`` holds, and the channel ``channel`` picks (module docstring).

    Args:
        channel: an index (``int``, or a string of digits no channel is named) or a channel
            name (OME ``Channel Name``; exact, else the one case-insensitive match). None: the
            file must hold one channel (gray) or one colour image (RGB(A)).

    Raises:
        ImageReadError: the file cannot be read, holds what is not read (several images of
            different shapes, other colour spaces...), holds several channels and none was
            picked, or has no such channel: the message names the file, says what it holds
            and lists its channels.
    """
    path = Path(path)
    if is_zarr(path):
        return _checked(path, _read_zarr(path, channel))
    if not path.is_file():
        raise ImageReadError(f"{path}: no such file")
    try:
        with open(path, "rb") as f:
            head = f.read(8)
    except OSError as e:
        raise ImageReadError(f"{path}: cannot be read ({e.strerror})") from None
    if head[:4] in _TIFF_SIGNATURES:
        return _checked(path, _read_tiff(path, channel))
    if head[:4] == b"GIF8":
        raise ImageReadError(f"{path}: a GIF (possibly animated) is not read; save it as PNG "
                             f"or TIFF")
    try:
        stored = _read_with_opencv(path)
    except ImageReadError:
        if path.suffix.lower() in (".tif", ".tiff"):
            raise ImageReadError(f"{path}: not a readable TIFF (it does not start like one, "
                                 f"nor is it another image format)") from None
        raise
    planes = Planes(stored.pixels[None], stored.colour, stored.axes)
    if channel is not None:
        axes = "YXS" if stored.pixels.ndim == 3 else "YX"
        photometric = (tifffile.PHOTOMETRIC.RGB if stored.colour.startswith("RGB")
                       else tifffile.PHOTOMETRIC.MINISBLACK)
        extra = (tifffile.EXTRASAMPLE.UNASSALPHA,) if stored.colour.endswith(
            ("alpha", "RGBA")) else ()
        planes = arrange_planes(path, stored.pixels, axes, photometric, extra, (), channel)
        planes.axes = stored.axes
    return _checked(path, planes)


def _checked(path: Path, planes: Planes) -> Planes:
    pixels = planes.pixels
    if pixels.size == 0:
        raise ImageReadError(f"{path}: the image has no pixels (shape {pixels.shape[1:]})")
    if pixels.dtype == np.bool_:
        planes.pixels = pixels = pixels.astype(np.uint8) * 255
    if not (np.issubdtype(pixels.dtype, np.integer) or np.issubdtype(pixels.dtype, np.floating)):
        raise ImageReadError(f"{path}: unsupported sample type {pixels.dtype}")
    if np.issubdtype(pixels.dtype, np.floating) and not np.isfinite(pixels).all():
        raise ImageReadError(f"{path}: the image holds NaN or infinite values")
    return planes


def read_image(path: Path) -> StoredImage:
    """The one 2-D image ``path`` holds, by the rule of the module docstring.

    Raises:
        ImageReadError: the file is missing, cannot be decoded, or does not hold one 2-D gray
            or RGB(A) image (:func:`read_planes` reads stacks and picks channels); the message
            names the file, what it holds and what to do.
    """
    planes = read_planes(path)
    if planes.count != 1:
        stored = planes.pixels
        raise ImageReadError(
            f"{path}: holds {planes.count} {_plane_words(planes.plane_axes)} (shape "
            f"{stored.shape[1:]} each, axes {planes.axes}); {_ONE_IMAGE}")
    return planes.plane(0)


def _plane_words(plane_axes: str) -> str:
    if len(plane_axes) == 1:
        return _AXIS_WORDS.get(plane_axes, "planes")
    return f"planes ({', '.join(_AXIS_WORDS.get(a, a) for a in plane_axes)})"


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
    colour = colour_channels(pixels)  # (H, W, 1) or (H, W, 3)
    how = stretch_range(colour, stretch)
    if how.mode != "none":
        low, high = how.low, how.high
        if colour.dtype.kind == "u" and colour.dtype.itemsize <= 2:
            # one table entry per possible value: no float copy of a large image
            table = scale_to_uint8(np.arange(np.iinfo(colour.dtype).max + 1, dtype=np.float64),
                               low, high)
            colour = table[colour]
        else:
            colour = scale_to_uint8(colour.astype(np.float64), low, high)
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
    table = scale_to_uint8(np.arange(256, dtype=np.float64), how.low, how.high)
    return table[rgb], how


def scale_to_uint8(values: np.ndarray, low: float, high: float) -> np.ndarray:
    """``values`` mapped linearly from ``[low, high]`` to ``[0, 255]``, clipped, rounded, uint8;
    all 0 when ``high <= low`` (a constant image)."""
    if high <= low:
        return np.zeros(values.shape, dtype=np.uint8)
    return np.rint(np.clip((values - low) / (high - low), 0.0, 1.0) * 255.0).astype(np.uint8)


def colour_channels(pixels: np.ndarray) -> np.ndarray:
    """``(H, W, 1)`` gray or ``(H, W, 3)`` RGB view of the samples, alpha dropped."""
    if pixels.ndim == 2:
        return pixels[:, :, None]
    channels = pixels.shape[2]
    if channels in (1, 2):  # gray, gray + alpha
        return pixels[:, :, :1]
    return pixels[:, :, :3]  # RGB, RGBA


def loaded_image(path: Path, stored: StoredImage, stretch: bool) -> LoadedImage:
    """A plane read (:class:`StoredImage`) as the model and the table see it: the 8-bit RGB
    (:func:`normalise_with`), the intensity in stored units and the stretch used."""
    pixels = stored.pixels
    rgb, how = normalise_with(pixels, stretch)
    colour = colour_channels(pixels)
    if colour.shape[2] == 1:
        intensity = colour[:, :, 0].astype(np.float64)
    else:
        intensity = colour.mean(axis=2, dtype=np.float64)
    channels = 1 if pixels.ndim == 2 else pixels.shape[2]
    return LoadedImage(Path(path), pixels.dtype, channels, rgb, intensity, how.range,
                       stored.colour, stored.axes, how)


def load_image(path: Path, stretch: bool = True) -> LoadedImage:
    """Read (:func:`read_image`) and normalise (:func:`normalise`) one image.

    Raises:
        ImageReadError: naming the file and the reason it cannot be used.
    """
    return loaded_image(path, read_image(path), stretch)


def load_planes(path: Path, stretch: bool = True, channel: ChannelSpec = None,
                pixel_size: Optional[float] = None) -> List[LoadedImage]:
    """Read every plane of ``path`` (:func:`read_planes`), each normalised on its own
    (:func:`normalise`: each plane its own stretch), with the plane index, the channel picked
    and the pixel size: ``pixel_size`` (µm, ``--pixel-size``) when given, else the file's.

    Raises:
        ImageReadError: naming the file and the reason it cannot be used.
    """
    planes = read_planes(path, channel)
    size = planes.pixel_size
    if pixel_size is not None:
        size = PixelSize(float(pixel_size), float(pixel_size), "--pixel-size")
    loaded = []
    for k in range(planes.count):
        image = loaded_image(path, planes.plane(k), stretch)
        image.plane = k if planes.count > 1 else None
        image.planes = planes.count
        image.plane_axes = planes.plane_axes
        image.channel = planes.channel
        if planes.channel is not None and planes.channel_names:
            image.channel_name = planes.channel_names[planes.channel]
        image.pixel_size = size
        loaded.append(image)
    return loaded


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
        if path.is_dir() and is_zarr(path):
            add([path])
            continue
        if path.is_dir():
            found = sorted(
                p for p in path.iterdir()
                if (p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
                or (p.is_dir() and p.name.lower().endswith(".zarr"))
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
            found = sorted(Path(p) for p in glob.glob(spec, recursive=True)
                           if Path(p).is_file() or is_zarr(Path(p)))
            if not found:
                problems.append((spec, "pattern matches no file"))
            add(found)
        else:
            problems.append((spec, "no such file or folder"))
    return Inputs(files, problems, skipped)
