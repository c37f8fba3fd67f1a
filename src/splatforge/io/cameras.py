"""``cameras.json`` in Inria's 3DGS layout (``utils/camera_utils.py::camera_to_JSON``), and
COLMAP models of given poses (written with pycolmap).

One entry per view: ``id``, ``img_name`` (file name without extension), ``width``, ``height``
(pixels), ``position`` (camera centre, world), ``rotation`` (3x3 camera-to-world rotation, rows,
OpenCV camera axes), ``fx``, ``fy`` (pixels).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from splatforge._fs import atomic_path, staging_dir

__all__ = ["cameras_json", "read_cameras_json", "write_cameras_json", "write_colmap_model"]


def cameras_json(names, camtoworlds: np.ndarray, Ks: np.ndarray, widths, heights) -> list[dict]:
    """Entries for views ``names`` with ``camtoworlds [N, 4, 4]`` and ``Ks [N, 3, 3]``."""
    return [
        {
            "id": i,
            "img_name": Path(name).stem,
            "width": int(w),
            "height": int(h),
            "position": c2w[:3, 3].tolist(),
            "rotation": c2w[:3, :3].tolist(),
            "fy": float(K[1, 1]),
            "fx": float(K[0, 0]),
        }
        for i, (name, c2w, K, w, h) in enumerate(zip(names, camtoworlds, Ks, widths, heights))
    ]


def write_cameras_json(path: Path, entries: list[dict]) -> None:
    """Write the entries atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(entries, indent=1))


def read_cameras_json(path: Path) -> tuple[np.ndarray, np.ndarray, list[str], np.ndarray]:
    """Read Inria's ``cameras.json``: ``camtoworlds [N, 4, 4]`` (OpenCV axes), ``Ks [N, 3, 3]``
    (pixels; principal point at the image centre, which the format does not store), image names
    and ``sizes [N, 2]`` int (width, height) in pixels.

    Raises:
        DataFormatError: unreadable JSON or entries without position/rotation/fx/fy/width/height.
    """
    from splatforge.errors import DataFormatError

    try:
        entries = json.loads(Path(path).read_text())
        c2w = np.tile(np.eye(4), (len(entries), 1, 1))
        Ks = np.tile(np.eye(3), (len(entries), 1, 1))
        sizes = np.zeros((len(entries), 2), np.int64)
        for i, e in enumerate(entries):
            c2w[i, :3, :3] = np.asarray(e["rotation"], dtype=np.float64)
            c2w[i, :3, 3] = np.asarray(e["position"], dtype=np.float64)
            Ks[i, 0, 0], Ks[i, 1, 1] = e["fx"], e["fy"]
            Ks[i, 0, 2], Ks[i, 1, 2] = e["width"] / 2, e["height"] / 2
            sizes[i] = e["width"], e["height"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DataFormatError(f"{path}: not a readable cameras.json: {exc}") from exc
    return c2w, Ks, [str(e.get("img_name", i)) for i, e in enumerate(entries)], sizes


def write_colmap_model(
    path: Path,
    names,
    camtoworlds: np.ndarray,
    Ks: np.ndarray,
    widths,
    heights,
    points: np.ndarray | None = None,
    points_rgb: np.ndarray | None = None,
) -> Path:
    """Write a COLMAP model (``cameras.bin``, ``images.bin``, ``points3D.bin``, and the rig and
    frame files of COLMAP 3.12+) into the folder ``path`` (replaced whole, atomically): one
    ``PINHOLE`` camera per distinct ``(K [3, 3], width, height)`` (pixels), image ``i`` named
    ``names[i]`` with the pose ``inv(camtoworlds[i])`` (``[N, 4, 4]``, OpenCV axes, as COLMAP's
    ``cam_from_world``), and ``points [P, 3]`` (world) with ``points_rgb [P, 3]`` uint8 as 3D
    points without tracks. Returns ``path``."""
    import pycolmap

    rec = pycolmap.Reconstruction()
    cameras: dict[tuple, int] = {}
    for i, (name, c2w, K, w, h) in enumerate(zip(names, camtoworlds, Ks, widths, heights)):
        key = (float(K[0, 0]), float(K[1, 1]), float(K[0, 2]), float(K[1, 2]), int(w), int(h))
        if key not in cameras:
            cameras[key] = len(cameras) + 1
            rec.add_camera_with_trivial_rig(
                pycolmap.Camera(
                    model="PINHOLE", width=key[4], height=key[5], params=list(key[:4]), camera_id=cameras[key]
                )
            )
        w2c = np.linalg.inv(np.asarray(c2w, dtype=np.float64))
        image = pycolmap.Image(name=str(name), camera_id=cameras[key], image_id=i + 1)
        rec.add_image_with_trivial_frame(image, pycolmap.Rigid3d(w2c[:3, :4]))
    if points is not None:
        rgb = np.zeros((len(points), 3), np.uint8) if points_rgb is None else np.asarray(points_rgb, np.uint8)
        for xyz, c in zip(np.asarray(points, np.float64), rgb):
            rec.add_point3D(xyz, pycolmap.Track(), c)
    with staging_dir(path) as tmp:
        rec.write(str(tmp))
    return Path(path)
