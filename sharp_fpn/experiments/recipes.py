"""The ``--quick`` recipe: yaml files merged on top of each row's config for a CPU smoke run.

``configs/experiments/quick/common.yaml`` applies to every row, then ``semantic.yaml`` or
``instance.yaml`` by the row's kind. The files are detectron2-style nested yaml; they are read
here into ``KEY VALUE`` override lists (dotted keys, in file order), which the config's own
checks then validate key by key (an unknown key is named). Plain yaml: no detectron2.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Mapping

import yaml

from .tables import PROJECT_ROOT

#: Where the quick recipe's yaml files are.
QUICK_DIR = PROJECT_ROOT / "configs" / "experiments" / "quick"
#: Iterations per row with ``--quick``: each table within 30 minutes on a shared 2-core CPU.
QUICK_ITERS: Dict[int, int] = {1: 50, 2: 16}
#: What the quick rows are, for the table's note.
QUICK_MODELS: Dict[int, str] = {
    1: "Table 1 networks at 1/4 of the paper's widths (UNet 8..128), 64x64 inputs",
    2: "the semantic decoders at widths 16/32/64 on ResNet-101 at 1/4 width or on the full "
    "VGG16, 64x64 inputs; Mask R-CNN on the same bottom-ups with 64-channel FPNs (grid widths "
    "16..64) at 128 px",
}


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


def quick_overrides(semantic: bool, folder: Path = QUICK_DIR) -> List[Any]:
    """``--quick``'s overrides for a semantic or a Mask R-CNN row: common, then its kind's."""
    kind = "semantic.yaml" if semantic else "instance.yaml"
    return load_overrides(folder / "common.yaml") + load_overrides(folder / kind)
