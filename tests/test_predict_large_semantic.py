"""Semantic models on the large-image path (sharp_fpn.predict.components, .large): the streaming
connected components equal the whole-image path's ``semantic_labels(stitch_cores(...))`` up to
a renumbering, and ``segment_large`` with a semantic model equals the whole-image path.

Files are written by tifffile and zarr and read back by zarr, csv and the project's reader.
"""
import csv
import json
from pathlib import Path

import numpy as np
import pytest
import tifffile
from scipy import ndimage

from sharp_fpn.perf.benchmarks.large import write_blob_tiff
from sharp_fpn.predict.components import DEFAULT_THRESHOLD, ComponentStitcher
from sharp_fpn.predict.image_io import load_image, read_planes
from sharp_fpn.predict.large import (
    LargeOutputs,
    LargeSource,
    ProbabilityModel,
    TileMap,
    TileReader,
    TileRunner,
    normalisation_ranges,
    segment_large,
)
from sharp_fpn.predict.outputs import nuclei_table
from sharp_fpn.predict.tiling import stitch_cores, tile_grid

from support import bijection, zarr_labels


def _semantic_labels(probabilities):
    from sharp_fpn.d2.predictor import semantic_labels

    return semantic_labels(probabilities)


# ------------------------------------------------------------------ the stitch, without a model


def _block_edges(shape, tile, overlap):
    stitcher = ComponentStitcher(shape, tile, overlap, chunk=32, budget=10)
    return stitcher.ys, stitcher.xs


def _truth(rng, shape, tile, overlap):
    """A probability map with blobs, a U and a spiral crossing several tiles, and pixels
    touching only diagonally across block corners."""
    height, width = shape
    p = rng.uniform(0.0, 0.45, size=shape).astype(np.float32)
    ys, xs = np.mgrid[0:height, 0:width]
    for _ in range(40):  # discs, some merging into larger shapes
        cy, cx, radius = rng.uniform(0, height), rng.uniform(0, width), rng.uniform(2, 9)
        p[(ys - cy) ** 2 + (xs - cx) ** 2 < radius ** 2] = rng.uniform(0.55, 1.0)
    # a U: two long legs joined at the bottom, its opening up (the legs meet only late)
    top, left = int(rng.integers(2, 20)), int(rng.integers(2, 20))
    bottom, right = height - int(rng.integers(2, 20)), left + int(rng.integers(90, 130))
    u = np.zeros(shape, bool)
    u[top:bottom, left:left + 3] = u[top:bottom, right - 3:right] = True
    u[bottom - 3:bottom, left:right] = True
    # a square spiral in the right part of the image
    spiral = np.zeros(shape, bool)
    t, l, b, r = 10, width - 120, height - 10, width - 10
    while b - t > 8 and r - l > 8:
        spiral[t, l:r] = True
        spiral[t:b, r - 1] = True
        spiral[b - 1, l + 4:r] = True
        spiral[t + 4:b, l + 4] = True
        t, l, b, r = t + 4, l + 4, b - 4, r - 8
    p[u | spiral] = rng.uniform(0.6, 1.0, size=int((u | spiral).sum())).astype(np.float32)
    # diagonal-only contacts across block corners, both diagonals
    edges_y, edges_x = _block_edges(shape, tile, overlap)
    for y in edges_y[1:-1]:
        for x in edges_x[1:-1]:
            p[y - 3:y + 3, x - 3:x + 3] = 0.1
            if rng.uniform() < 0.5:
                p[y - 1, x - 1] = p[y, x] = 0.9
            else:
                p[y - 1, x] = p[y, x - 1] = 0.8
    return p


def _tile_maps(rng, truth, tiles):
    """Each tile's map: the truth in its core, other values outside it (as a model whose
    view differs near the tile's border), so only the core-owned pixels may be used."""
    maps = []
    for t in tiles:
        seen = truth[t.slices].copy()
        noise = rng.uniform(0, 1, size=seen.shape).astype(np.float32)
        top, left, bottom, right = t.core
        y = np.arange(t.top, t.bottom)[:, None] + 0.5
        x = np.arange(t.left, t.right)[None, :] + 0.5
        own = (y >= top) & (y < bottom) & (x >= left) & (x < right)
        maps.append(np.where(own, seen, noise))
    return maps


def _stitch_tile_by_tile(shape, tile, overlap, maps, intensities, chunk, budget, scratch=None):
    stitcher = ComponentStitcher(shape, tile, overlap, chunk=chunk, budget=budget,
                                 scratch=scratch)
    out = np.zeros(shape, np.int64)
    written = np.zeros(shape, np.int64)
    found = {}
    for values, light in zip(maps, intensities):
        for component in stitcher.add(values, light):
            found[component.label] = component
        for key in stitcher.final_chunks():
            t, l, b, r = stitcher.store.bounds(key)
            chunk_labels = stitcher.take(key)
            assert chunk_labels.dtype == np.uint32
            out[t:b, l:r] = chunk_labels
            written[t:b, l:r] += 1
    assert stitcher.done and stitcher.open == 0
    assert (written == 1).all()  # every chunk handed over once, whole
    return stitcher, out, found


@pytest.mark.parametrize("seed", range(4))
def test_streaming_components_equal_the_whole_maps_components(seed, tmp_path):
    rng = np.random.default_rng(seed)
    shape = (260, 300)
    tile, overlap = 64, 20
    tiles = tile_grid(*shape, tile, overlap)
    truth = _truth(rng, shape, tile, overlap)
    maps = _tile_maps(rng, truth, tiles)
    intensity = rng.integers(0, 4096, size=shape).astype(np.float64)
    lights = [intensity[t.slices] for t in tiles]
    labels, scores = _semantic_labels(stitch_cores(shape, tiles, maps))
    assert labels.max() > 30
    # the U and the spiral are each one component spanning several block rows
    heights = [s[0].stop - s[0].start for s in ndimage.find_objects(labels)]
    assert max(heights) > 3 * tile
    for budget in (10_000, 3):
        stitcher, out, found = _stitch_tile_by_tile(shape, tile, overlap, maps, lights, 32,
                                                    budget, tmp_path / f"scratch{budget}")
        mapping = bijection(labels, out)
        assert stitcher.count == labels.max() == len(mapping) == len(found)
        assert sorted(found) == list(range(1, stitcher.count + 1))
        for old, new in mapping.items():
            component = found[new]
            assert component.score == pytest.approx(scores[old - 1], rel=1e-9, abs=1e-9)
            t, l, b, r = component.box
            mask = labels == old
            assert mask[t:b, l:r].sum() == mask.sum()  # the box holds it all
            np.testing.assert_array_equal(component.mask, mask[t:b, l:r])
            assert component.mean_intensity == pytest.approx(intensity[mask].mean(), abs=1e-9)
        if budget == 3:
            assert stitcher.store.spills > 0
            assert not any((tmp_path / "scratch3").iterdir())
        else:
            assert stitcher.store.spills == 0


def test_components_touching_only_at_a_block_corner_are_one():
    shape = (128, 128)
    stitcher = ComponentStitcher(shape, 64, 16, chunk=32, budget=100)
    y, x = stitcher.ys[1], stitcher.xs[1]
    tiles = stitcher.tiles
    for diagonal in ("main", "anti"):
        truth = np.zeros(shape, np.float32)
        if diagonal == "main":
            truth[y - 1, x - 1] = truth[y, x] = 1.0
        else:
            truth[y - 1, x] = truth[y, x - 1] = 1.0
        s = ComponentStitcher(shape, 64, 16, chunk=32, budget=100)
        found = [c for t in tiles for c in s.add(truth[t.slices])]
        assert len(found) == 1 and int(found[0].mask.sum()) == 2, diagonal
        assert found[0].mean_intensity is None


def test_the_threshold_is_the_whole_image_paths():
    from sharp_fpn.d2.predictor import SEMANTIC_THRESHOLD

    assert DEFAULT_THRESHOLD == SEMANTIC_THRESHOLD


def test_a_component_stitcher_refuses_a_map_of_another_shape_and_tiles_past_the_grid():
    stitcher = ComponentStitcher((100, 100), 64, 16, chunk=32)
    with pytest.raises(ValueError, match="for a tile of"):
        stitcher.add(np.zeros((10, 10), np.float32))
    for t in stitcher.tiles:
        stitcher.add(np.zeros(t.shape, np.float32))
    with pytest.raises(ValueError, match="already added"):
        stitcher.add(np.zeros((64, 64), np.float32))


def test_open_components_do_not_grow_with_the_image_height(tmp_path):
    """A grid of discs: the components held open are those along the frontier between the
    tiles done and those to come, about as many for an image four times as tall (the tilings
    differ a little: the tiles of each are spread evenly over its height)."""
    peaks, counts = [], []
    for height in (256, 1024):
        shape = (height, 256)
        truth = np.zeros(shape, np.float32)
        ys, xs = np.mgrid[0:height, 0:256]
        for cy in range(8, height, 24):
            for cx in range(8, 256, 24):
                r = 3 + (cx // 24 + cy // 24) % 6  # some discs touch their neighbours
                truth[(ys - cy) ** 2 + (xs - cx) ** 2 < r * r] = 0.9
        stitcher = ComponentStitcher(shape, 96, 24, chunk=32, budget=8,
                                     scratch=tmp_path / f"scratch{height}")
        count = 0
        for t in stitcher.tiles:
            count += len(stitcher.add(truth[t.slices]))
            for key in stitcher.final_chunks():
                stitcher.take(key)
        assert stitcher.done and count == _semantic_labels(truth)[0].max()
        peaks.append(stitcher.peak_open)
        counts.append(count)
    assert counts[1] > 3.5 * counts[0]
    assert peaks[1] <= 1.5 * peaks[0]
    assert peaks[1] < counts[1] / 10


# ------------------------------------------------------------------ segment_large, semantic


def _whole_image_semantic(path, model, tile, overlap):
    """The whole-image computation: the same model's map of every tile (the tile as the
    large path's reader gives it), ``stitch_cores`` + ``semantic_labels``."""
    source = LargeSource(path)
    how, normalised = normalisation_ranges(source, True, model.normalize)
    reader = TileReader(source, how, normalised)
    tiles = tile_grid(source.height, source.width, tile, overlap)
    maps = [model.probabilities(reader.rgb(t), t) for t in tiles]
    source.close()
    return _semantic_labels(stitch_cores((source.height, source.width), tiles, maps))


def _check_table(table: Path, labels, scores, intensity, mapping):
    with open(table, newline="") as f:
        rows = {int(r["label"]): r for r in csv.DictReader(f)}
    expected = nuclei_table(labels, scores, intensity)
    assert len(rows) == len(expected) == len(mapping)
    for row in expected:
        got = rows[mapping[row["label"]]]
        for key, value in row.items():
            if key != "label":
                assert float(got[key]) == pytest.approx(float(value), abs=1e-4), (key, row, got)


def test_segment_large_with_a_semantic_stand_in_equals_the_whole_image_path(tmp_path):
    path = write_blob_tiff(tmp_path / "b.tif", 300, 260, tile=128, seed=2)
    model = ProbabilityModel(60.0, 8.0)  # a low level: neighbouring blobs' rims merge
    labels, scores = _whole_image_semantic(path, model, 96, 24)
    assert labels.max() > 30
    # components cut by the cores' borders, which the stitch must join
    cuts = 0
    for t in tile_grid(*labels.shape, 96, 24):
        y0, x0 = int(np.ceil(t.core[0] - 0.5)), int(np.ceil(t.core[1] - 0.5))
        if y0:
            cuts += np.count_nonzero((labels[y0 - 1] > 0) & (labels[y0] > 0))
        if x0:
            cuts += np.count_nonzero((labels[:, x0 - 1] > 0) & (labels[:, x0] > 0))
    assert cuts > 20
    outputs = LargeOutputs(tmp_path / "b_labels.ome.zarr", tmp_path / "b_nuclei.csv",
                           geojson=tmp_path / "b.geojson", stem="b", chunk=32)
    result = segment_large(path, outputs, predictor=model, tile=96, overlap=24,
                           progress=False, label_memory_mb=4 * 32 * 32 * 3 / 2 ** 20)
    assert result.kind == "semantic" and result.chunks_spilled > 0
    assert 0 < result.peak_open < labels.max() and result.peak_pending == 0
    got = zarr_labels(result.labels)
    assert got.dtype == np.uint32
    mapping = bijection(labels, got)
    assert result.nuclei == labels.max() == len(mapping)
    areas = np.bincount(labels.ravel())[1:]
    assert result.summary.total_area == areas.sum()
    assert result.summary.median_area == np.median(areas)
    assert result.summary.mean_score == pytest.approx(np.mean(scores), rel=1e-9)
    _check_table(result.table, labels, scores, load_image(path).intensity, mapping)
    planes = read_planes(result.labels)  # the project's OME-Zarr reader
    assert np.array_equal(planes.pixels[0], got)
    from sharp_fpn.predict.formats import nucleus_outlines

    expected = {mapping[k]: v for k, v in nucleus_outlines(labels).items()}
    features = json.loads(result.geojson.read_text())["features"]
    assert len(features) == len(expected)
    for feature in features:
        ring = np.asarray(feature["geometry"]["coordinates"][0])[:-1]
        assert np.allclose(ring, expected[int(feature["properties"]["name"])], atol=1e-3)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "b.geojson", "b.tif", "b_labels.ome.zarr", "b_nuclei.csv"]


@pytest.mark.parametrize("tile", [96, 512])  # several tiles, and one holding the image
def test_an_empty_map_gives_empty_outputs_and_one_tile_the_whole_maps_components(tmp_path,
                                                                                  tile):
    path = write_blob_tiff(tmp_path / "b.tif", 200, 180, tile=128, seed=5)
    empty = segment_large(path, LargeOutputs(tmp_path / f"e{tile}.ome.zarr",
                                             tmp_path / f"e{tile}.csv", chunk=64),
                          predictor=ProbabilityModel(400.0, 4.0), tile=tile, overlap=24,
                          progress=False)
    assert empty.nuclei == 0 and empty.kind == "semantic"
    assert not zarr_labels(empty.labels).any()
    with open(empty.table, newline="") as f:
        assert list(csv.DictReader(f)) == []
    model = ProbabilityModel(100.0, 8.0)
    labels, _ = _whole_image_semantic(path, model, tile, 24)
    found = segment_large(path, LargeOutputs(tmp_path / f"f{tile}.ome.zarr",
                                             tmp_path / f"f{tile}.csv", chunk=64),
                          predictor=model, tile=tile, overlap=24, progress=False)
    assert found.nuclei == labels.max() > 10
    bijection(labels, zarr_labels(found.labels))


class _SizedMap(ProbabilityModel):
    """The semantic stand-in, said to be trained on nuclei 34 px across (the blobs are about
    17): the large path sees the tiles at twice their size."""

    nucleus_diameter = 34.0


def test_a_semantic_map_at_another_scale_is_brought_back_by_nearest_neighbour(tmp_path):
    from sharp_fpn.predict.scale import resize_labels, scale_image

    path = write_blob_tiff(tmp_path / "b.tif", 256, 224, tile=128, seed=4)
    source = LargeSource(path)
    how, _ = normalisation_ranges(source)
    model = _SizedMap(100.0, 8.0)
    tile = tile_grid(256, 224, 64, 16)[3]
    found = TileRunner(model, TileReader(source, how, None, 2.0))(tile)
    assert isinstance(found, TileMap) and found.probabilities.shape == tile.shape
    seen = scale_image(TileReader(source, how).rgb(tile), 2.0)
    expected = resize_labels(model.probabilities(seen, tile), tile.shape)
    np.testing.assert_array_equal(found.probabilities, expected)
    source.close()
    result = segment_large(path, LargeOutputs(tmp_path / "l.ome.zarr", tmp_path / "t.csv"),
                           predictor=model, tile=128, overlap=32, progress=False)
    assert result.scale.source == "estimated" and result.scale.scale == pytest.approx(
        34.0 / result.scale.diameter)
    assert result.scale.scale > 1.5
    labels = zarr_labels(result.labels)
    truth = load_image(path).intensity > 1000
    assert labels.shape == (256, 224) and np.mean((labels > 0) == truth) > 0.97


def test_a_semantic_tile_runner_is_picklable_and_gives_the_tiles_map(tmp_path):
    import pickle

    path = write_blob_tiff(tmp_path / "b.tif", 192, 192, tile=128)
    source = LargeSource(path)
    how, _ = normalisation_ranges(source)
    runner = pickle.loads(pickle.dumps(TileRunner(ProbabilityModel(), TileReader(source, how))))
    tile = tile_grid(192, 192, 128, 32)[1]
    found = pickle.loads(pickle.dumps(runner(tile)))
    assert found.probabilities.dtype == np.float32 and found.probabilities.shape == tile.shape
    stored = tifffile.imread(path)[tile.slices]
    np.testing.assert_array_equal(found.colour[:, :, 0], stored)
    np.testing.assert_array_equal(found.intensity, stored.astype(np.float64))
    runner.reader.source.close()
    source.close()


def test_a_semantic_map_of_the_wrong_shape_fails_naming_the_tile(tmp_path):
    class _Liar(ProbabilityModel):

        def probabilities(self, rgb, tile):
            return np.zeros((3, 3), np.float32)

    path = write_blob_tiff(tmp_path / "b.tif", 128, 128, tile=128)
    with pytest.raises(Exception, match=r"tile rows 0-96.*probability map of \(3, 3\)"):
        segment_large(path, LargeOutputs(tmp_path / "l.ome.zarr", tmp_path / "t.csv"),
                      predictor=_Liar(), tile=96, overlap=24, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.tif"]


@pytest.fixture(scope="module")
def tiny_semantic():
    """A real (random, narrow) UNet# of the semantic meta-architecture, as
    tests/test_predict.py builds it."""
    import torch

    from sharp_fpn.d2.predictor import NucleiPredictor, load_config

    root = Path(__file__).resolve().parent.parent
    cfg = load_config(root / "configs" / "semantic" / "table1" / "unet_sharp_ds.yaml",
                      ["MODEL.UNET.WIDTH_MULT", 0.125, "MODEL.DEVICE", "cpu",
                       "INPUT.SEMANTIC.SIZE", [64, 64], "INPUT.NUCLEUS_DIAMETER", 0.0])
    torch.manual_seed(0)
    return NucleiPredictor(cfg, None)


def test_a_real_semantic_model_on_the_large_path_equals_its_whole_image_prediction(
        tiny_semantic, tmp_path):
    """End to end: the large path's labels are NucleiPredictor.predict's on the same image,
    up to a renumbering; the table is nuclei_table's of them."""
    path = write_blob_tiff(tmp_path / "b.tif", 160, 144, tile=128, seed=3)
    loaded = load_image(path)
    whole = tiny_semantic.predict(loaded.rgb, tile=64, overlap=16)
    assert whole.kind == "semantic" and whole.count > 3
    result = segment_large(path, LargeOutputs(tmp_path / "l.ome.zarr", tmp_path / "t.csv",
                                              chunk=32),
                           predictor=tiny_semantic, tile=64, overlap=16, progress=False)
    assert result.kind == "semantic" and result.tiles == whole.tiles == 9
    mapping = bijection(whole.labels, zarr_labels(result.labels))
    assert result.nuclei == whole.count == len(mapping)
    assert result.summary.mean_score == pytest.approx(whole.scores.mean(), rel=1e-9)
    _check_table(result.table, whole.labels, whole.scores, loaded.intensity, mapping)
    # the tiles as a Dask worker runs them (cluster.tile_on_worker wraps the worker's own
    # NucleiPredictor), here in this process: the same labels, the same ids
    from uuid import uuid4

    from sharp_fpn.predict.cluster import tile_on_worker

    key = uuid4().hex

    def on_workers(fn, tiles):
        return (tile_on_worker(lambda: tiny_semantic, key, fn.reader, t) for t in tiles)

    spread = segment_large(path, LargeOutputs(tmp_path / "d.ome.zarr", tmp_path / "d.csv",
                                              chunk=32),
                           predictor=tiny_semantic, tile=64, overlap=16, progress=False,
                           map_tiles=on_workers)
    np.testing.assert_array_equal(zarr_labels(spread.labels), zarr_labels(result.labels))
    assert (tmp_path / "d.csv").read_text() == (tmp_path / "t.csv").read_text()


def test_predict_sends_a_semantic_model_down_the_large_route(tiny_semantic, tmp_path):
    """predict_images with --large: the summary says the model's output is semantic, the
    labels are the whole route's."""
    from sharp_fpn.predict.run import predict_images

    images = tmp_path / "images"
    images.mkdir()
    path = write_blob_tiff(images / "b.tif", 160, 144, tile=128, seed=3)
    run = dict(tile=64, overlap=16, progress=False, predictor=tiny_semantic)
    whole = predict_images(None, None, [path], tmp_path / "whole", **run)
    large = predict_images(None, None, [path], tmp_path / "large", large=True, **run)
    for report in (whole, large):
        assert len(report.results) == 1 and report.results[0].summary["status"] == "ok"
    assert large.results[0].large and not whole.results[0].large
    assert large.results[0].summary["model_output"] == "semantic"
    assert whole.results[0].summary["model_output"] == "semantic"
    with open(tmp_path / "large" / "summary.csv", newline="") as f:
        assert [r["model_output"] for r in csv.DictReader(f)] == ["semantic"]
    labels = tifffile.imread(whole.results[0].labels)
    bijection(labels, zarr_labels(large.results[0].labels))
    assert large.results[0].nuclei == whole.results[0].nuclei > 3
