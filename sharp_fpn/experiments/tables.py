"""The paper's tables as data: every row's config and the numbers the paper reports for it.

Table 1 (the UNet family, semantic segmentation on DSB2018, IoU %) and Table 2 (semantic and
Mask R-CNN models on VGG16 and ResNet-101, IoU and Dice %), with the parameter counts of
Figure 7's pruned UNet# levels (SPEC section 1-2). Plain data: no torch, no detectron2.
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
    """

    key: str
    model: str
    config: str
    paper_iou: Optional[float] = None
    paper_dice: Optional[float] = None
    paper_params: Optional[float] = None
    deep_supervision: bool = False
    backbone: str = ""

    @property
    def config_path(self) -> Path:
        """The row's yaml as an absolute path."""
        return PROJECT_ROOT / self.config

    @property
    def label(self) -> str:
        """The row's name in figures: model, ``_DS`` with deep supervision, the backbone."""
        return (f"{self.model}{'_DS' if self.deep_supervision else ''}"
                + (f" {self.backbone}" if self.backbone else ""))


def _table1_row(arch: str, model: str, ds: bool, iou: Optional[float], params: Optional[float]):
    key = f"{arch}_ds" if ds else arch
    return Row(key, model, f"configs/semantic/table1/{key}.yaml", iou, None, params, ds)


#: Table 1 (DSB2018 column, IoU %; parameters in millions) in the paper's order.
TABLE1: List[Row] = [
    _table1_row("unet", "UNet", False, 90.15, 7.85),
    _table1_row("wunet", "WUNet", False, 90.27, 9.39),
    _table1_row("unet2plus", "UNet++", False, 92.02, 9.16),
    _table1_row("unet2plus", "UNet++", True, 91.98, 9.16),
    _table1_row("unet3plus", "UNet3+", False, 91.96, 9.79),
    _table1_row("unet3plus", "UNet3+", True, 92.15, 9.79),
    _table1_row("unet_sharp", "UNet#", False, 92.53, 9.71),
    _table1_row("unet_sharp", "UNet#", True, 92.67, 9.71),
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

TABLES = (1, 2)


class UnknownRowError(ValueError):
    """A row key that is not in the table (names the known ones)."""


def rows_of(table: int) -> Tuple[List[Row], List[Row]]:
    """(the table's rows, extra rows selectable by key) of Table 1 or 2."""
    if table not in TABLES:
        raise ValueError(f"table {table!r}: the paper's tables are {TABLES}")
    return (TABLE1, TABLE1_EXTRAS) if table == 1 else (TABLE2, [])


def select_rows(table: int, keys: Optional[Sequence[str]] = None) -> List[Row]:
    """The rows named by ``keys`` (all of the table's rows when None), in table order.

    Raises:
        UnknownRowError: a key is not a row (or extra row) of the table.
    """
    rows, extras = rows_of(table)
    if keys is None:
        return list(rows)
    known = {row.key: row for row in rows + extras}
    unknown = [k for k in keys if k not in known]
    if unknown:
        raise UnknownRowError(
            f"--rows: unknown row(s) {unknown} for table {table}; known: {list(known)}")
    return [row for row in rows + extras if row.key in keys]
