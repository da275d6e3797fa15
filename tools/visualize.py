#!/usr/bin/env python
"""Figures of a training run and of a model's predictions (PNG).

    python tools/visualize.py curves --output-dir output/demo
        # losses.png and metrics.png from output/demo/metrics.json, written beside it
    python tools/visualize.py predictions --config-file output/demo/config.yaml \\
        --weights output/demo/model_final.pth --dataset nuclei_synth_val --num 4
        # image | ground truth | prediction, one image per row (the paper's Figure 6 layout)
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from sharp_fpn.utils import silence_warnings

silence_warnings()  # the project's third-party filters, before detectron2 is imported

from sharp_fpn.figures import plot_training_curves, read_metrics  # noqa: E402


def run_curves(args: argparse.Namespace) -> int:
    folder = Path(args.output_dir)
    written = plot_training_curves(read_metrics(folder / "metrics.json"), args.save_dir or folder,
                                   smooth=args.smooth)
    for path in written:
        print(f"wrote {path}")
    return 0


def run_predictions(args: argparse.Namespace) -> int:
    from detectron2.data import DatasetCatalog

    from sharp_fpn.d2.predictor import NucleiPredictor
    from sharp_fpn.predict import load_image
    from sharp_fpn.figures import plot_predictions, true_labels
    from sharp_fpn.d2.predictor import load_config, model_label

    predictor = NucleiPredictor(load_config(args.config_file, args.opts), args.weights,
                                device=args.device, score_threshold=args.score_threshold)
    records = DatasetCatalog.get(args.dataset)[: args.num]
    if not records:
        raise SystemExit(f"dataset {args.dataset!r} has no image")
    rows = []
    for record in records:
        rgb = load_image(Path(record["file_name"])).rgb
        predicted = predictor.predict(rgb, tile=args.tile, overlap=args.overlap).labels
        truth = true_labels(record) if "annotations" in record else None
        rows.append((Path(record["file_name"]).name, rgb, truth, predicted))
    output = Path(args.output or f"output/visualize/{args.dataset}_predictions.png")
    plot_predictions(rows, output, model_name=model_label(args.config_file))
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
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
