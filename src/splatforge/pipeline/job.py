"""One dataset job: a (scene, split ratio) pair run through its stages into one output folder.

Stages (each usable alone; ``stage_order`` is the order they run in):

=============== ==============================================================================
postprocess     ``partition.json``, ``cam_extrinsics.npy``, ``cam_intrinsics.npy``, ``frames.json``
                (see :mod:`splatforge.products.metadata`), without training
depth_prior     ``depth_prior/<stem>.png`` + ``depth_params.json``: Depth Anything (``extra``'s
                ``depth_model``, default V2 Small) fitted to the SfM points; training then
                supervises its inverse depth with it
train           ``point_cloud/iteration_N/point_cloud.ply``, ``cameras.json``, ``checkpoints/``,
                ``cfg.yml`` (resumes from its own checkpoints when a run was killed)
render          ``{train,test}/ours_N/{renders,gt}/NNNNN.png`` + ``metrics.json``
visibility      ``{train,test}/ours_N/visibility_mask_global_2ndpick_th0.5/frame_XXXXX.png`` + scores
depth           ``{train,test}/ours_N/depth/NNNNN.npy`` (float32 camera z) + ``NNNNN.png`` preview
mesh            ``exports/mesh.ply`` + ``exports/mesh.json``: TSDF fusion of the training views
                (:mod:`splatforge.products.mesh`, its defaults)
partition_fix   checks ``partition.json`` against ``cam_extrinsics.npy``; rewrites it, or removes
                the output when it cannot be recovered
clean           removes the output folder
=============== ==============================================================================

Each stage's hash covers the scene's input files, the job options it depends on and the hashes
of the stages it reads from, so a changed option reruns exactly the stages it affects. Executors
run it as a ``dataset_job`` spec (:mod:`splatforge.pipeline.executors`);
``python -m splatforge.pipeline.job SPEC.json RESULT.json`` runs one spec by hand.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import shutil
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from splatforge._fs import atomic_path
from splatforge.pipeline.engine import Stage, StageContext, StageRunner
from splatforge.pipeline.events import EventSink
from splatforge.pipeline.manifest import stage_hash

log = logging.getLogger(__name__)

__all__ = ["STAGES", "JobContext", "JobSpec", "run_job", "scene_fingerprint", "train_config"]

STAGES = ("postprocess", "depth_prior", "train", "render", "visibility", "depth", "mesh", "partition_fix", "clean")
#: which upstream stages each stage reads (its hash includes theirs; train includes depth_prior's
#: only when the job has that stage, so the hashes of jobs without it are those of before)
DEPENDS = {
    "postprocess": (),
    "depth_prior": ("postprocess",),
    "train": ("postprocess",),
    "render": ("train",),
    "visibility": ("train",),
    "depth": ("train",),
    "mesh": ("train",),
    "partition_fix": ("postprocess",),
    "clean": (),
}


@dataclass
class JobSpec:
    """Everything one job needs (JSON-serialisable: it crosses process and machine boundaries)."""

    scene: str
    """Scene name (the output folder is ``<output_dir>/<subset>/<scene>_<ratio>``)."""
    scene_root: str
    output_dir: str
    ratio: float
    stages: list[str]
    subset: str = ""
    data_factor: int = 1
    steps: int = 3000
    """Training steps, strategy and cap: resolved from the preset when the job is planned."""
    strategy: str = "mcmc"
    cap_max: int = 300_000
    seed: int = 0
    backend: str = "auto"
    device: str = "cpu"
    sh_degree: int = 3
    threshold: float = 0.5
    skip_existing: bool = True
    cache_dir: str | None = None
    extra: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        return f"{self.scene}_{self.ratio:g}"

    @property
    def out(self) -> Path:
        return Path(self.output_dir) / self.subset / self.name if self.subset else Path(self.output_dir) / self.name


def scene_fingerprint(root: Path, data_factor: int) -> dict:
    """Names, sizes and mtimes of the files a scene is read from (poses and images)."""
    root = Path(root)
    files = []
    for rel in ("transforms.json", "sparse/0", "sparse", f"images_{data_factor}" if data_factor > 1 else "images"):
        p = root / rel
        if p.is_file():
            files.append((rel, p.stat().st_size, int(p.stat().st_mtime)))
        elif p.is_dir():
            for q in sorted(p.iterdir()):
                if q.is_file():
                    files.append((f"{rel}/{q.name}", q.stat().st_size, int(q.stat().st_mtime)))
    return {"root": str(root.resolve()), "files": files}


def _load_scene(spec: JobSpec):
    from splatforge.data.load import load_scene

    return load_scene(
        Path(spec.scene_root),
        data_factor=spec.data_factor,
        split_ratio=spec.ratio,
        cache_dir=Path(spec.cache_dir) if spec.cache_dir else spec.out / "cache",
    )


def train_config(spec: JobSpec):
    """The job's :class:`~splatforge.train.TrainConfig`: the scene at the dataset's own data
    factor (products and metadata share its resolution, so no ``max_image_size``), the split of
    the job's ratio, the steps, strategy and cap resolved from the preset when the job was
    planned (schedules scale with the steps), ``extra`` fields on top."""
    from splatforge.train import DensifyConfig
    from splatforge.train.presets import preset_train_config

    extra = dict(spec.extra)
    if isinstance(extra.get("densify"), dict):  # TrainFeatures.changed() of the plan
        extra["densify"] = DensifyConfig(**extra["densify"])
    if "depth_prior" in spec.stages:
        extra["depth_prior"] = str(spec.out / "depth_prior")
    return preset_train_config(
        "default",  # every value a preset sets is given: steps, strategy and cap from the plan, no size limit
        data=Path(spec.scene_root),
        output=spec.out,
        data_factor=spec.data_factor,
        max_image_size=0,
        steps=spec.steps,
        split_ratio=spec.ratio,
        backend=spec.backend,
        device=spec.device,
        seed=spec.seed,
        sh_degree=spec.sh_degree,
        strategy=spec.strategy,
        max_gaussians=spec.cap_max,
        checkpoint_every=max(100, spec.steps // 5),
        cache_dir=Path(spec.cache_dir) if spec.cache_dir else None,
        **extra,
    )


class JobContext:
    """What a job's stages share: the spec, the stage engine's context of the running stage and
    the trained run, opened once (:meth:`run`) for all the stages that read it."""

    def __init__(self, spec: JobSpec):
        self.spec = spec
        self.stage: StageContext | None = None

    def run(self):
        """The job's :class:`~splatforge.train.Run` (opened on first use, or the one training
        just produced)."""
        from splatforge.pipeline.stages import open_run

        return open_run(self.stage, self.spec.out)


def _stage_postprocess(ctx: JobContext) -> tuple[list[Path], dict]:
    from splatforge.products.metadata import write_metadata

    scene = _load_scene(ctx.spec)
    return write_metadata(ctx.spec.out, scene), {"num_frames": len(scene)}


def _stage_train(ctx: JobContext) -> tuple[list[Path], dict]:
    from splatforge.pipeline.stages import train_stage

    outputs, info = train_stage(ctx.stage, train_config(ctx.spec), plan=False)
    if info["resumed_from"] is not None:
        log.info("%s: resumed training at step %d", ctx.spec.name, info["resumed_from"])
    keys = ("num_gaussians", "train_seconds", "step", "train_psnr")
    return outputs, {k: info[k] for k in keys}


def _stage_render(ctx: JobContext) -> tuple[list[Path], dict]:
    from splatforge.products import evaluate
    from splatforge.products.renders import split_folder

    run = ctx.run()
    metrics = evaluate(run)
    outputs = [ctx.spec.out / "metrics.json"]
    for split in ("train", "test"):
        folder = split_folder(run, split)
        outputs += sorted((folder / "renders").glob("*.png")) + sorted((folder / "gt").glob("*.png"))
    summary = {f"{s}_{k}": metrics[s][k] for s in ("test", "train") for k in ("psnr", "ssim", "lpips")}
    return outputs, summary


def _stage_visibility(ctx: JobContext) -> tuple[list[Path], dict]:
    from splatforge.products.visibility import visibility_products

    return visibility_products(ctx.run(), ctx.spec.threshold)


def _stage_depth(ctx: JobContext) -> tuple[list[Path], dict]:
    from splatforge.products.renders import render_depth_split

    run = ctx.run()
    return [p for split in ("train", "test") for p in render_depth_split(run, split)], {}


def _stage_depth_prior(ctx: JobContext) -> tuple[list[Path], dict]:
    from splatforge.data.depth import DEFAULT_DEPTH_MODEL, make_depth_priors

    spec = ctx.spec
    model = spec.extra.get("depth_model", DEFAULT_DEPTH_MODEL)
    fits = make_depth_priors(_load_scene(spec), spec.out / "depth_prior", model, device=spec.device)
    return [spec.out / "depth_prior" / "depth_params.json"], {
        "depth_prior_fitted": sum(f.scale > 0 for f in fits.values())
    }


def _stage_mesh(ctx: JobContext) -> tuple[list[Path], dict]:
    from splatforge.products.mesh import mesh_run

    out = ctx.spec.out / "exports" / "mesh.ply"
    info = mesh_run(ctx.run(), out, pictures=False)
    return [out, out.with_suffix(".json")], {"mesh_triangles": info["triangles"]}


def _stage_partition_fix(ctx: JobContext) -> tuple[list[Path], dict]:
    from splatforge.products.metadata import fix_partition

    spec = ctx.spec
    verdict = fix_partition(spec.out, _load_scene(spec).split)
    log.info("%s: partition_fix: %s", spec.name, verdict)
    return ([spec.out / "partition.json"] if spec.out.exists() else []), {"verdict": verdict}


STAGE_FNS: dict[str, Callable[[JobContext], tuple[list[Path], dict]]] = {
    "postprocess": _stage_postprocess,
    "train": _stage_train,
    "render": _stage_render,
    "visibility": _stage_visibility,
    "depth": _stage_depth,
    "partition_fix": _stage_partition_fix,
    "depth_prior": _stage_depth_prior,
    "mesh": _stage_mesh,
}


def stage_digests(spec: JobSpec) -> dict[str, str]:
    """Hash of every stage for this spec (see the module docstring)."""
    fp = scene_fingerprint(Path(spec.scene_root), spec.data_factor)
    own = {
        "postprocess": {"ratio": spec.ratio, "data_factor": spec.data_factor},
        "train": {
            "steps": spec.steps,
            "strategy": spec.strategy,
            "cap_max": spec.cap_max,
            "seed": spec.seed,
            "sh_degree": spec.sh_degree,
            "extra": spec.extra,
        },
        "render": {},
        "visibility": {"threshold": spec.threshold},
        "depth": {},
        "partition_fix": {},
        "clean": {},
        "depth_prior": {"model": spec.extra.get("depth_model")},
        "mesh": {},
    }
    digests: dict[str, str] = {}
    for stage in STAGES:
        deps = [digests[d] for d in DEPENDS[stage]]
        if stage == "train" and "depth_prior" in spec.stages:
            deps.append(digests["depth_prior"])
        digests[stage] = stage_hash(stage, own[stage], fp if stage == "postprocess" else None, deps)
    return digests


def stage_order(stages: list[str]) -> list[str]:
    """The requested stages in pipeline order, with ``postprocess`` added before any stage that
    reads the metadata or the training outputs (it is cheap and they depend on its split)."""
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        from splatforge.errors import ConfigError

        raise ConfigError(f"unknown stage(s) {unknown}; known: {', '.join(STAGES)}")
    wanted = set(stages)
    if wanted & {"depth_prior", "train", "render", "visibility", "depth", "mesh", "partition_fix"}:
        wanted.add("postprocess")
    if wanted & {"render", "visibility", "depth", "mesh"}:
        wanted.add("train")
    return [s for s in STAGES if s in wanted]


def run_job(spec: JobSpec, emit: EventSink | None = None) -> dict:
    """Run ``spec``'s stages on the stage engine (:mod:`splatforge.pipeline.engine`); returns
    ``{"job", "status", "stages": {name: "done"|"skipped"|"failed"}, "error", ...}``. A failing
    stage stops this job (later stages are not run) and is recorded with its error line; it never
    raises, so one scene cannot stop the others."""
    out = spec.out
    result: dict = {
        "job": spec.name,
        "scene": spec.scene,
        "ratio": spec.ratio,
        "output": str(out),
        "status": "done",
        "stages": {},
        "error": None,
        "info": {},
    }
    order = stage_order(spec.stages)
    if order == ["clean"]:
        shutil.rmtree(out, ignore_errors=True)
        result["stages"]["clean"] = "done"
        return result
    runner = StageRunner(out, emit, skip_fresh=spec.skip_existing)
    job = JobContext(spec)
    digests = stage_digests(spec)

    def call(fn, stage_ctx: StageContext) -> tuple[list[Path], dict]:
        job.stage = stage_ctx
        return fn(job)

    for stage in order:
        if stage == "clean":
            shutil.rmtree(out, ignore_errors=True)
            result["stages"]["clean"] = "done"
            break
        try:
            outcome = runner.run(Stage(stage, functools.partial(call, STAGE_FNS[stage]), digests[stage]))
        except Exception as exc:  # noqa: BLE001 - the job boundary: record the failure, never stop other jobs
            line = f"{type(exc).__name__}: {exc}".splitlines()[0]
            log.error("%s: stage %s failed: %s\n%s", spec.name, stage, line, traceback.format_exc())
            result.update(status="failed", error=f"{stage}: {line}")
            result["stages"][stage] = "failed"
            break
        result["info"].update(outcome.info)
        if stage == "partition_fix" and outcome.info.get("verdict", "").startswith("removed"):
            result["stages"][stage] = outcome.info["verdict"]
            break
        result["stages"][stage] = outcome.status
    return result


def main(argv: list[str] | None = None) -> int:
    """Subprocess entry: ``python -m splatforge.pipeline.job SPEC.json RESULT.json``."""
    argv = sys.argv[1:] if argv is None else argv
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("numba").setLevel(logging.WARNING)
    threads = os.environ.get("SPLATFORGE_THREADS")
    if threads:
        import torch

        torch.set_num_threads(int(threads))
    spec = JobSpec(**json.loads(Path(argv[0]).read_text()))
    result = run_job(spec)
    with atomic_path(Path(argv[1])) as tmp:
        tmp.write_text(json.dumps(result, indent=1))
    return 0 if result["status"] == "done" else 1


if __name__ == "__main__":
    sys.exit(main())
