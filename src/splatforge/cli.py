"""The ``splatforge`` command. Thin: it parses arguments and calls one library function."""

from __future__ import annotations

import contextlib
import json
import logging
import sys
from pathlib import Path
from typing import Iterator, Literal, Optional

import numpy as np
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
    viewer: bool = False,
    viewer_port: int = 8080,
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
        viewer: show the Gaussians live in a browser (viser) at http://localhost:VIEWER_PORT.
        viewer_port: port of the live viewer.
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
    live = None
    if viewer:
        from splatforge.viewer import SplatViewer

        sc = trainer.scene
        live = SplatViewer(port=viewer_port, camtoworlds=sc.camtoworlds[sc.split["train"]], Ks=sc.Ks[sc.split["train"]],
                           sizes=np.stack([sc.widths, sc.heights], 1)[sc.split["train"]])  # fmt: skip
        STDERR.print(f"viewer: http://localhost:{live.port}")
    with _progress_bar(cfg.steps, trainer.step) as update:
        if live is not None:
            bar_update = update

            def update(step: int, *args) -> None:
                bar_update(step, *args)
                live.maybe_update(lambda: {k: v.detach().cpu().numpy() for k, v in trainer.params.items()})

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


def export(
    source: tyro.conf.Positional[Path],
    output: Path,
    format: Optional[Literal["ply", "splat", "spz"]] = None,  # noqa: A002 - the option's name
    transform: Optional[Literal["identity", "opengl", "splatter"]] = None,
    rotate: Optional[str] = None,
    matrix: Optional[Path] = None,
    scale: float = 1.0,
    prune_opacity: float = 1 / 255,
    crop: Optional[tuple[float, float, float, float, float, float]] = None,
    spz_version: Literal[2, 3, 4] = 3,
) -> None:
    """Export a run (its latest point cloud) or a .ply/.splat/.spz file to ply, splat or spz.

    Args:
        source: run folder or splat file.
        output: file to write; its suffix picks the format unless --format is given.
        format: ply (Inria), splat (antimatter15), spz (Niantic).
        transform: named rotation from the COLMAP/OpenCV frame: opengl (y up, three.js/Spark),
            splatter (Rz(-90 deg)).
        rotate: extra rotation "x,y,z" in degrees (about the fixed world axes, x first).
        matrix: 4x4 or 3x4 similarity matrix file (.npy or text), applied after the rotations.
        scale: uniform scale applied last (means and scales).
        prune_opacity: drop Gaussians whose activated opacity is below this.
        crop: keep means inside xmin ymin zmin xmax ymax zmax (after the transform).
        spz_version: SPZ version (3 is what most viewers read; 4 uses zstd).
    """
    from splatforge.products.export import build_transform
    from splatforge.products.export import export as export_fn

    sim = build_transform(transform, rotate, matrix, scale)
    print(json.dumps(export_fn(source, output, format, transform=sim, prune_opacity=prune_opacity, crop_box=crop,
                               spz_version=spz_version), indent=2))  # fmt: skip


def preview(source: tyro.conf.Positional[Path], output: Optional[Path] = None, size: int = 1024, orbit: bool = False) -> None:
    """Write preview_top.jpg and preview_angle.jpg (and preview_orbit.mp4) of a run or splat file.

    Args:
        source: run folder (its cameras.json gives the up axis) or .ply/.splat/.spz file.
        output: folder for the images (default: the run folder, or the file's folder).
        size: image side in pixels.
        orbit: also write a 360 degree orbit video.
    """
    from splatforge.io.cameras import read_cameras_json
    from splatforge.products.export import load_splats
    from splatforge.products.previews import write_previews

    splats = load_splats(source)
    cams = Path(source) / "cameras.json" if Path(source).is_dir() else Path(source).parent / "cameras.json"
    c2w, Ks, image_size = None, None, None
    if cams.exists():
        c2w, Ks, _, sizes = read_cameras_json(cams)
        image_size = (int(sizes[0, 0]), int(sizes[0, 1]))
    out = output or (Path(source) if Path(source).is_dir() else Path(source).parent)
    print(json.dumps(write_previews(splats, out, camtoworlds=c2w, Ks=Ks, image_size=image_size, size=size, orbit=orbit), indent=2))


def _quiet_colmap() -> None:
    """COLMAP logs every step at INFO through glog; keep warnings and errors only."""
    import pycolmap

    pycolmap.logging.minloglevel = 1


def _prepare_config(inputs: list[Path], output: Path, target_frames: int, max_size: int, matcher: str,
                    camera_model: str, downscale: tuple[int, ...], max_features: int, seed: int = 0):  # fmt: skip
    from splatforge.pipeline.prepare import PrepareConfig

    return PrepareConfig(inputs=list(inputs), output=output, target_frames=target_frames, max_size=max_size,
                         matcher=matcher, camera_model=camera_model, downscale=list(downscale), max_features=max_features,
                         seed=seed)  # fmt: skip


def prepare(
    inputs: tyro.conf.Positional[tuple[Path, ...]],
    output: Path,
    target_frames: int = 150,
    max_size: int = 1600,
    matcher: Literal["auto", "sequential", "exhaustive"] = "auto",
    camera_model: str = "SIMPLE_RADIAL",
    downscale: tuple[int, ...] = (),
    max_features: int = 4096,
    seed: int = 0,
) -> None:
    """Videos and/or photo folders -> a posed scene folder (images/, sparse/0/, splits/, prepare.json).

    Args:
        inputs: videos, image files or folders of photos (any mix).
        output: scene folder to create (must not exist).
        target_frames: frames kept from the videos (sharpest per window, evenly spread).
        max_size: longer image side after import, pixels.
        matcher: auto = exhaustive up to 100 images (video frames included), sequential above.
        camera_model: COLMAP model estimated by SfM (images are undistorted to PINHOLE).
        downscale: also write images_<k> for these factors.
        max_features: SIFT features per image (fewer: faster matching).
        seed: seeds SfM (RANSAC, mapping): the same inputs and options give the same model.
    """
    from splatforge.pipeline.prepare import prepare as prepare_fn

    _quiet_colmap()
    with STDERR.status("prepare") as status:
        summary = prepare_fn(_prepare_config(inputs, output, target_frames, max_size, matcher, camera_model, downscale, max_features, seed),
                             on_phase=lambda name: status.update(f"prepare: {name}"))  # fmt: skip
    decoded = sum(v["decoded"] for v in summary["videos"]) + summary["photos"]["imported"] + len(summary["photos"]["skipped"])
    STDERR.print(f"{summary['num_images']} frames kept of {decoded}, {summary['num_registered']} registered "
                 f"({100 * summary['registered_fraction']:.0f} %), mean reprojection error "
                 f"{summary['mean_reprojection_error_px']:.2f} px")  # fmt: skip
    print(json.dumps(summary, indent=2))


def run(
    inputs: tyro.conf.Positional[tuple[Path, ...]],
    output: Path,
    steps: int = 30_000,
    target_frames: int = 150,
    max_size: int = 1600,
    matcher: Literal["auto", "sequential", "exhaustive"] = "auto",
    camera_model: str = "SIMPLE_RADIAL",
    max_features: int = 4096,
    cap_max: int = 1_000_000,
    backend: Literal["auto", "cpu", "gsplat", "reference"] = "auto",
    device: str = "cpu",
    seed: int = 0,
    preview_size: int = 1024,
) -> None:
    """From captures to a splat in one command: prepare -> train (MCMC) -> eval -> export (ply,
    splat, spz) -> previews, into OUTPUT/{scene,run,export}.

    Args:
        inputs: videos, image files or folders of photos.
        output: output folder.
        steps: training steps.
        target_frames: frames kept from the videos.
        max_size: longer image side after import, pixels.
        matcher: SfM matching.
        camera_model: COLMAP camera model for SfM.
        max_features: SIFT features per image.
        cap_max: most Gaussians MCMC may use.
        backend: rasterizer backend.
        device: torch device.
        seed: random seed (SfM and training).
        preview_size: preview image side in pixels.
    """
    from splatforge.pipeline.run import run_pipeline

    cfg = _prepare_config(inputs, output / "scene", target_frames, max_size, matcher, camera_model, (), max_features, seed)
    _quiet_colmap()
    with _progress_bar(steps) as update:
        summary = run_pipeline(cfg, output, steps=steps, cap_max=cap_max, backend=backend, device=device, seed=seed,
                               preview_size=preview_size, progress=update, on_phase=lambda name: STDERR.print(f"[bold]{name}"))  # fmt: skip
    print(json.dumps(summary, indent=2))


def view(source: tyro.conf.Positional[Path], host: str = "127.0.0.1", port: int = 8080) -> None:
    """Open a run or a .ply/.splat/.spz file in a browser viewer (viser), with the run's cameras.

    Args:
        source: run folder or splat file.
        host: interface to serve on (0.0.0.0 for other machines).
        port: port.
    """
    import time

    from splatforge.io.cameras import read_cameras_json
    from splatforge.products.export import load_splats
    from splatforge.viewer import SplatViewer

    splats = load_splats(source)
    cams = Path(source) / "cameras.json" if Path(source).is_dir() else Path(source).parent / "cameras.json"
    c2w, Ks, sizes = None, None, None
    if cams.exists():
        c2w, Ks, _, sizes = read_cameras_json(cams)
    live = SplatViewer(host, port, camtoworlds=c2w, Ks=Ks, sizes=sizes)
    live.set_splats(splats)
    STDERR.print(f"viewer: http://{host}:{live.port}  ({len(splats['means']):,} Gaussians; Ctrl-C to stop)")
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        live.close()


class _JobBoard:
    """Live table on stderr: jobs queued/running/done/failed per device, and an ETA."""

    def __init__(self, total: int):
        from rich.live import Live

        self.total, self.started, self.t0 = total, 0, None
        self.per_device: dict[str, dict[str, int]] = {}
        self.durations: list[float] = []
        self.begin: dict[str, float] = {}
        self.live = Live(self._table(), console=STDERR, refresh_per_second=2)

    def _table(self):
        import time

        from rich.table import Table

        table = Table(title="splatforge generate")
        for col in ("device", "running", "done", "failed"):
            table.add_column(col)
        for dev, c in sorted(self.per_device.items()):
            table.add_row(dev, str(c["running"]), str(c["done"]), str(c["failed"]))
        finished = sum(c["done"] + c["failed"] for c in self.per_device.values())
        running = sum(c["running"] for c in self.per_device.values())
        eta = ""
        if self.durations and self.t0 is not None:
            rate = finished / max(time.monotonic() - self.t0, 1e-9)
            eta = f"  ETA {(self.total - finished) / max(rate, 1e-9) / 60:.1f} min"
        table.caption = f"{self.total - finished - running} queued, {running} running, {finished}/{self.total} finished{eta}"
        return table

    def __call__(self, event: str, spec, result, device: str) -> None:
        import time

        c = self.per_device.setdefault(device, {"running": 0, "done": 0, "failed": 0})
        if self.t0 is None:
            self.t0 = time.monotonic()
        if event == "start":
            c["running"] += 1
            self.begin[spec.name] = time.monotonic()
        else:
            c["running"] -= 1
            c["done" if result["status"] == "done" else "failed"] += 1
            self.durations.append(time.monotonic() - self.begin.pop(spec.name, time.monotonic()))
        self.live.update(self._table())


def generate(
    dataset_root: Path,
    output_dir: Path,
    dataset: Literal["dl3dv", "mipnerf360", "auto"] = "auto",
    subset: tuple[str, ...] = (),
    split_ratio: tuple[float, ...] = (0.1, 0.3),
    stages: tuple[str, ...] = ("train", "render", "visibility", "depth"),
    steps: int = 7000,
    data_factor: int = 1,
    strategy: Literal["default", "mcmc"] = "mcmc",
    cap_max: int = 300_000,
    seed: int = 0,
    backend: Literal["auto", "cpu", "gsplat", "reference"] = "auto",
    skip_existing: bool = True,
    cut_start: int = 0,
    cut_end: Optional[int] = None,
    max_workers: int = 0,
    excluded_gpus: tuple[int, ...] = (),
    jobs_per_gpu: str = "1",
    executor: Literal["local", "ray"] = "local",
    ray_address: Optional[str] = None,
    dry_run: bool = False,
) -> None:
    """Bulk dataset generation: every scene x split ratio through the stages, resumable.

    Args:
        dataset_root: the dataset folder.
        output_dir: outputs, logs/, summary.json, summary.md.
        dataset: layout preset (dl3dv: <root>/<subset>/<scene>/images_4 + transforms.json;
            mipnerf360: <root>/<scene>/images_4|images_2 + sparse/0; auto: any readable folder).
        subset: subset folders to process (dl3dv: default all).
        split_ratio: fractions of frames used for training (one output per scene and ratio).
        stages: postprocess train render visibility depth partition_fix clean.
        steps: training steps.
        data_factor: image downscale factor for the auto preset.
        strategy: densification strategy.
        cap_max: most Gaussians (MCMC).
        seed: random seed.
        backend: rasterizer backend.
        skip_existing: skip stages whose inputs hash matches and whose outputs are intact.
        cut_start: first scene (sorted) to process.
        cut_end: scene after the last to process.
        max_workers: jobs at once (0: one per GPU slot, or 1 on CPU).
        excluded_gpus: GPU indices not to use.
        jobs_per_gpu: jobs per GPU, or auto (by free memory).
        executor: local (subprocesses) or ray.
        ray_address: Ray cluster address (default: start a local instance).
        dry_run: list the jobs and write nothing.
    """
    from splatforge.pipeline.generate import GenerateConfig
    from splatforge.pipeline.generate import generate as generate_fn
    from splatforge.pipeline.generate import discover_scenes, plan_jobs

    cfg = GenerateConfig(
        dataset_root=dataset_root, output_dir=output_dir, dataset=dataset, subset=list(subset),
        split_ratio=list(split_ratio), stages=list(stages), steps=steps, data_factor=data_factor, strategy=strategy,
        cap_max=cap_max, seed=seed, backend=backend, skip_existing=skip_existing, cut_start=cut_start, cut_end=cut_end,
        max_workers=max_workers, excluded_gpus=list(excluded_gpus), jobs_per_gpu=jobs_per_gpu, executor=executor,
        ray_address=ray_address, dry_run=dry_run,
    )  # fmt: skip
    if dry_run:
        print(json.dumps(generate_fn(cfg), indent=2))
        return
    board = _JobBoard(len(plan_jobs(cfg, discover_scenes(cfg))))
    with board.live:
        summary = generate_fn(cfg, on_event=board)
    STDERR.print(f"{summary['done']} done, {summary['failed']} failed of {summary['jobs']} jobs -> {output_dir / 'summary.md'}")
    print(json.dumps({k: v for k, v in summary.items() if k != "results"}, indent=2))
    if summary["failed"]:
        raise SystemExit(1)


def backends() -> None:
    """List the rasterizer backends usable on this machine (never builds gsplat)."""
    import torch

    from splatforge.raster import available_backends

    print("cpu tensors: ", ", ".join(available_backends("cpu")))
    print("cuda tensors:", ", ".join(available_backends("cuda")) if torch.cuda.is_available() else "no CUDA device")


COMMANDS = {"prepare": prepare, "train": train, "render": render, "eval": eval, "export": export, "preview": preview,
            "run": run, "view": view, "generate": generate, "demo": demo,
            "backends": backends}


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
