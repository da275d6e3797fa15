"""BraTS19 and LiTS17 from real NIfTI files (nibabel, 0.9 x 1.1 x 2.5 mm, RAS and LPS-like
affines), and the shared writers of sharp_fpn.data.medical.common."""
import dataclasses
import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from sharp_fpn.data.medical import brats19, lits17
from sharp_fpn.data.medical.common import (
    MedicalDataError,
    Slice2D,
    Volume3D,
    axial_slices,
    case_split,
    window_to_uint8,
    write_slice_dataset,
    write_volume_dataset,
)


@pytest.fixture(scope="module")
def brats_root(tmp_path_factory):
    return brats19.write_standins(tmp_path_factory.mktemp("brats") / "raw", seed=0)


@pytest.fixture(scope="module")
def brats_out(brats_root, tmp_path_factory):
    return brats19.convert(brats_root, tmp_path_factory.mktemp("brats_out") / "out", seed=0)


@pytest.fixture(scope="module")
def lits_root(tmp_path_factory):
    return lits17.write_standins(tmp_path_factory.mktemp("lits") / "raw", seed=0)


def _files(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file()}


def _leftovers(parent: Path, name: str) -> list:
    return [p.name for p in parent.iterdir() if p.name.startswith(f".{name}.")]


def _one_case_root(brats_root: Path, dest: Path, k: int = 0) -> Path:
    """A BraTS root holding a copy of stand-in case k only."""
    case = f"BraTS19_SYN_{k:03d}_1"
    grade = brats19.GRADES[k % 2]
    src = brats_root / brats19.TRAINING / grade / case
    shutil.copytree(src, dest / brats19.TRAINING / grade / case)
    return dest


def _coco_masks(coco: COCO, image_id: int, shape) -> np.ndarray:
    union = np.zeros(shape, bool)
    for ann in coco.loadAnns(coco.getAnnIds(imgIds=[image_id])):
        union |= coco.annToMask(ann).astype(bool)
    return union


# --------------------------------------------------------------------------------------------
# BraTS19


def test_brats_output_images_coco_split_and_record(brats_out, brats_root):
    split = json.loads((brats_out / "split.json").read_text())
    meta = json.loads((brats_out / "dataset.json").read_text())
    cases = sorted(c for c, _ in brats19.find_cases(brats_root))
    assert sorted(split["train"] + split["val"]) == cases and len(cases) == 4
    assert not set(split["train"]) & set(split["val"]) and split["val"]
    assert {k: split[k] for k in ("train", "val")} == case_split(cases, 0, 0.2)
    assert split["seed"] == 0 and split["val_fraction"] == 0.2
    assert meta["kind"] == "2d" and meta["format_version"] == 1 and meta["name"] == "brats19"
    assert meta["source"]["rgb"] == ["flair", "t1ce", "t2"] and meta["source"]["keep"] == "brain"
    assert meta["source"]["mask"] == "whole tumour: seg > 0"
    assert meta["spacing"] == {case: [1.1, 0.9] for case in cases}  # (row, col) = (y, x)
    tumour_pixels, sub_regions = 0, set()
    for subset in ("train", "val"):
        coco = COCO(str(brats_out / "annotations" / f"{subset}.json"))
        assert meta["counts"][subset] == len(coco.getImgIds()) > 0
        assert coco.loadCats(coco.getCatIds()) == [{"id": 1, "name": "brats19"}]
        for image in coco.loadImgs(coco.getImgIds()):
            assert image["case"] in split[subset]
            rgb = np.asarray(Image.open(brats_out / image["file_name"]))
            assert rgb.shape == (32, 32, 3) and rgb.dtype == np.uint8 and rgb.max() > 0
            labels = np.asarray(Image.open(brats_out / "labels" / f"{image['image_key']}.png"))
            sub_regions |= set(np.unique(labels).tolist())
            union = _coco_masks(coco, image["id"], labels.shape)
            np.testing.assert_array_equal(union, labels > 0)
            tumour_pixels += int(union.sum())
    assert tumour_pixels > 0 and sub_regions == {0, 1, 2, 4}


def test_brats_slices_match_the_volumes_and_keep_rules(brats_root, brats_out, tmp_path):
    case, folder = brats19.find_cases(brats_root)[1]  # stored LPS-like: flipped on reading
    flair = nib.as_closest_canonical(nib.load(folder / f"{case}_flair.nii.gz")).get_fdata()
    seg = np.asarray(nib.as_closest_canonical(nib.load(folder / f"{case}_seg.nii.gz")).dataobj)
    brain_slices = [k for k in range(flair.shape[2]) if flair[:, :, k].any()]
    kept = sorted(p.stem for p in (brats_out / "images").glob(f"{case}_z*.png"))
    assert kept == [f"{case}_z{k:03d}" for k in brain_slices]
    k = int(np.argmax((seg > 0).sum(axis=(0, 1))))
    labels = np.asarray(Image.open(brats_out / "labels" / f"{case}_z{k:03d}.png"))
    np.testing.assert_array_equal(labels, seg[::-1, ::-1, k].T)  # radiological view
    # the red channel is FLAIR: brighter in the oedema (2) than in the healthy brain
    red = np.asarray(Image.open(brats_out / "images" / f"{case}_z{k:03d}.png"))[..., 0]
    healthy = (labels == 0) & (seg[::-1, ::-1, k].T == 0) & (flair[::-1, ::-1, k].T > 0)
    assert red[labels == 2].mean() > red[healthy].mean() + 50
    tumour = brats19.convert(brats_root, tmp_path / "tumour", keep="tumour")
    names = sorted(p.stem for p in (tumour / "images").glob(f"{case}_z*.png"))
    assert names == [f"{case}_z{k:03d}" for k in range(seg.shape[2]) if seg[:, :, k].any()]
    assert 0 < len(names) < len(kept)


def test_brats_rerun_is_identical_and_the_split_is_seeded(brats_root, brats_out, tmp_path):
    again = brats19.convert(brats_root, tmp_path / "again", seed=0)
    first, second = _files(brats_out), _files(again)
    assert first.keys() == second.keys()
    assert all(first[name] == second[name] for name in first)
    # a rerun into the same folder replaces it (this module wrote it)
    (again / "images" / "stale.png").write_bytes(b"x")
    brats19.convert(brats_root, again, seed=0)
    assert _files(again) == second
    cases = [c for c, _ in brats19.find_cases(brats_root)]
    splits = {tuple(case_split(cases, seed, 0.25)["val"]) for seed in range(6)}
    assert len(splits) > 1  # the seed matters


def test_brats_orientation_comes_from_the_header(brats_root, tmp_path):
    """The same case stored RAS, flipped in x and y (LPS-like) and with x and y swapped
    converts to byte-identical slices."""
    case = "BraTS19_SYN_000_1"
    src = brats_root / brats19.TRAINING / "HGG" / case
    outputs = []
    for variant in ("ras", "lps", "swapped"):
        dest = tmp_path / variant / brats19.TRAINING / "HGG" / case
        dest.mkdir(parents=True)
        for path in sorted(src.glob("*.nii.gz")):
            image = nib.load(path)
            data, affine = np.asarray(image.dataobj), image.affine.copy()
            assert nib.aff2axcodes(affine) == ("R", "A", "S")
            if variant == "lps":
                flip = np.diag([-1.0, -1.0, 1.0, 1.0])
                flip[:2, 3] = [data.shape[0] - 1, data.shape[1] - 1]
                data, affine = data[::-1, ::-1, :], affine @ flip
            elif variant == "swapped":
                data, affine = data.transpose(1, 0, 2), affine[:, [1, 0, 2, 3]]
            nib.save(nib.Nifti1Image(np.ascontiguousarray(data), affine), dest / path.name)
        codes = nib.aff2axcodes(nib.load(dest / f"{case}_seg.nii.gz").affine)
        assert codes == {"ras": ("R", "A", "S"), "lps": ("L", "P", "S"),
                         "swapped": ("A", "R", "S")}[variant]
        out = brats19.convert(tmp_path / variant, tmp_path / f"out_{variant}")
        outputs.append({k: v for k, v in _files(out).items()
                        if k.startswith(("images/", "labels/", "annotations/"))})
    assert outputs[0] == outputs[1] == outputs[2] and len(outputs[0]) > 10


def test_axial_slices_radiological_view():
    data = np.zeros((4, 5, 3))
    data[3, 4, 1] = 1  # most right (x max), most anterior (y max), slice 1
    data[0, 0, 2] = 2  # most left, most posterior
    view = axial_slices(data)
    assert view.shape == (3, 5, 4)
    assert view[1, 0, 0] == 1 and view[2, 4, 3] == 2


def test_brats_resampling_only_when_asked(brats_root, tmp_path):
    root = _one_case_root(brats_root, tmp_path / "one")
    out = brats19.convert(root, tmp_path / "out", spacing=(1.8, 2.2, 2.5),
                          interpolation="linear")
    meta = json.loads((out / "dataset.json").read_text())
    assert meta["spacing"] == {"BraTS19_SYN_000_1": [2.2, 1.8]}
    assert meta["source"]["resampling"]["interpolation"] == "linear"
    image = np.asarray(Image.open(next((out / "images").glob("*.png"))))
    # nibabel's resample_to_output covers the stored extent, 31 x 0.9 mm: 1 + ceil(27.9 / 1.8)
    assert image.shape == (17, 17, 3)
    labels = np.unique(np.concatenate([np.asarray(Image.open(p)).ravel()
                                       for p in (out / "labels").glob("*.png")]))
    assert set(labels.tolist()) <= {0, 1, 2, 4}  # nearest for the labels: no blends
    with pytest.raises(ValueError, match="interpolation"):
        brats19.convert(root, tmp_path / "bad", spacing=(1, 1, 1), interpolation="sinc")


def test_brats_segmentation_shape_mismatch_is_refused_and_nothing_written(brats_root, tmp_path):
    root = _one_case_root(brats_root, tmp_path / "raw")
    folder = root / brats19.TRAINING / "HGG" / "BraTS19_SYN_000_1"
    seg_path = folder / "BraTS19_SYN_000_1_seg.nii.gz"
    seg = nib.load(seg_path)
    nib.save(nib.Nifti1Image(np.asarray(seg.dataobj)[:, :, :-1], seg.affine), seg_path)
    with pytest.raises(MedicalDataError) as err:
        brats19.convert(root, tmp_path / "out")
    message = str(err.value)
    assert message.startswith(str(seg_path)) and "(32, 32, 15)" in message and "(32, 32, 16)" in message
    assert not (tmp_path / "out").exists() and not _leftovers(tmp_path, "out")


def test_brats_bad_case_files_are_named(brats_root, tmp_path):
    root = _one_case_root(brats_root, tmp_path / "raw")
    folder = root / brats19.TRAINING / "HGG" / "BraTS19_SYN_000_1"
    t2 = folder / "BraTS19_SYN_000_1_t2.nii.gz"
    image = nib.load(t2)
    shifted = image.affine.copy()
    shifted[0, 3] += 5.0
    nib.save(nib.Nifti1Image(np.asarray(image.dataobj), shifted), t2)
    with pytest.raises(MedicalDataError, match=r"_t2\.nii\.gz: its affine"):
        brats19.convert(root, tmp_path / "out")
    t2.unlink()
    with pytest.raises(MedicalDataError, match=r"_t2\.nii\.gz: missing"):
        brats19.convert(root, tmp_path / "out")
    shutil.copy(folder / "BraTS19_SYN_000_1_t1.nii.gz", t2)
    seg_path = folder / "BraTS19_SYN_000_1_seg.nii.gz"
    seg = nib.load(seg_path)
    data = np.asarray(seg.dataobj).copy()
    data[data == 4] = 3
    nib.save(nib.Nifti1Image(data, seg.affine), seg_path)
    with pytest.raises(MedicalDataError, match=r"_seg\.nii\.gz: holds label values \[3\]"):
        brats19.convert(root, tmp_path / "out")
    t2.write_bytes(b"not a nifti")
    with pytest.raises(MedicalDataError, match=r"_t2\.nii\.gz: not a readable NIfTI"):
        brats19.convert(root, tmp_path / "out")
    assert not (tmp_path / "out").exists() and not _leftovers(tmp_path, "out")


def test_missing_datasets_say_where_to_get_them(tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        brats19.convert(tmp_path, tmp_path / "out")
    message = str(err.value)
    assert message.startswith(f"{tmp_path} holds no brats19")
    assert "MICCAI_BraTS_2019_Data_Training/{HGG,LGG}/<case>/" in message
    assert "cbica" in message and "convert_medical.py brats19" in message
    with pytest.raises(FileNotFoundError) as err:
        lits17.convert(tmp_path, tmp_path / "out")
    assert "volume-<n>.nii" in str(err.value) and "convert_medical.py lits17" in str(err.value)
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------------------------
# LiTS17


def test_lits_liver_slices_window_and_labels(lits_root, tmp_path):
    out = lits17.convert(lits_root, tmp_path / "out", seed=3)
    meta = json.loads((out / "dataset.json").read_text())
    assert meta["source"]["window_hu"] == {"level": 40.0, "width": 400.0}
    cases = lits17.find_cases(lits_root)
    assert [n for n, _, _ in cases] == [0, 1, 2, 3]
    values = set()
    for n, volume, segmentation in cases:
        ct = nib.as_closest_canonical(nib.load(volume)).get_fdata()
        seg = np.asarray(nib.as_closest_canonical(nib.load(segmentation)).dataobj)
        liver = [k for k in range(seg.shape[2]) if (seg[:, :, k] >= 1).any()]
        names = sorted(p.stem for p in (out / "images").glob(f"lits17_{n:03d}_z*.png"))
        assert names == [f"lits17_{n:03d}_z{k:03d}" for k in liver]
        assert 0 < len(liver) < seg.shape[2]
        k = liver[len(liver) // 2]
        image = np.asarray(Image.open(out / "images" / f"lits17_{n:03d}_z{k:03d}.png"))
        expected = window_to_uint8(ct[::-1, ::-1, k].T, 40, 400)
        for channel in range(3):
            np.testing.assert_array_equal(image[..., channel], expected)
        labels = np.asarray(Image.open(out / "labels" / f"lits17_{n:03d}_z{k:03d}.png"))
        np.testing.assert_array_equal(labels, seg[::-1, ::-1, k].T)
        values |= {int(v) for p in (out / "labels").glob(f"lits17_{n:03d}_*.png")
                   for v in np.unique(np.asarray(Image.open(p)))}
    assert values == {0, 1, 2}
    coco = COCO(str(out / "annotations" / "train.json"))
    for image in coco.loadImgs(coco.getImgIds()):
        labels = np.asarray(Image.open(out / "labels" / f"{image['image_key']}.png"))
        np.testing.assert_array_equal(_coco_masks(coco, image["id"], labels.shape), labels >= 1)
    split = json.loads((out / "split.json").read_text())
    assert split["seed"] == 3 and split["val"] == case_split(
        [f"lits17_{n:03d}" for n in range(4)], 3, 0.2)["val"]


def test_lits_other_slices_are_seeded_and_rerun_identical(lits_root, tmp_path):
    base = lits17.convert(lits_root, tmp_path / "base")
    more = lits17.convert(lits_root, tmp_path / "more", other_fraction=0.5, channels="adjacent")
    again = lits17.convert(lits_root, tmp_path / "again", other_fraction=0.5, channels="adjacent")
    n_base, n_more = (len(list((f / "images").iterdir())) for f in (base, more))
    assert n_more > n_base
    assert _files(more) == _files(again)
    other = lits17.convert(lits_root, tmp_path / "other", seed=1, other_fraction=0.5)
    names = lambda f: sorted(p.name for p in (f / "images").iterdir())  # noqa: E731
    assert names(other) != names(more) and len(names(other)) == n_more


def test_lits_bad_files_are_named_and_nothing_written(lits_root, tmp_path):
    root = tmp_path / "raw"
    shutil.copytree(lits_root / lits17.STANDIN_FOLDER, root)
    (root / ".sharp-fpn-standins.json").unlink()
    # .nii.gz is read as .nii
    image = nib.load(root / "volume-1.nii")
    nib.save(image, root / "volume-1.nii.gz")
    with pytest.raises(MedicalDataError, match=r"volume-1\.nii.*: volume 1 is also"):
        lits17.find_cases(root)
    (root / "volume-1.nii").unlink()
    assert [v.name for _, v, _ in lits17.find_cases(root)][1] == "volume-1.nii.gz"
    seg_path = root / "segmentation-2.nii"
    seg = nib.load(seg_path)
    nib.save(nib.Nifti1Image(np.array(seg.dataobj)[:-2], seg.affine), seg_path)
    with pytest.raises(MedicalDataError) as err:
        lits17.convert(root, tmp_path / "out")
    assert str(err.value).startswith(f"{seg_path}: shape (30, 32, 16) differs from volume-2.nii")
    assert not (tmp_path / "out").exists() and not _leftovers(tmp_path, "out")
    seg_path.unlink()
    with pytest.raises(MedicalDataError, match=r"volume-2\.nii: has no segmentation-2\.nii"):
        lits17.convert(root, tmp_path / "out")
    with pytest.raises(ValueError, match="window width"):
        lits17.convert(root, tmp_path / "out", window=(40, 0))


# --------------------------------------------------------------------------------------------
# the shared writers


def _slice(id_, case, value=0):
    mask = np.zeros((8, 8), bool)
    mask[1:3, 1:3] = True
    mask[5:7, 5:8] = True  # a second component
    return Slice2D(id_, case, np.full((8, 8, 3), value, np.uint8), mask)


def test_write_slice_dataset_refuses_a_foreign_folder_and_keeps_the_old_on_error(tmp_path):
    split = {"train": ["a"], "val": ["b"]}
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "mine.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not written by sharp-fpn"):
        write_slice_dataset(foreign, "x", [_slice("a1", "a")], split, {})
    assert (foreign / "mine.txt").read_text() == "keep me"
    out = write_slice_dataset(tmp_path / "out", "x", [_slice("b1", "b"), _slice("a1", "a")],
                              split, {})
    coco = json.loads((out / "annotations" / "train.json").read_text())
    assert [a["bbox"] for a in coco["annotations"]] == [[1.0, 1.0, 2.0, 2.0], [5.0, 5.0, 3.0, 2.0]]
    rle = coco["annotations"][1]["segmentation"]
    assert mask_utils.decode({**rle, "counts": rle["counts"].encode()}).sum() == 6
    assert not (out / "labels").exists()
    before = _files(out)

    def failing():
        yield _slice("a2", "a", 9)
        raise MedicalDataError("case.nii: broken")

    with pytest.raises(MedicalDataError):
        write_slice_dataset(out, "x", failing(), split, {})
    with pytest.raises(ValueError, match="neither the train nor the val"):
        write_slice_dataset(out, "x", [_slice("c1", "c")], split, {})
    assert _files(out) == before and not _leftovers(tmp_path, "out")


def test_write_slice_dataset_keeps_each_slice_spacing(tmp_path):
    # a LIDC patient may have CT series of two pixel sizes: each image carries its own, and the
    # case's are listed under spacing_varies
    split = {"train": ["a"], "val": ["b"]}
    slices = [dataclasses.replace(_slice("a1", "a"), spacing=(0.7, 0.7)),
              dataclasses.replace(_slice("a2", "a"), spacing=(0.8, 0.8)),
              dataclasses.replace(_slice("b1", "b"), spacing=(0.6, 0.6))]
    out = write_slice_dataset(tmp_path / "out", "x", slices, split, {})
    meta = json.loads((out / "dataset.json").read_text())
    assert meta["spacing"] == {"b": [0.6, 0.6]}
    assert meta["spacing_varies"] == {"a": [[0.7, 0.7], [0.8, 0.8]]}
    coco = json.loads((out / "annotations" / "train.json").read_text())
    assert {i["image_key"]: i["spacing"] for i in coco["images"]} == {
        "a1": [0.7, 0.7], "a2": [0.8, 0.8]}


def test_write_volume_dataset_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    image = rng.normal(size=(5, 6, 7)).astype(np.float32)  # (Z, Y, X)
    mask = (image > 1).astype(np.uint8)
    volumes = [Volume3D("p1", "c1", image, mask, (2.5, 0.7, 0.6), (-10.0, 20.0, 30.0)),
               Volume3D("p2", "c2", image * 2, mask, (2.5, 0.7, 0.6))]
    out = write_volume_dataset(tmp_path / "v", "vols", volumes,
                               {"train": ["c1"], "val": ["c2"], "seed": 4}, {"what": "test"})
    meta = json.loads((out / "dataset.json").read_text())
    assert meta["kind"] == "3d" and [r["id"] for r in meta["train"]] == ["p1"]
    record = meta["train"][0]
    loaded = nib.load(out / record["image"])
    assert loaded.shape == (7, 6, 5)
    np.testing.assert_array_equal(np.asarray(loaded.dataobj).transpose(2, 1, 0), image)
    np.testing.assert_allclose(loaded.header.get_zooms(), (0.6, 0.7, 2.5), rtol=1e-6)
    np.testing.assert_allclose(loaded.affine[:3, 3], (30.0, 20.0, -10.0))
    loaded_mask = nib.load(out / record["mask"])
    assert loaded_mask.get_data_dtype() == np.uint8
    np.testing.assert_array_equal(np.asarray(loaded_mask.dataobj).transpose(2, 1, 0), mask)
    assert json.loads((out / "split.json").read_text())["seed"] == 4


def test_case_split_rules():
    cases = [f"c{i}" for i in range(10)]
    split = case_split(list(reversed(cases)), 7, 0.2)
    assert split == case_split(cases, 7, 0.2)  # order of the input does not matter
    assert len(split["val"]) == 2 and sorted(split["train"] + split["val"]) == cases
    assert case_split(["a", "b"], 0, 0.01)["val"] and case_split(["a", "b"], 0, 0.99)["train"]
    assert case_split(["a"], 0, 0.5) == {"train": ["a"], "val": []}
    with pytest.raises(ValueError):
        case_split(cases, 0, 1.0)
