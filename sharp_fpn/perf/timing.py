"""One timing policy for every figure the project reports (benchmarks, reproducer, tests).

The policy: the candidates are timed in interleaved rounds (A B C, A B C, ...) after a warm-up,
and each candidate's figure is its *fastest* round: on a shared machine the slower rounds
measure the machine's other load, not the code (``timeit`` gives the same advice). Ratios
between candidates are only computed from figures taken side by side in the same call, so a
change of load during the run hits every candidate alike.

No torch, no detectron2: the callables do whatever they time (a forward pass, a conversion, a
subprocess) and this module only calls them and reads the clock.
"""
from __future__ import annotations

import gc
import math
import os
import platform
import sys
import time
from dataclasses import dataclass
from typing import Callable, Dict, Mapping, Optional, Tuple

from ..utils import available_cpus

Clock = Callable[[], float]


@dataclass(frozen=True)
class Timing:
    """The rounds of one candidate, in seconds per call, and the policy's figure.

    ``best`` is the fastest round (``min(rounds)``): the figure to report and to compare.
    """

    best: float
    rounds: Tuple[float, ...]

    @classmethod
    def of(cls, rounds) -> "Timing":
        """The :class:`Timing` of measured ``rounds`` (seconds): ``best`` is their minimum."""
        rounds = tuple(float(r) for r in rounds)
        if not rounds:
            raise ValueError("Timing.of: no rounds were measured")
        return cls(best=min(rounds), rounds=rounds)

    def per_second(self, units: float = 1.0) -> float:
        """``units`` (images, megapixels, ...) processed by one call, per second of ``best``."""
        return units / self.best if self.best > 0 else float("inf")

    def as_dict(self, digits: int = 6) -> Dict[str, object]:
        """JSON-ready: ``{"best_s": ..., "rounds_s": [...]}`` rounded to ``digits``."""
        return {"best_s": round(self.best, digits),
                "rounds_s": [round(r, digits) for r in self.rounds]}


def time_interleaved(
    candidates: Mapping[str, Callable[[], object]],
    rounds: int = 5,
    warmup: int = 1,
    number: int = 1,
    clock: Optional[Clock] = None,
) -> Dict[str, Timing]:
    """Time each candidate in ``rounds`` interleaved rounds after ``warmup`` untimed calls each.

    Args:
        candidates: name -> a callable without arguments; called in the mapping's order,
            round after round (A B C, A B C, ...). The warm-up calls are interleaved too.
        rounds: timed rounds per candidate (>= 1).
        warmup: untimed calls per candidate before the first round (>= 0).
        number: calls per round; a round's time is divided by ``number`` (seconds per call),
            for callables too quick for one call to be timed well.
        clock: seconds as a float; ``time.perf_counter`` unless given (tests pass a fake one).

    Returns:
        name -> :class:`Timing`, in the order of ``candidates``. The garbage collector is
        paused during each timed round (as ``timeit`` does) and restored after.
    """
    if rounds < 1 or warmup < 0 or number < 1:
        raise ValueError(f"time_interleaved: rounds={rounds} (>= 1), warmup={warmup} (>= 0), "
                         f"number={number} (>= 1) expected")
    clock = clock or time.perf_counter
    names = list(candidates)
    for _ in range(warmup):
        for name in names:
            candidates[name]()
    measured: Dict[str, list] = {name: [] for name in names}
    gc_was_enabled = gc.isenabled()
    try:
        for _ in range(rounds):
            for name in names:
                fn = candidates[name]
                gc.disable()
                start = clock()
                for _ in range(number):
                    fn()
                elapsed = clock() - start
                if gc_was_enabled:
                    gc.enable()
                measured[name].append(elapsed / number)
    finally:
        if gc_was_enabled:
            gc.enable()
    return {name: Timing.of(measured[name]) for name in names}


def time_one(fn: Callable[[], object], rounds: int = 5, warmup: int = 1, number: int = 1,
             clock: Optional[Clock] = None) -> Timing:
    """:func:`time_interleaved` with one candidate."""
    timings = time_interleaved({"fn": fn}, rounds=rounds, warmup=warmup, number=number,
                               clock=clock)
    return timings["fn"]


def calls_per_round(fn: Callable[[], object], round_seconds: float,
                    clock: Optional[Clock] = None, limit: int = 1_000_000) -> int:
    """How many calls of ``fn`` make a round of at least ``round_seconds`` (for ``number=``).

    Calls ``fn`` once, untimed by the policy (it doubles as a warm-up), and scales from that
    call's duration; 1 when one call already lasts ``round_seconds``.
    """
    clock = clock or time.perf_counter
    start = clock()
    fn()
    once = clock() - start
    if once <= 0:
        return limit
    return max(1, min(limit, math.ceil(round_seconds / once)))


def ratio(timings: Mapping[str, Timing], name: str, reference: str) -> float:
    """``timings[name].best / timings[reference].best``: both taken in the same interleaved run."""
    return timings[name].best / timings[reference].best


def machine() -> Dict[str, object]:
    """What the figures were measured on: cores, load, Python, torch threads (if imported).

    Written into every result file, so a reader can tell a slow machine from slow code. Does not
    import torch: its thread count is reported only when the caller has imported it.
    """
    try:
        load = [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        load = None
    info: Dict[str, object] = {
        "cpu_count": os.cpu_count(),
        "usable_cores": available_cpus(),
        "load_average_1_5_15": load,
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "python": platform.python_version(),
    }
    torch = sys.modules.get("torch")
    if torch is not None:
        info["torch"] = torch.__version__
        info["torch_threads"] = torch.get_num_threads()
        info["cuda"] = bool(torch.cuda.is_available())
    return info
