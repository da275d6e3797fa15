"""The large-image path (sharp_fpn.predict.large): equal to the whole-image path where both run,
bounded where only it can, and nothing half-written when it fails.

Every file is written by the library users write it with (tifffile, zarr) and read back by the
library that reads it for users (zarr, the project's own reader, roifile, json).
"""
import csv
import json
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
    GridStitcher,
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

from support import bijection, zarr_labels


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


def _stitch_tile_by_tile(shape, tile, overlap, sets, chunk, budget, scratch=None):
    """The tiles' instances through a GridStitcher, its final chunks gathered into one image."""
    stitcher = GridStitcher(shape, tile, overlap, chunk=chunk, budget=budget,
                            min_kept_fraction=0.5, scratch=scratch)
    out = np.zeros(shape, np.int64)
    written = np.zeros(shape, np.int64)  # how many times each pixel was handed over
    scores = {}
    for found in sets:
        for nucleus in stitcher.add(found):
            scores[nucleus.label] = nucleus.score
        for key in stitcher.final_chunks():
            t, l, b, r = stitcher.store.bounds(key)
            out[t:b, l:r] = stitcher.take(key)
            written[t:b, l:r] += 1
    assert stitcher.done
    assert (written == 1).all()  # every chunk handed over once, whole
    return stitcher, out, scores


@pytest.mark.parametrize("seed", range(4))
def test_tile_by_tile_stitch_equals_the_whole_image_stitch(seed, tmp_path):
    rng = np.random.default_rng(seed)
    shape = (230, 170)
    # tile 64, overlap 24: neighbouring tiles overlap by more than a third of a tile
    tiles = tile_grid(*shape, 64, 24)
    sets = _random_sets(rng, shape, tiles)
    whole = stitch_instances(shape, tiles, sets, min_kept_fraction=0.5)
    expected = keep_largest_components(whole.labels)
    # chunks of 32 px, all held, or at most 3 in memory (the others spilled and read back)
    for budget in (10_000, 3):
        stitcher, out, scores = _stitch_tile_by_tile(shape, 64, 24, sets, 32, budget,
                                                     tmp_path / f"scratch{budget}")
        mapping = bijection(expected, out)
        assert stitcher.count == len(whole.scores) == len(mapping)
        for old, new in mapping.items():
            assert scores[new] == whole.scores[old - 1]
        # ids are given in order of decision: the same numbers on every run
        assert sorted(scores) == list(range(1, stitcher.count + 1))
        if budget == 3:
            assert stitcher.store.spills > 0 and stitcher.store.peak_held <= 3 + 9
            assert not any((tmp_path / "scratch3").iterdir())  # every spilled chunk came back
        else:
            assert stitcher.store.spills == 0
    # most instances are decided with their own tile: few wait at once
    assert stitcher.peak_pending < 0.5 * sum(len(s) for s in sets)


def test_a_stitcher_refuses_tiles_past_the_grid_and_boxes_outside_a_tile():
    stitcher = GridStitcher((40, 40), 0, 0, chunk=16)  # one tile, the whole image
    with pytest.raises(ValueError, match="reach outside their 40x40 tile"):
        stitcher.add(InstanceSet(np.array([[30, 30, 41, 35]]), [np.ones((11, 5), bool)],
                                 np.array([0.9])))
    stitcher = GridStitcher((40, 40), 0, 0, chunk=16)
    stitcher.add(InstanceSet(np.zeros((0, 4), np.int64), [], np.zeros(0)))
    assert stitcher.final_chunks() == [(y, x) for y in range(3) for x in range(3)]
    with pytest.raises(ValueError, match="all 1 tiles were already added"):
        stitcher.add(InstanceSet(np.zeros((0, 4), np.int64), [], np.zeros(0)))


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
    labels = zarr_labels(result.labels)
    assert labels.dtype == np.uint32
    mapping = bijection(whole.labels, labels)
    assert result.nuclei == whole.count == len(mapping)
    # the summary's figures, summed up as the nuclei came: the whole image's
    areas = np.bincount(whole.labels.ravel())[1:]
    summary = result.summary
    assert summary.count == whole.count and summary.total_area == areas.sum()
    assert summary.median_area == np.median(areas) and summary.mean_area == areas.mean()
    assert (summary.min_area, summary.max_area) == (areas.min(), areas.max())
    assert summary.mean_score == pytest.approx(whole.scores.mean(), rel=1e-12)


def test_large_path_table_rows_agree_with_nuclei_table(zoo_run):
    loaded, whole, result = zoo_run
    labels = zarr_labels(result.labels)
    mapping = bijection(whole.labels, labels)
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
    labels = zarr_labels(result.labels)
    mapping = bijection(whole.labels, labels)
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


def _threshold_run(folder: Path, height: int, width: int) -> tuple:
    path = write_blob_tiff(folder / f"blobs_{height}x{width}.tif", height, width, tile=128,
                           seed=1)
    outputs = LargeOutputs(folder / f"l_{height}x{width}.ome.zarr",
                           folder / f"t_{height}x{width}.csv", chunk=64)

    def traced(fn, tiles):
        # from the first tile on: the normalisation's sample (the whole image below 4 MP, a
        # strided 16 MP at most above) is before, and bounded on its own
        tracemalloc.reset_peak()
        return map(fn, tiles)

    tracemalloc.start()
    # 16 chunks of 64 x 64 int32 (256 kB) at most: more than one tile's worth, fewer than a
    # row of tiles of the wider images'
    try:
        result = segment_large(path, outputs, predictor=ThresholdModel(100.0, 20), tile=128,
                               overlap=32, progress=False, label_memory_mb=0.25,
                               map_tiles=traced)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    return result, peak


def test_memory_held_does_not_grow_with_the_image(tmp_path):
    small, small_peak = _threshold_run(tmp_path, 640, 384)
    tall, tall_peak = _threshold_run(tmp_path, 1280, 384)  # twice as tall
    wide, wide_peak = _threshold_run(tmp_path, 640, 1152)  # three times as wide
    assert tall.tiles > 1.8 * small.tiles and tall.nuclei > 1.9 * small.nuclei
    assert wide.tiles > 2.5 * small.tiles and wide.nuclei > 2.8 * small.nuclei
    # label chunks held: the budget, plus what one tile's decisions reach, whatever the size
    for run in (small, tall, wide):
        assert run.peak_chunks_held <= 16 + 9
    assert wide.chunks_spilled > 0  # the frontier of the wide image is over the budget
    # undecided instances: those along the frontier (it grows with the width only)
    assert tall.peak_pending <= small.peak_pending * 1.1 + 5
    assert wide.peak_pending <= 3 * small.peak_pending + 10
    # numpy's allocations, traced: the peak of the larger images is not larger
    assert tall_peak < 1.15 * small_peak, (small_peak, tall_peak)
    assert wide_peak < 1.15 * small_peak, (small_peak, wide_peak)
    # the labels are the blobs' (a stand-in model, but the stitch is the real one), every
    # chunk stored (empty ones too), and the scratch folder gone
    labels = zarr_labels(wide.labels)
    truth = blob_window(0, 0, 640, 1152, seed=1)
    assert wide.nuclei == len(np.unique(labels)) - 1
    assert np.mean((labels > 0) == (truth > 1000)) > 0.99
    from sharp_fpn.predict.zarr_check import missing_chunks

    array = zarr.open_group(str(wide.labels), mode="r")["0"]
    assert missing_chunks(wide.labels / "0", array) == []
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


# ------------------------------------------------------------------ bad input, nothing half-written


def _rss_file_kb() -> int:
    """File-backed pages mapped into this process (kB), from /proc/self/status."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssFile:"):
                return int(line.split()[1])
    raise AssertionError("no RssFile in /proc/self/status")


def test_a_contiguous_tiff_is_read_by_windows_not_whole(tmp_path):
    from sharp_fpn.predict.large import ContiguousArray

    # tifffile's default untiled layout: the image in one piece, one strip (one Zarr chunk)
    pixels = blob_window(0, 0, 4096, 2048, seed=6)  # 16 MB
    path = tmp_path / "plain.tif"
    tifffile.imwrite(path, pixels, bigtiff=True)
    with tifffile.TiffFile(path) as tif:
        assert tif.pages[0].is_contiguous and len(tif.pages[0].dataoffsets) == 1
    source = LargeSource(path)
    source.window(0, 1, 0, 1)
    assert isinstance(source._array, ContiguousArray)
    before = _rss_file_kb()
    most = 0
    for top in range(0, 4096, 256):
        for left in range(0, 2048, 256):
            window = source.window(top, top + 256, left, left + 256)
            assert np.array_equal(window, pixels[top:top + 256, left:left + 256])
            most = max(most, _rss_file_kb() - before)
    source.close()
    # the file's pages are given back after each window: far less than the 16 MB read
    assert most < 4 * 1024, most
    # and the large path gives the tiled file's outputs
    tiled = tmp_path / "tiled.tif"
    tifffile.imwrite(tiled, pixels[:600, :500], tile=(128, 128))
    tifffile.imwrite(path, pixels[:600, :500])
    runs = [segment_large(p, LargeOutputs(tmp_path / p.stem / "l.ome.zarr",
                                          tmp_path / p.stem / "t.csv"),
                          predictor=ThresholdModel(100.0, 20), tile=128, overlap=32,
                          progress=False) for p in (path, tiled)]
    assert np.array_equal(zarr_labels(runs[0].labels), zarr_labels(runs[1].labels))
    assert runs[0].table.read_bytes() == runs[1].table.read_bytes()


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
    assert not zarr_labels(result.labels)[200:300, 100:200].any()


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
    found = runner(tile)
    assert len(found.instances) > 5 and len(found.stored) == len(found.instances)
    # the stored pixels under each box, as the file holds them
    pixels = blob_window(0, 0, 128, 128)
    for (t, l, b, r), stored in zip(found.instances.boxes.tolist(), found.stored):
        assert stored.dtype == np.uint16 and np.array_equal(stored[:, :, 0], pixels[t:b, l:r])
    shutil.copy(tmp_path / "b.tif", tmp_path / "c.tif")
    broken = TileRunner(ThresholdModel(float("nan")), TileReader(LargeSource(tmp_path / "c.tif"),
                                                                  how))
    (tmp_path / "c.tif").write_bytes(b"II*\x00" + b"\0" * 16)
    with pytest.raises(TileError, match=r"c\.tif: tile rows 0-128, columns 0-128"):
        broken(tile)


class _Sized(ThresholdModel):
    """The threshold stand-in, said to be trained on nuclei 34 px across (the blobs are about
    17): the large path should see the image at twice its size."""

    nucleus_diameter = 34.0


def test_nuclei_of_another_size_are_predicted_rescaled_and_brought_back(tmp_path):
    path = write_blob_tiff(tmp_path / "b.tif", 384, 320, tile=128, seed=4)
    truth = blob_window(0, 0, 384, 320, seed=4) > 1000
    runs = {}
    for name, model, diameter in (("as is", ThresholdModel(100.0, 20), None),
                                  ("estimated", _Sized(100.0, 20), None),
                                  ("given", _Sized(100.0, 20), 68.0)):  # scale 0.5
        out = tmp_path / name.replace(" ", "_")
        runs[name] = segment_large(path, LargeOutputs(out / "b.ome.zarr", out / "b.csv"),
                                   predictor=model, tile=128, overlap=32, diameter=diameter,
                                   progress=False)
    plain, estimated, given = runs["as is"], runs["estimated"], runs["given"]
    assert plain.scale.source == "model has no nucleus diameter" and plain.scale.scale == 1.0
    # the estimate: the median equivalent diameter of the nuclei of (up to) 9 tiles
    with open(plain.table, newline="") as f:
        plain_areas = np.array([int(r["area"]) for r in csv.DictReader(f)])
    whole_median = float(np.median(2 * np.sqrt(plain_areas / np.pi)))
    assert estimated.scale.source == "estimated"
    assert estimated.scale.diameter == pytest.approx(whole_median, rel=0.1)
    assert estimated.scale.scale == pytest.approx(34.0 / estimated.scale.diameter)
    assert estimated.tile == round(128 / estimated.scale.scale) and estimated.tiles > plain.tiles
    assert given.scale.source == "given" and given.scale.scale == 0.5 and given.tile == 256
    for run in runs.values():  # labels at the image's own size, the blobs found in each
        labels = zarr_labels(run.labels)
        assert labels.shape == (384, 320)
        assert np.mean((labels > 0) == truth) > 0.97, run.scale
        assert abs(run.nuclei - plain.nuclei) <= 0.05 * plain.nuclei
        assert run.nuclei == len(np.unique(labels)) - 1


def test_instances_brought_back_from_a_resized_tile_are_resize_labels_of_their_masks():
    from sharp_fpn.predict.large import back_to_tile
    from sharp_fpn.predict.scale import resize_labels

    rng = np.random.default_rng(0)
    seen = (41, 29)
    masks = np.zeros((4,) + seen, bool)
    for k, (cy, cx, r) in enumerate([(10, 8, 6), (30, 20, 7), (2, 27, 3), (20, 14, 1)]):
        ys, xs = np.mgrid[0:seen[0], 0:seen[1]]
        masks[k] = (ys - cy) ** 2 + (xs - cx) ** 2 <= r * r
    found = InstanceSet.from_masks(masks, rng.uniform(0.5, 1, 4))
    for shape in ((20, 15), (83, 57)):
        back = back_to_tile(found, seen, shape)
        expected = [resize_labels(m.astype(np.int32), shape) > 0 for m in masks]
        expected = [(e, s) for e, s in zip(expected, found.scores) if e.any()]
        assert len(back) == len(expected)
        for (t, l, b, r), mask, (full, score), got in zip(back.boxes, back.masks, expected,
                                                          back.scores):
            canvas = np.zeros(shape, bool)
            canvas[t:b, l:r] = mask
            assert np.array_equal(canvas, full) and got == score


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
        assert 0 < r["peak_chunks_held"] <= r["label_chunk_budget"] + 9
    assert figures["peak_rss_largest_over_smallest"] > 0
    assert not list((tmp_path / "work").iterdir())  # images and outputs removed


def test_a_chunk_store_spills_the_least_recently_used_and_reads_them_back(tmp_path):
    from sharp_fpn.predict.chunks import ChunkStore

    store = ChunkStore((50, 70), 20, budget=2, scratch=tmp_path / "scratch")
    truth = np.arange(50 * 70, dtype=np.int32).reshape(50, 70)
    # a box across four chunks: a copy, written back
    values, shared = store.region((10, 15, 30, 45))
    assert not shared and not values.any()
    store.write((10, 15, 30, 45), truth[10:30, 15:45])
    assert store.held == 6  # chunks (0..1, 0..2)
    store.settle()
    assert store.held == 2 and store.spills == 4
    assert sorted(p.name for p in (tmp_path / "scratch").iterdir()) == [
        "0_0.npy", "0_1.npy", "0_2.npy", "1_0.npy"]
    # a box in one chunk: a view into it; the spilled chunk comes back from its file
    view, shared = store.region((2, 22, 8, 30))
    assert shared and not (tmp_path / "scratch" / "0_1.npy").exists()
    view[...] = truth[2:8, 22:30]
    expected = np.zeros((50, 70), np.int32)
    expected[10:30, 15:45] = truth[10:30, 15:45]
    expected[2:8, 22:30] = truth[2:8, 22:30]
    for key in [(y, x) for y in range(3) for x in range(4)]:
        t, l, b, r = store.bounds(key)
        assert np.array_equal(store.pop(key), expected[t:b, l:r]), key
    assert store.held == 0 and not any((tmp_path / "scratch").iterdir())
    with pytest.raises(ValueError, match="no scratch folder"):
        nowhere = ChunkStore((50, 70), 20, budget=1)
        nowhere.region((0, 0, 30, 30))
        nowhere.settle()


def test_an_empty_field_gives_empty_outputs_that_read_back(tmp_path):
    path = tmp_path / "empty.tif"
    tifffile.imwrite(path, np.full((300, 200), 40, np.uint8), tile=(128, 128))
    out = tmp_path / "out"
    result = segment_large(path, LargeOutputs(out / "e.ome.zarr", out / "e.csv",
                                              geojson=out / "e.geojson", rois=out / "e.zip"),
                           predictor=ThresholdModel(100.0, 20), tile=128, overlap=32,
                           progress=False)
    assert result.nuclei == 0 and result.summary.count == 0
    assert result.summary.median_area is None and result.summary.mean_score is None
    assert not zarr_labels(result.labels).any()
    assert (out / "e.csv").read_text().splitlines() == [",".join(
        ["label", "score", "area", "centroid_y", "centroid_x", "bbox_min_row", "bbox_min_col",
         "bbox_max_row", "bbox_max_col", "mean_intensity", "eccentricity"])]
    assert json.loads((out / "e.geojson").read_text()) == {"type": "FeatureCollection",
                                                         "features": []}


@pytest.mark.parametrize("count", [1, 2, 7, 500])
def test_a_nucleus_summary_gives_numpys_figures_without_keeping_the_nuclei(count):
    from sharp_fpn.predict.large import NucleusSummary

    rng = np.random.default_rng(count)
    areas = rng.integers(1, 3000, count)  # some past the histogram's first 1024 bins
    scores = rng.uniform(0.5, 1.0, count)
    summary = NucleusSummary()
    for a, s in zip(areas, scores):
        summary.add(int(a), float(s))
    assert summary.count == count and summary.total_area == areas.sum()
    assert summary.median_area == np.median(areas)
    assert summary.mean_area == pytest.approx(areas.mean(), rel=1e-12)
    assert (summary.min_area, summary.max_area) == (areas.min(), areas.max())
    assert summary.mean_score == pytest.approx(scores.mean(), rel=1e-12)
