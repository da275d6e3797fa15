"""Heads on the grid's nodes: segmentation heads and UNet#'s classification-guided modules.

All feature maps are ``(N, C, H, W)`` (``(N, C, D, H, W)`` in 3-D, ``dims=3``). These modules
know nothing about the grid; ``GridUNet`` decides which node gets which head (SPEC section 2).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .blocks import ConvNormReLU, Norm, check_dims, conv_nd, he_init_, interpolation_mode


class SegmentationHead(nn.Module):
    """A conv to ``classes`` logits, optionally followed by ReLU.

    The paper puts a ReLU after every deep-supervision head (1x1 on the top row, 3x3 on the
    decoder branches); its official code does not. A ReLU on logits clamps them to ``>= 0``,
    i.e. sigmoid probabilities ``>= 0.5`` everywhere, so ``relu=False`` is the default.

    ``(N, in_channels, H, W) -> (N, classes, H, W)``; with ``dims=3`` a ``kernel_size**3`` conv on
    ``(N, in_channels, D, H, W)``.
    """

    def __init__(
        self,
        in_channels: int,
        classes: int,
        kernel_size: int = 1,
        relu: bool = False,
        dims: int = 2,
    ):
        super().__init__()
        self.conv = conv_nd(dims)(in_channels, classes, kernel_size, padding=kernel_size // 2)
        self.relu = relu
        he_init_(self)

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv(x)
        return F.relu(x) if self.relu else x

    def extra_repr(self) -> str:
        return f"relu={self.relu}"


class UpsamplingHead(nn.Module):
    """From a node at stride ``2**len(widths)`` to full-resolution logits.

    Per doubling: bilinear upsampling x2 (``align_corners=True``), then conv3x3-norm-ReLU to the
    next of ``widths``; finally a 1x1 conv to ``classes`` logits (segmentation_models_pytorch's
    UNet ends its decoder the same way, without skips, at widths 32 and 16). The top-row heads
    of a network whose level 0 is not at full resolution (a detectron2 bottom-up's stride 4).

    ``(N, in_channels, h, w) -> (N, classes, h * 2**len(widths), w * 2**len(widths))``; with
    ``dims=3`` the same on volumes (trilinear upsampling, 3x3x3 convs).
    """

    def __init__(
        self,
        in_channels: int,
        widths: Sequence[int],
        classes: int = 1,
        norm: Norm = "BN",
        relu: bool = False,
        dims: int = 2,
    ):
        super().__init__()
        widths_in = [in_channels] + list(widths[:-1])
        self.mode = interpolation_mode("bilinear", dims)
        self.blocks = nn.ModuleList(
            ConvNormReLU(a, b, norm, dims=dims) for a, b in zip(widths_in, widths)
        )
        self.head = SegmentationHead(
            widths[-1] if widths else in_channels, classes, 1, relu, dims
        )
        he_init_(self)

    def forward(self, x: Tensor) -> Tensor:
        for block in self.blocks:
            x = block(F.interpolate(x, scale_factor=2, mode=self.mode, align_corners=True))
        return self.head(x)


class GlobalAvgMaxPool(nn.Module):
    """``cat[AdaptiveAvgPool2d(1), AdaptiveMaxPool2d(1)]``, flattened.

    ``(N, C, *spatial) -> (N, 2C)``: the ``C`` channel means, then the ``C`` channel maxima,
    over every spatial dimension (2-D maps and 3-D volumes alike).
    """

    def forward(self, x: Tensor) -> Tensor:
        x = x.flatten(2)
        return torch.cat([x.mean(dim=2), x.amax(dim=2)], dim=1)


class ClassificationGuidedModule(nn.Sequential):
    """UNet#'s CGM: does the image contain any target? Two class logits from a node's features.

    Heavy (the paper's, on ``X[4][0]`` and ``X[3][1]``)::

        avg+max pool -> BatchNorm1d -> Dropout -> Linear(2C, hidden) -> ReLU
                     -> BatchNorm1d -> Dropout -> Linear(hidden, 2)

    Light (the other branches)::

        avg+max pool -> BatchNorm1d -> Dropout -> Linear(2C, 2)

    The paper ends both with a Softmax; this module returns the logits instead, so that
    ``cgm_loss`` (cross-entropy on the two classes, which equals BCE on the softmax's
    "has object" probability) stays numerically stable. ``argmax`` over the logits equals
    ``argmax`` over the softmax: class 1 = "has object", and ``gate`` turns it into the 0/1
    factor that multiplies the branch's segmentation at inference.

    BatchNorm1d needs more than one image per batch in training mode.

    Args:
        in_channels: ``C`` of the ``(N, C, H, W)`` node features.
        heavy: the heavy (two-layer) or light (one-layer) classifier.
        hidden: width of the heavy classifier's hidden layer; the paper does not give it, the
            default is ``C`` (half the pooled vector's ``2C``). Ignored when light.
        dropout: probability of both Dropout layers (0.5, as UNet3+'s CGM).

    ``(N, C, H, W) -> (N, 2)`` class logits.
    """

    def __init__(
        self, in_channels: int, heavy: bool, hidden: Optional[int] = None, dropout: float = 0.5
    ):
        pooled = 2 * in_channels
        layers = [GlobalAvgMaxPool(), nn.BatchNorm1d(pooled), nn.Dropout(dropout)]
        if heavy:
            hidden = in_channels if hidden is None else hidden
            layers += [
                nn.Linear(pooled, hidden),
                nn.ReLU(inplace=True),
                nn.BatchNorm1d(hidden),
                nn.Dropout(dropout),
                nn.Linear(hidden, 2),
            ]
        else:
            layers.append(nn.Linear(pooled, 2))
        super().__init__(*layers)
        self.heavy = heavy

    @property
    def classifier(self) -> nn.Linear:
        """The last Linear layer (the one producing the two class logits)."""
        return self[-1]

    @staticmethod
    def gate(class_logits: Tensor, dims: int = 2) -> Tensor:
        """``(N, 2)`` class logits -> ``(N, 1, 1, 1)`` 0/1 factors (argmax; 1 = has object);
        ``(N, 1, 1, 1, 1)`` with ``dims=3``.

        Multiply a branch's ``(N, classes, H, W)`` (``(N, classes, D, H, W)``) probabilities
        with it.
        """
        gate = class_logits.argmax(dim=1).to(class_logits.dtype)
        return gate.view(-1, *([1] * (1 + check_dims(dims))))


def branch_probabilities(logits: Tensor, class_logits: Optional[Tensor] = None) -> Tensor:
    """A branch's inference output: ``sigmoid(logits)``, times its CGM's 0/1 decision if any.

    ``(N, classes, H, W)`` logits and ``(N, 2)`` CGM class logits (or None) -> ``(N, classes,
    H, W)`` probabilities (3-D: ``(N, classes, D, H, W)``); an image whose classifier says "no
    object" gets all background.
    The one place that writes the paper's inference (``GridUNet.predict_probabilities``,
    ``SegmentationOutput.probabilities``).
    """
    probabilities = torch.sigmoid(logits)
    if class_logits is None:
        return probabilities
    return probabilities * ClassificationGuidedModule.gate(class_logits, logits.dim() - 2)
