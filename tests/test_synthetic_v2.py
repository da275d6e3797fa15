"""Tests for synthetic nuclei version 2 (sharp_fpn.data.synthetic_v2, through synthetic.py)."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from sharp_fpn.data import catalog
from sharp_fpn.data import synthetic as syn
from sharp_fpn.data import synthetic_v2 as v2
from sharp_fpn.data.dsb2018 import convert_split
from sharp_fpn.predict.image_io import load_image

ROOT = Path(__file__).resolve().parents[1]
SMALL = [(96, 128), (128, 128)]


def tree_hashes(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and not p.name.startswith(".")
    }


def generate(plan, seed):
    return syn.generate_image(syn._image_rng(seed, plan), plan.height, plan.width, plan.style,
                              plan.empty, version=2)


@pytest.fixture(scope="module")
def sample():
    """40 v2 images of seed 11 at DSB2018's sizes: (plans, images, labels)."""
    plans = syn.plan_images(40, 11, version=2)
    pairs = [generate(p, 11) for p in plans]
    return plans, [im for im, _ in pairs], [lab for _, lab in pairs]


def test_the_api_reaches_version_2():
    assert syn.STYLES_V2 == v2.STYLES_V2 == ("fluorescence", "he", "brightfield")
    assert syn.describe is v2.describe
    plans = syn.plan_images(5, 3, version=2)
    assert all(p.version == 2 for p in plans)
    assert {p.image_id for p in plans}.isdisjoint(p.image_id for p in syn.plan_images(5, 3))
    with pytest.raises(ValueError, match="version"):
        syn.plan_images(5, 3, version=3)
    with pytest.raises(ValueError, match="brightfield"):
        syn.plan_images(5, 3, style="brightfield")  # a v2 style only
    with pytest.raises(ValueError, match="phase"):
        syn.plan_images(5, 3, style=("he", "phase"), version=2)
    with pytest.raises(ValueError, match="style"):
        syn.generate_image(np.random.default_rng(0), 64, 64, "phase", version=2)


def test_same_seed_same_bytes_whatever_the_worker_count(tmp_path):
    a = syn.write_dataset(tmp_path / "a", 8, 5, sizes=SMALL, workers=1, progress=False,
                          version=2)
    b = syn.write_dataset(tmp_path / "b", 8, 5, sizes=SMALL, workers=2, progress=False,
                          version=2)
    assert a == b
    assert tree_hashes(tmp_path / "a") == tree_hashes(tmp_path / "b")
    plan = syn.plan_images(8, 5, sizes=SMALL, version=2)[3]
    first, second = generate(plan, 5), generate(plan, 5)
    assert first[0].tobytes() == second[0].tobytes()
    assert np.array_equal(first[1], second[1])


def test_the_v2_mix_and_a_tuple_mix():
    styles = [p.style for p in syn.plan_images(400, 1, version=2)]
    share = {s: styles.count(s) / len(styles) for s in v2.STYLES_V2}
    assert 0.47 < share["fluorescence"] < 0.63  # 55 %, 30 %, 15 % give or take 3 sd
    assert 0.23 < share["he"] < 0.37
    assert 0.09 < share["brightfield"] < 0.21
    mixed = [p.style for p in syn.plan_images(300, 1, style=("fluorescence", "he"), version=2)]
    assert "brightfield" not in mixed and set(mixed) == {"fluorescence", "he"}
    assert 0.4 < mixed.count("he") / len(mixed) < 0.6  # uniform over the named styles
    assert {p.style for p in syn.plan_images(20, 1, style="brightfield", version=2)} == {
        "brightfield"}


def test_statistics_of_a_seeded_sample_match_dsb2018(sample):
    _, _, labels = sample
    stats = syn.describe(labels)
    assert stats["images"] == 40 and stats["empty_images"] == 2
    assert 18.0 <= stats["diameter_median"] <= 28.0
    assert stats["diameter_p5"] >= 6.0 and stats["diameter_p95"] <= 60.0
    assert 0.15 <= stats["touching_fraction"] <= 0.45
    assert 0.05 <= stats["foreground_median"] <= 0.40
    assert stats["foreground_p5"] >= 0.02 and stats["foreground_p95"] <= 0.45
    assert stats["nuclei_per_image_min"] >= 1 and stats["nuclei_per_image_max"] <= v2.MAX_NUCLEI
    assert 20 <= stats["nuclei_per_image_mean"] <= 120
    # magnification varies between images as much as sizes do within one
    assert stats["diameter_between_sd"] >= 0.7 * stats["diameter_within_sd"] > 0.1
    # sparse fields and dense ones both occur
    fg = sorted(float((lab > 0).mean()) for lab in labels if lab.any())
    assert fg[0] < 0.08 and fg[-1] > 0.25


def test_describe_counts_touching_nuclei_by_shared_boundaries():
    labels = np.zeros((10, 12), dtype=np.int32)
    labels[1:4, 1:4] = 1
    labels[1:4, 4:7] = 2  # shares a boundary with 1
    labels[6:9, 6:9] = 3  # alone (diagonal from nobody)
    stats = syn.describe([labels, np.zeros((5, 5), dtype=np.int32)])
    assert stats["nuclei"] == 3 and stats["empty_images"] == 1
    assert stats["touching_fraction"] == pytest.approx(2 / 3)
    assert stats["diameter_median"] == pytest.approx(2 * np.sqrt(9 / np.pi))
    assert stats["foreground_mean"] == pytest.approx(27 / 120)


def test_masks_never_overlap_and_are_each_one_4_connected_region(sample):
    _, _, labels = sample
    for lab in labels:
        assert lab.dtype == np.int32
        k = int(lab.max())
        assert set(np.unique(lab)) == set(range(k + 1))  # 1..K all present
        for index in range(1, k + 1):
            mask = (lab == index).astype(np.uint8)
            assert mask.sum() >= syn.MIN_NUCLEUS_AREA
            assert cv2.connectedComponents(mask, connectivity=4)[0] == 2


def test_written_masks_are_disjoint(tmp_path):
    syn.write_dataset(tmp_path, 6, 2, sizes=SMALL, workers=1, progress=False, version=2)
    for folder in (tmp_path / "stage1_train").iterdir():
        masks = [cv2.imread(str(p), cv2.IMREAD_UNCHANGED)
                 for p in (folder / "masks").glob("*.png")]
        if masks:
            total = np.sum([m > 0 for m in masks], axis=0)
            assert total.max() == 1


def test_colour_styles_are_colour_and_fluorescence_gray(sample):
    plans, images, _ = sample
    seen = set()
    for plan, image in zip(plans, images):
        if image.dtype == np.uint16:
            assert plan.style == "fluorescence" and image.ndim == 2
            seen.add("16-bit")
            continue
        assert image.dtype == np.uint8 and image.shape[2] == 4 and (image[..., 3] == 255).all()
        rgb = image[..., :3].astype(int)
        gray = (rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all()
        assert gray == (plan.style == "fluorescence"), plan.style
        if plan.style == "he" and not plan.empty:
            assert rgb[..., 0].mean() > rgb[..., 1].mean()  # pink-purple, not green
        seen.add(plan.style)
    assert seen >= {"fluorescence", "he", "brightfield"}


def test_16_bit_frames_are_written_as_uint16_and_read_back(tmp_path):
    syn.write_dataset(tmp_path, 12, 4, sizes=SMALL, style="fluorescence", workers=1,
                      progress=False, version=2)
    deep = []
    for path in sorted((tmp_path / "stage1_train").glob("*/images/*.png")):
        pixels = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
        if pixels.dtype == np.uint16:
            assert pixels.ndim == 2
            assert 50 <= int(pixels.min()) <= 1000  # a camera offset of a few hundred counts
            deep.append(path)
            loaded = load_image(path)
            assert loaded.dtype == np.uint16 and loaded.rgb.dtype == np.uint8
            assert loaded.rgb.shape == pixels.shape + (3,)
            assert int(loaded.rgb.max()) > int(loaded.rgb.min())  # not flattened by the reader
    assert 1 <= len(deep) <= 9
    coco = convert_split(tmp_path, "stage1_train", on_warning=lambda m: None)
    assert len(coco["images"]) == 12 and coco["annotations"]


def test_a_fluorescence_sample_has_a_wide_brightness_range_and_saturated_mitoses():
    rng = np.random.default_rng(3)
    ratios, saturated = [], 0
    for _ in range(12):
        image, labels = syn.generate_image(rng, 256, 256, "fluorescence", version=2)
        gray = image.astype(np.float64) if image.ndim == 2 else image[..., 0].astype(np.float64)
        means = np.array([gray[labels == k].mean() for k in range(1, labels.max() + 1)])
        background = np.median(gray[labels == 0])
        means = np.clip(means - background, 1.0, None)
        if means.size >= 10:
            ratios.append(np.percentile(means, 95) / np.percentile(means, 5))
        top = 255 if image.dtype == np.uint8 else gray.max()
        saturated += int((gray >= top).sum() > 0)
    assert np.median(ratios) > 4.0
    assert saturated >= 2


def test_the_contact_sheet_has_one_row_per_style(tmp_path):
    out = tmp_path / "sheet.png"
    assert v2.contact_sheet(out, seed=1, per_row=3, cell=64, outlines=False) == out
    sheet = cv2.imread(str(out), cv2.IMREAD_UNCHANGED)
    gap = 4
    assert sheet.shape == (3 * 64 + 2 * gap, 3 * 64 + 2 * gap, 3)
    with_outlines = tmp_path / "outlined.png"
    v2.contact_sheet(with_outlines, seed=1, per_row=3, cell=64)
    assert cv2.imread(str(with_outlines)).shape == (3 * 64 + 2 * gap, 6 * 64 + 5 * gap, 3)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["outlined.png", "sheet.png"]


def test_the_cli_writes_version_2_and_a_contact_sheet(tmp_path, capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "make_synthetic_nuclei", ROOT / "tools" / "make_synthetic_nuclei.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    assert tool.main(["--version", "2", "--out", str(tmp_path / "d"), "--num-images", "4",
                      "--seed", "1", "--sizes", "64x64", "--style", "he,brightfield",
                      "--workers", "1", "--no-progress"]) == 0
    ids = [p.name for p in (tmp_path / "d" / "stage1_train").iterdir()]
    assert sorted(ids) == sorted(p.image_id for p in syn.plan_images(
        4, 1, sizes=[(64, 64)], style=("he", "brightfield"), version=2))
    sheet = tmp_path / "s.png"
    assert tool.main(["--version", "2", "--contact-sheet", str(sheet), "--seed", "0",
                      "--per-row", "2", "--cell", "48", "--style", "he"]) == 0
    assert cv2.imread(str(sheet)).shape == (48, 2 * 48 * 2 + 3 * 4, 3)
    assert tool.main(["--out", str(tmp_path / "e"), "--num-images", "2", "--seed", "1",
                      "--style", "brightfield"]) == 1  # a v2 style, asked of version 1
    assert "brightfield" in capsys.readouterr().err


def test_the_catalog_generates_a_v2_set_from_its_parameters(tmp_path, monkeypatch):
    names = ["nuclei_synth2_train", "nuclei_synth2_val", "nuclei_synth2_nobf_train",
             "nuclei_synth2_nobf_val", "nuclei_synth2_test_fluorescence",
             "nuclei_synth2_test_he", "nuclei_synth2_test_brightfield"]
    for name in names:
        params = catalog.DATASETS[name].synthetic_params()
        assert params.version == 2 and params.sizes is None
    assert catalog.DATASETS["nuclei_synth2_train"].synthetic_params() == catalog.SyntheticParams(
        500, 2026, version=2)
    assert catalog.DATASETS["nuclei_synth2_nobf_val"].synthetic_params().style == (
        "fluorescence", "he")
    test = catalog.DATASETS["nuclei_synth2_test_he"]
    assert test.subset is None and test.folder == "nuclei_synth2_test_he"
    assert test.synthetic_params() == catalog.SyntheticParams(40, 7002, style="he", version=2)

    small = catalog.NucleiDataset(
        "tiny_v2", "stage1_train", synthetic=True,
        generate=catalog.SyntheticParams(5, 7001, ((64, 64),), "brightfield", 2))
    monkeypatch.setitem(catalog.DATASETS, "tiny_v2", small)
    coco = json.loads(catalog.prepare("tiny_v2", tmp_path).read_text())
    want = syn.plan_images(5, 7001, [(64, 64)], "brightfield", version=2)
    assert sorted(im["image_key"] for im in coco["images"]) == sorted(p.image_id for p in want)
