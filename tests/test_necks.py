"""The grid necks in detectron2: contract, gradients, GridDecoder's low-resolution reduction,
config keys, and the eight Table 2 configs training and predicting on a tiny synthetic image."""
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from detectron2.config import get_cfg
from detectron2.modeling import build_backbone, build_model
from detectron2.structures import BitMasks, Boxes, Instances
from detectron2.utils.events import EventStorage

import sharp_fpn.d2  # noqa: F401  (registers the builders)
from sharp_fpn.d2.config import add_sharp_fpn_config
from sharp_fpn.grid import FULL_SCALE, UP
from sharp_fpn.models import GridDecoder
from sharp_fpn.d2 import GridFPN

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
TABLE2 = [f"mask_rcnn_{neck}_{bb}.yaml" for bb in ("R101", "VGG16")
          for neck in ("fpn", "2plus", "3plus", "sharp")]
SCHEMES = ("2plus", "3plus", "sharp")
TINY = [  # small enough for CPU tests; the architecture of each config is unchanged
    "MODEL.DEVICE", "cpu",
    "MODEL.FPN.OUT_CHANNELS", 16,
    "MODEL.SHARP_FPN.WIDTHS", [8, 8, 8, 8],
    "MODEL.RPN.PRE_NMS_TOPK_TRAIN", 200, "MODEL.RPN.POST_NMS_TOPK_TRAIN", 50,
    "MODEL.RPN.PRE_NMS_TOPK_TEST", 200, "MODEL.RPN.POST_NMS_TOPK_TEST", 50,
    "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", 32,
    "MODEL.ROI_BOX_HEAD.FC_DIM", 32,
    "MODEL.ROI_MASK_HEAD.CONV_DIM", 8,
    "TEST.DETECTIONS_PER_IMAGE", 10,
]
R18 = ["MODEL.RESNETS.DEPTH", 18, "MODEL.RESNETS.RES2_OUT_CHANNELS", 64]
VGG_C2_C5 = ["MODEL.FPN.IN_FEATURES", ["pool2", "pool3", "pool4", "pool5"]]
BOTTOM_UPS = {
    "resnet": ("build_resnet_grid_fpn_backbone", R18),
    "vgg": ("build_vgg16_grid_fpn_backbone", VGG_C2_C5),
}


def config(name="Base-MaskRCNN-Nuclei.yaml", *opts):
    cfg = add_sharp_fpn_config(get_cfg())
    cfg.merge_from_file(str(CONFIGS / name))
    cfg.merge_from_list([str(x) if not isinstance(x, str) else x for x in [*TINY, *opts]])
    return cfg


def neck(bottom_up, scheme, *opts):
    name, extra = BOTTOM_UPS[bottom_up]
    torch.manual_seed(0)
    cfg = config(
        "Base-MaskRCNN-Nuclei.yaml", "MODEL.BACKBONE.NAME", name, "MODEL.SHARP_FPN.SCHEME", scheme,
        *extra, *opts,
    )
    return build_backbone(cfg)


# ---- the neck's contract with detectron2 -------------------------------------------------------

@pytest.mark.parametrize("bottom_up", ["resnet", "vgg"])
@pytest.mark.parametrize("scheme", SCHEMES)
def test_outputs_strides_channels(bottom_up, scheme):
    backbone = neck(bottom_up, scheme)
    assert isinstance(backbone, GridFPN)
    assert backbone.size_divisibility == 32
    shapes = backbone.output_shape()
    assert list(shapes) == ["p2", "p3", "p4", "p5", "p6"]
    assert [s.stride for s in shapes.values()] == [4, 8, 16, 32, 64]
    assert {s.channels for s in shapes.values()} == {16}
    with torch.no_grad():
        outputs = backbone(torch.randn(2, 3, 64, 96))
    assert list(outputs) == list(shapes)
    for name, t in outputs.items():  # p6 pools p5 (2 x 3) with stride 2: ceil, 1 x 2
        stride = shapes[name].stride
        assert tuple(t.shape) == (2, 16, math.ceil(64 / stride), math.ceil(96 / stride))


@pytest.mark.parametrize("bottom_up", ["resnet", "vgg"])
@pytest.mark.parametrize("scheme", SCHEMES)
def test_gradient_reaches_every_neck_parameter(bottom_up, scheme):
    backbone = neck(bottom_up, scheme, "MODEL.SHARP_FPN.FULL_SCALE", "conv")
    outputs = backbone(torch.randn(2, 3, 64, 64))
    sum(t.square().mean() for t in outputs.values()).backward()
    neck_parameters = [
        (n, p) for n, p in backbone.named_parameters() if not n.startswith("bottom_up.")
    ]
    assert len(neck_parameters) > 20
    for name, p in neck_parameters:
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_layers_follow_the_grid():
    backbone = neck("resnet", "sharp")
    decoder = backbone.decoder
    assert backbone.output_nodes == ((0, 3), (1, 2), (2, 1), (3, 0))  # p2..p5: the anti-diagonal
    assert backbone.output_nodes == backbone.decoder.grid.neck_outputs
    assert [c.in_channels for c in backbone.lateral_convs] == [64, 128, 256, 512]  # R18 C2..C5
    assert [c.out_channels for c in backbone.lateral_convs] == [8] * 4
    # 1x1 projections of decoder nodes, a 3x3 conv on X[3][0] (a lateral only), as FPN's p5
    assert [c.kernel_size for c in backbone.output_convs] == [(1, 1)] * 3 + [(3, 3)]
    assert isinstance(backbone.output_convs[0].norm, torch.nn.GroupNorm)
    assert backbone.output_convs[0].bias is None  # normed convs have no bias, as FPN's
    assert sorted(decoder.blocks) == ["0_1", "0_2", "0_3", "1_1", "1_2", "2_1"]
    assert len(decoder.reductions) == 0  # every width is 8: nothing is wider than its node


def test_unet_scheme_and_f_nodes():
    backbone = neck("resnet", "unet", "MODEL.SHARP_FPN.NODE_OP", "f", "MODEL.SHARP_FPN.NORM", "")
    assert sorted(backbone.decoder.blocks) == ["0_3", "1_2", "2_1"]
    assert backbone.output_convs[0].bias is not None
    with torch.no_grad():
        assert backbone(torch.randn(1, 3, 64, 64))["p2"].shape == (1, 16, 16, 16)


def test_plain_fpn_on_vgg():
    cfg = config("mask_rcnn_fpn_VGG16.yaml")
    backbone = build_backbone(cfg)
    assert type(backbone).__name__ == "FPN" and type(backbone.bottom_up).__name__ == "VGG"
    shapes = backbone.output_shape()
    assert [(k, s.stride, s.channels) for k, s in shapes.items()] == [
        (f"p{k}", 2 ** k, 16) for k in range(2, 7)
    ]


# ---- GridDecoder's reduction of upsampled inputs at their own resolution ------------------------

@pytest.mark.parametrize("mode", ["nearest", "bilinear"])
def test_reduction_before_upsampling_equals_reduction_after(mode):
    """X[0][3] of UNet# reads 1x1-reduced F(u^3 X[3][0]), F(u^2 X[2][1]), u(X[1][2]): reduced at
    the source's size, then upsampled, equal to upsampling then reducing."""
    torch.manual_seed(0)
    channels, widths = (4, 12, 20, 24), (6, 10, 16)
    decoder = GridDecoder(
        "sharp", 3, channels, widths, norm="", upsample_mode=mode, reduce_upsampled=True
    ).eval()
    seen = {}
    decoder.blocks["0_3"].register_forward_pre_hook(lambda m, args: seen.update(x=args[0]))
    features = [torch.randn(1, c, 16 // 2 ** i, 16 // 2 ** i) for i, c in enumerate(channels)]
    with torch.no_grad():
        nodes = decoder(features)
    x = seen["x"]
    node = decoder.grid[(0, 3)]
    assert [(i.source, i.role) for i in node.inputs[3:]] == [
        ((3, 0), FULL_SCALE), ((2, 1), FULL_SCALE), ((1, 2), UP)
    ]
    assert x.shape == (1, 4 + 2 * 6 + 3 * 6, 16, 16)  # X[0][0..2], three reduced to 6
    parts = torch.split(x, [4, 6, 6, 6, 6, 6], dim=1)
    align = True if mode == "bilinear" else None
    for part, source in zip(parts[3:], [(3, 0), (2, 1), (1, 2)]):
        conv = decoder.reductions[f"0_3_from_{source[0]}_{source[1]}"]
        assert conv.kernel_size == (1, 1) and conv.bias is None
        upsampled = F.interpolate(nodes[source], size=(16, 16), mode=mode, align_corners=align)
        torch.testing.assert_close(part, conv(upsampled), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(parts[0], features[0])


def test_reduction_only_where_narrower():
    decoder = GridDecoder("sharp", 3, (4, 12, 20, 24), (6, 10, 16), reduce_upsampled=True)
    # every upsampled edge whose source is wider than the receiving node's width
    assert sorted(decoder.reductions) == [
        "0_1_from_1_0", "0_2_from_1_1", "0_2_from_2_0", "0_3_from_1_2", "0_3_from_2_1",
        "0_3_from_3_0", "1_1_from_2_0", "1_2_from_2_1", "1_2_from_3_0", "2_1_from_3_0",
    ]
    assert decoder.blocks["0_3"].conv1.in_channels == 4 + 5 * 6
    # F = conv keeps its own shared conv: its terms are not reduced; UNet3+ reduces to CatChannels
    conv = GridDecoder("sharp", 3, (4, 12, 20, 24), (6, 10, 16), full_scale="conv",
                       full_scale_channels=4, reduce_upsampled=True)
    assert "0_3_from_3_0" not in conv.reductions and "0_3_from_1_2" in conv.reductions
    three = GridDecoder("3plus", 3, (4, 12, 20, 24), (6, 10, 16), project_channels=4,
                        reduce_upsampled=True)
    assert three.reductions["0_3_from_3_0"].out_channels == 4
    assert three.projections["0_3"][3][0].in_channels == 4


# ---- config keys -------------------------------------------------------------------------------

def test_config_defaults():
    cfg = add_sharp_fpn_config(get_cfg())
    c = cfg.MODEL.SHARP_FPN
    assert (c.SCHEME, c.NODE_OP, c.NORM, c.FULL_SCALE, c.UPSAMPLE, c.REDUCE_UPSAMPLED) == (
        "sharp", "f2", "GN", "upsample", "nearest", True
    )
    assert c.WIDTHS == [96, 128, 256, 256]
    assert (cfg.MODEL.VGG.DEPTH, cfg.MODEL.VGG.NORM) == (16, "")
    assert cfg.MODEL.VGG.OUT_FEATURES == ["pool2", "pool3", "pool4", "pool5"]


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("MODEL.SHARP_FPN.SCHEME", "4plus", "MODEL.SHARP_FPN.SCHEME: expected one of"),
        ("MODEL.SHARP_FPN.NODE_OP", "f3", "MODEL.SHARP_FPN.NODE_OP: expected one of"),
        ("MODEL.SHARP_FPN.NORM", "LayerNorm", "MODEL.SHARP_FPN.NORM: expected one of"),
        ("MODEL.SHARP_FPN.FULL_SCALE", "deconv", "MODEL.SHARP_FPN.FULL_SCALE: expected one of"),
        ("MODEL.SHARP_FPN.UPSAMPLE", "area", "MODEL.SHARP_FPN.UPSAMPLE: expected one of"),
        ("MODEL.SHARP_FPN.WIDTHS", [8, 8, 8], "MODEL.SHARP_FPN.WIDTHS: expected one positive"),
        ("MODEL.VGG.DEPTH", 17, "MODEL.VGG.DEPTH: expected one of \\[11, 13, 16, 19\\]"),
        ("MODEL.VGG.OUT_FEATURES", ["res2"], "MODEL.VGG.OUT_FEATURES: expected stages among"),
    ],
)
def test_bad_values_name_their_key(key, value, message):
    bottom_up = "vgg" if key.startswith("MODEL.VGG") else "resnet"
    with pytest.raises(ValueError, match=message):
        neck(bottom_up, "sharp", key, value)


def test_unknown_key_fails_naming_it(tmp_path):
    cfg = add_sharp_fpn_config(get_cfg())
    path = tmp_path / "typo.yaml"
    path.write_text("MODEL:\n  SHARP_FPN:\n    WIDTH: [8, 8, 8, 8]\n")
    with pytest.raises(KeyError, match="MODEL.SHARP_FPN.WIDTH"):
        cfg.merge_from_file(str(path))
    with pytest.raises(AssertionError, match="MODEL.VGG.DEPHT"):  # yacs's own check
        cfg.merge_from_list(["MODEL.VGG.DEPHT", "16"])


# ---- the eight Table 2 configs: one training step and one inference each -------------------

def synthetic_sample(size=64, seed=0):
    """A 3-channel image with three bright elliptic "nuclei" and their instances."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    image = rng.uniform(0, 40, (3, size, size))
    masks = []
    for cy, cx, ry, rx in [(16, 18, 7, 9), (40, 44, 10, 8), (48, 14, 6, 6)]:
        mask = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
        image[:, mask] += 180
        masks.append(mask)
    masks = torch.from_numpy(np.stack(masks))
    instances = Instances((size, size))
    instances.gt_masks = BitMasks(masks)
    instances.gt_boxes = instances.gt_masks.get_bounding_boxes()
    instances.gt_classes = torch.zeros(len(masks), dtype=torch.int64)
    image = torch.from_numpy(image.clip(0, 255).astype(np.float32))
    return {"image": image, "instances": instances, "height": size, "width": size}


@pytest.mark.parametrize("name", TABLE2)
def test_table2_config_trains_and_predicts(name):
    cfg = config(name)
    assert cfg.INPUT.FORMAT == "RGB" and cfg.MODEL.PIXEL_MEAN == [123.675, 116.28, 103.53]
    torch.manual_seed(0)
    model = build_model(cfg)
    scheme = name.split("_")[2]
    if scheme != "fpn":
        assert model.backbone.decoder.grid.scheme == scheme
    assert type(model.backbone.bottom_up).__name__ == ("VGG" if "VGG" in name else "ResNet")
    sample = synthetic_sample()

    model.train()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    with EventStorage(0):
        losses = model([sample])
    assert set(losses) == {
        "loss_rpn_cls", "loss_rpn_loc", "loss_cls", "loss_box_reg", "loss_mask"
    }
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()
    optimizer.step()

    model.eval()
    with torch.no_grad():
        (output,) = model([{k: sample[k] for k in ("image", "height", "width")}])
    instances = output["instances"]
    assert len(instances) <= 10
    assert instances.pred_masks.shape[1:] == (64, 64)
    assert isinstance(instances.pred_boxes, Boxes)
