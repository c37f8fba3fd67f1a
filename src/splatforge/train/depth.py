"""Depth regularisation: the rendered inverse depth against a prior (Inria 3DGS's 2024 update).

``TrainConfig.depth_prior`` picks the prior:

- a folder of maps (:mod:`splatforge.data.depth`'s layout: Inria's ``depths/``, CityGS-X's,
  CityGaussian's ``.npy``). Its ``depth_params.json`` is used when present, else the scales are
  fitted here and written to ``<run>/depth_params.json`` (the input folder is never written);
- ``depth-anything``: Depth Anything (``depth_model``) run once on the training images into
  ``<run>/depth_prior/``;
- ``sfm``: the sparse COLMAP depths themselves (gsplat's ``depth_loss``), no network needed.

Dense priors: ``loss = w(t) * mean(|inv_render - (scale * inv_mono + offset)| * mask)`` over the
image, ``inv_render = sum_i w_i / z_i`` (render mode ``ID``), the mask 0 for an unreliable image
(see :func:`splatforge.data.depth.reliable_views`, missing keys included), 1 elsewhere. Sparse
(``sfm``): ``w(t) * mean |inv_render(xy) - 1 / z|`` over the view's observed points, the render
sampled bilinearly. With ``depth_filter_px`` > 0 a dense prior's mask also drops the pixels
that fail the multi-view check against the other training views' aligned priors
(:func:`splatforge.data.depth.multiview_depth_mask`, CityGS-X's). ``w`` goes log-linearly from
``depth_weight_init`` to ``depth_weight_final`` over the run (Inria's ``get_expon_lr_func``, 1.0 to
0.01). Both are in 1 / world units, as Inria's: the term's weight against the colour loss depends
on the scene's scale.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from splatforge.data import SceneData
from splatforge.data.depth import (
    DepthFit,
    depth_file,
    depth_key,
    fit_depth_folder,
    make_depth_priors,
    multiview_depth_mask,
    read_depth_params,
    read_inverse_depth,
    reliable_views,
    sfm_inverse_depths,
    write_depth_params,
)
from splatforge.errors import ConfigError, DataFormatError

log = logging.getLogger(__name__)

__all__ = ["DepthSupervision", "check_depth_prior", "depth_weight"]


def depth_weight(step: int, steps: int, init: float, final: float) -> float:
    """``init`` at step 0 to ``final`` at ``steps``, log-linearly (0 when either is 0)."""
    if init <= 0 or final <= 0:
        return 0.0 if init <= 0 else init
    t = min(max(step / max(steps, 1), 0.0), 1.0)
    return math.exp((1 - t) * math.log(init) + t * math.log(final))


class DepthSupervision:
    """The depth term of one run (see the module docstring).

    Args:
        spec: ``sfm``, ``depth-anything`` or a folder of maps.
        scene: the training scene (its loaded resolution is the render's).
        output: the run folder (fitted parameters and Depth Anything's maps go there).

    Raises:
        ConfigError: an unknown spec; ``sfm`` on a scene without SfM points.
        DataFormatError: an unreadable prior folder or ``depth_params.json``.
    """

    def __init__(
        self,
        spec: str,
        scene: SceneData,
        output: Path,
        *,
        steps: int,
        weight_init: float,
        weight_final: float,
        model: str,
        device: torch.device,
        filter_px: float = 0.0,
    ):
        self.scene, self.device, self.steps, self.filter_px = scene, device, steps, filter_px
        self._aligned: dict[int, np.ndarray] = {}
        self._train = set(scene.split["train"])
        self.weight_init, self.weight_final = weight_init, weight_final
        self.sparse = spec == "sfm"
        self._cache: dict[int, tuple[Tensor, Tensor]] = {}
        check_depth_prior(spec)
        if self.sparse:
            if len(scene.points) == 0:
                raise ConfigError(f"--depth-prior sfm: {scene.root} has no SfM points")
            return
        if spec == "depth-anything":
            folder = Path(output) / "depth_prior"
            if not (folder / "depth_params.json").is_file():
                log.info("depth priors: running %s on %d images into %s", model, len(scene), folder)
                make_depth_priors(scene, folder, model, device=str(device))
        else:
            folder = Path(spec)
        self.folder = folder
        params = folder / "depth_params.json"
        if params.is_file():
            fits = read_depth_params(params)
        else:
            fits = fit_depth_folder(scene, folder)
            write_depth_params(Path(output) / "depth_params.json", fits)
            log.info(
                "depth priors: %s has no depth_params.json; fitted to the SfM points into %s",
                folder,
                Path(output) / "depth_params.json",
            )
        self.fits: dict[str, DepthFit] = fits
        self.keys = [depth_key(n) for n in scene.image_names]
        self.reliable = reliable_views(self.keys, fits)
        n_ok = sum(self.reliable[i] for i in scene.split["train"])
        log.info("depth priors: %d of %d training views reliable", n_ok, len(scene.split["train"]))

    def weight(self, step: int) -> float:
        return depth_weight(step, self.steps, self.weight_init, self.weight_final)

    def target(self, index: int) -> tuple[Tensor, Tensor] | None:
        """``(inverse depth target, mask)`` of view ``index``: ``[H, W]`` maps (dense) or
        ``(xy [M, 2]`` pixels, ``inv [M])`` (sparse); None when the view has nothing to use."""
        if index in self._cache:
            return self._cache[index]
        out: tuple[Tensor, Tensor] | None = None
        if self.sparse:
            xy, inv = sfm_inverse_depths(self.scene, index)
            if len(inv):
                out = (torch.from_numpy(xy).float().to(self.device), torch.from_numpy(inv).float().to(self.device))
        elif self.reliable[index]:
            aligned = self.aligned(index)
            target = torch.from_numpy(aligned).float().to(self.device)
            mask = torch.ones_like(target)
            if self.filter_px > 0:
                keep = multiview_depth_mask(
                    self._depth_of, self.scene.camtoworlds, self.scene.Ks, index, self.filter_px
                )
                mask = torch.from_numpy(keep).float().to(self.device)
            out = (target, mask)
        self._cache[index] = out  # type: ignore[assignment]
        return out

    def aligned(self, index: int) -> np.ndarray:
        """The prior of view ``index`` aligned to the SfM, ``scale * map + offset`` (inverse depth,
        1 / world units) ``[H, W]`` at the view's resolution (maps of another size are resized
        bilinearly)."""
        if index not in self._aligned:
            path = depth_file(self.folder, self.scene.image_names[index])
            if path is None:
                raise DataFormatError(f"{self.folder}: no depth map for {self.scene.image_names[index]}")
            inv = read_inverse_depth(path)
            w, h = int(self.scene.widths[index]), int(self.scene.heights[index])
            if inv.shape != (h, w):
                inv = cv2.resize(inv, (w, h), interpolation=cv2.INTER_LINEAR)
            fit = self.fits[self.keys[index]]
            self._aligned[index] = (fit.scale * inv + fit.offset).astype(np.float32)
        return self._aligned[index]

    def _depth_of(self, index: int) -> np.ndarray | None:
        """Camera-z depth of a reliable training view's aligned prior (the multi-view filter's
        input; test views are never used), None otherwise."""
        if index not in self._train or not self.reliable[index]:
            return None
        inv = self.aligned(index)
        with np.errstate(divide="ignore"):
            return np.where(inv > 0, 1.0 / inv, 0.0)

    def loss(self, index: int, inv_render: Tensor, step: int) -> Tensor | None:
        """The weighted depth term for view ``index`` from its rendered inverse depth
        ``inv_render [H, W]``; None when the view has no usable prior or the weight is 0."""
        w = self.weight(step)
        tgt = self.target(index)
        if tgt is None or w == 0.0:
            return None
        if self.sparse:
            xy, inv = tgt
            H, W = inv_render.shape
            grid = (xy / torch.tensor([W, H], dtype=xy.dtype, device=xy.device) * 2.0 - 1.0)[None, None]
            sampled = F.grid_sample(inv_render[None, None], grid, mode="bilinear", align_corners=False)[0, 0, 0]
            return w * (sampled - inv).abs().mean()
        target, mask = tgt
        return w * ((inv_render - target).abs() * mask).mean()


def check_depth_prior(spec: str | None) -> None:
    """Config-time check of ``--depth-prior``.

    Raises:
        ConfigError: neither ``sfm``, ``depth-anything`` nor an existing folder.
    """
    if spec is None or spec in ("sfm", "depth-anything"):
        return
    if not Path(spec).is_dir():
        raise ConfigError(f"depth_prior {spec!r}: not 'sfm', 'depth-anything' or an existing folder of depth maps")
