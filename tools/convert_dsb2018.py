#!/usr/bin/env python
"""Convert a DSB2018 split to COCO json (see sharp_fpn.data.dsb2018).

    python tools/convert_dsb2018.py DSB_ROOT --split stage1_train --out train.json
    python tools/convert_dsb2018.py DSB_ROOT --split stage1_test \\
        --labels-csv DSB_ROOT/stage1_solution.csv --out stage1_test.json

Bad input prints what is wrong (file or CSV line) and exits with status 1, writing nothing.
"""
from __future__ import annotations

import argparse
import sys
import time
from typing import Optional

from tqdm import tqdm

from sharp_fpn.data.dsb2018 import DSBFormatError, convert_split, write_json_atomic
from sharp_fpn.utils import available_cpus, worker_count


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
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        workers = worker_count(args.workers)
    except ValueError as err:
        parser.error(f"--workers: {err}")
    start = time.perf_counter()
    try:
        coco = convert_split(
            args.root,
            args.split,
            args.labels_csv,
            workers=workers,
            progress=True,
            on_warning=lambda message: tqdm.write(f"warning: {message}", file=sys.stderr),
        )
    except DSBFormatError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    try:
        write_json_atomic(coco, args.out)
    except OSError as err:
        print(f"error: cannot write {args.out}: {err}", file=sys.stderr)
        return 1
    print(
        f"wrote {args.out}: {len(coco['images'])} images, {len(coco['annotations'])} nuclei "
        f"({time.perf_counter() - start:.1f} s)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
