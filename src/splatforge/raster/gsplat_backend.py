"""The ``gsplat`` backend: gsplat's CUDA kernels (``gsplat.rasterization``) for CUDA tensors.

gsplat is imported here only, and this module is imported only when a CUDA tensor is rendered
with it: importing or probing gsplat on a machine without a GPU would start its JIT build (it
compiles whenever ``nvcc`` is found). gsplat is a dependency of splatforge (its strategies run on CPU too); its CUDA
extension is compiled by gsplat on the first CUDA call.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from splatforge.errors import BackendUnavailableError

__all__ = ["rasterize"]


def rasterize(
    means: Tensor,
    quats: Tensor,
    scales: Tensor,
    opacities: Tensor,
    colors: Tensor,
    viewmats: Tensor,
    Ks: Tensor,
    width: int,
    height: int,
    *,
    sh_degree: int | None,
    near_plane: float,
    far_plane: float,
    eps2d: float,
    backgrounds: Tensor | None,
    render_mode: str,
    rasterize_mode: str,
    absgrad: bool,
    distributed: bool = False,
) -> tuple[Tensor, Tensor, dict[str, Any]]:
    """``gsplat.rasterization`` with ``packed=False`` so ``info`` matches the other backends.

    gsplat has no inverse-depth mode: for ``ID``/``RGB+ID`` the colours are evaluated here (gsplat's
    own ``spherical_harmonics`` and ``max(SH + 0.5, 0)``) and ``1 / z`` is appended as a feature
    channel, which gsplat composites like any colour: the same ``sum_i w_i / z_i``.

    Raises:
        BackendUnavailableError: gsplat is not installed or fails to load its CUDA extension.
    """
    try:
        import gsplat
    except ImportError as exc:  # pragma: no cover - needs a CUDA machine without gsplat
        raise BackendUnavailableError(
            f"the gsplat backend needs gsplat==1.5.3 (a splatforge dependency): {exc}"
        ) from exc
    if render_mode in ("ID", "RGB+ID"):
        colors, sh_degree, backgrounds = _inverse_depth_features(
            gsplat, means, colors, viewmats, sh_degree, backgrounds, rgb=render_mode == "RGB+ID"
        )
        render_mode = "RGB"
    render, alpha, info = gsplat.rasterization(
        means,
        quats,
        scales,
        opacities,
        colors,
        viewmats,
        Ks,
        width,
        height,
        near_plane=near_plane,
        far_plane=far_plane,
        eps2d=eps2d,
        sh_degree=sh_degree,
        packed=False,
        backgrounds=backgrounds,
        render_mode=render_mode,
        rasterize_mode=rasterize_mode,
        absgrad=absgrad,
        distributed=distributed,
    )
    info["backend"] = "gsplat"
    return render, alpha, info


def _inverse_depth_features(
    gsplat: Any,
    means: Tensor,
    colors: Tensor,
    viewmats: Tensor,
    sh_degree: int | None,
    backgrounds: Tensor | None,
    rgb: bool,
) -> tuple[Tensor, None, Tensor | None]:
    """Per-camera features ``[C, N, D]`` for an inverse-depth render: the colours (``rgb``) and
    ``1/z`` (0 behind the camera; gsplat culls those), with the backgrounds extended by 0."""
    import torch

    C = viewmats.shape[0]
    z = torch.einsum("cj,nj->cn", viewmats[:, 2, :3], means) + viewmats[:, 2, 3:4]
    front = z > 0
    inv = torch.where(front, 1.0 / torch.where(front, z, torch.ones_like(z)), torch.zeros_like(z))[..., None]
    if not rgb:
        return inv, None, None
    if sh_degree is not None:
        campos = torch.linalg.inv(viewmats)[:, :3, 3]
        dirs = means[None] - campos[:, None]
        coeffs = colors[None].expand((C,) + colors.shape)
        colors = torch.clamp_min(gsplat.spherical_harmonics(sh_degree, dirs, coeffs) + 0.5, 0.0)
    elif colors.dim() == 2:
        colors = colors[None].expand(C, -1, -1)
    if backgrounds is not None:
        backgrounds = torch.cat([backgrounds, torch.zeros_like(backgrounds[:, :1])], dim=-1)
    return torch.cat([colors, inv], dim=-1), None, backgrounds
