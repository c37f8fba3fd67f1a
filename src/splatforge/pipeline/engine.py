"""The stage engine: every job is a list of stages over one output folder, resumable.

A stage is a function of a :class:`StageContext` that writes its outputs and returns
``(outputs, info)``: the files it made (recorded with their sizes) and a summary dict. Each stage
has a **digest**, a hash of everything its result depends on (its options, the fingerprints of
the input files it reads, the digests of the stages it reads from; see :func:`digest`), and
:class:`StageRunner` records every stage in the folder's ``manifest.json``
(:class:`~splatforge.pipeline.manifest.Manifest`):

- a stage whose record is **fresh** (done, same digest, outputs still there with their sizes)
  is skipped and its outputs are not touched;
- any other stage runs; :attr:`StageContext.resumable` tells it whether its last attempt had the
  same digest (it was interrupted: a killed process leaves it ``running``), so that training
  continues from its checkpoint, while a changed option starts it over;
- a stage that raises is recorded ``failed`` with its one-line error and the error propagates
  (the job stops there), unless the stage is ``best_effort``: then it is a warning and the job
  goes on.

Events (:mod:`splatforge.pipeline.events`) report each stage's start, end (or skip) and failure;
the stages report their own progress through :attr:`StageContext.emit`. ``train``, ``run``,
``splatter`` and ``generate``'s jobs are stage lists over this engine.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from splatforge._fs import remove_stale_temps
from splatforge.pipeline.events import EventSink, StageDone, StageFailed, StageStarted, ignore
from splatforge.pipeline.manifest import Manifest, stage_hash

log = logging.getLogger(__name__)

__all__ = ["Stage", "StageContext", "StageOutcome", "StageRunner", "digest", "file_fingerprint", "run_stages"]

StageFn = Callable[["StageContext"], tuple[list[Path], dict]]


def digest(name: str, options: Any, inputs: Any = None, upstream: Iterable[str] = ()) -> str:
    """The digest of stage ``name``: a hash of its ``options`` (JSON-able), the fingerprint of the
    input files it reads (``inputs``, e.g. :func:`file_fingerprint`) and the digests of the
    stages it reads from, in order."""
    return stage_hash(name, options, inputs, list(upstream))


def file_fingerprint(paths: Iterable[Path]) -> list[tuple[str, int, int]]:
    """``[(path, size, mtime), ...]`` of the files at or directly inside ``paths`` (folders are
    listed one level deep, sorted): what the input of a stage is, without reading it."""
    out = []
    for p in paths:
        p = Path(p)
        if p.is_file():
            st = p.stat()
            out.append((str(p.resolve()), st.st_size, int(st.st_mtime)))
        elif p.is_dir():
            for q in sorted(p.iterdir()):
                if q.is_file():
                    st = q.stat()
                    out.append((str(q.resolve()), st.st_size, int(st.st_mtime)))
    return out


@dataclass(frozen=True)
class Stage:
    """One stage of a job: its ``name``, the function that runs it, its ``digest`` and whether a
    failure only warns (``best_effort``)."""

    name: str
    run: StageFn
    digest: str
    best_effort: bool = False


@dataclass
class StageContext:
    """What a running stage is given: its name, the job's folder and manifest, whether its last
    attempt had the same digest (``resumable``: continue its partial work), and the event sink."""

    name: str
    folder: Path
    manifest: Manifest
    resumable: bool
    emit: EventSink
    shared: dict[str, Any] = field(default_factory=dict)
    """Objects the job's stages hand on to later stages of the same process (a trained run)."""


@dataclass(frozen=True)
class StageOutcome:
    """``status``: ``done``, ``skipped`` or ``warning`` (a best-effort stage failed); ``info``:
    its summary (from the manifest when skipped)."""

    status: str
    info: dict
    seconds: float
    warnings: tuple[str, ...] = ()


_RECORD_KEYS = ("outputs", "hash", "status", "started", "seconds", "finished_at", "error")


class StageRunner:
    """Runs stages in ``folder`` against its manifest (created with the folder on first use);
    stale temporary files of a killed process are removed first.

    Args:
        folder: the job's output folder (holds ``manifest.json``).
        emit: the event sink.
        skip_fresh: False reruns every stage (``--force``-like; generate's ``--no-skip-existing``).
    """

    def __init__(self, folder: Path, emit: EventSink | None = None, skip_fresh: bool = True):
        self.folder = Path(folder)
        self.emit = emit or ignore
        self.skip_fresh = skip_fresh
        self.created = not self.folder.exists()  # made by this job: a first attempt that fails removes it
        if not self.created and remove_stale_temps(self.folder):
            log.info("%s: removed temporary files of an interrupted run", self.folder)
        self.manifest = Manifest(self.folder)
        self.manifest.data["runs"] = int(self.manifest.data.get("runs", 0)) + 1  # saved with the first record
        self.shared: dict[str, Any] = {}

    def info(self, name: str) -> dict:
        """The summary recorded for stage ``name`` (empty when none)."""
        return {k: v for k, v in self.manifest.stage(name).items() if k not in _RECORD_KEYS}

    def is_fresh(self, stage: Stage) -> bool:
        return self.skip_fresh and self.manifest.is_fresh(stage.name, stage.digest)

    def run(self, stage: Stage) -> StageOutcome:
        """Run ``stage`` unless it is fresh (see the module docstring).

        Raises:
            Exception: whatever a stage that is not best effort raised (recorded as failed first).
        """
        if self.is_fresh(stage):
            info = self.info(stage.name)
            seconds = float(self.manifest.stage(stage.name).get("seconds", 0.0))
            self.emit(StageDone(stage.name, seconds, skipped=True, info=info))
            return StageOutcome("skipped", info, seconds)
        previous = self.manifest.stage(stage.name)
        resumable = previous.get("hash") == stage.digest and previous.get("status") in ("running", "failed")
        self.emit(StageStarted(stage.name))
        t = time.perf_counter()
        self.manifest.start(stage.name, stage.digest)
        ctx = StageContext(stage.name, self.folder, self.manifest, resumable, self.emit, self.shared)
        try:
            outputs, info = stage.run(ctx)
        except Exception as exc:
            line = (str(exc).splitlines() or [type(exc).__name__])[0]
            self.manifest.fail(stage.name, line, time.perf_counter() - t)
            if not stage.best_effort:
                self._remove_if_empty()
                self.emit(StageFailed(stage.name, line))
                raise
            log.warning("%s failed (best effort, the job goes on): %s", stage.name, line)
            seconds = time.perf_counter() - t
            self.emit(StageDone(stage.name, seconds, info={}, warnings=(line,)))
            return StageOutcome("warning", {}, seconds, (line,))
        seconds = time.perf_counter() - t
        warnings = tuple(info.pop("warnings", ()) or ())
        if not self.folder.exists():  # the stage removed the job's folder (generate's partition_fix): no record
            self.emit(StageDone(stage.name, seconds, info=info, warnings=warnings))
            return StageOutcome("done", info, seconds, warnings)
        self.manifest.finish(
            stage.name, outputs, seconds, {**info, **({"warnings": list(warnings)} if warnings else {})}
        )
        self.emit(StageDone(stage.name, seconds, info=info, warnings=warnings))
        return StageOutcome("warning" if warnings else "done", info, seconds, warnings)

    def _remove_if_empty(self) -> None:
        """After a failure: the folder this job created goes again when it holds nothing but the
        manifest (bad input leaves no output folder behind)."""
        if not (self.created and self.folder.is_dir()):
            return
        if all(p.name == "manifest.json" or (p.is_dir() and not any(p.rglob("*"))) for p in self.folder.iterdir()):
            shutil.rmtree(self.folder)


def run_stages(runner: StageRunner, stages: Iterable[Stage]) -> dict[str, StageOutcome]:
    """Run ``stages`` in order with ``runner``; ``{name: outcome}``. Stops at the first failure
    (the exception propagates)."""
    return {s.name: runner.run(s) for s in stages}
