"""export: the exported UNet family in ONNX Runtime vs PyTorch on the CPU, per pruning level.

Measures ``sharp_fpn.export.speed.benchmark_export``: every pruning level exported to
``torch.export`` (.pt2) and ONNX, each checked against PyTorch, then eager PyTorch, the .pt2
program and ONNX Runtime timed side by side by the one policy. Needs the ``onnx`` extra.
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Any, Dict


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--arch", default="unet_sharp", help="a create_model arch (%(default)s)")
    parser.add_argument("--width", type=float, default=0.25,
                        help="multiplier of the arch's channels (%(default)s)")
    parser.add_argument("--levels", type=int, nargs="+", default=None,
                        help="pruning levels (default: every level of the arch)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 512],
                        help="square image sides (%(default)s)")
    parser.add_argument("--batch", type=int, default=1, help="images per call (%(default)s)")
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds (%(default)s)")
    parser.add_argument("--threads", type=int, default=None,
                        help="ONNX Runtime threads (default: torch's)")


def run(args: argparse.Namespace) -> Dict[str, Any]:
    from ...export import onnx_status
    from ...export.speed import benchmark_export

    ok, why = onnx_status()
    if not ok:
        raise RuntimeError(f"export benchmark: {why} (pip install -e '.[onnx]')")
    with tempfile.TemporaryDirectory(prefix="sharp-fpn-export-bench-") as folder:
        return benchmark_export(
            Path(folder), arch=args.arch, width=args.width, levels=args.levels,
            sizes=args.sizes, batch=args.batch, rounds=args.rounds, threads=args.threads,
        )
