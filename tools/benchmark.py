#!/usr/bin/env python
"""Benchmarks (not tests): time the project's heavy paths on realistic inputs.

    python tools/benchmark.py                     # all of them, sized to take a few minutes
    python tools/benchmark.py imports             # import time of torch and sharp_fpn's layers
    python tools/benchmark.py convert             # DSB2018 -> COCO on a DSB-size synthetic set
    python tools/benchmark.py predict             # prediction MP/s, whole image and tiled
    python tools/benchmark.py necks               # Mask R-CNN cost of each neck vs FPN
    python tools/benchmark.py zoo                 # zoo models vs classical: accuracy, MP/s
    python tools/benchmark.py large               # images larger than memory: peak RSS, time (4k/16k/30k px)
    python tools/benchmark.py zoo --candidate NAME=CONFIG:WEIGHTS   # more models (repeatable)

Each benchmark prints its figures and writes them, with the machine and the arguments, to
``output/benchmarks/<name>.json`` (``--out-dir`` to change). A benchmark is library code
(:mod:`sharp_fpn.perf.benchmarks`): one entry of ``BENCHMARKS``, whose arguments become the
subcommand's. Every figure follows one timing policy (:mod:`sharp_fpn.perf.timing`).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional, Sequence

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(ROOT))

from sharp_fpn.perf.benchmarks import (  # noqa: E402
    BENCHMARKS,
    DEFAULT_OUT_DIR,
    benchmark_parser,
    run_benchmark,
    run_suite,
)

SUITE = "all"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out-dir", type=Path, dest="out_dir_before",
                        help="results folder, also accepted before the benchmark's name")
    commands = parser.add_subparsers(dest="benchmark", metavar="BENCHMARK")
    suite = commands.add_parser(SUITE, help="every benchmark with its suite options (default)")
    suite.add_argument("--out-dir", type=Path, default=DEFAULT_OUT_DIR,
                       help="results folder (%(default)s)")
    for name, benchmark in BENCHMARKS.items():
        benchmark_parser(name, commands.add_parser(name, help=benchmark.help))
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.out_dir_before is not None:  # tools/benchmark.py --out-dir DIR [BENCHMARK]
        args.out_dir = args.out_dir_before
    del args.out_dir_before
    if args.benchmark in (None, SUITE):
        written = run_suite(getattr(args, "out_dir", DEFAULT_OUT_DIR))
        failed = [name for name, path in written.items() if path is None]
        print(f"suite: {len(written) - len(failed)} written, failed: {failed or 'none'}")
        return 1 if failed else 0
    path = run_benchmark(args.benchmark, args)
    print(json.dumps(json.loads(path.read_text())["figures"], indent=2))
    print(f"written to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
