"""Structure from motion with pycolmap on the CPU: SIFT features, sequential (video) or
exhaustive (photo sets) matching, incremental mapping, the largest model kept, images
undistorted to PINHOLE. Nothing here re-implements matching or bundle adjustment.

Two things make small or dark captures work (measured on the skull video, 532x354 frames of a
dark object: plain SIFT registers 2-16 of 66 frames; with both, 65 of 66):

- **Feature images.** SIFT runs on copies of the images whose lightness is equalised with CLAHE
  (OpenCV, clip 3, 8x8 tiles) and which are upscaled (2x or 4x, bicubic) when their longer side
  is under ``upscale_below`` pixels. SIFT's contrast threshold is absolute, so dark images give few
  features; small ones give few at all. The model is rescaled back to the real images
  (cameras and keypoints) before undistortion, so nothing downstream sees the copies.
- **Guided matching** (re-matching under the estimated two-view geometry) and a mapper that
  accepts an image with 15 inlier 2D-3D matches (COLMAP's default is 30) at a 10 % inlier ratio,
  and starts from pairs with 50 inliers and 4 degrees of triangulation angle. Each registration
  is still checked by RANSAC and bundle adjustment; the mean reprojection error is reported.

**Repeatability.** COLMAP numbers images in the order its extraction threads finish, and the
numbering decides the pair order inside RANSAC and the mapper's choices, so two runs on the same
images differed (38-59 of the 66 skull ``images_8`` photos registered). The database is
rewritten with images numbered by name, geometric verification's RANSAC is seeded, and the
mapper runs on one thread (its multi-threaded bundle adjustment changed the model in 11 of 30
runs from one database), so a run with the same images, options and ``seed`` gives the same
model. Extraction and matching stay multi-threaded; mapping is a small share of the time here
(4-9 s of 55-100 s on the skull), but on scenes of many hundreds of images one-thread mapping
costs more.
"""

from __future__ import annotations

import logging
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from splatforge.data.images import list_images
from splatforge.errors import ConfigError, DataFormatError

log = logging.getLogger(__name__)

__all__ = ["SfmResult", "feature_images", "run_sfm"]


@dataclass
class SfmResult:
    num_images: int
    num_registered: int
    num_points: int
    mean_reprojection_error: float
    camera_model: str
    matcher: str
    timings: dict[str, float] = field(default_factory=dict)
    unregistered: list[str] = field(default_factory=list)

    @property
    def registered_fraction(self) -> float:
        return self.num_registered / max(1, self.num_images)


def feature_images(images_dir: Path, out_dir: Path, upscale_below: int = 1000) -> float:
    """Write the copies SIFT runs on (see the module docstring) into ``out_dir``, same names;
    returns the scale factor applied: 1, or the power of two (at most 4) that brings the
    longer side to at least ``upscale_below`` pixels."""
    import cv2

    out_dir.mkdir(parents=True, exist_ok=True)
    clahe = cv2.createCLAHE(clipLimit=3.0, tileGridSize=(8, 8))
    factor = 1.0
    names = list_images(images_dir)
    for i, name in enumerate(names):
        img = cv2.imread(str(images_dir / name), cv2.IMREAD_COLOR)
        if img is None:
            raise DataFormatError(f"{images_dir / name}: cannot decode image")
        if i == 0:
            longer = max(img.shape[:2])
            factor = (
                1.0 if longer >= upscale_below else float(min(4, 2 ** math.ceil(math.log2(upscale_below / longer))))
            )
        if factor != 1.0:
            img = cv2.resize(img, None, fx=factor, fy=factor, interpolation=cv2.INTER_CUBIC)
        lab = cv2.cvtColor(img, cv2.COLOR_BGR2LAB)
        lab[..., 0] = clahe.apply(lab[..., 0])
        if not cv2.imwrite(str(out_dir / name), cv2.cvtColor(lab, cv2.COLOR_LAB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 95]):
            raise DataFormatError(f"{out_dir / name}: cannot write the feature image")
    return factor


def _rescale_model(rec, factor: float) -> None:
    """Map a model built on images scaled by ``factor`` back to the original images."""
    if factor == 1.0:
        return
    for cam in rec.cameras.values():
        cam.rescale(1.0 / factor)
    for image in rec.images.values():
        for p in image.points2D:
            p.xy = p.xy / factor
    rec.update_point_3d_errors()


def _database_in_name_order(raw: Path, out: Path, sources: dict[str, str] | None = None) -> dict[int, list[str]]:
    """Copy the cameras, images (with their frames and rigs), keypoints and descriptors of the
    database ``raw`` (extracted with one camera per image) into a new database ``out`` with
    image and frame ids 1..N in image-name order and **one camera per source and image size**:
    the images of one source (``sources[name]``, default one source for all) and one size share
    the camera (and rig) of the first of them. So a phone's photos taken both ways up get two
    cameras, landscape and portrait, that start from the same focal (COLMAP's prior, 1.2 times
    the longer side) and are refined separately. Only for a database that holds no matches yet
    (pair ids would change). Returns ``{camera id: image names}``."""
    import pycolmap

    src, dst = pycolmap.Database.open(str(raw)), pycolmap.Database.open(str(out))
    groups: dict[tuple, int] = {}
    members: dict[int, list[str]] = {}
    try:
        for new_id, image in enumerate(sorted(src.read_all_images(), key=lambda im: im.name), start=1):
            cam = src.read_camera(image.camera_id)
            key = ((sources or {}).get(image.name, ""), cam.width, cam.height)
            if key not in groups:
                cam_id = groups[key] = len(groups) + 1
                cam.camera_id = cam_id
                dst.write_camera(cam, use_camera_id=True)
                rig = pycolmap.Rig()
                rig.rig_id = cam_id
                rig.add_ref_sensor(pycolmap.sensor_t(pycolmap.SensorType.CAMERA, cam_id))
                dst.write_rig(rig, use_rig_id=True)
            cam_id = groups[key]
            members.setdefault(cam_id, []).append(image.name)
            keypoints, descriptors = src.read_keypoints(image.image_id), src.read_descriptors(image.image_id)
            frame = pycolmap.Frame()
            frame.frame_id = new_id
            frame.rig_id = cam_id
            frame.add_data_id(pycolmap.data_t(pycolmap.sensor_t(pycolmap.SensorType.CAMERA, cam_id), new_id))
            dst.write_frame(frame, use_frame_id=True)
            renumbered = pycolmap.Image(name=image.name, camera_id=cam_id, image_id=new_id)
            renumbered.frame_id = new_id
            dst.write_image(renumbered, use_image_id=True)
            dst.write_keypoints(new_id, keypoints)
            dst.write_descriptors(new_id, descriptors)
    finally:
        src.close()
        dst.close()
    return members


def _mapper_options(seed: int):
    import pycolmap

    opts = pycolmap.IncrementalPipelineOptions()
    opts.random_seed = seed
    # Multi-threaded mapping gave a different model in 11 of 30 runs from one database; one
    # thread gave the same model 30 of 30, and no slower on the 66 images_8 photos (about 6 s).
    opts.num_threads = 1
    m = opts.mapper
    m.abs_pose_min_num_inliers = 15
    m.abs_pose_min_inlier_ratio = 0.1
    m.init_min_num_inliers = 50
    m.init_min_tri_angle = 4.0
    m.max_reg_trials = 10
    return opts


def run_sfm(
    images_dir: Path,
    work_dir: Path,
    scene_dir: Path,
    *,
    matcher: Literal["sequential", "exhaustive"],
    camera_model: str = "SIMPLE_RADIAL",
    sources: dict[str, str] | None = None,
    max_image_size: int = 1600,
    max_features: int = 4096,
    upscale_below: int = 1000,
    seed: int = 0,
) -> SfmResult:
    """Pose the images in ``images_dir``; write the undistorted scene (``images/``,
    ``sparse/0/``) into ``scene_dir``. ``work_dir`` holds the database, the feature images and
    the raw models. There is one camera per source (``sources``: image name -> video or folder;
    default: one source) and image size, so no image is dropped for having another size.
    ``seed`` seeds COLMAP's random number generators (two-view RANSAC, mapping): a rerun on the
    same images with the same options gives the same model.

    Raises:
        ConfigError: unknown camera model or matcher.
        DataFormatError: no model could be built.
    """
    import pycolmap

    if camera_model not in pycolmap.CameraModelId.__members__:
        raise ConfigError(
            f"camera model {camera_model!r} is not one pycolmap knows: {sorted(pycolmap.CameraModelId.__members__)}"
        )
    work_dir.mkdir(parents=True, exist_ok=True)
    database, raw_database = work_dir / "database.db", work_dir / "database_extraction.db"
    for stale in (database, raw_database):
        if stale.exists():
            stale.unlink()
    timings: dict[str, float] = {}
    device = pycolmap.Device.cpu
    pycolmap.set_random_seed(seed)

    t = time.perf_counter()
    feat_dir = work_dir / "feature_images"
    shutil.rmtree(feat_dir, ignore_errors=True)
    factor = feature_images(images_dir, feat_dir, upscale_below)
    reader = pycolmap.ImageReaderOptions()
    reader.camera_model = camera_model
    extraction = pycolmap.FeatureExtractionOptions()
    extraction.max_image_size = int(max_image_size * factor)
    extraction.sift.max_num_features = max_features
    # one camera per image here (none is dropped for its size); merged per source and size next
    pycolmap.extract_features(
        raw_database,
        feat_dir,
        camera_mode=pycolmap.CameraMode.PER_IMAGE,
        reader_options=reader,
        extraction_options=extraction,
        device=device,
    )
    cameras = _database_in_name_order(raw_database, database, sources)
    if len(cameras) > 1:
        log.info(
            "SfM with %d cameras (one per source and image size): %s",
            len(cameras),
            ", ".join(f"{len(v)} images" for v in cameras.values()),
        )
    timings["features_s"] = time.perf_counter() - t

    t = time.perf_counter()
    matching = pycolmap.FeatureMatchingOptions()
    matching.guided_matching = True
    verification = pycolmap.TwoViewGeometryOptions()
    verification.ransac.random_seed = seed
    if matcher == "sequential":
        pairing = pycolmap.SequentialPairingOptions()
        pairing.overlap = 10
        pairing.quadratic_overlap = True
        pycolmap.match_sequential(
            database,
            matching_options=matching,
            pairing_options=pairing,
            verification_options=verification,
            device=device,
        )
    elif matcher == "exhaustive":
        pycolmap.match_exhaustive(database, matching_options=matching, verification_options=verification, device=device)
    else:
        raise ConfigError(f"matcher must be 'sequential' or 'exhaustive', got {matcher!r}")
    timings["matching_s"] = time.perf_counter() - t

    t = time.perf_counter()
    models_dir = work_dir / "sparse"
    shutil.rmtree(models_dir, ignore_errors=True)
    models_dir.mkdir(parents=True)
    models = pycolmap.incremental_mapping(database, feat_dir, models_dir, options=_mapper_options(seed))
    timings["mapping_s"] = time.perf_counter() - t
    names = list_images(images_dir)
    num_images = len(names)
    if not models:
        raise DataFormatError(f"{images_dir}: SfM could not register any image pair (0 of {num_images} images posed)")
    best_id, best = max(models.items(), key=lambda kv: kv[1].num_reg_images())
    _rescale_model(best, factor)
    best_dir = models_dir / f"{best_id}_rescaled"
    best_dir.mkdir()
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
        num_images=num_images,
        num_registered=best.num_reg_images(),
        num_points=best.num_points3D(),
        mean_reprojection_error=float(best.compute_mean_reprojection_error()),
        camera_model=camera_model,
        matcher=matcher,
        timings=timings,
        unregistered=sorted(set(names) - {im.name for im in best.images.values() if im.has_pose}),
    )
