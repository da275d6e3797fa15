"""The paper's tables as data: every row's config and the numbers the paper reports for it.

Table 1 (the UNet family on four 2-D data sets, DSB2018, BraTS19, LiTS17 and LIDC-IDRI, and
the V-Net family on the 3-D LUNA16, semantic segmentation, IoU %), Table 2 (semantic and Mask
R-CNN models on VGG16 and ResNet-101 on DSB2018, IoU and Dice %) and Table 3 (UNet# and UNet#
with CGM beside eight other models on BraTS19 and LiTS17, IoU and Dice %; the eight are the
paper's figures only, not implemented here), with the parameter counts of Figure 7's pruned
UNet# levels (SPEC section 1-2). Plain data: no torch, no detectron2.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

#: The checkout the row configs (``configs/...``) are relative to.
PROJECT_ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Row:
    """One row of a table: what to train and what the paper reports for it.

    Attributes:
        key: short name, used by ``--rows`` and for the row's output folder.
        model: the model's name in the table.
        config: yaml path, relative to :data:`PROJECT_ROOT`.
        paper_iou, paper_dice: the paper's numbers (%), None where it gives none.
        paper_params: the paper's parameter count (millions), Table 1 only.
        deep_supervision: Table 1's DS column.
        backbone: Table 2's backbone column.
        dataset: the data set (Table 1's column, Table 3's): one of :data:`DATASET_NAMES`.
        implemented: False for Table 3's other models: the paper's figures only.
    """

    key: str
    model: str
    config: str
    paper_iou: Optional[float] = None
    paper_dice: Optional[float] = None
    paper_params: Optional[float] = None
    deep_supervision: bool = False
    backbone: str = ""
    dataset: str = "dsb2018"
    implemented: bool = True

    @property
    def quick_dataset(self) -> Optional[str]:
        """The stand-in ``--quick`` trains on: ``<dataset>_quick`` (``_train``/``_val``, the
        synthetic stand-ins in the real format, ``sharp_fpn.data.medical``), or None for
        DSB2018, whose stand-in is the quick recipe's own synthetic nuclei set."""
        return None if self.dataset == "dsb2018" else f"{self.dataset}_quick"

    @property
    def volume(self) -> bool:
        """A 3-D row (LUNA16, the V-Net family)."""
        return self.dataset in VOLUME_DATASETS

    @property
    def config_path(self) -> Path:
        """The row's yaml as an absolute path."""
        return PROJECT_ROOT / self.config

    @property
    def label(self) -> str:
        """The row's name in figures: data set (but DSB2018's), model, ``_DS`` with deep
        supervision, the backbone."""
        where = "" if self.dataset == "dsb2018" else f"{DATASET_NAMES[self.dataset]} "
        return (f"{where}{self.model}{'_DS' if self.deep_supervision else ''}"
                + (f" {self.backbone}" if self.backbone else ""))


#: Data set key -> its name in the paper's tables, in Table 1's column order.
DATASET_NAMES: Dict[str, str] = {
    "dsb2018": "DSB2018", "brats19": "BraTS19", "lits17": "LiTS17", "lidc": "LIDC-IDRI",
    "luna16": "LUNA16",
}
#: The 3-D data sets (VolumeSegmentor rows).
VOLUME_DATASETS = ("luna16",)

#: Table 1's 2-D rows: (arch, model, DS, paper's parameters in millions), the paper's order.
TABLE1_2D_ROWS: List[Tuple[str, str, bool, float]] = [
    ("unet", "UNet", False, 7.85), ("wunet", "WUNet", False, 9.39),
    ("unet2plus", "UNet++", False, 9.16), ("unet2plus", "UNet++", True, 9.16),
    ("unet3plus", "UNet3+", False, 9.79), ("unet3plus", "UNet3+", True, 9.79),
    ("unet_sharp", "UNet#", False, 9.71), ("unet_sharp", "UNet#", True, 9.71),
]
#: Table 1's 3-D rows (LUNA16), the same layout: the V-Net family.
TABLE1_3D_ROWS: List[Tuple[str, str, bool, float]] = [
    ("vnet", "V-Net", False, 26.39), ("wvnet", "WV-Net", False, 33.40),
    ("vnet2plus", "V-Net2+", False, 27.37), ("vnet2plus", "V-Net2+", True, 27.37),
    ("vnet3plus", "V-Net3+", False, 27.84), ("vnet3plus", "V-Net3+", True, 27.84),
    ("vnet_sharp", "V-Net#", False, 28.37), ("vnet_sharp", "V-Net#", True, 28.37),
]
#: Table 1's IoU (%) per column, one value per row of TABLE1_2D_ROWS / TABLE1_3D_ROWS.
TABLE1_PAPER_IOU: Dict[str, Tuple[float, ...]] = {
    "dsb2018": (90.15, 90.27, 92.02, 91.98, 91.96, 92.15, 92.53, 92.67),
    "brats19": (89.96, 90.06, 90.03, 91.01, 90.67, 91.69, 91.67, 92.38),
    "lits17": (91.43, 91.52, 91.59, 91.64, 91.21, 92.14, 94.79, 95.36),
    "lidc": (72.59, 72.93, 72.73, 73.43, 73.22, 73.48, 73.68, 74.01),
    "luna16": (71.21, 73.52, 76.35, 77.62, 76.78, 78.23, 77.69, 79.45),
}


def _table1_row(arch: str, model: str, ds: bool, iou: Optional[float], params: Optional[float],
                dataset: str = "dsb2018"):
    name = f"{arch}_ds" if ds else arch
    if dataset == "dsb2018":  # the first column's keys and configs, as they always were
        return Row(name, model, f"configs/semantic/table1/{name}.yaml", iou, None, params, ds)
    return Row(f"{dataset}_{name}", model, f"configs/semantic/table1/{dataset}/{name}.yaml",
               iou, None, params, ds, dataset=dataset)


#: Table 1 (IoU %; parameters in millions): each column's rows in the paper's order, the
#: columns in the paper's order (DSB2018, BraTS19, LiTS17, LIDC-IDRI, then LUNA16 in 3-D).
TABLE1: List[Row] = [
    _table1_row(arch, model, ds, iou, params, dataset)
    for dataset, ious in TABLE1_PAPER_IOU.items()
    for (arch, model, ds, params), iou in zip(
        TABLE1_3D_ROWS if dataset in VOLUME_DATASETS else TABLE1_2D_ROWS, ious)
]
#: Rows the paper does not have, selectable with ``--rows``.
TABLE1_EXTRAS: List[Row] = [
    _table1_row("unet", "UNet", True, None, None),
    _table1_row("wunet", "WUNet", True, None, None),
]
#: The Table 1 row whose trained network is pruned to L1..L4 (Figure 7): UNet# with heads on
#: the top row.
PRUNING_ROW = "unet_sharp_ds"
#: Figure 7's parameter counts (millions) of the pruned levels, as the paper's text gives them.
PAPER_PRUNED_PARAMS: Dict[int, float] = {1: 0.1, 2: 0.56, 3: 2.53, 4: 9.71}

#: Table 2 (IoU %, Dice %): semantic rows (upper half), then Mask R-CNN rows (lower half).
TABLE2_PAPER: Dict[Tuple[str, str], Tuple[float, float]] = {
    ("UNet", "VGG16"): (90.12, 86.94), ("UNet", "R101"): (91.52, 89.43),
    ("UNet#", "VGG16"): (92.82, 89.60), ("UNet#", "R101"): (93.56, 90.78),
    ("Mask R-CNN", "VGG16"): (92.34, 87.68), ("Mask R-CNN", "R101"): (93.45, 89.34),
    ("Mask R-CNN2+", "VGG16"): (93.47, 88.14), ("Mask R-CNN2+", "R101"): (94.96, 90.16),
    ("Mask R-CNN3+", "VGG16"): (94.28, 90.51), ("Mask R-CNN3+", "R101"): (95.26, 91.38),
    ("Mask R-CNN#", "VGG16"): (94.89, 91.37), ("Mask R-CNN#", "R101"): (95.87, 92.25),
}
TABLE2_CONFIGS: Dict[str, str] = {
    "UNet": "configs/semantic/unet_{}.yaml",
    "UNet#": "configs/semantic/unet_sharp_{}.yaml",
    "Mask R-CNN": "configs/mask_rcnn_fpn_{}.yaml",
    "Mask R-CNN2+": "configs/mask_rcnn_2plus_{}.yaml",
    "Mask R-CNN3+": "configs/mask_rcnn_3plus_{}.yaml",
    "Mask R-CNN#": "configs/mask_rcnn_sharp_{}.yaml",
}
TABLE2: List[Row] = [
    Row(Path(TABLE2_CONFIGS[model].format(backbone)).stem, model,
        TABLE2_CONFIGS[model].format(backbone), iou, dice, backbone=backbone)
    for (model, backbone), (iou, dice) in TABLE2_PAPER.items()
]

#: Table 3 (IoU %, Dice %) on (BraTS19, LiTS17): the eight other models, then ours.
TABLE3_PAPER: Dict[str, Tuple[Tuple[float, float], Tuple[float, float]]] = {
    "PSPNet": ((83.85, 91.01), (87.75, 93.23)),
    "DeepLabV3+": ((87.1, 92.9), (91.07, 95.17)),
    "ENet": ((81.62, 89.9), (83.36, 90.9)),
    "nnU-Net": ((88.52, 91.68), (91.31, 95.3)),
    "AttnUNet": ((91.32, 95.32), (94.61, 97.15)),
    "DUNet": ((90.86, 95.19), (94.47, 97.21)),
    "Ra-UNet": ((84.28, 89.12), (91.94, 96.1)),
    "TransUNet": ((88.85, 94.04), (92.59, 96.16)),
    "UNet#": ((91.68, 95.6), (94.79, 97.29)),
    "UNet#(CGM)": ((92.08, 96.14), (95.31, 98.24)),
}
#: Table 3's models this project trains, and their configs (per data set).
TABLE3_CONFIGS: Dict[str, str] = {
    "UNet#": "configs/semantic/table3/{}/unet_sharp.yaml",
    "UNet#(CGM)": "configs/semantic/table3/{}/unet_sharp_cgm.yaml",
}
TABLE3_DATASETS = ("brats19", "lits17")
#: What the table says of the models this project does not have.
NOT_IMPLEMENTED = "not implemented here (the paper's figures only)"


def _table3_key(model: str) -> str:
    return {"UNet#": "unet_sharp", "UNet#(CGM)": "unet_sharp_cgm"}.get(
        model, model.lower().replace("+", "plus").replace("-", "_"))


#: Table 3, BraTS19's rows then LiTS17's, each in the paper's order.
TABLE3: List[Row] = [
    Row(f"{dataset}_{_table3_key(model)}", model,
        TABLE3_CONFIGS[model].format(dataset) if model in TABLE3_CONFIGS else "",
        paper[k][0], paper[k][1], dataset=dataset, implemented=model in TABLE3_CONFIGS)
    for k, dataset in enumerate(TABLE3_DATASETS)
    for model, paper in TABLE3_PAPER.items()
]

TABLES = (1, 2, 3)


class UnknownRowError(ValueError):
    """A row key that is not in the table (names the known ones)."""


def rows_of(table: int) -> Tuple[List[Row], List[Row]]:
    """(the table's rows, extra rows selectable by key) of Table 1, 2 or 3."""
    if table not in TABLES:
        raise ValueError(f"table {table!r}: the paper's tables are {TABLES}")
    return {1: (TABLE1, TABLE1_EXTRAS), 2: (TABLE2, []), 3: (TABLE3, [])}[table]


def select_rows(table: int, keys: Optional[Sequence[str]] = None,
                datasets: Optional[Sequence[str]] = None) -> List[Row]:
    """The rows named by ``keys`` (all of the table's rows when None) whose data set is one of
    ``datasets`` (any when None), in table order.

    Raises:
        UnknownRowError: a key is not a row (or extra row) of the table, or a data set is not
            one of the table's.
    """
    rows, extras = rows_of(table)
    if datasets is not None:
        known_sets = list(dict.fromkeys(row.dataset for row in rows))
        unknown = [d for d in datasets if d not in known_sets]
        if unknown:
            raise UnknownRowError(
                f"--datasets: unknown data set(s) {unknown} for table {table}; known: "
                f"{known_sets}")
    chosen = [r for r in rows + extras if datasets is None or r.dataset in datasets]
    if keys is None:
        return [r for r in chosen if r in rows]
    known = {row.key: row for row in rows + extras}
    unknown = [k for k in keys if k not in known]
    if unknown:
        raise UnknownRowError(
            f"--rows: unknown row(s) {unknown} for table {table}; known: {list(known)}")
    return [row for row in chosen if row.key in keys]
