"""sharp-fpn: UNet++, UNet3+ and UNet# skip connections for nuclei and medical image segmentation.

Importing the package registers its datasets (and, once detectron2 is importable, its
detectron2 components); the pure-PyTorch models and metrics work without detectron2.
"""
from .models import create_model
from .version import __version__

try:
    import detectron2  # noqa: F401
except ImportError:  # the models and metrics stay usable without detectron2
    pass
else:
    from .data.datasets import register_all

    register_all()

__all__ = ["__version__", "create_model"]
