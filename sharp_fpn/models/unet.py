"""The UNet family of the paper (UNet, WUNet, UNet++, UNet3+, UNet#) as one grid network.

``create_model(arch)`` = a VGG encoder (the grid's column 0) + ``GridDecoder`` + a conv head on
``X[0][L]``. With 3 input channels and 1 class the parameter counts equal the paper's Table 1
(SPEC section 1):

=============================  ==========
``unet``                        7,852,545
``wunet``                       9,392,916
``unet2plus``                   9,163,329
``unet3plus``                   6,748,993
``unet_sharp``                 10,748,481 (``full_scale="upsample"``)
``unet_sharp``                  9,716,545 (``full_scale="conv"``, the paper's 9.71M)
``unet_sharp``, level 1/2/3       103,041 / 555,969 / 2,531,073
=============================  ==========

UNet3+: the paper reports 9.79M, which is not reproducible. The official UNet3+ design
(encoder as here; five inputs per decoder node, each through conv3x3-BN-ReLU to CatChannels =
32; fusion conv3x3-BN-ReLU at UpChannels = 5 * 32 = 160; 3x3 output conv) at widths
[32, 64, 128, 256, 512] has 6,748,993 parameters, and the paper gives no widths or blocks
that would add the missing ~3M. This project implements the official design.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple, Union

from torch import Tensor, nn

from ..grid import Position
from .blocks import VGGBlock, he_init_
from .grid_decoder import GridDecoder

PAPER_CHANNELS = (32, 64, 128, 256, 512)
WIDE_CHANNELS = (35, 70, 140, 280, 560)


@dataclass(frozen=True)
class Arch:
    """An entry of ``ARCHS``: a grid scheme and the encoder widths of levels 0..4."""

    scheme: str
    channels: Tuple[int, ...]


ARCHS: Dict[str, Arch] = {
    "unet": Arch("unet", PAPER_CHANNELS),
    "wunet": Arch("unet", WIDE_CHANNELS),
    "unet2plus": Arch("2plus", PAPER_CHANNELS),
    "unet3plus": Arch("3plus", PAPER_CHANNELS),
    "unet_sharp": Arch("sharp", PAPER_CHANNELS),
}


class VGGEncoder(nn.Module):
    """Column 0 of the grid: ``X[0][0] = f2(image)``, ``X[i][0] = f2(p(X[i-1][0]))``.

    ``f2`` = ``VGGBlock(in, c_i, c_i)``, ``p`` = ``MaxPool2d(2)``.

    Args:
        in_channels: image channels.
        channels: widths ``c_0..c_L`` of levels ``0..L``.
        norm: ``"BN"``, ``"GN"`` or ``""``.
    """

    def __init__(self, in_channels: int, channels: Sequence[int], norm: str = "BN"):
        super().__init__()
        widths_in = [in_channels] + list(channels[:-1])
        self.stages = nn.ModuleList(VGGBlock(a, b, b, norm) for a, b in zip(widths_in, channels))
        self.pool = nn.MaxPool2d(2)
        he_init_(self)

    def forward(self, x: Tensor, depth: Optional[int] = None) -> List[Tensor]:
        """``(N, in_channels, H, W)`` -> ``[X[i][0]]``, ``(N, c_i, H / 2**i, W / 2**i)`` (floored),
        for levels ``0..depth`` (default: all)."""
        depth = len(self.stages) - 1 if depth is None else depth
        features = [self.stages[0](x)]
        for stage in self.stages[1 : depth + 1]:
            features.append(stage(self.pool(features[-1])))
        return features


class GridUNet(nn.Module):
    """A UNet-family segmentation network: VGG encoder, grid decoder, conv heads on the top row.

    Node ``X[i][j]`` has ``channels[i]`` channels (UNet3+: ``(L + 1) * channels[0]`` for the
    decoder nodes, with inputs projected to ``channels[0]`` and an ``f`` fusion, officially).
    The head is a 1x1 conv (UNet3+: 3x3, as its official code) to ``classes`` logits.

    Args:
        scheme: ``"unet"``, ``"2plus"``, ``"3plus"`` or ``"sharp"``.
        in_channels: image channels.
        classes: output channels (logits).
        channels: encoder widths of levels ``0..L``; ``L = len(channels) - 1``.
        deep_supervision: put a head on every top-row node ``X[0][1..L]`` (the official UNet++
            deep supervision, UNet#'s ``L_In`` branches; nested schemes only) and return the
            list of their logits. The decoder-branch heads and CGM of SPEC section 2 are not
            part of this class; attach them to ``forward_nodes``'s output.
        full_scale: UNet#'s full-scale op, ``"upsample"`` or ``"conv"``.
        norm: ``"BN"``, ``"GN"`` or ``""``.
        upsample_mode: ``"bilinear"`` (official, ``align_corners=True``) or ``"nearest"``.
    """

    def __init__(
        self,
        scheme: str,
        in_channels: int = 3,
        classes: int = 1,
        channels: Sequence[int] = PAPER_CHANNELS,
        *,
        deep_supervision: bool = False,
        full_scale: str = "upsample",
        norm: str = "BN",
        upsample_mode: str = "bilinear",
    ):
        super().__init__()
        depth = len(channels) - 1
        self.encoder = VGGEncoder(in_channels, channels, norm)
        if scheme == "3plus":
            widths: Union[int, Sequence[int]] = (depth + 1) * channels[0]
            block, head_kernel = "f", 3
        else:
            widths, block, head_kernel = channels[:depth], "f2", 1
        self.decoder = GridDecoder(
            scheme,
            depth,
            channels,
            widths,
            block=block,
            norm=norm,
            full_scale=full_scale,
            project_channels=channels[0],
            upsample_mode=upsample_mode,
        )
        if deep_supervision and (0, 1) not in self.decoder.grid:
            raise NotImplementedError(
                f"deep_supervision: scheme {scheme!r} has no top-row nodes X[0][1..{depth - 1}]; "
                "only the nested schemes ('2plus', 'sharp') support it so far (the "
                "decoder-branch heads of UNet3+ / UNet# are not implemented yet)"
            )
        self.deep_supervision = deep_supervision
        self.heads = nn.ModuleDict()  # keyed by the column j of the top-row node X[0][j]
        for j in range(1, depth + 1) if deep_supervision else [depth]:
            width = self.decoder.node_channels[(0, j)]
            self.heads[str(j)] = nn.Conv2d(width, classes, head_kernel, padding=head_kernel // 2)
            he_init_(self.heads[str(j)])

    @property
    def depth(self) -> int:
        return self.decoder.grid.depth

    def forward_nodes(self, x: Tensor, level: Optional[int] = None) -> Dict[Position, Tensor]:
        """Every node's features, the hook for heads.

        ``(N, C, H, W)`` image -> ``{(i, j): (N, C_ij, H / 2**i, W / 2**i)}``.
        ``level`` computes only the sub-network pruned to ``X[0][level]``.
        """
        return self.decoder(self.encoder(x, level), level)

    def forward(self, x: Tensor, level: Optional[int] = None) -> Union[Tensor, List[Tensor]]:
        """Segmentation logits.

        Args:
            x: ``(N, in_channels, H, W)`` images.
            level: prune at inference (the paper's fast mode): compute only the nodes needed by
                ``X[0][level]`` and return its head's logits. Needs a head there, so
                ``deep_supervision=True`` for ``level < L``.

        Returns:
            ``(N, classes, H, W)`` logits; with deep supervision and no ``level``, the list of
            the ``L`` top-row heads' logits, ``X[0][1]`` first, the final ``X[0][L]`` last.
        """
        if level is not None and str(level) not in self.heads:
            raise ValueError(
                f"level {level}: no head on X[0][{level}]; heads exist on X[0][j] for j in "
                f"{[int(j) for j in self.heads]} (build with deep_supervision=True to prune)"
            )
        nodes = self.forward_nodes(x, level)
        if level is not None:
            return self.heads[str(level)](nodes[(0, level)])
        logits = [head(nodes[(0, int(j))]) for j, head in self.heads.items()]
        return logits if self.deep_supervision else logits[0]


def create_model(
    arch: str,
    in_channels: int = 3,
    classes: int = 1,
    deep_supervision: bool = False,
    level: int = 4,
    full_scale: str = "upsample",
) -> GridUNet:
    """Build a UNet-family network of the paper, randomly (He) initialized.

    Args:
        arch: one of ``ARCHS``: ``"unet"``, ``"wunet"``, ``"unet2plus"``, ``"unet3plus"``,
            ``"unet_sharp"``.
        in_channels: image channels.
        classes: output logit channels.
        deep_supervision: heads on ``X[0][1..L]``, returning a list of logits (nested schemes).
        level: ``L`` in 1..4: the isolated sub-network with rows ``0..L`` (the paper's isolated
            training of pruning level ``L^k``); 4 is the full network.
        full_scale: UNet#'s full-scale op, ``"upsample"`` (official code, default) or
            ``"conv"`` (the paper's 9.71M parameter count); only ``unet_sharp`` has it.

    Returns:
        A ``GridUNet`` mapping ``(N, in_channels, H, W)`` to ``(N, classes, H, W)`` logits.
    """
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; expected one of {sorted(ARCHS)}")
    spec = ARCHS[arch]
    if not 1 <= level <= len(spec.channels) - 1:
        raise ValueError(f"level must be in 1..{len(spec.channels) - 1}, got {level}")
    if full_scale != "upsample" and spec.scheme != "sharp":
        raise ValueError(f"full_scale={full_scale!r} only applies to 'unet_sharp', not {arch!r}")
    return GridUNet(
        spec.scheme,
        in_channels,
        classes,
        spec.channels[: level + 1],
        deep_supervision=deep_supervision,
        full_scale=full_scale,
    )
