"""Visibility masks: which parts of a view are *not* seen well by at least two training views.

The rule is ExtraNeRF's "2nd pick" as GS-DataGen uses it:

1. render every training view and, per Gaussian and view, take the **score** = its mean
   transmittance over the pixels it touches (``sum_T / count`` from
   :func:`splatforge.raster.transmittance_stats`; 0 in views where it touches no pixel);
2. per Gaussian keep the **2nd largest** score over its top-k views, ``k = min(5, #train)``
   (with a single training view there is no second pick: the score is 0);
3. render each target view with that per-Gaussian score as a one-channel colour (black
   background): the **score map** ``[H, W]`` in [0, 1];
4. the **mask** is white (255) where the score map is below the threshold (0.5): pixels not seen
   well by two training views; black elsewhere.

Outputs per view, under ``{split}/ours_N/``: ``visibility_mask_global_2ndpick_th0.5/frame_XXXXX.png``
(8-bit) and ``visibility_score_global_2ndpick/frame_XXXXX.npy`` (float32 score map), ``XXXXX``
the view's position in its split (the order of ``partition.json``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from splatforge._fs import atomic_path
from splatforge.raster.constants import DEFAULT_NEAR_PLANE

__all__ = ["gaussian_scores", "score_maps", "second_pick", "visibility_products", "write_visibility"]

TOP_K = 5


def gaussian_scores(
    gaussians: dict[str, torch.Tensor],
    viewmats: torch.Tensor,
    Ks: torch.Tensor,
    width: int,
    height: int,
    backend: str = "auto",
    batch: int = 8,
    rasterize_mode: str = "classic",
    near_plane: float = DEFAULT_NEAR_PLANE,
) -> torch.Tensor:
    """Per training view and Gaussian, the mean transmittance in front of it over the pixels it
    touches: ``[V, N]`` float64 (0 where it touches none).

    ``gaussians`` holds **activated** tensors (a mapping or :class:`~splatforge.model.Activated`):
    ``means [N,3]``, ``quats [N,4]``, ``scales [N,3]`` (world units), ``opacities [N]`` (in [0, 1]).
    ``viewmats [V,4,4]`` world-to-camera (OpenCV), ``Ks [V,3,3]`` pixels, ``near_plane`` world
    units (a run's :attr:`~splatforge.train.Run.near_plane`).
    """
    from splatforge.raster import transmittance_stats

    out = []
    for i in range(0, viewmats.shape[0], batch):
        sum_T, count = transmittance_stats(
            gaussians["means"],
            gaussians["quats"],
            gaussians["scales"],
            gaussians["opacities"],
            viewmats[i : i + batch],
            Ks[i : i + batch],
            width,
            height,
            backend=backend,
            rasterize_mode=rasterize_mode,
            near_plane=near_plane,
        )
        out.append(torch.where(count > 0, sum_T / count.clamp(min=1), torch.zeros_like(sum_T)))
    return torch.cat(out).cpu()


def second_pick(scores: torch.Tensor, top_k: int = TOP_K) -> torch.Tensor:
    """``[N]`` the 2nd largest of each Gaussian's top-``min(top_k, V)`` view scores (``scores
    [V, N]``); 0 when there is a single view."""
    k = min(top_k, scores.shape[0])
    if k < 2:
        return torch.zeros(scores.shape[1], dtype=scores.dtype)
    return torch.topk(scores, k, dim=0).values[1]


def score_maps(
    gaussians: dict[str, torch.Tensor],
    vis: torch.Tensor,
    viewmats: torch.Tensor,
    Ks: torch.Tensor,
    width: int,
    height: int,
    backend: str = "auto",
    batch: int = 8,
    rasterize_mode: str = "classic",
    near_plane: float = DEFAULT_NEAR_PLANE,
) -> torch.Tensor:
    """Render the per-Gaussian visibility ``vis [N]`` as a one-channel colour: ``[V, H, W]``
    (``near_plane`` in world units, as :func:`gaussian_scores`)."""
    from splatforge.raster import rasterize

    feats = vis.to(gaussians["means"].device, gaussians["means"].dtype)[:, None]
    maps = []
    with torch.no_grad():
        for i in range(0, viewmats.shape[0], batch):
            img, _, _ = rasterize(
                gaussians["means"],
                gaussians["quats"],
                gaussians["scales"],
                gaussians["opacities"],
                feats,
                viewmats[i : i + batch],
                Ks[i : i + batch],
                width,
                height,
                backend=backend,
                rasterize_mode=rasterize_mode,
                near_plane=near_plane,
            )
            maps.append(img[..., 0].clamp(0, 1).cpu())
    return torch.cat(maps)


def write_visibility(
    folder: Path, maps: torch.Tensor, threshold: float = 0.5, names: list[str] | None = None
) -> list[Path]:
    """Write masks (white where ``maps < threshold``) and score maps for one split into
    ``folder`` (``{split}/ours_N``); returns the written paths."""
    from PIL import Image

    mask_dir = Path(folder) / f"visibility_mask_global_2ndpick_th{threshold:g}"
    score_dir = Path(folder) / "visibility_score_global_2ndpick"
    written = []
    for pos, m in enumerate(maps.numpy()):
        name = f"frame_{pos:05d}"
        with atomic_path(mask_dir / f"{name}.png") as tmp:
            Image.fromarray(np.where(m < threshold, 255, 0).astype(np.uint8)).save(tmp)
        with atomic_path(score_dir / f"{name}.npy") as tmp:
            np.save(tmp, m.astype(np.float32))
        written += [mask_dir / f"{name}.png", score_dir / f"{name}.npy"]
    return written


def visibility_products(run, threshold: float = 0.5) -> tuple[list[Path], dict]:
    """Masks and score maps of every view of ``run`` (a :class:`~splatforge.train.Run`) under
    ``{train,test}/ours_N/`` (see the module docstring); returns the written paths and
    ``{"fraction_gaussians_seen_twice"}``.

    Raises:
        ConfigError: the scene's views are not all of one image size.
    """
    from splatforge.errors import ConfigError

    scene = run.scene
    sizes = {run.image_size(i) for i in range(len(scene))}
    if len(sizes) != 1:
        raise ConfigError(f"visibility needs one image size per scene, found {sorted(sizes)}")
    ((w, h),) = sizes
    g = run.splats.activated(0)
    run.align_test_views()  # test views drawn as evaluation draws them (pose_opt runs)
    viewmats, Ks = run.cameras()
    options = {"backend": run.cfg.backend, "rasterize_mode": run.cfg.rasterize_mode, "near_plane": run.near_plane}
    train_ids = scene.split["train"]
    vis = second_pick(gaussian_scores(g, viewmats[train_ids], Ks[train_ids], w, h, **options))
    outputs: list[Path] = []
    for split in ("train", "test"):
        ids = scene.split[split]
        if ids:
            maps = score_maps(g, vis, viewmats[ids], Ks[ids], w, h, **options)
            outputs += write_visibility(run.path / split / f"ours_{run.step}", maps, threshold)
    return outputs, {"fraction_gaussians_seen_twice": round(float((vis >= threshold).double().mean()), 4)}
