"""predict's large-image route (sharp_fpn.predict.run with sharp_fpn.predict.large): the same
nuclei as the whole-image route, chosen by --large or by the plane's size, resumable, and
failing one image at a time with nothing half-written.

Images are written by tifffile / Pillow / zarr, segmented by the shipped model, and read back by
zarr, tifffile and csv.
"""
import csv
import importlib.util
import shutil
from pathlib import Path

import numpy as np
import pytest
import tifffile
import zarr
from PIL import Image

from sharp_fpn.outdir import OutputConflict
from sharp_fpn.predict.run import SUMMARY_COLUMNS, model_diameter, predict_images, route_of

from support import bijection

ROOT = Path(__file__).resolve().parents[1]
OPTIONS = dict(tile=128, overlap=32, progress=False)


def _summary(folder: Path) -> list:
    with open(folder / "summary.csv", newline="") as f:
        return list(csv.DictReader(f))


def _table(path: Path) -> dict:
    with open(path, newline="") as f:
        return {int(r["label"]): r for r in csv.DictReader(f)}


def _leftovers(folder: Path) -> list:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    """The shipped model, a 16-bit fluorescence frame (46 nuclei drawn, 4 tiles of 128 px) and
    two crops of it, and both routes' outputs of the frame."""
    from sharp_fpn import model_zoo
    from sharp_fpn.d2.predictor import NucleiPredictor
    from sharp_fpn.data.synthetic_v2 import generate_image

    folder = tmp_path_factory.mktemp("large_run")
    frame, _ = generate_image(np.random.default_rng(14), 192, 224, "fluorescence")
    assert frame.dtype == np.uint16
    images = folder / "images"
    images.mkdir()
    tifffile.imwrite(images / "frame.tif", frame, tile=(64, 64), photometric="minisblack")
    config, weights = model_zoo.resolve()
    predictor = NucleiPredictor(config, weights)
    diameter = model_diameter(predictor.cfg)  # the model's own: scale 1 on both routes
    assert diameter > 0
    run = dict(OPTIONS, predictor=predictor, diameter=diameter)
    whole = predict_images(None, None, [images / "frame.tif"], folder / "whole", **run)
    large = predict_images(None, None, [images / "frame.tif"], folder / "large", large=True,
                           rois=True, geojson=True, **run)
    return dict(folder=folder, frame=frame, predictor=predictor, run=run, whole=whole,
                large=large, config=config, weights=weights, diameter=diameter)


def test_the_large_route_gives_the_whole_routes_nuclei(zoo):
    whole, large = zoo["whole"], zoo["large"]
    assert whole.ok and large.ok
    out = zoo["folder"] / "large"
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == [
        "frame_labels.ome.zarr", "frame_nuclei.csv", "frame_nuclei.geojson", "frame_rois.zip",
        "summary.csv"]  # no overlay, no label TIFF
    result = large.results[0]
    assert result.large and result.overlay is None and result.labels.is_dir()
    expected = tifffile.imread(whole.results[0].labels)
    got = zarr.open_group(str(result.labels), mode="r")["0"][...]
    assert got.dtype == np.uint32
    mapping = bijection(expected, got)
    assert len(mapping) == whole.results[0].nuclei == result.nuclei > 20
    # the per-nucleus rows agree, up to the renumbering
    rows_whole, rows_large = _table(whole.results[0].table), _table(result.table)
    assert len(rows_whole) == len(rows_large) == len(mapping)
    for label, row in rows_whole.items():
        other = rows_large[mapping[label]]
        for key, value in row.items():
            if key != "label":
                assert float(other[key]) == pytest.approx(float(value), abs=1e-4), key
    # the summary rows agree but for the route, the time and the fingerprint
    (a,), (b,) = _summary(zoo["folder"] / "whole"), _summary(out)
    assert list(b) == list(SUMMARY_COLUMNS)
    assert a["route"] == "" and b["route"] == "large"
    assert a["fingerprint"] != b["fingerprint"]
    for key in SUMMARY_COLUMNS:
        if key not in ("route", "seconds", "fingerprint"):
            assert a[key] == b[key], (key, a[key], b[key])
    assert b["tile"] == "128" and b["tiles"] == "4" and b["status"] == "ok"


def test_the_route_follows_the_planes_size_and_a_png_is_read_whole(zoo, tmp_path):
    frame = zoo["frame"]
    tifffile.imwrite(tmp_path / "big.tif", frame[:96, :128], photometric="minisblack")
    tifffile.imwrite(tmp_path / "small.tif", frame[:64, :64], photometric="minisblack")
    Image.fromarray((frame[96:, 96:] // 257).astype(np.uint8)).save(tmp_path / "photo.png")
    threshold = 0.01  # megapixels: 96 x 128 px is above it, 64 x 64 and the PNG's too
    assert route_of(tmp_path / "big.tif", threshold=threshold) == (True, None)
    assert route_of(tmp_path / "small.tif", threshold=threshold) == (False, None)
    assert route_of(tmp_path / "big.tif") == (False, None)  # the 64 MP default
    out = tmp_path / "out"
    inputs = [tmp_path / n for n in ("big.tif", "small.tif", "photo.png")]
    report = predict_images(None, None, inputs, out, large_threshold=threshold, **zoo["run"])
    assert report.ok
    names = {p.name for p in out.iterdir()}
    assert {"big_labels.ome.zarr", "big_nuclei.csv", "small_labels.tif", "small_overlay.png",
            "photo_labels.tif", "photo_overlay.png"} <= names
    assert not {"big_labels.tif", "big_overlay.png", "small_labels.ome.zarr"} & names
    routes = {Path(r["image"]).name: r["route"] for r in _summary(out)}
    assert routes == {"big.tif": "large", "small.tif": "", "photo.png": ""}
    notes = [n for n in report.notes if "photo.png" in n]
    # width x height, as the project's notes say it
    assert len(notes) == 1 and "read whole" in notes[0] and "128x96 px" in notes[0]

    # a rerun leaves them as they are; --redo segments them again, the zarr replaced
    again = predict_images(None, None, inputs, out, large_threshold=threshold, **zoo["run"])
    assert sorted(p.name for p in again.skipped) == ["big.tif", "photo.png", "small.tif"]
    assert not again.results
    assert {r["status"] for r in _summary(out)} == {"skipped (done)"}
    assert [r["route"] for r in _summary(out)] == ["large", "", ""]
    before = zarr.open_group(str(out / "big_labels.ome.zarr"), mode="r")["0"][...]
    marker = out / "big_labels.ome.zarr" / "stale"
    marker.write_text("left by the earlier run")
    redone = predict_images(None, None, inputs, out, large_threshold=threshold, redo=True,
                            **zoo["run"])
    assert len(redone.results) == 3 and not redone.skipped
    assert {r["status"] for r in _summary(out)} == {"ok"}
    assert not marker.exists()  # the folder was replaced whole
    after = zarr.open_group(str(out / "big_labels.ome.zarr"), mode="r")["0"][...]
    assert np.array_equal(before, after) and before.max() > 0
    # the same image with the threshold above it goes the whole route: not "done"
    other = predict_images(None, None, [tmp_path / "big.tif"], out, **zoo["run"])
    assert not other.skipped and (out / "big_labels.tif").is_file()
    assert _summary(out)[0]["route"] == ""
    assert _leftovers(out) == []


def test_a_users_zarr_folder_in_the_way_is_refused_before_any_work(zoo, tmp_path):
    tifffile.imwrite(tmp_path / "cells.tif", zoo["frame"][:64, :96], photometric="minisblack")
    out = tmp_path / "out"
    mine = zarr.open_group(str(out / "cells_labels.ome.zarr"), mode="w", zarr_format=2)
    mine.create_array("0", shape=(4, 4), dtype="uint8")
    with pytest.raises(OutputConflict, match="cells_labels.ome.zarr: a folder is in the way"):
        predict_images(None, None, [tmp_path / "cells.tif"], out, large=True, **zoo["run"])
    assert sorted(p.name for p in out.iterdir()) == ["cells_labels.ome.zarr"]
    assert zarr.open_group(str(out / "cells_labels.ome.zarr"), mode="r")["0"].shape == (4, 4)
    # the same name on the whole route is no output: no conflict there
    report = predict_images(None, None, [tmp_path / "cells.tif"], out, **zoo["run"])
    assert report.ok and (out / "cells_labels.tif").is_file()


class FailsOnSecondTile:
    """The shipped model, but out of memory on the second full 128-px tile it is given."""

    def __init__(self, predictor):
        self._predictor, self.calls = predictor, 0

    def __getattr__(self, name):
        return getattr(self._predictor, name)

    def run_model(self, rgb):
        if rgb.shape[:2] == (128, 128):
            self.calls += 1
            if self.calls == 2:
                raise RuntimeError("CPU out of memory (test)")
        return self._predictor.run_model(rgb)


def test_a_failure_inside_the_large_route_fails_that_image_only(zoo, tmp_path):
    frame = zoo["frame"]
    tifffile.imwrite(tmp_path / "a_frame.tif", frame, tile=(64, 64), photometric="minisblack")
    tifffile.imwrite(tmp_path / "b_stack.tif", np.stack([frame[:64, :64]] * 3),
                     photometric="minisblack")
    tifffile.imwrite(tmp_path / "c_crop.tif", frame[:96, :96], photometric="minisblack")
    Image.fromarray((frame[:64, :64] // 257).astype(np.uint8)).save(tmp_path / "d_photo.png")
    out = tmp_path / "out"
    run = dict(zoo["run"], predictor=FailsOnSecondTile(zoo["predictor"]))
    report = predict_images(None, None, [tmp_path], out, large=True, **run)
    failed = {Path(f.image).name: f.reason for f in report.failures}
    assert sorted(failed) == ["a_frame.tif", "b_stack.tif", "d_photo.png"]
    assert "a_frame.tif: tile rows" in failed["a_frame.tif"]
    assert "CPU out of memory (test)" in failed["a_frame.tif"]
    assert "holds 3 planes" in failed["b_stack.tif"]
    assert "reads TIFF (BigTIFF, OME-TIFF) and OME-Zarr" in failed["d_photo.png"]
    rows = {Path(r["image"]).name: r for r in _summary(out)}
    assert [rows[n]["status"] for n in sorted(rows)] == ["failed", "failed", "ok", "failed"]
    assert rows["a_frame.tif"]["route"] == "large"
    # nothing of the failed images is left, not even under a temporary name
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == [
        "c_crop_labels.ome.zarr", "c_crop_nuclei.csv", "summary.csv"]
    assert _leftovers(out) == []
    # a rerun redoes the failed ones only
    again = predict_images(None, None, [tmp_path], out, large=True, **zoo["run"])
    assert [p.name for p in again.skipped] == ["c_crop.tif"]
    assert sorted(Path(f.image).name for f in again.failures) == ["b_stack.tif", "d_photo.png"]
    assert (out / "a_frame_labels.ome.zarr").is_dir()


def test_a_full_disk_on_the_large_route_stops_the_run_and_the_rerun_resumes(zoo, tmp_path):
    """A real write failure (the file size limit, as a full disk gives) while the large route
    streams an image's GeoJSON: the run stops naming it, nothing of it is left, the image
    before it stays done, and the same command with room again finishes the batch."""
    import resource
    import signal

    frame = zoo["frame"]
    images = tmp_path / "images"
    images.mkdir()
    tifffile.imwrite(images / "a_crop.tif", frame[:48, :48], photometric="minisblack")
    tifffile.imwrite(images / "b_frame.tif", frame, tile=(64, 64), photometric="minisblack")
    tifffile.imwrite(images / "c_crop.tif", frame[48:96, :48], photometric="minisblack")
    out = tmp_path / "out"
    run = dict(zoo["run"], large=True, geojson=True, rois=True)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of a signal
    # a's files are a few kB each; b's GeoJSON is about 75 kB
    resource.setrlimit(resource.RLIMIT_FSIZE, (32 * 1024, hard))
    try:
        with pytest.raises(OSError, match="the outputs of .*b_frame.tif cannot be written") as e:
            predict_images(None, None, [images], out, **run)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)
    assert "the run stops here" in str(e.value)
    rows = {Path(r["image"]).name: r for r in _summary(out)}
    assert rows["a_crop.tif"]["status"] == "ok" and rows["a_crop.tif"]["route"] == "large"
    assert rows["b_frame.tif"]["status"] == "failed"
    assert rows["b_frame.tif"]["error"].startswith("outputs not written")
    assert rows["c_crop.tif"]["status"] == "pending"
    assert _leftovers(out) == [] and not list(out.glob("b_frame*")) and not list(
        out.glob("c_crop*"))
    # room again: a is skipped, b and c are done, as one uninterrupted run does them
    again = predict_images(None, None, [images], out, **run)
    assert [p.name for p in again.skipped] == ["a_crop.tif"]
    rows = {Path(r["image"]).name: r for r in _summary(out)}
    assert {n: r["status"] for n, r in rows.items()} == {
        "a_crop.tif": "skipped (done)", "b_frame.tif": "ok", "c_crop.tif": "ok"}
    predict_images(None, None, [images], tmp_path / "once", **run)
    for name in ("b_frame_nuclei.csv", "b_frame_nuclei.geojson", "c_crop_nuclei.csv"):
        assert (out / name).read_bytes() == (tmp_path / "once" / name).read_bytes(), name
    assert np.array_equal(zarr.open_group(str(out / "b_frame_labels.ome.zarr"), mode="r")["0"][:],
                          zarr.open_group(str(tmp_path / "once" / "b_frame_labels.ome.zarr"),
                                          mode="r")["0"][:])


def test_the_cli_takes_the_large_route_end_to_end(zoo, tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("predict_tool_large",
                                                  ROOT / "tools" / "predict.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    crop = zoo["frame"][:96, :128]
    tifffile.imwrite(tmp_path / "crop.ome.tif", crop, photometric="minisblack",
                     metadata={"axes": "YX", "PhysicalSizeX": 0.5, "PhysicalSizeY": 0.5})
    out = tmp_path / "out"
    argv = ["--config-file", str(zoo["config"]), "--weights", str(zoo["weights"]), "--large",
            "--input", str(tmp_path / "crop.ome.tif"), "--output", str(out), "--tile", "128",
            "--overlap", "32", "--diameter", str(zoo["diameter"]), "--geojson"]
    assert tool.main(argv) == 0
    assert "1 image(s) processed" in capsys.readouterr().out
    (row,) = _summary(out)
    assert row["route"] == "large" and row["status"] == "ok" and int(row["nuclei"]) > 0
    assert row["pixel_size_x_um"] == "0.5"
    group = zarr.open_group(str(out / "crop_labels.ome.zarr"), mode="r")
    assert group["0"].shape == crop.shape
    assert group.attrs["multiscales"][0]["datasets"][0]["coordinateTransformations"][0][
        "scale"] == [0.5, 0.5]
    table = _table(out / "crop_nuclei.csv")
    assert len(table) == int(row["nuclei"])
    assert all(float(r["area_um2"]) == pytest.approx(float(r["area"]) * 0.25) for r in
               table.values())
    assert (out / "crop_nuclei.geojson").is_file() and not (out / "crop_overlay.png").exists()
    with pytest.raises(SystemExit):
        tool.main(argv + ["--large-threshold", "0"])
    assert "--large-threshold" in capsys.readouterr().err
    # --large-memory is taken (this one-chunk image never spills; spilling itself is tested
    # in test_predict_large.py) and the outputs do not depend on it
    low = tmp_path / "low"
    assert tool.main([a if a != str(out) else str(low) for a in argv]
                     + ["--large-memory", "0.015625"]) == 0
    assert np.array_equal(zarr.open_group(str(low / "crop_labels.ome.zarr"), mode="r")["0"][:],
                          group["0"][:])
    for name in ("crop_nuclei.csv", "crop_nuclei.geojson"):
        assert (low / name).read_bytes() == (out / name).read_bytes()
    assert _leftovers(low) == []
    with pytest.raises(SystemExit):
        tool.main(argv + ["--large-memory", "0"])
    assert "--large-memory" in capsys.readouterr().err


def test_on_a_dask_cluster_a_large_images_tiles_go_to_the_workers(zoo, tmp_path):
    """A cluster of one worker (a thread of this process, to keep the test short: the worker
    processes of a LocalCluster are tests/test_predict_dask.py's): the large frame's tiles
    are its tasks, a small image is one task; the files are the serial run's."""
    import logging

    from distributed import Client, LocalCluster

    images = tmp_path / "images"
    images.mkdir()
    shutil.copy(zoo["folder"] / "images" / "frame.tif", images / "frame.tif")
    tifffile.imwrite(images / "small.tif", zoo["frame"][:64, :64], photometric="minisblack")
    out = tmp_path / "out"
    options = {k: v for k, v in zoo["run"].items() if k != "predictor"}
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False,
                      dashboard_address=None, silence_logs=logging.ERROR) as cluster, \
            Client(cluster) as client:
        report = predict_images(zoo["config"], zoo["weights"], [images], out, dask=client,
                                large_threshold=0.03, device="cpu", **options)
    assert report.ok and [r.large for r in report.results] == [True, False]
    serial = zoo["folder"] / "large"
    labels = [zarr.open_group(str(f / "frame_labels.ome.zarr"), mode="r")["0"][...]
              for f in (serial, out)]
    assert np.array_equal(labels[0], labels[1]) and labels[0].max() > 20
    assert (out / "frame_nuclei.csv").read_bytes() == (serial / "frame_nuclei.csv").read_bytes()
    rows = _summary(out)
    assert [r["route"] for r in rows] == ["large", ""]
    assert rows[0]["nuclei"] == _summary(serial)[0]["nuclei"]
    assert (out / "small_labels.tif").is_file()
