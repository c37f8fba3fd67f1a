"""``splatter``: a drop-in for the Python pipeline (``run.py``) of Auki Labs' splatter-server
compute node (``/splatter/colmap/v1``), in one process, on CPU or GPU.

Input, a job root as the node's Rust host lays it out::

    ROOT/datasets/<dataset>/Frames.mp4                       one or more captures
    ROOT/refined/global/refined_sfm_combined/{cameras,images,points3D}.bin   (+ frames.bin, rigs.bin)

Image names in ``images.bin`` are ``<dataset>_<NNNNNN>.jpg``, ``NNNNNN`` the 0-based index of the
decoded frame in that dataset's ``Frames.mp4`` (every decoded frame counts, in decode order); the
model usually names only a subset.

Stages on the stage engine (:mod:`splatforge.pipeline.engine`, recorded in
``ROOT/refined/splatter/manifest.json``: a job killed and started again skips the finished
stages and training continues from its checkpoint), each reported as JSON progress lines (see
:data:`STAGES` and :class:`~splatforge.pipeline.node.NodeProgress`):

1. ``frames``: each video is decoded once; only the frames the model names are written, to
   ``ROOT/Frames/<name>`` (the node's layout; JPEG quality 95), all at once when every one was
   found (no partial set on a bad input). Rotation: the node extracts with OpenCV, which applies
   the video's display-matrix rotation, so frames are written upright when the model's camera has
   the upright size; when the camera has the stored (unrotated) size the frames are kept as
   stored; any other size is an error.
2. ``train``: ``ROOT/refined/splatter/scene`` (``images`` -> ``ROOT/Frames``, ``sparse/0`` -> the
   model, both symlinks) trained into ``ROOT/refined/splatter/run`` with the preset for the device
   (``auto``: ``default`` on a GPU, ``fast`` on a CPU) and the options; every ``test_every``-th
   frame is held out for the metrics (0: train on all); then the metrics (``eval``, no line).
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

import copy
import functools
import json
import logging
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from splatforge._fs import atomic_path
from splatforge.errors import ConfigError, DataFormatError, SplatforgeError
from splatforge.pipeline.engine import Stage, StageContext, StageRunner, digest, file_fingerprint, run_stages
from splatforge.pipeline.events import StageNote
from splatforge.pipeline.node import (
    ARTIFACTS,
    MODEL_DIR,
    OUT_DIR,
    REQUIRED_BINS,
    STAGES,
    NodeProgress,
    artifact_suffix,
    datasets,
    model_dir,
    model_frames,
    read_job_model,
    scene_folder,
    write_frames,
)
from splatforge.pipeline.run import device_and_preset
from splatforge.pipeline.stages import eval_stage, open_run, train_digest, train_stage
from splatforge.train.config import TrainFeatures

log = logging.getLogger(__name__)

__all__ = [  # the node's names are re-exported: callers import them from here
    "ARTIFACTS",
    "MODEL_DIR",
    "OUT_DIR",
    "REQUIRED_BINS",
    "STAGES",
    "NodeProgress",
    "SplatterConfig",
    "model_frames",
    "splatter",
    "splatter_train_config",
    "write_frames",
]


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
    steps: int | None = None
    """Training steps (default: the preset's)."""
    max_gaussians: int | None = None
    """Most Gaussians (default: the preset's)."""
    strategy: Literal["default", "mcmc"] | None = None
    """Densification strategy (default: the preset's, mcmc)."""
    device: str = "auto"
    """torch device: auto (cuda when present, else cpu), cpu, cuda[:i]."""
    backend: Literal["auto", "cpu", "gsplat", "reference"] = "auto"
    data_factor: int | None = None
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
    captures: list[Path] | None = None
    """Videos and/or photos to pose with ``prepare`` (SfM) instead of the job's own model and
    videos (what ``splatforge serve`` does with uploaded captures)."""
    seed: int = 0


def splatter_train_config(cfg: SplatterConfig):
    """The training config: the preset for the device, then the explicit options.

    Raises:
        ConfigError: a data factor under 1, an unknown preset or device.
    """
    from splatforge.train.presets import preset_train_config

    if cfg.data_factor is not None and cfg.data_factor < 1:
        raise ConfigError(f"--data-factor must be >= 1, got {cfg.data_factor}")
    root = Path(cfg.job_root_path)
    device, _ = device_and_preset(cfg)
    return preset_train_config(
        cfg.preset,
        data=root / OUT_DIR / "scene",
        output=root / OUT_DIR / "run",
        backend=cfg.backend,
        device=device,
        seed=cfg.seed,
        test_every=cfg.test_every,
        checkpoint_every=cfg.checkpoint_every,
        cache_dir=root / OUT_DIR / "cache",
        steps=cfg.steps,
        max_gaussians=cfg.max_gaussians,
        strategy=cfg.strategy,
        data_factor=cfg.data_factor,
        max_image_size=0 if cfg.data_factor is not None else None,  # the factor given decides the size
        **cfg.train_fields(),
    )


def _prepare_captures(ctx: StageContext, cfg: SplatterConfig) -> tuple[list[Path], dict]:
    """``prepare`` (frames, SfM) of ``cfg.captures`` into the scene folder."""
    from splatforge.pipeline.prepare import PrepareConfig, prepare

    scene = Path(cfg.job_root_path) / OUT_DIR / "scene"
    if scene.exists():  # this job's own scene, unfinished or of other captures
        shutil.rmtree(scene)
    features = device_and_preset(cfg)[1].max_features
    options = PrepareConfig(
        inputs=[Path(p) for p in cfg.captures],
        output=scene,
        max_features=features,
        test_every=max(cfg.test_every, 0),
        seed=cfg.seed,
    )
    summary = prepare(options, on_phase=lambda name: ctx.emit(StageNote(ctx.name, name, data={"phase": name})))
    keys = ("num_images", "num_registered", "registered_fraction", "mean_reprojection_error_px")
    info = {"count": int(summary.get("num_registered", 0)), "prepare": {k: summary[k] for k in keys if k in summary}}
    return [scene / "prepare.json", *sorted((scene / "sparse" / "0").glob("*.bin"))], info


def _frames(ctx: StageContext, root: Path, wanted: dict, videos: dict) -> tuple[list[Path], dict]:
    """The frames the model names, from each dataset's video, into ``ROOT/Frames``; the scene
    folder's links."""
    frames: dict = {"count": sum(len(w) for w in wanted.values()), "datasets": []}
    for k, (dataset, want) in enumerate(sorted(wanted.items())):
        frames["datasets"].append(write_frames(videos[dataset], want, root / "Frames"))
        ctx.emit(
            StageNote(
                ctx.name,
                f"{dataset}: {len(want)} frames",
                fraction=(k + 1) / len(wanted),
                data={"dataset": dataset, "frames": len(want)},
            )
        )
    scene_folder(root)
    outputs = [root / "Frames" / name for want in wanted.values() for name, _, _ in want.values()]
    return outputs, frames


def _export(ctx: StageContext, out: Path) -> tuple[list[Path], dict]:
    from splatforge.geometry.transform import named_transform
    from splatforge.products.export import export

    run = open_run(ctx, out / "run")
    exports = {
        "splat.ply": export(run, out / "splat.ply", "ply"),
        "splat_rot.ply": export(run, out / "splat_rot.ply", "ply", transform=named_transform("splatter")),
    }
    # from the rotated PLY's own float32 values: the bytes ply2splat makes of that file
    exports["splat_rot.splat"] = export(out / "splat_rot.ply", out / "splat_rot.splat", "splat", prune_opacity=0.0)
    warnings = []
    try:  # best effort, as the node's compress_sog.py: the job stands on splat_rot.splat
        exports["splat_rot.sog"] = export(out / "splat_rot.ply", out / "splat_rot.sog", "sog", prune_opacity=0.0)
    except (SplatforgeError, ValueError, OSError, MemoryError, RuntimeError) as exc:
        log.warning("splat_rot.sog not written: %s", exc)
        warnings.append(f"splat_rot.sog: {exc}")
    info = {
        "exports": {k: {"num_gaussians": v["num_gaussians"], "bytes": v["bytes"]} for k, v in exports.items()},
        "num_gaussians": exports["splat.ply"]["num_gaussians"],
        "warnings": warnings,
    }
    return [out / name for name in exports], info


def _previews(ctx: StageContext, out: Path, size: int) -> tuple[list[Path], dict]:
    from splatforge.products.previews import write_previews

    run = open_run(ctx, out / "run")
    scene = run.scene
    ids = scene.split["train"]
    i0 = ids[0]
    previews = write_previews(
        run.splats,
        out,
        camtoworlds=scene.camtoworlds[ids],
        Ks=scene.Ks[ids],
        image_size=(int(scene.widths[i0]), int(scene.heights[i0])),
        size=size,
        orbit=True,
        orbit_name="preview.mp4",
    )
    failed = [k for k, v in previews.items() if v is None]
    info = {
        "previews": {k: (None if v is None else Path(v).name) for k, v in previews.items()},
        "failed": failed,
        "warnings": [f"{k}: failed (see the log)" for k in failed],
    }
    return [Path(v) for v in previews.values() if v is not None], info


def _complete(ctx: StageContext, cfg: SplatterConfig, runner: StageRunner) -> tuple[list[Path], dict]:
    """``result.json``, from the records of the stages before it."""
    from splatforge.train.run import read_run_config

    root = Path(cfg.job_root_path)
    out = root / OUT_DIR
    info = {name: runner.info(name) for name in ("frames", "train", "eval", "export", "previews")}
    train, metrics = info["train"], info["eval"]
    suffix = artifact_suffix(cfg.artifact_suffix)
    artifacts = [
        {"name": f"{name}{suffix}", "data_type": dtype, "file": str(OUT_DIR / f), "bytes": (out / f).stat().st_size}
        for f, name, dtype in ARTIFACTS
        if (out / f).is_file()
    ]
    split = "test" if "test" in metrics else "train"
    train_cfg = read_run_config(out / "run")
    seconds = {name: float(runner.manifest.stage(name).get("seconds", 0.0)) for name in info}
    times = {
        "frames_s": seconds["frames"],
        "train_s": seconds["train"],
        "eval_s": seconds["eval"],
        "export_s": seconds["export"],
        "previews_s": seconds["previews"],
    }
    times["total_s"] = sum(times.values())
    summary = {
        "job_id": cfg.job_id,
        "domain_id": cfg.domain_id,
        "status": "succeeded",
        "artifacts": artifacts,
        "outputs": {name: str(OUT_DIR / name) for name in info["export"].get("exports", {})},
        "frames": info["frames"],
        "train": {
            "steps": train["step"],
            "num_gaussians": train["num_gaussians"],
            "strategy": train_cfg.strategy,
            "data_factor": train["data_factor"],
            "device": str(train_cfg.device),
            "image_size": train["image_size"],
            "train_views": train.get("train_views"),
            "test_views": train.get("test_views"),
            "resumed": train.get("resumed_from") is not None,
        },
        "metrics": {
            "split": split,
            **{k: metrics[split][k] for k in ("psnr", "ssim", "lpips_vgg", "lpips_alex", "num_views")},
            "lpips_note": metrics.get("lpips_note"),
        },
        "exports": info["export"].get("exports", {}),
        "previews": info["previews"].get("previews", {}),
        "warnings": info["export"].get("warnings", []) + info["previews"].get("warnings", []),
        "timings": {k: round(v, 2) for k, v in times.items()},
    }
    with atomic_path(out / "result.json") as tmp:
        tmp.write_text(json.dumps(summary, indent=2))
    return [out / "result.json"], {"artifacts": [a["name"] for a in artifacts], "summary": summary}


def _eval(ctx: StageContext, out: Path) -> tuple[list[Path], dict]:
    """Metrics of the test views (of the training views when none is held out), no images."""
    splits = ("test",) if open_run(ctx, out / "run").scene.split["test"] else ("train",)
    return eval_stage(ctx, out / "run", splits, write_images=False)


def _train_with_split(ctx: StageContext, cfg) -> tuple[list[Path], dict]:
    outputs, info = train_stage(ctx, cfg)
    scene = ctx.shared["run"].scene
    info.update(train_views=len(scene.split["train"]), test_views=len(scene.split["test"]))
    return outputs, info


def splatter(cfg: SplatterConfig, on_progress: Callable[[dict], None] | None = None) -> dict:
    """Run the job in ``cfg.job_root_path`` (module docstring) on the stage engine
    (``ROOT/refined/splatter/manifest.json``: killed and started again, it skips the finished
    stages and training continues from its checkpoint); ``on_progress(line)`` gets each progress
    line (a dict, see :data:`STAGES`). Returns the summary also written to
    ``ROOT/refined/splatter/result.json``.

    Raises:
        DataFormatError: a bad job root (no videos, missing or truncated model files, a model
            image without its dataset or past its video's end, a video with no decodable frame).
        ConfigError: bad options.
    """
    root = Path(cfg.job_root_path)
    if not root.is_dir():
        raise DataFormatError(f"{root}: no such job root folder")
    out = root / OUT_DIR
    if cfg.captures:
        train_cfg = splatter_train_config(cfg)
        copy.deepcopy(train_cfg).resolve()  # bad options fail before the slow stages
        inputs = file_fingerprint(Path(p) for p in cfg.captures)
        d_frames = digest(
            "frames",
            {
                "captures": True,
                "test_every": cfg.test_every,
                "seed": cfg.seed,
                "features": device_and_preset(cfg)[1].max_features,
            },
            inputs,
        )
        frames_stage = Stage("frames", functools.partial(_prepare_captures, cfg=cfg), d_frames)
    else:
        videos = datasets(root)
        wanted = model_frames(read_job_model(root), videos)
        train_cfg = splatter_train_config(cfg)
        copy.deepcopy(train_cfg).resolve()  # bad options fail before the slow stages
        d_frames = digest("frames", {}, file_fingerprint([model_dir(root), *videos.values()]))
        frames_stage = Stage("frames", functools.partial(_frames, root=root, wanted=wanted, videos=videos), d_frames)
    d_train = train_digest(train_cfg, [d_frames])
    runner = StageRunner(out, NodeProgress(on_progress or (lambda line: None)))
    stages = [
        frames_stage,
        Stage("train", functools.partial(_train_with_split, cfg=train_cfg), d_train),
        Stage("eval", functools.partial(_eval, out=out), digest("eval", {}, None, [d_train])),
        Stage("export", functools.partial(_export, out=out), digest("export", {}, None, [d_train])),
        Stage(
            "previews",
            functools.partial(_previews, out=out, size=cfg.preview_size),
            digest("previews", {"size": cfg.preview_size}, None, [d_train]),
        ),
    ]
    done = run_stages(runner, stages)
    d_complete = digest(
        "complete",
        {"job_id": cfg.job_id, "domain_id": cfg.domain_id, "suffix": cfg.artifact_suffix},
        None,
        [runner.manifest.stage(s.name).get("hash", "") for s in stages],
    )
    done["complete"] = runner.run(Stage("complete", functools.partial(_complete, cfg=cfg, runner=runner), d_complete))
    return done["complete"].info["summary"]
