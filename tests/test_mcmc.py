"""MCMC densification on CPU: the relocation formula and the strategy inside the trainer."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from splatforge.train import MCMCConfig, TrainConfig, Trainer
from splatforge.train.mcmc import relocation


def relocation_loop(o: float, s: float, n: int) -> tuple[float, float]:
    """Eq. 9 of Kheradmand et al. 2024 written out with Python floats and math.comb."""
    new_o = 1.0 - (1.0 - o) ** (1.0 / n)
    denom = sum(
        math.comb(i - 1, k) * (-1) ** k * new_o ** (k + 1) / math.sqrt(k + 1) for i in range(1, n + 1) for k in range(i)
    )
    return new_o, o / denom * s


def binoms(n_max: int = 51) -> torch.Tensor:
    b = torch.zeros(n_max, n_max)
    for n in range(n_max):
        for k in range(n + 1):
            b[n, k] = math.comb(n, k)
    return b


def test_relocation_matches_the_formula():
    g = torch.Generator().manual_seed(0)
    o = torch.rand(200, generator=g) * 0.98 + 0.01
    s = torch.rand(200, 3, generator=g) + 0.1
    n = torch.randint(1, 40, (200,), generator=g)
    new_o, new_s = relocation(o, s, n, binoms())
    for i in range(200):
        want_o, want_s = relocation_loop(float(o[i]), float(s[i, 0]), int(n[i]))
        assert new_o[i].item() == pytest.approx(want_o, rel=1e-5)
        assert new_s[i, 0].item() == pytest.approx(want_s, rel=1e-4)


def test_relocation_of_one_copy_is_identity():
    o = torch.tensor([0.05, 0.5, 0.95])
    s = torch.rand(3, 3)
    new_o, new_s = relocation(o, s, torch.ones(3, dtype=torch.long), binoms())
    torch.testing.assert_close(new_o, o)
    torch.testing.assert_close(new_s, s)


def test_mcmc_strategy_trains_on_cpu(tmp_path):
    from splatforge.demo import build_demo_scene

    scene = build_demo_scene(tmp_path / "scene", n_views=8, width=48, height=40)
    cfg = TrainConfig(
        data=scene,
        output=tmp_path / "run",
        steps=40,
        sh_degree=1,
        init_random_count=1000,
        init_extent=0.5,
        init_opacity=0.5,
        strategy="mcmc",
        checkpoint_every=0,
        max_gaussians=1100,
        mcmc=MCMCConfig(refine_start_iter=5, refine_every=5, refine_stop_iter=35),
    )
    trainer = Trainer(cfg)
    means0 = trainer.params["means"].detach().clone()
    counts = []
    for _ in range(cfg.steps):
        trainer.train_step()
        counts.append(len(trainer.params["means"]))
    assert (
        counts[-1] == 1100 and max(counts) <= 1100 and counts[9] == 1000 and counts[10] == 1050
    )  # +5 % per refine, to the cap
    for key, opt in trainer.optimizers.items():
        assert opt.state[opt.param_groups[0]["params"][0]]["exp_avg"].shape == trainer.params[key].shape
    assert not torch.equal(trainer.params["means"][:1000].detach(), means0)
    assert torch.isfinite(trainer.params["means"]).all()


def test_cap_below_the_initial_count_with_mcmc(tmp_path):
    """A cap under the initial count trims the Gaussians at the first step, leaving MCMC's own
    state (its binomial table) alone; the count then stays at the cap."""
    from splatforge.demo import build_demo_scene

    scene = build_demo_scene(tmp_path / "scene", n_views=6, width=40, height=32)
    cfg = TrainConfig(
        data=scene,
        output=tmp_path / "run",
        steps=25,
        sh_degree=0,
        init_random_count=900,
        init_extent=0.5,
        strategy="mcmc",
        checkpoint_every=0,
        max_gaussians=600,
        device="cpu",
        mcmc=MCMCConfig(refine_start_iter=5, refine_every=5, refine_stop_iter=20),
    )
    trainer = Trainer(cfg)
    binoms = trainer.strategy_state["binoms"].clone()
    for _ in range(cfg.steps):
        trainer.train_step()
        assert len(trainer.params["means"]) == 600
    assert torch.equal(trainer.strategy_state["binoms"], binoms)


def test_compiled_noise_matches_the_torch_path():
    """MCMC's position noise: the compiled CPU kernel and gsplat's torch formula (covariance
    times gated normal draws) give the same means from the same draws."""
    from splatforge.train.mcmc import inject_noise

    g = torch.Generator().manual_seed(0)
    n = 5000
    base = {
        "means": torch.randn(n, 3, generator=g),
        "quats": torch.randn(n, 4, generator=g),
        "scales": torch.randn(n, 3, generator=g) * 0.5 - 2.5,
        "opacities": torch.randn(n, generator=g) * 3 - 4,
    }
    a, b = ({k: v.clone() for k, v in base.items()} for _ in range(2))
    torch.manual_seed(3)
    inject_noise(a, 5.0)
    torch.manual_seed(3)
    inject_noise(b, 5.0, compiled=False)
    moved = (b["means"] - base["means"]).abs().max()
    assert moved > 0.05  # transparent Gaussians do move
    torch.testing.assert_close(a["means"], b["means"], atol=1e-6 * float(moved) + 1e-7, rtol=1e-5)


def _orbit_scene(k: float = 1.0):
    """Nine cameras looking at the origin: eight on a circle of radius 2 (z = 0) and one at distance
    5 on the +z axis, world scaled by ``k``; no images (only the geometry is read)."""
    import numpy as np

    from splatforge.data.scene import SceneData
    from splatforge.geometry.cameras import look_at

    eyes = [(2 * math.cos(a), 2 * math.sin(a), 0.0) for a in np.arange(8) * math.pi / 4] + [(0.0, 0.0, 5.0)]
    c2w = [look_at(np.multiply(eye, k), (0.0, 0.0, 0.0), (0.3, 0.4, 0.866)) for eye in eyes]
    n = len(c2w)
    names = [f"{i}.png" for i in range(n)]
    return SceneData(
        root=Path("."),
        source="test",
        image_names=names,
        image_paths=[Path(m) for m in names],
        camtoworlds=np.stack(c2w),
        Ks=np.tile(np.eye(3), (n, 1, 1)),
        widths=np.full(n, 8),
        heights=np.full(n, 8),
        points=np.zeros((0, 3), np.float32),
        points_rgb=np.zeros((0, 3), np.uint8),
    )


def test_world_unit_is_gsplats_normalisation_length():
    """Every optical axis passes through the origin, so the focus is the origin and the unit is
    the median camera distance: 2 (eight cameras), not the far one's 5 nor the mean 2.33; it
    scales with the world."""
    assert _orbit_scene().world_unit() == pytest.approx(2.0, rel=1e-12)
    assert _orbit_scene(0.37).world_unit() == pytest.approx(0.74, rel=1e-12)


def test_mcmc_noise_and_scale_regulariser_are_gsplats_in_its_normalised_world():
    """The same Gaussians in a world k times larger (means and scales times k, the means' learning
    rate times k as the trainer scales it by the scene scale, ``world_unit`` times k) move k times
    as far under MCMC's noise and have the same regulariser: what gsplat computes after
    normalising the world. Without ``world_unit`` the noise would move them k^3 times as far."""
    from splatforge.train.mcmc import MCMCStrategy

    k, n, lr = 6.0, 4000, 1e-3
    g = torch.Generator().manual_seed(0)
    small = {
        "means": torch.randn(n, 3, generator=g),
        "quats": torch.randn(n, 4, generator=g),
        "scales": torch.randn(n, 3, generator=g) * 0.5 - 2.5,
        "opacities": torch.randn(n, generator=g) * 3 - 4,
        "sh0": torch.zeros(n, 1, 3),
        "shN": torch.zeros(n, 0, 3),
    }
    large = dict(small, means=small["means"] * k, scales=small["scales"] + math.log(k))
    moved = []
    regs = []
    for params, unit, rate in ((small, 1.0, lr), (large, k, lr * k)):
        params = {key: torch.nn.Parameter(v.clone()) for key, v in params.items()}
        before = params["means"].detach().clone()
        strategy = MCMCStrategy(
            cap_max=n, refine_start_iter=100, refine_stop_iter=200, refine_every=10, world_unit=unit
        )
        regs.append(float(strategy.regularization(params).detach()))
        torch.manual_seed(5)  # step 0 is outside the refine window: noise only
        strategy.step_post_backward(params, {}, strategy.initialize_state(), step=0, info={}, lr=rate)
        moved.append(params["means"].detach() - before)
    assert moved[0].abs().max() > 1e-3  # transparent Gaussians do move
    torch.testing.assert_close(moved[1], moved[0] * k, rtol=1e-4, atol=1e-6 * k)
    assert regs[1] == pytest.approx(regs[0], rel=1e-6)


def test_mcmc_says_so_when_every_gaussian_is_dead():
    """Gaussians no view sees fade below ``min_opacity`` (the opacity regulariser): at the next
    refinement there is nothing to relocate them onto. A TrainingError names the step; gsplat's
    relocation fails there in ``torch.multinomial`` ("invalid multinomial distribution"). One live
    Gaussian is enough to go on: the dead ones are moved onto it."""
    from splatforge.errors import TrainingError
    from splatforge.train.mcmc import MCMCStrategy

    n = 50
    params = {
        "means": torch.randn(n, 3),
        "quats": torch.tensor([[1.0, 0, 0, 0]]).repeat(n, 1),
        "scales": torch.full((n, 3), -3.0),
        "opacities": torch.full((n,), -8.0),
        "sh0": torch.randn(n, 1, 3),
        "shN": torch.zeros(n, 0, 3),
    }
    params = {k: torch.nn.Parameter(v) for k, v in params.items()}
    optimizers = {k: torch.optim.Adam([p], lr=1e-3) for k, p in params.items()}
    strategy = MCMCStrategy(cap_max=n, refine_start_iter=5, refine_stop_iter=100, refine_every=10)
    state = strategy.initialize_state()
    with pytest.raises(TrainingError, match="step 10: all 50 Gaussians"):
        strategy.step_post_backward(params, optimizers, state, step=10, info={}, lr=1e-4)
    with torch.no_grad():
        params["opacities"][7] = 2.0
    strategy.step_post_backward(params, optimizers, state, step=10, info={}, lr=1e-4)
    assert torch.equal(params["sh0"].detach(), params["sh0"].detach()[7:8].expand(n, 1, 3))
    assert bool((torch.sigmoid(params["opacities"]) > strategy.min_opacity).all())
