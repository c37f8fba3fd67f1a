"""Image losses and metrics: SSIM (Wang et al. 2004) through torchmetrics, PSNR."""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torchmetrics.functional.image import structural_similarity_index_measure

__all__ = ["ssim", "psnr"]


def ssim(render: Tensor, gt: Tensor) -> Tensor:
    """Mean SSIM of ``[B, H, W, 3]`` images in [0, 1]: the standard 11x11 Gaussian window with
    sigma 1.5, K1 = 0.01, K2 = 0.03 (as Inria's ``utils/loss_utils.py``); differentiable."""
    return structural_similarity_index_measure(
        render.permute(0, 3, 1, 2), gt.permute(0, 3, 1, 2), data_range=1.0, kernel_size=11, sigma=1.5
    )


def psnr(render: Tensor, gt: Tensor) -> float:
    """PSNR in dB of images in [0, 1] (``render`` clamped to [0, 1] first), capped at 100 dB."""
    mse = torch.mean((render.detach().clamp(0.0, 1.0) - gt) ** 2).item()
    return min(100.0, -10.0 * math.log10(max(mse, 1e-10)))
