"""Everything of sharp-fpn that touches detectron2, and nothing else.

``import sharp_fpn.d2`` registers, as detectron2's own projects do on import: the backbones
``build_vgg_backbone``, ``build_resnet_grid_fpn_backbone``, ``build_vgg16_grid_fpn_backbone`` and
``build_vgg16_fpn_backbone`` (``BACKBONE_REGISTRY``), the meta-architectures
``SemanticNucleiSegmentor`` and ``VolumeSegmentor`` (``META_ARCH_REGISTRY``) and the datasets of
``sharp_fpn.data.catalog`` and ``sharp_fpn.data.medical`` (``DatasetCatalog``). Modules:

* :mod:`.compat`: every workaround for detectron2 v0.6, each naming what it stands in for;
* :mod:`.config`: the ``MODEL.SHARP_FPN``, ``MODEL.VGG``, ``MODEL.UNET``, ``INPUT.SEMANTIC``
  ... keys;
* :mod:`.neck`, :mod:`.vgg`: the grid FPN necks and the VGG bottom-up;
* :mod:`.semantic`, :mod:`.semantic_data`: the semantic meta-architecture and its mapper;
* :mod:`.volume`, :mod:`.volume_data`: the 3-D meta-architecture (the V-Net family) and its
  TorchIO data path and per-volume evaluator;
* :mod:`.engine`: trainer, evaluators, optimizer choice, set-up, launch;
* :mod:`.distributed`: several processes and machines (detectron2's launch flags or torchrun),
  their rendezvous and the replica check;
* :mod:`.run_folder`, :mod:`.checkpoint`: an OUTPUT_DIR's rules (no finished or running run
  replaced unasked) and checkpoints written whole, checked against the model, resumed from the
  newest readable one;
* :mod:`.mapper`: training and evaluation read images as prediction does (16-bit stretched);
* :mod:`.evaluators`, :mod:`.semantic_evaluator`: DSB2018 score and IoU/Dice evaluators;
* :mod:`.datasets`: the catalog registration;
* :mod:`.predictor`: a trained model as a nucleus labeller for ``sharp_fpn.predict``;
* :mod:`.export`: Mask R-CNN export (the UNet family's is framework-free, ``sharp_fpn.export``);
* :mod:`.runner`: train and evaluate one row of a paper table (``sharp_fpn.experiments``);
* :mod:`.analysis`, :mod:`.calibration`: FLOPs, parameters and peak memory of detectron2
  models, and FrozenBN statistics for randomly initialised ones (``sharp_fpn.perf``);
* :mod:`.torchvision_weights`: torchvision ImageNet weights in detectron2's names.

The networks themselves (``sharp_fpn.grid``, ``sharp_fpn.models``) know nothing of detectron2.
"""
from . import compat  # noqa: F401  (first: its warning filters precede detectron2's import)
from .datasets import register_all
from .neck import (
    GridFPN,
    build_resnet_grid_fpn_backbone,
    build_vgg16_fpn_backbone,
    build_vgg16_grid_fpn_backbone,
)
from .semantic import SemanticNucleiSegmentor
from .volume import VolumeSegmentor
from .vgg import VGG, build_vgg_backbone

register_all()

__all__ = [
    "GridFPN",
    "SemanticNucleiSegmentor",
    "VGG",
    "VolumeSegmentor",
    "build_resnet_grid_fpn_backbone",
    "build_vgg16_fpn_backbone",
    "build_vgg16_grid_fpn_backbone",
    "build_vgg_backbone",
    "register_all",
]
