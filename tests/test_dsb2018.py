"""DSB2018 -> COCO conversion on tiny data sets written by the tests themselves."""
from __future__ import annotations

import csv
import importlib.util
import json
import random
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from PIL import Image
from pycocotools import mask as mask_utils

from sharp_fpn.data import dsb2018
from sharp_fpn.data.dsb2018 import (
    DSBFormatError,
    DSBFormatWarning,
    coco_counts_from_runs,
    convert_split,
    write_json_atomic,
)
from sharp_fpn.data.rle import EMPTY_IMAGE_RUN, encode, parse_runs

REPO = Path(__file__).resolve().parents[1]
SPLIT = "stage1_train"


# --------------------------------------------------------------------------------------------
# writing tiny DSB2018 folders


def write_png(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def write_image(root: Path, split: str, image_id: str, shape: tuple[int, int], seed: int) -> None:
    """images/<id>.png: RGBA noise, like DSB2018's 8-bit RGBA PNGs."""
    pixels = np.random.default_rng(seed).integers(0, 256, (*shape, 4), dtype=np.uint8)
    write_png(root / split / image_id / "images" / f"{image_id}.png", pixels)


def write_masks(root: Path, split: str, image_id: str, masks: dict[str, np.ndarray]) -> None:
    folder = root / split / image_id / "masks"
    folder.mkdir(parents=True, exist_ok=True)
    for name, mask in masks.items():
        write_png(folder / name, mask.astype(np.uint8) * 255)


def a1_masks() -> dict[str, np.ndarray]:
    """Image a1 (12x16). Name order a, b, m, z; first-pixel order z, b, m, a."""
    shape = (12, 16)
    left = np.zeros(shape, bool)
    left[:, 0:2] = True  # two full columns: their runs touch across the column break
    ring = np.zeros(shape, bool)
    ring[6:10, 4:8] = True
    ring[7:9, 5:7] = False
    rect = np.zeros(shape, bool)
    rect[2:5, 5:9] = True
    corner = np.zeros(shape, bool)
    corner[9:12, 15] = True  # holds the image's last pixel
    corner[11, 13:16] = True
    return {"a_corner.png": corner, "b_ring.png": ring, "m_rect.png": rect, "z_left.png": left}


def random_masks(shape: tuple[int, int], count: int, seed: int) -> dict[str, np.ndarray]:
    """Fragmented, non-overlapping masks cut from a random label image; names 1.png, 2.png..."""
    labels = np.random.default_rng(seed).integers(0, count + 1, shape)
    return {f"{k}.png": labels == k for k in range(1, count + 1) if (labels == k).any()}


def make_dataset(root: Path, extra_images: int = 0) -> dict[str, list[np.ndarray]]:
    """a1 (4 masks + an empty one), b2 (random masks), c3 (no nucleus), plus ``extra_images``.

    Returns every image's masks in canonical order (first pixel, column-major).
    """
    images: dict[str, tuple[tuple[int, int], dict[str, np.ndarray]]] = {
        "a1": ((12, 16), a1_masks()),
        "b2": ((10, 10), random_masks((10, 10), 3, seed=2)),
        "c3": ((9, 20), {}),
    }
    for k in range(extra_images):
        images[f"d{k}"] = ((8 + k, 11), random_masks((8 + k, 11), 4, seed=10 + k))
    truth = {}
    for seed, (image_id, (shape, masks)) in enumerate(images.items()):
        write_image(root, SPLIT, image_id, shape, seed)
        write_masks(root, SPLIT, image_id, masks)
        truth[image_id] = sorted(masks.values(), key=lambda m: np.flatnonzero(m.ravel("F"))[0])
    write_masks(root, SPLIT, "a1", {"e_empty.png": np.zeros((12, 16), bool)})
    return truth


def write_csv(path: Path, header: list[str], rows: list[list]) -> Path:
    with open(path, "w", newline="") as out:
        writer = csv.writer(out)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def labels_csv(root: Path, truth: dict[str, list[np.ndarray]], seed: int = 3) -> Path:
    """stage1_train_labels.csv of ``truth``, rows shuffled; "1 1" for images with no nucleus."""
    rows = [[i, encode(m)] for i, masks in truth.items() for m in masks]
    rows += [[i, EMPTY_IMAGE_RUN] for i, masks in truth.items() if not masks]
    random.Random(seed).shuffle(rows)
    return write_csv(root / "stage1_train_labels.csv", ["ImageId", "EncodedPixels"], rows)


def decoded(coco: dict, image_key: str) -> list[np.ndarray]:
    image = next(im for im in coco["images"] if im["image_key"] == image_key)
    return [
        mask_utils.decode(a["segmentation"]).astype(bool)
        for a in coco["annotations"]
        if a["image_id"] == image["id"]
    ]


def json_bytes(coco: dict, path: Path) -> bytes:
    write_json_atomic(coco, path)
    return path.read_bytes()


# --------------------------------------------------------------------------------------------
# round trips


def test_folder_round_trip(tmp_path: Path) -> None:
    truth = make_dataset(tmp_path)
    with pytest.warns(DSBFormatWarning) as caught:
        coco = convert_split(tmp_path, SPLIT, workers=1)
    assert [str(w.message) for w in caught] == [
        "stage1_train/a1/masks/e_empty.png is empty (no 255 pixel); skipped",
        "stage1_train/c3 has no nucleus (its masks/ folder is empty); kept as an image with none",
    ]

    assert coco["categories"] == [{"id": 1, "name": "nucleus"}]
    assert coco["images"] == [
        {"id": 1, "file_name": "stage1_train/a1/images/a1.png", "height": 12, "width": 16,
         "image_key": "a1"},
        {"id": 2, "file_name": "stage1_train/b2/images/b2.png", "height": 10, "width": 10,
         "image_key": "b2"},
        {"id": 3, "file_name": "stage1_train/c3/images/c3.png", "height": 9, "width": 20,
         "image_key": "c3"},
    ]
    annotations = coco["annotations"]
    assert len(annotations) == 4 + len(truth["b2"]) == 7
    assert [a["id"] for a in annotations] == list(range(1, 8))
    assert [a["image_id"] for a in annotations] == [1, 1, 1, 1, 2, 2, 2]
    assert all(a["iscrowd"] == 0 and a["category_id"] == 1 for a in annotations)

    # a1 in first-pixel order: z_left, b_ring, m_rect, a_corner
    a1 = annotations[:4]
    assert [a["bbox"] for a in a1] == [
        [0.0, 0.0, 2.0, 12.0], [4.0, 6.0, 4.0, 4.0], [5.0, 2.0, 4.0, 3.0], [13.0, 9.0, 3.0, 3.0]
    ]
    assert [a["area"] for a in a1] == [24, 12, 12, 5]

    for image_key, masks in truth.items():
        got = decoded(coco, image_key)
        assert len(got) == len(masks)
        for mask, back in zip(masks, got):
            np.testing.assert_array_equal(back, mask)  # bit for bit, in canonical order
    for a, mask in zip(annotations, truth["a1"] + truth["b2"]):
        reference = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
        assert a["segmentation"] == {"size": [mask.shape[0], mask.shape[1]],
                                     "counts": reference["counts"].decode()}
        assert a["area"] == int(mask.sum())


def test_csv_gives_the_same_json_as_folders(tmp_path: Path) -> None:
    truth = make_dataset(tmp_path)
    folder_coco = convert_split(tmp_path, SPLIT, workers=1, on_warning=lambda m: None)
    csv_coco = convert_split(tmp_path, SPLIT, labels_csv(tmp_path, truth), workers=1)
    assert json_bytes(csv_coco, tmp_path / "csv.json") == json_bytes(
        folder_coco, tmp_path / "folder.json"
    )
    assert len(csv_coco["annotations"]) == 7
    # another row order gives the same bytes again
    other = convert_split(tmp_path, SPLIT, labels_csv(tmp_path, truth, seed=99), workers=1)
    assert json_bytes(other, tmp_path / "other.json") == (tmp_path / "folder.json").read_bytes()


def test_worker_count_does_not_change_the_output(tmp_path: Path) -> None:
    truth = make_dataset(tmp_path, extra_images=5)
    quiet: Callable[[str], None] = lambda m: None
    one = convert_split(tmp_path, SPLIT, workers=1, on_warning=quiet)
    two = convert_split(tmp_path, SPLIT, workers=2, on_warning=quiet)
    assert len(one["images"]) == 8
    assert json.dumps(one) == json.dumps(two)
    csv_two = convert_split(tmp_path, SPLIT, labels_csv(tmp_path, truth), workers=2)
    assert json.dumps(csv_two) == json.dumps(one)


def test_stage1_solution_format_and_empty_image(tmp_path: Path) -> None:
    """stage1_solution.csv: Height/Width columns, test images without masks, "1 1" rows."""
    write_image(tmp_path, "stage1_test", "t1", (8, 6), seed=0)
    write_image(tmp_path, "stage1_test", "t2", (5, 7), seed=1)
    m1 = np.zeros((8, 6), bool)
    m1[1:3, 1:4] = True
    m2 = np.zeros((8, 6), bool)
    m2[5:8, 0] = True
    solution = write_csv(
        tmp_path / "stage1_solution.csv",
        ["ImageId", "EncodedPixels", "Height", "Width"],
        [["t2", EMPTY_IMAGE_RUN, 5, 7], ["t1", encode(m1), 8, 6], ["t1", encode(m2), 8, 6],
         ["t1", EMPTY_IMAGE_RUN, 8, 6]],  # beside other rows, "1 1" is a one-pixel nucleus
    )
    assert encode(m2) == "6 3"
    coco = convert_split(tmp_path, "stage1_test", solution, workers=1)
    assert coco["images"] == [
        {"id": 1, "file_name": "stage1_test/t1/images/t1.png", "height": 8, "width": 6,
         "image_key": "t1"},
        {"id": 2, "file_name": "stage1_test/t2/images/t2.png", "height": 5, "width": 7,
         "image_key": "t2"},
    ]
    assert [a["image_id"] for a in coco["annotations"]] == [1, 1, 1]  # t2 has none
    assert [a["bbox"] for a in coco["annotations"]] == [
        [0.0, 0.0, 1.0, 1.0], [0.0, 5.0, 1.0, 3.0], [1.0, 1.0, 3.0, 2.0]
    ]
    assert [a["area"] for a in coco["annotations"]] == [1, 3, 6]
    got = decoded(coco, "t1")  # first pixels 0, 5, 9 (column-major)
    assert got[0].sum() == 1 and got[0][0, 0]
    np.testing.assert_array_equal(got[1], m2)
    np.testing.assert_array_equal(got[2], m1)


def test_image_with_more_than_255_nuclei(tmp_path: Path) -> None:
    """pycocotools' area() overflows past 255 RLEs per call under numpy 2: batched."""
    write_image(tmp_path, SPLIT, "many", (20, 20), seed=0)
    rows = [["many", f"{pixel} 1"] for pixel in range(1, 400)]
    labels = write_csv(tmp_path / "labels.csv", ["ImageId", "EncodedPixels"], rows)
    coco = convert_split(tmp_path, SPLIT, labels, workers=1, on_warning=lambda m: None)
    assert len(coco["annotations"]) == 399
    assert [a["area"] for a in coco["annotations"]] == [1] * 399
    assert coco["annotations"][-1]["bbox"] == [19.0, 18.0, 1.0, 1.0]  # pixel 399: row 18, col 19


def test_stage2_keeps_private_rows_only(tmp_path: Path) -> None:
    split = "stage2_test_final"
    for k, image_id in enumerate(["i1", "p1", "p2", "x9"]):
        write_image(tmp_path, split, image_id, (6, 6), seed=k)
    m = np.zeros((6, 6), bool)
    m[2:4, 2:5] = True
    solution = write_csv(
        tmp_path / "stage2_solution_final.csv",
        ["ImageId", "EncodedPixels", "Height", "Width", "Usage"],
        [
            ["i1", "1 3", 6, 6, "Ignored"],
            ["p1", encode(m), 6, 6, "Private"],
            ["i1", "9 3", 6, 6, "Ignored"],
            ["p2", EMPTY_IMAGE_RUN, 6, 6, "Private"],
        ],
    )
    messages: list[str] = []
    coco = convert_split(tmp_path, split, solution, workers=1, on_warning=messages.append)
    assert [im["image_key"] for im in coco["images"]] == ["p1", "p2"]
    assert len(coco["annotations"]) == 1 and coco["annotations"][0]["image_id"] == 1
    assert coco["annotations"][0]["area"] == 6
    np.testing.assert_array_equal(decoded(coco, "p1")[0], m)
    # x9 has no row at all: warned about; i1's rows are all Ignored: left out silently
    assert messages == [
        "1 image folder(s) of stage2_test_final have no row in stage2_solution_final.csv and "
        "are left out: x9"
    ]


@settings(max_examples=25, deadline=None)
@given(
    st.tuples(st.integers(1, 9), st.integers(1, 9)).flatmap(
        lambda shape: arrays(np.int8, shape, elements=st.integers(0, 3))
    )
)
def test_random_label_images_round_trip(labels: np.ndarray) -> None:
    """Masks cut from any label image come back bit for bit, both ways, identically."""
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        masks = {f"{k}.png": labels == k for k in range(1, 4) if (labels == k).any()}
        # A lone nucleus made of the top-left pixel alone is "1 1" in a CSV, which DSB2018
        # reads as "no nucleus": the one case where the CSV cannot say what the folders say.
        assume(not (len(masks) == 1 and [m.sum() for m in masks.values()] == [1]
                    and labels[0, 0] != 0))
        write_image(root, SPLIT, "r", labels.shape, seed=0)
        write_masks(root, SPLIT, "r", masks)
        truth = {"r": sorted(masks.values(), key=lambda m: np.flatnonzero(m.ravel("F"))[0])}
        messages: list[str] = []
        coco = convert_split(root, SPLIT, workers=1, on_warning=messages.append)
        assert messages == ([] if masks else [
            "stage1_train/r has no nucleus (its masks/ folder is empty); kept as an image with none"
        ])
        got = decoded(coco, "r")
        assert len(got) == len(truth["r"])
        for mask, back in zip(truth["r"], got):
            np.testing.assert_array_equal(back, mask)
        assert convert_split(root, SPLIT, labels_csv(root, truth), workers=1) == coco


@settings(max_examples=100, deadline=None)
@given(
    st.tuples(st.integers(1, 8), st.integers(1, 8)).flatmap(
        lambda shape: arrays(np.bool_, shape)
    )
)
def test_counts_from_runs_match_pycocotools(mask: np.ndarray) -> None:
    if not mask.any():
        return
    starts, lengths = parse_runs(encode(mask), mask.shape)
    counts = coco_counts_from_runs(starts, lengths, mask.size)
    ours = mask_utils.frPyObjects({"size": list(mask.shape), "counts": counts}, *mask.shape)
    assert ours == mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    # split every run into one-pixel runs: touching runs are merged to the same counts
    pixels = np.flatnonzero(mask.ravel("F"))
    assert np.array_equal(coco_counts_from_runs(pixels, np.ones_like(pixels), mask.size), counts)


# --------------------------------------------------------------------------------------------
# what DSB2018 users have: file names in any case, other lossless formats, empty and missing
# masks/ folders, Usage in any case


def _rename(path: Path, name: str) -> None:
    path.rename(path.with_name(name))


def test_any_case_of_png_and_lossless_formats_give_the_same_annotations(tmp_path: Path) -> None:
    make_dataset(tmp_path / "png")
    reference = convert_split(tmp_path / "png", SPLIT, workers=1, on_warning=lambda m: None)
    root = tmp_path / "mixed"
    shutil.copytree(tmp_path / "png", root)
    masks = root / SPLIT / "a1" / "masks"
    _rename(masks / "a_corner.png", "a_corner.PNG")
    _rename(masks / "b_ring.png", "b_ring.Png")
    with Image.open(masks / "m_rect.png") as image:
        image.save(masks / "m_rect.TIFF")
    (masks / "m_rect.png").unlink()
    with Image.open(masks / "z_left.png") as image:
        image.save(masks / "z_left.bmp")
    (masks / "z_left.png").unlink()
    for k, path in enumerate(sorted((root / SPLIT / "b2" / "masks").iterdir())):
        with Image.open(path) as image:
            image.save(path.with_suffix(".tif"), compression="tiff_lzw" if k % 2 else None)
        path.unlink()
    _rename(root / SPLIT / "b2" / "images" / "b2.png", "b2.PNG")

    messages: list[str] = []
    coco = convert_split(root, SPLIT, workers=2, on_warning=messages.append)
    assert coco["images"][1]["file_name"] == "stage1_train/b2/images/b2.PNG"
    coco["images"][1]["file_name"] = "stage1_train/b2/images/b2.png"
    assert coco == reference  # every nucleus read, bit for bit, in the canonical order
    assert messages[0] == "stage1_train/a1/masks/e_empty.png is empty (no 255 pixel); skipped"


def test_files_that_are_no_masks_are_ignored_or_skipped_with_a_warning(tmp_path: Path) -> None:
    """Hidden files and Windows' thumbnails say nothing; a sharp-fpn output there is named."""
    make_dataset(tmp_path)
    reference = convert_split(tmp_path, SPLIT, workers=1, on_warning=lambda m: None)
    masks = tmp_path / SPLIT / "a1" / "masks"
    (masks / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    (masks / "._m_rect.png").write_bytes(b"\0\5\26\7 AppleDouble")  # macOS resource fork
    (masks / "Thumbs.db").write_bytes(b"\xd0\xcf\x11\xe0")
    (masks / ".sharp-fpn-outputs.json").write_text('{"predict": ["m_rect_overlay.png"]}')
    write_png(masks / "m_rect_overlay.png", np.full((12, 16), 255, np.uint8))
    messages: list[str] = []
    assert convert_split(tmp_path, SPLIT, workers=1, on_warning=messages.append) == reference
    assert messages == [
        "stage1_train/a1/masks/m_rect_overlay.png is an output of a sharp-fpn tool, not a mask; "
        "skipped",
        "stage1_train/a1/masks/e_empty.png is empty (no 255 pixel); skipped",
        "stage1_train/c3 has no nucleus (its masks/ folder is empty); kept as an image with none",
    ]


def test_every_image_kept_without_nuclei_is_named(tmp_path: Path) -> None:
    make_dataset(tmp_path)
    write_image(tmp_path, SPLIT, "e4", (6, 6), seed=4)
    write_masks(tmp_path, SPLIT, "e4", {"1.png": np.zeros((6, 6), bool)})
    write_image(tmp_path, SPLIT, "e5", (6, 6), seed=5)
    write_masks(tmp_path, SPLIT, "e5", {"1.png": np.zeros((6, 6), bool),
                                         "2.png": np.zeros((6, 6), bool)})
    write_image(tmp_path, SPLIT, "e6", (6, 6), seed=6)
    (tmp_path / SPLIT / "e6" / "masks").mkdir()
    messages: list[str] = []
    coco = convert_split(tmp_path, SPLIT, workers=2, on_warning=messages.append)
    assert [im["image_key"] for im in coco["images"]] == ["a1", "b2", "c3", "e4", "e5", "e6"]
    assert [m for m in messages if "has no nucleus" in m] == [
        f"stage1_train/{i} has no nucleus ({why}); kept as an image with none"
        for i, why in [("c3", "its masks/ folder is empty"), ("e4", "its one mask is empty"),
                       ("e5", "its 2 masks are empty"), ("e6", "its masks/ folder is empty")]
    ]


def test_images_without_a_masks_folder_are_left_out_and_named(tmp_path: Path) -> None:
    truth = make_dataset(tmp_path, extra_images=2)
    shutil.rmtree(tmp_path / SPLIT / "b2" / "masks")
    shutil.rmtree(tmp_path / SPLIT / "d1" / "masks")
    messages: list[str] = []
    coco = convert_split(tmp_path, SPLIT, workers=2, on_warning=messages.append)
    assert [im["image_key"] for im in coco["images"]] == ["a1", "c3", "d0"]
    assert [im["id"] for im in coco["images"]] == [1, 2, 3]
    assert [a["image_id"] for a in coco["annotations"]] == [1] * 4 + [3] * len(truth["d0"])
    assert [m for m in messages if "masks/ folder:" in m] == [
        f"stage1_train/{i} has no masks/ folder: not labelled, left out (an image with no "
        "nucleus has an empty masks/ folder)" for i in ("b2", "d1")
    ]


def test_usage_is_read_in_any_case(tmp_path: Path) -> None:
    """Private and Public rows (scored) are kept whatever their case, Ignored ones left out."""
    split = "stage2_test_final"
    ids = ["i1", "p1", "p2", "p3", "p4"]
    for k, image_id in enumerate(ids):
        write_image(tmp_path, split, image_id, (6, 6), seed=k)
    solution = write_csv(
        tmp_path / "stage2_solution_final.csv",
        ["ImageId", "EncodedPixels", "Height", "Width", "Usage"],
        [
            ["i1", "1 3", 6, 6, "ignored"],
            ["p1", "1 3", 6, 6, "private"],
            ["p2", "2 3", 6, 6, "Public"],
            ["p3", "3 3", 6, 6, "PRIVATE"],
            ["p3", "20 3", 6, 6, "Private"],  # the same Usage, another case
            ["p4", "4 3", 6, 6, " Private "],
            ["i1", "9 3", 6, 6, "IGNORED"],
        ],
    )
    coco = convert_split(tmp_path, split, solution, workers=1)
    assert [im["image_key"] for im in coco["images"]] == ["p1", "p2", "p3", "p4"]
    assert [a["image_id"] for a in coco["annotations"]] == [1, 2, 3, 3, 4]


# --------------------------------------------------------------------------------------------
# bad input: an error naming the file or line, and no output


def mask_path(root: Path, name: str = "m_rect.png") -> Path:
    return root / SPLIT / "a1" / "masks" / name


def _replace_mask(root: Path, array: np.ndarray) -> None:
    write_png(mask_path(root), array)


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:60])


def _truncated_tiff(path: Path) -> None:
    Image.fromarray(np.zeros((12, 16), np.uint8)).save(path)
    path.write_bytes(path.read_bytes()[:150])  # the header whole, the pixels cut


def _off_value(root: Path) -> None:
    rect = a1_masks()["m_rect.png"].astype(np.uint8) * 255
    rect[3, 6] = 128
    _replace_mask(root, rect)


def _overlap(root: Path) -> None:
    extra = np.zeros((12, 16), bool)
    extra[4:6, 8:10] = True  # (4, 8) is also m_rect's
    write_masks(root, SPLIT, "a1", {"n_over.png": extra})


FOLDER_CASES: dict[str, tuple[Callable[[Path], object], list[str]]] = {
    "no images folder": (
        lambda r: shutil.rmtree(r / SPLIT / "a1" / "images"),
        ["stage1_train/a1 has no images/ folder"],
    ),
    "no masks folder anywhere": (
        lambda r: [shutil.rmtree(r / SPLIT / i / "masks") for i in ("a1", "b2", "c3")],
        [f"{SPLIT}: no image folder has a masks/ folder", "from its labels CSV (--labels-csv)"],
    ),
    "no image file": (
        lambda r: (r / SPLIT / "c3" / "images" / "c3.png").unlink(),
        ["stage1_train/c3/images/c3.png: no such image file (images/ is empty)"],
    ),
    "image of another name": (
        lambda r: (r / SPLIT / "c3" / "images" / "c3.png").rename(
            r / SPLIT / "c3" / "images" / "c3.tif"),
        ["stage1_train/c3/images/c3.png: no such image file (images/ holds c3.tif)"],
    ),
    "mask size": (
        lambda r: _replace_mask(r, np.zeros((12, 15), np.uint8)),
        ["stage1_train/a1/masks/m_rect.png is 12x15 but its image is 12x16"],
    ),
    "corrupt mask": (
        lambda r: _truncate(mask_path(r)),
        ["stage1_train/a1/masks/m_rect.png is not a readable PNG"],
    ),
    "corrupt tiff mask": (
        lambda r: _truncated_tiff(mask_path(r, "t.tif")),
        ["stage1_train/a1/masks/t.tif is not a readable TIFF"],
    ),
    "jpeg mask": (
        lambda r: Image.fromarray(a1_masks()["m_rect.png"].astype(np.uint8) * 255).save(
            mask_path(r, "n_rect.jpg")),
        ["stage1_train/a1/masks/n_rect.jpg: a JPG mask, which is lossy", "save the masks as PNG"],
    ),
    "JPEG mask, upper case": (
        lambda r: Image.fromarray(a1_masks()["m_rect.png"].astype(np.uint8) * 255).save(
            mask_path(r, "n_rect.JPEG"), format="JPEG"),
        ["stage1_train/a1/masks/n_rect.JPEG: a JPEG mask, which is lossy"],
    ),
    "webp mask": (
        lambda r: Image.fromarray(np.zeros((12, 16), np.uint8)).save(mask_path(r, "w.webp")),
        ["stage1_train/a1/masks/w.webp: a WEBP mask, which is lossy"],
    ),
    "not a mask file": (
        lambda r: mask_path(r, "notes.txt").write_text("drawn by hand"),
        ["stage1_train/a1/masks/notes.txt is not a mask image (masks are .png, .tif, .tiff, "
         ".bmp files); move it out of masks/"],
    ),
    "folder in masks": (
        lambda r: mask_path(r, "more").mkdir(),
        ["stage1_train/a1/masks/more is a folder; masks/ holds one mask image per nucleus"],
    ),
    "multi-page tiff mask": (
        lambda r: Image.fromarray(np.zeros((12, 16), np.uint8)).save(
            mask_path(r, "pages.tif"), save_all=True,
            append_images=[Image.fromarray(np.full((12, 16), 255, np.uint8))]),
        ["stage1_train/a1/masks/pages.tif has 2 pages; a mask is one single-channel page"],
    ),
    "16-bit mask": (
        lambda r: Image.fromarray(np.zeros((12, 16), np.uint16)).save(mask_path(r, "deep.png")),
        ["stage1_train/a1/masks/deep.png is a I;16 image; masks must be single-channel 8-bit"],
    ),
    "mask size, tiff": (
        lambda r: Image.fromarray(np.zeros((11, 16), np.uint8)).save(mask_path(r, "small.TIF")),
        ["stage1_train/a1/masks/small.TIF is 11x16 but its image is 12x16"],
    ),
    "bmp mask not 0/255": (
        lambda r: Image.fromarray(np.full((12, 16), 7, np.uint8)).save(mask_path(r, "x.bmp")),
        ["stage1_train/a1/masks/x.bmp has value 7 at row 0, column 0"],
    ),
    "corrupt image": (
        lambda r: (r / SPLIT / "b2" / "images" / "b2.png").write_bytes(b"\x89PNG garbage"),
        ["stage1_train/b2/images/b2.png is not a readable PNG"],
    ),
    "not 0/255": (
        _off_value,
        ["stage1_train/a1/masks/m_rect.png has value 128 at row 3, column 6",
         "must be 0 (background) or 255"],
    ),
    "rgb mask": (
        lambda r: _replace_mask(r, np.zeros((12, 16, 3), np.uint8)),
        ["stage1_train/a1/masks/m_rect.png is a RGB image"],
    ),
    "overlap": (
        _overlap,
        ["stage1_train/a1/masks/m_rect.png and stage1_train/a1/masks/n_over.png overlap at 1 "
         "pixel(s), first at row 4, column 8"],
    ),
}


def expect_failure(
    root: Path, out: Path, labels: Optional[Path] = None, split: str = SPLIT, workers: int = 1
) -> str:
    """Convert as the CLI does (convert, then write); return the error; check nothing written."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with pytest.raises(DSBFormatError) as err:
        write_json_atomic(
            convert_split(root, split, labels, workers=workers, on_warning=lambda m: None), out
        )
    assert list(out.parent.iterdir()) == []  # neither the JSON nor a temporary file
    return str(err.value)


@pytest.mark.parametrize("case", list(FOLDER_CASES))
def test_bad_folder_input(tmp_path: Path, case: str) -> None:
    root = tmp_path / "dsb"
    make_dataset(root)
    breakage, expected = FOLDER_CASES[case]
    breakage(root)
    message = expect_failure(root, tmp_path / "out" / "coco.json")
    for part in expected:
        assert part in message


def test_bad_input_reported_from_worker_processes(tmp_path: Path) -> None:
    root = tmp_path / "dsb"
    make_dataset(root, extra_images=3)
    _overlap(root)
    message = expect_failure(root, tmp_path / "out" / "coco.json", workers=2)
    assert "m_rect.png and stage1_train/a1/masks/n_over.png overlap" in message


def test_missing_split_folder(tmp_path: Path) -> None:
    message = expect_failure(tmp_path, tmp_path / "out" / "coco.json", split="stage9")
    assert f"{tmp_path / 'stage9'} is not a folder" in message


PLAIN = ["ImageId", "EncodedPixels"]
SIZED = ["ImageId", "EncodedPixels", "Height", "Width"]
CSV_CASES: dict[str, tuple[list[str], list[list], list[str]]] = {
    "odd count": (PLAIN, [["a1", "1 2"], ["a1", "20 2 40"]],
                  ["labels.csv line 3 (ImageId 'a1'): odd number of values (3)"]),
    "zero length": (PLAIN, [["a1", "5 0"]],
                    ["labels.csv line 2 (ImageId 'a1'): run 1 (start 5) has length 0"]),
    "past the image": (PLAIN, [["a1", "190 5"]],
                       ["labels.csv line 2", "past the image's 192 pixels (12x16)"]),
    "out of order": (PLAIN, [["a1", "50 2 10 2"]],
                     ["labels.csv line 2", "run 2 (10 2) is out of order with run 1 (50 2)"]),
    "overlapping runs": (PLAIN, [["a1", "10 5 12 2"]],
                         ["labels.csv line 2", "run 2 (12 2) is overlapping with run 1 (10 5)"]),
    "not an integer": (PLAIN, [["a1", "1 x"]], ["labels.csv line 2", "token 'x'"]),
    "empty runs": (PLAIN, [["a1", "1 2"], ["a1", " "]],
                   ["labels.csv line 3: empty EncodedPixels"]),
    "id without image": (
        PLAIN, [["a1", "1 2"], ["zz", "1 2"]],
        ["labels.csv line 3: ImageId 'zz' has no image "
         "(stage1_train/zz/images/zz.png does not exist)"],
    ),
    "overlapping rows": (
        PLAIN, [["a1", "1 5"], ["a1", "30 2"], ["a1", "4 3"]],
        ["labels.csv lines 2 and 4: two masks of ImageId 'a1' overlap (at row 3, column 0)"],
    ),
    "field count": (PLAIN, [["a1", "1 2", "extra"]],
                    ["labels.csv line 2: 3 fields, expected 2 (ImageId,EncodedPixels)"]),
    "no ImageId column": (["Id", "EncodedPixels"], [["a1", "1 2"]],
                          ["labels.csv line 1: no ImageId column"]),
    "size against image": (
        SIZED, [["a1", "1 2", 12, 15]],
        ["labels.csv line 2: Height/Width say 12x15 but stage1_train/a1/images/a1.png is 12x16"],
    ),
    "bad height": (SIZED, [["a1", "1 2", "x", 16]],
                   ["labels.csv line 2: Height 'x' and Width '16' must be positive integers"]),
    "sizes disagree": (SIZED, [["a1", "1 2", 12, 16], ["a1", "9 2", 16, 12]],
                       ["labels.csv line 3: ImageId 'a1' is 16x12 but line 2 says 12x16"]),
    "unknown usage": (
        SIZED + ["Usage"], [["a1", "1 2", 12, 16, "Private"], ["a1", "9 2", 12, 16, "Scored"]],
        ["labels.csv line 3: Usage 'Scored' is none of Private, Public (kept) or Ignored"],
    ),
    "empty usage": (
        SIZED + ["Usage"], [["a1", "1 2", 12, 16, ""]],
        ["labels.csv line 2: Usage '' is none of Private, Public"],
    ),
    "mixed usage, any case": (
        SIZED + ["Usage"], [["a1", "1 2", 12, 16, "private"], ["a1", "9 2", 12, 16, "ignored"]],
        ["labels.csv line 3: Usage 'ignored' but line 2 gives ImageId 'a1' Usage 'private'"],
    ),
    "mixed usage": (
        SIZED + ["Usage"], [["a1", "1 2", 12, 16, "Private"], ["a1", "9 2", 12, 16, "Ignored"]],
        ["labels.csv line 3: Usage 'Ignored' but line 2 gives ImageId 'a1' Usage 'Private'"],
    ),
}


@pytest.mark.parametrize("case", list(CSV_CASES))
def test_bad_csv_input(tmp_path: Path, case: str) -> None:
    root = tmp_path / "dsb"
    make_dataset(root)
    header, rows, expected = CSV_CASES[case]
    labels = write_csv(root / "labels.csv", header, rows)
    message = expect_failure(root, tmp_path / "out" / "coco.json", labels)
    for part in expected:
        assert part in message


# --------------------------------------------------------------------------------------------
# output file, CLI


def test_write_is_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "coco.json"
    write_json_atomic({"images": [1]}, target)
    assert target.read_text() == '{"images":[1]}'

    def fail(src: str, dst: str) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(dsb2018.os, "replace", fail)
    with pytest.raises(OSError, match="disk full"):
        write_json_atomic({"images": [2]}, target)
    assert target.read_text() == '{"images":[1]}'  # the old file, untouched
    assert [p.name for p in tmp_path.iterdir()] == ["coco.json"]  # no temporary file left


def _cli_main() -> Callable[[list[str]], int]:
    spec = importlib.util.spec_from_file_location("convert_dsb2018", REPO / "tools" /
                                                  "convert_dsb2018.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def test_cli_reports_bad_input(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    make_dataset(tmp_path / "dsb")
    _off_value(tmp_path / "dsb")
    out = tmp_path / "out" / "coco.json"
    assert _cli_main()([str(tmp_path / "dsb"), "--out", str(out), "--workers", "1"]) == 1
    assert "error: stage1_train/a1/masks/m_rect.png has value 128" in capsys.readouterr().err
    assert not out.parent.exists()


def test_cli_subprocess(tmp_path: Path) -> None:
    make_dataset(tmp_path / "dsb")
    out = tmp_path / "out" / "coco.json"
    done = subprocess.run(
        [sys.executable, str(REPO / "tools" / "convert_dsb2018.py"), str(tmp_path / "dsb"),
         "--split", SPLIT, "--out", str(out), "--workers", "2"],
        capture_output=True, text=True, timeout=120, cwd=REPO,
    )
    assert done.returncode == 0, done.stderr
    assert f"wrote {out}: 3 images, 7 nuclei" in done.stdout
    assert "warning: stage1_train/a1/masks/e_empty.png is empty (no 255 pixel); skipped" in (
        done.stderr
    )
    expected = convert_split(tmp_path / "dsb", SPLIT, workers=1, on_warning=lambda m: None)
    assert out.read_bytes() == json_bytes(expected, tmp_path / "expected.json")
