"""Building blocks of the UNet family: the paper's ``f`` and ``f2``, resampling, He init.

Tensors are ``(N, C, H, W)`` in 2-D and ``(N, C, D, H, W)`` in 3-D. The number of spatial
dimensions is one ``dims`` argument (2, the default, or 3) of every block here: it picks the
conv, the batch norm, the pooling and the interpolation mode, and nothing else changes (the
connectivity, ``sharp_fpn.grid``, is dimension-agnostic). The V-Net family is the UNet family
built with ``dims=3``: the same classes, no second copy of any network.
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
DIMS = (2, 3)
_CONVS = {2: nn.Conv2d, 3: nn.Conv3d}
_BATCH_NORMS = {2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
_MAX_POOLS = {2: nn.MaxPool2d, 3: nn.MaxPool3d}


def check_dims(dims: int) -> int:
    """``dims`` after checking it is 2 or 3."""
    if dims not in DIMS:
        raise ValueError(f"dims must be one of {DIMS} (spatial dimensions), got {dims!r}")
    return dims


def conv_nd(dims: int) -> type:
    """``nn.Conv2d`` or ``nn.Conv3d``."""
    return _CONVS[check_dims(dims)]


def max_pool_nd(dims: int) -> type:
    """``nn.MaxPool2d`` or ``nn.MaxPool3d``."""
    return _MAX_POOLS[check_dims(dims)]


def interpolation_mode(mode: str, dims: int) -> str:
    """``mode`` for ``F.interpolate`` on ``dims`` spatial dimensions: ``"bilinear"`` is
    ``"trilinear"`` in 3-D (PyTorch has no bicubic 3-D mode); nearest modes are unchanged."""
    check_dims(dims)
    if dims == 2 or mode.startswith("nearest"):
        return mode
    if mode == "bilinear":
        return "trilinear"
    raise ValueError(f"upsample mode {mode!r} has no 3-D counterpart; use 'bilinear' or 'nearest'")


def get_norm(norm: Norm, channels: int, dims: int = 2) -> nn.Module:
    """A normalization layer for ``channels`` feature maps.

    Args:
        norm: ``"BN"`` (BatchNorm2d, the paper's; BatchNorm3d when ``dims=3``), ``"GN"``
            (GroupNorm with ``gcd(32, channels)`` groups, so any width works), ``""`` (none),
            or a callable ``channels -> nn.Module``.
        channels: number of channels ``C`` of the ``(N, C, *spatial)`` input.
        dims: spatial dimensions (2 or 3); only BN depends on it.
    """
    check_dims(dims)
    if callable(norm):
        return norm(channels)
    if norm == "BN":
        return _BATCH_NORMS[dims](channels)
    if norm == "GN":
        return nn.GroupNorm(math.gcd(32, channels), channels)
    if norm == "":
        return nn.Identity()
    raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")


class ConvNormReLU(nn.Sequential):
    """The paper's ``f``: conv (with bias, as the official code) -> norm -> ReLU.

    ``(N, in_channels, *spatial) -> (N, out_channels, *spatial)``; ``dims`` spatial dimensions,
    a ``kernel_size**dims`` conv with "same" padding (odd ``kernel_size``).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        norm: Norm = "BN",
        kernel_size: int = 3,
        dims: int = 2,
    ):
        super().__init__(
            conv_nd(dims)(in_channels, out_channels, kernel_size, padding=kernel_size // 2),
            get_norm(norm, out_channels, dims),
            nn.ReLU(inplace=True),
        )


class VGGBlock(nn.Module):
    """The paper's ``f2``: conv3x3-norm-ReLU-conv3x3-norm-ReLU.

    Attribute names follow the official code (``conv1, bn1, conv2, bn2``).
    ``(N, in_channels, *spatial) -> (N, out_channels, *spatial)``; ``dims`` spatial dimensions,
    ``kernel_size**dims`` convs with "same" padding (3-D V-Net nodes: ``kernel_size=5``).
    """

    def __init__(
        self,
        in_channels: int,
        mid_channels: int,
        out_channels: int,
        norm: Norm = "BN",
        kernel_size: int = 3,
        dims: int = 2,
    ):
        super().__init__()
        conv = conv_nd(dims)
        padding = kernel_size // 2
        self.conv1 = conv(in_channels, mid_channels, kernel_size, padding=padding)
        self.bn1 = get_norm(norm, mid_channels, dims)
        self.conv2 = conv(mid_channels, out_channels, kernel_size, padding=padding)
        self.bn2 = get_norm(norm, out_channels, dims)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(x)))


BLOCKS = ("f2", "f")


def node_block(
    block: str,
    in_channels: int,
    out_channels: int,
    norm: Norm = "BN",
    kernel_size: int = 3,
    dims: int = 2,
) -> nn.Module:
    """The op of a grid node: ``"f2"`` (VGGBlock, mid = out) or ``"f"`` (one ConvNormReLU)."""
    if block == "f2":
        return VGGBlock(in_channels, out_channels, out_channels, norm, kernel_size, dims)
    if block == "f":
        return ConvNormReLU(in_channels, out_channels, norm, kernel_size, dims)
    raise ValueError(f"block must be one of {BLOCKS}, got {block!r}")


def resample(x: Tensor, scale: int, size: Sequence[int], mode: str = "bilinear") -> Tensor:
    """Bring ``x`` ``(N, C, h, w)`` to ``(N, C, *size)``, ``size`` being ~``2**scale * (h, w)``.

    2-D or 3-D: the number of spatial dimensions is ``len(size)`` (``(N, C, d, h, w)`` with a
    3-sized ``size``; ``"bilinear"`` then interpolates trilinearly).

    ``scale < 0``: max-pool by ``2**-scale`` (adaptive max-pooling when the sizes are not exact
    multiples). Otherwise interpolate to ``size`` with ``mode``; interpolating modes use
    ``align_corners=True`` as the official code. Sizes that are not exact powers of two of
    each other (odd inputs) are thus resized to the target's size.
    """
    size = tuple(size)
    dims = check_dims(len(size))
    spatial = tuple(x.shape[2:])
    if spatial == size:
        return x
    if scale < 0:
        factor = 2 ** -scale
        if all(s == t * factor for s, t in zip(spatial, size)):
            return (F.max_pool2d if dims == 2 else F.max_pool3d)(x, factor)
        return (F.adaptive_max_pool2d if dims == 2 else F.adaptive_max_pool3d)(x, size)
    mode = interpolation_mode(mode, dims)
    align_corners = True if mode in ("bilinear", "bicubic", "trilinear") else None
    return F.interpolate(x, size=size, mode=mode, align_corners=align_corners)


def he_init_(module: nn.Module) -> None:
    """He (Kaiming) normal init of every conv weight in ``module`` (fan-in, ReLU gain), zero biases.

    Norm layers keep their identity init (weight 1, bias 0).
    """
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.Conv3d)):
            nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
