"""The napari plugin: its npe2 manifest, the "Segment nuclei" dock widget in a real napari
viewer (napari's own ``make_napari_viewer`` fixture, Qt's offscreen platform, OpenGL from Mesa
through the X server pytest-xvfb starts), and the reader of predict's outputs.

The widget's labels are compared with ``tools/predict.py``'s label images of the same images,
predicted by the shipped default model: a 16-bit gray image, an RGBA H&E image and a plane of a
z-stack, drawn by the synthetic v2 generator. The reader's newer inputs, the large-image path's
OME-Zarr labels and the GeoJSON and ROI outlines, are written by the project's own writers
(``segment_large`` with its threshold stand-in model on a procedural TIFF, and predict
``--large --rois --geojson``) and read back against the label images they came from.
"""
import csv
import importlib.util
import json
import os
import re
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest

napari = pytest.importorskip("napari", reason="napari is not installed (pip install "
                             "'sharp-fpn[napari]')")
npe2 = pytest.importorskip("npe2", reason="npe2 is not installed (pip install "
                           "'sharp-fpn[napari]')")
import tifffile  # noqa: E402
import zarr  # noqa: E402
from PIL import Image  # noqa: E402
from skimage.draw import polygon2mask  # noqa: E402

from sharp_fpn import model_zoo  # noqa: E402
from sharp_fpn.data.synthetic_v2 import generate_image  # noqa: E402
from sharp_fpn.napari_plugin import MANIFEST  # noqa: E402
from sharp_fpn.napari_plugin import reader as napari_reader  # noqa: E402
from sharp_fpn.napari_plugin.reader import (  # noqa: E402
    Subsampled,
    get_reader,
    read_geojson,
    read_output_folder,
    read_table,
    read_zarr_labels,
)
from sharp_fpn.napari_plugin.segment import image_plane  # noqa: E402
from sharp_fpn.napari_plugin.widget import CUSTOM_MODEL  # noqa: E402
from sharp_fpn.perf.benchmarks.large import blob_window, write_blob_tiff  # noqa: E402
from sharp_fpn.predict.image_io import ImageReadError  # noqa: E402
from sharp_fpn.predict.large import LargeOutputs, ThresholdModel, segment_large  # noqa: E402
from sharp_fpn.predict.outputs import write_label_tiff  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SIZE = 128
WIDGET = "Segment nuclei"


def read_csv(path):
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def load_tool():
    spec = importlib.util.spec_from_file_location("predict_tool", ROOT / "tools" / "predict.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    return tool


def zarr_labels(folder):
    return zarr.open_group(str(folder), mode="r")["0"][...]


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
    assert load_tool().main(["--input", str(folder), "--output", str(out), "--ome-tiff",
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
    assert set(reader.filename_patterns) == {"*_labels.tif", "*_labels.ome.tif",
                                             "*_labels.ome.zarr", "*_nuclei.csv",
                                             "*_nuclei.geojson", "*_rois.zip"}
    # the reader's suffixes are the ones predict writes
    from sharp_fpn.predict import run

    assert napari_reader.LARGE_LABELS_SUFFIX == run.LARGE_LABELS_SUFFIX
    assert napari_reader.GEOJSON_SUFFIX == run.GEOJSON_SUFFIX
    assert napari_reader.ROIS_SUFFIX == run.ROIS_SUFFIX
    assert napari_reader.LABEL_SUFFIXES == (run.OME_LABELS_SUFFIX, run.OUTPUT_SUFFIXES[0])
    assert napari_reader.TABLE_SUFFIX == run.OUTPUT_SUFFIXES[2]
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


# ------------------------------------------------------------------ the large path's outputs


@pytest.fixture(scope="module")
def large_outputs(tmp_path_factory):
    """The large-image path's outputs of a 300 x 260 px procedural image whose top-left
    128 x 128 px hold no nuclei: ``um/`` with a 0.5 µm pixel size, ``px/`` with none."""
    folder = tmp_path_factory.mktemp("napari-large")
    pixels = blob_window(0, 0, 300, 260, seed=2)
    pixels[:128, :128] = 0
    image = folder / "b.tif"
    tifffile.imwrite(image, pixels, tile=(64, 64), photometric="minisblack")
    for name, size in (("um", 0.5), ("px", None)):
        out = folder / name
        result = segment_large(image, LargeOutputs(
            out / "b_labels.ome.zarr", out / "b_nuclei.csv", geojson=out / "b_nuclei.geojson",
            rois=out / "b_rois.zip", stem="b", chunk=64), predictor=ThresholdModel(100.0, 20),
            tile=128, overlap=32, pixel_size=size, progress=False)
        assert result.nuclei > 20
    return folder


def test_zarr_labels_are_read_lazily_with_their_scale(large_outputs, tmp_path):
    store = large_outputs / "um" / "b_labels.ome.zarr"
    assert get_reader(str(store)) is not None
    (data, kwargs, kind), = get_reader(str(store))(str(store))
    assert kind == "labels" and kwargs["name"] == "b_labels" and "multiscale" not in kwargs
    assert isinstance(data, zarr.Array) and not isinstance(data, np.ndarray)  # nothing read
    expected = zarr_labels(store)
    assert expected.dtype == np.uint32 and expected.max() > 20
    np.testing.assert_array_equal(data[...], expected)
    assert kwargs["scale"] == (0.5, 0.5) and kwargs["metadata"]["sharp_fpn"]["pixel_size_um"]
    # no unit on the axes: pixels
    _, plain, _ = read_zarr_labels(large_outputs / "px" / "b_labels.ome.zarr")
    assert plain["scale"] == (1.0, 1.0) and plain["metadata"]["sharp_fpn"]["pixel_size_um"] is None

    # all-zero chunks left out of the store (as zarr leaves them out by default) read as 0
    sparse = tmp_path / "s_labels.ome.zarr"
    shutil.copytree(store, sparse)
    empty = [f"{r}.{c}" for r in range(5) for c in range(5)
             if not expected[64 * r:64 * r + 64, 64 * c:64 * c + 64].any()]
    assert {"0.0", "0.1", "1.0", "1.1"} <= set(empty)  # the nucleus-free corner
    for chunk in empty:
        (sparse / "0" / chunk).unlink()
    sparse_data, _, _ = read_zarr_labels(sparse)
    np.testing.assert_array_equal(sparse_data[...], expected)


@pytest.fixture(scope="module")
def tall_zarr(tmp_path_factory):
    """The large-image path's labels of a 4200 x 96 px procedural image: a side over
    PYRAMID_ABOVE."""
    folder = tmp_path_factory.mktemp("napari-tall")
    image = write_blob_tiff(folder / "t.tif", 4200, 96, tile=128)
    store = folder / "t_labels.ome.zarr"
    segment_large(image, LargeOutputs(store, folder / "t_nuclei.csv"),
                  predictor=ThresholdModel(100.0, 20), tile=128, overlap=32, progress=False)
    assert napari_reader.PYRAMID_ABOVE < 4200
    return store


def test_a_tall_zarr_opens_as_a_pyramid_of_strided_views(tall_zarr):
    store = tall_zarr
    data, kwargs, _ = read_zarr_labels(store)
    assert kwargs["multiscale"] is True
    assert [level.shape for level in data] == [(4200, 96), (2100, 48), (1050, 24), (525, 12)]
    full = zarr_labels(store)
    assert isinstance(data[0], zarr.Array)
    for level, factor in zip(data[1:], (2, 4, 8)):
        assert isinstance(level, Subsampled) and level.dtype == np.uint32
        view = full[::factor, ::factor]
        np.testing.assert_array_equal(np.asarray(level), view)
        for key in [(slice(10, 300, 3), slice(None)), (5, slice(2, 9)), (-1, -2),
                    (slice(None, None, -7), 3), (Ellipsis, slice(1, 4))]:
            np.testing.assert_array_equal(level[key], view[key])
    with pytest.raises(IndexError):
        data[1][2100, 0]
    from napari.components import ViewerModel

    model = ViewerModel()
    layer = model.add_labels(data, **kwargs)
    assert layer.multiscale and layer.data_level == 3  # napari shows the coarsest level


def polygon_area_centroid(vertices):
    """Area and centroid (y, x) of a simple polygon (the shoelace formula)."""
    y, x = vertices[:, 0], vertices[:, 1]
    y1, x1 = np.roll(y, -1), np.roll(x, -1)
    cross = x * y1 - x1 * y
    area = cross.sum() / 2
    return abs(area), ((y + y1) * cross).sum() / (6 * area), ((x + x1) * cross).sum() / (6 * area)


@pytest.mark.parametrize("suffix", ["_nuclei.geojson", "_rois.zip"])
def test_outlines_lie_on_the_labels_they_came_from(large_outputs, suffix):
    path = large_outputs / "um" / f"b{suffix}"
    (polygons, kwargs, kind), = get_reader(str(path))(str(path))
    assert kind == "shapes" and kwargs["shape_type"] == "polygon"
    assert kwargs["name"] == ("b_outlines" if suffix.endswith("geojson") else "b_rois")
    assert kwargs["scale"] == (0.5, 0.5)  # from b_labels.ome.zarr beside it
    labels = zarr_labels(large_outputs / "um" / "b_labels.ome.zarr")
    table = {int(r["label"]): r for r in read_csv(large_outputs / "um" / "b_nuclei.csv")}
    features = kwargs["features"]
    assert len(polygons) == len(table) == labels.max() == len(features["label"])
    assert sorted(features["label"]) == list(range(1, len(table) + 1))
    assert list(features["name"]) == [str(n) for n in features["label"]]
    ious, offsets = [], []
    for vertices, label in zip(polygons, features["label"]):
        mask = polygon2mask(labels.shape, vertices)  # (row, col) vertices, pixel centres
        truth = labels == label
        ious.append((mask & truth).sum() / (mask | truth).sum())
        _, cy, cx = polygon_area_centroid(vertices)
        row = table[int(label)]
        offsets.append(np.hypot(cy - float(row["centroid_y"]), cx - float(row["centroid_x"])))
    assert min(ious) > 0.8, min(ious)
    assert np.median(offsets) < 0.2, np.median(offsets)  # on the pixels, not half a pixel off
    if suffix.endswith("geojson"):
        for column in ("score", "area", "centroid_y", "mean_intensity", "area_um2"):
            np.testing.assert_allclose(features[column], [float(table[n][column])
                                                          for n in features["label"]])
        colours = np.asarray(kwargs["edge_color"])
        assert colours.shape == (len(polygons), 4) and len(np.unique(colours, axis=0)) > 1
    else:
        assert kwargs["edge_color"] == "yellow"


def test_outline_and_zarr_readers_refuse_bad_files(tmp_path, large_outputs):
    features = [{"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [
        [[0, 0], [4, 0], [4, 4], [0, 0]]]}, "properties": {"name": "1"}},
        {"type": "Feature", "geometry": {"type": "Point", "coordinates": [3, 4]}}]
    cases = {
        "text_nuclei.geojson": ("{not json", r"not a readable GeoJSON file \(JSONDecodeError"),
        "one_nuclei.geojson": ('{"type": "Feature", "geometry": null}',
                               "not a GeoJSON FeatureCollection \\(type 'Feature'"),
        "list_nuclei.geojson": ("[1, 2]", "not a GeoJSON FeatureCollection \\(type 'list'"),
        "point_nuclei.geojson": ('{"type": "FeatureCollection", "features": '
                                 + json.dumps(features) + "}",
                                 "feature 1 is Point, not a Polygon"),
        "word_nuclei.geojson": ('{"type": "FeatureCollection", "features": [{"geometry": '
                                '{"type": "Polygon", "coordinates": [[[0, 0], [4, 0], [4, 4]]]},'
                                ' "properties": {"measurements": {"area": "big"}}}]}',
                                "feature 0: measurement 'area' is 'big', not a number"),
        "short_nuclei.geojson": ('{"type": "FeatureCollection", "features": [{"geometry": '
                                 '{"type": "Polygon", "coordinates": [[[0, 0], [1, 1]]]}}]}',
                                 "feature 0: its Polygon's coordinates are not a ring"),
    }
    for name, (text, message) in cases.items():
        (tmp_path / name).write_text(text)
    (tmp_path / "plain_rois.zip").write_text("not a zip")
    with zipfile.ZipFile(tmp_path / "notes_rois.zip", "w") as archive:
        archive.writestr("readme.txt", "no ROIs here")
    cases["plain_rois.zip"] = (None, r"not a zip of ImageJ ROIs \(BadZipFile")
    cases["notes_rois.zip"] = (None, r"entry readme\.txt: not an ImageJ ROI")
    bare = tmp_path / "bare_labels.ome.zarr"
    zarr.open_group(str(bare), mode="w", zarr_format=2).create_array(
        "0", shape=(8, 8), chunks=(8, 8), dtype="uint32")
    cases[bare.name] = (None, "a Zarr without OME multiscales metadata")
    image = tmp_path / "float_labels.ome.zarr"
    shutil.copytree(large_outputs / "um" / "b_labels.ome.zarr", image)
    group = zarr.open_group(str(image), mode="r+")
    group.create_array("0", shape=(8, 8), chunks=(8, 8), dtype="float32", overwrite=True)
    cases[image.name] = (None, r"not a label image \(axes YX, float32 samples")
    (tmp_path / "empty_labels.ome.zarr").mkdir()
    cases["empty_labels.ome.zarr"] = (None, "not a readable OME-Zarr image")
    before = sorted(p.name for p in tmp_path.rglob("*"))
    for name, (_, message) in cases.items():
        path = tmp_path / name
        reader = get_reader(str(path))
        assert reader is not None, name
        with pytest.raises((ValueError, ImageReadError)) as failed:
            reader(str(path))
        text = str(failed.value)
        assert text.startswith(f"{path}: ") and "\n" not in text, text
        assert re.search(message, text), (name, text)
    assert sorted(p.name for p in tmp_path.rglob("*")) == before  # nothing written


def test_outlines_of_no_nuclei_and_of_older_qupath_files(tmp_path):
    empty = tmp_path / "e.tif"
    tifffile.imwrite(empty, np.full((200, 160), 40, np.uint8), tile=(64, 64))
    result = segment_large(empty, LargeOutputs(
        tmp_path / "e_labels.ome.zarr", tmp_path / "e_nuclei.csv",
        geojson=tmp_path / "e_nuclei.geojson", rois=tmp_path / "e_rois.zip"),
        predictor=ThresholdModel(100.0, 20), tile=128, overlap=32, progress=False)
    assert result.nuclei == 0
    from napari.components import ViewerModel

    model = ViewerModel()
    for suffix in ("_nuclei.geojson", "_rois.zip"):
        (polygons, kwargs, kind), = get_reader(str(tmp_path / f"e{suffix}"))(
            str(tmp_path / f"e{suffix}"))
        assert polygons == [] and kwargs["scale"] == (1.0, 1.0)
        assert model.add_layer(napari.layers.Layer.create(polygons, kwargs, kind)).nshapes == 0
    # QuPath 0.2's list of measurements; null for one it could not take; names not labels
    ring = [[1, 1], [9, 1], [9, 7], [1, 1]]
    features = [{"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [ring]},
                 "properties": {"name": name, "measurements": values}}
                for name, values in (("cell a", [{"name": "Area", "value": 24.0},
                                                 {"name": "label", "value": 3}]),
                                     ("cell b", [{"name": "Area", "value": None}]))]
    old = tmp_path / "old_nuclei.geojson"
    old.write_text(json.dumps({"type": "FeatureCollection", "features": features}))
    polygons, kwargs, _ = read_geojson(old)
    assert set(kwargs["features"]) == {"name", "Area", "measurement label"}
    assert list(kwargs["features"]["name"]) == ["cell a", "cell b"]
    np.testing.assert_array_equal(kwargs["features"]["Area"], [24.0, np.nan])
    np.testing.assert_array_equal(polygons[0], [[0.5, 0.5], [0.5, 8.5], [6.5, 8.5]])
    assert kwargs["edge_color"] == "yellow"  # no classification colours


@pytest.fixture(scope="module")
def predicted_large(images, tmp_path_factory):
    """tools/predict.py --rois --geojson with a large-image threshold below the images' size:
    gray16.tif by the large-image path (OME-Zarr labels), he.png by the whole-image path (a
    PNG is not read by windows), 0.5 µm pixels."""
    folder = tmp_path_factory.mktemp("napari-large-inputs")
    tifffile.imwrite(folder / "gray16.tif", images["gray16"])
    Image.fromarray(images["he"], mode="RGBA").save(folder / "he.png")
    out = tmp_path_factory.mktemp("napari-large-predicted")
    assert load_tool().main(["--input", str(folder), "--output", str(out), "--large-threshold",
                             "0.01", "--rois", "--geojson", "--pixel-size", "0.5"]) == 0
    return out


def test_a_folder_with_a_large_image_opens_its_zarr_labels_and_outlines(predicted_large):
    rows = read_csv(predicted_large / "summary.csv")
    assert [(r["output_stem"], r["route"]) for r in rows] == [("gray16", "large"), ("he", "")]
    layers = get_reader(str(predicted_large))(str(predicted_large))
    assert [(kw["name"], kind) for _, kw, kind in layers] == [
        ("gray16_labels", "labels"), ("gray16_nuclei", "points"), ("he_labels", "labels"),
        ("he_nuclei", "points"), ("gray16_outlines", "shapes"), ("he_outlines", "shapes")]
    zarr_data = layers[0][0]
    assert isinstance(zarr_data, zarr.Array)
    labels = zarr_labels(predicted_large / "gray16_labels.ome.zarr")
    np.testing.assert_array_equal(zarr_data[...], labels)
    assert all(kw["scale"] == (0.5, 0.5) for _, kw, _ in layers)
    for (points, _, _), (outlines, okw, _), row in zip(layers[1:4:2], layers[4:], rows):
        assert len(points) == len(outlines) == int(row["nuclei"]) >= 1
        assert list(okw["features"]["label"]) == list(range(1, len(outlines) + 1))
    # more nuclei than the limit: the folder leaves the outlines out
    limit = min(int(r["nuclei"]) for r in rows) - 1
    few = read_output_folder(predicted_large, outlines_limit=limit)
    assert [kw["name"] for _, kw, _ in few] == [kw["name"] for _, kw, _ in layers[:4]]
    # without the GeoJSON, the ROIs
    shutil.move(predicted_large / "he_nuclei.geojson", predicted_large / "he.keep")
    try:
        names = [kw["name"] for _, kw, _ in read_output_folder(predicted_large)]
    finally:
        shutil.move(predicted_large / "he.keep", predicted_large / "he_nuclei.geojson")
    assert names[4:] == ["gray16_outlines", "he_rois"]


def test_viewer_opens_zarr_labels_and_outlines(viewer, large_outputs, tall_zarr):
    folder = large_outputs / "um"
    for name in ("b_labels.ome.zarr", "b_nuclei.csv", "b_nuclei.geojson", "b_rois.zip"):
        viewer.open(str(folder / name), plugin="sharp-fpn")
    labels, points, outlines, rois = (viewer.layers[n] for n in (
        "b_labels", "b_nuclei", "b_outlines", "b_rois"))
    assert isinstance(labels.data, zarr.Array)
    np.testing.assert_array_equal(np.asarray(labels.data[...]),
                                  zarr_labels(folder / "b_labels.ome.zarr"))
    count = len(points.data)
    assert outlines.nshapes == rois.nshapes == count
    assert set(outlines.shape_type) == {"polygon"}
    assert list(outlines.features["label"]) == list(rois.features["label"])
    for layer in (labels, points, outlines, rois):
        assert tuple(layer.scale) == (0.5, 0.5)
    # a pixel of a nucleus, as napari reads it from the zarr array: the nucleus' label
    row = read_csv(folder / "b_nuclei.csv")[0]
    y, x = round(float(row["centroid_y"])), round(float(row["centroid_x"]))
    expected = zarr_labels(folder / "b_labels.ome.zarr")[y, x]
    assert expected > 0 and labels.get_value((y * 0.5, x * 0.5), world=True) == expected

    # the pyramid: napari draws a strided level, not the full-resolution array (the canvas
    # is drawn; its pixels are not compared: Qt's offscreen screenshots come back black)
    viewer.open(str(tall_zarr), plugin="sharp-fpn")
    tall = viewer.layers["t_labels"]
    assert tall.multiscale and isinstance(tall.data[1], Subsampled)
    viewer.reset_view()
    assert viewer.screenshot(canvas_only=True).ndim == 3
    assert tall.data_level >= 1 and isinstance(tall.data[tall.data_level], Subsampled)
