"""Depth priors (Inria's layout, Depth Anything through transformers) and depth regularisation."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest
import torch
from scenes import datasets_dir, needs_skull

from splatforge.cli import main as cli_main
from splatforge.data.depth import (
    PNG_SCALE,
    DepthFit,
    fit_depth_scale,
    read_inverse_depth,
    reliable_views,
    sfm_inverse_depths,
    write_inverse_depth_png,
)

SKULL = datasets_dir() / "skull"


def test_fit_recovers_an_exact_affine_map():
    """A relative map that is exactly (inv - b) / a of the SfM inverse depth: the median/deviation
    fit gives back scale a and offset b; with 10 points, or a flat SfM depth, no fit."""
    rng = np.random.default_rng(0)
    H, W = 60, 80
    yy, xx = np.mgrid[0:H, 0:W] + 0.5
    inv_true = 0.2 + 0.003 * xx + 0.001 * yy  # a plane's inverse depth is affine in the pixel
    a, b = 2.5, 0.07
    mono = (inv_true - b) / a
    xy = rng.uniform([0.5, 0.5], [W - 0.5, H - 0.5], size=(200, 2))
    inv_sfm = 0.2 + 0.003 * xy[:, 0] + 0.001 * xy[:, 1]
    fit = fit_depth_scale(mono, xy, inv_sfm)
    assert fit.scale == pytest.approx(a, rel=1e-4) and fit.offset == pytest.approx(b, abs=1e-5)
    assert fit.num_points == 200
    assert fit_depth_scale(mono, xy[:10], inv_sfm[:10]) == DepthFit(0.0, 0.0, 10)
    assert fit_depth_scale(mono, xy, np.full(200, 0.3)).scale == 0.0


def test_png_is_inria_16_bit_inverse_depth(tmp_path):
    """The map reads back, as Inria's loader reads it (cv2 IMREAD_UNCHANGED / 2**16), to what
    the writer returns; the maximum is 65535; 8-bit and .npy maps read too."""
    inv = np.linspace(0.1, 3.0, 48 * 32).reshape(32, 48)
    stored = write_inverse_depth_png(tmp_path / "a.png", inv)
    raw = cv2.imread(str(tmp_path / "a.png"), cv2.IMREAD_UNCHANGED)
    assert raw.dtype == np.uint16 and raw.shape == (32, 48) and raw.max() == PNG_SCALE - 1
    np.testing.assert_array_equal(raw.astype(np.float32) / 2**16, stored)
    np.testing.assert_allclose(stored, inv / 3.0, atol=1e-4)
    cv2.imwrite(str(tmp_path / "b.png"), (raw // 256).astype(np.uint8))
    np.testing.assert_allclose(read_inverse_depth(tmp_path / "b.png"), stored, atol=1 / 256)
    np.save(tmp_path / "c.npy", inv.astype(np.float32))
    np.testing.assert_array_equal(read_inverse_depth(tmp_path / "c.npy"), inv.astype(np.float32))
    assert not list(tmp_path.glob(".*tmp*"))


def test_reliability_follows_inria_and_missing_keys_are_unreliable():
    fits = {"a": DepthFit(1.0, 0, 50), "b": DepthFit(1.2, 0, 50), "c": DepthFit(0.1, 0, 50), "d": DepthFit(0.0, 0, 5)}
    # median positive scale 1.0: c (0.1 < 0.2) and d (no fit) are out; e has no entry
    assert reliable_views(["a", "b", "c", "d", "e"], fits) == [True, True, False, False, False]


@needs_skull
def test_sfm_depths_are_colmaps_tracks():
    """The SfM inverse depths of a view come from the points COLMAP says it observes, read here
    independently with pycolmap: same count, 1/z from COLMAP's own pose."""
    import pycolmap

    from splatforge.data import load_scene

    scene = load_scene(SKULL, data_factor=8)
    rec = pycolmap.Reconstruction(str(SKULL / "sparse" / "0"))
    im = next(i for i in rec.images.values() if i.name == scene.image_names[3])
    obs = [p for p in im.points2D if p.has_point3D()]
    z = np.array([(im.cam_from_world() * rec.points3D[p.point3D_id].xyz)[2] for p in obs])
    _xy, inv = sfm_inverse_depths(scene, 3)
    assert len(inv) == int((z > 0).sum()) > 100
    np.testing.assert_allclose(np.sort(inv), np.sort(1.0 / z[z > 0]), rtol=1e-5)


def test_multiview_filter_keeps_consistent_depth_and_drops_a_wrong_patch():
    """Four cameras side by side (baselines 0.5 and 1 world units, f = 100 px, each its own
    principal point) facing a plane 5 units away, depth maps exact except a patch of view 0 set
    20 % too far: the round trip of a wrong pixel lands f * b * (1/5 - 1/6) >= 1.7 px off in every
    neighbour, so exactly the patch is dropped; with no neighbour within 30 degrees of view
    direction, nothing is kept."""
    from splatforge.data.depth import depth_neighbours, multiview_depth_mask

    xs = [0.0, 0.5, 1.0, -0.5]
    c2ws = np.stack([np.eye(4) for _ in xs])
    c2ws[:, 0, 3] = xs
    Ks = np.array([[[100.0, 0, 32 + k], [0, 100.0, 24 - k], [0, 0, 1]] for k in range(4)])
    depths = {k: np.full((48, 64), 5.0) for k in range(4)}
    depths[0][10:20, 20:30] = 6.0
    keep = multiview_depth_mask(depths.get, c2ws, Ks, 0, threshold_px=1.0)
    assert not keep[10:20, 20:30].any()
    outside = np.ones_like(keep)
    outside[10:20, 20:30] = False
    # pixels that fall outside all but one neighbour (the image borders) are dropped
    assert keep[outside].mean() > 0.5 and keep[5:43, 25:40][outside[5:43, 25:40]].all()
    assert depth_neighbours(c2ws, 0) == [1, 3, 2]
    turned = c2ws.copy()
    turned[1:, :3, :3] = cv2.Rodrigues(np.array([0.0, np.radians(40), 0.0]))[0]
    assert depth_neighbours(turned, 0) == [] and not multiview_depth_mask(depths.get, turned, Ks, 0).any()


def _tiny_depth_anything(folder):
    """A randomly initialised Depth Anything (DINOv2 backbone, DPT head) with its processor,
    saved as a local model folder: the real transformers loading and inference path, no download."""
    from splatforge._torchvision import ensure_torchvision_importable

    ensure_torchvision_importable()
    from transformers import DepthAnythingConfig, DepthAnythingForDepthEstimation, Dinov2Config, DPTImageProcessor

    backbone = Dinov2Config(
        hidden_size=32,
        num_hidden_layers=4,
        num_attention_heads=2,
        intermediate_size=64,
        patch_size=14,
        image_size=518,
        out_features=["stage1", "stage2", "stage3", "stage4"],
        reshape_hidden_states=False,
    )
    cfg = DepthAnythingConfig(
        backbone_config=backbone,
        neck_hidden_sizes=[8, 16, 32, 32],
        fusion_hidden_size=16,
        head_hidden_size=8,
        reassemble_hidden_size=32,
        depth_estimation_type="relative",
    )
    torch.manual_seed(0)
    model = DepthAnythingForDepthEstimation(cfg)
    with torch.no_grad():
        model.head.conv3.bias.fill_(1.0)  # a positive output, so the map is not all zero
    model.save_pretrained(folder)
    DPTImageProcessor(
        do_resize=True,
        size={"height": 518, "width": 518},
        keep_aspect_ratio=True,
        ensure_multiple_of=14,
        resample=3,
        image_mean=[0.485, 0.456, 0.406],
        image_std=[0.229, 0.224, 0.225],
    ).save_pretrained(folder)
    return folder


@needs_skull
def test_depth_prior_command_with_a_local_model(tmp_path, capsys):
    """`splatforge depth-prior` end to end with a local model: one 16-bit map per image at the
    image's size, depth_params.json keyed by stem, each fit equal to the fit recomputed here from
    the PNG as Inria reads it; the scene folder is not touched."""
    pytest.importorskip("transformers")
    from splatforge.data import load_scene

    model = _tiny_depth_anything(tmp_path / "tiny")
    before = sorted(p.name for p in SKULL.iterdir())
    out = tmp_path / "priors"
    assert (
        cli_main(
            [
                "depth-prior",
                str(SKULL),
                "--data-factor",
                "8",
                "--output",
                str(out),
                "--model",
                str(model),
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    assert sorted(p.name for p in SKULL.iterdir()) == before
    scene = load_scene(SKULL, data_factor=8, test_every=0)
    params = json.loads((out / "depth_params.json").read_text())
    assert sorted(params) == sorted(n.rsplit(".", 1)[0] for n in scene.image_names)
    for i in (0, 20, 50):
        stem = scene.image_names[i].rsplit(".", 1)[0]
        raw = cv2.imread(str(out / f"{stem}.png"), cv2.IMREAD_UNCHANGED)
        assert raw.dtype == np.uint16 and raw.shape == (scene.heights[i], scene.widths[i])
        xy, inv = sfm_inverse_depths(scene, i)
        fit = fit_depth_scale(raw.astype(np.float32) / 2**16, xy, inv)
        assert params[stem]["scale"] == pytest.approx(fit.scale) and params[stem]["offset"] == pytest.approx(fit.offset)
    assert json.loads(capsys.readouterr().out)["images"] == len(scene)


@needs_skull
def test_missing_model_offline_is_one_clear_error(tmp_path, monkeypatch, capsys):
    """Offline without the weights: exit 1, one line naming the model id and how to fetch it,
    nothing written."""
    pytest.importorskip("transformers")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "priors"
    code = cli_main(
        [
            "depth-prior",
            str(SKULL),
            "--data-factor",
            "8",
            "--output",
            str(out),
            "--model",
            "depth-anything/not-a-cached-model",
        ]
    )
    err = capsys.readouterr().err
    assert code == 1
    assert "depth-anything/not-a-cached-model" in err and "huggingface-cli download" in err
    assert not out.exists() and not list(tmp_path.iterdir())


@needs_skull
def test_depth_term_is_inrias_formula(tmp_path):
    """With a prior folder (no depth_params.json: fitted into the run), the first step's loss is
    the colour loss plus w0 * mean|ID - (s * map + t)|, computed here from the same view's render;
    the prior folder is not written to."""
    from splatforge.data import load_scene
    from splatforge.train import Trainer
    from splatforge.train.config import TrainConfig

    scene = load_scene(SKULL, data_factor=8)
    prior = tmp_path / "prior"
    prior.mkdir()
    g = np.random.default_rng(1)
    for name, w, h in zip(scene.image_names, scene.widths, scene.heights):
        # smooth maps at half resolution (resized to the view when training)
        yy, xx = np.mgrid[0 : h // 2, 0 : w // 2]
        write_inverse_depth_png(prior / f"{name.rsplit('.', 1)[0]}.png", 1.0 + 0.01 * xx + g.uniform(0, 0.5) * yy / h)
    listing = sorted(p.name for p in prior.iterdir())

    def first_step(depth_prior):
        cfg = TrainConfig(
            data=SKULL,
            output=tmp_path / f"run-{depth_prior is not None}",
            data_factor=8,
            steps=50,
            depth_prior=depth_prior,
            depth_weight_init=3.0,
            depth_filter_px=0.0,
            checkpoint_every=0,
        )
        t = Trainer(cfg)
        state = t.generator.get_state()
        index = t.train_ids[int(torch.randint(len(t.train_ids), (1,), generator=t.generator))]
        t.generator.set_state(state)
        with torch.no_grad():
            inv = t.render(index, t.sh_degree_at(0), render_mode="ID")[0][0, ..., 0]
        loss, _ = t.train_step()
        return t, index, inv, float(loss)

    t, index, inv, loss_depth = first_step(str(prior))
    _, _, _, loss_plain = first_step(None)
    fit = t.depth.fits[scene.image_names[index].rsplit(".", 1)[0]]
    assert fit.scale > 0
    mono = read_inverse_depth(prior / f"{scene.image_names[index].rsplit('.', 1)[0]}.png")
    mono = cv2.resize(mono, (int(scene.widths[index]), int(scene.heights[index])), interpolation=cv2.INTER_LINEAR)
    expected = 3.0 * float((inv - torch.from_numpy(fit.scale * mono + fit.offset).float()).abs().mean())
    assert expected > 1e-3
    assert loss_depth - loss_plain == pytest.approx(expected, rel=1e-3)
    assert (tmp_path / "run-True" / "depth_params.json").is_file()
    assert sorted(p.name for p in prior.iterdir()) == listing
    # with the multi-view filter on, the mask is the filter's over the training views' aligned priors
    from splatforge.data.depth import multiview_depth_mask
    from splatforge.train.depth import DepthSupervision

    sup = DepthSupervision(
        str(prior),
        scene,
        tmp_path / "run-True",
        steps=50,
        weight_init=1.0,
        weight_final=0.01,
        model="unused",
        device=torch.device("cpu"),
        filter_px=5.0,
    )
    train = set(scene.split["train"])
    depth_of = {i: 1.0 / sup.aligned(i) for i in train if sup.reliable[i]}.get
    want = multiview_depth_mask(depth_of, scene.camtoworlds, scene.Ks, index, 5.0)
    _, mask = sup.target(index)
    np.testing.assert_array_equal(mask.numpy() > 0, want)
    assert 0 < want.mean() < 1


@needs_skull
@pytest.mark.slow
def test_sfm_depth_prior_brings_rendered_depth_to_the_points(tmp_path):
    """200 steps with and without --depth-prior sfm, same seed: with it, the rendered inverse depth
    of the training views is closer to COLMAP's points (the median over views of each view's
    median relative error: a single faint floater just in front of one camera, which the sparse
    term's 1/z gradient can leave there, would dominate a mean)."""
    from splatforge.train import Trainer
    from splatforge.train.config import TrainConfig

    errors = {}
    for prior in (None, "sfm"):
        cfg = TrainConfig(
            data=SKULL, output=tmp_path / str(prior), data_factor=8, steps=200, depth_prior=prior, checkpoint_every=0
        )
        t = Trainer(cfg)
        with t.compute_threads():
            for _ in range(cfg.steps):
                t.train_step()
        errs = []
        for i in t.train_ids[::4]:
            with torch.no_grad():
                r = t.render(i, render_mode="ID")[0][0, ..., 0].numpy()
            xy, inv = sfm_inverse_depths(t.scene, i)
            px = np.minimum(np.floor(xy).astype(int), [r.shape[1] - 1, r.shape[0] - 1])
            errs.append(np.median(np.abs(r[px[:, 1], px[:, 0]] - inv) / inv))
        errors[prior] = float(np.median(errs))
    assert errors["sfm"] < 0.8 * errors[None], errors


@needs_skull
def test_generate_job_with_depth_prior_and_mesh_stages(tmp_path):
    """A generate job with the depth_prior and mesh stages: the priors are made into the job's
    folder and training is supervised with them (cfg.yml says so), the mesh is written; a rerun
    skips every stage."""
    pytest.importorskip("transformers")
    pytest.importorskip("open3d")
    import yaml

    from splatforge.pipeline.job import JobSpec, run_job

    model = _tiny_depth_anything(tmp_path / "tiny")
    spec = JobSpec(
        scene="skull",
        scene_root=str(SKULL),
        output_dir=str(tmp_path / "out"),
        ratio=0.8,
        data_factor=8,
        stages=["depth_prior", "train", "mesh"],
        steps=60,
        cap_max=30_000,
        extra={"depth_model": str(model)},
    )
    result = run_job(spec)
    assert result["status"] == "done", result
    assert result["stages"] == {"postprocess": "done", "depth_prior": "done", "train": "done", "mesh": "done"}
    out = spec.out
    assert (
        len(list((out / "depth_prior").glob("*.png"))) == 66 and (out / "depth_prior" / "depth_params.json").is_file()
    )
    assert yaml.safe_load((out / "cfg.yml").read_text())["depth_prior"] == str(out / "depth_prior")
    assert (out / "exports" / "mesh.ply").stat().st_size > 1000
    again = run_job(spec)
    assert set(again["stages"].values()) == {"skipped"}, again
