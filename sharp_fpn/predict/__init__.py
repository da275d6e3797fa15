"""Nuclei segmentation for biologists: whole images of any size, depth and channel count in,
label TIFF, outline overlay and per-nucleus table out (SPEC section 5).

* :mod:`.image_io`: reading PNG/TIFF/JPEG/OME-Zarr, 8/16-bit, gray/RGB/RGBA, stacks plane by
  plane and one channel of many (``--channel``) by a stated rule (other layouts refused),
  normalised to the model's 8-bit RGB input without inventing contrast.
* :mod:`.tiling`: tiles with overlap and exact stitching (no torch, no detectron2).
* :mod:`.outputs`: the label TIFF, the overlay PNG, the per-nucleus CSV.
* :mod:`.formats`: Fiji ROI zips, QuPath GeoJSON, OME-TIFF labels, micrometre columns.
* :mod:`.scale`: rescaling an image so its nuclei have the model's training size
  (``--diameter``, or estimated from a first pass), labels brought back to the image's size.
* :mod:`.run`: :func:`predict_images`, the whole run (``tools/predict.py``, ``make demo``), with
  a trained model as :class:`sharp_fpn.d2.predictor.NucleiPredictor` runs it tile by tile;
  outputs through :class:`sharp_fpn.outdir.OutputDir`, incremental and resumable.
* :mod:`.large`: images larger than memory, read by windows, one tile at a time, labels
  written chunk by chunk as OME-Zarr (``--large``, ``--large-threshold``), for instance and
  semantic models; :mod:`.components` finds a semantic model's components as the tiles come,
  :mod:`.chunks` holds the label chunks being painted in bounded memory.
* :mod:`.cluster`: the run on a dask.distributed cluster (``--dask``): one task per image, or
  per tile of a large image; the workers segment, the run writes.
* :mod:`.zarr_check`: an OME-Zarr's missing chunks found before zarr reads them as fill.

None of these modules imports detectron2; the predictor does, when a run builds one.
"""
from .image_io import (
    ImageError,
    ImageReadError,
    Inputs,
    LoadedImage,
    PixelSize,
    Planes,
    Stretch,
    expand_inputs,
    load_image,
    load_planes,
    normalise,
    read_image,
    read_planes,
)
from .run import Failure, ImageResult, PredictionReport, predict_images
from .tiling import (
    InstanceSet,
    Stitched,
    Tile,
    TileError,
    stitch_cores,
    stitch_instances,
    tile_grid,
)

__all__ = [
    "Failure",
    "ImageError",
    "ImageReadError",
    "ImageResult",
    "Inputs",
    "InstanceSet",
    "LoadedImage",
    "PixelSize",
    "Planes",
    "PredictionReport",
    "Stitched",
    "Stretch",
    "Tile",
    "TileError",
    "expand_inputs",
    "load_image",
    "load_planes",
    "normalise",
    "predict_images",
    "read_image",
    "read_planes",
    "stitch_cores",
    "stitch_instances",
    "tile_grid",
]
