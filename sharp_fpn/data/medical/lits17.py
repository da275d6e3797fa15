"""LiTS 2017 (liver and liver tumour, CT): NIfTI volumes to 2-D liver slices, HU windowed.

Reads the training set as the challenge ships it: ``volume-<n>.nii`` with
``segmentation-<n>.nii`` (``.nii.gz`` too), anywhere under ``root`` (the download's
``Training Batch 1/`` and ``Training Batch 2/`` folders, or all in one).

Rules:

* each volume and its segmentation are read with nibabel and must share shape and affine (else
  :class:`MedicalDataError` naming the segmentation); a volume without its segmentation (or
  the reverse), or a number found twice, is refused naming the file. Orientation and spacing
  come from the headers: RAS+ (``nibabel.as_closest_canonical``), axial slices in the
  radiological view (:func:`~.common.axial_slices`); resampling only when asked
  (``spacing=(x, y, z)`` mm, ``interpolation`` for the CT, nearest for the labels);
* intensities are Hounsfield units as stored (nibabel applies the header's slope and
  intercept); the 2-D image is the CT window ``window=(level, width)``, default the abdominal
  soft-tissue window, level 40 HU, width 400 HU (-160..240 HU), mapped to 0..255
  (:func:`~.common.window_to_uint8`); ``channels="gray"`` (default) puts the slice in all
  three channels, ``"adjacent"`` the slices below, at and above it (2.5-D, the edge slice
  repeated);
* slices kept: those with liver (``seg >= 1``), plus ``other_fraction`` (default 0) of the
  others, drawn per case with ``numpy.random.default_rng([seed, n])``;
* mask: liver, ``seg >= 1`` (tumour included); labels keep LiTS's 0 (background), 1 (liver),
  2 (tumour); any other value is refused naming the file;
* the split is by case; the case of ``volume-<n>`` is ``lits17_<nnn>``, its slices
  ``lits17_<nnn>_z<kkk>`` (``k`` the axial index in RAS+, 0 most inferior).
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from ...utils import PathLike
from .common import (
    MedicalDataError,
    Slice2D,
    axial_slices,
    case_split,
    load_nifti,
    missing_dataset_message,
    same_grid,
    standins_folder,
    to_canonical,
    window_to_uint8,
    write_slice_dataset,
)
from .registry import DOWNLOADS

__all__ = ["NAME", "DEFAULT_WINDOW", "convert", "find_cases", "read_case", "write_standins"]

NAME = "lits17"
#: The abdominal soft-tissue CT window (level, width) in HU.
DEFAULT_WINDOW = (40.0, 400.0)
LABELS = (0, 1, 2)
CHANNELS = ("gray", "adjacent")
STANDIN_FOLDER = "Training Batch 1"
_FILE = re.compile(r"^(volume|segmentation)-(\d+)\.nii(\.gz)?$")


def find_cases(root: PathLike) -> List[Tuple[int, Path, Path]]:
    """``[(n, volume path, segmentation path)]`` under ``root``, sorted by ``n``.

    Raises FileNotFoundError (where to get it, the layout, the command) when ``root`` holds no
    volume, and MedicalDataError naming the file for a volume without its segmentation, a
    segmentation without its volume, or a number found twice.
    """
    root = Path(root)
    found: Dict[str, Dict[int, Path]] = {"volume": {}, "segmentation": {}}
    if root.is_dir():
        for path in sorted(root.rglob("*.nii*")):
            if any(part.startswith(".") for part in path.relative_to(root).parts):
                continue
            match = _FILE.match(path.name)
            if not match:
                continue
            kind, n = match.group(1), int(match.group(2))
            if n in found[kind]:
                raise MedicalDataError(f"{path}: {kind} {n} is also {found[kind][n]}")
            found[kind][n] = path
    if not found["volume"]:
        raise FileNotFoundError(missing_dataset_message(NAME, root, *DOWNLOADS[NAME]))
    for kind, other in (("volume", "segmentation"), ("segmentation", "volume")):
        for n, path in sorted(found[kind].items()):
            if n not in found[other]:
                raise MedicalDataError(f"{path}: has no {other}-{n}.nii under {root}")
    return [(n, found["volume"][n], found["segmentation"][n]) for n in sorted(found["volume"])]


def read_case(
    volume: PathLike,
    segmentation: PathLike,
    spacing: Optional[Sequence[float]] = None,
    interpolation: str = "linear",
) -> Tuple[np.ndarray, np.ndarray, Tuple[float, float, float]]:
    """One case as RAS+ arrays: ``(HU (X, Y, Z) float32, seg (X, Y, Z) uint8, voxel size
    (x, y, z) mm)``. Raises MedicalDataError naming the file for an unreadable file, a
    segmentation whose shape or affine differs from its volume's, or a label other than 0-2."""
    image, seg_image = load_nifti(volume), load_nifti(segmentation)
    same_grid(segmentation, seg_image, volume, image)
    ct = np.asarray(to_canonical(image, spacing, interpolation).get_fdata(dtype=np.float32))
    seg_image = to_canonical(seg_image, spacing, "nearest")
    seg = np.asarray(seg_image.dataobj, dtype=np.float64)
    bad = [int(v) if float(v).is_integer() else v
           for v in np.unique(seg).tolist() if v not in LABELS]
    if bad:
        raise MedicalDataError(
            f"{segmentation}: holds label values {bad[:5]} (LiTS labels are 0, 1, 2)")
    zooms = tuple(round(float(z), 6) for z in seg_image.header.get_zooms()[:3])
    return ct, seg.astype(np.uint8), zooms  # type: ignore[return-value]


def case_slices(
    case: str,
    ct: np.ndarray,
    seg: np.ndarray,
    zooms: Tuple[float, float, float],
    rng: np.random.Generator,
    window: Tuple[float, float] = DEFAULT_WINDOW,
    other_fraction: float = 0.0,
    channels: str = "gray",
) -> Iterator[Slice2D]:
    """The kept axial slices of one case read by :func:`read_case` (see the module's rules)."""
    windowed = axial_slices(window_to_uint8(ct, *window))
    labels = axial_slices(seg)
    liver = labels.reshape(labels.shape[0], -1).max(axis=1) >= 1
    others = np.flatnonzero(~liver)
    drawn = rng.permutation(others)[: int(round(other_fraction * len(others)))]
    keep = np.sort(np.concatenate([np.flatnonzero(liver), drawn]))
    last = labels.shape[0] - 1
    for k in keep.tolist():
        if channels == "adjacent":
            image = np.stack([windowed[max(k - 1, 0)], windowed[k], windowed[min(k + 1, last)]],
                             axis=-1)
        else:
            image = np.repeat(windowed[k][..., None], 3, axis=-1)
        yield Slice2D(
            id=f"{case}_z{k:03d}", case=case, image=image, mask=labels[k] >= 1,
            labels=labels[k], spacing=(zooms[1], zooms[0]),
        )


def convert(
    root: PathLike,
    out: PathLike,
    *,
    seed: int = 0,
    val_fraction: float = 0.2,
    window: Sequence[float] = DEFAULT_WINDOW,
    other_fraction: float = 0.0,
    channels: str = "gray",
    spacing: Optional[Sequence[float]] = None,
    interpolation: str = "linear",
) -> Path:
    """Convert LiTS17 volumes under ``root`` to a 2-D slice data set in ``out``
    (:func:`~.common.write_slice_dataset`), split by case with ``seed`` and ``val_fraction``.

    Args:
        root: the download (see the module docstring).
        out: the folder to write, whole or not at all.
        window: CT window ``(level, width)`` in HU (default 40, 400).
        other_fraction: the share of slices without liver kept too (0 to 1).
        channels: ``"gray"`` or ``"adjacent"`` (see the module docstring).
        spacing: resample to these (x, y, z) mm first; None keeps the stored grid.
        interpolation: the CT's resampling (``"linear"``, ``"cubic"``, ``"nearest"``).

    Raises:
        FileNotFoundError: ``root`` holds no LiTS17 (the message says where to get it).
        MedicalDataError: a bad file (named); ``out`` is then not written.
        ValueError: a bad option.
    """
    root, out = Path(root), Path(out)
    level, width = (float(v) for v in window)
    if not width > 0:
        raise ValueError(f"window width must be positive, got {width}")
    if not 0.0 <= float(other_fraction) <= 1.0:
        raise ValueError(f"other_fraction must be in [0, 1], got {other_fraction}")
    if channels not in CHANNELS:
        raise ValueError(f"channels must be one of {CHANNELS}, got {channels!r}")
    cases = find_cases(root)
    names = {n: f"lits17_{n:03d}" for n, _, _ in cases}
    split = {**case_split(list(names.values()), seed, val_fraction), "seed": seed,
             "val_fraction": val_fraction}

    def slices() -> Iterator[Slice2D]:
        for n, volume, segmentation in cases:
            ct, seg, zooms = read_case(volume, segmentation, spacing, interpolation)
            rng = np.random.default_rng([seed, n])
            yield from case_slices(names[n], ct, seg, zooms, rng, (level, width),
                                   float(other_fraction), channels)

    source: Dict[str, Any] = {
        "dataset": "LiTS 2017 training (volume-<n>.nii, segmentation-<n>.nii)",
        "root": str(root),
        "cases": len(cases),
        "window_hu": {"level": level, "width": width},
        "channels": channels,
        "slices": f"every slice with liver (seg >= 1), plus {other_fraction} of the others "
                  "(numpy default_rng([seed, n]))",
        "orientation": ("RAS+ (nibabel.as_closest_canonical), axial slices in the radiological "
                        "view: row 0 anterior, column 0 the patient's right; id z index 0 "
                        "most inferior"),
        "resampling": ({"spacing_xyz_mm": [float(s) for s in spacing],
                        "interpolation": interpolation, "seg": "nearest"}
                       if spacing is not None else None),
        "mask": "liver: seg >= 1 (tumour included)",
        "labels": {"0": "background", "1": "liver", "2": "tumour"},
    }
    return write_slice_dataset(out, NAME, slices(), split, source)


# --------------------------------------------------------------------------------------------
# stand-ins


def _standin_case(rng: np.random.Generator, size: int) -> Tuple[np.ndarray, np.ndarray]:
    """RAS+ (X, Y, Z) HU and seg of one synthetic abdomen: air, an elliptic body of soft
    tissue, a spine, and a liver on the patient's right spanning part of the slices, with one
    or two hypodense tumours."""
    shape = (size, size, max(12, size // 2))
    x, y, z = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    body = (x / 0.9) ** 2 + (y / 0.7) ** 2 < 1.0
    hu = np.full(shape, -1000.0)
    hu[body] = 40.0
    hu[body & (x ** 2 + (y + 0.45) ** 2 < 0.12 ** 2)] = 700.0  # spine, posterior
    # the liver: the patient's right is -x in RAS+, anterior is +y
    cx, cy, cz = -0.35 + rng.uniform(-0.08, 0.08), 0.1 + rng.uniform(-0.08, 0.08), rng.uniform(-0.2, 0.2)
    liver = ((x - cx) / 0.4) ** 2 + ((y - cy) / 0.35) ** 2 + ((z - cz) / 0.5) ** 2 < 1.0
    seg = np.zeros(shape, np.uint8)
    seg[liver & body] = 1
    hu[seg == 1] = 100.0
    for _ in range(int(rng.integers(1, 3))):
        tx, ty, tz = cx + rng.uniform(-0.15, 0.15), cy + rng.uniform(-0.1, 0.1), cz + rng.uniform(-0.2, 0.2)
        tumour = ((x - tx) ** 2 + (y - ty) ** 2) / 0.1 ** 2 + (z - tz) ** 2 / 0.2 ** 2 < 1.0
        seg[tumour & (seg == 1)] = 2
    hu[seg == 2] = 45.0
    hu = hu + rng.normal(0.0, 12.0, shape)
    return np.clip(np.round(hu), -1024, 3071).astype(np.int16), seg


def write_standins(root: PathLike, *, seed: int = 0, cases: int = 4, size: int = 32) -> Path:
    """Write ``cases`` small synthetic LiTS17 CT volumes in the real layout,
    ``root/Training Batch 1/volume-<n>.nii`` and ``segmentation-<n>.nii`` (uncompressed, as
    LiTS ships them; int16 HU and uint8 labels) and return ``root`` (what :func:`convert`
    accepts).

    Each volume is ``size x size x max(12, size // 2)`` voxels of 0.9 x 1.1 x 2.5 mm; every
    other one is stored flipped (an LPS-like affine, the data flipped to match).
    Deterministic for a ``seed``; a ``root`` that already holds the same stand-ins is left as
    it is.
    """
    import nibabel as nib

    root = Path(root)
    params = {"dataset": NAME, "seed": seed, "cases": cases, "size": size}
    with standins_folder(root, STANDIN_FOLDER, params) as tmp:
        if tmp is None:
            return root
        for n in range(cases):
            rng = np.random.default_rng([seed, n])
            hu, seg = _standin_case(rng, size)
            affine = np.diag([0.9, 1.1, 2.5, 1.0])
            affine[:3, 3] = [-0.9 * size / 2, -1.1 * size / 2, -300.0]
            if n % 2:
                flip = np.diag([-1.0, -1.0, 1.0, 1.0])
                flip[:2, 3] = [size - 1, size - 1]
                affine = affine @ flip
                hu, seg = hu[::-1, ::-1, :], seg[::-1, ::-1, :]
            for name, data in ((f"volume-{n}.nii", hu), (f"segmentation-{n}.nii", seg)):
                image = nib.Nifti1Image(np.ascontiguousarray(data), affine)
                image.header.set_xyzt_units("mm")
                image.set_qform(affine, code=1)
                image.set_sform(affine, code=1)
                nib.save(image, tmp / name)
    return root
