"""Real spherical harmonics up to degree 3, in the convention of 3D Gaussian Splatting.

Basis order and signs are those of Inria's ``utils/sh_utils.py::eval_sh`` (and gsplat's
``spherical_harmonics``): index ``k = l * (l + 1) + m`` for degree ``l`` and order ``m``, with the
Condon-Shortley phase folded into the constants below. Directions are in world space and are
normalised before evaluation, so only the direction of ``dirs`` matters.

The colour of a Gaussian seen along ``dir`` is ``sum_k basis_k(dir) * coeffs[k]`` and, as in the
reference implementations, the renderer adds 0.5 and clamps at 0 afterwards (see
:func:`splatforge.raster.rasterize`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from splatforge.errors import ConfigError

__all__ = ["SH_C0", "SH_C1", "SH_C2", "SH_C3", "eval_sh", "num_sh_bases", "rgb_to_sh", "sh_bases", "sh_to_rgb"]

#: Degree 0: 1 / (2 sqrt(pi)).
SH_C0 = 0.28209479177387814
#: Degree 1: sqrt(3 / (4 pi)).
SH_C1 = 0.4886025119029199
#: Degree 2 constants, basis k = 4..8.
SH_C2 = (
    1.0925484305920792,
    -1.0925484305920792,
    0.31539156525252005,
    -1.0925484305920792,
    0.5462742152960396,
)
#: Degree 3 constants, basis k = 9..15.
SH_C3 = (
    -0.5900435899266435,
    2.890611442640554,
    -0.4570457994644658,
    0.3731763325901154,
    -0.4570457994644658,
    1.445305721320277,
    -0.5900435899266435,
)


def num_sh_bases(degree: int) -> int:
    """Number of SH coefficients per colour channel for ``degree`` (0..3): ``(degree + 1) ** 2``.

    Raises:
        ConfigError: if ``degree`` is not in 0..3.
    """
    if degree not in (0, 1, 2, 3):
        raise ConfigError(f"sh_degree must be 0, 1, 2 or 3, got {degree!r}")
    return (degree + 1) ** 2


def sh_bases(degree: int, dirs: Tensor) -> Tensor:
    """Evaluate the real SH basis functions.

    Args:
        degree: SH degree, 0..3.
        dirs: ``[..., 3]`` directions (world space); normalised here, any length > 0.

    Returns:
        ``[..., (degree + 1) ** 2]`` basis values, differentiable w.r.t. ``dirs``.
    """
    num_sh_bases(degree)  # validates the degree
    d = torch.nn.functional.normalize(dirs, dim=-1)
    x, y, z = d.unbind(-1)
    out = [torch.full_like(x, SH_C0)]
    if degree >= 1:
        out += [-SH_C1 * y, SH_C1 * z, -SH_C1 * x]
    if degree >= 2:
        xx, yy, zz = x * x, y * y, z * z
        out += [
            SH_C2[0] * x * y,
            SH_C2[1] * y * z,
            SH_C2[2] * (2.0 * zz - xx - yy),
            SH_C2[3] * x * z,
            SH_C2[4] * (xx - yy),
        ]
    if degree >= 3:
        out += [
            SH_C3[0] * y * (3.0 * xx - yy),
            SH_C3[1] * x * y * z,
            SH_C3[2] * y * (4.0 * zz - xx - yy),
            SH_C3[3] * z * (2.0 * zz - 3.0 * xx - 3.0 * yy),
            SH_C3[4] * x * (4.0 * zz - xx - yy),
            SH_C3[5] * z * (xx - yy),
            SH_C3[6] * x * (xx - 3.0 * yy),
        ]
    return torch.stack(out, dim=-1)


def eval_sh(degree: int, dirs: Tensor, coeffs: Tensor) -> Tensor:
    """Colour from SH coefficients (before the +0.5 offset), pure torch, differentiable.

    Args:
        degree: SH degree used, 0..3; only the first ``(degree + 1) ** 2`` coefficients are read.
        dirs: ``[..., 3]`` viewing directions in world space (Gaussian centre minus camera centre).
        coeffs: ``[..., K, 3]`` coefficients with ``K >= (degree + 1) ** 2``.

    Returns:
        ``[..., 3]`` colour.

    Raises:
        ConfigError: if ``coeffs`` has fewer than ``(degree + 1) ** 2`` bases.
    """
    n = num_sh_bases(degree)
    if coeffs.shape[-2] < n:
        raise ConfigError(f"sh_degree={degree} needs {n} SH coefficients per channel, colors has {coeffs.shape[-2]}")
    basis = sh_bases(degree, dirs)
    return (basis[..., :, None] * coeffs[..., :n, :]).sum(dim=-2)


def rgb_to_sh(rgb: Tensor) -> Tensor:
    """DC coefficient that renders as ``rgb`` (in [0, 1]): ``(rgb - 0.5) / SH_C0``."""
    return (rgb - 0.5) / SH_C0


def sh_to_rgb(sh0: Tensor) -> Tensor:
    """Inverse of :func:`rgb_to_sh`."""
    return sh0 * SH_C0 + 0.5
