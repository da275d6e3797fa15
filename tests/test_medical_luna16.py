"""LUNA16: MetaImage volumes written by SimpleITK, world -> voxel placement, bad input, rerun."""
import csv
import json
import math
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from sharp_fpn.data.medical import luna16
from sharp_fpn.data.medical.common import MedicalDataError


@pytest.fixture(scope="module")
def standins(tmp_path_factory):
    return luna16.write_standins(tmp_path_factory.mktemp("luna16") / "LUNA16", seed=0, cases=3)


@pytest.fixture(scope="module")
def converted(standins, tmp_path_factory):
    return luna16.convert(standins, tmp_path_factory.mktemp("luna16_out") / "out", seed=1)


def _header(mhd: Path):
    fields = dict(line.split(" = ", 1) for line in mhd.read_text().splitlines())
    return {key: value.split() for key, value in fields.items()}


def _rows(root: Path):
    with open(root / "annotations.csv", newline="") as f:
        return list(csv.DictReader(f))


def _tree(folder: Path):
    return {p.relative_to(folder).as_posix(): p.read_bytes()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_standins_are_metaimage_with_real_geometry(standins):
    mhds = sorted((standins / "subset0").glob("*.mhd"))
    assert len(mhds) == 3
    flipped = 0
    for mhd in mhds:
        h = _header(mhd)
        assert h["ElementType"] == ["MET_SHORT"] and h["DimSize"] == ["32", "32", "32"]
        np.testing.assert_allclose([float(v) for v in h["ElementSpacing"]], [0.7, 0.7, 1.25])
        assert all(float(v) != 0 for v in h["Offset"])
        flipped += h["TransformMatrix"] == "1 0 0 0 -1 0 0 0 1".split()
        assert (mhd.parent / h["ElementDataFile"][0]).stat().st_size == 32 ** 3 * 2
    assert flipped == 1


def test_read_volume_geometry_from_the_header(standins):
    for mhd in sorted((standins / "subset0").glob("*.mhd")):
        h = _header(mhd)
        volume = luna16.read_volume(mhd)
        raw = np.fromfile(mhd.parent / h["ElementDataFile"][0], "<i2").reshape(32, 32, 32)
        origin = np.array([float(v) for v in h["Offset"]])  # LPS
        # RAS axes: x always runs the other way; y too unless the header already flips it
        if h["TransformMatrix"][4] == "-1":
            np.testing.assert_array_equal(volume.hu, raw[:, :, ::-1])
        else:
            np.testing.assert_array_equal(volume.hu, raw[:, ::-1, ::-1])
            origin[1] += 31 * 0.7
        origin[0] += 31 * 0.7
        assert volume.spacing == pytest.approx((1.25, 0.7, 0.7))
        assert volume.origin == pytest.approx((origin[2], -origin[1], -origin[0]))
        assert volume.image.GetDirection() == pytest.approx((-1, 0, 0, 0, -1, 0, 0, 0, 1))


def test_nodule_spheres_land_on_the_blobs(standins, converted):
    """World -> voxel by hand from the .mhd header (origin, direction, spacing), checked on the
    raw file; then the converted patch's mask sphere sits on the same bright blob."""
    meta = json.loads((converted / "dataset.json").read_text())
    records = {r["id"]: r for r in meta["train"] + meta["val"]}
    rows = [r for r in _rows(standins) if (standins / "subset0" / f"{r['seriesuid']}.mhd").exists()]
    assert len(records) == len(rows) == 6  # 1 + 2 + 3 nodules; one row's series is absent
    seen = {}
    for row in rows:
        uid = row["seriesuid"]
        k = seen.setdefault(uid, 0)
        seen[uid] += 1
        h = _header(standins / "subset0" / f"{uid}.mhd")
        world = np.array([float(row[c]) for c in ("coordX", "coordY", "coordZ")])
        direction = np.array([float(v) for v in h["TransformMatrix"]]).reshape(3, 3)
        index = direction.T @ (world - np.array([float(v) for v in h["Offset"]])) / np.array(
            [float(v) for v in h["ElementSpacing"]])
        raw = np.fromfile(standins / "subset0" / h["ElementDataFile"][0], "<i2").reshape(32, 32,
                                                                                          32)
        i, j, kz = np.round(index).astype(int)
        assert raw[kz, j, i] > -300  # the stand-in's blob is where its row says

        rec = records[f"{uid}_n{k}"]
        image = nib.load(converted / rec["image"])
        mask = np.asarray(nib.load(converted / rec["mask"]).dataobj)
        hu = image.get_fdata()
        assert hu.shape == mask.shape == (32, 32, 32) and mask.dtype == np.uint8
        # the patch's own affine (NIfTI's RAS world) takes the centre to its middle voxel
        ras = world * [-1, -1, 1]
        centre = np.linalg.inv(image.affine) @ np.append(ras, 1.0)
        assert np.all(np.abs(centre[:3] - 16) <= 0.5)
        assert mask[tuple(np.round(centre[:3]).astype(int))] == 1
        # sphere of the given diameter: its voxel count, and it covers the bright blob
        diameter = float(row["diameter_mm"])
        voxels = math.pi / 6 * diameter ** 3 / (0.7 * 0.7 * 1.25)
        assert mask.sum() >= 0.8 * voxels
        assert (hu[mask == 1] > -300).mean() > 0.97
        ball = np.linalg.norm((np.indices(mask.shape).reshape(3, -1).T - centre[:3])
                              * [0.7, 0.7, 1.25], axis=1).reshape(mask.shape) <= diameter / 2 - 1e-6
        assert (mask[ball] == 1).all()


def test_dataset_json_says_spheres(converted):
    meta = json.loads((converted / "dataset.json").read_text())
    assert meta["kind"] == "3d" and "sphere" in meta["source"]["mask"]
    assert "not outlines" in meta["source"]["mask"]
    assert meta["source"]["annotations_without_volume"] == 1
    assert meta["source"]["resampled_to_mm"] is None
    assert "sphere" in luna16.__doc__ and "not outlines" in luna16.__doc__


def test_short_raw_refused_both_files_named(standins, tmp_path):
    root = tmp_path / "root"
    shutil.copytree(standins, root)
    mhd = sorted((root / "subset0").glob("*.mhd"))[1]
    raw = mhd.with_suffix(".raw")
    raw.write_bytes(raw.read_bytes()[:-100])
    with pytest.raises(MedicalDataError) as err:
        luna16.convert(root, tmp_path / "out")
    message = str(err.value)
    assert message.startswith(str(mhd)) and str(raw) in message and "short" in message
    assert not (tmp_path / "out").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["root"]


def test_annotation_outside_the_volume_refused(standins, tmp_path):
    root = tmp_path / "root"
    shutil.copytree(standins, root)
    uid = sorted((root / "subset0").glob("*.mhd"))[0].stem
    lines = (root / "annotations.csv").read_text().splitlines()
    lines.append(f"{uid},400.0,0.0,-250.0,6.0")
    (root / "annotations.csv").write_text("\n".join(lines) + "\n")
    with pytest.raises(MedicalDataError) as err:
        luna16.convert(root, tmp_path / "out")
    message = str(err.value)
    assert message.startswith(f"{root / 'annotations.csv'}, line {len(lines)}:")
    assert f"{uid}.mhd" in message and "outside" in message
    assert not (tmp_path / "out").exists()


def test_rerun_identical_and_split_by_series(standins, converted, tmp_path):
    again = luna16.convert(standins, tmp_path / "again", seed=1)
    assert _tree(converted) == _tree(again)
    split = json.loads((again / "split.json").read_text())
    meta = json.loads((again / "dataset.json").read_text())
    assert split["seed"] == 1 and not set(split["train"]) & set(split["val"])
    assert sorted(split["train"] + split["val"]) == sorted(
        p.stem for p in (standins / "subset0").glob("*.mhd"))
    for subset in ("train", "val"):
        assert meta[subset] and {r["case"] for r in meta[subset]} <= set(split[subset])


def test_isotropic_resampling_and_negatives_when_asked(standins, tmp_path):
    out = luna16.convert(standins, tmp_path / "iso", spacing_mm=1.0, patch=12, negatives=1)
    meta = json.loads((out / "dataset.json").read_text())
    records = meta["train"] + meta["val"]
    assert meta["source"]["resampled_to_mm"] == 1.0
    negatives = [r for r in records if "_neg" in r["id"]]
    assert len(negatives) == 3 and len(records) == 9
    for r in records:
        image = nib.load(out / r["image"])
        mask = np.asarray(nib.load(out / r["mask"]).dataobj)
        assert image.shape == (12, 12, 12) and r["spacing"] == [1.0, 1.0, 1.0]
        np.testing.assert_allclose(np.diag(image.affine)[:3], [1.0, 1.0, 1.0])
        assert (mask.sum() == 0) == ("_neg" in r["id"])


def test_missing_data_set_says_where_to_get_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="luna16.grand-challenge.org"):
        luna16.convert(tmp_path, tmp_path / "out")


def test_standins_deterministic_and_rewritten_whole(standins, tmp_path):
    again = luna16.write_standins(tmp_path / "again", seed=0, cases=3)
    assert _tree(again) == _tree(standins)
    luna16.write_standins(again, seed=2, cases=1)
    assert len(list((again / "subset0").glob("*.mhd"))) == 1
    with pytest.raises(FileExistsError):
        luna16.write_standins(again / "subset0")
