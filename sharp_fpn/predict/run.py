"""Predict the nuclei of many images and write a biologist's outputs (``tools/predict.py``).

For each image ``<stem>`` (:mod:`.outputs`): ``<stem>_labels.tif``, ``<stem>_overlay.png``,
``<stem>_nuclei.csv`` (with µm columns when the pixel size is known); asked for
(:mod:`.formats`): ``<stem>_rois.zip`` (Fiji), ``<stem>_nuclei.geojson`` (QuPath),
``<stem>_labels.ome.tif`` instead of ``<stem>_labels.tif``. A file of several planes gives one
set per plane, ``<stem>_z<k>_...``, and one summary row per plane. ``x.ome.tif`` and
``x.ome.zarr`` have the stem ``x``. For the run, ``summary.csv`` (one row per input and plane:
``ok``, ``skipped (done)``, ``failed`` with the reason, or ``pending`` while the run goes on).

The rules a run keeps:

* **Checked before any work**: the options (:func:`check_options`), the output folder (a file,
  a folder that cannot be written), every output name of every image, the config, the weights
  and the device. Each failure is one line naming the file or the option.
* **No file lost**: outputs are written through :class:`sharp_fpn.outdir.OutputDir` (tool
  ``"predict"``): a file predict did not write (a user's ``cells_labels.tif``, a ground truth)
  is never replaced unless ``overwrite`` (``--overwrite``), an input never; the folder is
  locked while the run writes. The output folder may be the input folder: files an earlier
  predict run wrote are left out of the inputs (:func:`~.image_io.expand_inputs`).
* **Incremental**: each image's files are written (each whole or not at all, and those of
  a plane all or none: a write that fails removes the plane's files written before it) as
  soon as the image is done, and ``summary.csv`` is rewritten (atomically) after every image, so a
  run killed at any moment leaves a summary of what is done (the rest ``pending``).
* **Resumable**: a rerun skips an image, reporting it ``skipped (done)`` with its numbers, when
  the summary of the earlier run says ``ok`` (or ``skipped (done)``) with the same
  ``fingerprint`` (the same image file, by path, size and modification time, and the same
  config, weights file, tile, overlap, thresholds, stretch and diameter, and the channel,
  pixel size and output formats asked for) and the same output stem, and all its outputs
  asked for (of every plane) are there, written by predict. Any other image is segmented again.
  ``redo=True`` (``--redo``) segments every image again.
* **One image's failure is its own**: an image that cannot be read, a Zarr whose stored
  chunks do not cover its array (:mod:`.zarr_check`: zarr itself would fill the holes
  silently), a tile on which the model fails (out of memory, say), too many nuclei, a Dask
  worker lost on it more often than the cluster allows: a ``failed`` row with the reason, and
  the batch goes on. Only a failure to write the outputs (a full disk, an output refused) ends
  it, with one line naming the file, the summary saying what is done.
* **One body, anywhere**: each image is segmented by :func:`segment_image` (read, predict,
  measure; nothing written) and its outputs written by :class:`RunWriter`, in the process that
  holds the folder's lock. The serial run does both here, image after image; ``dask``
  (:mod:`.cluster`) runs :func:`segment_image` in the workers of a dask.distributed cluster
  and writes what they return here, as each image is done: the same files, the same summary.
* **Tiles**: ``tile=0`` predicts each image whole, unless the model's test-time resize would
  shrink it more than it shrinks a 512-px tile (or, for a model that does not shrink 512-px
  tiles, at all): such an image is tiled at :data:`DEFAULT_TILE` px instead, with a note, and
  its ``tile`` column says so. A tile the model shrinks more than twice as much as a 512-px
  tile is allowed, with a note.
* **Images larger than memory** (:mod:`.large`): a TIFF or OME-Zarr input whose plane has
  more than ``large_threshold`` megapixels (``--large-threshold``, default
  :data:`DEFAULT_LARGE_THRESHOLD`), or every one with ``large`` (``--large``), is read
  window by window and its labels written chunk by chunk as ``<stem>_labels.ome.zarr`` (a
  folder) with ``<stem>_nuclei.csv`` and the ROIs and GeoJSON asked for, no overlay; the
  route is decided from the file's header (:func:`route_of`) before any work, so its output
  names are checked with the others; the fingerprint records it. The run writes these itself,
  in the process that holds the lock; on a cluster, its tiles are the workers' tasks.
* **Nucleus size** (:mod:`.scale`): an image is predicted rescaled so its nuclei have the size
  the model was trained on (``INPUT.NUCLEUS_DIAMETER``): by ``diameter`` (``--diameter``)
  when given, else by the diameter a first pass finds; labels, overlay and measurements are of
  the image at its own size. ``summary.csv`` says the diameter, where it came from and the
  scale. Tiles are cut from the rescaled image.
"""
from __future__ import annotations

import contextlib
import csv
import dataclasses
import hashlib
import json
import os
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import (
    TYPE_CHECKING, Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union,
)

import numpy as np
from tqdm import tqdm

from ..outdir import OutputConflict, OutputDir
from ..utils import worker_count, write_csv_atomic
from .formats import (
    PHYSICAL_COLUMNS,
    nucleus_outlines,
    physical_columns,
    write_geojson,
    write_ome_labels,
    write_roi_zip,
)
from .image_io import (
    ChannelSpec, ImageError, LoadedImage, expand_inputs, is_zarr, load_planes,
)
from .outputs import (
    MAX_LABELS,
    TABLE_COLUMNS,
    nuclei_table,
    overlay_outlines,
    write_label_tiff,
    write_png,
)
from .scale import check_diameter, predict_at_scale
from .tiling import TileError
from .zarr_check import check_zarr_chunks

if TYPE_CHECKING:  # the predictor is detectron2 glue (sharp_fpn.d2), imported when a run needs one
    from ..d2.predictor import CfgNode, NucleiPredictor

__all__ = [
    "DEFAULT_LARGE_THRESHOLD",
    "DEFAULT_TILE",
    "Failure",
    "ImageEvent",
    "ImageOpened",
    "ImageResult",
    "ImageSettings",
    "ImageTask",
    "LARGE_LABELS_SUFFIX",
    "MAX_TILE",
    "MIN_TILE",
    "NATIVE_TILE",
    "OUTPUT_SUFFIXES",
    "PlaneOutcome",
    "PredictionReport",
    "RunWriter",
    "SUMMARY_COLUMNS",
    "SUMMARY_NAME",
    "TOOL",
    "check_options",
    "default_tile",
    "model_diameter",
    "output_names",
    "plane_stem",
    "predict_images",
    "route_of",
    "segment_image",
    "tile_for",
]

#: The kind of writer predict is in an output folder's record (:mod:`sharp_fpn.outdir`).
TOOL = "predict"
SUMMARY_NAME = "summary.csv"
#: What each image gives, ``<stem>`` + suffix.
OUTPUT_SUFFIXES = ("_labels.tif", "_overlay.png", "_nuclei.csv")
#: The label image as OME-TIFF (``ome_tiff=True``, ``--ome-tiff``), instead of ``_labels.tif``.
OME_LABELS_SUFFIX = "_labels.ome.tif"
#: The labels of an image on the large-image path (an OME-Zarr folder, :mod:`.large`).
LARGE_LABELS_SUFFIX = "_labels.ome.zarr"
#: ``--large-threshold``'s default (megapixels per plane): a TIFF or OME-Zarr plane of more
#: pixels goes through the large-image path (:func:`route_of`). 64 MP (8,000 x 8,000 px) is
#: ~0.5 GB of RGB model input and ~1 GB of int32 labels and masks held whole.
DEFAULT_LARGE_THRESHOLD = 64.0
#: The ImageJ/Fiji ROI zip (``rois=True``, ``--rois``).
ROIS_SUFFIX = "_rois.zip"
#: The QuPath GeoJSON (``geojson=True``, ``--geojson``).
GEOJSON_SUFFIX = "_nuclei.geojson"
#: Tile side of ``--tile``'s default for models that resize their input at test time, and of
#: the tiles ``--tile 0`` falls back to.
DEFAULT_TILE = 512
#: ``--tile``'s default for models that see each image at its own size (``INPUT.MIN_SIZE_TEST
#: 0``, the shipped models): a megapixel in one tile, a fourth of the work of 512-px tiles
#: with their overlaps; masks are pasted per box, so memory stays small.
NATIVE_TILE = 1024
#: Smallest and largest tile sides accepted (0, whole images, aside).
MIN_TILE, MAX_TILE = 64, 4096
_DONE = ("ok", "skipped (done)")
_FINGERPRINT_VERSION = 2  # 2: the --diameter option

#: Columns of ``summary.csv``. ``status``: ``ok`` (segmented by this run), ``skipped (done)``
#: (segmented by an earlier run with the same fingerprint; its numbers are kept), ``failed``
#: (``error`` says why), ``pending`` (not reached yet: a run still going, or killed). What was
#: read: ``dtype``, ``channels`` (stored), ``colour`` (gray, gray+alpha, RGB, RGBA), ``axes``
#: (the file's, tifffile's letters for TIFFs), ``plane`` (the plane's index in a file of
#: several, one row and one set of outputs per plane; empty for a single image), ``planes``
#: (how many the file holds), ``channel`` (the one picked, ``index (name)``), ``pixel_size_x_um``
#: / ``_y_um`` and ``pixel_size_source`` (the file's OME or ImageJ metadata, an OME-Zarr's
#: scale, or ``--pixel-size``; empty when none is known), ``stretch`` (none: 8-bit as stored;
#: percentile; limited: a low-contrast image not stretched beyond 40 noise standard
#: deviations; off: ``--no-stretch``), ``stretch_low/high`` (stored values mapped to 0 and
#: 255), ``noise`` (estimated noise standard deviation, stored units). ``tile``: the tile side
#: used, ``whole`` for one tile of the whole image; ``tiles``: how many (both of the image as
#: the model saw it, rescaled). ``route``: ``large`` for an image segmented by the large-image
#: path (:mod:`.large`: read by windows, labels an OME-Zarr folder, no overlay), empty for the
#: whole-image path (the column is absent from summaries of earlier versions). ``diameter``:
#: the nucleus diameter (px, in the image) the image was rescaled for, ``diameter_source``:
#: ``given`` (--diameter), ``estimated`` (from a first pass; on the large path a pass over at
#: most 9 tiles spread over the image), or why neither (too few nuclei, a model with no
#: INPUT.NUCLEUS_DIAMETER);
#: ``scale``: the image was predicted at ``scale`` times its size (:mod:`.scale`), the labels
#: and measurements are of the image at its own size. Areas in pixels;
#: ``foreground_fraction`` = nucleus pixels / image pixels. ``fingerprint``: what a rerun
#: compares to skip the image (module docstring).
SUMMARY_COLUMNS = (
    "image",
    "status",
    "error",
    "output_stem",
    "height",
    "width",
    "dtype",
    "channels",
    "colour",
    "axes",
    "plane",
    "planes",
    "channel",
    "pixel_size_x_um",
    "pixel_size_y_um",
    "pixel_size_source",
    "stretch",
    "stretch_low",
    "stretch_high",
    "noise",
    "model_output",
    "tile",
    "tiles",
    "route",
    "diameter",
    "diameter_source",
    "scale",
    "nuclei",
    "mean_area",
    "median_area",
    "min_area",
    "max_area",
    "mean_score",
    "foreground_fraction",
    "seconds",
    "fingerprint",
)


class TooManyNuclei(ImageError):
    """More nuclei than a uint16 label image can number."""


@dataclass
class ImageResult:
    """The outputs of one image."""

    image: Path
    labels: Path  # <stem>_labels.tif (or _labels.ome.tif)
    overlay: Optional[Path]  # <stem>_overlay.png (None on the large-image path)
    table: Path  # <stem>_nuclei.csv
    nuclei: int
    summary: Dict[str, Any]
    plane: Optional[int] = None  # the plane of a file of several (<stem> is <file stem>_z<k>)
    rois: Optional[Path] = None  # <stem>_rois.zip
    geojson: Optional[Path] = None  # <stem>_nuclei.geojson
    large: bool = False  # the large-image path: labels <stem>_labels.ome.zarr, overlay None


@dataclass
class Failure:
    """An input that gave no output, and why."""

    image: str  # the file, folder or pattern as given
    reason: str  # the message, naming the input


@dataclass
class PredictionReport:
    """What a run did.

    Attributes:
        results: one per image segmented by this run.
        failures: one per input that gave no output.
        skipped: images left as an earlier run segmented them (``skipped (done)``).
        skipped_outputs: files left out of the inputs, outputs of an earlier predict run.
        notes: what the run said along the way (tiling fallbacks, large tiles, skipped files).
    """

    out_dir: Path
    summary: Path
    results: List[ImageResult] = field(default_factory=list)
    failures: List[Failure] = field(default_factory=list)
    skipped: List[Path] = field(default_factory=list)
    skipped_outputs: List[Path] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failures


def output_names(stem: str, rois: bool = False, geojson: bool = False,
                 ome_tiff: bool = False, large: bool = False) -> List[str]:
    """The files image ``stem`` gives: ``<stem>_labels.tif`` (``_labels.ome.tif`` with
    ``ome_tiff``), ``_overlay.png``, ``_nuclei.csv``, then ``_rois.zip`` with ``rois`` and
    ``_nuclei.geojson`` with ``geojson``. On the large-image path (``large``):
    ``<stem>_labels.ome.zarr`` (a folder) and ``_nuclei.csv``, no overlay, then the same
    ``_rois.zip`` and ``_nuclei.geojson`` (``ome_tiff`` does not apply)."""
    suffixes = list(OUTPUT_SUFFIXES)
    if large:
        suffixes = [LARGE_LABELS_SUFFIX, "_nuclei.csv"]
    elif ome_tiff:
        suffixes[0] = OME_LABELS_SUFFIX
    names = [stem + suffix for suffix in suffixes]
    if rois:
        names.append(stem + ROIS_SUFFIX)
    if geojson:
        names.append(stem + GEOJSON_SUFFIX)
    return names


def plane_stem(stem: str, plane: Optional[int], planes: int) -> str:
    """The output stem of plane ``plane`` of a file of ``planes``: ``<stem>_z<k>``, ``k``
    zero-padded to the digits of the last plane (``_z07`` of 12), whatever the axis the planes
    run along (z, time, pages); ``stem`` itself for a file of one image."""
    if plane is None or planes <= 1:
        return stem
    return f"{stem}_z{plane:0{len(str(planes - 1))}d}"


def check_options(tile: int, overlap: int, score_threshold: float,
                  min_kept_fraction: float) -> None:
    """ValueError, one line naming the option, unless: ``tile`` is 0 (whole images) or in
    ``[MIN_TILE, MAX_TILE]``; ``overlap`` in ``[0, tile / 2)`` (the 512-px fallback tiles of
    ``tile=0`` for whole images); both thresholds in ``[0, 1]`` (NaN is not)."""
    if tile != 0 and not MIN_TILE <= tile <= MAX_TILE:
        raise ValueError(f"--tile must be 0 (whole images) or {MIN_TILE}..{MAX_TILE} pixels, "
                         f"got {tile}")
    side = tile or DEFAULT_TILE
    if not 0 <= overlap < side / 2:
        of = "the tile" if tile else f"the {DEFAULT_TILE}-px tiles --tile 0 may fall back to"
        raise ValueError(f"--overlap must be in [0, {side / 2:g}) pixels (less than half {of}), "
                         f"got {overlap}")
    for name, value in (("--score-threshold", score_threshold),
                        ("--min-kept-fraction", min_kept_fraction)):
        if not 0.0 <= value <= 1.0:  # NaN fails too
            raise ValueError(f"{name} must be in [0, 1], got {value}")


def _output_stems(paths: Sequence[Path]) -> List[str]:
    """One output stem per input: the file stem, ``_2``, ``_3``... added on collisions."""
    stems: List[str] = []
    taken = set()
    for path in paths:
        base = path.stem
        if base.lower().endswith(".ome"):  # x.ome.tif, x.ome.zarr -> x
            base = base[:-4]
        stem, n = base, 1
        while stem in taken:
            n += 1
            stem = f"{base}_{n}"
        taken.add(stem)
        stems.append(stem)
    return stems


def _header_plane_size(path: Path) -> Optional[Tuple[int, int]]:
    """``(height, width)`` of one plane of a TIFF (its first series) or OME-Zarr (its first
    level) from the header alone, whatever the planes and channels; None when neither."""
    if is_zarr(path):
        import zarr

        group = zarr.open_group(str(path), mode="r")
        attrs = dict(group.attrs)
        scale = (attrs.get("ome", attrs).get("multiscales") or [{}])[0]
        array = group[scale["datasets"][0]["path"]]
        named = scale.get("axes") or list("tczyx"[-array.ndim:])
        letters = [str(a["name"] if isinstance(a, dict) else a).lower() for a in named]
        return array.shape[letters.index("y")], array.shape[letters.index("x")]
    import tifffile

    with tifffile.TiffFile(path) as tif:
        series = tif.series[0]
        return series.shape[series.axes.index("Y")], series.shape[series.axes.index("X")]


def route_of(path: Path, large: bool = False,
             threshold: float = DEFAULT_LARGE_THRESHOLD) -> Tuple[bool, Optional[str]]:
    """Whether input ``path`` goes through the large-image path (:mod:`.large`), and a note.

    The rule: every TIFF and OME-Zarr input with ``large`` (``--large``); otherwise a TIFF or
    OME-Zarr whose plane has more than ``threshold`` megapixels (``--large-threshold``), its
    size read from the header, no pixel read. A file the large path cannot take (several
    planes, say) is routed there all the same and fails there with its reason, rather than
    being read whole. Other formats (PNG, JPEG, ...) are read whole whatever their size: above
    the threshold, with a note saying so (convert the image to a tiled TIFF for bounded
    memory); with ``large``, they fail on the large path, naming the file.
    """
    tiff = False
    if not is_zarr(path):
        try:
            with open(path, "rb") as f:
                tiff = f.read(4) in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
        except OSError:
            return large, None  # it fails as an image, on its route
        if not tiff:
            if large:
                return True, None  # refused there: the large path reads TIFF and OME-Zarr
            try:
                from PIL import Image

                with Image.open(path) as im:
                    width, height = im.size
            except Exception:  # noqa: BLE001  not PIL's: its reader says why, later
                return False, None
            if width * height > threshold * 1e6:
                return False, (f"{path}: {width}x{height} px, above --large-threshold "
                               f"{threshold:g} MP, but a {path.suffix or 'non-TIFF'} file is "
                               f"read whole (the large-image path reads TIFF and OME-Zarr); "
                               f"save it as a tiled TIFF for bounded memory")
            return False, None
    if large:
        return True, None
    try:
        height, width = _header_plane_size(path)
    except Exception:  # noqa: BLE001  unreadable: the whole-image reader names the problem
        return False, None
    return height * width > threshold * 1e6, None


def _area_stats(labels: np.ndarray, count: int) -> Dict[str, Any]:
    areas = np.bincount(labels.ravel(), minlength=count + 1)[1:]
    if count == 0:
        return {"mean_area": "", "median_area": "", "min_area": "", "max_area": ""}
    return {
        "mean_area": round(float(areas.mean()), 2),
        "median_area": float(np.median(areas)),
        "min_area": int(areas.min()),
        "max_area": int(areas.max()),
    }


def _file_key(path: Union[str, os.PathLike]) -> List[Any]:
    if os.path.isdir(path):  # a Zarr folder: its files' total size and latest change
        size, latest = 0, os.stat(path).st_mtime_ns
        for folder, _, names in os.walk(path):
            for name in names:
                stat = os.stat(os.path.join(folder, name))
                size, latest = size + stat.st_size, max(latest, stat.st_mtime_ns)
        return [os.path.realpath(path), size, latest]
    stat = os.stat(path)
    return [os.path.realpath(path), stat.st_size, stat.st_mtime_ns]


def _settings(cfg: CfgNode, weights, tile: int, overlap: int, score_threshold: float,
              min_kept_fraction: float, stretch: bool,
              diameter: Optional[float] = None, formats: Optional[Dict[str, Any]] = None) -> str:
    """What, besides the image, decides an image's outputs (the device aside)."""
    config = cfg.clone()
    config.defrost()
    config.MODEL.DEVICE = ""
    config.MODEL.ROI_HEADS.SCORE_THRESH_TEST = float(score_threshold)
    try:
        dumped = config.dump()
    except Exception:  # noqa: BLE001  a value yaml cannot write
        dumped = str(config)
    return json.dumps({
        "version": _FINGERPRINT_VERSION, "config": dumped,
        "weights": "random" if weights is None else _file_key(weights), "tile": tile,
        "overlap": overlap, "score_threshold": float(score_threshold),
        "min_kept_fraction": float(min_kept_fraction), "stretch": bool(stretch),
        "diameter": None if diameter is None else float(diameter),
        # the input and output options, only where not the default: runs of earlier versions
        # with the defaults stay resumable
        **{k: v for k, v in (formats or {}).items() if v not in (None, False)},
    }, sort_keys=True)


def _fingerprint(settings: str, path: Path, large: bool = False) -> str:
    """The image's fingerprint: the run's settings, the file's key and, for an image on the
    large-image path, the route (so a rerun whose ``--large`` / ``--large-threshold`` sends
    it the other way segments it again; whole-image fingerprints are those of earlier
    versions)."""
    try:
        image = json.dumps(_file_key(path))
    except OSError:
        return ""  # gone: it will fail as an image
    route = json.dumps({"route": "large"}) if large else ""
    return hashlib.sha256((settings + image + route).encode("utf-8")).hexdigest()[:16]


def _earlier_rows(out: OutputDir) -> Dict[str, List[Dict[str, str]]]:
    """The rows of the images an earlier predict run wrote there and finished (every plane
    done), by fingerprint."""
    path = out.folder / SUMMARY_NAME
    if not out.owns(SUMMARY_NAME) or not path.is_file():
        return {}
    try:
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
    except (OSError, csv.Error, UnicodeDecodeError):
        return {}
    groups: Dict[str, List[Dict[str, str]]] = {}
    for r in rows:
        if r.get("fingerprint"):
            groups.setdefault(r["fingerprint"], []).append(r)
    return {key: group for key, group in groups.items()
            if all(r.get("status") in _DONE for r in group)}


def _still_done(before: List[Dict[str, str]], stem: str, out: OutputDir,
                names: Dict[str, bool], large: bool = False) -> bool:
    """Whether an earlier run's rows of an image cover all its planes under ``stem`` and every
    output asked for is there, written by predict (on the large-image path, ``large``: the
    ``_labels.ome.zarr`` folder and the others, :func:`output_names`)."""
    try:
        planes = int(before[0].get("planes") or 1)
        indices = sorted(int(r["plane"]) for r in before) if planes > 1 else [None]
    except (KeyError, TypeError, ValueError):
        return False
    if len(before) != planes or (planes > 1 and indices != list(range(planes))):
        return False
    for row in before:
        plane = int(row["plane"]) if planes > 1 else None
        expected = plane_stem(stem, plane, planes)
        if row.get("output_stem") != expected or (row.get("route") == "large") != large \
                or not all(out.owns(name) and _is_output(out.folder / name)
                           for name in output_names(expected, **names, large=large)):
            return False
    return True


def _is_output(path: Path) -> bool:
    """An output there: a file, or for ``*.zarr`` a folder."""
    return path.is_dir() if path.name.endswith(".zarr") else path.is_file()


def _check_outputs(out: OutputDir, stems: Sequence[str],
                   names: Optional[Dict[str, bool]] = None, *,
                   planned: Optional[Dict[str, int]] = None, me: int = -1,
                   by: Optional[Dict[int, str]] = None, large: Sequence[bool] = ()) -> None:
    """Every output name of ``stems``, checked (OutputConflict otherwise): before any work
    (the run's stems), and when a file of several planes is read (its planes' stems, with
    ``planned``: each input's own output names by input index, ``me`` the file's index, ``by``
    the inputs' names, so that a plane's name that is another input's output is refused too:
    ``cells.tif``'s plane 0 and ``cells_z0.png`` both give ``cells_z0_labels.tif``).
    ``large``: per stem, whether its image takes the large-image path (its names differ)."""
    conflicts = []
    routes = list(large) + [False] * (len(stems) - len(large))
    wanted = [n for stem, big in zip(stems, routes)
              for n in output_names(stem, **(names or {}), large=big)]
    for name in wanted if planned is not None else [SUMMARY_NAME] + wanted:
        other = (planned or {}).get(name, me)
        if other != me:
            owner = (by or {}).get(other, f"input {other + 1}")
            conflicts.append(f"{out.folder / name}: would be the output of two inputs (this "
                             f"file's plane, and {owner}); rename one of them")
            continue
        try:
            out.check(name)
        except OutputConflict as e:
            conflicts.append(e)
    if conflicts:
        more = f" ({len(conflicts) - 1} more outputs in the way)" if len(conflicts) > 1 else ""
        raise OutputConflict(f"{conflicts[0]}{more}")


def _reason(path: Path, error: BaseException) -> str:
    message = " ".join(str(error).split()) or type(error).__name__
    if isinstance(error, TileError):
        return f"{path}: {message}"
    if isinstance(error, ImageError):
        return message
    return f"{path}: {type(error).__name__}: {message}"


def _note(report: PredictionReport, text: str) -> None:
    report.notes.append(text)
    tqdm.write(f"note: {text}", file=sys.stderr)


def default_tile(cfg: CfgNode) -> int:
    """``--tile``'s default for the model ``cfg``: :data:`NATIVE_TILE` when its test pipeline
    keeps every image at its own size, else :data:`DEFAULT_TILE`."""
    from ..d2.predictor import input_scale

    native = all(input_scale(cfg, side, side) == 1.0 for side in (64, DEFAULT_TILE, NATIVE_TILE))
    return NATIVE_TILE if native else DEFAULT_TILE


def tile_for(cfg: CfgNode, shape: Tuple[int, int], tile: int) -> Tuple[int, Optional[str]]:
    """The tile to use for an image (``tile=0``'s fallback, module docstring) and a note."""
    if tile:
        return tile, None
    from ..d2.predictor import input_scale

    height, width = shape
    limit = min(1.0, input_scale(cfg, DEFAULT_TILE, DEFAULT_TILE))
    scale = input_scale(cfg, height, width)
    if scale >= limit * (1 - 1e-9):
        return 0, None
    return DEFAULT_TILE, (
        f"{width}x{height} px, tiled at {DEFAULT_TILE} px: whole (--tile 0), the model's "
        f"resize would shrink it {1 / scale:.1f}x, more than a {DEFAULT_TILE}-px tile"
    )


def _large_tile_note(cfg: CfgNode, tile: int) -> Optional[str]:
    from ..d2.predictor import input_scale

    limit = min(1.0, input_scale(cfg, DEFAULT_TILE, DEFAULT_TILE))
    scale = input_scale(cfg, tile, tile)
    if scale >= limit / 2:
        return None
    return (f"--tile {tile}: the model resizes each tile to about {round(tile * scale)} px, "
            f"shrinking nuclei {1 / scale:.1f}x; a smaller --tile keeps them nearer the size "
            f"the model saw in training")


def model_diameter(cfg: CfgNode) -> float:
    """The model's ``INPUT.NUCLEUS_DIAMETER`` (px; 0 when not known or not in the config)."""
    try:
        return float(cfg.INPUT.get("NUCLEUS_DIAMETER", 0.0) or 0.0)
    except (AttributeError, TypeError, ValueError):
        return 0.0


def _image_row(path: Path, stem: str, image: LoadedImage, prediction, tile: int,
               seconds: float, fingerprint: str, choice=None) -> Dict[str, Any]:
    height, width = image.shape
    how = image.stretching
    low, high = image.stretch if image.stretch else ("", "")
    return {
        "image": str(path),
        "status": "ok",
        "error": "",
        "output_stem": stem,
        "height": height,
        "width": width,
        "dtype": str(image.dtype),
        "channels": image.channels,
        "colour": image.colour,
        "axes": image.axes,
        "plane": "" if image.plane is None else image.plane,
        "planes": image.planes,
        "channel": "" if image.channel is None else (
            f"{image.channel} ({image.channel_name})" if image.channel_name else image.channel),
        "pixel_size_x_um": "" if image.pixel_size is None else image.pixel_size.x,
        "pixel_size_y_um": "" if image.pixel_size is None else image.pixel_size.y,
        "pixel_size_source": "" if image.pixel_size is None else image.pixel_size.source,
        "stretch": how.mode if how else "",
        "stretch_low": low,
        "stretch_high": high,
        "noise": "" if how is None or how.noise is None else round(how.noise, 4),
        "model_output": prediction.kind,
        "tile": tile or "whole",
        "tiles": prediction.tiles,
        "diameter": "" if choice is None or choice.diameter is None else round(choice.diameter, 2),
        "diameter_source": "" if choice is None else choice.source,
        "scale": 1.0 if choice is None else round(choice.scale, 4),
        "nuclei": prediction.count,
        **_area_stats(prediction.labels, prediction.count),
        "mean_score": round(float(prediction.scores.mean()), 4) if prediction.count else "",
        "foreground_fraction": round(float((prediction.labels > 0).mean()), 4),
        "seconds": round(seconds, 2),
        "fingerprint": fingerprint,
    }


_CHANNELS = {"gray": 1, "gray+alpha": 2, "RGB": 3, "RGBA": 4}


def _large_row(task: ImageTask, source, result, tile: int, settings: ImageSettings,
               seconds: float) -> Dict[str, Any]:
    """The summary row of an image the large-image path segmented, from its
    :class:`~.large.LargeSource` and :class:`~.large.LargeResult` (the columns of
    :func:`_image_row`; ``route`` ``large``)."""
    height, width = result.shape
    how, size, found = result.stretch, result.pixel_size, result.summary
    count = int(result.nuclei)
    if count:
        stats = {"mean_area": round(float(found.mean_area), 2),
                 "median_area": float(found.median_area), "min_area": int(found.min_area),
                 "max_area": int(found.max_area)}
    else:
        stats = {"mean_area": "", "median_area": "", "min_area": "", "max_area": ""}
    choice = result.scale
    return {
        "image": str(task.path),
        "status": "ok",
        "error": "",
        "output_stem": task.stem,
        "height": height,
        "width": width,
        "dtype": str(source.dtype),
        "channels": _CHANNELS.get(source.colour, ""),
        "colour": source.colour,
        "axes": source.axes,
        "plane": "",
        "planes": 1,
        "channel": "" if source.channel is None else (
            f"{source.channel} ({source.channel_name})" if source.channel_name
            else source.channel),
        "pixel_size_x_um": "" if size is None else size.x,
        "pixel_size_y_um": "" if size is None else size.y,
        "pixel_size_source": "" if size is None else size.source,
        "stretch": how.mode,
        "stretch_low": "" if how.low is None else how.low,
        "stretch_high": "" if how.high is None else how.high,
        "noise": "" if getattr(how, "noise", None) is None else round(how.noise, 4),
        "model_output": result.kind,
        "tile": tile,
        "tiles": result.tiles,
        "route": "large",
        "diameter": "" if choice.diameter is None else round(float(choice.diameter), 2),
        "diameter_source": choice.source,
        "scale": round(choice.scale, 4),
        "nuclei": count,
        **stats,
        "mean_score": round(float(found.mean_score), 4) if count else "",
        "foreground_fraction": round(float(found.total_area) / float(height * width), 4),
        "seconds": round(seconds, 2),
        "fingerprint": task.fingerprint,
    }


# --------------------------------------------------------------------------------------------
# one image: segmented anywhere (this process, a Dask worker), written by the run


@dataclass(frozen=True)
class ImageTask:
    """One input of a run, as any process needs it (picklable, no model, no arrays).

    Attributes:
        index: its place among the run's inputs (its rows' place in ``summary.csv``).
        path: the image file or Zarr folder.
        stem: its output stem (:func:`plane_stem` adds ``_z<k>`` per plane).
        fingerprint: what a rerun compares to skip it (module docstring).
        large: it takes the large-image path (:func:`route_of`; :meth:`RunWriter.run_large`).
    """

    index: int
    path: Path
    stem: str
    fingerprint: str
    large: bool = False


@dataclass(frozen=True)
class ImageSettings:
    """What segmenting one image needs besides the image and the model: the same for every
    image of a run, sent to every worker (picklable). The fields are :func:`predict_images`'s
    arguments of the same names; ``tile`` is resolved (never None); ``trained_diameter`` is the
    model's :func:`model_diameter`; ``progress`` shows the tiles' bar; ``large_tile`` is the
    tile of the large-image path when ``tile`` is 0 (whole images: a large one is tiled)."""

    tile: int
    overlap: int
    stretch: bool = True
    channel: ChannelSpec = None
    pixel_size: Optional[float] = None
    diameter: Optional[float] = None
    trained_diameter: float = 0.0
    rois: bool = False
    geojson: bool = False
    ome_tiff: bool = False
    allow_missing_chunks: bool = False
    progress: bool = False
    debug: bool = False
    large_tile: int = NATIVE_TILE
    large_memory_mb: Optional[float] = None

    @property
    def outputs_asked(self) -> Dict[str, bool]:
        """The :func:`output_names` switches."""
        return {"rois": self.rois, "geojson": self.geojson, "ome_tiff": self.ome_tiff}


@dataclass
class ImageOpened:
    """An input was read (``error`` None: ``planes`` is how many planes it holds) or could not
    be (``error``: the reason, naming the file)."""

    task: ImageTask
    planes: int = 0
    plane_indices: Tuple[Optional[int], ...] = ()
    error: Optional[str] = None


@dataclass
class PlaneOutcome:
    """One plane segmented (``error`` None) or failed (``error``: the reason), with all that
    its outputs are written from. The arrays are of the image at its own size:
    ``labels`` ``(H, W)`` (0 background, 1..N by score), ``overlay`` ``(H, W, 3)`` uint8.

    ``row`` is the plane's summary row, ``seconds`` the time segmenting took (the writer adds
    the time writing takes)."""

    task: ImageTask
    k: int  # its position among the file's planes
    plane: Optional[int]
    planes: int
    stem: str
    where: str  # the file, with "(plane k)" for a file of several
    row: Dict[str, Any]
    error: Optional[str] = None
    labels: Optional[np.ndarray] = None
    overlay: Optional[np.ndarray] = None
    table: Optional[List[Dict[str, Any]]] = None
    columns: Sequence[str] = TABLE_COLUMNS
    outlines: Any = None
    pixel_size: Any = None
    nuclei: int = 0
    note: Optional[str] = None
    seconds: float = 0.0


ImageEvent = Union[ImageOpened, PlaneOutcome]


def segment_image(task: ImageTask, settings: ImageSettings,
                  predictor: NucleiPredictor) -> Iterator[ImageEvent]:
    """Segment one input, plane by plane, writing nothing: first an :class:`ImageOpened`, then
    one :class:`PlaneOutcome` per plane (none when the file cannot be read).

    The one body of every run: :func:`predict_images` consumes it in this process (writing each
    plane's outputs as it comes, and closing the generator when the run refuses the file's
    plane names), :mod:`.cluster` in a Dask worker (returning the list to the client, which
    writes). A failure of the image (unreadable, a Zarr with missing chunks, a tile the model
    fails on, too many nuclei) is an event with ``error``, never an exception: the batch goes
    on.

    Args:
        task: the input.
        settings: the run's :class:`ImageSettings`.
        predictor: the model (``predict(rgb, tile=, overlap=, progress=)`` and ``cfg``).
    """
    path, stem = task.path, task.stem
    start = time.perf_counter()
    try:
        if not settings.allow_missing_chunks and is_zarr(path):
            check_zarr_chunks(path)
        planes = load_planes(path, stretch=settings.stretch, channel=settings.channel,
                             pixel_size=settings.pixel_size)
    except Exception as e:  # noqa: BLE001  one image's failure never ends the batch
        if settings.debug:
            traceback.print_exc()
        yield ImageOpened(task, error=_reason(path, e))
        return
    count = len(planes)
    yield ImageOpened(task, count, tuple(image.plane for image in planes))
    for k in range(count):
        image = planes[k]
        planes[k] = None  # each plane's pixels freed once it is done
        if k:
            start = time.perf_counter()
        out_stem = plane_stem(stem, image.plane, count)
        where = path if image.plane is None else f"{path} (plane {image.plane})"
        outcome = PlaneOutcome(task, k, image.plane, count, out_stem, str(where), row={})
        try:
            used: Dict[str, Any] = {}

            def run_model(rgb: np.ndarray):
                used["tile"], used["note"] = tile_for(predictor.cfg, rgb.shape[:2],
                                                       settings.tile)
                return predictor.predict(rgb, tile=used["tile"], overlap=settings.overlap,
                                         progress=settings.progress)

            scaled = predict_at_scale(run_model, image.rgb, settings.trained_diameter,
                                      settings.diameter)
            prediction = dataclasses.replace(scaled.prediction, labels=scaled.labels,
                                             scores=scaled.scores)
            if prediction.count > MAX_LABELS:
                raise TooManyNuclei(
                    f"{where}: {prediction.count} nuclei do not fit a uint16 label "
                    f"image (at most {MAX_LABELS})"
                )
            outcome.overlay = overlay_outlines(image.rgb, prediction.labels)
            table = nuclei_table(prediction.labels, prediction.scores, image.intensity)
            if image.pixel_size is not None:
                table = [{**r, **physical_columns(r, image.pixel_size)} for r in table]
                outcome.columns = TABLE_COLUMNS + PHYSICAL_COLUMNS
            outcome.table = table
            if settings.rois or settings.geojson:
                outcome.outlines = nucleus_outlines(prediction.labels)
        except Exception as e:  # noqa: BLE001  one image's failure never ends the batch
            reason = _reason(path, e)
            if image.plane is not None:
                reason = f"(plane {image.plane}) {reason}"
            if settings.debug:
                traceback.print_exc()
            outcome.error = reason
            outcome.overlay = outcome.table = outcome.outlines = None
            outcome.row = {"image": str(path), "status": "failed", "error": reason,
                           "output_stem": out_stem,
                           "plane": "" if image.plane is None else image.plane,
                           "planes": count, "fingerprint": task.fingerprint}
            yield outcome
            continue
        outcome.labels, outcome.nuclei = prediction.labels, prediction.count
        outcome.pixel_size, outcome.note = image.pixel_size, used["note"]
        outcome.seconds = time.perf_counter() - start
        outcome.row = _image_row(path, out_stem, image, prediction, used["tile"],
                                 outcome.seconds, task.fingerprint, scaled.choice)
        del image, scaled, prediction
        yield outcome


class RunWriter:
    """The writing half of a run, in the process that holds the output folder's lock: takes
    each :class:`ImageOpened` / :class:`PlaneOutcome` (from this process or a worker), writes
    the plane's outputs through :class:`~sharp_fpn.outdir.OutputDir` and rewrites
    ``summary.csv`` after each, by the rules of the module docstring.

    Args:
        out: the run's output folder (locked by the caller).
        report: the run's report, filled in as events come.
        settings: the run's :class:`ImageSettings`.
        head: summary rows of the inputs that gave no file (first in the summary).
        rows: per input, its rows (pending or skipped (done) at the start).
        stems: every input's output stem (a file's plane names must not be another's).
        large: per input, whether it takes the large-image path (its output names).
    """

    def __init__(self, out: OutputDir, report: PredictionReport, settings: ImageSettings,
                 head: List[Dict[str, Any]], rows: List[List[Dict[str, Any]]],
                 stems: Sequence[str], large: Sequence[bool] = ()) -> None:
        self.out, self.report, self.settings = out, report, settings
        self.head, self.rows = head, rows
        self.summary = out.claim(SUMMARY_NAME)
        routes = list(large) + [False] * (len(stems) - len(large))
        self._planned = {name: i for i, (stem, big) in enumerate(zip(stems, routes))
                         for name in output_names(stem, **settings.outputs_asked, large=big)}
        self._order: Dict[int, Tuple[int, int]] = {}

    def write_summary(self) -> None:
        """``summary.csv`` of what is known now (atomically)."""
        write_csv_atomic(self.summary, self.head + [r for image in self.rows for r in image],
                         SUMMARY_COLUMNS)

    def fail(self, task: ImageTask, reason: str) -> None:
        """``task`` gave nothing (a read failure, a worker lost on it): a failed row."""
        self.report.failures.append(Failure(str(task.path), reason))
        self.rows[task.index] = [{"image": str(task.path), "status": "failed", "error": reason,
                                  "output_stem": task.stem}]
        tqdm.write(f"failed: {reason}", file=sys.stderr)
        self.write_summary()

    def accept(self, event: ImageEvent) -> bool:
        """Record one event (and write its outputs); False when the rest of that image is not
        wanted (it could not be read, or its plane names are refused)."""
        if isinstance(event, ImageOpened):
            return self._opened(event)
        return self._plane(event)

    def _opened(self, event: ImageOpened) -> bool:
        task = event.task
        if event.error is not None:
            self.fail(task, event.error)
            return False
        if event.planes > 1:  # the planes' names, unknown before the file was read
            try:
                _check_outputs(self.out, [plane_stem(task.stem, p, event.planes)
                                          for p in event.plane_indices],
                               self.settings.outputs_asked, planned=self._planned,
                               me=task.index, by=self._input_names())
            except OutputConflict as e:
                self.fail(task, _reason(task.path, e))
                return False
        self.rows[task.index] = [
            {"image": str(task.path), "status": "pending", "output_stem": task.stem,
             "plane": "" if p is None else p, "planes": event.planes}
            for p in event.plane_indices]
        return True

    def _input_names(self) -> Dict[int, str]:
        return {i: image[0].get("image", "") for i, image in enumerate(self.rows) if image}

    def _plane(self, outcome: PlaneOutcome) -> bool:
        task, k, report = outcome.task, outcome.k, self.report
        i = task.index
        if outcome.error is not None:
            report.failures.append(Failure(str(task.path), outcome.error))
            self.rows[i][k] = outcome.row
            tqdm.write(f"failed: {outcome.error}", file=sys.stderr)
            self.write_summary()
            return True
        if outcome.note:
            _note(report, f"{outcome.where}: {outcome.note}")
        settings, out = self.settings, self.out
        start = time.perf_counter()
        written: List[Path] = []
        try:
            claimed = out.claim_all(output_names(outcome.stem, **settings.outputs_asked))
            labels_file, overlay_file, table_file = claimed[:3]
            if settings.ome_tiff:
                write_ome_labels(labels_file, outcome.labels, outcome.pixel_size)
            else:
                write_label_tiff(labels_file, outcome.labels)
            written.append(labels_file)
            write_png(overlay_file, outcome.overlay)
            written.append(overlay_file)
            write_csv_atomic(table_file, outcome.table, outcome.columns)
            written.append(table_file)
            extra = list(claimed[3:])
            rois_file = extra.pop(0) if settings.rois else None
            geojson_file = extra.pop(0) if settings.geojson else None
            if rois_file is not None:
                write_roi_zip(rois_file, outcome.outlines)
                written.append(rois_file)
            if geojson_file is not None:
                write_geojson(geojson_file, outcome.outlines, outcome.table, outcome.stem)
        except BaseException as e:  # the outputs themselves: the run cannot go on
            for done in written:  # a plane's outputs are all there or none (each whole)
                with contextlib.suppress(OSError):
                    done.unlink()
            if isinstance(e, Exception):
                self.rows[i][k] = {"image": str(task.path), "status": "failed",
                                   "output_stem": outcome.stem, "plane": outcome.row["plane"],
                                   "error": f"outputs not written: {_reason(task.path, e)}"}
            try:
                self.write_summary()
            except Exception:  # noqa: BLE001  the disk may be full: the first error counts
                pass
            if isinstance(e, OSError):
                at = e.filename or out.folder
                raise OSError(f"{at}: the outputs of {outcome.where} cannot be written "
                              f"({e.strerror or e}); the run stops here, {self.summary} "
                              f"lists what is done") from e
            raise
        row = dict(outcome.row)
        row["seconds"] = round(outcome.seconds + time.perf_counter() - start, 2)
        self.rows[i][k] = row
        report.results.append(ImageResult(
            image=task.path, labels=labels_file, overlay=overlay_file, table=table_file,
            nuclei=outcome.nuclei, summary=row, plane=outcome.plane, rois=rois_file,
            geojson=geojson_file,
        ))
        self._order[id(report.results[-1])] = (i, k)
        self.write_summary()
        return True

    def run_large(self, task: ImageTask, predictor: Any,
                  map_tiles: Optional[Callable] = None,
                  progress: Optional[bool] = None) -> bool:
        """Segment ``task`` on the large-image path (:func:`~.large.segment_large`) here, in
        the process that holds the lock: its outputs (:func:`output_names` with ``large``)
        are claimed, then written by ``segment_large`` itself, window by window, each under a
        temporary name renamed when whole; then its summary row.

        Args:
            task: the input (``task.large``).
            predictor: a ``NucleiPredictor`` or a tile model (:mod:`.large`).
            map_tiles: runs the tiles (:func:`~.cluster.tile_mapper` on a cluster);
                None: here, one tile after the other.
            progress: a bar over the tiles (default: the settings' ``progress``).

        Returns:
            True (the run goes on). A failure of the image (unreadable, several planes, a tile
            the model fails on, a diameter needing a rescale, a lost worker) is a ``failed``
            row naming it, and nothing of it is left written.

        Raises:
            OSError: an output could not be written (as :meth:`accept`); the run stops.
        """
        from .large import LargeOutputs, LargeSource, segment_large

        settings, out, i = self.settings, self.out, task.index
        start = time.perf_counter()
        try:
            claimed = out.claim_all(output_names(task.stem, **settings.outputs_asked,
                                                 large=True))
        except OutputConflict as e:
            self.fail(task, _reason(task.path, e))
            return True
        labels_dir, table_file = claimed[:2]
        extra = list(claimed[2:])
        rois_file = extra.pop(0) if settings.rois else None
        geojson_file = extra.pop(0) if settings.geojson else None
        outputs = LargeOutputs(labels_dir, table_file, geojson=geojson_file, rois=rois_file,
                               stem=task.stem)
        tile = settings.tile or settings.large_tile
        source = None
        try:
            source = LargeSource(task.path, settings.channel, settings.pixel_size,
                                 settings.allow_missing_chunks)
            result = segment_large(
                source, outputs, predictor=predictor, tile=tile, overlap=settings.overlap,
                diameter=settings.diameter, stretch=settings.stretch,
                progress=settings.progress if progress is None else progress,
                map_tiles=map_tiles,
                allow_missing_chunks=settings.allow_missing_chunks,
                **({} if settings.large_memory_mb is None
                   else {"label_memory_mb": settings.large_memory_mb}))
        except Exception as e:  # noqa: BLE001  one image's failure never ends the batch
            if isinstance(e, OSError) and not isinstance(e, ImageError):
                # writing (reads fail as ImageReadError / TileError): the run cannot go on
                with contextlib.suppress(Exception):
                    self.rows[i] = [{"image": str(task.path), "status": "failed",
                                     "output_stem": task.stem, "route": "large",
                                     "error": f"outputs not written: {_reason(task.path, e)}"}]
                    self.write_summary()
                at = e.filename or out.folder
                raise OSError(f"{at}: the outputs of {task.path} cannot be written "
                              f"({e.strerror or e}); the run stops here, {self.summary} "
                              f"lists what is done") from e
            if settings.debug:
                traceback.print_exc()
            reason = _reason(task.path, e)
            if reason.startswith(f"{task.path}: {task.path}: "):  # the large path names it
                reason = reason[len(f"{task.path}: "):]
            self.fail(task, reason)
            self.rows[i][0].update(route="large", fingerprint=task.fingerprint)
            self.write_summary()
            return True
        finally:
            if source is not None:
                source.close()
        for note in result.notes:
            _note(self.report, f"{task.path}: {note}")
        row = _large_row(task, source, result, tile, settings,
                         time.perf_counter() - start)
        self.rows[i] = [row]
        self.report.results.append(ImageResult(
            image=task.path, labels=labels_dir, overlay=None, table=table_file,
            nuclei=result.nuclei, summary=row, rois=rois_file, geojson=geojson_file,
            large=True))
        self._order[id(self.report.results[-1])] = (i, 0)
        self.write_summary()
        return True

    def sort_results(self) -> None:
        """The report's results in input order (a cluster's come as they are done)."""
        self.report.results.sort(key=lambda r: self._order.get(id(r), (1 << 62, 0)))


def predict_images(
    cfg: Union[CfgNode, str, os.PathLike, None],
    weights: Optional[Union[str, os.PathLike]],
    inputs: Sequence[Union[str, os.PathLike]],
    out_dir: Union[str, os.PathLike],
    *,
    tile: Optional[int] = None,
    overlap: int = 64,
    score_threshold: float = 0.5,
    min_kept_fraction: float = 0.5,
    device: Optional[str] = None,
    stretch: bool = True,
    overwrite: bool = False,
    redo: bool = False,
    progress: bool = True,
    predictor: Optional[NucleiPredictor] = None,
    debug: bool = False,
    diameter: Optional[float] = None,
    channel: ChannelSpec = None,
    pixel_size: Optional[float] = None,
    rois: bool = False,
    geojson: bool = False,
    ome_tiff: bool = False,
    allow_missing_chunks: bool = False,
    dask: Any = None,
    dask_workers: Optional[int] = None,
    predictor_factory: Optional[Callable[[], Any]] = None,
    large: bool = False,
    large_threshold: float = DEFAULT_LARGE_THRESHOLD,
    large_memory_mb: Optional[float] = None,
) -> PredictionReport:
    """Label the nuclei of every input image and write the outputs to ``out_dir``, by the
    rules of the module docstring.

    Args:
        cfg: the model's config (``CfgNode`` or yaml file).
        weights: its checkpoint (None: random weights, for tests).
        inputs: image files, folders and glob patterns (:func:`~.image_io.expand_inputs`).
        out_dir: where the outputs go (created).
        tile, overlap: tiling in pixels (:meth:`NucleiPredictor.predict`); None: the model's
            :func:`default_tile`; ``tile=0``: whole
            images, where the model would not shrink them too much (module docstring).
        score_threshold: instances scoring below are dropped.
        min_kept_fraction: instances keeping less of their mask are dropped as duplicates.
        device: torch device; default the config's ``MODEL.DEVICE``.
        stretch: the per-image stretch of non-8-bit images (:mod:`.image_io`); False maps
            the sample type's range to 0..255.
        overwrite: replace files predict did not write (never an input).
        redo: segment again the images an earlier run finished.
        progress: show tqdm progress bars (images, and tiles of large images).
        predictor: a model already built (then ``cfg``, ``weights``, ``device`` and
            ``score_threshold``, ``min_kept_fraction`` are not used); not with ``dask``.
        debug: print the traceback of each image's failure (the batch still goes on).
        diameter: the nuclei's diameter in px (``--diameter``): each image is rescaled by the
            model's ``INPUT.NUCLEUS_DIAMETER / diameter``; None estimates it per image where
            the model knows its diameter (:mod:`.scale`).
        channel: the channel to segment in files of several (``--channel``): an index, or a
            name (OME ``Channel Name``; :func:`~.image_io.read_planes`). A file without it
            fails, naming the channels it has.
        pixel_size: µm per pixel (``--pixel-size``), instead of the file's; with either, the
            per-nucleus table adds :data:`~.formats.PHYSICAL_COLUMNS`.
        rois: also write ``<stem>_rois.zip`` (ImageJ/Fiji ROIs, :mod:`.formats`).
        geojson: also write ``<stem>_nuclei.geojson`` (QuPath detections).
        ome_tiff: write the labels as ``<stem>_labels.ome.tif`` (OME-TIFF with the pixel
            size) instead of ``<stem>_labels.tif``.
        allow_missing_chunks: read a Zarr whose stored chunks do not cover its array (the
            missing ones as its fill value, as zarr does) instead of failing it
            (:func:`~.zarr_check.check_zarr_chunks`; ``--allow-missing-chunks``).
        dask: None: this process segments the images, one after the other. Otherwise the
            images are segmented on a dask.distributed cluster (:mod:`.cluster`): ``""`` (or
            True) a ``LocalCluster`` of ``dask_workers`` processes, started and closed by the
            run; a scheduler address (``tcp://host:8786``); or a ``distributed.Client``
            (left open). The outputs are the same as this process would write.
        dask_workers: the LocalCluster's worker processes (default
            :func:`~sharp_fpn.utils.available_cpus`, at most the images to do).
        predictor_factory: with ``dask``, a picklable callable that builds the model in a
            worker (default: a :class:`~.cluster.PredictorSpec` of ``cfg``, ``weights``,
            ``device`` and the thresholds).
        large: every TIFF and OME-Zarr input through the large-image path (``--large``).
        large_threshold: megapixels per plane above which a TIFF or OME-Zarr input takes the
            large-image path without ``large`` (``--large-threshold``; :func:`route_of`).
        large_memory_mb: the label chunks the large-image path holds in memory at most
            (``--large-memory``; None: :data:`~.large.DEFAULT_LABEL_MEMORY_MB`); the others
            wait in a scratch folder in ``out_dir``. The results do not depend on it.

    **Large images** (:mod:`.large`): an input :func:`route_of` sends there is read window by
    window and written as it goes, in this process (with ``dask``, its tiles run on the
    workers, :func:`~.cluster.tile_mapper`): ``<stem>_labels.ome.zarr`` (an OME-Zarr folder,
    uint32 labels) instead of the label TIFF, ``<stem>_nuclei.csv``, ``--rois`` and
    ``--geojson`` as asked, no overlay; its ``summary.csv`` row says ``route`` ``large``.
    Its labels are the whole-image path's up to a renumbering (:mod:`.large`; at scale 1);
    its nuclei are rescaled by ``diameter``, or by a diameter estimated on up to 9 of its
    tiles (:func:`~.large.choose_scale`), with ``tile`` (``tile=0``: the model's
    :func:`default_tile`). A file of several
    planes sent there fails, naming it (the large path reads one 2-D image per file).

    Files of several planes (z-stacks, time series, multi-page TIFFs) are segmented plane by
    plane: plane ``k``'s outputs are named :func:`plane_stem` (``<stem>_z<k>_labels.tif``...)
    and it has its own ``summary.csv`` row (``plane`` column). Their names are checked when
    the file is read: one in the way (a file predict did not write, or another input's output)
    fails that file, before any of its outputs is written.

    Returns:
        The report; ``summary.csv`` in ``out_dir`` lists every input, failed ones included.

    Raises:
        ValueError: an option out of range (:func:`check_options`, ``large_threshold`` not
            > 0), a config, weights file or
            device that cannot be used (one line naming it), ``predictor`` with ``dask``, or
            ``dask`` without a weights file or ``predictor_factory``.
        OutputConflict: the output folder cannot be used, an output would replace a file
            predict did not write or an input, another run holds the folder.
        OSError: an output could not be written (the summary says what was done); with
            ``dask``, a scheduler that cannot be reached.
    """
    if predictor is not None:
        if dask is not None and dask is not False:
            raise ValueError("a model already built is not sent to Dask workers: give cfg and "
                             "weights (or predictor_factory) with dask")
        score_threshold = predictor.score_threshold
        min_kept_fraction = predictor.min_kept_fraction
    if dask is False:
        dask = None
    check_options(DEFAULT_TILE if tile is None else tile, overlap, score_threshold,
                  min_kept_fraction)
    if pixel_size is not None and not (0 < float(pixel_size) < float("inf")):
        raise ValueError(f"--pixel-size must be a number of micrometres > 0, got {pixel_size}")
    if isinstance(channel, int) and not isinstance(channel, bool) and channel < 0:
        raise ValueError(f"--channel must be an index >= 0 or a name, got {channel}")
    if dask is not None and weights is None and predictor_factory is None:
        raise ValueError("dask: the workers need a weights file (random weights would differ "
                         "from worker to worker)")
    if dask_workers is not None:
        worker_count(dask_workers)
    try:
        threshold_ok = float(large_threshold) > 0
    except (TypeError, ValueError):
        threshold_ok = False
    if not threshold_ok:  # NaN fails too
        raise ValueError(f"--large-threshold must be a number of megapixels > 0, got "
                         f"{large_threshold}")
    if large_memory_mb is not None and not float(large_memory_mb) > 0:  # NaN fails too
        raise ValueError(f"--large-memory must be a number of megabytes > 0, got "
                         f"{large_memory_mb}")
    outputs_asked = {"rois": bool(rois), "geojson": bool(geojson), "ome_tiff": bool(ome_tiff)}
    formats = {**outputs_asked, "channel": channel,
               "pixel_size": None if pixel_size is None else float(pixel_size)}
    found = expand_inputs([os.fspath(p) for p in inputs], outputs_of=TOOL)
    files = found.files
    stems = _output_stems(files)
    out = OutputDir(out_dir, TOOL, overwrite=overwrite, inputs=files)
    report = PredictionReport(out.folder, out.folder / SUMMARY_NAME,
                              skipped_outputs=list(found.skipped_outputs))
    routes: List[bool] = []
    route_notes: List[str] = []
    for path in files:  # from the headers: the output names are known before any work
        big, note = route_of(path, large, float(large_threshold))
        routes.append(big)
        if note:
            route_notes.append(note)
    with out.lock():
        _check_outputs(out, stems, outputs_asked, large=routes)
        for note in route_notes:
            _note(report, note)
        if ome_tiff and any(routes):
            _note(report, f"--ome-tiff: {sum(routes)} large image(s) get their labels as "
                          f"<stem>{LARGE_LABELS_SUFFIX} (OME-Zarr, with the pixel size) instead")
        if predictor is None:
            from ..d2.predictor import check_weights_file, load_config

            model_cfg = load_config(cfg)
            if weights is not None:
                weights = check_weights_file(weights)
        else:
            model_cfg, weights = predictor.cfg, predictor.weights
        trained_diameter = model_diameter(model_cfg)
        check_diameter(diameter, trained_diameter)
        if tile is None:
            tile = default_tile(model_cfg)
            check_options(tile, overlap, score_threshold, min_kept_fraction)
        if found.skipped_outputs:
            names = ", ".join(p.name for p in found.skipped_outputs[:3])
            more = ", ..." if len(found.skipped_outputs) > 3 else ""
            _note(report, f"{len(found.skipped_outputs)} file(s) left out of the inputs: "
                          f"outputs of an earlier predict run ({names}{more})")
        fingerprint_of = _settings(model_cfg, weights, tile, overlap, score_threshold,
                                   min_kept_fraction, stretch, diameter, formats)
        earlier = {} if redo else _earlier_rows(out)
        settings = ImageSettings(
            tile=tile, overlap=overlap, stretch=stretch, channel=channel,
            pixel_size=None if pixel_size is None else float(pixel_size), diameter=diameter,
            trained_diameter=trained_diameter, rois=bool(rois), geojson=bool(geojson),
            ome_tiff=bool(ome_tiff), allow_missing_chunks=bool(allow_missing_chunks),
            progress=progress and dask is None, debug=debug,
            large_tile=default_tile(model_cfg),
            large_memory_mb=None if large_memory_mb is None else float(large_memory_mb),
        )

        failed_inputs = [Failure(spec, f"{spec}: {reason}") for spec, reason in found.problems]
        report.failures.extend(failed_inputs)
        head = [{"image": f.image, "status": "failed", "error": f.reason} for f in failed_inputs]
        rows: List[List[Dict[str, Any]]] = []  # per image, one row per plane
        tasks: List[ImageTask] = []
        for i, (path, stem, big) in enumerate(zip(files, stems, routes)):
            task = ImageTask(i, path, stem, _fingerprint(fingerprint_of, path, big), big)
            before = earlier.get(task.fingerprint)
            if before and _still_done(before, stem, out, outputs_asked, big):
                rows.append([{**{k: row.get(k, "") for k in SUMMARY_COLUMNS},
                              "image": str(path), "status": "skipped (done)", "error": ""}
                             for row in before])
                report.skipped.append(path)
            else:
                rows.append([{"image": str(path), "status": "pending", "output_stem": stem}])
                tasks.append(task)

        if tasks and predictor is None and dask is None:
            from ..d2.predictor import NucleiPredictor

            predictor = NucleiPredictor(
                model_cfg, weights, device=device, score_threshold=score_threshold,
                min_kept_fraction=min_kept_fraction,
            )
        if tasks and tile:
            note = _large_tile_note(model_cfg, tile)
            if note:
                _note(report, note)

        writer = RunWriter(out, report, settings, head, rows, stems, routes)
        writer.write_summary()
        if dask is None:
            for task in tqdm(tasks, desc="nuclei", unit="image", disable=not progress):
                if task.large:
                    writer.run_large(task, predictor)
                    continue
                for event in segment_image(task, settings, predictor):
                    if not writer.accept(event):
                        break
        elif tasks:
            from .cluster import PredictorSpec, predict_on_cluster

            factory = predictor_factory or PredictorSpec(
                model_cfg, None if weights is None else str(weights), device,
                float(score_threshold), float(min_kept_fraction))
            predict_on_cluster(tasks, settings, factory, writer, dask=dask,
                               workers=dask_workers, progress=progress,
                               large_progress=progress)
            writer.sort_results()
    return report
