"""``run``: captures to a trained, evaluated and exported splat in one call, resumable.

Stages (:mod:`splatforge.pipeline.engine`, recorded in ``OUT/manifest.json``): ``prepare``
(``OUT/scene``), ``train`` (``OUT/run``, the preset for the device), ``eval``
(``OUT/run/metrics.json``), ``export`` (``OUT/export/scene.{ply,splat,spz}``), ``previews``
(``OUT/export/preview_{top,angle}.jpg``, best effort: a failure is a warning) and, with ``mesh``,
``mesh`` (``OUT/export/mesh.ply``); then ``OUT/run.json`` with every stage's summary and wall
time. Killed at any point and started again with the same command, it skips the finished stages
(their files untouched) and training continues from its last checkpoint; a changed option
reruns the stages it affects and those after them.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from splatforge._fs import atomic_path
from splatforge.pipeline.engine import Stage, StageContext, StageRunner, digest, file_fingerprint, run_stages
from splatforge.pipeline.events import EventSink, StageNote
from splatforge.pipeline.prepare import PrepareConfig, prepare
from splatforge.pipeline.stages import eval_stage, open_run, train_digest, train_stage
from splatforge.train.config import TrainFeatures

log = logging.getLogger(__name__)

__all__ = ["RunConfig", "device_and_preset", "run_pipeline", "run_train_config"]


@dataclass
class RunConfig(TrainFeatures):
    """Options of ``splatforge run``: the capture, the preset and what overrides it."""

    inputs: list[Path]
    """Videos, image files or folders of photos."""
    output: Path
    """Output folder (scene/, run/, export/, run.json)."""
    preset: Literal["auto", "fast", "default", "quality"] = "auto"
    """Training preset: steps, training resolution and cap for the device (auto: default on a
    GPU, fast on a CPU); the options below override it."""
    steps: int | None = None
    """Training steps (default: the preset's)."""
    max_image_size: int | None = None
    """Longer side of the training images in pixels, 0 for the frames' full size (default: the
    preset's)."""
    cap_max: int | None = None
    """Most Gaussians (default: the preset's)."""
    target_frames: int = 150
    """Frames kept from the videos."""
    max_size: int = 1600
    """Longer image side of the frames after import (what SfM and the exports see), pixels."""
    matcher: Literal["auto", "sequential", "exhaustive"] = "auto"
    camera_model: str = "SIMPLE_RADIAL"
    max_features: int | None = None
    """SIFT features per image for SfM (default: the preset's, 2,048 for ``fast``, else 4,096)."""
    backend: Literal["auto", "cpu", "gsplat", "reference"] = "auto"
    device: str = "auto"
    """torch device: auto (cuda when present, else cpu), cpu, cuda[:i]."""
    seed: int = 0
    """Random seed (SfM and training)."""
    preview_size: int = 1024
    checkpoint_every: int = 1000
    """Checkpoint the training every n steps (a restarted job resumes from the latest)."""
    mesh: bool = False
    """Also fuse a TSDF mesh of the training views into OUT/export/mesh.ply (splatforge mesh's defaults)."""


def device_and_preset(cfg):
    """``(device, Preset)``: the device ``cfg.device`` resolves to and the preset ``cfg.preset``
    names for it (``cfg``: any options with those two fields, e.g. :class:`RunConfig` or
    :class:`~splatforge.pipeline.splatter.SplatterConfig`).

    Raises:
        ConfigError: an unknown preset or device.
    """
    from splatforge.train import resolve_preset
    from splatforge.train.config import resolve_device

    device = resolve_device(cfg.device)
    return device, resolve_preset(cfg.preset, device)


def prepare_config(cfg: RunConfig) -> PrepareConfig:
    """The ``prepare`` phase's options (scene in ``OUT/scene``), SfM's features from the preset
    for the device unless given."""
    features = cfg.max_features if cfg.max_features is not None else device_and_preset(cfg)[1].max_features
    return PrepareConfig(
        inputs=list(cfg.inputs),
        output=Path(cfg.output) / "scene",
        target_frames=cfg.target_frames,
        max_size=cfg.max_size,
        matcher=cfg.matcher,
        camera_model=cfg.camera_model,
        max_features=features,
        seed=cfg.seed,
    )


def run_train_config(cfg: RunConfig):
    """The training config: the preset for the device, then the explicit options."""
    from splatforge.train.presets import preset_train_config

    device, _ = device_and_preset(cfg)
    return preset_train_config(
        cfg.preset,
        data=Path(cfg.output) / "scene",
        output=Path(cfg.output) / "run",
        backend=cfg.backend,
        device=device,
        seed=cfg.seed,
        steps=cfg.steps,
        max_image_size=cfg.max_image_size,
        max_gaussians=cfg.cap_max,
        checkpoint_every=cfg.checkpoint_every,
        **cfg.train_fields(),
    )


def _prepare_stage(ctx: StageContext, cfg: PrepareConfig) -> tuple[list[Path], dict]:
    scene = Path(cfg.output)
    if scene.exists():  # this job's own scene, of other inputs or options (or unfinished)
        log.info("%s: made with other inputs or options: preparing it again", scene)
        shutil.rmtree(scene)
    prep = prepare(cfg, on_phase=lambda name: ctx.emit(StageNote(ctx.name, name)))
    keys = ("num_images", "num_registered", "registered_fraction", "mean_reprojection_error_px")
    outputs = [scene / "prepare.json", *sorted((scene / "sparse" / "0").glob("*.bin"))]
    return outputs, {k: prep[k] for k in keys if k in prep}


def _export_stage(ctx: StageContext, run_dir: Path, out: Path) -> tuple[list[Path], dict]:
    from splatforge.products.export import export

    run = open_run(ctx, run_dir)
    paths = {fmt: Path(export(run, out / f"scene.{fmt}", fmt)["output"]) for fmt in ("ply", "splat", "spz")}
    return list(paths.values()), {"exports": {k: str(v) for k, v in paths.items()}}


def _previews_stage(ctx: StageContext, run_dir: Path, out: Path, size: int) -> tuple[list[Path], dict]:
    from splatforge.io.cameras import read_cameras_json
    from splatforge.products.previews import write_previews

    c2w, Ks, _, sizes = read_cameras_json(run_dir / "cameras.json")
    image_size = (int(sizes[0, 0]), int(sizes[0, 1]))
    previews = write_previews(
        open_run(ctx, run_dir).splats, out, camtoworlds=c2w, Ks=Ks, image_size=image_size, size=size
    )
    failed = [k for k, v in previews.items() if v is None]
    info = {"previews": previews, **({"warnings": [f"{k}: failed (see the log)" for k in failed]} if failed else {})}
    return [Path(v) for v in previews.values() if v is not None], info


def _mesh_stage(ctx: StageContext, run_dir: Path, out: Path) -> tuple[list[Path], dict]:
    from splatforge.products.mesh import mesh_run

    mesh = out / "mesh.ply"
    mesh_run(open_run(ctx, run_dir), mesh, pictures=False)
    return [mesh, mesh.with_suffix(".json")], {"mesh": str(mesh)}


def run_stages_of(cfg: RunConfig) -> list[Stage]:
    """The job's stages with their digests (module docstring).

    Raises:
        ConfigError: a bad option (checked here, before any slow stage).
    """
    output = Path(cfg.output)
    train_cfg = run_train_config(cfg)
    copy.deepcopy(train_cfg).resolve()  # bad options fail before the slow stages
    prep = prepare_config(cfg)
    prep_options = {k: v for k, v in dataclasses.asdict(prep).items() if k not in ("inputs", "output")}
    d_prep = digest("prepare", prep_options, file_fingerprint(prep.inputs))
    d_train = train_digest(train_cfg, [d_prep])
    run_dir, export_dir = output / "run", output / "export"
    stages = [
        Stage("prepare", functools.partial(_prepare_stage, cfg=prep), d_prep),
        Stage("train", functools.partial(train_stage, cfg=train_cfg), d_train),
        Stage("eval", functools.partial(eval_stage, output=run_dir), digest("eval", {}, None, [d_train])),
        Stage(
            "export",
            functools.partial(_export_stage, run_dir=run_dir, out=export_dir),
            digest("export", {}, None, [d_train]),
        ),
        Stage(
            "previews",
            functools.partial(_previews_stage, run_dir=run_dir, out=export_dir, size=cfg.preview_size),
            digest("previews", {"size": cfg.preview_size}, None, [d_train]),
            best_effort=True,
        ),
    ]
    if cfg.mesh:
        stages.append(
            Stage(
                "mesh",
                functools.partial(_mesh_stage, run_dir=run_dir, out=export_dir),
                digest("mesh", {}, None, [d_train]),
            )
        )
    return stages


def run_pipeline(cfg: RunConfig, *, emit: EventSink | None = None) -> dict:
    """Run the job's stages into ``cfg.output`` (module docstring), reporting to ``emit``
    (:mod:`splatforge.pipeline.events`; training announces its plan, with about how long it
    takes, before it starts).

    Returns the summary also written to ``OUT/run.json``.

    Raises:
        DataFormatError / ConfigError: from prepare or training (bad inputs, failed SfM, options).
    """
    output = Path(cfg.output)
    stages = run_stages_of(cfg)
    outcomes = run_stages(StageRunner(output, emit), stages)
    info = {name: o.info for name, o in outcomes.items()}
    times = {f"{name}_s": o.seconds for name, o in outcomes.items()}
    times["total_s"] = sum(times.values())
    train = info["train"]
    exports = dict(info["export"]["exports"])
    if cfg.mesh:
        exports["mesh"] = info["mesh"]["mesh"]
    summary = {
        "prepare": info["prepare"],
        "train": {"steps": train["step"], **{k: train[k] for k in ("num_gaussians", "data_factor", "image_size")}}
        | {"resumed_from": train.get("resumed_from")},
        "test": info["eval"].get("test", {}),
        "exports": exports,
        "previews": info["previews"].get("previews", {}),
        "timings": times,
        "stages": {name: o.status for name, o in outcomes.items()},
    }
    with atomic_path(output / "run.json") as tmp:
        tmp.write_text(json.dumps(summary, indent=2))
    return summary
