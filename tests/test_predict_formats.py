"""predict's inputs and outputs in the formats biologists use elsewhere (issue 11, items 1-2).

Each output is read back by the library its users read it with: roifile (Fiji ROIs), json +
skimage.draw (QuPath GeoJSON back to a label image), tifffile (OME-TIFF pixel size). Inputs:
OME-TIFF channels by name and index, an unknown channel refused, a 3-plane stack segmented
plane by plane, OME-Zarr equal to the same pixels as PNG, micrometre columns in the CSV.

A thresholding stand-in predictor (bright pixels, connected components) keeps the runs fast
and the nuclei known; one CLI run uses the demo's tiny random Mask R-CNN for the wiring.
"""
import csv
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import tifffile
import zarr
from PIL import Image
from roifile import roiread
from skimage.draw import disk, polygon
from skimage.measure import label as connected

from sharp_fpn.cli import run as run_tool
from sharp_fpn.d2.predictor import Prediction, load_config
from sharp_fpn.outdir import recorded_outputs
from sharp_fpn.predict import ImageReadError, predict_images
from sharp_fpn.predict.formats import (
    PHYSICAL_COLUMNS,
    nucleus_outlines,
    write_geojson,
    write_ome_labels,
    write_roi_zip,
)
from sharp_fpn.predict.image_io import PixelSize, expand_inputs, load_planes, read_planes
from sharp_fpn.predict.outputs import nuclei_table

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "configs" / "demo" / "mask_rcnn_fpn_R18.yaml"
FAST = ["INPUT.MIN_SIZE_TEST", "64", "INPUT.MAX_SIZE_TEST", "96",
        "TEST.DETECTIONS_PER_IMAGE", "10", "MODEL.DEVICE", "cpu"]
CENTRES = [(12, 14, 6), (30, 50, 8), (48, 20, 5), (50, 62, 7)]  # (row, col, radius)


def discs(shape=(64, 80), centres=CENTRES):
    """Labels 1..K of non-touching discs."""
    labels = np.zeros(shape, np.int32)
    for k, (r, c, radius) in enumerate(centres, start=1):
        labels[disk((r, c), radius, shape=shape)] = k
    return labels


def iou(a, b):
    return (a & b).sum() / max((a | b).sum(), 1)


def raster(points_xy, shape):
    """A polygon in pixel-corner (x, y) coordinates -> the pixels whose centres it holds."""
    points = np.asarray(points_xy, dtype=np.float64)
    mask = np.zeros(shape, bool)
    rows, cols = polygon(points[:, 1] - 0.5, points[:, 0] - 0.5, shape=shape)
    mask[rows, cols] = True
    return mask


class Threshold:
    """Stands in for NucleiPredictor: nuclei are the connected bright regions."""

    score_threshold, min_kept_fraction, weights = 0.5, 0.5, None

    def __init__(self):
        self.cfg = load_config(DEMO, FAST)

    def predict(self, rgb, tile=0, overlap=0, progress=False):
        labels = connected(rgb.mean(axis=2) > 127).astype(np.int32)
        count = int(labels.max())
        return Prediction(labels, np.linspace(0.9, 0.6, count), "instances", 1)


@pytest.fixture(scope="module")
def threshold():
    return Threshold()


def run(inputs, out, predictor, **options):
    return predict_images(None, None, inputs, out, predictor=predictor, progress=False, tile=64,
                          overlap=16, **options)


def summary(folder):
    with open(Path(folder) / "summary.csv", newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def table(path):
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


# --------------------------------------------------------------------------------------------
# outputs, read back by their readers


def test_roi_zip_reads_back_with_roifile_one_polygon_per_nucleus_inside_it(tmp_path):
    labels = discs()
    write_roi_zip(tmp_path / "a_rois.zip", nucleus_outlines(labels))
    rois = roiread(tmp_path / "a_rois.zip")
    assert [r.name for r in rois] == [str(k) for k in range(1, len(CENTRES) + 1)]
    for roi in rois:
        nucleus = labels == int(roi.name)
        points = roi.coordinates()
        rows, cols = np.nonzero(nucleus)
        # every vertex on the nucleus' outline: within its pixels' corners
        assert points[:, 0].min() >= cols.min() and points[:, 0].max() <= cols.max() + 1
        assert points[:, 1].min() >= rows.min() and points[:, 1].max() <= rows.max() + 1
        cy, cx = points[:, 1].mean(), points[:, 0].mean()
        assert nucleus[int(cy), int(cx)]
        assert iou(raster(points, labels.shape), nucleus) > 0.8


def test_geojson_round_trips_to_the_label_image(tmp_path):
    labels = discs()
    rows = nuclei_table(labels, np.linspace(0.9, 0.6, labels.max()), labels.astype(float))
    write_geojson(tmp_path / "a_nuclei.geojson", nucleus_outlines(labels), rows, "a")
    data = json.loads((tmp_path / "a_nuclei.geojson").read_text(encoding="utf-8"))
    assert data["type"] == "FeatureCollection" and len(data["features"]) == labels.max()
    back = np.zeros_like(labels)
    for feature in data["features"]:
        properties = feature["properties"]
        assert properties["objectType"] == "detection"
        assert properties["classification"]["name"] == "Nucleus"
        assert feature["geometry"]["type"] == "Polygon"
        ring = feature["geometry"]["coordinates"][0]
        assert ring[0] == ring[-1]
        k = int(properties["name"])
        assert properties["measurements"]["area"] == (labels == k).sum()
        assert 0.6 <= properties["measurements"]["score"] <= 0.9
        back[raster(ring, labels.shape)] = k
    for k in range(1, labels.max() + 1):
        assert iou(back == k, labels == k) > 0.8


def test_ome_tiff_labels_carry_the_pixel_size(tmp_path):
    labels = discs()
    write_ome_labels(tmp_path / "a_labels.ome.tif", labels, PixelSize(0.65, 0.5, "test"))
    with tifffile.TiffFile(tmp_path / "a_labels.ome.tif") as tif:
        assert tif.is_ome
        pixels = tif.ome_metadata.split("<Pixels ", 1)[1].split(">", 1)[0]
        assert 'PhysicalSizeX="0.65"' in pixels and 'PhysicalSizeY="0.5"' in pixels
        assert 'PhysicalSizeXUnit="µm"' in pixels
        stored = tif.asarray()
    assert stored.dtype == np.uint16
    np.testing.assert_array_equal(stored, labels)


# --------------------------------------------------------------------------------------------
# inputs


def ome_three_channels(path, nuclear=1, size=0.5):
    """A 16-bit OME-TIFF (C, Y, X) with the discs in channel ``nuclear`` (named DAPI)."""
    rng = np.random.default_rng(0)
    stack = rng.integers(90, 110, size=(3, 64, 80)).astype(np.uint16)
    stack[nuclear][discs() > 0] = 3000
    stack[(nuclear + 1) % 3][:, :40] = 3000  # a channel whose threshold is wrong
    names = ["GFP", "GFP", "RFP"]
    names[nuclear] = "DAPI"
    tifffile.imwrite(path, stack, ome=True, photometric="minisblack",
                     metadata={"axes": "CYX", "Channel": {"Name": names},
                               "PhysicalSizeX": size, "PhysicalSizeY": size})
    return path


@pytest.mark.parametrize("channel", ["DAPI", "dapi", 1, "1"])
def test_channel_by_name_or_index_and_micrometres(tmp_path, threshold, channel):
    ome_three_channels(tmp_path / "cells.ome.tif")
    report = run([tmp_path / "cells.ome.tif"], tmp_path / "out", threshold, channel=channel)
    assert report.ok and report.results[0].nuclei == len(CENTRES)
    row = summary(tmp_path / "out")[0]
    assert row["output_stem"] == "cells" and row["channel"] == "1 (DAPI)"
    assert (row["pixel_size_x_um"], row["pixel_size_source"]) == ("0.5", "OME PhysicalSizeX/Y")
    nuclei = table(tmp_path / "out" / "cells_nuclei.csv")
    assert all(column in nuclei[0] for column in PHYSICAL_COLUMNS)
    for r in nuclei:
        assert float(r["area_um2"]) == pytest.approx(int(r["area"]) * 0.25, abs=1e-3)
        assert float(r["centroid_x_um"]) == pytest.approx(float(r["centroid_x"]) * 0.5, abs=1e-3)
        assert float(r["equivalent_diameter_um"]) == pytest.approx(
            2 * np.sqrt(float(r["area_um2"]) / np.pi), abs=1e-3)


def test_pixel_size_option_wins_and_no_size_no_micrometre_columns(tmp_path, threshold):
    ome_three_channels(tmp_path / "cells.ome.tif")
    Image.fromarray(((discs() > 0) * 255).astype(np.uint8)).save(tmp_path / "plain.png")
    run([tmp_path], tmp_path / "out", threshold, channel="DAPI", pixel_size=0.2)
    rows = {Path(r["image"]).name: r for r in summary(tmp_path / "out")}
    assert rows["cells.ome.tif"]["pixel_size_source"] == "--pixel-size"
    assert rows["plain.png"]["pixel_size_x_um"] == "0.2"
    nuclei = table(tmp_path / "out" / "plain_nuclei.csv")
    assert float(nuclei[0]["area_um2"]) == pytest.approx(int(nuclei[0]["area"]) * 0.04, abs=1e-3)
    run([tmp_path / "plain.png"], tmp_path / "out2", threshold)
    assert "area_um2" not in table(tmp_path / "out2" / "plain_nuclei.csv")[0]
    assert summary(tmp_path / "out2")[0]["pixel_size_source"] == ""


@pytest.mark.parametrize("channel,said", [("Hoechst", "no channel 'Hoechst'"),
                                          (7, "no channel 7"), (None, "--channel")])
def test_an_unknown_channel_is_refused_naming_the_file_and_its_channels(tmp_path, threshold,
                                                                        channel, said):
    path = ome_three_channels(tmp_path / "cells.ome.tif")
    with pytest.raises(ImageReadError) as error:
        read_planes(path, channel)
    message = str(error.value)
    assert str(path) in message and said in message
    assert "3 channels: 0 (GFP), 1 (DAPI), 2 (RFP)" in message and "\n" not in message
    Image.fromarray(((discs() > 0) * 255).astype(np.uint8)).save(tmp_path / "other.png")
    report = run([path, tmp_path / "other.png"], tmp_path / "out", threshold,
                 channel=channel if channel is not None else None)
    rows = {Path(r["image"]).name: r for r in summary(tmp_path / "out")}
    assert rows["cells.ome.tif"]["status"] == "failed" and said in rows["cells.ome.tif"]["error"]
    assert [f.image for f in report.failures] == [str(path)]
    assert not list((tmp_path / "out").glob("cells*")) and not list(
        (tmp_path / "out").glob(".*.tmp"))


def test_a_3_plane_stack_gives_outputs_per_plane_and_resumes(tmp_path, threshold):
    stack = np.zeros((3, 64, 80), np.uint8)
    for z in range(3):  # plane z holds z + 1 nuclei
        stack[z][discs(centres=CENTRES[: z + 1]) > 0] = 255
    tifffile.imwrite(tmp_path / "stack.tif", stack, imagej=True, resolution=(4.0, 4.0),
                     metadata={"axes": "ZYX", "unit": "um"})
    options = dict(rois=True, geojson=True, ome_tiff=True)
    report = run([tmp_path / "stack.tif"], tmp_path / "out", threshold, **options)
    assert [(r.plane, r.nuclei) for r in report.results] == [(0, 1), (1, 2), (2, 3)]
    out = tmp_path / "out"
    rows = summary(out)
    assert [(r["plane"], r["planes"], r["output_stem"], r["nuclei"]) for r in rows] == [
        ("0", "3", "stack_z0", "1"), ("1", "3", "stack_z1", "2"), ("2", "3", "stack_z2", "3")]
    assert {r["pixel_size_source"] for r in rows} == {"ImageJ resolution"}
    for z in range(3):
        names = [f"stack_z{z}{s}" for s in ("_labels.ome.tif", "_overlay.png", "_nuclei.csv",
                                             "_rois.zip", "_nuclei.geojson")]
        assert all((out / n).is_file() for n in names)
        assert set(names) <= recorded_outputs(out, "predict")
        assert len(roiread(out / f"stack_z{z}_rois.zip")) == z + 1
        assert float(table(out / f"stack_z{z}_nuclei.csv")[0]["area_um2"]) == pytest.approx(
            int(table(out / f"stack_z{z}_nuclei.csv")[0]["area"]) * 0.0625, abs=1e-3)
    assert not (out / "stack_labels.tif").exists()

    again = run([tmp_path / "stack.tif"], out, threshold, **options)
    assert again.skipped == [tmp_path / "stack.tif"] and not again.results
    assert {r["status"] for r in summary(out)} == {"skipped (done)"}
    (out / "stack_z1_rois.zip").unlink()  # one output gone: the stack is done again
    assert len(run([tmp_path / "stack.tif"], out, threshold, **options).results) == 3
    # another option is another fingerprint: done again, without the ROIs
    assert len(run([tmp_path / "stack.tif"], out, threshold, ome_tiff=True).results) == 3


def write_ome_zarr(path, pixels, version):
    """An OME-Zarr image (NGFF 0.4 on Zarr v2, or 0.5 on Zarr v3) of one (Y, X) level and a
    half-size second level."""
    fmt = 2 if version == "0.4" else 3
    group = zarr.open_group(str(path), mode="w", zarr_format=fmt)
    group.create_array("0", data=pixels[None], chunks=(1, 32, 32))
    group.create_array("1", data=pixels[None, ::2, ::2], chunks=(1, 32, 32))
    multiscales = [{
        "version": version, "name": "cells",
        "axes": [{"name": "c", "type": "channel"},
                 {"name": "y", "type": "space", "unit": "micrometer"},
                 {"name": "x", "type": "space", "unit": "micrometer"}],
        "datasets": [{"path": str(k), "coordinateTransformations": [
            {"type": "scale", "scale": [1.0, 0.325 * 2 ** k, 0.325 * 2 ** k]}]} for k in (0, 1)],
    }]
    meta = {"multiscales": multiscales, "omero": {"channels": [{"label": "DAPI"}]}}
    group.attrs.update(meta if fmt == 2 else {"ome": {"version": version, **meta}})


@pytest.mark.parametrize("version", ["0.4", "0.5"])
def test_ome_zarr_reads_as_the_same_pixels_as_a_png(tmp_path, threshold, version):
    rng = np.random.default_rng(1)
    pixels = rng.integers(0, 60, size=(64, 80)).astype(np.uint8)
    pixels[discs() > 0] = 220
    Image.fromarray(pixels).save(tmp_path / "cells.png")
    write_ome_zarr(tmp_path / "cells.ome.zarr", pixels, version)
    planes = read_planes(tmp_path / "cells.ome.zarr")
    assert planes.count == 1 and planes.channel_names == ("DAPI",)
    assert planes.pixel_size == PixelSize(0.325, 0.325, "OME-Zarr scale")
    np.testing.assert_array_equal(planes.pixels[0], pixels)
    from_zarr = load_planes(tmp_path / "cells.ome.zarr", channel="DAPI")[0]
    from_png = load_planes(tmp_path / "cells.png")[0]
    np.testing.assert_array_equal(from_zarr.rgb, from_png.rgb)
    np.testing.assert_array_equal(from_zarr.intensity, from_png.intensity)

    assert expand_inputs([str(tmp_path)]).files == [tmp_path / "cells.ome.zarr",
                                                    tmp_path / "cells.png"]
    run([tmp_path / "cells.ome.zarr"], tmp_path / "a", threshold)
    run([tmp_path / "cells.png"], tmp_path / "b", threshold)
    np.testing.assert_array_equal(tifffile.imread(tmp_path / "a" / "cells_labels.tif"),
                                  tifffile.imread(tmp_path / "b" / "cells_labels.tif"))
    assert summary(tmp_path / "a")[0]["pixel_size_source"] == "OME-Zarr scale"


# --------------------------------------------------------------------------------------------
# the tool


def test_the_cli_writes_every_format_asked_for(tmp_path):
    import torch
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.modeling import build_model

    torch.manual_seed(0)
    model = build_model(load_config(DEMO))
    DetectionCheckpointer(model, save_dir=str(tmp_path)).save("random")
    ome_three_channels(tmp_path / "cells.ome.tif")
    spec = importlib.util.spec_from_file_location("predict_tool", ROOT / "tools" / "predict.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    argv = ["--config-file", DEMO, "--weights", tmp_path / "random.pth", "--input",
            tmp_path / "cells.ome.tif", "--output", tmp_path / "out", "--tile", "64",
            "--overlap", "16", "--channel", "DAPI", "--rois", "--geojson", "--ome-tiff",
            "--pixel-size", "0.4", *FAST]
    assert run_tool(tool.main, [str(a) for a in argv]) == 0
    out = tmp_path / "out"
    for suffix in ("_labels.ome.tif", "_overlay.png", "_nuclei.csv", "_rois.zip",
                   "_nuclei.geojson"):
        assert (out / f"cells{suffix}").is_file(), suffix
    assert not (out / "cells_labels.tif").exists()
    row = summary(out)[0]
    assert (row["channel"], row["pixel_size_source"]) == ("1 (DAPI)", "--pixel-size")
    with tifffile.TiffFile(out / "cells_labels.ome.tif") as tif:
        assert 'PhysicalSizeX="0.4"' in tif.ome_metadata
