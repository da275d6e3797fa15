#!/usr/bin/env python
"""Train or evaluate a sharp-fpn model with detectron2.

    python tools/train_net.py --config-file configs/mask_rcnn_sharp_R101.yaml --num-gpus 2
    python tools/train_net.py --config-file CFG --eval-only MODEL.WEIGHTS output/model_final.pth
    python tools/train_net.py --config-file CFG --resume        # after an interruption

Without CUDA, ``--num-gpus N`` runs N CPU processes (gloo); add ``MODEL.DEVICE cpu``. Flags go
before the config overrides (``KEY VALUE`` pairs, which take the rest of the line); a flag
found among them is an error that names it.
"""
from __future__ import annotations

import argparse
from typing import Optional, Sequence

from sharp_fpn.utils import silence_warnings

silence_warnings()  # the project's third-party filters, before detectron2 is imported

from detectron2.engine import default_argument_parser  # noqa: E402
from detectron2.evaluation import verify_results  # noqa: E402
from detectron2.utils import comm  # noqa: E402

from sharp_fpn.d2.engine import AtomicCheckpointer, Trainer, launch, setup  # noqa: E402


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """detectron2's command line; a flag of its own among the trailing config overrides (which
    take every word after the first KEY) is an error that names the flag."""
    parser = default_argument_parser()
    args = parser.parse_args(argv)
    flags = {flag for action in parser._actions for flag in action.option_strings}
    for word in args.opts:
        flag = word.split("=", 1)[0]
        if flag in flags:
            parser.exit(2, f"{parser.prog}: error: put {flag} before the config overrides\n")
    return args


def main(args: argparse.Namespace):
    cfg = setup(args)
    if args.eval_only:
        model = Trainer.build_model(cfg)
        AtomicCheckpointer(model, save_dir=cfg.OUTPUT_DIR).resume_or_load(
            cfg.MODEL.WEIGHTS, resume=args.resume
        )
        results = Trainer.test(cfg, model)
        if comm.is_main_process():
            verify_results(cfg, results)
        return results
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    return trainer.train()


if __name__ == "__main__":
    args = parse_args()
    print("Command Line Args:", args)
    launch(
        main,
        args.num_gpus,
        num_machines=args.num_machines,
        machine_rank=args.machine_rank,
        dist_url=args.dist_url,
        args=(args,),
    )
