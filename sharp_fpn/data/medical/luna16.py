"""LUNA16: CT volumes in MetaImage (.mhd/.raw) and the nodule list, to 3-D patches around nodules.

The layout LUNA16 is downloaded in::

    <root>/subset0/<seriesuid>.mhd, <seriesuid>.raw      ... subset9/
    <root>/annotations.csv      seriesuid,coordX,coordY,coordZ,diameter_mm   (world mm)

Reading a volume (:func:`read_volume`). Before SimpleITK reads an ``.mhd``, its header is
checked against its data file: the ``.raw`` must exist and hold at least ``DimSize`` times the
element size (``ElementType``, ``ElementNumberOfChannels``) bytes after ``HeaderSize`` (a short
file is refused with both files named; SimpleITK's own error does not say so). The spacing,
origin and direction are the header's (SimpleITK's reading of ``ElementSpacing``, ``Offset``,
``TransformMatrix``, world coordinates in ITK's LPS frame); the volume is then turned to RAS
axes with ``SimpleITK.DICOMOrient`` (axis permutations and flips, no resampling; for LUNA16's
identity directions, x and y flipped), so that a patch is fully placed in NIfTI's RAS world by
its spacing and origin (the affine :func:`~.common.write_volume_dataset` writes: ``Volume3D``
origins here are RAS, i.e. LPS x and y negated).

Placing a nodule. An annotation's world centre (coordX, coordY, coordZ, mm) becomes a voxel
position with SimpleITK's ``TransformPhysicalPointToContinuousIndex`` (origin and direction
included); a centre outside its volume is refused, naming the csv row and the ``.mhd``.
Series of the csv that are not under ``root`` (LUNA16 comes in ten subsets) are skipped and
counted; volumes without a nodule give only negatives, when asked for.

The samples (:class:`~.common.Volume3D`): a cube of ``patch`` voxels (32 by default) around
each nodule, the voxel nearest its centre at ``patch // 2``, padded with ``pad_hu`` (-1024 HU,
air) where it leaves the volume. **The mask is a sphere of the annotation's diameter around
its centre, in mm** (every nodule whose sphere reaches into the patch is drawn): LUNA16 gives
centres and diameters, not outlines. Optionally ``negatives`` patches per volume with no
nodule (seeded centres whose patch meets no sphere; up to 100 tries each, so a volume with no
room for them gives fewer). Resampling is explicit: with ``spacing_mm`` the volume is first
resampled (linear) to that isotropic spacing; without it the patches keep the scan's own
spacing. Ids are ``<seriesuid>_n<k>`` (nodules in csv order of
their series) and ``<seriesuid>_neg<k>``; the case (the unit of the split) is the seriesuid.

Bad input raises :class:`~.common.MedicalDataError` naming the file (and csv row) and the
problem; nothing is written then. Uses SimpleITK and numpy; no torch, no detectron2.
"""
from __future__ import annotations

import csv
import hashlib
import math
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from ...utils import PathLike, write_csv_atomic
from ._standins import standins_folder
from .common import MedicalDataError, Volume3D, case_split, missing_dataset_message, \
    write_volume_dataset

__all__ = [
    "NAME",
    "Annotation",
    "CTVolume",
    "check_mhd",
    "read_volume",
    "read_annotations",
    "find_volumes",
    "nodule_patches",
    "convert",
    "write_standins",
]

NAME = "luna16"
WHERE_TO_GET = ("the LUNA16 challenge, https://luna16.grand-challenge.org/Download/ (Zenodo "
                "records 3723295 and 4121926: subset0..9 and annotations.csv)")
LAYOUT = "subset0..9/<seriesuid>.mhd with its .raw, and annotations.csv"

#: Bytes per element of the MetaImage element types.
ELEMENT_BYTES = {"MET_CHAR": 1, "MET_UCHAR": 1, "MET_SHORT": 2, "MET_USHORT": 2, "MET_INT": 4,
                 "MET_UINT": 4, "MET_LONG": 8, "MET_ULONG": 8, "MET_LONG_LONG": 8,
                 "MET_ULONG_LONG": 8, "MET_FLOAT": 4, "MET_DOUBLE": 8}
COLUMNS = ("seriesuid", "coordX", "coordY", "coordZ", "diameter_mm")


# --------------------------------------------------------------------------------------------
# volumes


def _header(mhd: Path) -> Dict[str, str]:
    try:
        text = mhd.read_text(encoding="latin-1")
    except OSError as exc:
        raise MedicalDataError(f"{mhd}: cannot be read ({exc})") from None
    fields = {}
    for line in text.splitlines():
        if "=" in line:
            key, value = line.split("=", 1)
            fields[key.strip()] = value.strip()
    return fields


def check_mhd(mhd: PathLike) -> Path:
    """Check that the data file of MetaImage header ``mhd`` is whole; return its path.

    Raises MedicalDataError naming the ``.mhd`` (and the ``.raw``) for a header without
    ``DimSize``/``ElementType``/``ElementDataFile``, an element type it does not know, a data
    file that is missing, or one shorter than ``DimSize`` x element size (``HeaderSize`` bytes
    skipped). Compressed data (``CompressedData = True``) is not size-checked.
    """
    mhd = Path(mhd)
    fields = _header(mhd)
    for key in ("DimSize", "ElementType", "ElementDataFile"):
        if key not in fields:
            raise MedicalDataError(f"{mhd}: the MetaImage header has no {key}")
    if fields["ElementDataFile"] == "LOCAL" or fields["ElementDataFile"].startswith("LIST"):
        raise MedicalDataError(f"{mhd}: ElementDataFile {fields['ElementDataFile']} is not "
                               "supported (LUNA16 ships one .raw beside each .mhd)")
    raw = mhd.parent / fields["ElementDataFile"]
    if not raw.is_file():
        raise MedicalDataError(f"{mhd}: its data file {raw} is missing")
    if fields.get("CompressedData", "False").lower() == "true":
        return raw
    element = ELEMENT_BYTES.get(fields["ElementType"])
    if element is None:
        raise MedicalDataError(f"{mhd}: unknown ElementType {fields['ElementType']}")
    try:
        dims = [int(v) for v in fields["DimSize"].split()]
        channels = int(fields.get("ElementNumberOfChannels", "1"))
        header_size = int(fields.get("HeaderSize", "0"))
    except ValueError:
        raise MedicalDataError(f"{mhd}: DimSize {fields['DimSize']!r} (or HeaderSize/"
                               "ElementNumberOfChannels) is not integers") from None
    expected = int(np.prod(dims)) * element * channels
    actual = raw.stat().st_size - max(header_size, 0)
    if actual < expected:
        raise MedicalDataError(
            f"{mhd}: its data file {raw} holds {actual} bytes, but DimSize "
            f"{' '.join(map(str, dims))} of {fields['ElementType']} needs {expected} (a short "
            ".raw: download it again)")
    return raw


@dataclass(frozen=True)
class CTVolume:
    """One LUNA16 scan, turned to RAS axes.

    Attributes:
        mhd: the header it was read from.
        image: the SimpleITK image (RAS axes), for world/voxel conversions (ITK's LPS world,
            as annotations.csv).
        hu: ``(Z, Y, X)`` float32, HU as stored.
        spacing: ``(z, y, x)`` mm.
        origin: ``(z, y, x)`` RAS world mm of voxel (0, 0, 0).
    """

    mhd: Path
    image: Any
    hu: np.ndarray
    spacing: Tuple[float, float, float]
    origin: Tuple[float, float, float]

    def to_voxel(self, world_xyz: Sequence[float]) -> np.ndarray:
        """World (x, y, z) mm -> continuous voxel position ``(z, y, x)``."""
        index = self.image.TransformPhysicalPointToContinuousIndex([float(v) for v in world_xyz])
        return np.array(index[::-1], np.float64)

    def to_world(self, voxel_zyx: Sequence[float]) -> np.ndarray:
        """Continuous voxel position ``(z, y, x)`` -> world (x, y, z) mm, LPS (ITK's)."""
        point = self.image.TransformContinuousIndexToPhysicalPoint(
            [float(v) for v in voxel_zyx[::-1]])
        return np.array(point, np.float64)

    def ras_origin(self, voxel_zyx: Sequence[int]) -> Tuple[float, float, float]:
        """``(z, y, x)`` RAS world mm of voxel ``voxel_zyx`` (a patch's origin)."""
        x, y, z = self.to_world(voxel_zyx)
        return (float(z), float(-y), float(-x))


def read_volume(mhd: PathLike, spacing_mm: Optional[float] = None) -> CTVolume:
    """Read ``mhd`` with SimpleITK after :func:`check_mhd`, turned to RAS axes and, with
    ``spacing_mm``, resampled (linear) to that isotropic spacing. Raises MedicalDataError as
    :func:`check_mhd`, or for a file SimpleITK cannot read or that is not 3-D."""
    import SimpleITK as sitk

    mhd = Path(mhd)
    check_mhd(mhd)
    try:
        image = sitk.ReadImage(str(mhd))
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[-1] if str(exc).strip() else "unreadable"
        raise MedicalDataError(f"{mhd}: SimpleITK cannot read it ({first})") from None
    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        raise MedicalDataError(f"{mhd}: not a 3-D scalar volume ({image.GetDimension()}-D, "
                               f"{image.GetNumberOfComponentsPerPixel()} components)")
    image = sitk.DICOMOrient(image, "RAS")
    if spacing_mm is not None:
        if not spacing_mm > 0:
            raise ValueError(f"spacing_mm must be positive, got {spacing_mm}")
        old_size, old_spacing = image.GetSize(), image.GetSpacing()
        size = [max(1, int(round(n * s / spacing_mm))) for n, s in zip(old_size, old_spacing)]
        image = sitk.Resample(image, size, sitk.Transform(), sitk.sitkLinear, image.GetOrigin(),
                              (float(spacing_mm),) * 3, image.GetDirection(), -1024.0,
                              sitk.sitkFloat32)
    hu = sitk.GetArrayFromImage(image).astype(np.float32)
    origin = image.GetOrigin()  # LPS
    return CTVolume(mhd=mhd, image=image, hu=hu,
                    spacing=tuple(float(v) for v in image.GetSpacing()[::-1]),
                    origin=(float(origin[2]), float(-origin[1]), float(-origin[0])))


# --------------------------------------------------------------------------------------------
# annotations


@dataclass(frozen=True)
class Annotation:
    """One row of annotations.csv: ``world`` (x, y, z) mm, ``diameter_mm``, and ``line``, its
    line number in the file (the header is line 1)."""

    seriesuid: str
    world: Tuple[float, float, float]
    diameter_mm: float
    line: int


def read_annotations(path: PathLike) -> List[Annotation]:
    """The rows of LUNA16's ``annotations.csv``, in file order. Raises MedicalDataError naming
    the file and line for a missing column, a value that is not a number or a diameter that is
    not positive."""
    path = Path(path)
    out = []
    try:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            missing = [c for c in COLUMNS if c not in (reader.fieldnames or [])]
            if missing:
                raise MedicalDataError(f"{path}: no column {', '.join(missing)} (LUNA16's "
                                       f"columns are {','.join(COLUMNS)})")
            for line, row in enumerate(reader, 2):
                try:
                    world = (float(row["coordX"]), float(row["coordY"]), float(row["coordZ"]))
                    diameter = float(row["diameter_mm"])
                except (TypeError, ValueError):
                    raise MedicalDataError(f"{path}, line {line}: coordX/coordY/coordZ/"
                                           "diameter_mm must be numbers") from None
                if not (diameter > 0 and all(map(math.isfinite, world))):
                    raise MedicalDataError(f"{path}, line {line}: diameter_mm {diameter} must "
                                           "be positive and the centre finite")
                out.append(Annotation(row["seriesuid"].strip(), world, diameter, line))
    except OSError as exc:
        raise MedicalDataError(f"{path}: cannot be read ({exc})") from None
    return out


def find_volumes(root: PathLike) -> Dict[str, Path]:
    """seriesuid -> ``.mhd`` of every ``root/subset*/<seriesuid>.mhd``. Raises FileNotFoundError
    (where to get LUNA16, where to put it) when there is none or no annotations.csv."""
    root = Path(root)
    found: Dict[str, Path] = {}
    for mhd in sorted(root.glob("subset*/*.mhd")):
        if mhd.stem in found:
            raise MedicalDataError(f"{mhd}: series {mhd.stem} is also {found[mhd.stem]}")
        found[mhd.stem] = mhd
    if not found or not (root / "annotations.csv").is_file():
        raise FileNotFoundError(missing_dataset_message(NAME, root, WHERE_TO_GET, LAYOUT))
    return found


# --------------------------------------------------------------------------------------------
# patches


def _crop(array: np.ndarray, start: np.ndarray, size: int, fill: float) -> np.ndarray:
    out = np.full((size,) * 3, fill, array.dtype)
    lo = np.maximum(start, 0)
    hi = np.minimum(start + size, array.shape)
    if np.all(hi > lo):
        src = tuple(slice(a, b) for a, b in zip(lo, hi))
        dst = tuple(slice(a - s, b - s) for a, b, s in zip(lo, hi, start))
        out[dst] = array[src]
    return out


def sphere_mask(volume: CTVolume, start: np.ndarray, size: int,
                nodules: Sequence[Tuple[np.ndarray, float]]) -> np.ndarray:
    """``(size,)*3`` uint8: the voxels of the patch at voxel ``start`` (z, y, x) within
    ``diameter / 2`` mm of a nodule centre (continuous voxel position, diameter mm).
    Distances are in mm with the volume's spacing (its axes are orthonormal)."""
    grid = np.stack(np.meshgrid(*(np.arange(size) + s for s in start), indexing="ij"), -1)
    spacing = np.asarray(volume.spacing)
    mask = np.zeros((size,) * 3, bool)
    for centre, diameter in nodules:
        d2 = (((grid - centre) * spacing) ** 2).sum(-1)
        mask |= d2 <= (diameter / 2.0) ** 2
    return mask.astype(np.uint8)


def _patch_start(centre: np.ndarray, size: int) -> np.ndarray:
    return np.round(centre).astype(np.int64) - size // 2


def nodule_patches(volume: CTVolume, annotations: Sequence[Annotation], *, case: str,
                   annotations_file: Path, patch: int = 32, negatives: int = 0,
                   pad_hu: float = -1024.0, seed: int = 0) -> List[Volume3D]:
    """The patches of one volume: one around each of ``annotations`` (its rows of the csv),
    then ``negatives`` without nodule. Raises MedicalDataError naming the csv row and the .mhd
    for a centre outside the volume."""
    shape = np.array(volume.hu.shape)
    placed = []
    for a in annotations:
        centre = volume.to_voxel(a.world)
        if np.any(centre < -0.5) or np.any(centre > shape - 0.5):
            raise MedicalDataError(
                f"{annotations_file}, line {a.line}: the nodule at world ({a.world[0]:g}, "
                f"{a.world[1]:g}, {a.world[2]:g}) mm lies outside {volume.mhd} (voxel z, y, x "
                f"{', '.join(f'{v:.1f}' for v in centre)} of {' x '.join(map(str, shape))})")
        placed.append((centre, a.diameter_mm))
    out = []
    for k, (centre, _) in enumerate(placed):
        start = _patch_start(centre, patch)
        out.append(Volume3D(
            id=f"{case}_n{k}", case=case, image=_crop(volume.hu, start, patch, pad_hu),
            mask=sphere_mask(volume, start, patch, placed), spacing=volume.spacing,
            origin=volume.ras_origin(start)))
    if negatives:
        rng = np.random.default_rng([seed, int.from_bytes(case.encode()[-8:], "little")])
        made = tries = 0
        while made < negatives and tries < 100 * negatives:
            tries += 1
            centre = rng.uniform(0, 1, 3) * (shape - 1)
            start = _patch_start(centre, patch)
            mask = sphere_mask(volume, start, patch, placed)
            if mask.any():
                continue
            out.append(Volume3D(
                id=f"{case}_neg{made}", case=case, image=_crop(volume.hu, start, patch, pad_hu),
                mask=mask, spacing=volume.spacing,
                origin=volume.ras_origin(start)))
            made += 1
    return out


def convert(root: PathLike, out: PathLike, *, seed: int = 0, val_fraction: float = 0.2,
            patch: int = 32, negatives: int = 0, spacing_mm: Optional[float] = None,
            pad_hu: float = -1024.0) -> Path:
    """Convert LUNA16 under ``root`` to 3-D nodule patches in ``out``
    (:func:`~.common.write_volume_dataset`), masks spheres of the annotated diameters.

    Args:
        root: the folder holding ``subset*/`` and ``annotations.csv``.
        out: the converted folder.
        seed, val_fraction: the split by series (:func:`~.common.case_split`); the seed also
            places the negatives.
        patch: the side of the cubic patches, voxels.
        negatives: patches without a nodule per volume (0: none, and volumes without a nodule
            are left out).
        spacing_mm: resample every volume to this isotropic spacing first (None: keep the
            scan's spacing).
        pad_hu: the value where a patch leaves its volume.

    Returns ``out``.

    Raises:
        FileNotFoundError: ``root`` holds no LUNA16 (the message says where to get it).
        MedicalDataError: a short .raw (both files named), an annotation outside its volume
            (the csv row and the .mhd named), a malformed csv row; nothing is written.
    """
    root = Path(root)
    if patch < 2:
        raise ValueError(f"patch must be at least 2 voxels, got {patch}")
    volumes = find_volumes(root)
    csv_path = root / "annotations.csv"
    rows = read_annotations(csv_path)
    by_series: Dict[str, List[Annotation]] = defaultdict(list)
    absent = 0
    for a in rows:
        if a.seriesuid in volumes:
            by_series[a.seriesuid].append(a)
        else:
            absent += 1
    series = sorted(volumes if negatives else by_series)
    split = case_split(series, seed, val_fraction)
    split_record = dict(split, seed=seed, val_fraction=val_fraction)

    def samples() -> Iterator[Volume3D]:
        for uid in series:
            volume = read_volume(volumes[uid], spacing_mm)
            yield from nodule_patches(volume, by_series.get(uid, []), case=uid,
                                      annotations_file=csv_path, patch=patch,
                                      negatives=negatives, pad_hu=pad_hu, seed=seed)

    source = {
        "dataset": "LUNA16", "format": "MetaImage .mhd/.raw and annotations.csv",
        "volumes": len(series), "nodules": sum(len(by_series[uid]) for uid in series),
        "annotations_without_volume": absent,
        "mask": ("a sphere of the annotated diameter (mm) around each annotated centre: LUNA16 "
                 "gives nodule centres and diameters, not outlines"),
        "patch_voxels": int(patch), "negatives_per_volume": int(negatives),
        "resampled_to_mm": None if spacing_mm is None else float(spacing_mm),
        "axes": ("RAS (SimpleITK DICOMOrient; origins in NIfTI's RAS world, annotations.csv's "
                 "LPS x and y negated), no resampling unless resampled_to_mm"),
        "pad_hu": float(pad_hu),
    }
    return write_volume_dataset(out, NAME, samples(), split_record, source)


# --------------------------------------------------------------------------------------------
# stand-ins in the real format


def write_standins(root: PathLike, *, seed: int = 0, cases: int = 4, size: int = 32) -> Path:
    """Small synthetic LUNA16 stand-ins in its layout, written with SimpleITK.

    ``cases`` volumes ``subset0/<seriesuid>.mhd`` + ``.raw`` (int16 HU, ``size`` x ``size`` x
    ``size`` voxels, spacing (x, y, z) = (0.7, 0.7, 1.25) mm, a non-zero origin; every other
    volume has its y axis flipped, direction diag(1, -1, 1), so world -> voxel needs the
    direction), a body of soft tissue around a lung field (-850 HU) and one to three bright
    spheres (+40 HU) of 4-9 mm diameter, listed in ``annotations.csv`` by world centre and
    diameter (one row for a series that is not in the stand-ins, as when only some subsets are
    downloaded). Deterministic for a ``seed``. Whole or nothing; ``root`` may be missing, empty
    or earlier stand-ins (replaced), anything else raises FileExistsError. Returns ``root``.
    """
    import SimpleITK as sitk

    root = Path(root)
    if size < 16:
        raise ValueError(f"size must be at least 16 voxels, got {size}")

    def generate_uid(*what: Any) -> str:  # LUNA16's root, digits from a hash of seed and case
        digest = hashlib.sha256(repr((seed, "luna16") + what).encode()).digest()
        return "1.3.6.1.4.1.14519.5.2.1.6279.6001." + str(int.from_bytes(digest[:12], "big"))
    spacing = (0.7, 0.7, 1.25)
    rows: List[List[Any]] = []
    with standins_folder(root, f"luna16 seed={seed} cases={cases} size={size}") as tmp:
        (tmp / "subset0").mkdir()
        for c in range(cases):
            rng = np.random.default_rng([seed, c, 0x1A16])
            uid = generate_uid(c)
            flipped = c % 2 == 1
            direction = (1, 0, 0, 0, -1, 0, 0, 0, 1) if flipped else (1, 0, 0, 0, 1, 0, 0, 0, 1)
            origin = (-180.5 + 7 * c, (120.25 if flipped else -110.25) - 3 * c, -300.0 + 11 * c)
            z, y, x = np.mgrid[0:size, 0:size, 0:size].astype(np.float64)
            centre = (size - 1) / 2.0
            r_body = np.hypot(y - centre, x - centre)
            hu = np.where(r_body < 0.47 * size, 30.0, -1000.0)
            hu = np.where(r_body < 0.38 * size, -850.0, hu)
            image = sitk.GetImageFromArray(np.zeros((size,) * 3, np.int16))
            image.SetSpacing(spacing)
            image.SetOrigin(origin)
            image.SetDirection(direction)
            placed: List[Tuple[np.ndarray, float]] = []
            scale = np.array(spacing[::-1])
            for _ in range(1 + c % 3):
                diameter = float(rng.uniform(4.0, 9.0))
                for _try in range(100):  # apart from the spheres already placed
                    voxel = np.array([rng.uniform(0.3, 0.7) * (size - 1),
                                      centre + rng.uniform(-0.22, 0.22) * size,
                                      centre + rng.uniform(-0.22, 0.22) * size])  # z, y, x
                    if all(np.linalg.norm((voxel - v) * scale) > (diameter + d) / 2 + 2
                           for v, d in placed):
                        break
                else:
                    continue
                placed.append((voxel, diameter))
                d2 = (((np.stack([z, y, x], -1) - voxel) * scale) ** 2).sum(-1)
                hu[d2 <= (diameter / 2) ** 2] = 40.0
                world = image.TransformContinuousIndexToPhysicalPoint(
                    [float(v) for v in voxel[::-1]])
                rows.append([uid, *(f"{v:.6f}" for v in world), f"{diameter:.6f}"])
            hu = np.clip(np.round(hu + rng.normal(0.0, 15.0, hu.shape)), -1024, 3071)
            volume = sitk.GetImageFromArray(hu.astype(np.int16))
            volume.CopyInformation(image)
            sitk.WriteImage(volume, str(tmp / "subset0" / f"{uid}.mhd"), useCompression=False)
        missing_uid = generate_uid("not downloaded")
        rows.append([missing_uid, "10.0", "20.0", "-30.0", "5.5"])
        write_csv_atomic(tmp / "annotations.csv", rows, COLUMNS)
    return root
