"""The registered medical data sets: where each converted folder lives, and the quick stand-ins.

==========================  =================================================================
name                        content
==========================  =================================================================
``brats19_train`` / _val    ``<datasets>/brats19``, converted by ``tools/convert_medical.py
                            brats19``: 2-D axial slices, whole tumour (:mod:`.brats19`)
``lits17_train`` / _val     ``<datasets>/lits17``: 2-D liver slices (:mod:`.lits17`)
``lidc_train`` / _val       ``<datasets>/lidc``: 2-D nodule slices (:mod:`.lidc`)
``luna16_train`` / _val     ``<datasets>/luna16``: 3-D nodule patches (:mod:`.luna16`)
``<NAME>_quick_train``      the module's stand-ins (``write_standins``, seed 0, default
``<NAME>_quick_val``        size), written to ``<datasets>/quick/<NAME>_raw`` and converted to
                            ``<datasets>/quick/<NAME>`` on first use (seed 0, val fraction
                            0.25)
==========================  =================================================================

``<datasets>`` is :func:`sharp_fpn.data.catalog.datasets_root` (``$DETECTRON2_DATASETS``,
default ``./datasets``). A converted folder is never made behind the user's back from a real
download (the converter's options matter): a missing one fails with the message of where to
get the data and the command. The quick stand-ins are made on first use, under a file lock so
that the processes of a distributed run can all ask at once. ``sharp_fpn.d2.datasets`` registers
every name with detectron2. No torch, no detectron2.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from .common import missing_dataset_message

__all__ = ["DOWNLOADS", "MEDICAL_DATASETS", "MedicalDataset", "coco_files", "prepare_medical",
           "volume_records"]

#: Seed and validation fraction of the quick stand-ins' conversion.
QUICK_SEED = 0
QUICK_VAL_FRACTION = 0.25

#: Where each data set is downloaded from, and the layout its converter reads (relative to
#: the root given to ``convert``): the texts of :func:`missing_dataset_message`.
DOWNLOADS: Dict[str, Tuple[str, str]] = {
    "brats19": (
        "the BraTS 2019 challenge (CBICA, https://www.med.upenn.edu/cbica/brats2019/data.html; "
        "registration needed): MICCAI_BraTS_2019_Data_Training.zip",
        "MICCAI_BraTS_2019_Data_Training/{HGG,LGG}/<case>/<case>_{t1,t1ce,t2,flair,seg}.nii.gz",
    ),
    "lits17": (
        "the LiTS 2017 challenge (https://competitions.codalab.org/competitions/17094; "
        "registration needed): Training Batch 1 and Training Batch 2",
        "volume-<n>.nii and segmentation-<n>.nii (.nii.gz too; in any sub-folder, e.g. "
        "'Training Batch 1/')",
    ),
    "lidc": (
        "The Cancer Imaging Archive's LIDC-IDRI collection "
        "(https://www.cancerimagingarchive.net/collection/lidc-idri/; NBIA Data Retriever)",
        "LIDC-IDRI-<nnnn>/<study>/<series>/*.dcm with the readers' XML beside the slices",
    ),
    "luna16": (
        "the LUNA16 challenge (https://luna16.grand-challenge.org/Download/; zenodo records "
        "3723295 and 4121926): subset0..9 and annotations.csv",
        "subset0..9/<seriesuid>.mhd/.raw and annotations.csv",
    ),
}

#: Kind of each data set's samples.
KINDS = {"brats19": "2d", "lits17": "2d", "lidc": "2d", "luna16": "3d"}


@dataclass(frozen=True)
class MedicalDataset:
    """One registered medical data set.

    Attributes:
        module: the data set module's NAME (``brats19``, ``lits17``, ``lidc``, ``luna16``).
        split: ``"train"`` or ``"val"``.
        kind: ``"2d"`` (COCO json and PNGs) or ``"3d"`` (NIfTI volume records).
        quick: the synthetic stand-ins instead of the real data set.
    """

    module: str
    split: str
    kind: str
    quick: bool = False

    def folder(self, datasets: Path) -> Path:
        """The converted folder under the datasets root."""
        return datasets / "quick" / self.module if self.quick else datasets / self.module


MEDICAL_DATASETS: Dict[str, MedicalDataset] = {
    f"{module}{'_quick' if quick else ''}_{split}": MedicalDataset(module, split, kind, quick)
    for module, kind in KINDS.items()
    for quick in (False, True)
    for split in ("train", "val")
}


def _datasets(datasets: Optional[Path]) -> Path:
    from ..catalog import datasets_root

    return Path(datasets) if datasets is not None else datasets_root()


def _spec(name: str) -> MedicalDataset:
    try:
        return MEDICAL_DATASETS[name]
    except KeyError:
        raise KeyError(f"no medical data set named {name!r}; registered: "
                       f"{', '.join(MEDICAL_DATASETS)}") from None


def _converted(folder: Path) -> bool:
    return (folder / "dataset.json").is_file()


def prepare_medical(name: str, datasets: Optional[Path] = None) -> Path:
    """The converted folder of registered data set ``name`` (``datasets``: the datasets root,
    default :func:`~sharp_fpn.data.catalog.datasets_root`).

    A quick set is written and converted on first use (under a lock); a real one must have
    been converted by ``tools/convert_medical.py``, else FileNotFoundError says where to get
    it, where to put it and the command.
    """
    spec = _spec(name)
    root = _datasets(datasets)
    folder = spec.folder(root)
    if _converted(folder):
        return folder
    if not spec.quick:
        where, layout = DOWNLOADS[spec.module]
        raise FileNotFoundError(
            f"dataset {name!r}: {folder} holds no converted data set (no dataset.json). "
            + missing_dataset_message(spec.module, Path("ROOT"), where, layout)
        )
    from ..catalog import folder_lock
    from . import dataset_module

    with folder_lock(root / "quick"):
        if not _converted(folder):  # another process may have made it while we waited
            module = dataset_module(spec.module)
            raw = root / "quick" / f"{spec.module}_raw"
            print(f"[sharp_fpn] {name}: writing the {spec.module} stand-ins in {raw} and "
                  f"converting them to {folder} (first use)")
            source = module.write_standins(raw, seed=QUICK_SEED)
            module.convert(source, folder, seed=QUICK_SEED, val_fraction=QUICK_VAL_FRACTION)
    return folder


def _kind(spec: MedicalDataset, name: str, kind: str) -> None:
    if spec.kind != kind:
        raise ValueError(f"dataset {name!r} is {spec.kind}, not {kind}")


def coco_files(name: str, datasets: Optional[Path] = None) -> Tuple[Path, Path]:
    """``(COCO json, image root)`` of 2-D data set ``name``, converted first if quick (see
    :func:`prepare_medical`). The json's ``file_name`` entries are relative to the root."""
    spec = _spec(name)
    _kind(spec, name, "2d")
    folder = prepare_medical(name, datasets)
    return folder / "annotations" / f"{spec.split}.json", folder


def volume_records(name: str, datasets: Optional[Path] = None) -> List[Dict[str, Any]]:
    """The samples of 3-D data set ``name``: ``[{"id", "case", "image", "mask", ...}]`` with
    absolute ``image`` and ``mask`` NIfTI paths (see :func:`prepare_medical`). Raises
    FileNotFoundError naming a listed file that is gone."""
    spec = _spec(name)
    _kind(spec, name, "3d")
    folder = prepare_medical(name, datasets)
    meta = json.loads((folder / "dataset.json").read_text(encoding="utf-8"))
    records = []
    for record in meta.get(spec.split, []):
        record = dict(record)
        for key in ("image", "mask"):
            path = folder / record[key]
            if not path.is_file():
                raise FileNotFoundError(f"{folder / 'dataset.json'}: lists {record[key]}, which "
                                        f"is missing; convert {folder} anew")
            record[key] = str(path.resolve())
        records.append(record)
    return records
