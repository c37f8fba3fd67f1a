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

__all__ = ["cameras_json", "write_cameras_json"]


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
