"""Images larger than memory: read tile by tile, labels written chunk by chunk (OME-Zarr).

:func:`segment_large` labels the nuclei of a 2-D image of any size (a 30,000 x 30,000 px
slide) with a peak memory that does not grow with the image: the pixels held are one tile's,
the labels at most a fixed budget of chunks (the others wait on disk), and the instances held
are the undecided ones along the frontier between the tiles done and those to come. Its outputs are those of :func:`sharp_fpn.predict.run.predict_images`
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

**Stitching, exactly as the whole-image path** (:class:`GridStitcher`). Tiles are
:func:`~.tiling.tile_grid`'s, taken one at a time in row-major order; a tile keeps the instances
whose box centre lies in its core (the core-owned seam-free rule of :mod:`.tiling`). The
whole-image :func:`~.tiling.stitch_instances` paints instances best score first (ties: tile
order, then order in the tile), each taking the pixels of its mask no better instance kept,
and drops one keeping less than ``min_kept_fraction`` of its mask. Whether instance ``i`` is
kept and which pixels it takes depends only on the better instances whose boxes overlap its
box. An instance lies inside its tile, so only a tile whose extent meets a box can add an
instance overlapping it: an instance is *decided* as soon as its box meets no tile still to
come (the rest of this row of tiles from the next one on, the rows below) and no better
undecided instance overlaps it; the others wait (and block the worse ones overlapping them).
So most instances are decided with their own tile, and those in the overlaps with the
neighbour that completes them. Decided instances are painted in that order, each reduced to
its largest 8-connected piece (:func:`~.tiling.keep_largest_components`; the other pieces
stay taken, as background), and their CSV row and outline written. A label chunk no tile still
to come and no undecided box reaches is final: written once, whole, and forgotten. The labels
equal the whole-image path's (``NucleiPredictor.predict`` with the same ``tile`` and
``overlap``) up to a renumbering: ids are given ``1, 2, ...`` in the order nuclei are decided,
which is stable from run to run, where the whole-image path numbers by score over the whole
image.

**Memory**, whatever the image's size: one tile in flight by default (``map_tiles`` is
consumed lazily; a Dask mapper keeps a bounded number in flight); the label chunks being
painted, at most ``label_memory_mb`` of them in memory (:class:`~.chunks.ChunkStore`: the least
recently used wait in a scratch folder beside the labels, in the page cache rather than the
process's memory, and come back when reached); the strided sample, at most 16 MP, read by
windows of 256 x 4096 px; the undecided instances, each with its mask and the stored pixels
under its box (a few kB), about the nuclei of one overlap-wide strip across the image: the
only term that grows, with the width, a few MB at 30,000 px; the nuclei found are summed up
for the summary row as they come (:class:`NucleusSummary`). Figures of a run are in
:class:`LargeResult` (``peak_chunks_held``, ``chunks_spilled``, ``peak_pending``), and
``tools/benchmark.py large`` measures peak RSS on 4k, 16k and 30k px images.

**API for the predict tool and Dask** (tiles spread over workers)::

    result = segment_large(source, LargeOutputs(labels=..., table=..., geojson=None, rois=None),
                           predictor=predictor, tile=1024, overlap=64, channel=None,
                           pixel_size=None, diameter=None, progress=True, map_tiles=None)

``map_tiles(fn, tiles)`` runs ``fn`` on every tile and yields the results in the order of
``tiles`` (default: the builtin ``map``). ``fn`` is a :class:`TileRunner` (picklable when its
model is): it reads its tile's window from the source itself (:class:`TileReader`, no model,
picklable: a Dask task opens the file and reads its window, never the whole image) and
returns a :class:`TileFound`: the tile's :class:`~.tiling.InstanceSet` (boxes, cropped masks,
scores) and the stored pixels under each box (small). ``predictor`` is a
``NucleiPredictor`` (wrapped as :class:`PredictorModel`) or any tile model with ``instances(rgb, tile) -> InstanceSet``,
``normalize`` (``INPUT.NORMALIZE`` percentiles or None) and ``min_kept_fraction``
(:class:`ThresholdModel`, a cheap stand-in for benchmarks); a semantic model's tile
(``kind = "semantic"``, ``probabilities(rgb, tile)``: a semantic ``NucleiPredictor``,
:class:`ProbabilityModel`) returns a :class:`TileMap` instead: the tile's probability map
and its stored pixels. A Dask run whose workers hold
their own model can map ``lambda tile: TileRunner(worker_model, fn.reader)(tile)``
(:func:`~.cluster.tile_mapper`); its results must be yielded in the order of ``tiles``.

**Nucleus size**, as the whole-image path (:mod:`.scale`): with ``diameter`` given, or
estimated on a few tiles spread over the image (:func:`choose_scale`), each tile is resized by
the scale for the model (tiles of ``tile / scale`` image pixels, so the model still sees
about ``tile``), and the instances found are brought back to the tile's own pixels by nearest
neighbour (:func:`back_to_tile`) before the stitch: labels, tables and outlines are of the
image at its own size. At a scale other than 1 the result is the whole-image path's in kind
but not pixel for pixel: that path resizes the whole image, then tiles it.

**Semantic models** (a nucleus probability map per tile, ``sem_seg``): the whole-image path
takes every pixel from the tile whose core holds it (:func:`~.tiling.stitch_cores`) and
labels the 8-connected components of ``probabilities > SEMANTIC_THRESHOLD`` over the whole
map, each scored by its mean probability. Here each tile gives its map (:class:`TileMap`) and
:class:`~.components.ComponentStitcher` finds the same components streaming: the pixels each
tile's core owns are labelled on their own, joined with their neighbours across the cores'
edges by a union-find, and a component is finished when no tile still to come can touch it
(:mod:`.components`). The labels equal the whole-image path's up to a renumbering (ids in the
order components are finished), the scores to the last bits of a float64 sum; the table's
mean intensity is the component's sum of intensities over its area (the same numbers summed
in another order). At a scale other than 1 the map the model gives for the resized tile is
brought back to the tile's own pixels by nearest neighbour at pixel centres
(:func:`map_back_to_tile`, the rule of :func:`~.scale.resize_labels`) before the stitch.
:class:`ProbabilityModel` is a cheap stand-in semantic model for tests and benchmarks.
"""
from __future__ import annotations

import csv
import json
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

from .chunks import DEFAULT_CHUNK, ChunkedStitch, chunk_keys
from .formats import PHYSICAL_COLUMNS, QUPATH_CLASS, FEATURE_ID_NAMESPACE, qupath_measurements, \
    physical_columns
from .image_io import (
    ChannelSpec,
    ImageReadError,
    PixelSize,
    Stretch,
    arrange_planes,
    colour_channels,
    imagej_pixel_size,
    ome_channels_and_pixel_size,
    scale_to_uint8,
    is_zarr,
    percentile_range,
    stretch_range,
    zarr_header,
)
from .outputs import OUTLINE_COLOURS, TABLE_COLUMNS
from ..utils import release_free_memory
from .tiling import InstanceSet, Tile, TileError, axis_spans, tile_grid

if TYPE_CHECKING:  # detectron2 glue, built by the caller
    from ..d2.predictor import NucleiPredictor
    from .scale import ScaleChoice

__all__ = [
    "DEFAULT_CHUNK",
    "ContiguousArray",
    "DEFAULT_LABEL_MEMORY_MB",
    "GridStitcher",
    "LargeOutputs",
    "LargeResult",
    "LargeSource",
    "NucleusSummary",
    "PredictorModel",
    "ProbabilityModel",
    "ThresholdModel",
    "TileFound",
    "TileMap",
    "TileReader",
    "TileRunner",
    "map_back_to_tile",
    "normalisation_ranges",
    "sample_step",
    "segment_large",
    "strided_sample",
]

#: Rows and columns of the windows the strided sample is read by.
_READ_ROWS = 256
_READ_COLUMNS = 4096
#: Tiles along each axis the nucleus diameter is estimated on (:func:`choose_scale`).
ESTIMATE_GRID = 3
#: Label memory of the stitch by default (MB): the label chunks held at most (chunks.ChunkStore).
DEFAULT_LABEL_MEMORY_MB = 64

_EIGHT = np.ones((3, 3), dtype=bool)  # 8-connectivity
MapTiles = Callable[[Callable[[Tile], InstanceSet], Sequence[Tile]], Iterable[InstanceSet]]


# --------------------------------------------------------------------------- reading windows


class ContiguousArray:
    """An array stored uncompressed in one piece of a file (a TIFF series whose data is
    contiguous: tifffile's default for images it writes untiled), read by windows.

    tifffile's Zarr store makes such a series one chunk, so every window would read the whole
    image. Here the file is memory-mapped, ``array[index]`` copies the window out, and the
    mapping's pages are then given back (``madvise(MADV_DONTNEED)``: the data stays in the
    page cache, not in the process), so what the process holds is the window, whatever the
    file's size.
    """

    def __init__(self, path: Path, offset: int, shape: Tuple[int, ...], dtype) -> None:
        import mmap

        self._file = open(path, "rb")
        try:
            self._map = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_READ)
        except BaseException:
            self._file.close()
            raise
        self._view = np.ndarray(shape, np.dtype(dtype), buffer=self._map, offset=int(offset))
        self.shape = tuple(shape)
        self.dtype = self._view.dtype.newbyteorder("=")

    def __getitem__(self, index) -> np.ndarray:
        import mmap

        window = np.array(self._view[index], dtype=self.dtype)  # a copy, native byte order
        if hasattr(mmap, "MADV_DONTNEED"):
            self._map.madvise(mmap.MADV_DONTNEED)
        return window

    def close(self) -> None:
        self._view = None
        self._map.close()
        self._file.close()


class LargeSource:
    """One 2-D image in a TIFF or OME-Zarr file, read by windows.

    The file is checked when opened: an OME-Zarr's chunks must all be stored
    (:func:`~.zarr_check.check_zarr_chunks`, unless ``allow_missing_chunks``), and the layout
    follows :mod:`.image_io`'s own rule (its ``arrange_planes``, run on a
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
        planes = arrange_planes(self.path, probe.reshape(probe_shape), axes, photometric, extra,
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
            names, size = ome_channels_and_pixel_size(tif.ome_metadata) if tif.is_ome else ((), None)
            if size is None and tif.is_imagej:
                size = imagej_pixel_size(tif, page)
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
                series = self._handle.series[0]
                if (series.dataoffset is not None
                        and series.keyframe.compression == tifffile.COMPRESSION.NONE):
                    # stored in one piece: tifffile's store would make it one chunk, read
                    # whole for every window
                    stored = np.dtype(series.dtype).newbyteorder(self._handle.byteorder)
                    self._array = ContiguousArray(self.path, series.dataoffset,
                                                  tuple(series.shape), stored)
                    self._handle.close()
                    self._handle = None
                else:
                    self._array = zarr.open(series.aszarr(), mode="r")
        return self._array

    def close(self) -> None:
        """Close the file (a later :meth:`window` reopens it)."""
        if self._handle is not None:
            self._handle.close()
        if isinstance(self._array, ContiguousArray):
            self._array.close()
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
    """``stored[::step, ::step]`` of the whole image, read by windows of about ``_READ_ROWS``
    rows and ``_READ_COLUMNS`` columns (default step: :func:`sample_step`; at most ~16
    megapixels): what is read at once does not grow with the image."""
    step = step or sample_step(source.height, source.width)
    rows = step * max(1, math.ceil(_READ_ROWS / step))  # multiples of the step: the windows'
    columns = step * max(1, math.ceil(_READ_COLUMNS / step))  # samples are the image's
    parts = []
    for top in range(0, source.height, rows):
        bottom = min(top + rows, source.height)
        # copies: a strided view would keep its whole window alive until the end
        parts.append(np.concatenate(
            [source.window(top, bottom, left, min(left + columns, source.width))[::step, ::step]
             .copy() for left in range(0, source.width, columns)], axis=1))
    return np.concatenate(parts, axis=0)


def _rgb_of(colour: np.ndarray, how: Stretch) -> np.ndarray:
    """``(h, w, 1|3)`` stored colour channels -> ``(h, w, 3)`` uint8, as
    :func:`~.image_io.normalise_with` maps them."""
    if how.mode != "none":
        if colour.dtype.kind == "u" and colour.dtype.itemsize <= 2:
            table = scale_to_uint8(np.arange(np.iinfo(colour.dtype).max + 1, dtype=np.float64),
                               how.low, how.high)
            colour = table[colour]
        else:
            colour = scale_to_uint8(colour.astype(np.float64), how.low, how.high)
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
    sample = colour_channels(strided_sample(source))
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
    scale: float = 1.0  # the model sees each tile resized by this (:func:`~.scale.scale_image`)

    def __post_init__(self) -> None:
        self._table = None
        if self.normalise is not None:
            self._table = scale_to_uint8(np.arange(256, dtype=np.float64), self.normalise.low,
                                     self.normalise.high)

    def read(self, tile: Tile) -> Tuple[np.ndarray, np.ndarray]:
        """``(colour, rgb)``: the stored colour channels of ``tile`` (``(h, w, 1|3)``, the
        file's dtype, alpha dropped) and what the model sees of it (``(h', w', 3)`` uint8,
        resized by ``scale``)."""
        from .scale import scale_image

        colour = colour_channels(self.source.window(tile.top, tile.bottom, tile.left,
                                                    tile.right))
        rgb = _rgb_of(colour, self.stretch)
        rgb = rgb if self._table is None else self._table[rgb]
        return colour, scale_image(rgb, self.scale)

    def rgb(self, tile: Tile) -> np.ndarray:
        """``(h', w', 3)`` uint8: what the model sees of ``tile``."""
        return self.read(tile)[1]


class PredictorModel:
    """A trained model (``NucleiPredictor``) as a tile model. ``kind`` says which:

    * ``"instances"`` (Mask R-CNN): ``instances(rgb, tile)`` is what ``NucleiPredictor.predict``
      does on one tile (the model's output, kept to its score threshold, masks pasted per box);
    * ``"semantic"`` (the semantic meta-architecture, ``is_semantic(cfg)``):
      ``probabilities(rgb, tile)`` is the tile's ``(h, w)`` nucleus probability map, as
      ``NucleiPredictor.predict`` takes it from ``sem_seg``; ``threshold`` is
      ``SEMANTIC_THRESHOLD``.

    ``normalize`` is its ``INPUT.NORMALIZE`` percentiles, ``min_kept_fraction`` its own.

    Raises:
        ValueError: a model of another meta-architecture (a volume model), naming it.
    """

    def __init__(self, predictor: "NucleiPredictor") -> None:
        from ..d2.semantic import is_semantic

        arch = predictor.cfg.MODEL.META_ARCHITECTURE
        if is_semantic(predictor.cfg):
            from ..d2.predictor import SEMANTIC_THRESHOLD

            self.kind = "semantic"
            self.threshold = SEMANTIC_THRESHOLD
        elif arch == "GeneralizedRCNN":
            self.kind = "instances"
        else:
            raise ValueError(f"{arch}: the large-image path takes instance models (Mask R-CNN) "
                             f"and semantic models only")
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
        return self.predictor.instance_set(output, tile)

    def probabilities(self, rgb: np.ndarray, tile: Tile) -> np.ndarray:
        output = self.predictor.run_model(rgb)
        if "sem_seg" not in output:
            raise ValueError(f"{self.predictor.cfg.MODEL.META_ARCHITECTURE} returned "
                             f"{sorted(output)}; a semantic model gives 'sem_seg'")
        return self.predictor.probability_map(output, tile)


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


class ProbabilityModel:
    """A cheap stand-in for a semantic model (tests, benchmarks): the nucleus probability of
    a pixel is a logistic function of its mean over the channels (0..255, on the normalised
    tile), ``1 / (1 + exp(-(mean - level) / spread))`` as float32, so the foreground is about
    the pixels above ``level``. Not a nucleus segmenter: it gives the semantic route's
    outputs and memory at the speed of a threshold."""

    kind = "semantic"
    threshold = 0.5  # SEMANTIC_THRESHOLD
    normalize: Optional[Tuple[float, float]] = None
    nucleus_diameter = 0.0
    min_kept_fraction = 0.0

    def __init__(self, level: float = 128.0, spread: float = 16.0) -> None:
        if not spread > 0:
            raise ValueError(f"spread must be > 0, got {spread}")
        self.level = float(level)
        self.spread = float(spread)

    def probabilities(self, rgb: np.ndarray, tile: Tile) -> np.ndarray:
        mean = rgb.mean(axis=2, dtype=np.float64)
        with np.errstate(over="ignore"):  # exp -> inf: a probability of 0, as it should be
            return (1.0 / (1.0 + np.exp(-(mean - self.level) / self.spread))).astype(np.float32)


TileModel = Union[PredictorModel, ThresholdModel, ProbabilityModel, Any]


def _kind(model: Any) -> str:
    """``"semantic"`` for a model giving probability maps, else ``"instances"``."""
    kind = getattr(model, "kind", "instances")
    if kind not in ("instances", "semantic"):
        raise ValueError(f"tile model kind {kind!r}: expected 'instances' or 'semantic'")
    return kind


def map_back_to_tile(values: np.ndarray, shape: Tuple[int, int]) -> np.ndarray:
    """A map the model gave for a tile resized for it, brought back to the tile's own
    ``shape`` by nearest neighbour at pixel centres (the rule of
    :func:`~.scale.resize_labels`: a pixel of the tile takes the value of the resized pixel
    its centre falls in)."""
    from .scale import resize_labels

    return resize_labels(values, shape)


def back_to_tile(found: InstanceSet, seen: Tuple[int, int],
                 shape: Tuple[int, int]) -> InstanceSet:
    """Instances found on a tile resized for the model (``seen``: its ``(h', w')``), brought
    back to the tile's own ``shape`` by nearest neighbour at pixel centres (the rule of
    :func:`~.scale.resize_labels`, which the whole-image path brings its labels back with: a
    pixel of the tile takes the value of the resized pixel its centre falls in); instances
    left with no pixel are dropped."""
    rows = np.minimum(((np.arange(shape[0]) + 0.5) * seen[0] / shape[0]).astype(np.intp),
                      seen[0] - 1)
    cols = np.minimum(((np.arange(shape[1]) + 0.5) * seen[1] / shape[1]).astype(np.intp),
                      seen[1] - 1)
    boxes, masks, scores = [], [], []
    for (t, l, b, r), mask, score in zip(found.boxes.tolist(), found.masks, found.scores):
        ys = np.flatnonzero((rows >= t) & (rows < b))  # the tile's rows whose centre is inside
        xs = np.flatnonzero((cols >= l) & (cols < r))
        if ys.size == 0 or xs.size == 0:
            continue
        back = mask[(rows[ys] - t)[:, None], (cols[xs] - l)[None, :]]
        kept_rows = np.flatnonzero(back.any(axis=1))
        if kept_rows.size == 0:
            continue
        kept_cols = np.flatnonzero(back.any(axis=0))
        y0, y1 = int(kept_rows[0]), int(kept_rows[-1]) + 1
        x0, x1 = int(kept_cols[0]), int(kept_cols[-1]) + 1
        boxes.append((int(ys[y0]), int(xs[x0]), int(ys[y1 - 1]) + 1, int(xs[x1 - 1]) + 1))
        masks.append(back[y0:y1, x0:x1])
        scores.append(score)
    return InstanceSet(np.asarray(boxes, dtype=np.int64).reshape(-1, 4), masks,
                       np.asarray(scores, dtype=np.float64))


@dataclass
class TileFound:
    """What a tile gives the stitch: its instances (tile coordinates) and, per instance, the
    stored colour channels under its box (``(h, w, C)``, the file's dtype: the table's
    intensity, measured where the nucleus is decided without reading the image again)."""

    instances: InstanceSet
    stored: List[np.ndarray]


@dataclass
class TileMap:
    """What a tile of a semantic model gives the stitch: its ``(h, w)`` nucleus probability
    map (the tile's own pixels) and the stored colour channels of the tile (``(h, w, C)``,
    the file's dtype: the table's intensity)."""

    probabilities: np.ndarray
    colour: np.ndarray

    @property
    def intensity(self) -> np.ndarray:
        """``(h, w)`` float64, as :attr:`~.image_io.LoadedImage.intensity`."""
        return _intensity(self.colour)


def _intensity(stored: np.ndarray) -> np.ndarray:
    """``(h, w)`` float64 intensity of stored colour channels ``(h, w, C)``, as
    :attr:`~.image_io.LoadedImage.intensity` computes it."""
    if stored.shape[2] == 1:
        return stored[:, :, 0].astype(np.float64)
    return stored.mean(axis=2, dtype=np.float64)


class TileRunner:
    """``runner(tile) -> TileFound`` (an instance model) or :class:`TileMap` (a semantic
    one): the model on one tile, read from the source inside the call
    (:class:`TileReader`). Picklable when its model is (a Dask task).

    Args:
        model: anything with ``instances(rgb, tile) -> InstanceSet`` (:class:`PredictorModel`,
            :class:`ThresholdModel`), or with ``kind = "semantic"`` and
            ``probabilities(rgb, tile) -> (h, w)`` (:class:`PredictorModel` of a semantic
            model, :class:`ProbabilityModel`).
        reader: the tile's pixels.

    Raises:
        TileError: the tile could not be read or the model failed on it (the message names
            the file and the tile).
    """

    def __init__(self, model: TileModel, reader: TileReader) -> None:
        self.model = model
        self.reader = reader

    def __call__(self, tile: Tile) -> Union[TileFound, TileMap]:
        if _kind(self.model) == "semantic":
            return self._map(tile)
        try:
            colour, rgb = self.reader.read(tile)
            if rgb.shape[:2] == tile.shape:
                found = self.model.instances(rgb, tile)
            else:  # rescaled: the model's tile is the resized one, its masks brought back
                seen = Tile(0, 0, rgb.shape[0], rgb.shape[1], (0, 0, rgb.shape[0], rgb.shape[1]))
                found = back_to_tile(self.model.instances(rgb, seen), rgb.shape[:2],
                                     tile.shape)
        except Exception as e:  # noqa: BLE001  out of memory, a bad chunk: name the tile
            raise TileError(f"{self.reader.source.path}: tile rows {tile.top}-{tile.bottom}, "
                            f"columns {tile.left}-{tile.right}: {type(e).__name__}: "
                            f"{' '.join(str(e).split())}") from e
        # copies: a view would keep (and a Dask task ship) the whole window
        stored = [colour[t:b, l:r].copy() for t, l, b, r in found.boxes.tolist()]
        return TileFound(found, stored)

    def _map(self, tile: Tile) -> TileMap:
        try:
            colour, rgb = self.reader.read(tile)
            if rgb.shape[:2] == tile.shape:
                values = np.asarray(self.model.probabilities(rgb, tile))
            else:  # rescaled: the model's map is of the resized tile, brought back
                seen = Tile(0, 0, rgb.shape[0], rgb.shape[1], (0, 0, rgb.shape[0], rgb.shape[1]))
                values = np.asarray(self.model.probabilities(rgb, seen))
                if values.shape != rgb.shape[:2]:
                    raise ValueError(f"a probability map of {values.shape} for a tile of "
                                     f"{rgb.shape[:2]}")
                values = map_back_to_tile(values, tile.shape)
            if values.shape != tile.shape:
                raise ValueError(f"a probability map of {values.shape} for a tile of "
                                 f"{tile.shape}")
        except Exception as e:  # noqa: BLE001  out of memory, a bad chunk: name the tile
            raise TileError(f"{self.reader.source.path}: tile rows {tile.top}-{tile.bottom}, "
                            f"columns {tile.left}-{tile.right}: {type(e).__name__}: "
                            f"{' '.join(str(e).split())}") from e
        return TileMap(values, colour)


# --------------------------------------------------------------------------- stitching


@dataclass
class _Pending:
    key: Tuple[float, int, int]  # (-score, tile index, index in tile): the whole path's rank
    box: Tuple[int, int, int, int]  # image coordinates
    mask: np.ndarray
    score: float
    stored: Optional[np.ndarray]  # the stored colour channels under the box, or None


@dataclass
class Nucleus:
    """A finished nucleus: its id, score, tight box (image coordinates), bool mask and the
    stored image's colour channels under the box (``(h, w, C)``, or None when not given)."""

    label: int
    score: float
    box: Tuple[int, int, int, int]
    mask: np.ndarray
    stored: Optional[np.ndarray] = None

    @property
    def intensity(self) -> Optional[np.ndarray]:
        """``(h, w)`` float64 over the box, as :attr:`~.image_io.LoadedImage.intensity`."""
        if self.stored is None:
            return None
        return _intensity(self.stored)


def _boxes(items: Sequence[Any]) -> np.ndarray:
    return np.asarray([p.box for p in items], dtype=np.int64).reshape(-1, 4)


def _meets(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``(len(a), len(b))``: whether box ``a[i]`` and box ``b[j]`` share a pixel."""
    return ((a[:, None, 0] < b[None, :, 2]) & (a[:, None, 2] > b[None, :, 0])
            & (a[:, None, 1] < b[None, :, 3]) & (a[:, None, 3] > b[None, :, 1]))


class GridStitcher(ChunkedStitch):
    """The streaming form of :func:`~.tiling.stitch_instances` + :func:`~.tiling.
    keep_largest_components` (module docstring), one tile at a time in row-major order.

    :meth:`add` takes the next tile's instances (and the stored pixels under each box) and
    returns the nuclei it decided, in id order; :meth:`final_chunks` then names the label
    chunks no later tile or undecided instance can touch, and :meth:`take` hands each one
    over, once (pruned pieces as background), and forgets it.

    Args:
        shape: ``(H, W)``; tile, overlap: the tiling (:func:`~.tiling.tile_grid`).
        chunk: side of the label chunks (px); budget: label chunks held in memory at most
            (:class:`~.chunks.ChunkStore`; ``scratch`` the folder the others wait in).
        min_kept_fraction: as :func:`~.tiling.stitch_instances`.
    """

    def __init__(self, shape: Tuple[int, int], tile: int, overlap: int,
                 chunk: int = DEFAULT_CHUNK, budget: int = 64,
                 min_kept_fraction: float = 0.0, scratch: Optional[Path] = None) -> None:
        if not 0.0 <= min_kept_fraction <= 1.0:
            raise ValueError(f"min_kept_fraction must be in [0, 1], got {min_kept_fraction}")
        super().__init__(shape, tile, overlap, chunk, budget, scratch)
        self.min_kept_fraction = float(min_kept_fraction)
        self.row_spans = axis_spans(self.shape[0], tile, overlap)
        self.col_spans = axis_spans(self.shape[1], tile, overlap)
        self.pending: List[_Pending] = []
        self.count = 0  # nuclei decided
        self.peak_pending = 0
        self._cover: Dict[Tuple[int, int], int] = {}  # undecided boxes reaching each chunk

    def _untouched(self, boxes: np.ndarray) -> np.ndarray:
        """Whether each box lies outside every tile not yet added (so no instance still to
        come can overlap it)."""
        if self.taken == len(self.tiles):
            return np.ones(len(boxes), dtype=bool)
        r, c = divmod(self.taken, len(self.col_spans))  # the next tile: (r, c)
        row_top, row_bottom = self.row_spans[r]
        below = self.row_spans[r + 1][0] if r + 1 < len(self.row_spans) else self.shape[0]
        left = self.col_spans[c][0]
        t, l, b, rr = boxes[:, 0], boxes[:, 1], boxes[:, 2], boxes[:, 3]
        in_row = (t < row_bottom) & (b > row_top) & (rr > left)  # tiles (r, c..) of this row
        return ~(in_row | (b > below))  # ... or the rows below

    def _cover_add(self, box: Tuple[int, int, int, int], step: int) -> None:
        for key in chunk_keys(box, self.chunk):
            left = self._cover.get(key, 0) + step
            if left:
                self._cover[key] = left
            else:
                del self._cover[key]

    def add(self, found: InstanceSet,
            stored: Optional[Sequence[np.ndarray]] = None) -> List[Nucleus]:
        """Take the next tile's instances (tile coordinates) and, optionally, the stored
        colour channels under each box (``(h, w, C)`` per instance); returns the nuclei
        decided, in id order."""
        if self.taken >= len(self.tiles):
            raise ValueError(f"all {len(self.tiles)} tiles were already added")
        index = self.taken
        tile = self.tiles[index]
        if len(found):
            height, width = tile.shape
            if (found.boxes[:, :2] < 0).any() or (found.boxes[:, 2] > height).any() or (
                found.boxes[:, 3] > width
            ).any():
                raise ValueError(f"instance boxes reach outside their {height}x{width} tile "
                                 f"{tile}")
            if stored is not None and len(stored) != len(found):
                raise ValueError(f"{len(stored)} stored windows for {len(found)} instances")
            y, x = found.centres()
            for j in np.flatnonzero(tile.owns(y + tile.top, x + tile.left)):
                t, l, b, r = (int(v) for v in found.boxes[j])
                box = (t + tile.top, l + tile.left, b + tile.top, r + tile.left)
                self.pending.append(_Pending((-float(found.scores[j]), index, int(j)), box,
                                             found.masks[j], float(found.scores[j]),
                                             None if stored is None else stored[j]))
                self._cover_add(box, 1)
        self.taken += 1
        self._reach((tile.top, tile.left, tile.bottom, tile.right))
        self.peak_pending = max(self.peak_pending, len(self.pending))
        decided = self._decide()
        self.store.settle()
        return decided

    def _decide(self) -> List[Nucleus]:
        if not self.pending:
            return []
        self.pending.sort(key=lambda p: p.key)
        boxes = _boxes(self.pending)
        untouched = self._untouched(boxes)
        ready = np.flatnonzero(untouched)
        if ready.size == 0:
            return []
        open_ = np.flatnonzero(~untouched)
        blocked = np.zeros(ready.size, dtype=bool)
        for start in range(0, ready.size, 512):  # a better undecided box overlapping: wait
            part = ready[start:start + 512]
            if open_.size:
                meets = _meets(boxes[part], boxes[open_]) & (open_[None, :] < part[:, None])
                blocked[start:start + 512] = meets.any(axis=1)
        waiting = [self.pending[i] for i in open_]
        held: List[Tuple[int, int, int, int]] = []  # ready but waiting: block the worse
        decided: List[Nucleus] = []
        for n, i in enumerate(ready):
            p = self.pending[i]
            if blocked[n] or (held and _meets(np.asarray([p.box]), np.asarray(held)).any()):
                held.append(p.box)
                waiting.append(p)
                continue
            self._cover_add(p.box, -1)
            nucleus = self._paint(p)
            if nucleus is not None:
                decided.append(nucleus)
        waiting.sort(key=lambda p: p.key)
        self.pending = waiting
        return decided

    def _paint(self, p: _Pending) -> Optional[Nucleus]:
        """Paint one decided instance (best score first: its mask's pixels no better one
        took, reduced to the largest 8-connected piece); None when it is dropped."""
        region, shared = self.store.region(p.box)
        free = p.mask & (region == 0)
        count = int(free.sum())
        if count == 0 or count < self.min_kept_fraction * p.mask.sum():
            return None
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
        if not shared:
            self.store.write(p.box, region)
        rows = np.flatnonzero(free.any(axis=1))
        cols = np.flatnonzero(free.any(axis=0))
        t, l = p.box[0], p.box[1]
        box = (t + int(rows[0]), l + int(cols[0]), t + int(rows[-1]) + 1, l + int(cols[-1]) + 1)
        crop = (slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1))
        return Nucleus(label, p.score, box, free[crop],
                       None if p.stored is None else p.stored[crop])

    def final_chunks(self) -> List[Tuple[int, int]]:
        """Keys of the chunks reached so far whose labels are final (no tile still to come,
        no undecided instance reaches them), in grid order; each is named once."""
        if not self._reached:
            return []
        keys = sorted(k for k in self._reached if k not in self._cover)
        if not keys:
            return []
        bounds = np.asarray([self.store.bounds(k) for k in keys], dtype=np.int64)
        final = [k for k, ok in zip(keys, self._untouched(bounds)) if ok]
        self._reached.difference_update(final)
        return final

    def take(self, key: Tuple[int, int]) -> np.ndarray:
        """The final labels of chunk ``key`` (uint32, pruned pieces 0), forgotten here."""
        self.chunks_taken += 1
        # ids are >= 0 after the maximum: the same bits as uint32
        return np.maximum(self.store.pop(key), 0).view(np.uint32)


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


class NucleusSummary:
    """The summary row's figures of the nuclei of an image, kept as they are found, in memory
    that does not grow with their number: the count, the area's sum, least and largest, the
    areas' histogram (one count per area in pixels, so the median is exact) and the score's
    sum.

    ``mean_area``, ``median_area`` (as ``numpy.median`` of the areas), ``min_area``,
    ``max_area``, ``total_area``, ``mean_score``: None when there is no nucleus.
    """

    def __init__(self) -> None:
        self.count = 0
        self.total_area = 0
        self._score_sum = 0.0
        self._histogram = np.zeros(1024, dtype=np.int64)
        self.min_area: Optional[int] = None
        self.max_area: Optional[int] = None

    def add(self, area: int, score: float) -> None:
        """Count one nucleus of ``area`` px and ``score``."""
        area = int(area)
        if area >= len(self._histogram):
            grown = np.zeros(max(2 * len(self._histogram), area + 1), dtype=np.int64)
            grown[:len(self._histogram)] = self._histogram
            self._histogram = grown
        self._histogram[area] += 1
        self.count += 1
        self.total_area += area
        self._score_sum += float(score)
        self.min_area = area if self.min_area is None else min(self.min_area, area)
        self.max_area = area if self.max_area is None else max(self.max_area, area)

    @property
    def mean_area(self) -> Optional[float]:
        return self.total_area / self.count if self.count else None

    @property
    def mean_score(self) -> Optional[float]:
        return self._score_sum / self.count if self.count else None

    @property
    def median_area(self) -> Optional[float]:
        if not self.count:
            return None
        cumulative = np.cumsum(self._histogram)
        low = int(np.searchsorted(cumulative, (self.count - 1) // 2 + 1))  # the middle one(s)
        high = int(np.searchsorted(cumulative, self.count // 2 + 1))
        return (low + high) / 2


@dataclass
class LargeResult:
    """What :func:`segment_large` did.

    Attributes:
        labels, table, geojson, rois: the files written.
        shape: ``(H, W)``; tiles: how many; tile: their side in the image's pixels (the
            tile asked for divided by the scale); nuclei: how many.
        scale: the :class:`~.scale.ScaleChoice` (the diameter given or estimated, where it
            came from, the scale the model saw the tiles at).
        pixel_size: µm per pixel (None when unknown); stretch, normalisation: the whole
            image's ranges (:func:`normalisation_ranges`).
        seconds: wall time.
        peak_chunks_held: most label chunks in memory at once (:class:`~.chunks.ChunkStore`; at most
            the budget, plus those one tile's decisions reach); chunks_spilled: chunks moved
            to the scratch folder and back; peak_pending: most undecided instances (those
            along the frontier between the tiles done and those to come). The first does not
            grow with the image, the last with its width only, a few kB per nucleus of one
            overlap's strip (the module docstring); peak_open: a semantic model's most
            components held open (:class:`~.components.ComponentStitcher`, those along the
            same frontier).
        kind: the model's output, ``"instances"`` or ``"semantic"``.
        summary: the nuclei's areas and scores summed up as they were found
            (:class:`NucleusSummary`: the summary row's figures; the per-nucleus values are in
            the table).
    """

    labels: Path
    table: Path
    geojson: Optional[Path]
    rois: Optional[Path]
    shape: Tuple[int, int]
    tiles: int
    tile: int
    scale: "ScaleChoice"
    nuclei: int
    pixel_size: Optional[PixelSize]
    stretch: Stretch
    normalisation: Optional[Stretch]
    seconds: float
    peak_chunks_held: int = 0
    chunks_spilled: int = 0
    peak_pending: int = 0
    notes: List[str] = field(default_factory=list)
    summary: "NucleusSummary" = field(default_factory=lambda: NucleusSummary())
    kind: str = "instances"
    peak_open: int = 0


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
        # every chunk stored, empty ones too: a reader (zarr_check) can tell the image whole
        self.array = group.create_array("0", shape=shape, chunks=(chunk, chunk),
                                        dtype="uint32", fill_value=0,
                                        config={"write_empty_chunks": True})
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

    def write(self, key: Tuple[int, int], values: np.ndarray) -> None:
        """Write chunk ``key`` (grid coordinates), once, whole."""
        top, left = key[0] * self.chunk, key[1] * self.chunk
        self.array[top:top + values.shape[0], left:left + values.shape[1]] = values


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
                "id": str(uuid.uuid5(FEATURE_ID_NAMESPACE, f"{self.outputs.stem}/{label}")),
                "geometry": {"type": "Polygon", "coordinates": [ring]},
                "properties": {
                    "objectType": "detection", "name": str(label),
                    "classification": {"name": QUPATH_CLASS, "color": [int(c) for c in colour]},
                    "isLocked": False, "measurements": qupath_measurements(row),
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


def _row(nucleus: Nucleus, intensity: Union[np.ndarray, float, None],
         pixel_size: Optional[PixelSize]) -> Dict[str, Any]:
    """The per-nucleus table row of :func:`~.outputs.nuclei_table`, its values computed by
    ``skimage.measure.regionprops``' own formulas on the nucleus' mask (centroid: the mean of
    the pixel coordinates; eccentricity: from the eigenvalues of the inertia tensor of the
    second central moments; mean intensity: the mean of the intensities under the mask, in
    the same order) with numpy, about 50 µs a nucleus where a ``RegionProperties`` takes 4 ms
    (its moments go through ``einsum``): a slide's half a million nuclei in seconds, not half
    an hour. ``tests/test_predict_large.py`` checks the rows against ``nuclei_table``.

    ``intensity``: the ``(h, w)`` intensities under the nucleus' box, or its mean intensity
    already measured (a float: a semantic component's, :class:`~.components.Component`), or
    None (the column left empty)."""
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
        "mean_intensity": "" if intensity is None else round(float(
            intensity if np.ndim(intensity) == 0 else np.mean(intensity[nucleus.mask])), 4),
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


def choose_scale(runner: TileRunner, shape: Tuple[int, int], tile: int, overlap: int,
                 trained: float, diameter: Optional[float] = None) -> Tuple["ScaleChoice", int]:
    """The scale the tiles are predicted at, as :func:`~.scale.predict_at_scale` chooses it,
    and how many tiles were run to choose it.

    A model that does not know its nucleus diameter (``trained`` 0): scale 1. A ``diameter``
    given: ``trained / diameter``, clamped. Else the diameter is estimated from a first pass
    at scale 1 over at most ``ESTIMATE_GRID`` x ``ESTIMATE_GRID`` tiles spread evenly over
    the image (rows and columns of the tiling, first and last included; the whole image when
    it has no more tiles than that): the median equivalent diameter of the instances each
    tile owns (a semantic model's: the 8-connected components of the tile's thresholded map
    whose box centre lies in its core). The whole-image path measures it on every nucleus of the whole image after the
    stitch; this is a sample of it (at most 9 tiles, run twice), the price of never holding
    the image. Fewer than :data:`~.scale.MIN_NUCLEI_TO_ESTIMATE` nuclei, or a scale within
    :data:`~.scale.KEEP_RANGE`: scale 1."""
    from .scale import (ESTIMATED, GIVEN, TOO_FEW, UNKNOWN, ScaleChoice, clamp_scale,
                        diameter_of_areas, estimated_scale)

    if not trained:
        return ScaleChoice(None, UNKNOWN, 1.0), 0
    if diameter is not None:
        return ScaleChoice(float(diameter), GIVEN, clamp_scale(trained / diameter)), 0
    rows = axis_spans(shape[0], tile, overlap)
    cols = axis_spans(shape[1], tile, overlap)
    grid = tile_grid(shape[0], shape[1], tile, overlap)
    spread = [np.unique(np.linspace(0, n - 1, ESTIMATE_GRID).round().astype(int))
              for n in (len(rows), len(cols))]
    picked = [grid[r * len(cols) + c] for r in spread[0].tolist() for c in spread[1].tolist()]
    areas: List[int] = []
    for t in picked:
        found = runner(t)
        if isinstance(found, TileMap):
            areas.extend(_owned_areas(found.probabilities > getattr(runner.model, "threshold",
                                                                    0.5), t))
            continue
        found = found.instances
        if len(found):
            y, x = found.centres()
            areas.extend(int(found.masks[j].sum())
                         for j in np.flatnonzero(t.owns(y + t.top, x + t.left)))
    estimate = diameter_of_areas(np.asarray(areas))
    if estimate is None:
        return ScaleChoice(None, TOO_FEW, 1.0), len(picked)
    scale = estimated_scale(trained, estimate)
    return ScaleChoice(estimate, ESTIMATED, scale, passes=2 if scale != 1.0 else 1), len(picked)


def _owned_areas(foreground: np.ndarray, tile: Tile) -> List[int]:
    """Areas of the 8-connected components of a tile's foreground whose box centre lies in
    the tile's core."""
    pieces, _ = ndimage.label(foreground, structure=_EIGHT)
    areas = []
    for k, where in enumerate(ndimage.find_objects(pieces), 1):
        if where is None:
            continue
        y = tile.top + (where[0].start + where[0].stop) / 2
        x = tile.left + (where[1].start + where[1].stop) / 2
        if tile.owns(np.asarray(y), np.asarray(x)):
            areas.append(int((pieces[where] == k).sum()))
    return areas


def tiling_at_scale(tile: int, overlap: int, scale: float) -> Tuple[int, int]:
    """``(tile, overlap)`` in the image's pixels for a model that sees them resized by
    ``scale``: the tile the model sees is about ``tile`` px, its overlap at least
    ``overlap`` px of the model's (so the seam-free rule holds for the nuclei as it sees
    them)."""
    if scale == 1.0:
        return tile, overlap
    at = max(16, round(tile / scale))
    return at, min(math.ceil(overlap / scale), at - 1)


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
    label_memory_mb: float = DEFAULT_LABEL_MEMORY_MB,
) -> LargeResult:
    """Label the nuclei of an image larger than memory (module docstring).

    Args:
        source: a TIFF or OME-Zarr file (or a :class:`LargeSource` already open).
        outputs: where to write (:class:`LargeOutputs`).
        predictor: a ``NucleiPredictor``, an instance model (its score threshold and
            ``min_kept_fraction`` apply) or a semantic one (:class:`PredictorModel`), or a
            tile model (``instances(rgb, tile)``, ``normalize``, ``min_kept_fraction``:
            :class:`ThresholdModel`; or ``kind = "semantic"``, ``probabilities(rgb, tile)``,
            ``threshold``, ``normalize``: :class:`ProbabilityModel`).
        tile, overlap: tiling in pixels, as ``NucleiPredictor.predict`` (``tile > 0``).
        channel, pixel_size: as :func:`~.run.predict_images` (``--channel``,
            ``--pixel-size``).
        diameter: the nuclei's diameter in px (``--diameter``); None: estimated on a few
            tiles when the model knows its own (:func:`choose_scale`).
        stretch: the stretch of non-8-bit images (``--no-stretch`` is False).
        progress: a tqdm bar over the tiles.
        map_tiles: ``map_tiles(fn, tiles)``: an iterable of ``fn(tile)`` for every tile, in
            the order of ``tiles``, consumed one at a time as it goes (default: the builtin
            ``map``, lazy: one tile in flight); called once.
        allow_missing_chunks: read an OME-Zarr with chunks missing as zarr does (fill value;
            ``--allow-missing-chunks``).
        label_memory_mb: the label chunks held in memory at most (int32, ``4 chunk²`` bytes
            each; more wait in a scratch folder beside the labels, removed at the end).

    Returns:
        :class:`LargeResult`.

    Raises:
        ImageReadError: the file cannot be read as a large image (one line naming it).
        TileError: a tile failed (naming the file and the tile); nothing is left written.
        ValueError: a model neither of instances nor semantic, a tiling or diameter out of
            range.
    """
    started = time.perf_counter()
    from .scale import check_diameter

    model = PredictorModel(predictor) if hasattr(predictor, "run_model") else predictor
    kind = _kind(model)
    trained = float(getattr(model, "nucleus_diameter", 0.0) or 0.0)
    check_diameter(diameter, trained)
    notes: List[str] = []
    if tile <= 0:
        raise ValueError(f"tile must be > 0 for a large image, got {tile}")
    if pixel_size is not None and not (0 < float(pixel_size) < float("inf")):
        raise ValueError(f"--pixel-size must be a number of micrometres > 0, got {pixel_size}")
    image = source if isinstance(source, LargeSource) else LargeSource(
        source, channel, pixel_size, allow_missing_chunks)
    height, width = image.height, image.width
    axis_spans(height, tile, overlap)  # checks the overlap
    how, normalised = normalisation_ranges(image, stretch, getattr(model, "normalize", None))
    choice, sampled = choose_scale(TileRunner(model, TileReader(image, how, normalised)),
                                   (height, width), tile, overlap, trained, diameter)
    if sampled:
        notes.append(f"diameter estimated on {sampled} tile{'s' if sampled > 1 else ''} "
                     f"spread over the image")
    runner = TileRunner(model, TileReader(image, how, normalised, choice.scale))
    tile, overlap = tiling_at_scale(tile, overlap, choice.scale)
    chunk = outputs.chunk
    budget = max(1, int(label_memory_mb * 2 ** 20 // (4 * chunk * chunk)))
    scratch = _temporary(outputs.labels.parent / f"{outputs.labels.name}.scratch")
    if kind == "semantic":
        from .components import ComponentStitcher

        stitcher = ComponentStitcher((height, width), tile, overlap, chunk, budget,
                                     getattr(model, "threshold", 0.5), scratch)
    else:
        stitcher = GridStitcher((height, width), tile, overlap, chunk, budget,
                                getattr(model, "min_kept_fraction", 0.0), scratch)
    tiles = stitcher.tiles
    columns = list(TABLE_COLUMNS) + (list(PHYSICAL_COLUMNS) if image.pixel_size else [])
    want_outlines = outputs.geojson is not None or outputs.rois is not None
    labels = streams = None
    summary = NucleusSummary()
    bar = tqdm(total=len(tiles), desc="tiles", unit="tile", disable=not progress)
    try:
        labels = _LabelZarr(outputs.labels, (height, width), chunk, image.pixel_size)
        streams = _Streams(outputs, columns)
        for found in (map_tiles or map)(runner, tiles):
            if stitcher.taken == len(tiles):
                raise ValueError(f"map_tiles gave more results than the {len(tiles)} tiles")
            if kind == "semantic":
                if not isinstance(found, TileMap):
                    raise ValueError(f"a semantic model's tile gave {type(found).__name__}, "
                                     f"not a TileMap")
                finished = stitcher.add(found.probabilities, found.intensity)
            else:
                finished = stitcher.add(found.instances, found.stored)
            for nucleus in finished:
                summary.add(int(nucleus.mask.sum()), nucleus.score)
                measured = (nucleus.mean_intensity if kind == "semantic"
                            else nucleus.intensity)
                streams.add(_row(nucleus, measured, image.pixel_size),
                            _outline(nucleus) if want_outlines else None)
            for key in stitcher.final_chunks():
                labels.write(key, stitcher.take(key))
            release_free_memory()  # the model's freed activations back to the OS
            bar.update()
        if not stitcher.done:
            raise ValueError(f"map_tiles gave {stitcher.taken} results for {len(tiles)} tiles "
                             f"({stitcher.chunks_taken} of {stitcher.chunk_count} label "
                             f"chunks final)")
        streams.finish((labels.tmp, outputs.labels))
    except BaseException:
        if streams is not None:
            streams.abandon()
        if labels is not None:
            _remove(labels.tmp)
        raise
    finally:
        bar.close()
        _remove(scratch)
        if not isinstance(source, LargeSource):
            image.close()
    return LargeResult(outputs.labels, outputs.table, outputs.geojson, outputs.rois,
                       (height, width), len(tiles), tile, choice, stitcher.count,
                       image.pixel_size, how,
                       normalised, round(time.perf_counter() - started, 3),
                       stitcher.store.peak_held, stitcher.store.spills,
                       getattr(stitcher, "peak_pending", 0), notes, summary, kind=kind, peak_open=getattr(stitcher, "peak_open", 0))
