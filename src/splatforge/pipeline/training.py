"""``train``'s job: the stages ``train`` and ``eval`` over one run folder (resumable).

Started again with the same options after a kill, it continues training from the last
checkpoint; a finished run is not redone (its files are left as they are), and ``eval`` reruns
only when training did. The default run folder (``runs/<scene folder>``) is found again by the
same command: it is the first of ``runs/<name>``, ``runs/<name>-2``, ... that holds no run or a
run of the same options.
"""

from __future__ import annotations

import copy
import functools
import logging
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from splatforge.pipeline.engine import Stage, StageRunner, digest, run_stages
from splatforge.pipeline.events import EventSink
from splatforge.pipeline.manifest import Manifest
from splatforge.pipeline.stages import eval_stage, train_digest, train_stage

if TYPE_CHECKING:
    from splatforge.train import TrainConfig, Trainer

log = logging.getLogger(__name__)

__all__ = ["run_folder", "train_job"]


def run_folder(cfg: TrainConfig, root: Path = Path("runs"), reuse: bool = False) -> Path:
    """The run folder for ``cfg`` when it names none (:func:`~splatforge.train.config.default_output`):
    ``root/<scene folder name>``, or the first of ``<name>-2``, ``<name>-3``, ... that holds no run
    or a run of the same options (its manifest's train digest is this config's)."""
    from splatforge.train.config import default_output

    wanted = train_digest(cfg)
    return default_output(
        cfg.data, root, reuse, same_run=lambda out: Manifest(out).stage("train").get("hash") == wanted
    )


def train_job(
    cfg: TrainConfig,
    *,
    evaluate: bool = True,
    force_resume: bool = False,
    emit: EventSink | None = None,
    on_step: Callable[[Trainer], None] | None = None,
    train_fn: Callable[..., tuple[list[Path], dict]] | None = None,
) -> dict:
    """Train ``cfg`` into ``cfg.output`` and evaluate it (stages ``train``, ``eval``): resumable
    (module docstring). ``force_resume``: continue from the latest checkpoint even when the
    options changed (``train --resume``, e.g. with more steps). ``train_fn(ctx, cfg=, force_resume=)``
    replaces the train stage's function (:func:`~splatforge.pipeline.stages.train_stage`): the
    CLI's ``--nproc`` runs it on torchrun's processes; its info may add ``processes`` and ``ranks``. Returns the summary: ``run``,
    ``step``, ``num_gaussians``, ``train_seconds``, ``ply`` and, evaluated, each split's
    metrics and ``lpips_note``.

    Raises:
        ConfigError: ``cfg.output`` not set, or a bad option; DataFormatError: a bad scene.
    """
    from splatforge.errors import ConfigError

    if cfg.output is None:
        raise ConfigError("TrainConfig.output is not set (the command line picks runs/<scene> by default)")
    copy.deepcopy(cfg).resolve()  # bad options fail before anything is written
    output = Path(cfg.output)
    d_train = train_digest(cfg)
    train = train_fn or functools.partial(train_stage, on_step=on_step)
    stages = [Stage("train", functools.partial(train, cfg=cfg, force_resume=force_resume), d_train)]
    if evaluate:
        stages.append(Stage("eval", functools.partial(eval_stage, output=output), digest("eval", {}, None, [d_train])))
    runner = StageRunner(output, emit)
    outcomes = run_stages(runner, stages)
    info = outcomes["train"].info
    ply = output / "point_cloud" / f"iteration_{info['step']}" / "point_cloud.ply"
    summary = {"run": str(output), **{k: info.get(k) for k in ("step", "num_gaussians", "train_seconds")}}
    summary["ply"] = str(ply)
    summary["resumed_from"] = info.get("resumed_from")
    summary["processes"] = info.get("processes", 1)
    if "ranks" in info:
        summary["ranks"] = info["ranks"]
    summary["skipped"] = [name for name, o in outcomes.items() if o.status == "skipped"]
    if evaluate:
        metrics = outcomes["eval"].info
        for split in ("test", "train"):
            for k in ("psnr", "ssim", "lpips_vgg", "lpips_alex"):
                summary[f"{split}_{k}"] = metrics.get(split, {}).get(k)
        summary["lpips_note"] = metrics.get("lpips_note")
    return summary
