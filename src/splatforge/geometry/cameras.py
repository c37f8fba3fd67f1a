"""Camera construction helpers (OpenCV axes: +x right, +y down, +z forward)."""

from __future__ import annotations

import numpy as np

__all__ = ["look_at"]


def look_at(eye, target, image_up) -> np.ndarray:
    """Camera-to-world ``[4, 4]`` (float64, OpenCV axes, world units) of a camera at ``eye [3]``
    looking at ``target [3]``, rolled so that the world direction ``image_up [3]`` points up in
    the image (along -y of the camera). ``image_up`` must not be parallel to the view direction.
    Use ``np.linalg.inv`` of the result for the world-to-camera ``viewmat``."""
    eye = np.asarray(eye, dtype=np.float64)
    z = np.asarray(target, dtype=np.float64) - eye
    z /= np.linalg.norm(z)
    x = np.cross(z, np.asarray(image_up, dtype=np.float64))
    x /= np.linalg.norm(x)
    y = np.cross(z, x)
    c2w = np.eye(4)
    c2w[:3, 0], c2w[:3, 1], c2w[:3, 2], c2w[:3, 3] = x, y, z, eye
    return c2w
