"""VGG as a detectron2 bottom-up ``Backbone``, with torchvision's parameter names.

``VGG.features`` is an ``nn.Sequential`` laid out exactly as torchvision's ``vgg{depth}``
(conv3x3-ReLU, max-pool) or ``vgg{depth}_bn`` (conv3x3-norm-ReLU, max-pool), so a torchvision
state dict loads once its keys are prefixed (``tools/convert_torchvision_weights.py``). For
VGG16 the pools sit at ``features`` indices 4, 9, 16, 23, 30 (with norm: 6, 13, 23, 33, 43).

Stages are named by the pool that ends them: ``pool1..pool5``, strides 2, 4, 8, 16, 32,
channels 64, 128, 256, 512, 512. The necks read ``pool2..pool5`` as C2..C5.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple, Union

from detectron2.layers import FrozenBatchNorm2d, ShapeSpec, get_norm
from detectron2.modeling import BACKBONE_REGISTRY, Backbone
from torch import Tensor, nn

from .config import check_value

POOL = "M"
# torchvision's VGG configurations: conv widths, POOL for a 2x2 max-pool
VGG_LAYOUTS: Dict[int, Tuple[Union[int, str], ...]] = {
    11: (64, POOL, 128, POOL, 256, 256, POOL, 512, 512, POOL, 512, 512, POOL),
    13: (64, 64, POOL, 128, 128, POOL, 256, 256, POOL, 512, 512, POOL, 512, 512, POOL),
    16: (64, 64, POOL, 128, 128, POOL, 256, 256, 256, POOL, 512, 512, 512, POOL,
         512, 512, 512, POOL),
    19: (64, 64, POOL, 128, 128, POOL, 256, 256, 256, 256, POOL, 512, 512, 512, 512, POOL,
         512, 512, 512, 512, POOL),
}
STAGES: Tuple[str, ...] = ("pool1", "pool2", "pool3", "pool4", "pool5")


class VGG(Backbone):
    """A VGG bottom-up: ``(N, C, H, W)`` image -> ``{"poolk": (N, C_k, H / 2**k, W / 2**k)}``.

    Sizes are floored by each pool, as torchvision's. Only the layers up to the last requested
    stage are built (their indices unchanged), so unused layers hold no parameters.

    Args:
        depth: 11, 13, 16 or 19.
        norm: ``""`` for torchvision's ``vgg{depth}`` layout (conv-ReLU); any detectron2 norm
            name (``"BN"``, ``"FrozenBN"``, ``"SyncBN"``, ``"GN"``, ...) for its
            ``vgg{depth}_bn`` layout (conv-norm-ReLU; ``"BN"``/``"FrozenBN"`` load a
            ``vgg{depth}_bn`` state dict).
        in_channels: image channels.
        out_features: stages to return, among ``pool1..pool5``.
        freeze_at: freeze the first ``freeze_at`` stages (``1`` = ``pool1``, ..., ``0`` = none):
            their parameters stop learning and their BatchNorms become ``FrozenBatchNorm2d``,
            as detectron2's ``ResNet.freeze`` (``freeze_at=2`` freezes up to stride 4 for
            both).
    """

    def __init__(
        self,
        depth: int = 16,
        norm: str = "",
        in_channels: int = 3,
        out_features: Sequence[str] = STAGES[1:],
        freeze_at: int = 0,
    ):
        super().__init__()
        if depth not in VGG_LAYOUTS:
            raise ValueError(f"VGG depth must be one of {sorted(VGG_LAYOUTS)}, got {depth!r}")
        unknown = [name for name in out_features if name not in STAGES]
        if unknown or not out_features:
            raise ValueError(f"VGG out_features must be among {STAGES}, got {list(out_features)}")
        if not 0 <= freeze_at <= len(STAGES):
            raise ValueError(f"VGG freeze_at must be in 0..{len(STAGES)}, got {freeze_at}")
        last_stage = max(STAGES.index(name) for name in out_features)

        layers: List[nn.Module] = []
        self._stage_ends: Dict[int, str] = {}  # features index of each pool -> stage name
        self._out_feature_strides: Dict[str, int] = {}
        self._out_feature_channels: Dict[str, int] = {}
        channels = in_channels
        for width in VGG_LAYOUTS[depth]:
            if width == POOL:
                name = STAGES[len(self._stage_ends)]
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
                self._stage_ends[len(layers) - 1] = name
                self._out_feature_strides[name] = 2 ** len(self._stage_ends)
                self._out_feature_channels[name] = channels
                if len(self._stage_ends) > last_stage:
                    break
                continue
            layers.append(nn.Conv2d(channels, width, kernel_size=3, padding=1))
            if norm:
                layers.append(get_norm(norm, width))
            layers.append(nn.ReLU(inplace=True))
            channels = width
        self.features = nn.Sequential(*layers)
        self._out_features = list(out_features)
        self._init_weights()
        self.freeze(freeze_at)

    @property
    def stage_ends(self) -> Dict[str, int]:
        """``{"pool1": 4, ...}``: the ``features`` index of the pool that ends each stage."""
        return {name: index for index, name in self._stage_ends.items()}

    def _init_weights(self) -> None:
        """torchvision's VGG init: He (fan-out) convs, zero biases, identity norms."""
        for m in self.features.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)

    def freeze(self, freeze_at: int = 0) -> "VGG":
        """Freeze the layers of the first ``freeze_at`` stages (see the class doc); return self."""
        frozen_stages = min(freeze_at, len(self._stage_ends))  # stages past the last aren't built
        if frozen_stages == 0:
            return self
        end = self.stage_ends[STAGES[frozen_stages - 1]]
        for index in range(end + 1):
            layer = FrozenBatchNorm2d.convert_frozen_batchnorm(self.features[index])
            for p in layer.parameters():
                p.requires_grad = False
            self.features[index] = layer
        return self

    def forward(self, x: Tensor) -> Dict[str, Tensor]:
        """``(N, C, H, W)`` -> ``{name: (N, C_k, H_k, W_k)}`` for each of ``out_features``."""
        if x.dim() != 4:
            raise ValueError(f"VGG takes an (N, C, H, W) input, got shape {tuple(x.shape)}")
        outputs = {}
        for index, layer in enumerate(self.features):
            x = layer(x)
            name = self._stage_ends.get(index)
            if name in self._out_features:
                outputs[name] = x
        return outputs



@BACKBONE_REGISTRY.register()
def build_vgg_backbone(cfg, input_shape: Optional[ShapeSpec] = None) -> VGG:
    """VGG from ``MODEL.VGG.{DEPTH,NORM,OUT_FEATURES}`` and ``MODEL.BACKBONE.FREEZE_AT``."""
    vgg = cfg.MODEL.VGG
    check_value(
        "MODEL.VGG.DEPTH", vgg.DEPTH, vgg.DEPTH in VGG_LAYOUTS, f"one of {sorted(VGG_LAYOUTS)}"
    )
    check_value(
        "MODEL.VGG.OUT_FEATURES",
        vgg.OUT_FEATURES,
        bool(vgg.OUT_FEATURES) and set(vgg.OUT_FEATURES) <= set(STAGES),
        f"stages among {STAGES}",
    )
    return VGG(
        depth=vgg.DEPTH,
        norm=vgg.NORM,
        in_channels=3 if input_shape is None else input_shape.channels,
        out_features=vgg.OUT_FEATURES,
        freeze_at=cfg.MODEL.BACKBONE.FREEZE_AT,
    )
