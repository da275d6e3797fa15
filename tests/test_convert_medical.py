"""tools/convert_medical.py on stand-ins, its one-line errors, and the registered medical names
(sharp_fpn.data.medical.registry, and detectron2's DatasetCatalog)."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from sharp_fpn.data.medical import brats19
from sharp_fpn.data.medical.registry import MEDICAL_DATASETS, coco_files, prepare_medical

ROOT = Path(__file__).resolve().parents[1]


def _tool():
    spec = importlib.util.spec_from_file_location("tool_convert_medical",
                                                  ROOT / "tools" / "convert_medical.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _files(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file()}


def test_cli_converts_the_standins_and_a_rerun_is_identical(tmp_path, capsys):
    tool = _tool()
    raw, out = tmp_path / "raw", tmp_path / "out"
    argv = ["lits17", str(raw), "--out", str(out), "--standins", "--seed", "2",
            "--val-fraction", "0.25", "--option", "other_fraction=0.5", "-o", "window=[60,300]"]
    assert tool.main(argv) == 0
    said = capsys.readouterr().out
    meta = json.loads((out / "dataset.json").read_text())
    split = json.loads((out / "split.json").read_text())
    assert meta["source"]["window_hu"] == {"level": 60.0, "width": 300.0}
    assert split["seed"] == 2 and len(split["train"]) == 3 and len(split["val"]) == 1
    n_images = len(list((out / "images").glob("*.png")))
    assert n_images == meta["counts"]["train"] + meta["counts"]["val"] > 0
    assert f"{meta['counts']['train']} train and {meta['counts']['val']} val slices" in said
    first = _files(out)
    assert tool.main(argv) == 0  # stand-ins already there, output ours: replaced, the same
    assert _files(out) == first


def test_cli_errors_are_one_line_and_write_nothing(tmp_path, capsys):
    tool = _tool()
    empty = tmp_path / "empty"
    empty.mkdir()
    cases = [
        (["brats19", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o")], "no such folder"),
        (["brats19", str(empty), "--out", str(tmp_path / "o")],
         f"{empty} holds no brats19 data set"),
        (["brats19", str(empty), "--out", str(tmp_path / "o"), "-o", "colour=red"],
         "--option colour: brats19 takes no such option; its options are keep, rgb"),
        (["brats19", str(empty), "--out", str(tmp_path / "o"), "-o", "keep"],
         "expected KEY=VALUE"),
        (["lits17", str(tmp_path), "--out", str(tmp_path / "sub" / "o")],
         "must not contain one another"),
    ]
    for argv, expected in cases:
        assert tool.main(argv) == 1, argv
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and expected in err, err
        assert "Traceback" not in err
    assert not (tmp_path / "o").exists() and not (tmp_path / "sub").exists()


def test_cli_names_the_bad_segmentation_in_a_subprocess(tmp_path):
    raw = brats19.write_standins(tmp_path / "raw", cases=2, size=16)
    seg_path = next(raw.rglob("*_000_1_seg.nii.gz"))
    seg = nib.load(seg_path)
    nib.save(nib.Nifti1Image(np.array(seg.dataobj)[:-1], seg.affine), seg_path)
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "tools/convert_medical.py", "brats19", str(raw), "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert proc.returncode == 1
    assert proc.stderr.strip() == (
        f"convert_medical.py: error: {seg_path}: shape (15, 16, 8) differs from "
        "BraTS19_SYN_000_1_flair.nii.gz's (16, 16, 8)")
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == ["raw"]


def test_registry_names_and_missing_converted_folder(tmp_path):
    for module in ("brats19", "lits17", "lidc", "luna16"):
        for suffix in ("train", "val", "quick_train", "quick_val"):
            spec = MEDICAL_DATASETS[f"{module}_{suffix}"]
            assert spec.module == module and spec.split == suffix.rsplit("_", 1)[-1]
            assert spec.kind == ("3d" if module == "luna16" else "2d")
    with pytest.raises(FileNotFoundError) as err:
        prepare_medical("lits17_train", tmp_path)
    message = str(err.value)
    assert str(tmp_path / "lits17") in message and "codalab" in message
    assert "convert_medical.py lits17 ROOT --out" in message


def test_quick_brats19_is_made_on_first_use_and_loads_in_detectron2():
    from detectron2.data import DatasetCatalog, MetadataCatalog

    import sharp_fpn.d2  # noqa: F401  (registers the datasets)
    from sharp_fpn.data.catalog import datasets_root

    records = DatasetCatalog.get("brats19_quick_train")
    folder = datasets_root() / "quick" / "brats19"
    assert (folder / "dataset.json").is_file()
    assert (datasets_root() / "quick" / "brats19_raw" / brats19.TRAINING).is_dir()
    split = json.loads((folder / "split.json").read_text())
    assert len(split["train"]) == 3 and len(split["val"]) == 1
    assert records and {r["file_name"].split("/")[-1].rsplit("_z", 1)[0] for r in records} \
        == set(split["train"])
    with_tumour = [r for r in records if r["annotations"]]
    assert with_tumour and len(with_tumour) < len(records)  # slices without tumour kept
    record = with_tumour[0]
    image = np.asarray(Image.open(record["file_name"]))
    assert image.shape == (record["height"], record["width"], 3)
    assert record["annotations"][0]["category_id"] == 0  # detectron2's contiguous id
    meta = MetadataCatalog.get("brats19_quick_train")
    assert meta.thing_classes == ["brats19"] and meta.evaluator_type == "coco"
    assert meta.json_file == str(folder / "annotations" / "train.json")
    stamp = (folder / "dataset.json").stat().st_mtime_ns
    val = DatasetCatalog.get("brats19_quick_val")  # cached: not converted again
    assert (folder / "dataset.json").stat().st_mtime_ns == stamp
    assert {r["file_name"].split("/")[-1].rsplit("_z", 1)[0] for r in val} == set(split["val"])
    json_file, image_root = coco_files("brats19_quick_val")
    assert json_file == folder / "annotations" / "val.json" and image_root == folder
    with pytest.raises(FileNotFoundError, match="holds no converted data set"):
        DatasetCatalog.get("brats19_train")
    assert MetadataCatalog.get("luna16_quick_train").kind == "3d"  # registered, not made
