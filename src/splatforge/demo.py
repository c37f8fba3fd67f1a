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
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from splatforge._fs import atomic_path
from splatforge.data.images import write_png
from splatforge.geometry.cameras import look_at
from splatforge.raster import rasterize

log = logging.getLogger(__name__)

__all__ = ["build_demo_scene", "run_demo"]


def build_demo_scene(folder: Path, *, n_views: int = 24, width: int = 160, height: int = 120, seed: int = 0) -> Path:
    """Render the procedural torus from ``n_views`` cameras on a ring; write ``images/*.png``
    and ``transforms.json`` into ``folder`` (atomically per file). Returns ``folder``."""
    g = torch.Generator().manual_seed(seed)
    n = 6000
    u, v = torch.rand(n, generator=g) * 2 * math.pi, torch.rand(n, generator=g) * 2 * math.pi
    ring = 1.0 + 0.35 * torch.cos(v)
    means = torch.stack([ring * torch.cos(u), 0.35 * torch.sin(v), ring * torch.sin(u)], -1)
    colors = torch.stack([0.5 + 0.45 * torch.cos(3 * u), 0.5 + 0.45 * torch.sin(v), 0.5 + 0.45 * torch.sin(2 * u)], -1)
    quats = torch.randn(n, 4, generator=g)
    scales = torch.rand(n, 3, generator=g) * 0.04 + 0.02
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
            img, _, _ = rasterize(means, quats, scales, opacities, colors, viewmat, torch.from_numpy(K).float()[None],
                                  width, height, backgrounds=torch.full((1, 3), 0.1), backend="cpu")  # fmt: skip
        name = f"images/frame_{i:04d}.png"
        write_png(img[0], folder / name)
        gl = c2w.copy()
        gl[:3, 1:3] *= -1.0  # OpenCV -> OpenGL camera axes, as transforms.json stores them
        frames.append({"file_path": name, "transform_matrix": gl.tolist()})
    meta = {"fl_x": focal, "fl_y": focal, "cx": width / 2, "cy": height / 2, "w": width, "h": height, "frames": frames}
    with atomic_path(folder / "transforms.json") as tmp:
        tmp.write_text(json.dumps(meta, indent=1))
    return folder


def run_demo(output: Path, *, steps: int = 300, seed: int = 0, backend: str = "auto",
             progress: Optional[Callable] = None) -> dict:  # fmt: skip
    """Build the demo scene in ``output/scene``, train ``steps`` steps into ``output/run``,
    render and evaluate; returns the metrics dict (also in ``output/run/metrics.json``)."""
    from splatforge.products import evaluate
    from splatforge.train import TrainConfig, Trainer

    scene_dir = build_demo_scene(Path(output) / "scene", seed=seed)
    # the library's defaults (MCMC, schedules scaled to the run's length), sized for the scene:
    # a random start in the torus's bounds, degree-1 colour, at most 12,000 Gaussians
    cfg = TrainConfig(data=scene_dir, output=Path(output) / "run", steps=steps, seed=seed, backend=backend, device="cpu",
                      sh_degree=1, init_random_count=4000, init_extent=0.5, max_gaussians=12_000, checkpoint_every=0)  # fmt: skip
    trainer = Trainer(cfg)
    result = trainer.train(progress)
    metrics = evaluate(trainer.as_run(), ("test",))
    return {"run": str(cfg.output), "steps": result.step, "num_gaussians": result.num_gaussians,
            "train_seconds": round(result.train_seconds, 2), "test_psnr": metrics["test"]["psnr"],
            "test_ssim": metrics["test"]["ssim"], "ply": str(result.ply_path)}  # fmt: skip
