"""Export round trips: TorchScript of pruned UNet-family models and of a Mask R-CNN."""
import importlib
import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.modeling import build_model

from sharp_fpn.d2.engine import get_config
from sharp_fpn.models import GridUNet
from sharp_fpn.export import (
    ProbabilityModel,
    export_mask_rcnn,
    export_unet_levels,
)
from sharp_fpn.d2.compat import load_tracing_adapter

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "configs" / "demo" / "mask_rcnn_fpn_R18.yaml"


def pixels(*shape, seed=0):
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed)) * 255


@pytest.mark.parametrize("cgm", [False, True])
def test_torchscript_of_every_pruning_level_matches_pytorch(tmp_path, cgm):
    torch.manual_seed(0)
    network = GridUNet("sharp", channels=(4, 8, 16, 32), deep_supervision="top", cgm=cgm).eval()
    mean, std = (100.0, 110.0, 120.0), (50.0, 55.0, 60.0)
    inputs = [pixels(1, 3, 32, 48), pixels(2, 3, 24, 16, seed=1)]  # traced on the first only
    checks = export_unet_levels(network, [1, 2, 3], tmp_path, inputs, name="tiny",
                                pixel_mean=mean, pixel_std=std, tolerance=1e-5)
    torchscript = [c for c in checks if c.format == "torchscript"]
    assert [c.name for c in torchscript] == ["tiny_L1", "tiny_L2", "tiny_L3"]
    assert all(c.ok and c.max_abs_diff <= 1e-5 for c in torchscript)
    for level, check in zip([1, 2, 3], torchscript):
        loaded = torch.jit.load(check.path)
        for x in inputs:
            got = loaded(x)
            # the pruned export computes the full network's branch X[0][level]
            normalised = (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(
                1, 3, 1, 1
            )
            with torch.no_grad():
                output = network(normalised, level=level)
                if cgm:
                    expected = output.probabilities()[0]
                else:
                    expected = torch.sigmoid(output)
            assert got.shape == (x.shape[0], 1, *x.shape[2:])
            torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
            if not cgm:
                assert got.std() > 1e-4  # a real comparison, not two saturated maps
    assert [c.parameters for c in torchscript] == sorted(c.parameters for c in torchscript)
    onnx = [c for c in checks if c.format == "onnx"]
    assert len(onnx) == 3
    if importlib.util.find_spec("onnx") is None:
        assert all("onnx" in c.skipped and c.path is None for c in onnx)


def test_a_network_with_several_branches_must_be_pruned_first():
    network = GridUNet("sharp", channels=(4, 8, 16), deep_supervision="top").eval()
    with pytest.raises(ValueError, match="prune"):
        ProbabilityModel(network)(pixels(1, 3, 16, 16))


def test_tracing_adapter_loads_and_leaves_detectron2_export_as_it_was():
    adapter = load_tracing_adapter()
    assert adapter.__name__ == "TracingAdapter"
    assert adapter.__module__ == "detectron2.export.flatten"
    if importlib.util.find_spec("caffe2") is None:  # detectron2 v0.6 on PyTorch 2.x
        assert "detectron2.export" not in sys.modules  # the stand-in is gone
        with pytest.raises(ModuleNotFoundError, match="caffe2"):
            importlib.import_module("detectron2.export")


def test_mask_rcnn_trace_round_trip(tmp_path):
    torch.manual_seed(0)
    cfg = get_config(str(DEMO), ["MODEL.ROI_HEADS.SCORE_THRESH_TEST", 0.05,
                                 "TEST.DETECTIONS_PER_IMAGE", 20,
                                 "MODEL.RPN.POST_NMS_TOPK_TEST", 100])
    model = build_model(cfg).eval()
    images = [pixels(3, 64, 80), pixels(3, 72, 64, seed=1)]
    check = export_mask_rcnn(model, images, tmp_path, name="tiny_rcnn", tolerance=1e-4)
    assert check.ok, check.line()
    assert "detections per check image: 20, 20" in check.note
    info = json.loads((tmp_path / "tiny_rcnn.json").read_text())
    assert info["outputs"] == ["pred_boxes", "pred_classes", "pred_masks", "scores", "image_size"]
    boxes, classes, masks, scores, size = torch.jit.load(check.path)(images[1])
    assert masks.shape == (20, 1, 28, 28) and tuple(size.tolist()) == (72, 64)


def test_probability_model_is_the_semantic_meta_architecture_at_inference():
    """What ``tools/export.py unet --config-file`` exports computes the detectron2 model's
    ``sem_seg`` (normalisation, final branch, sigmoid, CGM gate)."""
    cfg = get_config(str(ROOT / "configs" / "semantic" / "table1" / "unet_sharp_ds.yaml"),
                     ["MODEL.UNET.WIDTH_MULT", 0.125, "MODEL.DEVICE", "cpu"])
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    network = model.network
    exported = ProbabilityModel(network.prune(network.depth), cfg.MODEL.PIXEL_MEAN,
                                cfg.MODEL.PIXEL_STD).eval()
    image = pixels(3, 48, 64)
    with torch.no_grad():
        expected = model([{"image": image, "height": 48, "width": 64}])[0]["sem_seg"]
        got = exported(image[None])[0]
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)


def test_export_cli_on_a_trained_semantic_checkpoint(tmp_path, capsys):
    config = ROOT / "configs" / "semantic" / "table1" / "unet_sharp_ds.yaml"
    opts = ["MODEL.UNET.WIDTH_MULT", "0.125", "MODEL.DEVICE", "cpu"]
    torch.manual_seed(0)
    model = build_model(get_config(str(config), opts))
    DetectionCheckpointer(model, save_dir=str(tmp_path)).save("semantic")
    spec = importlib.util.spec_from_file_location("tool_export", ROOT / "tools" / "export.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    code = tool.main(["unet", "--config-file", str(config), "--weights",
                      str(tmp_path / "semantic.pth"), "--levels", "1", "4", "--size", "32",
                      "--output", str(tmp_path / "out"), *opts])
    printed = capsys.readouterr().out
    assert code == 0
    assert "unet_sharp_ds_L1 [torchscript]: ok" in printed
    assert "unet_sharp_ds_L4 [torchscript]: ok" in printed
    report = json.loads((tmp_path / "out" / "export_report.json").read_text())
    assert [r["name"] for r in report if r["format"] == "torchscript"] == [
        "unet_sharp_ds_L1", "unet_sharp_ds_L4"]
