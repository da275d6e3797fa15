#!/usr/bin/env python
"""Write a synthetic nuclei data set in DSB2018's layout (see sharp_fpn/data/synthetic.py).

Example::

    python tools/make_synthetic_nuclei.py --out datasets/synthetic --num-images 670 --seed 0
    python tools/make_synthetic_nuclei.py --out /tmp/tiny --num-images 8 --seed 1 \
        --sizes 64x64,96x128
    python tools/make_synthetic_nuclei.py --version 2 --out datasets/synth2 --num-images 500 \
        --seed 2026 --style fluorescence,he
    python tools/make_synthetic_nuclei.py --version 2 --contact-sheet sheet.png --seed 0

--version 2 draws the DSB2018-like images of sharp_fpn/data/synthetic_v2.py (styles
fluorescence, he, brightfield; --style may name several, comma-separated, for a uniform mix of
them). --contact-sheet OUT.png writes a PNG of a seeded sample instead, one row per style, each
image beside a copy with its nuclei outlined (--no-outlines: without), for a person to compare
with real images; --out and --num-images are then not needed.

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
from sharp_fpn.data.synthetic import STYLES, VERSIONS, parse_sizes, write_dataset
from sharp_fpn.data.synthetic_v2 import STYLES_V2, contact_sheet


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="dataset root folder (required unless "
                        "--contact-sheet)")
    parser.add_argument("--num-images", type=int,
                        help="number of images (>= 1; required unless --contact-sheet)")
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
        "--version", type=int, choices=VERSIONS, default=1,
        help="generator version: 1 the original set, 2 DSB2018-like (default: %(default)s)",
    )
    parser.add_argument(
        "--style",
        default="mixed",
        help=f"image style; version 1: one of {', '.join(STYLES)}, 'mixed' is 70%% "
        f"fluorescence, 30%% H&E-like; version 2: one of {', '.join(STYLES_V2)} or several "
        "comma-separated (a uniform mix), 'mixed' is 55%% fluorescence, 30%% he, 15%% "
        "brightfield (default: %(default)s)",
    )
    parser.add_argument(
        "--contact-sheet", type=Path, metavar="OUT.png",
        help="write a contact sheet of a seeded sample (one row per style) to OUT.png and "
        "nothing else",
    )
    parser.add_argument("--per-row", type=int, default=6,
                        help="contact sheet: images per row (default: %(default)s)")
    parser.add_argument("--cell", type=int, default=192,
                        help="contact sheet: cell size in px (default: %(default)s)")
    parser.add_argument("--no-outlines", action="store_true",
                        help="contact sheet: no outlined copy of each image")
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
    args = parser.parse_args(argv)
    if args.contact_sheet is None:
        missing = [flag for flag, value in (("--out", args.out), ("--num-images", args.num_images))
                   if value is None]
        if missing:
            parser.error(f"the following arguments are required: {', '.join(missing)}")
    return args


def parse_style(text: str, version: int):
    """``--style`` as write_dataset's ``style``: None for 'mixed', a name, or (v2) a tuple."""
    if text.strip().lower() == "mixed":
        return None
    names = [n.strip() for n in text.split(",") if n.strip()]
    allowed = STYLES if version == 1 else STYLES_V2
    for name in names:
        if name not in allowed:
            raise ValueError(f"--style {name!r} is not one of {', '.join(allowed)} "
                             f"(version {version}) or 'mixed'")
    if not names:
        raise ValueError("--style is empty: give a style name or 'mixed'")
    if len(names) > 1 and version == 1:
        raise ValueError("--style: several styles need --version 2")
    return names[0] if len(names) == 1 else tuple(names)


def generate(argv: list[str] | None = None) -> int:
    """Run the generator (errors as exceptions); returns the exit status."""
    args = parse_args(argv)
    sizes = parse_sizes(args.sizes)
    style = parse_style(args.style, args.version)
    if args.contact_sheet is not None:
        path = contact_sheet(args.contact_sheet, seed=args.seed, per_row=args.per_row,
                             cell=args.cell, outlines=not args.no_outlines,
                             version=args.version, sizes=sizes, styles=style)
        print(f"wrote the contact sheet {path}")
        return 0
    start = time.perf_counter()
    ids = write_dataset(
        args.out,
        args.num_images,
        args.seed,
        split=args.split,
        sizes=sizes,
        style=style,
        workers=args.workers,
        overwrite=args.overwrite,
        progress=not args.no_progress,
        own_folder=True,
        version=args.version,
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
