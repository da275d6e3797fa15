"""torchvision ImageNet weights -> checkpoints for detectron2's ResNet and our VGG bottom-ups.

``tools/convert_torchvision_weights.py`` is the command line over this module. The renaming
is by rule, one table per family, and strict: a key that no rule knows is an error, so a
wrong file fails loudly instead of loading half its weights.

- VGG (``vgg16``, ``vgg16_bn``, any depth): ``features.*`` keeps its name (our ``VGG`` has
  torchvision's layout); the ``classifier`` is dropped.
- ResNet (``resnet101``, any depth): ``conv1``/``bn1`` -> ``stem.conv1``/``stem.conv1.norm``;
  ``layer{k}.{b}.conv{n}``/``bn{n}`` -> ``res{k+1}.{b}.conv{n}``/``conv{n}.norm``;
  ``downsample.0``/``.1`` -> ``shortcut``/``shortcut.norm``; ``fc`` is dropped. BatchNorm's
  ``weight, bias, running_mean, running_var`` load into detectron2's FrozenBN or BN alike.

Every name gets ``prefix`` (``backbone.bottom_up.``, where both detectron2's FPN and our
``GridFPN`` keep their bottom-up). BatchNorm's ``num_batches_tracked`` training counters are
dropped: a BatchNorm that goes on training (``MODEL.VGG.NORM "BN"`` past ``FREEZE_AT``) starts
its count afresh, which detectron2 logs as a buffer not found in the checkpoint.

torchvision's networks take RGB images normalised by its ImageNet mean and std, and its
ResNets stride in the 3x3 conv of a bottleneck: models loading these weights need the
settings of ``INPUT_SETTINGS`` (the configs of this project use them), which the checkpoint
also records under ``"note"``.
"""
from __future__ import annotations

import os
import re
import tempfile
from typing import Callable, Dict, List, Mapping, Sequence, Tuple

import torch
from torch import Tensor

DEFAULT_PREFIX = "backbone.bottom_up."
INPUT_SETTINGS: Dict[str, object] = {
    "INPUT.FORMAT": "RGB",
    "MODEL.PIXEL_MEAN": [123.675, 116.28, 103.53],  # 255 * (0.485, 0.456, 0.406)
    "MODEL.PIXEL_STD": [58.395, 57.12, 57.375],  # 255 * (0.229, 0.224, 0.225)
    "MODEL.RESNETS.STRIDE_IN_1X1": False,  # ResNets only: the stride is in the 3x3 conv
}
NOTE = (
    "Converted from torchvision weights by sharp-fpn (tools/convert_torchvision_weights.py). "
    "Inputs are RGB, normalised with torchvision's ImageNet mean and std; set "
    + ", ".join(f"{key} {value}" for key, value in INPUT_SETTINGS.items())
    + "."
)

Rule = Tuple[re.Pattern, Callable[[re.Match], str]]
"""A source-key pattern (matched whole) and the new name made from its match."""
_BN = r"(weight|bias|running_mean|running_var)"


def _block(m: re.Match) -> str:
    """``layer{k}.{b}`` -> ``res{k+1}.{b}``."""
    return f"res{int(m[1]) + 1}.{m[2]}"


RESNET_RULES: Tuple[Rule, ...] = (
    (re.compile(r"conv1\.weight"), lambda m: "stem.conv1.weight"),
    (re.compile(rf"bn1\.{_BN}"), lambda m: f"stem.conv1.norm.{m[1]}"),
    (
        re.compile(r"layer(\d)\.(\d+)\.conv(\d)\.weight"),
        lambda m: f"{_block(m)}.conv{m[3]}.weight",
    ),
    (
        re.compile(rf"layer(\d)\.(\d+)\.bn(\d)\.{_BN}"),
        lambda m: f"{_block(m)}.conv{m[3]}.norm.{m[4]}",
    ),
    (
        re.compile(r"layer(\d)\.(\d+)\.downsample\.0\.weight"),
        lambda m: f"{_block(m)}.shortcut.weight",
    ),
    (
        re.compile(rf"layer(\d)\.(\d+)\.downsample\.1\.{_BN}"),
        lambda m: f"{_block(m)}.shortcut.norm.{m[3]}",
    ),
)
RESNET_DROPPED = re.compile(r"fc\.(weight|bias)")
VGG_RULES: Tuple[Rule, ...] = ((re.compile(rf"features\.(\d+)\.{_BN}"), lambda m: m[0]),)
VGG_DROPPED = re.compile(r"classifier\.\d+\.(weight|bias)")
NUM_BATCHES_TRACKED = re.compile(r".*\.num_batches_tracked")


def detect_arch(state_dict: Mapping[str, Tensor]) -> str:
    """``"resnet"`` or ``"vgg"``, from the keys of a torchvision state dict."""
    if "layer1.0.conv1.weight" in state_dict:
        return "resnet"
    if "features.0.weight" in state_dict:
        return "vgg"
    keys = list(state_dict)[:5]
    raise ValueError(
        "not a torchvision ResNet (no 'layer1.0.conv1.weight') or VGG (no 'features.0.weight') "
        f"state dict; its first keys are {keys}"
    )


def convert(
    state_dict: Mapping[str, Tensor], prefix: str = DEFAULT_PREFIX
) -> Tuple[str, Dict[str, Tensor], List[str]]:
    """Rename a torchvision ResNet or VGG state dict for detectron2.

    Returns:
        ``(arch, converted, dropped)``: ``"resnet"`` or ``"vgg"``; ``{prefix + new name:
        tensor}``; the source keys left out (classifier, ``num_batches_tracked``).

    Raises:
        ValueError: the keys are not a torchvision ResNet's or VGG's, naming the first
            unknown key.
    """
    arch = detect_arch(state_dict)
    if arch == "resnet":
        rules, dropped_pattern = RESNET_RULES, RESNET_DROPPED
    else:
        rules, dropped_pattern = VGG_RULES, VGG_DROPPED
    converted: Dict[str, Tensor] = {}
    dropped: List[str] = []
    for key, tensor in state_dict.items():
        if dropped_pattern.fullmatch(key) or NUM_BATCHES_TRACKED.fullmatch(key):
            dropped.append(key)
            continue
        converted[prefix + _rename(key, rules, arch)] = tensor
    return arch, converted, dropped


def _rename(key: str, rules: Sequence[Rule], arch: str) -> str:
    """The new name of ``key`` by the first rule that matches it whole."""
    for pattern, rename in rules:
        m = pattern.fullmatch(key)
        if m:
            return rename(m)
    raise ValueError(f"unexpected key {key!r} in a torchvision {arch} state dict")


def convert_file(
    source: str, target: str, prefix: str = DEFAULT_PREFIX
) -> Tuple[str, int, List[str]]:
    """Convert the torchvision state-dict file ``source`` into the checkpoint ``target``.

    ``target`` (``.pth``) holds ``{"model": converted, "__author__", "note", "input"}``, is
    written to a temporary name beside it and renamed when complete.
    detectron2's ``DetectionCheckpointer`` loads it with ``MODEL.WEIGHTS target``.

    Returns:
        ``(arch, number of tensors converted, dropped source keys)``.
    """
    if not target.endswith(".pth"):
        raise ValueError(
            f"{target}: the output must end in .pth (DetectionCheckpointer reads .pkl files as "
            "Detectron/Caffe2 pickles)"
        )
    state_dict = torch.load(source, map_location="cpu", weights_only=True)
    if not isinstance(state_dict, Mapping) or not all(
        isinstance(v, Tensor) for v in state_dict.values()
    ):
        raise ValueError(f"{source}: expected a state dict (name -> tensor), as torchvision saves")
    arch, converted, dropped = convert(state_dict, prefix)
    checkpoint = {
        "model": converted,
        "__author__": f"torchvision {arch}, converted by sharp-fpn",
        "note": NOTE,
        "input": dict(INPUT_SETTINGS),
    }
    folder = os.path.dirname(os.path.abspath(target))
    fd, tmp = tempfile.mkstemp(prefix=os.path.basename(target) + ".", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(checkpoint, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        os.unlink(tmp)
        raise
    return arch, len(converted), dropped
