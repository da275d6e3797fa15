"""Tests for the synthetic DSB2018-layout nuclei generator (sharp_fpn.data.synthetic)."""
from __future__ import annotations

import csv
import hashlib
import importlib.util
import io
import json
import os
import re
import socket
import subprocess
import sys
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage
from scipy.spatial.distance import pdist

from sharp_fpn.data import rle
from sharp_fpn.data import synthetic as syn
from sharp_fpn.outdir import LOCK_NAME, RECORD_NAME, OutputConflict

ROOT = Path(__file__).resolve().parents[1]
SIZES = [(64, 64), (96, 128)]
N, SEED = 40, 7  # two blocks of EMPTY_BLOCK images: exactly two empty ones


def tree_hashes(root: Path) -> dict[str, str]:
    """sha256 of every file under ``root``, keyed by its relative path."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def read_labels_csv(path: Path) -> tuple[list[str], dict[str, list[str]]]:
    """(header, ImageId -> run-length strings in file order)."""
    with path.open(newline="") as f:
        rows = list(csv.reader(f))
    runs: dict[str, list[str]] = defaultdict(list)
    for image_id, run in rows[1:]:
        runs[image_id].append(run)
    return rows[0], runs


def load_masks(folder: Path) -> list[np.ndarray]:
    """The image's masks as uint8 arrays, ordered by k (file names 1.png .. K.png)."""
    paths = sorted((folder / "masks").glob("*.png"), key=lambda p: int(p.stem))
    assert [p.stem for p in paths] == [str(k) for k in range(1, len(paths) + 1)]
    return [np.asarray(Image.open(p)) for p in paths]


def image_bytes(root: Path, image_id: str) -> bytes:
    """The PNG bytes of image ``image_id`` in the stage1_train split under ``root``."""
    return (root / "stage1_train" / image_id / "images" / f"{image_id}.png").read_bytes()


def extent(mask: np.ndarray) -> float:
    """Largest distance between pixel centres of ``mask`` plus one pixel: its size across."""
    coords = np.argwhere(mask)
    return float(pdist(coords).max()) + 1.0 if len(coords) > 1 else 1.0


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    out = tmp_path_factory.mktemp("syn") / "one_worker"
    ids = syn.write_dataset(out, N, SEED, sizes=SIZES, workers=1, progress=False)
    return out, ids


def test_same_seed_same_bytes_whatever_the_workers(dataset, tmp_path):
    out, ids = dataset
    again = syn.write_dataset(tmp_path / "two", N, SEED, sizes=SIZES, workers=2, progress=False)
    assert again == ids
    first, second = tree_hashes(out), tree_hashes(tmp_path / "two")
    assert len(first) > 2 * N  # images, masks and the CSV
    assert first == second


def test_different_seed_different_data(dataset, tmp_path):
    out, ids = dataset
    other = syn.write_dataset(tmp_path / "s8", N, SEED + 1, sizes=SIZES, workers=1, progress=False)
    assert not set(other) & set(ids)
    ours = {hashlib.sha256(image_bytes(out, i)).digest() for i in ids}
    theirs = {hashlib.sha256(image_bytes(tmp_path / "s8", i)).digest() for i in other}
    assert len(ours) == len(theirs) == N and not ours & theirs


def test_layout_ids_and_dtypes(dataset):
    out, ids = dataset
    split = out / "stage1_train"
    assert sorted(p.name for p in out.iterdir()) == [
        RECORD_NAME, "stage1_train", "stage1_train_labels.csv"]
    assert sorted(p.name for p in split.iterdir()) == sorted(ids)
    assert len(set(ids)) == N
    expected = hashlib.sha256(b"sharp-fpn synthetic nuclei v1|seed=7|index=0").hexdigest()
    assert ids[0] == syn.image_id(SEED, 0) == expected
    for image_id in ids:
        assert re.fullmatch(r"[0-9a-f]{64}", image_id)
        folder = split / image_id
        assert sorted(p.name for p in folder.iterdir()) == ["images", "masks"]
        assert [p.name for p in (folder / "images").iterdir()] == [f"{image_id}.png"]
        image = Image.open(folder / "images" / f"{image_id}.png")
        assert image.format == "PNG" and image.mode == "RGBA"
        assert (image.height, image.width) in SIZES
        pixels = np.asarray(image)
        assert pixels.dtype == np.uint8 and pixels.shape == (image.height, image.width, 4)
        assert (pixels[..., 3] == 255).all()
        for mask_path in (folder / "masks").iterdir():
            mask = Image.open(mask_path)
            assert mask.format == "PNG" and mask.mode == "L"
            assert mask.size == image.size
            assert set(np.unique(np.asarray(mask)).tolist()) == {0, 255}


def test_masks_disjoint_single_region_and_sized(dataset):
    out, ids = dataset
    extents, touching = [], 0
    for image_id in ids:
        masks = load_masks(out / "stage1_train" / image_id)
        if not masks:
            continue
        stack = np.stack(masks) > 0
        assert (stack.sum(axis=0) <= 1).all(), f"{image_id}: masks overlap"
        for mask in stack:
            assert mask.sum() >= syn.MIN_NUCLEUS_AREA
            assert ndimage.label(mask)[1] == 1  # one 4-connected region
            extents.append(extent(mask))
        labels = np.argmax(np.concatenate([np.zeros_like(stack[:1]), stack]), axis=0)
        right = (labels[:, 1:] != labels[:, :-1]) & (labels[:, 1:] > 0) & (labels[:, :-1] > 0)
        down = (labels[1:] != labels[:-1]) & (labels[1:] > 0) & (labels[:-1] > 0)
        touching += int(right.sum() + down.sum())
    assert 5.0 <= min(extents) and max(extents) <= 40.0
    assert min(extents) < 12.0 and max(extents) > 25.0  # varied sizes
    assert touching > 0  # some nuclei are in contact
    assert len(extents) > 3 * N


def test_csv_decodes_to_the_mask_pngs(dataset):
    out, ids = dataset
    header, runs = read_labels_csv(out / "stage1_train_labels.csv")
    assert header == ["ImageId", "EncodedPixels"]
    assert set(runs) == set(ids)
    with (out / "stage1_train_labels.csv").open() as f:
        listed = [line.split(",")[0] for line in f.read().splitlines()[1:]]
    assert listed == sorted(listed)  # rows grouped and sorted by ImageId
    plans = {p.image_id: p for p in syn.plan_images(N, SEED, SIZES)}
    empty = []
    for image_id in ids:
        masks = load_masks(out / "stage1_train" / image_id)
        shape = (plans[image_id].height, plans[image_id].width)
        if not masks:
            assert runs[image_id] == [rle.EMPTY_IMAGE_RUN]
            empty.append(image_id)
            continue
        assert len(runs[image_id]) == len(masks)
        for run, mask in zip(runs[image_id], masks):
            np.testing.assert_array_equal(rle.decode(run, shape), mask > 0)
    assert sorted(empty) == sorted(i for i, p in plans.items() if p.empty)
    assert len(empty) == N // syn.EMPTY_BLOCK == 2


def test_both_styles_in_a_mixed_run(dataset):
    out, ids = dataset
    plans = syn.plan_images(N, SEED, SIZES)
    gray = []
    for plan in plans:
        rgba = np.asarray(Image.open(io.BytesIO(image_bytes(out, plan.image_id))))
        is_gray = bool((rgba[..., :3] == rgba[..., :1]).all())
        assert is_gray == (plan.style == "fluorescence")
        gray.append(is_gray)
        if plan.style == "he":  # channels stored in RGBA order: a pink background (R > B > G)
            r, g, b = rgba[..., :3].reshape(-1, 3).mean(axis=0)
            assert r > b > g
    assert 0 < sum(gray) < N
    styles = Counter(p.style for p in syn.plan_images(1000, 0))
    assert 650 < styles["fluorescence"] < 750 and styles["he"] == 1000 - styles["fluorescence"]


@pytest.mark.parametrize("style", syn.STYLES)
def test_forced_style_looks_the_part(style):
    rgba, labels = syn.generate_image(np.random.default_rng(3), 96, 128, style)
    assert rgba.shape == (96, 128, 4) and rgba.dtype == np.uint8
    assert labels.shape == (96, 128) and labels.dtype == np.int32
    assert labels.max() >= 1 and set(np.unique(labels)) == set(range(labels.max() + 1))
    rgb = rgba[..., :3].astype(np.float64)
    nucleus, background = rgb[labels > 0].mean(axis=0), rgb[labels == 0].mean(axis=0)
    if style == "fluorescence":
        assert (rgba[..., 0] == rgba[..., 1]).all() and (rgba[..., 1] == rgba[..., 2]).all()
        assert nucleus[0] > background[0] + 20  # bright nuclei on a dark background
        assert background[0] < 60
    else:
        r, g, b = background
        assert r > b > g and r > 150  # light pink: eosin absorbs green most
        assert nucleus.sum() < background.sum() - 150  # dark nuclei
        assert nucleus[2] > nucleus[0]  # hematoxylin: bluish purple
    again, labels_again = syn.generate_image(np.random.default_rng(3), 96, 128, style)
    np.testing.assert_array_equal(again, rgba)
    np.testing.assert_array_equal(labels_again, labels)


def test_empty_image_has_no_nucleus():
    rgba, labels = syn.generate_image(np.random.default_rng(0), 64, 64, "he", empty=True)
    assert labels.max() == 0 and rgba.shape == (64, 64, 4)
    assert rgba[..., :3].std() > 1.0  # still textured tissue, not a flat fill


def test_plans_follow_dsb2018_sizes_and_the_override():
    plans = syn.plan_images(670, 0)
    sizes = Counter((p.height, p.width) for p in plans)
    assert set(sizes) <= set(syn.DSB2018_STAGE1_TRAIN_SIZES)
    assert 290 <= sizes[(256, 256)] <= 380  # 334 in DSB2018
    assert 60 <= sizes[(520, 696)] <= 125  # 92 in DSB2018
    blocks = Counter(p.index // syn.EMPTY_BLOCK for p in plans if p.empty)
    assert set(blocks) >= set(range(670 // syn.EMPTY_BLOCK)) and set(blocks.values()) == {1}
    assert 33 <= sum(blocks.values()) <= 34  # one per full block of 20; the last 10 may have one
    assert {(p.height, p.width) for p in syn.plan_images(30, 1, SIZES)} == set(SIZES)
    assert {p.style for p in syn.plan_images(30, 1, style="he")} == {"he"}
    assert [p.image_id for p in syn.plan_images(5, 1)] == [syn.image_id(1, i) for i in range(5)]


def test_parse_sizes():
    assert syn.parse_sizes("64x64, 96X128") == [(64, 64), (96, 128)]
    assert syn.parse_sizes("default") is None
    with pytest.raises(ValueError, match="'64by64' is not HEIGHTxWIDTH"):
        syn.parse_sizes("64by64")
    with pytest.raises(ValueError, match="8x64 is too small"):
        syn.parse_sizes("8x64")


def test_bad_arguments_are_refused(tmp_path):
    with pytest.raises(ValueError, match="num_images must be >= 1"):
        syn.write_dataset(tmp_path, 0, 1)
    with pytest.raises(ValueError, match="style 'brightfield'"):
        syn.plan_images(3, 1, style="brightfield")
    with pytest.raises(ValueError, match="plain folder name"):
        syn.write_dataset(tmp_path, 1, 1, split="a/b")
    assert list(tmp_path.iterdir()) == []


def test_replaces_its_own_split_atomically(tmp_path):
    out = tmp_path / "data"
    syn.write_dataset(out, 3, 1, sizes=[(48, 48)], progress=False)
    syn.write_dataset(out, 2, 2, sizes=[(48, 48)], progress=False)  # its own: replaced
    fresh = tmp_path / "fresh"
    syn.write_dataset(fresh, 2, 2, sizes=[(48, 48)], progress=False)
    assert tree_hashes(out) == tree_hashes(fresh)  # old images gone, no staging folder left
    assert json.loads((out / RECORD_NAME).read_text()) == {
        "make_synthetic_nuclei": ["stage1_train", "stage1_train_labels.csv"]}
    other = syn.write_dataset(out, 1, 3, split="stage1_test", sizes=[(48, 48)], progress=False)
    assert (out / "stage1_test" / other[0]).is_dir() and (out / "stage1_train").is_dir()
    assert not (out / LOCK_NAME).exists()


def _users_split(out: Path) -> None:
    (out / "stage1_train" / "mine").mkdir(parents=True)
    (out / "stage1_train" / "mine" / "notes.txt").write_text("my own annotations")


@pytest.mark.parametrize("in_the_way, message", [
    (_users_split, "stage1_train: exists and is not empty (not written by make_synthetic_nuclei)"),
    (lambda out: (out / "stage1_train_labels.csv").write_text("ImageId,EncodedPixels\n"),
     "stage1_train_labels.csv: exists (not written by sharp-fpn); choose another output folder, "
     "or pass --overwrite"),
    (lambda out: (out / "stage1_train").write_text("a file where the split folder goes"),
     "stage1_train: exists and is not empty"),
])
def test_refuses_what_it_did_not_write_unless_overwrite(tmp_path, in_the_way, message):
    out = tmp_path / "data"
    out.mkdir()
    in_the_way(out)
    before = tree_hashes(out)
    with pytest.raises(OutputConflict, match=re.escape(message)):
        syn.write_dataset(out, 2, 1, sizes=[(48, 48)], progress=False)
    assert tree_hashes(out) == before  # no record, lock or staging folder left either
    syn.write_dataset(out, 2, 1, sizes=[(48, 48)], overwrite=True, progress=False)
    fresh = tmp_path / "fresh"
    syn.write_dataset(fresh, 2, 1, sizes=[(48, 48)], progress=False)
    assert tree_hashes(out) == tree_hashes(fresh)


def test_an_empty_split_folder_is_no_conflict_a_folder_for_the_csv_is(tmp_path):
    (tmp_path / "stage1_train").mkdir()
    syn.write_dataset(tmp_path, 1, 1, sizes=[(48, 48)], progress=False)
    (tmp_path / "stage1_test_labels.csv").mkdir()
    with pytest.raises(OutputConflict, match="stage1_test_labels.csv: a folder is in the way"):
        syn.write_dataset(tmp_path, 1, 1, split="stage1_test", sizes=[(48, 48)],
                          overwrite=True, progress=False)
    assert not (tmp_path / "stage1_test").exists()


def test_own_folder_refuses_a_folder_of_other_files(tmp_path):
    (tmp_path / "thesis.docx").write_text("years of work")
    (tmp_path / ".hidden").write_text("")
    with pytest.raises(OutputConflict, match=re.escape(
            f"{tmp_path}: holds files that make_synthetic_nuclei did not write (thesis.docx); "
            "choose a new or empty folder, or pass --overwrite")):
        syn.write_dataset(tmp_path, 1, 1, sizes=[(48, 48)], progress=False, own_folder=True)
    assert sorted(os.listdir(tmp_path)) == [".hidden", "thesis.docx"]
    syn.write_dataset(tmp_path, 1, 1, sizes=[(48, 48)], progress=False, own_folder=True,
                      overwrite=True)
    assert (tmp_path / "thesis.docx").read_text() == "years of work"
    # now a folder it wrote into: another split goes beside without --overwrite
    syn.write_dataset(tmp_path, 1, 1, split="stage1_test", sizes=[(48, 48)], progress=False,
                      own_folder=True)
    hidden_only = tmp_path / "hidden_only"
    hidden_only.mkdir()
    (hidden_only / ".DS_Store").write_bytes(b"")
    syn.write_dataset(hidden_only, 1, 1, sizes=[(48, 48)], progress=False, own_folder=True)


def test_an_output_folder_that_is_a_file_or_in_use_is_refused(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputConflict, match="file: is a file, not a folder for the outputs"):
        syn.write_dataset(tmp_path / "file", 1, 1, sizes=[(48, 48)], progress=False)
    busy = tmp_path / "busy"
    busy.mkdir()
    holder = {"pid": os.getpid(), "host": socket.gethostname(), "tool": "make_synthetic_nuclei"}
    (busy / LOCK_NAME).write_text(json.dumps(holder))  # a living process holds it
    in_use = f"in use by make_synthetic_nuclei \\(pid {os.getpid()}"
    with pytest.raises(OutputConflict, match=in_use):
        syn.write_dataset(busy, 1, 1, sizes=[(48, 48)], progress=False)
    assert sorted(os.listdir(busy)) == [LOCK_NAME]


def test_cli_subprocess_matches_library(tmp_path):
    tool = ROOT / "tools" / "make_synthetic_nuclei.py"
    args = ["--num-images", "3", "--seed", "5", "--sizes", "48x48,64x80", "--no-progress"]
    done = subprocess.run(
        [sys.executable, str(tool), "--out", str(tmp_path / "cli"), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "wrote 3 images" in done.stdout
    syn.write_dataset(tmp_path / "lib", 3, 5, sizes=[(48, 48), (64, 80)], progress=False)
    assert tree_hashes(tmp_path / "cli") == tree_hashes(tmp_path / "lib")


def test_cli_reports_refusals(tmp_path, capsys):
    path = ROOT / "tools" / "make_synthetic_nuclei.py"
    spec = importlib.util.spec_from_file_location("make_synthetic_nuclei", path)
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    common = ["--out", str(tmp_path), "--num-images", "2", "--seed", "1", "--no-progress"]
    assert tool.main([*common, "--sizes", "48x48"]) == 0
    assert tool.main([*common, "--sizes", "48x48", "--seed", "2"]) == 0  # its own: replaced
    (tmp_path / "stage1_test_labels.csv").write_text("someone's labels\n")
    assert tool.main([*common, "--sizes", "48x48", "--split", "stage1_test"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "stage1_test_labels.csv: exists (not written by sharp-fpn)" in err
    assert "--overwrite" in err
    assert tool.main([*common, "--sizes", "48x48", "--split", "stage1_test", "--overwrite"]) == 0
    assert tool.main([*common, "--sizes", "64by64"]) == 1
    assert "'64by64' is not HEIGHTxWIDTH" in capsys.readouterr().err
    with pytest.raises(ValueError, match="'64by64' is not HEIGHTxWIDTH"):
        tool.main([*common, "--sizes", "64by64", "--debug"])


def test_column_strip_encoding_equals_rle_encode():
    rng = np.random.default_rng(0)
    mask = np.zeros((7, 9), dtype=np.uint8)
    mask[5:, 3] = mask[:2, 4] = mask[:, 5] = 255  # runs that continue from one column to the next
    assert syn._encode_within_columns(mask, 3, 6) == rle.encode(mask) == "27 4 36 7"
    for _ in range(20):
        mask = np.zeros((11, 13), dtype=np.uint8)
        x0, x1 = sorted(rng.choice(14, size=2, replace=False))
        mask[:, x0:x1] = (rng.random((11, x1 - x0)) < 0.5) * 255
        assert syn._encode_within_columns(mask, int(x0), int(x1)) == rle.encode(mask)
