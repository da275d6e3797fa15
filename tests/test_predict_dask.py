"""predict on a dask.distributed cluster (issue 11, item 4's prediction half; item 6's worker
killed mid-run): a real LocalCluster of 2 worker processes, shared by the module.

* serial vs ``dask``: the demo's tiny Mask R-CNN (random weights, saved to a file every worker
  loads), PNGs, a 2-plane stack and a broken file: the same files byte for byte and the same
  summary (but its ``seconds``);
* ``tools/predict.py --dask ADDRESS`` resuming a run the serial path began: the images done
  are ``skipped (done)``, the rest segmented on the cluster, the outputs those of one run;
* a worker process that dies (``os._exit``) on its first try of an image: the image is
  rescheduled, the outputs equal the serial run's, nothing half-written; a task that kills
  every worker it runs on fails its image only (``KilledWorker``), the batch goes on;
* the tiles of one large image on the workers (a bounded number in flight): the outputs of
  one process, also when a worker dies on one of its tiles.

The killing tests use a thresholding stand-in model (bright pixels, connected components,
no torch): a restarted worker then starts in a second or two instead of importing torch and
detectron2 again; what they test is the cluster's recovery and the run's writing, which do
not depend on the model. This module imports no torch at its top: the workers import it to
unpickle the stand-in.
"""
import csv
import filecmp
import json
import os
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image
from skimage.filters import gaussian
from skimage.measure import label as connected

from sharp_fpn.outdir import LOCK_NAME, RECORD_NAME
from sharp_fpn.predict import predict_images
from sharp_fpn.predict.cluster import open_client

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "configs" / "demo" / "mask_rcnn_fpn_R18.yaml"
FAST = ["INPUT.MIN_SIZE_TEST", "64", "INPUT.MAX_SIZE_TEST", "96",
        "TEST.DETECTIONS_PER_IMAGE", "10", "MODEL.DEVICE", "cpu"]
OPTIONS = dict(tile=64, overlap=16, score_threshold=0.3)


@pytest.fixture(scope="module")
def client():
    """One LocalCluster (2 processes, 1 thread each) for the module, always closed. A task is
    given up when a second worker dies under it (dask's default allows 3), and each worker
    holds one task at a time, so a worker that dies takes no bystander with it."""
    import dask
    import distributed  # noqa: F401  before config.set: its defaults are added on import, and
    # a config.set entered before them removes the whole "distributed" section on exit

    with dask.config.set({"distributed.scheduler.allowed-failures": 1,
                          "distributed.scheduler.worker-saturation": 1.0}):
        with open_client("", workers=2) as (c, _):
            yield c


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    import torch
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.modeling import build_model

    from sharp_fpn.d2.predictor import load_config

    folder = tmp_path_factory.mktemp("weights")
    torch.manual_seed(0)
    DetectionCheckpointer(build_model(load_config(DEMO)), save_dir=str(folder)).save("random")
    return folder / "random.pth"


@pytest.fixture(scope="module")
def cfg():
    from sharp_fpn.d2.predictor import load_config

    return load_config(DEMO, FAST)


def smooth_rgb(size, seed):
    rng = np.random.default_rng(seed)
    noise = rng.integers(0, 256, size=(*size, 3)).astype(np.float64)
    return np.rint(gaussian(noise, sigma=3, channel_axis=-1, preserve_range=True)).astype(
        np.uint8)


def images(folder, count=3, size=(80, 80), stack=True, broken=True):
    folder.mkdir(parents=True, exist_ok=True)
    for k in range(count):
        Image.fromarray(smooth_rgb(size, k)).save(folder / f"c{k}.png")
    if stack:  # a 2-plane z-stack: two sets of outputs, two summary rows
        planes = np.stack([smooth_rgb(size, 10 + k)[..., 0] for k in range(2)])
        tifffile.imwrite(folder / "stack.tif", planes, imagej=True, metadata={"axes": "ZYX"})
    if broken:
        (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    return folder


def summary(folder):
    with open(Path(folder) / "summary.csv", newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def without_seconds(rows):
    return [{k: v for k, v in row.items() if k != "seconds"} for row in rows]


def assert_same_outputs(a, b):
    """Every output file byte for byte, the summary but its seconds, the same record."""
    names = sorted(p.name for p in a.iterdir() if p.name not in ("summary.csv", RECORD_NAME))
    assert names == sorted(p.name for p in b.iterdir()
                           if p.name not in ("summary.csv", RECORD_NAME))
    for name in names:
        assert filecmp.cmp(a / name, b / name, shallow=False), name
    assert without_seconds(summary(a)) == without_seconds(summary(b))
    records = [json.loads((f / RECORD_NAME).read_text()) for f in (a, b)]
    assert [{k: sorted(v) for k, v in r.items()} for r in records] == [
        {k: sorted(v) for k, v in records[0].items()}] * 2
    for folder in (a, b):
        assert not list(folder.glob(".*.tmp")) and not (folder / LOCK_NAME).exists()


# --------------------------------------------------------------------------------------------
# the same results


def test_a_dask_run_equals_the_serial_run(tmp_path, client, cfg, weights):
    inputs = images(tmp_path / "images", size=(60, 60))  # one 64-px tile each
    serial = predict_images(cfg, weights, [inputs], tmp_path / "serial", progress=False,
                            **OPTIONS)
    on_dask = predict_images(cfg, weights, [inputs], tmp_path / "dask", dask=client,
                             progress=False, **OPTIONS)

    assert_same_outputs(tmp_path / "serial", tmp_path / "dask")
    rows = summary(tmp_path / "dask")
    assert [(Path(r["image"]).name, r["plane"], r["status"]) for r in rows] == [
        ("broken.png", "", "failed"), ("c0.png", "", "ok"), ("c1.png", "", "ok"),
        ("c2.png", "", "ok"), ("stack.tif", "0", "ok"), ("stack.tif", "1", "ok")]
    assert "broken.png" in rows[0]["error"]
    nuclei = [r.nuclei for r in serial.results]
    assert sum(nuclei) > 0  # the model finds something: the comparison means something
    # the report too, in the inputs' order whatever the order the workers finished in
    assert [(r.image.name, r.plane, r.nuclei) for r in on_dask.results] == [
        (r.image.name, r.plane, r.nuclei) for r in serial.results]
    assert [f.image for f in on_dask.failures] == [f.image for f in serial.failures]
    assert client.status == "running"  # a Client given is left open


def test_the_cli_resumes_on_a_cluster_what_a_serial_run_began(tmp_path, client, weights):
    from test_predict_safety import cli

    inputs = images(tmp_path / "images", count=4, size=(60, 60), stack=False, broken=False)

    def args(inputs, out):
        return ["--input", *inputs, "--config-file", DEMO, "--weights", weights, "--output",
                out, "--tile", "64", "--overlap", "16", "--score-threshold", "0.3"]

    # the run began: two images done, serially (a killed run leaves the same)
    assert cli(args([inputs / "c0.png", inputs / "c1.png"], tmp_path / "out") + FAST) == 0
    done = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "out").glob("c[01]_*")}
    assert cli(args([inputs], tmp_path / "out") + ["--dask", client.scheduler.address]
               + FAST) == 0
    status = {Path(r["image"]).name: r["status"] for r in summary(tmp_path / "out")}
    assert status == {"c0.png": "skipped (done)", "c1.png": "skipped (done)",
                      "c2.png": "ok", "c3.png": "ok"}
    assert done == {p.name: p.stat().st_mtime_ns for p in (tmp_path / "out").glob("c[01]_*")}
    # what it made is what one uninterrupted run makes
    assert cli(args([inputs], tmp_path / "whole") + FAST) == 0
    for name in sorted(p.name for p in (tmp_path / "whole").glob("c*")):
        assert filecmp.cmp(tmp_path / "out" / name, tmp_path / "whole" / name,
                           shallow=False), name


# --------------------------------------------------------------------------------------------
# a worker killed mid-run


@dataclass
class Found:
    """What the stand-in finds (the fields of sharp_fpn.d2.predictor.Prediction)."""

    labels: np.ndarray
    scores: np.ndarray
    kind: str = "instances"
    tiles: int = 1

    @property
    def count(self):
        return int(self.labels.max())


class Bright:
    """Stands in for NucleiPredictor (no torch): nuclei are the connected bright regions. Its
    process dies (``os._exit``, as a worker killed by the OS does) on an image of ``die_on``'s
    size: the first time only when ``marker`` is given (it leaves the marker), else always."""

    cfg, weights, score_threshold, min_kept_fraction = None, None, 0.5, 0.5

    def __init__(self, die_on=None, marker=None, cfg=None):
        self.die_on, self.marker, self.cfg = die_on, marker, cfg  # cfg: the run's, not used

    def predict(self, rgb, tile=0, overlap=0, progress=False):
        if self.die_on is not None and rgb.shape[:2] == tuple(self.die_on):
            if self.marker is None:
                os._exit(1)
            if not Path(self.marker).exists():
                Path(self.marker).write_text(str(os.getpid()))
                os._exit(1)
        labels = connected(rgb.mean(axis=2) > 140).astype(np.int32)
        return Found(labels, np.linspace(0.9, 0.6, int(labels.max())))


def mixed_images(folder):
    """Five images; c2 is the one of a size of its own (72 x 72)."""
    images(folder, count=5, stack=False, broken=False)
    Image.fromarray(smooth_rgb((72, 72), 2)).save(folder / "c2.png")
    return folder


def test_a_worker_killed_mid_run_is_retried_and_nothing_is_lost(tmp_path, client, cfg):
    inputs = mixed_images(tmp_path / "images")
    marker = tmp_path / "died-once"
    options = dict(tile=64, overlap=16, progress=False)
    predict_images(None, None, [inputs], tmp_path / "serial", predictor=Bright(cfg=cfg),
                   **options)
    report = predict_images(cfg, None, [inputs], tmp_path / "dask", dask=client,
                            predictor_factory=partial(Bright, (72, 72), str(marker)),
                            **options)
    assert marker.exists()  # a worker did die on c2
    assert report.ok and len(report.results) == 5
    assert_same_outputs(tmp_path / "serial", tmp_path / "dask")
    assert {r["status"] for r in summary(tmp_path / "dask")} == {"ok"}


def test_a_task_that_kills_every_worker_fails_its_image_only(tmp_path, client, cfg):
    inputs = mixed_images(tmp_path / "images")
    report = predict_images(cfg, None, [inputs], tmp_path / "out", dask=client,
                            predictor_factory=partial(Bright, (72, 72)), tile=64, overlap=16,
                            progress=False)
    rows = {Path(r["image"]).name: r for r in summary(tmp_path / "out")}
    assert {n: r["status"] for n, r in rows.items()} == {
        "c0.png": "ok", "c1.png": "ok", "c2.png": "failed", "c3.png": "ok", "c4.png": "ok"}
    error = rows["c2.png"]["error"]
    assert error.startswith(f"{inputs / 'c2.png'}: not segmented on the cluster (KilledWorker")
    assert [Path(f.image).name for f in report.failures] == ["c2.png"]
    assert not list((tmp_path / "out").glob("c2_*")) and not list(tmp_path.glob("out/.*.tmp"))
    # the cluster is whole again for whatever comes next
    assert len(client.scheduler_info()["workers"]) == 2 or client.wait_for_workers(2) is None


def test_dask_needs_weights_every_worker_can_load(tmp_path, cfg):
    images(tmp_path / "images", count=1, stack=False, broken=False)
    with pytest.raises(ValueError, match="the workers need a weights file"):
        predict_images(cfg, None, [tmp_path / "images"], tmp_path / "out", dask="",
                       progress=False, **OPTIONS)
    with pytest.raises(ValueError, match="not sent to Dask workers"):
        predict_images(None, None, [tmp_path / "images"], tmp_path / "out", dask="",
                       predictor=Bright(cfg=cfg), progress=False, tile=64, overlap=16)
    assert not (tmp_path / "out").exists()  # refused before anything was made


# --------------------------------------------------------------------------------------------
# the tiles of one large image


def test_a_large_images_tiles_on_the_cluster_give_the_outputs_of_one_process(tmp_path, client):
    """segment_large's map_tiles spread over the workers (each its own model): the same
    OME-Zarr labels and the same CSV as the builtin map."""
    from sharp_fpn.predict.cluster import tile_mapper
    from sharp_fpn.predict.large import ThresholdModel

    pixels = _smooth_uint16(np.random.default_rng(3), (230, 170))
    # 3 tiles in flight at most: a new one is submitted as each is handed over
    results = _large_image_both_ways(tmp_path, pixels, tile_mapper(
        client, partial(ThresholdModel, 150.0), in_flight=3))
    assert results["one"].tiles > 6 and results["one"].nuclei > 5


def _smooth_uint16(rng, shape):
    """16-bit noise smoothed into blobs: bright ones are the stand-in's nuclei."""
    noise = rng.integers(0, 65535, shape).astype(np.float64)
    return np.rint(gaussian(noise, sigma=2, preserve_range=True)).astype(np.uint16)


def _large_image_both_ways(folder, pixels, mapper):
    """``pixels`` as a tiled TIFF segmented by the large path in this process and with
    ``mapper`` (a cluster's ``map_tiles``): the same labels and the same CSV; both results."""
    import zarr

    from sharp_fpn.predict.large import LargeOutputs, ThresholdModel, segment_large

    tifffile.imwrite(folder / "big.tif", pixels, tile=(64, 64))
    results = {}
    for name, map_tiles in (("one", None), ("dask", mapper)):
        out = folder / name
        results[name] = segment_large(
            folder / "big.tif", LargeOutputs(out / "big_labels.ome.zarr", out / "big.csv",
                                             chunk=64),
            predictor=ThresholdModel(150.0), tile=64, overlap=16, progress=False,
            map_tiles=map_tiles)
    one, on_dask = (zarr.open_group(str(folder / n / "big_labels.ome.zarr"), mode="r")["0"][:]
                    for n in ("one", "dask"))
    np.testing.assert_array_equal(one, on_dask)
    assert (folder / "one" / "big.csv").read_bytes() == (
        folder / "dask" / "big.csv").read_bytes()
    assert results["dask"].nuclei == results["one"].nuclei
    return results


class DiesOnATile:
    """The thresholding tile model of the large path, whose process dies (``os._exit``) the
    first time it is given the tile at ``(top, left)`` (it leaves ``marker``)."""

    def __init__(self, at, marker):
        from sharp_fpn.predict.large import ThresholdModel

        self.inner, self.at, self.marker = ThresholdModel(150.0), tuple(at), marker
        self.normalize, self.nucleus_diameter, self.min_kept_fraction = None, 0.0, 0.0

    def instances(self, rgb, tile):
        if (tile.top, tile.left) == self.at and not Path(self.marker).exists():
            Path(self.marker).write_text(str(os.getpid()))
            os._exit(1)
        return self.inner.instances(rgb, tile)


def test_a_worker_killed_on_a_tile_of_a_large_image_is_retried_and_nothing_is_lost(
        tmp_path, client):
    from sharp_fpn.predict.cluster import tile_mapper
    from sharp_fpn.predict.tiling import tile_grid

    pixels = _smooth_uint16(np.random.default_rng(5), (200, 180))
    victim = tile_grid(200, 180, 64, 16)[5]  # a tile in the middle of the run
    marker = tmp_path / "died-once"
    runs = _large_image_both_ways(tmp_path, pixels, tile_mapper(
        client, partial(DiesOnATile, (victim.top, victim.left), str(marker)), in_flight=4))
    assert marker.exists()  # a worker did die on that tile
    assert runs["dask"].nuclei == runs["one"].nuclei > 5
