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

Gaussians are sorted by ``exp(scale_0 + scale_1 + scale_2) * sigmoid(opacity)``, largest first
(the viewer streams the file and expects this order). Higher SH bands are dropped by the format.
We round to the nearest byte where ``convert.py`` truncates: same decoding, half the error.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

import numpy as np

from splatforge._fs import atomic_path, read_input
from splatforge.errors import DataFormatError
from splatforge.geometry.sh import SH_C0
from splatforge.model.splats import Splats

__all__ = ["write_splat", "read_splat", "encode_splat", "decode_splat"]

_DTYPE = np.dtype([("means", "<f4", 3), ("scales", "<f4", 3), ("rgba", "u1", 4), ("rot", "u1", 4)])


def encode_splat(splats: Splats | Mapping) -> bytes:
    """Encode :class:`~splatforge.model.Splats` (``scales`` log, ``opacities`` logit, ``quats``
    wxyz) into ``.splat`` bytes, sorted as the viewer expects."""
    s = Splats.from_mapping(splats).numpy()
    a = s.activated(0)
    scales, alphas = a.scales, a.opacities
    order = np.argsort(-np.exp(np.asarray(s.scales, np.float64).sum(axis=1)) * alphas, kind="stable")
    quats = np.asarray(a.quats, dtype=np.float64)
    quats = quats / np.maximum(np.linalg.norm(quats, axis=1, keepdims=True), 1e-12)
    rgb = 0.5 + SH_C0 * np.asarray(a.colors, dtype=np.float64).reshape(-1, 3)
    rgba = np.concatenate([rgb, alphas[:, None]], axis=1)
    rec = np.zeros(len(order), dtype=_DTYPE)
    rec["means"] = a.means[order]
    rec["scales"] = scales[order]
    rec["rgba"] = np.clip(np.round(rgba[order] * 255), 0, 255)
    rec["rot"] = np.clip(np.round(quats[order] * 128 + 128), 0, 255)
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
        means=rec["means"].astype(np.float32), quats=(rec["rot"].astype(np.float32) - 128.0) / 128.0,
        scales=np.log(np.maximum(rec["scales"].astype(np.float64), 1e-30)).astype(np.float32),
        opacities=np.log(alpha / (1 - alpha)).astype(np.float32),
        sh0=((rgba[:, :3] - 0.5) / SH_C0).astype(np.float32)[:, None, :], shN=np.zeros((n, 0, 3), np.float32),
    )  # fmt: skip


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
