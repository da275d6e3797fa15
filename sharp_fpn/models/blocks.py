"""Building blocks of the UNet family: the paper's ``f`` and ``f2``, resampling, He init.

All tensors are ``(N, C, H, W)``. Everything 2-D lives here and in the modules' conv choices,
so a 3-D variant only needs 3-D counterparts of these few pieces; the connectivity
(``sharp_fpn.grid``) is dimension-agnostic.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence, Union

import torch.nn.functional as F
from torch import Tensor, nn

NORMS = ("BN", "GN", "")
Norm = Union[str, Callable[[int], nn.Module]]
"""A norm name of ``NORMS``, or a factory ``channels -> nn.Module`` (e.g. a framework's own
norms, such as detectron2's SyncBN, handed in by an adapter)."""
UPSAMPLE_MODES = ("bilinear", "bicubic", "nearest", "nearest-exact")


def get_norm(norm: Norm, channels: int) -> nn.Module:
    """A normalization layer for ``channels`` feature maps.

    Args:
        norm: ``"BN"`` (BatchNorm2d, the paper's), ``"GN"`` (GroupNorm with
            ``gcd(32, channels)`` groups, so any width works), ``""`` (none), or a callable
            ``channels -> nn.Module``.
        channels: number of channels ``C`` of the ``(N, C, H, W)`` input.
    """
    if callable(norm):
        return norm(channels)
    if norm == "BN":
        return nn.BatchNorm2d(channels)
    if norm == "GN":
        return nn.GroupNorm(math.gcd(32, channels), channels)
    if norm == "":
        return nn.Identity()
    raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")


class ConvNormReLU(nn.Sequential):
    """The paper's ``f``: conv (with bias, as the official code) -> norm -> ReLU.

    ``(N, in_channels, H, W) -> (N, out_channels, H, W)``.
    """

    def __init__(
        self, in_channels: int, out_channels: int, norm: Norm = "BN", kernel_size: int = 3
    ):
        super().__init__(
            nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2),
            get_norm(norm, out_channels),
            nn.ReLU(inplace=True),
        )


class VGGBlock(nn.Module):
    """The paper's ``f2``: conv3x3-norm-ReLU-conv3x3-norm-ReLU.

    Attribute names follow the official code (``conv1, bn1, conv2, bn2``).
    ``(N, in_channels, H, W) -> (N, out_channels, H, W)``.
    """

    def __init__(
        self, in_channels: int, mid_channels: int, out_channels: int, norm: Norm = "BN"
    ):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, mid_channels, 3, padding=1)
        self.bn1 = get_norm(norm, mid_channels)
        self.conv2 = nn.Conv2d(mid_channels, out_channels, 3, padding=1)
        self.bn2 = get_norm(norm, out_channels)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(x)))


BLOCKS = ("f2", "f")


def node_block(block: str, in_channels: int, out_channels: int, norm: Norm = "BN") -> nn.Module:
    """The op of a grid node: ``"f2"`` (VGGBlock, mid = out) or ``"f"`` (one ConvNormReLU)."""
    if block == "f2":
        return VGGBlock(in_channels, out_channels, out_channels, norm)
    if block == "f":
        return ConvNormReLU(in_channels, out_channels, norm)
    raise ValueError(f"block must be one of {BLOCKS}, got {block!r}")


def resample(x: Tensor, scale: int, size: Sequence[int], mode: str = "bilinear") -> Tensor:
    """Bring ``x`` ``(N, C, h, w)`` to ``(N, C, *size)``, ``size`` being ~``2**scale * (h, w)``.

    ``scale < 0``: max-pool by ``2**-scale`` (adaptive max-pooling when the sizes are not exact
    multiples). Otherwise interpolate to ``size`` with ``mode``; interpolating modes use
    ``align_corners=True`` as the official code. Sizes that are not exact powers of two of
    each other (odd inputs) are thus resized to the target's size.
    """
    size = tuple(size)
    if tuple(x.shape[-2:]) == size:
        return x
    if scale < 0:
        factor = 2 ** -scale
        if all(s == t * factor for s, t in zip(x.shape[-2:], size)):
            return F.max_pool2d(x, factor)
        return F.adaptive_max_pool2d(x, size)
    align_corners = True if mode in ("bilinear", "bicubic") else None
    return F.interpolate(x, size=size, mode=mode, align_corners=align_corners)


def he_init_(module: nn.Module) -> None:
    """He (Kaiming) normal init of every conv weight in ``module`` (fan-in, ReLU gain), zero biases.

    Norm layers keep their identity init (weight 1, bias 0).
    """
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
