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

from splatforge.raster.constants import ALPHA_MAX, ALPHA_THRESHOLD, FASTMATH, TILE_SIZE, TRANSMITTANCE_MIN

_JIT = dict(cache=True, nogil=True, fastmath=set(FASTMATH))
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

    Each list is sorted by depth, ties by index (what gsplat's stable radix sort of (tile, depth)
    keys gives): the tile rectangles are found in parallel over Gaussians, the lists filled in
    index order, then each list is stably sorted by depth in parallel over tiles.
    """
    C, N = depths.shape
    T = tiles_x * tiles_y
    rects = np.zeros((C, N, 4), np.int32)
    for job in nb.prange(C * N):
        c, n = job // N, job % N
        if radii[c, n, 0] > 0 and radii[c, n, 1] > 0:
            x0, y0, x1, y1 = _tile_rect(means2d[c, n, 0], means2d[c, n, 1], radii[c, n, 0], radii[c, n, 1], tiles_x, tiles_y)
            rects[c, n, 0], rects[c, n, 1], rects[c, n, 2], rects[c, n, 3] = x0, y0, x1, y1
    counts = np.zeros(C * T + 1, np.int64)
    for c in range(C):
        for n in range(N):
            for ty in range(rects[c, n, 1], rects[c, n, 3]):
                for tx in range(rects[c, n, 0], rects[c, n, 2]):
                    counts[c * T + ty * tiles_x + tx + 1] += 1
    offsets = np.cumsum(counts)
    ids = np.empty(offsets[-1], np.int32)
    cursor = offsets[:-1].copy()
    for c in range(C):
        for n in range(N):
            for ty in range(rects[c, n, 1], rects[c, n, 3]):
                for tx in range(rects[c, n, 0], rects[c, n, 2]):
                    t = c * T + ty * tiles_x + tx
                    ids[cursor[t]] = n
                    cursor[t] += 1
    for job in nb.prange(C * T):
        c, start, stop = job // T, offsets[job], offsets[job + 1]
        if stop - start > 1:
            lst = ids[start:stop].copy()
            keys = np.empty(stop - start, depths.dtype)
            for i in range(stop - start):
                keys[i] = depths[c, lst[i]]
            order = np.argsort(keys, kind="mergesort")
            for i in range(stop - start):
                ids[start + i] = lst[order[i]]
    return offsets, ids


@nb.njit(inline="always", **_JIT)
def _tile(job, T, tiles_x, width, height, offsets):
    """Camera, pixel bounds (exclusive max) and list range ``[start, start + m)`` of tile job."""
    c, tile = job // T, job % T
    x0, y0 = (tile % tiles_x) * TILE_SIZE, (tile // tiles_x) * TILE_SIZE
    start = offsets[job]
    return c, x0, y0, min(x0 + TILE_SIZE, width), min(y0 + TILE_SIZE, height), start, offsets[job + 1] - start


@nb.njit(inline="always", **_JIT)
def _gather(c, start, m, ids, means2d, conics, opacities, radii, colors, x0, y0, x1, y1):
    """Copy a tile's Gaussians into contiguous blocks.

    ``g [m, 7]``: x, y, conic a, b, c, opacity, skip bound on sigma; ``box [m, 4]``: the pixel
    range (x0, x1, y0, y1, exclusive max) inside the tile where the Gaussian can reach
    alpha >= 1/255 (pixel centres within its radius box; outside it alpha < 1/255 always);
    ``col [m, D]``: its features.
    """
    D = colors.shape[2]
    g = np.empty((m, 7), np.float32)
    box = np.empty((m, 4), np.int32)
    col = np.empty((m, D), np.float32)
    for k in range(m):
        n = ids[start + k]
        o = opacities[c, n]
        u, v = means2d[c, n, 0], means2d[c, n, 1]
        g[k, 0] = u
        g[k, 1] = v
        g[k, 2] = conics[c, n, 0]
        g[k, 3] = conics[c, n, 1]
        g[k, 4] = conics[c, n, 2]
        g[k, 5] = o
        g[k, 6] = math.log(max(o, 1e-30) / ALPHA_THRESHOLD) + _SKIP_MARGIN
        rx, ry = radii[c, n, 0], radii[c, n, 1]
        box[k, 0] = max(x0, int(math.ceil(u - rx - 0.5)))
        box[k, 1] = min(x1, int(math.floor(u + rx - 0.5)) + 1)
        box[k, 2] = max(y0, int(math.ceil(v - ry - 0.5)))
        box[k, 3] = min(y1, int(math.floor(v + ry - 0.5)) + 1)
        for d in range(D):
            col[k, d] = colors[c, n, d]
    return g, box, col


@nb.njit(inline="always", **_JIT)
def _alpha(u, ca, cb, cc, o, bound, px, dy):
    """The compositing alpha of a Gaussian (centre x ``u``, conic ``ca cb cc``, opacity ``o``,
    skip bound on sigma) at pixel column ``px`` with ``dy = v - (py + 0.5)``; 0.0 where the
    forward pass skips it (sigma < 0, sigma > bound, or alpha < 1/255). Shared by the forward
    kernel and the visibility accumulators so that both apply exactly the same tests."""
    dx = u - (px + 0.5)
    sigma = 0.5 * (ca * dx * dx + cc * dy * dy) + cb * dx * dy
    if sigma < 0.0 or sigma > bound:
        return 0.0
    alpha = min(ALPHA_MAX, o * math.exp(-sigma))
    return alpha if alpha >= ALPHA_THRESHOLD else 0.0


@nb.njit(parallel=True, **_JIT)
def raster_fwd(
    means2d, conics, colors, opacities, radii, backgrounds, offsets, ids, width, height, tiles_x,
    render, alpha_out, last_out,
):  # fmt: skip
    """Composite into ``render [C, H, W, D]``, ``alpha_out [C, H, W]`` and ``last_out [C, H, W]``
    (int32: 1 + the tile-list position of the last Gaussian that contributed, 0 for none).
    ``backgrounds`` is ``[C, D]`` (zeros for none).

    Gaussians are the outer loop (front to back) and pixels of their box the inner one; each
    pixel sees the same sequence of operations as gsplat's per-pixel loop.
    """
    C, D = colors.shape[0], colors.shape[2]
    T = (offsets.shape[0] - 1) // C
    S = TILE_SIZE
    for job in nb.prange(C * T):
        c, x0, y0, x1, y1, start, m = _tile(job, T, tiles_x, width, height, offsets)
        g, box, col = _gather(c, start, m, ids, means2d, conics, opacities, radii, colors, x0, y0, x1, y1)
        Tr = np.ones(S * S)
        acc = np.zeros((S * S, D))
        last = np.zeros(S * S, np.int32)
        done = np.zeros(S * S, np.bool_)
        active = (x1 - x0) * (y1 - y0)
        for k in range(m):
            if active == 0:
                break
            u, v, ca, cb, cc, o, bound = g[k, 0], g[k, 1], g[k, 2], g[k, 3], g[k, 4], g[k, 5], g[k, 6]
            for py in range(box[k, 2], box[k, 3]):
                dy = v - (py + 0.5)
                row = (py - y0) * S - x0
                for px in range(box[k, 0], box[k, 1]):
                    p = row + px
                    if done[p]:
                        continue
                    alpha = _alpha(u, ca, cb, cc, o, bound, px, dy)
                    if alpha == 0.0:
                        continue
                    next_T = Tr[p] * (1.0 - alpha)
                    if next_T <= TRANSMITTANCE_MIN:
                        done[p] = True
                        active -= 1
                        continue
                    w = alpha * Tr[p]
                    if D == 3:
                        acc[p, 0] += col[k, 0] * w
                        acc[p, 1] += col[k, 1] * w
                        acc[p, 2] += col[k, 2] * w
                    else:
                        for d in range(D):
                            acc[p, d] += col[k, d] * w
                    Tr[p] = next_T
                    last[p] = k + 1
        for py in range(y0, y1):
            for px in range(x0, x1):
                p = (py - y0) * S + px - x0
                for d in range(D):
                    render[c, py, px, d] = acc[p, d] + Tr[p] * backgrounds[c, d]
                alpha_out[c, py, px] = 1.0 - Tr[p]
                last_out[c, py, px] = last[p]


@nb.njit(parallel=True, **_JIT)
def raster_bwd(
    means2d, conics, colors, opacities, radii, backgrounds, offsets, ids, width, height, tiles_x,
    alpha_out, last_out, v_render, v_alpha,
    g_xy, g_abs, g_conic, g_col, g_opac,
):  # fmt: skip
    """Per-intersection gradients (outputs ``[n_isects, ...]``, each row written once): ``g_xy``
    and ``g_abs`` (sum of absolute per-pixel values) w.r.t. means2d, ``g_conic``, ``g_col [.., D]``
    and ``g_opac``. Gaussians are visited back to front; each pixel recovers its transmittance
    by division, as gsplat does."""
    C, D = colors.shape[0], colors.shape[2]
    T = (offsets.shape[0] - 1) // C
    S = TILE_SIZE
    for job in nb.prange(C * T):
        c, x0, y0, x1, y1, start, m = _tile(job, T, tiles_x, width, height, offsets)
        if m == 0:
            continue
        g, box, col = _gather(c, start, m, ids, means2d, conics, opacities, radii, colors, x0, y0, x1, y1)
        Tr = np.zeros(S * S)
        T_final = np.zeros(S * S)
        last = np.zeros(S * S, np.int32)
        vc = np.zeros((S * S, D))
        va = np.zeros(S * S)  # d loss / d alpha, minus the background's share
        buf = np.zeros((S * S, D))
        kmax = 0
        for py in range(y0, y1):
            for px in range(x0, x1):
                p = (py - y0) * S + px - x0
                last[p] = last_out[c, py, px]
                kmax = max(kmax, last[p])
                T_final[p] = Tr[p] = 1.0 - alpha_out[c, py, px]
                bg_dot = 0.0
                for d in range(D):
                    vc[p, d] = v_render[c, py, px, d]
                    bg_dot += backgrounds[c, d] * vc[p, d]
                va[p] = v_alpha[c, py, px] - bg_dot
        gc = np.empty(D)
        for k in range(kmax - 1, -1, -1):
            u, v, ca, cb, cc, o, bound = g[k, 0], g[k, 1], g[k, 2], g[k, 3], g[k, 4], g[k, 5], g[k, 6]
            # per-Gaussian sums over its pixels, in float64
            gx = gy = ax = ay = ga = gb = gcc = go = gc0 = gc1 = gc2 = 0.0
            gc[:] = 0.0
            for py in range(box[k, 2], box[k, 3]):
                dy = v - (py + 0.5)
                row = (py - y0) * S - x0
                for px in range(box[k, 0], box[k, 1]):
                    p = row + px
                    if k >= last[p]:
                        continue
                    dx = u - (px + 0.5)
                    sigma = 0.5 * (ca * dx * dx + cc * dy * dy) + cb * dx * dy
                    if sigma < 0.0 or sigma > bound:
                        continue
                    vis = math.exp(-sigma)
                    alpha = min(ALPHA_MAX, o * vis)
                    if alpha < ALPHA_THRESHOLD:
                        continue
                    ra = 1.0 / (1.0 - alpha)
                    Tr[p] *= ra
                    t = Tr[p]
                    fac = alpha * t
                    v_a = T_final[p] * ra * va[p]
                    if D == 3:
                        c0, c1, c2 = col[k, 0], col[k, 1], col[k, 2]
                        w0, w1, w2 = vc[p, 0], vc[p, 1], vc[p, 2]
                        gc0 += fac * w0
                        gc1 += fac * w1
                        gc2 += fac * w2
                        v_a += (c0 * t - buf[p, 0] * ra) * w0 + (c1 * t - buf[p, 1] * ra) * w1 + (c2 * t - buf[p, 2] * ra) * w2
                        buf[p, 0] += c0 * fac
                        buf[p, 1] += c1 * fac
                        buf[p, 2] += c2 * fac
                    else:
                        for d in range(D):
                            gc[d] += fac * vc[p, d]
                            v_a += (col[k, d] * t - buf[p, d] * ra) * vc[p, d]
                            buf[p, d] += col[k, d] * fac
                    if o * vis <= ALPHA_MAX:
                        v_sigma = -o * vis * v_a
                        ga += 0.5 * v_sigma * dx * dx
                        gb += v_sigma * dx * dy
                        gcc += 0.5 * v_sigma * dy * dy
                        ex = v_sigma * (ca * dx + cb * dy)
                        ey = v_sigma * (cb * dx + cc * dy)
                        gx += ex
                        gy += ey
                        ax += abs(ex)
                        ay += abs(ey)
                        go += vis * v_a
            i = start + k
            g_xy[i, 0], g_xy[i, 1] = gx, gy
            g_abs[i, 0], g_abs[i, 1] = ax, ay
            g_conic[i, 0], g_conic[i, 1], g_conic[i, 2] = ga, gb, gcc
            if D == 3:
                g_col[i, 0], g_col[i, 1], g_col[i, 2] = gc0, gc1, gc2
            else:
                for d in range(D):
                    g_col[i, d] = gc[d]
            g_opac[i] = go


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


@nb.njit(parallel=True, **_JIT)
def raster_transmittance(means2d, conics, opacities, radii, offsets, ids, width, height, tiles_x, isect_T, isect_n):
    """Per intersection: the sum of the transmittance in front of the Gaussian over the pixels
    of the tile where it contributes (the forward pass's tests, early stop included) into
    ``isect_T [n_isects]`` (float64) and the number of those pixels into ``isect_n`` (int64)."""
    C = means2d.shape[0]
    T = (offsets.shape[0] - 1) // C
    S = TILE_SIZE
    no_features = np.empty((C, means2d.shape[1], 0), np.float32)
    for job in nb.prange(C * T):
        c, x0, y0, x1, y1, start, m = _tile(job, T, tiles_x, width, height, offsets)
        g, box, _col = _gather(c, start, m, ids, means2d, conics, opacities, radii, no_features, x0, y0, x1, y1)
        Tr = np.ones(S * S)
        done = np.zeros(S * S, np.bool_)
        active = (x1 - x0) * (y1 - y0)
        for k in range(m):
            if active == 0:
                break
            u, v, ca, cb, cc, o, bound = g[k, 0], g[k, 1], g[k, 2], g[k, 3], g[k, 4], g[k, 5], g[k, 6]
            sum_t = 0.0
            count = 0
            for py in range(box[k, 2], box[k, 3]):
                dy = v - (py + 0.5)
                row = (py - y0) * S - x0
                for px in range(box[k, 0], box[k, 1]):
                    p = row + px
                    if done[p]:
                        continue
                    alpha = _alpha(u, ca, cb, cc, o, bound, px, dy)
                    if alpha == 0.0:
                        continue
                    next_T = Tr[p] * (1.0 - alpha)
                    if next_T <= TRANSMITTANCE_MIN:
                        done[p] = True
                        active -= 1
                        continue
                    sum_t += Tr[p]
                    count += 1
                    Tr[p] = next_T
            isect_T[start + k] = sum_t
            isect_n[start + k] = count
