"""The benchmarks, by name, and what every one of them writes.

A benchmark is two functions: ``add_arguments(parser)`` declares its options (with defaults
for a realistic measurement), ``run(args) -> figures`` measures and returns a JSON-ready dict.
:func:`run_benchmark` adds the record around the figures (name, date, machine, arguments,
wall time) and writes ``<out-dir>/<name>.json``. Adding a benchmark is one more entry in
:data:`BENCHMARKS`; ``suite`` holds the options :func:`run_suite` (``tools/benchmark.py`` with no
subcommand, ``make bench``) gives it, so that the whole suite finishes in a few minutes on a
2-core CPU. Each module imports its heavy dependencies (torch, sharp_fpn.d2) inside ``run``,
so this registry imports in milliseconds.
"""
from __future__ import annotations

import argparse
import json
import time
import traceback
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

from ...utils import write_text_atomic
from .. import zoo
from ..timing import machine
from . import convert, export, imports, large, necks, predict

DEFAULT_OUT_DIR = Path("output/benchmarks")


@dataclass(frozen=True)
class Benchmark:
    """One benchmark: its help line, its arguments, the function that measures, and the
    options it runs with in the suite (empty: its defaults)."""

    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], Dict[str, Any]]
    suite: Sequence[str] = ()


BENCHMARKS: Dict[str, Benchmark] = {
    "imports": Benchmark(
        "import time of torch and of sharp_fpn's layers in fresh interpreters; what each loads",
        imports.add_arguments, imports.run, suite=("--rounds", "2"),
    ),
    "convert": Benchmark(
        "DSB2018 -> COCO conversion (folders and CSV) per worker count on a synthetic set",
        convert.add_arguments, convert.run, suite=("--num-images", "20", "--rounds", "2"),
    ),
    "predict": Benchmark(
        "nuclei prediction throughput (MP/s), whole image and tiled, per config",
        predict.add_arguments, predict.run, suite=("--size", "512", "512", "--repeat", "2"),
    ),
    "necks": Benchmark(
        "Mask R-CNN with each neck: parameters, GFLOPs, latency, memory, ratios to FPN",
        necks.add_arguments, necks.run,
        suite=("--size", "256", "--backbones", "R101", "--necks", "fpn", "sharp", "--repeat", "3",
               "--detections", "20"),
    ),
    "export": Benchmark(
        "the exported UNet family: ONNX Runtime vs .pt2 vs eager PyTorch per pruning level",
        export.add_arguments, export.run, suite=("--sizes", "256", "--rounds", "3"),
    ),
    "zoo": Benchmark(
        "zoo models vs the classical watershed: held-out synthetic DSB score and mask AP per "
        "style, MP/s on a 1024 px image with ~500 nuclei (+ zoo.md)",
        zoo.add_arguments, zoo.run, suite=("--images-per-style", "4", "--rounds", "2"),
    ),
    "large": Benchmark(
        "images larger than memory: peak RSS and time of segment_large on 4k, 16k, 30k px "
        "tiled BigTIFFs, one process per size",
        large.add_arguments, large.run, suite=("--sizes", "1024", "2048"),
    ),
}


def benchmark_parser(name: str, parser: Optional[argparse.ArgumentParser] = None
                     ) -> argparse.ArgumentParser:
    """``parser`` (or a new one) with ``--out-dir`` and benchmark ``name``'s arguments."""
    parser = parser or argparse.ArgumentParser(prog=name, description=BENCHMARKS[name].help)
    parser.add_argument("--out-dir", type=Path, default=DEFAULT_OUT_DIR,
                        help="results folder (%(default)s)")
    BENCHMARKS[name].add_arguments(parser)
    return parser


def _jsonable(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def run_benchmark(name: str, args: argparse.Namespace) -> Path:
    """Run benchmark ``name`` with its parsed ``args``; write and return ``<out-dir>/<name>.json``.

    The record: ``benchmark``, ``finished`` (UTC), ``wall_s`` (the whole benchmark),
    ``machine`` (:func:`~sharp_fpn.perf.timing.machine`, taken at the end), ``arguments``,
    ``figures`` (what ``run`` returned).
    """
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    figures = BENCHMARKS[name].run(args)
    record = {
        "benchmark": name,
        "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "wall_s": round(time.perf_counter() - started, 1),
        "machine": machine(),
        "arguments": {k: _jsonable(v) for k, v in vars(args).items() if k != "benchmark"},
        "figures": figures,
    }
    path = out_dir / f"{name}.json"
    write_text_atomic(path, json.dumps(record, indent=2) + "\n")
    return path


def run_suite(out_dir: Path = DEFAULT_OUT_DIR, names: Optional[Sequence[str]] = None,
              echo: Callable[[str], None] = print) -> Dict[str, Optional[Path]]:
    """Every benchmark (or ``names``) with its suite options; one that fails is reported and
    the others still run. Returns name -> the JSON written (None for a failure)."""
    written: Dict[str, Optional[Path]] = {}
    for name in names or list(BENCHMARKS):
        argv: List[str] = ["--out-dir", str(out_dir), *BENCHMARKS[name].suite]
        echo(f"== {name} {' '.join(BENCHMARKS[name].suite)}")
        started = time.perf_counter()
        try:
            written[name] = run_benchmark(name, benchmark_parser(name).parse_args(argv))
        except Exception:  # noqa: BLE001 - a broken benchmark must not hide the others' figures
            echo(traceback.format_exc())
            written[name] = None
        echo(f"== {name}: {'written to ' + str(written[name]) if written[name] else 'FAILED'} "
             f"({time.perf_counter() - started:.0f} s)")
    return written
