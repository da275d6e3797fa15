"""The project's benchmarks as library code; ``tools/benchmark.py`` is a command line over
:data:`BENCHMARKS` (see :mod:`.registry`). Each one times with the one policy of
:mod:`sharp_fpn.perf.timing` and writes ``output/benchmarks/<name>.json``:

* :mod:`.imports`: import time of torch and sharp_fpn's layers, and what each loads;
* :mod:`.convert`: DSB2018 -> COCO conversion, folders and CSV, per worker count;
* :mod:`.predict`: nuclei prediction throughput, whole image and tiled;
* :mod:`.necks`: Mask R-CNN with each grid neck beside the plain FPN (+ ``necks.md``).
"""
from .registry import (
    BENCHMARKS,
    DEFAULT_OUT_DIR,
    Benchmark,
    benchmark_parser,
    run_benchmark,
    run_suite,
)

__all__ = ["BENCHMARKS", "DEFAULT_OUT_DIR", "Benchmark", "benchmark_parser", "run_benchmark",
           "run_suite"]
