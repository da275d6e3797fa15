#!/usr/bin/env python
"""Train or evaluate a sharp-fpn model with detectron2.

    python tools/train_net.py --config-file configs/mask_rcnn_sharp_R101.yaml --num-gpus 2
    python tools/train_net.py --config-file CFG --eval-only MODEL.WEIGHTS output/model_final.pth
    python tools/train_net.py --config-file CFG --resume        # after an interruption
    python tools/train_net.py --config-file CFG --overwrite     # start OUTPUT_DIR's run anew

Without CUDA, ``--num-gpus N`` runs N CPU processes (gloo); add ``MODEL.DEVICE cpu``. Flags go
before the config overrides (``KEY VALUE`` pairs, which take the rest of the line); a flag
found among them is an error that names it.

OUTPUT_DIR (``sharp_fpn.d2.run_folder``): a folder holding a finished run (model_final.pth) or
an interrupted one (checkpoints) is refused unless ``--resume`` (go on from its last readable
checkpoint) or ``--overwrite`` (start anew: its checkpoints are removed, and the run says which);
a folder another run is writing into is refused, naming that run's process. ``--eval-only``
needs weights that fit the config exactly (MODEL.WEIGHTS, or ``--resume`` for OUTPUT_DIR's last
checkpoint), and writes its config to OUTPUT_DIR/inference/config.yaml.

Every check runs before any process starts; a failure is one line on stderr (exit 1), the
traceback with ``--debug``.
"""
from __future__ import annotations

import argparse
import sys
from contextlib import nullcontext
from typing import Optional, Sequence

from sharp_fpn.utils import silence_warnings

silence_warnings()  # the project's third-party filters, before detectron2 is imported

from detectron2.engine import default_argument_parser  # noqa: E402
from detectron2.evaluation import verify_results  # noqa: E402
from detectron2.utils import comm  # noqa: E402

from sharp_fpn.cli import add_debug_argument, run  # noqa: E402
from sharp_fpn.d2.engine import (  # noqa: E402
    AtomicCheckpointer,
    Trainer,
    check_run,
    describe_model,
    get_config,
    launch,
    setup,
)
from sharp_fpn.d2.run_folder import run_folder  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    """detectron2's command line, plus ``--overwrite`` and ``--debug``."""
    parser = default_argument_parser()
    parser.add_argument(
        "--overwrite", action="store_true",
        help="start anew in an OUTPUT_DIR that holds a finished or interrupted run (its "
        "checkpoints are removed); --resume continues it instead",
    )
    add_debug_argument(parser)
    return parser


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """The command line; a flag of its own among the trailing config overrides (which take
    every word after the first KEY) is an error that names the flag."""
    parser = build_parser()
    args = parser.parse_args(argv)
    flags = {flag for action in parser._actions for flag in action.option_strings}
    for word in args.opts:
        flag = word.split("=", 1)[0]
        if flag in flags:
            parser.exit(2, f"{parser.prog}: error: put {flag} before the config overrides\n")
    return args


def worker(args: argparse.Namespace):
    """One process of the run (every process of a multi-process one)."""
    cfg = setup(args)
    if args.eval_only:
        model = Trainer.build_model(cfg)
        checkpointer = AtomicCheckpointer(model, save_dir=cfg.OUTPUT_DIR)
        checkpointer.model_name = describe_model(cfg)
        checkpointer.resume_or_load(cfg.MODEL.WEIGHTS, resume=args.resume, strict=True)
        results = Trainer.test(cfg, model)
        if comm.is_main_process():
            verify_results(cfg, results)
        return results
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    return trainer.train()


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    print("Command Line Args:", args)
    cfg = get_config(args.config_file, args.opts, world_size=args.num_gpus * args.num_machines)
    check_run(cfg, eval_only=args.eval_only, resume=args.resume)
    # One lock per run, held by the launching process of machine 0 (the one of the main
    # process, rank 0) while every process works; the other machines only launch.
    folder = nullcontext()
    if args.machine_rank == 0:
        folder = run_folder(
            cfg.OUTPUT_DIR, tool="train", resume=args.resume, overwrite=args.overwrite,
            eval_only=args.eval_only, config_file=args.config_file or None,
            inputs=[cfg.MODEL.WEIGHTS],
        )
    with folder:
        launch(
            worker,
            args.num_gpus,
            num_machines=args.num_machines,
            machine_rank=args.machine_rank,
            dist_url=args.dist_url,
            args=(args,),
        )
    return 0


if __name__ == "__main__":
    sys.exit(run(main))
