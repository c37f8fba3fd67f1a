"""The splatter-server compute node's job root and vocabulary: where its inputs and outputs lie
(:data:`MODEL_DIR`, :data:`OUT_DIR`), the model's frames read from its videos
(:func:`model_frames`, :func:`write_frames`), the artifacts it uploads (:data:`ARTIFACTS`) and
its JSON progress lines (:class:`NodeProgress`, a renderer of the pipeline's events). The job
itself is :func:`splatforge.pipeline.splatter.splatter`."""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from splatforge.errors import DataFormatError
from splatforge.pipeline.events import Event, StageDone, StageNote, StageStarted, TrainStarted, TrainStep

log = logging.getLogger(__name__)

__all__ = [
    "ARTIFACTS",
    "MODEL_DIR",
    "OUT_DIR",
    "REQUIRED_BINS",
    "STAGES",
    "NodeProgress",
    "artifact_suffix",
    "datasets",
    "model_dir",
    "model_frames",
    "read_job_model",
    "scene_folder",
    "write_frames",
]

MODEL_DIR = Path("refined") / "global" / "refined_sfm_combined"
OUT_DIR = Path("refined") / "splatter"
REQUIRED_BINS = ("cameras.bin", "images.bin", "points3D.bin")
NAME = re.compile(r"^(?P<dataset>.+)_(?P<index>\d{6,})\.jpg$")

STAGES = ("frames", "train", "export", "previews", "complete")
"""Progress stages, in order. Every line is ``{"pct", "stage", "status", ...}``; ``status`` is
``started``, ``running`` (training: with ``step``, ``steps``, ``loss``, ``psnr``,
``num_gaussians``), ``completed``, ``warning`` (a best-effort step failed) or ``failed``; the last
line of a successful job is ``{"pct": 100, "progress": 100, "stage": "complete", "status":
"succeeded"}`` (the host's own final line uses the key ``progress``)."""

_PCT = {"frames": (0, 10), "train": (10, 85), "eval": (85, 88), "export": (88, 92), "previews": (92, 99)}

ARTIFACTS = (  # (file in OUT_DIR, artifact name before the suffix, data type): the node's upload table
    ("splat_rot.splat", "refined_splat", "splat_data"),
    ("splat_rot.sog", "refined_splat_sog", "splat_data_sog"),
    ("preview_top.jpg", "refined_splat_preview_top", "splat_preview_top"),
    ("preview_angle.jpg", "refined_splat_preview_angle", "splat_preview_angle"),
    ("preview.mp4", "refined_splat_preview_video", "splat_preview_video"),
)


def model_dir(root: Path) -> Path:
    """``ROOT/refined/global/refined_sfm_combined``: where the node puts the job's COLMAP model."""
    return Path(root) / MODEL_DIR


def read_job_model(root: Path):
    """The job's COLMAP model (pycolmap ``Reconstruction``), checked.

    Raises:
        DataFormatError: a missing, truncated or corrupt ``.bin`` file (named).
    """
    from splatforge.data.colmap import load_reconstruction, validate_reconstruction

    folder = model_dir(root)
    for name in REQUIRED_BINS:
        path = folder / name
        if not path.is_file():
            raise DataFormatError(f"{path}: missing (the job's COLMAP model needs {', '.join(REQUIRED_BINS)})")
        if path.stat().st_size < 8:
            raise DataFormatError(f"{path}: truncated ({path.stat().st_size} bytes)")
    rec = load_reconstruction(folder)
    validate_reconstruction(rec, folder)
    if not rec.images:
        raise DataFormatError(f"{folder / 'images.bin'}: no image in the model")
    return rec


def datasets(root: Path) -> dict[str, Path]:
    """``{dataset: ROOT/datasets/<dataset>/Frames.mp4}``.

    Raises:
        DataFormatError: no ``datasets/*/Frames.mp4``.
    """
    found = {p.parent.name: p for p in sorted((Path(root) / "datasets").glob("*/Frames.mp4")) if p.is_file()}
    if not found:
        raise DataFormatError(f"{Path(root) / 'datasets'}: no <dataset>/Frames.mp4 (is {root} a splatter job root?)")
    return found


def model_frames(rec, videos: dict[str, Path]) -> dict[str, dict[int, tuple[str, int, int]]]:
    """``{dataset: {frame index: (image name, camera width, camera height)}}`` of the images in
    the model ``rec``.

    Raises:
        DataFormatError: a name that is not ``<dataset>_<NNNNNN>.jpg``, or a dataset with no
            ``datasets/<dataset>/Frames.mp4`` (both named).
    """
    wanted: dict[str, dict[int, tuple[str, int, int]]] = {}
    for image in rec.images.values():
        m = NAME.match(image.name)
        if m is None:
            raise DataFormatError(f"images.bin: image {image.name!r} is not named <dataset>_<NNNNNN>.jpg")
        dataset = m["dataset"]
        if dataset not in videos:
            raise DataFormatError(
                f"images.bin: image {image.name!r} names dataset {dataset!r}, but there is no "
                f"datasets/{dataset}/Frames.mp4 (found: {', '.join(sorted(videos))})"
            )
        cam = rec.cameras[image.camera_id]
        wanted.setdefault(dataset, {})[int(m["index"])] = (image.name, int(cam.width), int(cam.height))
    return wanted


def write_frames(
    video: Path,
    wanted: dict[int, tuple[str, int, int]],
    out_dir: Path,
    progress: Callable[[int, int], None] | None = None,
) -> dict:
    """Decode ``video`` once and write the frames ``wanted`` names (``{index: (name, w, h)}``)
    into ``out_dir`` as JPEG (see the module docstring for rotation). Frames already in
    ``out_dir`` (a resumed job) are kept. Returns ``{"video", "decoded", "written", "kept",
    "rotation", "oriented"}``.

    Raises:
        DataFormatError: unreadable video, no decodable frame, an index past the last decoded
            frame (the frame count is given), or a camera size that matches neither orientation.
    """
    from PIL import Image

    from splatforge.data.frames import decode_video, upright, video_frame_count

    todo = {i: v for i, v in wanted.items() if not (out_dir / v[0]).is_file()}
    summary = {
        "video": str(video),
        "decoded": None,
        "written": 0,
        "kept": len(wanted) - len(todo),
        "rotation": 0,
        "oriented": None,
    }
    if not todo:
        return summary
    total = video_frame_count(video)
    if total and max(todo) >= total:
        raise DataFormatError(
            f"{video}: the model names frame {max(todo)} ({todo[max(todo)][0]}), but the video has "
            f"{total} frames (0-{total - 1})"
        )
    staging = Path(tempfile.mkdtemp(prefix=".frames.", dir=out_dir.parent))
    decoded = 0
    try:
        for index, frame in decode_video(video):
            decoded = index + 1
            if progress is not None:
                progress(decoded, total)
            if index not in todo:
                continue
            name, w, h = todo[index]
            rgb = frame.to_ndarray(format="rgb24")
            rotation = int(getattr(frame, "rotation", 0) or 0)
            turned = upright(rgb, rotation)
            if turned.shape[:2] == (h, w):
                out, summary["oriented"] = turned, "display matrix applied" if rotation % 360 else "as stored"
            elif rgb.shape[:2] == (h, w):
                out, summary["oriented"] = rgb, "as stored (the model's camera has the stored size)"
            else:
                raise DataFormatError(
                    f"{video}: frame {index} is {rgb.shape[1]}x{rgb.shape[0]} "
                    f"({turned.shape[1]}x{turned.shape[0]} upright), but the model's camera "
                    f"for {name} is {w}x{h}"
                )
            summary["rotation"] = rotation
            Image.fromarray(out).save(staging / name, quality=95)
            summary["written"] += 1
        missing = sorted(set(todo) - {i for i in todo if (staging / todo[i][0]).is_file()})
        if missing:
            raise DataFormatError(
                f"{video}: the model names frame {missing[-1]} ({todo[missing[-1]][0]}), but only "
                f"{decoded} frames decode (0-{decoded - 1}); {len(missing)} named frames are missing"
            )
        out_dir.mkdir(parents=True, exist_ok=True)
        for i in todo:
            os.replace(staging / todo[i][0], out_dir / todo[i][0])
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    summary["decoded"] = decoded
    return summary


def _link(target: Path, link: Path) -> None:
    """A relative symlink ``link -> target`` (replaced when it points elsewhere)."""
    rel = os.path.relpath(target, link.parent)
    if link.is_symlink() and os.readlink(link) == rel:
        return
    if link.is_symlink() or link.exists():
        link.unlink()
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(rel)


def scene_folder(root: Path) -> Path:
    """``ROOT/refined/splatter/scene``: ``images`` -> ``ROOT/Frames``, ``sparse/0/*.bin`` -> the
    model's files (symlinks: the job's inputs are read in place, never copied or changed)."""
    root = Path(root)
    scene = root / OUT_DIR / "scene"
    _link(root / "Frames", scene / "images")
    for f in sorted(model_dir(root).glob("*.bin")):
        _link(f, scene / "sparse" / "0" / f.name)
    return scene


def artifact_suffix(suffix: str) -> str:
    """The node's ``{suffix}`` of artifact names: ``suffix`` with a leading ``_`` added when
    missing, ``""`` for none."""
    return suffix if not suffix or suffix.startswith("_") else f"_{suffix}"


class NodeProgress:
    """Renders pipeline events as the node's JSON progress lines (see :data:`STAGES`) into
    ``write(line)``: the keys and percentages the node's host reads, unchanged. A stage skipped
    on a resumed job is reported as started and completed (``"skipped": true``)."""

    def __init__(self, write: Callable[[dict], None]):
        self.write = write
        self.stage = "frames"
        self._every = 1
        self._info: dict = {}

    def _pct(self, stage: str, fraction: float) -> float:
        lo, hi = _PCT[stage]
        return round(lo + (hi - lo) * fraction, 1)

    def __call__(self, event: Event) -> None:
        stage = event.stage
        if stage == "eval":
            return  # between train (85 %) and export (88 %): no line of its own
        self.stage = stage
        if isinstance(event, StageStarted) and stage in ("frames", "export", "previews"):
            self.write({"pct": _PCT[stage][0], "stage": stage, "status": "started"})
        elif isinstance(event, StageNote) and stage == "frames":
            line = {"pct": self._pct("frames", event.fraction) if event.fraction is not None else 0, "stage": stage}
            self.write({**line, "status": "running", **event.data})
        elif isinstance(event, TrainStarted):
            self._every = max(1, event.steps // 100)
            resumed = event.start_step or None
            self.write(
                {
                    "pct": _PCT["train"][0],
                    "stage": "train",
                    "status": "started",
                    "steps": event.steps,
                    "resumed_from": resumed,
                    "image_size": list(event.image_size),
                }
            )
        elif isinstance(event, TrainStep):
            if event.step % self._every == 0 or event.step == event.steps:
                eta = event.eta_s
                self.write(
                    {
                        "pct": self._pct("train", event.step / event.steps),
                        "stage": "train",
                        "status": "running",
                        **event.line(),
                        "eta_s": None if eta is None else round(eta),
                    }
                )
        elif isinstance(event, StageDone):
            self._done(event)

    def _done(self, event: StageDone) -> None:
        stage, info = event.stage, event.info
        skipped = {"skipped": True} if event.skipped else {}
        if event.skipped and stage in ("frames", "export", "previews"):
            self.write({"pct": _PCT[stage][0], "stage": stage, "status": "started"})
        status = "warning" if event.warnings else "completed"
        if stage == "frames":
            self.write(
                {
                    "pct": _PCT["frames"][1],
                    "stage": "frames",
                    "status": "completed",
                    "frames": info.get("count"),
                    **skipped,
                }
            )
        elif stage == "train":
            self.write(
                {
                    "pct": _PCT["train"][1],
                    "stage": "train",
                    "status": "completed",
                    "step": info.get("step"),
                    "num_gaussians": info.get("num_gaussians"),
                    **skipped,
                }
            )
        elif stage == "export":
            extra = {"warnings": list(event.warnings)} if event.warnings else {}
            self.write(
                {
                    "pct": _PCT["export"][1],
                    "stage": "export",
                    "status": status,
                    "num_gaussians": info.get("num_gaussians"),
                    **extra,
                    **skipped,
                }
            )
        elif stage == "previews":
            extra = {"failed": info["failed"]} if info.get("failed") else {}
            self.write({"pct": _PCT["previews"][1], "stage": "previews", "status": status, **extra, **skipped})
        elif stage == "complete":
            self.write(
                {
                    "pct": 100,
                    "progress": 100,
                    "stage": "complete",
                    "status": "succeeded",
                    "artifacts": info.get("artifacts", []),
                }
            )
