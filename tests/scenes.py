"""Seeded test scenes for the rasterizer tests, and where the shared datasets are (plain helpers and
one skip marker)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import Tensor

REPO = Path(__file__).resolve().parents[1]


def datasets_dir() -> Path:
    """``$SPLATFORGE_DATASETS`` or ``../shared/datasets`` beside the repository."""
    return Path(os.environ.get("SPLATFORGE_DATASETS", REPO.parent / "shared" / "datasets"))


def needs_datasets(*paths: str) -> pytest.MarkDecorator:
    """Skip marker for a test that reads ``paths`` (relative to :func:`datasets_dir`, e.g.
    ``"skull/images_8"``): skipped, naming what is missing, where the shared datasets are absent
    (a clone outside the team's workspace), so that the suite passes or skips but never errors."""
    missing = [p for p in paths if not (datasets_dir() / p).exists()]
    return pytest.mark.skipif(bool(missing), reason=f"needs {', '.join(missing)} under {datasets_dir()}")


#: The skull scene as the training tests read it (COLMAP model and the 1/8 images).
needs_skull = needs_datasets("skull/images_8", "skull/sparse/0")


def look_at(eye, target=(0.0, 0.0, 0.0), up=(0.0, -1.0, 0.0)) -> Tensor:
    """World-to-camera ``[4, 4]`` (OpenCV axes: +z forward, +y down) looking from eye to target."""
    eye, target, up = (torch.tensor(v, dtype=torch.float64) for v in (eye, target, up))
    f = target - eye
    f = f / f.norm()
    r = torch.linalg.cross(f, up)
    r = r / r.norm()
    d = torch.linalg.cross(f, r)
    R = torch.stack([r, d, f])
    V = torch.eye(4, dtype=torch.float64)
    V[:3, :3] = R
    V[:3, 3] = -R @ eye
    return V


def intrinsics(width: int, height: int, focal: float) -> Tensor:
    return torch.tensor([[focal, 0.0, width / 2.0], [0.0, focal, height / 2.0], [0.0, 0.0, 1.0]], dtype=torch.float64)


@dataclass
class Scene:
    means: Tensor
    quats: Tensor
    scales: Tensor
    opacities: Tensor
    colors: Tensor
    viewmats: Tensor
    Ks: Tensor
    width: int
    height: int

    def params(self) -> list[Tensor]:
        """Fresh leaf copies of the per-Gaussian tensors, requiring grad."""
        return [
            t.detach().clone().requires_grad_(True)
            for t in (self.means, self.quats, self.scales, self.opacities, self.colors)
        ]

    def to(self, dtype: torch.dtype) -> Scene:
        return Scene(
            *(
                t.to(dtype)
                for t in (self.means, self.quats, self.scales, self.opacities, self.colors, self.viewmats, self.Ks)
            ),
            self.width,
            self.height,
        )


def random_scene(
    seed: int,
    n: int = 300,
    n_cameras: int = 2,
    width: int = 70,
    height: int = 45,
    sh_degree: int | None = None,
    channels: int = 3,
) -> Scene:
    """Gaussians in a ball of radius ~1.5 seen by cameras ~3.5 units away: some Gaussians fall
    behind the cameras' near plane or off-image, many straddle tile borders."""
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(n, 3, generator=g, dtype=torch.float64) * 0.9
    quats = torch.randn(n, 4, generator=g, dtype=torch.float64)
    scales = torch.rand(n, 3, generator=g, dtype=torch.float64) * 0.15 + 0.01
    opacities = torch.rand(n, generator=g, dtype=torch.float64)
    if sh_degree is None:
        colors = torch.rand(n, channels, generator=g, dtype=torch.float64)
    else:
        colors = torch.randn(n, 16, 3, generator=g, dtype=torch.float64) * 0.3
    eyes = [(0.0, 0.0, -3.5), (1.2, 0.5, -3.0), (-2.5, -0.4, -2.2), (0.3, 3.0, -1.0)]
    viewmats = torch.stack([look_at(eyes[i % len(eyes)]) for i in range(n_cameras)])
    Ks = torch.stack([intrinsics(width, height, 55.0 + 5.0 * i) for i in range(n_cameras)])
    return Scene(means, quats, scales, opacities, colors, viewmats, Ks, width, height).to(torch.float32)


def garden_subset(n: int, scale: float, seed: int = 42) -> Scene:
    """The first ``n`` Gaussians of ``garden/test_garden.npz`` (real centres and colours) with
    scales, quats and opacities drawn as gsplat's tests draw them, intrinsics scaled by ``scale``."""
    d = np.load(datasets_dir() / "garden" / "test_garden.npz")
    g = torch.Generator().manual_seed(seed)
    means = torch.from_numpy(d["means3d"][:n]).float()
    N = means.shape[0]
    quats = torch.randn(N, 4, generator=g)
    scales = torch.rand(N, 3, generator=g) * 0.02
    opacities = torch.rand(N, generator=g)
    colors = torch.from_numpy(d["colors"][:n]).float() / 255.0
    Ks = torch.from_numpy(d["Ks"]).float().clone()
    Ks[:, :2] *= scale
    return Scene(
        means,
        quats,
        scales,
        opacities,
        colors,
        torch.from_numpy(d["viewmats"]).float(),
        Ks,
        int(round(int(d["width"]) * scale)),  # noqa: RUF046
        int(round(int(d["height"]) * scale)),  # noqa: RUF046
    )
