"""Export trained splats to the formats viewers read, with a coordinate transform, opacity
pruning and cropping on the way.

Sources: a run folder (its latest ``point_cloud/iteration_N/point_cloud.ply``) or a ``.ply``,
``.splat`` or ``.spz`` file. Formats: ``ply`` (Inria layout), ``splat`` (antimatter15), ``spz``
(Niantic; v3 by default), ``sog`` (PlayCanvas SOG v2, write only). See :mod:`splatforge.io` for each layout and
:mod:`splatforge.geometry.transform` for the transforms.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Literal

import numpy as np

from splatforge.errors import ConfigError, DataFormatError
from splatforge.geometry.transform import Similarity, euler_transform, named_transform, transform_splats
from splatforge.io.ply import read_ply, write_ply
from splatforge.io.sog import write_sog
from splatforge.io.splat import read_splat, write_splat
from splatforge.io.spz import read_spz, write_spz
from splatforge.model import Splats

log = logging.getLogger(__name__)

__all__ = ["FORMATS", "build_transform", "crop", "export", "latest_ply", "load_splats", "prune", "save_splats"]

FORMATS = ("ply", "splat", "spz", "sog")


def latest_ply(run: Path) -> Path:
    """``RUN/point_cloud/iteration_<N>/point_cloud.ply`` with the largest ``N``.

    Raises:
        DataFormatError: no exported point cloud in ``run``.
    """
    from splatforge.train.run import latest_ply as _latest

    found = _latest(run)
    if found is None:
        raise DataFormatError(f"{run}: no point_cloud/iteration_N/point_cloud.ply; is this a trained run folder?")
    return found


def load_splats(source) -> Splats:
    """Numpy :class:`~splatforge.model.Splats` from a :class:`~splatforge.train.Run`, a
    ``Splats``, a run folder (its latest PLY) or a ``.ply`` / ``.splat`` / ``.spz`` file (in the
    COLMAP/OpenCV frame: SPZ's RUB is converted back).

    Raises:
        DataFormatError: a missing or unrecognised source.
    """
    if isinstance(source, Splats):
        return source.numpy()
    if isinstance(getattr(source, "splats", None), Splats):  # a Run
        return source.splats.numpy()
    source = Path(source)
    if source.is_dir():
        return read_ply(latest_ply(source))
    if not source.exists():
        raise DataFormatError(f"{source}: no such file or run folder")
    suffix = source.suffix.lower()
    if suffix == ".ply":
        return read_ply(source)
    if suffix == ".splat":
        return read_splat(source)
    if suffix == ".spz":
        return read_spz(source)
    raise DataFormatError(f"{source}: unknown splat file type {suffix!r} (expected .ply, .splat or .spz)")


def save_splats(
    path: Path, splats: Splats | Mapping, fmt: str | None = None, *, spz_version: int = 3, antialiased: bool = False
) -> Path:
    """Write ``splats`` as ``fmt`` (default: from the suffix of ``path``), atomically.

    Raises:
        ConfigError: an unknown format.
    """
    path = Path(path)
    fmt = fmt or path.suffix.lower().lstrip(".")
    if fmt == "ply":
        write_ply(path, splats, rasterize_mode="antialiased" if antialiased else "classic")
    elif fmt == "splat":
        write_splat(path, splats)
    elif fmt == "spz":
        write_spz(path, splats, spz_version, antialiased=antialiased)
    elif fmt == "sog":
        write_sog(path, splats)
    else:
        raise ConfigError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    return path


def _antialiased(source) -> bool:
    """Whether ``source`` (a Run, a run folder or a PLY) was trained anti-aliased: its config's
    ``rasterize_mode``, or the PLY's header comment."""
    cfg = getattr(source, "cfg", None)
    if cfg is not None:
        return cfg.rasterize_mode == "antialiased"
    source = Path(source)
    if source.is_dir() and (source / "cfg.yml").is_file():
        from splatforge.train.config import load_config

        return load_config(source / "cfg.yml").rasterize_mode == "antialiased"
    if source.is_file() and source.suffix.lower() == ".ply":
        from splatforge.io.ply import ply_rasterize_mode

        return ply_rasterize_mode(source) == "antialiased"
    return False


def prune(splats: Splats | Mapping, min_opacity: float) -> Splats:
    """Drop Gaussians whose **activated** opacity ``sigmoid(logit)`` is below ``min_opacity``."""
    splats = Splats.from_mapping(splats).numpy()
    return splats.select(splats.alphas() >= min_opacity)


def crop(splats: Splats | Mapping, bbox: Sequence[float]) -> Splats:
    """Keep Gaussians whose mean lies in the axis-aligned box ``(xmin, ymin, zmin, xmax, ymax,
    zmax)`` (world units, the frame after any transform).

    Raises:
        ConfigError: not six numbers, or min > max.
    """
    b = np.asarray(bbox, dtype=np.float64)
    if b.shape != (6,) or np.any(b[:3] > b[3:]):
        raise ConfigError(f"crop box must be xmin,ymin,zmin,xmax,ymax,zmax with min <= max, got {list(bbox)}")
    splats = Splats.from_mapping(splats).numpy()
    m = np.asarray(splats.means)
    return splats.select(np.all((m >= b[:3]) & (m <= b[3:]), axis=1))


def build_transform(
    transform: str | None = None, rotate: str | None = None, matrix: Path | None = None, scale: float = 1.0
) -> Similarity:
    """Compose, in this order: the named ``transform``, the ``rotate`` Euler angles
    (``"x,y,z"`` degrees), the ``matrix`` file (``.npy`` or whitespace text, 4x4 or 3x4
    similarity), then a uniform ``scale``.

    Raises:
        ConfigError: unknown name, unparsable angles, unreadable or non-similarity matrix, scale <= 0.
    """
    sim = Similarity(np.eye(3))
    if transform:
        sim = sim.then(named_transform(transform))
    if rotate:
        sim = sim.then(euler_transform(rotate))
    if matrix is not None:
        matrix = Path(matrix)
        try:
            m = np.load(matrix) if matrix.suffix == ".npy" else np.loadtxt(matrix)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"{matrix}: cannot read a matrix: {exc}") from exc
        sim = sim.then(Similarity.from_matrix(m, source=str(matrix)))
    if not scale > 0:
        raise ConfigError(f"scale must be positive, got {scale}")
    if scale != 1.0:
        sim = sim.then(Similarity(np.eye(3), float(scale)))
    return sim


def export(
    source,
    output: Path,
    fmt: Literal["ply", "splat", "spz", "sog"] | None = None,
    *,
    transform: Similarity | None = None,
    prune_opacity: float = 1 / 255,
    crop_box: Sequence[float] | None = None,
    spz_version: int = 3,
) -> dict:
    """Load ``source`` (as :func:`load_splats`), prune Gaussians below ``prune_opacity``
    (activated), apply ``transform``, crop to ``crop_box`` (in the transformed frame) and write
    ``output``. Returns a summary (counts, format, bytes).

    Raises:
        DataFormatError / ConfigError: bad source, options, or nothing left to write.
    """
    splats = load_splats(source)
    antialiased = _antialiased(source)
    source = getattr(source, "path", source)  # a Run is named by its folder
    n_in = len(splats["means"])
    if prune_opacity > 0:
        splats = prune(splats, prune_opacity)
    if transform is not None:
        splats = Splats.from_mapping(transform_splats(splats, transform))
    if crop_box is not None:
        splats = crop(splats, crop_box)
    if len(splats["means"]) == 0:
        raise DataFormatError(f"{source}: no Gaussian left after pruning/cropping ({n_in} before); nothing to export")
    path = save_splats(output, splats, fmt, spz_version=spz_version, antialiased=antialiased)
    summary = {
        "source": str(source),
        "output": str(path),
        "format": fmt or path.suffix.lstrip("."),
        "num_gaussians_in": n_in,
        "num_gaussians": len(splats["means"]),
        "bytes": path.stat().st_size,
    }
    log.info("%s: %d of %d Gaussians -> %s (%d bytes)", source, summary["num_gaussians"], n_in, path, summary["bytes"])
    return summary
