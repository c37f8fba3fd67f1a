"""Training losses: SSIM (Wang et al. 2004) with a separable window, PSNR.

:func:`ssim` is the loss gsplat's trainer uses (``fused_ssim(..., padding="valid")``): an 11x11
Gaussian window of sigma 1.5, K1 = 0.01, K2 = 0.03, data range 1, averaged over the pixels whose
window lies inside the image. The window is the outer product of a 1-D Gaussian, so it is applied
as two 1-D convolutions (22 multiply-adds per pixel instead of 121) over the five maps (x, y, x²,
y², xy) at once; it matches the centre crop of torchmetrics' full SSIM map to float rounding
(tested). The reported SSIM metric is torchmetrics' own (reflection padding, the mean over the
whole image, as gsplat's evaluation): :mod:`splatforge.products.metrics`.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["gaussian_window", "masked_loss", "psnr", "psnr_from_mse", "ssim", "ssim_torch"]

_WINDOWS: dict[tuple, Tensor] = {}


def gaussian_window(size: int = 11, sigma: float = 1.5, device=None, dtype=torch.float32) -> Tensor:
    """``[size]`` normalised 1-D Gaussian (the separable factor of SSIM's window)."""
    key = (size, sigma, str(device), dtype)
    if key not in _WINDOWS:
        x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
        g = torch.exp(-(x**2) / (2 * sigma**2))
        _WINDOWS[key] = (g / g.sum()).to(device=device, dtype=dtype)
    return _WINDOWS[key]


class _CompiledSSIM(torch.autograd.Function):
    """The numba forward/backward (:mod:`splatforge.train._cpu_kernels`) for float32 CPU tensors."""

    @staticmethod
    def forward(ctx, render: Tensor, gt: Tensor, window: int, sigma: float) -> Tensor:  # type: ignore[override]
        from splatforge.train import _cpu_kernels as _ssim_cpu

        B, H, W, C = render.shape
        x = render.detach().permute(0, 3, 1, 2).reshape(B * C, H, W).contiguous().numpy()
        y = gt.detach().permute(0, 3, 1, 2).reshape(B * C, H, W).contiguous().numpy()
        g = gaussian_window(window, sigma).numpy()
        shape = (B * C, H - window + 1, W - window + 1)
        maps = [np.empty(shape, np.float32) for _ in range(3)]
        total = _ssim_cpu.ssim_fwd(x, y, g, *maps)
        ctx.saved = (x, y, g, maps, (B, H, W, C))
        return torch.tensor(total / (shape[0] * shape[1] * shape[2]), dtype=render.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        from splatforge.train import _cpu_kernels as _ssim_cpu

        x, y, g, maps, (B, H, W, C) = ctx.saved
        n = maps[0].size
        out = np.empty_like(x)
        _ssim_cpu.ssim_bwd(x, y, g, *maps, float(grad) / n, out)
        return torch.from_numpy(out).view(B, C, H, W).permute(0, 2, 3, 1), None, None, None


def ssim(render: Tensor, gt: Tensor, window: int = 11, sigma: float = 1.5) -> Tensor:
    """Mean SSIM of ``[B, H, W, C]`` images in [0, 1] over the valid region; differentiable with
    respect to ``render``. Float32 CPU tensors take the compiled path, others plain torch.

    Raises:
        ValueError: images of different shapes or smaller than the window.
    """
    if render.shape != gt.shape or render.dim() != 4:
        raise ValueError(
            f"ssim needs two [B, H, W, C] images of one shape, got {list(render.shape)} and {list(gt.shape)}"
        )
    _B, H, W, _C = render.shape
    if H < window or W < window:
        raise ValueError(f"ssim needs images of at least {window}x{window} pixels, got {W}x{H}")
    if (
        render.device.type == "cpu"
        and render.dtype == torch.float32
        and gt.dtype == torch.float32
        and not gt.requires_grad
    ):
        return _CompiledSSIM.apply(render, gt, window, sigma)
    return ssim_torch(render, gt, window, sigma)


def ssim_torch(render: Tensor, gt: Tensor, window: int = 11, sigma: float = 1.5) -> Tensor:
    """:func:`ssim` in plain torch (any device or dtype; the reference of the compiled path)."""
    B, H, W, C = render.shape
    x = render.permute(0, 3, 1, 2)
    y = gt.permute(0, 3, 1, 2)
    g = gaussian_window(window, sigma, render.device, render.dtype).view(1, 1, window)
    w2, h2 = W - window + 1, H - window + 1
    # the five maps as rows of one channel: filter along x, transpose, filter along y
    maps = torch.stack([x, y, x * x, y * y, x * y], dim=1).reshape(-1, 1, W)
    maps = F.conv1d(maps, g).view(-1, H, w2).transpose(1, 2).reshape(-1, 1, H)
    mu_x, mu_y, xx, yy, xy = F.conv1d(maps, g).view(B, 5, C, w2, h2).unbind(1)
    mu_xx, mu_yy, mu_xy = mu_x * mu_x, mu_y * mu_y, mu_x * mu_y
    c1, c2 = 0.01**2, 0.03**2
    num = (2 * mu_xy + c1) * (2 * (xy - mu_xy) + c2)
    den = (mu_xx + mu_yy + c1) * ((xx - mu_xx) + (yy - mu_yy) + c2)
    return (num / den).mean()


def psnr_from_mse(mse: float) -> float:
    """PSNR in dB of images in [0, 1] from their mean squared error, capped at 100 dB."""
    return min(100.0, -10.0 * math.log10(max(mse, 1e-10)))


def psnr(render: Tensor, gt: Tensor) -> float:
    """PSNR in dB of images in [0, 1] (``render`` clamped to [0, 1] first), capped at 100 dB."""
    return psnr_from_mse(torch.mean((render.detach().clamp(0.0, 1.0) - gt) ** 2).item())


def masked_loss(render: Tensor, gt: Tensor, mask: Tensor, ssim_lambda: float) -> Tensor:
    """``(1 - l) L1 + l (1 - SSIM)`` over the kept pixels of ``mask [B, H, W, 1]`` (1 = keep).

    Both images are set to 0 where the mask is 0 before the SSIM, so nothing inside the mask,
    rendered or captured, reaches the loss or its gradient (tested: a perturbation there
    changes no gradient); L1 is the mean over the kept pixels, and ``1 - SSIM`` (whose windows
    are 1 on masked areas) is divided by the kept fraction, so a half-masked image weighs as an
    unmasked one.
    """
    keep = mask.expand_as(render)
    n = keep.sum().clamp(min=1.0)
    l1 = ((render - gt).abs() * keep).sum() / n
    s = ssim(render * keep, gt * keep)
    return (1.0 - ssim_lambda) * l1 + ssim_lambda * (1.0 - s) * (keep.numel() / n)
