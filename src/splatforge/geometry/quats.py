"""Quaternions (wxyz, Hamilton convention) and 3D covariances, pure torch and differentiable."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["quat_scale_to_covar", "quat_to_rotmat"]


def quat_to_rotmat(quats: Tensor) -> Tensor:
    """Rotation matrices from quaternions.

    Args:
        quats: ``[..., 4]`` quaternions, **wxyz** order; normalised here (any non-zero length).

    Returns:
        ``[..., 3, 3]`` rotation matrices ``R`` such that ``R @ v`` rotates ``v``.
    """
    w, x, y, z = torch.nn.functional.normalize(quats, dim=-1).unbind(-1)
    rows = [
        1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y),
        2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x),
        2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y),
    ]  # fmt: skip
    return torch.stack(rows, dim=-1).reshape(quats.shape[:-1] + (3, 3))


def quat_scale_to_covar(quats: Tensor, scales: Tensor) -> Tensor:
    """3D covariances ``Sigma = R S S^T R^T`` of Gaussians (3DGS paper, Kerbl et al. 2023, eq. 6).

    Args:
        quats: ``[..., 4]`` rotations, wxyz, any non-zero length.
        scales: ``[..., 3]`` standard deviations along the local axes, **activated** (world units,
            not log space).

    Returns:
        ``[..., 3, 3]`` symmetric covariances in world units squared.
    """
    m = quat_to_rotmat(quats) * scales[..., None, :]
    return m @ m.transpose(-1, -2)
