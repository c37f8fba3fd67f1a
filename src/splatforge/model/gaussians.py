"""Initialisation of Gaussians and the hard cap, in gsplat's trainer layout (:class:`Splats`:
log scales, logit opacities, wxyz quaternions), which gsplat's strategies operate on unchanged.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from scipy.spatial import cKDTree

from splatforge.errors import ConfigError
from splatforge.geometry.sh import num_sh_bases, rgb_to_sh
from splatforge.model.splats import Splats

__all__ = ["cap_gaussians", "init_from_points", "init_random", "per_gaussian"]


def per_gaussian(state: dict, n: int) -> list[str]:
    """Keys of a strategy (or optimizer) state holding per-Gaussian tensors (first dimension
    ``n``): gsplat's convention for what moves with the Gaussians."""
    return [k for k, v in state.items() if isinstance(v, torch.Tensor) and v.dim() and v.shape[0] == n]


def _knn_scale(points: np.ndarray, k: int = 3) -> np.ndarray:
    """Mean distance to the ``k`` nearest other points (Inria's ``distCUDA2`` uses k = 3)."""
    if len(points) < 2:
        return np.full(len(points), 0.01, dtype=np.float64)
    k = min(k, len(points) - 1)
    dist, _ = cKDTree(points).query(points, k=k + 1)
    return np.maximum(dist[:, 1:].mean(axis=1), 1e-7)


def _params(means: np.ndarray, rgb: np.ndarray, log_scales: np.ndarray, sh_degree: int, init_opacity: float) -> Splats:
    n = len(means)
    quats = torch.zeros(n, 4)
    quats[:, 0] = 1.0
    return Splats(
        means=torch.from_numpy(means).float(),
        quats=quats,
        scales=torch.from_numpy(np.repeat(log_scales[:, None], 3, axis=1)).float(),
        opacities=torch.full((n,), math.log(init_opacity / (1.0 - init_opacity))),
        sh0=rgb_to_sh(torch.from_numpy(rgb).float())[:, None, :],
        shN=torch.zeros(n, num_sh_bases(sh_degree) - 1, 3),
    )


def init_from_points(
    points: np.ndarray, rgb: np.ndarray, *, sh_degree: int = 3, init_opacity: float = 0.1, init_scale: float = 1.0
) -> Splats:
    """Gaussians at SfM points: isotropic scale = mean distance to the 3 nearest neighbours
    (times ``init_scale``), identity rotation, colour from the point colour (SH DC), opacity
    ``init_opacity`` (3DGS, Kerbl et al. 2023, sec. 5.1).

    Args:
        points: ``[P, 3]`` world positions. rgb: ``[P, 3]`` uint8 colours.

    Raises:
        ConfigError: no points, or opacity outside (0, 1).
    """
    if len(points) == 0:
        raise ConfigError("init_from_points needs at least one point; use init_random")
    if not 0.0 < init_opacity < 1.0:
        raise ConfigError(f"init_opacity must be in (0, 1), got {init_opacity}")
    log_scales = np.log(_knn_scale(points.astype(np.float64)) * init_scale)
    return _params(points.astype(np.float32), rgb.astype(np.float32) / 255.0, log_scales, sh_degree, init_opacity)


def init_random(
    n: int,
    center: np.ndarray,
    extent: float,
    *,
    sh_degree: int = 3,
    init_opacity: float = 0.1,
    init_scale: float = 1.0,
    generator: torch.Generator | None = None,
) -> Splats:
    """``n`` Gaussians uniform in the cube ``center ± extent`` (world units) with random colours,
    scale the mean distance to the 3 nearest (times ``init_scale``), for scenes without sparse
    points (gsplat's ``init_type="random"``)."""
    g = generator or torch.Generator().manual_seed(0)
    means = (torch.rand(n, 3, generator=g, dtype=torch.float64) * 2 - 1).numpy() * extent + np.asarray(center)
    rgb = torch.rand(n, 3, generator=g).numpy()
    log_scales = np.log(_knn_scale(means) * init_scale)
    return _params(means.astype(np.float32), rgb, log_scales, sh_degree, init_opacity)


@torch.no_grad()
def cap_gaussians(params, optimizers, state, max_gaussians: int) -> int:
    """Keep the ``max_gaussians`` most opaque Gaussians, removing the rest from the parameters,
    the Adam moments and the per-Gaussian tensors of the strategy state together (gsplat's
    ``strategy.ops.remove``; other state, such as MCMC's binomial table, is left alone).
    Returns how many were removed."""
    from gsplat.strategy.ops import remove

    n = len(params["means"])
    if max_gaussians <= 0 or n <= max_gaussians:
        return 0
    keep = torch.topk(params["opacities"].detach(), max_gaussians, sorted=False).indices
    mask = torch.ones(n, dtype=torch.bool, device=params["means"].device)
    mask[keep] = False
    rows = {k: state[k] for k in per_gaussian(state, n)}
    remove(params=params, optimizers=optimizers, state=rows, mask=mask)
    state.update(rows)
    return n - max_gaussians
