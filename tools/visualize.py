#!/usr/bin/env python
"""Figures of a training run and of a model's predictions (PNG).

    python tools/visualize.py curves --output-dir output/demo
        # losses.png and metrics.png from output/demo/metrics.json, written beside it
    python tools/visualize.py predictions --config-file output/demo/config.yaml \\
        --weights output/demo/model_final.pth --dataset nuclei_synth_val --num 4
        # image | ground truth | prediction, one image per row (the paper's Figure 6 layout)

A figure replaces only a file that this tool wrote (the folder's record, .sharp-fpn-outputs.json,
says which); anything else is refused unless --overwrite, and an input (metrics.json, the
config, the weights, a dataset image) never is an output. Errors are one line naming the file
(--debug: the traceback).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from sharp_fpn.utils import silence_warnings

silence_warnings()  # the project's third-party filters, before detectron2 is imported

from sharp_fpn.cli import UserError, add_debug_argument, run  # noqa: E402
from sharp_fpn.figures import CURVE_FIGURES, plot_training_curves, read_metrics  # noqa: E402
from sharp_fpn.outdir import OutputDir  # noqa: E402

TOOL = "visualize"


def run_curves(args: argparse.Namespace) -> int:
    metrics = Path(args.output_dir) / "metrics.json"
    series = read_metrics(metrics)
    out = OutputDir(args.save_dir or args.output_dir, TOOL, overwrite=args.overwrite,
                    inputs=[metrics])
    for name in CURVE_FIGURES:
        out.check(name)  # both refused before either is drawn
    written = plot_training_curves(series, out.folder, smooth=args.smooth, claim=out.claim)
    for path in written:
        print(f"wrote {path}")
    return 0


def run_predictions(args: argparse.Namespace) -> int:
    from detectron2.data import DatasetCatalog

    from sharp_fpn.d2.predictor import NucleiPredictor
    from sharp_fpn.predict import load_image
    from sharp_fpn.figures import plot_predictions, true_labels
    from sharp_fpn.d2.predictor import load_config, model_label

    records = DatasetCatalog.get(args.dataset)[: args.num]
    if not records:
        raise UserError(f"dataset {args.dataset!r} has no image")
    output = Path(args.output or f"output/visualize/{args.dataset}_predictions.png")
    inputs = [args.config_file, args.weights, *(r["file_name"] for r in records)]
    out = OutputDir(output.parent, TOOL, overwrite=args.overwrite, inputs=inputs)
    out.check(output.name)  # before the model runs
    predictor = NucleiPredictor(load_config(args.config_file, args.opts), args.weights,
                                device=args.device, score_threshold=args.score_threshold)
    rows = []
    for record in records:
        rgb = load_image(Path(record["file_name"])).rgb
        predicted = predictor.predict(rgb, tile=args.tile, overlap=args.overlap).labels
        truth = true_labels(record) if "annotations" in record else None
        rows.append((Path(record["file_name"]).name, rgb, truth, predicted))
    plot_predictions(rows, out.claim(output.name), model_name=model_label(args.config_file))
    print(f"wrote {output}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="figure", required=True)
    curves = commands.add_parser("curves", help="loss and metric curves of a training run")
    curves.add_argument("--output-dir", required=True, help="the run's folder (metrics.json)")
    curves.add_argument("--save-dir", help="where the PNGs go (default: --output-dir)")
    curves.add_argument("--smooth", type=int, default=20,
                        help="moving-average window of the loss lines, in logged points")
    curves.set_defaults(run=run_curves)
    predictions = commands.add_parser("predictions", help="image, truth and prediction")
    predictions.add_argument("--config-file", required=True)
    predictions.add_argument("--weights", required=True)
    predictions.add_argument("--dataset", required=True, help="a registered dataset name")
    predictions.add_argument("--num", type=int, default=4, help="images, the dataset's first")
    predictions.add_argument("--output", help="the PNG (default output/visualize/"
                             "<dataset>_predictions.png)")
    predictions.add_argument("--tile", type=int, default=512)
    predictions.add_argument("--overlap", type=int, default=64)
    predictions.add_argument("--score-threshold", type=float, default=0.5)
    predictions.add_argument("--device", default="cpu", help="torch device (%(default)s)")
    predictions.add_argument("opts", nargs=argparse.REMAINDER, metavar="KEY VALUE",
                             help="config options to override")
    predictions.set_defaults(run=run_predictions)
    for command in (curves, predictions):
        command.add_argument("--overwrite", action="store_true",
                             help="replace a figure file that this tool did not write")
        add_debug_argument(command)
    return parser


def visualize(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)


def main(argv: list[str] | None = None) -> int:
    """The exit status: 0, or 1 after a one-line error on stderr (see sharp_fpn.cli)."""
    return run(visualize, argv)


if __name__ == "__main__":
    sys.exit(main())
