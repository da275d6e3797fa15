"""Images larger than memory: read tile by tile, labels written chunk by chunk (OME-Zarr).

:func:`segment_large` labels the nuclei of a 2-D image of any size (a 30,000 x 30,000 px
slide) with a peak memory that does not grow with the image's height: the pixels, labels and
instances held at once are those of one row of tiles plus its overlap and the rows of label
chunks not yet written. Its outputs are those of :func:`sharp_fpn.predict.run.predict_images`
for one image, as files that never need the whole image in memory:

* the labels as an OME-Zarr image (NGFF 0.4, Zarr v2 format): a group ``<stem>_labels.ome.zarr``
  with one ``multiscales`` level ``"0"``, ``(y, x)`` uint32 (more nuclei than a uint16 holds fit
  a slide), axes in micrometres with a ``scale`` transform when the pixel size is known, and
  ``image-label`` metadata; chunks of ``chunk x chunk`` px, each written once, when no later
  tile can touch it. :func:`~sharp_fpn.predict.image_io.read_planes` and napari read it back;
* the per-nucleus CSV (:data:`~.outputs.TABLE_COLUMNS`, plus :data:`~.formats.PHYSICAL_COLUMNS`
  when the pixel size is known), streamed one row per nucleus as it is finished, the intensity
  measured on the stored values of the same windows (:attr:`~.image_io.LoadedImage.intensity`);
* optionally the outlines: a QuPath GeoJSON FeatureCollection and a Fiji ROI zip, streamed, in
  the format of :mod:`.formats`;
* no overlay (a 30,000 px overlay PNG is itself larger than memory; view the labels in napari).

Every output is written under a temporary name beside it (``.<name>.<random>.tmp``) and renamed
when whole; a failure (an unreadable window, a model error on a tile) removes them and leaves
no file half-written.

**Reading** (:class:`LargeSource`): a TIFF (tiled, striped or contiguous; BigTIFF, OME-TIFF,
ImageJ) through ``tifffile``'s Zarr store of its first series, an OME-Zarr folder through
``zarr``; only windows are read. What a file must hold, the channel picked (``channel``, by
index or name), min-is-white inversion and the pixel size follow :mod:`.image_io`'s rule
exactly (the same code decides); a file of several planes is refused (predict reads stacks
plane by plane, whole).

**Normalisation, exactly as the whole-image path.** The 16-bit stretch (:func:`~.image_io.
stretch_range`) and the zoo models' percentile normalisation (``INPUT.NORMALIZE``,
:meth:`NucleiPredictor.prepare`) are both measured, on images over 4 megapixels, on a strided
sample of every ``step``-th row and column (:func:`~.image_io.percentile_range`, ``step =
int(sqrt(H W / 4e6))``), which is at most 16 megapixels whatever the image. This module reads
that same sample window by window (:func:`strided_sample`) and computes both ranges from it,
so the numbers are the whole image's, bit for bit, not an approximation; each tile is then
stretched and normalised by the two resulting tables.

**Stitching, exactly as the whole-image path** (:class:`BandStitcher`). Tiles are
:func:`~.tiling.tile_grid`'s, taken one row of tiles at a time; a tile keeps the instances whose
box centre lies in its core (the core-owned seam-free rule of :mod:`.tiling`). The whole-image
:func:`~.tiling.stitch_instances` paints instances best score first (ties: tile order, then
order in the tile), each taking the pixels of its mask no better instance kept, and drops one
keeping less than ``min_kept_fraction`` of its mask. Whether instance ``i`` is kept and which
pixels it takes depends only on the better instances whose boxes overlap its box. So an
instance is *decided* as soon as every instance that could overlap it is known (its box ends
above the first row a later row of tiles can reach) and every better one overlapping it is
decided; undecided instances wait for the next row of tiles (and block the worse ones that
overlap them). Decided instances are painted in that order into a band of label rows, each
reduced to its largest 8-connected piece (:func:`~.tiling.keep_largest_components`; the other
pieces stay taken, as background), and its CSV row and outline written. Label rows above every
undecided instance and every row a later tile can reach are final: their chunks are written
and dropped from the band. The labels equal the whole-image path's (``NucleiPredictor.predict``
with the same ``tile`` and ``overlap``) up to a renumbering: ids are given ``1, 2, ...`` in the
order nuclei are decided (row of tiles by row of tiles, best score first within one), which is
stable from run to run, where the whole-image path numbers by score over the whole image.

**Memory**: at most one row of tiles is in flight (``map_tiles`` gets one row at a time);
the band (:class:`RowBuffer`) holds the label rows (int32) and stored pixels of that row of
tiles plus the rows of unfinished chunks and undecided instances, about ``tile + chunk`` rows
of the image's full width; the strided sample is at most 16 MP. So the peak does not grow with
the image's height, and grows with its width by about 20 bytes per pixel of a band row (the
band is full-width: rows of label chunks are written whole). Figures of a run are in
:class:`LargeResult` (``peak_band_rows``, ``peak_pending``, ``peak_tiles_in_flight``), and
``tools/benchmark.py large`` measures peak RSS on 4k, 16k and 30k px images.

**API for the predict tool and Dask** (tiles spread over workers)::

    result = segment_large(source, LargeOutputs(labels=..., table=..., geojson=None, rois=None),
                           predictor=predictor, tile=1024, overlap=64, channel=None,
                           pixel_size=None, diameter=None, progress=True, map_tiles=None)

``map_tiles(fn, tiles)`` runs ``fn`` on each tile of a list (one row of tiles per call) and
returns the results in the order of ``tiles`` (default: the builtin ``map``). ``fn`` is a
:class:`TileRunner` (picklable when its model is): it reads its tile's window from the source
itself (:class:`TileReader`, no model, picklable: a Dask task opens the file and reads its
window, never the whole image) and returns the tile's :class:`~.tiling.InstanceSet` (boxes,
cropped masks, scores: small). ``predictor`` is a ``NucleiPredictor`` (wrapped as
:class:`PredictorModel`) or any tile model with ``instances(rgb, tile) -> InstanceSet``,
``normalize`` (``INPUT.NORMALIZE`` percentiles or None) and ``min_kept_fraction``
(:class:`ThresholdModel`, a cheap stand-in for benchmarks). A Dask run whose workers hold
their own model can map ``lambda tile: TileRunner(worker_model, fn.reader)(tile)``; results
gathered by tile must be handed back in the order of ``tiles``.

Not handled (yet): semantic models (a streaming connected-component labelling would be
needed; they are refused, naming the model); rescaling for ``diameter`` (an image whose nuclei
need a scale other than 1 is refused with a one-line error: rescale the image first, or give
no ``diameter``; the large path does not estimate the diameter with a first pass).
"""
from __future__ import annotations

import csv
import json
from array import array
import math
import os
import shutil
import tempfile
import time
import uuid
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import (TYPE_CHECKING, Any, Callable, Dict, Iterable, List, Optional, Sequence,
                    Tuple, Union)

import numpy as np
import tifffile
from scipy import ndimage
from tqdm import tqdm

from .formats import PHYSICAL_COLUMNS, QUPATH_CLASS, _UUID_SPACE, _measurements, \
    physical_columns
from .image_io import (
    ChannelSpec,
    ImageReadError,
    PixelSize,
    Stretch,
    _arrange,
    _colour_channels,
    _imagej_pixel_size,
    _ome_metadata,
    _stretched,
    is_zarr,
    percentile_range,
    stretch_range,
    zarr_header,
)
from .outputs import OUTLINE_COLOURS, TABLE_COLUMNS
from .tiling import InstanceSet, Tile, TileError, axis_spans, tile_grid

if TYPE_CHECKING:  # detectron2 glue, built by the caller
    from ..d2.predictor import NucleiPredictor

__all__ = [
    "DEFAULT_CHUNK",
    "BandStitcher",
    "LargeOutputs",
    "LargeResult",
    "LargeSource",
    "PredictorModel",
    "RowBuffer",
    "ThresholdModel",
    "TileReader",
    "TileRunner",
    "normalisation_ranges",
    "sample_step",
    "segment_large",
    "strided_sample",
]

#: Side of the label chunks written (px).
DEFAULT_CHUNK = 512
#: Rows read at once when a whole-width band is read (the strided sample).
_READ_ROWS = 256

_EIGHT = np.ones((3, 3), dtype=bool)  # 8-connectivity
MapTiles = Callable[[Callable[[Tile], InstanceSet], Sequence[Tile]], Iterable[InstanceSet]]


# --------------------------------------------------------------------------- reading windows


class LargeSource:
    """One 2-D image in a TIFF or OME-Zarr file, read by windows.

    The file is checked when opened: an OME-Zarr's chunks must all be stored
    (:func:`~.zarr_check.check_zarr_chunks`, unless ``allow_missing_chunks``), and the layout
    follows :mod:`.image_io`'s own rule (its ``_arrange``, run on a
    one-pixel probe of the file's non-spatial axes): one 2-D gray, gray + alpha, RGB(A) image,
    or one channel of several picked by ``channel``. Pickled, it carries the path and layout
    only and reopens the file where it is unpickled (a Dask worker).

    Attributes:
        path, height, width, dtype, colour (``gray``, ``gray+alpha``, ``RGB``, ``RGBA``),
        axes (the file's), channel (picked index or None), channel_name, pixel_size (µm,
        ``pixel_size`` given or the file's; None when unknown).

    Raises:
        ImageReadError: one line naming the file: missing, not a TIFF or OME-Zarr, not
            readable, a missing chunk, several planes, several channels and none (or an
            unknown one) picked.
    """

    def __init__(self, path: Union[str, os.PathLike], channel: ChannelSpec = None,
                 pixel_size: Optional[float] = None, allow_missing_chunks: bool = False) -> None:
        self.path = Path(path)
        if is_zarr(self.path) and not allow_missing_chunks:
            from .zarr_check import check_zarr_chunks

            check_zarr_chunks(self.path)  # zarr would read a lost chunk as zeros
        self._array = None
        self._handle = None
        try:
            axes, shape, photometric, extra, names, size, dtype = self._inspect()
        except ImageReadError:
            raise
        except Exception as e:  # tifffile, zarr, numcodecs raise many types
            raise ImageReadError(f"{self.path}: not readable as a large image "
                                 f"({type(e).__name__}: {' '.join(str(e).split())})") from e
        self.axes, self.shape_stored, self.dtype = axes, tuple(shape), np.dtype(dtype)
        if self.dtype == np.bool_ or not (np.issubdtype(self.dtype, np.integer)
                                          or np.issubdtype(self.dtype, np.floating)):
            raise ImageReadError(f"{self.path}: unsupported sample type {self.dtype}")
        others = [n for a, n in zip(axes, shape) if a not in "YX"]
        probe_shape = tuple(1 if a in "YX" else n for a, n in zip(axes, shape))
        probe = np.arange(int(np.prod(others, dtype=np.int64)), dtype=np.int64)
        planes = _arrange(self.path, probe.reshape(probe_shape), axes, photometric, extra,
                          names, channel)
        if planes.count != 1:
            raise ImageReadError(
                f"{self.path}: holds {planes.count} planes (axes {axes}, shape {tuple(shape)}); "
                f"the large-image path reads one 2-D image per file: save the plane to "
                f"segment as its own file")
        self.colour = planes.colour
        self.channel = planes.channel
        self.channel_name = (planes.channel_names[planes.channel]
                             if planes.channel is not None and planes.channel_names else "")
        self.height, self.width = shape[axes.index("Y")], shape[axes.index("X")]
        self.minis_white = photometric == tifffile.PHOTOMETRIC.MINISWHITE
        self._white = None
        if self.minis_white:
            if self.dtype.kind != "u":
                raise ImageReadError(f"{self.path}: a min-is-white TIFF of {self.dtype} "
                                     f"samples; save it min-is-black")
            self._white = min(2 ** self._bits - 1, np.iinfo(self.dtype).max)
        # which stored index of each non-spatial axis feeds each output sample
        flat = np.asarray(planes.pixels[0, 0, 0]).reshape(-1)
        coords = np.unravel_index(flat, tuple(others)) if others else ()
        self._index: List[Any] = []
        self._varying = None
        k = 0
        for a in axes:
            if a in "YX":
                self._index.append(a)
                continue
            values = np.asarray(coords[k]).reshape(-1)
            k += 1
            if planes.pixels.ndim == 4 and np.unique(values).size > 1:
                self._varying = len(self._index)
                self._index.append([int(v) for v in values])
            else:
                self._index.append(int(values[0]))
        self.samples = planes.pixels.shape[3] if planes.pixels.ndim == 4 else 0
        if pixel_size is not None:
            size = PixelSize(float(pixel_size), float(pixel_size), "--pixel-size")
        self.pixel_size = size

    # what a pickle carries: the layout, not the open file
    def __getstate__(self) -> Dict[str, Any]:
        state = dict(self.__dict__)
        state["_array"] = state["_handle"] = None
        return state

    def _inspect(self):
        path = self.path
        if is_zarr(path):
            head = zarr_header(path)
            self._level, array, axes = head.level, head.array, head.axes
            size, names = head.pixel_size, head.names
            self._kind = "zarr"
            self._bits = 8 * np.dtype(array.dtype).itemsize
            return (axes, array.shape, tifffile.PHOTOMETRIC.MINISBLACK, (), names, size,
                    array.dtype)
        if not path.is_file():
            raise ImageReadError(f"{path}: no such file")
        with open(path, "rb") as f:
            head = f.read(4)
        if head not in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
            raise ImageReadError(f"{path}: the large-image path reads TIFF (BigTIFF, OME-TIFF) "
                                 f"and OME-Zarr files; this is neither")
        with tifffile.TiffFile(path) as tif:
            series = tif.series
            if not series:
                raise ImageReadError(f"{path}: a TIFF without any image")
            if len(series) > 1:
                raise ImageReadError(f"{path}: holds {len(series)} images (series); one 2-D "
                                     f"image per file is read")
            s = series[0]
            page = s.keyframe
            names, size = _ome_metadata(tif.ome_metadata) if tif.is_ome else ((), None)
            if size is None and tif.is_imagej:
                size = _imagej_pixel_size(tif, page)
            self._kind = "tiff"
            self._bits = int(page.bitspersample)
            return (s.axes, tuple(s.shape), tifffile.PHOTOMETRIC(page.photometric),
                    tuple(page.extrasamples), names, size, s.dtype)

    def _open(self):
        if self._array is None:
            import zarr

            if self._kind == "zarr":
                self._array = zarr.open_group(str(self.path), mode="r")[self._level]
            else:
                self._handle = tifffile.TiffFile(self.path)
                store = self._handle.series[0].aszarr()
                self._array = zarr.open(store, mode="r")
        return self._array

    def close(self) -> None:
        """Close the file (a later :meth:`window` reopens it)."""
        if self._handle is not None:
            self._handle.close()
        self._array = self._handle = None

    def window(self, top: int, bottom: int, left: int, right: int) -> np.ndarray:
        """The stored samples of ``[top, bottom) x [left, right)``: ``(h, w)`` or ``(h, w, C)``
        (colour last, as :func:`~.image_io.read_planes` gives a plane), the file's dtype.

        Raises:
            ImageReadError: the window cannot be read (a missing or corrupt chunk), or holds
                NaN or infinite values; the message names the file and the window.
        """
        where = f"{self.path}: rows {top}-{bottom}, columns {left}-{right}"
        try:
            array = self._open()
            index = tuple(slice(top, bottom) if a == "Y" else slice(left, right) if a == "X"
                          else slice(None) if isinstance(a, list) else a for a in self._index)
            data = np.asarray(array[index])
        except Exception as e:  # zarr, numcodecs, tifffile raise many types
            raise ImageReadError(f"{where}: cannot be read ({type(e).__name__}: "
                                 f"{' '.join(str(e).split())})") from e
        kept = [a for a in self._index if not isinstance(a, int)]
        if self._varying is not None:
            values = self._index[self._varying]
            data = np.take(data, values, axis=kept.index(values))
        order = [kept.index("Y"), kept.index("X")]
        if self._varying is not None:
            order.append(kept.index(self._index[self._varying]))
        data = np.transpose(data, order)
        if self.minis_white:
            if self.colour == "gray+alpha":
                data = data.copy()
                data[..., 0] = self._white - data[..., 0]
            else:
                data = self._white - data
        if data.dtype.kind == "f" and not np.isfinite(data).all():
            raise ImageReadError(f"{where}: holds NaN or infinite values")
        return np.ascontiguousarray(data)


def sample_step(height: int, width: int) -> int:
    """The stride :func:`~.image_io.percentile_range` samples an image of this size with."""
    return max(1, int(np.sqrt(height * width / 4e6)))


def strided_sample(source: LargeSource, step: Optional[int] = None) -> np.ndarray:
    """``stored[::step, ::step]`` of the whole image, read about ``_READ_ROWS`` rows at a time
    (default step: :func:`sample_step`; at most ~16 megapixels)."""
    step = step or sample_step(source.height, source.width)
    rows = step * max(1, math.ceil(_READ_ROWS / step))  # a multiple of the step
    parts = []
    for top in range(0, source.height, rows):
        bottom = min(top + rows, source.height)
        # a copy: the strided view would keep the whole window alive until the end
        parts.append(source.window(top, bottom, 0, source.width)[::step, ::step].copy())
    return np.concatenate(parts, axis=0)


def _rgb_of(colour: np.ndarray, how: Stretch) -> np.ndarray:
    """``(h, w, 1|3)`` stored colour channels -> ``(h, w, 3)`` uint8, as
    :func:`~.image_io.normalise_with` maps them."""
    if how.mode != "none":
        if colour.dtype.kind == "u" and colour.dtype.itemsize <= 2:
            table = _stretched(np.arange(np.iinfo(colour.dtype).max + 1, dtype=np.float64),
                               how.low, how.high)
            colour = table[colour]
        else:
            colour = _stretched(colour.astype(np.float64), how.low, how.high)
    if colour.shape[2] == 1:
        colour = np.repeat(colour, 3, axis=2)
    return np.ascontiguousarray(colour)


def normalisation_ranges(source: LargeSource, stretch: bool = True,
                         percentiles: Optional[Sequence[float]] = None
                         ) -> Tuple[Stretch, Optional[Stretch]]:
    """The whole image's stretch (:func:`~.image_io.stretch_range`) and, with
    ``percentiles`` (``INPUT.NORMALIZE``), its percentile normalisation
    (:func:`~.image_io.percentile_normalise`), both from the strided sample that the
    whole-image functions measure (module docstring): the same numbers."""
    sample = _colour_channels(strided_sample(source))
    # the sample is <= 16 MP, so percentile_range measures it whole (step 1): the image's
    how = stretch_range(sample, stretch)
    if not percentiles:
        return how, None
    return how, percentile_range(_rgb_of(sample, how), percentiles)


@dataclass
class TileReader:
    """A tile's model input read from the source: the window, stretched and normalised by the
    whole image's ranges (:func:`normalisation_ranges`). No model: picklable."""

    source: LargeSource
    stretch: Stretch
    normalise: Optional[Stretch] = None

    def __post_init__(self) -> None:
        self._table = None
        if self.normalise is not None:
            self._table = _stretched(np.arange(256, dtype=np.float64), self.normalise.low,
                                     self.normalise.high)

    def rgb(self, tile: Tile) -> np.ndarray:
        """``(h, w, 3)`` uint8: what the model sees of ``tile``."""
        stored = self.source.window(tile.top, tile.bottom, tile.left, tile.right)
        rgb = _rgb_of(_colour_channels(stored), self.stretch)
        return rgb if self._table is None else self._table[rgb]


class PredictorModel:
    """A trained instance model (``NucleiPredictor``) as a tile model: ``instances(rgb, tile)``
    is what ``NucleiPredictor.predict`` does on one tile (the model's output, kept to its
    score threshold, masks pasted per box); ``normalize`` its ``INPUT.NORMALIZE``
    percentiles, ``min_kept_fraction`` its own.

    Raises:
        ValueError: a semantic model (the large path stitches instances only).
    """

    def __init__(self, predictor: "NucleiPredictor") -> None:
        arch = predictor.cfg.MODEL.META_ARCHITECTURE
        if arch != "GeneralizedRCNN":
            raise ValueError(f"{arch}: the large-image path takes instance models (Mask R-CNN) "
                             f"only; a semantic model's components need the whole map")
        self.predictor = predictor
        self.normalize = predictor.normalize
        self.min_kept_fraction = predictor.min_kept_fraction
        self.nucleus_diameter = float(getattr(predictor.cfg.INPUT, "NUCLEUS_DIAMETER", 0.0)
                                      or 0.0)

    def instances(self, rgb: np.ndarray, tile: Tile) -> InstanceSet:
        output = self.predictor.run_model(rgb)
        if "instances" not in output:
            raise ValueError(f"{self.predictor.cfg.MODEL.META_ARCHITECTURE} returned "
                             f"{sorted(output)}; the large-image path needs instances")
        return self.predictor._instance_set(output, tile)  # noqa: SLF001


class ThresholdModel:
    """A cheap stand-in for a model (benchmarks, memory checks): the 8-connected components of
    the pixels whose mean over the channels is above ``level`` (0..255, on the normalised
    tile), smaller than ``min_area`` px dropped, each an instance of score 1 (ties go to the
    earlier tile, as in the whole-image stitch). Not a nucleus segmenter: it gives the
    outputs' and memory's shape at the speed of a threshold."""

    normalize: Optional[Tuple[float, float]] = None
    nucleus_diameter = 0.0

    def __init__(self, level: float = 128.0, min_area: int = 4,
                 min_kept_fraction: float = 0.0) -> None:
        self.level = float(level)
        self.min_area = int(min_area)
        self.min_kept_fraction = float(min_kept_fraction)

    def instances(self, rgb: np.ndarray, tile: Tile) -> InstanceSet:
        pieces, count = ndimage.label(rgb.mean(axis=2) > self.level, structure=_EIGHT)
        boxes, masks = [], []
        for k, where in enumerate(ndimage.find_objects(pieces), 1):
            if where is None:
                continue
            mask = pieces[where] == k
            if mask.sum() < self.min_area:
                continue
            boxes.append((where[0].start, where[1].start, where[0].stop, where[1].stop))
            masks.append(mask)
        return InstanceSet(np.asarray(boxes, dtype=np.int64).reshape(-1, 4), masks,
                           np.ones(len(masks), dtype=np.float64))


TileModel = Union[PredictorModel, ThresholdModel, Any]


class TileRunner:
    """``runner(tile) -> InstanceSet``: the model on one tile, read from the source inside the
    call (:class:`TileReader`). Picklable when its model is (a Dask task).

    Args:
        model: anything with ``instances(rgb, tile) -> InstanceSet`` (:class:`PredictorModel`,
            :class:`ThresholdModel`).
        reader: the tile's pixels.

    Raises:
        TileError: the tile could not be read or the model failed on it (the message names
            the file and the tile).
    """

    def __init__(self, model: TileModel, reader: TileReader) -> None:
        self.model = model
        self.reader = reader

    def __call__(self, tile: Tile) -> InstanceSet:
        try:
            return self.model.instances(self.reader.rgb(tile), tile)
        except Exception as e:  # noqa: BLE001  out of memory, a bad chunk: name the tile
            raise TileError(f"{self.reader.source.path}: tile rows {tile.top}-{tile.bottom}, "
                            f"columns {tile.left}-{tile.right}: {type(e).__name__}: "
                            f"{' '.join(str(e).split())}") from e


# --------------------------------------------------------------------------- stitching


class RowBuffer:
    """Image rows ``[base, base + rows)`` of a full-width array, kept in one buffer: rows are
    added at the bottom and forgotten at the top without copying the rows kept (when the
    bottom reaches the buffer's end the rows are moved to its start in place, and the buffer
    grows only when the rows held outgrow it), so that holding a band costs about the band,
    not the band twice.

    ``array`` is the view ``(rows, width, ...)`` of the rows held.
    """

    def __init__(self, width: int, dtype, trailing: Tuple[int, ...] = ()) -> None:
        self.base = 0
        self.rows = 0
        self._start = 0
        self._buffer = np.zeros((0, width) + tuple(trailing), dtype=dtype)

    @property
    def array(self) -> np.ndarray:
        return self._buffer[self._start:self._start + self.rows]

    @property
    def bottom(self) -> int:
        return self.base + self.rows

    def extend(self, bottom: int, values: Optional[np.ndarray] = None) -> None:
        """Hold rows up to ``bottom``: the new rows zero, or ``values`` (``bottom - self.
        bottom`` rows)."""
        added = bottom - self.bottom
        if added <= 0:
            return
        if self._start + self.rows + added > len(self._buffer):
            if self.rows + added <= len(self._buffer):
                self._compact()
            else:  # a quarter more than needed: the band's height settles after a few rows
                grown = np.zeros((max(1, (5 * (self.rows + added)) // 4),)
                                 + self._buffer.shape[1:], dtype=self._buffer.dtype)
                grown[:self.rows] = self.array
                self._buffer = grown
                self._start = 0
        new = self._buffer[self._start + self.rows:self._start + self.rows + added]
        if values is None:
            new[...] = 0
        else:
            new[...] = values
        self.rows += added

    def _compact(self) -> None:
        """Move the rows held to the buffer's start in place, in blocks of ``_start`` rows
        (a block's source and destination never overlap: no temporary copy)."""
        step = self._start
        for row in range(0, self.rows, step):
            end = min(row + step, self.rows)
            self._buffer[row:end] = self._buffer[step + row:step + end]
        self._start = 0

    def drop(self, top: int) -> None:
        """Forget the rows above ``top``."""
        if top > self.base:
            gone = min(top - self.base, self.rows)
            self._start += gone
            self.rows -= gone
            self.base += gone


@dataclass
class _Pending:
    key: Tuple[float, int, int]  # (-score, tile index, index in tile): the whole path's rank
    box: Tuple[int, int, int, int]  # image coordinates
    mask: np.ndarray
    score: float


@dataclass
class Nucleus:
    """A finished nucleus: its id, score, tight box (image coordinates) and bool mask."""

    label: int
    score: float
    box: Tuple[int, int, int, int]
    mask: np.ndarray


class BandStitcher:
    """The streaming form of :func:`~.tiling.stitch_instances` + :func:`~.tiling.
    keep_largest_components` (module docstring), one row of tiles at a time.

    ``add_row(tiles, sets, reach)`` takes a row of tiles, their instance sets and ``reach``:
    the first image row any later tile reaches (the next row of tiles' top; the height after
    the last row). It returns the nuclei decided, in id order; :meth:`final_rows` then says
    up to which image row the labels are final, :meth:`labels` gives final rows (pruned
    pieces as background) and :meth:`drop` forgets rows once written.

    Args:
        shape: ``(H, W)``.
        min_kept_fraction: as :func:`~.tiling.stitch_instances`.
    """

    def __init__(self, shape: Tuple[int, int], min_kept_fraction: float = 0.0) -> None:
        if not 0.0 <= min_kept_fraction <= 1.0:
            raise ValueError(f"min_kept_fraction must be in [0, 1], got {min_kept_fraction}")
        self.shape = tuple(shape)
        self.min_kept_fraction = float(min_kept_fraction)
        self._rows = RowBuffer(shape[1], np.int32)  # > 0 id, < 0 taken then pruned
        self.pending: List[_Pending] = []
        self.reach = 0
        self.count = 0
        self._tiles_seen = 0
        self.peak_band_rows = 0
        self.peak_pending = 0

    def _extend(self, bottom: int) -> None:
        self._rows.extend(bottom)
        self.peak_band_rows = max(self.peak_band_rows, self._rows.rows)

    @property
    def base(self) -> int:
        """Image row of the first label row held."""
        return self._rows.base

    @property
    def band(self) -> np.ndarray:
        """The label rows held (``> 0`` ids, ``< 0`` pixels taken then pruned)."""
        return self._rows.array

    def add_row(self, tiles: Sequence[Tile], sets: Sequence[InstanceSet],
                reach: int) -> List[Nucleus]:
        """Take one row of tiles (row-major order, after every earlier row); returns the
        nuclei decided by it, in id order."""
        if len(tiles) != len(sets):
            raise ValueError(f"got {len(tiles)} tiles but {len(sets)} instance sets")
        for tile, found in zip(tiles, sets):
            index = self._tiles_seen
            self._tiles_seen += 1
            self._extend(tile.bottom)
            if len(found) == 0:
                continue
            height, width = tile.shape
            if (found.boxes[:, :2] < 0).any() or (found.boxes[:, 2] > height).any() or (
                found.boxes[:, 3] > width
            ).any():
                raise ValueError(f"instance boxes reach outside their {height}x{width} tile "
                                 f"{tile}")
            y, x = found.centres()
            keep = np.flatnonzero(tile.owns(y + tile.top, x + tile.left))
            for j in keep:
                t, l, b, r = (int(v) for v in found.boxes[j])
                self.pending.append(_Pending(
                    (-float(found.scores[j]), index, int(j)),
                    (t + tile.top, l + tile.left, b + tile.top, r + tile.left),
                    found.masks[j], float(found.scores[j])))
        self.reach = int(reach)
        self.peak_pending = max(self.peak_pending, len(self.pending))
        return self._decide()

    def _decide(self) -> List[Nucleus]:
        self.pending.sort(key=lambda p: p.key)
        blocked = np.zeros(self.band.shape, dtype=bool)
        waiting: List[_Pending] = []
        decided: List[Nucleus] = []
        base = self.base
        for p in self.pending:
            t, l, b, r = p.box
            if b > self.reach or blocked[t - base:b - base, l:r].any():
                blocked[t - base:b - base, l:r] = True
                waiting.append(p)
                continue
            region = self.band[t - base:b - base, l:r]
            free = p.mask & (region == 0)
            count = int(free.sum())
            if count == 0 or count < self.min_kept_fraction * p.mask.sum():
                continue
            self.count += 1
            label = self.count
            pieces, number = ndimage.label(free, structure=_EIGHT)
            if number > 1:  # the largest 8-connected piece; ties: the first met in raster order
                flat = pieces.ravel()
                sizes = np.bincount(flat)
                found, first = np.unique(flat, return_index=True)
                order = np.lexsort((first[1:], -sizes[found[1:]]))
                kept = pieces == found[1:][order[0]]
                region[free & ~kept] = -label
                free = kept
            region[free] = label
            rows = np.flatnonzero(free.any(axis=1))
            cols = np.flatnonzero(free.any(axis=0))
            box = (t + int(rows[0]), l + int(cols[0]), t + int(rows[-1]) + 1,
                   l + int(cols[-1]) + 1)
            decided.append(Nucleus(label, p.score, box,
                                   free[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]))
        self.pending = waiting
        return decided

    def final_rows(self) -> int:
        """Image rows ``[0, final_rows())`` hold their final labels."""
        low = min([self.reach] + [p.box[0] for p in self.pending])
        return min(low, self.shape[0])

    def labels(self, top: int, bottom: int) -> np.ndarray:
        """Final labels of image rows ``[top, bottom)`` (within the band), uint32."""
        if top < self.base or bottom > self.final_rows():
            raise ValueError(f"rows {top}-{bottom} are not final and held (band from "
                             f"{self.base}, final to {self.final_rows()})")
        # ids are >= 0 after the maximum: the same bits as uint32
        return np.maximum(self.band[top - self.base:bottom - self.base], 0).view(np.uint32)

    def drop(self, top: int) -> None:
        """Forget the rows above ``top`` (written)."""
        self._rows.drop(top)


# --------------------------------------------------------------------------- outputs


@dataclass
class LargeOutputs:
    """Where :func:`segment_large` writes: ``labels`` (an OME-Zarr folder, ``*.zarr``),
    ``table`` (CSV), optionally ``geojson`` (QuPath) and ``rois`` (Fiji zip); ``stem`` seeds
    the GeoJSON feature ids (as :func:`~.formats.write_geojson`); ``chunk`` the label chunk
    side."""

    labels: Path
    table: Path
    geojson: Optional[Path] = None
    rois: Optional[Path] = None
    stem: str = ""
    chunk: int = DEFAULT_CHUNK

    def __post_init__(self) -> None:
        self.labels, self.table = Path(self.labels), Path(self.table)
        self.geojson = None if self.geojson is None else Path(self.geojson)
        self.rois = None if self.rois is None else Path(self.rois)
        if not self.labels.name.lower().endswith(".zarr"):
            raise ValueError(f"{self.labels}: the labels of a large image are an OME-Zarr "
                             f"folder, named *.zarr")
        if self.chunk < 16:
            raise ValueError(f"chunk must be at least 16 px, got {self.chunk}")


@dataclass
class LargeResult:
    """What :func:`segment_large` did.

    Attributes:
        labels, table, geojson, rois: the files written.
        shape: ``(H, W)``; tiles: how many; nuclei: how many.
        pixel_size: µm per pixel (None when unknown); stretch, normalisation: the whole
            image's ranges (:func:`normalisation_ranges`).
        seconds: wall time.
        peak_band_rows: most label rows held at once; peak_pending: most undecided instances;
            peak_tiles_in_flight: most tiles given to ``map_tiles`` at once. None of them grows
            with the image's height (the module docstring).
        areas, scores: ``(K,)`` int64 pixel areas and float64 scores of nuclei ``1..K`` (for a
            summary row: mean, median, min, max area, mean score, foreground fraction;
            16 bytes a nucleus).
    """

    labels: Path
    table: Path
    geojson: Optional[Path]
    rois: Optional[Path]
    shape: Tuple[int, int]
    tiles: int
    nuclei: int
    pixel_size: Optional[PixelSize]
    stretch: Stretch
    normalisation: Optional[Stretch]
    seconds: float
    peak_band_rows: int = 0
    peak_pending: int = 0
    peak_tiles_in_flight: int = 0
    notes: List[str] = field(default_factory=list)
    areas: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    scores: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float64))


def _temporary(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    return path.parent / f".{path.name}.{uuid.uuid4().hex[:12]}.tmp"


def _remove(path: Optional[Path]) -> None:
    if path is None:
        return
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _put_in_place(tmp: Path, path: Path) -> None:
    """``tmp`` becomes ``path`` (a folder replaces an earlier one: moved aside, then removed)."""
    if tmp.is_dir():
        old = None
        if path.exists():
            old = _temporary(path)
            os.replace(path, old)
        os.replace(tmp, path)
        _remove(old)
    else:
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)


class _LabelZarr:
    """The OME-Zarr label image being written (module docstring), under a temporary name."""

    def __init__(self, path: Path, shape: Tuple[int, int], chunk: int,
                 pixel_size: Optional[PixelSize]) -> None:
        import zarr

        self.tmp = _temporary(path)
        group = zarr.open_group(str(self.tmp), mode="w", zarr_format=2)
        self.array = group.create_array("0", shape=shape, chunks=(chunk, chunk),
                                        dtype="uint32", fill_value=0)
        axes: List[Dict[str, str]] = [{"name": "y", "type": "space"},
                                      {"name": "x", "type": "space"}]
        scale = [1.0, 1.0]
        if pixel_size is not None:
            for a in axes:
                a["unit"] = "micrometer"
            scale = [float(pixel_size.y), float(pixel_size.x)]
        group.attrs.update({
            "multiscales": [{
                "version": "0.4", "name": "nuclei labels", "axes": axes,
                "datasets": [{"path": "0", "coordinateTransformations": [
                    {"type": "scale", "scale": scale}]}],
            }],
            "image-label": {"version": "0.4"},
        })
        self.chunk = chunk
        self.written = 0  # rows written
        self.height = shape[0]

    def write_final(self, stitcher: BandStitcher) -> None:
        """Write every whole chunk row that is final (and the last one at the end)."""
        final = stitcher.final_rows()
        while self.written < self.height and (self.written + self.chunk <= final
                                              or final == self.height):
            bottom = min(self.written + self.chunk, self.height)
            self.array[self.written:bottom, :] = stitcher.labels(self.written, bottom)
            self.written = bottom
            stitcher.drop(bottom)


class _Streams:
    """CSV rows, GeoJSON features and ROIs, each into its temporary file, a nucleus at a time."""

    def __init__(self, outputs: LargeOutputs, columns: Sequence[str]) -> None:
        self.outputs = outputs
        self.columns = list(columns)
        self.tmps: Dict[str, Path] = {}
        self.tmps["table"] = _temporary(outputs.table)
        self.table = open(self.tmps["table"], "w", newline="", encoding="utf-8")
        self.csv = csv.writer(self.table, lineterminator="\n")
        self.csv.writerow(self.columns)
        self.geojson = self.rois = None
        self.features = 0
        if outputs.geojson is not None:
            self.tmps["geojson"] = _temporary(outputs.geojson)
            self.geojson = open(self.tmps["geojson"], "w", encoding="utf-8")
            self.geojson.write('{"type": "FeatureCollection", "features": [')
        if outputs.rois is not None:
            self.tmps["rois"] = _temporary(outputs.rois)
            self.rois = zipfile.ZipFile(self.tmps["rois"], "w", compression=zipfile.ZIP_DEFLATED)

    def add(self, row: Dict[str, Any], outline: Optional[np.ndarray]) -> None:
        self.csv.writerow([row.get(c, "") for c in self.columns])
        if outline is None:
            return
        label = int(row["label"])
        if self.geojson is not None:
            ring = [[round(float(x), 3), round(float(y), 3)] for x, y in outline]
            ring.append(ring[0])
            colour = OUTLINE_COLOURS[(label - 1) % len(OUTLINE_COLOURS)]
            feature = {
                "type": "Feature",
                "id": str(uuid.uuid5(_UUID_SPACE, f"{self.outputs.stem}/{label}")),
                "geometry": {"type": "Polygon", "coordinates": [ring]},
                "properties": {
                    "objectType": "detection", "name": str(label),
                    "classification": {"name": QUPATH_CLASS, "color": [int(c) for c in colour]},
                    "isLocked": False, "measurements": _measurements(row),
                },
            }
            self.geojson.write((", " if self.features else "") + json.dumps(feature))
            self.features += 1
        if self.rois is not None:
            from roifile import ROI_TYPE, ImagejRoi

            roi = ImagejRoi.frompoints(np.asarray(outline, dtype=np.float64), name=str(label))
            roi.roitype = ROI_TYPE.POLYGON
            self.rois.writestr(f"{label}.roi", roi.tobytes())

    def finish(self, labels: Tuple[Path, Path]) -> None:
        """Close the streams, then put the labels ``(tmp, path)`` and every stream in place,
        labels first; a rename that fails removes those already placed (all or none)."""
        self.table.close()
        if self.geojson is not None:
            self.geojson.write("]}")
            self.geojson.close()
        if self.rois is not None:
            self.rois.close()
        moves = [labels] + [(tmp, getattr(self.outputs, name)) for name, tmp in self.tmps.items()]
        placed: List[Path] = []
        try:
            for tmp, path in moves:
                _put_in_place(tmp, path)
                placed.append(path)
        except BaseException:
            for path in placed:
                _remove(path)
            raise
        self.tmps = {}

    def abandon(self) -> None:
        for handle in (self.table, self.geojson, self.rois):
            try:
                if handle is not None:
                    handle.close()
            except Exception:  # noqa: BLE001  the first error counts
                pass
        for tmp in self.tmps.values():
            _remove(tmp)


def _row(nucleus: Nucleus, intensity: np.ndarray,
         pixel_size: Optional[PixelSize]) -> Dict[str, Any]:
    """The per-nucleus table row of :func:`~.outputs.nuclei_table`, its values computed by
    ``skimage.measure.regionprops``' own formulas on the nucleus' mask (centroid: the mean of
    the pixel coordinates; eccentricity: from the eigenvalues of the inertia tensor of the
    second central moments; mean intensity: the mean of the intensities under the mask, in
    the same order) with numpy, about 50 µs a nucleus where a ``RegionProperties`` takes 4 ms
    (its moments go through ``einsum``): a slide's half a million nuclei in seconds, not half
    an hour. ``tests/test_predict_large.py`` checks the rows against ``nuclei_table``."""
    top, left, bottom, right = nucleus.box
    ys, xs = np.nonzero(nucleus.mask)
    area = ys.size
    sum_y, sum_x = int(ys.sum()), int(xs.sum())  # integers: exact whatever the order
    cy_local, cx_local = sum_y / area, sum_x / area
    dy, dx = ys - cy_local, xs - cx_local
    mu20, mu02, mu11 = float((dy * dy).sum()), float((dx * dx).sum()), float((dy * dx).sum())
    tensor = np.array([[mu02 / area, -mu11 / area], [-mu11 / area, mu20 / area]])
    low, high = np.clip(np.linalg.eigvalsh(tensor), 0, None)
    eccentricity = 0.0 if high == 0 else math.sqrt(1 - low / high)
    row = {
        "label": nucleus.label,
        "score": round(float(nucleus.score), 4),
        "area": int(area),
        "centroid_y": round((sum_y + top * area) / area, 3),
        "centroid_x": round((sum_x + left * area) / area, 3),
        "bbox_min_row": int(top),
        "bbox_min_col": int(left),
        "bbox_max_row": int(bottom),
        "bbox_max_col": int(right),
        "mean_intensity": round(float(np.mean(intensity[nucleus.mask])), 4),
        "eccentricity": round(float(eccentricity), 4),
    }
    if pixel_size is not None:
        row.update(physical_columns(row, pixel_size))
    return row


def _outline(nucleus: Nucleus) -> Optional[np.ndarray]:
    """:func:`~.formats.nucleus_outlines` of one nucleus, in image coordinates."""
    from .formats import nucleus_outlines

    found = nucleus_outlines(nucleus.mask.astype(np.uint8))
    if 1 not in found:
        return None
    return found[1] + np.array([nucleus.box[1], nucleus.box[0]], dtype=np.float64)


class _IntensityBand:
    """The stored image's colour channels (for :attr:`~.image_io.LoadedImage.intensity`) of the
    rows the stitcher holds, read by whole-width windows as rows of tiles come."""

    def __init__(self, source: LargeSource) -> None:
        self.source = source
        self._rows: Optional[RowBuffer] = None

    def extend(self, bottom: int) -> None:
        have = 0 if self._rows is None else self._rows.bottom
        if bottom <= have:
            return
        part = _colour_channels(self.source.window(have, bottom, 0, self.source.width))
        if self._rows is None:
            self._rows = RowBuffer(part.shape[1], part.dtype, part.shape[2:])
        self._rows.extend(bottom, part)

    def crop(self, box: Tuple[int, int, int, int]) -> np.ndarray:
        t, l, b, r = box
        base = self._rows.base
        part = self._rows.array[t - base:b - base, l:r]
        if part.shape[2] == 1:
            return part[:, :, 0].astype(np.float64)
        return part.mean(axis=2, dtype=np.float64)

    def drop(self, top: int) -> None:
        if self._rows is not None:
            self._rows.drop(top)


def segment_large(
    source: Union[str, os.PathLike, LargeSource],
    outputs: LargeOutputs,
    *,
    predictor: Union["NucleiPredictor", TileModel],
    tile: int = 1024,
    overlap: int = 64,
    channel: ChannelSpec = None,
    pixel_size: Optional[float] = None,
    diameter: Optional[float] = None,
    stretch: bool = True,
    progress: bool = True,
    map_tiles: Optional[MapTiles] = None,
    allow_missing_chunks: bool = False,
) -> LargeResult:
    """Label the nuclei of an image larger than memory (module docstring).

    Args:
        source: a TIFF or OME-Zarr file (or a :class:`LargeSource` already open).
        outputs: where to write (:class:`LargeOutputs`).
        predictor: an instance model (``NucleiPredictor``; its score threshold and
            ``min_kept_fraction`` apply), or a tile model (``instances(rgb, tile)``,
            ``normalize``, ``min_kept_fraction``: :class:`ThresholdModel`).
        tile, overlap: tiling in pixels, as ``NucleiPredictor.predict`` (``tile > 0``).
        channel, pixel_size: as :func:`~.run.predict_images` (``--channel``,
            ``--pixel-size``).
        diameter: the nuclei's diameter in px; only a diameter asking for scale 1 (or None:
            no estimation, scale 1) is handled (module docstring).
        stretch: the stretch of non-8-bit images (``--no-stretch`` is False).
        progress: a tqdm bar over the rows of tiles.
        map_tiles: ``map_tiles(fn, tiles) -> results in tiles' order`` (default ``map``),
            called once per row of tiles.
        allow_missing_chunks: read an OME-Zarr with chunks missing as zarr does (fill value;
            ``--allow-missing-chunks``).

    Returns:
        :class:`LargeResult`.

    Raises:
        ImageReadError: the file cannot be read as a large image (one line naming it).
        TileError: a tile failed (naming the file and the tile); nothing is left written.
        ValueError: a semantic model, a tiling or diameter out of range.
    """
    started = time.perf_counter()
    from .scale import check_diameter, clamp_scale

    model = PredictorModel(predictor) if hasattr(predictor, "run_model") else predictor
    trained = float(getattr(model, "nucleus_diameter", 0.0) or 0.0)
    check_diameter(diameter, trained)
    notes: List[str] = []
    if diameter is not None and clamp_scale(trained / diameter) != 1.0:
        raise ValueError(f"--diameter {diameter:g} asks for scale {trained / diameter:.3g}; "
                         f"the large-image path predicts at scale 1 only: rescale the image "
                         f"first, or leave --diameter out")
    if trained and diameter is None:
        notes.append("diameter not estimated (large image): predicted at scale 1")
    if tile <= 0:
        raise ValueError(f"tile must be > 0 for a large image, got {tile}")
    if pixel_size is not None and not (0 < float(pixel_size) < float("inf")):
        raise ValueError(f"--pixel-size must be a number of micrometres > 0, got {pixel_size}")
    image = source if isinstance(source, LargeSource) else LargeSource(
        source, channel, pixel_size, allow_missing_chunks)
    height, width = image.height, image.width
    axis_spans(height, tile, overlap)  # checks the overlap
    how, normalised = normalisation_ranges(image, stretch, getattr(model, "normalize", None))
    runner = TileRunner(model, TileReader(image, how, normalised))
    tiles = tile_grid(height, width, tile, overlap)
    row_spans = axis_spans(height, tile, overlap)
    per_row = len(axis_spans(width, tile, overlap))
    stitcher = BandStitcher((height, width), getattr(model, "min_kept_fraction", 0.0))
    intensity = _IntensityBand(image)
    columns = list(TABLE_COLUMNS) + (list(PHYSICAL_COLUMNS) if image.pixel_size else [])
    want_outlines = outputs.geojson is not None or outputs.rois is not None
    labels = streams = None
    peak_tiles = 0
    areas = array("q")  # 8 bytes a nucleus, not a Python int's 36
    scores = array("d")
    try:
        labels = _LabelZarr(outputs.labels, (height, width), outputs.chunk, image.pixel_size)
        streams = _Streams(outputs, columns)
        apply = map_tiles or map
        for r in tqdm(range(len(row_spans)), desc="tile rows", unit="row", disable=not progress):
            row_tiles = tiles[r * per_row:(r + 1) * per_row]
            peak_tiles = max(peak_tiles, len(row_tiles))
            sets = list(apply(runner, row_tiles))
            reach = row_spans[r + 1][0] if r + 1 < len(row_spans) else height
            intensity.extend(row_spans[r][1])
            for nucleus in stitcher.add_row(row_tiles, sets, reach):
                areas.append(int(nucleus.mask.sum()))
                scores.append(nucleus.score)
                streams.add(_row(nucleus, intensity.crop(nucleus.box), image.pixel_size),
                            _outline(nucleus) if want_outlines else None)
            labels.write_final(stitcher)
            intensity.drop(stitcher.base)
        streams.finish((labels.tmp, outputs.labels))
    except BaseException:
        if streams is not None:
            streams.abandon()
        if labels is not None:
            _remove(labels.tmp)
        raise
    finally:
        if not isinstance(source, LargeSource):
            image.close()
    return LargeResult(outputs.labels, outputs.table, outputs.geojson, outputs.rois,
                       (height, width), len(tiles), stitcher.count, image.pixel_size, how,
                       normalised, round(time.perf_counter() - started, 3),
                       stitcher.peak_band_rows, stitcher.peak_pending, peak_tiles, notes,
                       np.frombuffer(areas, np.int64).copy(),
                       np.frombuffer(scores, np.float64).copy())
