#!/usr/bin/env python
"""Publish a trained nuclei model into sharp-fpn's model zoo (sharp_fpn/model_zoo).

    python tools/publish_model.py --run output/zoo/NAME --name NAME \\
        --description "one line" --modalities fluorescence he --facts facts.json [--default]

From the training run's folder: its config.yaml (the whole config detectron2 dumped; MODEL.WEIGHTS
is cleared and MODEL.DEVICE set to cpu) and a checkpoint (--checkpoint, model_final.pth), whose
"model" state dict alone is kept, floating tensors in float16 (at most 30 MB, refused above).
The model card MODEL_CARD.md is rendered from --facts, a json object with the keys:

  training_data, seed, iterations, recipe, heldout, scores ({style: {"model": x,
  "baseline": y}}), throughput, command, selection (which candidate won, by how much);
  optional: metric, baseline, notes.  (sharp_fpn/model_zoo/publish.py documents each.)

The card says the model was trained on synthetic data only. The converted weights are loaded
into the model before anything in the zoo changes; index.json is rewritten atomically. --zoo
(or SHARP_FPN_MODEL_ZOO) publishes into another zoo folder.
"""
from __future__ import annotations

import argparse
import sys

from sharp_fpn.utils import silence_warnings

silence_warnings()  # the project's third-party filters, before any third-party import

from sharp_fpn.cli import add_debug_argument, run  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 2)[2],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--run", required=True, help="the training run's folder (OUTPUT_DIR)")
    parser.add_argument("--checkpoint", default="model_final.pth",
                        help="its checkpoint, in --run or a path (%(default)s)")
    parser.add_argument("--name", required=True, help="the model's name in the zoo")
    parser.add_argument("--description", required=True, help="one line for --list-models")
    parser.add_argument("--modalities", nargs="+", required=True, metavar="MODALITY",
                        help="what it serves: fluorescence, he, brightfield...")
    parser.add_argument("--facts", required=True, help="json file the model card is made from")
    parser.add_argument("--default", action="store_true",
                        help="make it the default model of tools/predict.py")
    parser.add_argument("--replace", action="store_true",
                        help="replace a model of that name already in the zoo")
    parser.add_argument("--zoo", default=None,
                        help="the zoo folder (default: $SHARP_FPN_MODEL_ZOO, else the package's)")
    add_debug_argument(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from sharp_fpn.model_zoo.publish import publish

    modalities = [m for item in args.modalities for m in item.split(",")]
    entry = publish(args.run, args.name, args.description, modalities, args.facts,
                    checkpoint=args.checkpoint, default=args.default, zoo=args.zoo,
                    replace=args.replace)
    mark = " (default)" if entry.is_default else ""
    print(f"published {entry.name}{mark}: {entry.weights_path} ({entry.size_bytes / 1e6:.1f} MB, "
          f"sha256 {entry.sha256}), card {entry.card_path}")
    return 0


if __name__ == "__main__":
    sys.exit(run(main))
