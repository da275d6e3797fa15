"""ResNet bottom-ups of any width: detectron2's ResNet, or a narrower basic-block one.

detectron2's ``build_resnet_backbone`` fixes the widths of ResNet-18/34 (64, 128, 256, 512; it
asserts ``RES2_OUT_CHANNELS == 64``). The shipped nuclei models must predict a megapixel a
second on two CPU cores, where ResNet-18's bottom-up alone takes 0.8 s per megapixel; half its
widths take a quarter of the time (``tools/benchmark.py zoo``). ``MODEL.RESNETS.STAGE_WIDTHS``
gives res2..res5 their widths; the network is otherwise detectron2's own, from its parts: its
``BasicStem`` (of ``STAGE_WIDTHS[0]`` channels) and ``BasicBlock`` stages of
``[2, 2, 2, 2]`` (depth 18) or ``[3, 4, 6, 3]`` (depth 34) blocks, ``MODEL.RESNETS.NORM``,
``FREEZE_AT`` and ``OUT_FEATURES`` as detectron2 reads them. Empty ``STAGE_WIDTHS`` (the
default) is detectron2's ``build_resnet_backbone``, unchanged. ``sharp_fpn.d2.neck`` puts the
grid necks and detectron2's plain FPN (``build_resnet_plain_fpn_backbone``) on it.
"""
from __future__ import annotations

from detectron2.layers import ShapeSpec
from detectron2.modeling.backbone import Backbone
from detectron2.modeling.backbone.resnet import BasicBlock, BasicStem, ResNet, build_resnet_backbone

from .config import check_value

__all__ = ["BASIC_BLOCKS", "build_resnet_bottom_up"]

#: Basic blocks per stage (res2..res5) of the depths that use them.
BASIC_BLOCKS = {18: [2, 2, 2, 2], 34: [3, 4, 6, 3]}


def build_resnet_bottom_up(cfg, input_shape: ShapeSpec) -> Backbone:
    """The ResNet of ``MODEL.RESNETS.*`` (module docstring)."""
    r = cfg.MODEL.RESNETS
    widths = list(r.STAGE_WIDTHS)
    if not widths:
        return build_resnet_backbone(cfg, input_shape)
    check_value("MODEL.RESNETS.DEPTH", r.DEPTH, r.DEPTH in BASIC_BLOCKS,
                f"one of {sorted(BASIC_BLOCKS)} with MODEL.RESNETS.STAGE_WIDTHS (basic blocks)")
    check_value("MODEL.RESNETS.STAGE_WIDTHS", widths,
                len(widths) == 4 and all(int(w) > 0 for w in widths),
                "four positive widths, res2..res5, or [] for detectron2's")
    stem = BasicStem(input_shape.channels, widths[0], norm=r.NORM)
    stages, channels = [], widths[0]
    for index, (blocks, width) in enumerate(zip(BASIC_BLOCKS[r.DEPTH], widths)):
        first_stride = 1 if index == 0 else 2
        stages.append(ResNet.make_stage(
            BasicBlock, blocks, in_channels=channels, out_channels=width,
            stride_per_block=[first_stride] + [1] * (blocks - 1), norm=r.NORM,
        ))
        channels = width
    return ResNet(stem, stages, out_features=r.OUT_FEATURES).freeze(cfg.MODEL.BACKBONE.FREEZE_AT)
