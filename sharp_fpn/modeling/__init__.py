"""detectron2 glue for sharp-fpn's models: the VGG bottom-up and the grid necks.

Importing this package registers the backbone builders with detectron2's ``BACKBONE_REGISTRY``:
``build_vgg_backbone``, ``build_resnet_grid_fpn_backbone``, ``build_vgg16_grid_fpn_backbone``
and ``build_vgg16_fpn_backbone``. The models themselves live in ``sharp_fpn.models`` and
``sharp_fpn.grid``, free of detectron2.
"""
from .neck import (
    GridFPN,
    build_resnet_grid_fpn_backbone,
    build_vgg16_fpn_backbone,
    build_vgg16_grid_fpn_backbone,
)
from .vgg import VGG, build_vgg_backbone

__all__ = [
    "GridFPN",
    "VGG",
    "build_resnet_grid_fpn_backbone",
    "build_vgg16_fpn_backbone",
    "build_vgg16_grid_fpn_backbone",
    "build_vgg_backbone",
]
