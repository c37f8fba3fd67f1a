"""Scene readers against the real sets, splits, formats and every bad-input case."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from scenes import datasets_dir, needs_datasets, needs_skull

from splatforge import DataFormatError
from splatforge.data import load_scene, make_split
from splatforge.errors import ConfigError
from splatforge.io import read_ply, write_ply

SKULL = datasets_dir() / "skull"
FOX = datasets_dir() / "fox"
needs_fox = needs_datasets("fox/transforms.json")


def snapshot(folder: Path) -> dict:
    """Every file under ``folder`` with its size and mtime: to prove an input is left untouched."""
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*")}


@needs_skull
def test_skull_colmap_reader_projects_points_onto_observations(tmp_path):
    import pycolmap

    before = snapshot(SKULL)
    scene = load_scene(SKULL, data_factor=8, cache_dir=tmp_path / "cache")
    assert len(scene) == 66 and scene.source == "colmap"
    assert scene.image_names == sorted(scene.image_names)
    assert (scene.widths == 266).all() and (scene.heights == 177).all()
    # full-size calibration (2127 x 1418) scaled to the images_8 size
    np.testing.assert_allclose(scene.Ks[0, 0, 0], 4847.5857 * 266 / 2127, rtol=1e-6)
    np.testing.assert_allclose(scene.Ks[0, 1, 2], 709.0 * 177 / 1418, rtol=1e-6)
    assert scene.points.shape == (21906, 3) and scene.points_rgb.dtype == np.uint8
    assert scene.split["test"] == list(range(0, 66, 8))
    # Independent check of poses and intrinsics: projecting each image's observed 3D points
    # with K and inv(camtoworld) lands on COLMAP's own 2D observations (scaled to images_8).
    rec = pycolmap.Reconstruction(str(SKULL / "sparse" / "0"))
    by_name = {im.name: im for im in rec.images.values()}
    for i in (0, 17, 65):
        im = by_name[scene.image_names[i]]
        obs = [(p.xy, rec.points3D[p.point3D_id].xyz) for p in im.points2D if p.has_point3D()][:200]
        xy = np.array([o[0] for o in obs]) * np.array([266 / 2127, 177 / 1418])
        X = np.array([o[1] for o in obs])
        cam = (np.linalg.inv(scene.camtoworlds[i]) @ np.c_[X, np.ones(len(X))].T)[:3]
        proj = (scene.Ks[i] @ cam)[:2] / cam[2]
        assert np.median(np.linalg.norm(proj.T - xy, axis=1)) < 0.25  # pixels at 1/8 size
    assert snapshot(SKULL) == before


@needs_fox
def test_fox_transforms_reader(tmp_path):
    before = snapshot(FOX)
    scene = load_scene(FOX, cache_dir=tmp_path / "cache")
    assert len(scene) == 67 and scene.source == "transforms"
    assert (scene.widths == 1080).all() and (scene.heights == 1920).all()  # portrait
    np.testing.assert_allclose(scene.Ks[0], [[1375.52, 0, 554.558], [0, 1374.49, 965.268], [0, 0, 1]])
    # distortion removed into the cache, outside the input
    assert all(str(p).startswith(str(tmp_path)) for p in scene.image_paths)
    # OpenGL -> OpenCV: every camera's +z (forward) axis points at the captured object, whose
    # position is the least-squares meeting point of the cameras' optical axes
    centers, fwd = scene.camtoworlds[:, :3, 3], scene.camtoworlds[:, :3, 2]
    A = sum(np.eye(3) - np.outer(f, f) for f in fwd)
    b = sum((np.eye(3) - np.outer(f, f)) @ c for c, f in zip(centers, fwd))
    target = np.linalg.solve(A, b)
    to_target = (target - centers) / np.linalg.norm(target - centers, axis=1, keepdims=True)
    assert (np.sum(to_target * fwd, axis=1) > 0.9).all()
    # +y is down in OpenCV: the world up (the mean of -y axes) is consistent across cameras
    up = -scene.camtoworlds[:, :3, 1]
    assert (up @ up.mean(0) > 0).all()
    assert snapshot(FOX) == before


def test_transforms_alpha_blender_style(tmp_path):
    """camera_angle_x fallback, suffix-less file_path, RGBA composited on the background."""
    from PIL import Image

    from splatforge.data.images import load_image

    (tmp_path / "train").mkdir()
    rgba = np.zeros((8, 10, 4), np.uint8)
    rgba[..., 0] = 255
    rgba[:4, :, 3] = 255  # top half opaque red, bottom transparent
    Image.fromarray(rgba).save(tmp_path / "train" / "r_0.png")
    meta = {
        "camera_angle_x": 0.6911112070083618,
        "frames": [{"file_path": "./train/r_0", "transform_matrix": np.eye(4).tolist()}],
    }
    (tmp_path / "transforms.json").write_text(json.dumps(meta))
    scene = load_scene(tmp_path, test_every=0, background=(0.0, 0.0, 1.0))
    np.testing.assert_allclose(scene.Ks[0, 0, 0], 0.5 * 10 / np.tan(0.5 * 0.6911112070083618))
    img = load_image(scene.image_paths[0], scene.background)
    np.testing.assert_allclose(img[0, 0], [1, 0, 0])
    np.testing.assert_allclose(img[-1, 0], [0, 0, 1])
    np.testing.assert_allclose(scene.camtoworlds[0], np.diag([1.0, -1.0, -1.0, 1.0]))


def test_splits():
    names = [f"{i:03d}.jpg" for i in range(20)]
    assert make_split(names, test_every=8)["test"] == [0, 8, 16]
    s = make_split(names, split_ratio=0.3)
    assert len(s["train"]) == 6 and sorted(s["train"] + s["test"]) == list(range(20))
    assert s["train"][0] == 0 and s["train"][-1] == 19  # evenly spread over the whole range
    assert make_split(names, split_ratio=0.3) == s  # deterministic
    with pytest.raises(ConfigError, match="split ratio"):
        make_split(names, split_ratio=1.5)


def test_partition_files(tmp_path):
    names = [f"{i:03d}.jpg" for i in range(5)]
    (tmp_path / "partition.json").write_text(json.dumps({"train": [0, 2, 4], "test": [1, 3]}))
    assert make_split(names, partition=tmp_path / "partition.json") == {"train": [0, 2, 4], "test": [1, 3]}
    (tmp_path / "splits").mkdir()
    (tmp_path / "splits" / "train.txt").write_text("000.jpg\n001.jpg\n002\n")
    (tmp_path / "splits" / "test.txt").write_text("003.jpg\n004.jpg\n")
    assert make_split(names, partition=tmp_path / "splits") == {"train": [0, 1, 2], "test": [3, 4]}
    (tmp_path / "splits" / "test.txt").write_text("zzz.jpg\n")
    with pytest.raises(DataFormatError, match="zzz.jpg"):
        make_split(names, partition=tmp_path / "splits")


@pytest.fixture
def skull_copy(tmp_path):
    """A writable copy of the skull scene (sparse + images_8)."""
    root = tmp_path / "skull"
    shutil.copytree(SKULL / "sparse", root / "sparse")
    shutil.copytree(SKULL / "images_8", root / "images_8")
    return root


def _truncate(path: Path) -> None:
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size // 2)


@needs_skull
@pytest.mark.parametrize(
    "breakage, message",
    [
        (lambda r: shutil.rmtree(r), "no such folder"),
        (lambda r: _truncate(r / "sparse/0/images.bin"), "could not be read"),
        (lambda r: _truncate(r / "sparse/0/cameras.bin"), "invalid intrinsics"),
        (lambda r: [p.unlink() for p in sorted((r / "images_8").iterdir())[:5]], "5 of 66 images"),
        (lambda r: [p.unlink() for p in (r / "images_8").iterdir()], "66 of 66 images"),
        (lambda r: shutil.rmtree(r / "images_8"), "no such image folder"),
        (lambda r: shutil.rmtree(r / "sparse"), "not a scene folder"),
        (lambda r: (r / "sparse/0/points3D.bin").rename(r / "sparse/0/points3D.ply"), "not a scene folder"),
    ],
)
def test_bad_colmap_input_is_named_and_untouched(skull_copy, breakage, message):
    breakage(skull_copy)
    before = snapshot(skull_copy) if skull_copy.exists() else None
    with pytest.raises(DataFormatError, match=message) as err:
        load_scene(skull_copy, data_factor=8, cache_dir=skull_copy.parent / "cache")
    assert str(skull_copy) in str(err.value)
    if before is not None:
        assert snapshot(skull_copy) == before


def test_bad_transforms_input(tmp_path):
    (tmp_path / "transforms.json").write_text("{not json")
    with pytest.raises(DataFormatError, match="transforms.json"):
        load_scene(tmp_path)
    (tmp_path / "transforms.json").write_text(json.dumps({"frames": []}))
    with pytest.raises(DataFormatError, match="'frames' is empty"):
        load_scene(tmp_path)
    (tmp_path / "transforms.json").write_text(
        json.dumps({"fl_x": 10, "frames": [{"file_path": "a.png", "transform_matrix": np.eye(4).tolist()}]})
    )
    with pytest.raises(DataFormatError, match="1 of 1 images are missing"):
        load_scene(tmp_path)


def random_splats(n: int, degree: int, seed: int = 0) -> dict:
    g = np.random.default_rng(seed)
    k = (degree + 1) ** 2
    return {
        "means": g.normal(size=(n, 3)),
        "quats": g.normal(size=(n, 4)),
        "scales": g.normal(size=(n, 3)) - 4,
        "opacities": g.normal(size=n),
        "sh0": g.normal(size=(n, 1, 3)),
        "shN": g.normal(size=(n, k - 1, 3)),
    }


@pytest.mark.parametrize("degree", [0, 1, 3])
def test_ply_round_trip_and_independent_reader(tmp_path, degree):
    from plyfile import PlyData

    splats = random_splats(50, degree)
    path = tmp_path / "point_cloud.ply"
    write_ply(path, splats)
    back = read_ply(path)
    for key, value in splats.items():
        np.testing.assert_array_equal(back[key], value.astype(np.float32), err_msg=key)
    # plyfile, independently: Inria's names and channel-major f_rest order
    v = PlyData.read(str(path))["vertex"]
    np.testing.assert_array_equal(v["x"], splats["means"][:, 0].astype(np.float32))
    np.testing.assert_array_equal(v["rot_0"], splats["quats"][:, 0].astype(np.float32))
    np.testing.assert_array_equal(v["opacity"], splats["opacities"].astype(np.float32))
    if degree:
        k = (degree + 1) ** 2 - 1
        # f_rest_{c * k + j} is coefficient j of channel c
        np.testing.assert_array_equal(v[f"f_rest_{k + 1}"], splats["shN"][:, 1, 1].astype(np.float32))


def test_ply_reads_gsplat_export(tmp_path):
    """gsplat's own exporter (pure python) writes a file our reader understands."""
    from gsplat import export_splats

    s = random_splats(30, 3)
    t = {k: torch.from_numpy(v).float() for k, v in s.items()}
    path = tmp_path / "gsplat.ply"
    export_splats(
        t["means"], t["scales"], t["quats"], t["opacities"], t["sh0"], t["shN"], format="ply", save_to=str(path)
    )
    back = read_ply(path)
    for key in s:
        np.testing.assert_allclose(back[key], s[key], rtol=1e-6, atol=1e-6, err_msg=key)


def test_ply_bad_files(tmp_path):
    bad = tmp_path / "bad.ply"
    bad.write_bytes(b"hello")
    with pytest.raises(DataFormatError, match="not a PLY"):
        read_ply(bad)
    write_ply(bad, random_splats(10, 1))
    data = bad.read_bytes()
    bad.write_bytes(data[:-100])
    with pytest.raises(DataFormatError, match="truncated"):
        read_ply(bad)
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".")]  # no temp files left behind


@needs_skull
def test_distorted_colmap_model_is_undistorted_into_the_cache(tmp_path):
    """A SIMPLE_RADIAL copy of skull (calibrated at full size, images_8 on disk) is undistorted
    with pycolmap into the cache, at the images' size, never into the input."""
    import pycolmap

    root = tmp_path / "radial"
    (root / "sparse" / "0").mkdir(parents=True)
    shutil.copytree(SKULL / "images_8", root / "images_8")
    rec = pycolmap.Reconstruction(str(SKULL / "sparse" / "0"))
    cam = rec.cameras[1]
    rec.cameras[1] = pycolmap.Camera(
        model="SIMPLE_RADIAL",
        width=cam.width,
        height=cam.height,
        params=[cam.params[0], cam.params[2], cam.params[3], 0.05],
        camera_id=1,
    )
    rec.write(str(root / "sparse" / "0"))
    before = snapshot(root)
    scene = load_scene(root, data_factor=8, cache_dir=tmp_path / "cache")
    assert snapshot(root) == before
    assert len(scene) == 66 and all(str(p).startswith(str(tmp_path / "cache")) for p in scene.image_paths)
    # undistorted at 1/8 size: PINHOLE with the focal length scaled by the image size
    assert abs(scene.widths[0] - 266) <= 3 and abs(scene.heights[0] - 177) <= 3
    assert scene.Ks[0, 0, 0] == pytest.approx(4847.5857 * 266 / 2127, rel=0.02)
    assert scene.Ks[0, 0, 0] == pytest.approx(scene.Ks[0, 1, 1], rel=1e-3)
