"""The napari dock widget: segment the nuclei of an image layer with a sharp-fpn model.

The widget (:class:`NucleiWidget`, "Segment nuclei" in napari's Plugins menu) runs
:func:`~.segment.segment` on the image layer picked (the selected one by default) with the
options of ``tools/predict.py``, and adds two layers beside it:

* ``<layer>_labels``: a Labels layer, predict's label image (uint16, 0 background);
* ``<layer>_nuclei``: a Points layer, one point per nucleus at its centroid, its ``features``
  the columns of predict's ``<stem>_nuclei.csv`` (``label``, ``score``, ``area``, centroid,
  box, ``mean_intensity``, ``eccentricity``), its size the nuclei's diameter.

Both take the image layer's scale and translate (of its last two axes), so they lie on the
image in world coordinates; run again, they are replaced. A layer of more than two dimensions
(a z-stack, a time series) is segmented at the plane napari shows; the layers say which
(``metadata["sharp_fpn"]["plane"]`` and the status line) and are 2-D. A multiscale layer is
segmented at its full resolution (read whole).

The model: a shipped model of the zoo (the default first), or "config + weights" files of a
trained one. Diameter 0 means estimated per image, as predict without ``--diameter``; tile
"auto" is predict's default for the model, "whole image" is ``--tile 0``.

The work (building the model the first time, then the model runs) goes in a napari thread
worker, so the viewer stays responsive; the Run button is disabled meanwhile. A failure (no
such file, weights not fitting the config, an option out of range) is one line in the status
and a napari error notification, and adds no layer.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Dict, List, Tuple

import numpy as np
from magicgui.widgets import ComboBox, Container, FileEdit, FloatSpinBox, Label, PushButton, SpinBox

from ..predict.run import MAX_TILE

if TYPE_CHECKING:
    import napari

    from .segment import Segmentation

__all__ = ["CUSTOM_MODEL", "TILE_CHOICES", "NucleiWidget", "layers_data"]

#: The model choice that reads a config and weights file instead of a zoo model.
CUSTOM_MODEL = "config + weights files"
#: The tile choices: label and ``tile`` value (None: predict's default for the model).
TILE_CHOICES = (("auto", None), ("whole image", 0), ("256", 256), ("512", 512),
                ("1024", 1024), ("2048", 2048))


def layers_data(name: str, result: "Segmentation", scale: Tuple[float, float],
                translate: Tuple[float, float],
                about: Dict[str, Any]) -> List[Tuple[Any, Dict[str, Any], str]]:
    """The two layers of a segmentation as napari layer data tuples
    ``[(labels, kwargs, "labels"), (points, kwargs, "points")]``.

    Args:
        name: the image layer's name (the layers are ``<name>_labels`` and ``<name>_nuclei``).
        result: the segmentation (:func:`~.segment.segment`).
        scale, translate: the image layer's, of its last two axes.
        about: what to keep in both layers' ``metadata["sharp_fpn"]`` (model, options).
    """
    table = result.table
    columns = list(table[0]) if table else ["label", "score", "area", "centroid_y",
                                           "centroid_x"]
    features = {c: np.array([row[c] for row in table]) for c in columns}
    points = (np.column_stack([features["centroid_y"], features["centroid_x"]]) if table
              else np.zeros((0, 2)))
    metadata = {"sharp_fpn": {**about, "plane": result.plane, "diameter": result.diameter,
                              "diameter_source": result.choice.source,
                              "scale": result.choice.scale, "tile": result.tile,
                              "nuclei": result.count}}
    common = {"scale": tuple(scale), "translate": tuple(translate), "metadata": metadata}
    return [
        (result.labels, {"name": f"{name}_labels", **common}, "labels"),
        (points, {"name": f"{name}_nuclei", "features": features,
                  "size": max(result.diameter, 1.0), "face_color": "transparent",
                  "border_color": "yellow", "border_width": 0.08, **common}, "points"),
    ]


class NucleiWidget(Container):
    """The dock widget (module docstring).

    Args:
        napari_viewer: the viewer whose image layers it segments (napari passes it).

    Attributes:
        worker: the thread worker of the last run (None before the first).
        status: the status line (what the last run did, or its error).
    """

    def __init__(self, napari_viewer: "napari.viewer.Viewer") -> None:
        from .segment import model_names

        self.viewer = napari_viewer
        self.worker = None
        names, default = model_names()
        ordered = ([default] if default else []) + [n for n in names if n != default]
        model_choices = [(f"{n} (default)" if n == default else n, n) for n in ordered]
        model_choices.append((CUSTOM_MODEL, CUSTOM_MODEL))
        self.image = ComboBox(label="image", choices=self._image_layers)
        self.model = ComboBox(label="model", choices=model_choices,
                              value=model_choices[0][1])
        self.config = FileEdit(label="config", mode="r", filter="*.yaml *.yml")
        self.weights = FileEdit(label="weights", mode="r", filter="*.pth *.pkl")
        self.diameter = FloatSpinBox(label="diameter (px, 0 = auto)", value=0.0, min=0.0,
                                     max=1000.0, step=1.0)
        self.score_threshold = FloatSpinBox(label="score threshold", value=0.5, min=0.0,
                                            max=1.0, step=0.05)
        self.tile = ComboBox(label="tile", choices=[label for label, _ in TILE_CHOICES],
                             value="auto")
        self.overlap = SpinBox(label="overlap (px)", value=64, min=0, max=MAX_TILE // 2)
        self.run_button = PushButton(text="Run")
        self.status = Label(value="")
        super().__init__(widgets=[self.image, self.model, self.config, self.weights,
                                  self.diameter, self.score_threshold, self.tile, self.overlap,
                                  self.run_button, self.status])
        self.model.changed.connect(self._show_files)
        self.run_button.changed.connect(self.run)
        for event in (napari_viewer.layers.events.inserted, napari_viewer.layers.events.removed,
                      napari_viewer.layers.events.moved):
            event.connect(self._layers_changed)
        napari_viewer.layers.selection.events.active.connect(self._select_active)
        self._show_files()
        self._select_active()

    # ---- layer choice

    def _image_layers(self, _widget=None) -> List[str]:
        from napari.layers import Image

        return [layer.name for layer in self.viewer.layers if isinstance(layer, Image)]

    def _layers_changed(self, event=None) -> None:
        layer = getattr(event, "value", None)
        if layer is not None and hasattr(layer, "events"):
            layer.events.name.connect(self._refresh)
        self._refresh()

    def _refresh(self, _event=None) -> None:
        self.image.reset_choices()

    def _select_active(self, _event=None) -> None:
        from napari.layers import Image

        self._refresh()
        active = self.viewer.layers.selection.active
        if isinstance(active, Image) and active.name in self.image.choices:
            self.image.value = active.name

    def _show_files(self, _event=None) -> None:
        custom = self.model.value == CUSTOM_MODEL
        self.config.visible = custom
        self.weights.visible = custom

    # ---- running

    def options(self) -> Dict[str, Any]:
        """The widget's settings as :func:`~.segment.load_predictor` and
        :func:`~.segment.segment` take them (ValueError, one line, for a missing choice)."""
        if not self.image.value:
            raise ValueError("no image layer to segment: open or pick one")
        custom = self.model.value == CUSTOM_MODEL
        config = weights = None
        if custom:
            config, weights = (str(w.value) if w.value and str(w.value) not in ("", ".")
                               else None for w in (self.config, self.weights))
            if not config or not weights:
                raise ValueError("config + weights: pick both the config (.yaml) and the "
                                 "weights (.pth) file of a trained model")
        tile = dict(TILE_CHOICES)[self.tile.value]
        return {
            "layer": self.image.value,
            "model": None if custom else self.model.value,
            "config": config, "weights": weights,
            "score_threshold": float(self.score_threshold.value),
            "diameter": float(self.diameter.value) or None,
            "tile": tile, "overlap": int(self.overlap.value),
        }

    def run(self, _value=None):
        """Segment the chosen layer in a thread worker; returns the worker (started), or None
        when the settings are refused (the status says why)."""
        from napari.qt.threading import thread_worker

        from .segment import image_plane, load_predictor, segment

        try:
            options = self.options()
        except ValueError as e:
            self._failed(e)
            return None
        layer = self.viewer.layers[options["layer"]]
        try:
            position = layer.world_to_data(self.viewer.dims.point) if layer.ndim > 2 else None
            data = layer.data[0] if layer.multiscale else layer.data  # the full resolution
            pixels, plane = image_plane(data, bool(layer.rgb), position)
        except ValueError as e:
            self._failed(ValueError(f"{layer.name}: {e}"))
            return None
        scale, translate = tuple(layer.scale[-2:]), tuple(layer.translate[-2:])

        def work():
            predictor = load_predictor(options["model"], options["config"],
                                       options["weights"],
                                       score_threshold=options["score_threshold"])
            return segment(predictor, pixels, diameter=options["diameter"],
                           tile=options["tile"], overlap=options["overlap"],
                           name=options["layer"], plane=plane)

        about = {"model": options["model"] or f"{options['config']} + {options['weights']}",
                 "score_threshold": options["score_threshold"], "overlap": options["overlap"],
                 "image": options["layer"]}
        worker = thread_worker(work, ignore_errors=True)()
        worker.returned.connect(lambda result: self._add_layers(options["layer"], result, scale,
                                                                 translate, about))
        worker.errored.connect(self._failed)
        worker.finished.connect(lambda: setattr(self.run_button, "enabled", True))
        self.run_button.enabled = False
        self.status.value = f"segmenting {options['layer']}..."
        self.worker = worker
        worker.start()
        return worker

    def _failed(self, error: BaseException) -> None:
        from napari.utils.notifications import show_error

        message = " ".join(str(error).split()) or type(error).__name__
        self.status.value = f"failed: {message}"
        show_error(f"sharp-fpn: {message}")

    def _add_layers(self, name: str, result: "Segmentation", scale, translate,
                    about: Dict[str, Any]) -> None:
        for data, kwargs, kind in layers_data(name, result, scale, translate, about):
            if kwargs["name"] in self.viewer.layers:  # a rerun replaces them
                self.viewer.layers.remove(kwargs["name"])
            add = self.viewer.add_labels if kind == "labels" else self.viewer.add_points
            add(data, **kwargs)
        where = "" if result.plane is None else f" (plane {', '.join(map(str, result.plane))})"
        diameter = (f", diameter {result.choice.diameter:.1f} px {result.choice.source}"
                    if result.choice.diameter else f", {result.choice.source}")
        self.status.value = f"{name}{where}: {result.count} nuclei{diameter}"
        if result.note:
            self.status.value += f"; {result.note}"
