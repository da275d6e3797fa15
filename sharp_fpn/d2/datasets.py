"""The project's datasets in detectron2's catalogs: the nuclei sets
(:data:`sharp_fpn.data.catalog.DATASETS`) and the medical ones
(:data:`sharp_fpn.data.medical.registry.MEDICAL_DATASETS`)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import load_coco_json

from ..data.catalog import DATASETS, datasets_root, prepare
from ..data.medical.registry import MEDICAL_DATASETS, coco_files, volume_records

__all__ = ["register_all"]


def register_all(datasets: Optional[Path] = None) -> None:
    """Register every dataset of :data:`DATASETS` and :data:`MEDICAL_DATASETS` with detectron2
    (idempotent).

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
    _register_medical(datasets)


def _register_medical(datasets: Path) -> None:
    """The medical sets: 2-D ones as COCO instances (``load_coco_json``, evaluator_type
    ``"coco"``, one category named as the data set's module), 3-D ones as their volume records (metadata ``kind="3d"``).
    Nothing converts until first ``DatasetCatalog.get`` (quick stand-ins) and a missing
    converted folder fails only then, saying where to get the data."""
    for name, spec in MEDICAL_DATASETS.items():
        if name in DatasetCatalog.list():
            continue
        folder = spec.folder(datasets)
        if spec.kind == "2d":

            def load(name: str = name) -> list[dict]:
                json_file, image_root = coco_files(name, datasets)
                return load_coco_json(str(json_file), str(image_root), name)

            DatasetCatalog.register(name, load)
            MetadataCatalog.get(name).set(
                thing_classes=[spec.module],  # write_slice_dataset's one category
                evaluator_type="coco",
                kind="2d",
                json_file=str(folder / "annotations" / f"{spec.split}.json"),
                image_root=str(folder),
            )
        else:

            def load_volumes(name: str = name) -> list[dict]:
                return volume_records(name, datasets)

            DatasetCatalog.register(name, load_volumes)
            MetadataCatalog.get(name).set(kind="3d", dataset_root=str(folder))
