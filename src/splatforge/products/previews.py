"""Preview images of a trained scene, for people and capture platforms that want a picture of
the result without loading the splat.

- ``preview_top.jpg``: a camera above the scene's centre looking straight down along the up
  axis, framing the whole footprint;
- ``preview_angle.jpg``: from an elevated corner, 45 degrees above the horizon, looking at the
  centre, the whole scene in frame;
- ``preview_orbit.mp4`` (on request): a 360 degree orbit at 30 degrees elevation.

The scene's extent is robust: the 2nd-98th percentiles of the means of the Gaussians that are
at least 10 % opaque, so a few floaters far away do not shrink the scene to a dot. The up axis
is estimated from the training cameras (the mean of their "up" vectors, ``-y`` in OpenCV camera
axes); without cameras it is ``-y`` of the world, COLMAP's usual convention. Cameras are
perspective with a 40 degree field of view; renders use :func:`splatforge.raster.rasterize`
on the device of the tensors (the CPU backend on CPU), with a near plane at
:data:`~splatforge.data.scene.NEAR_PLANE` (1 %) of each camera's distance from the scene's
centre (gsplat's near plane in its normalised world), so a scene in any units gets the same pictures.

When the training cameras' intrinsics are known, the previews show only what the capture
supports (:func:`preview_selection`): Gaussians that at least two training views see well
(blending weight ``sum alpha T`` of at least one pixel's worth in each, at half resolution):
floaters that one view explains, or none (typical of random initialisation and short runs), would
otherwise fill views from outside the capture. (The visibility score of
:mod:`splatforge.products.visibility`, the 2nd-best view's transmittance *in front of* a
Gaussian, is not used: it drops the second layer of every surface, and the previews turn glassy.)
For captures made from inside a space (the cameras stand within the footprint of the scene, as in a
room scanned with a phone), what lies above the cameras' height band is cut away too, so that the
top-down view shows the floor plan and not the ceiling.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from splatforge._fs import atomic_path
from splatforge.data.scene import NEAR_PLANE, world_unit
from splatforge.errors import SplatforgeError
from splatforge.geometry.cameras import look_at
from splatforge.model import Splats
from splatforge.raster.constants import DEFAULT_NEAR_PLANE

log = logging.getLogger(__name__)

__all__ = [
    "SceneFrame",
    "capture_side",
    "captured_from_inside",
    "contributing",
    "estimate_up",
    "preview_cameras",
    "preview_selection",
    "render_view",
    "scene_frame",
    "write_previews",
]

FOV_DEG = 40.0
MIN_VIEW_WEIGHT = 0.05
"""A Gaussian is seen by a training view when its blending weight there, at half resolution,
is at least this (a twentieth of a pixel's worth)."""
BOX_MARGIN = 1.25
"""Previews keep the Gaussians inside the scene's robust box (:func:`scene_frame` of those seen
twice) enlarged by this factor."""


def estimate_up(camtoworlds: np.ndarray | None) -> np.ndarray:
    """World up direction ``[3]`` (unit) from ``camtoworlds [N, 4, 4]`` (OpenCV axes): the
    normalised mean of the cameras' ``-y`` axes; ``(0, -1, 0)`` without cameras."""
    if camtoworlds is None or len(camtoworlds) == 0:
        return np.array([0.0, -1.0, 0.0])
    up = -np.asarray(camtoworlds)[:, :3, 1].mean(axis=0)
    norm = np.linalg.norm(up)
    return up / norm if norm > 1e-6 else np.array([0.0, -1.0, 0.0])


@dataclass
class SceneFrame:
    """Robust extent of a scene: ``center [3]``, orthonormal ``axes [3, 3]`` (rows: horizontal
    major, horizontal minor, up) and ``half_extent [3]`` along them (world units)."""

    center: np.ndarray
    axes: np.ndarray
    half_extent: np.ndarray

    @property
    def radius(self) -> float:
        return float(np.linalg.norm(self.half_extent))


def scene_frame(splats: Splats | dict, up: np.ndarray, lo: float = 2.0, hi: float = 98.0) -> SceneFrame:
    """Robust bounds of the means of ``splats`` (:class:`~splatforge.model.Splats`) in a frame
    whose third axis is ``up``; the horizontal axes are the principal directions of the footprint.

    Raises:
        ValueError: no finite mean.
    """
    splats = Splats.from_mapping(splats).numpy()
    means = np.asarray(splats.means, dtype=np.float64)
    alpha = splats.alphas()
    finite = np.isfinite(means).all(axis=1) & np.isfinite(alpha)
    if not finite.any():
        raise ValueError("no Gaussian has a finite position")
    solid = finite & (alpha >= 0.1)
    pts = means[solid] if solid.sum() >= 10 else means[finite]
    up = up / np.linalg.norm(up)
    ref = np.array([1.0, 0.0, 0.0]) if abs(up[0]) < 0.9 else np.array([0.0, 0.0, 1.0])
    e1 = np.cross(up, ref)
    e1 /= np.linalg.norm(e1)
    e2 = np.cross(up, e1)
    med = np.median(pts, axis=0)
    flat = (pts - med) @ np.stack([e1, e2]).T
    _, vecs = np.linalg.eigh(np.cov(flat.T) + 1e-12 * np.eye(2))
    major = vecs[:, 1] @ np.stack([e1, e2])
    minor = np.cross(up, major)
    axes = np.stack([major, minor, up])
    local = pts @ axes.T
    low, high = np.percentile(local, lo, axis=0), np.percentile(local, hi, axis=0)
    center = ((low + high) / 2) @ axes
    return SceneFrame(center, axes, np.maximum((high - low) / 2, 1e-6))


def _look_at(eye: np.ndarray, target: np.ndarray, image_up: np.ndarray) -> np.ndarray:
    """world-to-camera ``[4, 4]``, OpenCV axes (z forward, y down)."""
    return np.linalg.inv(look_at(eye, target, image_up))


def _intrinsics(size: int) -> np.ndarray:
    """``[3, 3]`` pixels: a ``size x size`` image with a ``FOV_DEG`` field of view."""
    f = (size / 2) / np.tan(np.radians(FOV_DEG) / 2)
    return np.array([[f, 0, size / 2], [0, f, size / 2], [0, 0, 1.0]])


def _sphere_distance(frame: SceneFrame) -> float:
    """Distance from the centre at which the bounding sphere fits the field of view (5 % margin)."""
    return 1.05 * frame.radius / np.sin(np.radians(FOV_DEG) / 2)


def capture_side(camtoworlds: np.ndarray | None, frame: SceneFrame) -> np.ndarray | None:
    """Unit horizontal direction ``[3]`` from the scene's centre towards the side the cameras
    stand on, or None when they surround it (an orbit: the mean offset is under a third of the
    mean distance)."""
    if camtoworlds is None or len(camtoworlds) == 0:
        return None
    offsets = (np.asarray(camtoworlds)[:, :3, 3] - frame.center) @ frame.axes[:2].T
    mean = offsets.mean(axis=0)
    if np.linalg.norm(mean) < np.linalg.norm(offsets, axis=1).mean() / 3:
        return None
    return (mean / np.linalg.norm(mean)) @ frame.axes[:2]


def preview_cameras(
    frame: SceneFrame, size: int, side: np.ndarray | None = None
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{"top": (viewmat, K), "angle": (viewmat, K)}`` for a ``size x size`` image, framing the
    robust bounds (see the module docstring). ``side`` (unit, horizontal; :func:`capture_side`)
    puts the angled view on the side the capture was made from (a wall-mounted object is not
    seen from behind the wall); default: the corner between the two horizontal axes."""
    K = _intrinsics(size)
    tan_half = np.tan(np.radians(FOV_DEG) / 2)
    major, minor, up = frame.axes
    hx, hy, hz = frame.half_extent
    # top: the footprint's half diagonal fits the half field of view, 10 % margin, above the top.
    top_dist = hz + 1.1 * max(hx, hy) / tan_half
    top = _look_at(frame.center + up * top_dist, frame.center, image_up=major if side is None else side)
    # angle: 45 degrees above the horizon; the bounding sphere fits the field of view.
    horiz = (major + minor) / np.sqrt(2) if side is None else side
    direction = np.cos(np.radians(45)) * horiz + np.sin(np.radians(45)) * up
    angle = _look_at(frame.center + direction * _sphere_distance(frame), frame.center, image_up=up)
    return {"top": (top, K), "angle": (angle, K)}


def render_view(
    splats: Splats | dict,
    viewmat: np.ndarray,
    K: np.ndarray,
    width: int,
    height: int,
    background: float = 0.0,
    device: str | torch.device = "cpu",
    near_plane: float = DEFAULT_NEAR_PLANE,
) -> np.ndarray:
    """Render ``splats`` (:class:`~splatforge.model.Splats`, numpy or torch) from one camera
    (``viewmat [4, 4]`` world-to-camera, OpenCV axes; ``K [3, 3]`` pixels; ``near_plane`` world
    units) on ``device``; returns ``[H, W, 3]`` float32 RGB in [0, 1]."""
    t = lambda a: torch.tensor(np.asarray(a, dtype=np.float32), device=device)
    with torch.no_grad():
        img, _, _ = (
            Splats.from_mapping(splats)
            .torch(device)
            .rasterize(
                t(viewmat)[None],
                t(K)[None],
                width,
                height,
                backgrounds=torch.full((1, 3), background, device=device),
                near_plane=near_plane,
            )
        )
    return img[0].clamp(0, 1).cpu().numpy()


def contributing(
    splats: Splats | dict,
    camtoworlds: np.ndarray,
    Ks: np.ndarray,
    width: int,
    height: int,
    min_weight: float = 1.0,
    scale: float = 0.5,
    min_views: int = 1,
    batch: int = 8,
) -> np.ndarray:
    """``[N]`` bool: Gaussians whose blending weight ``sum_p alpha_i T_i`` reaches ``min_weight``
    in at least ``min_views`` of the training views (``camtoworlds [V,4,4]`` OpenCV, ``Ks
    [V,3,3]`` pixels at ``width x height``), rendered at ``scale``. The weight is the gradient of
    the summed render with respect to a per-Gaussian scalar colour (exact, any backend); with
    ``min_views == 1`` views are rendered ``batch`` at a time (the weight then sums over a batch).
    The near plane is :data:`~splatforge.data.scene.NEAR_PLANE` world units of these cameras, as
    in training."""
    from splatforge.raster import rasterize

    t = lambda a: torch.tensor(np.asarray(a, dtype=np.float32))
    a = Splats.from_mapping(splats).detach().torch("cpu").activated(0)
    means, quats, scales, opac = a.means, a.quats, a.scales, a.opacities
    n = means.shape[0]
    K = t(Ks).clone()
    K[:, :2] *= scale
    viewmats = t(np.linalg.inv(camtoworlds))
    w, h = max(1, int(round(width * scale))), max(1, int(round(height * scale)))  # noqa: RUF046
    step = batch if min_views == 1 else 1
    near = NEAR_PLANE * world_unit(camtoworlds)
    views = torch.zeros(n, dtype=torch.int32)
    for i in range(0, len(viewmats), step):
        feature = torch.zeros(n, 1, requires_grad=True)
        img, _, _ = rasterize(
            means, quats, scales, opac, feature, viewmats[i : i + step], K[i : i + step], w, h, near_plane=near
        )
        img.sum().backward()
        views += (feature.grad[:, 0] >= min_weight).int()
    return (views >= min_views).numpy()


def captured_from_inside(camtoworlds: np.ndarray, frame: SceneFrame) -> bool:
    """Whether the cameras stand inside the scene's footprint (a room scanned from within)
    rather than around it (an object orbited): the median horizontal distance of the camera
    centres from the scene's centre is under 0.6 of the footprint's larger half-extent (an orbit
    stands well outside what it looks at). ``frame`` as :func:`scene_frame` gives it."""
    centres = np.asarray(camtoworlds)[:, :3, 3] - frame.center
    horiz = centres @ frame.axes[:2].T
    dist = float(np.median(np.linalg.norm(horiz, axis=1)))
    return dist < 0.6 * float(max(frame.half_extent[0], frame.half_extent[1]))


def preview_selection(
    splats: Splats | dict, camtoworlds: np.ndarray, Ks: np.ndarray, width: int, height: int
) -> tuple[np.ndarray, dict]:
    """``([N] bool, notes)``: the Gaussians the previews show (module docstring): those that
    contribute to at least two training views, and, for a capture made from inside, not above the
    top of the cameras' height band (their 95th percentile along the up axis plus 5 % of the
    band's height). ``notes`` counts what each rule kept."""
    splats = Splats.from_mapping(splats).numpy()
    keep = contributing(
        splats, camtoworlds, Ks, width, height, min_weight=MIN_VIEW_WEIGHT, min_views=min(2, len(camtoworlds))
    )
    notes = {"num_gaussians": len(splats), "seen_twice": int(keep.sum())}
    up = estimate_up(camtoworlds)
    frame = scene_frame(splats.select(keep) if keep.sum() >= 10 else splats, up)
    local = (np.asarray(splats.means, np.float64) - frame.center) @ frame.axes.T
    inside_box = np.all(np.abs(local) <= BOX_MARGIN * frame.half_extent, axis=1)
    if (keep & inside_box).sum() >= 10:
        keep &= inside_box
    notes["in_box"] = int(keep.sum())
    notes["inside"] = captured_from_inside(camtoworlds, frame)
    if notes["inside"]:
        heights = np.asarray(camtoworlds)[:, :3, 3] @ frame.axes[2]
        lo, hi = np.percentile(heights, [5, 95])
        top = hi + 0.05 * max(hi - lo, 1e-6 * frame.radius)
        below = (np.asarray(splats.means, np.float64) @ frame.axes[2]) <= top
        if (keep & below).sum() >= 10:
            keep &= below
    notes["shown"] = int(keep.sum())
    return keep, notes


def _write_jpg(image: np.ndarray, path: Path) -> None:
    from PIL import Image

    with atomic_path(path) as tmp:
        Image.fromarray((np.clip(image, 0, 1) * 255 + 0.5).astype(np.uint8)).save(tmp, quality=92)


def _write_orbit(splats, frame: SceneFrame, size: int, path: Path, frames: int = 72, fps: int = 24) -> None:
    import av

    major, minor, up = frame.axes
    K, dist = _intrinsics(size), _sphere_distance(frame)
    with atomic_path(path) as tmp, av.open(str(tmp), mode="w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width = stream.height = size - size % 2
        stream.pix_fmt = "yuv420p"
        for i in range(frames):
            a = 2 * np.pi * i / frames
            horiz = np.cos(a) * major + np.sin(a) * minor
            eye = frame.center + dist * (np.cos(np.radians(30)) * horiz + np.sin(np.radians(30)) * up)
            img = render_view(
                splats,
                _look_at(eye, frame.center, up),
                K,
                stream.width,
                stream.height,
                near_plane=NEAR_PLANE * dist,
            )
            vf = av.VideoFrame.from_ndarray((img * 255 + 0.5).astype(np.uint8), format="rgb24")
            for packet in stream.encode(vf):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def write_previews(
    splats: Splats | dict,
    out_dir: Path,
    *,
    camtoworlds: np.ndarray | None = None,
    Ks: np.ndarray | None = None,
    image_size: tuple[int, int] | None = None,
    size: int = 1024,
    orbit: bool = False,
    orbit_name: str = "preview_orbit.mp4",
    prefix: str = "preview",
) -> dict[str, str | None]:
    """Write ``<prefix>_top.jpg`` and ``<prefix>_angle.jpg`` (``preview_`` by default; and the
    orbit video ``orbit_name``) into ``out_dir``. With ``camtoworlds``, ``Ks`` and ``image_size`` (width, height) of the
    training views, only the Gaussians of :func:`preview_selection` are shown. A preview that
    fails to render is logged as a warning and reported as ``None``; this function never raises
    for a rendering failure, so pipelines keep going."""
    out_dir = Path(out_dir)
    splats = Splats.from_mapping(splats).numpy()
    result: dict[str, str | None] = {f"{prefix}_top": None, f"{prefix}_angle": None}
    if camtoworlds is not None and Ks is not None and image_size is not None:
        try:
            keep, notes = preview_selection(splats, camtoworlds, Ks, *image_size)
            log.info("previews: %s", notes)
            if keep.sum() >= 10:
                splats = splats.select(keep)
        except (RuntimeError, ValueError, MemoryError, SplatforgeError) as exc:
            log.warning("previews: floater filtering skipped: %s", exc)
    try:
        frame = scene_frame(splats, estimate_up(camtoworlds))
        cams = preview_cameras(frame, size, capture_side(camtoworlds, frame))
    except (ValueError, np.linalg.LinAlgError, IndexError) as exc:
        log.warning("previews skipped: cannot frame the scene: %s", exc)
        return result
    for name, (viewmat, K) in cams.items():
        path = out_dir / f"{prefix}_{name}.jpg"
        try:
            near = NEAR_PLANE * float(np.linalg.norm(np.linalg.inv(viewmat)[:3, 3] - frame.center))
            _write_jpg(render_view(splats, viewmat, K, size, size, near_plane=near), path)
            result[f"{prefix}_{name}"] = str(path)
        except (RuntimeError, ValueError, MemoryError, OSError, SplatforgeError) as exc:
            log.warning("%s: preview failed: %s", path, exc)
    if orbit:
        path = out_dir / orbit_name
        result["preview_orbit"] = None
        try:
            _write_orbit(splats, frame, min(size, 512), path)
            result["preview_orbit"] = str(path)
        except (RuntimeError, ValueError, MemoryError, OSError, SplatforgeError) as exc:
            log.warning("%s: orbit video failed: %s", path, exc)
    return result
