"""The pure-PyTorch UNet family and GridDecoder: parameter counts, shapes, gradients, order."""
import ast
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from sharp_fpn.grid import build_grid
from sharp_fpn.models import GridDecoder, GridUNet, create_model

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny convs run fastest single-threaded, especially on a shared machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def n_params(model):
    return sum(p.numel() for p in model.parameters())


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
    assert n_params(create_model(arch, **kwargs)) == expected


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
