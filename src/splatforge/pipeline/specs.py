"""Jobs as JSON specs ``{"kind": KIND, ...fields}`` and how a worker runs them (see
:mod:`splatforge.pipeline.executors` for the kinds and where they run)."""

from __future__ import annotations

import dataclasses
import logging
import os
import time
import types
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Union, get_args, get_origin, get_type_hints

from splatforge.errors import ConfigError, SplatforgeError

log = logging.getLogger(__name__)

ProgressFn = Callable[[dict], None]


# ------------------------------------------------------------------------------------ job kinds


def _event_lines(on_progress: ProgressFn):
    """An event sink (:mod:`splatforge.pipeline.events`) that reports a dataset job's stages and
    about 20 lines of its training as progress lines."""
    from splatforge.pipeline.events import StageDone, StageFailed, StageNote, StageStarted, TrainStarted, TrainStep

    every = {"n": 1}

    def sink(event) -> None:
        stage = event.stage
        if isinstance(event, StageStarted):
            on_progress({"stage": stage, "status": "started"})
        elif isinstance(event, TrainStarted):
            every["n"] = max(1, event.steps // 20)
            on_progress({"stage": stage, "status": "started", "steps": event.steps, "resumed_from": event.start_step})
        elif isinstance(event, TrainStep):
            if event.step % every["n"] == 0 or event.step == event.steps:
                on_progress({"stage": stage, "status": "running", **event.line()})
        elif isinstance(event, StageDone):
            status = "skipped" if event.skipped else "completed"
            on_progress({"stage": stage, "status": status, "seconds": round(event.seconds, 2)})
        elif isinstance(event, StageFailed):
            on_progress({"stage": stage, "status": "failed", "error": event.error})
        elif isinstance(event, StageNote):
            on_progress({"stage": stage, "status": "note", "message": event.message})

    return sink


def _run_dataset_job(spec: dict, on_progress: ProgressFn) -> dict:
    from splatforge.pipeline.job import JobSpec, run_job

    return run_job(JobSpec(**_fields(spec)), emit=_event_lines(on_progress))


def _dataset_failure(spec: dict, error: str) -> dict:
    from splatforge.pipeline.job import JobSpec

    job = JobSpec(**_fields(spec))
    return {
        "job": job.name,
        "scene": job.scene,
        "ratio": job.ratio,
        "output": str(job.out),
        "status": "failed",
        "stages": {},
        "info": {},
        "error": error,
    }


def _run_splatter(spec: dict, on_progress: ProgressFn) -> dict:
    from splatforge.pipeline.splatter import splatter

    cfg = splatter_config(spec)
    level = getattr(logging, cfg.log_level.upper(), None)
    if not isinstance(level, int):
        raise ConfigError(f"log_level must be debug, info, warning or error, got {cfg.log_level!r}")
    if cfg.captures:  # COLMAP logs every step of the SfM at INFO (glog): keep its warnings only
        import pycolmap

        pycolmap.logging.minloglevel = 1
    logger = logging.getLogger("splatforge")
    before = logger.level
    logger.setLevel(level)
    last = {"stage": "frames"}

    def emit(line: dict) -> None:
        last["stage"] = line.get("stage", last["stage"])
        on_progress(line)

    try:
        summary = splatter(cfg, on_progress=emit)
    except SplatforgeError as exc:  # the node's last line names the stage that failed
        on_progress({"stage": last["stage"], "status": "failed", "error": str(exc)})
        raise
    finally:
        logger.setLevel(before)
    return {"status": "done", "error": None, "summary": summary}


def _run_probe(spec: dict, on_progress: ProgressFn) -> dict:
    steps, pause = int(spec.get("steps", 1)), float(spec.get("sleep_s", 0.0))
    for step in range(1, steps + 1):
        time.sleep(pause)
        on_progress({"stage": "probe", "status": "running", "step": step, "steps": steps})
    log.info("probe: %d steps done in process %d", steps, os.getpid())
    if spec.get("fail"):
        raise SplatforgeError(str(spec["fail"]))
    return {
        "status": "done",
        "error": None,
        "pid": os.getpid(),
        "threads": os.environ.get("SPLATFORGE_THREADS"),
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
    }


def _on_gpu_dataset(spec: dict) -> dict:
    return {**spec, "device": "cuda"}


@dataclass(frozen=True)
class _Kind:
    run: Callable[[dict, ProgressFn], dict]
    failure: Callable[[dict, str], dict] | None = None
    """The result of a job that failed before or outside its own code (default: status and error)."""
    on_gpu: Callable[[dict], dict] | None = None
    """The spec as it runs on a GPU slot (default: unchanged: the job picks its device itself)."""


KINDS: dict[str, _Kind] = {
    "dataset_job": _Kind(_run_dataset_job, _dataset_failure, _on_gpu_dataset),
    "splatter": _Kind(_run_splatter),
    "probe": _Kind(_run_probe),
}
"""The job kinds a worker runs (module docstring)."""


def _kind(spec: dict) -> _Kind:
    kind = spec.get("kind") if isinstance(spec, dict) else None
    if kind not in KINDS:
        raise ConfigError(f"job spec: unknown kind {kind!r}; known: {', '.join(KINDS)}")
    return KINDS[kind]


def _fields(spec: dict) -> dict:
    return {k: v for k, v in spec.items() if k != "kind"}


def failure(spec: dict, error: str) -> dict:
    """The result of ``spec`` failed with the one-line ``error`` (in its kind's shape)."""
    try:
        kind = _kind(spec)
        if kind.failure is not None:
            return kind.failure(spec, error)
    except (ConfigError, TypeError, ValueError):
        pass
    return {"status": "failed", "error": error}


def _on_gpu(spec: dict) -> dict:
    kind = KINDS.get(spec.get("kind"))
    return kind.on_gpu(spec) if kind is not None and kind.on_gpu is not None else spec


def run_spec(spec: dict, on_progress: ProgressFn | None = None) -> dict:
    """Run the job ``spec`` in this process (module docstring); returns its result.

    Raises:
        ConfigError: an unknown kind or bad fields; whatever the job itself raises (a dataset
            job records its failures in its result instead).
    """
    return _kind(spec).run(spec, on_progress or (lambda line: None))


def execute(spec: dict, on_progress: ProgressFn | None = None) -> dict:
    """:func:`run_spec`, with any exception turned into a failed result whose ``error`` is its
    one line (a :class:`~splatforge.errors.SplatforgeError`'s message as it is, any other
    exception's type and message, its traceback logged): what the workers run."""
    try:
        return run_spec(spec, on_progress)
    except Exception as exc:  # the job boundary: a failure is a result, never a crash
        if isinstance(exc, SplatforgeError):
            line = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            log.error("job failed: %s", line)
        else:
            line = f"{type(exc).__name__}: {exc}".splitlines()[0]
            log.exception("job failed: %s", line)
        return failure(spec, line)


def dataset_spec(job) -> dict:
    """The spec of the dataset job ``job`` (a :class:`~splatforge.pipeline.job.JobSpec`)."""
    return {"kind": "dataset_job", **asdict(job)}


def _jsonable(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return value


def splatter_spec(cfg) -> dict:
    """The spec of the splatter job ``cfg`` (a :class:`~splatforge.pipeline.splatter.SplatterConfig`):
    its fields as JSON (paths as strings, nested option groups as objects)."""
    return {"kind": "splatter", **_jsonable(asdict(cfg))}


def _from_hint(hint: Any, value: Any) -> Any:
    if value is None:
        return None
    if hint is Path:
        return Path(value)
    if dataclasses.is_dataclass(hint) and isinstance(value, dict):
        return _dataclass_from_json(hint, value)
    origin, args = get_origin(hint), get_args(hint)
    if origin in (Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        return _from_hint(inner[0], value) if len(inner) == 1 else value
    if origin is list and args and isinstance(value, list):
        return [_from_hint(args[0], v) for v in value]
    return value


def _dataclass_from_json(cls, data: dict):
    hints = get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"{cls.__name__}: unknown field(s) {', '.join(unknown)}")
    return cls(**{k: _from_hint(hints[k], v) for k, v in data.items()})


def splatter_config(spec: dict):
    """The :class:`~splatforge.pipeline.splatter.SplatterConfig` of a ``splatter`` spec.

    Raises:
        ConfigError: an unknown field, or no ``job_root_path``.
    """
    from splatforge.pipeline.splatter import SplatterConfig

    fields = _fields(spec)
    if not fields.get("job_root_path"):
        raise ConfigError("splatter spec: no job_root_path")
    return _dataclass_from_json(SplatterConfig, fields)
