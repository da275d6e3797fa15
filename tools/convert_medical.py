#!/usr/bin/env python
"""Convert a medical data set (BraTS19, LiTS17, LIDC-IDRI, LUNA16) from its download layout.

    python tools/convert_medical.py brats19 ROOT --out datasets/brats19
    python tools/convert_medical.py lits17 ROOT --out datasets/lits17 --option window=[40,400]
    python tools/convert_medical.py lidc_idri ROOT --out datasets/lidc
    python tools/convert_medical.py luna16 ROOT --out datasets/luna16 --seed 1 --val-fraction 0.1
    python tools/convert_medical.py brats19 /tmp/brats --standins --out /tmp/brats_2d

Each data set's module (sharp_fpn.data.medical.<name>) does the work: the layout it reads, the
slices or patches it writes and the options it takes (--option KEY=VALUE, the value read as
JSON when it parses: keep=tumour, spacing=[1,1,1], other_fraction=0.1) are in its docstring.
The split is by case, seeded, and recorded in OUT/split.json. --standins first writes small
synthetic stand-ins in the real format into ROOT, to try the command without the data.

Bad input prints what is wrong (the file and the problem) in one line and exits with status 1
(--debug shows the traceback); OUT is written to a temporary folder and renamed when whole, so
a failed run leaves no OUT (or the earlier one as it was). An existing OUT is replaced only if
this converter wrote it; OUT and ROOT must not contain one another.
"""
from __future__ import annotations

import argparse
import inspect
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

from sharp_fpn.cli import UserError, add_debug_argument, run

#: The command's data set names and their modules in sharp_fpn.data.medical.
DATASETS = {"brats19": "brats19", "lits17": "lits17", "lidc_idri": "lidc", "luna16": "luna16"}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n".join(__doc__.split("\n")[1:]),
    )
    parser.add_argument("dataset", choices=sorted(DATASETS), help="which data set ROOT holds")
    parser.add_argument("root", metavar="ROOT", help="the download, in its own layout")
    parser.add_argument("--out", required=True, metavar="DIR", help="the folder to write")
    parser.add_argument("--seed", type=int, default=0, help="seed of the split (%(default)s)")
    parser.add_argument("--val-fraction", type=float, default=0.2,
                        help="share of the cases for validation (%(default)s)")
    parser.add_argument("--option", "-o", action="append", default=[], metavar="KEY=VALUE",
                        help="an option of the data set's convert() (repeatable)")
    parser.add_argument("--standins", action="store_true",
                        help="first write synthetic stand-ins in the real format into ROOT")
    add_debug_argument(parser)
    return parser


def parse_options(items: List[str], convert: Any, dataset: str) -> Dict[str, Any]:
    """``KEY=VALUE`` strings as keyword arguments of ``convert`` (values JSON when they parse,
    else strings). Raises UserError for a malformed item or a key ``convert`` does not take."""
    parameters = inspect.signature(convert).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
    known = [name for name, p in parameters.items()
             if p.kind is inspect.Parameter.KEYWORD_ONLY and name not in ("seed", "val_fraction")]
    options: Dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key:
            raise UserError(f"--option {item!r}: expected KEY=VALUE")
        if key in ("seed", "val_fraction"):
            raise UserError(f"--option {key}: use --{key.replace('_', '-')}")
        if key not in known and not takes_any:
            raise UserError(f"--option {key}: {dataset} takes no such option; its options are "
                            f"{', '.join(known) or 'none'}")
        try:
            options[key] = json.loads(value)
        except ValueError:
            options[key] = value
    return options


def _contains(outer: Path, inner: Path) -> bool:
    outer, inner = Path(os.path.realpath(outer)), Path(os.path.realpath(inner))
    return inner == outer or outer in inner.parents


def convert(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    from sharp_fpn.data.medical import dataset_module

    try:
        module = dataset_module(DATASETS[args.dataset])
    except ModuleNotFoundError as err:
        raise UserError(f"{args.dataset}: its converter is not available ({err})") from None
    options = parse_options(args.option, module.convert, args.dataset)
    root, out = Path(args.root), Path(args.out)
    if _contains(root, out) or _contains(out, root):
        raise UserError(f"{out}: the output folder and ROOT {root} must not contain one "
                        "another (ROOT holds the inputs)")
    if not 0.0 <= args.val_fraction < 1.0:
        raise UserError(f"--val-fraction must be in [0, 1), got {args.val_fraction}")
    if args.standins:
        root = module.write_standins(root, seed=args.seed)
        print(f"wrote {args.dataset} stand-ins in {root}")
    elif not root.is_dir():
        raise UserError(f"{root}: no such folder (the {args.dataset} download goes there; "
                        "--standins writes synthetic stand-ins to try the command)")
    start = time.perf_counter()
    try:
        written = module.convert(root, out, seed=args.seed, val_fraction=args.val_fraction,
                                 **options)
    except TypeError as err:  # an option of the wrong kind
        raise UserError(f"{args.dataset}: {err}") from None
    meta = json.loads((Path(written) / "dataset.json").read_text(encoding="utf-8"))
    counts = meta.get("counts") or {s: len(meta.get(s, [])) for s in ("train", "val")}
    split = json.loads((Path(written) / "split.json").read_text(encoding="utf-8"))
    print(f"wrote {written}: {counts.get('train', 0)} train and {counts.get('val', 0)} val "
          f"{'slices' if meta.get('kind') == '2d' else 'samples'} from "
          f"{len(split['train'])} + {len(split['val'])} cases "
          f"({time.perf_counter() - start:.1f} s)")
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    """The exit status: 0, or 1 after a one-line error on stderr (see sharp_fpn.cli)."""
    from sharp_fpn.utils import silence_warnings

    silence_warnings()
    return run(convert, argv)


if __name__ == "__main__":
    sys.exit(main())
