"""Monocular depth priors aligned to the SfM points, in Inria's layout.

A depth prior folder holds one inverse-depth map per image and ``depth_params.json``:

- ``<image name without its suffix>.png``: 16-bit inverse depth, the value ``v / 2**16`` being the
  relative inverse depth (Inria's ``utils/make_depth_scale.py`` and ``scene/cameras.py`` read it
  so; 8-bit PNGs are read as ``v / 2**8``, CityGaussian's ``.npy`` float maps as they are).
- ``depth_params.json``: ``{"<stem>": {"scale": s, "offset": t}}`` mapping a map's value ``m`` to
  the SfM's inverse depth (1 / world units): ``s * m + t``.

The scale and offset are fitted as Inria's ``make_depth_scale.py`` does: per image, the COLMAP
points it observes (a valid ``point3D_id``, positive depth, inside the image) give the SfM inverse
depth ``1/z``, the map is sampled bilinearly at their keypoints, and
``scale = mean|inv_sfm - median(inv_sfm)| / mean|inv_mono - median(inv_mono)|``,
``offset = median(inv_sfm) - scale * median(inv_mono)``; ``scale = offset = 0`` (the image is
then unreliable) with 10 points or fewer, or an SfM inverse-depth range of at most 1e-3.
Keypoints are in COLMAP's pixel convention (pixel centres at +0.5): they are sampled at
``xy - 0.5`` in OpenCV's (Inria samples at ``xy``, half a pixel off).

Where a scene carries no observations (transforms.json with a point cloud), the points that
project inside the image in front of the camera stand in for them.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from splatforge._fs import atomic_path, staging_dir
from splatforge.data.scene import SceneData
from splatforge.errors import ConfigError, DataFormatError

log = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_DEPTH_MODEL",
    "PNG_SCALE",
    "DepthFit",
    "depth_file",
    "depth_key",
    "depth_neighbours",
    "fit_depth_folder",
    "fit_depth_scale",
    "load_depth_model",
    "make_depth_priors",
    "multiview_depth_mask",
    "predict_inverse_depth",
    "read_depth_params",
    "read_inverse_depth",
    "reliable_views",
    "sfm_inverse_depths",
    "write_depth_params",
    "write_inverse_depth_png",
]

#: Depth Anything V2 Small (Apache-2.0). Base and Large (``-Base-hf``, ``-Large-hf``) are CC-BY-NC-4.0.
DEFAULT_DEPTH_MODEL = "depth-anything/Depth-Anything-V2-Small-hf"
#: A 16-bit map's value ``v`` is the inverse depth ``v / PNG_SCALE`` (Inria's convention).
PNG_SCALE = 2**16
#: Inria's thresholds: fewer points than this, or an inverse-depth range below the other, give no fit.
MIN_POINTS = 10
MIN_INV_RANGE = 1e-3
#: An image whose scale is outside this factor range of the median positive scale is unreliable.
RELIABLE_RANGE = (0.2, 5.0)


@dataclass
class DepthFit:
    """One image's alignment: SfM inverse depth (1 / world units) = ``scale * map + offset``,
    fitted from ``num_points`` SfM points (-1: unknown, from a file without the count);
    ``scale == 0``: no fit (the image is unreliable)."""

    scale: float
    offset: float
    num_points: int


def sfm_inverse_depths(scene: SceneData, index: int) -> tuple[np.ndarray, np.ndarray]:
    """The sparse SfM inverse depths of view ``index``: ``xy [M, 2]`` pixels at the loaded
    resolution (COLMAP's convention, pixel centres at +0.5) and ``inv [M]`` = 1 / camera z (1 /
    world units), for the points the view observes with positive depth inside the image.

    Uses ``scene.observations`` (COLMAP's tracks) when present, else every point projecting
    inside the image in front of the camera."""
    w, h = int(scene.widths[index]), int(scene.heights[index])
    if scene.observations is not None:
        rows, xy = scene.observations[index]
        _, z = _project(scene.points[rows].astype(np.float64), scene.Ks[index], scene.camtoworlds[index])
    else:
        xy, z = _project(scene.points.astype(np.float64), scene.Ks[index], scene.camtoworlds[index])
    xy = np.asarray(xy, np.float64).reshape(-1, 2)
    ok = (z > 0) & (xy[:, 0] >= 0) & (xy[:, 1] >= 0) & (xy[:, 0] < w) & (xy[:, 1] < h)
    return xy[ok], 1.0 / z[ok]


def _sample(map_: np.ndarray, xy: np.ndarray) -> np.ndarray:
    """Bilinear samples of ``map_ [H, W]`` at ``xy [M, 2]`` (pixel centres at +0.5), edges replicated."""
    coords = (xy - 0.5).astype(np.float32).reshape(-1, 1, 2)
    return cv2.remap(
        map_.astype(np.float32), coords[..., 0], coords[..., 1], cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE
    ).reshape(-1)


def fit_depth_scale(inv_map: np.ndarray, xy: np.ndarray, inv_sfm: np.ndarray) -> DepthFit:
    """Scale and offset taking the relative inverse depth ``inv_map [H, W]`` to the SfM's (see the
    module docstring: Inria's median/deviation fit). ``xy [M, 2]`` are pixels of ``inv_map``'s
    resolution, ``inv_sfm [M]`` their SfM inverse depths. No fit: ``DepthFit(0, 0, M)``."""
    m = len(inv_sfm)
    if m <= MIN_POINTS or float(np.ptp(inv_sfm)) <= MIN_INV_RANGE:
        return DepthFit(0.0, 0.0, m)
    inv_mono = _sample(inv_map, xy).astype(np.float64)
    t_sfm, t_mono = np.median(inv_sfm), np.median(inv_mono)
    dev_mono = np.mean(np.abs(inv_mono - t_mono))
    if not dev_mono > 0:
        return DepthFit(0.0, 0.0, m)
    scale = float(np.mean(np.abs(inv_sfm - t_sfm)) / dev_mono)
    return DepthFit(scale, float(t_sfm - scale * t_mono), m)


def write_inverse_depth_png(path: Path, inv: np.ndarray) -> np.ndarray:
    """Write a relative inverse depth ``[H, W]`` (any positive scale) as Inria's 16-bit PNG,
    normalised so its maximum is the largest value (65535); returns the map as it reads back
    (``v / 2**16``), the values a fit must use."""
    inv = np.nan_to_num(np.asarray(inv, np.float64), nan=0.0, posinf=0.0, neginf=0.0).clip(min=0.0)
    top = float(inv.max())
    q = np.zeros(inv.shape, np.uint16) if top <= 0 else np.round(inv / top * (PNG_SCALE - 1)).astype(np.uint16)
    with atomic_path(path) as tmp:  # the temporary name ends in .png: OpenCV picks the format from it
        if not cv2.imwrite(str(tmp), q):
            raise OSError(f"{path}: OpenCV could not write the PNG")
    return q.astype(np.float32) / PNG_SCALE


def read_inverse_depth(path: Path) -> np.ndarray:
    """An inverse-depth map ``[H, W]`` float32: 16-bit PNG as ``v / 2**16``, 8-bit as ``v / 2**8``
    (first channel of a colour PNG), ``.npy`` as stored.

    Raises:
        DataFormatError: unreadable file or not a single-channel map.
    """
    path = Path(path)
    if path.suffix == ".npy":
        try:
            arr = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise DataFormatError(f"{path}: not a readable .npy depth map: {exc}") from exc
        arr = np.squeeze(arr)
        if arr.ndim != 2 or not np.issubdtype(arr.dtype, np.number):
            raise DataFormatError(f"{path}: a depth map must be a 2-D numeric array, got {arr.dtype} {arr.shape}")
        return arr.astype(np.float32)
    arr = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if arr is None:
        raise DataFormatError(f"{path}: not a readable image")
    if arr.ndim == 3:
        arr = arr[..., 0]
    if arr.dtype == np.uint16:
        return arr.astype(np.float32) / PNG_SCALE
    if arr.dtype == np.uint8:
        return arr.astype(np.float32) / 2**8
    raise DataFormatError(f"{path}: depth PNGs must be 8- or 16-bit, got {arr.dtype}")


def depth_key(image_name: str) -> str:
    """The ``depth_params.json`` key / file stem of an image: its name without the suffix
    (subfolders kept, as Inria does)."""
    return str(Path(image_name).with_suffix("")).replace(os.sep, "/")


def depth_file(folder: Path, image_name: str) -> Path | None:
    """The map of ``image_name`` in ``folder``: ``<name without suffix>.png`` or ``.npy``, or the
    bare stem at the top of the folder; None when there is none."""
    folder = Path(folder)
    for stem in (depth_key(image_name), Path(image_name).stem):
        for ext in (".png", ".npy"):
            p = folder / f"{stem}{ext}"
            if p.is_file():
                return p
    return None


def read_depth_params(path: Path) -> dict[str, DepthFit]:
    """``depth_params.json`` as ``{key: DepthFit}`` (``num_points`` -1 when the file has none).

    Raises:
        DataFormatError: unreadable file or entries without numeric ``scale`` and ``offset``.
    """
    try:
        raw = json.loads(Path(path).read_text())
        return {
            str(k): DepthFit(float(v["scale"]), float(v["offset"]), int(v.get("num_points", -1)))
            for k, v in raw.items()
        }
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise DataFormatError(f"{path}: not a depth_params.json of {{name: {{scale, offset}}}}: {exc}") from exc


def write_depth_params(path: Path, fits: dict[str, DepthFit]) -> None:
    """Write ``depth_params.json`` (Inria's keys, plus ``num_points``), atomically."""
    data = {k: {"scale": f.scale, "offset": f.offset, "num_points": f.num_points} for k, f in sorted(fits.items())}
    with atomic_path(Path(path)) as tmp:
        tmp.write_text(json.dumps(data, indent=1))


def reliable_views(keys: list[str], fits: dict[str, DepthFit]) -> list[bool]:
    """Per key, whether its prior may supervise training (Inria's rule): a fit exists and its
    scale is within ``RELIABLE_RANGE`` times the median positive scale. A missing key is
    unreliable (Inria then uses the raw map silently; here it is not used)."""
    positive = [f.scale for f in fits.values() if f.scale > 0]
    if not positive:
        return [False] * len(keys)
    med = float(np.median(positive))
    lo, hi = RELIABLE_RANGE
    return [k in fits and lo * med <= fits[k].scale <= hi * med for k in keys]


# ---------------------------------------------------------------------------------- multi-view filter


def depth_neighbours(
    camtoworlds: np.ndarray, index: int, max_neighbours: int = 8, max_angle_deg: float = 30.0
) -> list[int]:
    """Up to ``max_neighbours`` other views whose viewing direction (camera +z) is within
    ``max_angle_deg`` of view ``index``'s, nearest camera centre first (CityGS-X's
    ``multi_view_precess.py``)."""
    z = camtoworlds[:, :3, 2] / np.linalg.norm(camtoworlds[:, :3, 2], axis=1, keepdims=True)
    c = camtoworlds[:, :3, 3]
    ok = (z @ z[index] > np.cos(np.radians(max_angle_deg))) & (np.arange(len(z)) != index)
    cand = np.flatnonzero(ok)
    return [
        int(j) for j in cand[np.argsort(np.linalg.norm(c[cand] - c[index], axis=1), kind="stable")][:max_neighbours]
    ]


def _backproject(depth: np.ndarray, K: np.ndarray, c2w: np.ndarray, uv: np.ndarray) -> np.ndarray:
    """World points ``[M, 3]`` of pixels ``uv [M, 2]`` (centres at +0.5) at camera-z ``depth [M]``."""
    x = (uv[:, 0] - K[0, 2]) / K[0, 0] * depth
    y = (uv[:, 1] - K[1, 2]) / K[1, 1] * depth
    return np.stack([x, y, depth], axis=1) @ c2w[:3, :3].T + c2w[:3, 3]


def _project(points: np.ndarray, K: np.ndarray, c2w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    w2c = np.linalg.inv(c2w)
    cam = points @ w2c[:3, :3].T + w2c[:3, 3]
    z = cam[:, 2]
    with np.errstate(divide="ignore", invalid="ignore"):
        uv = np.stack([K[0, 0] * cam[:, 0] / z + K[0, 2], K[1, 1] * cam[:, 1] / z + K[1, 2]], axis=1)
    return uv, z


def multiview_depth_mask(
    depth_of: Callable[[int], np.ndarray | None],
    camtoworlds: np.ndarray,
    Ks: np.ndarray,
    index: int,
    threshold_px: float = 1.0,
    max_neighbours: int = 8,
    max_angle_deg: float = 30.0,
) -> np.ndarray:
    """Which pixels of view ``index``'s depth agree with its neighbours' (CityGS-X's multi-view
    check): each pixel is back-projected with its depth, projected into a neighbour (each camera
    with its own intrinsics; CityGS-X reuses the reference's), the neighbour's depth read there
    (nearest pixel), back-projected and projected back into view ``index``; the pixel is kept
    when that round trip lands within ``threshold_px`` pixels in more than one neighbour.

    Args:
        depth_of: view index -> camera-z depth ``[H, W]`` (world units; <= 0 or non-finite is no
            depth), or None for a view without one.
        camtoworlds, Ks: ``[N, 4, 4]`` (OpenCV axes) and ``[N, 3, 3]`` at the maps' resolution.

    Returns:
        ``[H, W]`` bool mask of view ``index``.
    """
    d0 = depth_of(index)
    if d0 is None:
        raise ValueError(f"view {index} has no depth")
    H, W = d0.shape
    vv, uu = np.mgrid[0:H, 0:W]
    uv = np.stack([uu.ravel() + 0.5, vv.ravel() + 0.5], axis=1).astype(np.float64)
    dep = d0.ravel().astype(np.float64)
    valid = np.isfinite(dep) & (dep > 0)
    world = _backproject(np.where(valid, dep, 1.0), Ks[index], camtoworlds[index], uv)
    votes = np.zeros(H * W, np.int32)
    for j in depth_neighbours(camtoworlds, index, max_neighbours, max_angle_deg):
        dj = depth_of(j)
        if dj is None:
            continue
        hj, wj = dj.shape
        uvj, zj = _project(world, Ks[j], camtoworlds[j])
        inside = valid & (zj > 0) & (uvj[:, 0] >= 0) & (uvj[:, 1] >= 0) & (uvj[:, 0] < wj) & (uvj[:, 1] < hj)
        cols = np.clip(np.nan_to_num(uvj[:, 0]), 0, wj - 1).astype(np.int64)
        rows = np.clip(np.nan_to_num(uvj[:, 1]), 0, hj - 1).astype(np.int64)
        dj_s = dj[rows, cols].astype(np.float64)
        ok = inside & np.isfinite(dj_s) & (dj_s > 0)
        back = _backproject(np.where(ok, dj_s, 1.0), Ks[j], camtoworlds[j], uvj)
        uv_back, z_back = _project(back, Ks[index], camtoworlds[index])
        err = np.linalg.norm(uv_back - uv, axis=1)
        votes += ok & (z_back > 0) & (err < threshold_px)
    return (votes > 1).reshape(H, W)


# ---------------------------------------------------------------------------------- Depth Anything


def load_depth_model(model_id: str = DEFAULT_DEPTH_MODEL, device: str = "cpu"):
    """Depth Anything (V2) through transformers: ``(image_processor, model)`` in eval mode on
    ``device``. ``model_id`` is a Hugging Face id (weights from the Hugging Face cache, fetched
    when the hub is reachable and ``HF_HUB_OFFLINE`` is not set) or a local folder.

    Raises:
        ConfigError: transformers is missing, or the weights are neither cached nor reachable
            (the message names the model id and how to fetch it).
    """
    from splatforge._torchvision import ensure_torchvision_importable

    ensure_torchvision_importable()  # transformers imports torchvision when it is installed
    try:
        from transformers import AutoImageProcessor, AutoModelForDepthEstimation
    except ImportError as exc:
        raise ConfigError(f"depth priors need transformers: pip install 'splatforge[depth]' ({exc})") from exc

    def load(local_only: bool):
        proc = AutoImageProcessor.from_pretrained(model_id, local_files_only=local_only)
        return proc, AutoModelForDepthEstimation.from_pretrained(model_id, local_files_only=local_only)

    try:
        proc, model = load(True)
    except OSError as first:
        if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
            raise ConfigError(_missing_model(model_id, first)) from first
        try:
            proc, model = load(False)
        except OSError as exc:
            raise ConfigError(_missing_model(model_id, exc)) from exc
    return proc, model.to(device).eval()


def _missing_model(model_id: str, exc: Exception) -> str:
    return (
        f"depth model {model_id!r} is not in the Hugging Face cache and could not be downloaded ({exc}). "
        f"Fetch it where there is internet with `huggingface-cli download {model_id}` and copy "
        f"~/.cache/huggingface/hub here (or set HF_HOME), or pass --model a local folder; "
        f"--depth-prior sfm needs no model"
    )


def predict_inverse_depth(proc, model, rgb: np.ndarray) -> np.ndarray:
    """The model's ``predicted_depth`` (relative inverse depth, never the 8-bit visualisation)
    for ``rgb [H, W, 3]`` uint8, resized to ``[H, W]`` by the processor's own post-processing."""
    import torch

    inputs = proc(images=rgb, return_tensors="pt")
    device = next(model.parameters()).device
    with torch.no_grad():
        out = model(pixel_values=inputs["pixel_values"].to(device))
    post = proc.post_process_depth_estimation(out, target_sizes=[rgb.shape[:2]])
    return post[0]["predicted_depth"].float().cpu().numpy()


def make_depth_priors(
    scene: SceneData,
    output: Path,
    model_id: str = DEFAULT_DEPTH_MODEL,
    device: str = "cpu",
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, DepthFit]:
    """Run Depth Anything on every view of ``scene`` and write the prior folder ``output`` (maps at
    the scene's loaded resolution and ``depth_params.json``). Written into a temporary folder
    beside ``output`` and renamed into place at the end: an interrupted run leaves nothing.

    Raises:
        ConfigError: see :func:`load_depth_model`.
    """
    from splatforge.data.images import load_image

    output = Path(output)
    proc, model = load_depth_model(model_id, device)
    fits: dict[str, DepthFit] = {}
    with staging_dir(output) as tmp:
        for i, name in enumerate(scene.image_names):
            rgb = (load_image(scene.image_paths[i], scene.background) * 255.0 + 0.5).astype(np.uint8)
            inv = predict_inverse_depth(proc, model, rgb)
            stored = write_inverse_depth_png(tmp / f"{depth_key(name)}.png", inv)
            xy, inv_sfm = sfm_inverse_depths(scene, i)
            fits[depth_key(name)] = fit_depth_scale(stored, xy, inv_sfm)
            if progress is not None:
                progress(i + 1, len(scene))
        write_depth_params(tmp / "depth_params.json", fits)
        (tmp / "prior.json").write_text(
            json.dumps({"model": model_id, "scene": str(scene.root), "size": "loaded images"})
        )
    return fits


def fit_depth_folder(scene: SceneData, folder: Path) -> dict[str, DepthFit]:
    """Scale and offset for an existing map folder (Inria's ``depths/``, CityGS-X's, CityGaussian's
    ``.npy``) that has no ``depth_params.json``: fitted here per image, maps at any resolution
    (keypoints scaled to it). Images without a map get no entry.

    Raises:
        DataFormatError: an unreadable map; no map for any image.
    """
    fits: dict[str, DepthFit] = {}
    for i, name in enumerate(scene.image_names):
        path = depth_file(folder, name)
        if path is None:
            continue
        inv = read_inverse_depth(path)
        xy, inv_sfm = sfm_inverse_depths(scene, i)
        s = np.array([inv.shape[1] / scene.widths[i], inv.shape[0] / scene.heights[i]])
        fits[depth_key(name)] = fit_depth_scale(inv, xy * s, inv_sfm)
    if not fits:
        raise DataFormatError(
            f"{folder}: no depth map for any of the scene's {len(scene)} images "
            f"(looked for <image name without suffix>.png / .npy)"
        )
    return fits
