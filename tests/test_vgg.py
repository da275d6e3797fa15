"""The VGG bottom-up: torchvision's layout and values, stages, truncation, freezing, errors."""
import pytest
import torch
from detectron2.config import get_cfg
from detectron2.layers import FrozenBatchNorm2d
from torchvision.models.vgg import cfgs as torchvision_cfgs
from torchvision.models.vgg import make_layers

from sharp_fpn.d2.config import add_sharp_fpn_config
from sharp_fpn.d2.vgg import VGG, build_vgg_backbone

TORCHVISION_CFG = {11: "A", 13: "B", 16: "D", 19: "E"}
STRIDES = {"pool1": 2, "pool2": 4, "pool3": 8, "pool4": 16, "pool5": 32}
CHANNELS = {"pool1": 64, "pool2": 128, "pool3": 256, "pool4": 512, "pool5": 512}


def torchvision_features(depth=16, batch_norm=False, seed=0):
    """torchvision's ``vgg{depth}[_bn]().features``, random, with non-trivial BN statistics."""
    torch.manual_seed(seed)
    features = make_layers(torchvision_cfgs[TORCHVISION_CFG[depth]], batch_norm=batch_norm)
    for m in features.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            torch.nn.init.uniform_(m.weight, 0.5, 1.5)
            torch.nn.init.uniform_(m.bias, -0.2, 0.2)
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    return features.eval()


@pytest.mark.parametrize("norm, pools", [("", [4, 9, 16, 23, 30]), ("BN", [6, 13, 23, 33, 43])])
def test_vgg16_pools_at_torchvision_indices(norm, pools):
    vgg = VGG(16, norm, out_features=list(STRIDES))
    assert vgg.stage_ends == dict(zip(STRIDES, pools))
    assert all(isinstance(vgg.features[i], torch.nn.MaxPool2d) for i in pools)
    assert len(vgg.features) == pools[-1] + 1
    shapes = vgg.output_shape()
    assert {k: s.stride for k, s in shapes.items()} == STRIDES
    assert {k: s.channels for k, s in shapes.items()} == CHANNELS


@pytest.mark.parametrize("depth", [11, 13, 16, 19])
@pytest.mark.parametrize("batch_norm", [False, True])
def test_state_dict_is_torchvisions(depth, batch_norm):
    ours = VGG(depth, "BN" if batch_norm else "", out_features=["pool5"]).state_dict()
    theirs = make_layers(torchvision_cfgs[TORCHVISION_CFG[depth]], batch_norm).state_dict()
    expected = {f"features.{k}": v.shape for k, v in theirs.items()}
    assert {k: v.shape for k, v in ours.items()} == expected


@pytest.mark.parametrize("batch_norm", [False, True])
def test_features_equal_torchvisions_at_the_pools(batch_norm):
    features = torchvision_features(16, batch_norm)
    vgg = VGG(16, "BN" if batch_norm else "", out_features=list(STRIDES)).eval()
    vgg.load_state_dict({f"features.{k}": v for k, v in features.state_dict().items()})
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        outputs = vgg(x)
        expected, start = {}, 0
        for name, end in vgg.stage_ends.items():
            x = features[start : end + 1](x)
            expected[name], start = x, end + 1
    assert list(outputs) == list(STRIDES)
    for name, t in outputs.items():
        assert t.shape == (2, CHANNELS[name], 64 // STRIDES[name], 64 // STRIDES[name])
        torch.testing.assert_close(t, expected[name])


def test_only_layers_up_to_the_last_stage_exist():
    vgg = VGG(16, out_features=["pool2", "pool3"])
    assert len(vgg.features) == 17  # features[0..16], pool3 at 16
    outputs = vgg(torch.randn(1, 3, 33, 47))
    assert list(outputs) == ["pool2", "pool3"]
    assert outputs["pool3"].shape == (1, 256, 4, 5)  # sizes floored, as torchvision's


def test_freeze_at_two_freezes_up_to_stride_4():
    vgg = VGG(16, "BN", out_features=["pool2", "pool5"], freeze_at=2)
    frozen = {i for i, m in enumerate(vgg.features) for p in m.parameters() if not p.requires_grad}
    trainable = {i for i, m in enumerate(vgg.features) for p in m.parameters() if p.requires_grad}
    assert frozen == {0, 3, 7, 10}  # the convs up to pool2 (index 13); FrozenBN has buffers only
    assert min(trainable) == 14
    frozen_norms = [i for i, m in enumerate(vgg.features) if isinstance(m, FrozenBatchNorm2d)]
    assert frozen_norms == [1, 4, 8, 11]
    assert isinstance(vgg.features[15], torch.nn.BatchNorm2d)
    outputs = vgg(torch.randn(2, 3, 32, 32))
    outputs["pool5"].sum().backward()
    assert vgg.features[0].weight.grad is None and vgg.features[14].weight.grad is not None


def test_freeze_past_the_last_stage_freezes_all():
    vgg = VGG(16, out_features=["pool2"], freeze_at=5)
    assert not any(p.requires_grad for p in vgg.parameters())


def test_build_from_config():
    cfg = add_sharp_fpn_config(get_cfg())
    cfg.MODEL.VGG.NORM = "FrozenBN"
    cfg.MODEL.BACKBONE.FREEZE_AT = 0
    vgg = build_vgg_backbone(cfg)
    assert list(vgg.output_shape()) == ["pool2", "pool3", "pool4", "pool5"]
    assert isinstance(vgg.features[1], FrozenBatchNorm2d)


def test_errors():
    with pytest.raises(ValueError, match="depth must be one of \\[11, 13, 16, 19\\]"):
        VGG(17)
    with pytest.raises(ValueError, match="out_features must be among"):
        VGG(16, out_features=["res2"])
    with pytest.raises(ValueError, match="freeze_at must be in 0..5"):
        VGG(16, freeze_at=6)
    with pytest.raises(ValueError, match="takes an \\(N, C, H, W\\) input"):
        VGG(16)(torch.randn(3, 32, 32))
