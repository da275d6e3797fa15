"""The 3-D V-Net family: the UNet family's grid built with ``dims=3`` (Table 1's 3-D column).

Parameter counts are taken on the meta device (no memory, no init cost); everything that runs
uses tiny widths on 16^3 volumes.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

from sharp_fpn.losses import cgm_loss, deep_supervision_loss, mixed_loss
from sharp_fpn.models import GridUNet, count_parameters, create_model
from sharp_fpn.models.blocks import resample
from sharp_fpn.models.heads import ClassificationGuidedModule, GlobalAvgMaxPool
from sharp_fpn.models.unet import (
    ALL_ARCHS,
    ARCHS,
    VNET_ARCHS,
    VNET_CHANNELS,
    VNET_PARAMETER_TABLE,
    WIDE_VNET_CHANNELS,
)

TINY = (4, 8, 16, 32)  # levels 0..3: a 16^3 volume is 2^3 at the bottom


def _meta_count(arch: str, **kwargs) -> int:
    with torch.device("meta"):
        return count_parameters(create_model(arch, **kwargs))


def test_vnet_archs_are_the_3d_rows_of_table1():
    assert tuple(VNET_ARCHS) == ("vnet", "wvnet", "vnet2plus", "vnet3plus", "vnet_sharp")
    assert tuple(VNET_PARAMETER_TABLE) == tuple(VNET_ARCHS)
    assert [VNET_ARCHS[a].scheme for a in VNET_ARCHS] == [
        "unet", "unet", "2plus", "3plus", "sharp"
    ]
    assert VNET_ARCHS["wvnet"].channels == WIDE_VNET_CHANNELS == (18, 36, 72, 144, 288)
    for arch, spec in VNET_ARCHS.items():
        assert (spec.dims, spec.kernel_size, spec.in_channels) == (3, 5, 1)
        if arch != "wvnet":
            assert spec.channels == VNET_CHANNELS == (16, 32, 64, 128, 256)
    # 2-D callers list ARCHS only; create_model builds both
    assert all(spec.dims == 2 for spec in ARCHS.values()) and not set(ARCHS) & set(VNET_ARCHS)
    assert ALL_ARCHS == {**ARCHS, **VNET_ARCHS}


@pytest.mark.parametrize("arch", VNET_ARCHS)
def test_vnet_parameter_counts_match_the_table(arch):
    paper, ours = VNET_PARAMETER_TABLE[arch]
    assert _meta_count(arch) == ours
    assert 20 < paper < 40  # millions, as Table 1 prints them


def test_vnet_parameter_table_values():
    ours = {a: n for a, (_, n) in VNET_PARAMETER_TABLE.items()}
    assert ours == {
        "vnet": 27_238_433,
        "wvnet": 34_472_737,
        "vnet2plus": 31_783_489,
        "vnet3plus": 23_401_057,
        "vnet_sharp": 37_287_489,
    }
    # V-Net and WV-Net: 3.2 % above the paper, the same ratio at both widths
    for arch in ("vnet", "wvnet"):
        paper, count = VNET_PARAMETER_TABLE[arch]
        assert count / (paper * 1e6) == pytest.approx(1.032, abs=0.001)
    # deep supervision and the conv full-scale op, as the docstring's table
    assert _meta_count("vnet", deep_supervision=True) == 27_251_397
    assert _meta_count("vnet_sharp", deep_supervision=True) == 37_300_504
    assert _meta_count("vnet_sharp", full_scale="conv") == 35_623_745


def _count_3d(scheme: str, kernel_size: int, **kwargs) -> int:
    with torch.device("meta"):
        model = GridUNet(
            scheme, 1, 1, VNET_CHANNELS, dims=3, kernel_size=kernel_size, **kwargs
        )
        return count_parameters(model)


def test_the_paper_gaps_between_rows():
    """The module docstring's reasons why no node definition reproduces the five counts."""
    # V-Net2+ - V-Net = 0.98M: UNet++'s extra nodes with two 3x3x3 convs, 3/4 of the 2-D gap
    gap3 = _count_3d("2plus", 3) - _count_3d("unet", 3)
    gap2 = count_parameters(create_model("unet2plus")) - count_parameters(create_model("unet"))
    assert (gap3, gap2) == (982_560, 1_310_784)
    assert gap3 == pytest.approx(0.75 * gap2, rel=1e-3)
    assert round(gap3 / 1e6, 2) == round(27.37 - 26.39, 2)
    assert _count_3d("2plus", 5) - _count_3d("unet", 5) == 4_545_056
    # V-Net# - V-Net2+ = 1.00M: neither full-scale op
    assert _count_3d("sharp", 3) - _count_3d("2plus", 3) == 1_188_864
    assert _count_3d("sharp", 3, full_scale="conv") - _count_3d("2plus", 3) == 829_696
    assert _count_3d("sharp", 5) - _count_3d("2plus", 5) == 5_504_000
    # V-Net3+ - V-Net = 1.45M: the official UNet3+ design is smaller than UNet in 3-D
    assert _count_3d("3plus", 3) - _count_3d("unet", 3) == -826_816
    assert _count_3d("3plus", 5) - _count_3d("unet", 5) == -3_837_376


def test_vnet_blocks_are_3d():
    with torch.device("meta"):
        model = create_model("vnet_sharp", deep_supervision=True, cgm=True)
    kinds = {type(m) for m in model.modules()}
    assert nn.Conv2d not in kinds and nn.BatchNorm2d not in kinds and nn.MaxPool2d not in kinds
    assert {nn.Conv3d, nn.BatchNorm3d, nn.MaxPool3d} <= kinds
    assert model.dims == 3 and model.in_channels == 1
    assert model.encoder.stages[0].conv1.kernel_size == (5, 5, 5)
    assert model.decoder.blocks["0_4"].conv2.kernel_size == (5, 5, 5)
    assert model.heads["0_4"].conv.kernel_size == (1, 1, 1)
    assert model.heads["4_0"].conv.kernel_size == (3, 3, 3)


def test_2d_default_unchanged():
    model = create_model("unet")
    assert model.dims == 2 and model.in_channels == 3
    assert count_parameters(model) == 7_852_545
    assert not any(isinstance(m, (nn.Conv3d, nn.BatchNorm3d)) for m in model.modules())


@pytest.mark.parametrize("scheme", ["unet", "2plus", "3plus", "sharp"])
def test_3d_forward_shapes(scheme):
    torch.manual_seed(0)
    model = GridUNet(scheme, 1, 2, TINY, dims=3, kernel_size=5, deep_supervision=True).eval()
    x = torch.randn(1, 1, 16, 16, 16)
    with torch.no_grad():
        out = model(x)
        probabilities = model.predict_probabilities(x)
    for logits, (i, _) in zip(out, model.branches):
        side = 16 if (i, _) not in model.decoder.grid.decoder_branches else 16 // 2**i
        assert logits.shape == (1, 2, side, side, side)
    assert probabilities.shape == (1, 2, 16, 16, 16)


def test_3d_odd_volume_resampled():
    model = GridUNet("sharp", 1, 1, TINY, dims=3).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 1, 12, 17, 10)).shape == (1, 1, 12, 17, 10)


def test_pruned_3d_equals_full_branch():
    torch.manual_seed(0)
    model = GridUNet(
        "sharp", 1, 1, TINY, dims=3, kernel_size=5, deep_supervision="all", cgm=True,
        full_scale="conv",
    )
    x = torch.randn(2, 1, 16, 16, 16)
    model.train()
    model(x)  # move the BN statistics away from their init
    model.eval()
    with torch.no_grad():
        full = model(x)
        for level in (1, 2):
            pruned = model.prune(level)
            assert pruned.dims == 3 and not pruned.training
            assert count_parameters(pruned) == count_parameters(
                GridUNet(
                    "sharp", 1, 1, TINY[: level + 1], dims=3, kernel_size=5, cgm=True,
                    full_scale="conv",
                )
            )
            index = full.branches.index((0, level))
            out = pruned(x)
            torch.testing.assert_close(out.logits[0], full.logits[index])
            torch.testing.assert_close(out.has_object[0], full.has_object[index])
            torch.testing.assert_close(
                pruned.predict_probabilities(x), model.predict_probabilities(x, level=level)
            )


def test_3d_cgm_gate_and_pooling():
    logits = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    assert ClassificationGuidedModule.gate(logits, 3).shape == (2, 1, 1, 1, 1)
    assert ClassificationGuidedModule.gate(logits).shape == (2, 1, 1, 1)
    x = torch.randn(2, 3, 4, 5, 6)
    torch.testing.assert_close(
        GlobalAvgMaxPool()(x), torch.cat([x.mean((2, 3, 4)), x.amax((2, 3, 4))], 1)
    )
    model = GridUNet("unet", 1, 1, TINY, dims=3, cgm=True).eval()
    with torch.no_grad():
        probabilities = model.predict_probabilities(torch.randn(2, 1, 16, 16, 16))
    assert probabilities.shape == (2, 1, 16, 16, 16)


def test_3d_resample():
    x = torch.randn(1, 2, 8, 8, 8)
    torch.testing.assert_close(resample(x, -1, (4, 4, 4)), nn.functional.max_pool3d(x, 2))
    assert resample(x, 1, (16, 16, 16)).shape == (1, 2, 16, 16, 16)
    assert resample(x, -1, (3, 3, 3)).shape == (1, 2, 3, 3, 3)


@pytest.mark.parametrize("mode", ["pool", "upsample"])
def test_one_3d_training_step_of_the_mixed_loss(mode):
    torch.manual_seed(0)
    model = GridUNet(
        "sharp", 1, 1, TINY, dims=3, kernel_size=5, deep_supervision="all", cgm=True
    ).train()
    x = torch.randn(2, 1, 16, 16, 16)
    target = torch.zeros(2, 1, 16, 16, 16)
    target[0, :, 4:9, 5:11, 6:10] = 1  # one volume with a nodule, one without
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    before = [p.detach().clone() for p in model.parameters()]
    out = model(x)
    assert len(out.logits) == 6  # 2L at L = 3: top row X[0][1..2], decoder X[3][0]..X[1][2], final
    loss = deep_supervision_loss(out.logits, target, mode, mixed_loss)
    loss = loss + cgm_loss(out.has_object, target)
    assert torch.isfinite(loss)
    optimizer.zero_grad()
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    optimizer.step()
    changed = sum(not torch.equal(a, p) for a, p in zip(before, model.parameters()))
    assert changed > 0.9 * len(before)


def test_3d_deep_supervision_pools_the_target():
    target = (torch.rand(1, 1, 8, 8, 8) > 0.9).float()
    logits = torch.zeros(1, 1, 2, 2, 2)
    pooled = nn.functional.max_pool3d(target, 4)
    assert deep_supervision_loss([logits], target) == mixed_loss(logits, pooled)


def test_3d_errors():
    with pytest.raises(ValueError, match="dims"):
        GridUNet("unet", 1, 1, TINY, dims=4)
    with pytest.raises(ValueError, match="3-D"):
        GridUNet("unet", 1, 1, TINY, dims=3, upsample_mode="bicubic")
    encoder = GridUNet("unet", 1, 1, TINY, dims=3).encoder
    with pytest.raises(ValueError, match="3-D"):
        GridUNet("unet", encoder=encoder, dims=2)
    with pytest.raises(ValueError, match="level"):
        create_model("vnet", level=5)
