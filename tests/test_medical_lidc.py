"""LIDC-IDRI: DICOM series written by pydicom, readers' XML, the consensus, bad series, rerun."""
import json
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
from matplotlib.path import Path as MplPath
from PIL import Image
from pycocotools import mask as mask_utils

from sharp_fpn.data.medical import lidc
from sharp_fpn.data.medical.common import MedicalDataError


@pytest.fixture(scope="module")
def standins(tmp_path_factory):
    return lidc.write_standins(tmp_path_factory.mktemp("lidc") / "LIDC-IDRI", seed=0, cases=3)


def _coco_masks(out: Path):
    """image_key -> union of its instance masks, over both splits."""
    masks = {}
    for subset in ("train", "val"):
        coco = json.loads((out / "annotations" / f"{subset}.json").read_text())
        for image in coco["images"]:
            masks[image["image_key"]] = np.zeros((image["height"], image["width"]), bool)
        keys = {image["id"]: image["image_key"] for image in coco["images"]}
        for ann in coco["annotations"]:
            seg = dict(ann["segmentation"], counts=ann["segmentation"]["counts"].encode())
            masks[keys[ann["image_id"]]] |= mask_utils.decode(seg).astype(bool)
    return masks


def _tree(folder: Path):
    return {p.relative_to(folder).as_posix(): p.read_bytes()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_series_read_in_position_order_not_file_order(standins):
    folders = lidc.find_series_folders(standins)
    assert [patient for patient, _ in folders] == ["LIDC-IDRI-0001", "LIDC-IDRI-0002",
                                                   "LIDC-IDRI-0003"]
    for patient, folder in folders:
        (series,) = lidc.read_series(folder)
        files = [pydicom.dcmread(folder / name) for name in series.files]
        # the stand-ins really are out of order, by name and by InstanceNumber
        assert list(series.files) != sorted(series.files)
        numbers = [int(ds.InstanceNumber) for ds in files]
        assert numbers != sorted(numbers) and numbers != sorted(numbers, reverse=True)
        iop = np.array([float(v) for v in files[0].ImageOrientationPatient])
        normal = np.cross(iop[:3], iop[3:])
        along = [float(np.array([float(v) for v in ds.ImagePositionPatient]) @ normal)
                 for ds in files]
        assert np.all(np.diff(along) > 0)
        np.testing.assert_allclose(series.positions, along)
        for k, ds in enumerate(files):  # HU from the rescale of that very file
            expected = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
            np.testing.assert_array_equal(series.hu[k], expected.astype(np.float32))
        ps = [float(v) for v in files[0].PixelSpacing]
        assert series.spacing[1:] == (ps[0], ps[1])
        assert series.spacing[0] == pytest.approx(float(files[0].SliceThickness))
        assert series.patient_id == patient
    # the second patient's orientation has its normal along -z: position order is falling z
    (flipped,) = lidc.read_series(folders[1][1])
    assert flipped.orientation == (1, 0, 0, 0, -1, 0)
    assert np.all(np.diff(flipped.z) < 0)
    assert np.all(np.diff(lidc.read_series(folders[0][1])[0].z) > 0)


def _write_case(root: Path, readers, n=6, shape=(24, 24), positions=None, patient="LIDC-IDRI-0100"):
    """A series (files named in reverse order) and its XML; returns (folder, sop_uids, zs)."""
    folder = root / patient / "1.2.3" / "1.2.3.4"
    zs = [-40.0 + 2.0 * k for k in range(n)] if positions is None else positions
    sops = [f"1.2.3.4.{k + 1}" for k in range(len(zs))]
    hu = np.full((len(zs),) + shape, -800.0, np.float32)
    lidc.write_ct_series(folder, hu, patient_id=patient, study_uid="1.2.3", series_uid="1.2.3.4",
                         sop_uids=sops, positions=[(-9.6, -9.6, z) for z in zs],
                         orientation=(1, 0, 0, 0, 1, 0), pixel_spacing=(0.8, 0.8),
                         file_names=[f"{len(zs) - k:02d}.dcm" for k in range(len(zs))],
                         instance_numbers=range(1, len(zs) + 1), slice_thickness=2.0)
    marks = [[{"nodule": nodule, "rois": [(zs[k], sops[k], ring) for k, ring in rois]}
              for nodule, rois in reader] for reader in readers]
    lidc.write_readings_xml(folder / "158.xml", series_uid="1.2.3.4", study_uid="1.2.3",
                            readers=marks)
    return folder, sops, zs


def _enclosed(ring, shape):
    """Pixels whose centre matplotlib's Path puts inside the outline, outline points removed."""
    yy, xx = np.mgrid[0:shape[0], 0:shape[1]]
    inside = MplPath(np.array(ring + [ring[0]], float), closed=True).contains_points(
        np.column_stack([xx.ravel(), yy.ravel()])).reshape(shape)
    for x, y in ring:
        inside[y, x] = False
    return inside


def test_consensus_of_half_the_readers_against_an_independent_mask(tmp_path):
    shape = (24, 24)
    # four readers outline nodule A on slices 2 and 3, with different centres and radii;
    # reader 2 alone marks nodule B (its consensus is its own mask)
    rings = {r: {k: lidc.ring(9.0 + 0.6 * r, 10.0 - 0.4 * r, 3.5 + 0.5 * r + 0.3 * (k == 3))
                 for k in (2, 3)} for r in range(4)}
    ring_b = lidc.ring(19.0, 18.0, 2.6)
    for reader in rings.values():
        for ring in reader.values():  # the outlines are 8-connected chains
            steps = np.abs(np.diff(np.array(ring + [ring[0]]), axis=0))
            assert steps.max() <= 1
    readers = [[("Nodule 001", sorted(rings[r].items()))] for r in range(4)]
    readers[1].append(("Nodule 002", [(4, ring_b)]))
    _write_case(tmp_path / "root", readers, shape=shape)
    out = lidc.convert(tmp_path / "root", tmp_path / "out", val_fraction=0.0)

    count = {k: sum(_enclosed(rings[r][k], shape).astype(int) for r in range(4)) for k in (2, 3)}
    expected = {k: count[k] >= 2 for k in (2, 3)}  # >= 50 % of 4 readers
    expected[4] = _enclosed(ring_b, shape)
    assert all(m.any() for m in expected.values())
    assert any(((c == 1) & ~m).any() for c, m in zip(count.values(), expected.values()))

    masks = _coco_masks(out)
    # slice index k in position order; the series' files are named in reverse
    assert sorted(masks) == [f"LIDC-IDRI-0100_s1_z{k:03d}" for k in (2, 3, 4)]
    for k, mask in expected.items():
        np.testing.assert_array_equal(masks[f"LIDC-IDRI-0100_s1_z{k:03d}"], mask)
        labels = np.asarray(Image.open(out / "labels" / f"LIDC-IDRI-0100_s1_z{k:03d}.png"))
        np.testing.assert_array_equal(labels, count[k] if k in count else expected[4])
    meta = json.loads((out / "dataset.json").read_text())
    assert meta["counts"] == {"train": 3, "val": 0}
    assert meta["spacing"] == {"LIDC-IDRI-0100": [0.8, 0.8]}


def test_readers_nodules_grouped_into_physical_nodules(standins):
    for patient, folder in lidc.find_series_folders(standins):
        (series,) = lidc.read_series(folder)
        reading = lidc.read_readings(folder, series.series_uid)
        nodules = lidc.nodules_of(series, reading)
        # the stand-ins draw one nodule (odd patients two) that each reader outlines once
        assert len(nodules) == (2 if patient == "LIDC-IDRI-0002" else 1)
        for nodule in nodules:
            assert len(nodule.readers) >= 2 and nodule.consensus
            for k, mask in nodule.consensus.items():
                assert (series.hu[k][mask] > -300).mean() > 0.75  # on the bright nodule


def test_small_nodules_and_non_nodules_skipped(standins, tmp_path):
    folder = lidc.find_series_folders(standins)[0][1]
    (series,) = lidc.read_series(folder)
    reading = lidc.read_readings(folder, series.series_uid)
    assert (reading.small_nodules, reading.non_nodules) == (1, 1)
    assert "IL057_small" not in {n.nodule_id for n in reading.nodules}
    out = lidc.convert(standins, tmp_path / "out")
    source = json.loads((out / "dataset.json").read_text())["source"]
    assert source["skipped"] == {"non_nodules": 1, "series_without_readings": 0,
                                 "small_nodules": 1}


def test_missing_slice_refused_nothing_written(standins, tmp_path):
    root = tmp_path / "root"
    shutil.copytree(standins / "LIDC-IDRI-0001", root / "LIDC-IDRI-0001")
    folder = lidc.find_series_folders(root)[0][1]
    (series,) = lidc.read_series(folder)
    before, gone, after = series.files[2:5]
    (folder / gone).unlink()
    with pytest.raises(MedicalDataError) as err:
        lidc.convert(root, tmp_path / "out")
    message = str(err.value)
    assert message.startswith(str(folder)) and "missing slice" in message
    assert before in message and after in message
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["root"]


def test_duplicated_slice_refused(tmp_path):
    zs = [-40.0, -38.0, -36.0, -36.0, -34.0]
    folder, _, _ = _write_case(tmp_path / "root", [[]], positions=zs)
    with pytest.raises(MedicalDataError, match="duplicated slice") as err:
        lidc.read_series(folder)
    assert str(err.value).startswith(str(folder))
    assert "02.dcm" in str(err.value) and "03.dcm" in str(err.value)


def test_one_folder_two_series_grouped_by_uid(tmp_path):
    folder = tmp_path / "mixed"
    for uid, n, prefix in (("1.2.9.1", 4, "a"), ("1.2.9.2", 3, "b")):
        zs = [10.0 - 3.0 * k for k in range(n)]
        lidc.write_ct_series(folder, np.zeros((n, 8, 8), np.float32), patient_id="P",
                             study_uid="1.2.9", series_uid=uid,
                             sop_uids=[f"{uid}.{k}" for k in range(n)],
                             positions=[(0.0, 0.0, z) for z in zs], orientation=(1, 0, 0, 0, 1, 0),
                             pixel_spacing=(0.5, 0.5),
                             file_names=[f"{k}{prefix}.dcm" for k in range(n)],
                             instance_numbers=range(1, n + 1))
    series = lidc.read_series(folder)
    assert [(s.series_uid, s.hu.shape[0]) for s in series] == [("1.2.9.1", 4), ("1.2.9.2", 3)]
    assert series[0].files == ("3a.dcm", "2a.dcm", "1a.dcm", "0a.dcm")
    assert series[1].spacing[0] == pytest.approx(3.0)


def test_rerun_identical_and_split_by_patient(standins, tmp_path):
    first = _tree(lidc.convert(standins, tmp_path / "a", seed=3))
    again = _tree(lidc.convert(standins, tmp_path / "b", seed=3))
    assert first == again
    split = json.loads(first["split.json"])
    assert split["seed"] == 3 and not set(split["train"]) & set(split["val"])
    assert sorted(split["train"] + split["val"]) == ["LIDC-IDRI-0001", "LIDC-IDRI-0002",
                                                     "LIDC-IDRI-0003"]
    for subset in ("train", "val"):
        images = json.loads(first[f"annotations/{subset}.json"])["images"]
        assert images and {image["case"] for image in images} <= set(split[subset])
        for image in images:
            pixels = np.asarray(Image.open(tmp_path / "a" / image["file_name"]))
            assert pixels.shape == (32, 32, 3) and pixels.dtype == np.uint8


def test_missing_data_set_says_where_to_get_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="cancerimagingarchive"):
        lidc.convert(tmp_path, tmp_path / "out")


def test_outline_on_no_slice_refused_naming_the_xml(tmp_path):
    ring = lidc.ring(10.0, 10.0, 3.0)
    folder, sops, zs = _write_case(tmp_path / "root", [[("Nodule 007", [(2, ring)])]])
    xml = folder / "158.xml"
    text = xml.read_text().replace(sops[2], "1.2.999").replace(f"{zs[2]:.6f}", "-12.345000")
    xml.write_text(text)
    with pytest.raises(MedicalDataError, match="Nodule 007.*on no slice") as err:
        lidc.convert(tmp_path / "root", tmp_path / "out")
    assert str(err.value).startswith(f"{xml}: reader 1")
    assert not (tmp_path / "out").exists()


def test_standins_deterministic_replaceable_and_never_over_real_data(standins, tmp_path):
    again = lidc.write_standins(tmp_path / "again", seed=0, cases=3)
    assert _tree(again) == _tree(standins)
    lidc.write_standins(again, seed=1, cases=1)  # earlier stand-ins are replaced whole
    assert sorted(p.name for p in again.iterdir()) == [".sharp_fpn_standins", "LIDC-IDRI-0001"]
    real = tmp_path / "real"
    (real / "LIDC-IDRI-0001").mkdir(parents=True)
    with pytest.raises(FileExistsError, match="holds no stand-ins"):
        lidc.write_standins(real)
    assert [p.name for p in real.iterdir()] == ["LIDC-IDRI-0001"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["again", "real"]


def test_bad_series_skipped_and_listed_when_asked(standins, tmp_path):
    root = tmp_path / "root"
    for patient in ("LIDC-IDRI-0001", "LIDC-IDRI-0002"):
        shutil.copytree(standins / patient, root / patient)
    folder = lidc.find_series_folders(root)[0][1]
    (series,) = lidc.read_series(folder)
    (folder / series.files[3]).unlink()
    out = lidc.convert(root, tmp_path / "out", bad_series="skip")
    meta = json.loads((out / "dataset.json").read_text())
    (bad,) = meta["source"]["bad_series"]
    assert bad["series"] == folder.relative_to(root).as_posix()
    assert "missing slice" in bad["problem"]
    split = json.loads((out / "split.json").read_text())
    assert split["train"] + split["val"] == ["LIDC-IDRI-0002"]
