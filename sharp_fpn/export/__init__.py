"""Export for deployment, each export checked; framework-free (torch, and onnx when installed).

* :mod:`.unet`: the UNet family (``sharp_fpn.models.GridUNet``), one file per pruning level
  and format: ``torch.export`` (``.pt2``) and ONNX through the dynamo exporter, with dynamic
  batch and sides; the exported module is :class:`ProbabilityModel` (pixels in, nucleus
  probabilities out).
* :mod:`.check`: :class:`ExportCheck`, what every export reports, and :func:`onnx_status`.
* :mod:`.speed`: :func:`~sharp_fpn.export.speed.benchmark_export`, ONNX Runtime beside
  PyTorch on the CPU (imported on its own).

Mask R-CNN (detectron2) is exported by :mod:`sharp_fpn.d2.export` (TorchScript: its reason is
there). ``tools/export.py`` is the command line over both.
"""
from .check import ExportCheck, max_abs_diff, onnx_status
from .unet import ProbabilityModel, dynamic_shapes, export_unet_levels, load_program

__all__ = [
    "ExportCheck",
    "ProbabilityModel",
    "dynamic_shapes",
    "export_unet_levels",
    "load_program",
    "max_abs_diff",
    "onnx_status",
]
