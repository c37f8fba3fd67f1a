"""COLMAP scenes (``sparse/0`` binary or text, read by pycolmap) as :class:`SceneData`.

Images are matched to COLMAP entries **by name**; intrinsics are scaled by the actual size of the
loaded images (``images_4`` of a model calibrated at full size gets K / 4). Undistorted models
(PINHOLE, SIMPLE_PINHOLE) are used as they are; any other model pycolmap knows is undistorted
to PINHOLE with ``pycolmap.undistort_images`` into a cache folder outside the input.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import numpy as np

from splatforge._fs import build_once
from splatforge.data.images import image_folder, image_size
from splatforge.data.scene import SceneData
from splatforge.errors import DataFormatError, UnsupportedCameraModel

log = logging.getLogger(__name__)

__all__ = ["find_sparse_dir", "read_colmap"]

PINHOLE_MODELS = ("PINHOLE", "SIMPLE_PINHOLE")
MODEL_FILES = ("cameras", "images", "points3D")


def find_sparse_dir(root: Path) -> Path | None:
    """``root/sparse/0``, ``root/sparse`` or ``root`` itself, whichever holds a COLMAP model."""
    for cand in (root / "sparse" / "0", root / "sparse", root):
        if all((cand / f"{name}.bin").exists() or (cand / f"{name}.txt").exists() for name in MODEL_FILES):
            return cand
    return None


def load_reconstruction(sparse: Path):
    import pycolmap

    try:
        return pycolmap.Reconstruction(str(sparse))
    except (ValueError, RuntimeError, IndexError, KeyError, OSError, MemoryError) as exc:
        raise DataFormatError(
            f"{sparse}: the COLMAP model could not be read (truncated or corrupt file?): {type(exc).__name__}: {exc}"
        ) from exc


def read_colmap(root: Path, data_factor: int = 1, cache_dir: Path | None = None) -> SceneData:
    """Read a COLMAP scene folder.

    Args:
        root: folder with ``sparse/0`` (or ``sparse``) and ``images`` / ``images_<factor>``.
        data_factor: 1 reads ``images/``, k > 1 reads ``images_k/`` (made by downscaling into the
            cache when the input lacks it).
        cache_dir: where undistorted or downscaled copies go (never inside ``root``).

    Raises:
        DataFormatError: missing/corrupt model, missing image folder or images, no images.
        UnsupportedCameraModel: a camera model pycolmap cannot undistort.
    """
    root = Path(root)
    sparse = find_sparse_dir(root)
    if sparse is None:
        raise DataFormatError(
            f"{root}: no COLMAP model (looked for cameras/images/points3D .bin or .txt in sparse/0, sparse, .)"
        )
    rec = load_reconstruction(sparse)
    if rec.num_reg_images() == 0:
        raise DataFormatError(f"{sparse}: the COLMAP model has no registered images")
    validate_reconstruction(rec, sparse)
    images_dir = image_folder(root, data_factor, cache_dir)

    models = {cam.model.name for cam in rec.cameras.values()}
    if models - set(PINHOLE_MODELS):
        rec, images_dir = _undistort(rec, sparse, images_dir, models, cache_dir)

    entries = sorted(rec.images.values(), key=lambda im: im.name)
    missing = [im.name for im in entries if not (images_dir / im.name).exists()]
    if missing:
        raise DataFormatError(
            f"{images_dir}: {len(missing)} of {len(entries)} images of the COLMAP model are missing, e.g. {missing[:3]}"
        )
    if rec.num_points3D():
        pts = list(rec.points3D.items())
        row = {pid: i for i, (pid, _) in enumerate(pts)}
        points = np.array([p.xyz for _, p in pts], dtype=np.float32)
        rgb = np.array([p.color for _, p in pts], dtype=np.uint8)
    else:
        row, points, rgb = {}, np.zeros((0, 3), np.float32), np.zeros((0, 3), np.uint8)
    names, paths, c2ws, Ks, widths, heights, observations = [], [], [], [], [], [], []
    for im in entries:
        cam = rec.cameras[im.camera_id]
        path = images_dir / im.name
        w, h = image_size(path)
        K = np.array(cam.calibration_matrix(), dtype=np.float64)
        K[0, :] *= w / cam.width
        K[1, :] *= h / cam.height
        w2c = np.eye(4)
        w2c[:3, :] = np.asarray(im.cam_from_world().matrix(), dtype=np.float64)
        names.append(im.name)
        paths.append(path)
        c2ws.append(np.linalg.inv(w2c))
        Ks.append(K)
        widths.append(w)
        heights.append(h)
        seen = [(row[p.point3D_id], p.xy) for p in im.points2D if p.has_point3D() and p.point3D_id in row]
        xy = np.array([q[1] for q in seen], dtype=np.float64).reshape(-1, 2) * [w / cam.width, h / cam.height]
        observations.append((np.array([q[0] for q in seen], dtype=np.int64), xy))
    return SceneData(
        root=root,
        source="colmap",
        image_names=names,
        image_paths=paths,
        camtoworlds=np.stack(c2ws),
        Ks=np.stack(Ks),
        widths=np.array(widths),
        heights=np.array(heights),
        points=points,
        points_rgb=rgb,
        observations=observations,
    )


def validate_reconstruction(rec, sparse: Path) -> None:
    """pycolmap reads some truncated files without complaint (a short cameras.bin gives zero
    intrinsics): check what was read."""
    for cam in rec.cameras.values():
        K = np.asarray(cam.calibration_matrix())
        if not (np.isfinite(cam.params).all() and K[0, 0] > 0 and K[1, 1] > 0 and cam.width > 0 and cam.height > 0):
            raise DataFormatError(
                f"{sparse}: camera {cam.camera_id} ({cam.model.name}) has invalid intrinsics {list(cam.params)} "
                f"at {cam.width}x{cam.height} (truncated or corrupt cameras file?)"
            )
    for im in rec.images.values():
        if im.camera_id not in rec.cameras:
            raise DataFormatError(f"{sparse}: image {im.name!r} refers to missing camera {im.camera_id}")
        if im.has_pose and not np.isfinite(np.asarray(im.cam_from_world().matrix())).all():
            raise DataFormatError(f"{sparse}: image {im.name!r} has a non-finite pose (corrupt images file?)")


def _undistort(rec, sparse: Path, images_dir: Path, models: set[str], cache_dir: Path | None):
    """Undistort to PINHOLE with pycolmap into ``cache_dir/undistorted/<hash>``, once."""
    import pycolmap

    if cache_dir is None:
        raise UnsupportedCameraModel(
            f"{sparse}: camera model(s) {sorted(models - set(PINHOLE_MODELS))} are distorted; splatforge "
            "undistorts them into a cache folder: pass cache_dir (the CLI does), or undistort with "
            "`colmap image_undistorter` first"
        )
    key = hashlib.sha1(f"{sparse.resolve()}|{images_dir.resolve()}".encode()).hexdigest()[:16]

    def build(tmp: Path) -> None:
        log.info("undistorting %s (%s) into %s", images_dir, ", ".join(sorted(models)), tmp.parent)
        (tmp / "input_sparse").mkdir()
        # Calibrations refer to the full-size images: rescale each camera to the images read.
        for im in rec.images.values():
            cam = rec.cameras[im.camera_id]
            path = images_dir / im.name
            if path.exists():
                w, h = image_size(path)
                if (w, h) != (cam.width, cam.height):
                    cam.rescale(w, h)
                    rec.cameras[im.camera_id] = cam
        rec.write(str(tmp / "input_sparse"))
        try:
            pycolmap.undistort_images(str(tmp), str(tmp / "input_sparse"), str(images_dir))
        except (ValueError, RuntimeError) as exc:
            raise UnsupportedCameraModel(f"{sparse}: pycolmap could not undistort {sorted(models)}: {exc}") from exc

    out = build_once(Path(cache_dir) / "undistorted" / key, build)
    rec = load_reconstruction(out / "sparse")
    bad = {cam.model.name for cam in rec.cameras.values()} - set(PINHOLE_MODELS)
    if bad:
        raise UnsupportedCameraModel(f"{sparse}: undistortion left camera models {sorted(bad)}")
    return rec, out / "images"
