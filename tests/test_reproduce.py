"""tools/reproduce.py: the --quick plumbing on a two-row, two-iteration run (CPU)."""
import csv
import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
from detectron2.data import DatasetCatalog, MetadataCatalog

ROOT = Path(__file__).resolve().parent.parent
TINY_VAL = "nuclei_synth_val_tiny"


def _load_reproduce():
    spec = importlib.util.spec_from_file_location("reproduce", ROOT / "tools" / "reproduce.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while being defined
    spec.loader.exec_module(module)
    return module


reproduce = _load_reproduce()


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
    output = reproduce.main([
        "--table", "1", "--quick", "--rows", "unet", "unet_sharp_ds", "--iters", "2",
        "--output", str(tmp_path), "--speed-seconds", "0.05",
        "--opts", "DATASETS.TEST", f"('{tiny_val}',)", "INPUT.SEMANTIC.SIZE", "[32, 32]",
        "SOLVER.IMS_PER_BATCH", "2", "MODEL.UNET.WIDTH_MULT", "0.125",
    ])
    assert output == tmp_path

    markdown = (tmp_path / "table1.md").read_text()
    assert "Smoke run (`--quick`), not a reproduction" in markdown
    assert "| unet_sharp_ds | UNet# | yes |" in markdown and "92.67" in markdown  # paper's IoU
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


def test_missing_configs_are_listed_not_run(tmp_path, monkeypatch):
    missing = reproduce.Row("mask_rcnn_x_R101", "Mask R-CNN#", "configs/nope.yaml", 95.87,
                            92.25, backbone="R101")
    monkeypatch.setattr(reproduce, "TABLE2", [missing])
    reproduce.main(["--table", "2", "--quick", "--output", str(tmp_path)])
    markdown = (tmp_path / "table2.md").read_text()
    assert "not run: configs/nope.yaml does not exist yet" in markdown
    assert "95.87" in markdown and "92.25" in markdown
    assert not (tmp_path / "table2_iou_boxplot.png").exists()


def test_rows_are_checked():
    with pytest.raises(SystemExit, match="unknown row"):
        reproduce.select_rows(1, ["unet", "unet4"])
    assert [r.key for r in reproduce.select_rows(1, ["unet_ds", "unet"])] == ["unet", "unet_ds"]
    assert len(reproduce.select_rows(2, None)) == 12
