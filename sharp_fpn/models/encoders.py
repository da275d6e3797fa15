"""Encoders: the grid's column 0 ``X[0][0], ..., X[L][0]``, whatever computes it.

``GridUNet`` takes any ``GridEncoder``: the paper's VGG blocks (``VGGEncoder``, level 0 at the
image's resolution), or an adapter around another network's bottom-up (detectron2's ResNet and
VGG: ``sharp_fpn.d2.semantic.BottomUpEncoder``, level 0 at stride 4). The encoder tells the
model its image channels, the channels of every level and the stride of level 0; the model
derives its decoder and heads from that.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

from torch import Tensor, nn

from .blocks import Norm, VGGBlock, check_dims, he_init_, max_pool_nd


class GridEncoder(nn.Module):
    """What ``GridUNet`` needs of an encoder. Subclasses set the three attributes in their
    ``__init__`` and implement ``forward`` and ``truncated``.

    Attributes:
        in_channels: channels ``C`` of the ``(N, C, H, W)`` image.
        channels: channels of ``X[i][0]`` for levels ``i = 0..L``.
        stride: stride of level 0 (1: the image's resolution); level ``i`` is at
            ``stride * 2**i``.
        dims: spatial dimensions of the image (2: ``(N, C, H, W)``; 3: ``(N, C, D, H, W)``);
            2 unless the subclass sets it.
    """

    in_channels: int
    channels: Tuple[int, ...]
    stride: int
    dims: int = 2

    @property
    def depth(self) -> int:
        """``L``: the encoder has levels ``0..L``."""
        return len(self.channels) - 1

    def forward(self, x: Tensor, depth: Optional[int] = None) -> List[Tensor]:
        """``(N, in_channels, H, W)`` -> ``[X[i][0]]`` for levels ``0..depth`` (default ``L``),
        ``(N, channels[i], ~H / (stride * 2**i), ~W / (stride * 2**i))``."""
        raise NotImplementedError

    def truncated(self, depth: int) -> "GridEncoder":
        """A new encoder of levels ``0..depth`` (for ``GridUNet.prune``) whose parameter and
        buffer names are all among this one's (their values are the caller's to copy)."""
        raise NotImplementedError


class VGGEncoder(GridEncoder):
    """The paper's column 0: ``X[0][0] = f2(image)``, ``X[i][0] = f2(p(X[i-1][0]))``.

    ``f2`` = ``VGGBlock(in, c_i, c_i)``, ``p`` = ``MaxPool2d(2)`` (``MaxPool3d(2)`` in 3-D);
    level 0 at stride 1.

    Args:
        in_channels: image channels.
        channels: widths ``c_0..c_L`` of levels ``0..L``.
        norm: ``"BN"``, ``"GN"``, ``""`` or a factory ``channels -> nn.Module``.
        kernel_size: the convs' kernel side (3: the paper's 2-D nodes; 5: the V-Net family's).
        dims: 2 (images ``(N, C, H, W)``) or 3 (volumes ``(N, C, D, H, W)``).
    """

    def __init__(
        self,
        in_channels: int,
        channels: Sequence[int],
        norm: Norm = "BN",
        *,
        kernel_size: int = 3,
        dims: int = 2,
    ):
        super().__init__()
        self.in_channels = in_channels
        self.channels = tuple(channels)
        self.stride = 1
        self.norm = norm
        self.kernel_size = kernel_size
        self.dims = check_dims(dims)
        widths_in = [in_channels] + list(channels[:-1])
        self.stages = nn.ModuleList(
            VGGBlock(a, b, b, norm, kernel_size, dims) for a, b in zip(widths_in, channels)
        )
        self.pool = max_pool_nd(dims)(2)
        he_init_(self)

    def forward(self, x: Tensor, depth: Optional[int] = None) -> List[Tensor]:
        """``(N, in_channels, H, W)`` -> ``[X[i][0]]``, ``(N, c_i, H / 2**i, W / 2**i)`` (floored),
        for levels ``0..depth`` (default: all); in 3-D ``(N, in_channels, D, H, W)`` likewise."""
        depth = self.depth if depth is None else depth
        features = [self.stages[0](x)]
        for stage in self.stages[1 : depth + 1]:
            features.append(stage(self.pool(features[-1])))
        return features

    def truncated(self, depth: int) -> "VGGEncoder":
        """The first ``depth + 1`` stages (freshly initialized)."""
        return VGGEncoder(
            self.in_channels,
            self.channels[: depth + 1],
            self.norm,
            kernel_size=self.kernel_size,
            dims=self.dims,
        )
