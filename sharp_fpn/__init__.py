"""sharp-fpn: UNet++, UNet3+ and UNet# skip connections for nuclei and medical image segmentation.

Importing the package registers its datasets and detectron2 components when detectron2 is
installed. The connectivity grid, the metrics and the data tools need neither detectron2 nor
torch; the models (``sharp_fpn.create_model``) need torch only.
"""
from .version import __version__

try:
    import detectron2  # noqa: F401
except ImportError:  # the models, metrics and data tools stay usable without detectron2
    pass
else:
    from . import modeling  # registers the necks, the VGG bottom-up, the semantic models
    from .data.datasets import register_all

    register_all()


def __getattr__(name: str):
    # Imported on first use, so that ``import sharp_fpn`` does not need torch.
    if name == "create_model":
        from .models import create_model

        return create_model
    raise AttributeError(f"module 'sharp_fpn' has no attribute {name!r}")


__all__ = ["__version__", "create_model"]
