"""gsplat's ``MCMCStrategy`` (3DGS as Markov Chain Monte Carlo, Kheradmand et al. 2024) with
device-agnostic relocation and noise, so it runs on CPU tensors too.

gsplat 1.5.3 computes the relocation (paper eq. 9) and the covariances for the position noise
with CUDA kernels; here both are plain torch, and the strategy's bookkeeping (multinomial
sampling, optimizer-state surgery) is gsplat's own helpers. Importing this module imports gsplat
(its Python parts only; nothing is compiled).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from gsplat.strategy import MCMCStrategy as _GsplatMCMC
from torch import Tensor

from splatforge.errors import TrainingError
from splatforge.geometry.quats import quat_scale_to_covar

__all__ = ["MCMCStrategy", "relocation"]


def relocation(opacities: Tensor, scales: Tensor, ratios: Tensor, binoms: Tensor) -> tuple[Tensor, Tensor]:
    """Opacities and scales of a Gaussian split into ``n`` copies that together render like it
    (Kheradmand et al. 2024, eq. 9), as gsplat's ``compute_relocation``:

    ``o' = 1 - (1 - o)^(1/n)``, ``s' = o / (sum_{i=1..n} sum_{k=0..i-1} C(i-1, k) (-1)^k
    o'^(k+1) / sqrt(k+1)) * s``.

    Args:
        opacities: ``[N]`` activated. scales: ``[N, 3]`` activated. ratios: ``[N]`` copies n
            (clamped to [1, n_max]). binoms: ``[n_max, n_max]`` binomial coefficients.

    Returns:
        ``(new_opacities [N], new_scales [N, 3])``. Evaluated in float64: the alternating sum
        cancels heavily for large n.
    """
    n_max = binoms.shape[0]
    n = ratios.clamp(1, n_max).long()
    o = opacities.double()
    new_o = 1.0 - torch.pow(1.0 - o, 1.0 / n.double())
    k = torch.arange(n_max, dtype=torch.float64, device=o.device)
    # A[i - 1, k] = C(i - 1, k) (-1)^k / sqrt(k + 1), zero above the diagonal (binoms is zero there)
    A = binoms.double().to(o.device) * ((-1.0) ** k) / torch.sqrt(k + 1.0)
    powers = new_o[:, None] ** (k[None, :] + 1.0)  # [N, n_max]: o'^(k+1)
    per_i = powers @ A.T  # [N, n_max]: inner sum for i = 1..n_max
    denom = torch.cumsum(per_i, dim=1).gather(1, (n - 1)[:, None])[:, 0]
    new_s = (o / denom)[:, None] * scales.double()
    return new_o.to(opacities.dtype), new_s.to(scales.dtype)


def _relocated(params, sampled: Tensor, binoms: Tensor, min_opacity: float):
    """A function that writes the relocated opacity (logit) and scale (log) of the ``sampled``
    Gaussians, each sampled k times, into a parameter tensor (other parameters unchanged)."""
    opacities = torch.sigmoid(params["opacities"])
    new_o, new_s = relocation(
        opacities[sampled], torch.exp(params["scales"])[sampled], torch.bincount(sampled)[sampled] + 1, binoms
    )
    new_o = torch.clamp(new_o, min=min_opacity, max=1.0 - torch.finfo(torch.float32).eps)

    def write(name: str, p: Tensor) -> None:
        if name == "opacities":
            p[sampled] = torch.logit(new_o)
        elif name == "scales":
            p[sampled] = torch.log(new_s)

    return write


@torch.no_grad()
def relocate(params, optimizers, mask: Tensor, binoms: Tensor, min_opacity: float) -> None:
    """Move dead Gaussians (``mask``) onto live ones sampled by opacity (gsplat's ``relocate``)."""
    from gsplat.strategy.ops import _multinomial_sample, _update_param_with_optimizer

    dead = mask.nonzero(as_tuple=True)[0]
    alive = (~mask).nonzero(as_tuple=True)[0]
    sampled = alive[
        _multinomial_sample(torch.sigmoid(params["opacities"])[alive].flatten(), len(dead), replacement=True)
    ]
    write = _relocated(params, sampled, binoms, min_opacity)

    def param_fn(name: str, p: Tensor) -> Tensor:
        write(name, p)
        p[dead] = p[sampled]
        return torch.nn.Parameter(p, requires_grad=p.requires_grad)

    def optimizer_fn(key: str, v: Tensor) -> Tensor:
        v[sampled] = 0
        return v

    _update_param_with_optimizer(param_fn, optimizer_fn, params, optimizers)


@torch.no_grad()
def sample_add(params, optimizers, n: int, binoms: Tensor, min_opacity: float) -> None:
    """Add ``n`` Gaussians sampled by opacity (gsplat's ``sample_add``)."""
    from gsplat.strategy.ops import _multinomial_sample, _update_param_with_optimizer

    sampled = _multinomial_sample(torch.sigmoid(params["opacities"]).flatten(), n, replacement=True)
    write = _relocated(params, sampled, binoms, min_opacity)

    def param_fn(name: str, p: Tensor) -> Tensor:
        write(name, p)
        return torch.nn.Parameter(torch.cat([p, p[sampled]]), requires_grad=p.requires_grad)

    def optimizer_fn(key: str, v: Tensor) -> Tensor:
        return torch.cat([v, torch.zeros((len(sampled), *v.shape[1:]), device=v.device, dtype=v.dtype)])

    _update_param_with_optimizer(param_fn, optimizer_fn, params, optimizers)


@torch.no_grad()
def inject_noise(params, scaler: float, compiled: bool = True) -> None:
    """Perturb the means by noise shaped by each covariance, strongest for transparent
    Gaussians (gsplat's ``inject_noise_to_position``, eq. 7 of the paper). The normal draws come
    from torch's generator on every device; for float32 CPU tensors (and ``compiled``) they are
    then combined by a compiled kernel (:func:`splatforge.train._cpu_kernels.add_covariance_noise`),
    otherwise in torch."""
    means = params["means"]
    z = torch.randn_like(means)
    if compiled and means.device.type == "cpu" and means.dtype == torch.float32 and means.is_contiguous():
        from splatforge.train._cpu_kernels import add_covariance_noise

        arrays = [params[k].detach().contiguous().numpy() for k in ("quats", "scales", "opacities")]
        add_covariance_noise(means.data.numpy(), *arrays, z.numpy(), float(scaler))
        return
    opacities = torch.sigmoid(params["opacities"].flatten())
    covars = quat_scale_to_covar(params["quats"], torch.exp(params["scales"]))
    gate = 1.0 / (1.0 + torch.exp(-100.0 * ((1.0 - opacities) - 0.995)))
    means.add_(torch.einsum("bij,bj->bi", covars, z * gate[:, None] * scaler))


@dataclass
class MCMCStrategy(_GsplatMCMC):
    """``gsplat.strategy.MCMCStrategy`` (same fields: ``cap_max``, ``noise_lr``, ``refine_*``,
    ``min_opacity``) whose relocation, growth and noise run in torch on any device, plus the
    opacity and scale regularisers of gsplat's MCMC trainer (``opacity_reg``, ``scale_reg``)."""

    opacity_reg: float = 0.01
    scale_reg: float = 0.01
    world_unit: float = 1.0
    """The length (world units) gsplat's normalised world has as 1 (``TrainConfig.world_unit``):
    the noise and the scale regulariser are gsplat's in that world, whatever the scene's scale."""
    absgrad: bool = False  # the rasterizer need not accumulate absolute gradients for MCMC

    def initialize_state(self, scene_scale: float = 1.0) -> dict[str, Any]:
        """gsplat's state (``binoms``); ``scene_scale`` is not used by MCMC."""
        return super().initialize_state()

    def regularization(self, params) -> Tensor:
        """``opacity_reg * mean(sigmoid(opacities)) + scale_reg * mean(exp(scales)) / world_unit``,
        added to the loss (Kheradmand et al. 2024, sec. 4.3; gsplat's ``simple_trainer``, whose
        scales are in its normalised world)."""
        opacities = self.opacity_reg * torch.sigmoid(params["opacities"]).mean()
        return opacities + self.scale_reg * torch.exp(params["scales"]).mean() / self.world_unit

    def step_post_backward(
        self, params, optimizers, state: dict[str, Any], step: int, info: dict[str, Any], lr: float
    ) -> None:
        """Relocate dead Gaussians and grow by 5 % (to ``cap_max``) every ``refine_every`` steps
        inside the refine window, then perturb the means by noise scaled by ``lr * noise_lr``
        (``lr``: the means' learning rate of this step, world units) over ``world_unit ** 2``.

        gsplat's noise is a covariance (length^2) times that scaler (a length), so in world units
        it grows as the cube of the scene's scale; gsplat applies it in a world normalised to
        ``world_unit`` = 1. Dividing by ``world_unit ** 2`` gives that noise in any scene's units
        (one ``world_unit`` turns the normalised displacement back into world units).

        Raises:
            TrainingError: at a refinement step every Gaussian is dead (nothing to relocate onto;
                gsplat's ``relocate`` fails inside ``torch.multinomial`` there)."""
        binoms = state["binoms"]
        if self.refine_start_iter < step < self.refine_stop_iter and step % self.refine_every == 0:
            dead = torch.sigmoid(params["opacities"].flatten()) <= self.min_opacity
            if bool(dead.all()):
                raise TrainingError(
                    f"step {step}: all {len(dead)} Gaussians are less opaque than min_opacity "
                    f"{self.min_opacity:g}, so MCMC has none to relocate them onto: the training "
                    "views did not see them (check the cameras' poses and intrinsics)"
                )
            if dead.any():
                relocate(params, optimizers, dead, binoms, self.min_opacity)
            n_new = max(0, min(self.cap_max, int(1.05 * len(params["means"]))) - len(params["means"]))
            if n_new:
                sample_add(params, optimizers, n_new, binoms, self.min_opacity)
        inject_noise(params, lr / self.world_unit**2 * self.noise_lr)
