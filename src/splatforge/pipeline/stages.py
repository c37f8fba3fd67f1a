"""The stages that several jobs share: ``train`` (resumable from its checkpoints) and ``eval``,
with their digests. ``train``, ``run``, ``splatter`` and ``generate``'s jobs put them in their
stage lists (:mod:`splatforge.pipeline.engine`).
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from splatforge.pipeline.engine import StageContext, digest, file_fingerprint
from splatforge.pipeline.events import TrainStarted, train_progress

if TYPE_CHECKING:
    from splatforge.train import TrainConfig, Trainer

log = logging.getLogger(__name__)

__all__ = [
    "TRAIN_UNHASHED",
    "eval_stage",
    "open_run",
    "resume_checkpoints",
    "scene_inputs",
    "train_digest",
    "train_stage",
]

#: Config fields that do not change what training produces (where it writes, how often it
#: checkpoints, torch's thread count): left out of the train digest, so changing them does not
#: retrain and a run is found again under another ``--output``.
TRAIN_UNHASHED = ("output", "cache_dir", "checkpoint_every", "torch_threads")


def scene_inputs(data: Path) -> list[tuple[str, int, int]]:
    """Fingerprint (names, sizes, mtimes) of the files a scene folder is read from: poses
    (``transforms.json``, ``sparse/0`` or ``sparse``), its image folders and masks."""
    data = Path(data)
    paths = [data / "transforms.json", data / "sparse" / "0", data / "sparse", data / "masks", data / "splits"]
    if data.is_dir():
        paths += sorted(p for p in data.iterdir() if p.is_dir() and p.name.startswith("images"))
    return file_fingerprint(paths)


def train_digest(cfg: TrainConfig, upstream: Iterable[str] = ()) -> str:
    """The train stage's digest: every config field that changes the result (all but
    :data:`TRAIN_UNHASHED`) and either the scene's input files (:func:`scene_inputs`) or, for a
    scene that an earlier stage of the job makes (``run``'s prepare, splatter's frames), that
    stage's digest in ``upstream`` (the scene may not exist yet when the digests are computed)."""
    from splatforge.train.config import resolve_device, to_plain

    options = {k: v for k, v in to_plain(dataclasses.asdict(cfg)).items() if k not in TRAIN_UNHASHED}
    options["device"] = resolve_device(cfg.device)  # "auto" trains on what this machine has
    upstream = list(upstream)
    return digest("train", options, None if upstream else scene_inputs(cfg.data), upstream)


def resume_checkpoints(ctx: StageContext, output: Path, force_resume: bool = False) -> bool:
    """Whether the train stage in ``output`` continues from its checkpoints: when its last attempt
    had the same digest (``ctx.resumable``) or ``force_resume``. Otherwise the checkpoints of an
    earlier run with other options are removed, so that no later resume picks them up."""
    if ctx.resumable or force_resume:
        return True
    ckpts = Path(output) / "checkpoints"
    if ckpts.is_dir() and any(ckpts.iterdir()):
        log.info("%s: checkpoints of an earlier run with other options: starting over", ckpts)
        shutil.rmtree(ckpts)
    return False


def train_stage(
    ctx: StageContext,
    cfg: TrainConfig,
    *,
    force_resume: bool = False,
    plan: bool = True,
    on_step: Callable[[Trainer], None] | None = None,
) -> tuple[list[Path], dict]:
    """Train ``cfg`` into ``cfg.output``. An interrupted attempt with the same digest
    (``ctx.resumable``) or ``force_resume`` continues from the latest checkpoint (bit-identical
    to an uninterrupted run); otherwise checkpoints of an earlier, different run there are
    removed first, so that a later resume cannot pick them up. Emits :class:`TrainStarted`
    (with the timed plan when ``plan``) and a :class:`~splatforge.pipeline.events.TrainStep`
    every 10 steps; ``on_step(trainer)`` is called with them (the live viewer). The trained
    :class:`~splatforge.train.Run` is left in ``ctx.shared["run"]`` for later stages.

    Raises:
        ConfigError, DataFormatError, TrainingError: from the trainer.
    """
    from splatforge.train import Trainer
    from splatforge.train.presets import describe_plan, estimate_seconds

    trainer = Trainer(cfg)
    cfg = trainer.cfg  # resolved
    ckpts = trainer.output / "checkpoints"
    resumed = resume_checkpoints(ctx, trainer.output, force_resume) and trainer.resume()
    if resumed:
        log.info("resuming training from step %d (checkpoint in %s)", trainer.step, ckpts)
    i = trainer.train_ids[0]
    size = (int(trainer.scene.widths[i]), int(trainer.scene.heights[i]))
    text = describe_plan(trainer, estimate_seconds(trainer)) if plan and trainer.step < cfg.steps else ""
    ctx.emit(TrainStarted(ctx.name, cfg.steps, trainer.step, size, text))
    report = train_progress(ctx.emit, ctx.name, cfg.steps)
    if on_step is not None:
        inner = report

        def report(*args) -> None:
            inner(*args)
            on_step(trainer)

    start = trainer.step
    result = trainer.train(report)
    ctx.shared["run"] = trainer.as_run()
    latest = sorted(ckpts.glob("ckpt_*.pt"))[-1:]
    outputs = [result.ply_path, trainer.output / "cameras.json", trainer.output / "cfg.yml", *latest]
    info = {
        "step": result.step,
        "num_gaussians": result.num_gaussians,
        "train_seconds": round(result.train_seconds, 1),
        "train_psnr": result.last_psnr,
        "data_factor": cfg.data_factor,
        "image_size": list(size),
        "resumed_from": start if resumed else None,
    }
    return outputs, info


def open_run(ctx: StageContext, output: Path, device: str | None = None):
    """The run the train stage left in ``ctx.shared``, or the run folder ``output`` opened."""
    run = ctx.shared.get("run")
    if run is None:
        from splatforge.train import Run

        run = ctx.shared["run"] = Run.open(output, device=device)
    return run


def eval_stage(ctx: StageContext, output: Path, splits=("test", "train"), write_images: bool = True):
    """Render ``splits`` of the run in ``output`` and write ``metrics.json``
    (:func:`splatforge.products.evaluate`); the summary holds each split's PSNR, SSIM and LPIPS."""
    from splatforge.products import evaluate

    run = open_run(ctx, output)
    metrics = evaluate(run, splits, write_images=write_images)
    keys = ("psnr", "ssim", "lpips", "lpips_vgg", "lpips_alex", "num_views")
    info = {s: {k: metrics[s].get(k) for k in keys} for s in splits}
    info["lpips_note"] = metrics.get("lpips_note")
    return [Path(output) / "metrics.json"], info
