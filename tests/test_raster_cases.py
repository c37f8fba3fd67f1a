"""Hand-computed images, gradchecks, errors and the contracts other code relies on."""

from __future__ import annotations

import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from scenes import REPO, Scene, random_scene

from splatforge import BackendUnavailableError, ConfigError
from splatforge.geometry.sh import sh_bases
from splatforge.raster import available_backends, rasterize, resolve_backend


def single_gaussian_expected(W, H, f, z, s, opacity, color):
    """Closed form for one isotropic Gaussian on the optical axis, evaluated independently in
    float64 numpy: sigma_px^2 = (f s / z)^2 + 0.3, alpha = min(0.999, o exp(-d^2 / (2 sigma_px^2))),
    zero outside the opacity-aware radius box or below 1/255."""
    var = (f * s / z) ** 2 + 0.3
    extend = min(3.33, math.sqrt(2.0 * math.log(opacity * 255.0)))
    r = math.ceil(extend * math.sqrt(var))
    ys, xs = np.mgrid[0:H, 0:W] + 0.5
    dx, dy = W / 2 - xs, H / 2 - ys
    alpha = np.minimum(0.999, opacity * np.exp(-(dx * dx + dy * dy) / (2 * var)))
    alpha[(alpha < 1 / 255) | (np.abs(dx) > r) | (np.abs(dy) > r)] = 0.0
    return alpha[..., None] * np.asarray(color), alpha[..., None], r


@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("opacity", [0.8, 0.02])
def test_single_gaussian_hand_computed(backend, opacity):
    W, H, f, z, s = 40, 36, 30.0, 2.0, 0.2
    color = [0.9, 0.5, 0.1]
    scene = Scene(
        torch.tensor([[0.0, 0.0, z]]),
        torch.tensor([[1.0, 0.0, 0.0, 0.0]]),
        torch.full((1, 3), s),
        torch.tensor([opacity]),
        torch.tensor([color]),
        torch.eye(4)[None],
        torch.tensor([[[f, 0.0, W / 2], [0.0, f, H / 2], [0.0, 0.0, 1.0]]]),
        W,
        H,
    )
    render, alpha, info = rasterize(*scene.params(), scene.viewmats, scene.Ks, W, H, backend=backend)
    want_rgb, want_alpha, r = single_gaussian_expected(W, H, f, z, s, opacity, color)
    np.testing.assert_allclose(alpha[0].detach().numpy(), want_alpha, atol=2e-6)
    np.testing.assert_allclose(render[0].detach().numpy(), want_rgb, atol=2e-6)
    assert info["radii"][0, 0].tolist() == [r, r]
    torch.testing.assert_close(info["means2d"][0, 0].detach(), torch.tensor([W / 2, H / 2]))
    torch.testing.assert_close(info["depths"][0, 0].detach(), torch.tensor(z))


def test_alpha_clamp_and_early_stop():
    """Opaque layers: alpha clamps at 0.999 and compositing stops before T <= 1e-4, so a stack of
    identical opaque Gaussians leaves T = 1e-3 after the first (the second would give 1e-6)."""
    n = 3
    means = torch.tensor([[0.0, 0.0, 2.0 + 0.1 * i] for i in range(n)])
    colors = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    K = torch.tensor([[[20.0, 0, 8.5], [0, 20.0, 8.5], [0, 0, 1]]])  # all centred on pixel (8, 8)
    for backend in ("cpu", "reference"):
        render, alpha, _ = rasterize(
            means,
            torch.tensor([[1.0, 0, 0, 0]] * n),
            torch.full((n, 3), 0.5),
            torch.ones(n),
            colors,
            torch.eye(4)[None],
            K,
            16,
            16,
            backend=backend,
        )
        centre = render[0, 8, 8]
        torch.testing.assert_close(alpha[0, 8, 8, 0], torch.tensor(0.999))
        torch.testing.assert_close(centre, torch.tensor([0.999, 0.0, 0.0]))


def test_cpu_kernels_exp_against_float64():
    """The compiled compositing kernels evaluate exp(-sigma) with their own float32 polynomial
    (it vectorises; libm's exp does not): within 2e-7 relative of float64 exp over the whole
    range a contribution can have (sigma in [0, log(255)]) and beyond, to the clamp at 15."""
    from splatforge.raster import _cpu_raster

    s = np.concatenate([np.linspace(0.0, 15.0, 300_001), [0.0, math.log(2.0), math.log(255.0), 1e-9]]).astype(
        np.float32
    )
    got = np.empty_like(s)
    _cpu_raster.exp_neg(s, got)
    want = np.exp(-s.astype(np.float64))
    assert np.max(np.abs(got - want) / want) < 2e-7
    clamped = np.empty(2, np.float32)
    _cpu_raster.exp_neg(np.array([-3.0, 40.0], np.float32), clamped)
    np.testing.assert_allclose(clamped, [1.0, math.exp(-15.0)], rtol=2e-7)


def _box_lists(means2d, radii, depths, width, height):
    """The tile lists of every Gaussian's whole box (what the kernels took before the ellipse
    culling), built in numpy: each tile's members in stable depth order and, per entry, the
    flat pixel range of the box's rows in the tile."""
    C, _N = depths.shape
    tx_n, ty_n = -(-width // 16), -(-height // 16)
    u, v = means2d[..., 0].astype(np.float64), means2d[..., 1].astype(np.float64)
    rx, ry = radii[..., 0].astype(np.float64), radii[..., 1].astype(np.float64)
    x0, x1 = np.clip(np.floor((u - rx) / 16), 0, tx_n), np.clip(np.ceil((u + rx) / 16), 0, tx_n)
    y0, y1 = np.clip(np.floor((v - ry) / 16), 0, ty_n), np.clip(np.ceil((v + ry) / 16), 0, ty_n)
    offsets, ids, lanes = [0], [], []
    for c in range(C):
        for ty in range(ty_n):
            for tx in range(tx_n):
                inside = (radii[c, :, 0] > 0) & (radii[c, :, 1] > 0)
                members = np.flatnonzero(inside & (x0[c] <= tx) & (tx < x1[c]) & (y0[c] <= ty) & (ty < y1[c]))
                members = members[np.argsort(depths[c, members], kind="stable")]
                top, bottom = ty * 16, min(ty * 16 + 16, height)
                lo = np.maximum(top, np.ceil(v[c, members] - ry[c, members] - 0.5)) - top
                hi = np.maximum(lo, np.minimum(bottom, np.floor(v[c, members] + ry[c, members] - 0.5) + 1) - top)
                ids.extend(members)
                lanes.extend(zip(lo * 16, hi * 16))
                offsets.append(len(ids))
    return np.array(offsets, np.int64), np.array(ids, np.int32), np.array(lanes, np.int32).reshape(-1, 2)


def _projected(scene):
    with torch.no_grad():
        _, _, info = rasterize(*scene.params(), scene.viewmats, scene.Ks, scene.width, scene.height, backend="cpu")
    return {k: info[k].detach().numpy() for k in ("means2d", "radii", "depths", "conics", "opacities")}


def test_tile_lists_sorted_by_depth_then_index():
    """Each tile's list is its Gaussians in (depth, index) order, what gsplat's stable radix sort
    gives, with tied and negative depths (near_plane <= 0), against numpy's stable argsort; the
    ellipse culling only drops members of the box lists, and some."""
    from splatforge.raster import _cpu_raster

    W, H = 70, 45
    p = _projected(random_scene(seed=3, n=500, width=W, height=H))
    rng = np.random.default_rng(0)
    depths = rng.choice(np.array([-2.5, -1.0, -0.0, 0.0, 0.5, 1.0, 1e-30, 3.0], np.float32), p["depths"].shape)
    offsets, ids, lanes = _cpu_raster.bin_gaussians(p["means2d"], p["radii"], depths, p["conics"], p["opacities"], W, H)
    box_offsets, box_ids, _ = _box_lists(p["means2d"], p["radii"], depths, W, H)
    assert offsets.shape == box_offsets.shape and ids.shape[0] == lanes.shape[0]
    C = depths.shape[0]
    T = (offsets.shape[0] - 1) // C
    for tile in range(C * T):
        box = box_ids[box_offsets[tile] : box_offsets[tile + 1]]
        got = ids[offsets[tile] : offsets[tile + 1]]
        assert np.isin(got, box).all()
        want = np.sort(got)
        want = want[np.argsort(depths[tile // T, want], kind="stable")]
        np.testing.assert_array_equal(got, want)
    assert 0.5 * box_ids.shape[0] < ids.shape[0] < 0.95 * box_ids.shape[0]  # culls some, not most


def test_depth_order_is_numpys_stable_sort_per_camera():
    """The radix sort behind the tile lists against numpy's stable lexsort of (camera, depth):
    invisible Gaussians left out, a camera with none visible, depths sharing their high bytes
    (the skipped digits), negative and tied depths, -0.0 tied with 0.0."""
    from splatforge.raster._cpu_raster import _depth_order

    rng = np.random.default_rng(4)
    C, N = 3, 4000
    depths = (2.0 + rng.random((C, N)) * 1e-3).astype(np.float32)  # one exponent: top digits all equal
    depths[1] = rng.choice(np.array([-3.0, -1e-20, -0.0, 0.0, 1e-30, 2.0, 7.5], np.float32), N)
    depths[1, ::7] = rng.standard_normal(len(depths[1, ::7])).astype(np.float32) * 100
    visible = rng.random((C, N)) < 0.8
    visible[2] = False
    area = visible.ravel().astype(np.int64)
    got = _depth_order(depths, area)
    jobs = np.flatnonzero(visible.ravel())
    key = depths.ravel()[jobs] + np.float32(0.0)  # -0.0 -> 0.0, as a float comparison sees it
    want = jobs[np.lexsort((jobs, key, jobs // N))]
    np.testing.assert_array_equal(got, want)
    assert got.dtype == np.int64 and (got // N != 2).all()


def test_isect_gradients_summed_per_gaussian():
    """The per-intersection gradients summed per (camera, Gaussian) against numpy's unbuffered
    ``np.add.at`` in float64, over two cameras with repeated, missing and boundary indices."""
    from splatforge.raster._cpu_raster import reduce_isects

    rng = np.random.default_rng(5)
    C, N, T, D = 2, 101, 7, 3
    counts = rng.integers(0, 40, C * T)
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    M = int(offsets[-1])
    ids = rng.integers(0, N, M).astype(np.int32)
    ids[:3], ids[-3:] = 0, N - 1
    grads = [rng.standard_normal(s).astype(np.float32) for s in ((M, 2), (M, 2), (M, 3), (M, D), (M,))]
    cams = np.repeat(np.arange(C), [counts[c * T : (c + 1) * T].sum() for c in range(C)])
    outs = [np.zeros((C, N) + g.shape[1:], np.float32) for g in grads]
    reduce_isects(offsets, ids, T, *grads, *outs)
    for g, got in zip(grads, outs):
        want = np.zeros(got.shape, np.float64)
        np.add.at(want, (cams, ids), g.astype(np.float64))
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
        assert np.count_nonzero(want) > 0.5 * want.size


def test_culled_tile_lists_cover_every_contributing_pixel():
    """Every pixel centre where a Gaussian of its box reaches the kernels' contribution test
    (float32 sigma <= the skip bound, as they compute it) lies in a kept tile and row lane, for
    tilted, elongated Gaussians: the culling drops only work that composites nothing."""
    from splatforge.raster import _cpu_raster

    W, H = 70, 45
    p = _projected(random_scene(seed=5, n=500, width=W, height=H))
    offsets, ids, lanes = _cpu_raster.bin_gaussians(
        p["means2d"], p["radii"], p["depths"], p["conics"], p["opacities"], W, H
    )
    box_offsets, box_ids, box_lanes = _box_lists(p["means2d"], p["radii"], p["depths"], W, H)
    C, T = p["depths"].shape[0], (offsets.shape[0] - 1) // p["depths"].shape[0]
    f32 = np.float32
    checked = 0
    for tile in range(C * T):
        c, t = divmod(tile, T)
        kept = dict(zip(ids[offsets[tile] : offsets[tile + 1]], lanes[offsets[tile] : offsets[tile + 1]]))
        x0, y0 = (t % -(-W // 16)) * 16, (t // -(-W // 16)) * 16
        flat = np.arange(256)
        px, py = x0 + flat % 16, y0 + flat // 16
        live = (px < W) & (py < H)
        pxc, pyc = px.astype(f32) + f32(0.5), py.astype(f32) + f32(0.5)
        for n, (lo, hi) in zip(
            box_ids[box_offsets[tile] : box_offsets[tile + 1]], box_lanes[box_offsets[tile] : box_offsets[tile + 1]]
        ):
            u, v = p["means2d"][c, n]
            ca, cb, cc = p["conics"][c, n]
            o = p["opacities"][c, n]
            dx, dy = u - pxc, v - pyc
            sigma = f32(0.5) * (ca * dx * dx + cc * dy * dy) + cb * dx * dy
            bound = f32(math.log(max(float(o), 1e-30) / (1.0 / 255.0)) + 1e-3)
            hits = flat[live & (sigma >= 0) & (sigma <= bound) & (flat >= lo) & (flat < hi)]
            if hits.size:
                checked += 1
                assert n in kept, (tile, n)
                assert kept[n][0] <= hits.min() and hits.max() < kept[n][1], (tile, n, kept[n], hits)
    assert checked > 500


def test_culled_lists_render_the_bits_of_the_box_lists():
    """Forward images, alphas and last contributors are bit-identical with the culled lists and
    with the whole-box lists (the kernels' own input before the culling); the backward pass's
    per-Gaussian gradients agree to float32 summation order."""
    from splatforge.raster import _cpu_raster as kr

    W, H = 70, 45
    scene = random_scene(seed=7, n=500, width=W, height=H)
    p = _projected(scene)
    C, N = p["depths"].shape
    rng = np.random.default_rng(1)
    colors = rng.random((C, N, 3), dtype=np.float32)
    bgs = np.zeros((C, 3), np.float32)
    culled = kr.bin_gaussians(p["means2d"], p["radii"], p["depths"], p["conics"], p["opacities"], W, H)
    box = _box_lists(p["means2d"], p["radii"], p["depths"], W, H)
    assert culled[1].shape[0] < box[1].shape[0]
    v_render = rng.standard_normal((C, H, W, 3), dtype=np.float32)
    v_alpha = rng.standard_normal((C, H, W), dtype=np.float32)
    outs, grads = [], []
    for offsets, ids, lanes in (culled, box):
        render, alpha, last = (
            np.empty((C, H, W, 3), np.float32),
            np.empty((C, H, W), np.float32),
            np.empty((C, H, W), np.int32),
        )
        args = (p["means2d"], p["conics"], colors, p["opacities"], bgs, offsets, ids, lanes, W, H, -(-W // 16))
        kr.raster_fwd(*args, render, alpha, last)
        T = (offsets.shape[0] - 1) // C
        tile = (np.arange(H)[:, None] // 16) * -(-W // 16) + np.arange(W)[None, :] // 16
        who = np.where(
            last > 0, ids[np.minimum(offsets[np.arange(C)[:, None, None] * T + tile] + last - 1, ids.shape[0] - 1)], -1
        )
        outs.append((render, alpha, who))
        M = ids.shape[0]
        g = [
            np.zeros((M, 2), np.float32),
            np.zeros((M, 2), np.float32),
            np.zeros((M, 3), np.float32),
            np.zeros((M, 3), np.float32),
            np.zeros(M, np.float32),
        ]
        kr.raster_bwd(*args, alpha, last, v_render, v_alpha, *g)
        cams = np.repeat(np.arange(C), np.diff(offsets[::T]))
        per = []
        for arr in g:
            acc = np.zeros((C * N,) + arr.shape[1:], np.float64)
            np.add.at(acc, cams * N + ids, arr)
            per.append(acc)
        grads.append(per)
    for a, b in zip(*outs):
        np.testing.assert_array_equal(a, b)
    assert (outs[0][2] >= 0).mean() > 0.3  # the images are mostly covered
    for a, b in zip(*grads):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
        assert np.abs(b).max() > 0


def test_strip_rows_against_a_dense_sample():
    """:func:`strip_rows` against the rows found by evaluating sigma densely in float64 over the
    strip, for random tilted ellipses: never a contributing row less, and at most one row more
    on each side."""
    from splatforge.raster import _cpu_raster

    rng = np.random.default_rng(2)
    for _ in range(300):
        u, v = rng.uniform(0, 64, 2)
        sx, sy, th = rng.uniform(0.5, 12), rng.uniform(0.5, 12), rng.uniform(0, np.pi)
        R = np.array([[np.cos(th), -np.sin(th)], [np.sin(th), np.cos(th)]])
        ca, cb, cc = np.linalg.inv(R @ np.diag([sx * sx, sy * sy]) @ R.T)[[0, 0, 1], [0, 1, 1]]
        o = rng.uniform(0.01, 1.0)
        px0 = int(rng.integers(0, 4)) * 16
        r0, r1 = _cpu_raster.strip_rows(
            np.float32(u), np.float32(v), np.float32(ca), np.float32(cb), np.float32(cc), np.float32(o), px0, px0 + 16
        )
        ys, xs = np.mgrid[-40:110, px0 : px0 + 16] + 0.5
        dx, dy = u - xs, v - ys
        sigma = 0.5 * (ca * dx * dx + cc * dy * dy) + cb * dx * dy
        rows = np.flatnonzero((sigma <= math.log(o * 255.0)).any(axis=1)) - 40
        if rows.size == 0:
            assert r0 >= r1 or r1 - r0 <= 2
            continue
        assert r0 <= rows.min() and rows.max() < r1
        assert rows.min() - r0 <= 1 and r1 - 1 - rows.max() <= 1


def test_gradcheck_reference_float64():
    """The oracle's own gradients against finite differences (float64, tiny scene)."""
    scene = random_scene(seed=4, n=6, n_cameras=2, width=20, height=18, sh_degree=1).to(torch.float64)
    scene.scales = scene.scales * 3.0  # large enough to cover pixels of the tiny images
    scene.opacities = scene.opacities * 0.5 + 0.3
    scene.colors = scene.colors[:, :4]

    def fn(means, quats, scales, opacities, colors):
        render, alpha, _ = rasterize(
            means,
            quats,
            scales,
            opacities,
            colors,
            scene.viewmats,
            scene.Ks,
            scene.width,
            scene.height,
            sh_degree=1,
            render_mode="RGB+ED",
            rasterize_mode="antialiased",
            backend="reference",
        )
        return render, alpha

    render, _ = fn(*scene.params())
    assert render[..., :3].abs().sum() > 1.0  # something is drawn
    assert torch.autograd.gradcheck(fn, tuple(scene.params()), eps=1e-6, atol=1e-5, rtol=1e-3)


def test_sh_basis_is_orthonormal_and_signed_as_3dgs():
    """Independent check of the SH constants: the 16 basis functions are orthonormal on the
    sphere (Fibonacci-lattice quadrature), and the signs are Inria's (-y, +z, -x for degree 1)."""
    n = 200_000
    i = torch.arange(n, dtype=torch.float64) + 0.5
    zc = 1 - 2 * i / n
    phi = math.pi * (1 + 5**0.5) * i
    r = torch.sqrt(1 - zc * zc)
    dirs = torch.stack([r * torch.cos(phi), r * torch.sin(phi), zc], -1)
    b = sh_bases(3, dirs)
    gram = (b.T @ b) * (4 * math.pi / n)
    torch.testing.assert_close(gram, torch.eye(16, dtype=torch.float64), atol=1e-4, rtol=0)
    y1 = sh_bases(1, torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [1.0, 0.0, 0.0]]))
    assert y1[0, 1] < 0 and y1[1, 2] > 0 and y1[2, 3] < 0


def test_default_strategy_runs_on_cpu_info():
    """gsplat's DefaultStrategy reads info from a CPU render (means2d.grad/absgrad, radii, sizes)
    and grows exactly the Gaussians whose normalised screen-space gradient, computed here from
    the same info by gsplat's formula, is above the threshold (set to its median, so about half
    grow); Adam's state follows."""
    from gsplat.strategy import DefaultStrategy

    scene = random_scene(seed=2, n=200, n_cameras=1, width=64, height=48, sh_degree=1)
    n = scene.means.shape[0]
    params = torch.nn.ParameterDict(
        {
            "means": scene.means,
            "quats": scene.quats,
            "scales": torch.log(scene.scales),
            "opacities": torch.logit(scene.opacities.clamp(0.05, 0.95)),
            "sh0": scene.colors[:, :1].clone(),
            "shN": scene.colors[:, 1:4].clone(),
        }
    )
    optimizers = {k: torch.optim.Adam([p], lr=1e-3) for k, p in params.items()}
    for absgrad in (False, True):
        render, _alpha, info = rasterize(
            params["means"],
            params["quats"],
            torch.exp(params["scales"]),
            torch.sigmoid(params["opacities"]),
            torch.cat([params["sh0"], params["shN"]], 1),
            scene.viewmats,
            scene.Ks,
            64,
            48,
            sh_degree=1,
            absgrad=absgrad,
            backend="cpu",
        )
        info["means2d"].retain_grad()
        render.mean().backward()
        g = (info["means2d"].absgrad if absgrad else info["means2d"].grad).clone()
        g[..., 0] *= 64 / 2.0
        g[..., 1] *= 48 / 2.0
        visible = (info["radii"] > 0).all(dim=-1)[0]
        norms = g[0].norm(dim=-1)
        threshold = float(norms[visible].median())
        expected_growth = int((visible & (norms > threshold)).sum())
        assert 0.3 * visible.sum() < expected_growth < 0.7 * visible.sum() and visible.sum() > 100
        strategy = DefaultStrategy(
            refine_start_iter=0,
            refine_every=1,
            grow_grad2d=threshold,
            prune_opa=0.0,
            absgrad=absgrad,
            pause_refine_after_reset=0,
            reset_every=1000,
        )
        strategy.check_sanity(params, optimizers)
        state = strategy.initialize_state()
        for opt in optimizers.values():
            opt.step()
        strategy.step_post_backward(params, optimizers, state, 1, info)
        assert len(params["means"]) == n + expected_growth, "duplicated + split must be those above the threshold"
        for key, opt in optimizers.items():
            assert opt.state[opt.param_groups[0]["params"][0]]["exp_avg"].shape == params[key].shape
        n = len(params["means"])
        for p in params.values():
            p.grad = None


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_sh_coefficients_as_parts_match_the_concatenation(backend):
    """``colors=(sh0, shN)`` renders the bits of ``colors=cat([sh0, shN])`` and gives each part
    the slice of the concatenation's gradient (the cpu kernels read the parts in place)."""
    scene = random_scene(seed=9, n=200, n_cameras=2, width=40, height=30, sh_degree=3)
    g = torch.Generator().manual_seed(3)
    weights = torch.randn(2, 30, 40, 3, generator=g)
    results = []
    for split in (False, True):
        means, quats, scales, opacities, coeffs = scene.params()
        sh0, shN = (
            coeffs[:, :1].detach().clone().requires_grad_(True),
            coeffs[:, 1:].detach().clone().requires_grad_(True),
        )
        colors = (sh0, shN) if split else torch.cat([sh0, shN], dim=1)
        render, _, _ = rasterize(
            means, quats, scales, opacities, colors, scene.viewmats, scene.Ks, 40, 30, sh_degree=2, backend=backend
        )
        (render * weights).sum().backward()
        results.append([render.detach(), means.grad, sh0.grad, shN.grad])
    assert results[0][0].abs().sum() > 1.0
    torch.testing.assert_close(results[0][0], results[1][0], rtol=0, atol=0)
    for a, b in zip(results[0][1:], results[1][1:]):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    assert results[1][3][:, 8:].abs().max() == 0 and results[1][3][:, :8].abs().max() > 0  # degree 2 of 3


def test_cpu_render_never_imports_gsplat():
    """Rendering on CPU (auto backend) and probing backends must not import gsplat: on a machine
    with nvcc but no GPU, gsplat would start its JIT build."""
    code = (
        "import sys, torch\n"
        "from splatforge.raster import rasterize, available_backends\n"
        "m = torch.zeros(1, 3); m[0, 2] = 2\n"
        "rasterize(m, torch.tensor([[1., 0, 0, 0]]), torch.full((1, 3), .1), torch.ones(1), torch.ones(1, 3),\n"
        "          torch.eye(4)[None], torch.tensor([[[10., 0, 4], [0, 10., 4], [0, 0, 1]]]), 8, 8)\n"
        "available_backends('cpu'); available_backends('cuda')\n"
        "assert not any(k == 'gsplat' or k.startswith('gsplat.') for k in sys.modules), 'gsplat was imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)


_FRESH_VS_CACHED = """
import sys, numpy as np, torch
from splatforge.raster import rasterize
from splatforge.train.losses import ssim
g = torch.Generator().manual_seed(0)
N = 3000
means = torch.randn(N, 3, generator=g) * 0.8 + torch.tensor([0.0, 0.0, 4.0])
quats = torch.randn(N, 4, generator=g)
log_scales = torch.rand(N, 3, generator=g) * -3 - 2
logits = torch.randn(N, generator=g)
sh = torch.randn(N, 16, 3, generator=g) * 0.3
viewmats = torch.eye(4).repeat(2, 1, 1)
viewmats[1, 0, 3] = 0.2
Ks = torch.tensor([[200.0, 0, 64], [0, 200.0, 48], [0, 0, 1]]).repeat(2, 1, 1)
leaves = [means, quats, log_scales, logits, sh, viewmats]
for t in leaves:
    t.requires_grad_(True)
img, alpha, _ = rasterize(means, torch.nn.functional.normalize(quats, dim=-1), log_scales.exp(), torch.sigmoid(logits),
                          sh, viewmats, Ks, 128, 96, sh_degree=3, render_mode="RGB+ED", backend="cpu")
loss = (img * torch.randn(img.shape, generator=g)).sum() + ssim(img[..., :3], torch.rand(2, 96, 128, 3, generator=g))
loss.backward()
out = {"img": img.detach().numpy(), "alpha": alpha.detach().numpy()}
out.update({f"grad{i}": t.grad.numpy() for i, t in enumerate(leaves)})
np.savez(sys.argv[1], **out)
"""


@pytest.mark.slow
def test_kernels_compiled_here_and_loaded_from_cache_give_the_same_bits(tmp_path):
    """A process that compiles the cpu kernels and one that loads them from numba's on-disk cache
    render and differentiate bit-identically (rasterizer forward/backward with viewmats gradients,
    SH, SSIM). With LLVM's ``reassoc`` fast-math flag they did not (renders ~1e-6 apart): a run's
    numbers then depended on whether its process found the cache, e.g. a fresh checkout's first
    ``generate`` job against the next ones."""
    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path / "numba")}
    for name in ("compiled", "cached"):
        subprocess.run(
            [sys.executable, "-c", _FRESH_VS_CACHED, str(tmp_path / f"{name}.npz")], check=True, cwd=REPO, env=env
        )
    assert any((tmp_path / "numba").rglob("*.nbi")), "the first process should have written the cache"
    compiled, cached = np.load(tmp_path / "compiled.npz"), np.load(tmp_path / "cached.npz")
    for key in compiled.files:
        assert np.array_equal(compiled[key], cached[key]), key


def test_backend_selection_and_errors():
    assert resolve_backend("auto", torch.device("cpu")) == "cpu"
    assert available_backends("cpu") == ["cpu", "reference"]
    with pytest.raises(BackendUnavailableError, match="CUDA tensors"):
        resolve_backend("gsplat", torch.device("cpu"))
    with pytest.raises(BackendUnavailableError, match="CPU tensors"):
        resolve_backend("cpu", torch.device("meta"))
    with pytest.raises(ConfigError, match="backend must be one of"):
        resolve_backend("vulkan", torch.device("cpu"))


@pytest.mark.parametrize(
    "change, message",
    [
        ({"quats": torch.zeros(4, 3)}, r"quats must have shape \[4, 4\]"),
        ({"opacities": torch.zeros(4, 1)}, r"opacities must have shape \[4\]"),
        ({"Ks": torch.zeros(2, 3, 3)}, r"Ks must have shape \[1, 3, 3\]"),
        ({"render_mode": "RGBD"}, "render_mode must be one of"),
        ({"rasterize_mode": "mip"}, "rasterize_mode must be one of"),
        ({"sh_degree": 3, "colors": torch.zeros(4, 9, 3)}, "sh_degree=3 needs 16 SH coefficients"),
        ({"sh_degree": 4, "colors": torch.zeros(4, 25, 3)}, "sh_degree must be 0, 1, 2 or 3"),
        ({"sh_degree": 1, "colors": (torch.zeros(4, 1, 3),)}, r"must be the pair \(sh0, shN\)"),
        (
            {"sh_degree": 1, "colors": (torch.zeros(4, 2, 3), torch.zeros(4, 3, 3))},
            r"colors\[0\] \(sh0\) must have shape \[4, 1, 3\]",
        ),
        (
            {"sh_degree": 2, "colors": (torch.zeros(4, 1, 3), torch.zeros(4, 3, 3))},
            "sh_degree=2 needs 9 SH coefficients per channel, colors has 4",
        ),
        (
            {"sh_degree": 1, "colors": (torch.zeros(4, 1, 3), torch.zeros(4, 3, 3, dtype=torch.float64))},
            "cpu backend needs float32",
        ),
        ({"means": torch.zeros(4, 3, dtype=torch.float64)}, "cpu backend needs float32"),
        ({"width": 0}, "width and height must be positive"),
        ({"backgrounds": torch.zeros(1, 4)}, r"backgrounds must have shape \[1, 3\]"),
    ],
)
def test_bad_arguments_raise_config_error(change, message):
    args = {
        "means": torch.zeros(4, 3),
        "quats": torch.zeros(4, 4),
        "scales": torch.ones(4, 3),
        "opacities": torch.ones(4),
        "colors": torch.ones(4, 3),
        "viewmats": torch.eye(4)[None],
        "Ks": torch.eye(3)[None],
        "width": 8,
        "height": 8,
    }
    args.update(change)
    with pytest.raises(ConfigError, match=message):
        rasterize(**args, backend="cpu")


@pytest.mark.gpu
@pytest.mark.parametrize("sh_degree", [None, 3])
@pytest.mark.parametrize("rasterize_mode", ["classic", "antialiased"])
def test_cpu_matches_gsplat_on_cuda(sh_degree, rasterize_mode):
    """cpu backend against gsplat's CUDA kernels: images within 1e-3, gradients within 1 %
    of their largest magnitude (float32 on both sides, different summation orders)."""
    pytest.importorskip("gsplat")
    scene = random_scene(seed=12, n=2000, n_cameras=2, width=160, height=120, sh_degree=sh_degree)
    outs = {}
    for backend, device in (("cpu", "cpu"), ("gsplat", "cuda")):
        params = [p.detach().to(device).requires_grad_(True) for p in scene.params()]
        render, alpha, info = rasterize(
            *params,
            scene.viewmats.to(device),
            scene.Ks.to(device),
            scene.width,
            scene.height,
            sh_degree=sh_degree,
            rasterize_mode=rasterize_mode,
            render_mode="RGB+ED",
            backend=backend,
        )
        info["means2d"].retain_grad()
        (render.sum() + alpha.sum()).backward()
        outs[backend] = (render.detach().cpu(), alpha.detach().cpu(), [p.grad.cpu() for p in params])
    (r0, a0, g0), (r1, a1, g1) = outs["cpu"], outs["gsplat"]
    torch.testing.assert_close(a0, a1, atol=1e-3, rtol=0)
    torch.testing.assert_close(r0[..., :3], r1[..., :3], atol=1e-3, rtol=0)
    for got, want in zip(g0, g1):
        assert (got - want).abs().max() <= 1e-2 * want.abs().max() + 1e-5


@pytest.mark.gpu
@pytest.mark.parametrize("render_mode", ["ID", "RGB+ID"])
def test_inverse_depth_cpu_matches_gsplat_on_cuda(render_mode):
    """gsplat has no inverse-depth mode: its backend renders 1/z as a feature channel. Same
    image and gradients as the cpu backend's ID mode; in ``ID`` alone the colours take no part,
    so neither backend gives them a gradient."""
    pytest.importorskip("gsplat")
    scene = random_scene(seed=13, n=2000, n_cameras=2, width=160, height=120, sh_degree=3)
    outs = {}
    for backend, device in (("cpu", "cpu"), ("gsplat", "cuda")):
        params = [p.detach().to(device).requires_grad_(True) for p in scene.params()]
        render, alpha, _ = rasterize(
            *params,
            scene.viewmats.to(device),
            scene.Ks.to(device),
            scene.width,
            scene.height,
            sh_degree=3,
            render_mode=render_mode,
            backend=backend,
        )
        (render.sum() + alpha.sum()).backward()
        outs[backend] = (render.detach().cpu(), [None if p.grad is None else p.grad.cpu() for p in params])
    (r0, g0), (r1, g1) = outs["cpu"], outs["gsplat"]
    assert r0.shape == r1.shape
    torch.testing.assert_close(r0, r1, atol=1e-3, rtol=1e-3)
    colors_used = render_mode == "RGB+ID"
    assert (g0[-1] is not None, g1[-1] is not None) == (colors_used, colors_used)
    for got, want in zip(g0[:-1] + g0[-1:] * colors_used, g1[:-1] + g1[-1:] * colors_used):
        assert (got - want).abs().max() <= 1e-2 * want.abs().max() + 1e-5


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_inverse_depth_hand_case(backend):
    """Two Gaussians on the optical axis at z = 2 and z = 4, opacities 0.5 and 0.8, so small and
    so far apart in size that the centre pixel's weights are those of the opacities themselves
    times the Gaussian falloff: ID = w1 / 2 + w2 / 4 with w1 = a1, w2 = (1 - a1) a2, and ED, D
    agree with the same weights."""
    from splatforge.raster import rasterize

    means = torch.tensor([[0.0, 0.0, 2.0], [0.0, 0.0, 4.0]])
    quats = torch.tensor([[1.0, 0.0, 0.0, 0.0]] * 2)
    scales = torch.tensor([[0.5, 0.5, 0.5], [2.0, 2.0, 2.0]])
    opac = torch.tensor([0.5, 0.8])
    colors = torch.ones(2, 3)
    viewmats = torch.eye(4)[None]
    Ks = torch.tensor([[[50.0, 0.0, 16.0], [0.0, 50.0, 16.0], [0.0, 0.0, 1.0]]])
    out = {}
    for mode in ("ID", "D", "ED"):
        r, _a, _ = rasterize(
            means, quats, scales, opac, colors, viewmats, Ks, 32, 32, render_mode=mode, backend=backend
        )
        out[mode] = r[0, 15:17, 15:17, 0].mean().item()
    # the centre pixels sit 0.5 px off each centre: falloff exp(-0.5 * 0.5 px^2 / sigma_px^2)
    sig1, sig2 = 0.5 * 50 / 2, 2.0 * 50 / 4
    a1 = 0.5 * math.exp(-0.5 * 0.5 / (sig1**2 + 0.3))
    a2 = 0.8 * math.exp(-0.5 * 0.5 / (sig2**2 + 0.3))
    w1, w2 = a1, (1 - a1) * a2
    assert out["ID"] == pytest.approx(w1 / 2 + w2 / 4, rel=1e-4)
    assert out["D"] == pytest.approx(w1 * 2 + w2 * 4, rel=1e-4)
    assert out["ED"] == pytest.approx((w1 * 2 + w2 * 4) / (w1 + w2), rel=1e-4)


@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize(("opacities", "median"), [((0.6, 0.8), 2.0), ((0.3, 0.8), 4.0), ((0.2, 0.3), 0.0)])
def test_median_depth_hand_case(backend, opacities, median):
    """The median depth is the depth of the Gaussian that brings the transmittance to 0.5 or
    below, at the point of the pixel's ray where it peaks: two Gaussians on the optical axis at
    z = 2 and 4 (the centre pixels' alphas are the opacities to 1e-3): 0.6 in front crosses at
    once (T = 0.4, median 2); 0.3 then 0.8 crosses at the second (T = 0.7, then 0.14: median 4);
    0.2 then 0.3 never does (T = 0.56: 0, no surface). The median has no gradient; the colour
    channels of RGB+MD are RGB's."""
    from splatforge.raster import rasterize

    means = torch.tensor([[0.0, 0.0, 2.0], [0.0, 0.0, 4.0]])
    quats = torch.tensor([[1.0, 0.0, 0.0, 0.0]] * 2)
    scales = torch.tensor([[0.5, 0.5, 0.5], [2.0, 2.0, 2.0]], requires_grad=True)
    colors = torch.rand(2, 3, generator=torch.Generator().manual_seed(0))
    viewmats, Ks = torch.eye(4)[None], torch.tensor([[[50.0, 0.0, 16.0], [0.0, 50.0, 16.0], [0.0, 0.0, 1.0]]])
    r, a, _ = rasterize(
        means,
        quats,
        scales,
        torch.tensor(opacities),
        colors,
        viewmats,
        Ks,
        32,
        32,
        render_mode="RGB+MD",
        backend=backend,
    )
    # isotropic Gaussians peak on a pixel's ray t (dx, dy, 1) at t = z / (1 + dx^2 + dy^2), here
    # dx = dy = +-0.5 px / 50 px
    assert r[0, 15:17, 15:17, 3].flatten().tolist() == pytest.approx([median / (1 + 2 * 0.01**2)] * 4, rel=1e-6)
    rgb, a_rgb, _ = rasterize(
        means, quats, scales, torch.tensor(opacities), colors, viewmats, Ks, 32, 32, backend=backend
    )
    torch.testing.assert_close(r[..., :3], rgb)
    torch.testing.assert_close(a, a_rgb)
    only, _, _ = rasterize(
        means, quats, scales, torch.tensor(opacities), colors, viewmats, Ks, 32, 32, render_mode="MD", backend=backend
    )
    torch.testing.assert_close(only[..., 0], r[..., 3])
    assert not only.requires_grad


def test_depth_test_rejects_nan():
    from splatforge.raster._cpu_project import _depth_ok

    assert _depth_ok(1.0, 0.01, 1e10) and not _depth_ok(0.001, 0.01, 1e10) and not _depth_ok(2e10, 0.01, 1e10)
    assert not _depth_ok(float("nan"), 0.01, 1e10)
    assert not _depth_ok(float("inf"), 0.01, 1e10)


def test_nan_depth_is_culled_like_the_reference():
    """A Gaussian whose camera depth is NaN (a NaN mean) is culled by both backends: radius 0,
    nothing drawn, no NaN in the image; the others render as before. The CPU kernel used to test
    ``z < near or z > far``, which NaN passes."""
    s = random_scene(seed=4, n=60, n_cameras=1, width=40, height=30)
    means = s.means.clone()
    means[7, 2] = float("nan")
    out = {}
    for backend in ("cpu", "reference"):
        img, alpha, info = rasterize(
            means, s.quats, s.scales, s.opacities, s.colors, s.viewmats, s.Ks, 40, 30, backend=backend
        )
        assert torch.isfinite(img).all() and torch.isfinite(alpha).all(), backend
        assert (info["radii"][0, 7] == 0).all(), backend
        out[backend] = img
    torch.testing.assert_close(out["cpu"], out["reference"], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"rasterize_mode": "mip"}, "rasterize_mode must be one of"),
        ({"near_plane": 2.0, "far_plane": 1.0}, "near_plane"),
        ({"means": torch.zeros(4, 3, dtype=torch.float64)}, "cpu backend needs float32"),
        ({"Ks": torch.zeros(2, 3, 3)}, r"Ks must have shape \[1, 3, 3\]"),
    ],
)
def test_transmittance_stats_checks_its_arguments_as_rasterize(change, message):
    from splatforge.raster import transmittance_stats

    args = {
        "means": torch.zeros(4, 3),
        "quats": torch.zeros(4, 4),
        "scales": torch.ones(4, 3),
        "opacities": torch.ones(4),
        "viewmats": torch.eye(4)[None],
        "Ks": torch.eye(3)[None],
        "width": 8,
        "height": 8,
    }
    args.update(change)
    with pytest.raises(ConfigError, match=message):
        transmittance_stats(**args, backend="cpu")
