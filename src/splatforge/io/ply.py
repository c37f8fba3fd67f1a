"""Gaussian splats as PLY in the layout of Inria's 3DGS (``scene/gaussian_model.py::save_ply``),
the interchange format every viewer reads.

Properties, all float32, binary little endian, in this order: ``x y z``, ``nx ny nz`` (zeros),
``f_dc_0..2`` (SH DC per channel), ``f_rest_0..3(K-1)-1`` (higher SH bands, **channel-major**:
all of red's coefficients, then green's, then blue's), ``opacity`` (logit), ``scale_0..2`` (log),
``rot_0..3`` (quaternion wxyz, unnormalised). Pure functions: :class:`~splatforge.model.Splats`
(or any mapping with its six keys) in, numpy :class:`~splatforge.model.Splats` out.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from splatforge._fs import atomic_path
from splatforge.errors import DataFormatError
from splatforge.model.splats import SPLAT_KEYS, Splats

__all__ = ["SPLAT_KEYS", "ply_rasterize_mode", "read_ply", "write_ply", "write_points_ply"]

#: The header comment that records how a PLY's Gaussians were trained to be drawn (readers that
#: do not know it ignore comments and draw them classically).
_MODE_COMMENT = "comment splatforge rasterize_mode "


def _attributes(n_rest: int) -> list[str]:
    names = ["x", "y", "z", "nx", "ny", "nz", "f_dc_0", "f_dc_1", "f_dc_2"]
    names += [f"f_rest_{i}" for i in range(3 * n_rest)]
    names += ["opacity", "scale_0", "scale_1", "scale_2", "rot_0", "rot_1", "rot_2", "rot_3"]
    return names


def write_ply(path: Path, splats: Splats | Mapping, rasterize_mode: str = "classic") -> None:
    """Write ``splats`` (:class:`~splatforge.model.Splats`: ``means [N,3]``, ``quats [N,4]`` wxyz,
    ``scales [N,3]`` log, ``opacities [N]`` logit, ``sh0 [N,1,3]``, ``shN [N,K-1,3]``; numpy or
    torch) to ``path`` atomically. ``rasterize_mode="antialiased"`` (Gaussians trained with
    Mip-Splatting's 2D filter) is recorded as the header comment
    ``comment splatforge rasterize_mode antialiased`` (:func:`ply_rasterize_mode` reads it).

    Raises:
        DataFormatError: inconsistent shapes.
    """
    arr = Splats.from_mapping(splats, str(path)).numpy()
    n = len(arr)
    shN = arr["shN"]
    columns = [
        arr["means"],
        np.zeros((n, 3), np.float32),
        arr["sh0"].reshape(n, 3),
        shN.transpose(0, 2, 1).reshape(n, -1),
        arr["opacities"][:, None],
        arr["scales"],
        arr["quats"],
    ]
    data = np.ascontiguousarray(np.concatenate(columns, axis=1), dtype="<f4")
    names = _attributes(shN.shape[1])
    header = "ply\nformat binary_little_endian 1.0\n"
    if rasterize_mode != "classic":
        header += f"{_MODE_COMMENT}{rasterize_mode}\n"
    header += f"element vertex {n}\n"
    header += "".join(f"property float {name}\n" for name in names) + "end_header\n"
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(header.encode("ascii"))
        f.write(data.tobytes())


def write_points_ply(path: Path, points) -> None:
    """Write ``points [M, 3]`` (world units) as a binary little-endian PLY point cloud (``x y z``
    float32 vertices, no faces), atomically: what Open3D, CloudCompare and ``mesh-eval`` read.

    Raises:
        DataFormatError: not an ``[M, 3]`` array.
    """
    arr = np.ascontiguousarray(np.asarray(points), dtype="<f4")
    if arr.ndim != 2 or arr.shape[1] != 3:
        raise DataFormatError(f"{path}: points must be [M, 3], got {arr.shape}")
    header = f"ply\nformat binary_little_endian 1.0\nelement vertex {len(arr)}\n"
    header += "property float x\nproperty float y\nproperty float z\nend_header\n"
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(header.encode("ascii"))
        f.write(arr.tobytes())


def ply_rasterize_mode(path: Path) -> str:
    """The rasterize mode a PLY records (``classic`` when it records none).

    Raises:
        DataFormatError: unreadable file.
    """
    try:
        with open(path, "rb") as f:
            head = f.read(4096)
    except OSError as exc:
        raise DataFormatError(f"{path}: cannot read: {exc}") from exc
    for line in head.split(b"end_header")[0].decode("ascii", errors="replace").splitlines():
        if line.startswith(_MODE_COMMENT):
            return line[len(_MODE_COMMENT) :].strip()
    return "classic"


_TYPES = {
    "float": "f4",
    "float32": "f4",
    "double": "f8",
    "float64": "f8",
    "uchar": "u1",
    "uint8": "u1",
    "char": "i1",
    "int8": "i1",
    "short": "i2",
    "int16": "i2",
    "ushort": "u2",
    "uint16": "u2",
    "int": "i4",
    "int32": "i4",
    "uint": "u4",
    "uint32": "u4",
}


def read_ply(path: Path) -> Splats:
    """Read a 3DGS PLY (Inria's, gsplat's ``export_splats``, nerfstudio's ``ns-export
    gaussian-splat``): the vertex element's properties in any order, binary (either endianness)
    or ASCII. Returns numpy float32 :class:`~splatforge.model.Splats`.

    Raises:
        DataFormatError: not a PLY, a malformed header, a truncated file, or missing Gaussian
            properties (the message names the file).
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DataFormatError(f"{path}: cannot read: {exc}") from exc
    end = raw.find(b"end_header")
    newline = raw.find(b"\n", end) if end >= 0 else -1
    if not raw.startswith(b"ply") or end < 0 or newline < 0:
        raise DataFormatError(f"{path}: not a PLY file (no 'ply' magic or no complete 'end_header' line)")
    body_start = newline + 1
    lines = raw[:end].decode("ascii", errors="replace").splitlines()
    fmt, elements, current = None, [], None
    for number, line in enumerate(lines, start=1):
        parts = line.split()
        if not parts or parts[0] not in ("format", "element", "property"):
            continue
        try:
            if parts[0] == "format":
                fmt = parts[1]
            elif parts[0] == "element":
                current = (parts[1], int(parts[2]), [])
                if current[1] < 0:
                    raise ValueError("negative count")
                elements.append(current)
            elif current is not None:
                kind, name = parts[1], parts[2]
        except (IndexError, ValueError) as exc:
            raise DataFormatError(f"{path}: malformed PLY header, line {number}: {line.strip()!r}") from exc
        if parts[0] == "property" and current is not None:
            if kind == "list":
                raise DataFormatError(f"{path}: list property {parts[-1]!r} in element {current[0]!r} is not supported")
            if kind not in _TYPES:
                raise DataFormatError(f"{path}: unknown property type {kind!r}")
            current[2].append((name, _TYPES[kind]))
    if fmt not in ("binary_little_endian", "binary_big_endian", "ascii"):
        raise DataFormatError(f"{path}: unsupported PLY format {fmt!r}")
    if not elements or elements[0][0] != "vertex":
        raise DataFormatError(f"{path}: the first element must be 'vertex'")
    _, n, props = elements[0]
    names = [name for name, _ in props]
    if len(set(names)) != len(names):
        raise DataFormatError(f"{path}: malformed PLY header: repeated vertex property names")
    if fmt == "ascii":
        try:
            values = np.array(raw[body_start:].split()[: n * len(props)], dtype=np.float64)
        except ValueError as exc:
            raise DataFormatError(f"{path}: ASCII PLY body holds a value that is not a number") from exc
        if values.size != n * len(props):
            raise DataFormatError(f"{path}: truncated: expected {n} vertices")
        table = {name: values.reshape(n, len(props))[:, i] for i, (name, _) in enumerate(props)}
    else:
        order = "<" if fmt == "binary_little_endian" else ">"
        dtype = np.dtype([(name, order + t) for name, t in props])
        if len(raw) - body_start < n * dtype.itemsize:
            raise DataFormatError(
                f"{path}: truncated: {n} vertices need {n * dtype.itemsize} bytes, found {len(raw) - body_start}"
            )
        rec = np.frombuffer(raw, dtype=dtype, count=n, offset=body_start)
        table = {name: rec[name] for name, _ in props}
    needed = [
        "x",
        "y",
        "z",
        "f_dc_0",
        "f_dc_1",
        "f_dc_2",
        "opacity",
        "scale_0",
        "scale_1",
        "scale_2",
        "rot_0",
        "rot_1",
        "rot_2",
        "rot_3",
    ]
    missing = [k for k in needed if k not in table]
    if missing:
        raise DataFormatError(f"{path}: not a Gaussian splat PLY, missing properties {missing}")
    rest = sorted((k for k in table if re.fullmatch(r"f_rest_\d+", k)), key=lambda k: int(k[7:]))
    if len(rest) % 3:
        raise DataFormatError(f"{path}: {len(rest)} f_rest properties is not a multiple of 3")
    col = lambda keys: np.stack([np.asarray(table[k], dtype=np.float32) for k in keys], axis=1)
    shN = col(rest).reshape(n, 3, len(rest) // 3).transpose(0, 2, 1) if rest else np.zeros((n, 0, 3), np.float32)
    return Splats(
        means=col(["x", "y", "z"]),
        quats=col(["rot_0", "rot_1", "rot_2", "rot_3"]),
        scales=col(["scale_0", "scale_1", "scale_2"]),
        opacities=np.asarray(table["opacity"], dtype=np.float32),
        sh0=col(["f_dc_0", "f_dc_1", "f_dc_2"])[:, None, :],
        shN=np.ascontiguousarray(shN),
    ).validate(str(path))
