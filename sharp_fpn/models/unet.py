"""The UNet family of the paper (UNet, WUNet, UNet++, UNet3+, UNet#) as one grid network.

``GridUNet`` = an encoder (the grid's column 0, a ``GridEncoder``) + ``GridDecoder`` + conv heads
on chosen nodes (the branches), optionally with UNet#'s classification-guided modules (CGM). One
class for every encoder: the paper's VGG blocks (``VGGEncoder``, what ``create_model(arch)``
builds) or another network's bottom-up through an adapter (detectron2's ResNet or VGG:
``sharp_fpn.d2.semantic.BottomUpEncoder``, Table 2's semantic networks). Its inference is
``predict_probabilities(x, level=None)``.
With 3 input channels and 1 class the parameter counts equal the paper's Table 1
(SPEC section 1); deep supervision adds its heads' parameters (``conv k x k``: ``C*k*k + 1``
per class):

=============================  ==========  =============================================
arch                           no DS       ``deep_supervision=True`` (its default branches)
=============================  ==========  =============================================
``unet``                        7,852,545   7,861,189 (``"decoder"``: +4,609+2,305+1,153+577)
``wunet``                       9,392,916   9,402,370 (``"decoder"``: +5,041+2,521+1,261+631)
``unet2plus``                   9,163,329   9,163,428 (``"top"``: +3 x 33)
``unet3plus``                   6,748,993   6,757,925 (``"decoder"``: +4,609+3 x 1,441)
``unet_sharp`` (upsample)      10,748,481  10,757,224 (``"all"``: +3 x 33 + 8,644)
``unet_sharp`` (conv)           9,716,545   9,725,288 (``"all"``, the paper's 9.71M)
``unet_sharp``, level 1/2/3       103,041 / 555,969 / 2,531,073 (no DS; also ``prune(k)``)
=============================  ==========  =============================================

Deep supervision (SPEC section 2). The branches are read off the grid (``Grid.branches``), never
named by hand:

- ``"top"``: the top row ``X[0][1..L-1]``, heads like the final one (1x1; UNet3+: 3x3). The
  paper's loss ``L_In``; what pruning needs. Nested schemes only (the others have no such
  nodes). UNet++'s own deep supervision, so its default.
- ``"decoder"``: the decoder branches ``X[L][0], X[L-1][1], ..., X[1][L-1]`` (the
  anti-diagonal below the top row), 3x3 heads; the paper's loss ``L_De``. Every scheme has
  these nodes: the default of UNet and UNet3+ (whose official code supervises exactly these,
  with 3x3 heads, plus the final node).
- ``"all"``: both, ``2L`` branches; UNet#'s, so its default (8 branches at ``L = 4``).

Every mode also supervises the final ``X[0][L]``. Branch order (``GridUNet.branches``), as
the official UNet# code returns them: top row ``X[0][1..L-1]``, then the decoder branches
deepest first, then the final ``X[0][L]`` last. The top row gets the scheme's 1x1 conv (UNet3+:
3x3), the decoder branches 3x3 convs, each at its node's resolution (``H / (s * 2**i)``, ``s`` =
level 0's stride); the final node's head is the same 1x1 (3x3) when level 0 is at the image's
resolution (``VGGEncoder``), else an ``UpsamplingHead`` from level 0's stride to full resolution
(one conv block per doubling, then 1x1), as the paper's Table 2 networks end.
``sharp_fpn.losses.deep_supervision_loss``
either max-pools the ground truth down to it (the paper's) or upsamples the logits (the
official code's).

Pruning (the paper's fast mode): ``GridUNet.prune(k)`` of a model trained with heads on the top
row returns a standalone network that computes only the nodes ``i + j <= k`` and the head (and
CGM) on ``X[0][k]``, carrying the trained weights. On the paper's VGG encoder it is the network
isolated training builds (``create_model(arch, level=k)``), with the same parameter count; on a
strided encoder (a detectron2 bottom-up) it keeps ``X[0][k]``'s trained head at its node's
resolution, where isolated training would end in an ``UpsamplingHead``; its probabilities are
upsampled to the image (``predict_probabilities``). ``forward(x, level=k)`` and
``predict_probabilities(x, level=k)`` compute the same without copying.

UNet3+: the paper reports 9.79M, which is not reproducible. The official UNet3+ design
(encoder as here; five inputs per decoder node, each through conv3x3-BN-ReLU to CatChannels =
32; fusion conv3x3-BN-ReLU at UpChannels = 5 * 32 = 160; 3x3 output conv) at widths
[32, 64, 128, 256, 512] has 6,748,993 parameters, and the paper gives no widths or blocks
that would add the missing ~3M. This project implements the official design.

The V-Net family (Table 1's 3-D column, LUNA16) is this grid with ``dims=3``: the same classes,
every block its 3-D counterpart (Conv3d, BatchNorm3d, MaxPool3d, trilinear upsampling), one
input channel, nodes of two 5x5x5 conv-BN-ReLU (V-Net's kernel; UNet3+'s projections and
fusion and UNet#'s ``"conv"`` full-scale op too), feature lists ``VNET_CHANNELS`` =
[16, 32, 64, 128, 256] and, for WV-Net, ``WIDE_VNET_CHANNELS`` = [18, 36, 72, 144, 288]; heads,
deep supervision, CGMs, pruning and the losses as in 2-D (``VNET_PARAMETER_TABLE``):

===============  ==========  ==========  ======================================
arch             paper       here        deep supervision (the arch's default)
===============  ==========  ==========  ======================================
``vnet``         26.39M      27,238,433  27,251,397
``wvnet``        33.40M      34,472,737  34,487,321
``vnet2plus``    27.37M      31,783,489  31,783,540
``vnet3plus``    27.84M      23,401,057  23,414,453
``vnet_sharp``   28.37M      37,287,489  37,300,504 (``full_scale="conv"``: 35,623,745)
===============  ==========  ==========  ======================================

The paper's five counts are not reproducible by any one node definition; it gives none (the
official code has no 3-D code). What its counts say:

- V-Net and WV-Net are 3.2 % below the 5x5x5 nodes here, the same ratio at both widths (the
  gap is quadratic in the widths, like every conv): a 5x5x5 UNet is the closest uniform
  network: no uniform node of one to three k x k x k conv-BN-ReLU (k = 1..7) gives 26.39M
  (the nearest: 27.24M, two 5x5x5; 23.51M, one 6x6x6). Dozens of ad-hoc mixtures of kernels
  and conv counts per stage do, so the count alone identifies no design.
- V-Net2+ - V-Net = 0.98M is what UNet++'s extra nodes cost with two 3x3x3 convs (982,560
  here, 3/4 of the 2-D UNet++ - UNet gap of 1,310,784 up to the biases: 27/9 for the kernel,
  1/4 for the halved widths); with 5x5x5 nodes they cost 4,545,056. So the paper's 3-D decoder nodes
  were 3x3x3, which leaves 24.0M for a V-Net encoder that no uniform 5x5x5 or 3x3x3 encoder
  has (16.35M and 3.53M).
- V-Net3+ - V-Net = 1.45M is again 3/4 of the paper's own 2-D UNet3+ - UNet gap
  (9.79M - 7.85M), which is itself not reproducible (above); UNet3+'s official design has no
  such gap (3x3x3: -0.83M, 5x5x5: -3.84M).
- V-Net# - V-Net2+ = 1.00M matches neither full-scale op: upsampling adds 1,188,864 with 3x3x3
  nodes (5,504,000 with 5x5x5), the paper's ``"conv"`` op 829,696 (to 32 channels, as in 2-D;
  414,848 to 16).

This project builds the issue's definition (5x5x5 nodes everywhere, the one closest to the
paper's V-Net and WV-Net counts) and records the paper's numbers beside its own.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch.nn.functional as F
from torch import Tensor, nn

from ..grid import (
    DEEP_SUPERVISION_MODES,
    DEFAULT_DEEP_SUPERVISION,
    SCHEME_FACTS,
    SCHEMES,
    Grid,
    Position,
    node_key,
    node_name,
)
from .blocks import Norm, check_dims, interpolation_mode
from .encoders import GridEncoder, VGGEncoder
from .grid_decoder import GridDecoder
from .heads import (
    ClassificationGuidedModule,
    SegmentationHead,
    UpsamplingHead,
    branch_probabilities,
)

__all__ = [
    "ALL_ARCHS",
    "ARCHS",
    "DEEP_SUPERVISION_MODES",
    "DEFAULT_DEEP_SUPERVISION",
    "PAPER_CHANNELS",
    "VNET_ARCHS",
    "VNET_CHANNELS",
    "VNET_PARAMETER_TABLE",
    "WIDE_VNET_CHANNELS",
    "WIDE_CHANNELS",
    "Arch",
    "GridUNet",
    "ModelOutput",
    "SegmentationOutput",
    "VGGEncoder",
    "count_parameters",
    "create_model",
    "supervised_branches",
]

PAPER_CHANNELS = (32, 64, 128, 256, 512)
WIDE_CHANNELS = (35, 70, 140, 280, 560)
VNET_CHANNELS = (16, 32, 64, 128, 256)
"""The paper's V-Net feature list (section 4, Table 1's 3-D column)."""
WIDE_VNET_CHANNELS = (18, 36, 72, 144, 288)
"""WV-Net's feature list (the paper's "slightly expanded" V-Net)."""
VNET_KERNEL_SIZE = 5
"""Kernel side of the V-Net family's node convs (5x5x5, as Milletari et al.'s V-Net)."""


@dataclass(frozen=True)
class Arch:
    """An entry of ``ARCHS``: a grid scheme, the encoder widths of levels 0..4, the spatial
    dimensions, the node convs' kernel side and the default image channels."""

    scheme: str
    channels: Tuple[int, ...]
    dims: int = 2
    kernel_size: int = 3
    in_channels: int = 3


ARCHS: Dict[str, Arch] = {
    "unet": Arch("unet", PAPER_CHANNELS),
    "wunet": Arch("unet", WIDE_CHANNELS),
    "unet2plus": Arch("2plus", PAPER_CHANNELS),
    "unet3plus": Arch("3plus", PAPER_CHANNELS),
    "unet_sharp": Arch("sharp", PAPER_CHANNELS),
}
"""The 2-D archs (Table 1's 2-D columns): what 2-D callers (detectron2 configs, export) list."""

VNET_ARCHS: Dict[str, Arch] = {
    # the 3-D column of Table 1: the same grid with dims=3, one-channel CT volumes
    "vnet": Arch("unet", VNET_CHANNELS, 3, VNET_KERNEL_SIZE, 1),
    "wvnet": Arch("unet", WIDE_VNET_CHANNELS, 3, VNET_KERNEL_SIZE, 1),
    "vnet2plus": Arch("2plus", VNET_CHANNELS, 3, VNET_KERNEL_SIZE, 1),
    "vnet3plus": Arch("3plus", VNET_CHANNELS, 3, VNET_KERNEL_SIZE, 1),
    "vnet_sharp": Arch("sharp", VNET_CHANNELS, 3, VNET_KERNEL_SIZE, 1),
}
"""The 3-D archs (the V-Net family), in Table 1's order; kept apart from ``ARCHS`` so that 2-D
callers never list them."""
ALL_ARCHS: Dict[str, Arch] = {**ARCHS, **VNET_ARCHS}
"""Every arch ``create_model`` builds."""

VNET_PARAMETER_TABLE: Dict[str, Tuple[float, int]] = {
    "vnet": (26.39, 27_238_433),
    "wvnet": (33.40, 34_472_737),
    "vnet2plus": (27.37, 31_783_489),
    "vnet3plus": (27.84, 23_401_057),
    "vnet_sharp": (28.37, 37_287_489),
}
"""Table 1's 3-D column: arch -> (the paper's count in millions, ``create_model(arch)``'s
count, no deep supervision, one input channel, one class). The gaps are explained in the
module docstring: no node definition reproduces all five."""


def count_parameters(module: nn.Module) -> int:
    """Number of parameters (trainable or not) of ``module``; buffers are not counted."""
    return sum(p.numel() for p in module.parameters())


def supervised_branches(grid: Grid, mode: Optional[str]) -> Tuple[Position, ...]:
    """The nodes that get a head, in output order, the final ``X[0][L]`` last:
    ``grid.branches(mode)`` (kept as a function for existing callers)."""
    return grid.branches(mode)


@dataclass
class SegmentationOutput:
    """Per branch, logits and (with CGMs) CGM class logits: what ``GridUNet.forward_branches``
    returns, and ``forward`` for a network with CGMs.

    Attributes:
        logits: one ``(N, classes, h, w)`` tensor per branch, un-gated (train the segmentation
            on these), in ``branches`` order; the top row and the final node at full
            resolution, decoder branch ``X[i][j]`` at its node's.
        has_object: one ``(N, 2)`` tensor of CGM class logits per branch (class 1 = the
            image contains foreground; train with ``sharp_fpn.losses.cgm_loss``); empty when
            the network has no CGMs.
        branches: the ``(i, j)`` node of each branch; the final ``X[0][L]`` (or the pruning
            level's ``X[0][k]``) last.
    """

    logits: List[Tensor]
    has_object: List[Tensor]
    branches: Tuple[Position, ...]

    def gates(self) -> List[Tensor]:
        """Per branch, the CGM's decision as ``(N, 1, 1, 1)`` 0/1 factors (argmax;
        ``(N, 1, 1, 1, 1)`` for 3-D logits)."""
        return [
            ClassificationGuidedModule.gate(c, x.dim() - 2)
            for x, c in zip(self.logits, self.has_object)
        ]

    def probabilities(self, gated: bool = True) -> List[Tensor]:
        """Per branch, sigmoid probabilities ``(N, classes, h, w)``; with ``gated`` (the
        paper's inference) and CGMs, multiplied by the CGM's 0/1 decision, so a branch whose
        classifier says "no object" predicts all background (``branch_probabilities``)."""
        if gated and self.has_object:
            return [branch_probabilities(x, c) for x, c in zip(self.logits, self.has_object)]
        return [branch_probabilities(x) for x in self.logits]


ModelOutput = Union[Tensor, List[Tensor], SegmentationOutput]


class GridUNet(nn.Module):
    """A UNet-family segmentation network: encoder, grid decoder, heads on chosen nodes.

    Column 0 is the encoder's levels ``0..L``; decoder node ``X[i][j]`` has ``widths[i]``
    channels. The heads (``heads``, keyed ``"i_j"``) map a node to ``classes`` logits: the
    scheme's 1x1 conv (UNet3+ 3x3) on the top row and 3x3 convs on the decoder branches, at
    their node's resolution; on the final node the same 1x1 (3x3), or an ``UpsamplingHead`` to
    full resolution when the encoder's level 0 is at a stride > 1.

    Args:
        scheme: ``"unet"``, ``"2plus"``, ``"3plus"`` or ``"sharp"``.
        in_channels: image channels of the default encoder (3).
        classes: output channels (logits).
        channels: widths of the default encoder's levels ``0..L`` (``PAPER_CHANNELS``);
            ``L = len(channels) - 1``.
        encoder: the grid's column 0; default ``VGGEncoder(in_channels, channels, norm)`` (the
            paper's). Give either ``encoder`` or ``in_channels``/``channels``.
        widths: decoder node widths of levels ``0..L-1``; default the paper's: the encoder's
            ``channels[:L]``, UNet3+ ``(L + 1) * project_channels`` (its UpChannels) at every
            level.
        upsample_widths: the widths of the final node's ``UpsamplingHead``, one per
            doubling from the encoder's stride to 1 (none for stride 1, two for stride 4).
        deep_supervision: ``False`` (one head, on ``X[0][L]``), ``"top"``, ``"decoder"``,
            ``"all"`` (see the module docstring), or ``True`` for the scheme's own
            (``DEFAULT_DEEP_SUPERVISION``).
        full_scale: UNet#'s full-scale op, ``"upsample"`` or ``"conv"``.
        full_scale_channels: output channels of the ``"conv"`` full-scale op (32 officially).
        project_channels: UNet3+'s width of each projected input (CatChannels); default the
            encoder's ``channels[0]`` (the official 32).
        norm: ``"BN"``, ``"GN"``, ``""`` or a factory ``channels -> nn.Module``: the default
            encoder's, the decoder's and the upsampling heads'.
        upsample_mode: ``"bilinear"`` (official, ``align_corners=True``) or ``"nearest"``.
        reduce_upsampled: 1x1-reduce wide upsampled inputs at their own resolution
            (``GridDecoder``); off by default, the paper's networks.
        head_relu: a ReLU after every head (the paper's text); off by default as the official
            code (see ``SegmentationHead``).
        cgm: a classification-guided module on every branch (heavy on the two deepest
            decoder branches ``X[L][0]``, ``X[L-1][1]``, light elsewhere); ``forward`` then
            returns a ``SegmentationOutput``.
        cgm_dropout: dropout probability inside the CGMs.
        kernel_size: kernel side of the default encoder's and the decoder's node convs (3,
            the paper's 2-D nodes; 5, the V-Net family's). Heads keep their own kernels.
        dims: spatial dimensions of the default encoder (2: images ``(N, C, H, W)``; 3:
            volumes ``(N, C, D, H, W)``, every block its 3-D counterpart); with ``encoder``,
            the encoder's ``dims`` (giving another one is an error).

    Attributes:
        branches: the supervised nodes, in output order (``Grid.branches``).
        dims: spatial dimensions (2 or 3).
    """

    def __init__(
        self,
        scheme: str,
        in_channels: Optional[int] = None,
        classes: int = 1,
        channels: Optional[Sequence[int]] = None,
        *,
        encoder: Optional[GridEncoder] = None,
        widths: Optional[Sequence[int]] = None,
        upsample_widths: Sequence[int] = (),
        deep_supervision: Union[bool, str] = False,
        full_scale: str = "upsample",
        full_scale_channels: int = 32,
        project_channels: Optional[int] = None,
        norm: Norm = "BN",
        upsample_mode: str = "bilinear",
        reduce_upsampled: bool = False,
        head_relu: bool = False,
        cgm: bool = False,
        cgm_dropout: float = 0.5,
        kernel_size: int = 3,
        dims: Optional[int] = None,
    ):
        super().__init__()
        if scheme not in SCHEMES:
            raise ValueError(f"unknown scheme {scheme!r}; expected one of {SCHEMES}")
        if encoder is None:
            encoder = VGGEncoder(
                3 if in_channels is None else in_channels,
                PAPER_CHANNELS if channels is None else channels,
                norm,
                kernel_size=kernel_size,
                dims=check_dims(2 if dims is None else dims),
            )
        elif in_channels is not None or channels is not None:
            raise ValueError(
                "give either an encoder or in_channels/channels (the default VGGEncoder's)"
            )
        elif dims is not None and dims != encoder.dims:
            raise ValueError(f"dims={dims} but the encoder is {encoder.dims}-D")
        dims = encoder.dims
        if 2 ** len(upsample_widths) != encoder.stride:
            raise ValueError(
                f"upsample_widths needs one width per doubling from the encoder's stride "
                f"{encoder.stride} to 1, got {list(upsample_widths)}"
            )
        depth = encoder.depth
        facts = SCHEME_FACTS[scheme]
        project = encoder.channels[0] if project_channels is None else project_channels
        if widths is None:  # the paper's; UNet3+: L + 1 projected inputs (UpChannels)
            widths = [(depth + 1) * project] * depth if facts.project_inputs else (
                encoder.channels[:depth]
            )
        self.scheme = scheme
        self.classes = classes
        self.upsample_widths = tuple(upsample_widths)
        self.norm = norm
        self.head_relu = head_relu
        self.cgm = cgm
        self.cgm_dropout = cgm_dropout
        self.dims = dims

        self.encoder = encoder
        self.decoder = GridDecoder(
            scheme,
            depth,
            encoder.channels,
            list(widths),
            block=facts.node_op,
            norm=norm,
            full_scale=full_scale,
            full_scale_channels=full_scale_channels,
            project_channels=project,
            upsample_mode=upsample_mode,
            reduce_upsampled=reduce_upsampled,
            kernel_size=kernel_size,
            dims=dims,
        )

        grid = self.decoder.grid
        mode = DEFAULT_DEEP_SUPERVISION[scheme] if deep_supervision is True else deep_supervision
        self.deep_supervision: Optional[str] = mode or None
        self.branches: Tuple[Position, ...] = grid.branches(self.deep_supervision)
        self.heads = nn.ModuleDict()
        self.cgms = nn.ModuleDict()
        for position in self.branches:
            width = self.decoder.node_channels[position]
            if position in grid.decoder_branches:
                head: nn.Module = SegmentationHead(width, classes, 3, head_relu, dims)
            elif self.upsample_widths and position == grid.final:
                head = UpsamplingHead(
                    width, self.upsample_widths, classes, norm, head_relu, dims
                )
            else:
                head = SegmentationHead(width, classes, facts.top_head_kernel, head_relu, dims)
            self.heads[node_key(position)] = head
            if cgm:
                self.cgms[node_key(position)] = ClassificationGuidedModule(
                    width, heavy=position in grid.heavy_cgm_branches, dropout=cgm_dropout
                )

    @property
    def depth(self) -> int:
        return self.decoder.grid.depth

    @property
    def in_channels(self) -> int:
        """Image channels (the encoder's)."""
        return self.encoder.in_channels

    @property
    def channels(self) -> Tuple[int, ...]:
        """Channels of the encoder's levels ``0..L``."""
        return self.encoder.channels

    @property
    def full_scale(self) -> str:
        return self.decoder.full_scale

    @property
    def upsample_mode(self) -> str:
        return self.decoder.upsample_mode

    @property
    def size_divisibility(self) -> int:
        """Image sides the coarsest level divides exactly: ``stride * 2**L`` (pad to it)."""
        return self.encoder.stride * 2**self.depth

    def forward_nodes(self, x: Tensor, level: Optional[int] = None) -> Dict[Position, Tensor]:
        """Every node's features, the hook for heads.

        ``(N, C, H, W)`` image -> ``{(i, j): (N, C_ij, H / (s * 2**i), W / (s * 2**i))}``, ``s``
        the encoder's stride. ``level`` computes only the sub-network pruned to ``X[0][level]``.
        """
        return self.decoder(self.encoder(x, level), level)

    def forward_branches(self, x: Tensor, level: Optional[int] = None) -> SegmentationOutput:
        """Every branch's logits (and CGM class logits), always as a ``SegmentationOutput``
        (``has_object`` empty without CGMs); with ``level``, only the branch ``X[0][level]``.
        What training reads; ``forward`` returns the same in its documented forms."""
        branches = self.branches if level is None else (self._final_branch(level),)
        nodes = self.forward_nodes(x, level)
        logits = [self.heads[node_key(p)](nodes[p]) for p in branches]
        has_object = [self.cgms[node_key(p)](nodes[p]) for p in branches] if self.cgm else []
        return SegmentationOutput(logits, has_object, branches)

    def forward(self, x: Tensor, level: Optional[int] = None) -> ModelOutput:
        """Segmentation logits of every branch.

        Args:
            x: ``(N, in_channels, H, W)`` images.
            level: prune at inference (the paper's fast mode) without copying the network:
                compute only the nodes needed by ``X[0][level]`` and only its head (see also
                ``prune``). Needs a head there: deep supervision ``"top"`` or ``"all"`` for
                ``level < L``.

        Returns:
            Without CGM: ``(N, classes, H, W)`` logits of ``X[0][L]`` (or ``X[0][level]``);
            with deep supervision and no ``level``, the list of every branch's logits in
            ``branches`` order, the final one last (decoder branches at their own
            resolution). With CGM: a ``SegmentationOutput`` holding the same branches (one if
            ``level`` is given or there is no deep supervision) and their class logits.
        """
        output = self.forward_branches(x, level)
        if self.cgm:
            return output
        return output.logits if len(output.logits) > 1 else output.logits[0]

    def predict_probabilities(self, x: Tensor, level: Optional[int] = None) -> Tensor:
        """Inference: the final branch's (or ``X[0][level]``'s) sigmoid probabilities.

        ``(N, in_channels, H, W)`` image -> ``(N, classes, H, W)`` probabilities at the input's
        resolution, multiplied by the branch's CGM 0/1 decision (argmax, per image) when the
        network has CGMs (``branch_probabilities``). Computes only the nodes that branch needs
        and only its head. Traceable (``torch.export``, ``torch.jit.trace``): the CGM gate is a
        tensor op, and the only branching is on the network's structure.
        """
        output = self.forward_branches(x, level)
        logits = output.logits[-1]
        if self.encoder.stride > 1:  # the head's output is ``stride * (H // stride)`` wide
            logits = F.interpolate(
                logits,
                size=x.shape[2:],
                mode=interpolation_mode("bilinear", self.dims),
                align_corners=True,
            )
        return branch_probabilities(logits, output.has_object[-1] if self.cgm else None)

    def _final_branch(self, level: int) -> Position:
        """``X[0][level]``, after checking that it has a head."""
        if (0, level) not in self.branches:
            heads = ", ".join(node_name(p) for p in self.branches)
            raise ValueError(
                f"level {level}: no head on X[0][{level}]; heads exist on {heads} "
                "(build with deep_supervision='top' or 'all' to prune)"
            )
        return (0, level)

    def prune(self, level: int) -> "GridUNet":
        """The sub-network ``L^level`` as a standalone network carrying this one's weights.

        Embedded training (SPEC section 2): train the full network with heads on the top row,
        prune for inference. The result computes only the nodes ``X[i][j]`` with
        ``i + j <= level`` and the head (and CGM) on ``X[0][level]``; it is the network
        isolated training builds (``GridUNet`` on ``encoder.truncated(level)`` with the first
        ``level`` decoder widths, as ``create_model(arch, level=level)``: same modules, same
        parameter count), with copies of this network's parameters and buffers, in this
        network's train/eval mode, device and dtype. Its output equals ``self(x)``'s branch
        ``X[0][level]``. Any encoder: a detectron2 bottom-up is kept whole (its levels beyond
        ``level`` are no longer read), and on a strided encoder ``X[0][level]`` keeps its own
        head at its node's resolution (not the ``UpsamplingHead`` isolated training builds), so
        the pruned network has exactly the full network's parameters of the nodes it computes.

        Raises:
            ValueError: ``level`` is not a pruning level of this scheme (``unet`` and ``3plus``
                have no ``X[0][k]``, ``k < L``), or ``X[0][level]`` has no head.
        """
        self.decoder.grid.pruned(level)  # a clear error for non-nested schemes or bad levels
        if (0, level) not in self.branches:
            raise ValueError(
                f"prune({level}): X[0][{level}] has no head (build with deep_supervision='top' "
                "or 'all')"
            )
        decoder = self.decoder
        pruned = GridUNet(
            self.scheme,
            classes=self.classes,
            encoder=self.encoder.truncated(level),
            widths=decoder.widths[:level],
            upsample_widths=self.upsample_widths,
            full_scale=decoder.full_scale,
            full_scale_channels=decoder.full_scale_channels,
            project_channels=decoder.project_channels,
            norm=self.norm,
            upsample_mode=decoder.upsample_mode,
            reduce_upsampled=decoder.reduce_upsampled,
            head_relu=self.head_relu,
            cgm=self.cgm,
            cgm_dropout=self.cgm_dropout,
            kernel_size=decoder.kernel_size,
        )
        # X[0][level]'s trained head, whatever kind the new network's final head would be
        key = node_key((0, level))
        pruned.heads[key] = copy.deepcopy(self.heads[key])
        # the sub-network's modules have the same names (encoder, node and branch keys)
        state = self.state_dict()
        pruned.load_state_dict({name: state[name] for name in pruned.state_dict()})
        reference = next(self.parameters())
        return pruned.to(device=reference.device, dtype=reference.dtype).train(self.training)

    def extra_repr(self) -> str:
        branches = ", ".join(node_name(p) for p in self.branches)
        return f"deep_supervision={self.deep_supervision!r}, cgm={self.cgm}, branches: {branches}"


def create_model(
    arch: str,
    in_channels: Optional[int] = None,
    classes: int = 1,
    deep_supervision: Union[bool, str] = False,
    level: int = 4,
    full_scale: str = "upsample",
    *,
    head_relu: bool = False,
    cgm: bool = False,
    cgm_dropout: float = 0.5,
) -> GridUNet:
    """Build a UNet-family network of the paper, randomly (He) initialized.

    Args:
        arch: one of ``ALL_ARCHS``: ``"unet"``, ``"wunet"``, ``"unet2plus"``, ``"unet3plus"``,
            ``"unet_sharp"`` (2-D), or the 3-D V-Net family ``"vnet"``, ``"wvnet"``,
            ``"vnet2plus"``, ``"vnet3plus"``, ``"vnet_sharp"`` (``VNET_ARCHS``: the same grid,
            ``dims=3``, 5x5x5 node convs; module docstring).
        in_channels: image channels; default the arch's (3 for the 2-D archs, 1 for the
            V-Net family's CT volumes).
        classes: output logit channels.
        deep_supervision: ``False``; ``True`` for the arch's own (UNet, UNet3+: ``"decoder"``,
            UNet++: ``"top"``, UNet#: ``"all"``, 8 branches); or ``"top"``, ``"decoder"``,
            ``"all"`` (module docstring).
        level: ``L`` in 1..4: the isolated sub-network with rows ``0..L`` (the paper's isolated
            training of pruning level ``L^k``); 4 is the full network.
        full_scale: UNet#'s full-scale op, ``"upsample"`` (official code, default) or
            ``"conv"`` (the paper's 9.71M parameter count); only ``unet_sharp`` has it.
        head_relu: ReLU after every head (the paper's text; the official code has none).
        cgm: classification-guided modules on every branch (``SegmentationOutput``).
        cgm_dropout: dropout probability inside the CGMs.

    Returns:
        A ``GridUNet`` on a ``VGGEncoder``; ``model(x)`` maps ``(N, in_channels, H, W)`` to
        ``(N, classes, H, W)`` logits (V-Net family: ``(N, in_channels, D, H, W)`` to
        ``(N, classes, D, H, W)``), a list of branch logits with deep supervision, or a
        ``SegmentationOutput`` with ``cgm``; ``model.predict_probabilities(x)`` to the final
        branch's probabilities.
    """
    if arch not in ALL_ARCHS:
        raise ValueError(f"unknown arch {arch!r}; expected one of {sorted(ALL_ARCHS)}")
    spec = ALL_ARCHS[arch]
    if not 1 <= level <= len(spec.channels) - 1:
        raise ValueError(f"level must be in 1..{len(spec.channels) - 1}, got {level}")
    if full_scale != "upsample" and not SCHEME_FACTS[spec.scheme].full_scale_skips:
        raise ValueError(f"full_scale={full_scale!r} only applies to 'unet_sharp', not {arch!r}")
    return GridUNet(
        spec.scheme,
        spec.in_channels if in_channels is None else in_channels,
        classes,
        spec.channels[: level + 1],
        deep_supervision=deep_supervision,
        full_scale=full_scale,
        head_relu=head_relu,
        cgm=cgm,
        cgm_dropout=cgm_dropout,
        kernel_size=spec.kernel_size,
        dims=spec.dims,
    )
