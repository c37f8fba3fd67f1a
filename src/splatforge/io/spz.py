"""Niantic's ``.spz`` (github.com/nianticlabs/spz, ``load-spz.cc``): versions 2, 3 and 4.

Content, per Gaussian, attribute by attribute (all little endian):

- positions: 3 x 24-bit signed fixed point with ``fractionalBits`` (12, i.e. 1/4096 world
  units; we lower it only when a coordinate would not fit in +-2048);
- alphas: ``round(sigmoid(opacity) * 255)``;
- colors: SH DC as ``round(f_dc * 0.15 * 255 + 127.5)``;
- scales: log scale as ``round((log s + 10) * 16)``;
- rotations: v2 stores x, y, z of the unit quaternion with w >= 0 as ``round(q * 127.5 + 127.5)``;
  v3 and v4 store the "smallest three": 2 bits for the index of the largest component (in
  xyzw order), then for each other component a sign bit and 9 bits of ``|q_i| / sqrt(1/2)``;
- SH bands 1..3 (coefficient-major, colour channel inner): ``round(x * 128) + 128`` snapped to
  buckets of 8 (band 1, 5 bits) or 16 (bands 2-3, 4 bits), decoded as ``(b - 128) / 128``.

Versions 2 and 3 are one gzip stream: a 16-byte header (``magic 0x5053474e, version,
numPoints, shDegree, fractionalBits, flags, reserved``) then the attributes in the order above.
Version 4 has a plain 32-byte header (``..., flags, numStreams, tocByteOffset, 12 reserved
bytes``), a table of ``numStreams x (compressed size u64, uncompressed size u64)`` and one zstd
stream per attribute (empty ones omitted). Flag ``0x1`` = trained with anti-aliasing.

Axes: SPZ files are in RUB (x right, y up, z back: OpenGL/three.js). Our splats are in the
COLMAP/OpenCV frame (RDF), so by default the writer rotates the scene by 180 degrees about x
(means, quaternions and SH; see :mod:`splatforge.geometry.transform`) and the reader rotates it
back, as Niantic's ``ply-to-spz`` does with ``from = RDF``. Pass ``coordinates="rub"`` to store
or read the values unchanged.
"""

from __future__ import annotations

import gzip
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import Literal

import numpy as np

from splatforge._fs import atomic_path, read_input
from splatforge.errors import ConfigError, DataFormatError
from splatforge.geometry.transform import named_transform, transform_splats
from splatforge.model.splats import Splats

__all__ = ["decode_spz", "encode_spz", "read_spz", "write_spz"]

MAGIC = 0x5053474E
COLOR_SCALE = 0.15
FLAG_ANTIALIASED = 0x1
FLAG_EXTENSIONS = 0x2
_SQRT1_2 = np.sqrt(0.5)
_HEADER_V3 = struct.Struct("<IIIBBBB")
_HEADER_V4 = struct.Struct("<IIIBBBBI12x")
_TOC = struct.Struct("<QQ")


def _u8(x: np.ndarray) -> np.ndarray:
    return np.clip(np.round(x), 0, 255).astype(np.uint8)


def _pack_smallest_three(q: np.ndarray) -> np.ndarray:
    """``[N, 4]`` unit quaternions **xyzw** -> ``[N, 4]`` bytes (one little-endian uint32)."""
    n = q.shape[0]
    largest = np.argmax(np.abs(q), axis=1)
    negate = q[np.arange(n), largest] < 0
    comp = largest.astype(np.uint64)
    for i in range(4):
        keep = largest != i
        mag = np.floor(511.0 * np.abs(q[:, i]) / _SQRT1_2 + 0.5).astype(np.uint64)
        neg = ((q[:, i] < 0) ^ negate).astype(np.uint64)
        comp = np.where(keep, (comp << np.uint64(10)) | (neg << np.uint64(9)) | np.minimum(mag, 511), comp)
    return comp.astype("<u4").view(np.uint8).reshape(n, 4)


def _unpack_smallest_three(b: np.ndarray) -> np.ndarray:
    comp = b.reshape(-1, 4).copy().view("<u4").reshape(-1).astype(np.uint64)
    n = comp.shape[0]
    largest = (comp >> np.uint64(30)).astype(np.int64)
    q = np.zeros((n, 4))
    for i in range(3, -1, -1):
        keep = largest != i
        mag = (comp & np.uint64(511)).astype(np.float64)
        neg = ((comp >> np.uint64(9)) & np.uint64(1)).astype(bool)
        val = _SQRT1_2 * mag / 511.0
        q[:, i] = np.where(keep, np.where(neg, -val, val), 0.0)
        comp = np.where(keep, comp >> np.uint64(10), comp)
    q[np.arange(n), largest] = np.sqrt(np.maximum(0.0, 1.0 - (q * q).sum(axis=1)))
    return q


def _quantize_sh(x: np.ndarray, bits: int) -> np.ndarray:
    bucket = 1 << (8 - bits)
    q = np.round(x * 128.0).astype(np.int64) + 128
    q = (q + bucket // 2) // bucket * bucket
    return np.clip(q, 0, 255).astype(np.uint8)


def encode_spz(
    splats: Splats | Mapping, version: int = 3, *, antialiased: bool = False, coordinates: Literal["rdf", "rub"] = "rdf"
) -> bytes:
    """Encode :class:`~splatforge.model.Splats` as ``.spz`` bytes.

    Args:
        splats: ``means [N,3]``, ``quats [N,4]`` wxyz, ``scales [N,3]`` log, ``opacities [N]``
            logit, ``sh0 [N,1,3]``, ``shN [N,K-1,3]`` (K = 1, 4, 9, 16).
        version: 2, 3 (default, what most viewers read) or 4 (zstd, needs ``zstandard``).
        antialiased: set the file's anti-aliasing flag (trained with ``rasterize_mode="antialiased"``).
        coordinates: the frame of ``splats``: ``"rdf"`` (COLMAP/OpenCV, converted to SPZ's RUB)
            or ``"rub"`` (stored as is).

    Raises:
        ConfigError: an unknown version or coordinate frame.
        DataFormatError: positions too large for 24-bit fixed point even at 1 fractional bit.
    """
    if version not in (2, 3, 4):
        raise ConfigError(f"SPZ version must be 2, 3 or 4, got {version!r}")
    if coordinates not in ("rdf", "rub"):
        raise ConfigError(f"coordinates must be 'rdf' or 'rub', got {coordinates!r}")
    splats = Splats.from_mapping(splats).numpy()
    if coordinates == "rdf":
        splats = Splats.from_mapping(transform_splats(splats, named_transform("opengl")))
    means = np.asarray(splats["means"], dtype=np.float64)
    n = means.shape[0]
    shN = np.asarray(splats["shN"], dtype=np.float64).reshape(n, -1, 3)
    sh_degree = {0: 0, 3: 1, 8: 2, 15: 3}.get(shN.shape[1])
    if sh_degree is None:
        raise DataFormatError(f"{shN.shape[1]} higher SH coefficients per channel is not a whole number of bands")

    extent = float(np.abs(means).max()) if n else 0.0
    frac = 12
    while frac > 1 and extent * (1 << frac) >= (1 << 23) - 1:
        frac -= 1
    if extent * (1 << frac) >= (1 << 23) - 1:
        raise DataFormatError(f"positions reach {extent:.3g} world units; SPZ's 24-bit fixed point cannot hold them")
    fixed = np.round(means * (1 << frac)).astype(np.int64).reshape(-1)
    positions = np.stack([fixed & 0xFF, (fixed >> 8) & 0xFF, (fixed >> 16) & 0xFF], axis=1).astype(np.uint8).reshape(-1)

    alphas = _u8(splats.alphas() * 255.0)
    colors = _u8(np.asarray(splats["sh0"], dtype=np.float64).reshape(n, 3) * (COLOR_SCALE * 255.0) + 127.5)
    scales = _u8((np.asarray(splats["scales"], dtype=np.float64) + 10.0) * 16.0)
    q = np.asarray(splats["quats"], dtype=np.float64)
    q = q / np.maximum(np.linalg.norm(q, axis=1, keepdims=True), 1e-12)
    xyzw = np.concatenate([q[:, 1:], q[:, :1]], axis=1)
    if version >= 3:
        rotations = _pack_smallest_three(xyzw)
    else:
        xyzw = np.where(xyzw[:, 3:4] < 0, -xyzw, xyzw)
        rotations = _u8(xyzw[:, :3] * 127.5 + 127.5)
    sh = np.zeros((n, shN.shape[1], 3), np.uint8)
    if sh_degree:
        sh[:, :3] = _quantize_sh(shN[:, :3], 5)
        sh[:, 3:] = _quantize_sh(shN[:, 3:], 4)
    streams = [positions, alphas, colors, scales, rotations, sh]
    blobs = [np.ascontiguousarray(s).tobytes() for s in streams]
    flags = FLAG_ANTIALIASED if antialiased else 0
    if version < 4:
        return gzip.compress(_HEADER_V3.pack(MAGIC, version, n, sh_degree, frac, flags, 0) + b"".join(blobs), mtime=0)
    import zstandard

    blobs = [b for b in blobs if b]
    compressor = zstandard.ZstdCompressor(level=12)
    packed = [compressor.compress(b) for b in blobs]
    header = _HEADER_V4.pack(MAGIC, 4, n, sh_degree, frac, flags, len(packed), _HEADER_V4.size)
    toc = b"".join(_TOC.pack(len(c), len(u)) for c, u in zip(packed, blobs))
    return header + toc + b"".join(packed)


def decode_spz(data: bytes, *, coordinates: Literal["rdf", "rub"] = "rdf", source: str = ".spz data") -> Splats:
    """Decode ``.spz`` bytes (version 2, 3 or 4) into numpy :class:`~splatforge.model.Splats`;
    see :func:`encode_spz`.

    Raises:
        DataFormatError: not an SPZ file, an unsupported version, or truncated data (the message
            names ``source``).
    """
    if data[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(data)
        except (OSError, EOFError) as exc:
            raise DataFormatError(f"{source}: corrupt gzip stream: {exc}") from exc
        if len(raw) < _HEADER_V3.size:
            raise DataFormatError(f"{source}: too short for an SPZ header")
        magic, version, n, sh_degree, frac, flags, _ = _HEADER_V3.unpack_from(raw)
        if magic != MAGIC or version not in (2, 3):
            raise DataFormatError(f"{source}: not an SPZ v2/v3 file (magic {magic:#x}, version {version})")
        body, offset = raw, _HEADER_V3.size
        if flags & FLAG_EXTENSIONS:
            raise DataFormatError(f"{source}: SPZ extensions are not supported")
        streams = None
    else:
        if len(data) < _HEADER_V4.size:
            raise DataFormatError(f"{source}: too short for an SPZ header")
        magic, version, n, sh_degree, frac, flags, num_streams, toc_offset = _HEADER_V4.unpack_from(data)
        if magic != MAGIC:
            raise DataFormatError(f"{source}: not an SPZ file (neither gzip nor the NGSP magic)")
        if version != 4:
            raise DataFormatError(f"{source}: SPZ version {version} is not supported (2, 3, 4)")
        import zstandard

        pos = toc_offset + num_streams * _TOC.size
        if toc_offset < _HEADER_V4.size or pos > len(data):
            raise DataFormatError(
                f"{source}: truncated: the table of {num_streams} streams at offset {toc_offset} "
                f"needs {pos} bytes, the file has {len(data)}"
            )
        streams = []
        decompressor = zstandard.ZstdDecompressor()
        for i in range(num_streams):
            csize, usize = _TOC.unpack_from(data, toc_offset + i * _TOC.size)
            if pos + csize > len(data):
                raise DataFormatError(f"{source}: truncated: stream {i} needs {csize} bytes at offset {pos}")
            try:
                streams.append(decompressor.decompress(data[pos : pos + csize], max_output_size=usize))
            except zstandard.ZstdError as exc:
                raise DataFormatError(f"{source}: corrupt zstd stream {i}: {exc}") from exc
            pos += csize
        body, offset = b"".join(streams), 0
    if sh_degree > 3:
        raise DataFormatError(f"{source}: SH degree {sh_degree} is not supported (0..3)")
    k = {0: 0, 1: 3, 2: 8, 3: 15}[sh_degree]
    rot_bytes = 4 if version >= 3 else 3
    sizes = [9 * n, n, 3 * n, 3 * n, rot_bytes * n, 3 * k * n]
    if len(body) - offset < sum(sizes):
        raise DataFormatError(
            f"{source}: truncated: {n} Gaussians need {sum(sizes)} bytes of attributes, found {len(body) - offset}"
        )
    parts = []
    for size in sizes:
        parts.append(np.frombuffer(body, dtype=np.uint8, count=size, offset=offset))
        offset += size
    positions, alphas, colors, scales, rotations, sh = parts
    p = positions.reshape(n, 3, 3).astype(np.int64)
    fixed = p[..., 0] | (p[..., 1] << 8) | (p[..., 2] << 16)
    fixed = np.where(fixed & 0x800000, fixed - (1 << 24), fixed)
    means = fixed.astype(np.float64) / (1 << frac)
    if version >= 3:
        xyzw = _unpack_smallest_three(rotations)
    else:
        xyz = rotations.reshape(n, 3).astype(np.float64) / 127.5 - 1.0
        xyzw = np.concatenate([xyz, np.sqrt(np.maximum(0.0, 1.0 - (xyz * xyz).sum(1, keepdims=True)))], axis=1)
    a = np.clip(alphas.astype(np.float64) / 255.0, 0.5 / 255, 1 - 0.5 / 255)
    out = {
        "means": means.astype(np.float32),
        "quats": np.concatenate([xyzw[:, 3:], xyzw[:, :3]], axis=1).astype(np.float32),
        "scales": (scales.reshape(n, 3).astype(np.float32) / 16.0 - 10.0),
        "opacities": np.log(a / (1 - a)).astype(np.float32),
        "sh0": ((colors.reshape(n, 1, 3).astype(np.float32) / 255.0 - 0.5) / COLOR_SCALE),
        "shN": (sh.reshape(n, k, 3).astype(np.float32) - 128.0) / 128.0,
    }
    if coordinates == "rdf":
        out = transform_splats(out, named_transform("opengl"))
    return Splats.from_mapping(out, source)


def write_spz(path: Path, splats: Splats | Mapping, version: int = 3, **kwargs) -> None:
    """Write ``splats`` to ``path`` as ``.spz`` atomically; ``kwargs`` as :func:`encode_spz`."""
    data = encode_spz(splats, version, **kwargs)
    with atomic_path(Path(path)) as tmp:
        Path(tmp).write_bytes(data)


def read_spz(path: Path, *, coordinates: Literal["rdf", "rub"] = "rdf") -> Splats:
    """Read an ``.spz`` file (v2, v3 or v4); see :func:`decode_spz`.

    Raises:
        DataFormatError: unreadable or malformed file (names the file).
    """
    data = read_input(path)
    return decode_spz(data, coordinates=coordinates, source=str(path))
