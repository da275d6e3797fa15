"""The medical data sets of the paper's Table 1 and 3: readers, converters and stand-ins.

==============  ======================================  ======================================
module          reads                                   writes
==============  ======================================  ======================================
``brats19``     BraTS 2019 NIfTI (t1, t1ce, t2, flair,  2-D axial slices, whole tumour
                seg per case)                           (sub-regions 1/2/4 kept in labels)
``lits17``      LiTS 2017 NIfTI CT volumes and          2-D liver slices, HU windowed (liver
                segmentations                           and tumour kept in labels)
``lidc``        LIDC-IDRI DICOM series and readers'     2-D nodule slices, >= 50 % consensus
                XML
``luna16``      LUNA16 MetaImage and annotations.csv    3-D patches around nodules
==============  ======================================  ======================================

Each module has ``NAME``, ``convert(root, out, *, seed, val_fraction, **options)`` and
``write_standins(root, *, seed, cases, size)``; :mod:`.common` holds the shared samples,
writers and messages, :mod:`.registry` the registered names. ``tools/convert_medical.py`` is
the command. This package imports nothing until a module of it is used (no torch, no
detectron2 ever).
"""
from __future__ import annotations

import importlib
from types import ModuleType

#: The data set modules by their NAME (and the command's ``lidc_idri``).
MODULES = {"brats19": "brats19", "lits17": "lits17", "lidc": "lidc", "lidc_idri": "lidc",
           "luna16": "luna16"}

__all__ = ["MODULES", "dataset_module"]


def dataset_module(name: str) -> ModuleType:
    """The module of data set ``name`` (``brats19``, ``lits17``, ``lidc``/``lidc_idri``,
    ``luna16``), imported now. Raises KeyError naming the known ones."""
    try:
        module = MODULES[name]
    except KeyError:
        raise KeyError(f"no medical data set {name!r}; known: {', '.join(MODULES)}") from None
    return importlib.import_module(f"{__name__}.{module}")
