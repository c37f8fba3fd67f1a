"""Spatial blocks of a large scene (CityGaussian V2's partition, Liu et al. 2024/2025).

A plan cuts the ground plane into a ``gx x gy`` grid whose edges are quantiles of the SfM points
(first along the plane's first axis, then within each column along the second), so every block
holds the same number of points. Each block has its box (outer edges unbounded, so every point
of the world is in exactly one block: what merging keeps) and an enlarged box (each side pushed
out by ``margin`` times the block's extent, the outer ones measured to the 1st/99th percentile
of the points: what a block trains on). An image belongs to a block when its camera centre is inside the enlarged
box, or when at least ``content_threshold`` of the SfM points it sees (projected inside the
image, in front of the camera) fall inside the block's enlarged box; with a coarse model
(CityGaussian V2's way), when its Gaussians inside the enlarged box cover at least that fraction
of the image in a render of them alone.

The plane: the up axis is the normal of the plane the camera centres span (or their mean up vector,
see :func:`_up_axis`); its first axis is the points' principal direction in the plane. Everything
is in the scene's world frame and units.

``blocks.json`` (written by :func:`write_plan`, read by :func:`load_plan`)::

    {"version": 1, "scene": ..., "grid": [gx, gy], "margin": m, "content_threshold": c,
     "origin": [x, y, z], "axes": [[e1], [e2], [up]],
     "blocks": [{"id": "0_0", "box": [[u0, u1], [v0, v1]], "enlarged": [[...], [...]],
                 "images": [names], "num_points": n}, ...]}

with ``null`` for an unbounded edge.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from splatforge._fs import atomic_path
from splatforge.data.scene import SceneData
from splatforge.errors import ConfigError, DataFormatError

__all__ = [
    "PLAN_VERSION",
    "block_points",
    "find_block",
    "in_box",
    "load_plan",
    "plan_blocks",
    "plane_coords",
    "write_plan",
]

PLAN_VERSION = 1


def _plane(scene: SceneData) -> tuple[np.ndarray, np.ndarray]:
    """``(origin [3], axes [3, 3])``: rows e1, e2, up (orthonormal, right-handed)."""
    up = _up_axis(scene)
    pts = scene.points.astype(np.float64) if len(scene.points) else scene.camtoworlds[:, :3, 3]
    origin = np.median(pts, axis=0)
    flat = (pts - origin) - np.outer((pts - origin) @ up, up)
    _, _, vt = np.linalg.svd(flat, full_matrices=False)
    e1 = vt[0] - (vt[0] @ up) * up
    e1 /= np.linalg.norm(e1)
    e2 = np.cross(up, e1)
    return origin, np.stack([e1, e2, up])


def _up_axis(scene: SceneData) -> np.ndarray:
    """The world's up: the normal of the plane the camera centres lie in (aerial grids and
    orbits alike) when they span a plane, else the cameras' mean up vector (``-y``, for
    cameras along a street); its sign makes it agree with the cameras' up vectors and against
    their viewing directions together (nadir cameras' up vectors are horizontal, orbiting
    cameras' viewing directions nearly so)."""
    centres = scene.camtoworlds[:, :3, 3]
    cam_up = -scene.camtoworlds[:, :3, 1].mean(axis=0)
    back = -scene.camtoworlds[:, :3, 2].mean(axis=0)
    up = cam_up
    if len(centres) >= 3:
        _, sv, vt = np.linalg.svd(centres - centres.mean(axis=0), full_matrices=False)
        if sv[1] > 1e-9 and sv[2] < 0.5 * sv[1]:
            up = vt[2] if vt[2] @ (cam_up + back) >= 0 else -vt[2]
    if np.linalg.norm(up) < 1e-6:
        raise DataFormatError(f"{scene.root}: no up direction from the cameras (their up vectors cancel out)")
    return up / np.linalg.norm(up)


def plane_coords(xyz: np.ndarray, plan: dict[str, Any]) -> np.ndarray:
    """``[N, 2]`` coordinates of world points ``xyz [N, 3]`` along the plan's plane axes."""
    axes, origin = np.asarray(plan["axes"], np.float64), np.asarray(plan["origin"], np.float64)
    return (np.asarray(xyz, np.float64) - origin) @ axes[:2].T


def in_box(uv: np.ndarray, box: list) -> np.ndarray:
    """``[N]`` bool: ``uv [N, 2]`` inside ``box`` (``[[u0, u1], [v0, v1]]``, None = unbounded),
    lower edges included, upper excluded, so adjacent boxes never share a point."""
    keep = np.ones(len(uv), bool)
    for d, (lo, hi) in enumerate(box):
        if lo is not None:
            keep &= uv[:, d] >= lo
        if hi is not None:
            keep &= uv[:, d] < hi
    return keep


def _edges(values: np.ndarray, k: int) -> list[float | None]:
    """``k + 1`` edges at the ``i / k`` quantiles, the outer ones unbounded."""
    inner = [float(np.quantile(values, i / k)) for i in range(1, k)] if len(values) else [0.0] * (k - 1)
    return [None, *inner, None]


def _enlarge(box: list, extent: list, margin: float) -> list:
    out = []
    for (lo, hi), (emin, emax) in zip(box, extent):
        a, b = emin if lo is None else lo, emax if hi is None else hi
        pad = margin * max(b - a, 0.0)
        out.append([None if lo is None else lo - pad, None if hi is None else hi + pad])
        if lo is None and hi is None:
            out[-1] = [None, None]
    return out


def _coverage(scene: SceneData, keep: np.ndarray, i: int) -> float:
    """The fraction of the SfM points view ``i`` sees (in front, inside the image) that ``keep``
    marks."""
    vm = np.linalg.inv(scene.camtoworlds[i])
    cam = scene.points.astype(np.float64) @ vm[:3, :3].T + vm[:3, 3]
    front = cam[:, 2] > 1e-6
    uvw = cam[front] @ scene.Ks[i].T
    px = uvw[:, :2] / uvw[:, 2:3]
    seen = (px[:, 0] >= 0) & (px[:, 0] < scene.widths[i]) & (px[:, 1] >= 0) & (px[:, 1] < scene.heights[i])
    if not seen.any():
        return 0.0
    return float(keep[front][seen].mean())


#: ``coverage(view index, inside)``: the fraction of view ``index`` covered by a coarse model's
#: Gaussians whose centres ``inside(xyz [M, 3]) -> [M] bool`` selects (see
#: :func:`splatforge.pipeline.blocks.coarse_coverage`).
Coverage = Callable[[int, Callable[[np.ndarray], np.ndarray]], float]


def plan_blocks(
    scene: SceneData,
    grid: tuple[int, int],
    margin: float = 0.1,
    content_threshold: float = 0.05,
    coverage: Coverage | None = None,
) -> dict[str, Any]:
    """The block plan of ``scene`` (see the module docstring). With ``coverage`` (a coarse
    model's renders), an image's share of a block is the fraction of the image the block's
    Gaussians cover instead of the fraction of its SfM points.

    Raises:
        ConfigError: a grid smaller than 1x1, a negative margin, a threshold outside [0, 1].
        DataFormatError: a scene without SfM points (the edges are their quantiles).
    """
    gx, gy = int(grid[0]), int(grid[1])
    if gx < 1 or gy < 1:
        raise ConfigError(f"--grid must be at least 1x1, got {gx}x{gy}")
    if margin < 0:
        raise ConfigError(f"--margin must be >= 0, got {margin}")
    if not 0.0 <= content_threshold <= 1.0:
        raise ConfigError(f"--content-threshold must be in [0, 1], got {content_threshold}")
    if not len(scene.points):
        raise DataFormatError(f"{scene.root}: no SfM points: blocks are cut at the points' quantiles")
    origin, axes = _plane(scene)
    plan: dict[str, Any] = {
        "version": PLAN_VERSION,
        "scene": str(scene.root),
        "grid": [gx, gy],
        "margin": margin,
        "content_threshold": content_threshold,
        "origin": origin.tolist(),
        "axes": axes.tolist(),
    }
    uv = plane_coords(scene.points, plan)
    centres = plane_coords(scene.camtoworlds[:, :3, 3], plan)
    extent = [
        [float(np.quantile(uv[:, d], 0.01)), float(np.quantile(uv[:, d], 0.99))] for d in range(2)
    ]  # robust to stray points
    xs = _edges(uv[:, 0], gx)
    blocks = []
    for i in range(gx):
        column = in_box(uv, [[xs[i], xs[i + 1]], [None, None]])
        ys = _edges(uv[column, 1], gy)
        for j in range(gy):
            box = [[xs[i], xs[i + 1]], [ys[j], ys[j + 1]]]
            big = _enlarge(box, extent, margin)
            inside = in_box(uv, big)

            def share(k: int, big: list = big, inside: np.ndarray = inside) -> float:
                if coverage is not None:
                    return coverage(k, lambda xyz: in_box(plane_coords(xyz, plan), big))
                return _coverage(scene, inside, k)

            images = [
                name
                for k, name in enumerate(scene.image_names)
                if in_box(centres[k : k + 1], big)[0] or share(k) >= content_threshold
            ]
            blocks.append(
                {
                    "id": f"{i}_{j}",
                    "box": box,
                    "enlarged": big,
                    "images": images,
                    "num_points": int(in_box(uv, box).sum()),
                }
            )
    plan["blocks"] = blocks
    plan["membership"] = "coarse model render" if coverage is not None else "SfM points"
    return plan


def block_points(scene: SceneData, plan: dict[str, Any], block: dict[str, Any], views: list[int]) -> np.ndarray:
    """``[P]`` bool: the SfM points a block's training starts from: those inside its enlarged
    box and those its training ``views`` observe (COLMAP's tracks; without tracks, the box's
    alone). Starting from the box's points alone, a block has nothing where its images show the
    neighbouring blocks, and grows floaters inside its own box to paint that content (VastGaussian's
    "airspace" problem); they survive the merge and cover the neighbours' Gaussians (skull, 2
    blocks of 600 steps: 20.7 dB merged with the box's points alone)."""
    keep = in_box(plane_coords(scene.points, plan), block["enlarged"])
    if scene.observations is not None:
        for i in views:
            keep[scene.observations[i][0]] = True
    return keep


def write_plan(plan: dict[str, Any], path: Path) -> Path:
    """Write ``blocks.json`` atomically."""
    with atomic_path(Path(path)) as tmp:
        tmp.write_text(json.dumps(plan, indent=2))
    return Path(path)


def load_plan(path: Path) -> dict[str, Any]:
    """Read a ``blocks.json``.

    Raises:
        DataFormatError: unreadable, not a plan, or another version.
    """
    try:
        plan = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise DataFormatError(f"{path}: not a readable blocks.json: {exc}") from exc
    if not isinstance(plan, dict) or plan.get("version") != PLAN_VERSION or not isinstance(plan.get("blocks"), list):
        raise DataFormatError(f"{path}: not a version-{PLAN_VERSION} blocks.json (written by splatforge blocks plan)")
    return plan


def find_block(plan: dict[str, Any], block_id: str, source: Path | str = "blocks.json") -> dict[str, Any]:
    """The block ``block_id`` of ``plan``.

    Raises:
        ConfigError: no such block (the message lists the plan's ids).
    """
    for block in plan["blocks"]:
        if block["id"] == block_id:
            return block
    raise ConfigError(f"{source}: no block {block_id!r}; the plan has {[b['id'] for b in plan['blocks']]}")
