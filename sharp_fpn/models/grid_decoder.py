"""``GridDecoder``: the decoder of any scheme, built only from ``sharp_fpn.grid``'s listing."""
from __future__ import annotations

from typing import Dict, Mapping, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..grid import FULL_SCALE, Input, Node, Position, build_grid, node_key, node_name
from .blocks import (
    UPSAMPLE_MODES,
    ConvNormReLU,
    Norm,
    check_dims,
    conv_nd,
    get_norm,
    he_init_,
    interpolation_mode,
    node_block,
    resample,
)

FULL_SCALE_OPS = ("upsample", "conv")
Features = Union[Sequence[Tensor], Mapping[int, Tensor]]


def _edge_key(node: Position, source: Position) -> str:
    """``((0, 3), (3, 0))`` -> ``"0_3_from_3_0"``: the input edge ``X[3][0] -> X[0][3]``."""
    return f"{node_key(node)}_from_{node_key(source)}"


class GridDecoder(nn.Module):
    """Every decoder node (column ``j >= 1``) of one scheme, fed with given column-0 features.

    The grid's column 0 (the encoder) is the input: a backbone's features, one map per level.
    Each decoder node ``X[I][J]`` resamples its inputs to the size of ``X[I][0]``, concatenates
    them in the grid's order and applies its op. Nothing here names a node: walk the listing,
    attach an op per input role.

    Ops per input role:

    - ``dense``, ``up`` (and UNet3+'s ``encoder_down``, ``decoder_up``): resampling only
      (``up`` uses ``upsample_mode``, pooling is max-pooling).
    - ``full_scale`` (UNet#'s ``F``): ``full_scale="upsample"`` (the official code's live
      version) upsamples only, channels unchanged; ``full_scale="conv"`` (its commented-out
      version) upsamples, then a conv3x3 to ``full_scale_channels`` (one conv per source node,
      shared by all its uses), one norm shared by all full-scale terms, ReLU.
    - UNet3+ (nodes with ``project_inputs``): every resampled input through its own ``f`` to
      ``project_channels``, then the node's op on the concatenation.

    ``reduce_upsampled`` bounds the cost of wide, deep inputs at fine levels: every upsampled
    input wider than the conv that reads it (the node's width; UNet3+'s ``project_channels``)
    first goes through its own bias-free 1x1 conv to that width, at its source's resolution,
    and is upsampled afterwards. A bias-free 1x1 conv commutes with interpolation (one mixes
    channels, the other pixels, both linearly), so this is exactly a 1x1 reduction after the
    upsampling, computed on ``4**k`` times fewer pixels: it limits the rank of the node conv's
    weights on that input, nothing else. Full-scale terms with ``full_scale="conv"`` keep their
    own (shared) conv and are not reduced.

    Args:
        scheme: ``"unet"``, ``"2plus"``, ``"3plus"`` or ``"sharp"``.
        depth: ``L``; levels ``0..L``, level ``i`` at half the resolution of level ``i-1``.
        in_channels: channels of the column-0 feature of each level ``0..L`` (``L + 1`` ints).
        widths: output channels of the decoder nodes of each level ``0..L-1`` (``L`` ints, or
            one int for all); level ``L`` holds only the column-0 node.
        block: the node op: ``"f2"`` (two conv3x3-norm-ReLU, the paper's) or ``"f"`` (one).
        norm: ``"BN"``, ``"GN"``, ``""`` or a factory ``channels -> nn.Module``.
        full_scale: ``"upsample"`` or ``"conv"`` (see above; UNet# only).
        full_scale_channels: output channels of the ``"conv"`` full-scale op (32 officially).
        project_channels: UNet3+'s common width of the projected inputs (CatChannels, 32).
        upsample_mode: ``F.interpolate`` mode of every upsampling: ``"bilinear"`` (official,
            ``align_corners=True``) or ``"nearest"`` (detectron2's FPN).
        reduce_upsampled: reduce wide upsampled inputs at their source's resolution (see
            above). Off by default: the paper's networks.
        kernel_size: kernel side of every node conv (the node ops, UNet3+'s projections and
            the ``"conv"`` full-scale op): 3, the paper's 2-D nodes; 5 for the V-Net family.
        dims: spatial dimensions, 2 (``(N, C, H, W)`` maps) or 3 (``(N, C, D, H, W)``
            volumes: Conv3d, BatchNorm3d, 3-D pooling, ``"bilinear"`` interpolating
            trilinearly). Every "conv3x3" above is then ``kernel_size**dims``.

    Attributes:
        grid: the ``sharp_fpn.grid.Grid`` listing this decoder computes.
        node_channels: ``{(i, j): channels}`` of every node's output, column 0 included.
    """

    def __init__(
        self,
        scheme: str,
        depth: int,
        in_channels: Sequence[int],
        widths: Union[int, Sequence[int]],
        *,
        block: str = "f2",
        norm: Norm = "BN",
        full_scale: str = "upsample",
        full_scale_channels: int = 32,
        project_channels: int = 32,
        upsample_mode: str = "bilinear",
        reduce_upsampled: bool = False,
        kernel_size: int = 3,
        dims: int = 2,
    ):
        super().__init__()
        self.grid = build_grid(scheme, depth)
        self.dims = check_dims(dims)
        self.kernel_size = kernel_size
        if len(in_channels) != depth + 1:
            raise ValueError(
                f"in_channels needs one entry per level 0..{depth} ({depth + 1}), "
                f"got {list(in_channels)}"
            )
        widths = [widths] * depth if isinstance(widths, int) else list(widths)
        if len(widths) != depth:
            raise ValueError(
                f"widths needs one entry per decoder level 0..{depth - 1} ({depth}), got {widths}"
            )
        if full_scale not in FULL_SCALE_OPS:
            raise ValueError(f"full_scale must be one of {FULL_SCALE_OPS}, got {full_scale!r}")
        if upsample_mode not in UPSAMPLE_MODES:
            raise ValueError(
                f"upsample_mode must be one of {UPSAMPLE_MODES}, got {upsample_mode!r}"
            )
        interpolation_mode(upsample_mode, dims)  # a clear error for modes without a 3-D form
        self.widths = widths
        self.full_scale = full_scale
        self.full_scale_channels = full_scale_channels
        self.project_channels = project_channels
        self.upsample_mode = upsample_mode
        self.reduce_upsampled = reduce_upsampled

        self.node_channels: Dict[Position, int] = {
            (i, j): in_channels[i] if j == 0 else widths[i] for i, j in self.grid.positions
        }

        # UNet# F = conv: one conv per source node (in grid order), one norm for all terms
        self.full_scale_convs = nn.ModuleDict()
        self.full_scale_norm: Optional[nn.Module] = None
        if full_scale == "conv":
            sources = [x.source for n in self.grid for x in n.inputs if x.role == FULL_SCALE]
            for source in dict.fromkeys(sources):
                self.full_scale_convs[node_key(source)] = conv_nd(dims)(
                    self.node_channels[source],
                    full_scale_channels,
                    kernel_size,
                    padding=kernel_size // 2,
                )
            if sources:
                self.full_scale_norm = get_norm(norm, full_scale_channels, dims)

        # reduce_upsampled: one 1x1 conv per reduced input edge, applied before upsampling
        self.reductions = nn.ModuleDict()
        for node in self.grid:
            for x in node.inputs:
                width = self._reduced_width(node, x)
                if width is not None:
                    self.reductions[_edge_key(node.position, x.source)] = conv_nd(dims)(
                        self.node_channels[x.source], width, 1, bias=False
                    )

        self.blocks = nn.ModuleDict()  # the op of each decoder node
        self.projections = nn.ModuleDict()  # UNet3+: one f per input of each node
        for node in self.grid:
            if node.column == 0:
                continue
            if node.project_inputs:
                self.projections[node_key(node.position)] = nn.ModuleList(
                    ConvNormReLU(
                        self._input_width(node, x), project_channels, norm, kernel_size, dims
                    )
                    for x in node.inputs
                )
                concat_width = project_channels * len(node.inputs)
            else:
                concat_width = sum(self._input_width(node, x) for x in node.inputs)
            self.blocks[node_key(node.position)] = node_block(
                block, concat_width, widths[node.level], norm, kernel_size, dims
            )
        he_init_(self)

    def forward(self, features: Features, level: Optional[int] = None) -> Dict[Position, Tensor]:
        """Compute the decoder nodes.

        Args:
            features: the column-0 maps ``X[i][0]``, ``(N, in_channels[i], H_i, W_i)`` with
                ``H_i ~ H_0 / 2**i`` (3-D: ``(N, in_channels[i], D_i, H_i, W_i)``), as a list
                indexed by level or a ``{level: tensor}`` dict.
            level: compute only the sub-network pruned to this level (nodes needed by
                ``X[0][level]``; ``i + j <= level`` for the nested schemes); then only the
                features of levels ``0..level`` are read.

        Returns:
            ``{(i, j): (N, node_channels[(i, j)], H_i, W_i)}`` for every computed node,
            column 0 included (``grid.decoder_outputs`` lists the anti-diagonal).
        """
        grid = self.grid if level is None else self.grid.pruned(level)
        nodes: Dict[Position, Tensor] = {}
        for node in grid:
            i, j = node.position
            if j == 0:
                x = features[i]
                if x.shape[1] != self.node_channels[(i, 0)]:
                    raise ValueError(
                        f"GridDecoder: the level-{i} feature has {x.shape[1]} channels, "
                        f"expected in_channels[{i}] = {self.node_channels[(i, 0)]}"
                    )
                nodes[(i, 0)] = x
                continue
            size = nodes[(i, 0)].shape[2:]
            parts = [self._prepare(node, k, x, nodes, size) for k, x in enumerate(node.inputs)]
            nodes[(i, j)] = self.blocks[node_key((i, j))](torch.cat(parts, dim=1))
        return nodes

    def _reduced_width(self, node: Node, x: Input) -> Optional[int]:
        """The width ``reduce_upsampled`` brings input ``x`` of ``node`` to, or None."""
        if not self.reduce_upsampled or x.scale <= 0:
            return None
        if x.role == FULL_SCALE and self.full_scale == "conv":
            return None  # F has its own conv, shared by all uses of its source
        target = self.project_channels if node.project_inputs else self.widths[node.level]
        return target if self.node_channels[x.source] > target else None

    def _input_width(self, node: Node, x: Input) -> int:
        """Channels of input ``x`` once prepared for ``node`` (before any UNet3+ projection)."""
        if x.role == FULL_SCALE and self.full_scale == "conv":
            return self.full_scale_channels
        reduced = self._reduced_width(node, x)
        return self.node_channels[x.source] if reduced is None else reduced

    def _prepare(
        self, node: Node, index: int, x: Input, nodes: Dict[Position, Tensor], size: torch.Size
    ) -> Tensor:
        """The ``index``-th input of ``node``, resampled to ``size``, through its ops if any."""
        t = nodes[x.source]
        edge = _edge_key(node.position, x.source)
        if edge in self.reductions:  # at the source's resolution, before upsampling
            t = self.reductions[edge](t)
        t = resample(t, x.scale, size, self.upsample_mode)
        if node.project_inputs:
            return self.projections[node_key(node.position)][index](t)
        if x.role == FULL_SCALE and self.full_scale == "conv":
            return F.relu(self.full_scale_norm(self.full_scale_convs[node_key(x.source)](t)))
        return t

    def extra_repr(self) -> str:
        outputs = ", ".join(node_name(p) for p in self.grid.decoder_outputs)
        return f"scheme={self.grid.scheme!r}, depth={self.grid.depth}, outputs: {outputs}"
