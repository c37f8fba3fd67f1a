"""``transforms.json`` scenes (instant-ngp, nerfstudio, Blender/NeRF-synthetic, DL3DV).

``transform_matrix`` is camera-to-world in OpenGL axes (camera looks along -z, +y up); it is
converted to OpenCV axes by negating the camera's y and z axes. Intrinsics come from each frame
or the top level (``fl_x fl_y cx cy w h``), with ``camera_angle_x`` (and ``camera_angle_y``) as
the fallback, and are scaled to the size of the images actually loaded. OPENCV distortion
(``k1 k2 p1 p2`` [``k3``]) is removed with OpenCV into a cache folder outside the input, keeping
K. Images with alpha are composited over the background when loaded.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from pathlib import Path
from typing import Any

import numpy as np

from splatforge._fs import build_once
from splatforge.data.images import image_folder, image_size
from splatforge.data.scene import SceneData
from splatforge.errors import DataFormatError, UnsupportedCameraModel

log = logging.getLogger(__name__)

__all__ = ["read_transforms"]

_DIST_KEYS = ("k1", "k2", "p1", "p2", "k3")


def _get(frame: dict, meta: dict, key: str, default: Any = None) -> Any:
    return frame.get(key, meta.get(key, default))


def _resolve(root: Path, file_path: str) -> Path:
    p = (root / file_path).resolve() if not Path(file_path).is_absolute() else Path(file_path)
    if p.suffix or p.exists():
        return p
    for suffix in (".png", ".jpg", ".jpeg", ".JPG", ".PNG"):  # Blender scenes omit the suffix
        if p.with_suffix(suffix).exists():
            return p.with_suffix(suffix)
    return p


def read_transforms(
    root: Path,
    data_factor: int = 1,
    cache_dir: Path | None = None,
    background: tuple[float, float, float] | None = None,
    filename: str = "transforms.json",
) -> SceneData:
    """Read ``root/transforms.json``.

    Raises:
        DataFormatError: unreadable JSON, no frames, missing keys or images.
        UnsupportedCameraModel: fisheye or other non-OPENCV distortion.
    """
    root = Path(root)
    path = root / filename
    try:
        meta = json.loads(path.read_text())
        frames = meta["frames"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DataFormatError(f"{path}: not a readable transforms.json with a 'frames' list: {exc}") from exc
    if not frames:
        raise DataFormatError(f"{path}: 'frames' is empty")
    model = str(meta.get("camera_model", "OPENCV")).upper()
    if "FISHEYE" in model or "EQUIRECTANGULAR" in model:
        raise UnsupportedCameraModel(f"{path}: camera_model {model} is not supported; convert to OPENCV/PINHOLE first")

    records = []
    for i, frame in enumerate(frames):
        try:
            file_path = frame["file_path"]
            c2w = np.asarray(frame["transform_matrix"], dtype=np.float64)
        except (KeyError, TypeError, ValueError) as exc:
            raise DataFormatError(f"{path}: frame {i} lacks file_path/transform_matrix: {exc}") from exc
        if c2w.shape == (3, 4):
            c2w = np.vstack([c2w, [0.0, 0.0, 0.0, 1.0]])
        if c2w.shape != (4, 4) or not np.isfinite(c2w).all():
            raise DataFormatError(f"{path}: frame {i} ({file_path}) has a bad transform_matrix of shape {c2w.shape}")
        records.append((_resolve(root, file_path), frame, c2w))

    # Data factor: read the same names from <folder>_<k> (or a downscaled copy in the cache).
    if data_factor > 1:
        parents = {p.parent for p, _, _ in records}
        if len(parents) != 1:
            raise DataFormatError(f"{path}: --data-factor needs all frames in one folder, found {len(parents)}")
        parent = parents.pop()
        scaled = image_folder(parent.parent, data_factor, cache_dir, base=parent.name)
        records = [(scaled / p.name, f, c) for p, f, c in records]

    missing = [str(p) for p, _, _ in records if not p.exists()]
    if missing:
        raise DataFormatError(f"{path}: {len(missing)} of {len(records)} images are missing, e.g. {missing[:3]}")

    records.sort(key=lambda r: r[0].name)
    names, paths, c2ws, Ks, widths, heights, dists = [], [], [], [], [], [], []
    for p, frame, c2w in records:
        w_img, h_img = image_size(p)
        w = float(_get(frame, meta, "w", w_img * data_factor))
        h = float(_get(frame, meta, "h", h_img * data_factor))
        fx = _get(frame, meta, "fl_x")
        if fx is None:
            angle_x = _get(frame, meta, "camera_angle_x")
            if angle_x is None:
                raise DataFormatError(f"{path}: frame {p.name} has neither fl_x nor camera_angle_x")
            fx = 0.5 * w / math.tan(0.5 * float(angle_x))
        fy = _get(frame, meta, "fl_y", fx)  # square pixels unless told otherwise
        cx, cy = float(_get(frame, meta, "cx", w / 2.0)), float(_get(frame, meta, "cy", h / 2.0))
        sx, sy = w_img / w, h_img / h
        K = np.array([[float(fx) * sx, 0.0, cx * sx], [0.0, float(fy) * sy, cy * sy], [0.0, 0.0, 1.0]])
        c2w = c2w.copy()
        c2w[:3, 1:3] *= -1.0  # OpenGL (x right, y up, z back) -> OpenCV (x right, y down, z forward)
        names.append(p.name)
        paths.append(p)
        c2ws.append(c2w)
        Ks.append(K)
        widths.append(w_img)
        heights.append(h_img)
        dists.append([float(_get(frame, meta, k, 0.0)) for k in _DIST_KEYS])

    dists_arr = np.array(dists)
    if np.any(dists_arr != 0.0):
        paths = _undistort(path, paths, np.stack(Ks), dists_arr, cache_dir)
    return SceneData(
        root=root,
        source="transforms",
        image_names=names,
        image_paths=paths,
        camtoworlds=np.stack(c2ws),
        Ks=np.stack(Ks),
        widths=np.array(widths),
        heights=np.array(heights),
        points=np.zeros((0, 3), np.float32),
        points_rgb=np.zeros((0, 3), np.uint8),
        background=background,
    )


def _undistort(path: Path, paths: list[Path], Ks: np.ndarray, dists: np.ndarray, cache_dir: Path | None) -> list[Path]:
    """Remove OPENCV distortion (same K) into ``cache_dir/undistorted/<hash>/``, once."""
    import cv2

    if cache_dir is None:
        raise UnsupportedCameraModel(
            f"{path}: images have OPENCV distortion; pass cache_dir so they can be undistorted"
        )
    digest = hashlib.sha1(
        json.dumps([str(path.resolve()), [str(p) for p in paths], Ks.tolist(), dists.tolist()]).encode()
    )

    def build(tmp: Path) -> None:
        log.info("undistorting %d images of %s", len(paths), path)
        for p, K, d in zip(paths, Ks, dists):
            img = cv2.imread(str(p), cv2.IMREAD_UNCHANGED)
            if img is None:
                raise DataFormatError(f"{p}: not a readable image")
            cv2.imwrite(str(tmp / (p.stem + ".png")), cv2.undistort(img, K, d))  # lossless, keeps alpha

    out = build_once(Path(cache_dir) / "undistorted" / digest.hexdigest()[:16], build)
    return [out / (p.stem + ".png") for p in paths]
