"""``load_scene``: detect a scene folder's format, read it and attach the train/test split."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

from splatforge.data.colmap import find_sparse_dir, read_colmap
from splatforge.data.images import find_masks, image_size, list_images
from splatforge.data.scene import SceneData, make_split
from splatforge.data.transforms import read_transforms
from splatforge.errors import DataFormatError

log = logging.getLogger(__name__)

__all__ = ["detect_format", "fit_data_factor", "image_folders", "load_scene"]


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
    test_every: int | None = 8,
    split_ratio: float | None = None,
    partition: Path | None = None,
    cache_dir: Path | None = None,
    background: tuple[float, float, float] | None = None,
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
    scene.mask_paths = find_masks(root, scene.image_names)
    if not scene.split["train"]:
        raise DataFormatError(f"{root}: the split leaves no training views")
    return scene


def image_folders(root: Path) -> tuple[Path, dict[int, Path]]:
    """The scene's base image folder (``images/`` for COLMAP, the frames' folder for
    transforms.json; it may not exist) and the downscaled copies beside it: ``{k: folder}`` for
    every ``<base>_<k>`` present (and ``1: base`` when it exists).

    Raises:
        DataFormatError: as :func:`detect_format`, or an unreadable transforms.json.
    """
    root = Path(root)
    if detect_format(root) == "transforms":
        from splatforge.data.transforms import _resolve

        try:
            frame = json.loads((root / "transforms.json").read_text())["frames"][0]
            base = _resolve(root, frame["file_path"]).parent
        except (OSError, ValueError, KeyError, IndexError, TypeError) as exc:
            raise DataFormatError(f"{root / 'transforms.json'}: not a readable transforms.json: {exc}") from exc
    else:
        base = root / "images"
    found = {1: base} if base.is_dir() else {}
    for p in base.parent.glob(f"{base.name}_*"):
        suffix = p.name[len(base.name) + 1 :]
        if p.is_dir() and suffix.isdigit() and int(suffix) > 1:
            found[int(suffix)] = p
    return base, found


def fit_data_factor(root: Path, data_factor: int, max_image_size: int) -> int:
    """The data factor to train ``root`` at: ``data_factor``, raised until the images' longer side
    is at most ``max_image_size`` pixels (0: no limit). A factor is usable when its folder exists
    or the full-size folder does (a downscaled copy is made in the cache); otherwise the next
    larger existing folder is taken. The size is read from the first image's header.

    Raises:
        DataFormatError: no image folder to measure.
    """
    if max_image_size <= 0:
        return data_factor
    _base, folders = image_folders(root)
    if not folders:
        return data_factor  # load_scene names what is missing
    k0, folder = (data_factor, folders[data_factor]) if data_factor in folders else min(folders.items())
    names = list_images(folder)
    if not names:
        return data_factor
    w, h = image_size(folder / names[0])
    longer = max(w, h) * k0 / data_factor  # the size at the requested factor
    if longer <= max_image_size:
        return data_factor
    wanted = data_factor * math.ceil(longer / max_image_size)
    if wanted in folders or 1 in folders:
        chosen = wanted
    else:
        larger = sorted(k for k in folders if k >= wanted)
        if not larger:
            log.warning(
                "%s: images are %d px at factor %d and no folder of a larger factor exists to fit %d px",
                root,
                round(longer),
                data_factor,
                max_image_size,
            )
            return data_factor
        chosen = larger[0]
    log.info(
        "%s: training at data factor %d (images at most %d px; the longer side at factor %d is %d px)",
        root,
        chosen,
        max_image_size,
        data_factor,
        round(longer),
    )
    return chosen
