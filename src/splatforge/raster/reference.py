"""The ``reference`` backend: slow, readable, pure-torch autograd. The oracle for tests.

Every step follows gsplat 1.5.3 (``gsplat/cuda/csrc/ProjectionEWA3DGSFused.cu``,
``IntersectTile.cu``, ``RasterizeToPixels3DGSFwd.cu``) one expression at a time, written with
plain torch ops so autograd gives the gradients. Nothing here is shared with the compiled ``cpu``
backend except the SH basis of :mod:`splatforge.geometry.sh`, so parity tests between the two
check the hand-written backward of ``cpu`` against autograd.

Memory is O(C * N) for projection plus O(pixels_per_tile * gaussians_in_tile) per tile; time is
dominated by the Python loop over tiles. Use it on small scenes.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from splatforge.geometry.quats import quat_scale_to_covar
from splatforge.geometry.sh import eval_sh
from splatforge.raster.constants import (
    ALPHA_MAX,
    ALPHA_THRESHOLD,
    RADIUS_EXTEND,
    TILE_SIZE,
    TRANSMITTANCE_MIN,
)
from splatforge.raster.types import Projection

__all__ = ["project", "rasterize_to_pixels", "sh_colors"]


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
    """EWA projection of 3D Gaussians into C pinhole cameras (Zwicker et al. 2002; 3DGS eq. 5).

    Args:
        means: ``[N, 3]`` centres, world units.
        quats: ``[N, 4]`` wxyz, any length. scales: ``[N, 3]`` activated (not log).
        opacities: ``[N]`` activated (not logit); used only for the opacity-aware radius.
        viewmats: ``[C, 4, 4]`` world-to-camera, OpenCV axes. Ks: ``[C, 3, 3]`` pixels.

    Returns:
        A :class:`~splatforge.raster.types.Projection`; entries of culled Gaussians are zero.
    """
    R = viewmats[:, :3, :3]  # [C, 3, 3]
    t = viewmats[:, :3, 3]  # [C, 3]
    means_c = torch.einsum("cij,nj->cni", R, means) + t[:, None, :]  # [C, N, 3]
    covars = quat_scale_to_covar(quats, scales)  # [N, 3, 3]
    covars_c = R[:, None] @ covars[None] @ R.transpose(-1, -2)[:, None]  # [C, N, 3, 3]

    fx, fy = Ks[:, 0, 0, None], Ks[:, 1, 1, None]  # [C, 1]
    cx, cy = Ks[:, 0, 2, None], Ks[:, 1, 2, None]
    x, y, z = means_c.unbind(-1)  # [C, N]
    in_depth = (z >= near_plane) & (z <= far_plane)
    z = torch.where(in_depth, z, torch.ones_like(z))  # keep culled entries finite

    # Clamp the Jacobian's x/z, y/z to 1.3x the field of view (gsplat's persp_proj).
    tan_fovx, tan_fovy = 0.5 * width / fx, 0.5 * height / fy
    lim_x_pos, lim_x_neg = (width - cx) / fx + 0.3 * tan_fovx, cx / fx + 0.3 * tan_fovx
    lim_y_pos, lim_y_neg = (height - cy) / fy + 0.3 * tan_fovy, cy / fy + 0.3 * tan_fovy
    tx = z * torch.minimum(lim_x_pos, torch.maximum(-lim_x_neg, x / z))
    ty = z * torch.minimum(lim_y_pos, torch.maximum(-lim_y_neg, y / z))
    zero = torch.zeros_like(z)
    J = torch.stack([fx / z, zero, -fx * tx / (z * z), zero, fy / z, -fy * ty / (z * z)], dim=-1).reshape(
        z.shape + (2, 3)
    )
    cov2d = J @ covars_c @ J.transpose(-1, -2)  # [C, N, 2, 2]
    means2d = torch.stack([fx * x / z + cx, fy * y / z + cy], dim=-1)  # [C, N, 2]

    a, b, c = cov2d[..., 0, 0], cov2d[..., 0, 1], cov2d[..., 1, 1]
    det_orig = a * c - b * b
    a, c = a + eps2d, c + eps2d  # low-pass filter (3DGS): dilate by eps2d pixels^2
    det = a * c - b * b
    valid = in_depth & (det > 0)
    det_safe = torch.where(valid, det, torch.ones_like(det))
    compensations = torch.sqrt(torch.clamp(det_orig / det_safe, min=0.0))
    conics = torch.stack([c / det_safe, -b / det_safe, a / det_safe], dim=-1)

    # Opacity-aware radius (gsplat >= 1.5): alpha falls below 1/255 beyond `extend` sigmas.
    with torch.no_grad():
        opac = opacities[None, :].expand_as(z)
        if antialiased:
            opac = opac * compensations
        valid = valid & (opac >= ALPHA_THRESHOLD)
        extend = torch.clamp(
            torch.sqrt(2.0 * torch.log(torch.clamp(opac, min=ALPHA_THRESHOLD) / ALPHA_THRESHOLD)),
            max=RADIUS_EXTEND,
        )
        radius_x = torch.ceil(extend * torch.sqrt(torch.clamp(a, min=0.0)))
        radius_y = torch.ceil(extend * torch.sqrt(torch.clamp(c, min=0.0)))
        valid = valid & ((radius_x > 0) | (radius_y > 0))
        mx, my = means2d[..., 0], means2d[..., 1]
        valid = valid & ~(
            (mx + radius_x <= 0) | (mx - radius_x >= width) | (my + radius_y <= 0) | (my - radius_y >= height)
        )
        radii = torch.stack([radius_x, radius_y], dim=-1).to(torch.int32) * valid[..., None]

    def keep(v: Tensor) -> Tensor:
        mask = valid.reshape(valid.shape + (1,) * (v.dim() - valid.dim()))
        return torch.where(mask, v, torch.zeros_like(v))

    return Projection(
        means2d=keep(means2d),
        conics=keep(conics),
        depths=keep(means_c[..., 2]),
        radii=radii,
        compensations=keep(compensations) if antialiased else None,
    )


def sh_colors(means: Tensor, coeffs: Tensor, viewmats: Tensor, sh_degree: int, radii: Tensor) -> Tensor:
    """View-dependent colours ``[C, N, 3]`` (before the +0.5 offset) from SH ``coeffs [N, K, 3]``.

    Directions go from each camera centre to each Gaussian centre (world space); Gaussians culled
    in a camera (``radii == 0``) get colour 0 there, as in gsplat.
    """
    campos = torch.linalg.inv(viewmats)[:, :3, 3]  # [C, 3]
    dirs = means[None, :, :] - campos[:, None, :]  # [C, N, 3]
    colors = eval_sh(sh_degree, dirs, coeffs[None].expand((dirs.shape[0],) + coeffs.shape))
    visible = (radii > 0).all(dim=-1, keepdim=True)
    return torch.where(visible, colors, torch.zeros_like(colors))


def tile_ranges(means2d: Tensor, radii: Tensor, width: int, height: int) -> tuple[Tensor, Tensor, int, int]:
    """Tile rectangles ``[..., 2]`` (inclusive min, exclusive max, in tiles) each Gaussian covers."""
    tiles_x, tiles_y = math.ceil(width / TILE_SIZE), math.ceil(height / TILE_SIZE)
    center = means2d.detach() / TILE_SIZE
    rad = radii.to(means2d.dtype) / TILE_SIZE
    limit = torch.tensor([tiles_x, tiles_y], device=means2d.device)
    tmin = torch.minimum(torch.clamp(torch.floor(center - rad), min=0).long(), limit)
    tmax = torch.minimum(torch.clamp(torch.ceil(center + rad), min=0).long(), limit)
    return tmin, tmax, tiles_x, tiles_y


def _tiles(means2d: Tensor, radii: Tensor, depths: Tensor, width: int, height: int):
    """Yield, per camera and 16x16 tile, ``(cam, (x0, y0, x1, y1), ids, pix)``: the tile's pixel
    bounds (exclusive max), the Gaussians touching it sorted by depth (stable, ties by index, as
    gsplat's radix sort) and the pixel centres ``[P, 2]``."""
    dev, dt = means2d.device, means2d.dtype
    tmin, tmax, tiles_x, tiles_y = tile_ranges(means2d, radii, width, height)
    visible = (radii > 0).all(dim=-1)
    for cam in range(means2d.shape[0]):
        for ty in range(tiles_y):
            for tx in range(tiles_x):
                x0, y0 = tx * TILE_SIZE, ty * TILE_SIZE
                x1, y1 = min(x0 + TILE_SIZE, width), min(y0 + TILE_SIZE, height)
                hit = (
                    visible[cam]
                    & (tmin[cam, :, 0] <= tx)
                    & (tx < tmax[cam, :, 0])
                    & (tmin[cam, :, 1] <= ty)
                    & (ty < tmax[cam, :, 1])
                )
                ids = torch.nonzero(hit).flatten()
                ids = ids[torch.sort(depths[cam, ids].detach(), stable=True).indices]
                py, px = torch.meshgrid(
                    torch.arange(y0, y1, device=dev, dtype=dt) + 0.5,
                    torch.arange(x0, x1, device=dev, dtype=dt) + 0.5,
                    indexing="ij",
                )
                yield cam, (x0, y0, x1, y1), ids, torch.stack([px.flatten(), py.flatten()], dim=-1)


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
    """Front-to-back alpha compositing, one 16x16 tile at a time.

    Args:
        means2d: ``[C, N, 2]`` pixels. conics: ``[C, N, 3]`` upper triangle of the inverse 2D
            covariance. colors: ``[C, N, D]``. opacities: ``[C, N]`` activated (times the
            compensation in antialiased mode). depths: ``[C, N]`` camera z, sort key.
        radii: ``[C, N, 2]`` int pixels, 0 for culled. backgrounds: ``[C, D]`` or None.
        absgrad: if True, after backward ``means2d.absgrad [C, N, 2]`` holds the sum over pixels
            of the absolute per-pixel gradients (AbsGS, Ye et al. 2024), as gsplat computes it.

    Returns:
        ``render [C, H, W, D]`` and ``alpha [C, H, W, 1]``.
    """
    C, N, D = colors.shape
    dev, dt = means2d.device, means2d.dtype
    absgrad_buf = torch.zeros((C, N, 2), device=dev, dtype=dt) if absgrad else None
    renders = [torch.zeros((height, width, D), device=dev, dtype=dt) for _ in range(C)]
    alphas = [torch.zeros((height, width, 1), device=dev, dtype=dt) for _ in range(C)]
    for cam, (x0, y0, x1, y1), ids, pix in _tiles(means2d, radii, depths, width, height):
        bg = backgrounds[cam] if backgrounds is not None else None
        color, T = _composite(
            pix,
            means2d[cam, ids],
            conics[cam, ids],
            colors[cam, ids],
            opacities[cam, ids],
            bg,
            absgrad_buf[cam] if absgrad_buf is not None else None,
            ids,
        )
        renders[cam][y0:y1, x0:x1] = color.reshape(y1 - y0, x1 - x0, D)
        alphas[cam][y0:y1, x0:x1] = (1.0 - T).reshape(y1 - y0, x1 - x0, 1)
    if absgrad_buf is not None:
        means2d.absgrad = absgrad_buf  # filled during backward by the hooks in _composite
    render, alpha = torch.stack(renders), torch.stack(alphas)
    inputs = [t for t in (means2d, conics, colors, opacities) if t.requires_grad]
    if inputs and not render.requires_grad:
        # No Gaussian touched any pixel: stay in the graph so backward gives zero gradients.
        zero = sum(t.sum() for t in inputs) * 0.0
        render, alpha = render + zero, alpha + zero
    return render, alpha


def _composite(
    pix: Tensor,
    xy: Tensor,
    conic: Tensor,
    color: Tensor,
    opac: Tensor,
    background: Tensor | None,
    absgrad_buf: Tensor | None,
    ids: Tensor,
) -> tuple[Tensor, Tensor]:
    """Composite M depth-sorted Gaussians over P pixels: colour ``[P, D]``, final T ``[P]``."""
    P, M = pix.shape[0], xy.shape[0]
    if M == 0:
        T_empty = torch.ones((P,), dtype=pix.dtype, device=pix.device)
        out = torch.zeros((P, color.shape[-1]), dtype=pix.dtype, device=pix.device)
        return (out + background[None, :] if background is not None else out), T_empty
    delta = xy[None, :, :] - pix[:, None, :]  # [P, M, 2]
    if absgrad_buf is not None and torch.is_grad_enabled() and xy.requires_grad:
        # A zero per (pixel, Gaussian) lets a hook see each pixel's share of d loss / d means2d.
        probe = torch.zeros((P, M, 2), device=xy.device, dtype=xy.dtype, requires_grad=True)

        def _accumulate_abs(grad: Tensor) -> None:
            absgrad_buf.index_add_(0, ids, grad.abs().sum(0))

        probe.register_hook(_accumulate_abs)
        delta = delta + probe
    dx, dy = delta[..., 0], delta[..., 1]
    sigma = 0.5 * (conic[None, :, 0] * dx * dx + conic[None, :, 2] * dy * dy) + conic[None, :, 1] * dx * dy
    alpha = torch.clamp(opac[None, :] * torch.exp(-sigma), max=ALPHA_MAX)
    skip = (sigma < 0) | (alpha < ALPHA_THRESHOLD)
    alpha = torch.where(skip, torch.zeros_like(alpha), alpha)
    # Early stop: a Gaussian that would bring T to <= 1e-4 and all behind it are dropped.
    with torch.no_grad():
        keep = torch.cumprod(1.0 - alpha, dim=1) > TRANSMITTANCE_MIN
    alpha = alpha * keep
    one_minus = 1.0 - alpha
    T_before = torch.cumprod(torch.cat([torch.ones_like(one_minus[:, :1]), one_minus[:, :-1]], dim=1), dim=1)
    T_final = torch.prod(one_minus, dim=1)
    out = (alpha * T_before) @ color  # [P, D]
    if background is not None:
        out = out + T_final[:, None] * background[None, :]
    return out, T_final


@torch.no_grad()
def transmittance_stats(
    means2d: Tensor, conics: Tensor, opacities: Tensor, depths: Tensor, radii: Tensor, width: int, height: int
) -> tuple[Tensor, Tensor]:
    """Per camera and Gaussian: the sum, over the pixels where the Gaussian contributes (the
    compositing's own tests: alpha >= 1/255, before the pixel's early stop), of the
    transmittance in front of it, and the number of those pixels.

    Args: as :func:`rasterize_to_pixels` (``opacities`` activated, with any compensation).

    Returns:
        ``sum_T [C, N]`` float64 and ``count [C, N]`` int64; ``sum_T / count`` is the mean
        transmittance in front of the Gaussian over the pixels it touches.
    """
    C, N = opacities.shape
    dev = means2d.device
    sum_T = torch.zeros((C, N), dtype=torch.float64, device=dev)
    count = torch.zeros((C, N), dtype=torch.int64, device=dev)
    for cam, _, ids, pix in _tiles(means2d, radii, depths, width, height):
        if ids.numel() > 0:
            alpha, T_before = _tile_alphas(means2d[cam, ids], conics[cam, ids], opacities[cam, ids], pix)
            used = alpha > 0
            sum_T[cam].index_add_(0, ids, (T_before * used).sum(0).double())
            count[cam].index_add_(0, ids, used.sum(0))
    return sum_T, count


def _tile_alphas(xy: Tensor, conic: Tensor, opac: Tensor, pix: Tensor) -> tuple[Tensor, Tensor]:
    """The alphas ``[P, M]`` of M depth-sorted Gaussians at P pixels with the compositing's tests
    (0 where skipped or behind the early stop) and the transmittance in front of each."""
    delta = xy[None] - pix[:, None]
    dx, dy = delta[..., 0], delta[..., 1]
    sigma = 0.5 * (conic[None, :, 0] * dx * dx + conic[None, :, 2] * dy * dy) + conic[None, :, 1] * dx * dy
    alpha = torch.clamp(opac[None] * torch.exp(-sigma), max=ALPHA_MAX)
    alpha = torch.where((sigma < 0) | (alpha < ALPHA_THRESHOLD), torch.zeros_like(alpha), alpha)
    alpha = alpha * (torch.cumprod(1.0 - alpha, dim=1) > TRANSMITTANCE_MIN)
    T_before = torch.cumprod(torch.cat([torch.ones_like(alpha[:, :1]), 1.0 - alpha[:, :-1]], dim=1), dim=1)
    return alpha, T_before


@torch.no_grad()
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
    """Per pixel, the depth where the transmittance crosses 0.5: of the first Gaussian (front to
    back, the compositing's tests) after which ``T <= 0.5`` (2DGS's median depth, Huang et al.
    2024), the camera z of the point on the pixel's ray where its 3D density peaks (the
    ray-Gaussian intersection; its centre's z if that point is not in front of the camera); 0
    where the pixel never gets that opaque.

    Args: as :func:`rasterize_to_pixels` (``opacities`` activated, with any compensation), and
        ``rays`` from :func:`splatforge.raster.api.median_rays`.

    Returns:
        ``median [C, H, W, 1]`` (world units, camera z) and ``alpha [C, H, W, 1]``, no gradients.
    """
    C = means2d.shape[0]
    dev, dt = means2d.device, means2d.dtype
    median = torch.zeros((C, height, width, 1), dtype=dt, device=dev)
    alpha_out = torch.zeros((C, height, width, 1), dtype=dt, device=dev)
    for cam, (x0, y0, x1, y1), ids, pix in _tiles(means2d, radii, depths, width, height):
        if ids.numel() == 0:
            continue
        alpha, T_before = _tile_alphas(means2d[cam, ids], conics[cam, ids], opacities[cam, ids], pix)
        T_after = T_before * (1.0 - alpha)
        crossed = (alpha > 0) & (T_before > 0.5) & (T_after <= 0.5)  # at most one per pixel
        z = (crossed * _ray_depths(pix, rays[0][cam], rays[1][cam, ids], rays[2][cam, ids], depths[cam, ids])).sum(1)
        median[cam, y0:y1, x0:x1, 0] = z.reshape(y1 - y0, x1 - x0)
        alpha_out[cam, y0:y1, x0:x1, 0] = (1.0 - T_after[:, -1]).reshape(y1 - y0, x1 - x0)
    return median, alpha_out


def _ray_depths(pix: Tensor, intr: Tensor, centres: Tensor, icov: Tensor, depths: Tensor) -> Tensor:
    """``[P, M]`` camera z where each Gaussian's density peaks on each pixel's ray ``t d``:
    ``t = d^T A mu / d^T A d`` (``d_z = 1``, so ``t`` is the z); the centre's z where ``t <= 0``."""
    d = torch.stack([(pix[:, 0] - intr[2]) / intr[0], (pix[:, 1] - intr[3]) / intr[1], torch.ones_like(pix[:, 0])], -1)
    xx, xy, xz, yy, yz, zz = icov.unbind(-1)
    A = torch.stack([torch.stack([xx, xy, xz], -1), torch.stack([xy, yy, yz], -1), torch.stack([xz, yz, zz], -1)], -2)
    Ad = torch.einsum("mij,pj->pmi", A, d)  # [P, M, 3]
    t = (Ad * centres[None]).sum(-1) / (Ad * d[:, None]).sum(-1)
    return torch.where(t > 0, t, depths[None].expand_as(t))
