"""Per-view pose refinement (gsplat's trainer ``pose_opt``, its ``CameraOptModule``).

Each view ``i`` has a 9-vector ``[dx (3), d6 (6)]``, zero at the start: its refined
camera-to-world is ``camtoworld_i @ [[R(identity6 + d6), dx], [0, 1]]``, the rotation from the 6D
representation of Zhou et al. 2019 (Gram-Schmidt of two rows, gsplat's/pytorch3d's
``rotation_6d_to_matrix``), so the correction is in the camera's own frame (OpenCV axes; ``dx``
in world units). The vectors have their own Adam with weight decay (gsplat's ``pose_opt_lr``
1e-5, ``pose_opt_reg`` 1e-6); gradients reach them through ``viewmats`` in every backend.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["rotation_6d_to_matrix", "PoseRefinement", "ViewTable"]


class ViewTable:
    """A per-view parameter tensor with its own optimizer (pose corrections, exposure
    affines): checkpointed as ``{name: tensor, "optimizer": state}``. Subclasses set
    ``self.name`` (the attribute holding the tensor) and ``self.optimizer``."""

    name: str
    optimizer: torch.optim.Optimizer

    def state_dict(self) -> dict:
        return {self.name: getattr(self, self.name).detach().cpu().clone(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        table = getattr(self, self.name)
        with torch.no_grad():
            table.copy_(state[self.name].to(table.device))
        self.optimizer.load_state_dict(state["optimizer"])


def rotation_6d_to_matrix(d6: Tensor) -> Tensor:
    """``[..., 6]`` -> ``[..., 3, 3]`` rotations: rows ``b1 = a1 / |a1|``, ``b2`` = ``a2``
    orthogonalised against ``b1`` and normalised, ``b3 = b1 x b2`` (Zhou et al. 2019, "On the
    Continuity of Rotation Representations in Neural Networks", as pytorch3d and gsplat)."""
    a1, a2 = d6[..., :3], d6[..., 3:]
    b1 = torch.nn.functional.normalize(a1, dim=-1)
    b2 = torch.nn.functional.normalize(a2 - (b1 * a2).sum(-1, keepdim=True) * b1, dim=-1)
    return torch.stack((b1, b2, torch.cross(b1, b2, dim=-1)), dim=-2)


class PoseRefinement(ViewTable):
    """The views' pose corrections ``[V, 9]`` and their Adam."""

    name = "deltas"

    def __init__(self, n_views: int, lr: float, weight_decay: float, device: torch.device):
        self.deltas = torch.nn.Parameter(torch.zeros(n_views, 9, device=device))
        self.identity = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 0.0], device=device)
        self.optimizer = torch.optim.Adam([self.deltas], lr=lr, weight_decay=weight_decay)

    def transforms(self, views: list[int] | Tensor) -> Tensor:
        """``[B, 4, 4]`` camera-frame corrections of ``views``."""
        d = self.deltas[views]
        out = torch.eye(4, device=d.device, dtype=d.dtype).repeat(len(d), 1, 1)
        out[:, :3, :3] = rotation_6d_to_matrix(d[:, 3:] + self.identity)
        out[:, :3, 3] = d[:, :3]
        return out

    def refine(self, camtoworlds: Tensor, views: list[int] | Tensor) -> Tensor:
        """``camtoworlds [B, 4, 4]`` of ``views`` with their corrections (differentiable)."""
        return camtoworlds @ self.transforms(views)

    def step(self) -> None:
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
