"""TSDF meshes of a run (Open3D) and mesh metrics, against shapes whose surface is known."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from scenes import look_at

from splatforge.cli import main as cli_main

o3d = pytest.importorskip("open3d")

CENTER = np.array([0.7, -0.4, 2.5])  # off the origin: the mesh must stay in the scene's frame
RADIUS = 1.0


def sphere_run(tmp_path, n=30_000, views=16, size=128):
    """A run whose Gaussians are small, opaque and spread over a sphere, seen by cameras on two
    rings around it; saved as a run folder (cfg.yml + PLY) over a transforms.json scene (black
    images: only the poses matter) for the command line."""
    from splatforge.data.scene import SceneData
    from splatforge.geometry.sh import rgb_to_sh
    from splatforge.io import write_ply
    from splatforge.model.splats import Splats
    from splatforge.train.config import TrainConfig, save_config

    g = np.random.default_rng(0)
    d = g.normal(size=(n, 3))
    d /= np.linalg.norm(d, axis=1, keepdims=True)
    means = CENTER + RADIUS * d
    sh0 = np.zeros((n, 1, 3), np.float32) + rgb_to_sh(0.6)
    splats = Splats(
        means=means.astype(np.float32),
        quats=np.tile([1.0, 0, 0, 0], (n, 1)).astype(np.float32),
        scales=np.full((n, 3), np.log(0.02), np.float32),
        opacities=np.full(n, 3.0, np.float32),
        sh0=sh0,
        shN=np.zeros((n, 0, 3), np.float32),
    )
    c2ws, Ks = [], []
    for k in range(views):
        a = 2 * np.pi * k / (views // 2)
        h = 1.2 if k < views // 2 else -1.2
        eye = CENTER + np.array([3.5 * np.cos(a), h, 3.5 * np.sin(a)])
        c2ws.append(np.linalg.inv(look_at(eye.tolist(), CENTER.tolist()).double().numpy()))
        Ks.append([[1.2 * size, 0, size / 2], [0, 1.2 * size, size / 2], [0, 0, 1]])
    run_dir = tmp_path / "run"
    scene_dir = tmp_path / "scene"
    (scene_dir / "images").mkdir(parents=True)
    frames = []
    for k, c2w in enumerate(c2ws):
        Image.new("RGB", (size, size)).save(scene_dir / "images" / f"{k:02d}.png")
        gl = np.asarray(c2w) @ np.diag([1.0, -1.0, -1.0, 1.0])  # OpenCV -> OpenGL camera axes
        frames.append({"file_path": f"images/{k:02d}.png", "transform_matrix": gl.tolist()})
    (scene_dir / "transforms.json").write_text(
        json.dumps(
            {
                "fl_x": 1.2 * size,
                "fl_y": 1.2 * size,
                "cx": size / 2,
                "cy": size / 2,
                "w": size,
                "h": size,
                "frames": frames,
            }
        )
    )
    scene = SceneData(
        root=tmp_path,
        source="test",
        image_names=[f"{k:02d}.png" for k in range(views)],
        image_paths=[tmp_path / f"{k:02d}.png" for k in range(views)],
        camtoworlds=np.array(c2ws),
        Ks=np.array(Ks, np.float64),
        widths=np.full(views, size),
        heights=np.full(views, size),
        points=np.zeros((0, 3), np.float32),
        points_rgb=np.zeros((0, 3), np.uint8),
        split={"train": list(range(views)), "test": []},
    )
    cfg = TrainConfig(data=scene_dir, output=run_dir, sh_degree=0, device="cpu", test_every=0)
    save_config(cfg, run_dir / "cfg.yml")
    write_ply(run_dir / "point_cloud" / "iteration_1" / "point_cloud.ply", splats)
    return run_dir, scene, cfg, splats


def test_sphere_mesh_lies_on_the_sphere_in_the_scene_frame(tmp_path):
    """Fusing the renders of Gaussians spread over a sphere gives a mesh whose vertices are at the
    sphere's radius from its (off-origin) centre, covering it all round; its colour is the
    Gaussians'; precision, recall and F-score against points of the true sphere are near 1 at
    tau = 2.5 voxels."""
    from splatforge.products.mesh import MeshConfig, extract_mesh, mesh_metrics
    from splatforge.train import Run

    run_dir, scene, cfg, splats = sphere_run(tmp_path)
    run = Run(run_dir, cfg, splats, 1, scene=scene)
    mesh, info = extract_mesh(run, MeshConfig(voxel_size=0.02))
    assert info["voxel_size"] == 0.02 and info["sdf_trunc"] == pytest.approx(0.08)
    assert info["depth_trunc"] == pytest.approx(2 * scene.scene_scale())
    v = np.asarray(mesh.vertices)
    r = np.linalg.norm(v - CENTER, axis=1)
    assert len(v) > 5000
    # the opaque shell of Gaussians of sigma 0.02 starts in front of their centres: the expected
    # depth sits between the centres and 2 sigma outside them, and the surface is thin
    q25, q50, q75 = np.percentile(r - RADIUS, [25, 50, 75])
    assert 0.0 < q50 < 0.04 and q75 - q25 < 0.02, (q25, q50, q75)
    # all round: every octant around the centre holds vertices
    octants = {tuple(o) for o in (v - CENTER > 0).astype(int)}
    assert len(octants) == 8
    colors = np.asarray(mesh.vertex_colors)
    assert np.allclose(np.median(colors, axis=0), 0.6, atol=0.03)
    truth = np.random.default_rng(1).normal(size=(50_000, 3))
    truth = CENTER + RADIUS * truth / np.linalg.norm(truth, axis=1, keepdims=True)
    o3d.utility.random.seed(0)
    samples = np.asarray(mesh.sample_points_uniformly(number_of_points=50_000).points)
    m = mesh_metrics(samples, truth, tau=0.05)
    assert m["precision"] > 0.95 and m["recall"] > 0.95 and m["fscore"] > 0.95, m


def test_mesh_metrics_hand_case():
    """Four points against a reference of two: distances 0, 0.05, 0.2, 1.0 (precision 2/4 at tau
    0.1), and the reference's 0 and 0.05 (recall 2/2)."""
    from splatforge.products.mesh import mesh_metrics

    pts = np.array([[0, 0, 0], [1.05, 0, 0], [0, 0.2, 0], [0, 0, 1.0]], float)
    ref = np.array([[0, 0, 0], [1, 0, 0]], float)
    m = mesh_metrics(pts, ref, tau=0.1)
    assert m["precision"] == 0.5 and m["recall"] == 1.0 and m["fscore"] == pytest.approx(2 * 0.5 / 1.5)
    assert m["accuracy_mean"] == pytest.approx((0 + 0.05 + 0.2 + 1.0) / 4)


def test_mesh_and_mesh_eval_commands(tmp_path, capsys):
    """`splatforge mesh RUN` writes RUN/exports/mesh.ply (read back by Open3D, coloured) and its
    settings; `splatforge mesh-eval` scores it against a point cloud of the true sphere; a bad
    reference is one error line and exit 1."""
    run_dir, *_ = sphere_run(tmp_path, n=20_000, views=12, size=96)
    assert cli_main(["mesh", str(run_dir), "--voxel-size", "0.025", "--device", "cpu"]) == 0
    capsys.readouterr()
    mesh_path = run_dir / "exports" / "mesh.ply"
    mesh = o3d.io.read_triangle_mesh(str(mesh_path))
    assert len(mesh.triangles) > 1000 and mesh.has_vertex_colors()
    assert json.loads(mesh_path.with_suffix(".json").read_text())["voxel_size"] == 0.025
    # the pictures: the sphere's shaded disc fills the middle of the top view, the corners are black
    top = np.asarray(Image.open(run_dir / "exports" / "mesh_top.jpg").convert("L"), float)
    h, w = top.shape
    middle = top[h // 4 : 3 * h // 4, w // 4 : 3 * w // 4]
    assert middle.mean() > 60 and (middle > 20).mean() > 0.9 and top[: h // 10, : w // 10].mean() < 10
    truth = np.random.default_rng(2).normal(size=(20_000, 3))
    pcd = o3d.geometry.PointCloud(
        o3d.utility.Vector3dVector(CENTER + truth / np.linalg.norm(truth, axis=1, keepdims=True))
    )
    o3d.io.write_point_cloud(str(tmp_path / "truth.ply"), pcd)
    assert (
        cli_main(["mesh-eval", str(mesh_path), str(tmp_path / "truth.ply"), "--tau", "0.06", "--samples", "50000"]) == 0
    )
    result = json.loads(capsys.readouterr().out)
    assert result["fscore"] > 0.9 and result["tau"] == 0.06
    assert json.loads(mesh_path.with_suffix(".eval.json").read_text())["fscore"] == result["fscore"]
    (tmp_path / "bad.ply").write_text("ply\nformat ascii 1.0\nend_header\n")
    assert cli_main(["mesh-eval", str(mesh_path), str(tmp_path / "bad.ply")]) == 1
    assert "bad.ply" in capsys.readouterr().err


def test_mesh_of_nothing_is_a_clear_error(tmp_path):
    from splatforge.errors import DataFormatError
    from splatforge.products.mesh import extract_mesh
    from splatforge.train import Run

    run_dir, scene, cfg, splats = sphere_run(tmp_path, n=100, views=4, size=32)
    splats.opacities[:] = -20.0  # fully transparent: nothing to fuse
    with pytest.raises(DataFormatError, match="nothing to fuse"):
        extract_mesh(Run(run_dir, cfg, splats, 1, scene=scene))


def test_expected_depth_is_open3d_ready():
    """Guard for the convention extract_mesh relies on: Open3D projects with pixel centres at
    integers, splatforge at +0.5, so the principal point is moved by half a pixel. A point on the
    optical axis lands on Open3D's pixel (cx - 0.5) with our K."""
    K = torch.tensor([[100.0, 0, 32.0], [0, 100.0, 24.0], [0, 0, 1]])
    intr = o3d.camera.PinholeCameraIntrinsic(64, 48, 100.0, 100.0, float(K[0, 2]) - 0.5, float(K[1, 2]) - 0.5)
    depth = np.zeros((48, 64), np.float32)
    depth[23, 31] = 2.0  # the pixel whose centre (31.5, 23.5) is 0.5 px from our principal point
    pcd = o3d.geometry.PointCloud.create_from_depth_image(o3d.geometry.Image(depth), intr, depth_scale=1.0)
    x, y, z = np.asarray(pcd.points)[0]
    assert z == pytest.approx(2.0) and x == pytest.approx(-0.5 * 2.0 / 100.0) and y == pytest.approx(-0.5 * 2.0 / 100.0)


@pytest.mark.slow
def test_demo_torus_mesh_reaches_the_issues_fscore(tmp_path, capsys):
    """The demo torus, whose surface is known analytically: its `reference_points.ply` (read by
    plyfile, an independent reader) lies on the analytic torus; trained through `splatforge
    train` (3,000 steps from a random start, the default strategy, on CPU), meshed by `splatforge
    mesh` with its defaults (median depth) and scored by `splatforge mesh-eval` at tau = 2 % of
    the torus's outer radius: F-score >= 0.9 (the issue's target). Expected depth, fused from the
    same run, scores lower: why median is the default."""
    from plyfile import PlyData

    from splatforge.demo import TORUS_RING, TORUS_TUBE, build_demo_scene, torus_sdf
    from splatforge.products.mesh import MeshConfig, extract_mesh, mesh_metrics
    from splatforge.train import Run

    scene = build_demo_scene(tmp_path / "scene")
    v = PlyData.read(str(scene / "reference_points.ply"))["vertex"]
    ref = np.stack([v["x"], v["y"], v["z"]], -1).astype(np.float64)
    assert 35_000 < len(ref) < 45_000 and np.abs(torus_sdf(ref)).max() < 1e-6  # ~80 % of the surface is seen
    run = tmp_path / "run"
    args = [
        "train",
        str(scene),
        "--output",
        str(run),
        "--steps",
        "3000",
        "--strategy",
        "default",
        "--sh-degree",
        "1",
        "--init-random-count",
        "4000",
        "--init-extent",
        "0.5",
        "--max-gaussians",
        "12000",
        "--checkpoint-every",
        "0",
        "--device",
        "cpu",
    ]
    assert cli_main(args) == 0
    assert cli_main(["mesh", str(run), "--device", "cpu"]) == 0
    tau = 0.02 * (TORUS_RING + TORUS_TUBE)
    assert (
        cli_main(
            ["mesh-eval", str(run / "exports" / "mesh.ply"), str(scene / "reference_points.ply"), "--tau", str(tau)]
        )
        == 0
    )
    capsys.readouterr()
    median = json.loads((run / "exports" / "mesh.eval.json").read_text())
    assert median["fscore"] >= 0.9, median
    mesh, info = extract_mesh(Run.open(run), MeshConfig(depth="expected"))
    assert info["depth"] == "expected"
    o3d.utility.random.seed(0)
    expected = mesh_metrics(np.asarray(mesh.sample_points_uniformly(number_of_points=100_000).points), ref, tau)
    assert expected["fscore"] < median["fscore"] - 0.05, (expected, median)
