"""BraTS 2019 (brain tumour, MRI): NIfTI cases to 2-D axial slices with the whole-tumour mask.

Reads the training set as CBICA ships it::

    <root>/MICCAI_BraTS_2019_Data_Training/{HGG,LGG}/<case>/<case>_{t1,t1ce,t2,flair,seg}.nii.gz

(``.nii`` too; ``root`` may also be the ``MICCAI_BraTS_2019_Data_Training`` folder itself).

Rules:

* the four modalities and the segmentation are read with nibabel and must share shape and
  affine (else :class:`MedicalDataError` naming the file); orientation and spacing come from
  the headers: every volume is turned to RAS+ (``nibabel.as_closest_canonical``: axes
  permuted and flipped, no interpolation) and cut into axial slices in the radiological view
  (:func:`~.common.axial_slices`: row 0 anterior, column 0 the patient's right). Resampling
  only when asked: ``spacing=(x, y, z)`` mm with ``interpolation`` for the images
  (``"linear"`` default, ``"cubic"``, ``"nearest"``) and nearest for the segmentation;
* the 2-D image is an RGB of three modalities, FLAIR, T1ce and T2 by default (``rgb=``), each
  scaled so that its 0.5 and 99.5 percentiles over the case's brain (voxels where any modality
  is non-zero: BraTS is skull-stripped) become 0 and 255; outside the brain 0;
* slices kept (``keep=``): ``"brain"`` (default) every slice with brain in it, ``"tumour"``
  those with tumour, ``"all"`` every slice;
* mask: the whole tumour, ``seg > 0``; labels keep BraTS's values 0 (background), 1
  (necrotic and non-enhancing core), 2 (oedema), 4 (enhancing tumour); any other value is
  refused naming the file;
* the split is by case (:func:`~.common.case_split`); sample ids are ``<case>_z<kkk>``, ``k``
  the axial index in RAS+ (0 most inferior).
"""
from __future__ import annotations

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
    percentile_to_uint8,
    same_grid,
    standins_folder,
    to_canonical,
    write_slice_dataset,
)
from .registry import DOWNLOADS

__all__ = ["NAME", "MODALITIES", "convert", "find_cases", "read_case", "write_standins"]

NAME = "brats19"
TRAINING = "MICCAI_BraTS_2019_Data_Training"
GRADES = ("HGG", "LGG")
MODALITIES = ("t1", "t1ce", "t2", "flair")
LABELS = (0, 1, 2, 4)
DEFAULT_RGB = ("flair", "t1ce", "t2")
KEEP = ("brain", "tumour", "all")
#: Percentiles of each modality's normalisation, over the case's brain.
PERCENTILES = (0.5, 99.5)


def _training_folder(root: Path) -> Path:
    for folder in (root / TRAINING, root):
        if any((folder / grade).is_dir() for grade in GRADES):
            return folder
    raise FileNotFoundError(missing_dataset_message(NAME, root, *DOWNLOADS[NAME]))


def find_cases(root: PathLike) -> List[Tuple[str, Path]]:
    """``[(case, case folder)]`` of a BraTS19 training root, sorted by case. Raises
    FileNotFoundError (where to get it, the layout, the command) when ``root`` holds none."""
    root = Path(root)
    folder = _training_folder(root)
    cases = sorted(
        (case.name, case)
        for grade in GRADES if (folder / grade).is_dir()
        for case in (folder / grade).iterdir()
        if case.is_dir() and not case.name.startswith(".")
    )
    if not cases:
        raise FileNotFoundError(missing_dataset_message(NAME, root, *DOWNLOADS[NAME]))
    return cases


def _case_file(folder: Path, case: str, kind: str) -> Path:
    for suffix in (".nii.gz", ".nii"):
        path = folder / f"{case}_{kind}{suffix}"
        if path.is_file():
            return path
    raise MedicalDataError(
        f"{folder / f'{case}_{kind}.nii.gz'}: missing (a BraTS case folder holds "
        f"<case>_{{{','.join(MODALITIES)},seg}}.nii.gz)")


def read_case(
    folder: PathLike,
    case: Optional[str] = None,
    spacing: Optional[Sequence[float]] = None,
    interpolation: str = "linear",
) -> Tuple[Dict[str, np.ndarray], np.ndarray, Tuple[float, float, float]]:
    """One case as RAS+ arrays: ``({modality: (X, Y, Z) float32}, seg (X, Y, Z) uint8,
    voxel size (x, y, z) mm)``; see the module's rules. Raises MedicalDataError naming the
    file for a missing or unreadable file, a shape or affine that differs from the FLAIR's, or a
    label value other than 0, 1, 2, 4."""
    folder = Path(folder)
    case = case or folder.name
    paths = {kind: _case_file(folder, case, kind) for kind in (*MODALITIES, "seg")}
    images = {kind: load_nifti(path) for kind, path in paths.items()}
    for kind in (*MODALITIES, "seg"):
        same_grid(paths[kind], images[kind], paths["flair"], images["flair"])
    volumes = {}
    for kind in MODALITIES:
        image = to_canonical(images[kind], spacing, interpolation)
        volumes[kind] = np.asarray(image.get_fdata(dtype=np.float32))
    seg_image = to_canonical(images["seg"], spacing, "nearest")
    seg = np.asarray(seg_image.dataobj, dtype=np.float64)
    values = np.unique(seg)
    bad = [int(v) if float(v).is_integer() else v for v in values.tolist()
           if v not in LABELS]
    if bad:
        raise MedicalDataError(
            f"{paths['seg']}: holds label values {bad[:5]} (BraTS labels are 0, 1, 2, 4)")
    zooms = tuple(round(float(z), 6) for z in seg_image.header.get_zooms()[:3])
    return volumes, seg.astype(np.uint8), zooms  # type: ignore[return-value]


def case_slices(
    case: str,
    volumes: Dict[str, np.ndarray],
    seg: np.ndarray,
    zooms: Tuple[float, float, float],
    keep: str = "brain",
    rgb: Sequence[str] = DEFAULT_RGB,
) -> Iterator[Slice2D]:
    """The kept axial slices of one case read by :func:`read_case` (see the module's rules)."""
    brain = np.zeros(seg.shape, bool)
    for kind in MODALITIES:
        brain |= volumes[kind] != 0
    channels = []
    for kind in rgb:
        scaled = percentile_to_uint8(volumes[kind], brain, *PERCENTILES)
        scaled[~brain] = 0
        channels.append(axial_slices(scaled))
    image = np.stack(channels, axis=-1)
    labels = axial_slices(seg)
    brain2d = axial_slices(brain)
    for k in range(labels.shape[0]):
        if keep == "brain" and not brain2d[k].any():
            continue
        if keep == "tumour" and not labels[k].any():
            continue
        yield Slice2D(
            id=f"{case}_z{k:03d}", case=case, image=image[k], mask=labels[k] > 0,
            labels=labels[k], spacing=(zooms[1], zooms[0]),
        )


def convert(
    root: PathLike,
    out: PathLike,
    *,
    seed: int = 0,
    val_fraction: float = 0.2,
    keep: str = "brain",
    rgb: Sequence[str] = DEFAULT_RGB,
    spacing: Optional[Sequence[float]] = None,
    interpolation: str = "linear",
) -> Path:
    """Convert a BraTS19 training root to a 2-D slice data set in ``out``
    (:func:`~.common.write_slice_dataset`), split by case with ``seed`` and ``val_fraction``.

    Args:
        root: the download (see the module docstring for the layout).
        out: the folder to write, whole or not at all.
        keep: which slices (``"brain"``, ``"tumour"``, ``"all"``).
        rgb: the three modalities of the image's R, G, B.
        spacing: resample every case to these (x, y, z) mm first; None (default) keeps the
            stored grid.
        interpolation: the images' resampling (``"linear"``, ``"cubic"``, ``"nearest"``).

    Raises:
        FileNotFoundError: ``root`` holds no BraTS19 (the message says where to get it).
        MedicalDataError: a bad case file (named); ``out`` is then not written.
        ValueError: a bad option.
    """
    root, out = Path(root), Path(out)
    if keep not in KEEP:
        raise ValueError(f"keep must be one of {KEEP}, got {keep!r}")
    rgb = tuple(rgb)
    if len(rgb) != 3 or any(kind not in MODALITIES for kind in rgb):
        raise ValueError(f"rgb must be three of {MODALITIES}, got {rgb}")
    cases = find_cases(root)
    split = {**case_split([c for c, _ in cases], seed, val_fraction), "seed": seed,
             "val_fraction": val_fraction}

    def slices() -> Iterator[Slice2D]:
        for case, folder in cases:
            volumes, seg, zooms = read_case(folder, case, spacing, interpolation)
            yield from case_slices(case, volumes, seg, zooms, keep, rgb)

    source: Dict[str, Any] = {
        "dataset": "BraTS 2019 training (MICCAI_BraTS_2019_Data_Training)",
        "root": str(root),
        "cases": len(cases),
        "keep": keep,
        "rgb": list(rgb),
        "normalisation": (f"each modality's {PERCENTILES[0]} and {PERCENTILES[1]} percentiles "
                          "over the case's brain (any modality non-zero) to 0 and 255, clipped; "
                          "outside the brain 0"),
        "orientation": ("RAS+ (nibabel.as_closest_canonical), axial slices in the radiological "
                        "view: row 0 anterior, column 0 the patient's right; id z index 0 "
                        "most inferior"),
        "resampling": ({"spacing_xyz_mm": [float(s) for s in spacing],
                        "interpolation": interpolation, "seg": "nearest"}
                       if spacing is not None else None),
        "mask": "whole tumour: seg > 0",
        "labels": {"0": "background", "1": "necrotic and non-enhancing tumour core",
                   "2": "peritumoral oedema", "4": "GD-enhancing tumour"},
    }
    return write_slice_dataset(out, NAME, slices(), split, source)


# --------------------------------------------------------------------------------------------
# stand-ins


def _standin_case(rng: np.random.Generator, size: int) -> Tuple[Dict[str, np.ndarray], np.ndarray]:
    """RAS+ (X, Y, Z) modalities and seg of one synthetic case: an ellipsoid brain and a
    tumour of three nested regions (core 1, enhancing rim 4, oedema 2)."""
    shape = (size, size, max(8, size // 2))
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij"))
    brain = (grid ** 2).sum(0) < 0.85 ** 2
    centre = rng.uniform(-0.35, 0.35, 3)
    radius = rng.uniform(0.25, 0.4)
    d = np.sqrt(((grid - centre[:, None, None, None]) ** 2).sum(0)) / radius
    seg = np.zeros(shape, np.uint8)
    seg[d < 1.0] = 2
    seg[d < 0.55] = 4
    seg[d < 0.35] = 1
    seg[~brain] = 0
    contrast = {  # background brain, then labels 1, 2, 4
        "t1": (100, 55, 85, 80), "t1ce": (100, 60, 95, 230),
        "t2": (90, 200, 180, 150), "flair": (80, 150, 210, 170),
    }
    volumes = {}
    for kind in MODALITIES:
        base, core, oedema, enhancing = contrast[kind]
        value = np.full(shape, float(base))
        value[seg == 1], value[seg == 2], value[seg == 4] = core, oedema, enhancing
        value = value + rng.normal(0.0, 8.0, shape)
        value[~brain] = 0
        volumes[kind] = np.clip(np.round(value), 0, None).astype(np.int16)
    return volumes, seg


def write_standins(root: PathLike, *, seed: int = 0, cases: int = 4, size: int = 32) -> Path:
    """Write ``cases`` small synthetic BraTS19 cases in the real layout under ``root`` and
    return ``root`` (what :func:`convert` accepts).

    Each case is ``size x size x max(8, size // 2)`` voxels of 0.9 x 1.1 x 2.5 mm, written by
    nibabel as ``.nii.gz`` (modalities int16, seg uint8); every other case is stored flipped
    (an LPS-like affine, the data flipped to match) so the reader's reorientation is
    exercised. Cases alternate between HGG and LGG. Deterministic for a ``seed``; a ``root``
    that already holds the same stand-ins is left as it is.
    """
    import nibabel as nib

    root = Path(root)
    params = {"dataset": NAME, "seed": seed, "cases": cases, "size": size}
    with standins_folder(root, TRAINING, params) as tmp:
        if tmp is None:
            return root
        zooms = np.array([0.9, 1.1, 2.5])
        for k in range(cases):
            rng = np.random.default_rng([seed, k])
            case = f"BraTS19_SYN_{k:03d}_1"
            volumes, seg = _standin_case(rng, size)
            affine = np.diag([*zooms, 1.0])
            affine[:3, 3] = [-0.9 * size / 2, -1.1 * size / 2, -10.0]
            if k % 2:  # stored L->R and P->A: x and y flipped, the affine says so
                flip = np.diag([-1.0, -1.0, 1.0, 1.0])
                flip[:2, 3] = [(size - 1), (size - 1)]
                affine = affine @ flip
                volumes = {m: v[::-1, ::-1, :] for m, v in volumes.items()}
                seg = seg[::-1, ::-1, :]
            folder = tmp / GRADES[k % 2] / case
            folder.mkdir(parents=True)
            for kind, data in (*volumes.items(), ("seg", seg)):
                image = nib.Nifti1Image(np.ascontiguousarray(data), affine)
                image.header.set_xyzt_units("mm")
                image.set_qform(affine, code=1)
                image.set_sform(affine, code=1)
                nib.save(image, folder / f"{case}_{kind}.nii.gz")
    return root
