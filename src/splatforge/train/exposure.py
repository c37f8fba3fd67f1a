"""Per-image exposure compensation (Inria 3DGS, 2024 update: ``--exposure_lr_init``,
``--train_test_exp``).

Every view has a 3x4 affine colour transform ``E = [A | b]``, identity at the start; training
compares ``render @ A + b`` (Inria's ``matmul(image [H, W, 3], E[:3, :3]) + E[:3, 3]``) with the
captured image, so a frame's auto-exposure or white balance is absorbed by its ``E`` instead of
by the Gaussians. ``E`` has its own Adam, learning rate log-linear from ``exposure_lr_init`` to
``exposure_lr_final`` over the run (Inria's 0.01 to 0.001).

Test views have no trained ``E``. Inria's protocol (``--train_test_exp``) is followed at
evaluation: for each test view an affine is fitted on the **left half** of the image (least
squares, render to ground truth, closed form here) and the metrics are taken on the **right
half** only; ``metrics.json`` says so.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from splatforge.train.poses import ViewTable

__all__ = ["EXPOSURE_PROTOCOL", "ExposureModel", "apply_exposure", "fit_affine"]

EXPOSURE_PROTOCOL = (
    "per-view 3x4 colour affine (Inria's exposure): test views fitted by least squares on their left "
    "half, metrics on the right half (Inria's --train_test_exp)"
)


def apply_exposure(render: Tensor, E: Tensor) -> Tensor:
    """``render [B, H, W, 3]`` through ``E [B, 3, 4]``: ``render @ E[:, :, :3] + E[:, :, 3]``."""
    return torch.einsum("bhwi,bij->bhwj", render, E[:, :, :3]) + E[:, None, None, :, 3]


def fit_affine(render: Tensor, gt: Tensor, ridge: float = 1e-6) -> Tensor:
    """The ``[3, 4]`` affine (as :func:`apply_exposure` applies it) that best maps ``render [H,
    W, 3]`` to ``gt`` in least squares (ridge ``ridge`` towards the identity, so flat images stay
    well posed), in float64."""
    x = render.reshape(-1, 3).double()
    y = gt.reshape(-1, 3).double()
    X = torch.cat([x, torch.ones_like(x[:, :1])], dim=1)  # [P, 4]
    eye = torch.cat([torch.eye(3, dtype=X.dtype, device=X.device), torch.zeros(1, 3, dtype=X.dtype, device=X.device)])
    lhs = X.T @ X + ridge * len(X) * torch.eye(4, dtype=X.dtype, device=X.device)
    W = torch.linalg.solve(lhs, X.T @ y + ridge * len(X) * eye)  # [4, 3]: y = x @ W[:3] + W[3]
    return torch.cat([W[:3], W[3][:, None]], dim=1).to(render.dtype)


class ExposureModel(ViewTable):
    """The views' affines ``E [V, 3, 4]`` (a leaf tensor on ``device``) and their Adam."""

    name = "E"

    def __init__(self, n_views: int, steps: int, lr_init: float, lr_final: float, device: torch.device):
        eye = torch.cat([torch.eye(3), torch.zeros(3, 1)], dim=1)
        self.E = torch.nn.Parameter(eye.repeat(n_views, 1, 1).to(device))
        self.optimizer = torch.optim.Adam([self.E], lr=lr_init, eps=1e-15)
        self.steps, self.lr_init, self.lr_final = steps, lr_init, lr_final

    def lr_at(self, step: int) -> float:
        """Log-linear from ``lr_init`` at step 0 to ``lr_final`` at the last step."""
        t = min(max(step / max(1, self.steps), 0.0), 1.0)
        return math.exp((1.0 - t) * math.log(self.lr_init) + t * math.log(self.lr_final))

    def __call__(self, render: Tensor, views: list[int]) -> Tensor:
        return apply_exposure(render, self.E[views])

    def step(self, step: int, views: list[int]) -> None:
        """One Adam step of the affines of ``views`` (the step's rendered views) only: the
        others keep their values and moments (lazy Adam, as for embeddings: a dense step would
        keep moving every view's affine by its stale momentum, ten steps' worth per render)."""
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr_at(step)
        rows = torch.zeros(len(self.E), dtype=torch.bool, device=self.E.device)
        rows[list(views)] = True
        state = self.optimizer.state.get(self.E, {})
        kept = [
            (t, t[~rows].clone())
            for t in (self.E.data, *(state.get(k) for k in ("exp_avg", "exp_avg_sq")))
            if t is not None
        ]
        self.optimizer.step()
        state = self.optimizer.state[self.E]
        if len(kept) == 1:  # the first step made the moments: those of the other views stay zero
            for k in ("exp_avg", "exp_avg_sq"):
                state[k][~rows] = 0.0
        for t, old in kept:
            t[~rows] = old
        self.optimizer.zero_grad(set_to_none=True)
