"""Frames for SfM: sharp, evenly spread frames from videos (PyAV), oriented photos (Pillow).

Frame selection: the video is decoded once; evenly spaced candidates (about ``oversample`` per
kept frame) are scored by sharpness (variance of the Laplacian of the grey image, Pech-Pacheco
et al. 2000); the timeline is cut into ``target`` equal windows and the sharpest candidate of each
window is kept, so kept frames are both sharp and evenly spread; only the best frame so far of
each window is held in memory (``target`` frames, whatever the video's length and resolution).
A kept frame that barely differs from the previous kept one (camera not moving) is dropped as a
near-duplicate.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from splatforge._fs import atomic_path
from splatforge.errors import DataFormatError

if TYPE_CHECKING:
    import av

log = logging.getLogger(__name__)

__all__ = [
    "VIDEO_SUFFIXES",
    "WindowBest",
    "decode_video",
    "extract_video_frames",
    "import_photos",
    "is_near_duplicate",
    "select_windows",
    "sharpness",
    "upright",
    "video_frame_count",
]

VIDEO_SUFFIXES = (".mp4", ".mov", ".m4v", ".avi", ".mkv", ".webm", ".MP4", ".MOV")
_THUMB = 64


def sharpness(gray: np.ndarray) -> float:
    """Variance of the Laplacian (OpenCV, 3x3 kernel) of a grey ``[H, W]`` image: higher is
    sharper; scale-dependent, so compare frames of the same size only."""
    import cv2

    return float(cv2.Laplacian(np.asarray(gray, dtype=np.float32), cv2.CV_32F).var())


def select_windows(positions: np.ndarray, scores: np.ndarray, target: int, total: int) -> list[int]:
    """Indices into ``positions`` of the sharpest candidate in each of ``target`` equal windows
    of ``[0, total)``; windows without candidates are skipped.

    Args:
        positions: ``[M]`` increasing frame numbers of the candidates.
        scores: ``[M]`` sharpness of each candidate.
    """
    edges = np.linspace(0, total, target + 1)
    chosen = []
    for lo, hi in zip(edges[:-1], edges[1:]):  # noqa: RUF007
        inside = np.nonzero((positions >= lo) & (positions < hi))[0]
        if len(inside):
            chosen.append(int(inside[np.argmax(scores[inside])]))
    return chosen


def _thumb(rgb: np.ndarray) -> np.ndarray:
    gray = Image.fromarray(rgb).convert("L").resize((_THUMB, _THUMB), Image.Resampling.BILINEAR)
    return np.asarray(gray, dtype=np.float32) / 255.0


def is_near_duplicate(a: np.ndarray, b: np.ndarray, threshold: float = 0.01) -> bool:
    """Two thumbnails (``[64, 64]`` grey in [0, 1]) whose mean absolute difference is below
    ``threshold``: a static camera."""
    return float(np.mean(np.abs(a - b))) < threshold


def _resize(img: Image.Image, max_size: int) -> Image.Image:
    if max_size and max(img.size) > max_size:
        scale = max_size / max(img.size)
        img = img.resize(
            (max(1, round(img.width * scale)), max(1, round(img.height * scale))), Image.Resampling.LANCZOS
        )
    return img


@dataclass
class FrameStats:
    source: str
    decoded: int
    candidates: int
    kept: int
    duplicates: int


def extract_video_frames(
    path: Path,
    out_dir: Path,
    target: int,
    max_size: int = 1600,
    oversample: int = 4,
    progress: Callable[[int], None] | None = None,
) -> FrameStats:
    """Write about ``target`` sharp, evenly spread frames of the video ``path`` to ``out_dir`` as
    ``{stem}_{frame:06d}.jpg`` (frame = decode order), upright (rotation metadata applied) and at
    most ``max_size`` pixels on the longer side.

    Raises:
        DataFormatError: the file cannot be opened or has no decodable video frame.
    """
    path = Path(path)
    total = video_frame_count(path)
    stride = max(1, total // max(1, target * oversample))
    best = WindowBest(target, max(total, 1))
    decoded = candidates = 0
    for index, frame in decode_video(path):
        decoded = index + 1
        if progress is not None:
            progress(decoded)
        if index % stride:
            continue
        rgb = frame.to_ndarray(format="rgb24")
        small = np.asarray(_resize(Image.fromarray(rgb), 480).convert("L"))
        candidates += 1
        best.offer(index, sharpness(small), (rgb, int(getattr(frame, "rotation", 0) or 0)))
    kept, duplicates, last_thumb = 0, 0, None
    for index, (rgb, rotation) in best.chosen():
        thumb = _thumb(rgb)
        if last_thumb is not None and is_near_duplicate(thumb, last_thumb):
            duplicates += 1
            continue
        last_thumb = thumb
        img = Image.fromarray(upright(rgb, rotation))
        with atomic_path(out_dir / f"{path.stem}_{index:06d}.jpg") as tmp:
            _resize(img, max_size).save(tmp, quality=95)
        kept += 1
    return FrameStats(str(path), decoded, candidates, kept, duplicates)


def decode_video(path: Path) -> Iterator[tuple[int, av.VideoFrame]]:
    """``(index, frame)`` for every frame of the first video stream of ``path``, in decode
    order (index 0-based: the frame numbering of splatter-server's job roots and our frame
    names). A decoding error after the first frame ends the video with a warning.

    Raises:
        DataFormatError: the file cannot be opened, has no video stream or no decodable frame.
    """
    import av

    try:
        container = av.open(str(path))
    except (av.error.FFmpegError, OSError) as exc:
        raise DataFormatError(f"{path}: not a readable video: {exc}") from exc
    decoded = 0
    with container:
        if not container.streams.video:
            raise DataFormatError(f"{path}: no video stream")
        try:
            for frame in container.decode(container.streams.video[0]):
                yield decoded, frame
                decoded += 1
        except av.error.FFmpegError as exc:
            if not decoded:
                raise DataFormatError(f"{path}: no decodable video frame ({exc})") from exc
            log.warning("%s: decoding stopped after %d frames: %s", path, decoded, exc)
    if not decoded:
        raise DataFormatError(f"{path}: no decodable video frame (0 frames decoded)")


def upright(rgb: np.ndarray, rotation: int) -> np.ndarray:
    """``[H, W, 3]`` turned upright by a display-matrix ``rotation`` (counter-clockwise
    degrees, multiples of 90, as PyAV's ``frame.rotation`` and ffmpeg's autorotate apply it)."""
    k = int(round(rotation / 90.0)) % 4 if rotation else 0  # noqa: RUF046
    return np.ascontiguousarray(np.rot90(rgb, k)) if k else rgb


def video_frame_count(path: Path) -> int:
    """Frames in the first video stream: the container's count, or the packets counted by
    demuxing (no decoding) when it has none."""
    import av

    try:
        with av.open(str(path)) as c:
            if not c.streams.video:
                return 0
            stream = c.streams.video[0]
            if stream.frames:
                return int(stream.frames)
            return sum(1 for packet in c.demux(stream) if packet.size)
    except (av.error.FFmpegError, OSError):
        return 0


class WindowBest:
    """The sharpest candidate of each of ``target`` equal windows of frames ``[0, total)``,
    kept while the video streams past: only the best payload per window is held (at most
    ``target`` frames in memory, not every candidate). Chooses as :func:`select_windows`; frames
    past ``total`` count to the last window."""

    def __init__(self, target: int, total: int):
        self.target, self.total = target, total
        self.best: dict[int, tuple[float, int, object]] = {}

    def offer(self, index: int, score: float, payload: object) -> None:
        w = min(self.target - 1, index * self.target // self.total)
        if w not in self.best or score > self.best[w][0]:
            self.best[w] = (score, index, payload)

    def chosen(self) -> list[tuple[int, object]]:
        """``[(frame index, payload), ...]`` in window order."""
        return [(i, p) for _, (_, i, p) in sorted(self.best.items())]


def _photo_mask(photo: Path, stored: tuple[int, int], orientation: int, size: tuple[int, int]) -> Image.Image | None:
    """The mask of ``photo`` (``<its folder>/masks/<stem>.png|.jpg``) made upright and sized as
    the imported photo (``size``): a mask of the stored size gets the photo's EXIF rotation, one
    of the upright size is taken as it is; box-filtered and thresholded at one half (0/255)."""
    from splatforge.data.images import MASK_SUFFIXES

    path = next((c for c in (photo.parent / "masks" / f"{photo.stem}{s}" for s in MASK_SUFFIXES) if c.is_file()), None)
    if path is None:
        return None
    try:
        with Image.open(path) as im:
            mask = im.convert("L")
    except (OSError, UnidentifiedImageError) as exc:
        raise DataFormatError(f"{path}: not a readable mask image: {exc}") from exc
    if mask.size == stored and stored != stored[::-1] and orientation != 1:
        mask.getexif()[0x0112] = orientation  # the photo's orientation, applied by PIL as to the photo
        mask = ImageOps.exif_transpose(mask)
    upright = mask.size
    if abs(upright[0] / upright[1] - size[0] / size[1]) > 0.02:
        raise DataFormatError(f"{path}: mask is {upright[0]}x{upright[1]}, its photo {size[0]}x{size[1]} upright")
    mask = mask.resize(size, Image.Resampling.BOX) if mask.size != size else mask
    return mask.point(lambda v: 255 if v > 127 else 0)


def import_photos(
    paths: Iterable[Path], out_dir: Path, max_size: int = 1600, masks_dir: Path | None = None
) -> tuple[int, list[str]]:
    """Copy photos into ``out_dir`` upright (EXIF orientation applied) and resized to at most
    ``max_size`` px; unreadable or non-image files are skipped with a warning. With
    ``masks_dir``, each photo's mask (``masks/<stem>.png`` beside the photos, white = keep) is
    written there under the imported photo's stem, rotated and resized with it.

    Returns ``(count written, list of skipped files with the reason)``.

    Raises:
        DataFormatError: a mask that cannot be read or whose shape fits neither orientation.
    """
    written, skipped = 0, []
    for p in sorted(Path(x) for x in paths):
        try:
            with Image.open(p) as im:
                stored, orientation = im.size, int(im.getexif().get(0x0112, 1))
                img = ImageOps.exif_transpose(im).convert("RGB")
        except (OSError, UnidentifiedImageError, SyntaxError) as exc:
            skipped.append(f"{p}: {type(exc).__name__}")
            log.warning("skipping %s: not a readable image (%s)", p, exc)
            continue
        name = p.stem + (".png" if p.suffix.lower() == ".png" else ".jpg")
        out = _resize(img, max_size)
        with atomic_path(out_dir / name) as tmp:
            out.save(tmp, quality=95)
        if masks_dir is not None:
            mask = _photo_mask(p, stored, orientation, out.size)
            if mask is not None:
                Path(masks_dir).mkdir(parents=True, exist_ok=True)
                with atomic_path(Path(masks_dir) / f"{p.stem}.png") as tmp:
                    mask.save(tmp, format="PNG")
        written += 1
    return written, skipped
