"""Plain containers passed between the rasterizer's stages."""

from __future__ import annotations

from typing import NamedTuple

from torch import Tensor


class Projection(NamedTuple):
    """Per-camera screen-space Gaussians, gsplat's ``fully_fused_projection`` outputs (unpacked).

    Entries of Gaussians culled in a camera (behind the near plane, beyond the far plane,
    degenerate, too transparent, or off-image) are zero, with ``radii == 0``.
    """

    #: ``[C, N, 2]`` projected centres, pixels (x right, y down; pixel centres at +0.5).
    means2d: Tensor
    #: ``[C, N, 3]`` upper triangle ``(a, b, c)`` of the inverse blurred 2D covariance, 1/pixels^2.
    conics: Tensor
    #: ``[C, N]`` camera-space z of the centres, world units.
    depths: Tensor
    #: ``[C, N, 2]`` int32 x/y half extents of the screen-space bounding box, pixels.
    radii: Tensor
    #: ``[C, N]`` antialiasing factor ``sqrt(det(cov2d) / det(cov2d + eps2d I))`` or None.
    compensations: Tensor | None
