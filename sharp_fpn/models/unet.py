"""The UNet family of the paper (UNet, WUNet, UNet++, UNet3+, UNet#) as one grid network.

``create_model(arch)`` = a VGG encoder (the grid's column 0) + ``GridDecoder`` + conv heads on
chosen nodes (the branches), optionally with UNet#'s classification-guided modules (CGM).
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

Deep supervision (SPEC section 2). The branches are read off the grid, never named by hand:

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
deepest first, then the final ``X[0][L]`` last. Each branch's logits come at its node's
resolution (``H / 2**i``); ``sharp_fpn.losses.deep_supervision_loss`` either max-pools the
ground truth down to it (the paper's) or upsamples the logits (the official code's).

Pruning (the paper's fast mode): ``GridUNet.prune(k)`` of a model trained with heads on the top
row returns a standalone network that computes only the nodes ``i + j <= k`` and the head (and
CGM) on ``X[0][k]``: the same module as ``create_model(arch, level=k)`` (isolated training),
carrying the trained weights, so with the same parameter count.

UNet3+: the paper reports 9.79M, which is not reproducible. The official UNet3+ design
(encoder as here; five inputs per decoder node, each through conv3x3-BN-ReLU to CatChannels =
32; fusion conv3x3-BN-ReLU at UpChannels = 5 * 32 = 160; 3x3 output conv) at widths
[32, 64, 128, 256, 512] has 6,748,993 parameters, and the paper gives no widths or blocks
that would add the missing ~3M. This project implements the official design.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from ..grid import SCHEMES, Grid, Position, node_name
from .blocks import VGGBlock, he_init_
from .grid_decoder import GridDecoder
from .heads import ClassificationGuidedModule, SegmentationHead

PAPER_CHANNELS = (32, 64, 128, 256, 512)
WIDE_CHANNELS = (35, 70, 140, 280, 560)

DEEP_SUPERVISION_MODES = ("top", "decoder", "all")
DEFAULT_DEEP_SUPERVISION = {"unet": "decoder", "2plus": "top", "3plus": "decoder", "sharp": "all"}
"""What ``deep_supervision=True`` means per scheme: each paper's own deep supervision."""


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


def count_parameters(module: nn.Module) -> int:
    """Number of parameters (trainable or not) of ``module``; buffers are not counted."""
    return sum(p.numel() for p in module.parameters())


def supervised_branches(grid: Grid, mode: Optional[str]) -> Tuple[Position, ...]:
    """The nodes that get a head, in output order; the final ``X[0][L]`` is always last.

    Args:
        grid: the network's connectivity.
        mode: ``None`` (the final node only), ``"top"``, ``"decoder"`` or ``"all"`` (see the
            module docstring).

    Returns:
        ``X[0][1..L-1]`` (``"top"``, ``"all"``), then ``X[L][0], ..., X[1][L-1]``
        (``"decoder"``, ``"all"``), then ``X[0][L]``.
    """
    if mode is not None and mode not in DEEP_SUPERVISION_MODES:
        raise ValueError(
            f"deep_supervision must be a bool or one of {DEEP_SUPERVISION_MODES}, got {mode!r}"
        )
    final = grid.decoder_outputs[-1]  # X[0][L]
    top = tuple(sorted(p for p in grid.positions if p[0] == 0 and 0 < p[1] < final[1]))
    if mode in ("top", "all") and len(top) < final[1] - 1:
        raise ValueError(
            f"deep_supervision={mode!r}: scheme {grid.scheme!r} has no top-row nodes "
            f"X[0][1..{final[1] - 1}] (only the nested schemes '2plus' and 'sharp' have them); "
            "use 'decoder'"
        )
    decoder = tuple(p for p in grid.decoder_outputs if p[0] > 0)  # X[L][0], ..., X[1][L-1]
    return (
        (top if mode in ("top", "all") else ())
        + (decoder if mode in ("decoder", "all") else ())
        + (final,)
    )


@dataclass
class SegmentationOutput:
    """What a ``GridUNet`` built with ``cgm=True`` returns: per branch, logits and CGM logits.

    Attributes:
        logits: one ``(N, classes, H / 2**i, W / 2**i)`` tensor per branch ``X[i][j]``,
            un-gated (train the segmentation on these), in ``branches`` order.
        has_object: one ``(N, 2)`` tensor of CGM class logits per branch (class 1 = the
            image contains foreground); train with ``sharp_fpn.losses.cgm_loss``.
        branches: the ``(i, j)`` node of each branch; the final ``X[0][L]`` (or the pruning
            level's ``X[0][k]``) last.
    """

    logits: List[Tensor]
    has_object: List[Tensor]
    branches: Tuple[Position, ...]

    def gates(self) -> List[Tensor]:
        """Per branch, the CGM's decision as ``(N, 1, 1, 1)`` 0/1 factors (argmax)."""
        return [ClassificationGuidedModule.gate(c) for c in self.has_object]

    def probabilities(self, gated: bool = True) -> List[Tensor]:
        """Per branch, sigmoid probabilities ``(N, classes, h, w)``; with ``gated`` (the
        paper's inference) multiplied by the CGM's 0/1 decision, so a branch whose classifier
        says "no object" predicts all background."""
        probabilities = [torch.sigmoid(x) for x in self.logits]
        if not gated:
            return probabilities
        return [p * g for p, g in zip(probabilities, self.gates())]


ModelOutput = Union[Tensor, List[Tensor], SegmentationOutput]


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


def _key(position: Position) -> str:
    return f"{position[0]}_{position[1]}"


class GridUNet(nn.Module):
    """A UNet-family segmentation network: VGG encoder, grid decoder, heads on chosen nodes.

    Node ``X[i][j]`` has ``channels[i]`` channels (UNet3+: ``(L + 1) * channels[0]`` for the
    decoder nodes, with inputs projected to ``channels[0]`` and an ``f`` fusion, officially).
    The heads (``heads``, keyed ``"i_j"``) map a node to ``classes`` logits: 1x1 convs on the
    top row ``X[0][j]`` (UNet3+: 3x3, as its official code), 3x3 convs on the decoder branches.

    Args:
        scheme: ``"unet"``, ``"2plus"``, ``"3plus"`` or ``"sharp"``.
        in_channels: image channels.
        classes: output channels (logits).
        channels: encoder widths of levels ``0..L``; ``L = len(channels) - 1``.
        deep_supervision: ``False`` (one head, on ``X[0][L]``), ``"top"``, ``"decoder"``,
            ``"all"`` (see the module docstring), or ``True`` for the scheme's own
            (``DEFAULT_DEEP_SUPERVISION``).
        full_scale: UNet#'s full-scale op, ``"upsample"`` or ``"conv"``.
        norm: ``"BN"``, ``"GN"`` or ``""``.
        upsample_mode: ``"bilinear"`` (official, ``align_corners=True``) or ``"nearest"``.
        head_relu: a ReLU after every head (the paper's text); off by default as the official
            code (see ``SegmentationHead``).
        cgm: a classification-guided module on every branch (heavy on the two deepest
            decoder branches ``X[L][0]``, ``X[L-1][1]``, light elsewhere); ``forward`` then
            returns a ``SegmentationOutput``.
        cgm_dropout: dropout probability inside the CGMs.

    Attributes:
        branches: the supervised nodes, in output order (``supervised_branches``).
    """

    def __init__(
        self,
        scheme: str,
        in_channels: int = 3,
        classes: int = 1,
        channels: Sequence[int] = PAPER_CHANNELS,
        *,
        deep_supervision: Union[bool, str] = False,
        full_scale: str = "upsample",
        norm: str = "BN",
        upsample_mode: str = "bilinear",
        head_relu: bool = False,
        cgm: bool = False,
        cgm_dropout: float = 0.5,
    ):
        super().__init__()
        if scheme not in SCHEMES:
            raise ValueError(f"unknown scheme {scheme!r}; expected one of {SCHEMES}")
        depth = len(channels) - 1
        self.scheme = scheme
        self.in_channels = in_channels
        self.classes = classes
        self.channels = tuple(channels)
        self.full_scale = full_scale
        self.norm = norm
        self.upsample_mode = upsample_mode
        self.head_relu = head_relu
        self.cgm = cgm
        self.cgm_dropout = cgm_dropout

        self.encoder = VGGEncoder(in_channels, channels, norm)
        if scheme == "3plus":
            widths: Union[int, Sequence[int]] = (depth + 1) * channels[0]
            block, top_kernel = "f", 3
        else:
            widths, block, top_kernel = channels[:depth], "f2", 1
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

        if deep_supervision is True:
            mode: Optional[str] = DEFAULT_DEEP_SUPERVISION[scheme]
        else:
            mode = deep_supervision or None
        self.deep_supervision = mode
        self.branches = supervised_branches(self.decoder.grid, mode)
        # heavy CGMs on the two deepest decoder branches (X[4][0], X[3][1] at L = 4)
        heavy = {p for p in self.branches if p[0] > 0 and p[0] >= depth - 1}
        self.heads = nn.ModuleDict()
        self.cgms = nn.ModuleDict()
        for position in self.branches:
            width = self.decoder.node_channels[position]
            kernel = top_kernel if position[0] == 0 else 3
            self.heads[_key(position)] = SegmentationHead(width, classes, kernel, head_relu)
            if cgm:
                self.cgms[_key(position)] = ClassificationGuidedModule(
                    width, heavy=position in heavy, dropout=cgm_dropout
                )

    @property
    def depth(self) -> int:
        return self.decoder.grid.depth

    def forward_nodes(self, x: Tensor, level: Optional[int] = None) -> Dict[Position, Tensor]:
        """Every node's features, the hook for heads.

        ``(N, C, H, W)`` image -> ``{(i, j): (N, C_ij, H / 2**i, W / 2**i)}``.
        ``level`` computes only the sub-network pruned to ``X[0][level]``.
        """
        return self.decoder(self.encoder(x, level), level)

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
            with deep supervision and no ``level``, the list of every branch's logits
            ``(N, classes, H / 2**i, W / 2**i)`` in ``branches`` order, the final one last.
            With CGM: a ``SegmentationOutput`` holding the same branches (one if ``level`` is
            given or there is no deep supervision) and their class logits.
        """
        if level is not None and (0, level) not in self.branches:
            heads = ", ".join(node_name(p) for p in self.branches)
            raise ValueError(
                f"level {level}: no head on X[0][{level}]; heads exist on {heads} "
                "(build with deep_supervision='top' or 'all' to prune)"
            )
        branches = self.branches if level is None else ((0, level),)
        nodes = self.forward_nodes(x, level)
        logits = [self.heads[_key(p)](nodes[p]) for p in branches]
        if self.cgm:
            has_object = [self.cgms[_key(p)](nodes[p]) for p in branches]
            return SegmentationOutput(logits, has_object, branches)
        return logits if len(branches) > 1 else logits[0]

    def predict_probabilities(self, x: Tensor, level: Optional[int] = None) -> Tensor:
        """Inference: the final branch's (or ``X[0][level]``'s) sigmoid probabilities.

        ``(N, in_channels, H, W)`` image -> ``(N, classes, H, W)`` probabilities, multiplied by
        the branch's CGM 0/1 decision (argmax, per image) when the network has CGMs. Computes
        only the nodes that branch needs and only its head; traceable (``torch.export``,
        ``torch.jit.trace``): the CGM gate is a tensor op.
        """
        position = self._final_branch(level)
        nodes = self.forward_nodes(x, level)
        probabilities = torch.sigmoid(self.heads[_key(position)](nodes[position]))
        if self.cgm:
            gate = ClassificationGuidedModule.gate(self.cgms[_key(position)](nodes[position]))
            probabilities = probabilities * gate
        return probabilities

    def _final_branch(self, level: Optional[int]) -> Position:
        """``X[0][L]``, or ``X[0][level]`` after checking that it has a head."""
        if level is None:
            return self.branches[-1]
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
        ``create_model(arch, level=level)`` builds (same modules, same parameter count), with
        copies of this network's parameters and buffers, in this network's train/eval mode,
        device and dtype. Its output equals ``self(x)``'s branch ``X[0][level]``.

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
        pruned = GridUNet(
            self.scheme,
            self.in_channels,
            self.classes,
            self.channels[: level + 1],
            full_scale=self.full_scale,
            norm=self.norm,
            upsample_mode=self.upsample_mode,
            head_relu=self.head_relu,
            cgm=self.cgm,
            cgm_dropout=self.cgm_dropout,
        )
        # the sub-network's modules have the same names (stage index, node and branch keys)
        state = self.state_dict()
        pruned.load_state_dict({name: state[name] for name in pruned.state_dict()})
        reference = next(self.parameters())
        return pruned.to(device=reference.device, dtype=reference.dtype).train(self.training)

    def extra_repr(self) -> str:
        branches = ", ".join(node_name(p) for p in self.branches)
        return f"deep_supervision={self.deep_supervision!r}, cgm={self.cgm}, branches: {branches}"


def create_model(
    arch: str,
    in_channels: int = 3,
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
        arch: one of ``ARCHS``: ``"unet"``, ``"wunet"``, ``"unet2plus"``, ``"unet3plus"``,
            ``"unet_sharp"``.
        in_channels: image channels.
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
        A ``GridUNet``; ``model(x)`` maps ``(N, in_channels, H, W)`` to ``(N, classes, H, W)``
        logits, a list of branch logits with deep supervision, or a ``SegmentationOutput``
        with ``cgm``.
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
        head_relu=head_relu,
        cgm=cgm,
        cgm_dropout=cgm_dropout,
    )
