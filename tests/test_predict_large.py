"""The large-image path (sharp_fpn.predict.large): equal to the whole-image path where both run,
bounded where only it can, and nothing half-written when it fails.

Every file is written by the library users write it with (tifffile, zarr) and read back by the
library that reads it for users (zarr, the project's own reader, roifile, json).
"""
import csv
import json
import math
import shutil
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import tifffile
import zarr

from sharp_fpn.perf.benchmarks.large import blob_window, write_blob_tiff
from sharp_fpn.predict.formats import nucleus_outlines
from sharp_fpn.predict.image_io import (
    ImageReadError,
    load_image,
    percentile_normalise,
    read_planes,
)
from sharp_fpn.predict.large import (
    BandStitcher,
    LargeOutputs,
    LargeSource,
    ThresholdModel,
    TileReader,
    TileRunner,
    normalisation_ranges,
    segment_large,
)
from sharp_fpn.predict.outputs import nuclei_table
from sharp_fpn.predict.tiling import (
    InstanceSet,
    TileError,
    keep_largest_components,
    stitch_instances,
    tile_grid,
)


def _read_labels(folder: Path) -> np.ndarray:
    return zarr.open_group(str(folder), mode="r")["0"][...]


def _bijection(a: np.ndarray, b: np.ndarray) -> dict:
    """``{id in a: id in b}`` when the two label images are one renumbering of each other."""
    assert a.shape == b.shape
    assert np.array_equal(a > 0, b > 0), f"{int(((a > 0) != (b > 0)).sum())} pixels differ"
    pairs = np.unique(np.stack([a[a > 0].astype(np.int64), b[a > 0].astype(np.int64)]), axis=1)
    assert len(np.unique(pairs[0])) == len(np.unique(pairs[1])) == pairs.shape[1]
    return {int(x): int(y) for x, y in pairs.T}


# ------------------------------------------------------------------ the stitch, without a model


def _random_sets(rng, shape, tiles, nuclei=60):
    """Discs (some duplicated with a lower score, as Mask R-CNN's leftovers) seen by each tile
    that holds them whole or cut by its border, as a model would see them."""
    height, width = shape
    centres = rng.uniform([0, 0], [height, width], size=(nuclei, 2))
    radii = rng.uniform(3, 9, size=nuclei)
    scores = rng.uniform(0.5, 1.0, size=nuclei)
    # duplicates: a shifted, weaker copy of some nuclei
    dup = rng.choice(nuclei, size=nuclei // 4, replace=False)
    centres = np.concatenate([centres, centres[dup] + rng.normal(0, 2, size=(dup.size, 2))])
    radii = np.concatenate([radii, radii[dup] * 0.9])
    scores = np.concatenate([scores, scores[dup] * 0.8])
    ys, xs = np.mgrid[0:height, 0:width]
    sets = []
    for t in tiles:
        boxes, masks, kept = [], [], []
        for (cy, cx), r, s in zip(centres, radii, scores):
            disc = (ys[t.slices] + 0.5 - cy) ** 2 + (xs[t.slices] + 0.5 - cx) ** 2 < r * r
            rows, cols = np.flatnonzero(disc.any(1)), np.flatnonzero(disc.any(0))
            if rows.size == 0:
                continue
            box = (rows[0], cols[0], rows[-1] + 1, cols[-1] + 1)
            boxes.append(box)
            masks.append(disc[box[0]:box[2], box[1]:box[3]])
            kept.append(s)
        sets.append(InstanceSet(np.asarray(boxes, np.int64).reshape(-1, 4), masks,
                                np.asarray(kept, np.float64)))
    return sets


@pytest.mark.parametrize("seed", range(4))
def test_band_stitch_equals_the_whole_image_stitch(seed):
    rng = np.random.default_rng(seed)
    shape = (230, 170)
    # tile 64, overlap 24: neighbouring rows of tiles overlap by more than a third of a tile
    tiles = tile_grid(*shape, 64, 24)
    sets = _random_sets(rng, shape, tiles)
    whole = stitch_instances(shape, tiles, sets, min_kept_fraction=0.5)
    expected = keep_largest_components(whole.labels)
    stitcher = BandStitcher(shape, min_kept_fraction=0.5)
    per_row = len({t.left for t in tiles})
    rows = [tiles[k:k + per_row] for k in range(0, len(tiles), per_row)]
    out = np.zeros(shape, np.int64)
    scores = {}
    written = 0
    for r, row in enumerate(rows):
        reach = rows[r + 1][0].top if r + 1 < len(rows) else shape[0]
        for nucleus in stitcher.add_row(row, sets[r * per_row:(r + 1) * per_row], reach):
            scores[nucleus.label] = nucleus.score
        final = stitcher.final_rows()
        out[written:final] = stitcher.labels(written, final)
        stitcher.drop(final)
        written = final
    assert written == shape[0]
    mapping = _bijection(expected, out)
    assert stitcher.count == len(whole.scores) == len(mapping)
    for old, new in mapping.items():
        assert scores[new] == whole.scores[old - 1]
    # ids are given in order of decision: the same numbers on every run
    assert sorted(scores) == list(range(1, stitcher.count + 1))


# ------------------------------------------------------------------ normalisation


def test_normalisation_from_the_strided_sample_is_the_whole_images_exactly(tmp_path):
    # > 4 MP, so the whole-image functions sample every 2nd row and column
    height, width = 2050, 2000
    path = write_blob_tiff(tmp_path / "big.tif", height, width, tile=256, seed=3)
    loaded = load_image(path)
    source = LargeSource(path)
    how, normalised = normalisation_ranges(source, True, (1.0, 99.8))
    assert how == loaded.stretching and how.mode == "percentile"
    rgb, expected = percentile_normalise(loaded.rgb, (1.0, 99.8))
    assert normalised == expected
    # and a tile's model input is the whole image's, cut
    reader = TileReader(source, how, normalised)
    tile = tile_grid(height, width, 512, 64)[7]
    assert np.array_equal(reader.rgb(tile), rgb[tile.slices])


# ------------------------------------------------------------------ the shipped model, end to end


@pytest.fixture(scope="module")
def zoo_run(tmp_path_factory):
    """A 16-bit fluorescence frame (synthetic v2) segmented both ways by the shipped model."""
    from sharp_fpn import model_zoo
    from sharp_fpn.d2.predictor import NucleiPredictor
    from sharp_fpn.data.synthetic_v2 import generate_image

    folder = tmp_path_factory.mktemp("large")
    image = None
    for seed in range(3, 40):  # the first seed drawing a 16-bit frame
        image, _ = generate_image(np.random.default_rng(seed), 352, 400, "fluorescence")
        if image.dtype == np.uint16:
            break
    assert image.dtype == np.uint16
    path = folder / "frame.tif"
    tifffile.imwrite(path, image, tile=(128, 128), photometric="minisblack")
    config, weights = model_zoo.resolve()
    predictor = NucleiPredictor(config, weights)
    loaded = load_image(path)
    whole = predictor.predict(loaded.rgb, tile=160, overlap=40)
    outputs = LargeOutputs(folder / "frame_labels.ome.zarr", folder / "frame_nuclei.csv",
                           geojson=folder / "frame_nuclei.geojson",
                           rois=folder / "frame_rois.zip", stem="frame", chunk=80)
    result = segment_large(path, outputs, predictor=predictor, tile=160, overlap=40,
                           pixel_size=0.5, progress=False)
    return loaded, whole, result


def test_large_path_labels_equal_the_whole_image_path(zoo_run):
    loaded, whole, result = zoo_run
    assert result.tiles == whole.tiles == 9
    assert whole.count > 50  # a real segmentation, not an empty one
    labels = _read_labels(result.labels)
    assert labels.dtype == np.uint32
    mapping = _bijection(whole.labels, labels)
    assert result.nuclei == whole.count == len(mapping)
    # the summary's figures, kept per nucleus
    areas = np.bincount(whole.labels.ravel())[1:]
    for old, new in mapping.items():
        assert result.areas[new - 1] == areas[old - 1]
        assert result.scores[new - 1] == whole.scores[old - 1]


def test_large_path_table_rows_agree_with_nuclei_table(zoo_run):
    loaded, whole, result = zoo_run
    labels = _read_labels(result.labels)
    mapping = _bijection(whole.labels, labels)
    with open(result.table, newline="") as f:
        rows = {int(r["label"]): r for r in csv.DictReader(f)}
    expected = nuclei_table(whole.labels, whole.scores, loaded.intensity)
    assert len(rows) == len(expected)
    for row in expected:
        got = rows[mapping[row["label"]]]
        for key, value in row.items():
            if key == "label":
                continue
            assert float(got[key]) == pytest.approx(float(value), abs=1e-4), (key, row, got)
        # the micrometre columns of a 0.5 um pixel
        assert float(got["area_um2"]) == pytest.approx(row["area"] * 0.25, abs=1e-4)
        assert float(got["centroid_x_um"]) == pytest.approx(row["centroid_x"] * 0.5, abs=1e-3)


def test_large_path_outlines_are_the_whole_images(zoo_run):
    from roifile import roiread

    loaded, whole, result = zoo_run
    labels = _read_labels(result.labels)
    mapping = _bijection(whole.labels, labels)
    expected = {mapping[k]: v for k, v in nucleus_outlines(whole.labels).items()}
    features = json.loads(Path(result.geojson).read_text())["features"]
    assert len(features) == len(expected)
    for feature in features:
        label = int(feature["properties"]["name"])
        ring = np.asarray(feature["geometry"]["coordinates"][0])[:-1]
        assert np.allclose(ring, expected[label], atol=1e-3)
        assert feature["properties"]["objectType"] == "detection"
    rois = roiread(result.rois)
    assert len(rois) == len(expected)
    for roi in rois[:20]:
        assert np.allclose(roi.coordinates(), expected[int(roi.name)], atol=1e-3)


def test_large_path_labels_are_an_ome_zarr_with_the_pixel_size(zoo_run):
    _, whole, result = zoo_run
    group = zarr.open_group(str(result.labels), mode="r")
    scale = group.attrs["multiscales"][0]
    assert scale["version"] == "0.4"
    assert [a["unit"] for a in scale["axes"]] == ["micrometer"] * 2
    assert group["0"].chunks == (80, 80)
    planes = read_planes(result.labels)  # the project's OME-Zarr reader
    assert planes.pixel_size.x == planes.pixel_size.y == 0.5
    assert np.array_equal(planes.pixels[0] > 0, whole.labels > 0)
    # nothing but the outputs: the temporaries were renamed
    assert sorted(p.name for p in result.labels.parent.iterdir()) == [
        "frame.tif", "frame_labels.ome.zarr", "frame_nuclei.csv", "frame_nuclei.geojson",
        "frame_rois.zip"]


# ------------------------------------------------------------------ bounded memory


def _threshold_run(folder: Path, height: int) -> tuple:
    path = write_blob_tiff(folder / f"blobs_{height}.tif", height, 384, tile=128, seed=1)
    outputs = LargeOutputs(folder / f"l_{height}.ome.zarr", folder / f"t_{height}.csv",
                           chunk=64)
    tracemalloc.start()
    result = segment_large(path, outputs, predictor=ThresholdModel(100.0, 20), tile=128,
                           overlap=32, progress=False)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return result, peak


def test_memory_held_does_not_grow_with_the_image(tmp_path):
    small, small_peak = _threshold_run(tmp_path, 640)
    large, large_peak = _threshold_run(tmp_path, 1280)  # twice as tall
    assert large.tiles > 1.8 * small.tiles and large.nuclei > 1.9 * small.nuclei
    # label rows held: a chunk row being finished, a row of tiles and its overlap, whatever
    # the height (the tiles' spacing, hence the exact figure, depends on the height a little)
    assert max(large.peak_band_rows, small.peak_band_rows) <= 64 + 128 + 32
    assert large.peak_band_rows <= small.peak_band_rows + 16
    assert large.peak_tiles_in_flight == small.peak_tiles_in_flight == 4
    assert large.peak_pending <= small.peak_pending * 1.1 + 5
    # numpy's allocations, traced: the peak of the larger image is not larger
    assert large_peak < 1.15 * small_peak, (small_peak, large_peak)
    # and the labels are the blobs' (a stand-in model, but the stitch is the real one)
    labels = _read_labels(large.labels)
    truth = blob_window(0, 0, 1280, 384, seed=1)
    assert large.nuclei == len(np.unique(labels)) - 1
    assert np.mean((labels > 0) == (truth > 1000)) > 0.99


# ------------------------------------------------------------------ bad input, nothing half-written


def test_a_missing_chunk_is_refused_naming_it(tmp_path):
    pixels = blob_window(0, 0, 300, 260, seed=2)
    store = tmp_path / "slide.ome.zarr"
    group = zarr.open_group(str(store), mode="w", zarr_format=2)
    group.create_array("0", shape=pixels.shape, chunks=(100, 100), dtype="uint16")[...] = pixels
    group.attrs["multiscales"] = [{"version": "0.4", "axes": [
        {"name": "y", "type": "space"}, {"name": "x", "type": "space"}],
        "datasets": [{"path": "0"}]}]
    (store / "0" / "2.1").unlink()  # rows 200-300, columns 100-200
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(ImageReadError) as failed:
        segment_large(store, LargeOutputs(out / "s.ome.zarr", out / "s.csv"),
                      predictor=ThresholdModel(100.0, 20), tile=128, overlap=32,
                      progress=False)
    message = str(failed.value)
    assert str(store) in message and "2.1" in message and "\n" not in message
    assert list(out.iterdir()) == []
    # read as zarr reads it when asked to
    result = segment_large(store, LargeOutputs(out / "s.ome.zarr", out / "s.csv"),
                           predictor=ThresholdModel(100.0, 20), tile=128, overlap=32,
                           progress=False, allow_missing_chunks=True)
    assert not _read_labels(result.labels)[200:300, 100:200].any()


class _FailsLow(ThresholdModel):
    """A model that runs out of memory on the tiles below row 150."""

    def instances(self, rgb, tile):
        if tile.top > 150:
            raise MemoryError("cannot allocate 2.1 GiB")
        return super().instances(rgb, tile)


def test_a_tile_failing_mid_run_leaves_nothing_written(tmp_path):
    path = write_blob_tiff(tmp_path / "b.tif", 400, 300, tile=128)
    out = tmp_path / "out"
    outputs = LargeOutputs(out / "b.ome.zarr", out / "b.csv", geojson=out / "b.geojson",
                           rois=out / "b.zip", chunk=64)
    with pytest.raises(TileError, match=r"b\.tif: tile rows \d+-\d+, columns 0-128: "
                                        r"MemoryError: cannot allocate"):
        segment_large(path, outputs, predictor=_FailsLow(100.0, 20), tile=128, overlap=32,
                      progress=False)
    assert list(out.iterdir()) == []  # the chunks and rows written so far went with the rest


def test_outputs_are_put_in_place_labels_first_all_or_none(tmp_path):
    # the GeoJSON cannot take its place (a folder of the user's is there): the labels and the
    # table already renamed are removed again, the temporary files too, the folder kept
    path = write_blob_tiff(tmp_path / "b.tif", 300, 260, tile=128)
    out = tmp_path / "out"
    (out / "b.geojson").mkdir(parents=True)
    (out / "b.geojson" / "keep.txt").write_text("mine")
    outputs = LargeOutputs(out / "b.ome.zarr", out / "b.csv", geojson=out / "b.geojson",
                           chunk=64)
    with pytest.raises(OSError):
        segment_large(path, outputs, predictor=ThresholdModel(100.0, 20), tile=128, overlap=32,
                      progress=False)
    assert sorted(p.name for p in out.iterdir()) == ["b.geojson"]
    assert (out / "b.geojson" / "keep.txt").read_text() == "mine"


def test_files_the_path_cannot_take_are_refused_in_one_line(tmp_path):
    stack = tmp_path / "stack.tif"
    tifffile.imwrite(stack, np.zeros((3, 64, 64), np.uint8), photometric="minisblack")
    with pytest.raises(ImageReadError, match="holds 3 planes"):
        LargeSource(stack)
    channels = tmp_path / "channels.ome.tif"
    tifffile.imwrite(channels, np.zeros((2, 64, 64), np.uint16), ome=True,
                     metadata={"axes": "CYX", "Channel": {"Name": ["DAPI", "GFP"]}})
    with pytest.raises(ImageReadError, match="DAPI"):
        LargeSource(channels)
    picked = LargeSource(channels, channel="GFP")
    assert (picked.channel, picked.channel_name, picked.colour) == (1, "GFP", "gray")
    png = tmp_path / "x.png"
    png.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 32)
    with pytest.raises(ImageReadError, match="TIFF"):
        LargeSource(png)


def test_a_channel_and_rgb_windows_match_the_whole_image_reader(tmp_path):
    rgb = np.stack([blob_window(0, 0, 200, 150, seed=s) for s in range(3)], axis=-1)
    path = tmp_path / "rgb.tif"
    tifffile.imwrite(path, rgb, tile=(64, 64), photometric="rgb")
    whole = read_planes(path).pixels[0]
    assert np.array_equal(LargeSource(path).window(30, 170, 20, 140), whole[30:170, 20:140])
    green = LargeSource(path, channel=1)
    assert np.array_equal(green.window(0, 200, 0, 150), whole[..., 1])
    # a pickled source (a Dask task's) reopens the file
    import pickle

    again = pickle.loads(pickle.dumps(green))
    assert np.array_equal(again.window(5, 9, 5, 9), whole[5:9, 5:9, 1])


def test_a_tile_runner_is_picklable_and_names_the_tile(tmp_path):
    import pickle

    path = write_blob_tiff(tmp_path / "b.tif", 256, 256, tile=128)
    source = LargeSource(path)
    how, _ = normalisation_ranges(source)
    runner = pickle.loads(pickle.dumps(TileRunner(ThresholdModel(100.0, 20),
                                                  TileReader(source, how))))
    tile = tile_grid(256, 256, 128, 32)[0]
    assert len(runner(tile)) > 5
    shutil.copy(tmp_path / "b.tif", tmp_path / "c.tif")
    broken = TileRunner(ThresholdModel(float("nan")), TileReader(LargeSource(tmp_path / "c.tif"),
                                                                  how))
    (tmp_path / "c.tif").write_bytes(b"II*\x00" + b"\0" * 16)
    with pytest.raises(TileError, match=r"c\.tif: tile rows 0-128, columns 0-128"):
        broken(tile)


def test_diameter_needing_a_rescale_is_refused(tmp_path):
    class Scaled(ThresholdModel):
        nucleus_diameter = 22.0

    path = write_blob_tiff(tmp_path / "b.tif", 256, 256, tile=128)
    with pytest.raises(ValueError, match="scale 1 only"):
        segment_large(path, LargeOutputs(tmp_path / "o.zarr", tmp_path / "o.csv"),
                      predictor=Scaled(), tile=128, overlap=32, diameter=11.0, progress=False)
    assert not (tmp_path / "o.csv").exists()
    assert math.isclose(Scaled.nucleus_diameter, 22.0)


# ------------------------------------------------------------------ the benchmark


def test_the_procedural_image_is_written_tile_by_tile_as_its_windows_say(tmp_path):
    path = write_blob_tiff(tmp_path / "b.tif", 300, 200, tile=128, seed=5)
    with tifffile.TiffFile(path) as tif:
        page = tif.pages[0]
        assert tif.is_bigtiff and page.is_tiled and (page.tilelength, page.tilewidth) == (128, 128)
        stored = page.asarray()
    assert np.array_equal(stored, blob_window(0, 0, 300, 200, seed=5))
    assert np.array_equal(blob_window(100, 50, 60, 70, seed=5), stored[100:160, 50:120])


def test_large_benchmark_records_peak_memory_and_time_per_size(tmp_path):
    from sharp_fpn.perf.benchmarks import benchmark_parser, run_benchmark

    args = benchmark_parser("large").parse_args([
        "--out-dir", str(tmp_path), "--sizes", "320", "--tile", "128", "--overlap",
        "32", "--chunk", "64", "--work-dir", str(tmp_path / "work")])
    record = json.loads(run_benchmark("large", args).read_text())
    figures = record["figures"]
    assert [r["size"] for r in figures["results"]] == [320]  # one child: each takes seconds
    for r in figures["results"]:
        assert r["peak_rss_mb"] >= r["rss_after_setup_mb"] > 10
        assert r["nuclei"] > 0.5 * 0.8 * (r["size"] / 32) ** 2 and r["seconds"] > 0
        assert r["peak_tiles_in_flight"] == len(tile_grid(r["size"], r["size"], 128, 32)) ** 0.5
    assert figures["peak_rss_largest_over_smallest"] > 0
    assert not list((tmp_path / "work").iterdir())  # images and outputs removed


def test_a_row_buffer_holds_its_rows_through_drops_compactions_and_growth():
    from sharp_fpn.predict.large import RowBuffer

    rows = RowBuffer(3, np.int64)
    truth = np.arange(300 * 3).reshape(300, 3)
    held_from = 0
    for bottom, top in [(10, 0), (25, 4), (40, 30), (41, 41), (90, 60), (200, 150), (300, 299)]:
        rows.extend(bottom, truth[rows.bottom:bottom])
        rows.drop(top)
        held_from = max(held_from, top)
        assert rows.base == held_from and rows.bottom == bottom
        assert np.array_equal(rows.array, truth[held_from:bottom])
    # moved in place in blocks when fewer rows were dropped than are kept
    again = RowBuffer(3, np.int64)
    again.extend(10, truth[:10])  # a buffer of 12 rows
    again.drop(3)
    again.extend(13, truth[10:13])  # 3 + 7 + 3 > 12: rows 3..10 move to the start
    assert np.array_equal(again.array, truth[3:13]) and len(again._buffer) == 12
    zeros = RowBuffer(2, np.int32)
    zeros.extend(5)
    zeros.array[:] = 7
    zeros.drop(5)
    zeros.extend(8)  # reused rows come back zero
    assert zeros.base == 5 and not zeros.array.any()


def test_an_empty_field_gives_empty_outputs_that_read_back(tmp_path):
    path = tmp_path / "empty.tif"
    tifffile.imwrite(path, np.full((300, 200), 40, np.uint8), tile=(128, 128))
    out = tmp_path / "out"
    result = segment_large(path, LargeOutputs(out / "e.ome.zarr", out / "e.csv",
                                              geojson=out / "e.geojson", rois=out / "e.zip"),
                           predictor=ThresholdModel(100.0, 20), tile=128, overlap=32,
                           progress=False)
    assert result.nuclei == 0 and result.areas.size == 0
    assert not _read_labels(result.labels).any()
    assert (out / "e.csv").read_text().splitlines() == [",".join(
        ["label", "score", "area", "centroid_y", "centroid_x", "bbox_min_row", "bbox_min_col",
         "bbox_max_row", "bbox_max_col", "mean_intensity", "eccentricity"])]
    assert json.loads((out / "e.geojson").read_text()) == {"type": "FeatureCollection",
                                                         "features": []}
