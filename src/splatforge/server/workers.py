"""The job server's workers: each running job is one ``splatter`` job spec
(:func:`splatforge.pipeline.executors.splatter_spec`: the workspace as its job root, the job's
options) submitted to an executor of :mod:`splatforge.pipeline.executors`:

- ``local`` (default): the pool ``generate`` uses (:func:`~splatforge.pipeline.executors.local_slots`:
  GPU slots by NVML, else CPU workers with an equal share of the cores), one subprocess per job
  in its own process group (cancel: SIGTERM to the group, SIGKILL after
  :data:`TERMINATE_GRACE_S`, as the node's runner does) that dies with the server (Linux's
  parent-death signal), so a killed server leaves no orphan training into a workspace;
- ``ray``: one Ray task per job on an existing cluster (``--ray-address``) or a local one
  (:meth:`~splatforge.pipeline.executors.RayExecutor.for_server`); cancel interrupts the task and
  kills its worker after the grace period; the workspaces must be reachable from the cluster's
  nodes at the same path (a shared file system, or the local cluster).

At start-up, jobs left ``running`` are queued again (after any local worker of theirs that
survived is killed) and resume from their manifests and checkpoints (the splatter pipeline skips
its finished stages). The worker's progress lines (the node's ``{"pct", "stage", "status", ...}``)
become the job's ``progress`` in the store and, with the worker's logs, go to ``jobs/<id>/job.log``;
a failed job's ``error`` is its result's error line.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from pathlib import Path
from typing import Literal

from splatforge.errors import ConfigError
from splatforge.pipeline.executors import (
    TERMINATE_GRACE_S,
    Executor,
    JobHandle,
    LocalExecutor,
    RayExecutor,
    Slot,
    local_slots,
    splatter_spec,
)
from splatforge.server.store import JobStore

log = logging.getLogger(__name__)

__all__ = ["OPTIONS", "TERMINATE_GRACE_S", "Supervisor", "job_spec", "make_executor"]

OPTIONS = {
    "steps": int,
    "max_gaussians": int,
    "strategy": ("default", "mcmc"),
    "data_factor": int,
    "preset": ("auto", "fast", "default", "quality"),
    "checkpoint_every": int,
    "test_every": int,
    "preview_size": int,
    "seed": int,
}
"""The splatter options a submission may set: a non-negative integer, or one of the choices.
Each is the :class:`~splatforge.pipeline.splatter.SplatterConfig` field of that name (the
``splatforge splatter`` flag ``--max-gaussians`` for ``max_gaussians``)."""


def job_spec(job: dict, workspace: Path) -> dict:
    """The ``splatter`` job spec of ``job`` (a store row) in ``workspace``: its options, the
    workspace as the job root, the job's id, and for captures the uploaded files (sorted).

    Raises:
        ConfigError: an option that is not a splatter option.
    """
    from splatforge.pipeline.splatter import SplatterConfig

    unknown = sorted(set(job["options"]) - set(OPTIONS))
    if unknown:
        raise ConfigError(f"options: unknown option(s) {', '.join(unknown)}")
    captures = sorted((workspace / "uploads").iterdir()) if job["kind"] == "captures" else None
    cfg = SplatterConfig(job_root_path=workspace, job_id=job["id"], captures=captures, **job["options"])
    return splatter_spec(cfg)


def make_executor(
    executor: Literal["local", "ray"] = "local", workers: int | None = None, ray_address: str | None = None
) -> Executor:
    """The server's executor: the local pool (``workers`` CPU slots without GPUs, default 1) or
    Ray (at most ``workers`` jobs at once, default one per GPU or node; a new local Ray without
    ``ray_address``).

    Raises:
        ConfigError: an unknown executor, or ``ray`` without ray installed.
    """
    if executor == "local":
        return LocalExecutor(local_slots(workers), own_group=True)
    if executor == "ray":
        return RayExecutor.for_server(ray_address, workers)
    raise ConfigError(f"--executor must be local or ray, got {executor!r}")


class Supervisor:
    """Claims queued jobs from ``store`` while the executor has room and runs them (module
    docstring). ``executor``: default the local pool on ``slots`` (default :func:`local_slots`
    of ``workers``)."""

    def __init__(
        self,
        store: JobStore,
        jobs_dir: Path,
        workers: int | None = None,
        slots: list[Slot] | None = None,
        executor: Executor | None = None,
    ):
        self.store, self.jobs_dir = store, Path(jobs_dir)
        if executor is None:
            executor = LocalExecutor(slots if slots is not None else local_slots(workers), own_group=True)
        self.executor = executor
        self._handles: dict[str, JobHandle] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ---------------------------------------------------------------- life cycle
    def start(self) -> None:
        for job in self.store.requeue_running():
            self._kill_survivor(job)
            log.info(
                "job %s: was running when the server stopped; queued again (resumes from its checkpoint)", job["id"]
            )
        self._thread = threading.Thread(target=self._loop, name="splatforge-supervisor", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop claiming, end the running workers (their jobs stay ``running`` in the store and
        are queued again at the next start), release the executor (a local Ray it started ends)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self.executor.stop(TERMINATE_GRACE_S)
        if isinstance(self.executor, RayExecutor):
            self.executor.close(shutdown=self.executor.started)
        else:
            self.executor.close()

    def workspace(self, job_id: str) -> Path:
        return self.jobs_dir / job_id

    # ---------------------------------------------------------------- cancel
    def cancel(self, job_id: str) -> bool:
        """Mark the job cancelled (unless it already ended) and end its worker: SIGTERM to its
        process group (Ray: interrupt the task), SIGKILL after the grace period. True when the
        status changed."""
        changed = self.store.finish(job_id, "cancelled", "cancelled by request")
        with self._lock:
            handle = self._handles.get(job_id)
        if changed and handle is not None:
            handle.cancel(TERMINATE_GRACE_S)
        return changed

    def _kill_survivor(self, job: dict) -> None:
        """A local worker of ``job`` still alive from the previous server (it should have died
        with it): kill its process group, so that the job never runs twice at once."""
        pid = job.get("pid")
        if not pid:
            return
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            return
        if job["id"].encode() not in cmdline:  # the spec's path names the job: a reused pid is left alone
            return
        try:
            os.killpg(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            return
        for _ in range(100):
            if not Path(f"/proc/{pid}").exists():
                break
            time.sleep(0.05)

    # ---------------------------------------------------------------- the loop
    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self._reap()
                self._launch()
            except Exception:  # the supervisor must outlive any one job's failure
                log.exception("supervisor: unexpected error (continuing)")
            self._stop.wait(0.2)

    def _launch(self) -> None:
        while not self._stop.is_set() and self.executor.has_room():
            job = self.store.claim_next()
            if job is None:
                return
            ws = self.workspace(job["id"])
            try:
                spec = job_spec(job, ws)
                handle = self.executor.submit(
                    spec,
                    name=job["id"],
                    log=ws / "job.log",
                    workdir=ws,
                    on_progress=lambda line, job_id=job["id"]: self._progress(job_id, line),
                    banner=f"--- attempt {job['attempts']}",
                )
            except (ConfigError, OSError) as exc:
                self.store.finish(job["id"], "failed", f"could not start the worker: {exc}")
                continue
            self.store.set_pid(job["id"], handle.pid)
            with self._lock:
                self._handles[job["id"]] = handle
            log.info("job %s: started (%s)", job["id"], handle.where)

    def _progress(self, job_id: str, line: dict) -> None:
        if "stage" in line:
            self.store.set_progress(job_id, line)

    def _reap(self) -> None:
        for handle, result in self.executor.poll():
            job_id = handle.name
            with self._lock:
                self._handles.pop(job_id, None)
            if self._stop.is_set():
                continue  # ended by the server's own shutdown: queued again at the next start
            if result.get("status") == "done":
                self.store.finish(job_id, "succeeded")
            else:
                self.store.finish(job_id, "failed", result.get("error") or "the worker failed (see the job's log)")
            log.info("job %s: %s", job_id, result.get("status"))
