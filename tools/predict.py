#!/usr/bin/env python
"""Segment the nuclei of microscopy images with a trained sharp-fpn model.

    python tools/predict.py --config-file output/demo/config.yaml \\
        --weights output/demo/model_final.pth --input images/ more/*.tif --output results/

Per image: <stem>_labels.tif (uint16, 0 = background, one id per nucleus), <stem>_overlay.png
(outlines over the image), <stem>_nuclei.csv (area, centroid, box, intensity, score per
nucleus); and summary.csv for the run. Images of any size are cut into overlapping tiles
(--tile, --overlap: nuclei up to the overlap in size are never cut nor duplicated); 8- or
16-bit, gray, RGB or RGBA, PNG/TIFF/JPEG. Files that cannot be read are reported and skipped;
the exit status is 1 when any input failed.
"""
from __future__ import annotations

import argparse
import sys

from sharp_fpn.utils import silence_warnings

silence_warnings()  # the project's third-party filters, before detectron2 is imported

from sharp_fpn.d2.engine import ConfigError  # noqa: E402
from sharp_fpn.d2.predictor import NucleiPredictor  # noqa: E402
from sharp_fpn.predict import predict_images  # noqa: E402
from sharp_fpn.d2.predictor import load_config  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 2)[2],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config-file", required=True, help="the model's config (yaml)")
    parser.add_argument("--weights", required=True, help="the model's checkpoint (.pth)")
    parser.add_argument("--input", nargs="+", required=True, metavar="PATH",
                        help="image files, folders (their images) or glob patterns")
    parser.add_argument("--output", required=True, help="folder for the outputs")
    parser.add_argument("--tile", type=int, default=512,
                        help="tile side in pixels, 0 for whole images (%(default)s)")
    parser.add_argument("--overlap", type=int, default=64,
                        help="least overlap of neighbouring tiles in pixels; make it at least "
                        "the largest nucleus diameter (%(default)s)")
    parser.add_argument("--score-threshold", type=float, default=0.5,
                        help="drop instances scoring below (%(default)s)")
    parser.add_argument("--min-kept-fraction", type=float, default=0.5,
                        help="drop an instance that keeps less than this fraction of its mask "
                        "after better ones took theirs: a duplicate detection (%(default)s)")
    parser.add_argument("--device", default="cpu", help="torch device: cpu, cuda, cuda:1... "
                        "(%(default)s)")
    parser.add_argument("opts", nargs=argparse.REMAINDER, metavar="KEY VALUE",
                        help="config options to override, e.g. INPUT.MIN_SIZE_TEST 512")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.tile > 0 and not 0 <= args.overlap < args.tile:
        parser.error(f"--overlap must be in [0, --tile) = [0, {args.tile}), got {args.overlap}")
    try:
        predictor = NucleiPredictor(
            load_config(args.config_file, args.opts), args.weights, device=args.device,
            score_threshold=args.score_threshold, min_kept_fraction=args.min_kept_fraction,
        )
    except (ConfigError, FileNotFoundError, ValueError) as e:
        parser.error(str(e))
    report = predict_images(
        predictor.cfg, args.weights, args.input, args.output, tile=args.tile,
        overlap=args.overlap, predictor=predictor,
    )
    for failure in report.failures:
        print(f"FAILED {failure.reason}", file=sys.stderr)
    nuclei = sum(r.nuclei for r in report.results)
    print(f"{len(report.results)} image(s) processed ({nuclei} nuclei), "
          f"{len(report.failures)} failed; outputs in {report.out_dir}, summary {report.summary}")
    return 1 if report.failures else 0


if __name__ == "__main__":
    sys.exit(main())
