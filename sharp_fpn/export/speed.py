"""ONNX Runtime beside PyTorch on the CPU: the exported UNet, per pruning level and image size.

:func:`benchmark_export` builds a UNet-family network at a small width (random weights: the
speed does not depend on them), exports every pruning level with
:func:`~sharp_fpn.export.unet.export_unet_levels` (``.pt2`` and ``.onnx``, each checked), then
times per level and image size, side by side with the project's one timing policy
(:func:`sharp_fpn.perf.timing.time_interleaved`: interleaved rounds after a warm-up, each
candidate's fastest round):

* ``"pytorch"``: :class:`~sharp_fpn.export.unet.ProbabilityModel` in eager PyTorch;
* ``"torch.export"``: the ``.pt2`` program loaded back;
* ``"onnxruntime"``: the ``.onnx`` file in ONNX Runtime (CPU), with as many threads as torch.

Ratios come from the same run, so a change of the machine's load hits every candidate alike.
Framework-free (torch, onnx); the benchmark registry (``sharp_fpn.perf.benchmarks``) is where
it becomes a command.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Optional, Sequence

import torch

from ..models.unet import ARCHS, GridUNet
from ..perf.timing import time_interleaved
from .check import max_abs_diff, onnx_status
from .unet import (
    MIN_BLOCKS,
    ProbabilityModel,
    export_unet_levels,
    load_program,
    onnx_session,
    run_onnx,
    side_multiple,
)

__all__ = ["CANDIDATES", "benchmark_export"]

CANDIDATES = ("pytorch", "torch.export", "onnxruntime")
IMAGENET_MEAN = (123.675, 116.28, 103.53)
IMAGENET_STD = (58.395, 57.12, 57.375)
"""torchvision's ImageNet statistics in 0..255 pixels (the semantic configs'): the exports
normalise their input as a deployed model does, so activations are of a realistic size."""


def benchmark_export(
    out_dir: Path,
    *,
    arch: str = "unet_sharp",
    width: float = 0.25,
    levels: Optional[Sequence[int]] = None,
    sizes: Sequence[int] = (256, 512),
    batch: int = 1,
    rounds: int = 5,
    warmup: int = 1,
    threads: Optional[int] = None,
    tolerance: float = 1e-4,
    pixel_mean: Sequence[float] = IMAGENET_MEAN,
    pixel_std: Sequence[float] = IMAGENET_STD,
) -> Dict[str, Any]:
    """Time the exported UNet in ONNX Runtime, as a ``.pt2`` program and in eager PyTorch.

    Args:
        out_dir: where the exported files go (``<arch>_L<k>.pt2``, ``.onnx``).
        arch: a key of ``sharp_fpn.models.ARCHS``.
        width: multiplier of the arch's channels (0.25: ``(8, 16, 32, 64, 128)``).
        levels: pruning levels (default: every level of the arch; the non-nested ``unet``,
            ``wunet`` and ``unet3plus`` have only the full depth).
        sizes: square image sides, multiples of ``2**max(levels)``, at least twice that.
        batch: images per call.
        rounds, warmup: the timing policy's rounds and untimed warm-up calls per candidate.
        threads: CPU threads of ONNX Runtime; default torch's ``get_num_threads()`` (torch
            itself is left as it is).
        tolerance: largest accepted difference of the export checks (``ExportCheck``).
        pixel_mean, pixel_std: the normalisation inside the exports (0..255 pixels in).

    Returns:
        JSON-ready: ``arch``, ``width``, ``channels``, ``threads``, ``batch``, ``rounds``,
        ``warmup``, ``versions``, ``exports`` (the checks, as dicts) and ``rows``: per level and
        size, ``level``, ``size`` ``[h, w]``, ``parameters``, ``seconds`` (candidate -> the
        fastest round, seconds per call), ``timings`` (candidate -> ``Timing.as_dict()``),
        ``images_per_second``, ``onnxruntime_speedup`` (PyTorch's seconds over ONNX
        Runtime's: above 1, ONNX Runtime is faster) and ``max_abs_diff`` (the ``.pt2`` and
        ONNX outputs against PyTorch's on the timed input).

    Raises:
        RuntimeError: ONNX cannot run here (the reason of ``onnx_status``), or an export
            check failed (its line).
    """
    onnx_ok, reason = onnx_status()
    if not onnx_ok:
        raise RuntimeError(f"benchmark_export needs ONNX Runtime: {reason}")
    import onnxruntime

    spec = ARCHS[arch]
    channels = tuple(max(2, round(c * width)) for c in spec.channels)
    nested = spec.scheme in ("2plus", "sharp")
    network = GridUNet(spec.scheme, channels=channels,
                       deep_supervision="top" if nested else False).eval()
    depth = len(channels) - 1
    levels = list(levels or (range(1, depth + 1) if nested else [depth]))
    step = side_multiple(max(levels))
    for side in sizes:
        if side % step or side < MIN_BLOCKS * step:
            raise ValueError(f"size {side}: sides must be multiples of {step}, at least "
                             f"{MIN_BLOCKS * step} (pruning level {max(levels)})")
    threads = threads or torch.get_num_threads()
    generator = torch.Generator().manual_seed(0)
    check_inputs = [torch.rand(1, 3, 2 * step, 3 * step, generator=generator) * 255,
                    torch.rand(2, 3, 3 * step, 2 * step, generator=generator) * 255]
    checks = export_unet_levels(network, levels, Path(out_dir), check_inputs, name=arch,
                                pixel_mean=pixel_mean, pixel_std=pixel_std,
                                tolerance=tolerance, onnx_tolerance=tolerance)
    failed = [c.line() for c in checks if c.skipped or not c.ok]
    if failed:
        raise RuntimeError("export check failed: " + "; ".join(failed))
    paths = {(c.name, c.format): c.path for c in checks}
    rows = []
    for level in levels:
        label = f"{arch}_L{level}"
        model = ProbabilityModel(network.prune(level), pixel_mean, pixel_std).eval()
        program = load_program(paths[label, "torch.export"])
        session = onnx_session(paths[label, "onnx"], threads)
        parameters = next(c.parameters for c in checks if c.name == label)
        for side in sizes:
            x = torch.rand(batch, 3, side, side, generator=generator) * 255
            pixels = {session.get_inputs()[0].name: x.numpy()}
            with torch.no_grad():
                expected = model(x)
                outputs = {"torch.export": program(x), "onnxruntime": run_onnx(session, x)}
                timings = time_interleaved(
                    {"pytorch": lambda: model(x), "torch.export": lambda: program(x),
                     "onnxruntime": lambda: session.run(None, pixels)},
                    rounds=rounds, warmup=warmup,
                )
            seconds = {name: timings[name].best for name in CANDIDATES}
            rows.append({
                "level": level,
                "size": [side, side],
                "parameters": parameters,
                "seconds": {name: round(s, 6) for name, s in seconds.items()},
                "timings": {name: timings[name].as_dict() for name in CANDIDATES},
                "images_per_second": {name: round(timings[name].per_second(batch), 3)
                                      for name in CANDIDATES},
                "onnxruntime_speedup": round(seconds["pytorch"] / seconds["onnxruntime"], 3),
                "max_abs_diff": {name: max_abs_diff([out], [expected])
                                 for name, out in outputs.items()},
            })
    return {
        "arch": arch,
        "width": width,
        "channels": list(channels),
        "threads": threads,
        "batch": batch,
        "rounds": rounds,
        "warmup": warmup,
        "versions": {"torch": torch.__version__, "onnxruntime": onnxruntime.__version__},
        "exports": [c.as_dict() for c in checks],
        "rows": rows,
    }
