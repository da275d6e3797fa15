#!/usr/bin/env python
"""Write a synthetic nuclei data set in DSB2018's layout (see sharp_fpn/data/synthetic.py).

Example::

    python tools/make_synthetic_nuclei.py --out datasets/synthetic --num-images 670 --seed 0
    python tools/make_synthetic_nuclei.py --out /tmp/tiny --num-images 8 --seed 1 \
        --sizes 64x64,96x128

--out is a new or empty folder, or one this tool wrote into before (its record,
.sharp-fpn-outputs.json, says so): a rerun replaces the split it wrote, a new --split is added
beside it. A folder of other files, or a split folder or labels CSV the tool did not write, is
refused unless --overwrite. Errors are one line naming the file (--debug: the traceback).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from sharp_fpn.cli import add_debug_argument, run
from sharp_fpn.data.synthetic import STYLES, parse_sizes, write_dataset


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=Path, help="dataset root folder")
    parser.add_argument("--num-images", required=True, type=int, help="number of images (>= 1)")
    parser.add_argument("--seed", required=True, type=int, help="non-negative integer seed")
    parser.add_argument(
        "--split", default="stage1_train", help="split folder name (default: %(default)s)"
    )
    parser.add_argument(
        "--sizes",
        default="default",
        help="comma-separated HEIGHTxWIDTH sizes drawn uniformly, e.g. 64x64,96x128; "
        "'default' draws from DSB2018's stage1_train sizes (default: %(default)s)",
    )
    parser.add_argument(
        "--style",
        choices=("mixed", *STYLES),
        default="mixed",
        help="image style; 'mixed' is 70%% fluorescence, 30%% H&E-like (default: %(default)s)",
    )
    parser.add_argument(
        "--workers", type=int, default=None,
        help="processes (default: every core this process may use)",
    )
    parser.add_argument(
        "--overwrite", action="store_true",
        help="write into a folder of other files, replacing a split folder or labels CSV that "
        "this tool did not write",
    )
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    add_debug_argument(parser)
    return parser.parse_args(argv)


def generate(argv: list[str] | None = None) -> int:
    """Run the generator (errors as exceptions); returns the exit status."""
    args = parse_args(argv)
    sizes = parse_sizes(args.sizes)
    start = time.perf_counter()
    ids = write_dataset(
        args.out,
        args.num_images,
        args.seed,
        split=args.split,
        sizes=sizes,
        style=None if args.style == "mixed" else args.style,
        workers=args.workers,
        overwrite=args.overwrite,
        progress=not args.no_progress,
        own_folder=True,
    )
    elapsed = time.perf_counter() - start
    print(
        f"wrote {len(ids)} images to {args.out / args.split} and "
        f"{args.out / (args.split + '_labels.csv')} in {elapsed:.1f} s"
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    """The exit status: 0, or 1 after a one-line error on stderr (see sharp_fpn.cli)."""
    return run(generate, argv)


if __name__ == "__main__":
    sys.exit(main())
