"""Render sets with ground truth, depth maps and metrics for a trained run.

Layout (Inria's): ``RUN/{train,test}/ours_<step>/{renders,gt}/NNNNN.png`` where ``NNNNN`` is
the position of the view in that split (views sorted by image name), plus
``depth/NNNNN.npy`` (float32 expected camera-z depth, world units; 0 where nothing was drawn)
on request. ``RUN/metrics.json`` holds PSNR, SSIM, LPIPS (VGG and AlexNet) per split, mean and
per view; see :mod:`splatforge.products.metrics`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from splatforge._fs import atomic_path
from splatforge.data.images import write_png
from splatforge.products.metrics import LPIPS_KEYS, lpips_metrics, psnr, ssim

log = logging.getLogger(__name__)

__all__ = ["evaluate", "render_depth_split", "render_split", "write_depth"]


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


def split_folder(run, split: str) -> Path:
    """``RUN/{split}/ours_<step>``."""
    return run.path / split / f"ours_{run.step}"


@torch.no_grad()
def render_split(
    run,
    split: str,
    *,
    depth: bool = False,
    write: bool = True,
    lpips: dict[str, Callable] | None = None,
    left_right: bool | None = None,
) -> dict:
    """Render every view of ``split`` ("train" or "test") of ``run`` (a
    :class:`~splatforge.train.Run`), write renders/gt (and depth) PNGs under ``run.path``, and
    return the metrics: ``{"psnr", "ssim", "lpips_vgg", "lpips_alex", "lpips", "num_views",
    "per_view"}`` (``lpips`` = ``lpips_vgg``; ``None`` where LPIPS cannot run). When the run
    trains with masks, also ``psnr_masked`` and ``ssim_masked``: over the kept pixels only (the
    MSE of the kept pixels; SSIM with both images zeroed where masked, ``1 - SSIM`` divided by
    the kept fraction, as the training loss); the unmasked values are over every pixel. When
    the run refined its poses (``pose_opt``), test views are drawn from poses aligned to the
    Gaussians first (``Run.align_test_views``) and each view has ``pose_alignment``.
    ``left_right``: score the views of a split other than "train" by Inria's ``--train_test_exp``
    protocol (an affine fitted on the left half, metrics on the right half; default: when the
    run trained with ``exposure``), e.g. to compare a run without exposure compensation alike."""
    from splatforge.train.exposure import apply_exposure, fit_affine

    lpips = lpips or {}
    aligned = run.align_test_views() if split != "train" else None
    exposure = getattr(run, "exposure", None) if run.cfg.exposure else None
    folder = split_folder(run, split)
    per_view = []
    for pos, index in enumerate(run.scene.split[split]):
        render, alpha, _ = run.render(index, render_mode="RGB+ED" if depth else "RGB")
        rgb = render[..., :3]
        gt = run.image(index)[None]
        half = 0
        if split == "train" and exposure is not None:  # trained views: their affine
            rgb = apply_exposure(rgb, exposure[index : index + 1])
        elif split != "train" and (run.cfg.exposure if left_right is None else left_right):  # fitted on the left half
            half = rgb.shape[2] // 2
            rgb = apply_exposure(rgb, fit_affine(rgb[0, :, :half], gt[0, :, :half])[None])
            rgb, gt = rgb[:, :, half:], gt[:, :, half:]
        if write:
            write_png(rgb[0], folder / "renders" / f"{pos:05d}.png")
            write_png(gt[0], folder / "gt" / f"{pos:05d}.png")
            if depth:
                write_depth(folder / "depth" / f"{pos:05d}.npy", render[0, ..., 3], alpha[0, ..., 0])
        view = {
            "index": index,
            "image_name": run.scene.image_names[index],
            "psnr": psnr(rgb, gt),
            "ssim": ssim(rgb, gt),
        }
        view.update({k: (lpips[k](rgb, gt) if k in lpips else None) for k in LPIPS_KEYS})
        mask = run.mask(index)
        if mask is not None:
            mask = mask[:, half:]
            keep = mask[None].expand_as(rgb)
            n = float(keep.sum().clamp(min=1.0))
            mse = float((((rgb.clamp(0, 1) - gt) ** 2) * keep).sum()) / n
            view["psnr_masked"] = float(-10.0 * np.log10(max(mse, 1e-10)))
            view["ssim_masked"] = 1.0 - (1.0 - ssim(rgb * keep, gt * keep)) * keep.numel() / n
        view["lpips"] = view["lpips_vgg"]
        if aligned is not None:
            view["pose_alignment"] = aligned[index]
        per_view.append(view)

    def mean(key: str):
        values = [v[key] for v in per_view]
        return float(np.mean(values)) if values and None not in values else None

    keys = ("psnr", "ssim", *LPIPS_KEYS, "lpips")
    out = {**{k: mean(k) for k in keys}, "num_views": len(per_view), "per_view": per_view}
    if per_view and "psnr_masked" in per_view[0]:
        out.update(psnr_masked=mean("psnr_masked"), ssim_masked=mean("ssim_masked"))
    return out


def evaluate(run, splits=("test", "train"), *, depth: bool = False, write_images: bool = True) -> dict:
    """Metrics of ``splits`` of ``run`` written to ``RUN/metrics.json`` (atomically) and
    returned: ``{"test": {...}, "train": {...}, "step", "num_gaussians", "train_seconds",
    "lpips_note"}`` (``lpips_note``: why LPIPS is ``null``, or ``null``)."""
    lpips, note = lpips_metrics(run.device)
    if note:
        log.warning("%s (metrics report null)", note)
    result = {split: render_split(run, split, depth=depth, write=write_images, lpips=lpips) for split in splits}
    result.update(step=run.step, num_gaussians=run.num_gaussians, train_seconds=run.train_seconds, lpips_note=note)
    cfg = run.cfg
    uses = cfg.alpha_mask or (cfg.masks and run.scene.mask_paths is not None)
    if run.cfg.exposure:
        from splatforge.train.exposure import EXPOSURE_PROTOCOL

        result["exposure"] = EXPOSURE_PROTOCOL
    if run.test_alignment is not None:
        from splatforge.train.poses import POSE_ALIGN_PROTOCOL

        result["test_poses"] = POSE_ALIGN_PROTOCOL.format(steps=cfg.pose_align_steps, lr=cfg.pose_align_lr)
    result["masks"] = (
        (
            ("the images' alpha" if cfg.alpha_mask else "SCENE/masks")
            + (" (inverted)" if cfg.invert_masks else "")
            + ": psnr/ssim over every pixel, psnr_masked/ssim_masked over the kept ones"
        )
        if uses
        else None
    )
    with atomic_path(run.path / "metrics.json") as tmp:
        tmp.write_text(json.dumps(result, indent=2, allow_nan=False))
    return result


@torch.no_grad()
def render_depth_split(run, split: str, png_preview: bool = True) -> list[Path]:
    """Write ``{split}/ours_N/depth/NNNNN.npy`` (and ``.png`` previews) for every view of
    ``split`` (test views of a ``pose_opt`` run from their aligned poses, as :func:`render_split`);
    returns the written paths."""
    if split != "train":
        run.align_test_views()
    folder = split_folder(run, split) / "depth"
    outputs: list[Path] = []
    for pos, index in enumerate(run.scene.split[split]):
        render, alpha, _ = run.render(index, render_mode="ED")
        outputs += write_depth(folder / f"{pos:05d}.npy", render[0, ..., 0], alpha[0, ..., 0], png_preview=png_preview)
    return outputs
