"""Per-view pose refinement (gsplat's trainer ``pose_opt``, its ``CameraOptModule``).

Each view ``i`` has a 9-vector ``[dx (3), d6 (6)]``, zero at the start: its refined
camera-to-world is ``camtoworld_i @ [[R(identity6 + d6), dx], [0, 1]]``, the rotation from the 6D
representation of Zhou et al. 2019 (Gram-Schmidt of two rows, gsplat's/pytorch3d's
``rotation_6d_to_matrix``), so the correction is in the camera's own frame (OpenCV axes; ``dx``
in ``world_unit`` lengths: gsplat's module works in its normalised world, so its learning rate
and weight decay mean the same on a scene of any scale; see ``TrainConfig.world_unit``). The
vectors have their own Adam with weight decay (gsplat's ``pose_opt_lr`` 1e-5, ``pose_opt_reg``
1e-6); gradients reach them through ``viewmats`` in every backend.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "POSE_ALIGN_PROTOCOL",
    "PoseRefinement",
    "ViewTable",
    "align_poses",
    "corrected_camtoworlds",
    "pose_change",
    "pose_corrections",
    "rotation_6d_to_matrix",
]

#: What ``metrics.json`` says (key ``test_poses``) when the test views were aligned first.
POSE_ALIGN_PROTOCOL = (
    "test views' poses aligned to the fixed Gaussians before scoring (the run refined its training "
    "poses, so the given test poses are in a slightly different frame): per view a fresh pose "
    "correction fitted by Adam on the training loss, {steps} steps, learning rate {lr} decaying to 1 %; "
    "per_view[i].pose_alignment gives the change"
)
IDENTITY_6D = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)


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


def pose_corrections(deltas: Tensor, unit: float = 1.0) -> Tensor:
    """``deltas [B, 9]`` (``[dx (3), d6 (6)]``, zero = no change) -> ``[B, 4, 4]`` camera-frame
    corrections: rotation ``rotation_6d_to_matrix(identity6 + d6)``, translation ``dx * unit``
    (world units; ``unit``: the run's ``world_unit``)."""
    out = torch.eye(4, device=deltas.device, dtype=deltas.dtype).repeat(len(deltas), 1, 1)
    out[:, :3, :3] = rotation_6d_to_matrix(
        deltas[:, 3:] + torch.tensor(IDENTITY_6D, dtype=deltas.dtype, device=deltas.device)
    )
    out[:, :3, 3] = deltas[:, :3] * unit
    return out


def corrected_camtoworlds(camtoworlds, deltas: Tensor, views: Sequence[int], unit: float = 1.0):
    """``camtoworlds [V, 4, 4]`` (numpy, OpenCV axes) as float64 with the corrections
    ``deltas [V, 9]`` (translations in ``unit`` lengths) applied to the rows ``views`` (a copy;
    the other rows as given)."""
    c2w = np.array(camtoworlds, dtype=np.float64)
    ids = list(views)
    with torch.no_grad():
        c2w[ids] = (torch.from_numpy(c2w[ids]) @ pose_corrections(deltas.detach()[ids].double().cpu(), unit)).numpy()
    return c2w


def pose_change(before: Tensor, after: Tensor) -> dict[str, float]:
    """How far camera-to-world ``after [4, 4]`` is from ``before``: ``rotation_deg`` (angle of
    the relative rotation) and ``translation`` (distance of the camera centres, world units)."""
    d = torch.linalg.inv(before.double()) @ after.double()
    cos = max(-1.0, min(1.0, (float(torch.trace(d[:3, :3])) - 1.0) / 2.0))
    return {
        "rotation_deg": math.degrees(math.acos(cos)),
        "translation": float((after[:3, 3] - before[:3, 3]).double().norm()),
    }


def align_poses(
    render: Callable[[Tensor, int], Tensor],
    camtoworlds: Tensor,
    images: Sequence[Tensor],
    *,
    steps: int,
    lr: float,
    ssim_lambda: float,
    masks: Sequence[Tensor | None] | None = None,
    unit: float = 1.0,
) -> Tensor:
    """Test-time pose alignment: for each view ``b``, the camera-to-world that best explains
    ``images[b] [H, W, 3]`` with the scene held fixed, starting from ``camtoworlds[b]``
    (``[B, 4, 4]``, OpenCV axes). Each view gets a fresh :class:`PoseRefinement` correction and
    ``steps`` Adam steps on the training loss (L1 and ``ssim_lambda`` D-SSIM, over the kept
    pixels of ``masks[b] [H, W, 1]`` when given), the rate decaying log-linearly from ``lr`` to
    1 % of it, translations in ``unit`` lengths (the run's ``world_unit``). ``render(viewmats
    [1, 4, 4], b)`` must return the differentiable ``[1, H, W, 3]`` render of view ``b``.
    Returns the aligned ``[B, 4, 4]`` (detached)."""
    from splatforge.train.losses import masked_loss, ssim

    out = []
    for b in range(len(camtoworlds)):
        start = camtoworlds[b : b + 1].detach()
        refine = PoseRefinement(1, lr, 0.0, start.device, unit=unit)
        gt = images[b][None]
        mask = masks[b] if masks is not None else None
        for step in range(steps):
            pred = render(torch.linalg.inv(refine.refine(start, [0])), b)
            if mask is None:
                loss = (1.0 - ssim_lambda) * (pred - gt).abs().mean() + ssim_lambda * (1.0 - ssim(pred, gt))
            else:
                loss = masked_loss(pred, gt, mask[None], ssim_lambda)
            loss.backward()
            for group in refine.optimizer.param_groups:
                group["lr"] = lr * 0.01 ** (step / max(1, steps - 1))
            refine.step()
        with torch.no_grad():
            out.append(refine.refine(start, [0]))
    return torch.cat(out) if out else camtoworlds.detach().clone()


class PoseRefinement(ViewTable):
    """The views' pose corrections ``[V, 9]`` and their Adam; translations in ``unit`` lengths
    (the run's ``world_unit``)."""

    name = "deltas"

    def __init__(self, n_views: int, lr: float, weight_decay: float, device: torch.device, unit: float = 1.0):
        self.unit = float(unit)
        self.deltas = torch.nn.Parameter(torch.zeros(n_views, 9, device=device))
        self.optimizer = torch.optim.Adam([self.deltas], lr=lr, weight_decay=weight_decay)

    def transforms(self, views: list[int] | Tensor) -> Tensor:
        """``[B, 4, 4]`` camera-frame corrections of ``views``."""
        return pose_corrections(self.deltas[views], self.unit)

    def refine(self, camtoworlds: Tensor, views: list[int] | Tensor) -> Tensor:
        """``camtoworlds [B, 4, 4]`` of ``views`` with their corrections (differentiable)."""
        return camtoworlds @ self.transforms(views)

    def step(self) -> None:
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
