"""Prediction for biologists: tiling and stitching, input kinds, outputs, one real CLI run."""
import csv
import importlib.util
from pathlib import Path

import cv2
import numpy as np
import pytest
import tifffile
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.modeling import build_model
from skimage.draw import ellipse
from skimage.measure import regionprops

from sharp_fpn.d2.engine import get_config
from sharp_fpn.metrics import labels_from_instances
from sharp_fpn.predict import InstanceSet, load_image, stitch_cores, stitch_instances, tile_grid
from sharp_fpn.predict.image_io import ImageReadError, STRETCH_PERCENTILES
from sharp_fpn.predict.tiling import axis_spans, keep_largest_components

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "configs" / "demo" / "mask_rcnn_fpn_R18.yaml"


# --------------------------------------------------------------------------------------------
# tiles


@pytest.mark.parametrize("length,tile,overlap", [(1000, 512, 64), (300, 64, 16), (129, 64, 17),
                                                 (65, 64, 0), (200, 100, 99)])
def test_axis_spans_cover_with_equal_tiles_and_enough_overlap(length, tile, overlap):
    spans = axis_spans(length, tile, overlap)
    assert spans[0][0] == 0 and spans[-1][1] == length
    assert all(end - start == tile for start, end in spans)
    overlaps = [prev[1] - nxt[0] for prev, nxt in zip(spans[:-1], spans[1:])]
    assert min(overlaps) >= overlap
    assert max(overlaps) - min(overlaps) <= 1  # spread evenly
    # the fewest tiles: one fewer could not cover the axis with that overlap
    assert (len(spans) - 1) * (tile - overlap) + overlap < length


def test_axis_spans_small_images_and_bad_overlap():
    assert axis_spans(100, 128, 16) == [(0, 100)]
    assert axis_spans(100, 0, 16) == [(0, 100)]
    with pytest.raises(ValueError, match="overlap"):
        axis_spans(300, 64, 64)


def test_cores_partition_the_image():
    tiles = tile_grid(130, 170, 64, 15)
    ys, xs = np.mgrid[0:130, 0:170] + 0.5
    owners = sum(t.owns(ys, xs).astype(int) for t in tiles)
    assert (owners == 1).all()
    for t in tiles:  # a core lies inside its tile
        top, left, bottom, right = t.core
        assert t.top <= top < bottom <= t.bottom and t.left <= left < right <= t.right


# --------------------------------------------------------------------------------------------
# stitching


def random_nuclei(shape, count, max_extent, seed):
    """A label image of non-overlapping (possibly touching) ellipses whose extent along each
    axis is at most ``max_extent``, placed anywhere (so many cross tile borders)."""
    rng = np.random.default_rng(seed)
    labels = np.zeros(shape, dtype=np.int32)
    n = 0
    for _ in range(count * 20):
        if n == count:
            break
        r_major, r_minor = rng.uniform(2, max_extent / 2 - 0.5, size=2)
        rows, cols = ellipse(rng.uniform(0, shape[0]), rng.uniform(0, shape[1]), r_major, r_minor,
                             shape=shape, rotation=rng.uniform(0, np.pi))
        if rows.size < 3 or labels[rows, cols].any():
            continue
        if np.ptp(rows) >= max_extent or np.ptp(cols) >= max_extent:
            continue
        n += 1
        labels[rows, cols] = n
    return labels


def perfect_tile_predictions(labels, tiles, seed):
    """What a perfect predictor finds in each tile: every nucleus visible there, cut by the
    tile's borders, with a random score (the same nucleus scores the same in every tile)."""
    scores = np.random.default_rng(seed).uniform(0.5, 1.0, size=labels.max() + 1)
    sets = []
    for tile in tiles:
        crop = labels[tile.slices]
        ids = np.unique(crop)
        ids = ids[ids > 0]
        sets.append(InstanceSet.from_masks(crop[None] == ids[:, None, None], scores[ids]))
    return sets


def assert_same_nuclei(truth, stitched):
    """Same background, and a one-to-one map between the nuclei with identical pixel sets."""
    np.testing.assert_array_equal(truth > 0, stitched > 0)
    pairs = np.unique(np.stack([truth[truth > 0], stitched[truth > 0]]), axis=1)
    n_true, n_stitched = len(np.unique(truth[truth > 0])), len(np.unique(stitched[stitched > 0]))
    assert pairs.shape[1] == n_true == n_stitched


@pytest.mark.parametrize("seed,min_kept_fraction", [(0, 0.0), (1, 0.5), (2, 1.0)])
def test_stitched_tiles_equal_the_whole_image_nucleus_by_nucleus(seed, min_kept_fraction):
    shape, tile, overlap = (150, 190), 64, 18
    truth = random_nuclei(shape, 70, max_extent=overlap, seed=seed)
    tiles = tile_grid(*shape, tile, overlap)
    sets = perfect_tile_predictions(truth, tiles, seed)
    stitched = stitch_instances(shape, tiles, sets, min_kept_fraction)

    assert_same_nuclei(truth, stitched.labels)
    assert stitched.scores.shape == (truth.max(),)
    assert (np.diff(stitched.scores) <= 0).all()  # label 1 is the best
    # the test means something: many nuclei are cut by some tile's border
    cut = {
        int(n) for t in tiles for n in np.unique(truth[t.slices])
        if n and (truth[t.slices] == n).sum() < (truth == n).sum()
    }
    assert len(cut) >= 15


def test_nuclei_larger_than_the_overlap_are_covered_but_may_be_cut():
    shape = (120, 120)
    truth = random_nuclei(shape, 25, max_extent=40, seed=3)
    tiles = tile_grid(*shape, 48, 8)
    sets = perfect_tile_predictions(truth, tiles, 3)
    stitched = stitch_instances(shape, tiles, sets, min_kept_fraction=0.0).labels
    np.testing.assert_array_equal(truth > 0, stitched > 0)  # every nucleus pixel is labelled
    for label in np.unique(stitched[stitched > 0]):  # no label spans two nuclei
        assert len(np.unique(truth[stitched == label])) == 1
    assert len(np.unique(stitched)) > len(np.unique(truth))  # some big nuclei were cut


def test_one_tile_is_labels_from_instances():
    rng = np.random.default_rng(5)
    masks = np.zeros((12, 40, 50), dtype=bool)
    for m in masks:  # overlapping rectangles
        y, x = rng.integers(0, 30), rng.integers(0, 40)
        m[y : y + rng.integers(3, 12), x : x + rng.integers(3, 12)] = True
    scores = rng.uniform(size=12)
    scores[3] = scores[7]  # a tie: the given order wins
    tiles = tile_grid(40, 50, 0, 0)
    stitched = stitch_instances((40, 50), tiles, [InstanceSet.from_masks(masks, scores)],
                                min_kept_fraction=0.0)
    expected = labels_from_instances(masks, scores)
    present = np.unique(expected[expected > 0])
    renumber = np.zeros(13, dtype=np.int32)
    renumber[present] = np.arange(1, present.size + 1)
    np.testing.assert_array_equal(stitched.labels, renumber[expected])
    np.testing.assert_array_equal(stitched.scores, np.sort(scores)[::-1][present - 1])


def test_duplicate_detections_are_dropped_not_left_as_slivers():
    masks = np.zeros((3, 30, 30), dtype=bool)
    masks[0, 5:15, 5:15] = True  # a nucleus
    masks[1, 8:18, 8:18] = True  # a worse, shifted detection of it: keeps 51 of 100 pixels
    masks[2, 20:25, 20:25] = True  # another nucleus
    sets = [InstanceSet.from_masks(masks, np.array([0.9, 0.6, 0.8]))]
    tiles = tile_grid(30, 30, 0, 0)
    strict = stitch_instances((30, 30), tiles, sets, min_kept_fraction=0.6)
    assert strict.labels.max() == 2 and strict.scores.tolist() == [0.9, 0.8]
    assert not strict.labels[15:18, 8:18].any()  # no sliver
    lenient = stitch_instances((30, 30), tiles, sets, min_kept_fraction=0.5)
    assert lenient.labels.max() == 3 and (lenient.labels == 3).sum() == 51
    with pytest.raises(ValueError, match="min_kept_fraction"):
        stitch_instances((30, 30), tiles, sets, min_kept_fraction=1.5)


def test_keep_largest_components():
    labels = np.zeros((8, 12), dtype=np.int32)
    labels[1:4, 1:4] = 5  # label 5: 9 pixels here ...
    labels[6, 6] = 5  # ... and a stray pixel
    labels[1, 8:10] = 2  # label 2: two pieces of 2 pixels: the first met stays
    labels[4, 8:10] = 2
    labels[4, 4] = 7  # touches label 5 diagonally: a separate label, kept
    kept = keep_largest_components(labels)
    expected = labels.copy()
    expected[6, 6] = 0
    expected[4, 8:10] = 0
    np.testing.assert_array_equal(kept, expected)
    assert kept.dtype == labels.dtype
    assert not keep_largest_components(np.zeros((3, 3), np.uint16)).any()


def test_stitch_cores_rebuilds_a_dense_map_exactly():
    values = np.random.default_rng(0).uniform(size=(77, 101)).astype(np.float32)
    tiles = tile_grid(77, 101, 32, 9)
    rebuilt = stitch_cores(values.shape, tiles, [values[t.slices] for t in tiles])
    np.testing.assert_array_equal(rebuilt, values)


# --------------------------------------------------------------------------------------------
# input kinds


def stretch(values):
    low, high = np.percentile(values.astype(np.float64), STRETCH_PERCENTILES)
    return np.rint(np.clip((values - low) / (high - low), 0, 1) * 255).astype(np.uint8)


def blobs16(shape, seed, background=200.0, noise=8.0, peak=3000.0, count=4):
    """A real-looking 16-bit field: camera offset and noise, and a few bright blurred nuclei."""
    rng = np.random.default_rng(seed)
    ys, xs = np.mgrid[0 : shape[0], 0 : shape[1]]
    values = background + rng.normal(0.0, noise, size=shape)
    for _ in range(count):
        cy, cx = rng.uniform(0, shape[0]), rng.uniform(0, shape[1])
        values += peak * np.exp(-((ys - cy) ** 2 + (xs - cx) ** 2) / (2 * 3.0 ** 2))
    return np.clip(np.rint(values), 0, 65535).astype(np.uint16)


@pytest.fixture
def samples():
    rng = np.random.default_rng(0)
    rgb8 = rng.integers(0, 256, size=(20, 30, 3), dtype=np.uint8)
    rgb8[..., 0] = 200  # distinct channels: an RGB/BGR swap shows
    rgb8[..., 2] = 10
    gray16 = blobs16((20, 30), seed=1)
    rgb16 = np.dstack([blobs16((20, 30), seed=2, peak=p) for p in (4000, 9000, 2000)])
    return rgb8, gray16, rgb16


def write_cv2(path, rgb_or_gray):
    """cv2 writes BGR(A); give it RGB(A)."""
    image = rgb_or_gray
    if image.ndim == 3:
        code = cv2.COLOR_RGB2BGR if image.shape[2] == 3 else cv2.COLOR_RGBA2BGRA
        image = cv2.cvtColor(image, code)
    assert cv2.imwrite(str(path), image)


def test_8_bit_inputs_are_used_as_they_are(tmp_path, samples):
    rgb8, _, _ = samples
    gray8 = rgb8[..., 1]
    rgba8 = np.dstack([rgb8, np.full(rgb8.shape[:2], 7, np.uint8)])
    write_cv2(tmp_path / "rgb.png", rgb8)
    write_cv2(tmp_path / "gray.png", gray8)
    write_cv2(tmp_path / "rgba.png", rgba8)
    tifffile.imwrite(tmp_path / "rgb.tif", rgb8)
    tifffile.imwrite(tmp_path / "gray.tif", gray8)
    tifffile.imwrite(tmp_path / "planar.tif", np.moveaxis(rgb8, -1, 0), photometric="rgb",
                     planarconfig="separate")
    for name in ("rgb.png", "rgba.png", "rgb.tif", "planar.tif"):
        image = load_image(tmp_path / name)
        np.testing.assert_array_equal(image.rgb, rgb8, err_msg=name)
        assert image.stretch is None and image.dtype == np.uint8
        np.testing.assert_allclose(image.intensity, rgb8.mean(axis=2))
    for name in ("gray.png", "gray.tif"):
        image = load_image(tmp_path / name)
        np.testing.assert_array_equal(image.rgb, np.dstack([gray8] * 3), err_msg=name)
        np.testing.assert_array_equal(image.intensity, gray8)
    assert load_image(tmp_path / "rgba.png").channels == 4


def test_jpeg_inputs(tmp_path, samples):
    rgb8, _, _ = samples
    smooth = cv2.GaussianBlur(rgb8, (5, 5), 2)
    write_cv2(tmp_path / "rgb.jpg", smooth)
    write_cv2(tmp_path / "gray.jpeg", smooth[..., 1])
    image = load_image(tmp_path / "rgb.jpg")
    assert image.rgb.dtype == np.uint8 and image.rgb.shape == (20, 30, 3)
    assert np.abs(image.rgb.astype(int) - smooth).mean() < 4  # lossy, but channels in order
    gray = load_image(tmp_path / "gray.jpeg").rgb
    assert (gray[..., 0] == gray[..., 2]).all()
    assert np.abs(gray[..., 0].astype(int) - smooth[..., 1]).mean() < 4


def test_16_bit_inputs_are_stretched_by_percentiles(tmp_path, samples):
    _, gray16, rgb16 = samples
    write_cv2(tmp_path / "gray16.png", gray16)
    write_cv2(tmp_path / "rgb16.png", rgb16)
    tifffile.imwrite(tmp_path / "gray16.tif", gray16)
    opaque = np.full((20, 30), 65535, np.uint16)
    tifffile.imwrite(tmp_path / "rgba16.tif", np.dstack([rgb16, opaque]))
    tifffile.imwrite(tmp_path / "float.tif", gray16.astype(np.float32) / 7)
    for name in ("gray16.png", "gray16.tif"):
        image = load_image(tmp_path / name)
        np.testing.assert_array_equal(image.rgb, np.dstack([stretch(gray16)] * 3), err_msg=name)
        np.testing.assert_array_equal(image.intensity, gray16)  # stored units for the table
        assert image.dtype == np.uint16 and image.stretching.mode == "percentile"
    for name in ("rgb16.png", "rgba16.tif"):
        np.testing.assert_array_equal(load_image(tmp_path / name).rgb, stretch(rgb16), err_msg=name)
    np.testing.assert_array_equal(
        load_image(tmp_path / "float.tif").rgb[..., 0], stretch(gray16.astype(np.float32) / 7)
    )
    tifffile.imwrite(tmp_path / "flat.tif", np.full((5, 6), 300, np.uint16))
    assert (load_image(tmp_path / "flat.tif").rgb == 0).all()


def test_unreadable_inputs_name_the_file_and_the_reason(tmp_path):
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "text.tif").write_text("not a tiff")
    tifffile.imwrite(tmp_path / "stack.tif", np.zeros((9, 20, 30), np.uint16))
    cases = {"empty.png": "cannot be decoded", "text.tif": "not a readable TIFF",
             "stack.tif": "holds 9 pages", "missing.png": "no such file"}
    for name, reason in cases.items():
        with pytest.raises(ImageReadError, match=reason) as error:
            load_image(tmp_path / name)
        assert name in str(error.value)


# --------------------------------------------------------------------------------------------
# one real run of tools/predict.py


def tiny_mask_rcnn_weights(folder):
    """The demo Mask R-CNN, randomly initialised (seeded), saved as a checkpoint."""
    torch.manual_seed(0)
    model = build_model(get_config(str(DEMO)))
    DetectionCheckpointer(model, save_dir=str(folder)).save("random")
    return folder / "random.pth"


def load_tool(name):
    spec = importlib.util.spec_from_file_location(f"tool_{name}", ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_predict_cli_end_to_end(tmp_path, capsys):
    weights = tiny_mask_rcnn_weights(tmp_path)
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(1)
    rgb = cv2.GaussianBlur(rng.integers(0, 256, size=(80, 112, 3), dtype=np.uint8), (7, 7), 3)
    write_cv2(images / "cells.png", rgb)
    tifffile.imwrite(images / "cells16.tif", rgb[..., 0].astype(np.uint16) * 200)
    (images / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    out = tmp_path / "out"

    code = load_tool("predict").main([
        "--config-file", str(DEMO), "--weights", str(weights), "--input", str(images),
        "--output", str(out), "--tile", "64", "--overlap", "16", "--score-threshold", "0.05",
        "INPUT.MIN_SIZE_TEST", "64", "INPUT.MAX_SIZE_TEST", "96", "MODEL.DEVICE", "cpu",
    ])
    captured = capsys.readouterr()
    assert code == 1
    assert "2 image(s) processed" in captured.out and "1 failed" in captured.out
    assert "broken.png" in captured.err and "cannot be decoded" in captured.err

    summary = {Path(row["image"]).name: row for row in read_csv(out / "summary.csv")}
    assert summary["broken.png"]["status"] == "failed"
    for stem in ("cells", "cells16"):
        row = summary[f"{stem}.png" if stem == "cells" else f"{stem}.tif"]
        assert row["status"] == "ok" and row["tiles"] == "4" and row["model_output"] == "instances"
        labels = tifffile.imread(out / f"{stem}_labels.tif")
        assert labels.dtype == np.uint16 and labels.shape == (80, 112)
        table = read_csv(out / f"{stem}_nuclei.csv")
        regions = regionprops(labels.astype(np.int32))
        assert len(table) == len(regions) == int(row["nuclei"]) == labels.max() > 0
        for line, region in zip(table, regions):
            assert int(line["label"]) == region.label
            assert int(line["area"]) == region.area
            assert float(line["centroid_y"]) == pytest.approx(region.centroid[0], abs=1e-3)
            assert float(line["centroid_x"]) == pytest.approx(region.centroid[1], abs=1e-3)
            assert (int(line["bbox_min_row"]), int(line["bbox_min_col"]),
                    int(line["bbox_max_row"]), int(line["bbox_max_col"])) == region.bbox
            assert 0.05 <= float(line["score"]) <= 1
        overlay = cv2.cvtColor(cv2.imread(str(out / f"{stem}_overlay.png")), cv2.COLOR_BGR2RGB)
        model_input = load_image(images / (f"{stem}.png" if stem == "cells" else f"{stem}.tif"))
        np.testing.assert_array_equal(overlay[labels == 0], model_input.rgb[labels == 0])
        assert (overlay[labels > 0] != model_input.rgb[labels > 0]).any(axis=1).any()
    intensity = tifffile.imread(images / "cells16.tif").astype(np.float64)
    first = read_csv(out / "cells16_nuclei.csv")[0]
    labels16 = tifffile.imread(out / "cells16_labels.tif")
    assert float(first["mean_intensity"]) == pytest.approx(
        intensity[labels16 == int(first["label"])].mean(), abs=1e-3
    )
    assert not list(out.glob(".*.tmp"))  # written whole, no temporary file left


def test_semantic_model_labels_are_connected_components_of_stitched_probabilities():
    """A real (random, narrow) UNet# of the semantic meta-architecture, tiled."""
    from sharp_fpn.d2.predictor import NucleiPredictor
    from sharp_fpn.d2.predictor import load_config
    from skimage.measure import label as connected_components

    cfg = load_config(ROOT / "configs" / "semantic" / "table1" / "unet_sharp_ds.yaml",
                      ["MODEL.UNET.WIDTH_MULT", 0.125, "MODEL.DEVICE", "cpu",
                       "INPUT.SEMANTIC.SIZE", [64, 64]])
    torch.manual_seed(0)
    predictor = NucleiPredictor(cfg, None)
    rgb = cv2.GaussianBlur(np.random.default_rng(2).integers(0, 256, (90, 120, 3), np.uint8),
                           (9, 9), 4)
    tiles = tile_grid(90, 120, 64, 16)
    maps = [predictor.run_model(rgb[t.slices])["sem_seg"][0].numpy() for t in tiles]
    probabilities = stitch_cores((90, 120), tiles, maps)

    prediction = predictor.predict(rgb, tile=64, overlap=16)
    assert prediction.kind == "semantic" and prediction.tiles == len(tiles) == 6
    expected = connected_components(probabilities > 0.5, connectivity=2)
    np.testing.assert_array_equal(prediction.labels, expected)
    assert prediction.count == expected.max() > 0
    for k in (1, prediction.count):
        assert prediction.scores[k - 1] == pytest.approx(probabilities[expected == k].mean())
