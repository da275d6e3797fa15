"""Pure-PyTorch models of sharp-fpn: blocks, the grid decoder, the UNet family (no detectron2)."""
from .blocks import ConvNormReLU, VGGBlock, get_norm, he_init_, resample
from .grid_decoder import GridDecoder
from .unet import ARCHS, GridUNet, VGGEncoder, create_model

__all__ = [
    "ARCHS",
    "ConvNormReLU",
    "GridDecoder",
    "GridUNet",
    "VGGBlock",
    "VGGEncoder",
    "create_model",
    "get_norm",
    "he_init_",
    "resample",
]
