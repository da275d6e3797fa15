"""Semantic (binary) nuclei segmentation in detectron2: Table 1 and Table 2's upper half.

``SemanticNucleiSegmentor`` (registered in ``META_ARCH_REGISTRY``) trains and runs a UNet-family
network on the registered instance datasets; its ground truth is the union of each image's
nucleus masks (``SemanticNucleiMapper`` builds it). Two kinds of network, chosen by
``MODEL.UNET.USE_BACKBONE``:

- ``False``, Table 1: the paper's own networks on VGG blocks (``sharp_fpn.models.GridUNet``,
  as ``create_model(MODEL.UNET.ARCH, ...)`` builds them; ``MODEL.UNET.WIDTH_MULT`` scales the
  widths for small runs).
- ``True``, Table 2's upper half: a detectron2 bottom-up (``MODEL.BACKBONE.NAME``: ResNet-101
  via ``build_resnet_backbone``, or ``build_vgg_backbone``) whose stride-4..32 features are the
  grid's column 0, a ``GridDecoder`` of scheme ``MODEL.UNET.DECODER`` on them, and an upsampling
  head back to full resolution (:class:`BackboneGridUNet`).

Both networks follow ``GridUNet``'s output contract (one tensor, a list of branch logits with
deep supervision, or a ``SegmentationOutput`` with CGM), so training (the paper's accurate mode:
the mixed loss averaged over the branches, plus the CGM loss) and inference (the final branch,
gated by its CGM) are written once. Config keys: ``MODEL.UNET.*`` and ``INPUT.SEMANTIC.*``
(``sharp_fpn.d2.config.add_unet_config``).
"""
from __future__ import annotations

from functools import partial
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.modeling import META_ARCH_REGISTRY, Backbone, build_backbone
from detectron2.modeling.postprocessing import sem_seg_postprocess
from detectron2.structures import ImageList
from torch import Tensor, nn

from .config import check_value
from ..grid import SCHEMES, Position, node_name
from ..losses import DEEP_SUPERVISION_TARGETS, cgm_loss, deep_supervision_loss, mixed_loss
from ..models.blocks import UPSAMPLE_MODES, ConvNormReLU, he_init_
from ..models.grid_decoder import FULL_SCALE_OPS, GridDecoder
from ..models.heads import ClassificationGuidedModule, SegmentationHead
from .neck import column_strides
from ..models.unet import (
    ARCHS,
    DEEP_SUPERVISION_MODES,
    DEFAULT_DEEP_SUPERVISION,
    GridUNet,
    ModelOutput,
    SegmentationOutput,
    supervised_branches,
)

__all__ = [
    "SEMANTIC_META_ARCHITECTURE",
    "BackboneGridUNet",
    "SemanticNucleiSegmentor",
    "UpsamplingHead",
    "build_semantic_network",
    "is_semantic",
]

SEMANTIC_META_ARCHITECTURE = "SemanticNucleiSegmentor"
NESTED_SCHEMES = ("2plus", "sharp")  # the schemes with a top row X[0][1..L-1]


def is_semantic(cfg) -> bool:
    """Whether ``cfg`` builds the semantic meta-architecture (its evaluator and mapper differ)."""
    return cfg.MODEL.META_ARCHITECTURE == SEMANTIC_META_ARCHITECTURE


def _key(position: Position) -> str:
    return f"{position[0]}_{position[1]}"


class UpsamplingHead(nn.Module):
    """From a node at stride ``2**len(widths)`` to full-resolution logits.

    Per doubling: bilinear upsampling x2 (``align_corners=True``), then conv3x3-norm-ReLU to the
    next of ``widths``; finally a 1x1 conv to ``classes`` logits (segmentation_models_pytorch's
    UNet ends its decoder the same way, without skips, at widths 32 and 16).

    ``(N, in_channels, h, w) -> (N, classes, h * 2**len(widths), w * 2**len(widths))``.
    """

    def __init__(self, in_channels: int, widths: Sequence[int], classes: int = 1, norm: str = "BN"):
        super().__init__()
        widths_in = [in_channels] + list(widths[:-1])
        self.blocks = nn.ModuleList(ConvNormReLU(a, b, norm) for a, b in zip(widths_in, widths))
        self.head = SegmentationHead(widths[-1] if widths else in_channels, classes, 1)
        he_init_(self)

    def forward(self, x: Tensor) -> Tensor:
        for block in self.blocks:
            x = block(F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=True))
        return self.head(x)


class BackboneGridUNet(nn.Module):
    """A UNet-family decoder on a bottom-up's features: the paper's Table 2 semantic networks.

    The bottom-up's ``in_features`` (strides ``s, 2s, ..., 2**L s``, finest first; ``s = 4``
    for ResNet's res2..res5 and VGG's pool2..pool5) are the grid's column 0 ``X[i][0]`` as they
    are (no laterals: the decoder nodes' convs read them directly, as in a UNet). A
    ``GridDecoder`` of ``scheme`` computes the decoder nodes, node ``X[i][j]`` with
    ``widths[i]`` channels. Heads as ``GridUNet``'s: the final ``X[0][L]`` through an
    :class:`UpsamplingHead` to full resolution; with deep supervision the top row ``X[0][j]``
    (1x1; UNet3+: 3x3) and the decoder branches (3x3) at their own stride; with CGM a
    classification-guided module on every branch's node (heavy on the two deepest).

    Args:
        bottom_up: a detectron2 ``Backbone`` returning at least ``in_features``.
        in_features: names of its maps that form column 0, finest first, strides doubling.
        scheme: ``"unet"``, ``"2plus"``, ``"3plus"`` or ``"sharp"``.
        widths: decoder node widths of levels ``0..L-1``. UNet3+ uses ``block="f"`` and
            projects each input to ``widths[0]`` (its CatChannels).
        upsample_widths: widths of the :class:`UpsamplingHead`, one per doubling from the stride
            of ``in_features[0]`` to 1 (two for stride 4).
        classes: output logit channels.
        deep_supervision: ``False``, ``True`` (the scheme's own: ``DEFAULT_DEEP_SUPERVISION``),
            ``"top"``, ``"decoder"`` or ``"all"``.
        full_scale: UNet#'s ``F``, ``"upsample"`` or ``"conv"``.
        norm: norm of the decoder and the heads: ``"BN"``, ``"GN"`` or ``""``.
        upsample_mode: interpolation inside the grid (``"bilinear"``, the official code's).
        reduce_upsampled: 1x1-reduce wide upsampled inputs at their own resolution (see
            ``GridDecoder``); keeps ResNet's 2048-channel C5 out of stride-4 3x3 convs.
        cgm: classification-guided modules; ``forward`` then returns a ``SegmentationOutput``.
        cgm_dropout: dropout probability inside the CGMs.

    Attributes:
        branches: the supervised nodes in output order, the final ``X[0][L]`` last.
    """

    def __init__(
        self,
        bottom_up: Backbone,
        in_features: Sequence[str],
        scheme: str,
        widths: Sequence[int],
        upsample_widths: Sequence[int],
        *,
        classes: int = 1,
        deep_supervision: Union[bool, str] = False,
        full_scale: str = "upsample",
        norm: str = "BN",
        upsample_mode: str = "bilinear",
        reduce_upsampled: bool = True,
        cgm: bool = False,
        cgm_dropout: float = 0.5,
    ):
        super().__init__()
        shapes = bottom_up.output_shape()
        strides = column_strides(shapes, in_features, type(self).__name__)
        if 2 ** len(upsample_widths) != strides[0]:
            raise ValueError(
                f"upsample_widths needs one width per doubling from stride {strides[0]} to 1, "
                f"got {list(upsample_widths)}"
            )
        depth = len(in_features) - 1
        self.bottom_up = bottom_up
        self.in_features = tuple(in_features)
        self.strides = tuple(strides)
        self.cgm = cgm
        self.decoder = GridDecoder(
            scheme,
            depth,
            [shapes[f].channels for f in in_features],
            list(widths),
            block="f" if scheme == "3plus" else "f2",
            norm=norm,
            full_scale=full_scale,
            full_scale_channels=widths[0],
            project_channels=widths[0],
            upsample_mode=upsample_mode,
            reduce_upsampled=reduce_upsampled,
        )
        mode = DEFAULT_DEEP_SUPERVISION[scheme] if deep_supervision is True else deep_supervision
        self.deep_supervision: Optional[str] = mode or None
        self.branches: Tuple[Position, ...] = supervised_branches(
            self.decoder.grid, self.deep_supervision
        )
        final = self.branches[-1]
        heavy = {p for p in self.branches if p[0] > 0 and p[0] >= depth - 1}
        top_kernel = 3 if scheme == "3plus" else 1
        self.heads = nn.ModuleDict()
        self.cgms = nn.ModuleDict()
        for position in self.branches:
            width = self.decoder.node_channels[position]
            if position == final:
                head: nn.Module = UpsamplingHead(width, upsample_widths, classes, norm)
            else:
                kernel = top_kernel if position[0] == 0 else 3
                head = SegmentationHead(width, classes, kernel)
            self.heads[_key(position)] = head
            if cgm:
                self.cgms[_key(position)] = ClassificationGuidedModule(
                    width, heavy=position in heavy, dropout=cgm_dropout
                )

    @property
    def size_divisibility(self) -> int:
        """Inputs must be multiples of the coarsest stride (padding is the caller's job)."""
        return self.strides[-1]

    def forward(self, x: Tensor) -> ModelOutput:
        """``(N, C, H, W)`` images, ``H, W`` multiples of ``size_divisibility`` -> logits.

        Returns, as ``GridUNet``: ``(N, classes, H, W)`` logits of the final branch; with deep
        supervision the list of every branch's logits ``(N, classes, H / s_i, W / s_i)`` (stride
        ``s_i`` of the branch's level; the final one at full size, last); with CGM a
        ``SegmentationOutput``.
        """
        features = self.bottom_up(x)
        nodes = self.decoder([features[f] for f in self.in_features])
        logits = [self.heads[_key(p)](nodes[p]) for p in self.branches]
        if self.cgm:
            has_object = [self.cgms[_key(p)](nodes[p]) for p in self.branches]
            return SegmentationOutput(logits, has_object, self.branches)
        return logits if len(logits) > 1 else logits[0]

    def extra_repr(self) -> str:
        branches = ", ".join(node_name(p) for p in self.branches)
        return f"in_features={list(self.in_features)}, branches: {branches}"


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


def _backbone_network(cfg, common: Dict[str, Any]) -> BackboneGridUNet:
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
    check_value(
        "MODEL.UNET.PRUNE_LEVEL",
        u.PRUNE_LEVEL,
        u.PRUNE_LEVEL == 0,
        "0: pruned inference is for the VGG-block family (MODEL.UNET.USE_BACKBONE False)",
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
    return BackboneGridUNet(
        bottom_up,
        u.IN_FEATURES,
        u.DECODER,
        u.WIDTHS,
        u.UPSAMPLE_WIDTHS,
        classes=1,
        deep_supervision=_deep_supervision(cfg, u.DECODER),
        upsample_mode=u.UPSAMPLE,
        reduce_upsampled=u.REDUCE_UPSAMPLED,
        **common,
    )


def _vgg_block_network(cfg, common: Dict[str, Any]) -> GridUNet:
    """Table 1's network: ``MODEL.UNET.ARCH`` at ``WIDTH_MULT`` times its widths."""
    u = cfg.MODEL.UNET
    check_value("MODEL.UNET.ARCH", u.ARCH, u.ARCH in ARCHS, f"one of {sorted(ARCHS)}")
    check_value("MODEL.UNET.WIDTH_MULT", u.WIDTH_MULT, u.WIDTH_MULT > 0, "a positive number")
    arch = ARCHS[u.ARCH]
    check_value(
        "MODEL.UNET.FULL_SCALE",
        u.FULL_SCALE,
        u.FULL_SCALE == "upsample" or arch.scheme == "sharp",
        f"'upsample' ({u.ARCH!r} has no full-scale skips; only 'unet_sharp' does)",
    )
    network = GridUNet(
        arch.scheme,
        len(cfg.MODEL.PIXEL_MEAN),
        1,
        [max(1, round(c * u.WIDTH_MULT)) for c in arch.channels],
        deep_supervision=_deep_supervision(cfg, arch.scheme),
        upsample_mode=u.UPSAMPLE,
        **common,
    )
    if u.PRUNE_LEVEL:
        heads = ", ".join(node_name(p) for p in network.branches)
        check_value(
            "MODEL.UNET.PRUNE_LEVEL",
            u.PRUNE_LEVEL,
            (0, u.PRUNE_LEVEL) in network.branches,
            f"0 or a level k with a head on X[0][k] (heads: {heads}; pruning needs "
            "MODEL.UNET.DEEP_SUPERVISION with DS_BRANCHES 'top' or 'all', on unet2plus or "
            "unet_sharp)",
        )
    return network


def build_semantic_network(cfg) -> Union[GridUNet, BackboneGridUNet]:
    """The network ``MODEL.UNET.*`` describes (see the module docstring); every value checked,
    errors naming the key."""
    u = cfg.MODEL.UNET
    check_value("MODEL.UNET.FULL_SCALE", u.FULL_SCALE, u.FULL_SCALE in FULL_SCALE_OPS,
                f"one of {FULL_SCALE_OPS}")
    check_value("MODEL.UNET.NORM", u.NORM, u.NORM in ("BN", "GN", ""), "'BN', 'GN' or ''")
    check_value("MODEL.UNET.UPSAMPLE", u.UPSAMPLE, u.UPSAMPLE in UPSAMPLE_MODES,
                f"one of {UPSAMPLE_MODES}")
    common = dict(full_scale=u.FULL_SCALE, norm=u.NORM, cgm=u.CGM, cgm_dropout=u.CGM_DROPOUT)
    if u.USE_BACKBONE:
        return _backbone_network(cfg, common)
    return _vgg_block_network(cfg, common)


def _branch_outputs(output: ModelOutput) -> Tuple[List[Tensor], Optional[List[Tensor]]]:
    """A network's output as (branch logits, CGM class logits or None), final branch last."""
    if isinstance(output, SegmentationOutput):
        return output.logits, output.has_object
    if isinstance(output, Tensor):
        return [output], None
    return list(output), None


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
    with CGM multiplied by the branch's 0/1 "has object" decision.
    """

    @configurable
    def __init__(
        self,
        *,
        network: Union[GridUNet, BackboneGridUNet],
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
            network: a ``GridUNet`` or ``BackboneGridUNet`` with one output class.
            pixel_mean, pixel_std: per-channel normalization, in the input's channel order.
            size_divisibility: pad inputs to multiples of it (the network's coarsest stride).
            ds_target: ``"pool"`` (ground truth max-pooled to each branch, the paper's) or
                ``"upsample"`` (branch logits upsampled, the official code's).
            loss_weights: weights of focal, soft Dice and Lovasz hinge in the mixed loss.
            cgm_loss_weight: weight of the CGM loss (used when the network has CGMs).
            prune_level: 0, or ``k``: infer with the sub-network ending at ``X[0][k]``
                (``GridUNet`` only).
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
        check_value("MODEL.UNET.DS_TARGET", u.DS_TARGET, u.DS_TARGET in DEEP_SUPERVISION_TARGETS,
                    f"one of {DEEP_SUPERVISION_TARGETS}")
        check_value("MODEL.UNET.LOSS_WEIGHTS", u.LOSS_WEIGHTS, len(u.LOSS_WEIGHTS) == 3,
                    "[focal, dice, lovasz] weights")
        network = build_semantic_network(cfg)
        if isinstance(network, GridUNet):
            size_divisibility = 2 ** network.depth
        else:
            size_divisibility = network.size_divisibility
        return {
            "network": network,
            "pixel_mean": cfg.MODEL.PIXEL_MEAN,
            "pixel_std": cfg.MODEL.PIXEL_STD,
            "size_divisibility": size_divisibility,
            "ds_target": u.DS_TARGET,
            "loss_weights": u.LOSS_WEIGHTS,
            "cgm_loss_weight": u.CGM_LOSS_WEIGHT,
            "prune_level": u.PRUNE_LEVEL,
        }

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
        logits, has_object = _branch_outputs(self.network(images.tensor))
        focal, dice, lovasz = self.loss_weights
        loss = partial(mixed_loss, focal_weight=focal, dice_weight=dice, lovasz_weight=lovasz)
        losses = {"loss_seg": deep_supervision_loss(logits, target, self.ds_target, loss)}
        if has_object is not None:
            losses["loss_cgm"] = self.cgm_loss_weight * cgm_loss(has_object, target)
        return losses

    def inference(
        self, images: ImageList, batched_inputs: List[Dict[str, Any]]
    ) -> List[Dict[str, Tensor]]:
        """Final-branch probabilities (CGM-gated), one ``(1, height, width)`` map per image."""
        if self.prune_level:
            output = self.network(images.tensor, level=self.prune_level)
        else:
            output = self.network(images.tensor)
        logits, has_object = _branch_outputs(output)
        probabilities = torch.sigmoid(logits[-1])
        if has_object is not None:
            probabilities = probabilities * ClassificationGuidedModule.gate(has_object[-1])
        results = []
        for p, x, size in zip(probabilities, batched_inputs, images.image_sizes):
            height, width = x.get("height", size[0]), x.get("width", size[1])
            results.append({"sem_seg": sem_seg_postprocess(p, size, height, width)})
        return results
