"""Photometric augmentation of the shipped models' recipe (``INPUT.PHOTOMETRIC``).

A model trained on synthetic nuclei must meet cameras, exposures, stains and scanners it never
saw. Each training image (after the geometric augmentations, before the per-image percentile
normalisation) goes through torchvision's own transforms and scikit-image's stain separation,
each step with its probability:

=====================  ======  ================================================================
step                   p       what
=====================  ======  ================================================================
stain jitter           0.5     colour images only: the hematoxylin, eosin and DAB optical
                               densities (``skimage.color.rgb2hed``) each scaled by U(0.85,
                               1.15) and shifted by U(-0.03, 0.03), then ``hed2rgb`` (the HED
                               jitter of Tellez et al. 2018)
colour jitter          0.8     ``ColorJitter(brightness=0.3, contrast=0.4, saturation=0.4,
                               hue=0.05)`` (gray images: brightness and contrast only)
gamma                  0.5     ``adjust_gamma`` with gamma log-uniform in [0.6, 1.7]
grayscale              0.15    ``RandomGrayscale``: colour stains seen as one channel
blur                   0.3     ``GaussianBlur(5, sigma 0.3..1.5)``: focus
noise                  0.3     ``GaussianNoise`` of sigma U(0.005, 0.04) (image in [0, 1])
=====================  ======  ================================================================

Randomness is torch's (the data loader seeds each worker) and numpy's ``Generator`` passed in.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch
from skimage.color import hed2rgb, rgb2hed
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

__all__ = ["PhotometricAugmentation"]


class PhotometricAugmentation:
    """``(H, W, 3)`` uint8 RGB -> the same, photometrically changed (module docstring)."""

    def __init__(self) -> None:
        self.colour = v2.RandomApply(
            [v2.ColorJitter(brightness=0.3, contrast=0.4, saturation=0.4, hue=0.05)], p=0.8)
        self.intensity = v2.RandomApply([v2.ColorJitter(brightness=0.3, contrast=0.4)], p=0.8)
        self.grayscale = v2.RandomGrayscale(p=0.15)
        self.blur = v2.RandomApply([v2.GaussianBlur(5, sigma=(0.3, 1.5))], p=0.3)

    def __call__(self, rgb: np.ndarray, rng: Optional[np.random.Generator] = None) -> np.ndarray:
        if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
            raise ValueError(f"expected an (H, W, 3) uint8 RGB image, got {rgb.shape} {rgb.dtype}")
        rng = rng or np.random.default_rng(int(torch.randint(0, 2**31 - 1, ()).item()))
        sample = rgb[::4, ::4].astype(np.int16)
        colour = bool(np.abs(sample - sample[:, :, :1]).max() > 8)  # not R = G = B
        image = rgb
        if colour and rng.random() < 0.5:
            image = _stain_jitter(image, rng)
        x = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)
        x = F.to_dtype(x, torch.float32, scale=True)
        x = self.colour(x) if colour else self.intensity(x)  # gray stays gray
        if rng.random() < 0.5:
            x = F.adjust_gamma(x.clamp(0.0, 1.0), float(np.exp(rng.uniform(np.log(0.6), np.log(1.7)))))
        x = self.grayscale(x)
        x = self.blur(x)
        if rng.random() < 0.3:
            noise = torch.randn_like(x if colour else x[:1])  # gray: one noise for R, G, B
            x = x + noise * float(rng.uniform(0.005, 0.04))
        x = (x.clamp(0.0, 1.0) * 255.0).round().to(torch.uint8)
        return x.permute(1, 2, 0).numpy()


def _stain_jitter(rgb: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    hed = rgb2hed(rgb)
    hed = hed * rng.uniform(0.85, 1.15, size=3) + rng.uniform(-0.03, 0.03, size=3)
    out = hed2rgb(hed)
    return np.clip(np.rint(out * 255.0), 0, 255).astype(np.uint8)
