"""Image metrics of renders against ground truth: PSNR, SSIM and LPIPS, through torchmetrics.

- ``psnr``: ``-10 log10(MSE)`` of the render clamped to [0, 1].
- ``ssim``: torchmetrics' ``structural_similarity_index_measure`` (11x11 Gaussian window, sigma
  1.5, reflection padding, the mean over the whole image), what gsplat's evaluation reports.
- ``lpips_vgg``: LPIPS with the VGG-16 backbone, the convention of Inria's ``metrics.py`` and
  most papers' tables; ``lpips_alex``: the AlexNet backbone, gsplat's trainer's. Both are
  torchmetrics' ``LearnedPerceptualImagePatchSimilarity`` (``normalize=True``: inputs in
  [0, 1]); its linear layers ship with torchmetrics, the backbones' ImageNet weights come from
  torchvision's files in the torch hub cache (``$TORCH_HOME/hub/checkpoints``). Nothing is
  downloaded here: where a file is missing the metric is ``None`` and :func:`lpips_metrics`
  says why.

torchvision must be the build that pairs with the installed torch; see :mod:`splatforge._torchvision`
for the CUDA wheel beside a CPU torch.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from splatforge._torchvision import ensure_torchvision_importable, import_torchvision

log = logging.getLogger(__name__)

__all__ = ["LPIPS_KEYS", "ensure_torchvision_importable", "import_torchvision", "lpips_metrics", "psnr", "ssim"]

#: metric key -> (torchmetrics net_type, torchvision weights enum, its member)
_LPIPS = {"lpips_vgg": ("vgg", "VGG16_Weights"), "lpips_alex": ("alex", "AlexNet_Weights")}
LPIPS_KEYS = tuple(_LPIPS)


def psnr(render: Tensor, gt: Tensor) -> float:
    """PSNR in dB of ``[B, H, W, 3]`` images in [0, 1] (render clamped first), at most 100. The
    mean squared error is summed in float64 by numpy, so the value does not depend on how many
    threads torch uses (a reported metric must not change with the machine's load)."""
    from splatforge.train.losses import psnr_from_mse

    d = (render.detach().clamp(0.0, 1.0) - gt).cpu().numpy().astype(np.float64)
    return psnr_from_mse(float(np.mean(d * d)))


def ssim(render: Tensor, gt: Tensor) -> float:
    """torchmetrics' SSIM of ``[B, H, W, 3]`` images in [0, 1] (see the module docstring)."""
    ensure_torchvision_importable()
    from torchmetrics.functional.image import structural_similarity_index_measure

    return float(
        structural_similarity_index_measure(
            render.clamp(0, 1).permute(0, 3, 1, 2), gt.permute(0, 3, 1, 2), data_range=1.0, kernel_size=11, sigma=1.5
        )
    )


def _weights_file(enum_name: str) -> Path:
    tv = import_torchvision()
    url = getattr(tv.models, enum_name).IMAGENET1K_V1.url
    return Path(torch.hub.get_dir()) / "checkpoints" / url.rsplit("/", 1)[-1]


def lpips_metrics(
    device: torch.device | str = "cpu",
) -> tuple[dict[str, Callable[[Tensor, Tensor], float]], str | None]:
    """The LPIPS metrics that can run here (``{"lpips_vgg": fn, "lpips_alex": fn}``, each
    ``fn(render [B, H, W, 3], gt) -> float``, images in [0, 1]) and, when any cannot, one line
    saying why (else None). Never downloads anything.
    """
    try:
        import_torchvision()
        from torchmetrics.image.lpip import LearnedPerceptualImagePatchSimilarity
    except ImportError as exc:
        return {}, f"LPIPS needs torchvision (torchvision==0.28.0 beside torch==2.13.0): {exc}"
    metrics: dict[str, Callable[[Tensor, Tensor], float]] = {}
    missing = []
    for key, (net, enum_name) in _LPIPS.items():
        path = _weights_file(enum_name)
        if not path.is_file():
            missing.append(f"{key} needs {path}")
            continue
        try:
            model = LearnedPerceptualImagePatchSimilarity(net_type=net, normalize=True).to(device).eval()
        except (OSError, RuntimeError, ValueError) as exc:
            missing.append(f"{key}: {path} does not load: {exc}")
            continue

        def run(render: Tensor, gt: Tensor, model=model) -> float:
            with torch.no_grad():
                return float(model(render.clamp(0, 1).permute(0, 3, 1, 2), gt.permute(0, 3, 1, 2).clamp(0, 1)))

        metrics[key] = run
    note = None
    if missing:
        note = "LPIPS backbone weights not in the torch hub cache (nothing is downloaded): " + "; ".join(missing)
    return metrics, note
