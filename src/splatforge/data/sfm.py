"""Structure from motion with pycolmap on the CPU: SIFT features, sequential (video) or
exhaustive (photo sets) matching, incremental mapping, the largest model kept, images
undistorted to PINHOLE. Nothing here re-implements matching or bundle adjustment."""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from splatforge.errors import ConfigError, DataFormatError

log = logging.getLogger(__name__)

__all__ = ["SfmResult", "run_sfm"]


@dataclass
class SfmResult:
    num_images: int
    num_registered: int
    num_points: int
    mean_reprojection_error: float
    camera_model: str
    matcher: str
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def registered_fraction(self) -> float:
        return self.num_registered / max(1, self.num_images)


def run_sfm(images_dir: Path, work_dir: Path, scene_dir: Path, *, matcher: Literal["sequential", "exhaustive"],
            camera_model: str = "SIMPLE_RADIAL", single_camera: bool = True, max_image_size: int = 1600,
            max_features: int = 8192) -> SfmResult:  # fmt: skip
    """Pose the images in ``images_dir``; write the undistorted scene (``images/``,
    ``sparse/0/``) into ``scene_dir``. ``work_dir`` holds the database and raw models.

    Raises:
        ConfigError: unknown camera model or matcher.
        DataFormatError: no model could be built.
    """
    import pycolmap

    if camera_model not in pycolmap.CameraModelId.__members__:
        raise ConfigError(f"camera model {camera_model!r} is not one pycolmap knows: {sorted(pycolmap.CameraModelId.__members__)}")
    work_dir.mkdir(parents=True, exist_ok=True)
    database = work_dir / "database.db"
    if database.exists():
        database.unlink()
    timings: dict[str, float] = {}
    device = pycolmap.Device.cpu

    t = time.perf_counter()
    reader = pycolmap.ImageReaderOptions()
    reader.camera_model = camera_model
    extraction = pycolmap.FeatureExtractionOptions()
    extraction.max_image_size = max_image_size
    extraction.sift.max_num_features = max_features
    mode = pycolmap.CameraMode.SINGLE if single_camera else pycolmap.CameraMode.AUTO
    pycolmap.extract_features(database, images_dir, camera_mode=mode, reader_options=reader,
                              extraction_options=extraction, device=device)  # fmt: skip
    timings["features_s"] = time.perf_counter() - t

    t = time.perf_counter()
    if matcher == "sequential":
        pairing = pycolmap.SequentialPairingOptions()
        pairing.overlap = 10
        pairing.quadratic_overlap = True
        pycolmap.match_sequential(database, pairing_options=pairing, device=device)
    elif matcher == "exhaustive":
        pycolmap.match_exhaustive(database, device=device)
    else:
        raise ConfigError(f"matcher must be 'sequential' or 'exhaustive', got {matcher!r}")
    timings["matching_s"] = time.perf_counter() - t

    t = time.perf_counter()
    models_dir = work_dir / "sparse"
    shutil.rmtree(models_dir, ignore_errors=True)
    models_dir.mkdir(parents=True)
    models = pycolmap.incremental_mapping(database, images_dir, models_dir)
    timings["mapping_s"] = time.perf_counter() - t
    num_images = len([p for p in images_dir.iterdir() if p.is_file()])
    if not models:
        raise DataFormatError(f"{images_dir}: SfM could not register any image pair (0 of {num_images} images posed)")
    best_id, best = max(models.items(), key=lambda kv: kv[1].num_reg_images())
    best_dir = models_dir / str(best_id)
    best.write(str(best_dir))

    t = time.perf_counter()
    pycolmap.undistort_images(str(scene_dir), str(best_dir), str(images_dir))
    sparse = scene_dir / "sparse"
    (sparse / "0").mkdir(parents=True, exist_ok=True)
    for f in list(sparse.iterdir()):
        if f.is_file():
            f.rename(sparse / "0" / f.name)
    for extra in ("stereo", "run-colmap-geometric.sh", "run-colmap-photometric.sh"):
        p = scene_dir / extra
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()
    timings["undistort_s"] = time.perf_counter() - t
    return SfmResult(
        num_images=num_images, num_registered=best.num_reg_images(), num_points=best.num_points3D(),
        mean_reprojection_error=float(best.compute_mean_reprojection_error()), camera_model=camera_model,
        matcher=matcher, timings=timings,
    )  # fmt: skip
