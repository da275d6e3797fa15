"""Randomly initialised detectron2 models that produce finite outputs (benchmarks, tests).

A ResNet with ``FrozenBatchNorm2d`` (identity statistics) and random weights lets activations
grow block after block until boxes and scores are not finite. One calibrating pass, in which
every ``FrozenBatchNorm2d`` takes the mean and variance of its own input (and unit weight, zero
bias), keeps every block's output at unit scale: the model then costs what a trained one costs
for the same number of detections.
"""
from __future__ import annotations

from typing import Dict, List

import torch
from detectron2.config import CfgNode
from detectron2.layers import FrozenBatchNorm2d
from detectron2.modeling import build_model

__all__ = ["calibrate_frozen_norms", "calibrated_random_model"]


@torch.no_grad()
def calibrate_frozen_norms(model: torch.nn.Module, batched_inputs: List[Dict]) -> int:
    """Set every ``FrozenBatchNorm2d`` of ``model`` to the statistics of its input on
    ``batched_inputs`` (detectron2's list of ``{"image": (C, H, W)}``); returns how many."""
    def calibrate(module, inputs):
        x = inputs[0]
        module.running_mean.copy_(x.mean(dim=(0, 2, 3)))
        module.running_var.copy_(x.var(dim=(0, 2, 3)))
        module.weight.fill_(1.0)
        module.bias.zero_()

    hooks = [m.register_forward_pre_hook(calibrate) for m in model.modules()
             if isinstance(m, FrozenBatchNorm2d)]
    try:
        if hooks:
            model(batched_inputs)
    finally:
        for hook in hooks:
            hook.remove()
    return len(hooks)


def calibrated_random_model(cfg: CfgNode, image: torch.Tensor, seed: int = 0) -> torch.nn.Module:
    """``build_model(cfg)`` with weights drawn from ``seed``, in eval mode, its frozen norms
    calibrated on ``image`` (``(C, H, W)``, the model's input format)."""
    torch.manual_seed(seed)
    model = build_model(cfg).eval()
    calibrate_frozen_norms(model, [{"image": image}])
    return model
