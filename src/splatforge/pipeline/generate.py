"""Bulk dataset generation: many scenes x split ratios, each a resumable job (see
:mod:`splatforge.pipeline.job`), run by an executor of :mod:`splatforge.pipeline.executors`: the
local pool of subprocesses (GPUs picked through NVML, else CPU workers) or Ray.

Dataset layouts (``--dataset``):

- ``dl3dv``: ``<root>/<subset>/<scene>/`` with ``images_4/`` and ``transforms.json`` (and maybe
  ``sparse/``); read at data factor 4.
- ``mipnerf360``: ``<root>/<scene>/`` with ``sparse/0`` and ``images_4/`` (or ``images_2/``);
  read at factor 4 (2 when only ``images_2`` exists).
- ``auto``: every folder under ``<root>`` (or ``<root>/<subset>``) that a reader detects, at
  ``--data-factor``.

Every scene is checked before any job starts; unready scenes are listed with the reason and
skipped. ``O/summary.json`` and ``O/summary.md`` report each (scene, ratio): status, stages,
metrics, Gaussian count, times and the error line of a failure. Each job logs to
``O/logs/<scene>_<ratio>.log``.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from splatforge._fs import atomic_path
from splatforge.errors import ConfigError, DataFormatError
from splatforge.pipeline.executors import (  # re-exported: they were defined here
    LocalExecutor,
    RayExecutor,
    Slot,
    cpu_slots,
    gpu_slots,
    local_slots,
    slot_env,
    visible_gpu_entries,
)
from splatforge.pipeline.job import JobSpec, stage_order
from splatforge.train.config import TrainFeatures

log = logging.getLogger(__name__)

__all__ = [
    "GenerateConfig",
    "LocalExecutor",
    "RayExecutor",
    "Slot",
    "cpu_slots",
    "discover_scenes",
    "generate",
    "gpu_slots",
    "local_slots",
    "plan_jobs",
    "slot_env",
    "visible_gpu_entries",
]


@dataclass
class GenerateConfig(TrainFeatures):
    dataset_root: Path
    output_dir: Path
    dataset: Literal["dl3dv", "mipnerf360", "auto"] = "auto"
    subset: list[str] = field(default_factory=list)
    split_ratio: list[float] = field(default_factory=lambda: [0.1, 0.3])
    stages: list[str] = field(default_factory=lambda: ["train", "render", "visibility", "depth"])
    preset: Literal["auto", "fast", "default", "quality"] = "auto"
    """Training preset (:mod:`splatforge.train.presets`) for the steps, strategy and cap (auto:
    default on GPUs, fast on CPUs). The resolution is the dataset's own (``data_factor``)."""
    steps: int | None = None
    """Training steps (default: the preset's)."""
    data_factor: int = 1
    """Image downscale factor for ``auto`` (dl3dv uses 4, mipnerf360 4 or 2)."""
    strategy: Literal["default", "mcmc"] | None = None
    """Densification strategy (default: the preset's, mcmc)."""
    cap_max: int | None = None
    """Most Gaussians per scene (default: the preset's)."""
    seed: int = 0
    backend: Literal["auto", "cpu", "gsplat", "reference"] = "auto"
    skip_existing: bool = True
    cut_start: int = 0
    """Process scenes [cut_start, cut_end) of the sorted scene list (kept for compatibility with
    per-server slicing; a Ray cluster makes it unnecessary)."""
    cut_end: int | None = None
    max_workers: int = 0
    """Most jobs at once: 0 = one per GPU slot, or 1 without GPUs."""
    excluded_gpus: list[int] = field(default_factory=list)
    jobs_per_gpu: str = "1"
    """An integer, or ``auto``: as many as fit in free GPU memory at ~6 GiB per job (at most 4)."""
    executor: Literal["local", "ray"] = "local"
    ray_address: str | None = None
    dry_run: bool = False
    train_extra: dict = field(default_factory=dict)
    """Further :class:`~splatforge.train.TrainConfig` fields for every job (part of the train hash)."""


@dataclass
class SceneEntry:
    name: str
    root: Path
    subset: str
    data_factor: int
    ready: bool
    reason: str = ""


def _check_scene(root: Path, data_factor: int) -> str:
    """Empty string when the scene can be read, else why not (no image is decoded here)."""
    from splatforge.data.load import detect_format

    try:
        fmt = detect_format(root)
    except DataFormatError as exc:
        return str(exc)
    folder = root / (f"images_{data_factor}" if data_factor > 1 else "images")
    if fmt == "colmap" and not folder.is_dir() and not (root / "images").is_dir():
        return f"{folder}: missing (and no images/ to downscale from)"
    if fmt == "colmap":
        from splatforge.data.colmap import find_sparse_dir

        sparse = find_sparse_dir(root)
        for name in ("cameras", "images", "points3D"):
            if not any((sparse / f"{name}.{ext}").is_file() for ext in ("bin", "txt")):
                return f"{sparse}: no {name}.bin/.txt"
        from splatforge.data.colmap import load_reconstruction, validate_reconstruction

        try:
            rec = load_reconstruction(sparse)
            validate_reconstruction(rec, sparse)
        except DataFormatError as exc:
            return str(exc)
        if rec.num_reg_images() == 0:
            return f"{sparse}: the model has no registered image"
    return ""


def discover_scenes(cfg: GenerateConfig) -> list[SceneEntry]:
    """Scenes of ``cfg.dataset`` under ``cfg.dataset_root``, sorted by (subset, name), each
    checked for readiness.

    Raises:
        DataFormatError: the root does not exist.
    """
    root = Path(cfg.dataset_root)
    if not root.is_dir():
        raise DataFormatError(f"{root}: dataset root not found")
    subsets = cfg.subset or ([""] if cfg.dataset != "dl3dv" else sorted(p.name for p in root.iterdir() if p.is_dir()))
    entries = []
    for subset in subsets:
        base = root / subset if subset else root
        if not base.is_dir():
            raise DataFormatError(f"{base}: subset folder not found")
        for scene in sorted(p for p in base.iterdir() if p.is_dir() and not p.name.startswith(".")):
            if cfg.dataset == "dl3dv":
                factor = 4
            elif cfg.dataset == "mipnerf360":
                factor = 4 if (scene / "images_4").is_dir() or not (scene / "images_2").is_dir() else 2
            else:
                factor = cfg.data_factor
            reason = _check_scene(scene, factor)
            entries.append(SceneEntry(scene.name, scene, subset, factor, not reason, reason))
    return entries


def plan_jobs(cfg: GenerateConfig, scenes: list[SceneEntry], device: str = "cpu") -> list[JobSpec]:
    """One job per ready scene in the cut and split ratio; steps, strategy and cap resolved from
    the preset for ``device`` ("cuda" when the jobs get GPUs) and the explicit options.

    Raises:
        ConfigError: unknown stages or preset, a ratio outside (0, 1).
    """
    from splatforge.train.presets import resolve_preset

    stage_order(cfg.stages)  # validates stage names
    preset = resolve_preset(cfg.preset, device)
    steps = cfg.steps if cfg.steps is not None else preset.steps
    strategy = cfg.strategy if cfg.strategy is not None else preset.strategy
    cap = cfg.cap_max if cfg.cap_max is not None else preset.max_gaussians
    for r in cfg.split_ratio:
        if not 0.0 < r < 1.0:
            raise ConfigError(f"split ratio must be in (0, 1), got {r}")
    ready = [s for s in scenes if s.ready][cfg.cut_start : cfg.cut_end]
    out = Path(cfg.output_dir)
    return [
        JobSpec(
            scene=s.name,
            scene_root=str(s.root),
            output_dir=str(out),
            ratio=r,
            stages=list(cfg.stages),
            subset=s.subset,
            data_factor=s.data_factor,
            steps=steps,
            strategy=strategy,
            cap_max=cap,
            seed=cfg.seed,
            backend=cfg.backend,
            skip_existing=cfg.skip_existing,
            cache_dir=str(out / ".cache" / f"{s.subset + '_' if s.subset else ''}{s.name}_f{s.data_factor}"),
            extra={**cfg.train_extra, **cfg.changed()},
        )
        for s in ready
        for r in cfg.split_ratio
    ]


# ------------------------------------------------------------------------------------- summary


def write_summary(out: Path, results: list[dict], unready: list[SceneEntry], seconds: float) -> dict:
    """``O/summary.json`` and ``O/summary.md``."""
    rows = sorted(results, key=lambda r: (r["scene"], r["ratio"]))
    summary = {
        "jobs": len(rows),
        "done": sum(r["status"] == "done" for r in rows),
        "failed": sum(r["status"] == "failed" for r in rows),
        "seconds": round(seconds, 1),
        "unready": [{"scene": s.name, "subset": s.subset, "reason": s.reason} for s in unready],
        "results": rows,
    }
    with atomic_path(out / "summary.json") as tmp:
        tmp.write_text(json.dumps(summary, indent=1, default=str))
    lines = [
        (
            f"# splatforge generate: {summary['done']} done, {summary['failed']} failed of {summary['jobs']} jobs "
            f"({seconds / 60:.1f} min)"
        ),
        "",
        "| scene | ratio | status | test PSNR | test SSIM | Gaussians | stages | error |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        info = r.get("info", {})
        psnr = info.get("test_psnr")
        ssim = info.get("test_ssim")
        stages = ", ".join(f"{k}:{v}" for k, v in r.get("stages", {}).items())
        lines.append(
            f"| {r['scene']} | {r['ratio']:g} | {r['status']} | {psnr if psnr is None else f'{psnr:.2f}'} | "
            f"{ssim if ssim is None else f'{ssim:.3f}'} | {info.get('num_gaussians', '')} | {stages} | "
            f"{r.get('error') or ''} |"
        )
    if unready:
        lines += ["", "## Not ready", ""] + [
            f"- {s.subset + '/' if s.subset else ''}{s.name}: {s.reason}" for s in unready
        ]
    with atomic_path(out / "summary.md") as tmp:
        tmp.write_text("\n".join(lines) + "\n")
    return summary


def generate(cfg: GenerateConfig, on_event: Callable | None = None, on_progress: Callable | None = None) -> dict:
    """Plan and run every job; returns the summary (also in ``O/summary.json``). With
    ``cfg.dry_run`` nothing is written: the plan is returned as ``{"jobs": [...], "unready": [...]}``.

    Raises:
        DataFormatError / ConfigError: a missing root or bad options (before any job starts).
    """
    scenes = discover_scenes(cfg)
    unready = [s for s in scenes if not s.ready]
    for s in unready:
        log.warning("not ready: %s: %s", s.name, s.reason)
    slots = gpu_slots(cfg.excluded_gpus, cfg.jobs_per_gpu)
    jobs = plan_jobs(cfg, scenes, device="cuda" if slots else "cpu")
    if cfg.dry_run:
        return {
            "jobs": [
                {
                    "job": j.name,
                    "scene": j.scene,
                    "subset": j.subset,
                    "ratio": j.ratio,
                    "output": str(j.out),
                    "stages": stage_order(j.stages),
                }
                for j in jobs
            ],
            "unready": [{"scene": s.name, "reason": s.reason} for s in unready],
        }
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    if cfg.executor == "ray":
        executor = RayExecutor(
            cfg.ray_address,
            num_gpus=(1.0 / int(cfg.jobs_per_gpu) if cfg.jobs_per_gpu != "auto" else 0.5) if slots else 0.0,
            logs=out / "logs",
        )
    else:
        slots = slots or cpu_slots(cfg.max_workers or 1)
        if cfg.max_workers:
            slots = slots[: cfg.max_workers]
        executor = LocalExecutor(slots, out / "logs")  # type: ignore[assignment]
    try:
        results = executor.run(jobs, on_event, on_progress)
    finally:
        executor.close()
    return write_summary(out, results, unready, time.perf_counter() - t)
