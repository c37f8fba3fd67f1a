"""The ``gsplat`` backend: gsplat's CUDA kernels (``gsplat.rasterization``) for CUDA tensors.

gsplat is imported here only, and this module is imported only when a CUDA tensor is rendered
with it: importing or probing gsplat on a machine without a GPU would start its JIT build (it
compiles whenever ``nvcc`` is found). gsplat is a dependency of splatforge (its strategies run on CPU too); its CUDA
extension is compiled by gsplat on the first CUDA call.
"""

from __future__ import annotations

from typing import Any, Optional

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
    sh_degree: Optional[int],
    near_plane: float,
    far_plane: float,
    eps2d: float,
    backgrounds: Optional[Tensor],
    render_mode: str,
    rasterize_mode: str,
    absgrad: bool,
) -> tuple[Tensor, Tensor, dict[str, Any]]:
    """``gsplat.rasterization`` with ``packed=False`` so ``info`` matches the other backends.

    Raises:
        BackendUnavailableError: gsplat is not installed or fails to load its CUDA extension.
    """
    try:
        import gsplat
    except ImportError as exc:  # pragma: no cover - needs a CUDA machine without gsplat
        raise BackendUnavailableError(f"the gsplat backend needs gsplat==1.5.3 (a splatforge dependency): {exc}") from exc
    render, alpha, info = gsplat.rasterization(
        means, quats, scales, opacities, colors, viewmats, Ks, width, height,
        near_plane=near_plane, far_plane=far_plane, eps2d=eps2d, sh_degree=sh_degree, packed=False,
        backgrounds=backgrounds, render_mode=render_mode, rasterize_mode=rasterize_mode, absgrad=absgrad,
    )  # fmt: skip
    info["backend"] = "gsplat"
    return render, alpha, info
