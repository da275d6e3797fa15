#!/usr/bin/env python
"""Reproduce the paper's Table 1, 2 or 3 (with Figures 5 and 7): train every row, evaluate,
and write the table beside the paper's numbers.

    python tools/reproduce.py --table 1                 # the real experiment (five data sets, GPUs)
    python tools/reproduce.py --table 2 --quick         # smoke run: synthetic set, CPU, minutes
    python tools/reproduce.py --table 1 --quick --rows unet unet_sharp_ds --iters 20
    python tools/reproduce.py --table 1 --quick --datasets luna16   # one column of Table 1
    python tools/reproduce.py --table 3 --quick         # UNet# (and with CGM), BraTS19 and LiTS17

Each row trains through ``sharp_fpn.d2.engine.Trainer`` (as ``tools/train_net.py``) from its
config and is evaluated on ``DATASETS.TEST``; Table 1's five columns are DSB2018, BraTS19,
LiTS17, LIDC-IDRI (2-D) and LUNA16 (3-D, the V-Net family), Table 3's other eight models are
the paper's figures only. Written under ``--output``: ``table{N}.md`` /
``.csv``, ``table{N}_iou_boxplot.png``, for Table 1 ``fig7_pruning.png`` and ``pruning.csv``,
and ``rows/<row>/`` (see :mod:`sharp_fpn.experiments.reproduce`). ``--quick`` merges
``configs/experiments/quick/*.yaml`` on top of every row's config and trains on its data set's
synthetic stand-ins (``<dataset>_quick_train``, written in the real formats): it tests the
pipeline, it does not reproduce the paper, and the table says so. For multi-GPU training of one row use
``tools/train_net.py`` with its config.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(ROOT))

from sharp_fpn.experiments import Options, UnknownRowError, reproduce  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--table", type=int, choices=(1, 2, 3), required=True)
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: synthetic stand-ins, CPU, tiny widths, few iterations")
    parser.add_argument("--output", type=Path,
                        help="output folder (default output/reproduce/table<N>[_quick])")
    parser.add_argument("--rows", nargs="+", metavar="ROW",
                        help="only these rows (default: all of the table's)")
    parser.add_argument("--datasets", nargs="+", metavar="DATASET",
                        help="only the rows of these data sets (Table 1: dsb2018 brats19 "
                        "lits17 lidc luna16; Table 3: brats19 lits17)")
    parser.add_argument("--iters", type=int,
                        help="SOLVER.MAX_ITER of every row (default: --quick's or the configs')")
    parser.add_argument("--resume", action="store_true",
                        help="reuse rows whose result.json exists in the output folder")
    parser.add_argument("--speed-seconds", type=float, default=2.0,
                        help="time spent measuring each pruned level's images per second")
    parser.add_argument("--threads", type=int,
                        help="torch's CPU threads (default: 1 with --quick, whose tiny models "
                        "run fastest so; else torch's, one per core)")
    parser.add_argument("--opts", nargs=argparse.REMAINDER, default=[],
                        help="config overrides for every row, KEY VALUE pairs (last option)")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> Path:
    """Run the reproducer; return the output folder."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return reproduce(Options(**vars(args)))
    except UnknownRowError as e:
        parser.error(str(e))


if __name__ == "__main__":
    main()
