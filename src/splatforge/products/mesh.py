"""Meshes from a trained run by TSDF fusion of its rendered depth, and mesh metrics.

:func:`extract_mesh`: the training views are rendered (colour and depth), fused into Open3D's
``ScalableTSDFVolume`` (RGB8 colour), triangles extracted by marching cubes, and the small
connected pieces dropped (2DGS's ``post_process_mesh``: keep the ``keep_clusters`` largest, never
a piece under 50 triangles). The mesh is in the scene's own world frame and units (those of the
input poses), so it overlays the input's point cloud.

Defaults follow 2DGS (Huang et al. 2024, ``render.py``): ``depth_trunc = 2 * radius`` with the
radius of the camera centres (the scene scale, 1.1 x the largest distance from their mean),
``voxel_size = depth_trunc / 1024``, ``sdf_trunc = 4 * voxel_size``.

Depth: ``expected`` (default) is ``sum_i w_i z_i / sum_i w_i`` (render mode ``ED``), the depth every
backend renders and differentiates; pixels whose accumulated alpha is below ``alpha_min`` (0.5)
are left out, so the half-transparent rim of a surface, where the expected depth is pulled
between the surface and the background, is not fused. A median depth (where the transmittance
crosses 0.5) is not rendered by the backends yet.

:func:`mesh_metrics`: precision, recall and F-score at distance ``tau`` (Knapitsch et al. 2017,
Tanks and Temples; the ``eval_f1`` of CityGS-X): points sampled uniformly on the mesh (and on the
reference when it is a mesh); precision = share of the mesh's points within ``tau`` of the
reference, recall = share of the reference's points within ``tau`` of the mesh,
``F = 2 P R / (P + R)``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from splatforge._fs import atomic_path
from splatforge.errors import ConfigError, DataFormatError

log = logging.getLogger(__name__)

__all__ = [
    "MeshConfig",
    "default_tau",
    "extract_mesh",
    "import_open3d",
    "mesh_metrics",
    "mesh_run",
    "mesh_splats",
    "read_geometry",
    "write_mesh",
]


def import_open3d():
    """``import open3d``.

    Raises:
        ConfigError: Open3D is not installed (names the package to install).
    """
    try:
        import open3d
    except ImportError as exc:
        raise ConfigError(
            f"meshes need Open3D: pip install 'splatforge[mesh]' (open3d-cpu, or open3d) ({exc})"
        ) from exc
    return open3d


@dataclass
class MeshConfig:
    """TSDF fusion settings; None: derived from the scene (see the module docstring)."""

    voxel_size: float | None = None
    """Voxel edge, world units (default depth_trunc / 1024)."""
    sdf_trunc: float | None = None
    """Truncation of the signed distance, world units (default 4 voxels)."""
    depth_trunc: float | None = None
    """Depths beyond this (world units, camera z) are not fused (default 2 x the camera radius)."""
    depth: Literal["expected", "median"] = "median"
    """Which rendered depth is fused: median (the depth where the transmittance crosses 0.5,
    2DGS's choice for meshing: the first surface that is at least half opaque) or expected
    (sum w z / sum w: Gaussians behind a half-transparent front pull it inwards)."""
    alpha_min: float = 0.5
    """Pixels less opaque than this are not fused."""
    keep_clusters: int = 50
    """Keep the largest this many connected pieces (never one under 50 triangles); 0 keeps all."""
    split: Literal["train", "test", "all"] = "train"
    """Which views are fused."""
    filter_px: float = 0.0
    """Multi-view check of the rendered depths before fusion (CityGS-X's filter, see
    :func:`splatforge.data.depth.multiview_depth_mask`): a pixel is fused only when its depth,
    sent to up to 8 neighbouring fused views and back, lands within this many pixels in more than
    one; 0 (default): off, the rendered depths of one set of Gaussians agree by construction
    except where views see different floaters."""

    def resolved(self, scene_scale: float) -> MeshConfig:
        depth_trunc = self.depth_trunc if self.depth_trunc is not None else 2.0 * scene_scale
        voxel = self.voxel_size if self.voxel_size is not None else depth_trunc / 1024.0
        sdf = self.sdf_trunc if self.sdf_trunc is not None else 4.0 * voxel
        for name, v in (("depth_trunc", depth_trunc), ("voxel_size", voxel), ("sdf_trunc", sdf)):
            if not v > 0:
                raise ConfigError(f"{name} must be positive, got {v}")
        if self.depth not in ("expected", "median"):
            raise ConfigError(f"depth must be 'expected' or 'median', got {self.depth!r}")
        if not 0.0 <= self.alpha_min < 1.0:
            raise ConfigError(f"alpha_min must be in [0, 1), got {self.alpha_min}")
        if self.filter_px < 0:
            raise ConfigError(f"filter_px must be >= 0, got {self.filter_px}")
        return MeshConfig(
            voxel, sdf, depth_trunc, self.depth, self.alpha_min, self.keep_clusters, self.split, self.filter_px
        )


@torch.no_grad()
def extract_mesh(run, cfg: MeshConfig | None = None, progress: Callable[[int, int], None] | None = None):
    """Fuse ``run``'s rendered depth into a coloured triangle mesh (see the module docstring).

    Args:
        run: a :class:`~splatforge.train.Run` (or anything with ``scene``, ``render(index, ...)``).
        cfg: fusion settings (defaults derived from the scene).

    Returns:
        ``(mesh, info)``: an ``open3d.geometry.TriangleMesh`` (world frame, vertex colours in
        [0, 1]) and a dict of the settings used and the counts.

    Raises:
        ConfigError: Open3D missing, bad settings. DataFormatError: nothing was fused (no
        opaque pixel within the depth range in any view).
    """
    o3d = import_open3d()
    scene = run.scene
    cfg = (cfg or MeshConfig()).resolved(scene.scene_scale())
    views = list(range(len(scene))) if cfg.split == "all" else list(scene.split[cfg.split])
    integ = o3d.pipelines.integration
    volume = integ.ScalableTSDFVolume(
        voxel_length=cfg.voxel_size, sdf_trunc=cfg.sdf_trunc, color_type=integ.TSDFVolumeColorType.RGB8
    )
    if set(views) & set(scene.split["test"]):
        run.align_test_views()  # test views drawn as evaluation draws them (pose_opt runs)
    viewmats = run.viewmats()  # the poses the run renders from (refined ones with pose_opt)

    def rendered(index: int) -> tuple[np.ndarray, np.ndarray]:
        render, alpha, _ = run.render(index, render_mode="RGB+MD" if cfg.depth == "median" else "RGB+ED")
        rgb = (render[0, ..., :3].clamp(0, 1) * 255.0 + 0.5).to(torch.uint8).cpu().numpy()
        depth = render[0, ..., 3].float().cpu().numpy().copy()
        depth[(alpha[0, ..., 0].cpu().numpy() < cfg.alpha_min) | ~np.isfinite(depth)] = 0.0
        return rgb, depth

    cache: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    if cfg.filter_px > 0:
        from splatforge.data.depth import multiview_depth_mask

        cache = {i: rendered(i) for i in views}
        sub = np.array(views)
        pos_of = {i: k for k, i in enumerate(views)}
        for i in views:
            keep = multiview_depth_mask(
                lambda k: cache[int(sub[k])][1], scene.camtoworlds[sub], scene.Ks[sub], pos_of[i], cfg.filter_px
            )
            cache[i][1][~keep] = 0.0
    fused = 0
    for pos, index in enumerate(views):
        rgb, depth = cache.pop(index) if index in cache else rendered(index)
        fused += int(((depth > 0) & (depth < cfg.depth_trunc)).sum())
        h, w = depth.shape
        K = scene.Ks[index]
        # Open3D puts pixel centres at integers, splatforge (and gsplat) at integer + 0.5
        intr = o3d.camera.PinholeCameraIntrinsic(w, h, K[0, 0], K[1, 1], K[0, 2] - 0.5, K[1, 2] - 0.5)
        rgbd = o3d.geometry.RGBDImage.create_from_color_and_depth(
            o3d.geometry.Image(np.ascontiguousarray(rgb)),
            o3d.geometry.Image(depth),
            depth_scale=1.0,
            depth_trunc=cfg.depth_trunc,
            convert_rgb_to_intensity=False,
        )
        volume.integrate(rgbd, intr, viewmats[index].astype(np.float64))
        if progress is not None:
            progress(pos + 1, len(views))
    if fused == 0:
        raise DataFormatError(
            f"{getattr(run, 'path', 'run')}: no opaque pixel within {cfg.depth_trunc:.4g} world units "
            f"in any of the {len(views)} views: nothing to fuse"
        )
    mesh = volume.extract_triangle_mesh()
    n_raw = len(mesh.triangles)
    if n_raw == 0:
        raise DataFormatError(
            f"{getattr(run, 'path', 'run')}: Open3D {o3d.__version__} fused {fused} pixels of {len(views)} views "
            f"but extracted no triangle (open3d-cpu 0.20.0's ScalableTSDFVolume does this: use 0.19)"
        )
    mesh = _drop_small_pieces(mesh, cfg.keep_clusters)
    mesh.compute_vertex_normals()
    info = {
        "voxel_size": cfg.voxel_size,
        "sdf_trunc": cfg.sdf_trunc,
        "depth_trunc": cfg.depth_trunc,
        "depth": cfg.depth,
        "alpha_min": cfg.alpha_min,
        "filter_px": cfg.filter_px,
        "views": len(views),
        "fused_pixels": fused,
        "triangles_extracted": n_raw,
        "triangles": len(mesh.triangles),
        "vertices": len(mesh.vertices),
    }
    return mesh, info


def _drop_small_pieces(mesh, keep: int):
    if keep <= 0 or len(mesh.triangles) == 0:
        return mesh
    ids, counts, _ = mesh.cluster_connected_triangles()
    ids, counts = np.asarray(ids), np.asarray(counts)
    threshold = max(int(np.sort(counts)[-min(keep, len(counts))]), 50)
    mesh.remove_triangles_by_mask(counts[ids] < threshold)
    mesh.remove_unreferenced_vertices()
    mesh.remove_degenerate_triangles()
    return mesh


def mesh_splats(mesh, camtoworlds: np.ndarray, voxel_size: float, shaded: bool = True):
    """The mesh's vertices as small opaque Gaussians (radius 0.7 voxel) for splatforge's own
    rasterizer, to picture a mesh without an OpenGL context: coloured by the vertex colours, or
    ``shaded`` grey by ``|normal . light|`` with the light from the cameras' mean viewing side."""
    from splatforge.geometry.sh import rgb_to_sh
    from splatforge.model.splats import Splats

    v = np.asarray(mesh.vertices, np.float32)
    n = len(v)
    if shaded:
        if not mesh.has_vertex_normals():
            mesh.compute_vertex_normals()
        normals = np.asarray(mesh.vertex_normals, np.float32)
        light = -camtoworlds[:, :3, 2].mean(0)
        light = light / (np.linalg.norm(light) or 1.0)
        g = 0.15 + 0.8 * np.abs(normals @ light.astype(np.float32))
        rgb = np.repeat(g[:, None], 3, axis=1)
    else:
        rgb = (
            np.asarray(mesh.vertex_colors, np.float32) if mesh.has_vertex_colors() else np.full((n, 3), 0.7, np.float32)
        )
    return Splats(
        means=v,
        quats=np.tile(np.array([1, 0, 0, 0], np.float32), (n, 1)),
        scales=np.full((n, 3), np.log(0.7 * voxel_size), np.float32),
        opacities=np.full(n, 5.0, np.float32),
        sh0=rgb_to_sh(rgb)[:, None, :].astype(np.float32),
        shN=np.zeros((n, 0, 3), np.float32),
    )


def mesh_run(
    run,
    out: Path,
    cfg: MeshConfig | None = None,
    *,
    pictures: bool = True,
    progress: Callable[[int, int], None] | None = None,
) -> dict:
    """:func:`extract_mesh` of ``run`` written to ``out`` (PLY), its settings and counts to
    ``out`` with the suffix ``.json``, and with ``pictures`` ``mesh_top.jpg``/``mesh_angle.jpg``
    beside it (see :func:`mesh_splats`); returns that info dict.

    Raises:
        as :func:`extract_mesh` and :func:`write_mesh`.
    """
    from splatforge.products.previews import write_previews

    out = Path(out)
    mesh, info = extract_mesh(run, cfg, progress=progress)
    write_mesh(mesh, out)
    info["mesh"] = str(out)
    if pictures:
        sc = run.scene
        info.update(
            write_previews(
                mesh_splats(mesh, sc.camtoworlds, info["voxel_size"]),
                out.parent,
                camtoworlds=sc.camtoworlds,
                Ks=sc.Ks,
                image_size=(int(sc.widths[0]), int(sc.heights[0])),
                size=768,
                prefix=out.stem,
            )
        )
    with atomic_path(out.with_suffix(".json")) as tmp:
        tmp.write_text(json.dumps(info, indent=2))
    return info


def write_mesh(mesh, path: Path) -> None:
    """Write ``mesh`` as a binary PLY with vertex colours and normals, atomically.

    Raises:
        OSError: Open3D could not write the file.
    """
    o3d = import_open3d()
    with atomic_path(Path(path)) as tmp:
        if not o3d.io.write_triangle_mesh(str(tmp), mesh, write_ascii=False, write_vertex_colors=True):
            raise OSError(f"{path}: Open3D could not write the mesh")


def read_geometry(path: Path, samples: int):
    """Points ``[M, 3]`` float64 of a mesh (``samples`` points uniformly on its surface) or of a
    point cloud (its points) at ``path`` (PLY, OBJ, OFF, STL, PCD, ... as Open3D reads them).

    Raises:
        DataFormatError: unreadable or empty.
    """
    o3d = import_open3d()
    path = Path(path)
    if not path.is_file():
        raise DataFormatError(f"{path}: no such file")
    kind = o3d.io.read_file_geometry_type(str(path))
    if int(kind) & int(o3d.io.CONTAINS_TRIANGLES):
        mesh = o3d.io.read_triangle_mesh(str(path))
        if len(mesh.triangles) > 0:
            o3d.utility.random.seed(0)  # repeatable samples (Open3D's own generator)
            return np.asarray(mesh.sample_points_uniformly(number_of_points=samples).points, dtype=np.float64)
    pts = np.asarray(o3d.io.read_point_cloud(str(path)).points, dtype=np.float64)
    if len(pts) == 0:
        raise DataFormatError(f"{path}: no triangles and no points (not a mesh or point cloud Open3D reads)")
    return pts


def default_tau(reference: np.ndarray) -> float:
    """0.5 % of the diagonal of the box holding the reference's central 98 % on each axis (the 1st
    to 99th percentiles: SfM point clouds have far outliers that would set a full box)."""
    lo, hi = np.percentile(reference, [1, 99], axis=0)
    return 0.005 * float(np.linalg.norm(hi - lo))


def mesh_metrics(points: np.ndarray, reference: np.ndarray, tau: float) -> dict:
    """Precision, recall and F-score of ``points [M, 3]`` against ``reference [R, 3]`` at distance
    ``tau`` (world units), with the mean and median distances each way.

    Raises:
        ConfigError: ``tau`` not positive, or an empty set.
    """
    if not tau > 0:
        raise ConfigError(f"tau must be positive, got {tau}")
    if len(points) == 0 or len(reference) == 0:
        raise ConfigError("mesh metrics need points on both sides")
    from scipy.spatial import cKDTree

    d_pr = cKDTree(reference).query(points, workers=-1)[0]
    d_rp = cKDTree(points).query(reference, workers=-1)[0]
    precision, recall = float(np.mean(d_pr < tau)), float(np.mean(d_rp < tau))
    f = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
    return {
        "tau": float(tau),
        "precision": precision,
        "recall": recall,
        "fscore": f,
        "accuracy_mean": float(d_pr.mean()),
        "accuracy_median": float(np.median(d_pr)),
        "completeness_mean": float(d_rp.mean()),
        "completeness_median": float(np.median(d_rp)),
        "num_points": len(points),
        "num_reference": len(reference),
    }
