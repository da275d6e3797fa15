"""Costs of a detectron2 model for the benchmarks: parameters, FLOPs, peak memory.

FLOPs are fvcore's count (:func:`sharp_fpn.perf.measure.count_flops`) of the model wrapped by
detectron2's ``TracingAdapter`` (a function of flat tensors), which is what detectron2's own
``FlopCountAnalysis`` does; the adapter comes from :func:`.compat.load_tracing_adapter`, since
``detectron2.utils.analysis`` imports ``detectron2.export``, which v0.6 cannot import without
caffe2.
"""
from __future__ import annotations

from typing import Dict, Sequence

import torch

from ..perf.measure import count_flops, peak_rss_mib
from .calibration import calibrated_random_model
from .compat import load_tracing_adapter
from .engine import get_config

__all__ = ["flop_counts", "inference_peak_rss_mib", "neck_model", "parameter_counts"]


def flop_counts(model: torch.nn.Module, image: torch.Tensor,
                modules: Sequence[str] = ()) -> Dict[str, float]:
    """fvcore's FLOPs of ``model([{"image": image}])``: ``"total"``, and each of ``modules``
    (names as ``model.named_modules()`` gives them, e.g. ``"backbone.bottom_up"``)."""
    adapter = load_tracing_adapter()(model, [{"image": image}])
    with torch.no_grad():
        counts = count_flops(adapter, adapter.flattened_inputs,
                             by_module=[f"model.{name}" for name in modules])
    return {"total": counts["total"], **{name: counts[f"model.{name}"] for name in modules}}


def parameter_counts(model: torch.nn.Module) -> Dict[str, int]:
    """``total`` parameters and ``neck``: the backbone's own, its bottom-up's excluded."""
    neck = sum(p.numel() for n, p in model.backbone.named_parameters()
               if not n.startswith("bottom_up."))
    return {"total": sum(p.numel() for p in model.parameters()), "neck": neck}


def _image(size: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (3, size, size), dtype=torch.uint8,
                         generator=torch.Generator().manual_seed(seed))


def neck_model(config_file: str, opts: Sequence, size: int) -> tuple:
    """(calibrated random model of ``config_file`` + ``opts`` on the CPU, its ``(3, size, size)``
    uint8 input image). The same image for every call with the same ``size``."""
    cfg = get_config(config_file, ["MODEL.DEVICE", "cpu", *opts])
    image = _image(size)
    return calibrated_random_model(cfg, image), image


def inference_peak_rss_mib(config_file: str, opts: Sequence, size: int, threads: int) -> float:
    """Peak resident memory (MiB) of this process after building the model and running it
    twice; meant for a fresh process (``multiprocessing`` spawn), one model each."""
    torch.set_num_threads(threads)
    model, image = neck_model(config_file, opts, size)
    with torch.no_grad():
        model([{"image": image}])
    return peak_rss_mib()
