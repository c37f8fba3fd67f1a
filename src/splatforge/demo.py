"""``splatforge demo``: the whole train -> render -> evaluate path on a scene built offline.

A procedural object (a coloured torus of Gaussians) is rendered from cameras on a ring with the
CPU rasterizer; the images and a nerfstudio-style ``transforms.json`` (OpenGL camera axes) are
written to ``OUTPUT/scene``. splatforge then trains on that folder like on any capture, renders
the test views and writes metrics, in ``OUTPUT/run``. No network, no GPU.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from splatforge._fs import atomic_path
from splatforge.data.images import write_png
from splatforge.geometry.cameras import look_at
from splatforge.geometry.transform import rotmat_to_quat
from splatforge.io.ply import write_points_ply
from splatforge.raster import rasterize

if TYPE_CHECKING:
    from splatforge.train import TrainConfig

log = logging.getLogger(__name__)

__all__ = [
    "TORUS_RING",
    "TORUS_TUBE",
    "build_demo_scene",
    "demo_train_config",
    "run_demo",
    "torus_points",
    "torus_sdf",
    "visible_torus_points",
]


#: The demo torus (world units): ring radius and tube radius; its surface is
#: ``(sqrt(x^2 + z^2) - TORUS_RING)^2 + y^2 = TORUS_TUBE^2`` (y up), centred at the origin.
TORUS_RING, TORUS_TUBE = 1.0, 0.35


def torus_points(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``n`` points uniform by area on the demo torus's analytic surface and their outward unit
    normals, both ``[n, 3]`` float64 (world units). Rejection sampling on the tube angle: the area
    element is proportional to ``TORUS_RING + TORUS_TUBE cos v``."""
    rng = np.random.default_rng(seed)
    u_all, v_all = np.empty(0), np.empty(0)
    while len(u_all) < n:
        u, v = rng.uniform(0, 2 * np.pi, 2 * n), rng.uniform(0, 2 * np.pi, 2 * n)
        keep = rng.uniform(0, 1, 2 * n) < (TORUS_RING + TORUS_TUBE * np.cos(v)) / (TORUS_RING + TORUS_TUBE)
        u_all, v_all = np.concatenate([u_all, u[keep]]), np.concatenate([v_all, v[keep]])
    u, v = u_all[:n], v_all[:n]
    normals = np.stack([np.cos(v) * np.cos(u), np.sin(v), np.cos(v) * np.sin(u)], -1)
    ring = np.stack([np.cos(u), np.zeros_like(u), np.sin(u)], -1) * TORUS_RING
    return ring + TORUS_TUBE * normals, normals


def torus_sdf(points: np.ndarray) -> np.ndarray:
    """Signed distance ``[M]`` (world units, negative inside) of ``points [M, 3]`` to the demo
    torus's analytic surface."""
    ring = np.sqrt(points[:, 0] ** 2 + points[:, 2] ** 2) - TORUS_RING
    return np.sqrt(ring**2 + points[:, 1] ** 2) - TORUS_TUBE


def visible_torus_points(
    camtoworlds: np.ndarray, Ks: np.ndarray, width: int, height: int, n: int = 200_000, seed: int = 0
) -> np.ndarray:
    """The points of :func:`torus_points` (``n`` drawn) that at least one camera sees: in its
    image, facing it, and with nothing of the torus between (sphere tracing of
    :func:`torus_sdf` towards the camera centre). ``camtoworlds [C, 4, 4]`` (OpenCV axes),
    ``Ks [C, 3, 3]`` pixels. Returns ``[M, 3]`` float64: the reference surface of a mesh made
    from those views (what no view sees cannot be reconstructed)."""
    pts, normals = torus_points(n, seed)
    seen = np.zeros(n, bool)
    for c2w, K in zip(camtoworlds, Ks):
        to_cam = c2w[:3, 3] - pts
        dist = np.linalg.norm(to_cam, axis=1)
        to_cam /= dist[:, None]
        w2c = np.linalg.inv(c2w)
        cam = pts @ w2c[:3, :3].T + w2c[:3, 3]
        z = np.maximum(cam[:, 2], 1e-9)
        u, v = cam[:, 0] / z * K[0, 0] + K[0, 2], cam[:, 1] / z * K[1, 1] + K[1, 2]
        idx = np.nonzero(
            (cam[:, 2] > 0) & (u >= 0) & (u < width) & (v >= 0) & (v < height) & ((normals * to_cam).sum(1) > 0) & ~seen
        )[0]
        start, ray = pts[idx] + 1e-3 * normals[idx], to_cam[idx]
        t, free = np.zeros(len(idx)), np.ones(len(idx), bool)
        for _ in range(256):
            d = torus_sdf(start + t[:, None] * ray)
            free &= ~((d < 1e-5) & (t < dist[idx]))
            t += np.maximum(d, 1e-4)
            if (t >= dist[idx]).all():
                break
        seen[idx[free]] = True
    return pts[seen]


def build_demo_scene(folder: Path, *, n_views: int = 24, width: int = 160, height: int = 120, seed: int = 0) -> Path:
    """Render the procedural torus from ``n_views`` cameras on a ring; write ``images/*.png``,
    ``transforms.json`` and ``reference_points.ply`` (50,000 points of the analytic surface that
    the views see: :func:`visible_torus_points`) into ``folder`` (atomically per file). Returns
    ``folder``.

    The torus is made of flat Gaussians lying on its analytic surface (see :data:`TORUS_RING`),
    each tangent to it (normal axis 0.002, tangent axes 0.02-0.05 world units), so its geometry
    is known; the images are RGBA (transparent around the object, as Blender scenes are), so
    training draws random backgrounds behind them and no Gaussian stands in for empty space."""
    g = torch.Generator().manual_seed(seed)
    n = 6000
    pts, normals = torus_points(n, seed)
    means, nrm = torch.from_numpy(pts).float(), torch.from_numpy(normals).float()
    u = torch.atan2(means[:, 2], means[:, 0])
    v = torch.atan2(means[:, 1], torch.linalg.norm(means[:, [0, 2]], dim=1) - TORUS_RING)
    colors = torch.stack([0.5 + 0.45 * torch.cos(3 * u), 0.5 + 0.45 * torch.sin(v), 0.5 + 0.45 * torch.sin(2 * u)], -1)
    # a rotation whose third column is the normal: the Gaussian's thin axis
    t1 = torch.linalg.cross(nrm, torch.randn(n, 3, generator=g))
    t1 = t1 / torch.linalg.norm(t1, dim=1, keepdim=True)
    axes = torch.stack([t1, torch.linalg.cross(nrm, t1), nrm], -1).double().numpy()
    quats = torch.from_numpy(np.stack([rotmat_to_quat(r) for r in axes])).float()
    scales = torch.cat([torch.rand(n, 2, generator=g) * 0.03 + 0.02, torch.full((n, 1), 0.002)], 1)
    opacities = torch.rand(n, generator=g) * 0.3 + 0.7
    focal = 0.9 * width
    K = np.array([[focal, 0.0, width / 2], [0.0, focal, height / 2], [0.0, 0.0, 1.0]])
    frames = []
    for i in range(n_views):
        angle = 2 * math.pi * i / n_views
        eye = np.array([3.2 * math.cos(angle), 1.4 + 0.3 * math.sin(3 * angle), 3.2 * math.sin(angle)])
        c2w = look_at(eye, np.zeros(3), image_up=(0.0, -1.0, 0.0))
        viewmat = torch.from_numpy(np.linalg.inv(c2w)).float()[None]
        with torch.no_grad():
            img, alpha, _ = rasterize(
                means,
                quats,
                scales,
                opacities,
                colors,
                viewmat,
                torch.from_numpy(K).float()[None],
                width,
                height,
                backend="cpu",
            )
        name = f"images/frame_{i:04d}.png"
        # straight RGBA, as Blender scenes are: the render (premultiplied on black) over alpha
        write_png(torch.cat([img[0] / alpha[0].clamp_min(1e-6), alpha[0]], -1), folder / name)
        gl = c2w.copy()
        gl[:3, 1:3] *= -1.0  # OpenCV -> OpenGL camera axes, as transforms.json stores them
        frames.append({"file_path": name, "transform_matrix": gl.tolist()})
    # the analytic surface the views see, for `splatforge mesh-eval` (independent of the Gaussians)
    c2ws = np.stack([np.array(f["transform_matrix"]) * [1, -1, -1, 1] for f in frames])  # back to OpenCV axes
    write_points_ply(
        folder / "reference_points.ply",
        visible_torus_points(c2ws, np.stack([K] * n_views), width, height, 50_000, seed),
    )
    meta = {"fl_x": focal, "fl_y": focal, "cx": width / 2, "cy": height / 2, "w": width, "h": height, "frames": frames}
    with atomic_path(folder / "transforms.json") as tmp:
        tmp.write_text(json.dumps(meta, indent=1))
    return folder


def demo_train_config(
    scene_dir: Path, output: Path, *, steps: int = 300, seed: int = 0, backend: str = "auto", **overrides: Any
) -> TrainConfig:
    """How the demo trains on the scene of :func:`build_demo_scene` in ``scene_dir``: the
    library's defaults (MCMC, schedules scaled to the run's length), sized for the scene: a random
    start in the torus's bounds, degree-1 colour, at most 12,000 Gaussians, on the CPU.
    ``overrides`` are further ``TrainConfig`` fields."""
    from splatforge.train import TrainConfig

    fields = {
        "data": scene_dir,
        "output": output,
        "steps": steps,
        "seed": seed,
        "backend": backend,
        "device": "cpu",
        "sh_degree": 1,
        "init_random_count": 4000,
        "init_extent": 0.5,
        "max_gaussians": 12_000,
        "checkpoint_every": 0,
    }
    return TrainConfig(**{**fields, **overrides})


def run_demo(
    output: Path, *, steps: int = 300, seed: int = 0, backend: str = "auto", progress: Callable | None = None
) -> dict:
    """Build the demo scene in ``output/scene``, train ``steps`` steps into ``output/run``,
    render and evaluate; returns the metrics dict (also in ``output/run/metrics.json``)."""
    from splatforge.products import evaluate
    from splatforge.train import Trainer

    scene_dir = build_demo_scene(Path(output) / "scene", seed=seed)
    cfg = demo_train_config(scene_dir, Path(output) / "run", steps=steps, seed=seed, backend=backend)
    trainer = Trainer(cfg)
    result = trainer.train(progress)
    metrics = evaluate(trainer.as_run(), ("test",))
    return {
        "run": str(cfg.output),
        "steps": result.step,
        "num_gaussians": result.num_gaussians,
        "train_seconds": round(result.train_seconds, 2),
        "test_psnr": metrics["test"]["psnr"],
        "test_ssim": metrics["test"]["ssim"],
        "ply": str(result.ply_path),
    }
