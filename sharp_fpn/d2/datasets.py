"""The project's datasets (:data:`sharp_fpn.data.catalog.DATASETS`) in detectron2's catalogs."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import load_coco_json

from ..data.catalog import DATASETS, datasets_root, prepare

__all__ = ["register_all"]


def register_all(datasets: Optional[Path] = None) -> None:
    """Register every dataset of :data:`DATASETS` with detectron2 (idempotent).

    ``datasets`` is the datasets root, read once here (default :func:`datasets_root`), as
    detectron2 does for its builtin datasets. Nothing is converted until a dataset is first
    loaded (``DatasetCatalog.get``).
    """
    datasets = datasets_root() if datasets is None else datasets
    for name, spec in DATASETS.items():
        if name in DatasetCatalog.list():
            continue

        def load(name: str = name, root: Path = spec.root(datasets)) -> list[dict]:
            return load_coco_json(str(prepare(name, datasets)), str(root), name)

        DatasetCatalog.register(name, load)
        MetadataCatalog.get(name).set(
            thing_classes=["nucleus"],
            evaluator_type="coco",
            json_file=str(spec.json_file(datasets)),
            image_root=str(spec.root(datasets)),
        )
