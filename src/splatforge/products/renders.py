"""Render sets with ground truth, depth maps and metrics for a trained run.

Layout (Inria's): ``RUN/{train,test}/ours_<step>/{renders,gt}/NNNNN.png`` where ``NNNNN`` is
the position of the view in that split (views sorted by image name), plus
``depth/NNNNN.npy`` (float32 expected camera-z depth, world units; 0 where nothing was drawn)
on request. ``RUN/metrics.json`` holds PSNR, SSIM and LPIPS per split, mean and per view.
"""

from __future__ import annotations

import importlib.util
import json
import logging
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from splatforge._fs import atomic_path
from splatforge.data.images import write_png
from splatforge.train.losses import psnr as psnr_fn
from splatforge.train.losses import ssim as ssim_fn

log = logging.getLogger(__name__)

__all__ = ["render_split", "evaluate", "lpips_metric", "write_depth"]


def lpips_metric() -> Optional[Callable[[torch.Tensor, torch.Tensor], float]]:
    """LPIPS (VGG, Zhang et al. 2018) through torchmetrics when it can run offline, else None.

    It needs torchvision and the network weights already in the torch hub cache; there is no
    download here (machines without network). A one-line warning says why it is missing.
    """
    if importlib.util.find_spec("torchvision") is None:
        log.warning("LPIPS unavailable: torchvision is not installed (metrics report lpips: null)")
        return None
    try:
        from torchmetrics.image.lpip import LearnedPerceptualImagePatchSimilarity

        metric = LearnedPerceptualImagePatchSimilarity(net_type="vgg", normalize=True)
    except (ImportError, OSError, RuntimeError, ModuleNotFoundError) as exc:
        log.warning("LPIPS unavailable (weights not present locally?): %s (metrics report lpips: null)", exc)
        return None

    def run(render: torch.Tensor, gt: torch.Tensor) -> float:
        return float(metric(render.permute(0, 3, 1, 2).clamp(0, 1).cpu(), gt.permute(0, 3, 1, 2).cpu()))

    return run


def write_depth(path: Path, depth: torch.Tensor, alpha: torch.Tensor, png_preview: bool = False) -> list[Path]:
    """Write one depth map atomically: ``path`` (``.npy``, float32 ``[H, W]`` expected camera-z
    depth in world units, 0 where ``alpha [H, W]`` <= 1e-4, i.e. nothing was drawn) and, with
    ``png_preview``, a 16-bit PNG beside it (the 99th percentile of the depths is white).
    Returns the written paths."""
    from PIL import Image

    d = torch.where(alpha > 1e-4, depth, torch.zeros_like(alpha)).cpu().numpy().astype(np.float32)
    with atomic_path(path) as tmp:
        np.save(tmp, d)
    if not png_preview:
        return [Path(path)]
    top = float(np.percentile(d[d > 0], 99)) if (d > 0).any() else 1.0
    png = Path(path).with_suffix(".png")
    with atomic_path(png) as tmp:
        Image.fromarray((np.clip(d / max(top, 1e-9), 0, 1) * 65535).astype(np.uint16)).save(tmp)
    return [Path(path), png]


@torch.no_grad()
def render_split(trainer, split: str, *, depth: bool = False, write: bool = True,
                 lpips: Optional[Callable] = None) -> dict:  # fmt: skip
    """Render every view of ``split`` ("train" or "test") with ``trainer``'s current Gaussians,
    write renders/gt (and depth) PNGs under ``trainer.output``, and return its metrics."""
    ids = trainer.scene.split[split]
    folder = trainer.output / split / f"ours_{trainer.step}"
    per_view = []
    for pos, index in enumerate(ids):
        mode = "RGB+ED" if depth else "RGB"
        render, alpha, _ = trainer.render(index, render_mode=mode)
        rgb = render[..., :3]
        gt = trainer.image(index)[None]
        if write:
            write_png(rgb[0], folder / "renders" / f"{pos:05d}.png")
            write_png(gt[0], folder / "gt" / f"{pos:05d}.png")
            if depth:
                write_depth(folder / "depth" / f"{pos:05d}.npy", render[0, ..., 3], alpha[0, ..., 0])
        per_view.append({
            "index": index, "image_name": trainer.scene.image_names[index],
            "psnr": psnr_fn(rgb, gt), "ssim": float(ssim_fn(rgb.clamp(0, 1), gt)),
            "lpips": lpips(rgb, gt) if lpips is not None else None,
        })  # fmt: skip
    mean = lambda key: (float(np.mean([v[key] for v in per_view])) if per_view and per_view[0][key] is not None else None)  # noqa: E731
    return {"psnr": mean("psnr"), "ssim": mean("ssim"), "lpips": mean("lpips"), "num_views": len(per_view), "per_view": per_view}


def evaluate(trainer, splits=("test", "train"), *, depth: bool = False, write_images: bool = True) -> dict:
    """Metrics of ``splits`` written to ``RUN/metrics.json`` (atomically) and returned:
    ``{"test": {psnr, ssim, lpips, num_views, per_view}, "train": {...}, "step",
    "num_gaussians", "train_seconds"}``."""
    lpips = lpips_metric()
    result = {split: render_split(trainer, split, depth=depth, write=write_images, lpips=lpips) for split in splits}
    result.update(step=trainer.step, num_gaussians=len(trainer.params["means"]), train_seconds=trainer.train_seconds)
    with atomic_path(trainer.output / "metrics.json") as tmp:
        tmp.write_text(json.dumps(result, indent=2, allow_nan=False))
    return result
