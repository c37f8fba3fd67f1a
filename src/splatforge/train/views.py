"""The ground truth of a scene's views, as training and every product of a run read it: one
loader, so that the images the trainer fits and those a run is scored against are the same."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

from splatforge.data.images import WHITE, load_rgba

if TYPE_CHECKING:
    from splatforge.data import SceneData
    from splatforge.train.config import TrainConfig

__all__ = ["ViewImages", "view_mask"]


def view_mask(scene: SceneData, index: int, cfg: TrainConfig, device: torch.device) -> torch.Tensor | None:
    """``[H, W, 1]`` mask of view ``index`` of ``scene`` as ``cfg`` asks for it (the scene's
    masks folder, or the image's alpha with ``alpha_mask``), on ``device``; None without one.

    Raises:
        DataFormatError: a missing or unreadable mask or image (named).
    """
    from splatforge.data.images import load_alpha, load_mask

    h, w = int(scene.heights[index]), int(scene.widths[index])
    if cfg.alpha_mask:
        alpha = load_alpha(scene.image_paths[index])
        m = np.ones((h, w), np.float32) if alpha is None else (alpha > 0.5).astype(np.float32)
        if cfg.invert_masks:
            m = 1.0 - m
    elif cfg.masks and scene.mask_paths is not None:
        m = load_mask(scene.mask_paths[index], w, h, invert=cfg.invert_masks)
    else:
        return None
    return torch.from_numpy(m)[..., None].to(device)


class ViewImages:
    """The views of ``scene`` on ``device``, each loaded once on first use and kept.

    Args:
        scene: the views (``image_paths``, ``mask_paths``, sizes, ``alpha_background``).
        cfg: the run's config (its ``masks``, ``invert_masks``, ``alpha_mask``).
        device: where the tensors live.
    """

    def __init__(self, scene: SceneData, cfg: TrainConfig, device: torch.device):
        self.scene, self.cfg, self.device = scene, cfg, torch.device(device)
        self._images: dict[int, torch.Tensor] = {}
        self._clear: dict[int, torch.Tensor] = {}  # transparency (1 - alpha) of RGBA views
        self._masks: dict[int, torch.Tensor | None] = {}

    def image(self, index: int) -> torch.Tensor:
        """Ground truth ``[H, W, 3]`` float32 in [0, 1] of view ``index``; an RGBA image is
        composited on the scene's ``alpha_background`` (``rgb a + bg (1 - a)``).

        Raises:
            DataFormatError: a missing or unreadable image (named).
        """
        if index not in self._images:
            arr = load_rgba(self.scene.image_paths[index])
            bg = self.scene.alpha_background
            if arr.shape[-1] == 4:
                self._clear[index] = torch.from_numpy(1.0 - arr[..., 3:]).to(self.device)
                arr = arr[..., :3] * arr[..., 3:] + np.float32(bg or WHITE) * (1.0 - arr[..., 3:])
            self._images[index] = torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32)).to(self.device)
        return self._images[index]

    def ground_truth(self, views: list[int], backgrounds: torch.Tensor | None) -> torch.Tensor:
        """``[B, H, W, 3]`` ground truth of ``views`` as seen on ``backgrounds [B, 3]`` (None:
        the scene's own): an RGBA view is composited on it, an opaque one is its image."""
        gt = torch.stack([self.image(i) for i in views])
        if backgrounds is None or self.scene.alpha_background is None:
            return gt
        own = torch.tensor(self.scene.alpha_background, dtype=gt.dtype, device=gt.device)
        clear = torch.stack([self._clear.get(i, torch.zeros_like(gt[0, ..., :1])) for i in views])
        return gt + (backgrounds[:, None, None, :] - own) * clear

    def mask(self, index: int) -> torch.Tensor | None:
        """``[H, W, 1]`` float32 mask of view ``index`` (1 = keep), or None when the run uses no
        masks (see :func:`view_mask`)."""
        if index not in self._masks:
            self._masks[index] = view_mask(self.scene, index, self.cfg, self.device)
        return self._masks[index]
