#!/usr/bin/env python
"""Train the recipe's ablation variants and score them on held-out synthetic v2 images.

    python tools/zoo_ablation.py [--iters 500] [--jobs 2] [--out output/zoo/ablation]

See sharp_fpn/experiments/zoo_ablation.py for the variants; results in OUT/ablation.{json,md}.
A run cut short goes on where it stopped when given the same command.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from sharp_fpn.utils import silence_warnings

silence_warnings()

from sharp_fpn.cli import add_debug_argument, run  # noqa: E402
from sharp_fpn.experiments.zoo_ablation import VARIANTS, run_ablation  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--iters", type=int, default=500, help="iterations per variant (%(default)s)")
    parser.add_argument("--jobs", type=int, default=2, help="variants trained at once (%(default)s)")
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=None)
    parser.add_argument("--images-per-style", type=int, default=None,
                        help="held-out images per style (default: all 40)")
    parser.add_argument("--out", type=Path, default=Path("output/zoo/ablation"))
    add_debug_argument(parser)
    args = parser.parse_args(argv)
    run_ablation(args.out, args.iters, args.variants, args.jobs, args.images_per_style)
    print(f"results: {args.out / 'ablation.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(run(main))
