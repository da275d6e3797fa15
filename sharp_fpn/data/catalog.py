"""The project's datasets: where each lives, how it is converted and split (no detectron2).

``sharp_fpn.d2`` registers them with detectron2 on import (:func:`sharp_fpn.d2.datasets.register_all`).

All data live under ``$DETECTRON2_DATASETS`` (default ``./datasets``)::

    datasets/
      dsb2018/                      # unzip Kaggle's 2018 Data Science Bowl (or BBBC038) here
        stage1_train/<ImageId>/{images,masks}/
        stage1_train_labels.csv
        stage1_test/<ImageId>/images/
        stage1_solution.csv
        annotations/                # written by sharp-fpn: COCO json and the train/val split
      nuclei_synth/                 # the embedded default: generated on first use
        stage1_train/ ...
        annotations/
      nuclei_synth2/                # synthetic v2 (DSB2018-like), generated on first use
      nuclei_synth2_nobf/           # v2 without brightfield (an ablation)
      nuclei_synth2_test_<style>/   # v2 held-out tests, one style each, another seed

==========================  ==========================================================
name                        content
==========================  ==========================================================
``dsb2018_train``           stage1_train minus the validation fifth (the paper's split)
``dsb2018_val``             20 % of stage1_train: sklearn's ``train_test_split(ids,
                            test_size=0.2, random_state=41)`` over the sorted ImageIds
``dsb2018_stage1_test``     stage1_test, labels from stage1_solution.csv
``nuclei_synth_train``      the synthetic set (DSB2018 layout, v1: 60 images, seed
``nuclei_synth_val``        2018, small sizes), same split rule
``nuclei_synth2_train``     synthetic v2 (:mod:`sharp_fpn.data.synthetic_v2`): 500
``nuclei_synth2_val``       images, seed 2026, DSB2018's sizes, the v2 style mix
                            (fluorescence, H&E, brightfield); same split rule
``nuclei_synth2_nobf_*``    ``_train`` / ``_val``: as ``nuclei_synth2`` but fluorescence
                            and H&E only (brightfield never seen: an ablation)
``nuclei_synth2_test_*``    ``_fluorescence``, ``_he``, ``_brightfield``: held-out v2
                            tests, 40 images of one style each, seeds 7001-7003, DSB2018's
                            sizes, the whole split
==========================  ==========================================================

A synthetic dataset's folder is written on first use from its :class:`SyntheticParams`.

Annotations are converted to COCO json the first time a dataset is used, and the split is
written to ``annotations/<split>_split.json`` so that it never drifts, even if the folder later
gains or loses images. Preparation holds a file lock, so the processes of a distributed run can
all ask for the same dataset.
"""
from __future__ import annotations

import fcntl
import json
import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Optional, Union

SPLIT_RANDOM_STATE = 41
SPLIT_VAL_FRACTION = 0.2

#: The embedded default: DSB2018's layout and its common small image sizes (HxW).
SYNTH_NUM_IMAGES = 60
SYNTH_SEED = 2018
SYNTH_SIZES = ((256, 256), (256, 320), (360, 360), (260, 347))

#: Synthetic v2 sets (issue 8): training sets and held-out tests of another seed.
SYNTH2_NUM_IMAGES = 500
SYNTH2_SEED = 2026
SYNTH2_TEST_NUM_IMAGES = 40
SYNTH2_TEST_SEED = 7001
"""Seed of the first held-out style (``SYNTH2_TEST_STYLES[k]`` uses ``SYNTH2_TEST_SEED + k``:
each style its own nuclei, not one layout rendered three ways)."""


@dataclass(frozen=True)
class SyntheticParams:
    """How a synthetic dataset's folder is generated (:func:`sharp_fpn.data.synthetic.write_dataset`)."""

    num_images: int
    seed: int
    sizes: Optional[tuple[tuple[int, int], ...]] = None  # None: DSB2018's size distribution
    style: Union[None, str, tuple[str, ...]] = None  # None: the version's mix
    version: int = 1


SYNTH_PARAMS = SyntheticParams(SYNTH_NUM_IMAGES, SYNTH_SEED, SYNTH_SIZES)
SYNTH2_PARAMS = SyntheticParams(SYNTH2_NUM_IMAGES, SYNTH2_SEED, version=2)
SYNTH2_NOBF_PARAMS = SyntheticParams(
    SYNTH2_NUM_IMAGES, SYNTH2_SEED, style=("fluorescence", "he"), version=2
)
SYNTH2_TEST_STYLES = ("fluorescence", "he", "brightfield")

DSB2018_WHERE = (
    "Get the Kaggle 2018 Data Science Bowl data (https://www.kaggle.com/c/data-science-bowl-2018"
    "/data: stage1_train.zip, stage1_train_labels.csv, stage1_test.zip, stage1_solution.csv) or "
    "BBBC038 (https://bbbc.broadinstitute.org/BBBC038) and unzip it so that {folder} holds "
    "stage1_train/<ImageId>/images/<ImageId>.png; see datasets/README.md."
)


@dataclass(frozen=True)
class NucleiDataset:
    """Where one registered dataset comes from."""

    folder: str  # under the datasets root
    split: str  # DSB2018 split folder, e.g. "stage1_train"
    labels_csv: Optional[str] = None  # run-length labels (relative to folder); None: masks/
    subset: Optional[str] = None  # "train" or "val" of the split; None: all of it
    synthetic: bool = False  # generate the folder on first use
    generate: Optional[SyntheticParams] = None  # how (synthetic; None: SYNTH_PARAMS, v1)

    def synthetic_params(self) -> SyntheticParams:
        """The generation parameters of a synthetic dataset."""
        return self.generate or SYNTH_PARAMS

    def root(self, datasets: Path) -> Path:
        return datasets / self.folder

    def annotation_dir(self, datasets: Path) -> Path:
        return self.root(datasets) / "annotations"

    def json_file(self, datasets: Path) -> Path:
        suffix = f"_{self.subset}" if self.subset else ""
        return self.annotation_dir(datasets) / f"{self.split}{suffix}.json"


DATASETS: dict[str, NucleiDataset] = {
    "dsb2018_train": NucleiDataset("dsb2018", "stage1_train", subset="train"),
    "dsb2018_val": NucleiDataset("dsb2018", "stage1_train", subset="val"),
    "dsb2018_stage1_test": NucleiDataset("dsb2018", "stage1_test", "stage1_solution.csv"),
    "nuclei_synth_train": NucleiDataset("nuclei_synth", "stage1_train", subset="train", synthetic=True),
    "nuclei_synth_val": NucleiDataset("nuclei_synth", "stage1_train", subset="val", synthetic=True),
    **{
        f"{folder}_{subset}": NucleiDataset(
            folder, "stage1_train", subset=subset, synthetic=True, generate=params
        )
        for folder, params in (
            ("nuclei_synth2", SYNTH2_PARAMS), ("nuclei_synth2_nobf", SYNTH2_NOBF_PARAMS)
        )
        for subset in ("train", "val")
    },
    **{
        f"nuclei_synth2_test_{style}": NucleiDataset(
            f"nuclei_synth2_test_{style}", "stage1_train", synthetic=True,
            generate=SyntheticParams(
                SYNTH2_TEST_NUM_IMAGES, SYNTH2_TEST_SEED + k, style=style, version=2
            ),
        )
        for k, style in enumerate(SYNTH2_TEST_STYLES)
    },
}


def unknown_dataset_message(key: str, name: str, registered: Iterable[str] = ()) -> str:
    """What to say when config key ``key`` (``DATASETS.TRAIN``...) names no registered dataset:
    the names sharp-fpn registers, where their data go, and the closest registered name."""
    import difflib

    close = difflib.get_close_matches(name, list(DATASETS) + list(registered), n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    return (
        f"{key}: no dataset named {name!r} is registered; {hint}sharp-fpn registers "
        f"{', '.join(DATASETS)}, whose data go under {datasets_root()} "
        f"($DETECTRON2_DATASETS; see datasets/README.md); a dataset of your own must be "
        f"registered with detectron2 (register_coco_instances) by the script that trains"
    )


def datasets_root() -> Path:
    """``$DETECTRON2_DATASETS``, default ``./datasets`` (detectron2's convention)."""
    return Path(os.environ.get("DETECTRON2_DATASETS", "datasets")).expanduser()


@contextmanager
def folder_lock(folder: Path) -> Iterator[None]:
    """Hold ``folder``'s ``.sharp_fpn.lock`` (an exclusive ``flock``, waiting for it) while
    the block runs: one process at a time writes a data set there."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".sharp_fpn.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def split_ids(ids: list[str]) -> dict[str, list[str]]:
    """The paper's split: ``train_test_split(sorted(ids), test_size=0.2, random_state=41)``."""
    from sklearn.model_selection import train_test_split

    train, val = train_test_split(
        sorted(ids), test_size=SPLIT_VAL_FRACTION, random_state=SPLIT_RANDOM_STATE
    )
    return {"train": sorted(train), "val": sorted(val)}


def _subset(coco: dict, keep: set[str]) -> dict:
    images = [im for im in coco["images"] if im["image_key"] in keep]
    ids = {im["id"] for im in images}
    return {
        **coco,
        "images": images,
        "annotations": [a for a in coco["annotations"] if a["image_id"] in ids],
    }


def _ensure_source(name: str, spec: NucleiDataset, root: Path) -> None:
    if spec.synthetic and not (root / spec.split).is_dir():
        from .synthetic import write_dataset

        params = spec.synthetic_params()
        print(f"[sharp_fpn] {name}: generating the synthetic nuclei set in {root} (first use, "
              f"v{params.version}, {params.num_images} images, seed {params.seed})")
        write_dataset(root, params.num_images, params.seed, split=spec.split,
                      sizes=params.sizes, style=params.style, version=params.version)
    if not (root / spec.split).is_dir():
        raise FileNotFoundError(
            f"dataset {name!r}: {root / spec.split} does not exist. "
            + DSB2018_WHERE.format(folder=root)
        )
    if spec.labels_csv and not (root / spec.labels_csv).is_file():
        raise FileNotFoundError(
            f"dataset {name!r}: {root / spec.labels_csv} does not exist. "
            + DSB2018_WHERE.format(folder=root)
        )


def prepare(name: str, datasets: Optional[Path] = None) -> Path:
    """Make sure dataset ``name``'s COCO json exists (converting on first use); return its path.

    ``datasets`` is the datasets root (default :func:`datasets_root`).
    """
    spec = DATASETS[name]
    datasets = datasets_root() if datasets is None else datasets
    root = spec.root(datasets)
    target = spec.json_file(datasets)
    if target.is_file():
        return target
    with folder_lock(root):
        if target.is_file():  # another process made it while we waited
            return target
        _ensure_source(name, spec, root)
        from .dsb2018 import convert_split, write_json_atomic

        annotations = spec.annotation_dir(datasets)
        full_json = annotations / f"{spec.split}.json"
        if not full_json.is_file():
            csv = root / spec.labels_csv if spec.labels_csv else None
            print(f"[sharp_fpn] {name}: converting {root / spec.split} to {full_json}")
            # The converter's notes (an image kept with no nucleus...) are said as the other
            # steps of the first use are, naming the dataset: the synthetic default holds
            # empty images on purpose (negative examples), and a note per image is no error.
            coco = convert_split(root, spec.split, labels_csv=csv,
                                 on_warning=lambda m: print(f"[sharp_fpn] {name}: note: {m}"))
            write_json_atomic(coco, full_json)
        if spec.subset:
            coco = json.loads(full_json.read_text())
            split_file = annotations / f"{spec.split}_split.json"
            if split_file.is_file():
                split = json.loads(split_file.read_text())
            else:
                split = split_ids([im["image_key"] for im in coco["images"]])
                split["rule"] = (
                    f"sklearn train_test_split(sorted ImageIds, test_size={SPLIT_VAL_FRACTION}, "
                    f"random_state={SPLIT_RANDOM_STATE})"
                )
                write_json_atomic(split, split_file)
            known = {im["image_key"] for im in coco["images"]}
            missing = sorted(set(split[spec.subset]) - known)
            if missing:
                raise FileNotFoundError(
                    f"dataset {name!r}: {split_file} lists {len(missing)} image(s) that "
                    f"{root / spec.split} lacks, e.g. {missing[0]}; restore them, or delete "
                    f"{annotations} to convert and split the folder anew"
                )
            write_json_atomic(_subset(coco, set(split[spec.subset])), target)
    return target
