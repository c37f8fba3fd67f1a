"""``load_scene``: detect a scene folder's format, read it and attach the train/test split."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from splatforge.data.colmap import find_sparse_dir, read_colmap
from splatforge.data.scene import SceneData, make_split
from splatforge.data.transforms import read_transforms
from splatforge.errors import DataFormatError

__all__ = ["detect_format", "load_scene"]


def detect_format(root: Path) -> str:
    """``"transforms"`` or ``"colmap"`` for a scene folder.

    Raises:
        DataFormatError: the folder is missing or matches no format; the message lists what was
            looked for.
    """
    root = Path(root)
    if not root.exists():
        raise DataFormatError(f"{root}: no such folder")
    if not root.is_dir():
        raise DataFormatError(f"{root}: not a folder (give the scene folder, not a file)")
    if (root / "transforms.json").is_file():
        return "transforms"
    if find_sparse_dir(root) is not None:
        return "colmap"
    raise DataFormatError(
        f"{root}: not a scene folder splatforge can read; looked for transforms.json "
        "(instant-ngp/nerfstudio/Blender/DL3DV) and a COLMAP model (cameras, images, points3D "
        ".bin or .txt in sparse/0, sparse or the folder itself)"
    )


def load_scene(
    root: Path,
    *,
    data_factor: int = 1,
    test_every: Optional[int] = 8,
    split_ratio: Optional[float] = None,
    partition: Optional[Path] = None,
    cache_dir: Optional[Path] = None,
    background: Optional[tuple[float, float, float]] = None,
) -> SceneData:
    """Read a scene folder of any supported format into :class:`SceneData` with its split.

    The split rule is, in order: ``partition`` if given, else ``root/partition.json`` or
    ``root/splits/`` if present, else ``split_ratio``, else ``test_every`` (see
    :func:`splatforge.data.scene.make_split`). Nothing is written inside ``root``; undistorted or
    downscaled copies go to ``cache_dir``.

    Raises:
        DataFormatError, UnsupportedCameraModel: see the readers.
    """
    root = Path(root)
    fmt = detect_format(root)
    if fmt == "transforms":
        scene = read_transforms(root, data_factor, cache_dir, background)
    else:
        scene = read_colmap(root, data_factor, cache_dir)
    if len(scene) == 0:
        raise DataFormatError(f"{root}: the scene has no images")
    if partition is None and split_ratio is None:
        for cand in (root / "partition.json", root / "splits"):
            if cand.exists():
                partition = cand
                break
    scene.split = make_split(scene.image_names, test_every=test_every, split_ratio=split_ratio, partition=partition)
    if not scene.split["train"]:
        raise DataFormatError(f"{root}: the split leaves no training views")
    return scene
