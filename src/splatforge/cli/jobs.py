"""``prepare``, ``run``, ``splatter``, ``generate`` and ``blocks``: the pipelines."""

from __future__ import annotations

import dataclasses
import json
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Literal

import tyro

from splatforge.cli.common import STDERR, quiet_colmap
from splatforge.errors import ConfigError, SplatforgeError
from splatforge.pipeline.generate import GenerateConfig
from splatforge.pipeline.prepare import PrepareConfig
from splatforge.pipeline.run import RunConfig
from splatforge.pipeline.splatter import SplatterConfig

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

        quiet_colmap()
        cfg = PrepareConfig(**{f.name: getattr(self, f.name) for f in dataclasses.fields(PrepareConfig)})
        with STDERR.status("prepare") as status:
            summary = prepare(cfg, on_phase=lambda name: status.update(f"prepare: {name}"))
        decoded = (
            sum(v["decoded"] for v in summary["videos"])
            + summary["photos"]["imported"]
            + len(summary["photos"]["skipped"])
        )
        STDERR.print(
            f"{summary['num_images']} frames kept of {decoded}, {summary['num_registered']} registered "
            f"({100 * summary['registered_fraction']:.0f} %), mean reprojection error "
            f"{summary['mean_reprojection_error_px']:.2f} px"
        )
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
        from splatforge.cli.progress import RichProgress
        from splatforge.pipeline.run import run_pipeline

        cfg = RunConfig(**{f.name: getattr(self, f.name) for f in dataclasses.fields(RunConfig)})
        quiet_colmap()
        with RichProgress(STDERR) as show:
            summary = run_pipeline(cfg, emit=show)
        print(json.dumps(summary, indent=2))


@dataclass
class SplatterCommand(SplatterConfig):
    """A drop-in for splatter-server's compute-node pipeline (run.py): a job root's videos and
    COLMAP model -> ROOT/Frames, ROOT/refined/splatter/{splat.ply, splat_rot.ply, splat_rot.splat,
    splat_rot.sog, preview_top.jpg, preview_angle.jpg, preview.mp4, result.json}. Progress as JSON
    lines on stdout ({"pct", "stage", "status", ...}); logs on stderr; exit 0 on success, 1 with
    one last "error: ..." line otherwise. run.py's own flags (--job_root_path, --domain_id,
    --job_id, --log_level) are taken as they are; `splatforge splatter ROOT` works too."""

    root: tyro.conf.Positional[Path | None] = None
    """The job root (instead of --job_root_path)."""
    job_root_path: Annotated[Path | None, tyro.conf.arg(aliases=("--job_root_path",))] = None  # type: ignore
    """The job root: datasets/<dataset>/Frames.mp4 and refined/global/refined_sfm_combined/*.bin."""
    domain_id: Annotated[str, tyro.conf.arg(aliases=("--domain_id",))] = "00000000-0000-0000-0000-000000000000"
    job_id: Annotated[str, tyro.conf.arg(aliases=("--job_id",))] = "00000000-0000-0000-0000-000000000000"
    log_level: Annotated[str, tyro.conf.arg(aliases=("--log_level",))] = "info"
    max_gaussians: Annotated[int | None, tyro.conf.arg(aliases=("--max_gaussians",))] = None
    """Most Gaussians (default: the preset's)."""
    data_factor: Annotated[int | None, tyro.conf.arg(aliases=("--data_factor",))] = None
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
        quiet_colmap()
        cfg = SplatterConfig(
            **{f.name: getattr(self, f.name) for f in dataclasses.fields(SplatterConfig)} | {"job_root_path": root}
        )
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
            summary = generate(cfg, on_event=board, on_progress=board.progress)
        STDERR.print(
            f"{summary['done']} done, {summary['failed']} failed of {summary['jobs']} jobs "
            f"-> {cfg.output_dir / 'summary.md'}"
        )
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
    coarse: Path | None = None
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
    workers: int | None = None
    """Local CPU slots (default 1; GPUs are found by NVML)."""
    ray_address: str | None = None
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

        results = train_blocks(
            self.plan,
            self.output,
            executor=self.executor,
            workers=self.workers,
            ray_address=self.ray_address,
            ratio=self.split_ratio,
            steps=self.steps,
            data_factor=self.data_factor,
            strategy=self.strategy,
            cap_max=self.cap_max,
            seed=self.seed,
            device=self.device,
        )
        print(json.dumps([{k: r.get(k) for k in ("job", "status", "error", "output")} for r in results], indent=2))
        failed = [r["job"] for r in results if r["status"] != "done"]
        if failed:
            raise TrainingProcessError(
                f"{len(failed)} of {len(results)} blocks failed: {', '.join(failed)} "
                f"(logs in {self.output / 'logs'}); rerun the same command to retry them"
            )


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

        result = merge_blocks(
            self.plan, self.blocks, self.output, ratio=self.split_ratio, evaluate_run=self.eval, device=self.device
        )
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
