"""The compiled ``cpu`` backend against the pure-torch ``reference`` (autograd) backend.

Forward images, alphas, radii and the info tensors must match, and so must the gradients
w.r.t. means, quats, scales, opacities and colours/SH, means2d (``.grad``) and its ``.absgrad``,
for a fixed random cotangent on both outputs.
"""

from __future__ import annotations

import pytest
import torch
from scenes import Scene, garden_subset, look_at, needs_datasets, random_scene

from splatforge.raster import rasterize

PARAM_NAMES = ("means", "quats", "scales", "opacities", "colors")


def run(scene: Scene, backend: str, **kw):
    """Render, backprop a seeded random cotangent, return outputs and gradients."""
    params = scene.params()
    render, alpha, info = rasterize(*params, scene.viewmats, scene.Ks, scene.width, scene.height, backend=backend, **kw)
    info["means2d"].retain_grad()
    g = torch.Generator().manual_seed(7)
    w_r = torch.randn(render.shape, generator=g, dtype=render.dtype)
    w_a = torch.randn(alpha.shape, generator=g, dtype=alpha.dtype)
    ((render * w_r).sum() + (alpha * w_a).sum()).backward()
    grads = {name: p.grad for name, p in zip(PARAM_NAMES, params)}
    grads["means2d"] = info["means2d"].grad
    if kw.get("absgrad"):
        grads["absgrad"] = info["means2d"].absgrad
    return render.detach(), alpha.detach(), info, grads


def assert_grad_close(name: str, got, want, rel: float = 2e-3) -> None:
    """Entrywise ``|got - want| <= rel * max|want| + 1e-6`` (gradients span many magnitudes)."""
    if want is None:
        assert got is None or torch.count_nonzero(got) == 0, name
        return
    assert got is not None, f"{name}: cpu backend produced no gradient"
    scale = want.abs().max().item()
    err = (got - want).abs().max().item()
    assert err <= rel * scale + 1e-6, f"{name}: max error {err:.3g} vs max magnitude {scale:.3g}"


def assert_images_close(got, want, atol: float, flip_frac: float = 2e-4, flip_atol: float = 1.2e-2) -> None:
    """All pixels within ``atol`` except at most ``flip_frac`` of them, which may differ by up to
    ``flip_atol``: a contribution with alpha right at the 1/255 cut-off (or T right at 1e-4) can
    be kept in float32 and skipped in float64. One such flip moves a pixel by ~1/255."""
    err = (got - want).abs()
    bad = err > atol + 1e-4 * want.abs()
    assert bad.float().mean().item() <= flip_frac, (
        f"{int(bad.sum())} of {bad.numel()} values differ (max {err.max():.3g})"
    )
    assert err.max().item() <= flip_atol, f"max difference {err.max():.3g}"


def compare(scene: Scene, img_atol: float = 2e-4, rel: float = 2e-3, **kw) -> dict:
    r_cpu, a_cpu, info_cpu, g_cpu = run(scene, "cpu", **kw)
    r_ref, a_ref, info_ref, g_ref = run(scene, "reference", **kw)
    assert r_cpu.shape == r_ref.shape and a_cpu.shape == a_ref.shape
    torch.testing.assert_close(info_cpu["radii"], info_ref["radii"], rtol=0, atol=0)
    for key in ("means2d", "conics", "depths"):
        torch.testing.assert_close(info_cpu[key].detach(), info_ref[key].detach(), rtol=1e-4, atol=1e-4)
    assert_images_close(a_cpu, a_ref, img_atol)
    assert_images_close(r_cpu, r_ref, img_atol)
    for name in g_ref:
        assert_grad_close(name, g_cpu[name], g_ref[name], rel)
    return {"render": r_cpu, "alpha": a_cpu, "info": info_cpu, "grads": g_cpu}


@pytest.mark.parametrize("sh_degree", [None, 0, 1, 2, 3])
@pytest.mark.parametrize("rasterize_mode", ["classic", "antialiased"])
def test_parity_colors_and_sh(sh_degree, rasterize_mode):
    scene = random_scene(seed=10 + (sh_degree or 0), n_cameras=3, sh_degree=sh_degree)
    out = compare(scene, sh_degree=sh_degree, rasterize_mode=rasterize_mode, absgrad=True)
    # the scene must exercise something: visible Gaussians, culled ones, covered pixels
    radii = out["info"]["radii"]
    visible = (radii > 0).all(-1)
    assert visible.sum() > 50 and (~visible).sum() > 10
    assert out["alpha"].max() > 0.9


@pytest.mark.parametrize("render_mode", ["RGB", "D", "ED", "ID", "MD", "RGB+D", "RGB+ED", "RGB+ID", "RGB+MD"])
def test_parity_render_modes(render_mode):
    scene = random_scene(seed=3, n_cameras=2, sh_degree=2)
    out = compare(scene, sh_degree=2, render_mode=render_mode, rel=3e-3, img_atol=5e-4)
    channels = {"RGB": 3, "D": 1, "ED": 1, "ID": 1, "MD": 1, "RGB+D": 4, "RGB+ED": 4, "RGB+ID": 4, "RGB+MD": 4}[
        render_mode
    ]
    assert out["render"].shape == (2, scene.height, scene.width, channels)


def test_parity_backgrounds_and_per_camera_features():
    scene = random_scene(seed=5, n_cameras=2, channels=5)
    g = torch.Generator().manual_seed(0)
    scene.colors = torch.rand(2, scene.means.shape[0], 5, generator=g)  # [C, N, D]
    backgrounds = torch.rand(2, 5, generator=g)
    out = compare(scene, backgrounds=backgrounds)
    # where nothing covers a pixel, the background shows
    empty = out["alpha"][..., 0] < 1e-6
    assert empty.any()
    torch.testing.assert_close(out["render"][0][empty[0]], backgrounds[0].expand(int(empty[0].sum()), 5))


def test_parity_behind_camera_and_off_image():
    """Gaussians behind the camera, past the far plane or far off-image contribute nothing and
    get zero gradient; the visible ones still match."""
    scene = random_scene(seed=8, n=120, n_cameras=1)
    g = torch.Generator().manual_seed(1)
    behind = torch.randn(40, 3, generator=g) * 0.5 + torch.tensor([0.0, 0.0, -5.0])  # camera at z=-3.5 looks +z
    off_image = torch.randn(40, 3, generator=g) * 0.2 + torch.tensor([6.0, 0.0, 0.0])
    scene.means = torch.cat([scene.means, behind, off_image])
    scene.quats = torch.cat([scene.quats, torch.randn(80, 4, generator=g)])
    scene.scales = torch.cat([scene.scales, torch.rand(80, 3, generator=g) * 0.1 + 0.01])
    scene.opacities = torch.cat([scene.opacities, torch.rand(80, generator=g)])
    scene.colors = torch.cat([scene.colors, torch.rand(80, 3, generator=g)])
    out = compare(scene, far_plane=8.0)
    radii = out["info"]["radii"][0]
    assert (radii[120:] == 0).all()
    for name in ("means", "quats", "scales", "opacities", "colors"):
        assert torch.count_nonzero(out["grads"][name][120:]) == 0, name


def test_parity_tile_borders():
    """Gaussians centred exactly on tile corners and edges (multiples of 16 px)."""
    W, H, f = 64, 48, 50.0
    xs, ys = torch.meshgrid(torch.arange(0.0, 65.0, 8.0), torch.arange(0.0, 49.0, 8.0), indexing="xy")
    pix = torch.stack([xs.flatten(), ys.flatten()], -1)
    z = 3.0
    means = torch.cat([(pix - torch.tensor([W / 2, H / 2])) * z / f, torch.full((pix.shape[0], 1), z)], -1)
    n = means.shape[0]
    g = torch.Generator().manual_seed(2)
    scene = Scene(
        means.float(),
        torch.randn(n, 4, generator=g),
        torch.rand(n, 3, generator=g) * 0.4 + 0.05,
        torch.rand(n, generator=g) * 0.9 + 0.1,
        torch.rand(n, 3, generator=g),
        torch.eye(4)[None],
        torch.tensor([[[f, 0, W / 2], [0, f, H / 2], [0, 0, 1]]]),
        W,
        H,
    )
    out = compare(scene)
    assert (out["info"]["radii"] > 16).any()  # some span several tiles


@needs_datasets("garden/test_garden.npz")
def test_parity_garden_real_density():
    """Real garden centres (dense, wide depth range) at 1/4 resolution."""
    scene = garden_subset(6000, 0.25)
    scene.viewmats, scene.Ks = scene.viewmats[:2], scene.Ks[:2]
    compare(scene, rel=3e-3, img_atol=5e-4)


def test_empty_scene():
    scene = random_scene(seed=0, n=0, n_cameras=2)
    for backend in ("cpu", "reference"):
        params = scene.params()
        render, alpha, info = rasterize(*params, scene.viewmats, scene.Ks, scene.width, scene.height, backend=backend)
        assert render.shape == (2, scene.height, scene.width, 3)
        assert torch.count_nonzero(render) == 0 and torch.count_nonzero(alpha) == 0
        assert info["radii"].shape == (2, 0, 2)
        (render.sum() + alpha.sum()).backward()
        assert all(p.grad is not None and p.grad.shape == p.shape for p in params)


def test_nothing_visible_gives_background_and_zero_grads():
    scene = random_scene(seed=1, n=30, n_cameras=1)
    scene.viewmats = look_at((0.0, 0.0, 10.0), target=(0.0, 0.0, 20.0))[None].float()  # looking away
    bg = torch.tensor([[0.2, 0.4, 0.6]])
    for backend in ("cpu", "reference"):
        params = scene.params()
        render, alpha, _ = rasterize(
            *params, scene.viewmats, scene.Ks, scene.width, scene.height, backgrounds=bg, backend=backend
        )
        torch.testing.assert_close(render, bg.view(1, 1, 1, 3).expand_as(render))
        (render.sum() + alpha.sum()).backward()
        assert all(torch.count_nonzero(p.grad) == 0 for p in params), backend


def _viewmat_grad(scene: Scene, backend: str, **kw) -> torch.Tensor:
    viewmats = scene.viewmats.detach().clone().requires_grad_(True)
    render, alpha, _ = rasterize(
        *[p.detach() for p in scene.params()], viewmats, scene.Ks, scene.width, scene.height, backend=backend, **kw
    )
    g = torch.Generator().manual_seed(3)
    (
        (render * torch.randn(render.shape, generator=g, dtype=render.dtype)).sum()
        + (alpha * torch.randn(alpha.shape, generator=g, dtype=alpha.dtype)).sum()
    ).backward()
    return viewmats.grad


@pytest.mark.parametrize("sh_degree", [None, 0, 3])
@pytest.mark.parametrize("rasterize_mode", ["classic", "antialiased"])
@pytest.mark.parametrize("render_mode", ["RGB", "RGB+ED"])
def test_parity_viewmats_gradient(sh_degree, rasterize_mode, render_mode):
    """The cpu backend's gradient w.r.t. ``viewmats`` (projection, and the SH view directions
    through the camera centres, taken from the inverse as gsplat and the reference do, which
    also gives the bottom row a gradient) against the reference's autograd one."""
    scene = random_scene(seed=30 + (sh_degree or 0), n_cameras=3, sh_degree=sh_degree)
    kw = {"sh_degree": sh_degree, "rasterize_mode": rasterize_mode, "render_mode": render_mode}
    got, want = _viewmat_grad(scene, "cpu", **kw), _viewmat_grad(scene, "reference", **kw)
    assert want[:, :3].abs().max() > 1e-2  # the scene exercises it
    assert_grad_close("viewmats", got, want, rel=2e-3)


def test_reference_viewmats_gradient_gradcheck():
    """The reference's ``viewmats`` gradient (the oracle above) against finite differences in
    float64, on a few Gaussians seen by two cameras."""
    scene = random_scene(seed=5, n=12, n_cameras=2, width=24, height=18, sh_degree=2)
    params = [p.detach().double() for p in scene.params()]
    Ks = scene.Ks.double()

    def f(viewmats):
        render, alpha, _ = rasterize(*params, viewmats, Ks, 24, 18, sh_degree=2, backend="reference")
        return render.sum(dim=(1, 2)), alpha.sum()

    viewmats = scene.viewmats.double().clone().requires_grad_(True)
    assert torch.autograd.gradcheck(f, (viewmats,), eps=1e-6, atol=1e-5, rtol=1e-4)
