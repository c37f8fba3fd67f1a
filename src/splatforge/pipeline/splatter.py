"""``splatter``: a drop-in for the Python pipeline (``run.py``) of Auki Labs' splatter-server
compute node (``/splatter/colmap/v1``), in one process, on CPU or GPU.

Input, a job root as the node's Rust host lays it out::

    ROOT/datasets/<dataset>/Frames.mp4                       one or more captures
    ROOT/refined/global/refined_sfm_combined/{cameras,images,points3D}.bin   (+ frames.bin, rigs.bin)

Image names in ``images.bin`` are ``<dataset>_<NNNNNN>.jpg``, ``NNNNNN`` the 0-based index of the
decoded frame in that dataset's ``Frames.mp4`` (every decoded frame counts, in decode order); the
model usually names only a subset.

Steps, each reported as a JSON progress line (see :data:`STAGES`):

1. ``frames``: each video is decoded once; only the frames the model names are written, to
   ``ROOT/Frames/<name>`` (the node's layout; JPEG quality 95), all at once when every one was
   found (no partial set on a bad input). Rotation: the node extracts with OpenCV, which applies
   the video's display-matrix rotation, so frames are written upright when the model's camera has
   the upright size; when the camera has the stored (unrotated) size the frames are kept as
   stored; any other size is an error.
2. ``train``: ``ROOT/refined/splatter/scene`` (``images`` -> ``ROOT/Frames``, ``sparse/0`` -> the
   model, both symlinks) trained into ``ROOT/refined/splatter/run`` with the preset for the device
   (``auto``: ``default`` on a GPU, ``fast`` on a CPU) and the options; every ``test_every``-th
   frame is held out for the metrics (0: train on all). A run folder with a checkpoint resumes.
3. ``export``: ``splat.ply`` (Inria layout, COLMAP world), ``splat_rot.ply`` in the node's frame
   (``--transform splatter``: ``(x, y, z) -> (y, -x, z)``, quaternions and SH rotated too),
   ``splat_rot.splat`` (from ``splat_rot.ply``: byte-identical to what ``ply2splat`` makes of it)
   and ``splat_rot.sog`` (PlayCanvas SOG).
4. ``previews`` (best effort: a failure is a warning): ``preview_top.jpg``, ``preview_angle.jpg``
   and the orbit ``preview.mp4``, of the Gaussians the training views see well
   (:func:`splatforge.products.previews.preview_selection`).
5. ``complete``: ``ROOT/refined/splatter/result.json`` with the artifacts under the node's names
   and data types, the metrics and the timings.

With ``captures`` (videos and/or photos), step 1 is ``prepare`` (frames, SfM) into the scene
folder instead, and the job's own ``datasets/`` and model are not read.

Differences from the node, stated: its ``rotate_ply.py`` (as published in a fork) maps (x, y, z)
to (-z, -x, y) and leaves SH unrotated; ours is the issue's ``(y, -x, z)`` with SH rotated.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal, Optional

from splatforge._fs import atomic_path
from splatforge.train.config import TrainFeatures
from splatforge.errors import ConfigError, DataFormatError, SplatforgeError

log = logging.getLogger(__name__)

__all__ = ["SplatterConfig", "STAGES", "ARTIFACTS", "model_frames", "write_frames", "splatter", "splatter_train_config"]

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


@dataclass
class SplatterConfig(TrainFeatures):
    """Options of ``splatforge splatter``: run.py's own (``job_root_path``, ``domain_id``,
    ``job_id``, ``log_level``) and splatforge's."""

    job_root_path: Path
    """The job root (datasets/, refined/global/refined_sfm_combined/)."""
    domain_id: str = "00000000-0000-0000-0000-000000000000"
    job_id: str = "00000000-0000-0000-0000-000000000000"
    log_level: str = "info"
    """debug, info, warning or error."""
    preset: Literal["auto", "fast", "default", "quality"] = "auto"
    """Training preset (auto: default on a GPU, fast on a CPU); the options below override it."""
    steps: Optional[int] = None
    """Training steps (default: the preset's)."""
    max_gaussians: Optional[int] = None
    """Most Gaussians (default: the preset's)."""
    strategy: Optional[Literal["default", "mcmc"]] = None
    """Densification strategy (default: the preset's, mcmc)."""
    device: str = "auto"
    """torch device: auto (cuda when present, else cpu), cpu, cuda[:i]."""
    backend: Literal["auto", "cpu", "gsplat", "reference"] = "auto"
    data_factor: Optional[int] = None
    """Train on the frames downscaled by this factor (default: the preset's image size decides);
    the frames written and the splat's frame are unchanged."""
    test_every: int = 8
    """Hold out every n-th frame (by name) for the test metrics; 0 trains on every frame."""
    artifact_suffix: str = ""
    """Appended to the artifact names in result.json (the node's ``{suffix}``: the manifest's
    name after ``refined_manifest``); a leading ``_`` is added when missing."""
    preview_size: int = 1024
    """Side of the preview images (the orbit video is at most 512), pixels."""
    checkpoint_every: int = 1000
    """Checkpoint the training every n steps (a restarted job resumes from the latest)."""
    captures: Optional[list[Path]] = None
    """Videos and/or photos to pose with ``prepare`` (SfM) instead of the job's own model and
    videos (what ``splatforge serve`` does with uploaded captures)."""
    seed: int = 0


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
            raise DataFormatError(f"images.bin: image {image.name!r} names dataset {dataset!r}, but there is no "
                                  f"datasets/{dataset}/Frames.mp4 (found: {', '.join(sorted(videos))})")  # fmt: skip
        cam = rec.cameras[image.camera_id]
        wanted.setdefault(dataset, {})[int(m["index"])] = (image.name, int(cam.width), int(cam.height))
    return wanted


def write_frames(video: Path, wanted: dict[int, tuple[str, int, int]], out_dir: Path,
                 progress: Optional[Callable[[int, int], None]] = None) -> dict:  # fmt: skip
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
    summary = {"video": str(video), "decoded": None, "written": 0, "kept": len(wanted) - len(todo), "rotation": 0, "oriented": None}
    if not todo:
        return summary
    total = video_frame_count(video)
    if total and max(todo) >= total:
        raise DataFormatError(f"{video}: the model names frame {max(todo)} ({todo[max(todo)][0]}), but the video has "
                              f"{total} frames (0-{total - 1})")  # fmt: skip
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
                raise DataFormatError(f"{video}: frame {index} is {rgb.shape[1]}x{rgb.shape[0]} "
                                      f"({turned.shape[1]}x{turned.shape[0]} upright), but the model's camera "
                                      f"for {name} is {w}x{h}")  # fmt: skip
            summary["rotation"] = rotation
            Image.fromarray(out).save(staging / name, quality=95)
            summary["written"] += 1
        missing = sorted(set(todo) - {i for i in todo if (staging / todo[i][0]).is_file()})
        if missing:
            raise DataFormatError(f"{video}: the model names frame {missing[-1]} ({todo[missing[-1]][0]}), but only "
                                  f"{decoded} frames decode (0-{decoded - 1}); {len(missing)} named frames are missing")  # fmt: skip
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


def splatter_train_config(cfg: SplatterConfig):
    """The training config: the preset for the device, then the explicit options."""
    from splatforge.pipeline.run import device_and_preset
    from splatforge.train import TrainConfig, apply_preset

    root = Path(cfg.job_root_path)
    device, preset = device_and_preset(cfg)
    train = apply_preset(TrainConfig(data=root / OUT_DIR / "scene", output=root / OUT_DIR / "run", backend=cfg.backend,
                                     device=device, seed=cfg.seed, test_every=cfg.test_every,
                                     checkpoint_every=cfg.checkpoint_every, cache_dir=root / OUT_DIR / "cache"),
                         preset)  # fmt: skip
    overrides = {"steps": cfg.steps, "max_gaussians": cfg.max_gaussians, "strategy": cfg.strategy}
    train = cfg.apply(dataclasses.replace(train, **{k: v for k, v in overrides.items() if v is not None}))
    if cfg.data_factor is not None:
        if cfg.data_factor < 1:
            raise ConfigError(f"--data-factor must be >= 1, got {cfg.data_factor}")
        train = dataclasses.replace(train, data_factor=cfg.data_factor, max_image_size=0)
    return train


def _frames_from_captures(cfg: SplatterConfig, emit: Callable[[dict], None]) -> dict:
    """``prepare`` (frames, SfM) of ``cfg.captures`` into the scene folder, once: a finished
    scene (``prepare.json``) is reused by a resumed job."""
    from splatforge.pipeline.prepare import PrepareConfig, prepare
    from splatforge.pipeline.run import device_and_preset

    scene = Path(cfg.job_root_path) / OUT_DIR / "scene"
    if not (scene / "prepare.json").is_file():
        features = device_and_preset(cfg)[1].max_features
        prepare(PrepareConfig(inputs=[Path(p) for p in cfg.captures], output=scene, max_features=features,
                              test_every=max(cfg.test_every, 0), seed=cfg.seed),
                on_phase=lambda name: emit({"pct": _PCT["frames"][0], "stage": "frames", "status": "running", "phase": name}))  # fmt: skip
    summary = json.loads((scene / "prepare.json").read_text())
    return {"count": int(summary.get("num_registered", 0)), "prepare": {k: summary[k] for k in
            ("num_images", "num_registered", "registered_fraction", "mean_reprojection_error_px") if k in summary}}  # fmt: skip


def artifact_suffix(suffix: str) -> str:
    """The node's ``{suffix}`` of artifact names: ``suffix`` with a leading ``_`` added when
    missing, ``""`` for none."""
    return suffix if not suffix or suffix.startswith("_") else f"_{suffix}"


def splatter(cfg: SplatterConfig, on_progress: Optional[Callable[[dict], None]] = None) -> dict:
    """Run the job in ``cfg.job_root_path`` (module docstring); ``on_progress(line)`` gets each
    progress line (a dict, see :data:`STAGES`). Returns the summary also written to
    ``ROOT/refined/splatter/result.json``.

    Raises:
        DataFormatError: a bad job root (no videos, missing or truncated model files, a model
            image without its dataset or past its video's end, a video with no decodable frame).
        ConfigError: bad options.
    """
    from splatforge.products import evaluate
    from splatforge.products.export import export
    from splatforge.products.previews import write_previews
    from splatforge.train import Trainer

    emit = on_progress or (lambda line: None)
    root = Path(cfg.job_root_path)
    if not root.is_dir():
        raise DataFormatError(f"{root}: no such job root folder")
    out = root / OUT_DIR
    times: dict[str, float] = {}

    # 1. frames ------------------------------------------------------------------------------
    t = time.perf_counter()
    emit({"pct": 0, "stage": "frames", "status": "started"})
    if cfg.captures:
        train_cfg = splatter_train_config(cfg).resolve()
        frames = _frames_from_captures(cfg, emit)
    else:
        videos = datasets(root)
        wanted = model_frames(read_job_model(root), videos)
        train_cfg = splatter_train_config(cfg).resolve()  # bad options fail before the slow phases
        frames = {"count": sum(len(w) for w in wanted.values()), "datasets": []}
        lo, hi = _PCT["frames"]
        for k, (dataset, want) in enumerate(sorted(wanted.items())):
            frames["datasets"].append(write_frames(videos[dataset], want, root / "Frames"))
            emit({"pct": round(lo + (hi - lo) * (k + 1) / len(wanted), 1), "stage": "frames", "status": "running",
                  "dataset": dataset, "frames": len(want)})  # fmt: skip
        scene_folder(root)
    times["frames_s"] = time.perf_counter() - t
    emit({"pct": _PCT["frames"][1], "stage": "frames", "status": "completed", "frames": frames["count"]})

    # 2. training -----------------------------------------------------------------------------
    t = time.perf_counter()
    trainer = Trainer(train_cfg)
    resumed = trainer.resume()
    lo, hi = _PCT["train"]
    emit({"pct": lo, "stage": "train", "status": "started", "steps": train_cfg.steps, "resumed_from": trainer.step if resumed else None,
          "image_size": [int(trainer.scene.widths[trainer.train_ids[0]]), int(trainer.scene.heights[trainer.train_ids[0]])]})  # fmt: skip
    every = max(1, train_cfg.steps // 100)

    def on_step(step: int, loss: float, psnr: float, n: int, its: float) -> None:
        if step % every == 0 or step == train_cfg.steps:
            eta = (train_cfg.steps - step) / its if its > 0 else None
            emit({"pct": round(lo + (hi - lo) * step / train_cfg.steps, 1), "stage": "train", "status": "running",
                  "step": step, "steps": train_cfg.steps, "loss": round(loss, 5), "psnr": round(psnr, 2),
                  "num_gaussians": n, "eta_s": None if eta is None else round(eta)})  # fmt: skip

    result = trainer.train(on_step)
    times["train_s"] = time.perf_counter() - t
    emit({"pct": hi, "stage": "train", "status": "completed", "step": result.step, "num_gaussians": result.num_gaussians})
    t = time.perf_counter()
    run = trainer.as_run()
    metrics = evaluate(run, ("test",) if run.scene.split["test"] else ("train",), write_images=False)
    times["eval_s"] = time.perf_counter() - t

    # 3. export -------------------------------------------------------------------------------
    t = time.perf_counter()
    emit({"pct": _PCT["export"][0], "stage": "export", "status": "started"})
    from splatforge.geometry.transform import named_transform

    exports = {"splat.ply": export(run, out / "splat.ply", "ply"),
               "splat_rot.ply": export(run, out / "splat_rot.ply", "ply", transform=named_transform("splatter"))}  # fmt: skip
    # from the rotated PLY's own float32 values: the bytes ply2splat makes of that file
    exports["splat_rot.splat"] = export(out / "splat_rot.ply", out / "splat_rot.splat", "splat", prune_opacity=0.0)
    warnings = []
    try:  # best effort, as the node's compress_sog.py: the job stands on splat_rot.splat
        exports["splat_rot.sog"] = export(out / "splat_rot.ply", out / "splat_rot.sog", "sog", prune_opacity=0.0)
    except (SplatforgeError, ValueError, OSError, MemoryError, RuntimeError) as exc:
        log.warning("splat_rot.sog not written: %s", exc)
        warnings.append(f"splat_rot.sog: {exc}")
    times["export_s"] = time.perf_counter() - t
    emit({"pct": _PCT["export"][1], "stage": "export", "status": "warning" if warnings else "completed",
          "num_gaussians": exports["splat.ply"]["num_gaussians"], **({"warnings": warnings} if warnings else {})})  # fmt: skip

    # 4. previews (best effort) ---------------------------------------------------------------
    t = time.perf_counter()
    emit({"pct": _PCT["previews"][0], "stage": "previews", "status": "started"})
    scene = run.scene
    ids = scene.split["train"]
    i0 = ids[0]
    previews = write_previews(run.splats, out, camtoworlds=scene.camtoworlds[ids], Ks=scene.Ks[ids],
                              image_size=(int(scene.widths[i0]), int(scene.heights[i0])), size=cfg.preview_size,
                              orbit=True, orbit_name="preview.mp4")  # fmt: skip
    times["previews_s"] = time.perf_counter() - t
    failed = [k for k, v in previews.items() if v is None]
    emit({"pct": _PCT["previews"][1], "stage": "previews", "status": "warning" if failed else "completed",
          **({"failed": failed} if failed else {})})  # fmt: skip
    times["total_s"] = sum(times.values())

    # 5. result.json --------------------------------------------------------------------------
    suffix = artifact_suffix(cfg.artifact_suffix)
    artifacts = [{"name": f"{name}{suffix}", "data_type": dtype, "file": str(OUT_DIR / f), "bytes": (out / f).stat().st_size}
                 for f, name, dtype in ARTIFACTS if (out / f).is_file()]  # fmt: skip
    split = "test" if "test" in metrics else "train"
    summary = {
        "job_id": cfg.job_id, "domain_id": cfg.domain_id, "status": "succeeded", "artifacts": artifacts,
        "outputs": {name: str(OUT_DIR / name) for name in exports},
        "frames": frames,
        "train": {"steps": result.step, "num_gaussians": result.num_gaussians, "strategy": train_cfg.strategy,
                  "data_factor": train_cfg.data_factor, "device": str(train_cfg.device),
                  "image_size": [int(scene.widths[i0]), int(scene.heights[i0])], "train_views": len(ids),
                  "test_views": len(scene.split["test"]), "resumed": bool(resumed)},
        "metrics": {"split": split, **{k: metrics[split][k] for k in ("psnr", "ssim", "lpips_vgg", "lpips_alex", "num_views")},
                    "lpips_note": metrics.get("lpips_note")},
        "exports": {k: {"num_gaussians": v["num_gaussians"], "bytes": v["bytes"]} for k, v in exports.items()},
        "previews": {k: (None if v is None else Path(v).name) for k, v in previews.items()},
        "warnings": warnings + [f"{k}: failed (see the log)" for k, v in previews.items() if v is None],
        "timings": {k: round(v, 2) for k, v in times.items()},
    }  # fmt: skip
    with atomic_path(out / "result.json") as tmp:
        tmp.write_text(json.dumps(summary, indent=2))
    emit({"pct": 100, "progress": 100, "stage": "complete", "status": "succeeded", "artifacts": [a["name"] for a in artifacts]})
    return summary
