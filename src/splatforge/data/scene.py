"""``SceneData``: what every reader returns and every stage after it consumes."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np

from splatforge.errors import ConfigError, DataFormatError

__all__ = ["NEAR_PLANE", "SceneData", "make_split", "world_unit"]

NEAR_PLANE = 0.01
"""The near plane (camera z below which Gaussians are culled) in ``world_unit`` lengths: gsplat's
default ``near_plane`` in the normalised world its trainer renders in (cameras at median distance
1 from their focus), so that a scene in millimetres and the same scene in kilometres render alike."""


def world_unit(camtoworlds: np.ndarray) -> float:
    """The length, in world units, that gsplat's trainer rescales to 1 (its default
    ``normalize_world_space``: ``similarity_from_cameras`` of ``examples/datasets/normalize.py``,
    after nerf-factory) for cameras ``camtoworlds [N, 4, 4]`` (OpenCV axes): the median distance
    of the camera centres from the scene's focus, the median over the cameras of the point of each
    optical axis (+z) nearest the world origin. Rotations and uniform scalings of the world change
    it as they change lengths; 1.0 when it is zero or not finite (a single camera, all on one point)."""
    camtoworlds = np.asarray(camtoworlds, dtype=np.float64)
    centers = camtoworlds[:, :3, 3]
    axes = camtoworlds[:, :3, 2]
    nearest = centers - np.sum(axes * centers, axis=1, keepdims=True) * axes
    unit = float(np.median(np.linalg.norm(centers - np.median(nearest, axis=0), axis=1))) if len(centers) else 0.0
    return unit if np.isfinite(unit) and unit > 0.0 else 1.0


@dataclass
class SceneData:
    """A posed image set, sorted by image name (the stable identity of a view).

    Attributes:
        root: the scene folder that was read (never written to).
        source: the format read, e.g. ``"colmap"`` or ``"transforms"``.
        image_names: ``[N]`` names relative to the image folder, sorted.
        image_paths: ``[N]`` files to load (the input's, or undistorted/downscaled copies in a
            cache folder outside the input).
        camtoworlds: ``[N, 4, 4]`` float64 camera-to-world, OpenCV axes (+x right, +y down,
            +z forward), world units.
        Ks: ``[N, 3, 3]`` float64 pinhole intrinsics in pixels at the loaded image size.
        widths, heights: ``[N]`` int image sizes in pixels.
        points: ``[P, 3]`` float32 sparse points (world), possibly ``P = 0``.
        points_rgb: ``[P, 3]`` uint8 colours of the points.
        split: ``{"train": [...], "test": [...]}`` indices into the sorted views.
        background: RGB in [0, 1] that transparent images were composited on, or None.
        observations: per view, the SfM points it observes (COLMAP's tracks): ``(rows [M]``
            int64 indices into ``points``, ``xy [M, 2]`` float64 keypoints in pixels at the loaded
            resolution, COLMAP's convention: pixel centres at +0.5``)``; None when the format
            has no tracks.
    """

    root: Path
    source: str
    image_names: list[str]
    image_paths: list[Path]
    camtoworlds: np.ndarray
    Ks: np.ndarray
    widths: np.ndarray
    heights: np.ndarray
    points: np.ndarray
    points_rgb: np.ndarray
    split: dict[str, list[int]] = field(default_factory=lambda: {"train": [], "test": []})
    background: tuple[float, float, float] | None = None
    observations: list[tuple[np.ndarray, np.ndarray]] | None = None
    mask_paths: list[Path] | None = None
    """Per view, its mask (``SCENE/masks/<image stem>.png``, white = keep), or None when the
    scene has no ``masks/`` folder (see :func:`splatforge.data.images.find_masks`)."""

    def __len__(self) -> int:
        return len(self.image_names)

    @cached_property
    def alpha_background(self) -> tuple[float, float, float] | None:
        """The colour this scene's images are composited on when they have an alpha channel
        (``background``, white when None; the first image decides), None for opaque images.
        Renders compared with such images are drawn on that colour, and training composites them
        on a random one each step (nerfstudio's habit for Blender scenes). None too when the
        first image cannot be read: drawing a view needs only its camera (loading the image
        itself then fails, naming the file)."""
        from splatforge.data.images import WHITE, has_alpha

        try:
            if not self.image_paths or not has_alpha(self.image_paths[0]):
                return None
        except DataFormatError:
            return None
        return tuple(  # type: ignore[return-value]
            float(c) for c in (self.background if self.background is not None else WHITE)
        )

    @property
    def viewmats(self) -> np.ndarray:
        """``[N, 4, 4]`` world-to-camera matrices (OpenCV axes)."""
        return np.linalg.inv(self.camtoworlds)

    def scene_scale(self) -> float:
        """Radius of the camera centres around their mean, times 1.1 (gsplat/Inria practice):
        the unit the means' learning rate and the densification thresholds are scaled by."""
        centers = self.camtoworlds[:, :3, 3]
        return float(np.linalg.norm(centers - centers.mean(0), axis=1).max() * 1.1) or 1.0

    def world_unit(self) -> float:
        """:func:`world_unit` of the scene's cameras: the length gsplat's trainer rescales to 1."""
        return world_unit(self.camtoworlds)


def make_split(
    names: Sequence[str],
    *,
    test_every: int | None = 8,
    split_ratio: float | None = None,
    partition: Path | None = None,
) -> dict[str, list[int]]:
    """Train/test indices over views sorted by name.

    Exactly one rule applies, in this order of precedence:

    - ``partition``: a ``partition.json`` (``{"train": [...], "test": [...]}`` indices) or a
      folder ``splits/`` with ``train.txt`` / ``test.txt`` (one image name per line).
    - ``split_ratio`` r in (0, 1): ``round(r * N)`` training views (at least 1, at most N - 1)
      evenly spread over the sorted list (linspace), the rest test.
    - ``test_every`` k: every k-th view (indices 0, k, 2k, ...) is test (Mip-NeRF 360 practice);
      ``k <= 0`` or None puts every view in train and none in test.

    Raises:
        ConfigError: a ratio outside (0, 1).
        DataFormatError: a partition file that is unreadable or names unknown views.
    """
    n = len(names)
    if partition is not None:
        return _read_partition(Path(partition), list(names))
    if split_ratio is not None:
        if not 0.0 < split_ratio < 1.0:
            raise ConfigError(f"split ratio must be in (0, 1), got {split_ratio}")
        if n < 2:
            raise ConfigError(f"a split ratio needs at least 2 views, the scene has {n}")
        n_train = min(max(1, int(round(split_ratio * n))), n - 1)  # noqa: RUF046
        train = sorted(set(np.linspace(0, n - 1, n_train).round().astype(int).tolist()))
        test = [i for i in range(n) if i not in set(train)]
        return {"train": train, "test": test}
    if not test_every or test_every <= 0:
        return {"train": list(range(n)), "test": []}
    return {"train": [i for i in range(n) if i % test_every != 0], "test": [i for i in range(n) if i % test_every == 0]}


def _read_partition(path: Path, names: list[str]) -> dict[str, list[int]]:
    n = len(names)
    if path.is_dir():
        index = {name: i for i, name in enumerate(names)}
        stem_index = {Path(name).stem: i for i, name in enumerate(names)}
        out: dict[str, list[int]] = {}
        for key in ("train", "test"):
            f = path / f"{key}.txt"
            if not f.exists():
                raise DataFormatError(f"{f}: missing (a splits folder needs train.txt and test.txt)")
            ids = []
            for line in f.read_text().split():
                i = index.get(line, stem_index.get(Path(line).stem))
                if i is None:
                    raise DataFormatError(f"{f}: image {line!r} is not in the scene")
                ids.append(i)
            out[key] = sorted(ids)
        return out
    try:
        data = json.loads(path.read_text())
        out = {key: sorted(int(i) for i in data[key]) for key in ("train", "test")}
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DataFormatError(f"{path}: not a partition.json with integer lists 'train' and 'test': {exc}") from exc
    bad = [i for key in out for i in out[key] if not 0 <= i < n]
    if bad:
        raise DataFormatError(f"{path}: indices {bad[:5]} out of range for {n} views")
    return out
