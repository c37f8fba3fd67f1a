"""The ``cpu`` backend: torch autograd Functions over the compiled numba kernels.

Three differentiable stages, as in gsplat, so that ``means2d`` is a real node of the graph whose
``.grad`` (and ``.absgrad``) densification strategies read:

1. :func:`project` -> ``means2d, conics, depths, radii, compensations`` (``_cpu_project``),
2. :func:`sh_colors` -> view-dependent colours (``_cpu_project``),
3. :func:`rasterize_to_pixels` -> image and alpha (``_cpu_raster``).

Inputs must be float32 CPU tensors. Gradients flow to means, quats, scales, opacities, colours,
SH coefficients and ``viewmats`` (through the projection and the SH view directions: pose
refinement); not to ``Ks``.
"""

from __future__ import annotations

import logging
import math
import os
import subprocess
import sys
from typing import Any

import numpy as np
import torch
from torch import Tensor

from splatforge.raster import _cpu_project as kp
from splatforge.raster import _cpu_raster as kr
from splatforge.raster.constants import TILE_SIZE
from splatforge.raster.types import Projection

__all__ = ["from_cache", "project", "rasterize_to_pixels", "sh_colors", "warm_kernels"]

log = logging.getLogger(__name__)


_FROM_CACHE: dict[tuple[Any, tuple], Any] = {}
#: Set in the process that compiles the kernels for :func:`from_cache`.
_WARMUP_ENV = "SPLATFORGE_KERNEL_WARMUP"


def from_cache(kernel: Any, args: tuple) -> Any:
    """``kernel`` (a numba dispatcher with ``cache=True``) for these arguments' types, run as loaded
    from numba's on-disk cache in every process. The code numba runs in the process that compiled
    a kernel is not the code it later loads from the cache (the fresh process keeps its own
    objects), and with ``reassoc`` the two round differently (see
    ``constants.FASTMATH_REDUCTIONS``). So when the cache lacks the kernel, a child process
    compiles it (a small render and its backward, :func:`warm_kernels`), and this process loads
    the result. Where the cache cannot be written, the kernel is compiled here, as in every
    process on that installation."""
    import numba as nb

    sig = tuple(nb.typeof(a) for a in args)
    key = (kernel.py_func, sig)
    if key not in _FROM_CACHE:
        # whether the cache holds this signature, without compiling: numba's own look-up
        # (Dispatcher.compile's first step; ``_cache``/``targetctx`` are not public API)
        if not os.environ.get(_WARMUP_ENV) and kernel._cache.load_overload(sig, kernel.targetctx) is None:
            log.info("compiling the cpu rasterizer's kernels in a child process (once per installation)")
            proc = subprocess.run(
                [sys.executable, "-c", "from splatforge.raster.cpu import warm_kernels; warm_kernels()"],
                env={**os.environ, _WARMUP_ENV: "1"},
                capture_output=True,
                text=True,
                check=False,
            )
            if proc.returncode != 0:
                log.warning("compiling the kernels in a child process failed; compiling here:\n%s", proc.stderr[-2000:])
        kernel.compile(sig)
        _FROM_CACHE[key] = kernel
    return _FROM_CACHE[key]


def warm_kernels() -> None:
    """Compile the kernels :func:`from_cache` runs into numba's cache: one small render and its
    backward (the argument types are those every render uses)."""
    g = torch.Generator().manual_seed(0)
    n = 64
    leaves = [
        torch.randn(n, 3, generator=g) + torch.tensor([0.0, 0.0, 3.0]),
        torch.randn(n, 4, generator=g),
        torch.rand(n, 3, generator=g) * 0.1,
        torch.rand(n, generator=g),
        torch.rand(n, 3, generator=g),
    ]
    for t in leaves:
        t.requires_grad_(True)
    proj = project(
        *leaves[:4],
        torch.eye(4)[None],
        torch.tensor([[[40.0, 0, 16], [0, 40.0, 16], [0, 0, 1]]]),
        32,
        32,
        eps2d=0.3,
        near_plane=0.01,
        far_plane=1e10,
        antialiased=False,
    )
    render, alpha = rasterize_to_pixels(
        proj.means2d, proj.conics, leaves[4][None], leaves[3][None], proj.depths, proj.radii, 32, 32
    )
    (render.sum() + alpha.sum()).backward()


def _np(t: Tensor) -> np.ndarray:
    """A contiguous float32/int numpy view of a CPU tensor (no copy when already contiguous)."""
    return t.detach().contiguous().numpy()


class _ProjectFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, means, quats, scales, opacities, viewmats, Ks, settings):  # type: ignore[override]
        width, height, eps2d, near, far, antialiased = settings
        C, N = viewmats.shape[0], means.shape[0]
        means2d = np.zeros((C, N, 2), np.float32)
        conics = np.zeros((C, N, 3), np.float32)
        depths = np.zeros((C, N), np.float32)
        radii = np.zeros((C, N, 2), np.int32)
        comps = np.zeros((C, N), np.float32)
        arrays = [_np(t) for t in (means, quats, scales, opacities, viewmats, Ks)]
        kp.project_fwd(*arrays, width, height, eps2d, near, far, antialiased, means2d, conics, depths, radii, comps)
        out = [torch.from_numpy(a) for a in (means2d, conics, depths, radii, comps)]
        ctx.settings = settings
        ctx.save_for_backward(means, quats, scales, viewmats, Ks, out[1], out[3], out[4])
        ctx.mark_non_differentiable(out[3])
        return tuple(out)

    @staticmethod
    def backward(ctx: Any, v_means2d, v_conics, v_depths, _v_radii, v_comps):  # type: ignore[override]
        means, quats, scales, viewmats, Ks, conics, radii, comps = ctx.saved_tensors
        width, height, eps2d, _near, _far, antialiased = ctx.settings
        N, C = means.shape[0], viewmats.shape[0]
        want_view = bool(ctx.needs_input_grad[4])
        v_view = np.zeros(((N + kp._CHUNK - 1) // kp._CHUNK if want_view else 1, C, 12), np.float32)
        v_means = np.zeros((N, 3), np.float32)
        v_quats = np.zeros((N, 4), np.float32)
        v_scales = np.zeros((N, 3), np.float32)
        grads = [
            _np(g) if g is not None else np.zeros(s.shape, np.float32)
            for g, s in ((v_means2d, conics[..., :2]), (v_conics, conics), (v_depths, comps), (v_comps, comps))
        ]
        kp.project_bwd(
            _np(means),
            _np(quats),
            _np(scales),
            _np(viewmats),
            _np(Ks),
            width,
            height,
            eps2d,
            antialiased,
            _np(radii),
            _np(conics),
            _np(comps),
            *grads,
            v_means,
            v_quats,
            v_scales,
            want_view,
            v_view,
        )
        v_viewmats = None
        if want_view:
            summed = torch.from_numpy(v_view.sum(axis=0, dtype=np.float64).astype(np.float32))  # [C, 12]
            v_viewmats = torch.zeros((C, 4, 4), dtype=viewmats.dtype)
            v_viewmats[:, :3, :3] = summed[:, :9].view(C, 3, 3)
            v_viewmats[:, :3, 3] = summed[:, 9:]
        return (
            torch.from_numpy(v_means),
            torch.from_numpy(v_quats),
            torch.from_numpy(v_scales),
            None,
            v_viewmats,
            None,
            None,
        )


def project(
    means: Tensor,
    quats: Tensor,
    scales: Tensor,
    opacities: Tensor,
    viewmats: Tensor,
    Ks: Tensor,
    width: int,
    height: int,
    *,
    eps2d: float,
    near_plane: float,
    far_plane: float,
    antialiased: bool,
) -> Projection:
    """Compiled EWA projection; same contract as :func:`splatforge.raster.reference.project`."""
    settings = (int(width), int(height), float(eps2d), float(near_plane), float(far_plane), bool(antialiased))
    means2d, conics, depths, radii, comps = _ProjectFn.apply(means, quats, scales, opacities, viewmats, Ks, settings)
    return Projection(means2d, conics, depths, radii, comps if antialiased else None)


def _bin(means2d, radii, depths, conics, opacities, width, height) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`_cpu_raster.bin_gaussians` on tensors: ``(offsets, ids, lanes)``."""
    return kr.bin_gaussians(_np(means2d), _np(radii), _np(depths), _np(conics), _np(opacities), int(width), int(height))


class _SHFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, means, sh0, shN, campos, radii, degree):  # type: ignore[override]
        colors = np.zeros((campos.shape[0], means.shape[0], 3), np.float32)
        kp.sh_fwd(_np(means), _np(sh0), _np(shN), _np(campos), degree, _np(radii), colors)
        ctx.degree = degree
        ctx.save_for_backward(means, sh0, shN, campos, radii)
        return torch.from_numpy(colors)

    @staticmethod
    def backward(ctx: Any, v_colors):  # type: ignore[override]
        means, sh0, shN, campos, radii = ctx.saved_tensors
        v_sh0, v_shN = np.zeros(sh0.shape, np.float32), np.zeros(shN.shape, np.float32)
        v_means = np.zeros(means.shape, np.float32)
        v_campos = np.zeros(((means.shape[0] + kp._CHUNK - 1) // kp._CHUNK, campos.shape[0], 3), np.float32)
        kp.sh_bwd(
            _np(means),
            _np(sh0),
            _np(shN),
            _np(campos),
            ctx.degree,
            _np(radii),
            _np(v_colors),
            v_sh0,
            v_shN,
            v_means,
            v_campos,
        )
        v_cam = (
            torch.from_numpy(v_campos.sum(axis=0, dtype=np.float64).astype(np.float32))
            if ctx.needs_input_grad[3]
            else None
        )
        return torch.from_numpy(v_means), torch.from_numpy(v_sh0), torch.from_numpy(v_shN), v_cam, None, None


def sh_colors(
    means: Tensor, coeffs: Tensor | tuple[Tensor, Tensor], viewmats: Tensor, sh_degree: int, radii: Tensor
) -> Tensor:
    """Compiled SH evaluation; same contract as :func:`splatforge.raster.reference.sh_colors`,
    and ``coeffs`` may also be the pair ``(sh0 [N, 1, 3], shN [N, K - 1, 3])``, read in place
    (no concatenated copy, gradients written to each)."""
    sh0, shN = (coeffs[:, :1], coeffs[:, 1:]) if isinstance(coeffs, Tensor) else coeffs
    # camera centres, world, differentiable (pose refinement) and through the inverse as gsplat and
    # the reference take them: -R^T t has the same value but another gradient off the rotations
    campos = torch.linalg.inv(viewmats)[:, :3, 3]
    return _SHFn.apply(means, sh0.contiguous(), shN.contiguous(), campos.contiguous(), radii, int(sh_degree))


class _RasterizeFn(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, means2d, conics, colors, opacities, backgrounds, radii, depths, width, height, absgrad
    ):
        C, _N, D = colors.shape
        tiles_x = math.ceil(width / TILE_SIZE)
        offsets, ids, lanes = _bin(means2d, radii, depths, conics, opacities, width, height)
        render = np.empty((C, height, width, D), np.float32)
        alpha = np.empty((C, height, width), np.float32)
        last = np.empty((C, height, width), np.int32)
        bgs = _np(backgrounds)
        kr.raster_fwd(
            _np(means2d),
            _np(conics),
            _np(colors),
            _np(opacities),
            bgs,
            offsets,
            ids,
            lanes,
            width,
            height,
            tiles_x,
            render,
            alpha,
            last,
        )
        ctx.isect = (offsets, ids, lanes, (offsets.shape[0] - 1) // C)
        ctx.dims = (width, height, tiles_x, absgrad)
        ctx.means2d = means2d if absgrad else None  # absgrad is attached to this very tensor
        render_t, alpha_t = torch.from_numpy(render), torch.from_numpy(alpha)
        ctx.save_for_backward(means2d, conics, colors, opacities, backgrounds, alpha_t, torch.from_numpy(last))
        return render_t, alpha_t[..., None]

    @staticmethod
    def backward(ctx: Any, v_render, v_alpha):  # type: ignore[override]
        means2d, conics, colors, opacities, backgrounds, alpha, last = ctx.saved_tensors
        offsets, ids, lanes, n_tiles = ctx.isect
        width, height, tiles_x, absgrad = ctx.dims
        C, N, D = colors.shape
        M = ids.shape[0]
        g_xy, g_abs = np.empty((M, 2), np.float32), np.empty((M, 2), np.float32)  # every row written by raster_bwd
        g_conic, g_col, g_opac = np.empty((M, 3), np.float32), np.empty((M, D), np.float32), np.empty(M, np.float32)
        v_render_np = _np(v_render) if v_render is not None else np.zeros((C, height, width, D), np.float32)
        v_alpha_np = _np(v_alpha[..., 0]) if v_alpha is not None else np.zeros((C, height, width), np.float32)
        args = (
            _np(means2d),
            _np(conics),
            _np(colors),
            _np(opacities),
            _np(backgrounds),
            offsets,
            ids,
            lanes,
            width,
            height,
            tiles_x,
            _np(alpha),
            _np(last),
            v_render_np,
            v_alpha_np,
            g_xy,
            g_abs,
            g_conic,
            g_col,
            g_opac,
        )
        from_cache(kr.raster_bwd, args)(*args)
        v_means2d, v_abs = np.zeros((C, N, 2), np.float32), np.zeros((C, N, 2), np.float32)
        v_conics, v_colors, v_opac = (
            np.zeros((C, N, 3), np.float32),
            np.zeros((C, N, D), np.float32),
            np.zeros((C, N), np.float32),
        )
        kr.reduce_isects(
            offsets, ids, n_tiles, g_xy, g_abs, g_conic, g_col, g_opac, v_means2d, v_abs, v_conics, v_colors, v_opac
        )
        if absgrad:
            ctx.means2d.absgrad = torch.from_numpy(v_abs)
        v_bg = None
        if ctx.needs_input_grad[4]:
            v_bg = ((1.0 - alpha)[..., None] * v_render).sum(dim=(1, 2)) if v_render is not None else None
        return (
            torch.from_numpy(v_means2d),
            torch.from_numpy(v_conics),
            torch.from_numpy(v_colors),
            torch.from_numpy(v_opac),
            v_bg,
            None,
            None,
            None,
            None,
            None,
        )


def rasterize_to_pixels(
    means2d: Tensor,
    conics: Tensor,
    colors: Tensor,
    opacities: Tensor,
    depths: Tensor,
    radii: Tensor,
    width: int,
    height: int,
    backgrounds: Tensor | None = None,
    absgrad: bool = False,
) -> tuple[Tensor, Tensor]:
    """Compiled tile rasterizer; same contract as
    :func:`splatforge.raster.reference.rasterize_to_pixels`."""
    if backgrounds is None:
        backgrounds = torch.zeros((colors.shape[0], colors.shape[2]), dtype=colors.dtype)
    return _RasterizeFn.apply(
        means2d,
        conics,
        colors.contiguous(),
        opacities.contiguous(),
        backgrounds.contiguous(),
        radii,
        depths,
        int(width),
        int(height),
        bool(absgrad),
    )


def transmittance_stats(
    means2d: Tensor, conics: Tensor, opacities: Tensor, depths: Tensor, radii: Tensor, width: int, height: int
) -> tuple[Tensor, Tensor]:
    """Compiled version of :func:`splatforge.raster.reference.transmittance_stats`."""
    C, N = opacities.shape
    tiles_x = math.ceil(width / TILE_SIZE)
    offsets, ids, lanes = _bin(means2d, radii, depths, conics, opacities, width, height)
    isect_T, isect_n = np.zeros(ids.shape[0], np.float64), np.zeros(ids.shape[0], np.int64)
    kr.raster_transmittance(
        _np(means2d),
        _np(conics),
        _np(opacities),
        offsets,
        ids,
        lanes,
        int(width),
        int(height),
        tiles_x,
        isect_T,
        isect_n,
    )
    cams = np.repeat(np.arange(C), np.diff(offsets[:: (offsets.shape[0] - 1) // C]))
    flat = cams * N + ids
    sum_T = np.bincount(flat, weights=isect_T, minlength=C * N).reshape(C, N)
    count = np.bincount(flat, weights=isect_n, minlength=C * N).reshape(C, N)
    return torch.from_numpy(sum_T), torch.from_numpy(count.astype(np.int64))


def median_depth(
    means2d: Tensor,
    conics: Tensor,
    opacities: Tensor,
    depths: Tensor,
    radii: Tensor,
    width: int,
    height: int,
    rays: tuple[Tensor, Tensor, Tensor],
) -> tuple[Tensor, Tensor]:
    """Compiled version of :func:`splatforge.raster.reference.median_depth`."""
    C = opacities.shape[0]
    tiles_x = math.ceil(width / TILE_SIZE)
    offsets, ids, lanes = _bin(means2d, radii, depths, conics, opacities, width, height)
    median, alpha = np.empty((C, height, width), np.float32), np.empty((C, height, width), np.float32)
    kr.raster_median(
        _np(means2d),
        _np(conics),
        _np(opacities),
        _np(depths),
        offsets,
        ids,
        lanes,
        int(width),
        int(height),
        tiles_x,
        *(_np(r) for r in rays),
        median,
        alpha,
    )
    return torch.from_numpy(median)[..., None], torch.from_numpy(alpha)[..., None]
