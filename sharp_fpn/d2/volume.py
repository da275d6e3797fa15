"""3-D (volumetric) binary segmentation in detectron2: Table 1's LUNA16 column, the V-Net family.

``VolumeSegmentor`` (registered in ``META_ARCH_REGISTRY``) trains and runs a 3-D ``GridUNet``:
``MODEL.UNET.ARCH`` one of ``VNET_ARCHS`` (``vnet``, ``wvnet``, ``vnet2plus``, ``vnet3plus``,
``vnet_sharp``: the 2-D grid built with ``dims=3``, 5x5x5 node convs, one input channel),
``MODEL.UNET.WIDTH_MULT`` times its widths, as ``sharp_fpn.d2.semantic.build_semantic_network``
builds the 2-D ones. Training is the 2-D model's: the mixed loss averaged over the deep
supervision branches (each against the ground truth max-pooled to it, ``DS_TARGET "pool"``,
or its logits upsampled), plus the CGM loss (``semantic.segmentation_losses``, one function for
both); inference is ``GridUNet.predict_probabilities`` of the final branch (or
``PRUNE_LEVEL``'s), CGM-gated. Its data (patches, flips, rotations, normalisation) are
TorchIO's: :mod:`sharp_fpn.d2.volume_data`.
"""
from __future__ import annotations

from typing import Any, Dict, List, Sequence, Tuple

import torch
import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.modeling import META_ARCH_REGISTRY
from torch import Tensor, nn

from ..losses import DEEP_SUPERVISION_TARGETS
from ..models.unet import GridUNet
from .config import check_value
from .semantic import build_semantic_network, check_loss_config, segmentation_losses

__all__ = ["VOLUME_META_ARCHITECTURE", "VolumeSegmentor", "is_volume", "pad_volumes"]

VOLUME_META_ARCHITECTURE = "VolumeSegmentor"


def is_volume(cfg) -> bool:
    """Whether ``cfg`` builds the 3-D meta-architecture (its data path and evaluator differ)."""
    return cfg.MODEL.META_ARCHITECTURE == VOLUME_META_ARCHITECTURE


def pad_volumes(volumes: Sequence[Tensor], divisor: int, value: float = 0.0
                ) -> Tuple[Tensor, List[Tuple[int, int, int]]]:
    """Stack ``(C, D0, D1, D2)`` volumes into ``(N, C, P0, P1, P2)``, each side padded at its
    end with ``value`` to the batch's largest, rounded up to a multiple of ``divisor``.

    Returns the batch and each volume's own ``(D0, D1, D2)`` (to crop predictions back).
    detectron2's ``ImageList`` pads the last two dimensions only.
    """
    sizes = [tuple(int(s) for s in v.shape[-3:]) for v in volumes]
    target = [max(s[k] for s in sizes) for k in range(3)]
    target = [-(-t // divisor) * divisor for t in target]
    padded = []
    for v, size in zip(volumes, sizes):
        pad: List[int] = []
        for k in (2, 1, 0):  # F.pad counts from the last dimension
            pad += [0, target[k] - size[k]]
        padded.append(F.pad(v, pad, value=value))
    return torch.stack(padded), sizes


@META_ARCH_REGISTRY.register()
class VolumeSegmentor(nn.Module):
    """Binary 3-D segmentation (LUNA16 nodules): foreground probabilities per voxel.

    Training input: a list of dicts with ``"image"`` ``(1, D0, D1, D2)`` float (normalised by
    the data path) and ``"sem_seg"`` ``(D0, D1, D2)`` 0/1 (``volume_data``'s patches). Returns
    ``{"loss_seg", ["loss_cgm"]}`` as ``SemanticNucleiSegmentor``.

    Inference output: one dict per volume, ``{"sem_seg": (1, D0, D1, D2)}`` sigmoid
    probabilities of the final branch (or ``X[0][PRUNE_LEVEL]``'s), CGM-gated; the whole
    volume at once (padded to the network's stride, cropped back), or with ``test_patch_size``
    patch by patch (``tio.GridSampler``) averaged where they overlap (``tio.GridAggregator``).
    """

    @configurable
    def __init__(
        self,
        *,
        network: GridUNet,
        ds_target: str = "pool",
        loss_weights: Sequence[float] = (0.5, 1.0, 0.5),
        cgm_loss_weight: float = 1.0,
        prune_level: int = 0,
        test_patch_size: Sequence[int] = (),
        test_patch_overlap: Sequence[int] = (16, 16, 16),
    ):
        """
        Args:
            network: a 3-D ``GridUNet`` with one output class.
            ds_target: ``"pool"`` (the paper's) or ``"upsample"`` (the official code's).
            loss_weights: focal, soft Dice and Lovasz hinge weights of the mixed loss.
            cgm_loss_weight: weight of the CGM loss (networks with CGMs).
            prune_level: 0, or ``k``: infer with the sub-network ending at ``X[0][k]``.
            test_patch_size: ``()`` (whole volumes) or three sides, multiples of the
                network's ``size_divisibility``: patch-wise inference.
            test_patch_overlap: overlap of the inference patches (even sides, TorchIO's rule).
        """
        super().__init__()
        if network.dims != 3:
            raise ValueError(f"VolumeSegmentor needs a 3-D network, got dims={network.dims}")
        if ds_target not in DEEP_SUPERVISION_TARGETS:
            raise ValueError(
                f"ds_target must be one of {DEEP_SUPERVISION_TARGETS}, got {ds_target!r}")
        if len(loss_weights) != 3:
            raise ValueError(f"loss_weights needs (focal, dice, lovasz), got {list(loss_weights)}")
        divisor = network.size_divisibility
        if test_patch_size and (len(test_patch_size) != 3
                                or any(s <= 0 or s % divisor for s in test_patch_size)):
            raise ValueError(f"TEST.VOLUME.PATCH_SIZE: expected three sides, multiples of "
                             f"{divisor}, got {list(test_patch_size)}")
        if test_patch_size and (len(test_patch_overlap) != 3
                                or any(o < 0 or o % 2 or o >= s for o, s in
                                       zip(test_patch_overlap, test_patch_size))):
            raise ValueError(f"TEST.VOLUME.PATCH_OVERLAP: expected three even sides below the "
                             f"patch's {list(test_patch_size)}, got {list(test_patch_overlap)}")
        self.network = network
        self.ds_target = ds_target
        self.loss_weights = tuple(float(w) for w in loss_weights)
        self.cgm_loss_weight = float(cgm_loss_weight)
        self.prune_level = prune_level
        self.test_patch_size = tuple(int(s) for s in test_patch_size)
        self.test_patch_overlap = tuple(int(o) for o in test_patch_overlap)
        self.register_buffer("_device_probe", torch.zeros(()), False)

    @classmethod
    def from_config(cls, cfg) -> Dict[str, Any]:
        u = cfg.MODEL.UNET
        check_loss_config(u)
        network = build_semantic_network(cfg, dims=3)
        patch = list(cfg.INPUT.VOLUME.PATCH_SIZE)
        divisor = network.size_divisibility
        check_value("INPUT.VOLUME.PATCH_SIZE", patch,
                    len(patch) == 3 and all(s > 0 and s % divisor == 0 for s in patch),
                    f"three sides, multiples of the network's coarsest stride {divisor}")
        return {
            "network": network,
            "ds_target": u.DS_TARGET,
            "loss_weights": u.LOSS_WEIGHTS,
            "cgm_loss_weight": u.CGM_LOSS_WEIGHT,
            "prune_level": u.PRUNE_LEVEL,
            "test_patch_size": cfg.TEST.VOLUME.PATCH_SIZE,
            "test_patch_overlap": cfg.TEST.VOLUME.PATCH_OVERLAP,
        }

    @property
    def device(self) -> torch.device:
        return self._device_probe.device

    def forward(self, batched_inputs: List[Dict[str, Any]]):
        """Losses in training, ``[{"sem_seg": (1, D0, D1, D2)}]`` at inference (class doc)."""
        images = [x["image"].to(self.device, torch.float32) for x in batched_inputs]
        if not self.training:
            return [{"sem_seg": self.predict_volume(image)} for image in images]
        if any("sem_seg" not in x for x in batched_inputs):
            raise ValueError("training inputs need 'sem_seg' (the volume's mask); use "
                             "sharp_fpn.d2.volume_data.build_volume_train_loader")
        divisor = self.network.size_divisibility
        batch, _ = pad_volumes(images, divisor)
        masks = [(x["sem_seg"].to(self.device) > 0).to(batch.dtype)[None]
                 for x in batched_inputs]
        target, _ = pad_volumes(masks, divisor)  # (N, 1, P0, P1, P2), padding = background
        output = self.network.forward_branches(batch)
        return segmentation_losses(
            output, target, self.ds_target, self.loss_weights, self.cgm_loss_weight)

    def _probabilities(self, batch: Tensor) -> Tensor:
        return self.network.predict_probabilities(batch, self.prune_level or None)

    def predict_volume(self, image: Tensor) -> Tensor:
        """``(1, D0, D1, D2)`` volume -> ``(1, D0, D1, D2)`` foreground probabilities."""
        if not self.test_patch_size:
            batch, sizes = pad_volumes([image], self.network.size_divisibility)
            d0, d1, d2 = sizes[0]
            return self._probabilities(batch)[0, :, :d0, :d1, :d2]
        import torchio as tio  # the patch path only: TorchIO costs ~2 s to import

        subject = tio.Subject(image=tio.ScalarImage(tensor=image.cpu()))
        sampler = tio.GridSampler(subject, self.test_patch_size, self.test_patch_overlap,
                                  padding_mode=0)
        aggregator = tio.GridAggregator(sampler, overlap_mode="average")
        loader = torch.utils.data.DataLoader(sampler, batch_size=1)
        for patches in loader:
            probabilities = self._probabilities(patches["image"][tio.DATA].to(self.device))
            aggregator.add_batch(probabilities.cpu(), patches[tio.LOCATION])
        return aggregator.get_output_tensor().to(self.device)
