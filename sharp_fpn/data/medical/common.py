"""What every medical data set shares: samples, the split by case, the writers, the messages.

A converter (:mod:`.brats19`, :mod:`.lits17`, :mod:`.lidc`, :mod:`.luna16`) reads its data set
in the layout it is downloaded in and hands its samples to one writer:

* 2-D sets (:class:`Slice2D`) go through :func:`write_slice_dataset`: PNG images (and label
  PNGs) with COCO instance annotations, one instance per 8-connected component of the mask, so
  the semantic path (the union of an image's instances) and Mask R-CNN both read them;
* 3-D sets (:class:`Volume3D`) go through :func:`write_volume_dataset`: NIfTI image and mask
  volumes with a record list.

Rules every writer keeps:

* whole or nothing: everything is written into a temporary folder beside ``out`` and renamed
  to ``out`` when complete; an error on the way (a bad case found while the samples are read)
  removes it and leaves no ``out``. An existing ``out`` is replaced only if this module wrote
  it (its ``dataset.json`` says so) or it is an empty folder; anything else is refused;
* the split is by case (:func:`case_split`), recorded in ``split.json`` with its seed, so no
  patient has slices on both sides;
* canonical order: samples are sorted by id within a split, so a rerun writes identical files
  whatever order the cases were read in.

Uses numpy, nibabel, Pillow, scikit-image and pycocotools; no torch, no detectron2.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from ...utils import PathLike

__all__ = [
    "FORMAT_VERSION",
    "MedicalDataError",
    "Slice2D",
    "Volume3D",
    "case_split",
    "missing_dataset_message",
    "axial_slices",
    "load_nifti",
    "percentile_to_uint8",
    "same_grid",
    "standins_folder",
    "to_canonical",
    "window_to_uint8",
    "write_slice_dataset",
    "write_volume_dataset",
]

FORMAT_VERSION = 1
#: The ``writer`` field of a dataset.json this module wrote (what lets a rerun replace it).
WRITER = "sharp_fpn.data.medical"

#: ``python tools/convert_medical.py <command>`` of each data set (module NAME -> command).
COMMANDS = {"brats19": "brats19", "lits17": "lits17", "lidc": "lidc_idri", "luna16": "luna16"}


class MedicalDataError(ValueError):
    """Bad input: the message starts with the offending file's path and says the problem."""


@dataclass
class Slice2D:
    """One 2-D sample.

    Attributes:
        id: unique sample id, e.g. ``"BraTS19_2013_2_1_z077"`` (a file name stem).
        case: the patient/case it comes from (the split is by case).
        image: ``(H, W, 3)`` uint8, what the 2-D models see (windowed/normalised).
        mask: ``(H, W)`` bool, the paper's target (foreground).
        labels: ``(H, W)`` uint8, the data set's own label values kept, or None.
        spacing: ``(row, col)`` pixel size in mm.
    """

    id: str
    case: str
    image: np.ndarray
    mask: np.ndarray
    labels: Optional[np.ndarray] = None
    spacing: Tuple[float, float] = (1.0, 1.0)


@dataclass
class Volume3D:
    """One 3-D sample.

    Attributes:
        id: unique sample id (a file name stem).
        case: the patient/case it comes from.
        image: ``(Z, Y, X)`` float32 (e.g. HU).
        mask: ``(Z, Y, X)`` uint8, 0/1.
        spacing: ``(z, y, x)`` voxel size in mm.
        origin: ``(z, y, x)`` world position of voxel (0, 0, 0) in mm.
    """

    id: str
    case: str
    image: np.ndarray
    mask: np.ndarray
    spacing: Tuple[float, float, float]
    origin: Tuple[float, float, float] = (0.0, 0.0, 0.0)


# --------------------------------------------------------------------------------------------
# intensities


def percentile_to_uint8(
    values: np.ndarray, where: Optional[np.ndarray] = None, low: float = 0.5, high: float = 99.5
) -> np.ndarray:
    """``values`` scaled so that its ``low``/``high`` percentiles (over ``where``, default all
    of it) become 0/255, clipped, as uint8 (the percentile normalisation of StarDist and
    Cellpose). A constant region maps to 0."""
    values = np.asarray(values, dtype=np.float64)
    sample = values[where] if where is not None and np.any(where) else values.ravel()
    lo, hi = np.percentile(sample, [low, high]) if sample.size else (0.0, 0.0)
    if hi <= lo:
        return np.zeros(values.shape, np.uint8)
    scaled = (values - lo) / (hi - lo)
    return np.round(np.clip(scaled, 0.0, 1.0) * 255.0).astype(np.uint8)


def window_to_uint8(values: np.ndarray, level: float, width: float) -> np.ndarray:
    """A CT window: ``[level - width/2, level + width/2]`` (HU) mapped linearly to 0..255,
    clipped, as uint8. Raises ValueError for a width that is not positive."""
    if not width > 0:
        raise ValueError(f"window width must be positive, got {width}")
    scaled = (np.asarray(values, dtype=np.float64) - (level - width / 2.0)) / width
    return np.round(np.clip(scaled, 0.0, 1.0) * 255.0).astype(np.uint8)


# --------------------------------------------------------------------------------------------
# NIfTI (BraTS19, LiTS17)

#: Interpolations of the optional resampling, by name (scipy spline orders).
INTERPOLATIONS = {"nearest": 0, "linear": 1, "cubic": 3}


def load_nifti(path: PathLike) -> Any:
    """The 3-D NIfTI image at ``path`` (nibabel, header read, data not yet). Raises
    MedicalDataError naming the file when it is unreadable or not 3-D."""
    import nibabel as nib

    try:
        image = nib.load(str(path))
        shape = image.shape
    except Exception as err:  # nibabel raises ImageFileError, OSError, EOFError...
        raise MedicalDataError(f"{path}: not a readable NIfTI file ({err})") from None
    if len(shape) != 3:
        raise MedicalDataError(f"{path}: a 3-D volume was expected, the image is {shape}")
    return image


def same_grid(path: PathLike, image: Any, ref_path: PathLike, reference: Any) -> None:
    """Raise MedicalDataError naming ``path`` unless ``image`` has ``reference``'s shape and
    affine (1e-3 mm): a segmentation must lie voxel for voxel on its image."""
    if tuple(image.shape) != tuple(reference.shape):
        raise MedicalDataError(
            f"{path}: shape {tuple(image.shape)} differs from {Path(ref_path).name}'s "
            f"{tuple(reference.shape)}")
    if not np.allclose(image.affine, reference.affine, atol=1e-3):
        raise MedicalDataError(
            f"{path}: its affine (orientation, spacing, origin) differs from "
            f"{Path(ref_path).name}'s:\n{np.round(image.affine, 4)}\nvs\n"
            f"{np.round(reference.affine, 4)}")


def to_canonical(image: Any, spacing: Optional[Sequence[float]] = None,
                 interpolation: str = "linear") -> Any:
    """``image`` in RAS+ orientation (``nibabel.as_closest_canonical``: axes permuted and
    flipped, no resampling) or, when ``spacing`` (x, y, z mm) is given, resampled to it with
    ``nibabel.processing.resample_to_output`` and ``interpolation`` (one of
    :data:`INTERPOLATIONS`; use ``"nearest"`` for label maps)."""
    import nibabel as nib

    if spacing is None:
        return nib.as_closest_canonical(image)
    if interpolation not in INTERPOLATIONS:
        raise ValueError(f"interpolation must be one of {sorted(INTERPOLATIONS)}, "
                         f"got {interpolation!r}")
    spacing = tuple(float(v) for v in spacing)
    if len(spacing) != 3 or min(spacing) <= 0:
        raise ValueError(f"spacing must be three positive mm (x, y, z), got {spacing}")
    from nibabel.processing import resample_to_output

    return resample_to_output(nib.as_closest_canonical(image), spacing,
                              order=INTERPOLATIONS[interpolation], mode="constant", cval=0.0)


def axial_slices(data: np.ndarray) -> np.ndarray:
    """A RAS+ ``(X, Y, Z)`` array as ``(Z, rows, cols)`` axial slices in the radiological
    view: slice 0 the most inferior, row 0 anterior, column 0 the patient's right (as viewers
    show CT and MR). A slice's pixel spacing is (y, x) mm."""
    return np.ascontiguousarray(np.transpose(data[::-1, ::-1, :], (2, 1, 0)))


@contextmanager
def standins_folder(root: PathLike, folder: str, params: Mapping[str, Any]) -> Iterator[Optional[Path]]:
    """Where ``write_standins`` writes ``root/folder`` whole or not at all.

    Yields a temporary folder beside it, renamed to ``root/folder`` when the block ends without
    error (removed on an error); yields None when ``root/folder`` already holds stand-ins of
    the same ``params`` (they are deterministic: nothing to do). Raises FileExistsError if
    ``root/folder`` exists otherwise. The parameters are kept in
    ``root/folder/.sharp-fpn-standins.json``.
    """
    target = Path(root) / folder
    record = json.dumps(dict(params), sort_keys=True)
    marker = target / ".sharp-fpn-standins.json"
    if target.exists():
        if marker.is_file() and marker.read_text(encoding="utf-8") == record:
            yield None
            return
        raise FileExistsError(f"{target}: exists and does not hold stand-ins of {record}; "
                              "remove it or choose another root")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp"))
    try:
        yield tmp
        (tmp / marker.name).write_text(record, encoding="utf-8")
        os.chmod(tmp, 0o755)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# --------------------------------------------------------------------------------------------
# split


def case_split(cases: Sequence[str], seed: int, val_fraction: float) -> Dict[str, List[str]]:
    """The split by case: ``{"train": [...], "val": [...]}``, each sorted.

    The distinct cases are sorted, shuffled by ``numpy.random.default_rng(seed)`` and the first
    ``round(val_fraction * n)`` go to validation; with two or more cases each side gets at least
    one (one case goes to training). Raises ValueError for a fraction outside [0, 1).
    """
    if not 0.0 <= float(val_fraction) < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    ordered = sorted(set(cases))
    n = len(ordered)
    n_val = int(round(float(val_fraction) * n))
    if n >= 2:
        n_val = min(max(n_val, 1), n - 1)
    else:
        n_val = 0
    order = np.random.default_rng(seed).permutation(n)
    shuffled = [ordered[i] for i in order]
    return {"train": sorted(shuffled[n_val:]), "val": sorted(shuffled[:n_val])}


def _case_side(split: Mapping[str, Sequence[str]]) -> Dict[str, str]:
    side: Dict[str, str] = {}
    for name in ("train", "val"):
        for case in split.get(name, ()):
            if case in side:
                raise ValueError(f"case {case!r} is in both the train and the val split")
            side[case] = name
    return side


def _split_record(split: Mapping[str, Any]) -> Dict[str, Any]:
    record = {"seed": split.get("seed"), "val_fraction": split.get("val_fraction")}
    record.update({name: sorted(split.get(name, ())) for name in ("train", "val")})
    return record


# --------------------------------------------------------------------------------------------
# whole-or-nothing output folders


def _written_by_us(out: Path) -> bool:
    try:
        meta = json.loads((out / "dataset.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(meta, dict) and meta.get("writer") == WRITER


class _Staging:
    """A temporary folder beside ``out``, renamed to ``out`` by :meth:`commit`."""

    def __init__(self, out: Path):
        self.out = out
        if out.exists() and not out.is_dir():
            raise FileExistsError(f"{out}: is a file, not a folder for the converted data set")
        if out.is_dir() and any(out.iterdir()) and not _written_by_us(out):
            raise FileExistsError(
                f"{out}: exists and was not written by sharp-fpn's medical converters; choose "
                "another output folder, or empty it"
            )
        out.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))

    def commit(self) -> None:
        os.chmod(self.tmp, 0o755)
        old: Optional[Path] = None
        if self.out.exists():
            old = Path(tempfile.mkdtemp(dir=self.out.parent, prefix=f".{self.out.name}.",
                                        suffix=".old"))
            os.replace(self.out, old / "data")
        os.replace(self.tmp, self.out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)

    def discard(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=1, sort_keys=True) + "\n", encoding="utf-8")


# --------------------------------------------------------------------------------------------
# 2-D


def _components(mask: np.ndarray) -> Iterator[np.ndarray]:
    """The 8-connected components of ``mask``, in scikit-image's label order (raster order
    of each component's first pixel)."""
    from skimage.measure import label

    labelled, count = label(mask, connectivity=2, return_num=True)
    for k in range(1, count + 1):
        yield labelled == k


def _annotations(mask: np.ndarray) -> List[Dict[str, Any]]:
    from pycocotools import mask as mask_utils

    out = []
    for component in _components(mask):
        rle = mask_utils.encode(np.asfortranarray(component.astype(np.uint8)))
        out.append({
            "category_id": 1,
            "segmentation": {"size": [int(s) for s in rle["size"]],
                             "counts": rle["counts"].decode("ascii")},
            "area": int(mask_utils.area(rle)),
            "bbox": [float(v) for v in mask_utils.toBbox(rle)],
            "iscrowd": 0,
        })
    return out


def _check_slice(s: Slice2D) -> None:
    if not s.id or "/" in s.id or s.id.startswith("."):
        raise ValueError(f"sample id {s.id!r} is not a file name")
    image, mask = np.asarray(s.image), np.asarray(s.mask)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"{s.id}: image must be (H, W, 3) uint8, got {image.shape} {image.dtype}")
    if mask.shape != image.shape[:2]:
        raise ValueError(f"{s.id}: mask is {mask.shape} but its image is {image.shape[:2]}")
    if s.labels is not None:
        labels = np.asarray(s.labels)
        if labels.shape != mask.shape or labels.dtype != np.uint8:
            raise ValueError(f"{s.id}: labels must be {mask.shape} uint8, got "
                             f"{labels.shape} {labels.dtype}")


def write_slice_dataset(
    out: PathLike,
    name: str,
    slices: Iterable[Slice2D],
    split: Mapping[str, Any],
    source: Mapping[str, Any],
) -> Path:
    """Write a 2-D data set to ``out``, whole or nothing (see the module's rules).

    Layout::

        out/images/<id>.png              RGB uint8
        out/labels/<id>.png              uint8 label values (when Slice2D.labels is given)
        out/annotations/train.json       COCO instances, category 1 named ``name``, one
        out/annotations/val.json         instance per 8-connected component of the mask (RLE);
                                         images without foreground kept (no annotations);
                                         images carry ``file_name`` (relative to out),
                                         ``image_key`` (the id), ``case`` and
                                         ``spacing`` ([row, col] mm)
        out/split.json                   {"seed", "val_fraction", "train": [cases], "val": [...]}
        out/dataset.json                 {"name", "kind": "2d", "format_version", "source",
                                          "counts": {"train", "val"}, "spacing": {case: [r, c]},
                                          "spacing_varies": {case: [[r, c], ...]}}

    Args:
        out: the folder to write (its parent is created if needed).
        name: the data set's name (the COCO category's name too).
        slices: the samples, in any order; read once.
        split: ``{"train": [cases], "val": [cases]}`` (:func:`case_split`), with ``seed`` and
            ``val_fraction`` when known (recorded in split.json).
        source: what was converted and how (root, options...); recorded in dataset.json.

    Returns ``out``.

    Raises:
        ValueError: a sample of a case in neither split, a duplicate id, arrays of the wrong
            shape or type.
        FileExistsError: ``out`` exists and was not written by this module.
        Whatever ``slices`` raises (MedicalDataError for bad input); in every case no ``out``
        is left (an earlier one stays as it was).
    """
    from PIL import Image

    out = Path(out)
    side = _case_side(split)
    staging = _Staging(out)
    try:
        (staging.tmp / "images").mkdir()
        records: Dict[str, List[Tuple[str, Dict[str, Any], List[Dict[str, Any]]]]] = {
            "train": [], "val": []}
        spacing: Dict[str, List[float]] = {}
        seen = set()
        for s in slices:
            _check_slice(s)
            if s.case not in side:
                raise ValueError(f"{s.id}: its case {s.case!r} is in neither the train nor the "
                                 "val split")
            if s.id in seen:
                raise ValueError(f"{s.id}: two samples have this id")
            seen.add(s.id)
            pixel = [float(s.spacing[0]), float(s.spacing[1])]
            if pixel not in spacing.setdefault(s.case, []):
                spacing[s.case].append(pixel)
            Image.fromarray(np.ascontiguousarray(s.image), "RGB").save(
                staging.tmp / "images" / f"{s.id}.png")
            if s.labels is not None:
                (staging.tmp / "labels").mkdir(exist_ok=True)
                Image.fromarray(np.ascontiguousarray(s.labels), "L").save(
                    staging.tmp / "labels" / f"{s.id}.png")
            height, width = s.mask.shape
            image = {"file_name": f"images/{s.id}.png", "height": int(height),
                     "width": int(width), "image_key": s.id, "case": s.case,
                     "spacing": pixel}
            records[side[s.case]].append((s.id, image, _annotations(np.asarray(s.mask, bool))))
        (staging.tmp / "annotations").mkdir()
        counts = {}
        for subset, items in records.items():
            images, annotations = [], []
            for image_id, (_, image, anns) in enumerate(sorted(items, key=lambda r: r[0]), 1):
                images.append({"id": image_id, **image})
                for ann in anns:
                    annotations.append({"id": len(annotations) + 1, "image_id": image_id, **ann})
            coco = {"images": images, "annotations": annotations,
                    "categories": [{"id": 1, "name": name}]}
            (staging.tmp / "annotations" / f"{subset}.json").write_text(
                json.dumps(coco, separators=(",", ":")), encoding="utf-8")
            counts[subset] = len(images)
        _write_json(staging.tmp / "split.json", _split_record(split))
        _write_json(staging.tmp / "dataset.json", {
            "name": name, "kind": "2d", "format_version": FORMAT_VERSION, "writer": WRITER,
            "source": dict(source), "counts": counts,
            # a case's pixel size, or (a patient with series of several pixel sizes) all of
            # them under spacing_varies; every COCO image carries its own
            "spacing": {case: spacing[case][0] for case in sorted(spacing)
                        if len(spacing[case]) == 1},
            "spacing_varies": {case: sorted(spacing[case]) for case in sorted(spacing)
                               if len(spacing[case]) > 1},
        })
        staging.commit()
    except BaseException:
        staging.discard()
        raise
    return out


# --------------------------------------------------------------------------------------------
# 3-D


def _affine(spacing: Sequence[float], origin: Sequence[float]) -> np.ndarray:
    """The NIfTI affine of a (Z, Y, X) grid stored as (X, Y, Z): voxel (i, j, k) at
    ``origin + (i*sx, j*sy, k*sz)`` (x, y, z order)."""
    sz, sy, sx = (float(v) for v in spacing)
    oz, oy, ox = (float(v) for v in origin)
    affine = np.diag([sx, sy, sz, 1.0])
    affine[:3, 3] = [ox, oy, oz]
    return affine


def write_volume_dataset(
    out: PathLike,
    name: str,
    volumes: Iterable[Volume3D],
    split: Mapping[str, Any],
    source: Mapping[str, Any],
) -> Path:
    """Write a 3-D data set to ``out``, whole or nothing (see the module's rules).

    Layout::

        out/volumes/<id>_image.nii.gz    float32 } nibabel, the affine from spacing and origin;
        out/volumes/<id>_mask.nii.gz     uint8   } arrays in NIfTI's (X, Y, Z) order, the
                                                   transpose of Volume3D's (Z, Y, X)
        out/split.json                   as :func:`write_slice_dataset`
        out/dataset.json                 {"name", "kind": "3d", "format_version", "source",
                                          "train": [{"id", "case", "image", "mask",
                                                     "spacing", "origin"}], "val": [...]}
                                         (image and mask relative to out)

    Arguments, return value and errors as :func:`write_slice_dataset`.
    """
    import nibabel as nib

    out = Path(out)
    side = _case_side(split)
    staging = _Staging(out)
    try:
        (staging.tmp / "volumes").mkdir()
        records: Dict[str, List[Dict[str, Any]]] = {"train": [], "val": []}
        seen = set()
        for v in volumes:
            if not v.id or "/" in v.id or v.id.startswith("."):
                raise ValueError(f"sample id {v.id!r} is not a file name")
            image, mask = np.asarray(v.image), np.asarray(v.mask)
            if image.ndim != 3 or mask.shape != image.shape:
                raise ValueError(f"{v.id}: mask is {mask.shape} but its image is {image.shape}")
            if v.case not in side:
                raise ValueError(f"{v.id}: its case {v.case!r} is in neither the train nor the "
                                 "val split")
            if v.id in seen:
                raise ValueError(f"{v.id}: two samples have this id")
            seen.add(v.id)
            affine = _affine(v.spacing, v.origin)
            rel_image, rel_mask = f"volumes/{v.id}_image.nii.gz", f"volumes/{v.id}_mask.nii.gz"
            for rel, array, dtype in ((rel_image, image, np.float32), (rel_mask, mask, np.uint8)):
                data = np.ascontiguousarray(np.transpose(array.astype(dtype), (2, 1, 0)))
                nifti = nib.Nifti1Image(data, affine)
                nifti.header.set_xyzt_units("mm")
                nifti.header.set_qform(affine, code=1)
                nifti.header.set_sform(affine, code=1)
                nib.save(nifti, staging.tmp / rel)
            records[side[v.case]].append({
                "id": v.id, "case": v.case, "image": rel_image, "mask": rel_mask,
                "spacing": [float(s) for s in v.spacing],
                "origin": [float(o) for o in v.origin],
            })
        _write_json(staging.tmp / "split.json", _split_record(split))
        meta: Dict[str, Any] = {"name": name, "kind": "3d", "format_version": FORMAT_VERSION,
                                "writer": WRITER, "source": dict(source)}
        for subset, items in records.items():
            meta[subset] = sorted(items, key=lambda r: r["id"])
        meta["counts"] = {subset: len(items) for subset, items in records.items()}
        _write_json(staging.tmp / "dataset.json", meta)
        staging.commit()
    except BaseException:
        staging.discard()
        raise
    return out


# --------------------------------------------------------------------------------------------
# messages


def missing_dataset_message(dataset: str, root: PathLike, where_to_get: str, layout: str) -> str:
    """One paragraph for a ``root`` that holds no ``dataset``: where to download it, where to
    put it (the expected ``layout``, relative to ``root``), and the convert command.

    ``dataset`` is the module's NAME (``"brats19"``, ``"lits17"``, ``"lidc"``, ``"luna16"``) or
    the command's (``"lidc_idri"``); the command line names the converted folder under the
    datasets root (``$DETECTRON2_DATASETS``), where the registered names read it.
    """
    from ..catalog import datasets_root

    key = dataset.lower().replace("-", "_")
    module = {"lidc_idri": "lidc"}.get(key, key)
    command = COMMANDS.get(module, key)
    return (
        f"{root} holds no {dataset} data set. Get it from {where_to_get}, and put it so that "
        f"{root} holds {layout}. Then convert it once with: python tools/convert_medical.py "
        f"{command} {root} --out {datasets_root() / module} (see datasets/README.md)"
    )
