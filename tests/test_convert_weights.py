"""tools/convert_torchvision_weights.py: torchvision ResNet-101 / VGG16(-BN) state dicts loaded by
detectron2's DetectionCheckpointer into the configs' bottom-ups, every tensor matched and the
features equal torchvision's; the CLI, its errors and the input settings of the configs."""
import importlib.util
from pathlib import Path

import pytest
import torch
import torchvision
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import get_cfg
from detectron2.modeling import build_backbone
from torch import nn
from torchvision.models.vgg import cfgs as torchvision_cfgs
from torchvision.models.vgg import make_layers

import sharp_fpn.d2  # noqa: F401  (registers the builders)
from sharp_fpn.d2.config import add_sharp_fpn_config
from sharp_fpn.d2.torchvision_weights import INPUT_SETTINGS, convert, convert_file
from sharp_fpn.outdir import RECORD_NAME

ROOT = Path(__file__).resolve().parents[1]
TABLE2 = sorted((ROOT / "configs").glob("mask_rcnn_*_*.yaml"))


def randomize_batchnorms(model: nn.Module) -> None:
    """Non-trivial BN statistics and affines, so that a wrong mapping cannot hide."""
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            nn.init.uniform_(m.weight, 0.2, 0.6)
            nn.init.uniform_(m.bias, -0.1, 0.1)
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 2.0)


class Detector(nn.Module):
    """The part of a GeneralizedRCNN that the checkpoint addresses: ``backbone``."""

    def __init__(self, backbone):
        super().__init__()
        self.backbone = backbone


def detector(config_name, *opts):
    cfg = add_sharp_fpn_config(get_cfg())
    cfg.merge_from_file(str(ROOT / "configs" / config_name))
    cfg.merge_from_list(["MODEL.FPN.OUT_CHANNELS", "16", "MODEL.SHARP_FPN.WIDTHS", "[8, 8, 8, 8]",
                         *opts])
    return Detector(build_backbone(cfg)).eval()


def load_and_check(model, path):
    """Load ``path`` into ``model``; every bottom-up tensor comes from the file, and back
    (but BatchNorm's ``num_batches_tracked``, a training counter that is not converted)."""
    checkpoint = torch.load(path, weights_only=True)
    bottom_up = [
        k for k in model.state_dict()
        if k.startswith("backbone.bottom_up.") and not k.endswith("num_batches_tracked")
    ]
    assert set(checkpoint["model"]) == set(bottom_up)
    DetectionCheckpointer(model).load(str(path))
    for key, value in model.state_dict().items():
        if key in checkpoint["model"]:
            assert torch.equal(value, checkpoint["model"][key]), key
    return checkpoint


def test_resnet101_round_trip(tmp_path):
    torch.manual_seed(0)
    resnet = torchvision.models.resnet101(weights=None)
    randomize_batchnorms(resnet)
    resnet.eval()
    source, target = tmp_path / "resnet101.pth", tmp_path / "R-101-tv.pth"
    torch.save(resnet.state_dict(), source)
    arch, count, dropped = convert_file(str(source), str(target))
    assert arch == "resnet"
    classifier = sorted(k for k in dropped if not k.endswith("num_batches_tracked"))
    assert classifier == ["fc.bias", "fc.weight"]
    assert count == len(resnet.state_dict()) - len(dropped)

    model = detector("mask_rcnn_sharp_R101.yaml")
    checkpoint = load_and_check(model, target)
    assert checkpoint["note"].startswith("Converted from torchvision weights")
    assert "INPUT.FORMAT RGB" in checkpoint["note"]
    assert checkpoint["input"] == INPUT_SETTINGS

    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        ours = model.backbone.bottom_up(x)
        y = resnet.maxpool(resnet.relu(resnet.bn1(resnet.conv1(x))))
        for k, layer in enumerate([resnet.layer1, resnet.layer2, resnet.layer3, resnet.layer4]):
            y = layer(y)
            expected = ours[f"res{k + 2}"]
            torch.testing.assert_close(expected, y, rtol=1e-4, atol=1e-5 * float(y.abs().max()))


@pytest.mark.parametrize("batch_norm", [False, True])
def test_vgg16_round_trip(tmp_path, batch_norm):
    """A torchvision vgg16(_bn) state dict: its ``features`` and (small here) ``classifier``."""
    torch.manual_seed(0)
    features = make_layers(torchvision_cfgs["D"], batch_norm=batch_norm)
    randomize_batchnorms(features)
    features.eval()
    classifier = nn.Sequential(nn.Linear(8, 4), nn.ReLU(), nn.Dropout(), nn.Linear(4, 4), nn.ReLU(),
                               nn.Dropout(), nn.Linear(4, 3))
    state = {f"features.{k}": v for k, v in features.state_dict().items()}
    state.update({f"classifier.{k}": v for k, v in classifier.state_dict().items()})
    source, target = tmp_path / "vgg16.pth", tmp_path / "VGG16-tv.pth"
    torch.save(state, source)
    arch, count, dropped = convert_file(str(source), str(target))
    assert arch == "vgg" and count == len(features.state_dict()) - (13 if batch_norm else 0)
    assert sum(k.startswith("classifier.") for k in dropped) == 6

    opts = ["MODEL.VGG.NORM", "BN"] if batch_norm else []
    model = detector("mask_rcnn_sharp_VGG16.yaml", *opts)
    load_and_check(model, target)

    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        ours = model.backbone.bottom_up(x)
        for name, end in model.backbone.bottom_up.stage_ends.items():
            if name in ours:
                torch.testing.assert_close(ours[name], features[: end + 1](x))


def test_cli(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location(
        "convert_torchvision_weights", ROOT / "tools" / "convert_torchvision_weights.py"
    )
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    features = make_layers(torchvision_cfgs["A"], batch_norm=True)  # vgg11_bn: any depth works
    source = tmp_path / "vgg11_bn.pth"
    torch.save({f"features.{k}": v for k, v in features.state_dict().items()}, source)

    assert tool.main([str(source), str(tmp_path / "out.pth")]) == 0
    out = capsys.readouterr().out
    assert "torchvision vgg, 48 tensors" in out and "8 num_batches_tracked counters" in out
    assert "INPUT.FORMAT RGB" in out
    assert sorted(p.name for p in tmp_path.iterdir()) == [  # no temporary file left
        RECORD_NAME, "out.pth", "vgg11_bn.pth"]
    assert (tmp_path / "out.pth").stat().st_mode & 0o777 == 0o644

    assert tool.main([str(source), str(tmp_path / "out.pkl")]) == 1
    assert "the output must end in .pth" in capsys.readouterr().err
    assert tool.main([str(tmp_path / "missing.pth"), str(tmp_path / "x.pth")]) == 1
    assert "missing.pth" in capsys.readouterr().err


def test_unknown_keys_fail():
    with pytest.raises(ValueError, match="unexpected key 'layer1.0.se.fc1.weight'"):
        convert({"layer1.0.conv1.weight": torch.zeros(1), "layer1.0.se.fc1.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="not a torchvision ResNet .* or VGG"):
        convert({"encoder.0.weight": torch.zeros(1)})
    _, converted, _ = convert({"features.0.weight": torch.zeros(1)}, prefix="")
    assert list(converted) == ["features.0.weight"]


@pytest.mark.parametrize("path", TABLE2, ids=lambda p: p.name)
def test_configs_use_torchvision_input_settings(path):
    cfg = add_sharp_fpn_config(get_cfg())
    cfg.merge_from_file(str(path))
    assert len(TABLE2) == 8
    assert cfg.INPUT.FORMAT == INPUT_SETTINGS["INPUT.FORMAT"]
    assert cfg.MODEL.PIXEL_MEAN == INPUT_SETTINGS["MODEL.PIXEL_MEAN"]
    assert cfg.MODEL.PIXEL_STD == INPUT_SETTINGS["MODEL.PIXEL_STD"]
    assert cfg.MODEL.RESNETS.STRIDE_IN_1X1 is INPUT_SETTINGS["MODEL.RESNETS.STRIDE_IN_1X1"]
