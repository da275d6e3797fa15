"""The ``--quick`` recipe: yaml files merged on top of each row's config for a CPU smoke run.

``configs/experiments/quick/common.yaml`` applies to every row, then ``semantic.yaml``,
``instance.yaml`` or ``volume.yaml`` by the row's kind (2-D semantic, Mask R-CNN, 3-D), then,
for the medical 2-D data sets, ``medical2d.yaml`` (their stand-ins' small slices). A row of a
data set other than DSB2018 then trains on that data set's synthetic stand-ins in its real
format (``<dataset>_quick_train``, evaluated on ``<dataset>_quick_val``:
``sharp_fpn.data.medical``); DSB2018's stand-in is common.yaml's synthetic nuclei set. The files
are detectron2-style nested yaml; they are read here into ``KEY VALUE`` override lists (dotted
keys, in file order), which the config's own checks then validate key by key (an unknown key
is named). Plain yaml: no detectron2.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional

import yaml

from .tables import PROJECT_ROOT

#: Where the quick recipe's yaml files are.
QUICK_DIR = PROJECT_ROOT / "configs" / "experiments" / "quick"
#: Iterations per row with ``--quick`` (Table 1: 40 rows in minutes on a shared 2-core CPU).
QUICK_ITERS: Dict[int, int] = {1: 10, 2: 16, 3: 10}
#: What the quick rows are, for the table's note.
QUICK_MODELS: Dict[int, str] = {
    1: "Table 1's 2-D networks at 1/4 of the paper's widths (UNet 8..128), 64x64 inputs "
    "(DSB2018) or the stand-ins' 32x32 slices; the V-Net family at 1/8 of its widths "
    "(V-Net 2..32) on 16^3 patches",
    2: "the semantic decoders at widths 16/32/64 on ResNet-101 at 1/4 width or on the full "
    "VGG16, 64x64 inputs; Mask R-CNN on the same bottom-ups with 64-channel FPNs (grid widths "
    "16..64) at 128 px",
    3: "UNet# at 1/4 of the paper's widths (8..128) on the stand-ins' 32x32 slices",
}
#: The recipe file of each kind of row.
KINDS = {"semantic": "semantic.yaml", "instance": "instance.yaml", "volume": "volume.yaml"}


def flatten(tree: Mapping[str, Any], prefix: str = "") -> List[Any]:
    """``{"A": {"B": 1}, "C": [2]}`` -> ``["A.B", 1, "C", [2]]`` (dotted keys, in order)."""
    pairs: List[Any] = []
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            if not value:
                raise ValueError(f"{name}: an empty mapping sets nothing")
            pairs += flatten(value, f"{name}.")
        else:
            pairs += [name, value]
    return pairs


def load_overrides(path: Path) -> List[Any]:
    """A recipe yaml as a ``KEY VALUE`` list for ``get_config(..., opts)``.

    Raises:
        ValueError: the file is not a mapping of config keys (names the file).
    """
    path = Path(path)
    tree = yaml.safe_load(path.read_text(encoding="utf-8"))
    if not isinstance(tree, Mapping):
        raise ValueError(f"{path}: expected a mapping of config keys, got {type(tree).__name__}")
    if "_BASE_" in tree:
        raise ValueError(f"{path}: a recipe is merged on top of a row's config, no _BASE_")
    try:
        return flatten(tree)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None


def quick_overrides(semantic: bool = True, folder: Path = QUICK_DIR, *, kind: str = "",
                    dataset: Optional[str] = None) -> List[Any]:
    """``--quick``'s overrides for a row: common, then its kind's, then its data set's.

    Args:
        semantic: a 2-D semantic row (else Mask R-CNN); ignored when ``kind`` is given.
        folder: the recipe files.
        kind: ``"semantic"``, ``"instance"`` or ``"volume"`` (3-D); ``""`` reads ``semantic``.
        dataset: the row's quick stand-in, ``<name>_quick`` (``Row.quick_dataset``), or None
            for common.yaml's synthetic nuclei: its ``_train``/``_val`` become
            ``DATASETS.TRAIN``/``TEST``, and a 2-D one adds ``medical2d.yaml``.
    """
    kind = kind or ("semantic" if semantic else "instance")
    if kind not in KINDS:
        raise ValueError(f"kind {kind!r}: expected one of {sorted(KINDS)}")
    overrides = load_overrides(folder / "common.yaml") + load_overrides(folder / KINDS[kind])
    if dataset is not None:
        if kind == "semantic":
            overrides += load_overrides(folder / "medical2d.yaml")
        overrides += ["DATASETS.TRAIN", [f"{dataset}_train"], "DATASETS.TEST", [f"{dataset}_val"]]
    return overrides
