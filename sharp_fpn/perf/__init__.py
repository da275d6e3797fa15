"""Measuring: one timing policy (:mod:`.timing`), FLOPs and memory (:mod:`.measure`), and the
project's benchmarks (:mod:`.benchmarks`). Framework-free: detectron2-needing parts live in
:mod:`sharp_fpn.d2`.
"""
from .timing import Timing, machine, ratio, time_interleaved, time_one

__all__ = ["Timing", "machine", "ratio", "time_interleaved", "time_one"]
