"""sharp-fpn: UNet++, UNet3+ and UNet# skip connections for nuclei and medical image segmentation.

``import sharp_fpn`` is cheap and needs neither detectron2 nor OpenCV; each layer is imported
when used:

* :mod:`sharp_fpn.grid`: which node feeds which (plain data, no torch);
* :mod:`sharp_fpn.models`, :mod:`sharp_fpn.losses`: the networks and losses (PyTorch only);
* :mod:`sharp_fpn.data`: DSB2018 reading and conversion, run-length codes, synthetic nuclei,
  the dataset catalog; :mod:`sharp_fpn.metrics`: the DSB2018 score, IoU, Dice (numpy);
* :mod:`sharp_fpn.predict`: images in, label TIFF / overlay / table out;
* :mod:`sharp_fpn.export`: deployable models; :mod:`sharp_fpn.figures`: plots;
* :mod:`sharp_fpn.d2`: the only package that imports detectron2; importing it registers the
  necks, backbones, meta-architecture and datasets with detectron2.
"""
from .version import __version__


def __getattr__(name: str):
    # Imported on first use, so that ``import sharp_fpn`` does not need torch.
    if name == "create_model":
        from .models import create_model

        return create_model
    raise AttributeError(f"module 'sharp_fpn' has no attribute {name!r}")


__all__ = ["__version__", "create_model"]
