"""Pure-PyTorch models of sharp-fpn: blocks, encoders, the grid decoder, heads, the UNet family
(no detectron2)."""
from .blocks import ConvNormReLU, VGGBlock, get_norm, he_init_, resample
from .encoders import GridEncoder, VGGEncoder
from .grid_decoder import GridDecoder
from .heads import (
    ClassificationGuidedModule,
    SegmentationHead,
    UpsamplingHead,
    branch_probabilities,
)
from .unet import (
    ALL_ARCHS,
    ARCHS,
    VNET_ARCHS,
    GridUNet,
    SegmentationOutput,
    count_parameters,
    create_model,
    supervised_branches,
)

__all__ = [
    "ALL_ARCHS",
    "ARCHS",
    "ClassificationGuidedModule",
    "ConvNormReLU",
    "GridDecoder",
    "GridEncoder",
    "GridUNet",
    "SegmentationHead",
    "SegmentationOutput",
    "UpsamplingHead",
    "VNET_ARCHS",
    "VGGBlock",
    "VGGEncoder",
    "branch_probabilities",
    "count_parameters",
    "create_model",
    "get_norm",
    "he_init_",
    "resample",
    "supervised_branches",
]
