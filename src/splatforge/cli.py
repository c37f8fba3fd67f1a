"""The ``splatforge`` command. Thin: each subcommand is a dataclass of its options (the library's
config dataclass where there is one, parsed by tyro, so every config field is an option), and
its ``main()`` calls library functions. ``train`` applies its ``--preset`` before parsing, so any
option given overrides the preset and ``--help`` shows the preset's values. Logs and progress go
to stderr; stdout carries only results (JSON summaries, listings)."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Iterator, Literal, Optional

import tyro
from rich.console import Console
from rich.logging import RichHandler
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from splatforge.errors import ConfigError, SplatforgeError
from splatforge.pipeline.generate import GenerateConfig
from splatforge.pipeline.prepare import PrepareConfig
from splatforge.pipeline.run import RunConfig
from splatforge.pipeline.splatter import SplatterConfig
from splatforge.products.mesh import MeshConfig
from splatforge.train.config import TrainConfig

STDERR = Console(stderr=True)
Backend = Literal["auto", "cpu", "gsplat", "reference"]


@contextlib.contextmanager
def progress_bar(total: int, start: int = 0) -> Iterator:
    """A rich progress bar on stderr with the ETA; yields the trainer's progress callback."""
    columns = [TextColumn("[bold]train"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
               TextColumn("{task.fields[stats]}"), TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn()]  # fmt: skip
    with Progress(*columns, console=STDERR, transient=False) as bar:
        task = bar.add_task("train", total=total, completed=start, stats="")

        def update(step: int, loss: float, psnr: float, n: int, its: float) -> None:
            bar.update(task, completed=step, stats=f"loss {loss:.4f}  PSNR {psnr:5.2f}  #G {n:,}  {its:5.1f} it/s")

        yield update


def _quiet_colmap() -> None:
    """COLMAP logs every step at INFO through glog; keep warnings and errors only."""
    import pycolmap

    pycolmap.logging.minloglevel = 1


def _prescan(argv: list[str], **defaults: str) -> dict[str, str]:
    """The values of a few options before the full parse (argparse, no abbreviations)."""
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    for name, default in defaults.items():
        parser.add_argument(f"--{name.replace('_', '-')}", dest=name, default=default)
    known, _ = parser.parse_known_args(argv)
    return vars(known)


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
    def defaults(cls, argv: list[str]) -> "TrainCommand":
        from splatforge.train import apply_preset, resolve_preset
        from splatforge.train.config import resolve_device

        seen = _prescan(argv, preset="auto", device="auto")
        preset = resolve_preset(seen["preset"], resolve_device(seen["device"]))
        return dataclasses.replace(apply_preset(cls(), preset), preset=seen["preset"])

    def config(self) -> TrainConfig:
        return TrainConfig(**{f.name: getattr(self, f.name) for f in dataclasses.fields(TrainConfig)})

    def _launch(self) -> None:
        """``--nproc N``: the same command on N processes through torchrun, into one run folder."""
        from splatforge.errors import TrainingProcessError
        from splatforge.train.config import default_output
        from splatforge.train.distributed import launch

        argv = _drop_option(self.argv, "--nproc")
        output = self.output if self.output is not None else default_output(self.data, reuse=self.resume)
        if self.output is None:
            argv += ["--output", str(output)]
        code = launch(self.nproc, ["train", *argv])
        if code != 0:
            raise TrainingProcessError(
                f"training on {self.nproc} processes stopped: a process failed (torchrun exit code {code}; its log is "
                f"above); continue it with: splatforge train {' '.join(_drop_option(argv, '--resume', takes_value=False))} --resume --nproc {self.nproc}"
            )  # fmt: skip

    def main(self) -> None:
        from splatforge.errors import TrainingProcessError
        from splatforge.train.config import default_output, resolve_device
        from splatforge.train.distributed import broadcast_object, init_from_env

        if self.nproc > 1 and "WORLD_SIZE" not in os.environ:
            return self._launch()
        cfg = self.config()
        world, cfg.device = init_from_env(resolve_device(cfg.device))
        if world.distributed and self.viewer:
            raise ConfigError("--viewer shows one process's Gaussians: not available in sharded training")
        if cfg.output is None:  # chosen once, by rank 0
            cfg.output = broadcast_object(default_output(cfg.data, reuse=self.resume) if world.rank == 0 else None, world)
        from splatforge.train.distributed import finish

        try:
            self._train(cfg, world)
        except RuntimeError as exc:
            if not world.distributed:
                raise
            raise TrainingProcessError(f"rank {world.rank} of {world.size} lost the other training processes ({exc}); "
                                       f"continue the run ({cfg.output}) with --resume") from exc  # fmt: skip
        finish(world)

    def _train(self, cfg: TrainConfig, world) -> None:
        from splatforge.products import evaluate
        from splatforge.train import Trainer
        from splatforge.train.distributed import gather_objects
        from splatforge.train.presets import describe_plan, estimate_seconds

        lead = world.rank == 0
        trainer = Trainer(cfg, world=world)
        if self.resume and not trainer.resume():
            logging.getLogger("splatforge").warning("no checkpoint in %s: starting from scratch", cfg.output / "checkpoints")
        if lead:
            STDERR.print(f"run folder: {cfg.output}" + (f" ({world.size} processes)" if world.distributed else ""))
        if trainer.step < cfg.steps:
            plan = describe_plan(trainer, estimate_seconds(trainer))
            if lead:
                STDERR.print(plan, soft_wrap=True)
        live = None
        if self.viewer:
            from splatforge.viewer import SplatViewer

            sc, ids = trainer.scene, trainer.train_ids
            live = SplatViewer(port=self.viewer_port, camtoworlds=sc.camtoworlds[ids], Ks=sc.Ks[ids],
                               sizes=list(zip(sc.widths[ids], sc.heights[ids])))  # fmt: skip
            STDERR.print(f"viewer: http://localhost:{live.port}")
        with progress_bar(cfg.steps, trainer.step) if lead else contextlib.nullcontext(None) as update:
            if live is not None:
                bar_update = update

                def update(step: int, *args) -> None:
                    bar_update(step, *args)
                    live.maybe_update(lambda: trainer.splats)

            result = trainer.train(update)
        summary = {"run": str(cfg.output), "step": result.step, "num_gaussians": result.num_gaussians,
                   "train_seconds": round(result.train_seconds, 1), "ply": str(result.ply_path)}  # fmt: skip
        summary["processes"] = world.size
        summary["ranks"] = gather_objects(trainer.memory_report(), world)
        if self.eval:
            run = trainer.as_run()  # gathers the shards: every rank takes part
            if not lead:
                return
            metrics = evaluate(run)
            summary.update({f"{s}_{k}": metrics[s][k] for s in ("test", "train") for k in ("psnr", "ssim", "lpips_vgg", "lpips_alex")})
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
    device: Optional[str] = None
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
    device: Optional[str] = None
    """torch device (default: the run's, or cpu)."""

    def main(self) -> None:
        from splatforge.products import evaluate
        from splatforge.train import Run

        metrics = evaluate(Run.open(self.run, device=self.device))
        print(json.dumps({k: v for k, v in metrics.items() if k not in ("test", "train")} |
                         {s: {k: v for k, v in metrics[s].items() if k != "per_view"} for s in ("test", "train")}, indent=2))  # fmt: skip


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
        from splatforge.demo import run_demo

        with progress_bar(self.steps) as update:
            summary = run_demo(self.output, steps=self.steps, seed=self.seed, backend=self.backend, progress=update)
        print(json.dumps(summary, indent=2))


# ------------------------------------------------------------------------ exports and viewing


@dataclass
class ExportCommand:
    """Export a run (its latest point cloud) or a .ply/.splat/.spz file to ply, splat, spz or sog."""

    source: tyro.conf.Positional[Path]
    """Run folder or splat file."""
    output: Path
    """File to write; its suffix picks the format unless --format is given."""
    format: Optional[Literal["ply", "splat", "spz", "sog"]] = None
    """ply (Inria), splat (antimatter15, byte-identical to ply2splat's), spz (Niantic), sog (PlayCanvas)."""
    transform: Optional[Literal["identity", "opengl", "splatter"]] = None
    """Named rotation from the COLMAP/OpenCV frame: opengl (y up, three.js/Spark), splatter (Rz(-90 deg))."""
    rotate: Optional[str] = None
    """Extra rotation "x,y,z" in degrees (about the fixed world axes, x first)."""
    matrix: Optional[Path] = None
    """4x4 or 3x4 similarity matrix file (.npy or text), applied after the rotations."""
    scale: float = 1.0
    """Uniform scale applied last (means and scales)."""
    prune_opacity: float = 1 / 255
    """Drop Gaussians whose activated opacity is below this."""
    crop: Optional[tuple[float, float, float, float, float, float]] = None
    """Keep means inside xmin ymin zmin xmax ymax zmax (after the transform)."""
    spz_version: Literal[2, 3, 4] = 3
    """SPZ version (3 is what most viewers read; 4 uses zstd)."""

    def main(self) -> None:
        from splatforge.products.export import build_transform, export

        sim = build_transform(self.transform, self.rotate, self.matrix, self.scale)
        print(json.dumps(export(self.source, self.output, self.format, transform=sim, prune_opacity=self.prune_opacity,
                                crop_box=self.crop, spz_version=self.spz_version), indent=2))  # fmt: skip


def _cameras_beside(source: Path):
    """``(camtoworlds, Ks, sizes)`` from the ``cameras.json`` of a run folder or beside a file."""
    from splatforge.io.cameras import read_cameras_json

    cams = source / "cameras.json" if source.is_dir() else source.parent / "cameras.json"
    if not cams.exists():
        return None, None, None
    c2w, Ks, _, sizes = read_cameras_json(cams)
    return c2w, Ks, sizes


@dataclass
class PreviewCommand:
    """Write preview_top.jpg and preview_angle.jpg (and preview_orbit.mp4) of a run or splat file."""

    source: tyro.conf.Positional[Path]
    """Run folder (its cameras.json gives the up axis) or .ply/.splat/.spz file."""
    output: Optional[Path] = None
    """Folder for the images (default: the run folder, or the file's folder)."""
    size: int = 1024
    """Image side in pixels."""
    orbit: bool = False
    """Also write a 360 degree orbit video."""

    def main(self) -> None:
        from splatforge.products.export import load_splats
        from splatforge.products.previews import write_previews

        source = Path(self.source)
        splats = load_splats(source)
        c2w, Ks, sizes = _cameras_beside(source)
        image_size = (int(sizes[0, 0]), int(sizes[0, 1])) if sizes is not None else None
        out = self.output or (source if source.is_dir() else source.parent)
        print(json.dumps(write_previews(splats, out, camtoworlds=c2w, Ks=Ks, image_size=image_size, size=self.size,
                                        orbit=self.orbit), indent=2))  # fmt: skip


@dataclass
class ViewCommand:
    """Open a run or a .ply/.splat/.spz file in a browser viewer (viser), with the run's cameras."""

    source: tyro.conf.Positional[Path]
    """Run folder or splat file."""
    host: str = "127.0.0.1"
    """Interface to serve on (0.0.0.0 for other machines)."""
    port: int = 8080

    def main(self) -> None:
        from splatforge.products.export import load_splats
        from splatforge.viewer import SplatViewer

        splats = load_splats(self.source)
        c2w, Ks, sizes = _cameras_beside(Path(self.source))
        live = SplatViewer(self.host, self.port, camtoworlds=c2w, Ks=Ks, sizes=sizes)
        live.set_splats(splats)
        STDERR.print(f"viewer: http://{self.host}:{live.port}  ({len(splats):,} Gaussians; Ctrl-C to stop)")
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            live.close()


# --------------------------------------------------------------------------------- pipelines


@dataclass
class PrepareCommand(PrepareConfig):
    """Videos and/or photo folders -> a posed scene folder (images/, sparse/0/, splits/, prepare.json)."""

    inputs: tyro.conf.Positional[list[Path]] = tyro.MISSING
    """Videos, image files or folders of photos (any mix)."""
    output: Path = tyro.MISSING
    """Scene folder to create (must not exist)."""

    def main(self) -> None:
        from splatforge.pipeline.prepare import prepare

        _quiet_colmap()
        cfg = PrepareConfig(**{f.name: getattr(self, f.name) for f in dataclasses.fields(PrepareConfig)})
        with STDERR.status("prepare") as status:
            summary = prepare(cfg, on_phase=lambda name: status.update(f"prepare: {name}"))
        decoded = sum(v["decoded"] for v in summary["videos"]) + summary["photos"]["imported"] + len(summary["photos"]["skipped"])
        STDERR.print(f"{summary['num_images']} frames kept of {decoded}, {summary['num_registered']} registered "
                     f"({100 * summary['registered_fraction']:.0f} %), mean reprojection error "
                     f"{summary['mean_reprojection_error_px']:.2f} px")  # fmt: skip
        print(json.dumps(summary, indent=2))


@dataclass
class RunCommand(RunConfig):
    """From captures to a splat in one command: prepare -> train -> eval -> export (ply, splat,
    spz) -> previews, into OUTPUT/{scene,run,export}. Says before training what it will do and
    about how long it takes."""

    inputs: tyro.conf.Positional[list[Path]] = tyro.MISSING
    """Videos, image files or folders of photos."""
    output: Path = tyro.MISSING

    def main(self) -> None:
        from splatforge.pipeline.run import run_pipeline, run_train_config

        cfg = RunConfig(**{f.name: getattr(self, f.name) for f in dataclasses.fields(RunConfig)})
        _quiet_colmap()
        with progress_bar(run_train_config(cfg).steps) as update:
            summary = run_pipeline(cfg, progress=update, on_phase=lambda name: STDERR.print(f"[bold]{name}"),
                                   on_plan=lambda text: STDERR.print(text, soft_wrap=True))  # fmt: skip
        print(json.dumps(summary, indent=2))


@dataclass
class SplatterCommand(SplatterConfig):
    """A drop-in for splatter-server's compute-node pipeline (run.py): a job root's videos and
    COLMAP model -> ROOT/Frames, ROOT/refined/splatter/{splat.ply, splat_rot.ply, splat_rot.splat,
    splat_rot.sog, preview_top.jpg, preview_angle.jpg, preview.mp4, result.json}. Progress as JSON
    lines on stdout ({"pct", "stage", "status", ...}); logs on stderr; exit 0 on success, 1 with
    one last "error: ..." line otherwise. run.py's own flags (--job_root_path, --domain_id,
    --job_id, --log_level) are taken as they are; `splatforge splatter ROOT` works too."""

    root: tyro.conf.Positional[Optional[Path]] = None
    """The job root (instead of --job_root_path)."""
    job_root_path: Annotated[Optional[Path], tyro.conf.arg(aliases=("--job_root_path",))] = None  # type: ignore[assignment]
    """The job root: datasets/<dataset>/Frames.mp4 and refined/global/refined_sfm_combined/*.bin."""
    domain_id: Annotated[str, tyro.conf.arg(aliases=("--domain_id",))] = "00000000-0000-0000-0000-000000000000"
    job_id: Annotated[str, tyro.conf.arg(aliases=("--job_id",))] = "00000000-0000-0000-0000-000000000000"
    log_level: Annotated[str, tyro.conf.arg(aliases=("--log_level",))] = "info"
    max_gaussians: Annotated[Optional[int], tyro.conf.arg(aliases=("--max_gaussians",))] = None
    """Most Gaussians (default: the preset's)."""
    data_factor: Annotated[Optional[int], tyro.conf.arg(aliases=("--data_factor",))] = None
    """Train on the frames downscaled by this factor (default: the preset's image size decides);
    the frames written and the splat's frame are unchanged."""
    test_every: Annotated[int, tyro.conf.arg(aliases=("--test_every",))] = 8
    """Hold out every n-th frame (by name) for the test metrics; 0 trains on every frame."""

    def main(self) -> None:
        from splatforge.pipeline.splatter import splatter

        root = self.job_root_path or self.root
        if root is None:
            raise ConfigError("splatter needs the job root: --job_root_path ROOT (or ROOT)")
        level = getattr(logging, self.log_level.upper(), None)
        if not isinstance(level, int):
            raise ConfigError(f"--log_level must be debug, info, warning or error, got {self.log_level!r}")
        plain = logging.StreamHandler(sys.stderr)  # one line per record, as run.py logs (the host keeps lines)
        plain.setFormatter(logging.Formatter("%(levelname)s - %(message)s"))
        logging.getLogger().handlers = [plain]
        logging.getLogger().setLevel(level)
        _quiet_colmap()
        cfg = SplatterConfig(**{f.name: getattr(self, f.name) for f in dataclasses.fields(SplatterConfig)} | {"job_root_path": root})
        last = {"stage": "frames"}

        def emit(line: dict) -> None:
            last["stage"] = line.get("stage", last["stage"])
            print(json.dumps(line), flush=True)

        try:
            splatter(cfg, on_progress=emit)
        except SplatforgeError as exc:
            print(json.dumps({"stage": last["stage"], "status": "failed", "error": str(exc)}), flush=True)
            raise


@dataclass
class ServeCommand:
    """A job server: FastAPI on uvicorn, jobs in DATA_DIR/jobs.db (SQLite), one workspace per job
    in DATA_DIR/jobs/<id>/ (the splatter job-root layout), workers from generate's local executor.
    Refuses a non-loopback address without a token. API: see the README."""

    host: str = "127.0.0.1"
    port: int = 8000
    data_dir: Path = Path("splatforge-data")
    """Jobs database and workspaces."""
    token: Optional[str] = None
    """Bearer token the clients must send (default: --token-file, else $SPLATFORGE_TOKEN)."""
    token_file: Optional[Path] = None
    """File whose first line is the token."""
    max_upload_mb: float = 2048
    """Largest upload accepted (413 above)."""
    workers: Optional[int] = None
    """CPU worker processes when there is no GPU (default 1; with GPUs: slots by NVML)."""

    def main(self) -> None:
        import ipaddress
        import os

        import uvicorn

        from splatforge.server.app import ServerConfig, create_app

        token = self.token
        if token is None and self.token_file is not None:
            try:
                token = self.token_file.read_text().strip().splitlines()[0].strip()
            except (OSError, IndexError) as exc:
                raise ConfigError(f"{self.token_file}: cannot read a token: {exc}") from exc
        token = token or os.environ.get("SPLATFORGE_TOKEN") or None
        try:
            loopback = self.host == "localhost" or ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            loopback = False
        if not loopback and not token:
            raise ConfigError(f"refusing to listen on {self.host} without a token: give --token, --token-file or $SPLATFORGE_TOKEN")
        app = create_app(ServerConfig(self.data_dir, token, self.max_upload_mb, self.workers))
        STDERR.print(f"splatforge serve: http://{self.host}:{self.port}  (data: {self.data_dir}, token: {'yes' if token else 'none'})")
        uvicorn.run(app, host=self.host, port=self.port, log_level="info", access_log=False)


@dataclass
class SubmitCommand:
    """Submit a job to a splatforge server: a .zip of a job root (or the folder itself), or
    videos/photos. Prints the job as JSON; --wait shows a progress bar and downloads the
    artifacts into --output."""

    inputs: tyro.conf.Positional[list[Path]]
    """A job-root .zip or folder, or videos/photos."""
    server: str = "http://127.0.0.1:8000"
    token: Optional[str] = None
    """Bearer token (default: $SPLATFORGE_TOKEN)."""
    options: Optional[str] = None
    """Splatter options as JSON, e.g. '{"steps": 3000, "data_factor": 2}'."""
    idempotency_key: Optional[str] = None
    wait: bool = False
    """Wait for the job to end (progress bar), then download its artifacts."""
    output: Optional[Path] = None
    """Folder for the artifacts with --wait (default: ./<job id>)."""

    def main(self) -> None:
        import os

        from splatforge.server.client import Client

        try:
            options = json.loads(self.options) if self.options else None
        except ValueError as exc:
            raise ConfigError(f"--options is not JSON: {exc}") from exc
        with Client(self.server, self.token or os.environ.get("SPLATFORGE_TOKEN")) as client:
            job = client.submit(self.inputs, options, self.idempotency_key)
            STDERR.print(f"job {job['id']}: {job['status']}")
            if self.wait:
                columns = [TextColumn("[bold]{task.fields[stage]}"), BarColumn(), TextColumn("{task.percentage:>3.0f}%"),
                           TextColumn("{task.fields[detail]}"), TimeElapsedColumn()]  # fmt: skip
                with Progress(*columns, console=STDERR) as bar:
                    task = bar.add_task("job", total=100, stage="queued", detail="")

                    def update(j: dict) -> None:
                        p = j.get("progress") or {}
                        detail = f"step {p['step']}/{p.get('steps', p['step'])}" if "step" in p else j["status"]
                        bar.update(task, completed=p.get("pct", 0), stage=p.get("stage", j["status"]), detail=detail)

                    job = client.wait(job["id"], on_update=update)
                if job["status"] != "succeeded":
                    raise SplatforgeError(f"job {job['id']} {job['status']}: {job.get('error')}")
                folder = self.output or Path(job["id"])
                paths = client.download_all(job, folder)
                STDERR.print(f"{len(paths)} artifacts -> {folder}")
        print(json.dumps(job, indent=2))


@dataclass
class GenerateCommand(GenerateConfig):
    """Bulk dataset generation: every scene x split ratio through the stages, resumable."""

    dataset_root: Path = tyro.MISSING
    """The dataset folder."""
    output_dir: Path = tyro.MISSING
    """Outputs, logs/, summary.json, summary.md."""
    train_extra: tyro.conf.Suppress[dict] = field(default_factory=dict)

    def main(self) -> None:
        from splatforge.pipeline.board import JobBoard
        from splatforge.pipeline.generate import discover_scenes, generate, plan_jobs

        cfg = GenerateConfig(**{f.name: getattr(self, f.name) for f in dataclasses.fields(GenerateConfig)})
        if cfg.dry_run:
            print(json.dumps(generate(cfg), indent=2))
            return
        board = JobBoard(len(plan_jobs(cfg, discover_scenes(cfg))), console=STDERR)
        with board.live:
            summary = generate(cfg, on_event=board)
        STDERR.print(f"{summary['done']} done, {summary['failed']} failed of {summary['jobs']} jobs -> {cfg.output_dir / 'summary.md'}")
        print(json.dumps({k: v for k, v in summary.items() if k != "results"}, indent=2))
        if summary["failed"]:
            raise SystemExit(1)


@dataclass
class BlocksPlanCommand:
    """Cut a scene into a grid of blocks (CityGaussian V2's partition) and write blocks.json."""

    scene: tyro.conf.Positional[Path]
    """Scene folder (COLMAP with SfM points); never written to."""
    grid: str = "2x2"
    """Blocks along the ground plane's two axes, e.g. 2x2 or 2x1."""
    margin: float = 0.1
    """Each block's training box is enlarged by this fraction of its extent on every side."""
    content_threshold: float = 0.05
    """An image also belongs to a block when this fraction of the SfM points it sees lies in the
    block's enlarged box."""
    data_factor: int = 1
    coarse: Optional[Path] = None
    """A run trained on the whole scene (short is enough): membership by the share of each
    image its Gaussians in the block cover (CityGaussian V2), instead of the SfM points'."""
    output: Path = Path("blocks.json")

    def main(self) -> None:
        from splatforge.data import load_scene
        from splatforge.data.blocks import plan_blocks, write_plan
        from splatforge.pipeline.blocks import coarse_coverage

        try:
            grid = tuple(int(v) for v in self.grid.lower().split("x"))
            if len(grid) != 2:
                raise ValueError
        except ValueError as exc:
            raise ConfigError(f"--grid must look like 2x2, got {self.grid!r}") from exc
        scene = load_scene(self.scene, data_factor=self.data_factor, cache_dir=self.output.parent / ".blocks_cache")
        coverage = coarse_coverage(self.coarse, scene) if self.coarse is not None else None
        plan = plan_blocks(scene, grid, margin=self.margin, content_threshold=self.content_threshold, coverage=coverage)
        write_plan(plan, self.output)
        for b in plan["blocks"]:
            STDERR.print(f"block {b['id']}: {b['num_points']:,} points, {len(b['images'])} of {len(scene)} images")
        print(json.dumps({"plan": str(self.output), "blocks": len(plan["blocks"])}, indent=2))


@dataclass
class BlocksTrainCommand:
    """Train every block of a plan as an ordinary job (resumable; one failing block is reported
    alone) on the local pool or a Ray cluster."""

    plan: tyro.conf.Positional[Path]
    """blocks.json from splatforge blocks plan."""
    output: Path = Path("blocks")
    """Folder of the block runs (block_<id>_<ratio>/) and logs/."""
    executor: Literal["local", "ray"] = "local"
    workers: Optional[int] = None
    """Local CPU slots (default 1; GPUs are found by NVML)."""
    ray_address: Optional[str] = None
    steps: int = 3000
    """Steps per block."""
    data_factor: int = 1
    split_ratio: float = 0.875
    """Fraction of the scene's views for training (the same split in every block and the merge)."""
    strategy: Literal["default", "mcmc", "none"] = "mcmc"
    cap_max: int = 300_000
    seed: int = 0
    device: str = "cpu"

    def main(self) -> None:
        from splatforge.errors import TrainingProcessError
        from splatforge.pipeline.blocks import train_blocks

        results = train_blocks(self.plan, self.output, executor=self.executor, workers=self.workers,
                               ray_address=self.ray_address, ratio=self.split_ratio, steps=self.steps,
                               data_factor=self.data_factor, strategy=self.strategy, cap_max=self.cap_max,
                               seed=self.seed, device=self.device)  # fmt: skip
        print(json.dumps([{k: r.get(k) for k in ("job", "status", "error", "output")} for r in results], indent=2))
        failed = [r["job"] for r in results if r["status"] != "done"]
        if failed:
            raise TrainingProcessError(f"{len(failed)} of {len(results)} blocks failed: {', '.join(failed)} "
                                       f"(logs in {self.output / 'logs'}); rerun the same command to retry them")  # fmt: skip


@dataclass
class BlocksMergeCommand:
    """Merge the trained blocks into one run: each keeps the Gaussians inside its own box; then
    the normal products (renders, metrics.json)."""

    plan: tyro.conf.Positional[Path]
    blocks: Path = Path("blocks")
    """The folder splatforge blocks train wrote."""
    output: Path = tyro.MISSING
    """The merged run folder."""
    split_ratio: float = 0.875
    eval: bool = True
    device: str = "cpu"

    def main(self) -> None:
        from splatforge.pipeline.blocks import merge_blocks

        result = merge_blocks(self.plan, self.blocks, self.output, ratio=self.split_ratio, evaluate_run=self.eval,
                              device=self.device)  # fmt: skip
        metrics = result.pop("metrics", None)
        if metrics is not None:
            result.update(test_psnr=metrics["test"]["psnr"], test_ssim=metrics["test"]["ssim"])
        print(json.dumps(result, indent=2))


BLOCKS = {"plan": BlocksPlanCommand, "train": BlocksTrainCommand, "merge": BlocksMergeCommand}


@dataclass
class BlocksCommand:
    """Large scenes as blocks: splatforge blocks plan SCENE --grid 2x2, then blocks train PLAN,
    then blocks merge PLAN --output RUN (see each one's --help)."""

    def main(self) -> None:  # reached only through the listing: parse() dispatches "blocks ..."
        raise ConfigError("use splatforge blocks plan|train|merge")


@dataclass
class DepthPriorCommand:
    """Monocular depth priors for a scene: Depth Anything's relative inverse depth per image, fitted
    to the SfM points, in Inria's layout (OUTPUT/<image stem>.png, 16-bit, and
    OUTPUT/depth_params.json); train with --depth-prior OUTPUT."""

    scene: tyro.conf.Positional[Path]
    """Scene folder (COLMAP or transforms.json); never written to."""
    output: Path = tyro.MISSING
    """Folder for the maps and depth_params.json (replaced as a whole when it exists)."""
    model: str = "depth-anything/Depth-Anything-V2-Small-hf"
    """Hugging Face id or local folder of a Depth Anything model (Small: Apache-2.0; Base/Large:
    -Base-hf/-Large-hf, CC-BY-NC-4.0)."""
    data_factor: Optional[int] = None
    """Read images_<k> (default: images/, else the smallest images_<k> there is)."""
    device: str = "auto"
    """torch device for the model: auto, cpu or cuda[:i]."""

    def main(self) -> None:
        from splatforge.data import load_scene
        from splatforge.data.depth import make_depth_priors
        from splatforge.data.load import image_folders
        from splatforge.train.config import resolve_device

        factor = self.data_factor
        if factor is None:
            factor = min(image_folders(self.scene)[1] or {1: None})
        scene = load_scene(self.scene, data_factor=factor, test_every=0, cache_dir=self.output.parent / f".{self.output.name}.cache")
        with Progress(TextColumn("[bold]depth"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                      TimeElapsedColumn(), console=STDERR) as bar:  # fmt: skip
            task = bar.add_task("depth", total=len(scene))
            fits = make_depth_priors(scene, self.output, self.model, device=resolve_device(self.device),
                                     progress=lambda i, n: bar.update(task, completed=i))  # fmt: skip
        scales = [f.scale for f in fits.values() if f.scale > 0]
        print(json.dumps({"output": str(self.output), "images": len(fits), "fitted": len(scales),
                          "median_scale": float(sorted(scales)[len(scales) // 2]) if scales else None}, indent=2))  # fmt: skip


@dataclass
class MeshCommand(MeshConfig):
    """A coloured triangle mesh of a trained run: its rendered depth of the training views fused
    into a TSDF (Open3D), in the scene's own world frame and units. Writes the PLY, a JSON of the
    settings used and two pictures (<stem>_top.jpg, <stem>_angle.jpg) beside it."""

    run: tyro.conf.Positional[Path] = tyro.MISSING
    """Run folder written by `splatforge train`."""
    output: Optional[Path] = None
    """Mesh file (default RUN/exports/mesh.ply)."""
    pictures: bool = True
    """Picture the mesh (its vertices drawn by splatforge's rasterizer, shaded)."""
    device: Optional[str] = None
    """torch device (default: the run's, or cpu)."""

    def main(self) -> None:
        from splatforge.products.mesh import mesh_run
        from splatforge.train import Run

        run = Run.open(self.run, device=self.device)
        cfg = MeshConfig(**{f.name: getattr(self, f.name) for f in dataclasses.fields(MeshConfig)})
        with Progress(TextColumn("[bold]fuse"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                      TimeElapsedColumn(), console=STDERR) as bar:  # fmt: skip
            task = bar.add_task("fuse", total=None)
            info = mesh_run(run, self.output or run.path / "exports" / "mesh.ply", cfg, pictures=self.pictures,
                            progress=lambda i, n: bar.update(task, completed=i, total=n))  # fmt: skip
        print(json.dumps(info, indent=2))


@dataclass
class MeshEvalCommand:
    """Precision, recall and F-score of a mesh against a reference mesh or point cloud at distance
    TAU (Tanks and Temples' definition), written as JSON."""

    mesh: tyro.conf.Positional[Path]
    reference: tyro.conf.Positional[Path]
    tau: Optional[float] = None
    """Distance threshold in world units (default: 0.5 % of the diagonal of the reference's
    1st-99th percentile box)."""
    samples: int = 1_000_000
    """Points sampled uniformly on each mesh."""
    output: Optional[Path] = None
    """JSON file (default: MESH with the suffix .eval.json)."""

    def main(self) -> None:
        from splatforge._fs import atomic_path
        from splatforge.products.mesh import default_tau, mesh_metrics, read_geometry

        pts, ref = read_geometry(self.mesh, self.samples), read_geometry(self.reference, self.samples)
        tau = self.tau if self.tau is not None else default_tau(ref)
        result = {"mesh": str(self.mesh), "reference": str(self.reference), **mesh_metrics(pts, ref, tau),
                  "tau_rule": "given" if self.tau is not None else "0.005 x diagonal of the reference's 1-99 % box"}  # fmt: skip
        out = self.output or self.mesh.with_suffix(".eval.json")
        with atomic_path(out) as tmp:
            tmp.write_text(json.dumps(result, indent=2))
        print(json.dumps(result, indent=2))


@dataclass
class BackendsCommand:
    """List the rasterizer backends usable on this machine (never builds gsplat)."""

    def main(self) -> None:
        import torch

        from splatforge.raster import available_backends

        print("cpu tensors: ", ", ".join(available_backends("cpu")))
        print("cuda tensors:", ", ".join(available_backends("cuda")) if torch.cuda.is_available() else "no CUDA device")


COMMANDS = {"prepare": PrepareCommand, "train": TrainCommand, "render": RenderCommand, "eval": EvalCommand,
            "export": ExportCommand, "preview": PreviewCommand, "run": RunCommand, "view": ViewCommand,
            "generate": GenerateCommand, "splatter": SplatterCommand, "serve": ServeCommand, "submit": SubmitCommand,
            "demo": DemoCommand, "depth-prior": DepthPriorCommand,
            "mesh": MeshCommand, "mesh-eval": MeshEvalCommand,
            "blocks": BlocksCommand, "backends": BackendsCommand}  # fmt: skip


def parse(argv: list[str]):
    """The command object for ``argv`` (``[name, options...]``); exits with tyro's usage message
    on bad options, as any command line does."""
    if argv and argv[0] == "blocks":
        return tyro.extras.subcommand_cli_from_dict(BLOCKS, args=argv[1:], prog="splatforge blocks")
    if argv and argv[0] in COMMANDS:
        cls = COMMANDS[argv[0]]
        default = cls.defaults(argv[1:]) if hasattr(cls, "defaults") else None
        return tyro.cli(cls, args=argv[1:], default=default, prog=f"splatforge {argv[0]}")
    return tyro.extras.subcommand_cli_from_dict(COMMANDS, args=argv, prog="splatforge")


def main(argv: Optional[list[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", handlers=[RichHandler(console=STDERR, show_path=False)])
    logging.getLogger("numba").setLevel(logging.WARNING)
    try:
        command = parse(argv)
        if isinstance(command, TrainCommand):
            command.argv = argv[1:]
        command.main()
    except SplatforgeError as exc:
        print(f"error: {exc}", file=sys.stderr)  # one unwrapped line naming the file at fault
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
