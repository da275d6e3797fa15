"""Outputs that open where biologists already work: Fiji/ImageJ ROIs, QuPath GeoJSON, OME-TIFF
labels, and measurements in micrometres.

* :func:`nucleus_outlines`: one closed outline per nucleus, traced between its pixels and the
  pixels around it (``skimage.measure.find_contours`` at level 0.5 on the nucleus' mask), in
  the image's pixel coordinates with the origin at the top-left *corner* of the top-left
  pixel, as ImageJ and QuPath place their ROIs: pixel ``(row, col)`` covers
  ``[col, col + 1) x [row, row + 1)``. A nucleus in several pieces is outlined by its longest
  contour; holes are not kept (the label image has them).
* :func:`write_roi_zip`: ``<stem>_rois.zip``, one ImageJ polygon ROI per nucleus (``roifile``),
  named by its label id (the zip entry ``<label>.roi``), as Fiji's ROI Manager opens it.
* :func:`write_geojson`: ``<stem>_nuclei.geojson``, a FeatureCollection QuPath imports
  (File > Import objects, or drag and drop): one Polygon feature per nucleus with
  ``properties.objectType = "detection"``, ``name`` = the label id, ``classification``
  ``{"name": "Nucleus", "color": [r, g, b]}``, and ``measurements``: the per-nucleus table's
  values (score, area, centroid, ..., and the micrometre columns when a pixel size is known).
* :func:`write_ome_labels`: ``<stem>_labels.ome.tif``, the uint16 label image as OME-TIFF with
  the pixel size (``PhysicalSizeX/Y`` in µm) when one is known.
* :func:`physical_columns`: area in µm², centroid in µm, equivalent diameter in µm.

Every file is written whole under a temporary name and renamed (:func:`sharp_fpn.utils.
atomic_write`). No torch, no detectron2.
"""
from __future__ import annotations

import io
import json
import math
import uuid
import zipfile
from typing import Any, Dict, List, Mapping, Optional, Sequence

import numpy as np
import tifffile
from skimage.measure import find_contours, regionprops

from ..utils import PathLike, atomic_write
from .image_io import PixelSize
from .outputs import MAX_LABELS, OUTLINE_COLOURS

__all__ = [
    "FEATURE_ID_NAMESPACE",
    "PHYSICAL_COLUMNS",
    "nucleus_outlines",
    "physical_columns",
    "qupath_measurements",
    "write_geojson",
    "write_ome_labels",
    "write_roi_zip",
]

#: Columns added to ``<stem>_nuclei.csv`` when the pixel size is known: the area in µm², the
#: centroid (the pixel columns' centroid times the pixel size) and the diameter of the disc
#: of the nucleus' area, in µm.
PHYSICAL_COLUMNS = ("area_um2", "centroid_y_um", "centroid_x_um", "equivalent_diameter_um")
#: The QuPath class of every nucleus.
QUPATH_CLASS = "Nucleus"
#: The namespace of the GeoJSON features' ids: ``uuid5(namespace, "<stem>/<label>")``, the same
#: id for the same nucleus of the same image on every run.
FEATURE_ID_NAMESPACE = uuid.UUID("0b1c6b52-5d0e-4c52-9a55-1f2a6c1e3f70")


def nucleus_outlines(labels: np.ndarray) -> Dict[int, np.ndarray]:
    """``{label: (N, 2) float array of (x, y) vertices}``, one open ring per nucleus (the
    last vertex is not the first repeated), in pixel-corner coordinates (module docstring)."""
    outlines: Dict[int, np.ndarray] = {}
    for region in regionprops(labels):
        top, left = region.bbox[:2]
        mask = np.pad(region.image, 1).astype(np.float32)
        contours = find_contours(mask, 0.5)
        if not contours:
            continue
        ring = max(contours, key=len)
        if len(ring) > 1 and np.array_equal(ring[0], ring[-1]):
            ring = ring[:-1]
        # padded crop (row, col) -> image pixel centres -> pixel-corner coordinates (x, y)
        rows = ring[:, 0] - 1 + top + 0.5
        cols = ring[:, 1] - 1 + left + 0.5
        outlines[int(region.label)] = np.stack([cols, rows], axis=1)
    return outlines


def physical_columns(row: Mapping[str, Any], pixel_size: PixelSize) -> Dict[str, float]:
    """:data:`PHYSICAL_COLUMNS` of one per-nucleus table row."""
    area = float(row["area"]) * pixel_size.x * pixel_size.y
    return {
        "area_um2": round(area, 4),
        "centroid_y_um": round(float(row["centroid_y"]) * pixel_size.y, 4),
        "centroid_x_um": round(float(row["centroid_x"]) * pixel_size.x, 4),
        "equivalent_diameter_um": round(2.0 * math.sqrt(area / math.pi), 4),
    }


def write_roi_zip(path: PathLike, outlines: Mapping[int, np.ndarray]) -> None:
    """Write one ImageJ polygon ROI per nucleus into a zip, as Fiji's ROI Manager saves
    them: entry ``<label>.roi``, ROI name ``<label>``, sub-pixel coordinates."""
    from roifile import ROI_TYPE, ImagejRoi

    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for label, points in outlines.items():
            roi = ImagejRoi.frompoints(np.asarray(points, dtype=np.float64), name=str(label))
            roi.roitype = ROI_TYPE.POLYGON
            archive.writestr(f"{label}.roi", roi.tobytes())
    with atomic_write(path, "wb") as f:
        f.write(buffer.getbuffer())


def qupath_measurements(row: Mapping[str, Any]) -> Dict[str, float]:
    """A table row's numeric, finite values but the label: a QuPath feature's measurements."""
    return {k: float(v) for k, v in row.items()
            if k != "label" and isinstance(v, (int, float)) and math.isfinite(float(v))}


def write_geojson(path: PathLike, outlines: Mapping[int, np.ndarray],
                  rows: Sequence[Mapping[str, Any]], stem: str = "") -> None:
    """Write the nuclei as a QuPath-ready GeoJSON FeatureCollection (module docstring).

    Args:
        outlines: :func:`nucleus_outlines`.
        rows: the per-nucleus table (its ``label`` column ties a row to an outline).
        stem: the output stem, seeding each feature's id (a UUID, the same on every run).
    """
    by_label = {int(r["label"]): r for r in rows}
    features: List[Dict[str, Any]] = []
    for label, points in outlines.items():
        ring = [[round(float(x), 3), round(float(y), 3)] for x, y in points]
        ring.append(ring[0])
        colour = OUTLINE_COLOURS[(label - 1) % len(OUTLINE_COLOURS)]
        features.append({
            "type": "Feature",
            "id": str(uuid.uuid5(FEATURE_ID_NAMESPACE, f"{stem}/{label}")),
            "geometry": {"type": "Polygon", "coordinates": [ring]},
            "properties": {
                "objectType": "detection",
                "name": str(label),
                "classification": {"name": QUPATH_CLASS,
                                   "color": [int(c) for c in colour]},
                "isLocked": False,
                "measurements": qupath_measurements(by_label.get(label, {})),
            },
        })
    text = json.dumps({"type": "FeatureCollection", "features": features})
    with atomic_write(path, "w", encoding="utf-8") as f:
        f.write(text)


def write_ome_labels(path: PathLike, labels: np.ndarray,
                     pixel_size: Optional[PixelSize] = None) -> None:
    """Write ``labels`` as a zlib-compressed uint16 OME-TIFF (axes ``YX``), with
    ``PhysicalSizeX/Y`` in µm when ``pixel_size`` is given.

    Raises:
        ValueError: labels below 0 or above :data:`MAX_LABELS` (the message names ``path``).
    """
    if labels.size and (labels.min() < 0 or labels.max() > MAX_LABELS):
        raise ValueError(f"{path}: labels span {labels.min()}..{labels.max()}; a uint16 label "
                         f"image holds 0..{MAX_LABELS}")
    metadata: Dict[str, Any] = {"axes": "YX", "Name": "nuclei labels"}
    if pixel_size is not None:
        metadata.update(PhysicalSizeX=pixel_size.x, PhysicalSizeXUnit="µm",
                        PhysicalSizeY=pixel_size.y, PhysicalSizeYUnit="µm")
    buffer = io.BytesIO()
    tifffile.imwrite(buffer, labels.astype(np.uint16), ome=True, photometric="minisblack",
                     compression="zlib", metadata=metadata)
    with atomic_write(path, "wb") as f:
        f.write(buffer.getbuffer())
