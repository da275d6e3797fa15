"""What a run costs besides time: CPU seconds, peak memory, FLOPs; and throughput of a network.

Framework-free: torch and fvcore are imported when a function needs them, detectron2 never
(its models are wrapped into plain modules in :mod:`sharp_fpn.d2.flops` first).
"""
from __future__ import annotations

import resource
from typing import Sequence, Tuple

from .timing import Timing, calls_per_round, time_one


def cpu_seconds() -> float:
    """CPU time (user + system) of this process and of its waited-for child processes."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def peak_rss_mib() -> float:
    """This process's peak resident memory (MiB), from ``/proc/self/status`` (VmHWM).

    VmHWM rather than ``ru_maxrss``: Linux carries ``ru_maxrss`` over ``exec``, so a freshly
    spawned child would report its parent's peak. Falls back to ``ru_maxrss`` off Linux.
    """
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def count_flops(module, inputs: Tuple, by_module: Sequence[str] = ()) -> dict:
    """fvcore's count (multiply-adds, as fvcore counts them) of ``module(*inputs)``.

    Args:
        module: a plain ``nn.Module`` whose forward takes ``inputs`` and returns tensors.
        inputs: the forward's positional arguments.
        by_module: names of sub-modules (as ``named_modules`` spells them) whose own counts
            are wanted too.

    Returns:
        ``{"total": flops, "<name>": flops, ...}`` (plain counts, not giga).
    """
    from fvcore.nn import FlopCountAnalysis

    analysis = FlopCountAnalysis(module, inputs)
    analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
    counts = {"total": analysis.total()}
    if by_module:
        per_module = analysis.by_module()
        counts.update({name: per_module[name] for name in by_module})
    return counts


def images_per_second(
    network, size: Sequence[int], device: str = "cpu", batch: int = 8, seconds: float = 1.0,
    rounds: int = 5, channels: int = 3, clock=None,
) -> Tuple[float, Timing]:
    """Inference throughput of ``network`` on random ``(batch, channels, *size)`` inputs.

    The project's timing policy (:mod:`.timing`): a warm-up, then ``rounds`` rounds lasting
    about ``seconds / rounds`` each (enough calls per round); the fastest round counts.

    Returns:
        (images per second, the :class:`Timing` of one batch).
    """
    import torch

    network = network.eval()
    x = torch.randn(batch, channels, *size, device=device)
    sync = torch.cuda.synchronize if str(device).startswith("cuda") else (lambda: None)

    def forward() -> None:
        network(x)
        sync()

    with torch.inference_mode():
        forward()  # warm-up
        number = calls_per_round(forward, seconds / rounds, clock=clock)
        timing = time_one(forward, rounds=rounds, warmup=0, number=number, clock=clock)
    return timing.per_second(batch), timing


__all__ = ["count_flops", "cpu_seconds", "images_per_second", "peak_rss_mib"]


