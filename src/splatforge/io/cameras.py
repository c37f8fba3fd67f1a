"""``cameras.json`` in Inria's 3DGS layout (``utils/camera_utils.py::camera_to_JSON``).

One entry per view: ``id``, ``img_name`` (file name without extension), ``width``, ``height``
(pixels), ``position`` (camera centre, world), ``rotation`` (3x3 camera-to-world rotation, rows,
OpenCV camera axes), ``fx``, ``fy`` (pixels).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from splatforge._fs import atomic_path

__all__ = ["cameras_json", "read_cameras_json", "write_cameras_json"]


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
