"""Training: a real short run, exact resume, opacity reset, the hard cap, run-folder outputs."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from scenes import datasets_dir, needs_skull

REPO_DATA = datasets_dir() / "skull"  # only named by configs that are resolved, never read
from splatforge.demo import build_demo_scene
from splatforge.io import read_ply
from splatforge.products import evaluate
from splatforge.train import DensifyConfig, Run, TrainConfig, Trainer
from splatforge.train.checkpoint import latest_checkpoint, load_checkpoint


@pytest.fixture(scope="module")
def demo_scene(tmp_path_factory):
    return build_demo_scene(tmp_path_factory.mktemp("demo") / "scene", n_views=12, width=64, height=48)


def small_cfg(scene, out, **kw) -> TrainConfig:
    base = {
        "data": scene,
        "output": out,
        "steps": 30,
        "sh_degree": 1,
        "sh_degree_interval": 10,
        "init_random_count": 1500,
        "init_extent": 0.5,
        "checkpoint_every": 0,
        "strategy": "default",
        "densify": DensifyConfig(refine_start_iter=5, refine_stop_iter=25, refine_every=5, reset_every=10**6),
    }
    base.update(kw)
    return TrainConfig(**base)


@pytest.fixture(scope="module")
def skull_400(tmp_path_factory):
    """400 steps on skull images_8 with the library's defaults (MCMC, schedules for 400 steps),
    trained once for the tests of this module that need a real model: ``(trainer, result)``."""
    cfg = TrainConfig(
        data=datasets_dir() / "skull",
        output=tmp_path_factory.mktemp("skull") / "run",
        data_factor=8,
        steps=400,
        checkpoint_every=100,
    )
    trainer = Trainer(cfg)
    return trainer, trainer.train()


@needs_skull
def test_skull_short_training_beats_floor(skull_400):
    """400 steps on the real skull photos (images_8): held-out PSNR well above the ~12 dB of
    the initialisation, and every promised output in the run folder. (400, not 300: at 300 steps
    SSIM lands within 0.01 of the floor, 0.59 to 0.605, for any of the refine schedules tried.)"""
    trainer, result = skull_400
    cfg = trainer.cfg
    metrics = evaluate(trainer.as_run())
    assert metrics["test"]["num_views"] == 9 and metrics["train"]["num_views"] == 57
    assert metrics["test"]["psnr"] > 20.0, metrics["test"]["psnr"]
    assert metrics["test"]["ssim"] > 0.6
    run = cfg.output
    assert json.loads((run / "metrics.json").read_text())["test"]["psnr"] == pytest.approx(metrics["test"]["psnr"])
    assert yaml.safe_load((run / "cfg.yml").read_text())["steps"] == 400
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [f"ckpt_{s:06d}.pt" for s in (100, 200, 300, 400)]
    splats = read_ply(result.ply_path)
    assert splats["means"].shape[0] == result.num_gaussians and splats["shN"].shape[1] == 15
    cams = json.loads((run / "cameras.json").read_text())
    assert len(cams) == 66 and set(cams[0]) == {"id", "img_name", "width", "height", "position", "rotation", "fx", "fy"}
    assert len(list((run / "test" / "ours_400" / "renders").iterdir())) == 9


def test_resume_equals_uninterrupted_run(demo_scene, tmp_path):
    global_rng = torch.get_rng_state()
    straight = Trainer(small_cfg(demo_scene, tmp_path / "a"))
    straight.train()
    assert torch.equal(torch.get_rng_state(), global_rng)  # library code leaves the global RNG alone

    cfg_b = small_cfg(demo_scene, tmp_path / "b")
    first = Trainer(cfg_b)
    for _ in range(13):  # interrupted mid-densification
        first.train_step()
    first.save()
    del first
    resumed = Trainer(cfg_b)
    assert resumed.resume() and resumed.step == 13
    resumed.train()
    assert len(straight.params["means"]) == len(resumed.params["means"])
    for key in straight.params:
        assert torch.equal(straight.params[key], resumed.params[key]), key
    ckpt = load_checkpoint(latest_checkpoint(tmp_path / "b" / "checkpoints"))
    assert ckpt["version"] == 1 and ckpt["step"] == 30
    again = Trainer(small_cfg(demo_scene, tmp_path / "c"))  # an in-memory round trip, no file
    again.load_state_dict(straight.state_dict())
    assert again.step == 30 and all(torch.equal(again.params[k], straight.params[k]) for k in straight.params)


def test_opacity_reset_happens(demo_scene, tmp_path):
    """gsplat 1.5.3's DefaultStrategy never resets opacities by itself; the trainer does."""
    cfg = small_cfg(
        demo_scene, tmp_path, densify=DensifyConfig(refine_start_iter=1000, refine_stop_iter=100, reset_every=7)
    )
    trainer = Trainer(cfg)
    for _ in range(7):
        trainer.train_step()
    assert torch.sigmoid(trainer.params["opacities"]).max() > 0.05  # learnt, not yet reset
    trainer.train_step()  # step 7: reset after the optimiser step
    assert torch.sigmoid(trainer.params["opacities"]).max() <= 2 * cfg.densify.prune_opa + 1e-6
    exp_avg = trainer.optimizers["opacities"].state[trainer.params["opacities"]]["exp_avg"]
    assert torch.count_nonzero(exp_avg) == 0  # Adam moments of the reset parameter cleared


def test_hard_cap_keeps_most_opaque_and_optimizer_aligned(demo_scene, tmp_path):
    cfg = small_cfg(demo_scene, tmp_path, max_gaussians=800)
    trainer = Trainer(cfg)
    before = trainer.params["opacities"].detach().clone()
    trainer.train_step()
    assert len(trainer.params["means"]) == 800
    for key, opt in trainer.optimizers.items():
        param = opt.param_groups[0]["params"][0]
        assert param is trainer.params[key]
        assert opt.state[param]["exp_avg"].shape == param.shape
    # the survivors are (after one small Adam step) the initially most opaque
    assert (
        torch.sigmoid(trainer.params["opacities"]).min()
        >= torch.sigmoid(torch.sort(before, descending=True).values[799]) - 0.05
    )
    trainer.train()
    assert len(trainer.params["means"]) <= 800


def test_output_must_not_be_input(demo_scene):
    from splatforge.errors import ConfigError

    with pytest.raises(ConfigError, match="must not be the input"):
        Trainer(small_cfg(demo_scene, demo_scene))


def test_split_ratio_training(demo_scene, tmp_path):
    trainer = Trainer(small_cfg(demo_scene, tmp_path, split_ratio=0.5, steps=5))
    assert len(trainer.scene.split["train"]) == 6 and len(trainer.scene.split["test"]) == 6
    trainer.train()
    assert np.isfinite(trainer.params["means"].detach().numpy()).all()


class _Payload:
    """Stands for code a pickle would run: weights_only loading must refuse it."""

    def __reduce__(self):
        return (print, ("this ran while loading a checkpoint",))


def test_checkpoints_load_plain_data_only(tmp_path):
    from splatforge.errors import DataFormatError

    ok = tmp_path / "ok" / "ckpt_000001.pt"
    ok.parent.mkdir()
    torch.save({"version": 1, "step": 1, "params": {"means": torch.zeros(2, 3)}, "config": {"steps": 1}}, ok)
    assert load_checkpoint(ok)["params"]["means"].shape == (2, 3)
    bad = tmp_path / "ckpt_000002.pt"
    torch.save({"version": 1, "step": 2, "payload": _Payload()}, bad)
    with pytest.raises(DataFormatError, match="ckpt_000002.pt"):
        load_checkpoint(bad)


def test_run_opens_a_finished_run_without_a_trainer(demo_scene, tmp_path):
    """Run.open reads cfg.yml and the newest checkpoint's parameters (no optimizer, strategy or
    initialisation), renders a view exactly as the trainer did, and any camera; without
    checkpoints it reads the newest PLY."""
    import shutil

    from splatforge.train import Run

    trainer = Trainer(small_cfg(demo_scene, tmp_path / "run", steps=12))
    trainer.train()
    run = Run.open(tmp_path / "run")
    assert run.step == 12 and run.num_gaussians == len(trainer.params["means"]) and run.source.name == "ckpt_000012.pt"
    for key in run.splats.keys():  # noqa: SIM118 (Splats is no dict)
        assert torch.equal(run.splats[key], trainer.params[key].detach()), key
    with torch.no_grad():
        want, _, _ = trainer.render(3)
    got, _, _ = run.render(3)
    assert torch.equal(got, want)
    vm, K = run.cameras()
    w, h = run.image_size(3)
    any_cam, _, _ = run.render(viewmats=vm[3].numpy(), Ks=K[3].numpy(), width=w, height=h)
    assert torch.equal(any_cam, want)
    shutil.rmtree(tmp_path / "run" / "checkpoints")
    from_ply = Run.open(tmp_path / "run")
    assert from_ply.source.name == "point_cloud.ply" and from_ply.step == 12
    torch.testing.assert_close(from_ply.render(3)[0], want)


def test_rgba_scene_trains_on_random_backgrounds_and_renders_on_its_own(demo_scene, tmp_path):
    """The demo's images are RGBA (Blender-style): by default training draws a random background
    per step and composites the ground truth on the same colour (checked against PIL's own
    pixels), renders for evaluation are drawn on the white the images are composited on, and
    opaque scenes keep a black background and no random one."""
    from PIL import Image

    from splatforge.train import Run

    trainer = Trainer(small_cfg(demo_scene, tmp_path / "run", steps=2))
    assert trainer.scene.alpha_background == (1.0, 1.0, 1.0) and trainer.random_background
    assert not Trainer(small_cfg(demo_scene, tmp_path / "off", random_background=False)).random_background
    rgba = np.asarray(Image.open(trainer.scene.image_paths[4]).convert("RGBA"), np.float64) / 255.0
    assert (rgba[..., 3] == 0).mean() > 0.3 and (rgba[..., 3] == 1).mean() > 0.2  # transparent around the torus
    bg = torch.tensor([[0.2, 0.9, 0.4]])
    want = rgba[..., :3] * rgba[..., 3:] + bg.numpy()[0] * (1 - rgba[..., 3:])
    np.testing.assert_allclose(trainer.ground_truth([4], bg)[0].numpy(), want, atol=2e-6)
    np.testing.assert_allclose(trainer.image(4).numpy(), rgba[..., :3] * rgba[..., 3:] + (1 - rgba[..., 3:]), atol=2e-6)
    trainer.train()
    run = Run.open(tmp_path / "run")
    away = np.linalg.inv(run.camtoworlds()[4] @ np.diag([-1.0, 1.0, -1.0, 1.0]))  # turned round: nothing in view
    empty, alpha, _ = run.render(viewmats=away, Ks=run.cameras()[1][4].numpy(), width=64, height=48)
    assert alpha.max() < 1e-3 and torch.allclose(empty, torch.ones_like(empty), atol=1e-3)
    scene = trainer.scene
    opaque = tmp_path / "opaque"
    (opaque / "images").mkdir(parents=True)
    for p in scene.image_paths:
        Image.open(p).convert("RGB").save(opaque / "images" / p.name)
    (opaque / "transforms.json").write_text((demo_scene / "transforms.json").read_text())
    plain = Trainer(small_cfg(opaque, tmp_path / "plain", steps=2))
    assert plain.scene.alpha_background is None and not plain.random_background
    assert plain.render(4, backgrounds=None)[0].shape[-1] == 3 and plain.ground_truth([4], bg).equal(
        plain.image(4)[None]
    )


def test_world_unit_is_resolved_into_cfg_yml_and_older_configs_keep_the_scene_units(demo_scene, tmp_path):
    """The run measures MCMC's noise and scale regulariser in the scene's gsplat-normalised unit and
    says so in cfg.yml; a cfg.yml written before the field reads 1.0 (how that run was trained)."""
    from splatforge.train import load_config

    trainer = Trainer(small_cfg(demo_scene, tmp_path / "run", steps=2, strategy="mcmc"))
    unit = trainer.scene.world_unit()
    assert unit > 0 and unit != 1.0  # the demo's cameras are not at distance 1
    assert trainer.cfg.world_unit == unit and trainer.strategy.world_unit == unit
    trainer.train()
    raw = yaml.safe_load((tmp_path / "run" / "cfg.yml").read_text())
    assert raw["world_unit"] == pytest.approx(unit, rel=1e-12)
    assert load_config(tmp_path / "run" / "cfg.yml").world_unit == pytest.approx(unit, rel=1e-12)
    assert Run.open(tmp_path / "run").near_plane == pytest.approx(0.01 * unit) == pytest.approx(trainer.near_plane)
    del raw["world_unit"]
    (tmp_path / "old.yml").write_text(yaml.safe_dump(raw))
    assert load_config(tmp_path / "old.yml").world_unit == 1.0


@pytest.mark.parametrize("k", [8.0, 1e-3])
def test_mcmc_training_does_not_depend_on_the_scale_of_the_world(demo_scene, tmp_path, k):
    """The same scene with every length times k (camera centres, points; SfM's scale is
    arbitrary) trains to the same Gaussians, k times larger, and renders the same images: the
    means' learning rate follows the scene scale, MCMC's noise and scale regulariser, the pose
    corrections' translations and the near plane follow ``world_unit``. (With both runs at
    ``world_unit=1`` the noise grows as the cube of the scale, and the means of the x8 scene end
    scene-sized distances away; with the near plane at 0.01 world units, the x0.001 scene, whose
    cameras stand 0.0035 from the torus, renders nothing.)"""
    import dataclasses

    from splatforge.data import load_scene
    from splatforge.train import MCMCConfig

    scene = load_scene(demo_scene)
    c2w = scene.camtoworlds.copy()
    c2w[:, :3, 3] *= k
    runs = []
    large_scene = dataclasses.replace(scene, camtoworlds=c2w, points=scene.points * k)
    for name, data in (("unit", scene), ("large", large_scene)):
        cfg = small_cfg(
            demo_scene,
            tmp_path / name,
            steps=60,
            strategy="mcmc",
            pose_opt=True,
            pose_opt_lr=1e-3,
            mcmc=MCMCConfig(cap_max=2000, refine_start_iter=10, refine_stop_iter=50, refine_every=10),
        )
        trainer = Trainer(cfg, scene=data)
        for _ in range(cfg.steps):
            trainer.train_step()
        runs.append(trainer)
    small, large = runs
    assert large.cfg.world_unit == pytest.approx(k * small.cfg.world_unit, rel=1e-9)
    assert len(small.params["means"]) == len(large.params["means"]) > 1500  # relocated and grown alike
    big, ref = large.params, small.params
    torch.testing.assert_close(big["means"].detach() / k, ref["means"].detach(), atol=1e-3 * small.scene_scale, rtol=0)
    torch.testing.assert_close(big["scales"].detach() - math.log(k), ref["scales"].detach(), atol=1e-2, rtol=0)
    torch.testing.assert_close(big["opacities"].detach(), ref["opacities"].detach(), atol=1e-2, rtol=0)
    moved = small.refined_camtoworlds()[:, :3, 3] - small.scene.camtoworlds[:, :3, 3]
    assert np.abs(moved).max() > 1e-3 * small.scene_scale  # the poses were refined
    np.testing.assert_allclose(
        large.refined_camtoworlds()[:, :3, 3] / k,
        small.refined_camtoworlds()[:, :3, 3],
        rtol=0,
        atol=1e-3 * small.scene_scale,
    )
    with torch.no_grad():
        image, alpha, _ = small.render(3)
        assert alpha.mean() > 0.1  # the torus is in view
        diff = (large.render(3)[0] - image).abs()
        assert diff.mean() < 1e-4 and diff.max() < 1e-2, (diff.mean(), diff.max())  # Gaussians agree to 1e-3


def test_schedules_scale_with_steps_unless_given():
    from splatforge.train.config import MIN_REFINE_EVERY

    cfg = TrainConfig(data=REPO_DATA, steps=3000, strategy="default").resolve()
    d = cfg.densify
    assert (d.refine_start_iter, d.refine_stop_iter, d.refine_every, d.reset_every) == (50, 1500, MIN_REFINE_EVERY, 300)
    m = cfg.mcmc
    assert cfg.sh_degree_interval == 100 and (m.refine_start_iter, m.refine_stop_iter, m.refine_every) == (
        500,
        2500,
        100,
    )
    short = TrainConfig(data=REPO_DATA, steps=300).resolve().mcmc  # too short for MCMC's paces: 20 refinements
    assert (short.refine_start_iter, short.refine_stop_iter, short.refine_every) == (50, 250, MIN_REFINE_EVERY)
    full = TrainConfig(data=REPO_DATA, steps=30_000).resolve()
    assert (full.mcmc.refine_start_iter, full.mcmc.refine_stop_iter, full.mcmc.refine_every) == (500, 25_000, 100)
    assert (full.densify.reset_every, full.sh_degree_interval) == (3000, 1000)
    given = TrainConfig(data=REPO_DATA, steps=3000, densify=DensifyConfig(refine_stop_iter=2900)).resolve()
    assert given.densify.refine_stop_iter == 2900 and given.densify.refine_start_iter == 50


@pytest.mark.gpu
def test_resume_on_cuda_puts_strategy_state_on_the_device(demo_scene, tmp_path):
    for strategy in ("default", "mcmc"):
        cfg = small_cfg(demo_scene, tmp_path / strategy, device="cuda", backend="auto", strategy=strategy)
        first = Trainer(cfg)
        for _ in range(8):
            first.train_step()
        first.save()
        resumed = Trainer(cfg)
        assert resumed.resume()
        tensors = [v for v in resumed.strategy_state.values() if isinstance(v, torch.Tensor)]
        assert tensors and all(t.device.type == "cuda" for t in tensors), strategy
        resumed.train_step()  # would fail mixing devices


def test_plan_predicts_mcmc_growth_and_run_takes_sfm_features_from_the_preset(demo_scene, tmp_path):
    """The estimate's count schedule is MCMC's growth exactly (5 % per refinement up to the cap):
    its final count equals the trained run's; the plan line names the count and a duration. `run`
    takes SfM's features from the preset for the device unless given."""
    from splatforge.pipeline.run import RunConfig, prepare_config
    from splatforge.train.presets import count_schedule, describe_plan, estimate_seconds

    cfg = small_cfg(demo_scene, tmp_path / "run", steps=60, strategy="mcmc", init_random_count=400)
    cfg.mcmc.refine_start_iter, cfg.mcmc.refine_stop_iter, cfg.mcmc.refine_every, cfg.mcmc.cap_max = 5, 50, 5, 520
    trainer = Trainer(cfg)
    schedule = count_schedule(trainer)
    estimate = estimate_seconds(trainer, repeats=1)
    assert [n for _, n in schedule] == [400, 420, 441, 463, 486, 510, 520]
    assert estimate["final_count"] == 520 and 0 < estimate["s_per_step_now"] <= estimate["s_per_step_end"]
    assert "from 400 Gaussians, up to 520 Gaussians: about" in describe_plan(trainer, estimate)
    trainer.train()
    assert len(trainer.params["means"]) == 520
    features = {
        p: prepare_config(RunConfig(inputs=[demo_scene], output=tmp_path / p, preset=p, device="cpu")).max_features
        for p in ("auto", "fast", "default")
    }
    assert features == {"auto": 2048, "fast": 2048, "default": 4096}
    given = RunConfig(inputs=[demo_scene], output=tmp_path / "x", max_features=1000, device="cpu")
    assert prepare_config(given).max_features == 1000


def test_batch_gradient_is_the_mean_of_its_views(demo_scene, tmp_path):
    """A batch of two views rendered together has the gradient of the mean of the two views'
    losses (L1 and SSIM are means over pixels, the regulariser counted once), to float32
    rounding; gsplat's learning-rate rules for the batch size; the densification statistics count
    both views of a step."""
    t = Trainer(small_cfg(demo_scene, tmp_path / "run", batch_size=2, random_background=False))
    i, j = t.train_ids[0], t.train_ids[3]

    def grads(views):
        for p in t.params.values():
            p.grad = None
        loss, *_ = t.batch_loss(views, 0)
        loss.backward()
        return {k: p.grad.clone() for k, p in t.params.items()}

    g_ij, g_i, g_j = grads([i, j]), grads([i]), grads([j])
    for k in g_ij:
        want = (g_i[k] + g_j[k]) / 2
        assert (g_ij[k] - want).abs().max() <= 1e-4 * want.abs().max() + 1e-9, k
    opt = t.optimizers["opacities"].param_groups[0]
    assert opt["lr"] == pytest.approx(5e-2 * 2**0.5) and opt["eps"] == pytest.approx(1e-15 / 2**0.5)
    assert opt["betas"] == pytest.approx((0.8, 0.998))
    t4 = Trainer(small_cfg(demo_scene, tmp_path / "run4", batch_size=4))
    assert t4.optimizers["sh0"].param_groups[0]["betas"] == pytest.approx((0.6, 0.996))
    t.train_step()
    assert int(t.strategy_state["count"].max()) == 2  # one count per view that saw the Gaussian


def test_antialiased_mode_is_kept_by_the_run_and_its_files(demo_scene, tmp_path):
    """A run trained with rasterize_mode=antialiased renders, evaluates and exports with it: its
    cfg.yml holds the mode, Run.open renders exactly the antialiased image (not the classic
    one), the PLY's header records it (read by plyfile, an independent reader, which also reads
    the Gaussians), an exported PLY keeps it and an exported .spz sets its anti-aliasing flag."""
    import gzip

    from plyfile import PlyData

    from splatforge.io.ply import ply_rasterize_mode
    from splatforge.io.spz import FLAG_ANTIALIASED
    from splatforge.products.export import export
    from splatforge.train import Run

    trainer = Trainer(small_cfg(demo_scene, tmp_path / "run", steps=10, rasterize_mode="antialiased"))
    result = trainer.train()
    assert yaml.safe_load((tmp_path / "run" / "cfg.yml").read_text())["rasterize_mode"] == "antialiased"
    run = Run.open(tmp_path / "run")
    img, _, _ = run.render(0)
    vm, K = run.cameras()
    w, h = run.image_size(0)
    bg = run.backgrounds(1)  # the demo's RGBA images: drawn on white
    want, _, _ = run.splats.rasterize(vm[:1], K[:1], w, h, backgrounds=bg, rasterize_mode="antialiased")
    classic, _, _ = run.splats.rasterize(vm[:1], K[:1], w, h, backgrounds=bg, rasterize_mode="classic")
    assert torch.equal(img, want) and (img - classic).abs().max() > 1e-3
    ply = PlyData.read(str(result.ply_path))
    assert "splatforge rasterize_mode antialiased" in ply.comments
    assert np.allclose(ply["vertex"]["x"], read_ply(result.ply_path).means[:, 0])
    assert ply_rasterize_mode(result.ply_path) == "antialiased"
    export(run, tmp_path / "out.ply")
    assert ply_rasterize_mode(tmp_path / "out.ply") == "antialiased"
    export(tmp_path / "run", tmp_path / "out.spz")
    flags = gzip.decompress((tmp_path / "out.spz").read_bytes())[14]  # v3 header: magic, version, n, sh, frac, flags
    assert flags & FLAG_ANTIALIASED
    plain = Trainer(small_cfg(demo_scene, tmp_path / "plain", steps=2)).train()
    assert ply_rasterize_mode(plain.ply_path) == "classic"


def _masked_copy(scene, tmp_path):
    """A copy of the demo scene with masks/: the left third of every image ignored (black)."""
    import shutil

    from PIL import Image

    from splatforge.data import load_scene

    root = tmp_path / "masked_scene"
    shutil.copytree(scene, root)
    sd = load_scene(root)
    (root / "masks").mkdir()
    for name, w, h in zip(sd.image_names, sd.widths, sd.heights):
        m = np.full((int(h), int(w)), 255, np.uint8)
        m[:, : int(w) // 3] = 0
        Image.fromarray(m).save(root / "masks" / f"{Path(name).stem}.png")
    return root


def test_masked_pixels_change_no_gradient(demo_scene, tmp_path):
    """With SCENE/masks, changing the captured image inside the masked region (a passer-by)
    leaves the loss and every parameter's gradient exactly as they were, and so does changing
    the render there; a change outside the mask does change them."""
    from splatforge.errors import DataFormatError

    root = _masked_copy(demo_scene, tmp_path)
    trainer = Trainer(small_cfg(root, tmp_path / "run", random_background=False))
    assert trainer.scene.mask_paths is not None and trainer.mask(0)[:, :5].sum() == 0

    def grads(edit=None):
        trainer.image(0)
        saved = trainer.views._images[0].clone()
        if edit is not None:
            edit(trainer.views._images[0])
        for p in trainer.params.values():
            p.grad = None
        loss, _, _, _ = trainer.batch_loss([0], 0)
        loss.backward()
        trainer.views._images[0] = saved
        return float(loss.detach()), {k: p.grad.clone() for k, p in trainer.params.items()}

    base_loss, base = grads()
    w = trainer.mask(0).shape[1]

    def inside(img):
        img[:, : w // 3] = torch.rand(img[:, : w // 3].shape, generator=torch.Generator().manual_seed(1))

    def outside(img):
        img[:, w // 2 :] = 1.0 - img[:, w // 2 :]

    loss_in, moved_in = grads(inside)
    assert loss_in == base_loss and all(torch.equal(moved_in[k], base[k]) for k in base)
    loss_out, moved_out = grads(outside)
    assert loss_out != base_loss and any(not torch.equal(moved_out[k], base[k]) for k in base)
    # metrics.json reports both, and says which is which
    trainer.train()
    metrics = evaluate(trainer.as_run(), splits=("test",), write_images=False)
    assert metrics["masks"].startswith("SCENE/masks") and metrics["test"]["psnr_masked"] is not None
    # a masks folder missing one image's mask is an error naming it
    first = min((root / "masks").iterdir())
    first.unlink()
    with pytest.raises(DataFormatError, match="no mask for 1 of"):
        Trainer(small_cfg(root, tmp_path / "run2"))


def test_masks_stay_aligned_when_downscaled(tmp_path):
    """A full-size mask read for an image 8 times smaller keeps its edge where the image's is."""
    from PIL import Image

    from splatforge.data.images import load_mask

    m = np.zeros((480, 640), np.uint8)
    m[:, 320:] = 255  # right half kept
    m[:120] = 0  # top quarter ignored
    Image.fromarray(m).save(tmp_path / "m.png")
    small = load_mask(tmp_path / "m.png", 80, 60)
    assert small.shape == (60, 80)
    assert small[15:, 40:].all() and not small[:, :40].any() and not small[:15].any()
    assert load_mask(tmp_path / "m.png", 80, 60, invert=True)[15:, :40].all()


def test_exposure_compensation_absorbs_per_image_gains(demo_scene, tmp_path):
    """Training images scaled by per-image gains in [0.7, 1.3]: with --exposure the views'
    affines take the gains (their diagonals correlate with them and spread at least 0.4 times
    as much), the test-time fit recovers a known affine exactly, a resumed run continues the
    affines, and metrics.json states Inria's left/right protocol. (The issue's PSNR criterion
    is tested on skull, below: this 300-step demo is too short to show it.)"""
    import shutil

    from PIL import Image

    from splatforge.data import load_scene
    from splatforge.train.exposure import EXPOSURE_PROTOCOL, apply_exposure, fit_affine

    E0 = torch.tensor([[0.8, 0.1, 0.0, 0.05], [0.0, 1.2, 0.0, -0.02], [0.05, 0.0, 0.9, 0.01]])
    x = torch.rand(20, 30, 3, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(fit_affine(x, apply_exposure(x[None], E0[None])[0], ridge=0.0), E0, atol=1e-5)

    scaled = tmp_path / "scaled"
    shutil.copytree(demo_scene, scaled)
    sd = load_scene(scaled)
    gains = np.random.default_rng(0).uniform(0.7, 1.3, len(sd))
    for i, path in enumerate(sd.image_paths):  # opaque images on black, the training ones scaled
        rgba = np.asarray(Image.open(path).convert("RGBA"), np.float32)
        img = rgba[..., :3] * rgba[..., 3:] / 255.0 * (gains[i] if i in sd.split["train"] else 1.0)
        Image.fromarray(np.clip(img + 0.5, 0, 255).astype(np.uint8)).save(path)
    # a short run renders each view ~30 times: 10x Inria's rates (its 0.01 -> 0.001 are for 30k steps)
    cfg = small_cfg(
        scaled,
        tmp_path / "on",
        steps=300,
        strategy="mcmc",
        random_background=False,
        exposure=True,
        exposure_lr_init=0.1,
        exposure_lr_final=0.01,
        checkpoint_every=150,
    )
    trainer = Trainer(cfg)
    trainer.train()
    ids = trainer.scene.split["train"]
    diag = trainer.exposure.E.detach()[ids, :, :3].diagonal(dim1=1, dim2=2).mean(1).numpy()
    g = gains[ids]
    assert np.corrcoef(diag, g)[0, 1] > 0.9
    # the affines' spread over the gains' (0 if they never moved, 1 if they took all of it): 300
    # steps give about half, 0.52 and 0.48 with MCMC's noise in the scene's units and in gsplat's
    assert np.std(diag / diag.mean()) > 0.4 * np.std(g / g.mean())
    untouched = trainer.exposure.E.detach()[trainer.scene.split["test"]]
    assert torch.equal(
        untouched, torch.cat([torch.eye(3), torch.zeros(3, 1)], 1).expand_as(untouched)
    )  # never rendered
    metrics = evaluate(trainer.as_run(), splits=("test", "train"), write_images=False)
    assert metrics["exposure"] == EXPOSURE_PROTOCOL
    resumed = Trainer(cfg)
    resumed.load_state_dict(load_checkpoint(tmp_path / "on" / "checkpoints" / "ckpt_000150.pt"))
    assert not torch.equal(resumed.exposure.E, trainer.exposure.E) and resumed.step == 150
    resumed.train()
    assert torch.equal(resumed.exposure.E, trainer.exposure.E)  # exact resume includes the affines


@pytest.mark.slow
@needs_skull
def test_exposure_compensation_recovers_the_unscaled_quality_on_skull(tmp_path):
    """The issue's criterion on real photos: skull images_8 whose training images are scaled by
    per-image gains in [0.7, 1.3] trains (500 steps, --exposure) no worse than 0.3 dB under the
    unscaled scene trained the same way, and measurably worse (0.3 dB or more) with the
    compensation off; all three scored alike, by Inria's left/right protocol (measured: 23.21,
    23.22 and 22.66 dB; with the backward's rounding of 2026-12-03 23.37 and 23.07: one run
    lands up to ~0.3 dB either side of another, so only falling short is a failure; at 3,000
    steps with Inria's rates 27.07 against 26.19 off)."""
    import shutil

    from PIL import Image

    from splatforge.data import load_scene
    from splatforge.products import render_split

    scaled = tmp_path / "scaled"
    shutil.copytree(REPO_DATA / "sparse", scaled / "sparse")
    shutil.copytree(REPO_DATA / "images_8", scaled / "images_8")
    sd = load_scene(scaled, data_factor=8)
    gains = np.random.default_rng(0).uniform(0.7, 1.3, len(sd))
    for i in sd.split["train"]:
        img = np.asarray(Image.open(sd.image_paths[i]).convert("RGB"), np.float32) * gains[i]
        Image.fromarray(np.clip(img + 0.5, 0, 255).astype(np.uint8)).save(sd.image_paths[i])
    # ~9 renders per view in 500 steps: 5x Inria's rates (0.01 -> 0.001, for 30k steps)
    rates = {"exposure_lr_init": 0.05, "exposure_lr_final": 0.005}

    def score(data, name, **kw) -> float:
        trainer = Trainer(
            TrainConfig(
                data=data, output=tmp_path / name, data_factor=8, steps=500, device="cpu", checkpoint_every=0, **kw
            )
        )
        trainer.train()
        return render_split(trainer.as_run(), "test", write=False, left_right=True)["psnr"]

    unscaled = score(REPO_DATA, "unscaled", exposure=True, **rates)
    on = score(scaled, "on", exposure=True, **rates)
    off = score(scaled, "off")
    assert on > unscaled - 0.3, (on, unscaled)  # recovers the unscaled quality (above it is no defect)
    assert off < on - 0.3, (off, on)


def test_absgrad_has_its_own_default_threshold(tmp_path):
    """--densify.absgrad raises grow_grad2d's default to gsplat's 8e-4 (absolute gradients are
    larger); a value given explicitly is kept; without absgrad the default is 2e-4."""
    from splatforge.train.strategies import build_strategy

    resolve = lambda **d: TrainConfig(data=REPO_DATA, strategy="default", densify=DensifyConfig(**d)).resolve()
    assert resolve().densify.grow_grad2d == 2e-4
    cfg = resolve(absgrad=True)
    assert cfg.densify.grow_grad2d == 8e-4
    strategy = build_strategy(cfg)
    assert strategy.absgrad and strategy.grow_grad2d == 8e-4
    assert resolve(absgrad=True, grow_grad2d=5e-4).densify.grow_grad2d == 5e-4


def _rotation(axis, degrees: float) -> torch.Tensor:
    a = torch.tensor(axis, dtype=torch.float64)
    a = a / a.norm()
    K = torch.tensor([[0, -a[2], a[1]], [a[2], 0, -a[0]], [-a[1], a[0], 0]], dtype=torch.float64)
    t = math.radians(degrees)
    return torch.eye(3, dtype=torch.float64) + math.sin(t) * K + (1 - math.cos(t)) * (K @ K)


@pytest.mark.slow
@needs_skull
def test_pose_alignment_recovers_a_perturbed_pose(demo_scene, skull_400, tmp_path):
    """Skull images_8 trained 400 steps; one view's pose perturbed by 1 degree and 2 % of the
    scene scale: the alignment (pose corrections through the cpu backend's viewmats gradient,
    Gaussians fixed, 1,000 steps) brings it back to within a tenth of both (the demo torus is
    no test of this: its symmetry leaves poses ambiguous). Pose refinement during training
    (--pose-opt) writes the refined poses to cameras.json and resumes them exactly."""
    trainer = skull_400[0]
    view = trainer.train_ids[5]
    true = torch.from_numpy(trainer.scene.camtoworlds[view]).double()
    P = torch.eye(4, dtype=torch.float64)
    P[:3, :3] = _rotation((0.3, 1.0, 0.2), 1.0)
    shift = torch.tensor([1.0, -0.5, 0.3], dtype=torch.float64)
    P[:3, 3] = 0.02 * trainer.scene_scale * shift / shift.norm()
    wrong = true @ P
    fixed = trainer.as_run().align_views([view], wrong[None].float(), steps=1000, lr=5e-3)[0].double()

    def errors(c2w):
        d = torch.linalg.inv(true) @ c2w
        angle = math.degrees(math.acos(max(-1.0, min(1.0, (float(torch.trace(d[:3, :3])) - 1) / 2))))
        return angle, float((c2w[:3, 3] - true[:3, 3]).norm()) / trainer.scene_scale

    a0, t0 = errors(wrong)
    a1, t1 = errors(fixed)
    assert abs(a0 - 1.0) < 1e-6 and abs(t0 - 0.02) < 0.005
    assert a1 < 0.1 and t1 < 0.002, (a1, t1)

    cfg = small_cfg(
        demo_scene,
        tmp_path / "opt",
        steps=20,
        pose_opt=True,
        pose_opt_lr=1e-3,
        checkpoint_every=10,
        pose_align_steps=20,
    )  # the alignment at evaluation: short here, the skull view above tests its accuracy
    opt = Trainer(cfg)
    opt.train()
    assert opt.poses.deltas.detach()[opt.train_ids].abs().max() > 0  # the corrections moved
    cams = json.loads((tmp_path / "opt" / "cameras.json").read_text())
    i = opt.train_ids[0]
    entry = next(c for c in cams if c["img_name"] == Path(opt.scene.image_names[i]).stem or c.get("id") == i)
    assert np.allclose(np.asarray(entry["position"]), opt.refined_camtoworlds()[i][:3, 3], atol=1e-5)
    again = Trainer(cfg)
    again.load_state_dict(load_checkpoint(tmp_path / "opt" / "checkpoints" / "ckpt_000010.pt"))
    again.train()
    assert torch.equal(again.poses.deltas, opt.poses.deltas)
    _check_refined_poses_reach_products(opt, tmp_path / "opt")


def _check_refined_poses_reach_products(trainer, run_dir):
    """A --pose-opt run: the COLMAP model beside it (read by pycolmap) holds the refined poses;
    Run.open draws the training views from them; evaluation aligns the test views and says so."""
    import pycolmap

    from splatforge.products import render_depth_split
    from splatforge.train.poses import POSE_ALIGN_PROTOCOL

    refined = trainer.refined_camtoworlds()
    rec = pycolmap.Reconstruction(str(run_dir / "sparse" / "0"))
    assert rec.num_images() == len(trainer.scene)
    for i, name in enumerate(trainer.scene.image_names):
        w2c = np.asarray(rec.find_image_with_name(name).cam_from_world().matrix())
        assert np.allclose(w2c, np.linalg.inv(refined[i])[:3], atol=1e-9), name
    run = Run.open(run_dir)
    assert np.allclose(run.camtoworlds(), refined, atol=1e-6)
    assert np.allclose(run.viewmats(), np.linalg.inv(refined), atol=1e-6)  # what the mesh integrates with
    moved = trainer.train_ids[0]
    assert not np.allclose(refined[moved], trainer.scene.camtoworlds[moved], atol=1e-6)
    img_run = run.render(moved)[0]
    with torch.no_grad():
        vm = torch.linalg.inv(trainer.poses.refine(trainer.camtoworlds[[moved]], [moved]))
        img_trainer = trainer.as_run().splats.rasterize(
            vm,
            trainer.Ks[moved : moved + 1],
            *run.image_size(moved),
            sh_degree=trainer.cfg.sh_degree,
            backgrounds=run.backgrounds(1),
        )[0]
    assert torch.allclose(img_run, img_trainer, atol=1e-4)
    metrics = evaluate(run, splits=("test",), write_images=False)
    cfg = trainer.cfg
    assert metrics["test_poses"] == POSE_ALIGN_PROTOCOL.format(steps=cfg.pose_align_steps, lr=cfg.pose_align_lr)
    assert all(v["pose_alignment"]["rotation_deg"] >= 0 for v in metrics["test"]["per_view"])
    test = trainer.scene.split["test"]
    assert not np.allclose(run.camtoworlds()[test], trainer.scene.camtoworlds[test])  # drawn from the aligned poses
    fresh = Run.open(run_dir)
    render_depth_split(fresh, "test", png_preview=False)  # depth of test views: from the aligned poses too
    assert np.allclose(fresh.camtoworlds()[test], run.camtoworlds()[test])
