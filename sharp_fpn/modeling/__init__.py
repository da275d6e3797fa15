"""detectron2 glue for sharp-fpn's models: the VGG bottom-up, the grid necks, the semantic models.

Importing this package registers the backbone builders with detectron2's ``BACKBONE_REGISTRY``:
``build_vgg_backbone``, ``build_resnet_grid_fpn_backbone``, ``build_vgg16_grid_fpn_backbone``
and ``build_vgg16_fpn_backbone``; and the meta-architecture ``SemanticNucleiSegmentor`` with
``META_ARCH_REGISTRY``. The models themselves live in ``sharp_fpn.models`` and
``sharp_fpn.grid``, free of detectron2.
"""
from .neck import (
    GridFPN,
    build_resnet_grid_fpn_backbone,
    build_vgg16_fpn_backbone,
    build_vgg16_grid_fpn_backbone,
)
from .semantic import SemanticNucleiSegmentor
from .vgg import VGG, build_vgg_backbone

__all__ = [
    "GridFPN",
    "SemanticNucleiSegmentor",
    "VGG",
    "build_resnet_grid_fpn_backbone",
    "build_vgg16_fpn_backbone",
    "build_vgg16_grid_fpn_backbone",
    "build_vgg_backbone",
]
