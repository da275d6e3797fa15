"""Dataset registration: names, metadata, first-use conversion, the frozen split, missing data."""
import csv
import json
import math
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from detectron2.data import DatasetCatalog, MetadataCatalog
from PIL import Image
from pycocotools import mask as mask_util

import sharp_fpn.d2  # noqa: F401  (registers the datasets)
from sharp_fpn.data.catalog import prepare, split_ids
from sharp_fpn.data.synthetic import write_dataset

SMALL = [(64, 64), (64, 80)]


def test_every_dataset_is_registered_with_nucleus_metadata():
    for name in ("dsb2018_train", "dsb2018_val", "dsb2018_stage1_test", "nuclei_synth_train", "nuclei_synth_val",
                 "nuclei_synth2_train", "nuclei_synth2_val", "nuclei_synth2_nobf_train", "nuclei_synth2_nobf_val",
                 "nuclei_synth2_test_fluorescence", "nuclei_synth2_test_he", "nuclei_synth2_test_brightfield"):
        assert name in DatasetCatalog.list()
        meta = MetadataCatalog.get(name)
        assert meta.thing_classes == ["nucleus"]
        assert meta.evaluator_type == "coco"
        assert meta.json_file.startswith(os.environ["DETECTRON2_DATASETS"])


def test_missing_dsb2018_says_where_to_put_it_and_where_to_get_it():
    with pytest.raises(FileNotFoundError) as err:
        DatasetCatalog.get("dsb2018_train")
    message = str(err.value)
    assert "dsb2018_train" in message
    assert str(Path(os.environ["DETECTRON2_DATASETS"]) / "dsb2018" / "stage1_train") in message
    assert "Data Science Bowl" in message and "BBBC038" in message


def test_split_is_sklearns_with_random_state_41():
    ids = [f"{i:03d}" for i in range(10)]
    split = split_ids(list(reversed(ids)))  # order of the input must not matter
    assert len(split["val"]) == math.ceil(0.2 * len(ids)) == 2
    assert sorted(split["train"] + split["val"]) == ids
    # sklearn's ShuffleSplit: RandomState(41).permutation(n), the first n_test go to test.
    perm = np.random.RandomState(41).permutation(len(ids))
    assert split["val"] == sorted(ids[k] for k in perm[:2])


def test_dsb2018_train_val_split_is_written_once_and_never_drifts(tmp_path):
    write_dataset(tmp_path / "dsb2018", 10, seed=3, sizes=SMALL, progress=False)
    train = json.loads(prepare("dsb2018_train", tmp_path).read_text())
    val = json.loads(prepare("dsb2018_val", tmp_path).read_text())
    train_keys = {im["image_key"] for im in train["images"]}
    val_keys = {im["image_key"] for im in val["images"]}
    assert len(val_keys) == 2 and len(train_keys) == 8 and not train_keys & val_keys
    split_file = tmp_path / "dsb2018" / "annotations" / "stage1_train_split.json"
    assert json.loads(split_file.read_text())["val"] == sorted(val_keys)
    # Annotations follow their images.
    val_ids = {im["id"] for im in val["images"]}
    assert val["annotations"] and all(a["image_id"] in val_ids for a in val["annotations"])

    # New images arrive and the json files are rebuilt: the recorded split still decides.
    write_dataset(tmp_path / "more", 3, seed=4, sizes=SMALL, progress=False)
    for folder in (tmp_path / "more" / "stage1_train").iterdir():
        folder.rename(tmp_path / "dsb2018" / "stage1_train" / folder.name)
    for f in split_file.parent.glob("stage1_train*.json"):
        if f != split_file:
            f.unlink()
    again = json.loads(prepare("dsb2018_val", tmp_path).read_text())
    assert {im["image_key"] for im in again["images"]} == val_keys


def test_a_split_file_naming_lost_images_is_an_error(tmp_path):
    write_dataset(tmp_path / "dsb2018", 6, seed=5, sizes=SMALL, progress=False)
    val_key = json.loads(prepare("dsb2018_val", tmp_path).read_text())["images"][0]["image_key"]
    annotations = tmp_path / "dsb2018" / "annotations"
    for f in annotations.glob("stage1_train*.json"):
        if not f.name.endswith("_split.json"):
            f.unlink()
    shutil.rmtree(tmp_path / "dsb2018" / "stage1_train" / val_key)
    with pytest.raises(FileNotFoundError, match=f"lists 1 image.*{val_key}"):
        prepare("dsb2018_val", tmp_path)


def test_stage1_test_reads_the_solution_csv(tmp_path):
    root = tmp_path / "dsb2018"
    ids = write_dataset(root, 3, seed=6, split="stage1_test", sizes=SMALL, progress=False)
    # The real stage1_test ships images only, labels in stage1_solution.csv (with Height, Width).
    with open(root / "stage1_test_labels.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    sizes = {}
    for image_id in ids:
        folder = root / "stage1_test" / image_id
        with Image.open(folder / "images" / f"{image_id}.png") as image:
            sizes[image_id] = image.size[::-1]
        shutil.rmtree(folder / "masks")
    with open(root / "stage1_solution.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["ImageId", "EncodedPixels", "Height", "Width"])
        for row in rows:
            h, w = sizes[row["ImageId"]]
            writer.writerow([row["ImageId"], row["EncodedPixels"], h, w])
    coco = json.loads(prepare("dsb2018_stage1_test", tmp_path).read_text())
    assert sorted(im["image_key"] for im in coco["images"]) == sorted(ids)
    n_rows = sum(1 for r in rows if r["EncodedPixels"] != "1 1")
    assert len(coco["annotations"]) == n_rows


def test_the_synthetic_default_is_generated_on_first_use_and_loads():
    records = DatasetCatalog.get("nuclei_synth_train")
    val = DatasetCatalog.get("nuclei_synth_val")
    assert len(records) + len(val) == 60 and len(val) == 12
    assert not {r["image_id"] for r in records} & {r["image_id"] for r in val}
    with_nuclei = [r for r in records if r["annotations"]]
    assert len(with_nuclei) > len(records) // 2
    record = with_nuclei[0]
    assert Path(record["file_name"]).is_file()
    ann = record["annotations"][0]
    assert ann["category_id"] == 0  # detectron2's contiguous id of "nucleus"
    mask = mask_util.decode(ann["segmentation"])
    assert mask.shape == (record["height"], record["width"]) and mask.any()
