"""``train``, ``render``, ``eval`` and ``demo``: training a scene and looking at the run."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import tyro

from splatforge.cli.common import STDERR, Backend, prescan
from splatforge.errors import ConfigError
from splatforge.train.config import TrainConfig

# ---------------------------------------------------------------------------------- training


def _drop_option(argv: list[str], name: str, takes_value: bool = True) -> list[str]:
    """``argv`` without option ``name`` (``--name V`` or ``--name=V``; a flag with
    ``takes_value=False``)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a == name:
            skip = takes_value
            continue
        if a.startswith(name + "="):
            continue
        out.append(a)
    return out


@dataclass
class TrainCommand(TrainConfig):
    """Train Gaussians on a scene folder (COLMAP or transforms.json), then render and evaluate.
    Prints what it will do and about how long it takes, then a progress bar with the ETA."""

    data: tyro.conf.Positional[Path] = tyro.MISSING
    """Scene folder (COLMAP sparse/0 + images, or transforms.json)."""
    preset: Literal["auto", "fast", "default", "quality"] = "auto"
    """Steps, training resolution and Gaussian cap for the device: auto (default on a GPU, fast
    on a CPU), fast, default, quality. Options given here override it."""
    resume: bool = False
    """Continue from the run's latest checkpoint (exactly: bit-identical to an uninterrupted run)."""
    eval: bool = True
    """Render the train/test views and write metrics.json at the end."""
    viewer: bool = False
    """Show the Gaussians live in a browser (viser) at http://localhost:VIEWER_PORT."""
    viewer_port: int = 8080
    nproc: int = 1
    """Train on this many processes of this machine (torchrun; gloo on the CPU, NCCL with one GPU
    each): the Gaussians are sharded, each process renders batch-size views per step. Same as
    ``torchrun --nproc-per-node N -m splatforge train ...``."""
    argv: tyro.conf.Suppress[list[str]] = field(default_factory=list)
    """The command line this was parsed from (set by ``main``; what ``--nproc`` relaunches)."""

    @classmethod
    def defaults(cls, argv: list[str]) -> TrainCommand:
        from splatforge.train.presets import preset_train_config

        seen = prescan(argv, preset="auto", device="auto")
        base = preset_train_config(seen["preset"], data=Path("."), device=seen["device"])
        fields = {f.name: getattr(base, f.name) for f in dataclasses.fields(TrainConfig) if f.name != "data"}
        return cls(**fields, preset=seen["preset"])

    def config(self) -> TrainConfig:
        return TrainConfig(**{f.name: getattr(self, f.name) for f in dataclasses.fields(TrainConfig)})

    def _launched_train(self, ctx, cfg: TrainConfig, force_resume: bool) -> tuple[list[Path], dict]:
        """The train stage of ``--nproc N``: this command on N processes through torchrun, into
        one run folder (continuing from its checkpoints when the stage is resumed)."""
        from splatforge.errors import TrainingProcessError
        from splatforge.pipeline.stages import resume_checkpoints
        from splatforge.train.distributed import launch

        argv = _drop_option(_drop_option(self.argv, "--nproc"), "--output")
        argv = _drop_option(_drop_option(argv, "--resume", takes_value=False), "--no-eval", takes_value=False)
        argv = [*argv, "--output", str(cfg.output), "--no-eval"]
        ckpts = Path(cfg.output) / "checkpoints"
        if resume_checkpoints(ctx, cfg.output, force_resume):
            argv.append("--resume")
        code, out = launch(self.nproc, ["train", *argv], capture_stdout=True)
        if code != 0:
            raise TrainingProcessError(
                f"training on {self.nproc} processes stopped: a process failed (torchrun exit code {code}; its log is "
                f"above); continue it with: splatforge train {' '.join(argv[:-1])} --nproc {self.nproc} "
                "(the same command; --resume continues it with other options)"
            )
        summary = json.loads(out[out.index("{") :])
        outputs = [Path(summary["ply"]), Path(cfg.output) / "cameras.json", Path(cfg.output) / "cfg.yml"]
        keys = ("step", "num_gaussians", "train_seconds", "processes", "ranks", "resumed_from")
        return outputs + sorted(ckpts.glob("ckpt_*.pt"))[-1:], {k: summary.get(k) for k in keys}

    def main(self) -> None:
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            return self._main_distributed()
        from splatforge.cli.progress import RichProgress
        from splatforge.pipeline.training import run_folder, train_job

        cfg = self.config()
        if cfg.output is None:
            cfg = dataclasses.replace(cfg, output=run_folder(cfg, reuse=self.resume))
        STDERR.print(f"run folder: {cfg.output}")
        viewer: dict = {}

        def show_live(trainer) -> None:
            if "live" not in viewer:
                from splatforge.viewer import SplatViewer

                sc, ids = trainer.scene, trainer.train_ids
                sizes = list(zip(sc.widths[ids], sc.heights[ids]))
                viewer["live"] = SplatViewer(
                    port=self.viewer_port, camtoworlds=sc.camtoworlds[ids], Ks=sc.Ks[ids], sizes=sizes
                )
                STDERR.print(f"viewer: http://localhost:{viewer['live'].port}")
            viewer["live"].maybe_update(lambda: trainer.splats)

        launched = self.nproc > 1 and "WORLD_SIZE" not in os.environ
        if launched and self.viewer:
            raise ConfigError("--viewer shows one process's Gaussians: not available in sharded training")
        with RichProgress(STDERR) as show:
            summary = train_job(
                cfg,
                evaluate=self.eval,
                force_resume=self.resume,
                emit=show,
                on_step=show_live if self.viewer else None,
                train_fn=self._launched_train if launched else None,
            )
        print(json.dumps(summary, indent=2))

    def _main_distributed(self) -> None:
        """A rank of ``torchrun ... -m splatforge train``: the Gaussians sharded over the ranks."""
        from splatforge.errors import TrainingProcessError
        from splatforge.train.config import default_output, resolve_device
        from splatforge.train.distributed import broadcast_object, finish, init_from_env

        cfg = self.config()
        world, cfg.device = init_from_env(resolve_device(cfg.device))
        if self.viewer:
            raise ConfigError("--viewer shows one process's Gaussians: not available in sharded training")
        if cfg.output is None:  # chosen once, by rank 0
            cfg.output = broadcast_object(
                default_output(cfg.data, reuse=self.resume) if world.rank == 0 else None, world
            )
        try:
            self._train(cfg, world)
        except RuntimeError as exc:
            raise TrainingProcessError(
                f"rank {world.rank} of {world.size} lost the other training processes ({exc}); "
                f"continue the run ({cfg.output}) with --resume"
            ) from exc
        finish(world)

    def _train(self, cfg: TrainConfig, world) -> None:
        from splatforge.cli.progress import RichProgress
        from splatforge.pipeline.events import train_progress
        from splatforge.products import evaluate
        from splatforge.train import Trainer
        from splatforge.train.distributed import gather_objects
        from splatforge.train.presets import describe_plan, estimate_seconds

        lead = world.rank == 0
        trainer = Trainer(cfg, world=world)
        resumed = self.resume and trainer.resume()
        start = trainer.step
        if self.resume and not resumed:
            logging.getLogger("splatforge").warning(
                "no checkpoint in %s: starting from scratch", cfg.output / "checkpoints"
            )
        if lead:
            STDERR.print(f"run folder: {cfg.output} ({world.size} processes)")
        if trainer.step < cfg.steps:
            plan = describe_plan(trainer, estimate_seconds(trainer))
            if lead:
                STDERR.print(plan, soft_wrap=True)
        with RichProgress(STDERR) if lead else contextlib.nullcontext(None) as show:
            result = trainer.train(train_progress(show, "train", cfg.steps) if lead else None)
        summary = {
            "run": str(cfg.output),
            "step": result.step,
            "num_gaussians": result.num_gaussians,
            "train_seconds": round(result.train_seconds, 1),
            "ply": str(result.ply_path),
        }
        summary["processes"] = world.size
        summary["resumed_from"] = start if resumed else None
        summary["ranks"] = gather_objects(trainer.memory_report(), world)
        if self.eval:
            run = trainer.as_run()  # gathers the shards: every rank takes part
            if not lead:
                return
            metrics = evaluate(run)
            summary.update(
                {
                    f"{s}_{k}": metrics[s][k]
                    for s in ("test", "train")
                    for k in ("psnr", "ssim", "lpips_vgg", "lpips_alex")
                }
            )
            summary["lpips_note"] = metrics["lpips_note"]
        if lead:
            print(json.dumps(summary, indent=2))


@dataclass
class RenderCommand:
    """Render a trained run's views with ground truth (and depth maps) into RUN/{split}/ours_N/."""

    run: tyro.conf.Positional[Path]
    """Run folder written by `splatforge train`."""
    split: Literal["test", "train", "all"] = "test"
    depth: bool = False
    """Also write depth/NNNNN.npy (expected camera-z depth, float32, world units)."""
    device: str | None = None
    """torch device (default: the run's, or cpu)."""

    def main(self) -> None:
        from splatforge.products import render_split
        from splatforge.products.renders import split_folder
        from splatforge.train import Run

        run = Run.open(self.run, device=self.device)
        for name in ("test", "train") if self.split == "all" else (self.split,):
            out = render_split(run, name, depth=self.depth)
            print(f"{name}: {out['num_views']} views -> {split_folder(run, name)}  PSNR {out['psnr']}")


@dataclass
class EvalCommand:
    """Evaluate a trained run: PSNR, SSIM, LPIPS (VGG and AlexNet) per split into RUN/metrics.json."""

    run: tyro.conf.Positional[Path]
    device: str | None = None
    """torch device (default: the run's, or cpu)."""

    def main(self) -> None:
        from splatforge.products import evaluate
        from splatforge.train import Run

        metrics = evaluate(Run.open(self.run, device=self.device))
        print(
            json.dumps(
                {k: v for k, v in metrics.items() if k not in ("test", "train")}
                | {s: {k: v for k, v in metrics[s].items() if k != "per_view"} for s in ("test", "train")},
                indent=2,
            )
        )


@dataclass
class DemoCommand:
    """Build a small scene offline (rendered Gaussians + transforms.json), train on it, render the
    test views and report metrics: the whole path in about a minute on a laptop CPU."""

    output: Path = Path("out/demo")
    """Folder for the scene (OUTPUT/scene) and the run (OUTPUT/run)."""
    steps: int = 300
    seed: int = 0
    backend: Backend = "auto"

    def main(self) -> None:
        from splatforge.cli.progress import RichProgress
        from splatforge.demo import run_demo
        from splatforge.pipeline.events import train_progress

        with RichProgress(STDERR) as show:
            progress = train_progress(show, "train", self.steps)
            summary = run_demo(self.output, steps=self.steps, seed=self.seed, backend=self.backend, progress=progress)
        print(json.dumps(summary, indent=2))
