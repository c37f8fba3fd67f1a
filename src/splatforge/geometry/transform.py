"""Similarity transforms of whole splat scenes: rotation, uniform scale and translation acting
on means, quaternions, scales **and the spherical-harmonic colour coefficients**.

Rotating a scene by ``R`` must rotate each Gaussian's view-dependent colour with it: the colour
the rotated Gaussian shows along direction ``d`` is the colour the original showed along
``R^T d``. Each SH band ``l`` transforms by its own ``(2l+1) x (2l+1)`` matrix (a real Wigner-D
matrix). We obtain it without any Euler-angle recursion: the band's basis functions span a
rotation-invariant space, so sampling them at directions ``D`` and ``R^T D`` and solving the
least-squares system ``Y_l(D) M = Y_l(R^T D)`` gives the exact matrix (to float64 round-off). The
basis is :func:`splatforge.geometry.sh.sh_bases`, i.e. Inria's/gsplat's order and signs.

Named transforms from the COLMAP/OpenCV world frame (x right, y down, z forward of the first
camera, the frame of Inria's PLY files):

- ``opengl``: rotate 180 degrees about x, ``(x, y, z) -> (x, -y, -z)``: y up, the camera looks
  along -z, as three.js, Spark and SPZ's RUB convention expect.
- ``splatter``: ``Rz(-90 deg)``, ``(x, y, z) -> (y, -x, z)``: the splatter-server convention.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from splatforge.errors import ConfigError
from splatforge.geometry.sh import sh_bases

__all__ = [
    "NAMED_TRANSFORMS",
    "Similarity",
    "euler_transform",
    "named_transform",
    "quat_multiply",
    "rotate_sh",
    "rotmat_to_quat",
    "sh_rotation_matrices",
    "transform_splats",
]


@dataclass(frozen=True)
class Similarity:
    """``x -> scale * rotation @ x + translation`` (world units)."""

    rotation: np.ndarray  # [3, 3], proper rotation (det +1)
    scale: float = 1.0
    translation: np.ndarray = field(default_factory=lambda: np.zeros(3))

    def matrix(self) -> np.ndarray:
        """``[4, 4]`` homogeneous matrix."""
        m = np.eye(4)
        m[:3, :3] = self.scale * np.asarray(self.rotation, dtype=np.float64)
        m[:3, 3] = self.translation
        return m

    def then(self, other: Similarity) -> Similarity:
        """The composition: first ``self``, then ``other``."""
        rot = np.asarray(other.rotation) @ np.asarray(self.rotation)
        t = other.scale * np.asarray(other.rotation) @ np.asarray(self.translation) + np.asarray(other.translation)
        return Similarity(rot, self.scale * other.scale, t)

    @staticmethod
    def from_matrix(m: np.ndarray, source: str = "matrix") -> Similarity:
        """From a ``[4, 4]`` or ``[3, 4]`` matrix whose ``3 x 3`` block is ``s R`` (``R`` a proper
        rotation, ``s > 0``).

        Raises:
            ConfigError: another shape, a reflection, shear or non-uniform scale.
        """
        m = np.asarray(m, dtype=np.float64)
        if m.shape not in ((4, 4), (3, 4)):
            raise ConfigError(f"{source}: expected a 4x4 or 3x4 matrix, got shape {m.shape}")
        a = m[:3, :3]
        det = np.linalg.det(a)
        if det <= 0:
            raise ConfigError(
                f"{source}: the 3x3 block has determinant {det:.3g}; "
                "a reflection or degenerate matrix is not a similarity"
            )
        s = float(np.cbrt(det))
        rot = a / s
        if not np.allclose(rot @ rot.T, np.eye(3), atol=1e-4):
            raise ConfigError(
                f"{source}: the 3x3 block is not a uniformly scaled rotation (shear or non-uniform scale)"
            )
        u, _, vt = np.linalg.svd(rot)
        return Similarity(u @ vt, s, m[:3, 3].copy())


def _rx(deg: float) -> np.ndarray:
    c, s = np.cos(np.radians(deg)), np.sin(np.radians(deg))
    return np.array([[1, 0, 0], [0, c, -s], [0, s, c]])


def _ry(deg: float) -> np.ndarray:
    c, s = np.cos(np.radians(deg)), np.sin(np.radians(deg))
    return np.array([[c, 0, s], [0, 1, 0], [-s, 0, c]])


def _rz(deg: float) -> np.ndarray:
    c, s = np.cos(np.radians(deg)), np.sin(np.radians(deg))
    return np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])


#: Rotations from the COLMAP/OpenCV world frame, by name (see the module docstring).
NAMED_TRANSFORMS = {
    "identity": np.eye(3),
    "opengl": np.diag([1.0, -1.0, -1.0]),
    "splatter": _rz(-90.0),
}


def named_transform(name: str) -> Similarity:
    """The rotation called ``name`` in :data:`NAMED_TRANSFORMS`.

    Raises:
        ConfigError: an unknown name (the message lists the known ones).
    """
    if name not in NAMED_TRANSFORMS:
        raise ConfigError(f"unknown transform {name!r}; known: {', '.join(NAMED_TRANSFORMS)}")
    return Similarity(NAMED_TRANSFORMS[name].copy())


def euler_transform(text: str) -> Similarity:
    """Parse ``"x,y,z"`` (degrees) into ``Rz(z) @ Ry(y) @ Rx(x)``: rotate about the fixed world
    x axis first, then y, then z (extrinsic XYZ, scipy's ``from_euler("xyz", ...)``).

    Raises:
        ConfigError: not three comma-separated numbers.
    """
    try:
        x, y, z = (float(v) for v in text.replace("deg", "").split(","))
    except ValueError as exc:
        raise ConfigError(
            f"--rotate expects three comma-separated angles in degrees like '90,0,0', got {text!r}"
        ) from exc
    return Similarity(_rz(z) @ _ry(y) @ _rx(x))


def sh_rotation_matrices(rotation: np.ndarray, degree: int) -> list[np.ndarray]:
    """Per-band matrices ``M_l`` (``[2l+1, 2l+1]``, float64) with which the coefficients of band
    ``l`` (``coeffs[l*l:(l+1)**2]``, basis order of :func:`~splatforge.geometry.sh.sh_bases`)
    transform when the scene is rotated by ``rotation``: ``new = M_l @ old``.

    Found by least squares on 64 fixed directions (exact up to round-off, see the module
    docstring). Band 0 is always ``[[1]]``.
    """
    rot = np.asarray(rotation, dtype=np.float64)
    golden = np.pi * (3.0 - np.sqrt(5.0))
    i = np.arange(64) + 0.5
    zc = 1 - 2 * i / 64
    r = np.sqrt(1 - zc * zc)
    dirs = np.stack([r * np.cos(golden * i), r * np.sin(golden * i), zc], axis=1)
    y_d = sh_bases(degree, torch.from_numpy(dirs)).numpy()
    y_r = sh_bases(degree, torch.from_numpy(dirs @ rot)).numpy()  # rows: R^T d
    out = []
    for band in range(degree + 1):
        sl = slice(band * band, (band + 1) ** 2)
        sol, *_ = np.linalg.lstsq(y_d[:, sl], y_r[:, sl], rcond=None)
        out.append(sol)
    return out


def rotate_sh(coeffs: np.ndarray, rotation: np.ndarray) -> np.ndarray:
    """Rotate SH colour coefficients.

    Args:
        coeffs: ``[N, K, 3]`` with ``K`` = 1, 4, 9 or 16 (all bands, ``sh0`` included) or
            ``[N, K-1, 3]`` without the DC band; the basis axis is axis 1.
        rotation: ``[3, 3]`` proper rotation applied to the scene.

    Returns:
        the coefficients of the rotated Gaussians, same shape and dtype.

    Raises:
        ConfigError: a coefficient count that is not a full set of bands.
    """
    k = coeffs.shape[1]
    with_dc = k in (1, 4, 9, 16)
    total = k if with_dc else k + 1
    if total not in (1, 4, 9, 16):
        raise ConfigError(f"{k} SH coefficients per channel is not a whole number of bands (degree <= 3)")
    degree = int(round(np.sqrt(total))) - 1  # noqa: RUF046
    mats = sh_rotation_matrices(rotation, degree)
    out = np.array(coeffs, dtype=np.float64, copy=True)
    offset = 0 if with_dc else 1
    for band in range(1, degree + 1):
        sl = slice(band * band - offset, (band + 1) ** 2 - offset)
        out[:, sl, :] = np.einsum("ij,njc->nic", mats[band], out[:, sl, :])
    return out.astype(coeffs.dtype)


def quat_multiply(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Hamilton product ``a * b`` of wxyz quaternions (broadcasting ``[..., 4]``)."""
    aw, ax, ay, az = np.moveaxis(a, -1, 0)
    bw, bx, by, bz = np.moveaxis(b, -1, 0)
    return np.stack(
        [
            aw * bw - ax * bx - ay * by - az * bz,
            aw * bx + ax * bw + ay * bz - az * by,
            aw * by - ax * bz + ay * bw + az * bx,
            aw * bz + ax * by - ay * bx + az * bw,
        ],
        axis=-1,
    )


def rotmat_to_quat(rotation: np.ndarray) -> np.ndarray:
    """wxyz unit quaternion of a ``[3, 3]`` rotation (Shepperd's method, w >= 0)."""
    m = np.asarray(rotation, dtype=np.float64)
    tr = np.trace(m)
    cands = [1 + tr, 1 + m[0, 0] - m[1, 1] - m[2, 2], 1 - m[0, 0] + m[1, 1] - m[2, 2], 1 - m[0, 0] - m[1, 1] + m[2, 2]]
    i = int(np.argmax(cands))
    s = np.sqrt(cands[i]) * 2
    if i == 0:
        q = [s / 4, (m[2, 1] - m[1, 2]) / s, (m[0, 2] - m[2, 0]) / s, (m[1, 0] - m[0, 1]) / s]
    elif i == 1:
        q = [(m[2, 1] - m[1, 2]) / s, s / 4, (m[0, 1] + m[1, 0]) / s, (m[0, 2] + m[2, 0]) / s]
    elif i == 2:
        q = [(m[0, 2] - m[2, 0]) / s, (m[0, 1] + m[1, 0]) / s, s / 4, (m[1, 2] + m[2, 1]) / s]
    else:
        q = [(m[1, 0] - m[0, 1]) / s, (m[0, 2] + m[2, 0]) / s, (m[1, 2] + m[2, 1]) / s, s / 4]
    q = np.array(q)
    return q if q[0] >= 0 else -q


def transform_splats(splats: dict[str, np.ndarray], sim: Similarity) -> dict[str, np.ndarray]:
    """Apply ``sim`` to a splat dict (:data:`splatforge.io.ply.SPLAT_KEYS`: ``means [N,3]``,
    ``quats [N,4]`` wxyz, ``scales [N,3]`` log, ``opacities [N]`` logit, ``sh0 [N,1,3]``,
    ``shN [N,K-1,3]``). Means are mapped, quaternions pre-multiplied by the rotation, log scales
    shifted by ``log(scale)``, ``shN`` rotated (``sh0`` is invariant). Returns a new dict."""
    rot = np.asarray(sim.rotation, dtype=np.float64)
    out = dict(splats)
    means = np.asarray(splats["means"], dtype=np.float64)
    out["means"] = (sim.scale * means @ rot.T + np.asarray(sim.translation)).astype(np.float32)
    q = np.asarray(splats["quats"], dtype=np.float64)
    q = q / np.maximum(np.linalg.norm(q, axis=1, keepdims=True), 1e-12)
    out["quats"] = quat_multiply(rotmat_to_quat(rot)[None], q).astype(np.float32)
    out["scales"] = (np.asarray(splats["scales"], dtype=np.float64) + np.log(sim.scale)).astype(np.float32)
    shN = np.asarray(splats["shN"], dtype=np.float32)
    out["shN"] = rotate_sh(shN, rot) if shN.shape[1] else shN
    return out
