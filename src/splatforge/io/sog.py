"""PlayCanvas's SOG (``.sog``, version 2): Gaussians as lossless WebP images in a ZIP, what
``@playcanvas/splat-transform`` writes and the PlayCanvas engine and SuperSplat read
(splatter-server's ``compress_sog.py`` uploads it as ``splat_data_sog``).

Layout (as splat-transform 3.7's ``write-sog.ts`` and the engine's ``sog-bundle.js`` read it):
a ZIP, every entry stored (no compression, no comment), ``meta.json`` last::

    means_l.webp, means_u.webp   16-bit position per axis, low and high byte, of
                                 logT(x) = sign(x) * ln(|x| + 1) between meta means.mins/maxs
                                 (both in the log domain): q = trunc(65535 * (logT(x) - min) / (max - min))
    quats.webp                   smallest three of the unit quaternion (w, x, y, z) with the
                                 largest dropped, times sqrt(2) (sign: largest positive), each
                                 trunc(255 * (c * 0.5 + 0.5)); alpha = 252 + index of the dropped one
    scales.webp                  RGB: indices into meta scales.codebook (256 log scales, sorted)
    sh0.webp                     RGB: indices into meta sh0.codebook (256 DC coefficients, sorted);
                                 alpha = trunc(255 * sigmoid(opacity))
    shN_centroids.webp           (SH degree > 0) palette of ``shN.count`` entries, 64 per row, each
                                 ``coeffs`` texels wide (3, 8, 15 for degree 1, 2, 3); texel j of an
                                 entry holds the codebook indices of coefficient j of R, G, B
    shN_labels.webp              per Gaussian: palette index, low byte in R, high byte in G

Every per-Gaussian image is ``W x H`` RGBA, ``W = ceil(sqrt(N) / 4) * 4``, ``H = ceil(N / W / 4) *
4``, Gaussian ``i`` of the file order at pixel ``(i % W, i // W)``; the file order is Morton (Z)
order of the positions, for compression (readers do not depend on it). Padding pixels are 0.

Our codebooks: 256 centres of a 1-D k-means (Lloyd, started at quantiles) over the pooled
values; the SH palette: k-means over the ``3 * coeffs`` higher-band coefficients with
``2^floor(log2(N / 16))`` entries, at most :data:`MAX_PALETTE` (splat-transform uses up to 65,536,
which costs minutes of k-means on a CPU for a million Gaussians). Seeded: the same splats give the
same file.
"""

from __future__ import annotations

import io
import json
import math
import zipfile
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from splatforge._fs import atomic_path
from splatforge.errors import ConfigError
from splatforge.model.splats import Splats

__all__ = ["MAX_PALETTE", "encode_sog", "write_sog"]

MAX_PALETTE = 16_384
_KEEP = ((1, 2, 3), (0, 2, 3), (0, 1, 3), (0, 1, 2))


def _log_t(x: np.ndarray) -> np.ndarray:
    return np.sign(x) * np.log1p(np.abs(x))


def _texture_size(n: int) -> tuple[int, int]:
    w = max(4, int(math.ceil(math.sqrt(n) / 4)) * 4)  # noqa: RUF046
    h = max(4, int(math.ceil(n / w / 4)) * 4)  # noqa: RUF046
    if w > 16383 or h > 16383:
        raise ConfigError(f"{n} Gaussians need a {w}x{h} SOG texture; WebP allows at most 16383 per side")
    return w, h


def _spread_bits(v: np.ndarray) -> np.ndarray:
    """10 bits -> every third bit of 30 (Morton interleave)."""
    v = v.astype(np.uint32) & 0x3FF
    v = (v ^ (v << 16)) & 0xFF0000FF
    v = (v ^ (v << 8)) & 0x0300F00F
    v = (v ^ (v << 4)) & 0x030C30C3
    return (v ^ (v << 2)) & 0x09249249


def morton_order(means: np.ndarray) -> np.ndarray:
    """``[N]`` permutation sorting ``means [N, 3]`` along a Z curve at 10 bits per axis (stable)."""
    m = np.nan_to_num(np.asarray(means, np.float64), posinf=0.0, neginf=0.0)
    lo, span = m.min(axis=0), np.ptp(m, axis=0)
    q = np.minimum(1023, ((m - lo) * np.where(span > 0, 1024 / np.where(span > 0, span, 1), 0)).astype(np.int64))
    code = (_spread_bits(q[:, 2]) << 2) + (_spread_bits(q[:, 1]) << 1) + _spread_bits(q[:, 0])
    return np.argsort(code, kind="stable")


def codebook_1d(values: np.ndarray, k: int = 256, iters: int = 20) -> tuple[np.ndarray, np.ndarray]:
    """``(codebook [k] float32 ascending, labels uint8/uint16 like values)``: Lloyd's 1-D k-means
    over the finite values, started at their quantiles; non-finite values get the nearest end."""
    flat = np.asarray(values, np.float64).reshape(-1)
    finite = flat[np.isfinite(flat)]
    if finite.size == 0:
        return np.zeros(k, np.float32), np.zeros(np.shape(values), np.uint8 if k <= 256 else np.uint16)
    centres = np.unique(np.quantile(finite, (np.arange(k) + 0.5) / k))
    for _ in range(iters):
        labels = np.searchsorted((centres[1:] + centres[:-1]) / 2, finite)
        sums = np.bincount(labels, weights=finite, minlength=len(centres))
        counts = np.bincount(labels, minlength=len(centres))
        new = np.where(counts > 0, sums / np.maximum(counts, 1), centres)
        new = np.unique(new)
        if len(new) == len(centres) and np.allclose(new, centres, rtol=0, atol=1e-12):
            break
        centres = new
    book = np.concatenate([centres, np.full(k - len(centres), centres[-1])]).astype(np.float32)
    c64 = book.astype(np.float64)
    clean = np.nan_to_num(flat, nan=c64[0], posinf=c64[-1], neginf=c64[0])
    labels = np.searchsorted((c64[1:] + c64[:-1]) / 2, clean)
    return book, labels.reshape(np.shape(values)).astype(np.uint8 if k <= 256 else np.uint16)


def _kmeans(x: np.ndarray, k: int, iters: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``(centroids [<=k, D] float32, labels [N])``: the distinct vectors themselves when there
    are at most ``k``, else Lloyd's k-means in torch (chunked distances) started at ``k`` points
    drawn with ``seed``; empty clusters keep their centre."""
    import torch

    x = np.ascontiguousarray(x, np.float32)
    unique, inverse = np.unique(x, axis=0, return_inverse=True)
    if len(unique) <= k:  # as many distinct vectors as entries (untrained SH: one): exact
        return unique, inverse.reshape(-1)
    pts = torch.from_numpy(x)
    n = pts.shape[0]
    gen = torch.Generator().manual_seed(seed)
    cent = pts[torch.randperm(n, generator=gen)[:k]].clone()
    labels = torch.zeros(n, dtype=torch.long)
    chunk = max(1, (1 << 26) // k)
    for _ in range(iters):
        c2 = (cent * cent).sum(1)
        for s in range(0, n, chunk):
            p = pts[s : s + chunk]
            labels[s : s + chunk] = (c2[None] - 2 * p @ cent.T).argmin(1)
        sums = torch.zeros_like(cent).index_add_(0, labels, pts)
        counts = torch.bincount(labels, minlength=k).to(pts.dtype)
        cent = torch.where(counts[:, None] > 0, sums / counts.clamp(min=1)[:, None], cent)
    return cent.numpy(), labels.numpy()


def _webp(rgba: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(rgba, np.uint8), "RGBA").save(
        buf, "WEBP", lossless=True, exact=True, quality=50, method=4
    )
    return buf.getvalue()


def _image(per_gaussian: np.ndarray, w: int, h: int) -> np.ndarray:
    """``[N, 4]`` uint8 -> ``[H, W, 4]`` with zero padding."""
    img = np.zeros((w * h, 4), np.uint8)
    img[: len(per_gaussian)] = per_gaussian
    return img.reshape(h, w, 4)


def encode_sog(splats: Splats | Mapping, *, seed: int = 0, sh_iterations: int = 10) -> bytes:
    """The ``.sog`` bytes of :class:`~splatforge.model.Splats` (``scales`` log, ``opacities``
    logit, ``quats`` wxyz, ``sh0 [N, 1, 3]``, ``shN [N, K, 3]`` with K = 0, 3, 8 or 15), positions
    in the frame they are in (see the module docstring for the layout).

    Raises:
        ConfigError: no Gaussians, an SH band count SOG cannot hold, or too many Gaussians.
    """
    s = Splats.from_mapping(splats).numpy()
    n = len(s)
    if n == 0:
        raise ConfigError("SOG needs at least one Gaussian")
    w, h = _texture_size(n)
    order = morton_order(np.asarray(s.means))
    means = np.asarray(s.means, np.float64)[order]
    quats = np.asarray(s.quats, np.float64)[order]
    scales = np.asarray(s.scales, np.float64)[order]
    logits = np.asarray(s.opacities, np.float64).reshape(-1)[order]
    dc = np.asarray(s.sh0, np.float64).reshape(n, 3)[order]
    rest = np.asarray(s.shN, np.float64)[order]
    coeffs = rest.shape[1]
    if coeffs not in (0, 3, 8, 15):
        raise ConfigError(f"SOG holds SH degrees 0-3 (0, 3, 8 or 15 higher coefficients), got {coeffs}")
    files: dict[str, bytes] = {}
    ones = np.full(n, 255, np.uint8)

    lmin, lmax = _log_t(means.min(axis=0)), _log_t(means.max(axis=0))
    span = np.where(lmax > lmin, lmax - lmin, 1.0)
    q16 = np.clip(np.floor(65535 * (_log_t(means) - lmin) / span), 0, 65535).astype(np.uint32)
    q16[:, lmax <= lmin] = 0
    files["means_l.webp"] = _webp(_image(np.column_stack([q16 & 0xFF, ones]).astype(np.uint8), w, h))
    files["means_u.webp"] = _webp(_image(np.column_stack([(q16 >> 8) & 0xFF, ones]).astype(np.uint8), w, h))

    norm = np.linalg.norm(quats, axis=1, keepdims=True)
    unit = np.where(norm > 0, quats / np.where(norm > 0, norm, 1), np.array([1.0, 0, 0, 0]))
    largest = np.argmax(np.abs(unit), axis=1)  # first of equal magnitudes, as the reference
    sign = np.where(unit[np.arange(n), largest] < 0, -1.0, 1.0)
    unit = unit * (np.sqrt(2) * sign)[:, None]
    kept = unit[np.arange(n)[:, None], np.array(_KEEP)[largest]]
    qbytes = np.clip(np.floor(255 * (kept * 0.5 + 0.5)), 0, 255).astype(np.uint8)
    files["quats.webp"] = _webp(_image(np.column_stack([qbytes, (252 + largest).astype(np.uint8)]), w, h))

    scale_book, scale_labels = codebook_1d(scales)
    files["scales.webp"] = _webp(_image(np.column_stack([scale_labels, ones]), w, h))

    dc_book, dc_labels = codebook_1d(dc)
    with np.errstate(over="ignore"):
        alpha = np.clip(np.floor(255 / (1 + np.exp(-logits))), 0, 255).astype(np.uint8)
    files["sh0.webp"] = _webp(_image(np.column_stack([dc_labels, alpha]), w, h))

    meta: dict = {
        "version": 2,
        "asset": {"generator": "splatforge"},
        "count": n,
        "means": {"mins": lmin.tolist(), "maxs": lmax.tolist(), "files": ["means_l.webp", "means_u.webp"]},
        "scales": {"codebook": scale_book.tolist(), "files": ["scales.webp"]},
        "quats": {"files": ["quats.webp"]},
        "sh0": {"codebook": dc_book.tolist(), "files": ["sh0.webp"]},
    }
    if coeffs:
        # channel-major vectors (all R coefficients, then G, then B), as the PLY's f_rest
        vectors = rest.transpose(0, 2, 1).reshape(n, 3 * coeffs)
        palette = int(min(MAX_PALETTE, max(1, 2 ** int(math.floor(math.log2(max(n / 16, 1)))))))  # noqa: RUF046
        centroids, labels = _kmeans(vectors, palette, sh_iterations, seed)
        palette = len(centroids)
        book, cl = codebook_1d(centroids)
        cl = cl.reshape(palette, 3, coeffs)
        rows = int(math.ceil(palette / 64))  # noqa: RUF046
        cimg = np.zeros((rows, 64 * coeffs, 4), np.uint8)
        idx = np.arange(palette)
        for j in range(coeffs):
            cimg[idx // 64, (idx % 64) * coeffs + j, :3] = cl[:, :, j]
            cimg[idx // 64, (idx % 64) * coeffs + j, 3] = 255
        labels = labels.astype(np.uint32)
        files["shN_centroids.webp"] = _webp(cimg)
        files["shN_labels.webp"] = _webp(
            _image(np.column_stack([labels & 0xFF, (labels >> 8) & 0xFF, np.zeros(n), ones]).astype(np.uint8), w, h)
        )
        meta["shN"] = {
            "count": palette,
            "bands": {3: 1, 8: 2, 15: 3}[coeffs],
            "codebook": book.tolist(),
            "files": ["shN_centroids.webp", "shN_labels.webp"],
        }
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_STORED) as z:
        for name, data in files.items():
            z.writestr(zipfile.ZipInfo(name, date_time=(2020, 1, 1, 0, 0, 0)), data)
        z.writestr(zipfile.ZipInfo("meta.json", date_time=(2020, 1, 1, 0, 0, 0)), json.dumps(meta, allow_nan=False))
    return out.getvalue()


def write_sog(path: Path, splats: Splats | Mapping, *, seed: int = 0) -> None:
    """Write ``splats`` to ``path`` as ``.sog`` (atomically: temp file, then rename)."""
    data = encode_sog(splats, seed=seed)
    with atomic_path(Path(path)) as tmp:
        Path(tmp).write_bytes(data)
