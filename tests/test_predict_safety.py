"""predict under the inputs users give: no file lost, no image misread, no number invented.

Real files on disk (tifffile, PIL, OpenCV), the demo's tiny Mask R-CNN (random, seeded), the
real tool. Files: a user's file named like an output, the input folder as output, inputs never
outputs, a file or an impossible folder as output, a folder in use. Incremental: a run killed
with SIGKILL, reruns that skip what is done and redo what changed, a failing tile, an output
that cannot be written. Images: multi-channel / multi-plane / multi-page files refused saying
what they hold, colour only where the file says so. Normalisation: an empty 16-bit field is
not stretched into nuclei; a field with nuclei is stretched as before; --no-stretch.
Arguments: ranges, NaN, device, config, weights, --tile 0 on a large image.
Bad input of issue 11 (item 6): an OME-Zarr with a chunk missing from its store (Zarr v2 and
v3), a stack whose plane names are a user's file or another input's outputs, a full disk and
a killed run both resumed to the outputs of one uninterrupted run.
"""
import copy
import csv
import importlib.util
import json
import os
import resource
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
import tifffile
import torch
from PIL import Image

from sharp_fpn.cli import run as run_tool
from sharp_fpn.d2.predictor import NucleiPredictor, input_scale, load_config
from sharp_fpn.outdir import LOCK_NAME, RECORD_NAME, OutputConflict
from sharp_fpn.predict import ImageReadError, load_image, normalise, predict_images, read_image
from sharp_fpn.predict.image_io import STRETCH_PERCENTILES, expand_inputs, noise_sigma

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "configs" / "demo" / "mask_rcnn_fpn_R18.yaml"
# Small model inputs and few detections: each tile runs in a fraction of a second.
FAST = ["INPUT.MIN_SIZE_TEST", "64", "INPUT.MAX_SIZE_TEST", "96",
        "TEST.DETECTIONS_PER_IMAGE", "10", "MODEL.DEVICE", "cpu"]


# --------------------------------------------------------------------------------------------
# helpers


def tool():
    spec = importlib.util.spec_from_file_location("predict_tool", ROOT / "tools" / "predict.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def cli(argv):
    """tools/predict.py as a user runs it (one-line errors); its exit status."""
    return run_tool(tool().main, [str(a) for a in argv])


def summary_rows(folder):
    with open(Path(folder) / "summary.csv", newline="", encoding="utf-8") as f:
        return {Path(row["image"]).name: row for row in csv.DictReader(f)}


def cell_image(path, size=(60, 60), seed=0):
    """A smooth 8-bit RGB image (PNG) the random model finds a few "nuclei" in."""
    rng = np.random.default_rng(seed)
    rgb = cv2.GaussianBlur(rng.integers(0, 256, size=(*size, 3), dtype=np.uint8), (7, 7), 3)
    Image.fromarray(rgb).save(path)
    return path


def noise_field(shape, sigma, seed=0, offset=100.0):
    rng = np.random.default_rng(seed)
    return np.clip(np.rint(offset + rng.normal(0.0, sigma, size=shape)), 0, 65535).astype(
        np.uint16)


def field_with_nuclei(shape, seed=0, sigma=5.0, peak=2000.0, count=12):
    rng = np.random.default_rng(seed)
    values = noise_field(shape, sigma, seed).astype(np.float64)
    ys, xs = np.mgrid[0 : shape[0], 0 : shape[1]]
    for _ in range(count):
        cy, cx = rng.uniform(0, shape[0]), rng.uniform(0, shape[1])
        values += peak * (((ys - cy) ** 2 + (xs - cx) ** 2) < 6.0 ** 2)
    return np.clip(values, 0, 65535).astype(np.uint16)


def percentile_stretch(values):
    low, high = np.percentile(values.astype(np.float64), STRETCH_PERCENTILES)
    return np.rint(np.clip((values - low) / (high - low), 0, 1) * 255).astype(np.uint8)


def one_error_line(err):
    lines = [line for line in err.splitlines() if "error:" in line]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.modeling import build_model

    folder = tmp_path_factory.mktemp("weights")
    torch.manual_seed(0)
    model = build_model(load_config(DEMO))
    DetectionCheckpointer(model, save_dir=str(folder)).save("random")
    return folder / "random.pth"


@pytest.fixture(scope="module")
def predictor(weights):
    return NucleiPredictor(load_config(DEMO, FAST), weights, device="cpu", score_threshold=0.3)


def base_args(weights, inputs, output):
    return ["--config-file", DEMO, "--weights", weights, "--input", *inputs, "--output", output,
            "--tile", "64", "--overlap", "16", "--score-threshold", "0.3"]


# --------------------------------------------------------------------------------------------
# files: nothing predict did not write is replaced


def test_a_users_file_named_like_an_output_is_refused_and_kept(tmp_path, weights, capsys):
    images = tmp_path / "images"
    images.mkdir()
    cell_image(images / "cells.png")
    out = tmp_path / "out"
    out.mkdir()
    truth = out / "cells_labels.tif"
    truth.write_bytes(b"the user's ground truth")

    assert cli(base_args(weights, [images], out) + FAST) == 1
    line = one_error_line(capsys.readouterr().err)
    assert "cells_labels.tif" in line and "--overwrite" in line
    assert truth.read_bytes() == b"the user's ground truth"
    assert not (out / "summary.csv").exists()  # refused before any work

    assert cli(base_args(weights, [images], out) + ["--overwrite"] + FAST) == 0
    labels = tifffile.imread(truth)
    assert labels.dtype == np.uint16 and labels.shape == (60, 60)


def test_the_input_folder_may_be_the_output_folder(tmp_path, predictor, capsys):
    for k, name in enumerate(("a.png", "b.png")):
        cell_image(tmp_path / name, seed=k)
    first = predict_images(None, None, [tmp_path], tmp_path, tile=64, overlap=16,
                           predictor=predictor, progress=False)
    assert [r.image.name for r in first.results] == ["a.png", "b.png"] and first.ok
    made = {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir() if p.name != "summary.csv"}

    second = predict_images(None, None, [tmp_path], tmp_path, tile=64, overlap=16,
                            predictor=predictor, progress=False)
    # its own outputs are no inputs: 4 image files (labels and overlays) left out, said so
    assert sorted(p.name for p in second.skipped_outputs) == [
        "a_labels.tif", "a_overlay.png", "b_labels.tif", "b_overlay.png"]
    assert "4 file(s) left out of the inputs" in capsys.readouterr().err
    assert not second.results and [p.name for p in second.skipped] == ["a.png", "b.png"]
    rows = summary_rows(tmp_path)
    assert set(rows) == {"a.png", "b.png"}
    assert {r["status"] for r in rows.values()} == {"skipped (done)"}
    assert [int(rows[n]["nuclei"]) for n in ("a.png", "b.png")] == [r.nuclei for r in first.results]
    assert made == {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()
                    if p.name != "summary.csv"}  # nothing rewritten
    # a folder holding nothing but predict's outputs gives no input at all
    only = tmp_path / "only"
    only.mkdir()
    for name in ("a_labels.tif", "a_overlay.png"):
        (only / name).write_bytes((tmp_path / name).read_bytes())
    (only / RECORD_NAME).write_text(json.dumps({"predict": ["a_labels.tif", "a_overlay.png"]}))
    found = expand_inputs([str(only)])
    assert not found.files and len(found.skipped_outputs) == 2
    assert "only outputs of an earlier predict run" in found.problems[0][1]


def test_an_input_is_never_an_output(tmp_path, predictor):
    cell_image(tmp_path / "x.png")
    truth = np.zeros((60, 60), np.uint16)
    truth[10:20, 10:20] = 1
    tifffile.imwrite(tmp_path / "x_labels.tif", truth)  # the user's ground truth, an input too
    for overwrite in (False, True):
        with pytest.raises(OutputConflict, match=r"x_labels\.tif: is one of the inputs"):
            predict_images(None, None, [tmp_path], tmp_path, tile=64, overlap=16,
                           predictor=predictor, progress=False, overwrite=overwrite)
    np.testing.assert_array_equal(tifffile.imread(tmp_path / "x_labels.tif"), truth)
    assert not (tmp_path / "summary.csv").exists()


def test_an_output_that_is_a_file_or_cannot_be_made_is_one_line(tmp_path, weights, capsys):
    cell_image(tmp_path / "a.png")
    afile = tmp_path / "results.txt"
    afile.write_text("mine")
    assert cli(base_args(weights, [tmp_path / "a.png"], afile) + FAST) == 1
    assert "results.txt: is a file, not a folder" in one_line_of(capsys)
    assert afile.read_text() == "mine"
    assert cli(base_args(weights, [tmp_path / "a.png"], afile / "sub") + FAST) == 1
    assert "results.txt/sub: cannot create the output folder" in one_line_of(capsys)
    if os.geteuid() != 0:  # root writes anywhere
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o555)
        assert cli(base_args(weights, [tmp_path / "a.png"], locked) + FAST) == 1
        assert "locked: the output folder is not writable" in one_line_of(capsys)


def one_line_of(capsys):
    return one_error_line(capsys.readouterr().err)


def test_a_folder_in_use_is_refused(tmp_path, predictor):
    cell_image(tmp_path / "a.png")
    out = tmp_path / "out"
    out.mkdir()
    holder = {"pid": os.getpid(), "host": socket.gethostname(), "tool": "predict"}
    (out / LOCK_NAME).write_text(json.dumps(holder))  # a live process holds it
    with pytest.raises(OutputConflict, match="in use by predict"):
        predict_images(None, None, [tmp_path / "a.png"], out, predictor=predictor,
                       progress=False)
    assert not (out / "summary.csv").exists()


# --------------------------------------------------------------------------------------------
# incremental and resumable


def test_a_killed_run_leaves_a_summary_of_what_is_done_and_its_rerun_finishes(tmp_path, weights):
    images = tmp_path / "images"
    images.mkdir()
    for k in range(8):
        cell_image(images / f"img{k}.png", size=(100, 100), seed=k)
    out = tmp_path / "out"
    argv = [str(a) for a in base_args(weights, [images], out) + FAST]
    proc = subprocess.Popen([sys.executable, str(ROOT / "tools" / "predict.py"), *argv],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None:
            if (out / "summary.csv").exists() and any(
                r["status"] == "ok" for r in summary_rows(out).values()
            ):
                break
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    rows = summary_rows(out)
    assert len(rows) == 8  # every input listed, from the start
    done = sorted(n for n, r in rows.items() if r["status"] == "ok")
    pending = sorted(n for n, r in rows.items() if r["status"] == "pending")
    assert done and pending and len(done) + len(pending) == 8
    for name in done:  # what is done is whole
        labels = tifffile.imread(out / name.replace(".png", "_labels.tif"))
        assert labels.shape == (100, 100)
        assert len(summary_rows(out)[name]["fingerprint"]) == 16
    assert (out / LOCK_NAME).exists()  # left by the killed run, stale

    assert cli(base_args(weights, [images], out) + FAST) == 0  # takes the stale lock over
    rows = summary_rows(out)
    assert sorted(n for n, r in rows.items() if r["status"] == "skipped (done)") == done
    assert sorted(n for n, r in rows.items() if r["status"] == "ok") == pending
    assert all((out / f"img{k}_nuclei.csv").is_file() for k in range(8))
    assert not (out / LOCK_NAME).exists() and not list(out.glob(".*.tmp"))
    # the killed run and its rerun made what one uninterrupted run makes
    assert cli(base_args(weights, [images], tmp_path / "whole") + FAST) == 0
    assert_same_files(out, tmp_path / "whole", [f"img{k}{suffix}" for k in range(8) for suffix
                                                in ("_labels.tif", "_overlay.png", "_nuclei.csv")])


def assert_same_files(a, b, names):
    for name in names:
        assert (Path(a) / name).read_bytes() == (Path(b) / name).read_bytes(), name


def test_a_rerun_redoes_what_changed_and_redo_redoes_everything(tmp_path, predictor, weights):
    for k in range(3):
        cell_image(tmp_path / f"c{k}.png", seed=k)
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    out = tmp_path / "out"

    def again(p=predictor, **options):
        report = predict_images(None, None, [tmp_path], out, tile=64, overlap=16, predictor=p,
                                progress=False, **options)
        return report, {n: r["status"] for n, r in summary_rows(out).items()}

    _, status = again()
    assert status == {"c0.png": "ok", "c1.png": "ok", "c2.png": "ok", "broken.png": "failed"}
    _, status = again()
    assert status["c0.png"] == "skipped (done)" and status["broken.png"] == "failed"

    (out / "c0_overlay.png").unlink()  # an output gone: redone
    cell_image(tmp_path / "c1.png", seed=7)  # the image changed: redone
    cell_image(tmp_path / "broken.png", seed=3)  # fixed: retried
    _, status = again()
    assert status == {"c0.png": "ok", "c1.png": "ok", "c2.png": "skipped (done)",
                      "broken.png": "ok"}

    stricter = copy.copy(predictor)  # another score threshold: every image redone
    stricter.score_threshold = 0.6
    _, status = again(stricter)
    assert set(status.values()) == {"ok"}
    _, status = again(stricter)
    assert set(status.values()) == {"skipped (done)"}
    report, status = again(stricter, redo=True)
    assert set(status.values()) == {"ok"} and len(report.results) == 4


class TileFailing(NucleiPredictor):
    """The real model, whose run fails on one tile as an out-of-memory GPU would."""

    fail_at = 2

    def run_model(self, rgb):
        self.calls = getattr(self, "calls", 0) + 1
        if self.calls == self.fail_at:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return super().run_model(rgb)


def test_a_failing_tile_fails_its_image_only(tmp_path, predictor):
    cell_image(tmp_path / "a.png", size=(60, 60))  # one tile: call 1
    cell_image(tmp_path / "b.png", size=(100, 100))  # four tiles: call 2 fails
    cell_image(tmp_path / "c.png", size=(60, 60), seed=2)
    failing = copy.copy(predictor)
    failing.__class__ = TileFailing
    report = predict_images(None, None, [tmp_path], tmp_path / "out", tile=64, overlap=16,
                            predictor=failing, progress=False)
    rows = summary_rows(tmp_path / "out")
    assert {n: r["status"] for n, r in rows.items()} == {"a.png": "ok", "b.png": "failed",
                                                         "c.png": "ok"}
    error = rows["b.png"]["error"]
    assert "b.png: tile 1/4 (rows 0-64, columns 0-64): RuntimeError: CUDA out of memory" in error
    assert [f.image for f in report.failures] == [str(tmp_path / "b.png")]
    assert not (tmp_path / "out" / "b_labels.tif").exists()


def test_an_output_that_cannot_be_written_ends_the_run(tmp_path, predictor):
    """A real write failure (the file size limit, as a full disk gives), after one image."""
    Image.fromarray(np.full((60, 60, 3), 90, np.uint8)).save(tmp_path / "a_flat.png")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (200, 200, 3), dtype=np.uint8)).save(
        tmp_path / "b_noisy.png")  # its overlay PNG is far above the limit
    cell_image(tmp_path / "c.png")
    out = tmp_path / "out"
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of a signal
    resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, hard))
    try:
        with pytest.raises(OSError, match="the outputs of .*b_noisy.png cannot be written") as e:
            predict_images(None, None, [tmp_path], out, tile=0, overlap=16,
                           predictor=predictor, progress=False)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)
    assert "the run stops here" in str(e.value)
    rows = summary_rows(out)
    assert rows["a_flat.png"]["status"] == "ok"
    assert rows["b_noisy.png"]["status"] == "failed"
    assert rows["b_noisy.png"]["error"].startswith("outputs not written")
    assert rows["c.png"]["status"] == "pending" and not (out / "c_labels.tif").exists()
    assert not list(out.glob(".*.tmp"))
    assert not (out / "b_noisy_labels.tif").exists()  # its outputs: all or none

    # room again: the same run goes on where it stopped, and ends as one uninterrupted run
    again = predict_images(None, None, [tmp_path], out, tile=0, overlap=16,
                           predictor=predictor, progress=False)
    rows = summary_rows(out)
    assert {n: r["status"] for n, r in rows.items()} == {
        "a_flat.png": "skipped (done)", "b_noisy.png": "ok", "c.png": "ok"}
    assert [p.name for p in again.skipped] == ["a_flat.png"]
    predict_images(None, None, [tmp_path], tmp_path / "whole", tile=0, overlap=16,
                   predictor=predictor, progress=False)
    assert_same_files(out, tmp_path / "whole", [f"{stem}{suffix}" for stem in (
        "a_flat", "b_noisy", "c") for suffix in ("_labels.tif", "_overlay.png", "_nuclei.csv")])


# --------------------------------------------------------------------------------------------
# images: one 2-D image per file, colour where the file says so, anything else refused


def _refusals(folder):
    ij = dict(imagej=True)
    files = {
        # name: (writer, what the message says)
        "two_channels.tif": (lambda p: tifffile.imwrite(
            p, np.zeros((20, 30, 2), np.uint16), photometric="minisblack", planarconfig="contig"),
            "2 channels per pixel, not marked RGB"),
        "two_planes.tif": (lambda p: tifffile.imwrite(
            p, np.zeros((2, 20, 30), np.uint16), photometric="minisblack"), "2 pages"),
        "zstack3.tif": (lambda p: tifffile.imwrite(
            p, np.zeros((3, 20, 30), np.uint16), metadata={"axes": "ZYX"}, **ij),
            "3 planes (z)"),
        "zstack4.tif": (lambda p: tifffile.imwrite(
            p, np.zeros((4, 20, 30), np.uint8), metadata={"axes": "ZYX"}, **ij), "4 planes (z)"),
        "composite.tif": (lambda p: tifffile.imwrite(
            p, np.zeros((2, 20, 30), np.uint16), metadata={"axes": "CYX"}, **ij), "2 channels"),
        "ome.ome.tif": (lambda p: tifffile.imwrite(
            p, np.zeros((3, 20, 30), np.uint16), ome=True, metadata={"axes": "CYX"}),
            "3 channels"),
        "rgb_plus.tif": (lambda p: tifffile.imwrite(
            p, np.zeros((20, 30, 4), np.uint16), photometric="rgb", extrasamples=["unspecified"]),
            "4 channels per pixel, marked RGB"),
    }
    for name, (write, _) in files.items():
        write(folder / name)
    with tifffile.TiffWriter(folder / "pages.tif") as w:  # two images of other shapes
        w.write(np.zeros((20, 30), np.uint8))
        w.write(np.zeros((10, 30), np.uint8))
    return {**{n: said for n, (_, said) in files.items()}, "pages.tif": "holds 2 images"}


def test_multichannel_multiplane_and_multipage_files_are_refused_saying_what_they_hold(tmp_path):
    for name, said in _refusals(tmp_path).items():
        with pytest.raises(ImageReadError) as error:
            read_image(tmp_path / name)
        message = str(error.value)
        assert name in message and said in message, message
        assert "axes" in message and "--channel" in message, message
        assert "\n" not in message


def test_refused_files_are_failed_rows_and_the_others_go_on(tmp_path, predictor):
    _refusals(tmp_path)
    cell_image(tmp_path / "cells.png")
    report = predict_images(None, None, [tmp_path], tmp_path / "out", tile=64, overlap=16,
                            predictor=predictor, progress=False)
    rows = summary_rows(tmp_path / "out")
    # stacks are segmented plane by plane (tests/test_predict_formats.py); the rest fail
    stacks = {"two_planes.tif": 2, "zstack3.tif": 3, "zstack4.tif": 4}
    assert rows["cells.png"]["status"] == "ok"
    assert len(report.results) == 1 + sum(stacks.values())
    assert all(rows[n]["status"] == "ok" for n in stacks)
    assert all(r["status"] == "failed" and "--channel" in r["error"]
               for n, r in rows.items() if n != "cells.png" and n not in stacks)


def test_colour_is_read_where_the_file_says_so(tmp_path):
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)
    gray = rgb[..., 1].copy()
    alpha = np.full((20, 30), 255, np.uint8)
    tifffile.imwrite(tmp_path / "rgb.tif", rgb, photometric="rgb")
    tifffile.imwrite(tmp_path / "planar.tif", np.moveaxis(rgb, -1, 0), photometric="rgb",
                     planarconfig="separate")
    tifffile.imwrite(tmp_path / "rgba.tif", np.dstack([rgb, alpha]), photometric="rgb",
                     extrasamples=["unassalpha"])
    tifffile.imwrite(tmp_path / "gray_alpha.tif", np.dstack([gray, alpha]),
                     photometric="minisblack", extrasamples=["unassalpha"])
    tifffile.imwrite(tmp_path / "white.tif", 255 - gray, photometric="miniswhite")
    tifffile.imwrite(tmp_path / "single.tif", gray[None], photometric="minisblack")  # (1, H, W)
    Image.fromarray(np.dstack([gray, alpha]), mode="LA").save(tmp_path / "gray_alpha.png")
    tifffile.imwrite(tmp_path / "tiff_named.png", gray)  # read by content, not by name
    expected = {"rgb.tif": ("RGB", "YXS", rgb), "planar.tif": ("RGB", "SYX", rgb),
                "rgba.tif": ("RGBA", "YXS", rgb), "gray_alpha.tif": ("gray+alpha", "YXS", gray),
                "white.tif": ("gray", "YX", gray), "single.tif": ("gray", "QYX", gray),
                "gray_alpha.png": ("gray+alpha", "YXS", gray),
                "tiff_named.png": ("gray", "YX", gray)}
    for name, (colour, axes, pixels) in expected.items():
        image = load_image(tmp_path / name)
        assert (image.colour, image.axes) == (colour, axes), name
        model_input = pixels if pixels.ndim == 3 else np.dstack([pixels] * 3)
        np.testing.assert_array_equal(image.rgb, model_input, err_msg=name)

    tifffile.imwrite(tmp_path / "palette.tif", gray, photometric="palette",
                     colormap=np.tile(np.arange(256, dtype=np.uint16) * 257, (3, 1)))
    tifffile.imwrite(tmp_path / "stack_named.png", np.zeros((5, 20, 30), np.uint8),
                     photometric="minisblack")
    frames = [Image.fromarray(np.full((20, 30), v, np.uint8)) for v in (0, 128, 255)]
    frames[0].save(tmp_path / "animated.png", save_all=True, append_images=frames[1:])
    for name, said in {"palette.tif": "palette-colour", "stack_named.png": "5 pages",
                       "animated.png": "animated PNG of 3 frames"}.items():
        with pytest.raises(ImageReadError, match=said):
            read_image(tmp_path / name)


def test_the_summary_says_what_was_read(tmp_path, predictor):
    cell_image(tmp_path / "rgb.png")
    tifffile.imwrite(tmp_path / "nuclei16.tif", field_with_nuclei((60, 60)))
    tifffile.imwrite(tmp_path / "empty16.tif", noise_field((60, 60), 5.0))
    predict_images(None, None, [tmp_path], tmp_path / "out", tile=64, overlap=16,
                   predictor=predictor, progress=False)
    rows = summary_rows(tmp_path / "out")
    seen = {n: (r["dtype"], r["channels"], r["colour"], r["axes"], r["stretch"])
            for n, r in rows.items()}
    assert seen == {"rgb.png": ("uint8", "3", "RGB", "YXS", "none"),
                    "nuclei16.tif": ("uint16", "1", "gray", "YX", "percentile"),
                    "empty16.tif": ("uint16", "1", "gray", "YX", "limited")}
    assert rows["rgb.png"]["stretch_low"] == "" and rows["rgb.png"]["tile"] == "64"
    low, high = float(rows["empty16.tif"]["stretch_low"]), float(rows["empty16.tif"]["stretch_high"])
    assert high - low == pytest.approx(40 * float(rows["empty16.tif"]["noise"]), rel=1e-3)


# --------------------------------------------------------------------------------------------
# normalisation that does not invent nuclei


@pytest.mark.parametrize("sigma", [5.0, 40.0, 0.3])
def test_an_empty_16_bit_field_is_not_stretched_into_nuclei(tmp_path, sigma):
    field = noise_field((256, 256), sigma, seed=1)
    tifffile.imwrite(tmp_path / "empty.tif", field)
    image = load_image(tmp_path / "empty.tif")
    assert image.stretching.mode == "limited"
    if sigma >= 1:
        assert image.stretching.noise == pytest.approx(sigma, rel=0.1)
    values = image.rgb[..., 0].astype(np.float64)
    # the noise keeps a dim, low-contrast look: about 6 levels per standard deviation
    assert values.std() <= 7.0 and np.percentile(values, 99.9) <= 45
    # what the plain percentile stretch made of it (full contrast noise: "nuclei")
    if sigma >= 1:
        assert percentile_stretch(field).std() > 35


def test_a_16_bit_field_with_nuclei_is_stretched_as_before(tmp_path):
    field = field_with_nuclei((256, 256), seed=2)
    tifffile.imwrite(tmp_path / "nuclei.tif", field)
    image = load_image(tmp_path / "nuclei.tif")
    assert image.stretching.mode == "percentile"
    assert image.stretching.noise == pytest.approx(5.0, rel=0.15)
    np.testing.assert_array_equal(image.rgb[..., 0], percentile_stretch(field))
    assert image.rgb.max() == 255 and image.rgb.min() == 0
    # a dim field (nuclei 30 noise deviations above the background): limited, still visible
    dim = field_with_nuclei((256, 256), seed=2, peak=150.0)
    rgb, _ = normalise(dim)
    inside = dim > 1000 // 10 + 150 // 2
    assert rgb[..., 0][inside].mean() - rgb[..., 0][~inside].mean() > 100


def test_no_stretch_maps_the_sample_types_range(tmp_path):
    field = field_with_nuclei((64, 64), seed=3, peak=20000.0)
    rgb, stretch = normalise(field, stretch=False)
    np.testing.assert_array_equal(rgb[..., 0], np.rint(field / 257.0).astype(np.uint8))
    assert stretch == (0.0, 65535.0)
    floats = np.linspace(-0.5, 1.5, 64 * 64, dtype=np.float32).reshape(64, 64)
    rgb, stretch = normalise(floats, stretch=False)
    expected = np.rint(np.clip(floats.astype(np.float64), 0, 1) * 255).astype(np.uint8)
    np.testing.assert_array_equal(rgb[..., 0], expected)
    eight = np.arange(256, dtype=np.uint8).reshape(16, 16)
    for flag in (True, False):  # 8-bit is used as stored either way
        rgb, stretch = normalise(eight, stretch=flag)
        assert stretch is None and (rgb[..., 0] == eight).all()
    tifffile.imwrite(tmp_path / "f.tif", field)
    assert load_image(tmp_path / "f.tif", stretch=False).stretching.mode == "off"


def test_noise_sigma_ignores_structure():
    field = field_with_nuclei((300, 400), seed=4, sigma=12.0, peak=5000.0, count=40)
    assert noise_sigma(field) == pytest.approx(12.0, rel=0.1)
    assert noise_sigma(np.full((10, 10), 7, np.uint16)) == 0.0


# --------------------------------------------------------------------------------------------
# arguments checked before any work


@pytest.mark.parametrize("extra,said", [
    (["--tile", "16"], "--tile must be 0 (whole images) or 64..4096"),
    (["--tile", "1"], "--tile must be"),
    (["--tile", "-5"], "--tile must be"),
    (["--tile", "100000"], "--tile must be"),
    (["--tile", "64", "--overlap", "32"], "--overlap must be in [0, 32)"),
    (["--overlap", "-1"], "--overlap must be in [0, 256)"),
    (["--tile", "0", "--overlap", "300"], "--overlap must be in [0, 256)"),
    (["--score-threshold", "nan"], "--score-threshold: must be in [0, 1], got nan"),
    (["--score-threshold", "1.5"], "--score-threshold: must be in [0, 1]"),
    (["--score-threshold", "-0.1"], "--score-threshold: must be in [0, 1]"),
    (["--min-kept-fraction", "NaN"], "--min-kept-fraction: must be in [0, 1]"),
])
def test_bad_options_are_refused_before_any_work(tmp_path, capsys, extra, said):
    cell_image(tmp_path / "a.png")
    argv = ["--config-file", DEMO, "--weights", tmp_path / "none.pth", "--input", tmp_path,
            "--output", tmp_path / "out", *extra]
    with pytest.raises(SystemExit) as exit_:
        cli(argv)
    assert exit_.value.code == 2
    assert said in one_error_line(capsys.readouterr().err)
    assert not (tmp_path / "out").exists()


def test_a_device_that_cannot_be_used_is_one_line(tmp_path, weights, capsys):
    cell_image(tmp_path / "a.png")
    for device in ("gpu0", f"cuda:{torch.cuda.device_count() + 3}"):
        assert cli(base_args(weights, [tmp_path], tmp_path / "out")
                   + ["--device", device]) == 1
        line = one_error_line(capsys.readouterr().err)
        assert f"--device {device}: not usable here" in line and "available: cpu" in line
    assert not (tmp_path / "out").exists()


def test_config_problems_are_one_line_naming_the_file(tmp_path, weights, capsys):
    cell_image(tmp_path / "a.png")
    bad = {  # the file, and a word of the problem
        "missing.yaml": (None, "no such config file"),
        "syntax.yaml": ("MODEL: [unclosed\n", "not valid yaml"),
        "list.yaml": ("- a\n- b\n", "not a"),
        "unknown.yaml": ("MODEL:\n  NO_SUCH_KEY: 1\n", "non-existent config key"),
        "base.yaml": ('_BASE_: "gone.yaml"\n', "gone.yaml"),
        "type.yaml": ("INPUT:\n  MIN_SIZE_TEST: many\n", "min_size_test"),
    }
    for name, (text, said) in bad.items():
        if text is not None:
            (tmp_path / name).write_text(text)
        argv = base_args(weights, [tmp_path], tmp_path / "out")
        argv[1] = tmp_path / name
        assert cli(argv) == 1
        line = one_error_line(capsys.readouterr().err)
        assert f"{tmp_path / name}: " in line and said in line.lower(), line
    with pytest.raises(Exception, match="no such config file"):  # --debug: the traceback
        cli(argv[:0] + ["--debug", "--config-file", tmp_path / "missing.yaml"] + argv[2:])
    assert not (tmp_path / "out").exists()


def test_weights_problems_are_one_line_naming_the_file(tmp_path, capsys):
    cell_image(tmp_path / "a.png")
    (tmp_path / "empty.pth").write_bytes(b"")
    (tmp_path / "corrupt.pth").write_bytes(os.urandom(4096))
    (tmp_path / "notes.pth").write_text("these are not weights\n")
    torch.save({"model": {"backbone.bottom_up.stem.conv1.weight": torch.zeros(3)}},
               tmp_path / "other.pth")
    said = {"missing.pth": "missing.pth: no such weights file",
            "empty.pth": "empty.pth: the weights file is empty",
            "corrupt.pth": "corrupt.pth: not a readable checkpoint",
            "notes.pth": "notes.pth: not a readable checkpoint",
            "other.pth": "other.pth does not fit the model of this config"}
    for name, message in said.items():
        assert cli(base_args(tmp_path / name, [tmp_path / "a.png"], tmp_path / f"out_{name}")
                   + FAST) == 1
        assert message in one_error_line(capsys.readouterr().err), name
    # refused before a summary could claim anything was done
    assert not any((tmp_path / f"out_{name}" / "summary.csv").exists() for name in said)


def test_tile_0_does_not_shrink_a_large_image_to_the_models_input(tmp_path, predictor, capsys):
    cfg = predictor.cfg  # MIN_SIZE_TEST 64, MAX_SIZE_TEST 96: a 512-px tile shrinks 8x
    assert input_scale(cfg, 512, 512) == pytest.approx(64 / 512)
    assert input_scale(cfg, 700, 600) == pytest.approx(64 / 600)  # shrunk more: tiled
    assert input_scale(cfg, 300, 200) == pytest.approx(64 / 200)  # less: whole
    cell_image(tmp_path / "large.png", size=(700, 600))
    cell_image(tmp_path / "small.png", size=(300, 200))
    report = predict_images(None, None, [tmp_path], tmp_path / "out", tile=0, overlap=16,
                            predictor=predictor, progress=False)
    rows = summary_rows(tmp_path / "out")
    assert (rows["large.png"]["tile"], rows["large.png"]["tiles"]) == ("512", "4")
    assert (rows["small.png"]["tile"], rows["small.png"]["tiles"]) == ("whole", "1")
    assert any("large.png: 600x700 px, tiled at 512 px" in n for n in report.notes)
    assert "tiled at 512 px" in capsys.readouterr().err
    # an explicit tile far larger than the model's input is allowed, with a note
    report = predict_images(None, None, [tmp_path / "small.png"], tmp_path / "out2", tile=2048,
                            overlap=16, predictor=predictor, progress=False)
    assert any(n.startswith("--tile 2048: the model resizes each tile to about 64 px")
               for n in report.notes)


# --------------------------------------------------------------------------------------------
# bad input (issue 11, item 6): a Zarr with a missing chunk, plane names in the way


def ome_zarr(path, pixels, zarr_format):
    """An OME-Zarr image (NGFF 0.4 on Zarr v2, 0.5 on Zarr v3) of one (y, x) level in 32-px
    chunks, written by zarr."""
    import zarr

    group = zarr.open_group(str(path), mode="w", zarr_format=zarr_format)
    group.create_array("0", data=pixels, chunks=(32, 32))
    meta = {"multiscales": [{"version": "0.4" if zarr_format == 2 else "0.5",
                             "axes": [{"name": "y", "type": "space"},
                                      {"name": "x", "type": "space"}],
                             "datasets": [{"path": "0", "coordinateTransformations": [
                                 {"type": "scale", "scale": [1.0, 1.0]}]}]}]}
    group.attrs.update(meta if zarr_format == 2 else {"ome": {"version": "0.5", **meta}})
    return path


@pytest.mark.parametrize("zarr_format,chunk", [(2, "1.0"), (3, "c/1/0")])
def test_a_zarr_with_a_missing_chunk_fails_named_and_the_batch_goes_on(tmp_path, predictor,
                                                                       zarr_format, chunk):
    gray = cv2.GaussianBlur(np.random.default_rng(0).integers(0, 256, (70, 60), np.uint8),
                            (7, 7), 3)
    ome_zarr(tmp_path / "holed.ome.zarr", gray, zarr_format)
    ome_zarr(tmp_path / "whole.ome.zarr", gray, zarr_format)
    cell_image(tmp_path / "cells.png")
    lost = tmp_path / "holed.ome.zarr" / "0" / chunk
    assert lost.is_file()
    lost.unlink()  # a chunk lost in a copy: zarr reads zeros there, without a word
    out = tmp_path / "out"
    report = predict_images(None, None, [tmp_path], out, tile=64, overlap=16,
                            predictor=predictor, progress=False)
    rows = summary_rows(out)
    assert {n: r["status"] for n, r in rows.items()} == {
        "cells.png": "ok", "holed.ome.zarr": "failed", "whole.ome.zarr": "ok"}
    error = rows["holed.ome.zarr"]["error"]
    assert error.startswith(f"{tmp_path / 'holed.ome.zarr'}: chunk {chunk} of array '0' "
                            f"(pixels [32:64, 0:32]) is missing from the store, 1 of 6 chunks "
                            f"missing"), error
    assert "--allow-missing-chunks" in error and "\n" not in error
    assert [Path(f.image).name for f in report.failures] == ["holed.ome.zarr"]
    assert not list(out.glob("holed*")) and not list(out.glob(".*.tmp"))

    # asked for, it is read as zarr reads it: the hole as the fill value
    predict_images(None, None, [tmp_path / "holed.ome.zarr"], out, tile=64, overlap=16,
                   predictor=predictor, progress=False, allow_missing_chunks=True)
    assert summary_rows(out)["holed.ome.zarr"]["status"] == "ok"
    assert (out / "holed_labels.tif").is_file()


def test_a_stacks_plane_names_in_the_way_fail_that_stack_only(tmp_path, predictor):
    images = tmp_path / "images"
    images.mkdir()
    stack = cv2.GaussianBlur(np.random.default_rng(1).integers(0, 256, (60, 60), np.uint8),
                             (7, 7), 3)
    for name in ("st.tif", "cells.tif"):
        tifffile.imwrite(images / name, np.stack([stack, stack[::-1]]), imagej=True,
                         metadata={"axes": "ZYX"})
    cell_image(images / "cells_z0.png")  # its outputs are also cells.tif's plane 0's
    out = tmp_path / "out"
    out.mkdir()
    (out / "st_z1_labels.tif").write_bytes(b"the user's")  # a plane's output name

    report = predict_images(None, None, [images], out, tile=64, overlap=16,
                            predictor=predictor, progress=False)
    rows = summary_rows(out)
    assert {n: r["status"] for n, r in rows.items()} == {
        "cells.tif": "failed", "cells_z0.png": "ok", "st.tif": "failed"}
    assert f"{out / 'st_z1_labels.tif'}: exists (not written by sharp-fpn)" in rows[
        "st.tif"]["error"]
    assert (f"{out / 'cells_z0_labels.tif'}: would be the output of two inputs (this file's "
            f"plane, and {images / 'cells_z0.png'})") in rows["cells.tif"]["error"]
    assert (out / "st_z1_labels.tif").read_bytes() == b"the user's"
    assert not list(out.glob("st_*_overlay.png")) and not list(out.glob("cells_z1*"))
    # cells_z0.png's outputs are its own, whatever order the inputs came in
    assert [r.image.name for r in report.results] == ["cells_z0.png"]
    assert tifffile.imread(out / "cells_z0_labels.tif").shape == (60, 60)
