"""antimatter15's ``.splat`` (the WebGL viewer at github.com/antimatter15/splat, ``convert.py``).

32 bytes per Gaussian, no header, little endian:

====== ============ =========================================================================
bytes  type         content
====== ============ =========================================================================
0-11   float32 x 3  position (world units, the PLY's frame: no axis change)
12-23  float32 x 3  scale, **activated** (``exp`` of the log-space parameter)
24-27  uint8 x 4    RGBA: ``(0.5 + SH_C0 * f_dc) * 255`` and ``sigmoid(opacity) * 255``, clamped
28-31  uint8 x 4    rotation, normalised quaternion **wxyz**, ``q * 128 + 128`` clamped
====== ============ =========================================================================

Higher SH bands are dropped by the format. The encoding is ``ply2splat``'s (PyPI/crates.io, the
converter splatter-server's compute node runs on its PLY), so the bytes we write are the bytes
``ply2splat`` makes from our ``.ply`` of the same splats: float32 arithmetic throughout (the PLY
stores float32), colour, alpha and rotation bytes **truncated** (as ``convert.py`` does too),
and the Gaussians sorted by the key ``-(exp(s0 + s1 + s2) * sigmoid(opacity))`` ascending
(largest first, the order the viewer streams), ties broken by x, then y, then z, each compared
in IEEE total order (Rust's ``f32::total_cmp``), the sort stable.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path

import numba
import numpy as np

from splatforge._fs import atomic_path, read_input
from splatforge.errors import DataFormatError
from splatforge.geometry.sh import SH_C0
from splatforge.model.splats import Splats

__all__ = ["decode_splat", "encode_splat", "read_splat", "write_splat"]

_DTYPE = np.dtype([("means", "<f4", 3), ("scales", "<f4", 3), ("rgba", "u1", 4), ("rot", "u1", 4)])


@numba.njit(cache=True)
def _expf(x: np.ndarray) -> np.ndarray:  # pragma: no cover - compiled
    """Elementwise float32 ``exp`` through libm's ``expf`` (what Rust's ``f32::exp`` calls;
    numpy's own float32 ``exp`` differs from it in the last bit for most inputs)."""
    out = np.empty_like(x)
    for i in range(x.size):
        out[i] = math.exp(x[i])
    return out


def _total_order(x: np.ndarray) -> np.ndarray:
    """int32 keys that sort float32 ``x`` as IEEE 754 totalOrder (``f32::total_cmp``): -NaN <
    -inf < ... < -0.0 < +0.0 < ... < +inf < +NaN."""
    bits = np.ascontiguousarray(x, dtype="<f4").view("<i4")
    return bits ^ ((bits >> 31) & np.int32(0x7FFFFFFF))


def _to_byte(x: np.ndarray) -> np.ndarray:
    """float32 in [0, 255] -> uint8, truncating (Rust's saturating ``as u8``; NaN -> 0)."""
    return np.nan_to_num(np.clip(x, 0, 255), nan=0.0).astype(np.uint8)


def encode_splat(splats: Splats | Mapping) -> bytes:
    """Encode :class:`~splatforge.model.Splats` (``scales`` log, ``opacities`` logit, ``quats``
    wxyz) into ``.splat`` bytes, sorted as the viewer expects (module docstring: ``ply2splat``'s
    arithmetic, so the result is byte-identical to its conversion of our PLY)."""
    s = Splats.from_mapping(splats).numpy()
    f32 = np.float32
    means = np.asarray(s.means, f32)
    log_scales = np.asarray(s.scales, f32)
    logits = np.asarray(s.opacities, f32).reshape(-1)
    dc = np.asarray(s.sh0, f32).reshape(-1, 3)
    q = np.asarray(s.quats, f32)
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        scales = _expf(np.ascontiguousarray(log_scales).reshape(-1)).reshape(-1, 3)
        alpha = np.clip(f32(1) / (f32(1) + _expf(np.ascontiguousarray(-logits))), f32(0), f32(1))
        rgb = np.clip(f32(0.5) + f32(SH_C0) * dc, f32(0), f32(1)) * f32(255)
        qlen = np.sqrt(((q[:, 0] * q[:, 0] + q[:, 1] * q[:, 1]) + q[:, 2] * q[:, 2]) + q[:, 3] * q[:, 3])
        unit = np.where((qlen > 0)[:, None], q / qlen[:, None], np.array([1, 0, 0, 0], f32))
        rot = unit * f32(128) + f32(128)
        volume = _expf(np.ascontiguousarray((log_scales[:, 0] + log_scales[:, 1]) + log_scales[:, 2]))
        key = -(volume * alpha)
    order = np.lexsort(
        [_total_order(means[:, 2]), _total_order(means[:, 1]), _total_order(means[:, 0]), _total_order(key)]
    )
    rec = np.zeros(len(order), dtype=_DTYPE)
    rec["means"] = means[order]
    rec["scales"] = scales[order]
    rec["rgba"][:, :3] = _to_byte(rgb[order])
    rec["rgba"][:, 3] = _to_byte(alpha[order] * f32(255))
    rec["rot"] = _to_byte(rot[order])
    return rec.tobytes()


def decode_splat(data: bytes, source: str = ".splat data") -> Splats:
    """Decode ``.splat`` bytes into numpy :class:`~splatforge.model.Splats` (``shN`` empty,
    ``[N, 0, 3]``).

    Raises:
        DataFormatError: a length that is not a multiple of 32 bytes.
    """
    if len(data) % _DTYPE.itemsize:
        raise DataFormatError(f"{source}: {len(data)} bytes is not a multiple of 32; not a .splat file or truncated")
    rec = np.frombuffer(data, dtype=_DTYPE)
    n = rec.shape[0]
    rgba = rec["rgba"].astype(np.float64) / 255.0
    alpha = np.clip(rgba[:, 3], 0.5 / 255, 1 - 0.5 / 255)
    return Splats(
        means=rec["means"].astype(np.float32),
        quats=(rec["rot"].astype(np.float32) - 128.0) / 128.0,
        scales=np.log(np.maximum(rec["scales"].astype(np.float64), 1e-30)).astype(np.float32),
        opacities=np.log(alpha / (1 - alpha)).astype(np.float32),
        sh0=((rgba[:, :3] - 0.5) / SH_C0).astype(np.float32)[:, None, :],
        shN=np.zeros((n, 0, 3), np.float32),
    )


def write_splat(path: Path, splats: Splats | Mapping) -> None:
    """Write ``splats`` to ``path`` as ``.splat`` (atomically: temp file, then rename)."""
    data = encode_splat(splats)
    with atomic_path(Path(path)) as tmp:
        Path(tmp).write_bytes(data)


def read_splat(path: Path) -> Splats:
    """Read a ``.splat`` file (see :func:`decode_splat`).

    Raises:
        DataFormatError: unreadable or malformed file (names the file).
    """
    data = read_input(path)
    return decode_splat(data, str(path))
