"""The UNet# training losses (SPEC section 2), on logits, pure PyTorch.

Conventions shared by the segmentation losses:

- ``logits``: ``(N, C, H, W)`` raw scores (or ``(N, C, D, H, W)`` volumes: every loss here
  works on any number of spatial dimensions, ``H * W`` below reading ``D * H * W``);
  probabilities are ``sigmoid(logits)`` (every channel is a binary foreground/background map,
  ``C = 1`` for nuclei).
- ``target``: same shape, values in ``{0, 1}`` (focal and Dice also accept soft targets in
  ``[0, 1]``); bool or integer tensors are converted.
- "per image": a loss computed over all ``C * H * W`` values of each image, then averaged over
  the ``N`` images (the paper's Eq. 6 averages over the batch); ``per_image=False`` treats the
  whole batch as one set of ``N * C * H * W`` values.

The paper's mixed loss per branch (Eq. 2): ``0.5 * focal + 1 * soft Dice + 0.5 * Lovasz hinge``.
``deep_supervision_loss`` averages it over the branches (the paper's accurate mode); ``cgm_loss``
trains the classification-guided modules.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor

REDUCTIONS = ("mean", "sum", "none")
DEEP_SUPERVISION_TARGETS = ("pool", "upsample")


def _checked(logits: Tensor, target: Tensor, name: str) -> Tensor:
    """``target`` as a tensor of ``logits``' dtype, after checking that the shapes agree."""
    if logits.shape != target.shape:
        raise ValueError(
            f"{name}: logits {tuple(logits.shape)} and target {tuple(target.shape)} must have "
            "the same shape (N, C, H, W)"
        )
    return target.to(logits.dtype)


def focal_loss(
    logits: Tensor,
    target: Tensor,
    alpha: Optional[float] = 0.25,
    gamma: float = 2.0,
    reduction: str = "mean",
) -> Tensor:
    """Sigmoid focal loss (Lin et al. 2017), element-wise, as RetinaNet and torchvision.

    ``FL = -alpha_t * (1 - p_t)**gamma * log(p_t)``, with ``p = sigmoid(logits)``,
    ``p_t = p`` where the target is 1 and ``1 - p`` where it is 0, ``alpha_t = alpha`` for
    foreground and ``1 - alpha`` for background (soft targets interpolate both). ``log(p_t)``
    is computed as the binary cross-entropy with logits, so it is stable for large logits.

    Args:
        logits: ``(N, C, H, W)`` (any shape works).
        target: same shape.
        alpha: foreground weight in ``[0, 1]``; ``None`` weights both classes by 1.
        gamma: focusing exponent (0 gives the alpha-weighted cross-entropy).
        reduction: ``"mean"`` over all elements (default), ``"sum"`` or ``"none"``.
    """
    target = _checked(logits, target, "focal_loss")
    if reduction not in REDUCTIONS:
        raise ValueError(f"focal_loss: reduction must be one of {REDUCTIONS}, got {reduction!r}")
    cross_entropy = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    p = torch.sigmoid(logits)
    p_t = p * target + (1 - p) * (1 - target)
    loss = (1 - p_t) ** gamma * cross_entropy
    if alpha is not None:
        loss = (alpha * target + (1 - alpha) * (1 - target)) * loss
    if reduction == "mean":
        return loss.mean()
    return loss.sum() if reduction == "sum" else loss


def soft_dice_loss(
    logits: Tensor, target: Tensor, smooth: float = 1.0, per_image: bool = True
) -> Tensor:
    """Laplace-smoothed soft Dice loss: ``1 - (2 * sum(Y * P) + s) / (sum(Y) + sum(P) + s)``.

    ``P = sigmoid(logits)``, ``s = smooth`` (the paper's 1: no division by zero, and an empty
    target with an empty prediction costs 0). Sums run over each image's ``C * H * W`` values
    and the loss is averaged over the images (``per_image``, the paper's Eq. 6), or over the
    whole batch at once.

    Args:
        logits: ``(N, C, H, W)``.
        target: same shape.
        smooth: the Laplace smoothing term ``s``.
        per_image: one Dice per image, averaged (default), or one for the batch.

    Returns:
        A scalar in ``[0, 1)``.
    """
    target = _checked(logits, target, "soft_dice_loss")
    p = torch.sigmoid(logits)
    dims = tuple(range(1, logits.dim())) if per_image else tuple(range(logits.dim()))
    intersection = (p * target).sum(dims)
    dice = (2 * intersection + smooth) / (target.sum(dims) + p.sum(dims) + smooth)
    return (1 - dice).mean()


def _lovasz_gradient(gt_sorted: Tensor) -> Tensor:
    """Gradient of the Lovasz extension of the Jaccard loss at errors sorted descending.

    ``gt_sorted``: ``(B, P)`` 0/1 labels, each row in the order of decreasing error. Entry
    ``k`` of a row is ``J(first k + 1 pixels) - J(first k pixels)``, ``J`` the Jaccard loss
    ``|M| / |G ∪ M|`` of the mispredicted set ``M`` against the foreground ``G``.
    """
    foreground = gt_sorted.sum(dim=1, keepdim=True)
    intersection = foreground - gt_sorted.cumsum(dim=1)
    union = foreground + (1 - gt_sorted).cumsum(dim=1)  # >= 1: no division by zero
    jaccard = 1 - intersection / union
    return torch.cat([jaccard[:, :1], jaccard[:, 1:] - jaccard[:, :-1]], dim=1)


def lovasz_hinge(logits: Tensor, target: Tensor, per_image: bool = True) -> Tensor:
    """Binary Lovasz hinge loss (Berman, Rannen Triki and Blaschko, CVPR 2018).

    Per image: ``signs = 2 * y - 1``, hinge errors ``e = 1 - logits * signs``, sorted
    descending; the loss is ``dot(relu(e_sorted), g)`` with ``g`` the gradient of the Lovasz
    extension of the Jaccard loss (``_lovasz_gradient``), i.e. the Lovasz extension evaluated
    at ``relu(e)``. An image without foreground costs ``relu(max e)``.

    Args:
        logits: ``(N, C, H, W)``; the ``C * H * W`` values of an image form one set.
        target: same shape, 0/1.
        per_image: the loss of each image, averaged (default); or one loss over the batch.

    Returns:
        A scalar.
    """
    target = _checked(logits, target, "lovasz_hinge")
    rows = logits.shape[0] if per_image else 1
    logits = logits.reshape(rows, -1)
    target = target.reshape(rows, -1)
    errors = 1 - logits * (2 * target - 1)
    errors_sorted, order = torch.sort(errors, dim=1, descending=True)
    gradient = _lovasz_gradient(torch.gather(target, 1, order))
    return (F.relu(errors_sorted) * gradient).sum(dim=1).mean()


def mixed_loss(
    logits: Tensor,
    target: Tensor,
    focal_weight: float = 0.5,
    dice_weight: float = 1.0,
    lovasz_weight: float = 0.5,
    *,
    alpha: Optional[float] = 0.25,
    gamma: float = 2.0,
    smooth: float = 1.0,
    per_image: bool = True,
) -> Tensor:
    """The paper's segmentation loss of one branch (Eq. 2):
    ``0.5 * focal_loss + 1.0 * soft_dice_loss + 0.5 * lovasz_hinge`` by default.

    ``(N, C, H, W)`` logits and target -> scalar. ``alpha``, ``gamma`` go to the focal loss,
    ``smooth`` to Dice, ``per_image`` to Dice and Lovasz; use ``functools.partial`` to pass
    other settings through ``deep_supervision_loss``.
    """
    loss = focal_weight * focal_loss(logits, target, alpha, gamma)
    loss = loss + dice_weight * soft_dice_loss(logits, target, smooth, per_image)
    return loss + lovasz_weight * lovasz_hinge(logits, target, per_image)


def deep_supervision_loss(
    branch_logits: Union[Tensor, Sequence[Tensor]],
    target: Tensor,
    mode: str = "pool",
    loss: Callable[[Tensor, Tensor], Tensor] = mixed_loss,
) -> Tensor:
    """Average of ``loss`` over the branches (the paper's accurate mode).

    Each branch is compared with the ground truth at its own size: ``mode="pool"`` (the
    paper's, default) max-pools the target down to the branch's ``(h, w)`` (adaptive
    max-pooling: a coarse pixel is foreground if any pixel under it is; exact ``2**k``
    max-pooling for sizes that divide); ``mode="upsample"`` (the official code's) upsamples the
    branch's logits to the target's size, bilinearly with ``align_corners=True``, as the
    network upsamples. Full-size branches are used as they are. Volumes (``(N, C, D, H, W)``,
    the V-Net family) work the same way, pooling and interpolating in 3-D (trilinearly).

    Args:
        branch_logits: ``(N, C, h_b, w_b)`` logits per branch (a ``GridUNet``'s list, or one
            tensor).
        target: ``(N, C, H, W)`` full-size ground truth.
        mode: ``"pool"`` or ``"upsample"``.
        loss: the per-branch loss ``(logits, target) -> scalar``.
    """
    if mode not in DEEP_SUPERVISION_TARGETS:
        raise ValueError(
            f"deep_supervision_loss: mode must be one of {DEEP_SUPERVISION_TARGETS}, got {mode!r}"
        )
    if isinstance(branch_logits, Tensor):
        branch_logits = [branch_logits]
    if len(branch_logits) == 0:
        raise ValueError("deep_supervision_loss: no branch logits")
    size = tuple(target.shape[2:])
    pool = {2: F.adaptive_max_pool2d, 3: F.adaptive_max_pool3d}.get(len(size))
    if pool is None:
        raise ValueError(
            f"deep_supervision_loss: target {tuple(target.shape)} must be (N, C, H, W) or "
            "(N, C, D, H, W)"
        )
    interpolation = "bilinear" if len(size) == 2 else "trilinear"
    losses = []
    for logits in branch_logits:
        branch_size = tuple(logits.shape[2:])
        branch_target = target
        if branch_size != size:
            if mode == "pool":
                branch_target = pool(target.to(logits.dtype), branch_size)
            else:
                logits = F.interpolate(
                    logits, size=size, mode=interpolation, align_corners=True
                )
        losses.append(loss(logits, branch_target))
    return torch.stack(losses).mean()


def has_foreground(target: Tensor) -> Tensor:
    """``(N, ...)`` ground truth -> ``(N,)`` int64 labels: 1 where an image has any foreground."""
    return (target.reshape(target.shape[0], -1) > 0).any(dim=1).long()


def cgm_loss(class_logits: Union[Tensor, Sequence[Tensor]], target: Tensor) -> Tensor:
    """Loss of the classification-guided modules: does the image contain foreground?

    The paper trains the CGM with BCE on its softmax output. Over two classes,
    ``softmax(z)[1] = sigmoid(z[1] - z[0])``, so BCE on that probability is exactly the
    cross-entropy of the two logits, which is computed here (stable, no softmax first).
    Averaged over images, then over branches.

    Args:
        class_logits: ``(N, 2)`` CGM logits, or one per branch (``SegmentationOutput``'s
            ``has_object``).
        target: ``(N, C, H, W)`` segmentation ground truth (an image is positive if any pixel
            is foreground), or ``(N,)`` 0/1 image labels.
    """
    if isinstance(class_logits, Tensor):
        class_logits = [class_logits]
    if len(class_logits) == 0:
        raise ValueError("cgm_loss: no class logits")
    labels = target.long() if target.dim() == 1 else has_foreground(target)
    losses = [F.cross_entropy(logits, labels) for logits in class_logits]
    return torch.stack(losses).mean()
