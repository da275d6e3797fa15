#!/usr/bin/env python
"""sharp-fpn: UNet++, UNet3+ and UNet# skip connections for detectron2 and the UNet family.

Install with ``make`` (see README.md): torch and detectron2 are installed by tools/bootstrap.py
before this package, since neither can be expressed as a plain PyPI requirement here.
"""
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).resolve().parent
version = {}
exec((ROOT / "sharp_fpn" / "version.py").read_text(), version)

setup(
    name="sharp-fpn",
    version=version["__version__"],
    description="Redesigned skip connections (UNet++, UNet3+, UNet#) as detectron2 FPN necks "
    "and UNet-family models, for nuclei and medical image segmentation",
    long_description=(ROOT / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    packages=find_packages(include=("sharp_fpn", "sharp_fpn.*")),
    # the shipped nuclei models (sharp_fpn/model_zoo): the index and each model's folder
    package_data={"sharp_fpn.model_zoo": ["index.json", "*/config.yaml", "*/model.pth",
                                          "*/MODEL_CARD.md"],
                  "sharp_fpn.napari_plugin": ["napari.yaml"]},
    entry_points={"napari.manifest": ["sharp-fpn = sharp_fpn.napari_plugin:napari.yaml"]},
    python_requires=">=3.9",
    install_requires=[
        "torch>=2.0",
        "torchvision",
        "numpy>=1.24",
        "pycocotools>=2.0.7",
        "opencv-python-headless>=4.8",
        "scikit-image>=0.22",
        "scikit-learn>=1.3",
        "tifffile>=2023.7",
        "roifile>=2024.9",  # predict --rois: ImageJ/Fiji ROI zips
        "zarr>=3.0",  # OME-Zarr inputs (NGFF 0.4 on Zarr v2, 0.5 on Zarr v3)
        "Pillow>=10",
        "tqdm>=4.60",
        "matplotlib>=3.7",
        "fvcore>=0.1.5,<0.1.6",
        # the paper's medical data sets in their own formats (sharp_fpn/data/medical) and the
        # 3-D data path (TorchIO, as the official code)
        "nibabel>=5.0",  # NIfTI: BraTS19, LiTS17
        "pydicom>=3.0",  # DICOM: LIDC-IDRI
        "SimpleITK>=2.3",  # MetaImage .mhd/.raw: LUNA16
        "torchio>=0.20",
        # many images, or the tiles of one huge image, on a cluster (predict --dask)
        "dask[distributed]>=2024.1",
    ],
    extras_require={
        # pytest-qt and pytest-xvfb: the napari plugin's tests (an X server for napari's canvas)
        "test": ["pytest>=7", "hypothesis>=6.80", "pytest-qt>=4.4", "pytest-xvfb>=3.0"],
        # the napari plugin (sharp_fpn/napari_plugin, manifest napari.yaml)
        "napari": ["napari[pyqt5]>=0.5", "npe2>=0.7"],
        # ONNX export (torch.onnx.export(..., dynamo=True)) and its check with ONNX Runtime
        "onnx": ["onnx", "onnxscript", "onnxruntime"],
    },
)
