"""The ``splatforge`` command. Thin: it parses arguments and calls one library function."""

from __future__ import annotations

import contextlib
import json
import logging
import sys
from pathlib import Path
from typing import Iterator, Literal, Optional

import tyro
from rich.console import Console
from rich.logging import RichHandler
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from splatforge.errors import SplatforgeError
from splatforge.train.config import DensifyConfig, LearningRates, MCMCConfig

STDERR = Console(stderr=True)


@contextlib.contextmanager
def _progress_bar(total: int, start: int = 0) -> Iterator:
    """A rich progress bar on stderr; yields the per-step callback the trainer calls."""
    columns = [TextColumn("[bold]train"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
               TextColumn("{task.fields[stats]}"), TimeElapsedColumn(), TimeRemainingColumn()]  # fmt: skip
    with Progress(*columns, console=STDERR, transient=False) as bar:
        task = bar.add_task("train", total=total, completed=start, stats="")

        def update(step: int, loss: float, psnr: float, n: int, its: float) -> None:
            if step % 10 == 0 or step == total:
                bar.update(task, completed=step, stats=f"loss {loss:.4f}  PSNR {psnr:5.2f}  #G {n:,}  {its:5.1f} it/s")

        yield update


def train(
    data: tyro.conf.Positional[Path],
    output: Path,
    data_factor: int = 1,
    steps: int = 30_000,
    max_gaussians: int = 0,
    test_every: int = 8,
    split_ratio: Optional[float] = None,
    partition: Optional[Path] = None,
    backend: Literal["auto", "cpu", "gsplat", "reference"] = "auto",
    device: str = "cpu",
    seed: int = 0,
    sh_degree: int = 3,
    random_background: bool = False,
    checkpoint_every: int = 1000,
    strategy: Literal["default", "mcmc"] = "default",
    resume: bool = False,
    eval: bool = True,
    lr: LearningRates = LearningRates(),
    densify: DensifyConfig = DensifyConfig(),
    mcmc: MCMCConfig = MCMCConfig(),
) -> None:
    """Train Gaussians on a scene folder (COLMAP or transforms.json), then render and evaluate.

    Args:
        data: scene folder.
        output: run folder (created; never the input folder).
        data_factor: read images_<k> (downscaled copies are made in the cache when missing).
        steps: optimisation steps.
        max_gaussians: hard cap on the count, 0 for none.
        test_every: every k-th image (sorted by name) is a test view.
        split_ratio: fraction of views to train on, evenly spread (overrides test_every).
        partition: partition.json or splits/ folder (overrides both).
        backend: rasterizer backend.
        device: torch device (cpu, cuda).
        seed: random seed.
        sh_degree: final SH degree (0..3).
        random_background: train on random background colours.
        checkpoint_every: checkpoint period in steps (0: at the end only).
        strategy: densification: "default" (3DGS adaptive density control) or "mcmc" (relocation,
            regularised; fewer floaters when test views are far from training views).
        resume: continue from the run's latest checkpoint.
        eval: render the train/test views and write metrics.json at the end.
    """
    from splatforge.products import evaluate
    from splatforge.train import TrainConfig, Trainer

    cfg = TrainConfig(
        data=data, output=output, data_factor=data_factor, steps=steps, max_gaussians=max_gaussians,
        test_every=test_every, split_ratio=split_ratio, partition=partition, backend=backend, device=device,
        seed=seed, sh_degree=sh_degree, random_background=random_background, checkpoint_every=checkpoint_every,
        strategy=strategy, lr=lr, densify=densify, mcmc=mcmc,
    )  # fmt: skip
    trainer = Trainer(cfg)
    if resume and not trainer.resume():
        logging.getLogger("splatforge").warning("no checkpoint in %s: starting from scratch", output / "checkpoints")
    with _progress_bar(cfg.steps, trainer.step) as update:
        result = trainer.train(update)
    summary = {"step": result.step, "num_gaussians": result.num_gaussians, "train_seconds": round(result.train_seconds, 1),
               "ply": str(result.ply_path)}  # fmt: skip
    if eval:
        metrics = evaluate(trainer)
        summary.update({f"{split}_{k}": metrics[split][k] for split in ("test", "train") for k in ("psnr", "ssim", "lpips")})
    print(json.dumps(summary, indent=2))


def render(run: tyro.conf.Positional[Path], split: Literal["test", "train", "all"] = "test", depth: bool = False) -> None:
    """Render a trained run's views with ground truth (and depth maps) into RUN/{split}/ours_N/.

    Args:
        run: run folder written by `splatforge train`.
        split: which views.
        depth: also write depth/NNNNN.npy (expected camera-z depth, float32).
    """
    from splatforge.products import render_split
    from splatforge.train import Trainer

    trainer = Trainer.from_run(run)
    for name in ("test", "train") if split == "all" else (split,):
        out = render_split(trainer, name, depth=depth)
        print(f"{name}: {out['num_views']} views -> {run / name / f'ours_{trainer.step}'}  PSNR {out['psnr']}")


def eval(run: tyro.conf.Positional[Path]) -> None:  # noqa: A001 - the command's name
    """Evaluate a trained run: PSNR, SSIM, LPIPS per split into RUN/metrics.json."""
    from splatforge.products import evaluate
    from splatforge.train import Trainer

    metrics = evaluate(Trainer.from_run(run))
    print(json.dumps({k: v for k, v in metrics.items() if k not in ("test", "train")} |
                     {s: {k: v for k, v in metrics[s].items() if k != "per_view"} for s in ("test", "train")}, indent=2))  # fmt: skip


def demo(output: Path = Path("out/demo"), steps: int = 300, seed: int = 0,
         backend: Literal["auto", "cpu", "gsplat", "reference"] = "auto") -> None:  # fmt: skip
    """Build a small scene offline (rendered Gaussians + transforms.json), train on it, render the
    test views and report metrics: the whole path in about a minute on a laptop CPU.

    Args:
        output: folder for the scene (OUTPUT/scene) and the run (OUTPUT/run).
        steps: training steps.
        seed: random seed.
        backend: rasterizer backend.
    """
    from splatforge.demo import run_demo

    with _progress_bar(steps) as update:
        summary = run_demo(output, steps=steps, seed=seed, backend=backend, progress=update)
    print(json.dumps(summary, indent=2))


def backends() -> None:
    """List the rasterizer backends usable on this machine (never builds gsplat)."""
    import torch

    from splatforge.raster import available_backends

    print("cpu tensors: ", ", ".join(available_backends("cpu")))
    print("cuda tensors:", ", ".join(available_backends("cuda")) if torch.cuda.is_available() else "no CUDA device")


COMMANDS = {"train": train, "render": render, "eval": eval, "demo": demo, "backends": backends}


def main(argv: Optional[list[str]] = None) -> int:
    # Logs and progress go to stderr; stdout carries only results (JSON summaries, listings).
    logging.basicConfig(level=logging.INFO, format="%(message)s", handlers=[RichHandler(console=STDERR, show_path=False)])
    logging.getLogger("numba").setLevel(logging.WARNING)
    try:
        tyro.extras.subcommand_cli_from_dict(COMMANDS, args=argv, prog="splatforge")
    except SplatforgeError as exc:
        print(f"error: {exc}", file=sys.stderr)  # one unwrapped line naming the file at fault
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
