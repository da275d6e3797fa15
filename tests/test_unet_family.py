"""The pure-PyTorch UNet family and GridDecoder: parameter counts, shapes, gradients, order."""
import ast
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from sharp_fpn.grid import build_grid
from sharp_fpn.losses import cgm_loss, deep_supervision_loss, mixed_loss
from torch import nn

from sharp_fpn.models import (
    ClassificationGuidedModule,
    GridDecoder,
    GridEncoder,
    GridUNet,
    SegmentationHead,
    SegmentationOutput,
    UpsamplingHead,
    VGGEncoder,
    branch_probabilities,
    count_parameters,
    create_model,
)
from sharp_fpn.models.heads import GlobalAvgMaxPool

ROOT = Path(__file__).resolve().parents[1]


def n_params(model):
    return sum(p.numel() for p in model.parameters())


def meta_model(arch, **kwargs):
    """The model with parameters on the meta device: shapes only, built fast, for counting."""
    with torch.device("meta"):
        return create_model(arch, **kwargs)


@pytest.mark.parametrize(
    "arch, kwargs, expected",
    [
        ("unet", {}, 7_852_545),
        ("wunet", {}, 9_392_916),
        ("unet2plus", {}, 9_163_329),
        ("unet3plus", {}, 6_748_993),
        ("unet_sharp", {}, 10_748_481),
        ("unet_sharp", {"full_scale": "conv"}, 9_716_545),
        ("unet_sharp", {"level": 1}, 103_041),
        ("unet_sharp", {"level": 2}, 555_969),
        ("unet_sharp", {"level": 3}, 2_531_073),
        ("unet2plus", {"deep_supervision": True}, 9_163_329 + 3 * (32 + 1)),
    ],
)
def test_parameter_counts(arch, kwargs, expected):
    assert n_params(meta_model(arch, **kwargs)) == expected


def test_full_scale_conv_is_shared_per_source():
    decoder = create_model("unet_sharp", full_scale="conv").decoder
    assert sorted(decoder.full_scale_convs) == ["2_0", "2_1", "2_2", "3_0", "3_1", "4_0"]
    assert decoder.full_scale_convs["4_0"].weight.shape == (32, 512, 3, 3)
    assert isinstance(decoder.full_scale_norm, torch.nn.BatchNorm2d)
    assert decoder.full_scale_norm.num_features == 32
    # X[0][4]: X[0][0..3] (4 x 32) + three F terms (3 x 32) + u(X[1][3]) (64)
    assert decoder.blocks["0_4"].conv1.in_channels == 4 * 32 + 3 * 32 + 64
    upsample = create_model("unet_sharp").decoder
    assert len(upsample.full_scale_convs) == 0 and upsample.full_scale_norm is None
    assert upsample.blocks["0_4"].conv1.in_channels == 4 * 32 + 512 + 256 + 128 + 64


# one arch per scheme (wunet runs unet's code with other widths)
@pytest.mark.parametrize("arch", ["unet", "unet2plus", "unet3plus", "unet_sharp"])
def test_shapes_and_every_parameter_learns(arch):
    torch.manual_seed(0)
    model = create_model(arch, in_channels=1, classes=2)
    logits = model(torch.randn(2, 1, 16, 16))  # X[4][0] is 1 x 1
    assert logits.shape == (2, 2, 16, 16)
    F.binary_cross_entropy_with_logits(logits, torch.rand_like(logits)).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_full_scale_conv_gradients_reach_shared_convs():
    torch.manual_seed(0)
    model = create_model("unet_sharp", full_scale="conv", level=3)
    logits = model(torch.randn(2, 3, 16, 16))
    F.binary_cross_entropy_with_logits(logits, torch.rand_like(logits)).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert sorted(model.decoder.full_scale_convs) == ["2_0", "2_1", "3_0"]


def test_odd_input_size():
    model = create_model("unet3plus", level=3).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 37, 45)).shape == (1, 1, 37, 45)


def test_deep_supervision_and_pruned_inference():
    torch.manual_seed(0)
    model = create_model("unet_sharp", deep_supervision="top").eval()
    x = torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        outputs = model(x)
        assert [o.shape for o in outputs] == [(1, 1, 16, 16)] * 4
        for k in range(1, 5):
            torch.testing.assert_close(model(x, level=k), outputs[k - 1])
        nodes = model.forward_nodes(x, level=2)
    assert set(nodes) == {(0, 0), (1, 0), (2, 0), (0, 1), (1, 1), (0, 2)}
    assert nodes[(1, 1)].shape == (1, 64, 8, 8)
    assert nodes[(2, 0)].shape == (1, 128, 4, 4)


def test_model_errors():
    with pytest.raises(ValueError, match="only the nested schemes"):
        create_model("unet3plus", deep_supervision="top")
    with pytest.raises(ValueError, match="no head on X\\[0\\]\\[2\\]"):
        create_model("unet_sharp", level=3)(torch.randn(1, 3, 16, 16), level=2)
    with pytest.raises(ValueError, match="unknown arch"):
        create_model("unet4")
    with pytest.raises(ValueError, match="level must be in 1..4"):
        create_model("unet", level=5)
    with pytest.raises(ValueError, match="only applies to 'unet_sharp'"):
        create_model("unet2plus", full_scale="conv")


def test_he_init():
    model = create_model("unet")
    conv = model.encoder.stages[4].conv2  # 512 x 512 x 3 x 3
    expected_std = math.sqrt(2.0 / (512 * 9))
    assert abs(conv.weight.std().item() / expected_std - 1) < 0.01
    assert abs(conv.weight.mean().item()) < 1e-4
    assert torch.count_nonzero(conv.bias) == 0


# ---- GridDecoder with the configurations of a detectron2 neck ---------------------------------

NECK_CHANNELS = (16, 24, 32, 48)


def neck_features(sizes, channels=NECK_CHANNELS):
    return [torch.randn(1, c, h, w) for c, (h, w) in zip(channels, sizes)]


@pytest.mark.parametrize("scheme", ["unet", "2plus", "3plus", "sharp"])
@pytest.mark.parametrize("full_scale", ["upsample", "conv"])
def test_grid_decoder_neck_config(scheme, full_scale):
    torch.manual_seed(0)
    decoder = GridDecoder(
        scheme, 3, NECK_CHANNELS, 8, block="f2", norm="GN", full_scale=full_scale,
        full_scale_channels=4, project_channels=4, upsample_mode="nearest",
    )
    sizes = [(16, 24), (8, 12), (4, 6), (2, 3)]
    nodes = decoder(dict(enumerate(neck_features(sizes))))
    assert set(nodes) == set(build_grid(scheme, 3).positions)
    shapes = [tuple(nodes[p].shape) for p in decoder.grid.decoder_outputs]
    assert shapes == [(1, 48, 2, 3), (1, 8, 4, 6), (1, 8, 8, 12), (1, 8, 16, 24)]
    assert [decoder.node_channels[p] for p in decoder.grid.decoder_outputs] == [48, 8, 8, 8]
    loss = sum(nodes[p].square().mean() for p in decoder.grid.decoder_outputs[1:])
    loss.backward()
    for name, p in decoder.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("scheme", ["unet", "2plus", "3plus", "sharp"])
def test_grid_decoder_non_power_of_two_sizes(scheme):
    decoder = GridDecoder(
        scheme, 3, NECK_CHANNELS, [8, 12, 16], block="f", norm="", upsample_mode="nearest"
    )
    sizes = [(33, 47), (16, 23), (8, 11), (4, 5)]  # floor-pooled odd image
    with torch.no_grad():
        nodes = decoder(neck_features(sizes))
    for (i, j), t in nodes.items():
        assert tuple(t.shape) == (1, NECK_CHANNELS[i] if j == 0 else [8, 12, 16][i], *sizes[i])


def test_grid_decoder_concatenation_order():
    """X[0][2] of UNet# sees cat[X[0][0], X[0][1], F(u^2 X[2][0]), u(X[1][1])], in that order."""
    torch.manual_seed(0)
    decoder = GridDecoder("sharp", 2, (4, 5, 6), (3, 7), norm="", upsample_mode="nearest").eval()
    seen = {}
    decoder.blocks["0_2"].register_forward_pre_hook(lambda m, args: seen.update(x=args[0]))
    features = neck_features([(8, 8), (4, 4), (2, 2)], (4, 5, 6))
    with torch.no_grad():
        nodes = decoder(features)
    x = seen["x"]
    assert x.shape == (1, 4 + 3 + 6 + 7, 8, 8)
    up = lambda t, k: F.interpolate(t, scale_factor=2 ** k, mode="nearest")  # noqa: E731
    parts = torch.split(x, [4, 3, 6, 7], dim=1)
    expected = [features[0], nodes[(0, 1)], up(features[2], 2), up(nodes[(1, 1)], 1)]
    for part, want in zip(parts, expected):
        torch.testing.assert_close(part, want)


def test_grid_decoder_pruned_reads_only_needed_levels():
    decoder = GridDecoder("2plus", 3, NECK_CHANNELS, 8).eval()
    features = neck_features([(16, 16), (8, 8), (4, 4)])  # no level-3 feature at all
    with torch.no_grad():
        nodes = decoder(features, level=2)
    assert set(nodes) == {(0, 0), (1, 0), (2, 0), (0, 1), (1, 1), (0, 2)}


def test_grid_decoder_errors():
    with pytest.raises(ValueError, match="in_channels needs one entry per level 0..3"):
        GridDecoder("sharp", 3, (16, 24, 32), 8)
    with pytest.raises(ValueError, match="widths needs one entry per decoder level 0..2"):
        GridDecoder("sharp", 3, NECK_CHANNELS, (8, 8, 8, 8))
    with pytest.raises(ValueError, match="full_scale must be one of"):
        GridDecoder("sharp", 3, NECK_CHANNELS, 8, full_scale="deconv")
    decoder = GridDecoder("unet", 3, NECK_CHANNELS, 8)
    bad = neck_features([(16, 16), (8, 8), (4, 4), (2, 2)], (16, 24, 33, 48))
    message = "level-2 feature has 33 channels, expected in_channels\\[2\\] = 32"
    with pytest.raises(ValueError, match=message):
        decoder(bad)


def test_models_do_not_import_detectron2():
    for path in (ROOT / "sharp_fpn" / "models").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            )
            assert not any(n.startswith("detectron2") for n in names), path


def test_gridunet_custom_widths():
    model = GridUNet("sharp", in_channels=3, classes=3, channels=(8, 16, 24), norm="GN")
    assert model.depth == 2
    assert model(torch.randn(1, 3, 16, 16)).shape == (1, 3, 16, 16)


# ---- deep supervision, pruning, classification-guided modules (SPEC section 2) ----------------


def conv(c_in, k, classes=1):
    """Parameters of a k x k conv head with bias: C * k * k * classes + classes."""
    return c_in * k * k * classes + classes


def light_cgm(c):
    """BatchNorm1d(2C) (weight, bias) + Linear(2C, 2)."""
    return 2 * 2 * c + (2 * c * 2 + 2)


def heavy_cgm(c):
    """BatchNorm1d(2C) + Linear(2C, C) + BatchNorm1d(C) + Linear(C, 2) (hidden width C)."""
    return 2 * 2 * c + (2 * c * c + c) + 2 * c + (c * 2 + 2)


# decoder-branch heads X[4][0], X[3][1], X[2][2], X[1][3] (3x3) and top-row X[0][1..3] (1x1)
DECODER_HEADS = conv(512, 3) + conv(256, 3) + conv(128, 3) + conv(64, 3)
TOP_HEADS = 3 * conv(32, 1)


@pytest.mark.parametrize(
    "arch, kwargs, expected",
    [
        ("unet", {"deep_supervision": True}, 7_852_545 + DECODER_HEADS),
        (
            "wunet",
            {"deep_supervision": True},
            9_392_916 + conv(560, 3) + conv(280, 3) + conv(140, 3) + conv(70, 3),
        ),
        ("unet2plus", {"deep_supervision": "all"}, 9_163_329 + TOP_HEADS + DECODER_HEADS),
        # UNet3+'s decoder nodes are 5 * 32 = 160 wide; its heads are all 3x3
        ("unet3plus", {"deep_supervision": True}, 6_748_993 + conv(512, 3) + 3 * conv(160, 3)),
        ("unet_sharp", {"deep_supervision": True}, 10_748_481 + TOP_HEADS + DECODER_HEADS),
        ("unet_sharp", {"deep_supervision": "top"}, 10_748_481 + TOP_HEADS),
        ("unet_sharp", {"deep_supervision": "decoder"}, 10_748_481 + DECODER_HEADS),
        (
            "unet_sharp",
            {"deep_supervision": True, "full_scale": "conv"},
            9_716_545 + TOP_HEADS + DECODER_HEADS,
        ),
        (
            "unet_sharp",
            {"deep_supervision": True, "level": 3},
            2_531_073 + 2 * conv(32, 1) + conv(256, 3) + conv(128, 3) + conv(64, 3),
        ),
        (
            "unet_sharp",
            {"deep_supervision": True, "classes": 2},
            10_748_481 - conv(32, 1) + 4 * conv(32, 1, 2)
            + conv(512, 3, 2) + conv(256, 3, 2) + conv(128, 3, 2) + conv(64, 3, 2),
        ),
        ("unet_sharp", {"deep_supervision": True, "head_relu": True}, 10_757_224),
        # CGM: heavy on X[4][0], X[3][1]; light on X[2][2], X[1][3], X[0][1..4]
        (
            "unet_sharp",
            {"deep_supervision": True, "cgm": True},
            10_757_224 + heavy_cgm(512) + heavy_cgm(256) + light_cgm(128) + light_cgm(64)
            + 4 * light_cgm(32),
        ),
        ("unet", {"cgm": True}, 7_852_545 + light_cgm(32)),
        (
            "unet3plus",
            {"deep_supervision": True, "cgm": True},
            6_757_925 + heavy_cgm(512) + heavy_cgm(160) + 2 * light_cgm(160) + light_cgm(160),
        ),
    ],
)
def test_parameter_counts_with_heads(arch, kwargs, expected):
    assert count_parameters(meta_model(arch, **kwargs)) == expected


def expected_branches(scheme, depth):
    """Top row X[0][1..L-1] (nested schemes), decoder branches deepest first, final last."""
    top = [(0, j) for j in range(1, depth)] if scheme in ("2plus", "sharp") else []
    decoder = [(depth - j, j) for j in range(depth)] if scheme != "2plus" else []
    return top + decoder + [(0, depth)]


@pytest.mark.parametrize(
    "arch, level",
    [("unet", 4), ("unet", 1), ("wunet", 2), ("unet2plus", 4), ("unet2plus", 2)]
    + [("unet3plus", 4), ("unet3plus", 2)]
    + [("unet_sharp", k) for k in (1, 2, 3, 4)],
)
def test_branch_order_and_shapes(arch, level):
    torch.manual_seed(0)
    model = create_model(arch, in_channels=1, classes=2, deep_supervision=True, level=level)
    assert list(model.branches) == expected_branches(model.scheme, level)
    with torch.no_grad():
        outputs = model.eval()(torch.randn(2, 1, 16, 16))
    assert [tuple(o.shape) for o in outputs] == [
        (2, 2, 16 >> i, 16 >> i) for i, _ in model.branches
    ]


def test_unet_sharp_has_the_papers_eight_branches():
    model = meta_model("unet_sharp", deep_supervision=True)
    assert model.branches == ((0, 1), (0, 2), (0, 3), (4, 0), (3, 1), (2, 2), (1, 3), (0, 4))
    kernels = {key: head.conv.kernel_size for key, head in model.heads.items()}
    assert kernels == {
        "0_1": (1, 1), "0_2": (1, 1), "0_3": (1, 1), "0_4": (1, 1),
        "4_0": (3, 3), "3_1": (3, 3), "2_2": (3, 3), "1_3": (3, 3),
    }


def test_head_relu():
    torch.manual_seed(0)
    model = create_model("unet_sharp", deep_supervision=True, level=2, head_relu=True).eval()
    with torch.no_grad():
        outputs = model(torch.randn(1, 3, 16, 16))
    assert all((o >= 0).all() for o in outputs)
    assert any((o == 0).any() for o in outputs)  # the ReLU clamps some logits


def trained_bn_statistics(model, x):
    """One train-mode forward, so BatchNorm running statistics differ from their init."""
    model.train()
    with torch.no_grad():
        model(x)
    return model.eval()


@pytest.mark.parametrize(
    "arch, kwargs, counts",
    [
        ("unet_sharp", {}, (103_041, 555_969, 2_531_073)),
        ("unet_sharp", {"full_scale": "conv"}, None),
        ("unet2plus", {}, None),
    ],
)
def test_pruned_network_equals_full_branch(arch, kwargs, counts):
    torch.manual_seed(0)
    model = create_model(arch, deep_supervision=True, **kwargs)
    x = torch.randn(2, 3, 16, 16)
    model = trained_bn_statistics(model, x)
    with torch.no_grad():
        outputs = model(x)
    for k in (1, 2, 3):
        pruned = model.prune(k)
        isolated = meta_model(arch, level=k, **kwargs)
        # the same network as isolated training builds: one 1x1 head, on X[0][k]
        assert count_parameters(pruned) == count_parameters(isolated)
        if counts is not None:
            assert count_parameters(pruned) == counts[k - 1]
        assert set(pruned.decoder.grid.positions) == {
            (i, j) for i in range(k + 1) for j in range(k + 1) if i + j <= k
        }
        assert list(pruned.heads) == [f"0_{k}"] and not pruned.training
        with torch.no_grad():
            assert set(pruned.forward_nodes(x)) == set(pruned.decoder.grid.positions)
            assert torch.equal(pruned(x), outputs[model.branches.index((0, k))])
    # a copy: training the pruned network leaves the full one alone
    pruned = model.prune(2)
    with torch.no_grad():
        pruned.heads["0_2"].conv.bias.add_(1.0)
    assert not torch.equal(pruned.heads["0_2"].conv.bias, model.heads["0_2"].conv.bias)
    assert model.prune(1).train().training and model.train().prune(1).training


def test_pruned_network_with_cgm():
    torch.manual_seed(0)
    model = create_model("unet_sharp", deep_supervision=True, cgm=True)
    x = torch.randn(2, 3, 16, 16)
    model = trained_bn_statistics(model, x)
    with torch.no_grad():
        full = model(x)
        index = model.branches.index((0, 2))
        pruned = model.prune(2)
        out = pruned(x)
    assert isinstance(out, SegmentationOutput) and out.branches == ((0, 2),)
    assert count_parameters(pruned) == 555_969 + light_cgm(32)
    assert torch.equal(out.logits[0], full.logits[index])
    assert torch.equal(out.has_object[0], full.has_object[index])


def test_pruning_errors():
    with pytest.raises(ValueError, match="pruning needs a nested scheme"):
        create_model("unet3plus", deep_supervision=True).prune(2)
    with pytest.raises(ValueError, match="X\\[0\\]\\[2\\] has no head"):
        create_model("unet_sharp", deep_supervision="decoder", level=3).prune(2)
    with pytest.raises(ValueError, match="deep_supervision must be a bool or one of"):
        create_model("unet_sharp", deep_supervision="middle")


def cgm_structure(module):
    return [type(m).__name__ for m in module]


def test_cgm_heavy_and_light():
    model = meta_model("unet_sharp", deep_supervision=True, cgm=True)
    heavy = ["GlobalAvgMaxPool", "BatchNorm1d", "Dropout", "Linear", "ReLU", "BatchNorm1d",
             "Dropout", "Linear"]
    light = ["GlobalAvgMaxPool", "BatchNorm1d", "Dropout", "Linear"]
    structures = {key: cgm_structure(m) for key, m in model.cgms.items()}
    assert structures == {
        "4_0": heavy, "3_1": heavy,
        "2_2": light, "1_3": light, "0_1": light, "0_2": light, "0_3": light, "0_4": light,
    }
    assert model.cgms["4_0"][3].in_features == 2 * 512
    assert model.cgms["4_0"].classifier.out_features == 2
    x = torch.arange(2 * 3 * 4, dtype=torch.float32).view(2, 3, 2, 2)
    torch.testing.assert_close(
        GlobalAvgMaxPool()(x), torch.cat([x.mean((2, 3)), x.amax((2, 3))], 1)
    )


def force_decision(cgm, has_object):
    """Make a CGM answer "has object" (or "empty") for every image: zero weights, biased."""
    with torch.no_grad():
        cgm.classifier.weight.zero_()
        cgm.classifier.bias.copy_(torch.tensor([-5.0, 5.0] if has_object else [5.0, -5.0]))


def test_cgm_gating():
    torch.manual_seed(0)
    model = GridUNet("sharp", 3, 1, (4, 8, 16), deep_supervision="all", cgm=True).eval()
    assert model.branches == ((0, 1), (2, 0), (1, 1), (0, 2))
    for key, cgm in model.cgms.items():
        force_decision(cgm, has_object=key != "1_1")
    with torch.no_grad():
        out = model(torch.randn(2, 3, 16, 16))
    assert [tuple(c.shape) for c in out.has_object] == [(2, 2)] * 4
    gated, raw = out.probabilities(), out.probabilities(gated=False)
    for position, g, r, logits in zip(out.branches, gated, raw, out.logits):
        torch.testing.assert_close(r, torch.sigmoid(logits))
        if position == (1, 1):  # its classifier says "empty": the branch predicts background
            assert torch.count_nonzero(g) == 0 and torch.count_nonzero(r) > 0
        else:
            assert torch.equal(g, r)
    # the gate is per image
    logits = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    assert ClassificationGuidedModule.gate(logits).flatten().tolist() == [1.0, 0.0]


def toy_batch(n=4, size=16):
    """Images whose bright squares are the foreground; odd images have none."""
    torch.manual_seed(1)
    target = torch.zeros(n, 1, size, size)
    for k in range(0, n, 2):
        target[k, :, 2 + k : 8 + k, 3 : 9 + k] = 1
    image = 0.2 * torch.randn(n, 3, size, size) + 2 * target
    return image, target


def test_cgm_learns():
    """UNet3+'s official CGM had no loss and never learned; this one must."""
    torch.manual_seed(0)
    model = GridUNet("sharp", 3, 1, (4, 8, 16), deep_supervision="all", cgm=True)
    image, target = toy_batch()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(12):
        optimizer.zero_grad()
        out = model(image)
        loss = cgm_loss(out.has_object, target)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses
    with torch.no_grad():  # inference: running statistics, no dropout
        decisions = [g.flatten().tolist() for g in model.eval()(image).gates()]
    assert decisions == [[1.0, 0.0, 1.0, 0.0]] * 4


@pytest.mark.parametrize("arch", ["unet", "wunet", "unet2plus", "unet3plus", "unet_sharp"])
def test_training_step_with_deep_supervision_mixed_loss_and_cgm(arch):
    """One Adam step of the paper's recipe. Two images: BatchNorm1d (CGM) needs N > 1."""
    torch.manual_seed(0)
    model = create_model(arch, deep_supervision=True, cgm=True)
    image, target = toy_batch(n=2, size=32)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, weight_decay=1e-4)
    out = model(image)
    assert len(out.logits) == len(model.branches) == len(out.has_object)
    loss = deep_supervision_loss(out.logits, target, loss=mixed_loss)
    loss = loss + cgm_loss(out.has_object, target)
    assert torch.isfinite(loss)
    loss.backward()
    optimizer.step()
    for name, p in model.named_parameters():
        assert torch.isfinite(p.grad).all(), name
        assert not torch.equal(p.detach(), before[name]), name


def test_batch_of_one_without_cgm():
    """A 1x3x32x32 batch trains with deep supervision (no CGM: BatchNorm1d needs N > 1)."""
    torch.manual_seed(0)
    model = create_model("unet_sharp", deep_supervision=True)
    image, target = toy_batch(n=2, size=32)
    loss = deep_supervision_loss(model(image[:1]), target[:1], mode="upsample")
    loss.backward()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize("cgm", [False, True])
def test_predict_probabilities_is_the_gated_final_branch(cgm):
    torch.manual_seed(0)
    model = GridUNet("sharp", 3, 1, (4, 8, 16), deep_supervision="all", cgm=cgm).eval()
    if cgm:  # X[0][1] says "empty", X[0][2] "has object"
        force_decision(model.cgms["0_1"], has_object=False)
        force_decision(model.cgms["0_2"], has_object=True)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        out = model(x)
        final = model.predict_probabilities(x)
        level1 = model.predict_probabilities(x, level=1)
    logits = out.logits if cgm else out
    torch.testing.assert_close(final, torch.sigmoid(logits[-1]), rtol=0, atol=0)
    if cgm:
        assert torch.count_nonzero(level1) == 0
    else:
        torch.testing.assert_close(level1, torch.sigmoid(logits[0]), rtol=0, atol=0)
    assert final.shape == (2, 1, 16, 16)


def test_predict_probabilities_exports():
    """torch.export traces the inference of a pruning level, CGM gate included."""
    torch.manual_seed(0)
    model = GridUNet("sharp", 3, 1, (4, 8, 16), deep_supervision="top", cgm=True).eval()

    class Level1(nn.Module):
        def __init__(self, network):
            super().__init__()
            self.network = network

        def forward(self, x):
            return self.network.predict_probabilities(x, level=1)

    x = torch.randn(2, 3, 16, 16)
    exported = torch.export.export(Level1(model), (x,))
    with torch.no_grad():
        torch.testing.assert_close(exported.module()(x), model.predict_probabilities(x, 1))


def test_segmentation_output_probabilities_are_branch_probabilities():
    torch.manual_seed(0)
    logits = [torch.randn(2, 1, 4, 4), torch.randn(2, 1, 8, 8)]
    has_object = [torch.tensor([[0.0, 1.0], [1.0, 0.0]]), torch.tensor([[0.0, 1.0], [0.0, 1.0]])]
    out = SegmentationOutput(logits, has_object, ((1, 0), (0, 1)))
    gated = out.probabilities()
    torch.testing.assert_close(gated[0][0], torch.sigmoid(logits[0][0]))
    assert torch.count_nonzero(gated[0][1]) == 0  # image 1: "no object"
    for g, x, c in zip(gated, logits, has_object):
        assert torch.equal(g, branch_probabilities(x, c))
    without_cgm = SegmentationOutput(logits, [], ((1, 0), (0, 1)))
    assert all(torch.equal(p, torch.sigmoid(x)) for p, x in zip(without_cgm.probabilities(), logits))


# ---- one model for every encoder: a level 0 below full resolution --------------------------------


class StridedEncoder(GridEncoder):
    """A small encoder whose level 0 is at stride 2 (as a detectron2 bottom-up's stride 4):
    one stride-2 conv3x3-ReLU per level."""

    def __init__(self, channels=(6, 8, 10)):
        super().__init__()
        self.in_channels, self.channels, self.stride = 3, tuple(channels), 2
        widths_in = (3,) + self.channels[:-1]
        self.stages = nn.ModuleList(
            nn.Conv2d(a, b, 3, stride=2, padding=1) for a, b in zip(widths_in, channels)
        )

    def forward(self, x, depth=None):
        features = []
        for stage in self.stages[: (self.depth if depth is None else depth) + 1]:
            x = torch.relu(stage(x))
            features.append(x)
        return features

    def truncated(self, depth):
        return StridedEncoder(self.channels[: depth + 1])


def strided_model(**kwargs):
    torch.manual_seed(0)
    options = dict(widths=(4, 6), upsample_widths=(3,), deep_supervision="all", cgm=True)
    return GridUNet("sharp", encoder=StridedEncoder(), **{**options, **kwargs})


def test_heads_follow_the_encoders_stride():
    model = strided_model()
    assert model.size_divisibility == 2 * 2**2 and model.in_channels == 3
    assert model.branches == ((0, 1), (2, 0), (1, 1), (0, 2))
    kinds = {key: type(head).__name__ for key, head in model.heads.items()}
    # the final node: to full resolution; the top row (1x1) and decoder branches (3x3) at
    # their own resolution
    assert kinds == {"0_1": "SegmentationHead", "0_2": "UpsamplingHead",
                     "2_0": "SegmentationHead", "1_1": "SegmentationHead"}
    assert model.heads["1_1"].conv.kernel_size == (3, 3)
    assert model.heads["0_1"].conv.kernel_size == (1, 1)
    x = torch.randn(2, 3, 16, 16)
    out = trained_bn_statistics(model, x)(x)
    assert [tuple(t.shape[-2:]) for t in out.logits] == [(8, 8), (2, 2), (4, 4), (16, 16)]
    vgg = create_model("unet_sharp", deep_supervision=True, level=2)
    assert all(isinstance(h, SegmentationHead) for h in vgg.heads.values())
    assert vgg.size_divisibility == 4 and vgg.encoder.stride == 1


def test_predict_probabilities_of_a_strided_encoder():
    model = strided_model()
    x = torch.randn(2, 3, 16, 16)
    model = trained_bn_statistics(model, x)
    force_decision(model.cgms["0_2"], has_object=True)
    force_decision(model.cgms["0_1"], has_object=False)
    with torch.no_grad():
        out = model(x)
        final = model.predict_probabilities(x)
        level1 = model.predict_probabilities(x, level=1)
        odd = model.predict_probabilities(torch.randn(1, 3, 13, 11))
    torch.testing.assert_close(final, branch_probabilities(out.logits[-1], out.has_object[-1]))
    torch.testing.assert_close(final, torch.sigmoid(out.logits[-1]))  # its CGM: "has object"
    assert torch.count_nonzero(level1) == 0 and level1.shape == (2, 1, 16, 16)
    assert odd.shape == (1, 1, 13, 11)  # at the input's resolution


def test_prune_a_strided_encoder_network():
    model = strided_model()
    x = torch.randn(2, 3, 16, 16)
    model = trained_bn_statistics(model, x)
    with torch.no_grad():
        full = model(x)
        pruned = model.prune(1)
        out = pruned(x)
    # X[0][1] keeps its trained head at stride 2 (isolated training would end upsampling)
    isolated = GridUNet("sharp", encoder=StridedEncoder((6, 8)), widths=(4,),
                        upsample_widths=(3,), cgm=True)
    assert isinstance(isolated.heads["0_1"], UpsamplingHead)
    assert isinstance(pruned.heads["0_1"], SegmentationHead) and pruned.branches == ((0, 1),)
    full_state = model.state_dict()
    assert all(torch.equal(t, full_state[k]) for k, t in pruned.state_dict().items())
    index = model.branches.index((0, 1))
    assert torch.equal(out.logits[0], full.logits[index])
    assert torch.equal(out.has_object[0], full.has_object[index])
    with torch.no_grad():
        assert torch.equal(pruned.predict_probabilities(x), model.predict_probabilities(x, 1))


def test_encoder_arguments():
    encoder = VGGEncoder(1, (4, 8, 16), "GN")
    assert (encoder.in_channels, encoder.channels, encoder.stride, encoder.depth) == (
        1, (4, 8, 16), 1, 2
    )
    truncated = encoder.truncated(1)
    assert truncated.channels == (4, 8) and set(truncated.state_dict()) < set(encoder.state_dict())
    model = GridUNet("2plus", encoder=encoder)
    assert model.channels == (4, 8, 16) and model.decoder.widths == [4, 8]
    with pytest.raises(ValueError, match="either an encoder or in_channels/channels"):
        GridUNet("2plus", channels=(4, 8, 16), encoder=encoder)
    with pytest.raises(ValueError, match="one width per doubling from the encoder's stride 2"):
        GridUNet("2plus", encoder=StridedEncoder(), widths=(4, 6))
