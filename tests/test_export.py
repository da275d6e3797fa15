"""Export round trips: torch.export and ONNX of pruned UNet-family models, TorchScript of a
Mask R-CNN, and the export benchmark's behaviour."""
import importlib
import importlib.util
import json
import sys
import warnings
from pathlib import Path

import pytest
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.modeling import build_model

from sharp_fpn.d2.compat import load_tracing_adapter
from sharp_fpn.d2.engine import get_config
from sharp_fpn.d2.export import export_mask_rcnn
from sharp_fpn.export import ProbabilityModel, export_unet_levels, load_program, onnx_status
from sharp_fpn.models import GridUNet

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "configs" / "demo" / "mask_rcnn_fpn_R18.yaml"
MEAN, STD = (100.0, 110.0, 120.0), (50.0, 55.0, 60.0)
CHANNELS = (4, 8, 16, 32, 64)  # depth 4: the pruning levels L1..L4
ONNX_OK, ONNX_REASON = onnx_status()
needs_onnx = pytest.mark.skipif(not ONNX_OK, reason=ONNX_REASON)


def pixels(*shape, seed=0):
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed)) * 255


def normalise(x):
    return (x - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)


def reference(network, x, level):
    """What an export of ``network`` pruned to ``level`` must compute, from the full network."""
    with torch.no_grad():
        output = network(normalise(x), level=level)
    return output.probabilities()[0] if network.cgm else torch.sigmoid(output)


def gate_one_of_two(network, images, level):
    """Move the decision threshold of X[0][level]'s CGM between the two images' margins, so
    that one image of the batch is gated off and the other kept."""
    cgm = network.cgms[f"0_{level}"]
    with torch.no_grad():
        logits = network(normalise(images), level=level).has_object[0]
        margins = logits[:, 1] - logits[:, 0]
        cgm.classifier.bias[1] -= margins.mean()
        gates = network(normalise(images), level=level).gates()[0].flatten().tolist()
    assert sorted(gates) == [0.0, 1.0]


def two_gated_inputs(network, levels):
    """Check inputs: a dark and a bright image in one batch (one gated off per level, when the
    network has CGMs), then a single image of another size."""
    batch = torch.cat([pixels(1, 3, 32, 48) * 0.2, pixels(1, 3, 32, 48, seed=1)])
    if network.cgm:
        for level in levels:
            gate_one_of_two(network, batch, level)
    return [batch, pixels(1, 3, 48, 32, seed=2)]


def jit_warnings(caught):
    return [str(w.message) for w in caught
            if issubclass(w.category, torch.jit.TracerWarning)
            or (issubclass(w.category, FutureWarning) and "torch.jit" in str(w.message))]


@pytest.mark.parametrize("cgm, levels", [(False, [1, 2, 3, 4]), (True, [1, 3])])
def test_torch_export_of_every_pruning_level_matches_pytorch(tmp_path, cgm, levels):
    torch.manual_seed(0)
    network = GridUNet("sharp", channels=CHANNELS, deep_supervision="top", cgm=cgm).eval()
    inputs = two_gated_inputs(network, levels)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        checks = export_unet_levels(network, levels, tmp_path, inputs, name="tiny",
                                    pixel_mean=MEAN, pixel_std=STD, tolerance=1e-5, onnx=False)
    assert jit_warnings(caught) == []  # no TorchScript on the UNet path
    programs = [c for c in checks if c.format == "torch.export"]
    assert [c.name for c in programs] == [f"tiny_L{k}" for k in levels]
    assert all(c.ok and c.max_abs_diff <= 1e-5 for c in programs), [c.line() for c in programs]
    assert all(Path(c.path).suffix == ".pt2" for c in programs)
    # a third shape, seen neither by the trace nor by the check: batch 3, 64 x 96
    other = pixels(3, 3, 64, 96, seed=3)
    for level, check in zip(levels, programs):
        loaded = load_program(check.path)  # a fresh load from the file
        for x in inputs + [other]:
            with torch.no_grad():
                got = loaded(x)
            expected = reference(network, x, level)
            assert got.shape == (x.shape[0], 1, *x.shape[2:])
            torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
            if not cgm:  # with CGM: the gated batch below is the real comparison
                assert got.std() > 1e-4  # a real comparison, not two saturated maps
        if cgm:  # the CGM gate is per image inside the export: one image all background
            with torch.no_grad():
                got = loaded(inputs[0])
            assert sorted(bool(p.any()) for p in got) == [False, True]
        with pytest.raises(AssertionError, match="Guard failed"):  # sides >= 2 * 2**level
            loaded(pixels(1, 3, 2**level, 2 ** (level + 1)))
    assert [c.parameters for c in programs] == sorted(c.parameters for c in programs)
    onnx = [c for c in checks if c.format == "onnx"]
    assert len(onnx) == len(levels)
    assert all(c.skipped == "not asked for" and c.path is None for c in onnx)


@needs_onnx
def test_onnx_runtime_matches_pytorch_at_other_sizes_and_batches(tmp_path):
    from sharp_fpn.export.unet import onnx_session, run_onnx

    torch.manual_seed(0)
    network = GridUNet("sharp", channels=CHANNELS, deep_supervision="top", cgm=True).eval()
    levels = [1, 4]
    inputs = two_gated_inputs(network, levels)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        checks = export_unet_levels(network, levels, tmp_path, inputs, name="tiny",
                                    pixel_mean=MEAN, pixel_std=STD, tolerance=1e-5)
    assert jit_warnings(caught) == []
    onnx = [c for c in checks if c.format == "onnx"]
    assert [c.name for c in onnx] == ["tiny_L1", "tiny_L4"]
    assert all(c.ok and c.max_abs_diff <= 1e-5 for c in onnx), [c.line() for c in onnx]
    assert all("opset" in c.note for c in onnx)
    other = pixels(3, 3, 64, 96, seed=3)
    for level, check in zip(levels, onnx):
        session = onnx_session(check.path)
        (dims,) = [i.shape for i in session.get_inputs()]
        assert dims[1] == 3 and all(isinstance(d, str) for d in (dims[0], dims[2], dims[3]))
        for x in inputs + [other]:
            got = run_onnx(session, x)
            expected = reference(network, x, level)
            assert got.shape == (x.shape[0], 1, *x.shape[2:])
            torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
        got = run_onnx(session, inputs[0])
        assert sorted(bool(p.any()) for p in got) == [False, True]  # the per-image gate


def test_onnx_part_is_skipped_with_the_reason_when_a_package_is_missing(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxscript", None)  # `import onnxscript` fails
    ok, reason = onnx_status()
    assert not ok and "onnxscript" in reason and "sharp-fpn[onnx]" in reason
    network = GridUNet("unet", channels=(4, 8)).eval()  # non-nested: only the full depth
    checks = export_unet_levels(network, [1], tmp_path, [pixels(1, 3, 8, 12)], name="u")
    assert [(c.format, c.ok) for c in checks] == [("torch.export", True), ("onnx", False)]
    assert checks[1].skipped == reason and "SKIPPED" in checks[1].line()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["u_L1.pt2"]


def test_check_inputs_the_export_cannot_take_are_refused(tmp_path):
    network = GridUNet("sharp", channels=(4, 8, 16), deep_supervision="top").eval()
    for shape in [(1, 3, 10, 16), (1, 3, 4, 8), (3, 8, 8)]:  # level 2: multiples of 4, >= 8
        with pytest.raises(ValueError, match="multiples of 4, at least 8"):
            export_unet_levels(network, [2], tmp_path, [pixels(1, 3, 8, 8), pixels(*shape)])
    assert list(tmp_path.iterdir()) == []  # refused before anything is exported


def test_probability_model_of_an_unpruned_network_is_its_final_branch():
    torch.manual_seed(0)
    network = GridUNet("sharp", channels=(4, 8, 16), deep_supervision="all", cgm=True).eval()
    x = pixels(2, 3, 16, 24)
    with torch.no_grad():
        full = ProbabilityModel(network, MEAN, STD)(x)
        pruned = ProbabilityModel(network.prune(2), MEAN, STD)(x)
        branches = network(normalise(x)).probabilities()
    torch.testing.assert_close(full, pruned, atol=1e-6, rtol=0)
    torch.testing.assert_close(full, branches[-1], atol=1e-6, rtol=0)


def test_tracing_adapter_loads_and_leaves_detectron2_export_as_it_was():
    adapter = load_tracing_adapter()
    assert adapter.__name__ == "TracingAdapter"
    assert adapter.__module__ == "detectron2.export.flatten"
    if importlib.util.find_spec("caffe2") is None:  # detectron2 v0.6 on PyTorch 2.x
        assert "detectron2.export" not in sys.modules  # the stand-in is gone
        with pytest.raises(ModuleNotFoundError, match="caffe2"):
            importlib.import_module("detectron2.export")


def tiny_rcnn():
    torch.manual_seed(0)
    cfg = get_config(str(DEMO), ["MODEL.ROI_HEADS.SCORE_THRESH_TEST", 0.05,
                                 "TEST.DETECTIONS_PER_IMAGE", 20,
                                 "MODEL.RPN.POST_NMS_TOPK_TEST", 100])
    return build_model(cfg).eval()


def test_mask_rcnn_trace_round_trip(tmp_path):
    model = tiny_rcnn()
    images = [pixels(3, 64, 80), pixels(3, 72, 64, seed=1)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        check = export_mask_rcnn(model, images, tmp_path, name="tiny_rcnn", tolerance=1e-4)
    assert jit_warnings(caught) == []  # the known ones are silenced around the calls
    assert check.ok and check.format == "torchscript", check.line()
    assert "detections per check image: 20, 20" in check.note
    info = json.loads((tmp_path / "tiny_rcnn.json").read_text())
    assert info["outputs"] == ["pred_boxes", "pred_classes", "pred_masks", "scores", "image_size"]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", r"`torch\.jit\.load` is deprecated", FutureWarning)
        loaded = torch.jit.load(check.path)
    boxes, classes, masks, scores, size = loaded(images[1])
    assert masks.shape == (20, 1, 28, 28) and tuple(size.tolist()) == (72, 64)


def test_torch_export_still_fails_on_detectron2_rcnn_as_documented():
    """sharp_fpn/d2/export.py keeps TorchScript for this reason; when this test fails, torch
    or detectron2 changed: try torch.export for Mask R-CNN again."""
    adapter_cls = load_tracing_adapter()
    model = tiny_rcnn()

    def inference(net, inputs):
        return [{"instances": net.inference(inputs, do_postprocess=False)[0]}]

    adapter = adapter_cls(model, [{"image": pixels(3, 64, 80)}], inference)
    with pytest.raises(Exception, match="data-dependent expression"), torch.no_grad():
        torch.export.export(adapter, adapter.flattened_inputs)


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
    assert code == 0, printed
    for label in ("unet_sharp_ds_L1", "unet_sharp_ds_L4"):
        assert f"{label} [torch.export]: ok" in printed
        assert (f"{label} [onnx]: ok" if ONNX_OK else f"{label} [onnx]: SKIPPED") in printed
    report = json.loads((tmp_path / "out" / "export_report.json").read_text())
    assert [r["name"] for r in report if r["format"] == "torch.export"] == [
        "unet_sharp_ds_L1", "unet_sharp_ds_L4"]
    assert "checked on 1x3x32x32, 1x3x32x32, 2x3x32x32" in report[0]["note"]
    assert (tmp_path / "out" / "unet_sharp_ds_L4.pt2").is_file()


@needs_onnx
def test_export_benchmark_reports_every_level_and_size(tmp_path):
    from sharp_fpn.export.speed import CANDIDATES, benchmark_export

    torch.manual_seed(0)
    result = benchmark_export(tmp_path, arch="unet_sharp", width=0.0625, levels=[1, 2],
                              sizes=(16, 32), rounds=2, warmup=0)
    assert result["channels"] == [2, 4, 8, 16, 32]
    assert [(r["level"], r["size"]) for r in result["rows"]] == [
        (1, [16, 16]), (1, [32, 32]), (2, [16, 16]), (2, [32, 32])]
    for row in result["rows"]:
        assert set(row["seconds"]) == set(CANDIDATES)
        assert all(s > 0 for s in row["seconds"].values())
        assert all(len(t["rounds_s"]) == 2 for t in row["timings"].values())
        assert row["onnxruntime_speedup"] > 0
        assert all(d <= 1e-4 for d in row["max_abs_diff"].values())
    assert sorted(Path(c["path"]).name for c in result["exports"]) == [
        "unet_sharp_L1.onnx", "unet_sharp_L1.pt2", "unet_sharp_L2.onnx", "unet_sharp_L2.pt2"]
    json.dumps(result)  # JSON-ready
