"""``splatforge demo``: render real Gaussians on the CPU and fit colours by gradient descent.

Uses ``garden/test_garden.npz`` (real Mip-NeRF 360 garden centres and colours) when it is found,
otherwise a procedural scene, so it runs without network or GPU. It is the quick check that an
install works end to end: compiled kernels, forward, backward and an optimiser step.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from PIL import Image

from splatforge._fs import atomic_path
from splatforge.errors import DataFormatError
from splatforge.raster import rasterize

log = logging.getLogger(__name__)

#: Where the demo looks for the garden scene when no path is given (the repository's sibling
#: ``shared/datasets``, seen from the repository root).
DEFAULT_GARDEN = Path("../shared/datasets/garden/test_garden.npz")

__all__ = ["DemoScene", "load_garden", "procedural_scene", "run_demo", "save_png"]


@dataclass
class DemoScene:
    """Gaussians (activated scales and opacities, RGB colours) and pinhole cameras."""

    means: torch.Tensor  # [N, 3]
    quats: torch.Tensor  # [N, 4] wxyz
    scales: torch.Tensor  # [N, 3] activated
    opacities: torch.Tensor  # [N] activated
    colors: torch.Tensor  # [N, 3] in [0, 1]
    viewmats: torch.Tensor  # [C, 4, 4] world-to-camera, OpenCV
    Ks: torch.Tensor  # [C, 3, 3] pixels
    width: int
    height: int
    name: str


def load_garden(path: Path, seed: int = 42) -> DemoScene:
    """The garden test scene; scales, quats and opacities drawn seeded as gsplat's tests do.

    Raises:
        DataFormatError: the file is missing or lacks the expected arrays.
    """
    try:
        d = np.load(path)
        means, colors = d["means3d"], d["colors"]
        viewmats, Ks, width, height = d["viewmats"], d["Ks"], int(d["width"]), int(d["height"])
    except (OSError, KeyError, ValueError) as exc:
        raise DataFormatError(f"{path}: not a readable garden scene (.npz with means3d, colors, viewmats, Ks, width, height): {exc}") from exc
    g = torch.Generator().manual_seed(seed)
    n = means.shape[0]
    return DemoScene(
        torch.from_numpy(means).float(), torch.randn(n, 4, generator=g), torch.rand(n, 3, generator=g) * 0.02,
        torch.rand(n, generator=g), torch.from_numpy(colors).float() / 255.0,
        torch.from_numpy(viewmats).float(), torch.from_numpy(Ks).float(), width, height, "garden",
    )  # fmt: skip


def procedural_scene(seed: int = 0, n: int = 20_000) -> DemoScene:
    """A coloured torus of Gaussians seen by three cameras (no data needed)."""
    g = torch.Generator().manual_seed(seed)
    u, v = torch.rand(n, generator=g) * 2 * math.pi, torch.rand(n, generator=g) * 2 * math.pi
    means = torch.stack([(1 + 0.35 * torch.cos(v)) * torch.cos(u), 0.35 * torch.sin(v), (1 + 0.35 * torch.cos(v)) * torch.sin(u)], -1)
    colors = torch.stack([0.5 + 0.5 * torch.cos(u), 0.5 + 0.5 * torch.sin(v), 0.5 + 0.5 * torch.sin(u)], -1)
    viewmats = []
    for angle in (0.0, 2.0, 4.0):
        eye = torch.tensor([3.0 * math.sin(angle), -1.5, -3.0 * math.cos(angle)])
        f = -eye / eye.norm()
        r = torch.linalg.cross(f, torch.tensor([0.0, -1.0, 0.0]))
        r = r / r.norm()
        R = torch.stack([r, torch.linalg.cross(f, r), f])
        V = torch.eye(4)
        V[:3, :3], V[:3, 3] = R, -R @ eye
        viewmats.append(V)
    K = torch.tensor([[400.0, 0.0, 320.0], [0.0, 400.0, 210.0], [0.0, 0.0, 1.0]])
    return DemoScene(
        means, torch.randn(n, 4, generator=g), torch.rand(n, 3, generator=g) * 0.03 + 0.01,
        torch.rand(n, generator=g) * 0.5 + 0.5, colors, torch.stack(viewmats), K.expand(3, 3, 3).clone(), 640, 420, "torus",
    )  # fmt: skip


def save_png(image: torch.Tensor, path: Path) -> None:
    """Write ``image [H, W, 3]`` in [0, 1] as an 8-bit PNG, atomically."""
    array = (image.detach().clamp(0, 1).numpy() * 255.0 + 0.5).astype(np.uint8)
    with atomic_path(path) as tmp:
        Image.fromarray(array).save(tmp)


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(-10.0 * torch.log10(torch.mean((a - b) ** 2)))


def run_demo(output: Path, data: Optional[Path] = None, steps: int = 30, seed: int = 0, backend: str = "auto") -> dict:
    """Render the scene from every camera, then re-learn its colours from its own renders.

    ``data``: the garden ``.npz``; None looks in :data:`DEFAULT_GARDEN` and falls back to a
    procedural scene. Raises :class:`DataFormatError` if an explicit ``data`` is missing or bad.

    Writes ``output/{name}_view{i}.png`` (renders) and ``output/{name}_fit.png`` (the fitted
    render of view 0 after ``steps`` Adam steps from random colours). Returns timings and PSNRs.
    """
    if data is None:
        data = DEFAULT_GARDEN if DEFAULT_GARDEN.exists() else None
    elif not data.exists():
        raise DataFormatError(f"{data}: no such file (the garden test scene, test_garden.npz)")
    scene = load_garden(data) if data is not None else procedural_scene(seed)
    log.info("scene %s: %d Gaussians, %d cameras, %dx%d", scene.name, scene.means.shape[0], scene.viewmats.shape[0], scene.width, scene.height)
    args = (scene.viewmats, scene.Ks, scene.width, scene.height)
    t0 = time.perf_counter()
    with torch.no_grad():
        targets, _, _ = rasterize(scene.means, scene.quats, scene.scales, scene.opacities, scene.colors, *args, backend=backend)
    first_render_s = time.perf_counter() - t0
    for i, img in enumerate(targets):
        save_png(img, output / f"{scene.name}_view{i}.png")

    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(scene.colors.shape, generator=g).requires_grad_(True)  # colours = sigmoid(logits)
    opt = torch.optim.Adam([logits], lr=0.1)
    history, step_times = [], []
    for step in range(steps):
        t = time.perf_counter()
        render, _, _ = rasterize(scene.means, scene.quats, scene.scales, scene.opacities, torch.sigmoid(logits), *args, backend=backend)
        loss = torch.nn.functional.l1_loss(render, targets)
        opt.zero_grad()
        loss.backward()
        opt.step()
        step_times.append(time.perf_counter() - t)
        history.append(psnr(render.detach(), targets))
        log.info("step %3d  loss %.4f  PSNR %.2f dB  %.3f s", step, loss.item(), history[-1], step_times[-1])
    with torch.no_grad():
        final, _, _ = rasterize(scene.means, scene.quats, scene.scales, scene.opacities, torch.sigmoid(logits), *args, backend=backend)
    save_png(final[0], output / f"{scene.name}_fit.png")
    return {
        "scene": scene.name,
        "n_gaussians": int(scene.means.shape[0]),
        "image_size": [scene.width, scene.height],
        "n_cameras": int(scene.viewmats.shape[0]),
        "first_render_s": first_render_s,
        "median_step_s": float(np.median(step_times)) if step_times else None,
        "psnr_start": history[0] if history else None,
        "psnr_end": psnr(final, targets),
        "output": str(output),
    }
