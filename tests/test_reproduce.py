"""sharp_fpn.experiments (tools/reproduce.py's library): the --quick plumbing on a two-row,
two-iteration run (CPU), the quick recipe files, row selection, the command line."""
import csv
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from detectron2.data import DatasetCatalog, MetadataCatalog

from sharp_fpn.d2.runner import row_config
from sharp_fpn.experiments import Options, Row, UnknownRowError, reproduce, select_rows, tables
from sharp_fpn.experiments.recipes import QUICK_DIR, flatten, load_overrides, quick_overrides

ROOT = Path(__file__).resolve().parent.parent
TINY_VAL = "nuclei_synth_val_tiny"


@pytest.fixture(scope="module")
def tiny_val():
    """Three images of the synthetic validation set, to keep evaluation short."""
    DatasetCatalog.register(TINY_VAL, lambda: DatasetCatalog.get("nuclei_synth_val")[:3])
    MetadataCatalog.get(TINY_VAL).set(thing_classes=["nucleus"])
    yield TINY_VAL
    DatasetCatalog.remove(TINY_VAL)
    MetadataCatalog.remove(TINY_VAL)


def _finite(value: str) -> bool:
    return value not in ("", None) and math.isfinite(float(value))


def test_quick_table1_two_rows(tmp_path, tiny_val):
    output = reproduce(Options(
        table=1, quick=True, rows=["unet", "unet_sharp_ds"], iters=2, output=tmp_path,
        speed_seconds=0.05,
        opts=["DATASETS.TEST", f"('{tiny_val}',)", "INPUT.SEMANTIC.SIZE", "[32, 32]",
              "SOLVER.IMS_PER_BATCH", "2", "MODEL.UNET.WIDTH_MULT", "0.125"],
    ))
    assert output == tmp_path

    markdown = (tmp_path / "table1.md").read_text()
    assert "Smoke run (`--quick`), not a reproduction" in markdown
    assert "| unet_sharp_ds | DSB2018 | UNet# | yes |" in markdown and "92.67" in markdown
    assert "Table 1 as the paper lays it out" in markdown
    assert "Figure 7" in markdown

    with open(tmp_path / "table1.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["row"] for r in rows] == ["unet", "unet_sharp_ds"]
    for r in rows:
        assert r["status"] == "done"
        assert all(_finite(r[k]) for k in ("iou", "dice", "params_M", "trained_params_M",
                                           "train_s"))
        assert 0 <= float(r["iou"]) <= 100
    assert float(rows[0]["paper_iou"]) == 90.15
    # the trained networks are tiny; the full-width configs are the paper's networks
    assert float(rows[1]["params_M"]) == pytest.approx(10.757224)
    assert float(rows[1]["trained_params_M"]) < 0.2

    with open(tmp_path / "pruning.csv", newline="") as f:
        levels = list(csv.DictReader(f))
    assert [int(r["level"]) for r in levels] == [1, 2, 3, 4]
    params = [int(r["params"]) for r in levels]
    assert params == sorted(params) and params[0] > 0
    assert all(_finite(r["images_per_second"]) and float(r["images_per_second"]) > 0
               for r in levels)
    assert all(_finite(r["iou"]) and _finite(r["dice"]) for r in levels)
    # the full level is the trained network's own final branch
    assert float(levels[-1]["iou"]) == pytest.approx(float(rows[1]["iou"]))

    for png in ("table1_iou_boxplot.png", "fig7_pruning.png"):
        assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    result = json.loads((tmp_path / "rows" / "unet" / "result.json").read_text())
    assert len(result["per_image_iou"]) == 3  # one value per image of the evaluated set

    # --resume reuses both rows: the same numbers, nothing trained again
    again = reproduce(Options(table=1, quick=True, rows=["unet", "unet_sharp_ds"], iters=2,
                              output=tmp_path, resume=True,
                              opts=["DATASETS.TEST", f"('{tiny_val}',)"]))
    with open(again / "table1.csv", newline="") as f:
        assert [r["iou"] for r in csv.DictReader(f)] == [r["iou"] for r in rows]


def test_quick_table3_on_the_stand_ins(tmp_path):
    """UNet# with CGM trained and evaluated end to end on the BraTS19 stand-ins (NIfTI files
    converted on first use); the paper's other models listed with their numbers only."""
    output = reproduce(Options(table=3, quick=True, rows=["brats19_unet_sharp_cgm",
                                                         "brats19_pspnet"], iters=2,
                               output=tmp_path, opts=["MODEL.UNET.WIDTH_MULT", "0.125"]))
    with open(output / "table3.csv", newline="") as f:
        rows = {r["row"]: r for r in csv.DictReader(f)}
    ours, theirs = rows["brats19_unet_sharp_cgm"], rows["brats19_pspnet"]
    assert ours["status"] == "done" and ours["dataset"] == "BraTS19"
    assert all(_finite(ours[k]) for k in ("iou", "dice", "params_M", "trained_params_M"))
    assert (float(ours["paper_iou"]), float(ours["paper_dice"])) == (92.08, 96.14)
    assert theirs["status"] == tables.NOT_IMPLEMENTED and theirs["iou"] == ""
    assert (float(theirs["paper_iou"]), float(theirs["paper_dice"])) == (83.85, 91.01)
    markdown = (output / "table3.md").read_text()
    assert "brats19_quick_train -> brats19_quick_val" in markdown
    assert "does not reproduce the paper" in markdown
    result = json.loads((output / "rows" / "brats19_unet_sharp_cgm" / "result.json").read_text())
    assert result["per_image_iou"] and all(0 <= v <= 100 for v in result["per_image_iou"])


def test_missing_configs_are_listed_not_run(tmp_path, monkeypatch):
    missing = Row("mask_rcnn_x_R101", "Mask R-CNN#", "configs/nope.yaml", 95.87, 92.25,
                  backbone="R101")
    monkeypatch.setattr(tables, "TABLE2", [missing])
    reproduce(Options(table=2, quick=True, output=tmp_path))
    markdown = (tmp_path / "table2.md").read_text()
    assert "not run: configs/nope.yaml does not exist yet" in markdown
    assert "95.87" in markdown and "92.25" in markdown
    assert not (tmp_path / "table2_iou_boxplot.png").exists()


def test_rows_are_checked():
    with pytest.raises(UnknownRowError, match=r"unknown row\(s\) \['unet4'\]"):
        select_rows(1, ["unet", "unet4"])
    assert [r.key for r in select_rows(1, ["unet_ds", "unet"])] == ["unet", "unet_ds"]
    assert len(select_rows(2, None)) == 12
    assert all(row.config_path.is_file() for row in select_rows(1) + select_rows(2)
               + select_rows(3) if row.implemented)


def test_quick_recipe_is_merged_on_each_kind_of_row(tmp_path):
    semantic = row_config(select_rows(1, ["unet_sharp_ds"])[0], True, 3,
                          ["MODEL.UNET.WIDTH_MULT", "0.5"], tmp_path)
    assert semantic.MODEL.DEVICE == "cpu" and semantic.SOLVER.MAX_ITER == 3
    assert list(semantic.INPUT.SEMANTIC.SIZE) == [64, 64]
    assert tuple(semantic.DATASETS.TRAIN) == ("nuclei_synth_train",)
    assert semantic.SOLVER.WARMUP_ITERS == 0 and semantic.OUTPUT_DIR == str(tmp_path)
    assert semantic.MODEL.UNET.WIDTH_MULT == 0.5  # --opts come last
    instance = row_config(select_rows(2, ["mask_rcnn_sharp_R101"])[0], True, None, [], tmp_path)
    assert instance.MODEL.FPN.OUT_CHANNELS == 64 and list(instance.MODEL.SHARP_FPN.WIDTHS) == [
        16, 32, 64, 64]
    assert tuple(instance.SOLVER.STEPS) == () and instance.SOLVER.CLIP_GRADIENTS.ENABLED
    # the semantic recipe's keys stay off the Mask R-CNN rows and the other way round
    assert "INPUT.SEMANTIC.SIZE" not in quick_overrides(semantic=False)
    assert "MODEL.FPN.OUT_CHANNELS" not in quick_overrides(semantic=True)
    full = row_config(select_rows(1, ["unet"])[0], False, None, [], tmp_path)
    assert full.DATASETS.TRAIN != semantic.DATASETS.TRAIN  # without --quick: the config's own


def test_recipe_files_are_flattened_and_checked(tmp_path):
    assert flatten({"A": {"B": 1, "C": {"D": [2]}}, "E": "x"}) == ["A.B", 1, "A.C.D", [2], "E", "x"]
    assert load_overrides(QUICK_DIR / "common.yaml")[:2] == ["MODEL.DEVICE", "cpu"]
    bad = tmp_path / "bad.yaml"
    bad.write_text("- MODEL.DEVICE\n- cpu\n")
    with pytest.raises(ValueError, match="bad.yaml: expected a mapping"):
        load_overrides(bad)
    bad.write_text("_BASE_: x.yaml\nSEED: 1\n")
    with pytest.raises(ValueError, match="no _BASE_"):
        load_overrides(bad)


def test_command_line_names_unknown_rows_before_anything_runs():
    done = subprocess.run([sys.executable, str(ROOT / "tools" / "reproduce.py"), "--table", "1",
                           "--rows", "unet9"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "unknown row(s) ['unet9'] for table 1" in done.stderr
