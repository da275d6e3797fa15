"""sharp-fpn in napari (npe2 plugin ``sharp-fpn``, manifest ``napari.yaml``; the optional extra
``sharp-fpn[napari]``).

* :mod:`.widget`: the dock widget "Segment nuclei" (:class:`~.widget.NucleiWidget`): the
  selected image layer segmented by a shipped model (the zoo's default unless another is
  picked) or a trained config + weights, as ``tools/predict.py`` segments a file; it adds a
  Labels layer ``<layer>_labels`` and a Points layer ``<layer>_nuclei`` (the per-nucleus table
  as features, scores included).
* :mod:`.reader`: opens predict's outputs (an output folder, ``*_labels.tif``,
  ``*_labels.ome.tif`` with its pixel size, ``*_nuclei.csv``; the large-image path's
  ``*_labels.ome.zarr`` lazily, as a strided pyramid when large; the outlines of
  ``*_nuclei.geojson`` and ``*_rois.zip`` as Shapes layers).
* :mod:`.segment`: the widget's work without Qt: a layer's data in, labels, scores and table out.

Importing this package imports neither napari, Qt nor torch; napari imports the modules the
manifest names when their contribution is used.
"""
from pathlib import Path

#: The npe2 manifest.
MANIFEST = Path(__file__).with_name("napari.yaml")

__all__ = ["MANIFEST"]
