"""Compiled tile binning and alpha compositing for the ``cpu`` backend (numba, parallel over tiles).

Forward semantics are those of gsplat 1.5.3 ``IntersectTile.cu`` and
``RasterizeToPixels3DGSFwd.cu``: 16x16 tiles, Gaussians in a tile sorted front to back (ties in
index order, as gsplat's stable radix sort gives), ``alpha = min(0.999, o * exp(-sigma))``,
contributions with ``sigma < 0`` or ``alpha < 1/255`` skipped, and a pixel stops before its
transmittance would reach 1e-4. The backward walks each pixel's list back to front, recovering the
transmittance by division as gsplat's ``RasterizeToPixels3DGSBwd.cu`` does.

Layout, for speed (SIMD): a tile's pixel state (transmittance, accumulated features, ...) lives in
flat float32 arrays of 256 entries, row-major, and each Gaussian is evaluated on every pixel of the
tile rows where it can contribute (its "lanes", found once per intersection by
:func:`bin_gaussians`: the rows of its box that its contributing ellipse reaches, and only the
tiles that ellipse reaches), branch-free: the tests are masks, so LLVM vectorises the loop (16 or 8
lanes). Evaluating whole rows instead of the ellipse's columns changes nothing: outside the
ellipse ``alpha < 1/255``, the same tile-wide evaluation gsplat's kernel makes. Arithmetic is
float32 as in gsplat; ``exp`` is :func:`_exp_neg` (gsplat uses the ``__expf`` intrinsic, also an
approximation).

Gradients are accumulated per intersection (each intersection belongs to exactly one tile, so
tiles never write the same memory), then summed per Gaussian: no atomics, deterministic results.
Memory is O(N + pixels + intersections).
"""

from __future__ import annotations

import math

import numba as nb
import numpy as np

from splatforge.raster.constants import (
    ALPHA_MAX,
    ALPHA_THRESHOLD,
    FASTMATH,
    FASTMATH_REDUCTIONS,
    TILE_SIZE,
    TRANSMITTANCE_MIN,
)

_JIT = {"cache": True, "nogil": True, "fastmath": set(FASTMATH)}
_JIT_REDUCTIONS = dict(_JIT, fastmath=set(FASTMATH_REDUCTIONS))  # raster_bwd only: see its docstring
# A contribution is certainly below ALPHA_THRESHOLD when sigma > log(o * 255) + margin; the
# margin keeps this shortcut from ever disagreeing with the exact test on rounding.
_SKIP_MARGIN = 1e-3

# float32 constants: a Python float in a kernel would promote the lane arithmetic to float64.
_F = np.float32
_S = TILE_SIZE
#: Runs of depth-sorted Gaussians that :func:`bin_gaussians` counts and fills in parallel (fixed,
#: so that nothing depends on the thread count).
_BIN_CHUNKS = 64
_P = TILE_SIZE * TILE_SIZE
_AMAX, _THR, _TMIN = _F(ALPHA_MAX), _F(ALPHA_THRESHOLD), _F(TRANSMITTANCE_MIN)
_ZERO, _HALF, _ONE = _F(0.0), _F(0.5), _F(1.0)
_LN2, _LOG2E, _EXP_ARG_MAX = _F(math.log(2.0)), _F(1.0 / math.log(2.0)), _F(15.0)
_E2, _E3, _E4, _E5, _E6, _E7 = (_F(1.0 / math.factorial(k)) for k in range(2, 8))


@nb.njit(inline="always", **_JIT)
def _exp_neg(s):
    """``exp(-s)`` in float32 for ``s`` clamped to [0, 15], branch-free so that it vectorises
    (numba has no vector ``exp`` without Intel's SVML). ``s = n ln2 + r`` with ``|r| <= ln2 / 2``,
    ``exp(-r)`` by its degree-7 Taylor polynomial (truncation < 6e-9), times ``2^-n`` built from
    exact powers of two: relative error below 2e-7 (tested against float64)."""
    s = min(max(s, _ZERO), _EXP_ARG_MAX)
    n = np.int32(s * _LOG2E + _HALF)
    r = s - _F(n) * _LN2
    p = _ONE - r * (_ONE - r * (_E2 - r * (_E3 - r * (_E4 - r * (_E5 - r * (_E6 - r * _E7))))))
    p = p * (_ONE - _F(0.5) * _F(n & 1))
    p = p * (_ONE - _F(0.75) * _F((n >> 1) & 1))
    p = p * (_ONE - _F(0.9375) * _F((n >> 2) & 1))
    p = p * (_ONE - _F(255.0 / 256.0) * _F((n >> 3) & 1))
    return p * (_ONE - _F(65535.0 / 65536.0) * _F((n >> 4) & 1))  # n <= 22


@nb.njit(**_JIT)
def exp_neg(s, out):
    """``out[i] = exp(-s[i])`` by the kernels' own :func:`_exp_neg` (for its test)."""
    for i in range(s.shape[0]):
        out[i] = _exp_neg(s[i])


@nb.njit(inline="always", **_JIT)
def _tile_rect(u, v, rx, ry, tiles_x, tiles_y):
    """Inclusive-min, exclusive-max tile rectangle of a Gaussian's screen-space box."""
    x0 = min(max(0, int(math.floor((u - rx) / TILE_SIZE))), tiles_x)  # noqa: RUF046
    y0 = min(max(0, int(math.floor((v - ry) / TILE_SIZE))), tiles_y)  # noqa: RUF046
    x1 = min(max(0, int(math.ceil((u + rx) / TILE_SIZE))), tiles_x)  # noqa: RUF046
    y1 = min(max(0, int(math.ceil((v + ry) / TILE_SIZE))), tiles_y)  # noqa: RUF046
    return x0, y0, x1, y1


@nb.njit(inline="always", **_JIT)
def _skip_bound(o):
    """The bound on ``sigma`` above which a Gaussian of opacity ``o`` certainly contributes
    ``alpha < ALPHA_THRESHOLD`` (``log(o / ALPHA_THRESHOLD)`` plus :data:`_SKIP_MARGIN`)."""
    return math.log(max(o, 1e-30) / ALPHA_THRESHOLD) + _SKIP_MARGIN


@nb.njit(inline="always", **_JIT)
def _strip_rows(u, v, ca, cb, cc, o, px0, px1):
    """The pixel rows ``[r0, r1)`` where the Gaussian at (u, v) with conic (ca, cb, cc) and
    opacity ``o`` can reach ``alpha >= ALPHA_THRESHOLD`` at a pixel centre of the columns
    ``[px0, px1)``: conservative (a superset, never a row less), empty when ``r0 >= r1``.

    Its contributing pixels lie in the ellipse ``sigma = (a dx^2 + 2 b dx dy + c dy^2) / 2 <=
    bound`` (``dx = u - x``, ``dy = v - y``); the rows are the y-extent of that ellipse cut by
    the columns' strip, which is convex, so its y-extent is an interval: the top of the cut is
    the ellipse's top point ``(-b/a dy_t, dy_t)``, ``dy_t = sqrt(2 bound a / det)``, with its
    dx clamped into the strip (the upper arc is concave in dx), the bottom likewise. The
    rasterizer's own box (the opacity-aware radius) is the ellipse's axis-aligned box, so this
    drops the tiles and rows the box covers outside the ellipse (for a tilted Gaussian, its
    corners), as Speedy-Splat's tile test does (Hanson et al. 2025), not the radius itself.
    Float64; the bound is widened by the float32 error of ``sigma`` (which grows with the
    ellipse's eccentricity) and the strip and rows by 0.01 px, so rounding can only add a row.
    A degenerate conic returns every row."""
    return _cut(_ellipse(ca, cb, cc, o), u, v, px0, px1)


_BIG = 1 << 30


@nb.njit(inline="always", **_JIT)
def _ellipse(ca, cb, cc, o):
    """The per-Gaussian part of :func:`_strip_rows`: ``(kind, a, b, c, det, s, half_x, dx_t, dy_t)``
    with ``kind`` 0 for no contributing pixel, 1 for a degenerate conic (every row), 2 else."""
    a, b, c = float(ca), float(cb), float(cc)
    det = a * c - b * b
    if not (a > 0.0 and c > 0.0 and det > 1e-9 * a * c):
        return 1, a, b, c, det, 0.0, 0.0, 0.0, 0.0
    bound = _skip_bound(o)
    if bound < 0.0:
        return 0, a, b, c, det, 0.0, 0.0, 0.0, 0.0
    ecc = abs(b) / math.sqrt(a * c)  # < 1
    s = 2.0 * bound * (1.0 + 1e-5 * (1.0 + ecc) / (1.0 - ecc)) + 1e-6
    dy_t = math.sqrt(a * s / det)
    return 2, a, b, c, det, s, math.sqrt(c * s / det), -b * dy_t / a, dy_t


@nb.njit(inline="always", **_JIT)
def _cut(e, u, v, px0, px1):
    """The per-strip part of :func:`_strip_rows`, for the ellipse ``e`` of :func:`_ellipse`."""
    kind, _a, b, c, det, s, half_x, dx_t, _dy_t = e
    if kind == 1:
        return -_BIG, _BIG
    if kind == 0:
        return 0, 0
    lo = max(u - (px1 - 0.5) - 0.01, -half_x)  # the strip, as dx = u - x of its pixel centres
    hi = min(u - (px0 + 0.5) + 0.01, half_x)
    if lo > hi:
        return 0, 0
    x = min(max(dx_t, lo), hi)
    dy_max = (-b * x + math.sqrt(max(0.0, c * s - det * x * x))) / c
    x = min(max(-dx_t, lo), hi)
    dy_min = (-b * x - math.sqrt(max(0.0, c * s - det * x * x))) / c
    # rows whose centre y + 0.5 = v - dy has dy in [dy_min, dy_max]
    top = min(max(v - dy_max - 0.5 - 0.01, -float(_BIG)), float(_BIG))
    bottom = min(max(v - dy_min - 0.5 + 0.01, -float(_BIG)), float(_BIG))
    return int(math.ceil(top)), int(math.floor(bottom)) + 1  # noqa: RUF046


@nb.njit(inline="always", **_JIT)
def _box_rows(v, ry, y0, y1):
    """The rows ``[lo, hi)`` of ``[y0, y1)`` whose pixel centres lie in the box ``v +- ry``."""
    lo = max(y0, int(math.ceil(v - ry - 0.5)))  # noqa: RUF046
    return lo, max(lo, min(y1, int(math.floor(v + ry - 0.5)) + 1))  # noqa: RUF046


@nb.njit(**_JIT)
def strip_rows(u, v, ca, cb, cc, o, px0, px1):
    """:func:`_strip_rows` (for its test)."""
    return _strip_rows(u, v, ca, cb, cc, o, px0, px1)


@nb.njit(**_JIT)
def _depth_order(depths, area):
    """The jobs ``c * N + n`` whose tile box is not empty (``area[job] > 0``), camera by
    camera, each camera's sorted by depth, ties by index: ``int64 [n_visible]``.

    An LSD radix sort (8-bit digits, stable, so index order breaks ties) of one 32-bit key per
    Gaussian: the depth's float32 bits mapped so that unsigned order is float order (negative
    depths included, for ``near_plane <= 0``; -0.0 ties with 0.0 as in a float comparison);
    digits every key shares are skipped. Jobs are taken in index order, so the camera stays the
    major key when each camera's run is sorted on its own."""
    C, N = depths.shape
    bits = depths.view(np.uint32)
    seq = np.empty(C * N, np.int64)
    keys = np.empty(C * N, np.uint32)
    m = 0
    for job in range(C * N):
        if area[job] > 0:
            b = np.int64(bits[job // N, job % N])
            b = 0 if b == 0x80000000 else b
            keys[m] = np.uint32(b ^ 0x80000000 if b < 0x80000000 else 0xFFFFFFFF - b)
            seq[m] = job
            m += 1
    tmp_seq, tmp_keys = np.empty(m, np.int64), np.empty(m, np.uint32)
    hist = np.empty((4, 256), np.int64)
    start = 0
    for c in range(C):
        stop = start
        while stop < m and seq[stop] < (c + 1) * N:
            stop += 1
        hist[:] = 0
        for i in range(start, stop):
            for d in range(4):
                hist[d, (keys[i] >> np.uint32(8 * d)) & np.uint32(255)] += 1
        for d in range(4):
            if hist[d].max() == stop - start:  # one value of this digit: the pass would not move anything
                continue
            at = np.empty(256, np.int64)
            run = start
            for b in range(256):
                at[b] = run
                run += hist[d, b]
            for i in range(start, stop):
                b = (keys[i] >> np.uint32(8 * d)) & np.uint32(255)
                tmp_seq[at[b]], tmp_keys[at[b]] = seq[i], keys[i]
                at[b] += 1
            seq[start:stop], keys[start:stop] = tmp_seq[start:stop], tmp_keys[start:stop]
        start = stop
    return seq[:m]


@nb.njit(parallel=True, **_JIT)
def bin_gaussians(means2d, radii, depths, conics, opacities, width, height):
    """Per-tile, depth-sorted lists of the Gaussians that can contribute to each tile.

    Returns ``offsets [C * T + 1]`` int64 (tile ``c * T + ty * tiles_x + tx`` owns
    ``ids[offsets[t]:offsets[t + 1]]``), ``ids [n_isects]`` int32 Gaussian indices and ``lanes
    [n_isects, 2]`` int32: the flat tile-pixel range ``[lo, hi)`` (whole rows, row-major, 16 per
    row) the kernels evaluate that Gaussian on in that tile.

    A Gaussian goes to the tiles of its box (the opacity-aware radius, as gsplat) that its
    contributing ellipse reaches (:func:`_strip_rows`: the box's corners of a tilted Gaussian
    are dropped), and in each to the rows of both. Every dropped tile and row has
    ``alpha < 1/255`` at all its pixel centres, which the compositing skips, so the images
    and gradients are those of the whole box; only the work is less (on a trained skull model,
    about 20 % fewer intersections and 30 % fewer rows).

    Each list is sorted by depth, ties by index (what gsplat's stable radix sort of (tile, depth)
    keys gives). Rather than sorting every tile's list, the visible Gaussians are sorted once
    (:func:`_depth_order`) and the lists filled in that order: the kept tiles and rows are found
    in parallel over the sorted Gaussians, then the lists counted and filled in parallel over
    :data:`_BIN_CHUNKS` runs of them, run ``k``'s entries of a tile after those of runs ``< k``,
    so the order does not depend on the thread count.
    """
    C, N = depths.shape
    tiles_x, tiles_y = (width + TILE_SIZE - 1) // TILE_SIZE, (height + TILE_SIZE - 1) // TILE_SIZE
    T = tiles_x * tiles_y
    rects = np.zeros((C * N, 4), np.int32)
    area = np.zeros(C * N, np.int64)  # the box's tile count (0: not visible)
    for job in nb.prange(C * N):
        c, n = job // N, job % N
        if radii[c, n, 0] > 0 and radii[c, n, 1] > 0:
            x0, y0, x1, y1 = _tile_rect(
                means2d[c, n, 0], means2d[c, n, 1], radii[c, n, 0], radii[c, n, 1], tiles_x, tiles_y
            )
            rects[job, 0], rects[job, 1], rects[job, 2], rects[job, 3] = x0, y0, x1, y1
            area[job] = (x1 - x0) * (y1 - y0)
    seq = _depth_order(depths, area)
    n_seq = seq.shape[0]
    box = np.zeros(n_seq + 1, np.int64)  # the s-th sorted Gaussian's box tiles: [box[s], box[s + 1])
    for s in range(n_seq):
        box[s + 1] = box[s] + area[seq[s]]
    # per (Gaussian, box tile), in sorted order: the list c * T + tile, or -1 when dropped, and its rows
    pair = np.empty(box[-1], np.int32)
    pair_rows = np.empty((box[-1], 2), np.int32)
    for s in nb.prange(n_seq):
        job = seq[s]
        c, n = job // N, job % N
        u, v, ry = means2d[c, n, 0], means2d[c, n, 1], radii[c, n, 1]
        e = _ellipse(conics[c, n, 0], conics[c, n, 1], conics[c, n, 2], opacities[c, n])
        i = box[s]
        for tx in range(rects[job, 0], rects[job, 2]):
            px0 = tx * _S
            r0, r1 = _cut(e, u, v, px0, min(px0 + _S, width))
            for ty in range(rects[job, 1], rects[job, 3]):
                y0 = ty * _S
                lo, hi = _box_rows(v, ry, y0, min(y0 + _S, height))
                lo, hi = max(lo, r0), min(hi, r1)
                pair[i] = c * T + ty * tiles_x + tx if lo < hi else -1
                pair_rows[i, 0], pair_rows[i, 1] = (lo - y0) * _S, (hi - y0) * _S
                i += 1
    per = max(1, (n_seq + _BIN_CHUNKS - 1) // _BIN_CHUNKS)
    n_runs = (n_seq + per - 1) // per
    counts = np.zeros((n_runs, C * T), np.int64)
    for k in nb.prange(n_runs):
        for i in range(box[k * per], box[min(n_seq, (k + 1) * per)]):
            if pair[i] >= 0:
                counts[k, pair[i]] += 1
    offsets = np.zeros(C * T + 1, np.int64)
    for t in range(C * T):
        run = offsets[t]
        for k in range(n_runs):
            run, counts[k, t] = run + counts[k, t], run  # counts becomes each run's cursor
        offsets[t + 1] = run
    ids = np.empty(offsets[-1], np.int32)
    lanes = np.empty((offsets[-1], 2), np.int32)
    for k in nb.prange(n_runs):
        for s in range(k * per, min(n_seq, (k + 1) * per)):
            n = np.int32(seq[s] % N)
            for i in range(box[s], box[s + 1]):
                t = pair[i]
                if t >= 0:
                    at = counts[k, t]
                    ids[at] = n
                    lanes[at, 0], lanes[at, 1] = pair_rows[i, 0], pair_rows[i, 1]
                    counts[k, t] = at + 1
    return offsets, ids, lanes


@nb.njit(inline="always", **_JIT)
def _tile(job, T, tiles_x, width, height, offsets):
    """Camera, pixel bounds (exclusive max) and list range ``[start, start + m)`` of tile job."""
    c, tile = job // T, job % T
    x0, y0 = (tile % tiles_x) * TILE_SIZE, (tile // tiles_x) * TILE_SIZE
    start = offsets[job]
    return c, x0, y0, min(x0 + TILE_SIZE, width), min(y0 + TILE_SIZE, height), start, offsets[job + 1] - start


@nb.njit(inline="always", **_JIT)
def _gather(c, start, m, ids, means2d, conics, opacities, colors):
    """Copy a tile's Gaussians into contiguous blocks: ``g [m, 7]``: x, y, conic a, b, c,
    opacity, skip bound on sigma; ``col [m, D]``: its features."""
    D = colors.shape[2]
    g = np.empty((m, 7), np.float32)
    col = np.empty((m, D), np.float32)
    for k in range(m):
        n = ids[start + k]
        o = opacities[c, n]
        g[k, 0] = means2d[c, n, 0]
        g[k, 1] = means2d[c, n, 1]
        g[k, 2] = conics[c, n, 0]
        g[k, 3] = conics[c, n, 1]
        g[k, 4] = conics[c, n, 2]
        g[k, 5] = o
        g[k, 6] = _skip_bound(o)
        for d in range(D):
            col[k, d] = colors[c, n, d]
    return g, col


@nb.njit(inline="always", **_JIT)
def _pixel_centres(x0, y0, x1, y1):
    """Pixel centres ``px, py [256]`` (float32) of the tile's flat pixels and ``live [256]``: 1
    for pixels inside the image, 0 for the padding of edge tiles (they never composite)."""
    pxc = np.empty(_P, np.float32)
    pyc = np.empty(_P, np.float32)
    live = np.zeros(_P, np.float32)
    for i in range(_P):
        px, py = x0 + i % _S, y0 + i // _S
        pxc[i] = _F(px) + _HALF
        pyc[i] = _F(py) + _HALF
        if px < x1 and py < y1:
            live[i] = _ONE
    return pxc, pyc, live


@nb.njit(inline="always", **_JIT)
def _sigma(u, v, ca, cb, cc, pxc, pyc, p):
    """The Mahalanobis term ``sigma`` of the Gaussian at (u, v) with conic (ca, cb, cc) at flat
    pixel ``p``, and the offsets dx, dy. (The Gaussian's values are passed as scalars, not read
    from ``g``: loads from an array LLVM cannot prove distinct from the stores would stay in the
    loop and block its vectorisation.)"""
    dx = u - pxc[p]
    dy = v - pyc[p]
    return _HALF * (ca * dx * dx + cc * dy * dy) + cb * dx * dy, dx, dy


@nb.njit(inline="always", **_JIT)
def _composite(u, v, ca, cb, cc, o, bound, kk, pxc, pyc, Tr, last, live, p):
    """One forward compositing step of Gaussian ``k`` at flat pixel ``p`` (gsplat's per-pixel
    body, as masks): updates ``Tr``, ``last`` (to ``kk`` = k + 1) and ``live`` (0 once the pixel stops) and
    returns ``(weight alpha * T, T in front of it, stopped)``; weight and T are 0 where the
    Gaussian does not contribute. Shared by the forward kernel and the transmittance statistics so
    that both apply exactly the same tests."""
    sigma, _dx, _dy = _sigma(u, v, ca, cb, cc, pxc, pyc, p)
    alpha = min(_AMAX, o * _exp_neg(sigma))
    ok = (sigma >= _ZERO) & (sigma <= bound) & (alpha >= _THR) & (live[p] > _ZERO)
    t = Tr[p]
    nt = t * (_ONE - alpha)
    stop = ok & (nt <= _TMIN)
    use = ok & (nt > _TMIN)
    Tr[p] = nt if use else t
    last[p] = kk if use else last[p]
    live[p] = _ZERO if stop else live[p]
    return (alpha * t if use else _ZERO), (t if use else _ZERO), stop


@nb.njit(parallel=True, **_JIT)
def raster_fwd(
    means2d,
    conics,
    colors,
    opacities,
    backgrounds,
    offsets,
    ids,
    isect_lanes,
    width,
    height,
    tiles_x,
    render,
    alpha_out,
    last_out,
):
    """Composite into ``render [C, H, W, D]``, ``alpha_out [C, H, W]`` and ``last_out [C, H, W]``
    (int32: 1 + the tile-list position of the last Gaussian that contributed, 0 for none).
    ``backgrounds`` is ``[C, D]`` (zeros for none).

    Gaussians are the outer loop (front to back), the pixels of their rows the inner one; each
    pixel sees the same sequence of operations as gsplat's per-pixel loop.
    """
    C, D = colors.shape[0], colors.shape[2]
    T = (offsets.shape[0] - 1) // C
    for job in nb.prange(C * T):
        c, x0, y0, x1, y1, start, m = _tile(job, T, tiles_x, width, height, offsets)
        g, col = _gather(c, start, m, ids, means2d, conics, opacities, colors)
        lanes = isect_lanes[start : start + m]
        pxc, pyc, live = _pixel_centres(x0, y0, x1, y1)
        Tr = np.ones(_P, np.float32)
        acc = np.zeros((D, _P), np.float32)
        last = np.zeros(_P, np.int32)
        w = np.zeros(_P, np.float32)
        active = (x1 - x0) * (y1 - y0)
        for k in range(m):
            if active == 0:
                break
            u, v, ca, cb, cc, o, bound = g[k, 0], g[k, 1], g[k, 2], g[k, 3], g[k, 4], g[k, 5], g[k, 6]
            kk = np.int32(k + 1)
            lo, hi = np.uint64(lanes[k, 0]), np.uint64(lanes[k, 1])  # unsigned: no wrap-around checks
            stops = 0
            if D == 3:  # RGB: the features accumulated in the same pass (the same operations)
                c0, c1, c2 = col[k, 0], col[k, 1], col[k, 2]
                for p in range(lo, hi):
                    wp, _t, stop = _composite(u, v, ca, cb, cc, o, bound, kk, pxc, pyc, Tr, last, live, p)
                    stops += 1 if stop else 0
                    acc[0, p] += c0 * wp
                    acc[1, p] += c1 * wp
                    acc[2, p] += c2 * wp
                active -= stops
                continue
            for p in range(lo, hi):
                w[p], _t, stop = _composite(u, v, ca, cb, cc, o, bound, kk, pxc, pyc, Tr, last, live, p)
                stops += 1 if stop else 0
            active -= stops
            for d in range(D):
                cd = col[k, d]
                for p in range(lo, hi):
                    acc[d, p] += cd * w[p]
        for py in range(y0, y1):
            for px in range(x0, x1):
                p = (py - y0) * _S + px - x0
                for d in range(D):
                    render[c, py, px, d] = acc[d, p] + Tr[p] * backgrounds[c, d]
                alpha_out[c, py, px] = _ONE - Tr[p]
                last_out[c, py, px] = last[p]


@nb.njit(parallel=True, **_JIT_REDUCTIONS)
def raster_bwd(
    means2d,
    conics,
    colors,
    opacities,
    backgrounds,
    offsets,
    ids,
    isect_lanes,
    width,
    height,
    tiles_x,
    alpha_out,
    last_out,
    v_render,
    v_alpha,
    g_xy,
    g_abs,
    g_conic,
    g_col,
    g_opac,
):
    """Per-intersection gradients (outputs ``[n_isects, ...]``, each row written once, need not
    be initialised): ``g_xy``
    and ``g_abs`` (sum of absolute per-pixel values) w.r.t. means2d, ``g_conic``, ``g_col [.., D]``
    and ``g_opac``. Gaussians are visited back to front; each pixel recovers its transmittance
    by division, as gsplat does. Three passes over a Gaussian's pixels: its alpha and the
    transmittance behind it, the features' terms (per channel), the sigma chain; for three
    features (RGB) they are one pass with the channels unrolled (the same operations per pixel:
    the per-pixel values need not go through memory)."""
    C, D = colors.shape[0], colors.shape[2]
    T = (offsets.shape[0] - 1) // C
    for job in nb.prange(C * T):
        c, x0, y0, x1, y1, start, m = _tile(job, T, tiles_x, width, height, offsets)
        if m == 0:
            continue
        g, col = _gather(c, start, m, ids, means2d, conics, opacities, colors)
        lanes = isect_lanes[start : start + m]
        pxc, pyc, _live = _pixel_centres(x0, y0, x1, y1)
        Tr = np.zeros(_P, np.float32)
        T_final = np.zeros(_P, np.float32)
        last = np.zeros(_P, np.int32)
        vc = np.zeros((D, _P), np.float32)
        va = np.zeros(_P, np.float32)  # d loss / d alpha, minus the background's share
        buf = np.zeros((D, _P), np.float32)  # features composited behind the current Gaussian
        # per-pixel values of the current Gaussian, between the passes
        fac_, ra_, t_ = np.zeros(_P, np.float32), np.zeros(_P, np.float32), np.zeros(_P, np.float32)
        vis_, v_a, ok_ = np.zeros(_P, np.float32), np.zeros(_P, np.float32), np.zeros(_P, np.float32)
        kmax = 0
        for py in range(y0, y1):
            for px in range(x0, x1):
                p = (py - y0) * _S + px - x0
                last[p] = last_out[c, py, px]
                kmax = max(kmax, last[p])
                T_final[p] = Tr[p] = _ONE - alpha_out[c, py, px]
                bg_dot = _ZERO
                for d in range(D):
                    vc[d, p] = v_render[c, py, px, d]
                    bg_dot += backgrounds[c, d] * vc[d, p]
                va[p] = v_alpha[c, py, px] - bg_dot
        for i in range(start + kmax, start + m):  # behind every pixel's last contributor: no gradient
            g_xy[i, 0] = g_xy[i, 1] = g_abs[i, 0] = g_abs[i, 1] = g_opac[i] = _ZERO
            g_conic[i, 0] = g_conic[i, 1] = g_conic[i, 2] = _ZERO
            for d in range(D):
                g_col[i, d] = _ZERO
        for k in range(kmax - 1, -1, -1):
            u, v, ca, cb, cc, o, bound = g[k, 0], g[k, 1], g[k, 2], g[k, 3], g[k, 4], g[k, 5], g[k, 6]
            lo, hi = np.uint64(lanes[k, 0]), np.uint64(lanes[k, 1])
            i = start + k
            if D == 3:  # RGB, the training case: the three passes below as one, per pixel
                c0, c1, c2 = col[k, 0], col[k, 1], col[k, 2]
                g0 = g1 = g2 = gx = gy = ax = ay = ga = gb = gcc = go = _ZERO
                for p in range(lo, hi):
                    sigma, dx, dy = _sigma(u, v, ca, cb, cc, pxc, pyc, p)
                    vis = _exp_neg(sigma)
                    alpha = min(_AMAX, o * vis)
                    ok = (k < last[p]) & (sigma >= _ZERO) & (sigma <= bound) & (alpha >= _THR)
                    ra = _ONE / (_ONE - alpha)
                    t = Tr[p] * ra
                    Tr[p] = t if ok else Tr[p]
                    okf = _ONE if ok else _ZERO
                    fac = okf * alpha * t
                    w0, w1, w2 = vc[0, p], vc[1, p], vc[2, p]
                    g0 += fac * w0
                    g1 += fac * w1
                    g2 += fac * w2
                    a_p = okf * T_final[p] * ra * va[p]
                    a_p += okf * (c0 * t - buf[0, p] * ra) * w0
                    a_p += okf * (c1 * t - buf[1, p] * ra) * w1
                    a_p += okf * (c2 * t - buf[2, p] * ra) * w2
                    buf[0, p] += c0 * fac
                    buf[1, p] += c1 * fac
                    buf[2, p] += c2 * fac
                    vis_p = vis if (ok & (o * vis <= _AMAX)) else _ZERO
                    v_sigma = -o * vis_p * a_p
                    ga += v_sigma * dx * dx
                    gb += v_sigma * dx * dy
                    gcc += v_sigma * dy * dy
                    ex = v_sigma * (ca * dx + cb * dy)
                    ey = v_sigma * (cb * dx + cc * dy)
                    gx += ex
                    gy += ey
                    ax += abs(ex)
                    ay += abs(ey)
                    go += vis_p * a_p
                g_col[i, 0], g_col[i, 1], g_col[i, 2] = g0, g1, g2
                g_xy[i, 0], g_xy[i, 1] = gx, gy
                g_abs[i, 0], g_abs[i, 1] = ax, ay
                g_conic[i, 0], g_conic[i, 1], g_conic[i, 2] = _HALF * ga, gb, _HALF * gcc
                g_opac[i] = go
                continue
            for p in range(lo, hi):
                sigma, _dx, _dy = _sigma(u, v, ca, cb, cc, pxc, pyc, p)
                vis = _exp_neg(sigma)
                alpha = min(_AMAX, o * vis)
                ok = (k < last[p]) & (sigma >= _ZERO) & (sigma <= bound) & (alpha >= _THR)
                ra = _ONE / (_ONE - alpha)
                t = Tr[p] * ra
                Tr[p] = t if ok else Tr[p]
                okf = _ONE if ok else _ZERO
                ok_[p] = okf
                fac_[p] = okf * alpha * t
                ra_[p] = ra
                t_[p] = t
                vis_[p] = vis if (ok & (o * vis <= _AMAX)) else _ZERO  # alpha's clamp has no gradient
                v_a[p] = okf * T_final[p] * ra * va[p]
            for d in range(D):
                cd = col[k, d]
                gcd = _ZERO
                for p in range(lo, hi):
                    gcd += fac_[p] * vc[d, p]
                    v_a[p] += ok_[p] * (cd * t_[p] - buf[d, p] * ra_[p]) * vc[d, p]
                    buf[d, p] += cd * fac_[p]
                g_col[i, d] = gcd
            gx = gy = ax = ay = ga = gb = gcc = go = _ZERO
            for p in range(lo, hi):
                _sig, dx, dy = _sigma(u, v, ca, cb, cc, pxc, pyc, p)
                v_sigma = -o * vis_[p] * v_a[p]
                ga += v_sigma * dx * dx
                gb += v_sigma * dx * dy
                gcc += v_sigma * dy * dy
                ex = v_sigma * (ca * dx + cb * dy)
                ey = v_sigma * (cb * dx + cc * dy)
                gx += ex
                gy += ey
                ax += abs(ex)
                ay += abs(ey)
                go += vis_[p] * v_a[p]
            g_xy[i, 0], g_xy[i, 1] = gx, gy
            g_abs[i, 0], g_abs[i, 1] = ax, ay
            g_conic[i, 0], g_conic[i, 1], g_conic[i, 2] = _HALF * ga, gb, _HALF * gcc
            g_opac[i] = go


@nb.njit(parallel=True, **_JIT)
def reduce_isects(
    offsets, ids, n_tiles, g_xy, g_abs, g_conic, g_col, g_opac, v_means2d, v_abs, v_conics, v_colors, v_opac
):
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
def raster_transmittance(
    means2d, conics, opacities, offsets, ids, isect_lanes, width, height, tiles_x, isect_T, isect_n
):
    """Per intersection: the sum of the transmittance in front of the Gaussian over the pixels
    of the tile where it contributes (the forward pass's tests, early stop included) into
    ``isect_T [n_isects]`` (float64) and the number of those pixels into ``isect_n`` (int64)."""
    C = means2d.shape[0]
    T = (offsets.shape[0] - 1) // C
    no_features = np.empty((C, means2d.shape[1], 0), np.float32)
    for job in nb.prange(C * T):
        c, x0, y0, x1, y1, start, m = _tile(job, T, tiles_x, width, height, offsets)
        g, _col = _gather(c, start, m, ids, means2d, conics, opacities, no_features)
        lanes = isect_lanes[start : start + m]
        pxc, pyc, live = _pixel_centres(x0, y0, x1, y1)
        Tr = np.ones(_P, np.float32)
        last = np.zeros(_P, np.int32)
        active = (x1 - x0) * (y1 - y0)
        for k in range(m):
            if active == 0:
                break
            u, v, ca, cb, cc, o, bound = g[k, 0], g[k, 1], g[k, 2], g[k, 3], g[k, 4], g[k, 5], g[k, 6]
            kk = np.int32(k + 1)
            sum_t = _ZERO
            count = 0
            stops = 0
            for p in range(np.uint64(lanes[k, 0]), np.uint64(lanes[k, 1])):
                _w, t, stop = _composite(u, v, ca, cb, cc, o, bound, kk, pxc, pyc, Tr, last, live, p)
                sum_t += t
                count += 1 if t > _ZERO else 0
                stops += 1 if stop else 0
            active -= stops
            isect_T[start + k] = sum_t
            isect_n[start + k] = count


@nb.njit(inline="always", **_JIT)
def _ray_depth(px, py, intr, mu, a, z_centre):
    """Camera z where a Gaussian (centre ``mu``, inverse covariance ``a``: xx xy xz yy yz zz,
    camera frame) peaks on the ray through pixel (px, py); ``z_centre`` if not in front."""
    dx, dy = (px - intr[2]) / intr[0], (py - intr[3]) / intr[1]
    ax = a[0] * dx + a[1] * dy + a[2]
    ay = a[1] * dx + a[3] * dy + a[4]
    az = a[2] * dx + a[4] * dy + a[5]
    den = ax * dx + ay * dy + az
    t = (ax * mu[0] + ay * mu[1] + az * mu[2]) / den if den > _ZERO else _ZERO
    return t if t > _ZERO else z_centre


@nb.njit(parallel=True, **_JIT)
def raster_median(
    means2d,
    conics,
    opacities,
    depths,
    offsets,
    ids,
    isect_lanes,
    width,
    height,
    tiles_x,
    intr,
    centres,
    icov,
    median_out,
    alpha_out,
):
    """Per pixel into ``median_out [C, H, W]``: for the Gaussian after which the transmittance is
    first <= 0.5 (the forward pass's tests and early stop), the camera z where its density peaks
    on the pixel's ray (``d^T A mu / d^T A d``, ``intr [C, 4]`` fx fy cx cy, ``centres [C, N, 3]``
    and ``icov [C, N, 6]`` in camera coordinates; its centre's z if not in front), 0 for none;
    ``alpha_out [C, H, W]`` as the forward pass."""
    C = means2d.shape[0]
    T = (offsets.shape[0] - 1) // C
    no_features = np.empty((C, means2d.shape[1], 0), np.float32)
    for job in nb.prange(C * T):
        c, x0, y0, x1, y1, start, m = _tile(job, T, tiles_x, width, height, offsets)
        g, _col = _gather(c, start, m, ids, means2d, conics, opacities, no_features)
        lanes = isect_lanes[start : start + m]
        pxc, pyc, live = _pixel_centres(x0, y0, x1, y1)
        Tr = np.ones(_P, np.float32)
        med = np.zeros(_P, np.float32)
        last = np.zeros(_P, np.int32)
        active = (x1 - x0) * (y1 - y0)
        for k in range(m):
            if active == 0:
                break
            u, v, ca, cb, cc, o, bound = g[k, 0], g[k, 1], g[k, 2], g[k, 3], g[k, 4], g[k, 5], g[k, 6]
            n = ids[start + k]
            kk = np.int32(k + 1)
            stops = 0
            for p in range(np.uint64(lanes[k, 0]), np.uint64(lanes[k, 1])):
                w, t, stop = _composite(u, v, ca, cb, cc, o, bound, kk, pxc, pyc, Tr, last, live, p)
                if (t > _HALF) & (t - w <= _HALF):
                    med[p] = _ray_depth(pxc[p], pyc[p], intr[c], centres[c, n], icov[c, n], depths[c, n])
                stops += 1 if stop else 0
            active -= stops
        for py in range(y0, y1):
            for px in range(x0, x1):
                p = (py - y0) * _S + px - x0
                median_out[c, py, px] = med[p]
                alpha_out[c, py, px] = _ONE - Tr[p]
