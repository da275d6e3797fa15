#!/usr/bin/env python
"""Train or evaluate a sharp-fpn model with detectron2.

    python tools/train_net.py --config-file configs/mask_rcnn_sharp_R101.yaml --num-gpus 2
    python tools/train_net.py --config-file CFG --eval-only MODEL.WEIGHTS output/model_final.pth
    python tools/train_net.py --config-file CFG --resume        # after an interruption
    python tools/train_net.py --config-file CFG --overwrite     # start OUTPUT_DIR's run anew

Without CUDA, ``--num-gpus N`` runs N CPU processes (gloo); add ``MODEL.DEVICE cpu``. Flags go
before the config overrides (``KEY VALUE`` pairs, which take the rest of the line); a flag
found among them is an error that names it.

Several machines (``sharp_fpn.d2.distributed``), two ways, one command per machine:

    # detectron2's flags: the same command on each machine but for its --machine-rank
    python tools/train_net.py --num-machines 2 --machine-rank 0 --num-gpus 1 \
        --dist-url tcp://HOST0:29500 --config-file CFG          # on machine 0
    python tools/train_net.py --num-machines 2 --machine-rank 1 --num-gpus 1 \
        --dist-url tcp://HOST0:29500 --config-file CFG          # on machine 1
    # torchrun starts the processes (--nproc-per-node on each machine); each joins them here
    torchrun --nnodes 2 --nproc-per-node 1 --node-rank 0 --master-addr HOST0 \
        --master-port 29500 tools/train_net.py --config-file CFG  # --node-rank 1 on machine 1
    torchrun --standalone --nproc-per-node 2 tools/train_net.py --config-file CFG  # one machine

HOST0 is an address of machine 0 that every machine reaches, and 29500 a port free on it;
``--num-gpus`` is processes per machine (CPU processes over gloo where there is no CUDA). A
process waits ``--dist-timeout`` seconds (default 600) for the others at ``--dist-url``, then
stops in one line naming it; a ``--machine-rank`` not below ``--num-machines``, a
multi-machine ``--dist-url`` that is not ``tcp://HOST:PORT`` and a machine 0 that cannot listen
at it are refused at once. Under torchrun, detectron2's launch flags (``--num-gpus``,
``--num-machines``, ``--machine-rank``, ``--dist-url``, ``--dist-timeout``) are an error that
names them: torchrun decides the processes. ``SOLVER.IMS_PER_BATCH`` is the batch of all the
processes together, split evenly among them.

Only machine 0 (torchrun: rank 0) checks OUTPUT_DIR, holds its lock and writes its run files;
the other processes write only their ``log.txt.rank<N>`` there, so machines sharing a
filesystem never write the same file, and ``--resume`` needs one (every process loads the
checkpoint; processes starting from different iterations are refused). When machine 0 refuses
the folder, torchrun's other processes stop quoting its error; with detectron2's flags the
other machines stop after ``--dist-timeout``. After training rank 0 writes
``distributed.json``: each process's parameter digest (equal on all, else the run fails) and
the images of each of its steps.

OUTPUT_DIR (``sharp_fpn.d2.run_folder``): a folder holding a finished run (model_final.pth) or
an interrupted one (checkpoints) is refused unless ``--resume`` (go on from its last readable
checkpoint) or ``--overwrite`` (start anew: its checkpoints are removed, and the run says which);
a folder another run is writing into is refused, naming that run's process. ``--eval-only``
needs weights that fit the config exactly (MODEL.WEIGHTS, or ``--resume`` for OUTPUT_DIR's last
checkpoint), and writes its config to OUTPUT_DIR/inference/config.yaml.

Every check runs before any process trains; a failure is one line on stderr (exit 1), the
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
from sharp_fpn.d2 import distributed  # noqa: E402
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
    """detectron2's command line, plus ``--overwrite``, ``--dist-timeout`` and ``--debug``."""
    parser = default_argument_parser()
    parser.add_argument(
        "--overwrite", action="store_true",
        help="start anew in an OUTPUT_DIR that holds a finished or interrupted run (its "
        "checkpoints are removed); --resume continues it instead",
    )
    parser.add_argument(
        "--dist-timeout", type=float, default=None, metavar="SECONDS",
        help="how long the processes of a multi-process run wait for each other at --dist-url "
        f"(default {distributed.DEFAULT_JOIN_TIMEOUT_S:g})",
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
    distributed.check_same_start(trainer.start_iter)
    ledger = distributed.BatchLedger(trainer.model)
    results = trainer.train()
    ledger.close()
    distributed.check_replicas(trainer.model, ledger, cfg.OUTPUT_DIR, cfg.SOLVER.IMS_PER_BATCH)
    return results


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    plan = distributed.plan_launch(args, argv)
    print("Command Line Args:", args)
    cfg = get_config(args.config_file, args.opts, world_size=plan.world_size)
    check_run(cfg, eval_only=args.eval_only, resume=args.resume)

    def folder():
        return run_folder(
            cfg.OUTPUT_DIR, tool="train", resume=args.resume, overwrite=args.overwrite,
            eval_only=args.eval_only, config_file=args.config_file or None,
            inputs=[cfg.MODEL.WEIGHTS],
        )

    if plan.torchrun:
        # torchrun started every process: each joins the group and works here; rank 0 holds
        # OUTPUT_DIR (and tells the others if it cannot).
        with distributed.join_torchrun(plan, cfg.MODEL.DEVICE):
            with distributed.held_by_main(folder):
                worker(args)
        return 0
    # One lock per run, held by the launching process of machine 0 (the one of the main
    # process, rank 0) while every process works; the other machines only launch.
    with folder() if plan.writes_run_folder else nullcontext():
        launch(
            worker,
            plan.processes_per_machine,
            num_machines=plan.num_machines,
            machine_rank=plan.machine_rank,
            dist_url=plan.dist_url,
            args=(args,),
            timeout=plan.timeout,
        )
    return 0


if __name__ == "__main__":
    sys.exit(run(main))
