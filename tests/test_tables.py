"""The paper's Tables 1 (five columns) and 3 as data: every row's config loads and builds the
row's network, the paper's numbers are there, the quick recipe picks each row's stand-in."""
from __future__ import annotations

import pytest

from sharp_fpn.d2.engine import check_run, get_config
from sharp_fpn.d2.runner import config_parameters, row_config
from sharp_fpn.experiments import tables
from sharp_fpn.experiments.tables import (
    NOT_IMPLEMENTED,
    TABLE1,
    TABLE3,
    UnknownRowError,
    select_rows,
)
from sharp_fpn.models.unet import VNET_PARAMETER_TABLE


def test_table1_has_five_columns_of_eight_rows_in_the_papers_order():
    columns = {}
    for row in TABLE1:
        columns.setdefault(row.dataset, []).append(row)
    assert list(columns) == ["dsb2018", "brats19", "lits17", "lidc", "luna16"]
    assert all(len(rows) == 8 for rows in columns.values())
    assert [r.deep_supervision for r in columns["luna16"]] == [
        False, False, False, True, False, True, False, True]
    assert [r.model for r in columns["luna16"]] == [
        "V-Net", "WV-Net", "V-Net2+", "V-Net2+", "V-Net3+", "V-Net3+", "V-Net#", "V-Net#"]
    paper = {r.key: r.paper_iou for r in TABLE1}
    # spot checks against the paper's Table 1, one per column
    assert paper["unet"] == 90.15 and paper["brats19_unet_sharp_ds"] == 92.38
    assert paper["lits17_unet_sharp"] == 94.79 and paper["lidc_unet3plus_ds"] == 73.48
    assert paper["luna16_vnet"] == 71.21 and paper["luna16_vnet_sharp_ds"] == 79.45
    assert {r.paper_params for r in columns["luna16"]} == {26.39, 33.40, 27.37, 27.84, 28.37}
    assert len({r.key for r in TABLE1}) == len(TABLE1)


def test_every_implemented_row_has_a_config_that_loads():
    for row in TABLE1 + tables.TABLE1_EXTRAS + tables.TABLE2 + TABLE3:
        if not row.implemented:
            continue
        cfg = get_config(str(row.config_path))
        if row.dataset != "dsb2018":
            assert tuple(cfg.DATASETS.TRAIN) == (f"{row.dataset}_train",), row.key
            assert tuple(cfg.DATASETS.TEST) == (f"{row.dataset}_val",), row.key
        if row.volume:
            assert cfg.MODEL.META_ARCHITECTURE == "VolumeSegmentor", row.key
        elif row in TABLE1 or row in TABLE3:
            assert cfg.MODEL.META_ARCHITECTURE == "SemanticNucleiSegmentor", row.key
        if row in TABLE1:
            assert cfg.MODEL.UNET.DEEP_SUPERVISION == row.deep_supervision, row.key


def test_table3_lists_ours_beside_the_papers_eight_models():
    assert len(TABLE3) == 20 and [r.dataset for r in TABLE3] == ["brats19"] * 10 + ["lits17"] * 10
    ours = [r for r in TABLE3 if r.implemented]
    assert [r.key for r in ours] == ["brats19_unet_sharp", "brats19_unet_sharp_cgm",
                                     "lits17_unet_sharp", "lits17_unet_sharp_cgm"]
    paper = {r.key: (r.paper_iou, r.paper_dice) for r in TABLE3}
    assert paper["brats19_unet_sharp_cgm"] == (92.08, 96.14)
    assert paper["lits17_unet_sharp"] == (94.79, 97.29)
    assert paper["lits17_transunet"] == (92.59, 96.16) and paper["brats19_pspnet"] == (83.85, 91.01)
    assert all(r.config == "" for r in TABLE3 if not r.implemented)
    cgm = get_config(str(ours[1].config_path))
    assert cgm.MODEL.UNET.CGM and cgm.MODEL.UNET.DEEP_SUPERVISION
    plain = get_config(str(ours[0].config_path))
    assert not plain.MODEL.UNET.CGM and plain.MODEL.UNET.ARCH == "unet_sharp"
    assert NOT_IMPLEMENTED.startswith("not implemented here")


def test_3d_rows_count_the_vnet_parameter_table():
    """The LUNA16 rows without deep supervision build exactly VNET_PARAMETER_TABLE's networks;
    with it, those plus their heads (counted on the meta device)."""
    for row in select_rows(1, datasets=["luna16"]):
        arch = get_config(str(row.config_path)).MODEL.UNET.ARCH
        paper, ours = VNET_PARAMETER_TABLE[arch]
        assert row.paper_params == paper
        count = config_parameters(row)
        if row.deep_supervision:
            assert ours < count < ours * 1.001
        else:
            assert count == ours


def test_rows_and_datasets_are_selected():
    assert [r.key for r in select_rows(3, datasets=["lits17"])][-2:] == [
        "lits17_unet_sharp", "lits17_unet_sharp_cgm"]
    assert len(select_rows(1, datasets=["brats19", "luna16"])) == 16
    assert [r.key for r in select_rows(1, ["luna16_vnet", "unet"], ["luna16"])] == ["luna16_vnet"]
    with pytest.raises(UnknownRowError, match=r"unknown data set\(s\) \['luna17'\]"):
        select_rows(1, datasets=["luna17"])
    with pytest.raises(UnknownRowError, match=r"unknown data set\(s\) \['luna16'\] for table 3"):
        select_rows(3, datasets=["luna16"])


def test_quick_recipe_trains_each_row_on_its_stand_in(tmp_path):
    volume = row_config(select_rows(1, ["luna16_vnet_sharp_ds"])[0], True, 2, [], tmp_path)
    assert tuple(volume.DATASETS.TRAIN) == ("luna16_quick_train",)
    assert tuple(volume.DATASETS.TEST) == ("luna16_quick_val",)
    assert list(volume.INPUT.VOLUME.PATCH_SIZE) == [16, 16, 16]
    assert volume.MODEL.UNET.WIDTH_MULT == 0.125 and volume.MODEL.DEVICE == "cpu"
    slices = row_config(select_rows(3, ["brats19_unet_sharp_cgm"])[0], True, 2, [], tmp_path)
    assert tuple(slices.DATASETS.TRAIN) == ("brats19_quick_train",)
    assert list(slices.INPUT.SEMANTIC.SIZE) == [32, 32] and slices.MODEL.UNET.CGM
    nuclei = row_config(select_rows(1, ["unet"])[0], True, 2, [], tmp_path)
    assert tuple(nuclei.DATASETS.TRAIN) == ("nuclei_synth_train",)
    assert list(nuclei.INPUT.SEMANTIC.SIZE) == [64, 64]


def test_quick_runs_on_one_thread_unless_told():
    from sharp_fpn.experiments import Options

    assert Options(table=1, quick=True).row_threads() == 1
    assert Options(table=1, quick=True, threads=2).row_threads() == 2
    assert Options(table=1).row_threads() is None


def test_a_missing_medical_data_set_is_named_before_any_work(tmp_path):
    """tools/train_net.py's checks: the LUNA16 rows' data set, not converted under this test
    session's empty datasets root, fails with where to get it before a model is built."""
    out = tmp_path / "out"
    cfg = get_config(str(select_rows(1, ["luna16_vnet"])[0].config_path),
                     ["MODEL.DEVICE", "cpu", "OUTPUT_DIR", str(out)])
    with pytest.raises(FileNotFoundError, match=r"dataset 'luna16_train': .* holds no converted "
                                                r"data set.*convert_medical.py luna16"):
        check_run(cfg)
    assert not out.exists()
