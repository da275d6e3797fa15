"""Semantic (binary) nuclei segmentation in detectron2: Table 1 and Table 2's upper half.

``SemanticNucleiSegmentor`` (registered in ``META_ARCH_REGISTRY``) trains and runs a UNet-family
network (``sharp_fpn.models.GridUNet``) on the registered instance datasets; its ground truth is
the union of each image's nucleus masks (``SemanticNucleiMapper`` builds it). One network class,
two encoders, chosen by ``MODEL.UNET.USE_BACKBONE``:

- ``False``, Table 1: the paper's own networks on VGG blocks (``VGGEncoder``, as
  ``create_model(MODEL.UNET.ARCH, ...)`` builds them; ``MODEL.UNET.WIDTH_MULT`` scales the
  widths for small runs).
- ``True``, Table 2's upper half: a detectron2 bottom-up (``MODEL.BACKBONE.NAME``: ResNet-101
  via ``build_resnet_backbone``, or ``build_vgg_backbone``) whose stride-4..32 features are the
  grid's column 0 (:class:`BottomUpEncoder`), a decoder of scheme ``MODEL.UNET.DECODER`` on
  them, and full-resolution heads that upsample from stride 4 (``UpsamplingHead``).

Training (the paper's accurate mode: the mixed loss averaged over the branches, plus the CGM
loss) reads ``GridUNet.forward_branches``; inference (the final branch or the pruning level's,
gated by its CGM) is ``GridUNet.predict_probabilities``, for either encoder. Config keys:
``MODEL.UNET.*`` and ``INPUT.SEMANTIC.*`` (``sharp_fpn.d2.config.add_unet_config``).

The 3-D ``VolumeSegmentor`` (:mod:`.volume`, the V-Net family) builds its network with
:func:`build_semantic_network` (``dims=3``) and trains with :func:`segmentation_losses`, the
same losses in 2-D and 3-D.
"""
from __future__ import annotations

import copy
import math
from functools import partial
from typing import Any, Dict, List, Mapping, Optional, Sequence, Union

import torch
from detectron2.config import configurable
from detectron2.modeling import META_ARCH_REGISTRY, Backbone, build_backbone
from detectron2.modeling.postprocessing import sem_seg_postprocess
from detectron2.structures import ImageList
from torch import Tensor, nn

from .config import check_value
from ..grid import DEEP_SUPERVISION_MODES, NESTED_SCHEMES, SCHEME_FACTS, SCHEMES, node_name
from ..losses import DEEP_SUPERVISION_TARGETS, cgm_loss, deep_supervision_loss, mixed_loss
from ..models.blocks import UPSAMPLE_MODES
from ..models.encoders import GridEncoder
from ..models.grid_decoder import FULL_SCALE_OPS
from ..models.heads import UpsamplingHead
from ..models.unet import ARCHS, VNET_ARCHS, Arch, GridUNet, SegmentationOutput
from .neck import column_strides

__all__ = [
    "SEMANTIC_META_ARCHITECTURE",
    "BottomUpEncoder",
    "SemanticNucleiSegmentor",
    "UpsamplingHead",
    "build_semantic_network",
    "is_semantic",
    "segmentation_losses",
]

SEMANTIC_META_ARCHITECTURE = "SemanticNucleiSegmentor"


def is_semantic(cfg) -> bool:
    """Whether ``cfg`` builds the semantic meta-architecture (its evaluator and mapper differ)."""
    return cfg.MODEL.META_ARCHITECTURE == SEMANTIC_META_ARCHITECTURE


class BottomUpEncoder(GridEncoder):
    """A detectron2 bottom-up as a ``GridUNet`` encoder: the paper's Table 2 semantic networks.

    Its ``in_features`` (strides ``s, 2s, ..., 2**L s``, finest first; ``s = 4`` for ResNet's
    res2..res5 and VGG's pool2..pool5) are the grid's column 0 ``X[i][0]`` as they are (no
    laterals: the decoder nodes' convs read them directly, as in a UNet). The bottom-up is
    registered as ``bottom_up``: in a ``SemanticNucleiSegmentor`` its weights are named
    ``network.encoder.bottom_up.<detectron2's names>``.

    Args:
        bottom_up: a detectron2 ``Backbone`` returning at least ``in_features``.
        in_features: names of its maps that form column 0, finest first, strides doubling.
        in_channels: channels of its input images.
    """

    def __init__(self, bottom_up: Backbone, in_features: Sequence[str], in_channels: int = 3):
        super().__init__()
        shapes = bottom_up.output_shape()
        strides = column_strides(shapes, in_features, type(self).__name__)
        self.bottom_up = bottom_up
        self.in_features = tuple(in_features)
        self.in_channels = in_channels
        self.channels = tuple(shapes[f].channels for f in in_features)
        self.stride = strides[0]

    def forward(self, x: Tensor, depth: Optional[int] = None) -> List[Tensor]:
        """``(N, C, H, W)`` images, sides multiples of ``stride * 2**L`` -> the ``in_features``
        maps of levels ``0..depth`` (the whole bottom-up runs)."""
        features = self.bottom_up(x)
        names = self.in_features if depth is None else self.in_features[: depth + 1]
        return [features[f] for f in names]

    def truncated(self, depth: int) -> "BottomUpEncoder":
        """A copy of the whole bottom-up, reading only ``in_features[:depth + 1]``."""
        return BottomUpEncoder(
            copy.deepcopy(self.bottom_up), self.in_features[: depth + 1], self.in_channels
        )

    def extra_repr(self) -> str:
        return f"in_features={list(self.in_features)}, stride={self.stride}"


def _deep_supervision(cfg, scheme: str) -> Union[bool, str]:
    """``MODEL.UNET.DEEP_SUPERVISION`` and ``DS_BRANCHES`` as ``GridUNet``'s argument."""
    u = cfg.MODEL.UNET
    check_value(
        "MODEL.UNET.DS_BRANCHES",
        u.DS_BRANCHES,
        u.DS_BRANCHES in ("",) + DEEP_SUPERVISION_MODES,
        f"'' (the scheme's own) or one of {DEEP_SUPERVISION_MODES}",
    )
    check_value(
        "MODEL.UNET.DS_BRANCHES",
        u.DS_BRANCHES,
        u.DS_BRANCHES in ("", "decoder") or scheme in NESTED_SCHEMES,
        f"'' or 'decoder' for scheme {scheme!r}: only {NESTED_SCHEMES} have a top row",
    )
    if not u.DEEP_SUPERVISION:
        return False
    return u.DS_BRANCHES or True


def _backbone_network(cfg, common: Dict[str, Any]) -> GridUNet:
    """Table 2's network: ``MODEL.BACKBONE.NAME``'s bottom-up, a ``MODEL.UNET.DECODER`` grid."""
    u = cfg.MODEL.UNET
    check_value("MODEL.UNET.DECODER", u.DECODER, u.DECODER in SCHEMES, f"one of {SCHEMES}")
    check_value(
        "MODEL.UNET.WIDTHS",
        u.WIDTHS,
        len(u.WIDTHS) == len(u.IN_FEATURES) - 1 and all(w > 0 for w in u.WIDTHS),
        f"one positive width per decoder level, len(MODEL.UNET.IN_FEATURES) - 1 = "
        f"{len(u.IN_FEATURES) - 1} of them",
    )
    bottom_up = build_backbone(cfg)
    available = list(bottom_up.output_shape())
    check_value(
        "MODEL.UNET.IN_FEATURES",
        u.IN_FEATURES,
        set(u.IN_FEATURES) <= set(available),
        f"names among the bottom-up's outputs {available} (MODEL.BACKBONE.NAME "
        f"{cfg.MODEL.BACKBONE.NAME!r})",
    )
    encoder = BottomUpEncoder(bottom_up, u.IN_FEATURES, len(cfg.MODEL.PIXEL_MEAN))
    doublings = int(math.log2(encoder.stride))
    check_value(
        "MODEL.UNET.UPSAMPLE_WIDTHS",
        u.UPSAMPLE_WIDTHS,
        len(u.UPSAMPLE_WIDTHS) == doublings and all(w > 0 for w in u.UPSAMPLE_WIDTHS),
        f"{doublings} positive widths, one per doubling from the stride {encoder.stride} of "
        f"{u.IN_FEATURES[0]!r} to full resolution",
    )
    return GridUNet(
        u.DECODER,
        classes=1,
        encoder=encoder,
        widths=u.WIDTHS,
        upsample_widths=u.UPSAMPLE_WIDTHS,
        deep_supervision=_deep_supervision(cfg, u.DECODER),
        full_scale_channels=u.WIDTHS[0],
        project_channels=u.WIDTHS[0],
        upsample_mode=u.UPSAMPLE,
        reduce_upsampled=u.REDUCE_UPSAMPLED,
        **common,
    )


def _vgg_block_network(
    cfg, common: Dict[str, Any], archs: Mapping[str, Arch] = ARCHS,
    in_channels: Optional[int] = None,
) -> GridUNet:
    """Table 1's network: ``MODEL.UNET.ARCH`` (one of ``archs``: the 2-D ``ARCHS``, or the 3-D
    ``VNET_ARCHS`` for ``VolumeSegmentor``) at ``WIDTH_MULT`` times its widths, with its own
    dims and node kernel; ``in_channels`` default the length of ``MODEL.PIXEL_MEAN`` (2-D) or
    the arch's own (3-D: one, CT)."""
    u = cfg.MODEL.UNET
    check_value("MODEL.UNET.ARCH", u.ARCH, u.ARCH in archs, f"one of {sorted(archs)}")
    check_value("MODEL.UNET.WIDTH_MULT", u.WIDTH_MULT, u.WIDTH_MULT > 0, "a positive number")
    arch = archs[u.ARCH]
    if in_channels is None:  # images: one per normalised channel; volumes: the arch's (CT: 1)
        in_channels = len(cfg.MODEL.PIXEL_MEAN) if arch.dims == 2 else arch.in_channels
    check_value(
        "MODEL.UNET.FULL_SCALE",
        u.FULL_SCALE,
        u.FULL_SCALE == "upsample" or SCHEME_FACTS[arch.scheme].full_scale_skips,
        f"'upsample' ({u.ARCH!r} has no full-scale skips; only 'unet_sharp' does)",
    )
    return GridUNet(
        arch.scheme,
        in_channels,
        1,
        [max(1, round(c * u.WIDTH_MULT)) for c in arch.channels],
        deep_supervision=_deep_supervision(cfg, arch.scheme),
        upsample_mode=u.UPSAMPLE,
        kernel_size=arch.kernel_size,
        dims=arch.dims,
        **common,
    )


def build_semantic_network(cfg, dims: int = 2, in_channels: Optional[int] = None) -> GridUNet:
    """The network ``MODEL.UNET.*`` describes (see the module docstring); every value checked,
    errors naming the key.

    Args:
        cfg: the config.
        dims: 2 (``SemanticNucleiSegmentor``: ``ARCHS`` or a detectron2 bottom-up) or 3
            (``VolumeSegmentor``: ``VNET_ARCHS`` only, VGG blocks).
        in_channels: image channels of a VGG-block network (default: ``MODEL.PIXEL_MEAN``'s in
            2-D, the arch's own in 3-D).
    """
    u = cfg.MODEL.UNET
    if dims == 3:
        check_value("MODEL.UNET.USE_BACKBONE", u.USE_BACKBONE, not u.USE_BACKBONE,
                    "False for a 3-D model (the V-Net family has no detectron2 bottom-up)")
    check_value("MODEL.UNET.FULL_SCALE", u.FULL_SCALE, u.FULL_SCALE in FULL_SCALE_OPS,
                f"one of {FULL_SCALE_OPS}")
    check_value("MODEL.UNET.NORM", u.NORM, u.NORM in ("BN", "GN", ""), "'BN', 'GN' or ''")
    check_value("MODEL.UNET.UPSAMPLE", u.UPSAMPLE, u.UPSAMPLE in UPSAMPLE_MODES,
                f"one of {UPSAMPLE_MODES}")
    common = dict(full_scale=u.FULL_SCALE, norm=u.NORM, cgm=u.CGM, cgm_dropout=u.CGM_DROPOUT)
    if u.USE_BACKBONE:
        network = _backbone_network(cfg, common)
    else:
        archs = VNET_ARCHS if dims == 3 else ARCHS
        network = _vgg_block_network(cfg, common, archs, in_channels)
    if u.PRUNE_LEVEL:
        heads = ", ".join(node_name(p) for p in network.branches)
        check_value(
            "MODEL.UNET.PRUNE_LEVEL",
            u.PRUNE_LEVEL,
            (0, u.PRUNE_LEVEL) in network.branches,
            f"0 or a level k with a head on X[0][k] (heads: {heads}; pruning needs "
            f"MODEL.UNET.DEEP_SUPERVISION with DS_BRANCHES 'top' or 'all', on a nested scheme "
            f"{NESTED_SCHEMES})",
        )
    return network


def segmentation_losses(
    output: SegmentationOutput,
    target: Tensor,
    ds_target: str = "pool",
    loss_weights: Sequence[float] = (0.5, 1.0, 0.5),
    cgm_loss_weight: float = 1.0,
) -> Dict[str, Tensor]:
    """The paper's accurate-mode training losses, in 2-D and 3-D alike.

    Args:
        output: ``GridUNet.forward_branches`` of the batch: every branch's logits
            ``(N, 1, *spatial)`` at its own resolution (and CGM class logits).
        target: ``(N, 1, *spatial)`` 0/1 ground truth at full resolution.
        ds_target: ``"pool"`` (ground truth max-pooled to each branch) or ``"upsample"``.
        loss_weights: focal, soft Dice and Lovasz hinge weights of the mixed loss.
        cgm_loss_weight: weight of the CGM cross-entropy ("has foreground").

    Returns:
        ``{"loss_seg"}``: the mixed loss averaged over the branches; with CGMs also
        ``{"loss_cgm"}``: their cross-entropy averaged over the branches, times the weight.
    """
    focal, dice, lovasz = loss_weights
    loss = partial(mixed_loss, focal_weight=focal, dice_weight=dice, lovasz_weight=lovasz)
    losses = {"loss_seg": deep_supervision_loss(output.logits, target, ds_target, loss)}
    if output.has_object:
        losses["loss_cgm"] = cgm_loss_weight * cgm_loss(output.has_object, target)
    return losses


def check_loss_config(u) -> None:
    """``MODEL.UNET``'s deep-supervision target and mixed-loss weights (2-D and 3-D models)."""
    check_value("MODEL.UNET.DS_TARGET", u.DS_TARGET, u.DS_TARGET in DEEP_SUPERVISION_TARGETS,
                f"one of {DEEP_SUPERVISION_TARGETS}")
    check_value("MODEL.UNET.LOSS_WEIGHTS", u.LOSS_WEIGHTS, len(u.LOSS_WEIGHTS) == 3,
                "[focal, dice, lovasz] weights")


@META_ARCH_REGISTRY.register()
class SemanticNucleiSegmentor(nn.Module):
    """Binary nuclei segmentation: foreground probabilities per pixel.

    Training input: a list of dicts with ``"image"`` ``(C, h, w)`` (``INPUT.FORMAT``, 0..255)
    and ``"sem_seg"`` ``(h, w)`` 0/1 (``SemanticNucleiMapper``). Images and masks are padded
    (background) to multiples of the network's coarsest stride. Returns
    ``{"loss_seg": ..., ["loss_cgm": ...]}``: the mixed loss (``LOSS_WEIGHTS``) averaged over
    the branches, each compared with the ground truth at its own size (``DS_TARGET``), and with
    CGM the cross-entropy of "image has a nucleus" averaged over the branches, times
    ``CGM_LOSS_WEIGHT``.

    Inference output: one dict per image, ``{"sem_seg": (1, height, width)}`` sigmoid
    probabilities of the final branch (``X[0][L]``, or ``X[0][PRUNE_LEVEL]`` when pruning),
    cropped and resized to the input's ``"height"``/``"width"`` (``sem_seg_postprocess``);
    with CGM multiplied by the branch's 0/1 "has object" decision
    (``GridUNet.predict_probabilities``).
    """

    @configurable
    def __init__(
        self,
        *,
        network: GridUNet,
        pixel_mean: Sequence[float],
        pixel_std: Sequence[float],
        size_divisibility: int,
        ds_target: str = "pool",
        loss_weights: Sequence[float] = (0.5, 1.0, 0.5),
        cgm_loss_weight: float = 1.0,
        prune_level: int = 0,
    ):
        """
        Args:
            network: a ``GridUNet`` (any encoder) with one output class.
            pixel_mean, pixel_std: per-channel normalization, in the input's channel order.
            size_divisibility: pad inputs to multiples of it (the network's coarsest stride,
                ``network.size_divisibility``).
            ds_target: ``"pool"`` (ground truth max-pooled to each branch, the paper's) or
                ``"upsample"`` (branch logits upsampled, the official code's).
            loss_weights: weights of focal, soft Dice and Lovasz hinge in the mixed loss.
            cgm_loss_weight: weight of the CGM loss (used when the network has CGMs).
            prune_level: 0, or ``k``: infer with the sub-network ending at ``X[0][k]``.
        """
        super().__init__()
        if ds_target not in DEEP_SUPERVISION_TARGETS:
            raise ValueError(
                f"ds_target must be one of {DEEP_SUPERVISION_TARGETS}, got {ds_target!r}"
            )
        if len(loss_weights) != 3:
            raise ValueError(f"loss_weights needs (focal, dice, lovasz), got {list(loss_weights)}")
        self.network = network
        self.size_divisibility = size_divisibility
        self.ds_target = ds_target
        self.loss_weights = tuple(float(w) for w in loss_weights)
        self.cgm_loss_weight = float(cgm_loss_weight)
        self.prune_level = prune_level
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean).view(-1, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std).view(-1, 1, 1), False)

    @classmethod
    def from_config(cls, cfg) -> Dict[str, Any]:
        u = cfg.MODEL.UNET
        check_loss_config(u)
        network = build_semantic_network(cfg)
        return {
            "network": network,
            "pixel_mean": cfg.MODEL.PIXEL_MEAN,
            "pixel_std": cfg.MODEL.PIXEL_STD,
            "size_divisibility": network.size_divisibility,
            "ds_target": u.DS_TARGET,
            "loss_weights": u.LOSS_WEIGHTS,
            "cgm_loss_weight": u.CGM_LOSS_WEIGHT,
            "prune_level": u.PRUNE_LEVEL,
        }

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        """Also load weights named ``network.bottom_up.*`` (checkpoints from before the encoder
        adapter; ``tools/convert_torchvision_weights.py --prefix network.bottom_up.``): they are
        the bottom-up's, now ``network.encoder.bottom_up.*``."""
        old, new = prefix + "network.bottom_up.", prefix + "network.encoder.bottom_up."
        for key in [k for k in state_dict if k.startswith(old)]:
            state_dict[new + key[len(old):]] = state_dict.pop(key)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @property
    def device(self) -> torch.device:
        return self.pixel_mean.device

    def preprocess_image(self, batched_inputs: List[Dict[str, Any]]) -> ImageList:
        """Normalize and pad the images: an ``ImageList`` of ``(N, C, H, W)``."""
        images = [(x["image"].to(self.device) - self.pixel_mean) / self.pixel_std
                  for x in batched_inputs]
        return ImageList.from_tensors(images, self.size_divisibility)

    def forward(self, batched_inputs: List[Dict[str, Any]]):
        """Losses in training, ``[{"sem_seg": (1, height, width)}]`` at inference (class doc)."""
        images = self.preprocess_image(batched_inputs)
        if not self.training:
            return self.inference(images, batched_inputs)
        if any("sem_seg" not in x for x in batched_inputs):
            raise ValueError(
                "training inputs need 'sem_seg' (the union mask); use SemanticNucleiMapper"
            )
        masks = [x["sem_seg"].to(self.device) for x in batched_inputs]
        target = ImageList.from_tensors(masks, self.size_divisibility).tensor
        target = (target > 0).to(images.tensor.dtype).unsqueeze(1)  # (N, 1, H, W)
        output = self.network.forward_branches(images.tensor)
        return segmentation_losses(
            output, target, self.ds_target, self.loss_weights, self.cgm_loss_weight
        )

    def inference(
        self, images: ImageList, batched_inputs: List[Dict[str, Any]]
    ) -> List[Dict[str, Tensor]]:
        """Final-branch probabilities (CGM-gated), one ``(1, height, width)`` map per image."""
        probabilities = self.network.predict_probabilities(images.tensor, self.prune_level or None)
        results = []
        for p, x, size in zip(probabilities, batched_inputs, images.image_sizes):
            height, width = x.get("height", size[0]), x.get("width", size[1])
            results.append({"sem_seg": sem_seg_postprocess(p, size, height, width)})
        return results
