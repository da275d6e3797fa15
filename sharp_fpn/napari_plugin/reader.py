"""The napari reader of ``tools/predict.py``'s outputs.

What it opens (:func:`get_reader`; anything else is left to other readers):

* a **predict output folder** (its ``summary.csv`` on predict's record, :mod:`sharp_fpn.outdir`):
  every image (and plane) the summary lists as done, each as its two layers below, in the
  summary's order;
* ``<stem>_labels.tif`` / ``<stem>_labels.ome.tif``: a Labels layer ``<stem>_labels``, read by
  :func:`sharp_fpn.predict.image_io.read_planes` (tifffile), its ``scale`` the pixel size in µm
  (y, x) when the file says it (OME ``PhysicalSizeX/Y``, ImageJ resolution), else 1;
* ``<stem>_nuclei.csv``: a Points layer ``<stem>_nuclei`` at the nuclei's centroids (pixel
  columns ``centroid_y``, ``centroid_x``), every column as ``features``, the points the
  median equivalent diameter of the nuclei across; its scale that of the label image beside
  it (``<stem>_labels.ome.tif`` or ``.tif``), else the summary's pixel size, else 1.

So a label image and its table opened together lie on each other, in µm when the pixel size is
known. A file that cannot be read raises one line naming it (and the CSV line and column);
nothing is written.
"""
from __future__ import annotations

import csv
import math
import os
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

__all__ = [
    "LABEL_SUFFIXES",
    "TABLE_SUFFIX",
    "get_reader",
    "read_labels",
    "read_output_folder",
    "read_paths",
    "read_table",
]

#: The label images predict writes (``--ome-tiff``: the first).
LABEL_SUFFIXES = ("_labels.ome.tif", "_labels.tif")
#: The per-nucleus table predict writes.
TABLE_SUFFIX = "_nuclei.csv"
_DONE = ("ok", "skipped (done)")
_INTEGER_COLUMNS = {"label", "area", "bbox_min_row", "bbox_min_col", "bbox_max_row",
                    "bbox_max_col"}

LayerData = Tuple[Any, Dict[str, Any], str]
PathOrPaths = Union[str, os.PathLike, Sequence[Union[str, os.PathLike]]]


def _stem(path: Path) -> Optional[str]:
    name = path.name
    for suffix in LABEL_SUFFIXES + (TABLE_SUFFIX,):
        if name.lower().endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)]
    return None


def _is_output_folder(path: Path) -> bool:
    from ..outdir import recorded_outputs
    from ..predict.run import SUMMARY_NAME, TOOL

    return path.is_dir() and (path / SUMMARY_NAME).is_file() and \
        SUMMARY_NAME in recorded_outputs(path, TOOL)


def _ours(path: Union[str, os.PathLike]) -> bool:
    path = Path(path)
    return _is_output_folder(path) if path.is_dir() else _stem(path) is not None


def get_reader(path: PathOrPaths) -> Optional[Callable[[PathOrPaths], List[LayerData]]]:
    """napari's reader hook: :func:`read_paths` when every path is one of predict's outputs
    (module docstring), else None."""
    paths = [path] if isinstance(path, (str, os.PathLike)) else list(path)
    if paths and all(_ours(p) for p in paths):
        return read_paths
    return None


def read_paths(path: PathOrPaths) -> List[LayerData]:
    """The layers of each path (a predict output folder, a label image, a table), in order."""
    paths = [path] if isinstance(path, (str, os.PathLike)) else list(path)
    layers: List[LayerData] = []
    for p in map(Path, paths):
        if p.is_dir():
            layers.extend(read_output_folder(p))
        elif p.name.lower().endswith(TABLE_SUFFIX):
            layers.append(read_table(p))
        else:
            layers.append(read_labels(p))
    return layers


def _pixel_scale(size) -> Tuple[float, float]:
    return (1.0, 1.0) if size is None else (float(size.y), float(size.x))


def _labels_file(folder: Path, stem: str) -> Optional[Path]:
    for suffix in LABEL_SUFFIXES:
        if (folder / f"{stem}{suffix}").is_file():
            return folder / f"{stem}{suffix}"
    return None


def read_labels(path: Union[str, os.PathLike]) -> LayerData:
    """A label image as a Labels layer ``<stem>_labels``, its scale the file's pixel size.

    Raises:
        sharp_fpn.predict.image_io.ImageReadError: the file cannot be read (naming it).
        ValueError: it is not an integer gray image (naming it).
    """
    from ..predict.image_io import read_planes

    path = Path(path)
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
        beside = _labels_file(path.parent, stem)
        scale = (1.0, 1.0)
        if beside is not None:
            from ..predict.image_io import read_planes

            scale = _pixel_scale(read_planes(beside).pixel_size)
    areas = features.get("area")
    size = (float(np.median(2.0 * np.sqrt(areas / np.pi))) if areas is not None and areas.size
            else 10.0)
    kwargs = {"name": f"{stem}_nuclei", "features": features, "scale": tuple(scale),
              "size": max(size, 1.0), "face_color": "transparent", "border_color": "yellow",
              "border_width": 0.08, "metadata": {"sharp_fpn": {"file": str(path)}}}
    return points, kwargs, "points"


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


def read_output_folder(folder: Union[str, os.PathLike]) -> List[LayerData]:
    """The layers of every image a predict output folder's ``summary.csv`` lists as done:
    for each, its Labels layer then its Points layer.

    Raises:
        ValueError: the summary cannot be read, or an image it lists as done lacks its label
            image or table (naming the file).
    """
    folder = Path(folder)
    layers: List[LayerData] = []
    for n, row in enumerate(_summary_rows(folder), start=2):
        if row.get("status") not in _DONE or not row.get("output_stem"):
            continue
        stem = row["output_stem"]
        labels_file = _labels_file(folder, stem)
        table_file = folder / f"{stem}{TABLE_SUFFIX}"
        for wanted, found in ((folder / f"{stem}{LABEL_SUFFIXES[1]}", labels_file),
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
    return layers
