#!/usr/bin/env python
"""Convert a DSB2018 split to COCO json (see sharp_fpn.data.dsb2018).

    python tools/convert_dsb2018.py DSB_ROOT --split stage1_train --out train.json
    python tools/convert_dsb2018.py DSB_ROOT --split stage1_test \\
        --labels-csv DSB_ROOT/stage1_solution.csv --out stage1_test.json

Bad input prints what is wrong (file or CSV line) in one line and exits with status 1, writing
nothing (--debug shows the traceback). The output is never one of the inputs (the labels CSV,
or anything inside the split's folder), and a file the converter did not write itself (the
folder's record, .sharp-fpn-outputs.json, says which) is replaced only with --overwrite. The
json is written to a temporary name and renamed when whole: a run stopped at any moment leaves
the old file as it was.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Optional

from tqdm import tqdm

from sharp_fpn.cli import UserError, add_debug_argument, run
from sharp_fpn.data.dsb2018 import convert_split, write_json_atomic
from sharp_fpn.outdir import OutputDir
from sharp_fpn.utils import available_cpus, worker_count

TOOL = "convert_dsb2018"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("root", metavar="DSB_ROOT", help="folder holding <split>/<ImageId>/...")
    parser.add_argument("--split", default="stage1_train", help="split folder (%(default)s)")
    parser.add_argument("--out", required=True, help="COCO json file to write")
    parser.add_argument(
        "--labels-csv",
        help="read run-length labels from this CSV (stage1_train_labels.csv, "
        "stage1_solution.csv, stage2_solution_final.csv) instead of the masks/ folders",
    )
    parser.add_argument(
        "--workers",
        type=int,
        help=f"processes (default: every core this process may use, {available_cpus()} here)",
    )
    parser.add_argument(
        "--overwrite", action="store_true",
        help="replace --out even if the converter did not write it (never an input)",
    )
    add_debug_argument(parser)
    return parser


def _inside(path: Path, folder: Path) -> bool:
    return os.path.commonpath([path, folder]) == str(folder)


def check_output(args: argparse.Namespace) -> Optional[OutputDir]:
    """Refuse, before any work, an output that is an input or a file not ours to replace.

    Returns the output's :class:`OutputDir` if its folder exists (else None: nothing there to
    conflict with; the folder is made when the json is written).
    """
    out = Path(args.out)
    real = Path(os.path.realpath(out))
    split_dir = Path(os.path.realpath(Path(args.root) / args.split))
    if _inside(real, split_dir):
        raise UserError(
            f"{out}: inside {Path(args.root) / args.split}, the split's folder of images and "
            "masks, which are the inputs; write the json elsewhere (e.g. DSB_ROOT/annotations/)"
        )
    ancestor = out.absolute().parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise UserError(f"{ancestor}: is a file, not a folder for {out}")
    if not out.parent.exists():
        return None
    folder = _output_dir(args)
    folder.check(out.name)
    return folder


def _output_dir(args: argparse.Namespace) -> OutputDir:
    inputs = [args.labels_csv] if args.labels_csv else []
    return OutputDir(Path(args.out).parent, TOOL, overwrite=args.overwrite, inputs=inputs)


def convert(argv: Optional[list[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        workers = worker_count(args.workers)
    except ValueError as err:
        parser.error(f"--workers: {err}")
    check_output(args)
    start = time.perf_counter()
    coco = convert_split(
        args.root,
        args.split,
        args.labels_csv,
        workers=workers,
        progress=True,
        on_warning=lambda message: tqdm.write(f"warning: {message}", file=sys.stderr),
    )
    with _output_dir(args).lock():
        # the record read again under the lock: another run may have changed it meanwhile
        write_json_atomic(coco, _output_dir(args).claim(Path(args.out).name))
    print(
        f"wrote {args.out}: {len(coco['images'])} images, {len(coco['annotations'])} nuclei "
        f"({time.perf_counter() - start:.1f} s)"
    )
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    """The exit status: 0, or 1 after a one-line error on stderr (see sharp_fpn.cli)."""
    return run(convert, argv)


if __name__ == "__main__":
    sys.exit(main())
