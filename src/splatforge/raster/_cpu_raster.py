"""Compiled tile binning and alpha compositing for the ``cpu`` backend (numba, parallel over tiles).

Forward semantics are those of gsplat 1.5.3 ``IntersectTile.cu`` and
``RasterizeToPixels3DGSFwd.cu``: 16x16 tiles, Gaussians in a tile sorted front to back (ties in
index order, as gsplat's stable radix sort gives), ``alpha = min(0.999, o * exp(-sigma))``,
contributions with ``sigma < 0`` or ``alpha < 1/255`` skipped, and a pixel stops before its
transmittance would reach 1e-4. The backward walks each pixel's list back to front, recovering the
transmittance by division as gsplat's ``RasterizeToPixels3DGSBwd.cu`` does.

Gradients are accumulated per intersection (each intersection belongs to exactly one tile, so
tiles never write the same memory), then summed per Gaussian: no atomics, deterministic results.
Memory is O(N + pixels + intersections).
"""

from __future__ import annotations

import math

import numba as nb
import numpy as np

from splatforge.raster.constants import ALPHA_MAX, ALPHA_THRESHOLD, TILE_SIZE, TRANSMITTANCE_MIN

_JIT = dict(cache=True, nogil=True, fastmath=False)
# A contribution is certainly below ALPHA_THRESHOLD when sigma > log(o * 255) + margin; the
# margin keeps this shortcut from ever disagreeing with the exact test on rounding.
_SKIP_MARGIN = 1e-3


@nb.njit(inline="always", **_JIT)
def _tile_rect(u, v, rx, ry, tiles_x, tiles_y):
    """Inclusive-min, exclusive-max tile rectangle of a Gaussian's screen-space box."""
    x0 = min(max(0, int(math.floor((u - rx) / TILE_SIZE))), tiles_x)
    y0 = min(max(0, int(math.floor((v - ry) / TILE_SIZE))), tiles_y)
    x1 = min(max(0, int(math.ceil((u + rx) / TILE_SIZE))), tiles_x)
    y1 = min(max(0, int(math.ceil((v + ry) / TILE_SIZE))), tiles_y)
    return x0, y0, x1, y1


@nb.njit(parallel=True, **_JIT)
def bin_gaussians(means2d, radii, depths, tiles_x, tiles_y):
    """Per-tile, depth-sorted lists of the Gaussians touching each tile.

    Returns ``offsets [C * T + 1]`` int64 (tile ``c * T + ty * tiles_x + tx`` owns
    ``ids[offsets[t]:offsets[t + 1]]``) and ``ids [n_isects]`` int32 Gaussian indices.
    """
    C, N = depths.shape
    T = tiles_x * tiles_y
    counts = np.zeros(C * T + 1, np.int64)
    orders = np.empty((C, N), np.int64)
    for c in nb.prange(C):
        # One stable sort per camera, then a stable bucketing by tile: every tile's list comes
        # out sorted by depth, ties by index.
        orders[c] = np.argsort(depths[c], kind="mergesort")
        for n in orders[c]:
            if radii[c, n, 0] <= 0 or radii[c, n, 1] <= 0:
                continue
            x0, y0, x1, y1 = _tile_rect(means2d[c, n, 0], means2d[c, n, 1], radii[c, n, 0], radii[c, n, 1], tiles_x, tiles_y)
            for ty in range(y0, y1):
                for tx in range(x0, x1):
                    counts[c * T + ty * tiles_x + tx + 1] += 1
    offsets = np.cumsum(counts)
    ids = np.empty(offsets[-1], np.int32)
    for c in nb.prange(C):
        cursor = offsets[c * T : (c + 1) * T].copy()
        for n in orders[c]:
            if radii[c, n, 0] <= 0 or radii[c, n, 1] <= 0:
                continue
            x0, y0, x1, y1 = _tile_rect(means2d[c, n, 0], means2d[c, n, 1], radii[c, n, 0], radii[c, n, 1], tiles_x, tiles_y)
            for ty in range(y0, y1):
                for tx in range(x0, x1):
                    t = ty * tiles_x + tx
                    ids[cursor[t]] = n
                    cursor[t] += 1
    return offsets, ids


@nb.njit(inline="always", **_JIT)
def _gather(c, start, m, ids, means2d, conics, opacities):
    """Copy a tile's Gaussians into one contiguous block: x, y, a, b, c, o, skip bound."""
    g = np.empty((m, 7), np.float32)
    for k in range(m):
        n = ids[start + k]
        o = opacities[c, n]
        g[k, 0] = means2d[c, n, 0]
        g[k, 1] = means2d[c, n, 1]
        g[k, 2] = conics[c, n, 0]
        g[k, 3] = conics[c, n, 1]
        g[k, 4] = conics[c, n, 2]
        g[k, 5] = o
        g[k, 6] = math.log(max(o, 1e-30) / ALPHA_THRESHOLD) + _SKIP_MARGIN
    return g


@nb.njit(parallel=True, **_JIT)
def raster_fwd(
    means2d, conics, colors, opacities, backgrounds, offsets, ids, width, height, tiles_x,
    render, alpha_out, last_out,
):  # fmt: skip
    """Composite into ``render [C, H, W, D]``, ``alpha_out [C, H, W]`` and ``last_out [C, H, W]``
    (int32: 1 + the tile-list position of the last Gaussian that contributed, 0 for none).
    ``backgrounds`` is ``[C, D]`` (zeros for none)."""
    C, D = colors.shape[0], colors.shape[2]
    T = (offsets.shape[0] - 1) // C
    for job in nb.prange(C * T):
        c, tile = job // T, job % T
        ty, tx = tile // tiles_x, tile % tiles_x
        start = offsets[job]
        m = offsets[job + 1] - start
        g = _gather(c, start, m, ids, means2d, conics, opacities)
        col = np.empty((m, D), np.float32)
        for k in range(m):
            col[k] = colors[c, ids[start + k]]
        acc = np.empty(D)
        for py in range(ty * TILE_SIZE, min((ty + 1) * TILE_SIZE, height)):
            fy = py + 0.5
            for px in range(tx * TILE_SIZE, min((tx + 1) * TILE_SIZE, width)):
                fx = px + 0.5
                acc[:] = 0.0
                Tr = 1.0
                last = 0
                for k in range(m):
                    dx = g[k, 0] - fx
                    dy = g[k, 1] - fy
                    sigma = 0.5 * (g[k, 2] * dx * dx + g[k, 4] * dy * dy) + g[k, 3] * dx * dy
                    if sigma < 0.0 or sigma > g[k, 6]:
                        continue
                    alpha = min(ALPHA_MAX, g[k, 5] * math.exp(-sigma))
                    if alpha < ALPHA_THRESHOLD:
                        continue
                    next_T = Tr * (1.0 - alpha)
                    if next_T <= TRANSMITTANCE_MIN:
                        break
                    w = alpha * Tr
                    for d in range(D):
                        acc[d] += col[k, d] * w
                    Tr = next_T
                    last = k + 1
                for d in range(D):
                    render[c, py, px, d] = acc[d] + Tr * backgrounds[c, d]
                alpha_out[c, py, px] = 1.0 - Tr
                last_out[c, py, px] = last


@nb.njit(parallel=True, **_JIT)
def raster_bwd(
    means2d, conics, colors, opacities, backgrounds, offsets, ids, width, height, tiles_x,
    alpha_out, last_out, v_render, v_alpha,
    g_xy, g_abs, g_conic, g_col, g_opac,
):  # fmt: skip
    """Per-intersection gradients (outputs ``[n_isects, ...]``, zero-initialised): ``g_xy``
    and ``g_abs`` (sum of absolute per-pixel values) w.r.t. means2d, ``g_conic``, ``g_col [.., D]``
    and ``g_opac``."""
    C, D = colors.shape[0], colors.shape[2]
    T = (offsets.shape[0] - 1) // C
    for job in nb.prange(C * T):
        c, tile = job // T, job % T
        ty, tx = tile // tiles_x, tile % tiles_x
        start = offsets[job]
        m = offsets[job + 1] - start
        if m == 0:
            continue
        g = _gather(c, start, m, ids, means2d, conics, opacities)
        col = np.empty((m, D), np.float32)
        for k in range(m):
            col[k] = colors[c, ids[start + k]]
        buf = np.empty(D)
        vc = np.empty(D)
        for py in range(ty * TILE_SIZE, min((ty + 1) * TILE_SIZE, height)):
            fy = py + 0.5
            for px in range(tx * TILE_SIZE, min((tx + 1) * TILE_SIZE, width)):
                last = last_out[c, py, px]
                if last == 0:
                    continue
                fx = px + 0.5
                T_final = 1.0 - alpha_out[c, py, px]
                Tr = T_final
                bg_dot = 0.0
                for d in range(D):
                    vc[d] = v_render[c, py, px, d]
                    bg_dot += backgrounds[c, d] * vc[d]
                    buf[d] = 0.0
                va = v_alpha[c, py, px]
                for k in range(last - 1, -1, -1):
                    dx = g[k, 0] - fx
                    dy = g[k, 1] - fy
                    sigma = 0.5 * (g[k, 2] * dx * dx + g[k, 4] * dy * dy) + g[k, 3] * dx * dy
                    if sigma < 0.0 or sigma > g[k, 6]:
                        continue
                    o = g[k, 5]
                    vis = math.exp(-sigma)
                    alpha = min(ALPHA_MAX, o * vis)
                    if alpha < ALPHA_THRESHOLD:
                        continue
                    ra = 1.0 / (1.0 - alpha)
                    Tr *= ra
                    fac = alpha * Tr
                    i = start + k
                    v_a = (T_final * ra) * (va - bg_dot)
                    for d in range(D):
                        g_col[i, d] += fac * vc[d]
                        v_a += (col[k, d] * Tr - buf[d] * ra) * vc[d]
                        buf[d] += col[k, d] * fac
                    if o * vis <= ALPHA_MAX:
                        v_sigma = -o * vis * v_a
                        g_conic[i, 0] += 0.5 * v_sigma * dx * dx
                        g_conic[i, 1] += v_sigma * dx * dy
                        g_conic[i, 2] += 0.5 * v_sigma * dy * dy
                        gx = v_sigma * (g[k, 2] * dx + g[k, 3] * dy)
                        gy = v_sigma * (g[k, 3] * dx + g[k, 4] * dy)
                        g_xy[i, 0] += gx
                        g_xy[i, 1] += gy
                        g_abs[i, 0] += abs(gx)
                        g_abs[i, 1] += abs(gy)
                        g_opac[i] += vis * v_a


@nb.njit(parallel=True, **_JIT)
def reduce_isects(offsets, ids, n_tiles, g_xy, g_abs, g_conic, g_col, g_opac, v_means2d, v_abs, v_conics, v_colors, v_opac):
    """Sum per-intersection gradients into per-(camera, Gaussian) outputs (zero-initialised)."""
    C = v_means2d.shape[0]
    D = g_col.shape[1]
    for c in nb.prange(C):
        for i in range(offsets[c * n_tiles], offsets[(c + 1) * n_tiles]):
            n = ids[i]
            v_means2d[c, n, 0] += g_xy[i, 0]
            v_means2d[c, n, 1] += g_xy[i, 1]
            v_abs[c, n, 0] += g_abs[i, 0]
            v_abs[c, n, 1] += g_abs[i, 1]
            v_conics[c, n, 0] += g_conic[i, 0]
            v_conics[c, n, 1] += g_conic[i, 1]
            v_conics[c, n, 2] += g_conic[i, 2]
            for d in range(D):
                v_colors[c, n, d] += g_col[i, d]
            v_opac[c, n] += g_opac[i]
