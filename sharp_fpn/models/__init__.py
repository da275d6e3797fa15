"""Pure-PyTorch models of sharp-fpn: blocks, the grid decoder, the UNet family (no detectron2)."""
from .blocks import ConvNormReLU, VGGBlock, get_norm, he_init_, resample
from .grid_decoder import GridDecoder
from .heads import ClassificationGuidedModule, SegmentationHead
from .unet import (
    ARCHS,
    GridUNet,
    SegmentationOutput,
    VGGEncoder,
    count_parameters,
    create_model,
    supervised_branches,
)

__all__ = [
    "ARCHS",
    "ClassificationGuidedModule",
    "ConvNormReLU",
    "GridDecoder",
    "GridUNet",
    "SegmentationHead",
    "SegmentationOutput",
    "VGGBlock",
    "VGGEncoder",
    "count_parameters",
    "create_model",
    "get_norm",
    "he_init_",
    "resample",
    "supervised_branches",
]
