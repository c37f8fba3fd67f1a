"""Bulk dataset generation: many scenes x split ratios, each a resumable job (see
:mod:`splatforge.pipeline.job`), run by a local pool of subprocesses (GPUs picked through NVML,
else CPU workers) or by Ray.

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
import os
import subprocess
import sys
import time
from collections import deque
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Literal, Optional

from splatforge._fs import atomic_path
from splatforge.train.config import TrainFeatures
from splatforge.errors import ConfigError, DataFormatError
from splatforge.pipeline.job import JobSpec, run_job, stage_order

log = logging.getLogger(__name__)

__all__ = ["GenerateConfig", "discover_scenes", "plan_jobs", "generate", "Slot", "gpu_slots", "visible_gpu_entries",
           "cpu_slots", "local_slots", "slot_env", "LocalExecutor", "RayExecutor"]


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
    steps: Optional[int] = None
    """Training steps (default: the preset's)."""
    data_factor: int = 1
    """Image downscale factor for ``auto`` (dl3dv uses 4, mipnerf360 4 or 2)."""
    strategy: Optional[Literal["default", "mcmc"]] = None
    """Densification strategy (default: the preset's, mcmc)."""
    cap_max: Optional[int] = None
    """Most Gaussians per scene (default: the preset's)."""
    seed: int = 0
    backend: Literal["auto", "cpu", "gsplat", "reference"] = "auto"
    skip_existing: bool = True
    cut_start: int = 0
    """Process scenes [cut_start, cut_end) of the sorted scene list (kept for compatibility with
    per-server slicing; a Ray cluster makes it unnecessary)."""
    cut_end: Optional[int] = None
    max_workers: int = 0
    """Most jobs at once: 0 = one per GPU slot, or 1 without GPUs."""
    excluded_gpus: list[int] = field(default_factory=list)
    jobs_per_gpu: str = "1"
    """An integer, or ``auto``: as many as fit in free GPU memory at ~6 GiB per job (at most 4)."""
    executor: Literal["local", "ray"] = "local"
    ray_address: Optional[str] = None
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
        JobSpec(scene=s.name, scene_root=str(s.root), output_dir=str(out), ratio=r, stages=list(cfg.stages),
                subset=s.subset, data_factor=s.data_factor, steps=steps, strategy=strategy, cap_max=cap,
                seed=cfg.seed, backend=cfg.backend, skip_existing=cfg.skip_existing,
                cache_dir=str(out / ".cache" / f"{s.subset + '_' if s.subset else ''}{s.name}_f{s.data_factor}"),
                extra={**cfg.train_extra, **cfg.changed()})  # fmt: skip
        for s in ready
        for r in cfg.split_ratio
    ]


# ------------------------------------------------------------------------------------ devices


@dataclass
class Slot:
    """Where a job runs: ``gpu`` index (``CUDA_VISIBLE_DEVICES``) or None for CPU."""

    label: str
    gpu: Optional[int] = None
    threads: int = 1


def visible_gpu_entries() -> Optional[list[str]]:
    """The entries of this process's ``CUDA_VISIBLE_DEVICES`` the CUDA runtime would use, or
    None when it is unset (every GPU visible). As CUDA does, the list ends at the first empty or
    negative entry, so ``""`` and ``"-1"`` hide every GPU."""
    value = os.environ.get("CUDA_VISIBLE_DEVICES")
    if value is None:
        return None
    entries = []
    for entry in (e.strip() for e in value.split(",")):
        if not entry or entry.startswith("-"):
            break
        entries.append(entry)
    return entries


def _is_visible(index: int, uuid: str, entries: Optional[list[str]]) -> bool:
    """Whether NVML's GPU ``index`` (with ``uuid``, ``GPU-...``) is among ``entries``: an index
    (NVML's numbering, i.e. PCI bus order, as with ``CUDA_DEVICE_ORDER=PCI_BUS_ID``) or a UUID or
    a prefix of one, as CUDA takes them."""
    if entries is None:
        return True
    return any(e == str(index) or (e.startswith("GPU-") and uuid.startswith(e)) for e in entries)


def gpu_slots(excluded: list[int], jobs_per_gpu: str, gib_per_job: float = 6.0) -> list[Slot]:
    """Job slots on the NVIDIA GPUs NVML reports (nvidia-ml-py) and ``CUDA_VISIBLE_DEVICES``
    lets this process use (indices in NVML's numbering, or UUIDs; unset: all, ``""``/``-1``:
    none), minus ``excluded`` (NVML indices); most free memory and least load first; ``[]``
    without NVML or GPUs."""
    try:
        import pynvml
    except ImportError:
        return []
    entries = visible_gpu_entries()
    if entries == []:
        return []
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        return []
    try:
        gpus = []
        for i in range(pynvml.nvmlDeviceGetCount()):
            if i in excluded:
                continue
            h = pynvml.nvmlDeviceGetHandleByIndex(i)
            uuid = pynvml.nvmlDeviceGetUUID(h)
            if not _is_visible(i, uuid.decode() if isinstance(uuid, bytes) else str(uuid), entries):
                continue
            mem = pynvml.nvmlDeviceGetMemoryInfo(h)
            util = pynvml.nvmlDeviceGetUtilizationRates(h).gpu
            gpus.append((i, mem.free / 2**30, util))
    finally:
        pynvml.nvmlShutdown()
    if entries and not gpus:
        log.warning("CUDA_VISIBLE_DEVICES=%s names none of the GPUs NVML reports (indices in NVML's "
                    "numbering or GPU-... UUIDs; MIG devices are not used): running on the CPU",
                    os.environ.get("CUDA_VISIBLE_DEVICES"))  # fmt: skip
    gpus.sort(key=lambda g: (-g[1], g[2]))
    slots = []
    for i, free_gib, _ in gpus:
        n = max(1, min(4, int(free_gib // gib_per_job))) if jobs_per_gpu == "auto" else int(jobs_per_gpu)
        slots += [Slot(f"gpu{i}", gpu=i) for _ in range(n)]
    return slots


def cpu_slots(workers: int) -> list[Slot]:
    threads = max(1, (os.cpu_count() or 1) // max(1, workers))
    return [Slot("cpu", threads=threads) for _ in range(max(1, workers))]


def local_slots(workers: Optional[int] = None, excluded: Optional[list[int]] = None, jobs_per_gpu: str = "auto") -> list[Slot]:
    """The local executor's slots: GPU slots by NVML when there are GPUs, else ``workers`` CPU
    slots (default 1)."""
    return gpu_slots(excluded or [], jobs_per_gpu) or cpu_slots(workers or 1)


def slot_env(slot: Slot, base: Optional[dict] = None) -> dict[str, str]:
    """The environment of a job process on ``slot``: its share of the cores (torch/numba/OpenMP
    thread counts) and, on a GPU slot, only that GPU (``CUDA_VISIBLE_DEVICES``, NVML's index with
    ``CUDA_DEVICE_ORDER=PCI_BUS_ID`` so that CUDA numbers the GPUs as NVML does: its default order,
    fastest first, differs on machines with mixed GPUs)."""
    env = dict(os.environ if base is None else base, SPLATFORGE_THREADS=str(slot.threads), NUMBA_NUM_THREADS=str(slot.threads),
               OMP_NUM_THREADS=str(slot.threads))  # fmt: skip
    if slot.gpu is not None:
        env["CUDA_VISIBLE_DEVICES"] = str(slot.gpu)
        env["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"
    return env


# ----------------------------------------------------------------------------------- executors


class LocalExecutor:
    """One subprocess per job (``python -m splatforge.pipeline.job``), at most one per slot;
    GPU jobs see only their GPU (``CUDA_VISIBLE_DEVICES``), CPU jobs get an equal share of the
    cores (numba/torch thread counts)."""

    def __init__(self, slots: list[Slot], logs: Path):
        self.slots, self.logs = slots, Path(logs)

    def run(self, jobs: list[JobSpec], on_event: Callable[[str, JobSpec, Optional[dict], str], None]) -> list[dict]:
        self.logs.mkdir(parents=True, exist_ok=True)
        queue = deque(jobs)
        free = list(range(len(self.slots)))
        running: dict[int, tuple[subprocess.Popen, JobSpec, Path, object]] = {}
        results = []
        while queue or running:
            while queue and free:
                si = free.pop(0)
                slot = self.slots[si]
                spec = queue.popleft()
                if slot.gpu is not None:
                    spec.device = "cuda"
                spec_path = self.logs / f".{spec.name}.spec.json"
                with atomic_path(spec_path) as tmp:
                    tmp.write_text(json.dumps(asdict(spec)))
                env = slot_env(slot)
                log_file = open(self.logs / f"{spec.name}.log", "a")  # noqa: SIM115 - closed when the job ends
                result_path = self.logs / f".{spec.name}.result.json"
                result_path.unlink(missing_ok=True)
                proc = subprocess.Popen([sys.executable, "-m", "splatforge.pipeline.job", str(spec_path), str(result_path)],
                                        stdout=log_file, stderr=subprocess.STDOUT, env=env)  # fmt: skip
                running[si] = (proc, spec, result_path, log_file)
                on_event("start", spec, None, slot.label)
            time.sleep(0.2)
            for si, (proc, spec, result_path, log_file) in list(running.items()):
                if proc.poll() is None:
                    continue
                log_file.close()
                try:
                    result = json.loads(result_path.read_text())
                except (OSError, ValueError):
                    result = {"job": spec.name, "scene": spec.scene, "ratio": spec.ratio, "output": str(spec.out),
                              "status": "failed", "stages": {}, "info": {},
                              "error": f"worker exited with code {proc.returncode} (see logs/{spec.name}.log)"}  # fmt: skip
                results.append(result)
                del running[si]
                free.append(si)
                on_event("end", spec, result, self.slots[si].label)
        return results


class RayExecutor:
    """The same job function as a Ray task (``num_gpus`` per job on GPU clusters, else
    ``num_cpus``). Ray is optional: ``pip install "splatforge[ray]"``."""

    def __init__(self, address: Optional[str] = None, num_gpus: float = 0.0, num_cpus: float = 1.0, logs: Optional[Path] = None):
        try:
            import ray
        except ImportError as exc:
            from splatforge.errors import BackendUnavailableError

            raise BackendUnavailableError('the Ray executor needs ray: pip install "splatforge[ray]"') from exc
        self.ray = ray
        if not ray.is_initialized():
            ray.init(address=address, include_dashboard=False, log_to_driver=False, ignore_reinit_error=True)
        self.num_gpus, self.num_cpus = num_gpus, num_cpus

    def run(self, jobs: list[JobSpec], on_event: Callable[[str, JobSpec, Optional[dict], str], None]) -> list[dict]:
        task = self.ray.remote(num_gpus=self.num_gpus, num_cpus=self.num_cpus)(_ray_job)
        pending = {}
        for spec in jobs:
            if self.num_gpus > 0:
                spec.device = "cuda"
            pending[task.remote(asdict(spec))] = spec
            on_event("start", spec, None, "ray")
        results = []
        while pending:
            done, _ = self.ray.wait(list(pending), num_returns=1)
            for ref in done:
                spec = pending.pop(ref)
                result = self.ray.get(ref)
                results.append(result)
                on_event("end", spec, result, "ray")
        return results


def _ray_job(spec: dict) -> dict:
    return run_job(JobSpec(**spec))


# ------------------------------------------------------------------------------------- summary


def write_summary(out: Path, results: list[dict], unready: list[SceneEntry], seconds: float) -> dict:
    """``O/summary.json`` and ``O/summary.md``."""
    rows = sorted(results, key=lambda r: (r["scene"], r["ratio"]))
    summary = {
        "jobs": len(rows), "done": sum(r["status"] == "done" for r in rows),
        "failed": sum(r["status"] == "failed" for r in rows), "seconds": round(seconds, 1),
        "unready": [{"scene": s.name, "subset": s.subset, "reason": s.reason} for s in unready],
        "results": rows,
    }  # fmt: skip
    with atomic_path(out / "summary.json") as tmp:
        tmp.write_text(json.dumps(summary, indent=1, default=str))
    lines = [f"# splatforge generate: {summary['done']} done, {summary['failed']} failed of {summary['jobs']} jobs "
             f"({seconds / 60:.1f} min)", "", "| scene | ratio | status | test PSNR | test SSIM | Gaussians | stages | error |",
             "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        info = r.get("info", {})
        psnr = info.get("test_psnr")
        ssim = info.get("test_ssim")
        stages = ", ".join(f"{k}:{v}" for k, v in r.get("stages", {}).items())
        lines.append(f"| {r['scene']} | {r['ratio']:g} | {r['status']} | {psnr if psnr is None else f'{psnr:.2f}'} | "
                     f"{ssim if ssim is None else f'{ssim:.3f}'} | {info.get('num_gaussians', '')} | {stages} | {r.get('error') or ''} |")  # fmt: skip
    if unready:
        lines += ["", "## Not ready", ""] + [f"- {s.subset + '/' if s.subset else ''}{s.name}: {s.reason}" for s in unready]
    with atomic_path(out / "summary.md") as tmp:
        tmp.write_text("\n".join(lines) + "\n")
    return summary


def generate(cfg: GenerateConfig, on_event: Optional[Callable] = None) -> dict:
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
        return {"jobs": [{"job": j.name, "scene": j.scene, "subset": j.subset, "ratio": j.ratio, "output": str(j.out),
                          "stages": stage_order(j.stages)} for j in jobs],
                "unready": [{"scene": s.name, "reason": s.reason} for s in unready]}  # fmt: skip
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    events = on_event or (lambda *a: None)
    if cfg.executor == "ray":
        executor = RayExecutor(cfg.ray_address, num_gpus=(1.0 / int(cfg.jobs_per_gpu) if cfg.jobs_per_gpu != "auto" else 0.5) if slots else 0.0)
    else:
        slots = slots or cpu_slots(cfg.max_workers or 1)
        if cfg.max_workers:
            slots = slots[: cfg.max_workers]
        executor = LocalExecutor(slots, out / "logs")  # type: ignore[assignment]
    results = executor.run(jobs, events)
    return write_summary(out, results, unready, time.perf_counter() - t)
