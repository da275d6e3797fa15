#!/usr/bin/env python
"""Segment the nuclei of microscopy images with a trained sharp-fpn model.

    python tools/predict.py --input images/ more/*.tif --output results/
    python tools/predict.py --model NAME --input images/ --output results/ [--diameter PX]
    python tools/predict.py --config-file output/demo/config.yaml \\
        --weights output/demo/model_final.pth --input images/ --output results/
    python tools/predict.py --input images/ --output results/ --dask [tcp://scheduler:8786]
    python tools/predict.py --large --input slide.ome.tif --output results/
    python tools/predict.py --list-models

The model: the model zoo's default (sharp_fpn/model_zoo, or $SHARP_FPN_MODEL_ZOO) when neither
--config-file and --weights (always both) nor --model is given; --list-models shows the zoo's
models. A zoo model's weights are checked against the zoo's sha256 before use.

Nucleus size: a model that knows the nucleus diameter it was trained on (INPUT.NUCLEUS_DIAMETER,
which zoo models have) gets each image rescaled so its nuclei have that size: by --diameter PX
(the diameter of your nuclei in pixels) when given, else estimated per image from a first pass
(median equivalent diameter of at least 3 nuclei; a second pass when the scale needed is outside
0.8..1.25; scales kept within 0.25..4). Outputs are of the image at its own size; summary.csv
says the diameter, whether it was given or estimated, and the scale.

Per image: <stem>_labels.tif (uint16, 0 = background, one id per nucleus), <stem>_overlay.png
(outlines over the image), <stem>_nuclei.csv (area, centroid, box, intensity, score per
nucleus; plus area_um2, centroid_y/x_um, equivalent_diameter_um when the pixel size is known:
OME-TIFF PhysicalSizeX/Y, ImageJ resolution and unit, OME-Zarr scale, or --pixel-size);
and summary.csv for the run (one row per input and plane: ok, skipped (done), failed with the
reason, pending while the run goes on; it says the pixel size and where it came from).
--rois adds <stem>_rois.zip (Fiji ROI Manager: one polygon per nucleus, named by its label),
--geojson <stem>_nuclei.geojson (QuPath: one detection per nucleus with its measurements),
--ome-tiff writes <stem>_labels.ome.tif (with the pixel size) instead of <stem>_labels.tif.

Images: 8- or 16-bit (or float), PNG/TIFF/JPEG/BMP, one 2-D image per file: gray, or gray +
alpha / RGB / RGBA where the file says so (PNG/JPEG colour types, TIFF photometric RGB and
alpha extra samples); OME-Zarr folders (.zarr, .ome.zarr: the highest resolution level).
Multi-channel files (OME-TIFF, ImageJ hyperstacks, OME-Zarr) need --channel INDEX or NAME;
z-stacks, time series and multi-page files are segmented plane by plane: plane k's outputs are
<stem>_z<k>_labels.tif ... (k zero-padded) and it has its own summary row (plane column). Non-8-bit
images are stretched per image (0.1st..99.9th percentile to 0..255), but a range narrower
than 40 times the image's noise is widened to that, so an empty field stays dim instead of
becoming full-contrast noise; --no-stretch maps the sample type's range instead (uint16:
value / 257). summary.csv says what was read and how it was stretched.

Large images are cut into overlapping tiles (--tile, --overlap: nuclei up to the overlap in
size are never cut nor duplicated; tiles of 1024 px for models that see images at their own
size, as the shipped ones do, 512 px for models that resize their input). --tile 0 predicts
images whole, except an image the model would shrink more than a 512-px tile: that one is
tiled at 512 px (a note says so).

Images larger than memory: a TIFF (BigTIFF, OME-TIFF, tiled or not) or OME-Zarr plane of more
than --large-threshold megapixels (default 64, about 8,000 x 8,000 px), or every TIFF/OME-Zarr
input with --large, is read window by window and segmented tile by tile (the same tiles and
stitch; labels equal to the whole-image path's up to their numbering), its labels written chunk
by chunk: <stem>_labels.ome.zarr (an OME-Zarr folder, uint32, with the pixel size) instead of
the label TIFF, <stem>_nuclei.csv, and --rois / --geojson as asked; no overlay (view the labels
in napari). Peak memory does not grow with the image: one tile, at most --large-memory MB of
label chunks (the others wait in a scratch folder in --output), the nuclei not yet decided.
Its nuclei are rescaled as on the whole-image path (--diameter, or estimated on up to 9 tiles
spread over the image); instance and semantic models both work; a file of several planes or
channels left unpicked there fails, named. PNG/JPEG files are read
whole whatever their size (a note says so above the threshold). Its summary.csv row says
route "large"; with --dask its tiles are the workers' tasks.

Files: nothing predict did not write is replaced (a file of yours named like an output is
refused, naming it; --overwrite replaces it), an input never. --output may be the input folder:
earlier predict outputs there are not read as inputs. Outputs are written as each image is
done and summary.csv after each image, so a killed run loses nothing finished; rerun the same
command to go on: an image is left as it is (reported "skipped (done)") when summary.csv says
it was done with the same image file, model, weights and options and its three outputs are
there. --redo segments everything again.

A file that cannot be read, an OME-Zarr with a chunk missing from its store (zarr would read
it as zeros; --allow-missing-chunks reads it so, for writers that leave out empty chunks), or
a tile the model fails on, fails that image only (a failed row; the batch goes on); the exit
status is 1 when any input failed. Other problems stop the run with one line naming the file
or option (--debug for the traceback); a full disk stops it after the last image written
whole, and the same command resumes it.

Many images: --dask segments them on a dask.distributed cluster, one task per image: --dask
ADDRESS uses a running scheduler (tcp://host:8786), --dask alone starts a LocalCluster of
--dask-workers processes (default: one per core) for the run. The workers build the model once
each from --config-file/--weights (a path every worker can read) and return each image's
labels, overlay and table; this process writes every file and summary.csv as each image is
done, so the outputs are those of a run without --dask and the rules above hold (resume
included). A worker that dies has its images rescheduled on the others; an image that kills
workers repeatedly (dask's distributed.scheduler.allowed-failures, 3) fails, named.
"""
from __future__ import annotations

import argparse
import math
import sys

from sharp_fpn.utils import silence_warnings

silence_warnings()  # the project's third-party filters, before any third-party import

from sharp_fpn.cli import add_debug_argument, run  # noqa: E402
from sharp_fpn.predict.run import (  # noqa: E402
    DEFAULT_LARGE_THRESHOLD, DEFAULT_TILE, MAX_TILE, MIN_TILE, NATIVE_TILE, check_options,
)


def _fraction(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0 or math.isnan(value):
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {text}")
    return value


def _diameter(text: str) -> float:
    value = float(text)
    if not value > 0 or math.isinf(value):  # NaN fails too
        raise argparse.ArgumentTypeError(f"must be a number of pixels > 0, got {text}")
    return value


def _positive(unit: str):
    """An argparse type: a number > 0 of ``unit`` (NaN refused)."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number of {unit}: {text!r}") from None
        if not value > 0:  # NaN fails too
            raise argparse.ArgumentTypeError(f"must be > 0 {unit}, got {text}")
        return value

    return parse


_megapixels = _positive("megapixels")
_megabytes = _positive("MB")


def _pixel_size(text: str) -> float:
    value = float(text)
    if not value > 0 or math.isinf(value):  # NaN fails too
        raise argparse.ArgumentTypeError(f"must be a number of micrometres > 0, got {text}")
    return value


def list_models() -> str:
    """The zoo's models as a table (name, default mark, modalities, size, description)."""
    from sharp_fpn.model_zoo import list_models as zoo_models, zoo_root

    models = zoo_models()
    if not models:
        return (f"no model in the model zoo {zoo_root()} yet: give --config-file and --weights, "
                f"or publish one with tools/publish_model.py")
    rows = [("name", "default", "modalities", "size", "description")] + [
        (m.name, "*" if m.is_default else "", ",".join(m.modalities),
         f"{m.size_bytes / 1e6:.1f} MB", m.description) for m in models]
    widths = [max(len(r[k]) for r in rows) for k in range(4)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r[:4], widths)) + "  " + r[4]
                     for r in rows)


def model_files(parser: argparse.ArgumentParser, args: argparse.Namespace):
    """(config, weights) the options name: both given, a zoo model, or the zoo's default."""
    if args.model and (args.config_file or args.weights):
        parser.error("--model picks a zoo model: give it without --config-file and --weights")
    if bool(args.config_file) != bool(args.weights):
        given, missing = (("--config-file", "--weights") if args.config_file
                          else ("--weights", "--config-file"))
        parser.error(f"{given} needs {missing} too (or neither, for the model zoo's default "
                     f"model)")
    if args.config_file:
        return args.config_file, args.weights
    from sharp_fpn.model_zoo import resolve

    config, weights = resolve(args.model)
    return str(config), str(weights)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 2)[2],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config-file", help="the model's config (yaml), with --weights; "
                        "default: the model zoo's default model")
    parser.add_argument("--weights", help="the model's checkpoint (.pth), with --config-file")
    parser.add_argument("--model", metavar="NAME",
                        help="a model of the zoo (--list-models), instead of --config-file")
    parser.add_argument("--list-models", action="store_true",
                        help="list the zoo's models and exit")
    parser.add_argument("--input", nargs="+", metavar="PATH",
                        help="image files, folders (their images) or glob patterns")
    parser.add_argument("--output", help="folder for the outputs")
    parser.add_argument("--diameter", type=_diameter, default=None, metavar="PX",
                        help="the nuclei's diameter in pixels: images are rescaled so that "
                        "nuclei have the model's training size (default: estimated per image)")
    parser.add_argument("--tile", type=int, default=None,
                        help=f"tile side in pixels, {MIN_TILE}..{MAX_TILE}, or 0 for whole "
                        f"images (default: {NATIVE_TILE} for a model that sees images at their "
                        f"own size, as the shipped ones, else {DEFAULT_TILE})")
    parser.add_argument("--overlap", type=int, default=64,
                        help="least overlap of neighbouring tiles in pixels, less than half the "
                        "tile; make it at least the largest nucleus diameter (%(default)s)")
    parser.add_argument("--score-threshold", type=_fraction, default=0.5,
                        help="drop instances scoring below, in [0, 1] (%(default)s)")
    parser.add_argument("--min-kept-fraction", type=_fraction, default=0.5,
                        help="drop an instance that keeps less than this fraction of its mask "
                        "after better ones took theirs: a duplicate detection (%(default)s)")
    parser.add_argument("--channel", default=None, metavar="INDEX|NAME",
                        help="the nuclear channel of multi-channel files (OME-TIFF, ImageJ "
                        "hyperstacks, OME-Zarr): its name (OME Channel Name) or its index from 0 "
                        "(digits: a channel of that name first); a file without it fails, "
                        "listing its channels")
    parser.add_argument("--pixel-size", type=_pixel_size, default=None, metavar="UM",
                        help="micrometres per pixel, instead of the file's (OME, ImageJ or "
                        "OME-Zarr metadata); with either, the CSV adds µm columns")
    parser.add_argument("--rois", action="store_true",
                        help="also write <stem>_rois.zip: one ImageJ/Fiji polygon ROI per "
                        "nucleus, named by its label")
    parser.add_argument("--geojson", action="store_true",
                        help="also write <stem>_nuclei.geojson: QuPath detections with their "
                        "measurements")
    parser.add_argument("--ome-tiff", action="store_true",
                        help="write the labels as <stem>_labels.ome.tif (OME-TIFF with the "
                        "pixel size) instead of <stem>_labels.tif")
    parser.add_argument("--no-stretch", action="store_true",
                        help="do not stretch non-8-bit images per image: map the sample type's "
                        "whole range to 0..255 (uint16: value / 257; float: 0..1)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace files in the output folder that predict did not write "
                        "(inputs are never replaced)")
    parser.add_argument("--redo", action="store_true",
                        help="segment again the images an earlier run into --output finished")
    parser.add_argument("--allow-missing-chunks", action="store_true",
                        help="read an OME-Zarr whose store lacks some chunks, as zarr does (the "
                        "fill value there), instead of failing it; for writers that leave out "
                        "empty chunks (write_empty_chunks=False)")
    parser.add_argument("--large", action="store_true",
                        help="segment every TIFF / OME-Zarr input by the large-image path "
                        "(window by window, labels written as <stem>_labels.ome.zarr, no "
                        "overlay), whatever its size")
    parser.add_argument("--large-threshold", type=_megapixels, default=DEFAULT_LARGE_THRESHOLD,
                        metavar="MP", help="a TIFF / OME-Zarr plane of more megapixels takes the "
                        "large-image path (%(default)s)")
    parser.add_argument("--large-memory", type=_megabytes, default=None, metavar="MB",
                        help="label memory of the large-image path: the label chunks held at "
                        "once, the others waiting in a scratch folder in --output (default 64); "
                        "the results are the same")
    parser.add_argument("--dask", nargs="?", const="", default=None, metavar="ADDRESS",
                        help="segment the images on a dask.distributed cluster: the scheduler "
                        "at ADDRESS (tcp://host:8786), or a LocalCluster started for the run "
                        "when no address is given")
    parser.add_argument("--dask-workers", type=int, default=None, metavar="N",
                        help="worker processes of --dask's LocalCluster (default: one per core, "
                        "no more than the images)")
    parser.add_argument("--device", default="cpu", help="torch device: cpu, cuda, cuda:1... "
                        "(%(default)s)")
    add_debug_argument(parser)
    parser.add_argument("opts", nargs=argparse.REMAINDER, metavar="KEY VALUE",
                        help="config options to override, e.g. INPUT.MIN_SIZE_TEST 512")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.list_models:
        print(list_models())
        return 0
    missing = [name for name, value in (("--input", args.input), ("--output", args.output))
               if not value]
    if missing:
        parser.error(f"the following arguments are required: {', '.join(missing)}")
    try:
        check_options(DEFAULT_TILE if args.tile is None else args.tile, args.overlap,
                      args.score_threshold, args.min_kept_fraction)
    except ValueError as e:
        parser.error(str(e))
    if args.dask and ":" not in args.dask:  # --dask took a word meant for something else
        parser.error(f"--dask {args.dask}: not a scheduler address (tcp://host:port); for "
                     f"a LocalCluster give --dask without one, followed by another option "
                     f"(not by config KEY VALUE pairs)")
    if args.dask_workers is not None and args.dask is None:
        parser.error("--dask-workers sizes --dask's LocalCluster: give --dask too")
    if args.dask_workers is not None and args.dask:
        parser.error("--dask-workers sizes the LocalCluster --dask starts; a cluster at an "
                     "address has its own workers")
    if args.dask_workers is not None and args.dask_workers < 1:
        parser.error(f"--dask-workers must be at least 1, got {args.dask_workers}")

    from sharp_fpn.d2.predictor import check_device, check_weights_file, load_config
    from sharp_fpn.predict import predict_images

    config_file, weights = model_files(parser, args)
    cfg = load_config(config_file, args.opts)
    check_weights_file(weights)
    check_device(args.device)
    report = predict_images(
        cfg, weights, args.input, args.output, tile=args.tile, overlap=args.overlap,
        score_threshold=args.score_threshold, min_kept_fraction=args.min_kept_fraction,
        device=args.device, stretch=not args.no_stretch, overwrite=args.overwrite,
        redo=args.redo, debug=args.debug, diameter=args.diameter, channel=args.channel,
        pixel_size=args.pixel_size, rois=args.rois, geojson=args.geojson,
        ome_tiff=args.ome_tiff, allow_missing_chunks=args.allow_missing_chunks,
        dask=args.dask, dask_workers=args.dask_workers, large=args.large,
        large_threshold=args.large_threshold, large_memory_mb=args.large_memory,
    )
    nuclei = sum(r.nuclei for r in report.results)
    done = f", {len(report.skipped)} skipped (done earlier)" if report.skipped else ""
    print(f"{len(report.results)} image(s) processed ({nuclei} nuclei){done}, "
          f"{len(report.failures)} failed; outputs in {report.out_dir}, summary {report.summary}")
    return 1 if report.failures else 0


if __name__ == "__main__":
    sys.exit(run(main))
