"""``prepare``: videos and/or photo folders -> a posed scene folder the trainer reads.

Phases: frames (sharp, evenly spread, from each video; oriented, resized photos), SfM with
pycolmap (SIFT, sequential matching for video frames, exhaustive for small photo sets,
incremental mapping, largest model, undistortion to PINHOLE), then the scene layout:
``SCENE/images/``, ``SCENE/images_<k>/`` on request, ``SCENE/sparse/0/``,
``SCENE/splits/{train,test}.txt`` and ``SCENE/prepare.json``.

The scene is assembled in ``SCENE.partial`` and renamed to ``SCENE`` only when everything
succeeded: a failed or interrupted run never leaves a folder that looks like a finished scene.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

from splatforge._fs import atomic_path
from splatforge.data.frames import VIDEO_SUFFIXES, extract_video_frames, import_photos, video_frame_count
from splatforge.data.images import IMAGE_SUFFIXES, downscale_into, list_images
from splatforge.data.scene import make_split
from splatforge.data.sfm import run_sfm
from splatforge.errors import ConfigError, DataFormatError

log = logging.getLogger(__name__)

__all__ = ["PrepareConfig", "prepare"]

MIN_IMAGES = 3
MIN_REGISTERED_FRACTION = 0.5
EXHAUSTIVE_MAX_IMAGES = 100


@dataclass
class PrepareConfig:
    inputs: list[Path]
    """Videos and/or folders of photos (any mix)."""
    output: Path
    """The scene folder to create (must not exist yet)."""
    target_frames: int = 150
    """Frames kept from all videos together (split evenly by video length)."""
    max_size: int = 1600
    """Longer image side in pixels after import."""
    matcher: Literal["auto", "sequential", "exhaustive"] = "auto"
    """auto: exhaustive up to 100 images (video frames included: it finds every loop closure,
    and hand-held videos jump), sequential above."""
    camera_model: str = "SIMPLE_RADIAL"
    """COLMAP camera model estimated by SfM; images are undistorted to PINHOLE afterwards."""
    max_features: int = 4096
    """SIFT features per image (on the feature images, see :mod:`splatforge.data.sfm`)."""
    downscale: list[int] = field(default_factory=list)
    """Also write images_<k> for these factors (e.g. 2 4 8)."""
    test_every: int = 8
    seed: int = 0
    """Seeds COLMAP's RANSAC and mapper: the same inputs, options and seed give the same model."""


def _classify(inputs: Sequence[Path]) -> tuple[list[Path], list[Path]]:
    videos, photos = [], []
    for item in inputs:
        item = Path(item)
        if not item.exists():
            raise DataFormatError(f"{item}: no such file or folder")
        if item.is_dir():
            files = sorted(p for p in item.iterdir() if p.is_file())
            videos += [p for p in files if p.suffix in VIDEO_SUFFIXES]
            photos += [p for p in files if p.suffix not in VIDEO_SUFFIXES and not p.name.startswith(".")]
        elif item.suffix in VIDEO_SUFFIXES:
            videos.append(item)
        elif item.suffix in IMAGE_SUFFIXES:
            photos.append(item)
        else:
            raise DataFormatError(
                f"{item}: neither a video ({', '.join(VIDEO_SUFFIXES[:6])}) nor an image nor a folder"
            )
    return videos, photos


def _write_masks(found: Path, images: Path, out: Path, names: list[str]) -> None:
    """``out/<stem>.png`` for every image: its imported mask, or all white (keep) for images
    without one (video frames, photos without a mask), so training finds a mask for each."""
    from PIL import Image

    from splatforge.data.images import image_size

    out.mkdir()
    for name in names:
        stem = Path(name).stem
        src = found / f"{stem}.png"
        if src.is_file():
            shutil.copyfile(src, out / f"{stem}.png")
        else:
            Image.new("L", image_size(images / name), 255).save(out / f"{stem}.png")


def _inputs_label(inputs: Sequence[Path]) -> str:
    """The inputs named for an error: all of them when few, else the first and a count."""
    names = [str(p) for p in inputs]
    return ", ".join(names) if len(names) <= 3 else f"{names[0]} and {len(names) - 1} other inputs"


def prepare(cfg: PrepareConfig, on_phase: Callable[[str], None] | None = None) -> dict:
    """Build the scene; returns the summary also written to ``SCENE/prepare.json``.
    ``on_phase(name)`` is called as each phase starts ("frames", "sfm", "layout").

    Raises:
        DataFormatError: unreadable inputs, a video with no decodable frame, fewer than 3 images,
            or SfM registering less than half of the images (each message names the file and
            the numbers).
        ConfigError: bad options or an existing output folder.
    """
    out = Path(cfg.output)
    if out.exists():
        raise ConfigError(f"{out}: already exists; choose a new scene folder")
    if cfg.target_frames < MIN_IMAGES:
        raise ConfigError(f"target_frames must be >= {MIN_IMAGES}, got {cfg.target_frames}")
    videos, photos = _classify(cfg.inputs)
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    frames_dir = partial / "work" / "frames"
    frames_dir.mkdir(parents=True)
    timings: dict[str, float] = {}
    summary: dict = {
        "inputs": [str(p) for p in cfg.inputs],
        "config": {
            k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items() if k not in ("inputs", "output")
        },
    }
    phase = on_phase or (lambda name: None)
    try:
        phase("frames")
        t = time.perf_counter()
        frame_stats = []
        sources: dict[str, str] = {}  # image name -> the video or "photos": one camera per source and size
        if videos:
            lengths = [max(1, video_frame_count(v)) for v in videos]
            for video, length in zip(videos, lengths):
                share = max(MIN_IMAGES, round(cfg.target_frames * length / sum(lengths)))
                stats = extract_video_frames(video, frames_dir, share, cfg.max_size)
                log.info(
                    "%s: kept %d of %d frames (%d near-duplicates dropped)",
                    video.name,
                    stats.kept,
                    stats.decoded,
                    stats.duplicates,
                )
                frame_stats.append(asdict(stats))
                sources.update({name: str(video) for name in list_images(frames_dir) if name not in sources})
        masks_dir = partial / "work" / "masks"
        n_photos, skipped = import_photos(photos, frames_dir, cfg.max_size, masks_dir=masks_dir) if photos else (0, [])
        sources.update({name: "photos" for name in list_images(frames_dir) if name not in sources})
        timings["frames_s"] = time.perf_counter() - t
        n_images = len(list_images(frames_dir))
        summary.update(videos=frame_stats, photos={"imported": n_photos, "skipped": skipped}, num_images=n_images)
        if n_images < MIN_IMAGES:
            raise DataFormatError(
                f"{_inputs_label(cfg.inputs)}: only {n_images} usable image(s); SfM needs at least {MIN_IMAGES}"
            )
        matcher = cfg.matcher
        if matcher == "auto":
            matcher = "sequential" if n_images > EXHAUSTIVE_MAX_IMAGES else "exhaustive"
        phase(f"sfm ({matcher} matching, {n_images} images)")
        sfm = run_sfm(
            frames_dir,
            partial / "work",
            partial / "scene",
            matcher=matcher,
            camera_model=cfg.camera_model,
            sources=sources,
            max_image_size=cfg.max_size,
            max_features=cfg.max_features,
            seed=cfg.seed,
        )
        timings.update(sfm.timings)
        summary.update(
            num_registered=sfm.num_registered,
            registered_fraction=sfm.registered_fraction,
            num_points=sfm.num_points,
            mean_reprojection_error_px=sfm.mean_reprojection_error,
            matcher=matcher,
            unregistered=sfm.unregistered,
        )
        if sfm.registered_fraction < MIN_REGISTERED_FRACTION:
            raise DataFormatError(
                f"{_inputs_label(cfg.inputs)}: SfM registered only {sfm.num_registered} of {sfm.num_images} images "
                f"({100 * sfm.registered_fraction:.0f} %, need {100 * MIN_REGISTERED_FRACTION:.0f} %): "
                "too little overlap or texture"
            )
        scene = partial / "scene"
        phase("layout")
        t = time.perf_counter()
        names = list_images(scene / "images")
        if masks_dir.is_dir():  # the photos' masks, upright and sized as the images (white for images without one)
            _write_masks(masks_dir, scene / "images", scene / "masks", names)
        for k in cfg.downscale:
            downscale_into(scene / "images", scene / f"images_{k}", k)
        split = make_split(names, test_every=cfg.test_every)
        (scene / "splits").mkdir()
        for key in ("train", "test"):
            (scene / "splits" / f"{key}.txt").write_text("".join(names[i] + "\n" for i in split[key]))
        timings["layout_s"] = time.perf_counter() - t
        summary["timings"] = timings
        with atomic_path(scene / "prepare.json") as tmp:
            tmp.write_text(json.dumps(summary, indent=2))
        scene.rename(out)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return summary
