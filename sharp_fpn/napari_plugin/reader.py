"""The napari reader of ``tools/predict.py``'s outputs.

What it opens (:func:`get_reader`; anything else is left to other readers):

* a **predict output folder** (its ``summary.csv`` on predict's record, :mod:`sharp_fpn.outdir`):
  every image (and plane) the summary lists as done, each as its Labels and Points layers
  below, in the summary's order; then the outlines of each of those images that has
  ``<stem>_nuclei.geojson`` (else ``<stem>_rois.zip``) beside it and at most
  :data:`FOLDER_OUTLINES_LIMIT` nuclei (the summary's ``nuclei`` column), as one Shapes layer
  each, in the same order. More outlines are left out of a folder on purpose: napari builds a
  polygon in about a millisecond, so a slide's 700,000 would take minutes; open the file
  itself to see them anyway;
* ``<stem>_labels.tif`` / ``<stem>_labels.ome.tif``: a Labels layer ``<stem>_labels``, read by
  :func:`sharp_fpn.predict.image_io.read_planes` (tifffile), its ``scale`` the pixel size in µm
  (y, x) when the file says it (OME ``PhysicalSizeX/Y``, ImageJ resolution), else 1;
* ``<stem>_labels.ome.zarr`` (the large-image path's OME-Zarr folder, :mod:`sharp_fpn.predict.
  large`): a Labels layer ``<stem>_labels`` that is **not read into memory**: napari gets the
  ``zarr`` array of the first ``multiscales`` level, opened read-only, and reads only the
  chunks it shows (a chunk absent from the store, as all-zero chunks may be, reads as 0,
  zarr's fill value). A side over :data:`PYRAMID_ABOVE` px gets a multiscale layer:
  the array, then views of every 2nd, 4th, ... pixel of it (:class:`Subsampled`, read by
  zarr's strided reads, no copy) down to one of at most 1024 px a side, since napari shows a
  single-scale 2-D layer by reading all of it. Its scale is the ``scale`` transform in µm
  where the axes give a unit (:func:`~sharp_fpn.predict.image_io.zarr_header`), else 1;
* ``<stem>_nuclei.csv``: a Points layer ``<stem>_nuclei`` at the nuclei's centroids (pixel
  columns ``centroid_y``, ``centroid_x``), every column as ``features``, the points the
  median equivalent diameter of the nuclei across;
* ``<stem>_nuclei.geojson`` (QuPath FeatureCollection, :func:`sharp_fpn.predict.formats.
  write_geojson`): a Shapes layer ``<stem>_outlines``, one polygon per feature (its exterior
  ring; holes are dropped), ``features`` the feature's ``name`` (and ``label``, when every name
  is an integer) and its ``measurements`` (QuPath's object, or the list of name/value pairs of
  older versions; NaN where a feature lacks one or has null), the edges in the features'
  ``classification`` colours when every feature has one (else yellow), the faces transparent;
* ``<stem>_rois.zip`` (Fiji ROI zip, :func:`sharp_fpn.predict.formats.write_roi_zip`): a Shapes
  layer ``<stem>_rois``, one polygon per ROI (``roifile``'s ``ImagejRoi.coordinates()``),
  ``features`` the ROI's ``name`` (and ``label``, as above), yellow edges.

A table's or outlines' scale is that of the label image beside it (``<stem>_labels.ome.tif``,
``.tif`` or ``.ome.zarr``; the Zarr's from its metadata alone), else the summary's pixel size
(in a folder), else 1. Outlines are stored with the origin at the top-left corner of the
top-left pixel; napari puts pixel centres on integer coordinates, so the vertices are moved
by -0.5 px (and given as (y, x)) to lie on the label image's pixels.

So a label image, its table and its outlines opened together lie on each other, in µm when the
pixel size is known. A file that cannot be read raises one line naming it and the problem
(the CSV line and column, the GeoJSON feature, the zip entry); nothing is written.
"""
from __future__ import annotations

import csv
import json
import math
import os
import zipfile
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

__all__ = [
    "FOLDER_OUTLINES_LIMIT",
    "GEOJSON_SUFFIX",
    "LABEL_SUFFIXES",
    "LARGE_LABELS_SUFFIX",
    "PYRAMID_ABOVE",
    "ROIS_SUFFIX",
    "Subsampled",
    "TABLE_SUFFIX",
    "get_reader",
    "read_geojson",
    "read_labels",
    "read_output_folder",
    "read_paths",
    "read_rois",
    "read_table",
    "read_zarr_labels",
]

#: The label images predict writes (``--ome-tiff``: the first).
LABEL_SUFFIXES = ("_labels.ome.tif", "_labels.tif")
#: The label image of the large-image path (an OME-Zarr folder).
LARGE_LABELS_SUFFIX = "_labels.ome.zarr"
#: The per-nucleus table predict writes.
TABLE_SUFFIX = "_nuclei.csv"
#: The outlines predict writes with ``--geojson`` (QuPath) and ``--rois`` (Fiji).
GEOJSON_SUFFIX = "_nuclei.geojson"
ROIS_SUFFIX = "_rois.zip"
#: A folder opens an image's outlines only when it has at most this many nuclei.
FOLDER_OUTLINES_LIMIT = 5000
#: An OME-Zarr label image with a side longer than this (px) opens as a multiscale layer.
PYRAMID_ABOVE = 4096
_PYRAMID_SMALLEST = 1024  # the coarsest level's longest side is at most this (px)
_DONE = ("ok", "skipped (done)")
_INTEGER_COLUMNS = {"label", "area", "bbox_min_row", "bbox_min_col", "bbox_max_row",
                    "bbox_max_col"}
_EDGE = "yellow"

LayerData = Tuple[Any, Dict[str, Any], str]
PathOrPaths = Union[str, os.PathLike, Sequence[Union[str, os.PathLike]]]


def _stem(path: Path) -> Optional[str]:
    name = path.name
    for suffix in LABEL_SUFFIXES + (LARGE_LABELS_SUFFIX, TABLE_SUFFIX, GEOJSON_SUFFIX,
                                    ROIS_SUFFIX):
        if name.lower().endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)]
    return None


def _is_output_folder(path: Path) -> bool:
    from ..outdir import recorded_outputs
    from ..predict.run import SUMMARY_NAME, TOOL

    return path.is_dir() and (path / SUMMARY_NAME).is_file() and \
        SUMMARY_NAME in recorded_outputs(path, TOOL)


def _is_zarr_labels(path: Path) -> bool:
    return path.name.lower().endswith(LARGE_LABELS_SUFFIX) and _stem(path) is not None


def _ours(path: Union[str, os.PathLike]) -> bool:
    path = Path(path)
    if path.is_dir():
        return _is_zarr_labels(path) or _is_output_folder(path)
    return _stem(path) is not None and not _is_zarr_labels(path)


def get_reader(path: PathOrPaths) -> Optional[Callable[[PathOrPaths], List[LayerData]]]:
    """napari's reader hook: :func:`read_paths` when every path is one of predict's outputs
    (module docstring), else None."""
    paths = [path] if isinstance(path, (str, os.PathLike)) else list(path)
    if paths and all(_ours(p) for p in paths):
        return read_paths
    return None


def read_paths(path: PathOrPaths) -> List[LayerData]:
    """The layers of each path (a predict output folder, a label image, a table, outlines), in
    order."""
    paths = [path] if isinstance(path, (str, os.PathLike)) else list(path)
    layers: List[LayerData] = []
    for p in map(Path, paths):
        name = p.name.lower()
        if p.is_dir() and not _is_zarr_labels(p):
            layers.extend(read_output_folder(p))
        elif name.endswith(TABLE_SUFFIX):
            layers.append(read_table(p))
        elif name.endswith(GEOJSON_SUFFIX):
            layers.append(read_geojson(p))
        elif name.endswith(ROIS_SUFFIX):
            layers.append(read_rois(p))
        elif name.endswith(LARGE_LABELS_SUFFIX):
            layers.append(read_zarr_labels(p))
        else:
            layers.append(read_labels(p))
    return layers


def _pixel_scale(size) -> Tuple[float, float]:
    return (1.0, 1.0) if size is None else (float(size.y), float(size.x))


def _labels_file(folder: Path, stem: str) -> Optional[Path]:
    for suffix in LABEL_SUFFIXES:
        if (folder / f"{stem}{suffix}").is_file():
            return folder / f"{stem}{suffix}"
    if (folder / f"{stem}{LARGE_LABELS_SUFFIX}").is_dir():
        return folder / f"{stem}{LARGE_LABELS_SUFFIX}"
    return None


def _beside_scale(path: Path) -> Tuple[float, float]:
    """The pixel size (y, x) of the label image beside a table or outlines file, else 1."""
    beside = _labels_file(path.parent, _stem(path) or path.stem)
    if beside is None:
        return (1.0, 1.0)
    if beside.is_dir():
        return _pixel_scale(_zarr_header(beside).pixel_size)
    from ..predict.image_io import read_planes

    return _pixel_scale(read_planes(beside).pixel_size)


def read_labels(path: Union[str, os.PathLike]) -> LayerData:
    """A label image as a Labels layer ``<stem>_labels``, its scale the file's pixel size
    (an OME-Zarr folder: :func:`read_zarr_labels`).

    Raises:
        sharp_fpn.predict.image_io.ImageReadError: the file cannot be read (naming it).
        ValueError: it is not an integer gray image (naming it).
    """
    from ..predict.image_io import read_planes

    path = Path(path)
    if _is_zarr_labels(path):
        return read_zarr_labels(path)
    planes = read_planes(path)
    pixels = planes.pixels
    if planes.colour != "gray" or pixels.dtype.kind not in "ui":
        raise ValueError(f"{path}: not a label image ({planes.colour} {pixels.dtype} samples; "
                         f"expected integer gray labels)")
    labels = pixels[0] if planes.count == 1 else pixels
    scale = _pixel_scale(planes.pixel_size)
    if labels.ndim == 3:
        scale = (1.0,) + scale
    stem = _stem(path) or path.stem
    metadata = {"sharp_fpn": {"file": str(path), "pixel_size_um": None if planes.pixel_size
                              is None else scale[-2:]}}
    return labels, {"name": f"{stem}_labels", "scale": scale, "metadata": metadata}, "labels"


class Subsampled:
    """Every ``factor``-th row and column of a 2-D zarr array, read lazily: indexing it reads
    those pixels of the array's chunks (zarr's strided read), nothing is held. A level of a
    label image's multiscale layer (nearest pixels: no label is averaged into another).

    Attributes:
        array: the full-resolution zarr array; factor; shape (``ceil(side / factor)``); dtype;
        ndim.
    """

    def __init__(self, array: Any, factor: int) -> None:
        self.array = array
        self.factor = int(factor)
        self.shape = tuple(-(-int(n) // self.factor) for n in array.shape)
        self.dtype = np.dtype(array.dtype)
        self.ndim = len(self.shape)
        self.size = int(np.prod(self.shape, dtype=np.int64))

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, key: Any) -> np.ndarray:
        key = key if isinstance(key, tuple) else (key,)
        if any(k is Ellipsis for k in key):
            at = next(i for i, k in enumerate(key) if k is Ellipsis)
            key = key[:at] + (slice(None),) * (self.ndim - len(key) + 1) + key[at + 1:]
        key = key + (slice(None),) * (self.ndim - len(key))
        if len(key) != self.ndim:
            raise IndexError(f"{len(key)} indices for a {self.ndim}-D array")
        full, flips = [], []
        for k, n in zip(key, self.shape):
            if isinstance(k, slice):
                start, stop, step = k.indices(n)
                if step < 0:  # read forwards, then flip
                    count = len(range(start, stop, step))
                    start, stop, step = start + step * (count - 1), start + 1, -step
                    flips.append(len(full))
                full.append(slice(start * self.factor, stop * self.factor, step * self.factor))
            else:
                index = int(k)
                if not -n <= index < n:
                    raise IndexError(f"index {index} is out of bounds for a side of {n}")
                full.append((index % n) * self.factor)
        data = np.asarray(self.array[tuple(full)])
        kept = [i for i, k in enumerate(full) if isinstance(k, slice)]
        for axis in flips:
            data = np.flip(data, axis=kept.index(axis))
        return data

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        data = self[...]
        return data if dtype is None else data.astype(dtype)


def _zarr_header(path: Path):
    """:func:`~sharp_fpn.predict.image_io.zarr_header`, any error as one line naming the
    folder."""
    from ..predict.image_io import ImageReadError, zarr_header

    try:
        return zarr_header(path)
    except ImageReadError:
        raise
    except Exception as e:  # zarr, numcodecs and json raise many types
        raise ImageReadError(f"{path}: not a readable OME-Zarr image ({type(e).__name__}: "
                             f"{' '.join(str(e).split())})") from e


def read_zarr_labels(path: Union[str, os.PathLike]) -> LayerData:
    """An OME-Zarr label image as a Labels layer ``<stem>_labels`` read lazily (module
    docstring): its data the zarr array of the first multiscales level (opened read-only),
    or, with a side over :data:`PYRAMID_ABOVE` px, that array then :class:`Subsampled` views
    of it (``multiscale``); its scale the ``scale`` transform in µm, else 1.

    Raises:
        sharp_fpn.predict.image_io.ImageReadError: the folder is not a readable OME-Zarr
            (no multiscales metadata, no array), or not a 2-D (y, x) image of integer labels
            (naming it).
    """
    from ..predict.image_io import ImageReadError

    path = Path(path)
    head = _zarr_header(path)
    array = head.array
    if head.axes != "YX" or np.dtype(array.dtype).kind not in "ui":
        raise ImageReadError(f"{path}: not a label image (axes {head.axes}, "
                             f"{np.dtype(array.dtype)} samples; expected 2-D (y, x) integer "
                             f"labels)")
    scale = _pixel_scale(head.pixel_size)
    data: Any = array
    kwargs: Dict[str, Any] = {}
    if max(array.shape) > PYRAMID_ABOVE:
        levels, factor = [array], 2
        while -(-max(array.shape) // (factor // 2)) > _PYRAMID_SMALLEST:
            levels.append(Subsampled(array, factor))
            factor *= 2
        data, kwargs = levels, {"multiscale": True}
    stem = _stem(path) or path.stem
    metadata = {"sharp_fpn": {"file": str(path), "pixel_size_um": None if head.pixel_size
                              is None else scale}}
    return data, {"name": f"{stem}_labels", "scale": scale, "metadata": metadata,
                  **kwargs}, "labels"


def _number(path: Path, line: int, column: str, text: str) -> float:
    try:
        value = float(text)
    except (TypeError, ValueError):
        raise ValueError(f"{path}, line {line}: column {column}: {text!r} is not a "
                         f"number") from None
    if not math.isfinite(value):
        raise ValueError(f"{path}, line {line}: column {column}: {text!r} is not a finite "
                         f"number")
    return value


def read_table(path: Union[str, os.PathLike],
               scale: Optional[Tuple[float, float]] = None) -> LayerData:
    """A per-nucleus table as a Points layer ``<stem>_nuclei`` (module docstring).

    Args:
        path: ``<stem>_nuclei.csv``.
        scale: the layer's (y, x) scale; None: the pixel size of the label image beside it,
            else 1.

    Raises:
        ValueError: the file cannot be read, lacks a column the points need, or has a value
            that is not a number (naming the file, the line and the column).
    """
    path = Path(path)
    try:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            columns = list(reader.fieldnames or [])
            rows = list(reader)
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise ValueError(f"{path}: not a readable CSV table ({e})") from None
    missing = [c for c in ("label", "centroid_y", "centroid_x") if c not in columns]
    if missing:
        raise ValueError(f"{path}: not a sharp-fpn nuclei table (no column "
                         f"{', '.join(missing)}; expected tools/predict.py's <stem>_nuclei.csv)")
    features: Dict[str, np.ndarray] = {}
    for column in columns:
        values = [_number(path, n, column, row.get(column)) for n, row in
                  enumerate(rows, start=2)]
        kind = np.int64 if column in _INTEGER_COLUMNS else np.float64
        features[column] = np.array(values, dtype=kind)
    points = np.column_stack([features["centroid_y"], features["centroid_x"]]) if rows \
        else np.zeros((0, 2))
    stem = _stem(path) or path.stem
    if scale is None:
        scale = _beside_scale(path)
    areas = features.get("area")
    size = (float(np.median(2.0 * np.sqrt(areas / np.pi))) if areas is not None and areas.size
            else 10.0)
    kwargs = {"name": f"{stem}_nuclei", "features": features, "scale": tuple(scale),
              "size": max(size, 1.0), "face_color": "transparent", "border_color": "yellow",
              "border_width": 0.08, "metadata": {"sharp_fpn": {"file": str(path)}}}
    return points, kwargs, "points"


def _polygon(ring: Any) -> Optional[np.ndarray]:
    """``(N, 2)`` napari (y, x) vertices of an (x, y) pixel-corner ring (module docstring),
    the closing vertex dropped; None when it is not a ring of at least 3 finite points."""
    try:
        points = np.asarray(ring, dtype=np.float64)
    except (TypeError, ValueError):
        return None
    if points.ndim != 2 or points.shape[1] != 2 or not np.isfinite(points).all():
        return None
    if len(points) > 1 and np.array_equal(points[0], points[-1]):
        points = points[:-1]
    if len(points) < 3:
        return None
    return points[:, ::-1] - 0.5


def _name_features(names: List[str]) -> Dict[str, np.ndarray]:
    """``name`` (strings) and, when every name is an integer (predict's label ids),
    ``label``."""
    features: Dict[str, np.ndarray] = {"name": np.array(names, dtype=object)}
    try:
        labels = [int(n) for n in names]
    except ValueError:
        return features
    if names:
        features["label"] = np.array(labels, dtype=np.int64)
    return features


def _measurement_dict(path: Path, n: int, values: Any) -> Dict[str, Any]:
    """A feature's measurements: QuPath's object ``{name: value}``, or the list of
    ``{"name": ..., "value": ...}`` older QuPath versions write."""
    if values is None:
        return {}
    if isinstance(values, dict):
        return values
    if isinstance(values, list) and all(isinstance(v, dict) and "name" in v and "value" in v
                                        for v in values):
        return {str(v["name"]): v["value"] for v in values}
    raise ValueError(f"{path}: feature {n}: its measurements are neither an object nor a list "
                     f"of name/value pairs")


def _shapes(path: Path, polygons: List[np.ndarray], features: Dict[str, np.ndarray],
            edges: Any, name: str, scale: Optional[Tuple[float, float]]) -> LayerData:
    if scale is None:
        scale = _beside_scale(path)
    kwargs = {"name": name, "shape_type": "polygon", "features": features,
              "scale": tuple(scale), "edge_color": edges, "face_color": "transparent",
              "edge_width": 1.0, "metadata": {"sharp_fpn": {"file": str(path)}}}
    return polygons, kwargs, "shapes"


def read_geojson(path: Union[str, os.PathLike],
                 scale: Optional[Tuple[float, float]] = None) -> LayerData:
    """QuPath GeoJSON detections as a Shapes layer ``<stem>_outlines`` (module docstring).

    Args:
        path: ``<stem>_nuclei.geojson``: a FeatureCollection of Polygon features, coordinates
            (x, y) in pixels.
        scale: the layer's (y, x) scale; None: the pixel size of the label image beside it,
            else 1.

    Raises:
        ValueError: the file is not JSON, not a FeatureCollection, or holds a feature that is
            not a Polygon of (x, y) numbers (naming the file and the feature's index).
    """
    path = Path(path)
    try:
        with open(path, encoding="utf-8") as f:
            collection = json.load(f)
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise ValueError(f"{path}: not a readable GeoJSON file ({type(e).__name__}: "
                         f"{' '.join(str(e).split())})") from None
    kind = collection.get("type") if isinstance(collection, dict) else type(collection).__name__
    items = collection.get("features") if isinstance(collection, dict) else None
    if kind != "FeatureCollection" or not isinstance(items, list):
        raise ValueError(f"{path}: not a GeoJSON FeatureCollection (type {kind!r}; expected "
                         f"tools/predict.py's <stem>_nuclei.geojson)")
    polygons: List[np.ndarray] = []
    names: List[str] = []
    measured: List[Dict[str, Any]] = []
    colours: List[Optional[Any]] = []
    for n, feature in enumerate(items):
        geometry = feature.get("geometry") if isinstance(feature, dict) else None
        shape = geometry.get("type") if isinstance(geometry, dict) else None
        if shape != "Polygon":
            raise ValueError(f"{path}: feature {n} is {shape or 'no geometry'}, not a Polygon "
                             f"(one Polygon detection per nucleus is read)")
        rings = geometry.get("coordinates")
        polygon = _polygon(rings[0]) if isinstance(rings, list) and rings else None
        if polygon is None:
            raise ValueError(f"{path}: feature {n}: its Polygon's coordinates are not a ring "
                             f"of at least 3 (x, y) numbers")
        properties = feature.get("properties")
        properties = properties if isinstance(properties, dict) else {}
        polygons.append(polygon)
        names.append(str(properties.get("name", "")))
        measured.append(_measurement_dict(path, n, properties.get("measurements")))
        classification = properties.get("classification")
        colours.append(classification.get("color") if isinstance(classification, dict)
                       else None)
    features = _name_features(names)
    columns: Dict[str, str] = {}  # measurement -> its column (not the name's or label's)
    for row in measured:
        for key in row:
            if key not in columns:
                column = key if key not in ("name", "label") else f"measurement {key}"
                columns[key] = column
                features[column] = np.full(len(measured), np.nan)
    for k, row in enumerate(measured):
        for key, value in row.items():
            if value is None:  # a measurement QuPath could not take: NaN
                continue
            try:
                features[columns[key]][k] = float(value)
            except (TypeError, ValueError):
                raise ValueError(f"{path}: feature {k}: measurement {key!r} is {value!r}, not "
                                 f"a number") from None
    edges: Any = _EDGE
    if colours and all(isinstance(c, list) and len(c) == 3 for c in colours):
        try:
            rgb = np.asarray(colours, dtype=np.float64) / 255.0
        except (TypeError, ValueError):
            rgb = None
        if rgb is not None and np.isfinite(rgb).all():
            edges = np.column_stack([np.clip(rgb, 0.0, 1.0), np.ones(len(rgb))])
    stem = _stem(path) or path.stem
    return _shapes(path, polygons, features, edges, f"{stem}_outlines", scale)


def read_rois(path: Union[str, os.PathLike],
              scale: Optional[Tuple[float, float]] = None) -> LayerData:
    """A Fiji ROI zip as a Shapes layer ``<stem>_rois`` (module docstring): each entry read by
    ``roifile`` (``ImagejRoi.frombytes``), its ``coordinates()`` (x, y, pixels) the polygon.

    Args:
        path: ``<stem>_rois.zip``.
        scale: the layer's (y, x) scale; None: the pixel size of the label image beside it,
            else 1.

    Raises:
        ValueError: the file is not a zip, or an entry is not an ImageJ ROI with an outline of
            at least 3 points (naming the file and the entry).
    """
    from roifile import ImagejRoi

    path = Path(path)
    polygons: List[np.ndarray] = []
    names: List[str] = []
    try:
        archive = zipfile.ZipFile(path)
    except (OSError, zipfile.BadZipFile) as e:
        raise ValueError(f"{path}: not a zip of ImageJ ROIs ({type(e).__name__}: "
                         f"{' '.join(str(e).split())})") from None
    with archive:
        for entry in archive.namelist():
            try:
                roi = ImagejRoi.frombytes(archive.read(entry))
                polygon = _polygon(roi.coordinates())
            except Exception as e:  # zipfile, zlib and roifile raise many types
                raise ValueError(f"{path}: entry {entry}: not an ImageJ ROI "
                                 f"({type(e).__name__}: {' '.join(str(e).split())})") from None
            if polygon is None:
                raise ValueError(f"{path}: entry {entry}: an ImageJ ROI without an outline of "
                                 f"at least 3 points")
            polygons.append(polygon)
            names.append(str(roi.name or Path(entry).stem))
    stem = _stem(path) or path.stem
    return _shapes(path, polygons, _name_features(names), _EDGE, f"{stem}_rois", scale)


def _summary_rows(folder: Path) -> List[Dict[str, str]]:
    from ..predict.run import SUMMARY_NAME

    path = folder / SUMMARY_NAME
    try:
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise ValueError(f"{path}: not a readable predict summary ({e})") from None
    if rows and "output_stem" not in rows[0]:
        raise ValueError(f"{path}: not a predict summary (no output_stem column)")
    return rows


def read_output_folder(folder: Union[str, os.PathLike],
                       outlines_limit: int = FOLDER_OUTLINES_LIMIT) -> List[LayerData]:
    """The layers of every image a predict output folder's ``summary.csv`` lists as done:
    for each, its Labels layer then its Points layer; then, for each with at most
    ``outlines_limit`` nuclei (the summary's ``nuclei``), a Shapes layer of its
    ``<stem>_nuclei.geojson``, else of its ``<stem>_rois.zip``, where one is there. An image
    the summary says took the large-image path (``route`` ``large``) has its labels in
    ``<stem>_labels.ome.zarr``, read lazily.

    Raises:
        ValueError: the summary cannot be read, an image it lists as done lacks its label
            image or table, or a file cannot be read (naming the file).
    """
    folder = Path(folder)
    layers: List[LayerData] = []
    outlines: List[Tuple[Path, Tuple[float, float]]] = []
    for n, row in enumerate(_summary_rows(folder), start=2):
        if row.get("status") not in _DONE or not row.get("output_stem"):
            continue
        stem = row["output_stem"]
        labels_file = _labels_file(folder, stem)
        table_file = folder / f"{stem}{TABLE_SUFFIX}"
        expected = LARGE_LABELS_SUFFIX if row.get("route") == "large" else LABEL_SUFFIXES[1]
        for wanted, found in ((folder / f"{stem}{expected}", labels_file),
                              (table_file, table_file if table_file.is_file() else None)):
            if found is None:
                raise ValueError(f"{wanted}: missing, though summary.csv line {n} says "
                                 f"{row.get('image')} is done")
        labels = read_labels(labels_file)
        scale = labels[1]["scale"][-2:]
        if labels[1]["metadata"]["sharp_fpn"]["pixel_size_um"] is None:
            try:  # the pixel size the run knew (the input's, or --pixel-size)
                scale = (float(row["pixel_size_y_um"]), float(row["pixel_size_x_um"]))
            except (KeyError, TypeError, ValueError):
                pass
            labels[1]["scale"] = labels[1]["scale"][:-2] + tuple(scale)
        layers.append(labels)
        layers.append(read_table(table_file, scale))
        try:
            nuclei = int(row.get("nuclei") or "")
        except ValueError:
            continue  # no count to go by: left out, as a large count is
        for suffix in (GEOJSON_SUFFIX, ROIS_SUFFIX):
            if nuclei <= outlines_limit and (folder / f"{stem}{suffix}").is_file():
                outlines.append((folder / f"{stem}{suffix}", tuple(scale)))
                break
    for path, scale in outlines:
        read = read_geojson if path.name.endswith(GEOJSON_SUFFIX) else read_rois
        layers.append(read(path, scale))
    return layers
