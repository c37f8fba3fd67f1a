"""Blocks: the plan on a constructed scene (counts, boxes, image membership by hand), and skull
as 2 blocks trained through the local pool and Ray, merged, against one model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from scenes import datasets_dir, needs_skull

from splatforge.data import SceneData
from splatforge.data.blocks import in_box, load_plan, plan_blocks, plane_coords, write_plan
from splatforge.errors import ConfigError, DataFormatError

SKULL = datasets_dir() / "skull"


def _ground_scene(tmp_path: Path) -> SceneData:
    """Points on the z = 0 ground (world +z up) spread unevenly along x, cameras 2 m above it
    looking straight down (OpenCV: +z forward = world -z, +y down = world -y), one far outside."""
    rng = np.random.default_rng(0)
    pts = np.concatenate(
        [rng.uniform([-10, -4, 0], [0, 4, 0.2], (3000, 3)), rng.uniform([0, -4, 0], [4, 4, 0.2], (1000, 3))]
    )
    centres = [(-8, 0, 2), (-2, 1, 2), (1, -1, 2), (3.5, 0, 2), (30, 0, 2)]
    c2w = []
    for c in centres:
        m = np.eye(4)
        m[:3, :3] = np.diag([1.0, -1.0, -1.0])  # x right = +x, y down = -y world, z forward = -z world
        m[:3, 3] = c
        c2w.append(m)
    K = np.array([[100.0, 0, 100], [0, 100.0, 100], [0, 0, 1]])
    n = len(centres)
    return SceneData(
        root=tmp_path,
        source="test",
        image_names=[f"{i}.png" for i in range(n)],
        image_paths=[tmp_path / f"{i}.png" for i in range(n)],
        camtoworlds=np.stack(c2w),
        Ks=np.stack([K] * n),
        widths=np.full(n, 200),
        heights=np.full(n, 200),
        points=pts.astype(np.float32),
        points_rgb=np.zeros((len(pts), 3), np.uint8),
    )


def test_plan_cuts_equal_counts_and_assigns_images(tmp_path):
    scene = _ground_scene(tmp_path)
    plan = plan_blocks(scene, (2, 1), margin=0.1, content_threshold=0.05)
    up = np.asarray(plan["axes"][2])
    assert abs(abs(up @ [0, 0, 1]) - 1) < 1e-9  # up from the cameras
    uv = plane_coords(scene.points, plan)
    boxes = [b["box"] for b in plan["blocks"]]
    member = np.stack([in_box(uv, b) for b in boxes])
    assert (member.sum(0) == 1).all()  # every point in exactly one block (outer edges unbounded)
    assert [b["num_points"] for b in plan["blocks"]] == [2000, 2000]  # quantile edges: equal counts
    # the first axis is the points' principal direction (world x): the cut splits them at the median x
    west = scene.points[:, 0] < np.median(scene.points[:, 0])
    agree = max((member[0] == west).mean(), (member[0] == ~west).mean())
    assert agree > 0.99
    for b in plan["blocks"]:
        assert in_box(uv, b["enlarged"]).sum() > b["num_points"]  # the margin adds points
    # camera at x = -8 sees only the x < -5 side; at x = 30 it sees no point and is in the
    # unbounded outer block's box; cameras near the cut are in both
    side = {b["id"]: set(b["images"]) for b in plan["blocks"]}
    neg = next(
        k for k, b in enumerate(plan["blocks"]) if in_box(plane_coords(np.array([[-8.0, 0, 0]]), plan), b["box"])[0]
    )
    pos = 1 - neg
    assert "0.png" in side[plan["blocks"][neg]["id"]] and "0.png" not in side[plan["blocks"][pos]["id"]]
    assert "4.png" in side[plan["blocks"][pos]["id"]] and "4.png" not in side[plan["blocks"][neg]["id"]]
    assert "3.png" in side[plan["blocks"][pos]["id"]]
    # a coarse model's coverage replaces the SfM points' share: here it says view 0 is all
    # covered by whatever it is asked about, so view 0 joins both blocks
    asked = []

    def coverage(k, inside):
        asked.append(inside(scene.points[:10].astype(np.float64)).dtype == bool)
        return 1.0 if k == 0 else 0.0

    coarse = plan_blocks(scene, (2, 1), coverage=coverage)
    assert all(asked) and coarse["membership"] == "coarse model render"
    assert all("0.png" in b["images"] for b in coarse["blocks"])
    path = write_plan(plan, tmp_path / "blocks.json")
    assert load_plan(path)["blocks"] == json.loads(json.dumps(plan["blocks"]))


def test_plan_rejects_bad_input(tmp_path):
    scene = _ground_scene(tmp_path)
    with pytest.raises(ConfigError, match="grid"):
        plan_blocks(scene, (0, 2))
    with pytest.raises(ConfigError, match="margin"):
        plan_blocks(scene, (2, 2), margin=-1)
    scene.points = scene.points[:0]
    with pytest.raises(DataFormatError, match="no SfM points"):
        plan_blocks(scene, (2, 2))
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(DataFormatError, match="blocks.json"):
        load_plan(tmp_path / "bad.json")


@pytest.mark.slow
@needs_skull
def test_skull_two_blocks_merge_close_to_one_model_local_and_ray(tmp_path):
    """Skull images_8 as 2 blocks of 250 steps through the local pool: the merged run's test
    PSNR is within 0.5 dB of one model trained as long as a block (250 steps) on the same split:
    merging loses nothing beyond the split of the steps (around an object every view sees both
    blocks, so a block is a whole model with its share of the steps; the issue's comparison with
    one model of the total steps, 2 x 1,500 against 3,000, is measured by bench/distributed.py:
    0.86 dB). The same jobs on Ray give byte-identical block PLYs and merged run. (On a fresh
    checkout the first local job compiles the kernels and the Ray jobs load them from numba's
    cache: this also checks that both give the same bits, see ``raster.constants.FASTMATH``.)"""
    from splatforge.data import load_scene
    from splatforge.pipeline.blocks import merge_blocks, train_blocks
    from splatforge.products import evaluate
    from splatforge.train import TrainConfig, Trainer

    scene = load_scene(SKULL, data_factor=8, cache_dir=tmp_path / "cache")
    plan = write_plan(plan_blocks(scene, (2, 1)), tmp_path / "blocks.json")
    results = train_blocks(plan, tmp_path / "local", executor="local", steps=250, data_factor=8)
    assert [r["status"] for r in results] == ["done", "done"], results
    merged = merge_blocks(plan, tmp_path / "local", tmp_path / "merged")
    assert merged["num_gaussians"] == sum(b["kept"] for b in merged["blocks"])
    assert all(0 < b["kept"] < b["trained"] for b in merged["blocks"])
    assert (tmp_path / "merged" / "metrics.json").is_file() and (tmp_path / "merged" / "cameras.json").is_file()
    trainer = Trainer(
        TrainConfig(
            data=SKULL,
            output=tmp_path / "one",
            data_factor=8,
            steps=250,
            split_ratio=0.875,
            device="cpu",
            checkpoint_every=0,
        )
    )
    trainer.train()
    one = evaluate(trainer.as_run(), splits=("test",), write_images=False)["test"]["psnr"]
    assert merged["metrics"]["test"]["psnr"] > one - 0.5, (merged["metrics"]["test"]["psnr"], one)
    # the single model as the coarse model of a plan: around an object every view sees both halves
    from splatforge.pipeline.blocks import coarse_coverage

    coarse = plan_blocks(scene, (2, 1), coverage=coarse_coverage(tmp_path / "one", scene))
    assert [len(b["images"]) for b in coarse["blocks"]] == [len(scene)] * 2

    pytest.importorskip("ray")
    results = train_blocks(plan, tmp_path / "ray", executor="ray", steps=250, data_factor=8)
    assert [r["status"] for r in results] == ["done", "done"], results
    again = merge_blocks(plan, tmp_path / "ray", tmp_path / "merged_ray")
    assert [b["trained"] for b in again["blocks"]] == [b["trained"] for b in merged["blocks"]]
    for local_ply in sorted((tmp_path / "local").glob("block_*/**/point_cloud.ply")):
        ray_ply = tmp_path / "ray" / local_ply.relative_to(tmp_path / "local")
        assert ray_ply.read_bytes() == local_ply.read_bytes(), local_ply.relative_to(tmp_path)
    assert Path(again["ply"]).read_bytes() == Path(merged["ply"]).read_bytes()
    assert again["metrics"]["test"]["psnr"] == merged["metrics"]["test"]["psnr"]


def test_blocks_commands_report_bad_input(tmp_path, capsys):
    """The CLI: a malformed --grid, a missing scene and a missing block run exit 1 with one
    ``error:`` line naming what is wrong; nothing is written."""
    from splatforge.cli import main

    assert main(["blocks", "plan", str(SKULL), "--grid", "2", "--output", str(tmp_path / "b.json")]) == 1
    assert "--grid must look like 2x2" in capsys.readouterr().err
    assert main(["blocks", "plan", str(tmp_path / "nowhere"), "--output", str(tmp_path / "b.json")]) == 1
    assert str(tmp_path / "nowhere") in capsys.readouterr().err
    assert not (tmp_path / "b.json").exists()
    scene = _ground_scene(tmp_path)
    write_plan(plan_blocks(scene, (2, 1)), tmp_path / "blocks.json")
    assert (
        main(
            [
                "blocks",
                "merge",
                str(tmp_path / "blocks.json"),
                "--blocks",
                str(tmp_path / "none"),
                "--output",
                str(tmp_path / "merged"),
            ]
        )
        == 1
    )
    err = capsys.readouterr().err
    assert "block 0_0: no trained run" in err and "blocks train" in err
    assert not (tmp_path / "merged").exists()


@needs_skull
def test_a_failing_block_is_reported_alone_and_a_rerun_skips_finished_blocks(tmp_path, capsys):
    """A block without training views fails alone (its error line in the results, the CLI
    exits 1 naming it); the other block's run is complete, and a rerun skips it."""
    from splatforge.cli import main
    from splatforge.data import load_scene
    from splatforge.pipeline.blocks import train_blocks

    scene = load_scene(SKULL, data_factor=8, cache_dir=tmp_path / "cache")
    plan = plan_blocks(scene, (2, 1))
    plan["blocks"][1]["images"] = []  # nothing to train on
    path = write_plan(plan, tmp_path / "blocks.json")
    results = train_blocks(path, tmp_path / "runs", steps=20, data_factor=8)
    assert [r["status"] for r in results] == ["done", "failed"]
    assert "has none of the scene's training views" in results[1]["error"]
    ply = tmp_path / "runs" / "block_0_0_0.875" / "point_cloud" / "iteration_20" / "point_cloud.ply"
    assert ply.is_file()
    again = train_blocks(path, tmp_path / "runs", steps=20, data_factor=8)
    assert again[0]["stages"]["train"] == "skipped" and again[1]["status"] == "failed"
    assert (
        main(["blocks", "train", str(path), "--output", str(tmp_path / "runs"), "--steps", "20", "--data-factor", "8"])
        == 1
    )
    assert "1 of 2 blocks failed: block_1_0_0.875" in capsys.readouterr().err
