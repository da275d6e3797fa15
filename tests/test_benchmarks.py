"""The timing policy (fake clocks, counting callables) and each benchmark at tiny sizes."""
from __future__ import annotations

import pytest

from sharp_fpn.perf.timing import Timing, machine, ratio, time_interleaved, time_one


class FakeClock:
    """A clock that each candidate advances by its own (scripted) duration."""

    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_rounds_are_interleaved_after_the_warmup():
    calls = []
    candidates = {name: (lambda name=name: calls.append(name)) for name in "ABC"}
    timings = time_interleaved(candidates, rounds=3, warmup=2)
    assert calls == list("ABC") * 2 + list("ABC") * 3
    assert list(timings) == ["A", "B", "C"]
    assert all(len(t.rounds) == 3 for t in timings.values())


def test_best_is_the_fastest_round_and_ratios_use_it():
    clock = FakeClock()
    durations = {"slow": iter([5.0, 3.0, 4.0]), "fast": iter([2.0, 1.0, 1.5])}

    def run(name):
        clock.now += next(durations[name])

    timings = time_interleaved({n: (lambda n=n: run(n)) for n in durations}, rounds=3, warmup=0,
                               clock=clock)
    assert timings["slow"] == Timing(best=3.0, rounds=(5.0, 3.0, 4.0))
    assert timings["fast"].best == 1.0
    assert ratio(timings, "slow", "fast") == 3.0
    assert timings["fast"].per_second(10) == 10.0


def test_number_divides_a_round_into_seconds_per_call():
    clock = FakeClock()

    def tick():
        clock.now += 0.5

    timing = time_one(tick, rounds=2, warmup=1, number=4, clock=clock)
    assert timing.rounds == (0.5, 0.5)
    assert timing.as_dict() == {"best_s": 0.5, "rounds_s": [0.5, 0.5]}


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="rounds=0"):
        time_interleaved({"a": lambda: None}, rounds=0)
    with pytest.raises(ValueError, match="no rounds"):
        Timing.of([])


def test_machine_reports_cores_and_load():
    info = machine()
    assert info["cpu_count"] >= 1 and info["usable_cores"] >= 1
    assert "python" in info
