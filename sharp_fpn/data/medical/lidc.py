"""LIDC-IDRI: CT series in DICOM and the radiologists' XML nodule outlines, to 2-D nodule slices.

The layout TCIA ships (and pylidc reads)::

    <root>/LIDC-IDRI-<nnnn>/<study>/<series>/*.dcm     one CT series, slices in any file order
    <root>/LIDC-IDRI-<nnnn>/<study>/<series>/*.xml     the readers' XML beside its slices

Reading a series (:func:`read_series`). Every ``.dcm`` of a folder is read with pydicom and the
slices are grouped by ``SeriesInstanceUID``. Within a series they are ordered by their
position along the slice normal: ``ImagePositionPatient`` projected on the cross product of the
two directions of ``ImageOrientationPatient`` -- never by file name or ``InstanceNumber``. Two
slices at the same position (within 0.01 mm) are a duplicated slice, and a step larger than
1.5 times the median step is a missing slice: both are refused with the folder and the slices
named. Pixels become HU with ``RescaleSlope`` and ``RescaleIntercept``; the pixel size is
``PixelSpacing`` (row, column), the slice step the median of the steps. All slices must share
the size, ``PixelSpacing`` and ``ImageOrientationPatient``.

Reading the XML (:func:`read_readings`). LIDC's format, namespace ``http://www.nih.gov``, read
with :mod:`xml.etree.ElementTree`: a ``LidcReadMessage`` root (other roots, the chest
radiograph readings' ``IdriReadMessage``, are not CT readings and are passed over), one
``readingSession`` per reader, each ``unblindedReadNodule`` a ``noduleID`` and its ``roi``
outlines: ``imageZposition``, ``imageSOP_UID``, ``inclusion`` (TRUE/FALSE) and the ``edgeMap``
points ``xCoord`` (column) and ``yCoord`` (row). An outline belongs to the slice with its
``imageSOP_UID``, or else to the slice whose ``ImagePositionPatient`` z is its
``imageZposition``. Skipped, and counted in dataset.json: ``nonNodule`` marks (a position, no
outline) and nodules < 3 mm, which LIDC marks by their centre only (no outline of more than
one point).

pylidc's conventions, one by one:

* a reader's mask of a nodule is the pixels enclosed by the reader's inclusion outlines on each
  slice, minus the outline points themselves (LIDC draws the outline just outside the nodule;
  pylidc's ``boolean_mask`` default), minus the pixels enclosed by exclusion outlines;
* the readers' nodules are grouped into physical nodules as pylidc's ``cluster_annotations``
  does, with its default metric and tolerance: two annotations are one nodule when the smallest
  distance between their outline points (in mm: column and row times the pixel size, the slice
  position) is at most the slice step, or when their masks share a voxel; the groups are the
  connected components of that relation. When a group holds two annotations of one reader the
  tolerance shrinks by 0.9 until none does (or it is below 0.1 mm; then that reader's
  annotations in the group are one mask);
* the consensus mask of a nodule is the pixels marked by at least 50 % of the readers who
  annotated that nodule (pylidc's ``consensus(clevel=0.5)``), an option.

The 2-D samples (:func:`nodule_slices`): every axial slice where some nodule's consensus is not
empty. The image is the slice in a CT window (the lung window, level -600 HU width 1500 HU, by
default; options) as RGB; the mask is the union of the consensus masks of the nodules in that
slice; the labels are, per pixel, the number of readers who marked it (0..4). Sample ids are
``<patient>_s<k>_z<index>``: the patient folder, the k-th read series of that patient (1..,
in folder order), the slice's index in position order. The case (the unit of the split) is the
patient.

Bad input raises :class:`~.common.MedicalDataError` naming the file (or folder) and the
problem; nothing is written then (``convert(..., bad_series="skip")`` leaves a series with bad
slices out instead, listing it with its problem in dataset.json). Uses pydicom, numpy and scikit-image; no torch, no
detectron2.
"""
from __future__ import annotations

import math
import xml.etree.ElementTree as ET
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from ...utils import PathLike
from ._standins import standins_folder
from .common import MedicalDataError, Slice2D, case_split, missing_dataset_message, \
    window_to_uint8, write_slice_dataset

__all__ = [
    "NAME",
    "CTSeries",
    "Contour",
    "ReaderNodule",
    "Reading",
    "Nodule",
    "read_series",
    "read_readings",
    "reader_mask",
    "group_nodules",
    "nodules_of",
    "nodule_slices",
    "find_series_folders",
    "convert",
    "write_ct_series",
    "write_readings_xml",
    "ring",
    "write_standins",
]

NAME = "lidc"
NS = "http://www.nih.gov"
WHERE_TO_GET = ("The Cancer Imaging Archive, https://www.cancerimagingarchive.net/collection/"
                "lidc-idri/ (the CT images with the NBIA Data Retriever, and the radiologists' "
                "annotation XML files)")
LAYOUT = ("LIDC-IDRI-<nnnn>/<study>/<series>/*.dcm with the readers' XML (*.xml) beside the "
          "slices")

#: Two slices closer than this (mm, along the normal) are the same slice.
DUPLICATE_TOL_MM = 0.01
#: A step this many times the median step is a missing slice.
GAP_FACTOR = 1.5
#: The lung window (HU).
LUNG_WINDOW = (-600.0, 1500.0)


# --------------------------------------------------------------------------------------------
# the CT series


@dataclass(frozen=True)
class CTSeries:
    """One CT series, its slices in position order.

    Attributes:
        folder: the folder it was read from.
        series_uid, study_uid, patient_id: from the DICOM headers.
        hu: ``(Z, Y, X)`` float32, Hounsfield units (stored values times RescaleSlope plus
            RescaleIntercept).
        positions: ``(Z,)`` mm, ImagePositionPatient projected on the slice normal, increasing.
        z: ``(Z,)`` mm, ImagePositionPatient's z (what the XML's imageZposition refers to).
        sop_uids: the slices' SOPInstanceUID, in position order.
        files: the slices' file names, in position order.
        spacing: ``(step, row, col)`` mm: the median slice step and PixelSpacing.
        orientation: ImageOrientationPatient (six direction cosines).
    """

    folder: Path
    series_uid: str
    study_uid: str
    patient_id: str
    hu: np.ndarray
    positions: np.ndarray
    z: np.ndarray
    sop_uids: Tuple[str, ...]
    files: Tuple[str, ...]
    spacing: Tuple[float, float, float]
    orientation: Tuple[float, ...]

    def slice_index(self, sop_uid: str, z: Optional[float]) -> Optional[int]:
        """The index of the slice with ``sop_uid``, else of the one at ImagePositionPatient z
        ``z`` (within 0.01 mm), else None."""
        if sop_uid in self.sop_uids:
            return self.sop_uids.index(sop_uid)
        if z is not None:
            close = np.flatnonzero(np.abs(self.z - z) < DUPLICATE_TOL_MM)
            if close.size == 1:
                return int(close[0])
        return None


def _floats(ds: Any, keyword: str, count: int, path: Path) -> Tuple[float, ...]:
    value = getattr(ds, keyword, None)
    try:
        values = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        values = ()
    if len(values) != count:
        raise MedicalDataError(f"{path}: {keyword} is missing or not {count} numbers "
                               f"(got {value!r})")
    return values


def _headers(folder: Path, pixels: bool) -> Dict[str, List[Tuple[Path, Any]]]:
    """SeriesInstanceUID -> [(path, dataset)] of the CT slices of ``folder``."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    paths = sorted(p for p in folder.iterdir() if p.suffix.lower() == ".dcm" and p.is_file())
    if not paths:
        raise FileNotFoundError(f"{folder}: holds no .dcm file")
    groups: Dict[str, List[Tuple[Path, Any]]] = defaultdict(list)
    for path in paths:
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=not pixels)
        except (InvalidDicomError, OSError, ValueError, EOFError) as exc:
            raise MedicalDataError(f"{path}: not a readable DICOM file ({exc})") from None
        if getattr(ds, "Modality", "CT") != "CT":
            continue
        uid = str(getattr(ds, "SeriesInstanceUID", ""))
        if not uid:
            raise MedicalDataError(f"{path}: has no SeriesInstanceUID")
        groups[uid].append((path, ds))
    return groups


def read_series(folder: PathLike) -> List[CTSeries]:
    """The CT series of ``folder`` (its ``*.dcm`` files, grouped by SeriesInstanceUID), each in
    position order (see the module's rules), sorted by SeriesInstanceUID.

    Series of another modality (e.g. the radiographs some LIDC patients have) are left out.

    Raises:
        MedicalDataError: a file pydicom cannot read, a slice without the geometry tags, slices
            that differ in size, pixel size or orientation, a duplicated or a missing slice
            (the folder and the slices named).
        FileNotFoundError: ``folder`` holds no ``.dcm`` file.
    """
    folder = Path(folder)
    groups = _headers(folder, pixels=True)
    return [_one_series(folder, uid, groups[uid]) for uid in sorted(groups)]


def _order(folder: Path, items: List[Tuple[Path, Any]]):
    """The slices of one series in position order, checked: (keyed, positions, step_mm,
    orientation, pixel spacing, shape)."""
    first_path, first = items[0]
    orientation = _floats(first, "ImageOrientationPatient", 6, first_path)
    pixel = _floats(first, "PixelSpacing", 2, first_path)
    shape = (int(first.Rows), int(first.Columns))
    normal = np.cross(np.asarray(orientation[:3]), np.asarray(orientation[3:]))
    if not np.isclose(np.linalg.norm(normal), 1.0, atol=1e-3):
        raise MedicalDataError(f"{first_path}: ImageOrientationPatient {orientation} is not two "
                               "orthogonal unit vectors")
    keyed = []
    for path, ds in items:
        if (int(ds.Rows), int(ds.Columns)) != shape:
            raise MedicalDataError(f"{path}: {ds.Rows}x{ds.Columns} pixels but {first_path.name} "
                                   f"of its series has {shape[0]}x{shape[1]}")
        if not np.allclose(_floats(ds, "PixelSpacing", 2, path), pixel, atol=1e-4):
            raise MedicalDataError(f"{path}: PixelSpacing differs from {first_path.name} of its "
                                   "series")
        if not np.allclose(_floats(ds, "ImageOrientationPatient", 6, path), orientation,
                           atol=1e-4):
            raise MedicalDataError(f"{path}: ImageOrientationPatient differs from "
                                   f"{first_path.name} of its series")
        position = np.asarray(_floats(ds, "ImagePositionPatient", 3, path))
        keyed.append((float(position @ normal), float(position[2]), path, ds))
    keyed.sort(key=lambda item: item[0])
    positions = np.array([k[0] for k in keyed])
    steps = np.diff(positions)
    for i, step in enumerate(steps):
        if step < DUPLICATE_TOL_MM:
            raise MedicalDataError(
                f"{folder}: duplicated slice: {keyed[i][2].name} and {keyed[i + 1][2].name} are "
                f"both at {positions[i]:.3f} mm along the slice normal")
    step_mm = float(np.median(steps)) if steps.size else float(
        getattr(first, "SliceThickness", 1.0) or 1.0)
    for i, step in enumerate(steps):
        if step > GAP_FACTOR * step_mm:
            raise MedicalDataError(
                f"{folder}: missing slice between {keyed[i][2].name} ({positions[i]:.3f} mm) "
                f"and {keyed[i + 1][2].name} ({positions[i + 1]:.3f} mm): a step of {step:.3f} "
                f"mm where the series steps {step_mm:.3f} mm")
    return keyed, positions, step_mm, orientation, pixel, shape


def _one_series(folder: Path, uid: str, items: List[Tuple[Path, Any]]) -> CTSeries:
    keyed, positions, step_mm, orientation, pixel, shape = _order(folder, items)
    first = keyed[0][3]
    hu = np.empty((len(keyed),) + shape, np.float32)
    for k, (_, _, path, ds) in enumerate(keyed):
        try:
            stored = ds.pixel_array
        except Exception as exc:  # pydicom raises many types for bad pixel data
            raise MedicalDataError(f"{path}: its pixel data cannot be decoded ({exc})") from None
        slope = float(getattr(ds, "RescaleSlope", 1.0) or 1.0)
        intercept = float(getattr(ds, "RescaleIntercept", 0.0) or 0.0)
        hu[k] = stored.astype(np.float32) * np.float32(slope) + np.float32(intercept)
    return CTSeries(
        folder=folder, series_uid=uid, study_uid=str(getattr(first, "StudyInstanceUID", "")),
        patient_id=str(getattr(first, "PatientID", "")), hu=hu, positions=positions,
        z=np.array([k[1] for k in keyed]), sop_uids=tuple(str(k[3].SOPInstanceUID) for k in keyed),
        files=tuple(k[2].name for k in keyed), spacing=(step_mm, pixel[0], pixel[1]),
        orientation=orientation,
    )


# --------------------------------------------------------------------------------------------
# the readers' XML


@dataclass(frozen=True)
class Contour:
    """One ``roi``: an outline on one slice. ``points`` is ``(N, 2)`` int, (x, y) = (column,
    row) as in the XML's edgeMap."""

    z: Optional[float]
    sop_uid: str
    inclusion: bool
    points: np.ndarray


@dataclass(frozen=True)
class ReaderNodule:
    """One reader's ``unblindedReadNodule`` (>= 3 mm: with outlines). ``reader`` numbers the
    readingSession within its XML file(s), from 0."""

    reader: int
    nodule_id: str
    contours: Tuple[Contour, ...]
    xml: Path


@dataclass(frozen=True)
class Reading:
    """The readings of one series: its readers' nodules and what was skipped."""

    xml: Tuple[Path, ...]
    series_uid: str
    readers: int
    nodules: Tuple[ReaderNodule, ...]
    small_nodules: int
    non_nodules: int


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


def _children(element: ET.Element, name: str) -> List[ET.Element]:
    return [child for child in element if _local(child.tag) == name]


def _text(element: ET.Element, name: str) -> Optional[str]:
    found = _children(element, name)
    return found[0].text.strip() if found and found[0].text is not None else None


def _read_one_xml(path: Path) -> Optional[Tuple[str, List[List[ReaderNodule]], int, int]]:
    try:
        root = ET.parse(path).getroot()
    except (ET.ParseError, OSError) as exc:
        raise MedicalDataError(f"{path}: not readable XML ({exc})") from None
    if _local(root.tag) != "LidcReadMessage":
        return None
    header = _children(root, "ResponseHeader")
    series_uid = (_text(header[0], "SeriesInstanceUid") or _text(header[0], "SeriesInstanceUID")
                  or "") if header else ""
    sessions: List[List[ReaderNodule]] = []
    small = non_nodules = 0
    for reader, session in enumerate(_children(root, "readingSession")):
        nodules = []
        non_nodules += len(_children(session, "nonNodule"))
        for element in _children(session, "unblindedReadNodule"):
            nodule_id = _text(element, "noduleID") or "?"
            contours = []
            for roi in _children(element, "roi"):
                points = []
                for edge in _children(roi, "edgeMap"):
                    try:
                        points.append((int(round(float(_text(edge, "xCoord")))),
                                       int(round(float(_text(edge, "yCoord"))))))
                    except (TypeError, ValueError):
                        raise MedicalDataError(
                            f"{path}: reader {reader + 1}, nodule {nodule_id}: an edgeMap point "
                            "without numeric xCoord/yCoord") from None
                z_text = _text(roi, "imageZposition")
                try:
                    z = float(z_text) if z_text is not None else None
                except ValueError:
                    raise MedicalDataError(f"{path}: reader {reader + 1}, nodule {nodule_id}: "
                                           f"imageZposition {z_text!r} is not a number") from None
                inclusion = (_text(roi, "inclusion") or "TRUE").upper() != "FALSE"
                contours.append(Contour(z=z, sop_uid=_text(roi, "imageSOP_UID") or "",
                                        inclusion=inclusion,
                                        points=np.array(points, np.int64).reshape(-1, 2)))
            if all(len(c.points) <= 1 for c in contours):
                small += 1
                continue
            nodules.append(ReaderNodule(reader=reader, nodule_id=nodule_id,
                                        contours=tuple(contours), xml=path))
        sessions.append(nodules)
    return series_uid, sessions, small, non_nodules


def read_readings(folder: PathLike, series_uid: str,
                  only_series: bool = False) -> Optional[Reading]:
    """The readers' nodules of series ``series_uid`` from the ``*.xml`` files of ``folder``.

    An XML names its series in ``ResponseHeader/SeriesInstanceUid``; one that names none is
    taken for the folder's series when ``only_series`` (the folder holds one series). Several
    XML files of one series add their readers (numbered on across the files). Returns None when
    no XML of the folder reads this series.

    Raises MedicalDataError for an XML that does not parse or has malformed coordinates.
    """
    folder = Path(folder)
    xmls, sessions, small, non_nodules = [], [], 0, 0
    for path in sorted(p for p in folder.iterdir() if p.suffix.lower() == ".xml"):
        parsed = _read_one_xml(path)
        if parsed is None:
            continue
        uid, file_sessions, file_small, file_non = parsed
        if uid != series_uid and not (uid == "" and only_series):
            continue
        offset = len(sessions)
        for nodules in file_sessions:
            sessions.append([ReaderNodule(n.reader + offset, n.nodule_id, n.contours, n.xml)
                             for n in nodules])
        xmls.append(path)
        small += file_small
        non_nodules += file_non
    if not xmls:
        return None
    return Reading(xml=tuple(xmls), series_uid=series_uid, readers=len(sessions),
                   nodules=tuple(n for nodules in sessions for n in nodules),
                   small_nodules=small, non_nodules=non_nodules)


# --------------------------------------------------------------------------------------------
# masks, grouping, consensus


def _where(nodule: ReaderNodule) -> str:
    return f"{nodule.xml}: reader {nodule.reader + 1}, nodule {nodule.nodule_id}"


def reader_mask(nodule: ReaderNodule, series: CTSeries) -> Dict[int, np.ndarray]:
    """One reader's mask of one nodule: slice index -> ``(Y, X)`` bool (pylidc's rule: enclosed
    by the inclusion outlines, minus the outline points, minus what exclusion outlines enclose).

    Raises MedicalDataError for an outline on no slice of the series or outside the image.
    """
    from skimage.draw import polygon

    shape = series.hu.shape[1:]
    masks: Dict[int, np.ndarray] = {}
    located = []
    for contour in nodule.contours:
        k = series.slice_index(contour.sop_uid, contour.z)
        if k is None:
            raise MedicalDataError(
                f"{_where(nodule)}: an outline at imageZposition {contour.z} "
                f"(imageSOP_UID {contour.sop_uid or '-'}) is on no slice of {series.folder}")
        cols, rows = contour.points[:, 0], contour.points[:, 1]
        if contour.points.size and (rows.min() < 0 or cols.min() < 0 or rows.max() >= shape[0]
                                    or cols.max() >= shape[1]):
            raise MedicalDataError(f"{_where(nodule)}: an outline point lies outside "
                                   f"the {shape[0]}x{shape[1]} image")
        located.append((k, contour))
    for inclusion in (True, False):
        for k, contour in located:
            if contour.inclusion != inclusion:
                continue
            mask = masks.setdefault(k, np.zeros(shape, bool))
            cols, rows = contour.points[:, 0], contour.points[:, 1]
            rr, cc = polygon(rows, cols, shape)
            if inclusion:
                mask[rr, cc] = True
            else:
                mask[rr, cc] = False
            mask[rows, cols] = False
    return {k: m for k, m in sorted(masks.items()) if m.any()}


def _outline_mm(nodule: ReaderNodule, series: CTSeries) -> np.ndarray:
    rows = []
    for contour in nodule.contours:
        k = series.slice_index(contour.sop_uid, contour.z)
        pts = contour.points
        rows.append(np.column_stack([np.full(len(pts), series.positions[k]),
                                     pts[:, 1] * series.spacing[1], pts[:, 0] * series.spacing[2]]))
    return np.concatenate(rows) if rows else np.zeros((0, 3))


def _components(n: int, linked: np.ndarray) -> List[List[int]]:
    parent = list(range(n))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i, j in zip(*np.nonzero(np.triu(linked, 1))):
        parent[find(int(i))] = find(int(j))
    groups: Dict[int, List[int]] = defaultdict(list)
    for i in range(n):
        groups[find(i)].append(i)
    return sorted(groups.values())


def group_nodules(nodules: Sequence[ReaderNodule], masks: Sequence[Dict[int, np.ndarray]],
                  series: CTSeries, tol_mm: Optional[float] = None) -> List[List[int]]:
    """The physical nodules: groups of indices into ``nodules`` (see the module's rule: outline
    distance <= ``tol_mm``, default the slice step, or overlapping masks; the tolerance shrinks
    by 0.9 while a group holds two annotations of one reader, down to 0.1 mm). Sorted by their
    first index."""
    n = len(nodules)
    if n == 0:
        return []
    outlines = [_outline_mm(nod, series) for nod in nodules]
    distance = np.zeros((n, n))
    overlap = np.eye(n, dtype=bool)
    for i in range(n):
        for j in range(i + 1, n):
            a, b = outlines[i], outlines[j]
            d = np.sqrt(((a[:, None, :] - b[None, :, :]) ** 2).sum(-1)).min() if len(a) and len(
                b) else np.inf
            distance[i, j] = distance[j, i] = d
            shared = any(np.any(masks[i][k] & masks[j][k]) for k in masks[i] if k in masks[j])
            overlap[i, j] = overlap[j, i] = shared
    tol = float(series.spacing[0] if tol_mm is None else tol_mm)
    while True:
        groups = _components(n, overlap | (distance <= tol))
        clash = any(len({nodules[i].reader for i in g}) < len(g) for g in groups)
        if not clash or tol < 0.1:
            return groups
        tol *= 0.9


@dataclass
class Nodule:
    """One physical nodule: the readers who annotated it, per slice the number of them who
    marked each pixel (``count``, slice index -> ``(Y, X)`` uint8) and the consensus mask."""

    readers: Tuple[int, ...]
    count: Dict[int, np.ndarray]
    consensus: Dict[int, np.ndarray]


def nodules_of(series: CTSeries, reading: Reading, *, clevel: float = 0.5,
               tol_mm: Optional[float] = None) -> List[Nodule]:
    """The physical nodules of a series: each reader's masks, grouped (:func:`group_nodules`),
    and the consensus of >= ``clevel`` of the readers who annotated each."""
    masks = [reader_mask(nod, series) for nod in reading.nodules]
    out = []
    for group in group_nodules(reading.nodules, masks, series, tol_mm):
        per_reader: Dict[int, Dict[int, np.ndarray]] = defaultdict(dict)
        for i in group:
            for k, m in masks[i].items():
                mine = per_reader[reading.nodules[i].reader]
                mine[k] = mine[k] | m if k in mine else m
        readers = tuple(sorted(per_reader))
        slices = sorted({k for r in readers for k in per_reader[r]})
        count = {k: sum(per_reader[r].get(k, np.zeros(series.hu.shape[1:], bool)).astype(np.uint8)
                        for r in readers) for k in slices}
        consensus = {k: c.astype(np.float64) / len(readers) >= clevel for k, c in count.items()}
        out.append(Nodule(readers=readers, count=count,
                          consensus={k: m for k, m in consensus.items() if m.any()}))
    return out


def nodule_slices(series: CTSeries, reading: Reading, *, case: str, prefix: str,
                  window_level: float = LUNG_WINDOW[0], window_width: float = LUNG_WINDOW[1],
                  clevel: float = 0.5, tol_mm: Optional[float] = None) -> List[Slice2D]:
    """The 2-D samples of one series: each slice where a nodule's consensus is not empty, the
    image in the CT window as RGB, the mask the union of the consensus masks there, the labels
    the number of readers marking each pixel. Ids are ``<prefix>_z<index>``."""
    nodules = nodules_of(series, reading, clevel=clevel, tol_mm=tol_mm)
    shape = series.hu.shape[1:]
    out = []
    for k in sorted({k for nod in nodules for k in nod.consensus}):
        mask = np.zeros(shape, bool)
        labels = np.zeros(shape, np.uint8)
        for nod in nodules:
            if k in nod.consensus:
                mask |= nod.consensus[k]
            if k in nod.count:
                labels = np.maximum(labels, nod.count[k])
        gray = window_to_uint8(series.hu[k], window_level, window_width)
        out.append(Slice2D(id=f"{prefix}_z{k:03d}", case=case,
                           image=np.repeat(gray[:, :, None], 3, axis=2), mask=mask,
                           labels=labels, spacing=(float(series.spacing[1]),
                                                   float(series.spacing[2]))))
    return out


# --------------------------------------------------------------------------------------------
# the data set


def find_series_folders(root: PathLike) -> List[Tuple[str, Path]]:
    """``(patient, folder)`` of every folder holding ``.dcm`` files under
    ``root/LIDC-IDRI-*/``, sorted. Raises FileNotFoundError (where to get the data, where to put
    it) when there is none."""
    root = Path(root)
    found = []
    for patient in sorted(p for p in root.glob("LIDC-IDRI-*") if p.is_dir()):
        folders = sorted({p.parent for p in patient.rglob("*") if p.suffix.lower() == ".dcm"
                          and p.is_file()})
        found.extend((patient.name, folder) for folder in folders)
    if not found:
        raise FileNotFoundError(missing_dataset_message("lidc_idri", root, WHERE_TO_GET, LAYOUT))
    return found


def convert(root: PathLike, out: PathLike, *, seed: int = 0, val_fraction: float = 0.2,
            window_level: float = LUNG_WINDOW[0], window_width: float = LUNG_WINDOW[1],
            consensus_level: float = 0.5, group_tol_mm: Optional[float] = None,
            bad_series: str = "raise") -> Path:
    """Convert LIDC-IDRI under ``root`` (TCIA's layout) to 2-D nodule slices in ``out``
    (:func:`~.common.write_slice_dataset`).

    First every series folder's slice headers (no pixels) and XML are read, and the slices of
    each read series checked (order, duplicated or missing slices): the patients with a nodule
    of >= 3 mm are the cases, split by :func:`~.common.case_split`. Then each read series is
    loaded and its slices written. Series without a LIDC XML are skipped and counted.

    Args:
        root: the folder holding ``LIDC-IDRI-<nnnn>/``.
        out: the converted folder.
        seed, val_fraction: the split by patient.
        window_level, window_width: the CT window of the images (HU), the lung window by
            default.
        consensus_level: the fraction of a nodule's readers who must mark a pixel (0.5).
        group_tol_mm: the outline distance that makes two annotations one nodule (default the
            series' slice step, as pylidc).
        bad_series: ``"raise"`` (default): a series with a duplicated or missing slice (or
            other bad geometry) stops the conversion before anything is written; ``"skip"``:
            it is left out and listed, with its problem, in dataset.json's
            ``source.bad_series`` (the full LIDC-IDRI has a few such scans).

    Returns ``out``.

    Raises:
        FileNotFoundError: ``root`` holds no LIDC-IDRI series (the message says where to get
            it and where to put it).
        MedicalDataError: bad input, the file and the problem named; nothing is written.
    """
    root = Path(root)
    if not 0.0 < consensus_level <= 1.0:
        raise ValueError(f"consensus_level must be in (0, 1], got {consensus_level}")
    if bad_series not in ("raise", "skip"):
        raise ValueError(f"bad_series must be 'raise' or 'skip', got {bad_series!r}")
    plan: List[Tuple[str, str, Path, Reading]] = []
    skipped = {"series_without_readings": 0, "small_nodules": 0, "non_nodules": 0}
    bad: List[Dict[str, str]] = []
    for patient, folder in find_series_folders(root):
        groups = _headers(folder, pixels=False)
        for uid in sorted(groups):
            reading = read_readings(folder, uid, only_series=len(groups) == 1)
            if reading is None:
                skipped["series_without_readings"] += 1
                continue
            try:
                _order(folder, groups[uid])
            except MedicalDataError as exc:
                if bad_series == "raise":
                    raise
                bad.append({"series": folder.relative_to(root).as_posix(), "problem": str(exc)})
                continue
            skipped["small_nodules"] += reading.small_nodules
            skipped["non_nodules"] += reading.non_nodules
            plan.append((patient, uid, folder, reading))
    cases = sorted({patient for patient, _, _, reading in plan if reading.nodules})
    split = case_split(cases, seed, val_fraction)
    split_record = dict(split, seed=seed, val_fraction=val_fraction)

    def samples() -> Iterator[Slice2D]:
        number: Dict[str, int] = defaultdict(int)
        for patient, uid, folder, reading in plan:
            if patient not in cases:
                continue
            number[patient] += 1
            series = next(s for s in read_series(folder) if s.series_uid == uid)
            yield from nodule_slices(series, reading, case=patient,
                                     prefix=f"{patient}_s{number[patient]}",
                                     window_level=window_level, window_width=window_width,
                                     clevel=consensus_level, tol_mm=group_tol_mm)

    source = {
        "dataset": "LIDC-IDRI", "format": "DICOM series and the readers' LIDC XML",
        "series": len(plan), "patients": len(cases),
        "window": {"level": float(window_level), "width": float(window_width)},
        "mask": (f"consensus: pixels marked by >= {consensus_level:g} of the readers who "
                 "annotated the nodule (pylidc's consensus)"),
        "labels": "per pixel, the number of readers who marked it",
        "grouping": ("pylidc's cluster_annotations: outline distance <= "
                     + ("the slice step" if group_tol_mm is None else f"{group_tol_mm:g} mm")
                     + " or overlapping masks"),
        "skipped": skipped,
        "bad_series": bad,
        "skipped_why": "nonNodule marks and nodules < 3 mm (a centre, no outline) have no mask",
    }
    return write_slice_dataset(out, NAME, samples(), split_record, source)


# --------------------------------------------------------------------------------------------
# stand-ins in the real format


def write_ct_series(folder: PathLike, hu: np.ndarray, *, patient_id: str, study_uid: str,
                    series_uid: str, sop_uids: Sequence[str], positions: Sequence[Sequence[float]],
                    orientation: Sequence[float], pixel_spacing: Tuple[float, float],
                    file_names: Sequence[str], instance_numbers: Sequence[int],
                    slope: float = 1.0, intercept: float = -1024.0, signed: bool = False,
                    slice_thickness: Optional[float] = None) -> None:
    """Write ``hu`` (``(Z, Y, X)``, HU) as a CT series with pydicom: one CT Image Storage file
    per slice ``k`` named ``file_names[k]``, at ImagePositionPatient ``positions[k]``, with a
    proper file meta (explicit VR little endian). Stored values are ``(hu - intercept) /
    slope`` rounded, as uint16 (or int16 when ``signed``)."""
    from pydicom.dataset import FileMetaDataset, Dataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, PYDICOM_IMPLEMENTATION_UID

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    dtype = np.int16 if signed else np.uint16
    info = np.iinfo(dtype)
    frame_uid = series_uid + ".1" if len(series_uid) < 62 else series_uid
    for k in range(hu.shape[0]):
        stored = np.clip(np.round((hu[k].astype(np.float64) - intercept) / slope), info.min,
                         info.max).astype(dtype)
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = sop_uids[k]
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = sop_uids[k]
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.FrameOfReferenceUID = frame_uid
        ds.PatientID = patient_id
        ds.PatientName = patient_id
        ds.Modality = "CT"
        ds.StudyDate = "20000101"
        ds.SeriesNumber = 3000
        ds.InstanceNumber = int(instance_numbers[k])
        ds.ImagePositionPatient = [f"{float(v):.4f}" for v in positions[k]]
        ds.ImageOrientationPatient = [f"{float(v):g}" for v in orientation]
        ds.PixelSpacing = [f"{float(v):g}" for v in pixel_spacing]
        ds.SliceThickness = f"{float(slice_thickness or 1.0):g}"
        ds.SliceLocation = f"{float(positions[k][2]):.4f}"
        ds.Rows, ds.Columns = int(hu.shape[1]), int(hu.shape[2])
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated = 16
        ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 1 if signed else 0
        ds.RescaleIntercept = f"{float(intercept):g}"
        ds.RescaleSlope = f"{float(slope):g}"
        ds.RescaleType = "HU"
        ds.PixelData = stored.tobytes()
        ds.save_as(folder / file_names[k], enforce_file_format=True)


def write_readings_xml(path: PathLike, *, series_uid: str, study_uid: str,
                       readers: Sequence[Sequence[Dict[str, Any]]]) -> None:
    """Write a LIDC readers' XML (``LidcReadMessage``, namespace ``http://www.nih.gov``).

    ``readers[r]`` lists reader r's marks, each a dict: ``{"nodule": id, "rois": [(z, sop_uid,
    [(x, y), ...]), ...]}`` for an outlined nodule (one roi of one point: a nodule < 3 mm), or
    ``{"non_nodule": id, "z": z, "sop_uid": uid, "point": (x, y)}``.
    """
    def sub(parent: ET.Element, name: str, text: Optional[str] = None) -> ET.Element:
        element = ET.SubElement(parent, f"{{{NS}}}{name}")
        if text is not None:
            element.text = text
        return element

    ET.register_namespace("", NS)
    root = ET.Element(f"{{{NS}}}LidcReadMessage", {"uid": series_uid + ".0"})
    header = sub(root, "ResponseHeader")
    sub(header, "Version", "1.8.1")
    sub(header, "TaskDescription", "Second unblinded read")
    sub(header, "SeriesInstanceUid", series_uid)
    sub(header, "StudyInstanceUID", study_uid)
    for r, marks in enumerate(readers):
        session = sub(root, "readingSession")
        sub(session, "annotationVersion", "3.12")
        sub(session, "servicingRadiologistID", f"reader{r + 1}")
        for mark in marks:
            if "non_nodule" in mark:
                element = sub(session, "nonNodule")
                sub(element, "nonNoduleID", str(mark["non_nodule"]))
                sub(element, "imageZposition", f"{mark['z']:.6f}")
                sub(element, "imageSOP_UID", mark["sop_uid"])
                locus = sub(element, "locus")
                sub(locus, "xCoord", str(int(mark["point"][0])))
                sub(locus, "yCoord", str(int(mark["point"][1])))
                continue
            element = sub(session, "unblindedReadNodule")
            sub(element, "noduleID", str(mark["nodule"]))
            for z, sop_uid, points in mark["rois"]:
                roi = sub(element, "roi")
                sub(roi, "imageZposition", f"{z:.6f}")
                sub(roi, "imageSOP_UID", sop_uid)
                sub(roi, "inclusion", "TRUE")
                for x, y in points:
                    edge = sub(roi, "edgeMap")
                    sub(edge, "xCoord", str(int(x)))
                    sub(edge, "yCoord", str(int(y)))
    tree = ET.ElementTree(root)
    ET.indent(tree)
    tree.write(path, encoding="UTF-8", xml_declaration=True)


def ring(cx: float, cy: float, radius: float) -> List[Tuple[int, int]]:
    """An outline: the integer pixels (x, y) of a circle, in order, 8-connected."""
    n = max(16, int(math.ceil(8 * math.pi * radius)))
    points: List[Tuple[int, int]] = []
    for t in np.linspace(0.0, 2 * math.pi, n, endpoint=False):
        p = (int(round(cx + radius * math.cos(t))), int(round(cy + radius * math.sin(t))))
        if not points or p != points[-1]:
            points.append(p)
    if len(points) > 1 and points[0] == points[-1]:
        points.pop()
    return points


def write_standins(root: PathLike, *, seed: int = 0, cases: int = 4, size: int = 32) -> Path:
    """Small synthetic LIDC-IDRI stand-ins in TCIA's layout, written with pydicom.

    ``cases`` patients ``LIDC-IDRI-0001..``, each one CT series of 8-12 slices of ``size`` x
    ``size`` pixels (pixel size 0.7-0.8 mm, slice step 1.25-2.5 mm, a non-zero origin; odd
    patients have ImageOrientationPatient ``1 0 0 0 -1 0``, whose normal points down, so
    position order is decreasing z), stored as uint16 with intercept -1024 (odd patients int16,
    slope 2). File names and InstanceNumbers are shuffled, so neither gives the slice order.
    The body is soft tissue around a lung field (-850 HU) holding one or two spherical nodules
    (+40 HU); an XML has 2-4 readers whose outlines differ in centre and radius by up to
    half a pixel (readers 3 and 4 miss a nodule now and then); the first patient's first reader also
    marks a nodule < 3 mm and a non-nodule (both skipped by :func:`convert`). Deterministic for
    a ``seed``. Whole or nothing; ``root`` may be missing, empty or earlier stand-ins (replaced),
    anything else raises FileExistsError. Returns ``root``.
    """
    from pydicom.uid import generate_uid

    root = Path(root)
    if size < 16:
        raise ValueError(f"size must be at least 16 pixels, got {size}")
    with standins_folder(root, f"lidc seed={seed} cases={cases} size={size}") as tmp:
        for c in range(cases):
            rng = np.random.default_rng([seed, c, 0x11DC])
            patient = f"LIDC-IDRI-{c + 1:04d}"

            def uid(*what: Any) -> str:
                return generate_uid(entropy_srcs=[str(seed), patient, *map(str, what)])

            study, series = uid("study"), uid("series")
            n = int(rng.integers(8, 13))
            step = float(rng.choice([1.25, 2.0, 2.5]))
            ps = float(rng.choice([0.703125, 0.75, 0.78125]))
            flipped = c % 2 == 1
            orientation = (1, 0, 0, 0, -1, 0) if flipped else (1, 0, 0, 0, 1, 0)
            x0, y0 = -0.5 * size * ps + 3.0, (0.5 * size * ps if flipped else -0.5 * size * ps)
            z0 = -150.0 + 10.0 * c
            # slice k at z0 + k*step; with the flipped orientation the normal is -z
            zs = z0 + step * np.arange(n)
            yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
            centre = (size - 1) / 2.0
            r_body = np.hypot(yy - centre, xx - centre)
            hu = np.where(r_body < 0.47 * size, 30.0, -1000.0)[None].repeat(n, 0)
            hu = np.where((r_body < 0.38 * size)[None], -850.0, hu)
            nodules = []
            for j in range(1 + c % 2):
                side = 1 if j == 0 else -1
                cx = centre + side * 0.18 * size + rng.uniform(-1, 1)
                cy = centre + rng.uniform(-2, 2)
                radius = float(rng.uniform(2.6, 3.6))  # mm
                cz = z0 + step * (n - 1) / 2.0 + rng.uniform(-1.5, 1.5)
                nodules.append((cx, cy, cz, radius))
                for k in range(n):
                    d2 = ((xx - cx) * ps) ** 2 + ((yy - cy) * ps) ** 2 + (zs[k] - cz) ** 2
                    hu[k][d2 <= radius ** 2] = 40.0
            hu = hu + rng.normal(0.0, 15.0, hu.shape)
            perm = rng.permutation(n)
            names = [f"1-{int(perm[k]) + 1:03d}.dcm" for k in range(n)]
            instance = rng.permutation(n) + 1
            sops = [uid("slice", k) for k in range(n)]
            positions = [(x0, y0, float(zs[k])) for k in range(n)]
            folder = tmp / patient / study / series
            write_ct_series(folder, hu.astype(np.float32), patient_id=patient, study_uid=study,
                            series_uid=series, sop_uids=sops, positions=positions,
                            orientation=orientation, pixel_spacing=(ps, ps), file_names=names,
                            instance_numbers=instance, slope=2.0 if flipped else 1.0,
                            intercept=-1024.0, signed=flipped, slice_thickness=step)
            n_readers = int(rng.integers(2, 5))
            readers: List[List[Dict[str, Any]]] = [[] for _ in range(n_readers)]
            for j, (cx, cy, cz, radius) in enumerate(nodules):
                for r in range(n_readers):
                    if r >= 2 and rng.random() < 0.3:
                        continue
                    dx, dy = rng.uniform(-0.5, 0.5, 2)
                    dr = rng.uniform(-0.5, 0.5)
                    rois = []
                    for k in range(n):
                        dz = zs[k] - cz
                        if abs(dz) >= radius:
                            continue
                        r_px = math.sqrt(radius ** 2 - dz ** 2) / ps
                        if r_px < 2.0:
                            continue
                        rois.append((float(zs[k]), sops[k],
                                     ring(cx + dx, cy + dy, r_px + 0.5 + dr)))
                    if rois:
                        readers[r].append({"nodule": f"Nodule {j + 1:03d}", "rois": rois})
            if c == 0:
                k = n // 2
                readers[0].append({"nodule": "IL057_small", "rois": [
                    (float(zs[k]), sops[k], [(int(centre) - 6, int(centre) + 5)])]})
                readers[0].append({"non_nodule": "Non-nodule 001", "z": float(zs[k]),
                                   "sop_uid": sops[k], "point": (int(centre) + 4, 4)})
            write_readings_xml(folder / "069.xml", series_uid=series, study_uid=study,
                               readers=readers)
    return root
