"""The napari plugin: its npe2 manifest, the "Segment nuclei" dock widget in a real napari
viewer (napari's own ``make_napari_viewer`` fixture, Qt's offscreen platform, OpenGL from Mesa
through the X server pytest-xvfb starts), and the reader of predict's outputs.

The widget's labels are compared with ``tools/predict.py``'s label images of the same images,
predicted by the shipped default model: a 16-bit gray image, an RGBA H&E image and a plane of a
z-stack, drawn by the synthetic v2 generator.
"""
import csv
import importlib.util
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

napari = pytest.importorskip("napari", reason="napari is not installed (pip install "
                             "'sharp-fpn[napari]')")
npe2 = pytest.importorskip("npe2", reason="npe2 is not installed (pip install "
                           "'sharp-fpn[napari]')")
import tifffile  # noqa: E402
from PIL import Image  # noqa: E402

from sharp_fpn import model_zoo  # noqa: E402
from sharp_fpn.data.synthetic_v2 import generate_image  # noqa: E402
from sharp_fpn.napari_plugin import MANIFEST  # noqa: E402
from sharp_fpn.napari_plugin.reader import get_reader, read_table  # noqa: E402
from sharp_fpn.napari_plugin.segment import image_plane  # noqa: E402
from sharp_fpn.napari_plugin.widget import CUSTOM_MODEL  # noqa: E402
from sharp_fpn.predict.outputs import write_label_tiff  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SIZE = 128
WIDGET = "Segment nuclei"


def read_csv(path):
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def images():
    """Three small synthetic nuclei images as arrays, and their counts of true nuclei."""
    rng = np.random.default_rng(7)
    fluo, fluo_truth = generate_image(rng, SIZE, SIZE, "fluorescence")
    gray = fluo if fluo.dtype == np.uint16 else fluo[..., 0].astype(np.uint16) * 180 + 400
    he, he_truth = generate_image(rng, SIZE, SIZE, "he")
    planes = [generate_image(rng, SIZE, SIZE, "fluorescence") for _ in range(2)]
    stack = np.stack([p if p.dtype == np.uint8 else (p >> 8).astype(np.uint8)
                      for p in (q[0] if q[0].ndim == 2 else q[0][..., 0] for q in planes)])
    return {"gray16": gray, "he": he, "stack": stack,
            "truth": {"gray16": int(fluo_truth.max()), "he": int(he_truth.max()),
                      "stack": int(planes[1][1].max())}}


@pytest.fixture(scope="module")
def predicted(images, tmp_path_factory):
    """tools/predict.py run on the three images as files (OME-TIFF labels, 0.5 µm pixels)."""
    folder = tmp_path_factory.mktemp("napari-inputs")
    tifffile.imwrite(folder / "gray16.tif", images["gray16"])
    Image.fromarray(images["he"], mode="RGBA").save(folder / "he.png")
    tifffile.imwrite(folder / "stack.tif", images["stack"], photometric="minisblack",
                     metadata={"axes": "ZYX"})
    out = tmp_path_factory.mktemp("napari-predicted")
    spec = importlib.util.spec_from_file_location("predict_tool", ROOT / "tools" / "predict.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    assert tool.main(["--input", str(folder), "--output", str(out), "--ome-tiff",
                      "--pixel-size", "0.5"]) == 0
    return out


@pytest.fixture
def gl_display():
    """An X server for napari's OpenGL canvas (pytest-xvfb's), checked before any viewer."""
    if os.environ.get("QT_QPA_PLATFORM") == "offscreen" and not os.environ.get("DISPLAY"):
        pytest.fail("no OpenGL for napari's canvas: Qt's offscreen platform gets it from an X "
                    "server; install Xvfb (tools/install_system_packages.sh) so that "
                    "pytest-xvfb starts one")


@pytest.fixture
def viewer(gl_display, make_napari_viewer_proxy):
    """A napari viewer as a plugin sees it: public attributes only, and calls from other
    threads than Qt's refused (napari's proxy fixture)."""
    return make_napari_viewer_proxy()


def run_widget(qtbot, widget):
    widget.run_button.native.click()  # as a user does: the thread worker starts
    assert widget.worker is not None and not widget.run_button.enabled
    qtbot.waitUntil(lambda: widget.run_button.enabled, timeout=120_000)


def test_manifest_validates_and_is_installed():
    manifest = npe2.PluginManifest.from_file(MANIFEST)  # pydantic validation of the schema
    manifest.validate_imports()  # every python_name imports and exists
    assert manifest.name == "sharp-fpn"
    assert [w.display_name for w in manifest.contributions.widgets] == [WIDGET]
    reader, = manifest.contributions.readers
    assert reader.accepts_directories
    assert set(reader.filename_patterns) == {"*_labels.tif", "*_labels.ome.tif", "*_nuclei.csv"}
    installed = npe2.PluginManifest.from_distribution("sharp-fpn")  # setup.py's entry point
    assert installed.contributions.commands == manifest.contributions.commands


def test_widget_segments_layers_as_predict_does(viewer, qtbot, images, predicted,
                                                  tmp_path):
    dock, widget = viewer.window.add_plugin_dock_widget("sharp-fpn", WIDGET)
    names, default = model_zoo.list_models(), model_zoo.default_model_name()
    assert widget.model.value == default and len(widget.model.choices) == len(names) + 1
    assert widget.config.native.isHidden()  # the file pickers only for "config + weights"

    cases = [("gray16", {"scale": (0.5, 0.5), "translate": (10.0, 20.0)}, "gray16", None),
             ("he", {"rgb": True}, "he", None),
             ("stack", {}, "stack_z1", (1,))]
    for name, kwargs, stem, plane in cases:
        layer = viewer.add_image(images[name], name=name, **kwargs)
        if plane:
            viewer.dims.set_current_step(0, plane[0])
        assert widget.image.value == name  # the selected (just added) layer
        run_widget(qtbot, widget)
        assert widget.status.value.startswith(name), widget.status.value

        labels = viewer.layers[f"{name}_labels"]
        expected = tifffile.imread(predicted / f"{stem}_labels.ome.tif")
        np.testing.assert_array_equal(labels.data, expected)
        assert labels.data.shape == (SIZE, SIZE) and labels.metadata["sharp_fpn"]["plane"] == plane
        assert tuple(labels.scale) == tuple(layer.scale[-2:])
        assert tuple(labels.translate) == tuple(layer.translate[-2:])
        truth = images["truth"][name]
        assert 0.6 * truth <= labels.data.max() <= 1.4 * truth + 2, (name, truth)

        points = viewer.layers[f"{name}_nuclei"]
        table = read_csv(predicted / f"{stem}_nuclei.csv")
        assert len(points.data) == len(table) == labels.data.max()
        np.testing.assert_array_equal(points.features["label"], np.arange(1, len(table) + 1))
        np.testing.assert_allclose(points.features["score"], [float(r["score"]) for r in table])
        np.testing.assert_allclose(points.features["area"], [int(r["area"]) for r in table])
        np.testing.assert_allclose(points.data, [(float(r["centroid_y"]), float(r["centroid_x"]))
                                                 for r in table])
        assert tuple(points.scale) == tuple(layer.scale[-2:])
        assert (points.features["score"] >= 0.5).all()
        diameter = labels.metadata["sharp_fpn"]["diameter"]
        assert 5 < diameter < 60 and np.allclose(points.size, diameter)

    # a rerun replaces the layers instead of adding more
    viewer.layers.selection.active = viewer.layers["gray16"]
    count = len(viewer.layers)
    run_widget(qtbot, widget)
    assert len(viewer.layers) == count

    # a trained model's config and weights files instead of a zoo model
    widget.model.value = CUSTOM_MODEL
    assert not widget.config.native.isHidden() and not widget.weights.native.isHidden()
    viewer.add_image(images["gray16"], name="cells")
    assert widget.run() is None  # no files picked: refused before any work
    assert "pick both the config" in widget.status.value and "cells_labels" not in viewer.layers
    config, weights = model_zoo.resolve()
    empty = tmp_path / "empty.pth"
    empty.write_bytes(b"")
    widget.config.value, widget.weights.value = config, empty
    run_widget(qtbot, widget)
    assert widget.status.value == f"failed: {empty}: the weights file is empty"
    assert "cells_labels" not in viewer.layers
    widget.weights.value = weights  # the default model's own files: predict's labels again
    run_widget(qtbot, widget)
    np.testing.assert_array_equal(viewer.layers["cells_labels"].data,
                                  tifffile.imread(predicted / "gray16_labels.ome.tif"))


def test_reader_round_trips_a_predict_folder(predicted, tmp_path):
    from napari.components import ViewerModel

    reader = get_reader(str(predicted))
    assert reader is not None
    layers = reader(str(predicted))
    stems = [r["output_stem"] for r in read_csv(predicted / "summary.csv")]
    assert sorted(stems) == ["gray16", "he", "stack_z0", "stack_z1"]
    assert [kw["name"] for _, kw, _ in layers] == [f"{s}{k}" for s in stems
                                                  for k in ("_labels", "_nuclei")]
    for (labels, lkw, lkind), (points, pkw, pkind), stem in zip(layers[::2], layers[1::2], stems):
        assert (lkind, pkind) == ("labels", "points")
        np.testing.assert_array_equal(labels, tifffile.imread(predicted / f"{stem}_labels.ome.tif"))
        assert lkw["scale"] == pkw["scale"] == (0.5, 0.5)  # the OME-TIFF's pixel size
        table = read_csv(predicted / f"{stem}_nuclei.csv")
        assert len(points) == len(table) == labels.max()
        np.testing.assert_allclose(pkw["features"]["area_um2"],
                                   [float(r["area_um2"]) for r in table])

    # plain TIFF labels (no --ome-tiff) carry no pixel size: the summary's is the scale
    plain = tmp_path / "plain"
    shutil.copytree(predicted, plain)
    for stem in stems:
        ome = plain / f"{stem}_labels.ome.tif"
        write_label_tiff(plain / f"{stem}_labels.tif", tifffile.imread(ome))
        ome.unlink()
    again = get_reader(str(plain))(str(plain))
    assert [kw["scale"] for _, kw, _ in again] == [(0.5, 0.5)] * len(layers)
    for (data, _, _), (before, _, _) in zip(again[::2], layers[::2]):
        np.testing.assert_array_equal(data, before)

    # one file, through napari's own reader discovery (npe2, no canvas needed)
    npe2.PluginManager.instance().discover(include_npe1=False)  # setup.py's entry point
    model = ViewerModel()
    model.open(str(predicted / "he_nuclei.csv"), plugin="sharp-fpn")
    points = model.layers["he_nuclei"]
    assert tuple(points.scale) == (0.5, 0.5)  # from he_labels.ome.tif beside it
    assert list(points.features["label"]) == [int(r["label"]) for r in
                                              read_csv(predicted / "he_nuclei.csv")]


def test_reader_refuses_what_it_cannot_read(tmp_path, predicted):
    assert get_reader(str(tmp_path / "cells.tif")) is None  # not a predict output
    assert get_reader(str(tmp_path)) is None  # a folder predict did not write
    rows = (predicted / "he_nuclei.csv").read_text().splitlines()
    header, first = rows[0].split(","), rows[1].split(",")
    first[header.index("score")] = "high"
    bad = tmp_path / "bad_nuclei.csv"
    bad.write_text("\n".join([rows[0], rows[2], ",".join(first)]) + "\n")
    with pytest.raises(ValueError, match=rf"^{bad}, line 3: column score: 'high' is not a "
                                         rf"number$"):
        read_table(bad)
    (tmp_path / "other_nuclei.csv").write_text("x,y\n1,2\n")
    with pytest.raises(ValueError, match="no column label, centroid_y, centroid_x"):
        read_table(tmp_path / "other_nuclei.csv")


def test_image_plane_rules():
    stack = np.arange(2 * 3 * 4 * 5, dtype=np.uint16).reshape(2, 3, 4, 5)
    pixels, plane = image_plane(stack, rgb=False, position=(1.2, 7.0, 0, 0))
    assert plane == (1, 2) and np.array_equal(pixels, stack[1, 2])  # rounded, kept inside
    rgb = np.zeros((3, 4, 5, 3), np.uint8)
    assert image_plane(rgb, rgb=True)[1] == (0,)
    assert image_plane(rgb[0], rgb=True)[1] is None
    with pytest.raises(ValueError, match="2 channels cannot be segmented"):
        image_plane(np.zeros((4, 5, 2)), rgb=True)
    with pytest.raises(ValueError, match=r"of shape \(5,\) is not an image"):
        image_plane(np.zeros(5), rgb=False)
