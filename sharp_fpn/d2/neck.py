"""FPN necks with UNet++ / UNet3+ / UNet# skips for detectron2 (SPEC section 3).

"We redesign the plain skip connections of FPN with ++, +++ and # schemes." The bottom-up's
C2..C5 (strides 4..32), each through a 1x1 lateral conv, become column 0 of a depth-3 grid
(levels 0..3); ``sharp_fpn.models.GridDecoder`` computes the scheme's decoder nodes; the grid's
anti-diagonal ``X[3][0], X[2][1], X[1][2], X[0][3]`` becomes p5..p2, and p6 is p5 max-pooled
(detectron2's ``LastLevelMaxPool``). Which node feeds which is ``sharp_fpn.grid``'s business
alone: nothing here names a node.

Registered builders (``MODEL.BACKBONE.NAME``):

- ``build_resnet_grid_fpn_backbone``: detectron2's ResNet (or a narrower one,
  ``MODEL.RESNETS.STAGE_WIDTHS``: :mod:`.resnet`) + ``GridFPN``;
- ``build_resnet_plain_fpn_backbone``: the same ResNet + detectron2's own ``FPN``, unchanged
  (the shipped models' baseline);
- ``build_vgg16_grid_fpn_backbone``: ``sharp_fpn.d2.vgg.VGG`` + ``GridFPN``;
- ``build_vgg16_fpn_backbone``: the VGG bottom-up + detectron2's own ``FPN``, unchanged (the
  plain-FPN VGG16 rows; the R101 rows use detectron2's ``build_resnet_fpn_backbone``).
"""
from __future__ import annotations

import math
from typing import Callable, Dict, List, Sequence

import fvcore.nn.weight_init as weight_init
from detectron2.layers import Conv2d, ShapeSpec, get_norm
from detectron2.modeling import BACKBONE_REGISTRY, Backbone
from detectron2.modeling.backbone.fpn import FPN, LastLevelMaxPool
from torch import Tensor, nn

from .config import check_value
from ..grid import SCHEMES
from ..models.blocks import BLOCKS, UPSAMPLE_MODES
from ..models.blocks import get_norm as grid_get_norm
from ..models.grid_decoder import FULL_SCALE_OPS, GridDecoder
from .resnet import build_resnet_bottom_up
from .vgg import build_vgg_backbone

NORMS = ("", "GN", "BN", "SyncBN", "FrozenBN", "nnSyncBN", "naiveSyncBN")


def norm_factory(norm: str) -> Callable[[int], nn.Module]:
    """``channels -> norm layer`` for a neck norm name (one of ``NORMS``).

    ``""`` gives ``nn.Identity``; ``"GN"`` GroupNorm with ``gcd(32, C)`` groups (any width, so
    tiny test widths too; 32 groups for the usual multiples of 32, as detectron2's); every other
    name detectron2's ``get_norm`` (SyncBN and friends for multi-GPU training).
    """
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
    if norm in ("", "GN"):
        return lambda channels: grid_get_norm(norm, channels)
    return lambda channels: get_norm(norm, channels)


def column_strides(shapes: Dict[str, ShapeSpec], in_features: Sequence[str], owner: str) -> List[int]:
    """Strides of the bottom-up maps ``in_features`` that form a grid's column 0, finest first.

    They must name at least two of the bottom-up's outputs (``shapes``), with strides doubling
    from one to the next; otherwise a ValueError names ``owner`` and what is wrong.
    """
    missing = [f for f in in_features if f not in shapes]
    if missing or len(in_features) < 2:
        raise ValueError(
            f"{owner}: in_features must name at least two of the bottom-up's outputs "
            f"{list(shapes)}, got {list(in_features)}"
        )
    strides = [shapes[f].stride for f in in_features]
    if any(b != 2 * a for a, b in zip(strides, strides[1:])):
        raise ValueError(
            f"{owner}: the strides of {list(in_features)} must double from one to the next, "
            f"got {strides}"
        )
    return strides


class GridFPN(Backbone):
    """An FPN whose top-down pathway is a UNet-family grid.

    ``forward(image)``: ``(N, 3, H, W)`` with ``H, W`` multiples of ``size_divisibility`` (32)
    -> ``{"p2": (N, out_channels, H / 4, W / 4), ..., "p6": (N, out_channels, H / 64, W / 64)}``
    (names from the input strides: ``p<log2 stride>``, one more level from the max-pool).

    Layers, for levels ``i = 0..L`` (``L = len(in_features) - 1``):

    - ``lateral_convs[i]``: 1x1 conv (+ norm) from ``in_features[i]`` to ``widths[i]``, the
      grid's column 0 ``X[i][0]``.
    - ``decoder``: every decoder node of ``scheme`` (``GridDecoder``), node ``X[i][j]`` with
      ``widths[i]`` channels.
    - ``output_convs[i]``: the anti-diagonal node ``X[i][L - i]`` to ``out_channels`` (+ norm).
      A 1x1 conv for the decoder nodes: their op already ends in a conv3x3-norm-ReLU over the
      upsampled maps, which is what FPN's 3x3 output conv is for (FPN merges by a sum, with no
      conv), so 1x1 only changes the width, linearly (outputs signed like FPN's), at 1/9 of the
      cost. A 3x3 conv for ``X[L][0]``: a 1x1 lateral alone, as in FPN's own p5 path.
    - ``top_block``: p6 = ``max_pool2d(p5, kernel_size=1, stride=2)``.

    Args:
        bottom_up: the backbone whose ``in_features`` feed the grid.
        in_features: names of its maps, finest first, strides doubling (e.g. ``res2..res5``).
        out_channels: channels of every output (RPN and ROI heads need one count).
        scheme: ``"2plus"``, ``"3plus"``, ``"sharp"`` (or ``"unet"``): see ``sharp_fpn.grid``.
        widths: channels of the grid's nodes per level ``0..L`` (laterals and decoder nodes).
        node_op: ``"f2"`` (the paper's) or ``"f"``.
        norm: one of ``NORMS`` (see :func:`norm_factory`); convs have biases only without norm.
        full_scale: UNet#'s ``F``, ``"upsample"`` or ``"conv"`` (to ``widths[0]`` channels).
        upsample_mode: interpolation of the grid's upsamplings (``"nearest"``, as FPN's).
        reduce_upsampled: reduce wide upsampled inputs by a 1x1 conv at their own resolution
            (``GridDecoder``); UNet3+ projects each input to ``widths[0]`` channels.
    """

    def __init__(
        self,
        bottom_up: Backbone,
        in_features: Sequence[str],
        out_channels: int,
        scheme: str,
        widths: Sequence[int],
        *,
        node_op: str = "f2",
        norm: str = "GN",
        full_scale: str = "upsample",
        upsample_mode: str = "nearest",
        reduce_upsampled: bool = True,
    ):
        super().__init__()
        shapes = bottom_up.output_shape()
        strides = column_strides(shapes, in_features, "GridFPN")
        if len(widths) != len(in_features):
            raise ValueError(
                f"GridFPN: widths needs one entry per input level ({len(in_features)}), "
                f"got {list(widths)}"
            )
        depth = len(in_features) - 1
        make_norm = norm_factory(norm)
        use_bias = norm == ""

        self.bottom_up = bottom_up
        self.in_features = tuple(in_features)
        self.lateral_convs = nn.ModuleList(
            Conv2d(shapes[f].channels, w, 1, bias=use_bias, norm=make_norm(w))
            for f, w in zip(in_features, widths)
        )
        self.decoder = GridDecoder(
            scheme,
            depth,
            widths,
            widths[:depth],
            block=node_op,
            norm=make_norm,
            full_scale=full_scale,
            full_scale_channels=widths[0],
            project_channels=widths[0],
            upsample_mode=upsample_mode,
            reduce_upsampled=reduce_upsampled,
        )
        # the anti-diagonal, finest first: X[0][L] (p2), ..., X[L][0]
        self.output_nodes = self.decoder.grid.neck_outputs
        self.output_convs = nn.ModuleList()
        for i, j in self.output_nodes:
            kernel = 3 if j == 0 else 1  # column 0: a lateral alone, as FPN's p5
            self.output_convs.append(
                Conv2d(
                    widths[i],
                    out_channels,
                    kernel,
                    padding=kernel // 2,
                    bias=use_bias,
                    norm=make_norm(out_channels),
                )
            )
        for conv in [*self.lateral_convs, *self.output_convs]:
            weight_init.c2_xavier_fill(conv)
        self.top_block = LastLevelMaxPool()

        names = [f"p{int(math.log2(s))}" for s in strides]
        names.append(f"p{int(math.log2(strides[-1])) + 1}")
        self._out_features: List[str] = names
        self._out_feature_strides: Dict[str, int] = {n: 2 ** int(n[1:]) for n in names}
        self._out_feature_channels: Dict[str, int] = {n: out_channels for n in names}
        self._size_divisibility = strides[-1]

    @property
    def size_divisibility(self) -> int:
        """Inputs are padded to multiples of the coarsest input stride (32 for C2..C5)."""
        return self._size_divisibility

    def forward(self, x: Tensor) -> Dict[str, Tensor]:
        """``(N, C, H, W)`` image -> ``{"p2": ..., "p6": ...}`` (see the class doc)."""
        bottom_up = self.bottom_up(x)
        column0 = [conv(bottom_up[f]) for conv, f in zip(self.lateral_convs, self.in_features)]
        nodes = self.decoder(column0)
        results = [conv(nodes[p]) for conv, p in zip(self.output_convs, self.output_nodes)]
        results.extend(self.top_block(results[-1]))
        return dict(zip(self._out_features, results))


def grid_fpn_from_config(cfg, bottom_up: Backbone) -> GridFPN:
    """``GridFPN`` on ``bottom_up`` from ``MODEL.SHARP_FPN.*`` and ``MODEL.FPN.{IN_FEATURES,
    OUT_CHANNELS}``; every value checked, errors naming the key."""
    c = cfg.MODEL.SHARP_FPN
    for key, value, allowed in [
        ("SCHEME", c.SCHEME, SCHEMES),
        ("NODE_OP", c.NODE_OP, BLOCKS),
        ("NORM", c.NORM, NORMS),
        ("FULL_SCALE", c.FULL_SCALE, FULL_SCALE_OPS),
        ("UPSAMPLE", c.UPSAMPLE, UPSAMPLE_MODES),
    ]:
        check_value(f"MODEL.SHARP_FPN.{key}", value, value in allowed, f"one of {allowed}")
    in_features = cfg.MODEL.FPN.IN_FEATURES
    check_value(
        "MODEL.SHARP_FPN.WIDTHS",
        c.WIDTHS,
        len(c.WIDTHS) == len(in_features) and all(w > 0 for w in c.WIDTHS),
        f"one positive width per MODEL.FPN.IN_FEATURES {list(in_features)}",
    )
    return GridFPN(
        bottom_up,
        in_features,
        cfg.MODEL.FPN.OUT_CHANNELS,
        c.SCHEME,
        c.WIDTHS,
        node_op=c.NODE_OP,
        norm=c.NORM,
        full_scale=c.FULL_SCALE,
        upsample_mode=c.UPSAMPLE,
        reduce_upsampled=c.REDUCE_UPSAMPLED,
    )


@BACKBONE_REGISTRY.register()
def build_resnet_grid_fpn_backbone(cfg, input_shape: ShapeSpec) -> GridFPN:
    """detectron2's ResNet (``MODEL.RESNETS.*``, any width: :mod:`.resnet`) + ``GridFPN``
    (``MODEL.SHARP_FPN.*``)."""
    return grid_fpn_from_config(cfg, build_resnet_bottom_up(cfg, input_shape))


@BACKBONE_REGISTRY.register()
def build_vgg16_grid_fpn_backbone(cfg, input_shape: ShapeSpec) -> GridFPN:
    """VGG (``MODEL.VGG.*``, 16 by default) + ``GridFPN`` (``MODEL.SHARP_FPN.*``)."""
    return grid_fpn_from_config(cfg, build_vgg_backbone(cfg, input_shape))


def plain_fpn(cfg, bottom_up: Backbone) -> FPN:
    """detectron2's own FPN (``MODEL.FPN.*``) and p6 max-pool on ``bottom_up``, as detectron2's
    ``build_resnet_fpn_backbone`` builds it."""
    return FPN(
        bottom_up=bottom_up,
        in_features=cfg.MODEL.FPN.IN_FEATURES,
        out_channels=cfg.MODEL.FPN.OUT_CHANNELS,
        norm=cfg.MODEL.FPN.NORM,
        top_block=LastLevelMaxPool(),
        fuse_type=cfg.MODEL.FPN.FUSE_TYPE,
    )


@BACKBONE_REGISTRY.register()
def build_vgg16_fpn_backbone(cfg, input_shape: ShapeSpec) -> FPN:
    """VGG (``MODEL.VGG.*``) + detectron2's own FPN (:func:`plain_fpn`)."""
    return plain_fpn(cfg, build_vgg_backbone(cfg, input_shape))


@BACKBONE_REGISTRY.register()
def build_resnet_plain_fpn_backbone(cfg, input_shape: ShapeSpec) -> FPN:
    """detectron2's FPN on :func:`~.resnet.build_resnet_bottom_up`: the same as detectron2's
    ``build_resnet_fpn_backbone``, with ``MODEL.RESNETS.STAGE_WIDTHS`` honoured."""
    return plain_fpn(cfg, build_resnet_bottom_up(cfg, input_shape))
