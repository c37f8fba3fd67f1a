"""Where jobs run: one executor interface, a local pool of subprocesses and Ray.

A **job** is a JSON-serialisable spec ``{"kind": KIND, ...fields}`` (it crosses process and
machine boundaries as it is):

=============== ==============================================================================
``dataset_job`` the fields of a :class:`~splatforge.pipeline.job.JobSpec` (``generate``,
                ``blocks``); see :func:`dataset_spec`
``splatter``    the fields of a :class:`~splatforge.pipeline.splatter.SplatterConfig`, paths as
                strings (the job server); see :func:`splatter_spec`
``probe``       a diagnostic: ``steps`` progress lines ``sleep_s`` seconds apart, then a failure
                with the message ``fail`` when given, else where it ran (pid, threads, GPUs):
                whether a pool or a cluster runs jobs at all
=============== ==============================================================================

A worker runs a spec with :func:`execute` (:func:`run_spec`, with every failure turned into a
result); ``on_progress(line)`` gets its progress lines, dicts (a splatter job's are the node's
``{"pct", "stage", "status", ...}``; a dataset job's ``{"stage", "status", ...}`` per stage and
training step). Every result has ``status`` (``done`` or ``failed``) and ``error`` (None or one
line); a dataset job's is :func:`~splatforge.pipeline.job.run_job`'s, a splatter job's has the
``summary`` of its ``result.json``.

An :class:`Executor` runs specs elsewhere, at most :attr:`~Executor.capacity` at once:
:meth:`~Executor.submit` starts one and returns its :class:`JobHandle` (which can be cancelled),
:meth:`~Executor.poll` returns the jobs that ended since the last call with their results, and
:meth:`~Executor.run` runs a list of dataset jobs through both (what ``generate`` and ``blocks``
call). Progress lines reach the ``on_progress`` given to ``submit`` in the parent and are
appended to the job's log as JSON lines.

- :class:`LocalExecutor`: one subprocess per job, ``python -m splatforge.pipeline.executors
  SPEC.json RESULT.json``, on a :class:`Slot` (a GPU by NVML, following ``CUDA_VISIBLE_DEVICES``,
  or a share of the cores: :func:`local_slots`, :func:`slot_env`); the worker writes progress
  lines on its stdout (the parent reads them; anything else it prints goes to stderr), its logs on
  stderr, both into the job's log file. It dies with the process that started it (Linux's
  parent-death signal).
- :class:`RayExecutor`: one Ray task per job on an existing cluster (``address``) or a local one;
  progress lines travel through a small actor, the task's logs are appended to the job's log when
  its path is reachable from the task's node. Ray is optional: ``pip install "splatforge[ray]"``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

from splatforge._fs import atomic_path
from splatforge.errors import ConfigError
from splatforge.pipeline.slots import (
    Slot,
    _set_threads,
    cpu_slots,
    gpu_slots,
    local_slots,
    slot_env,
    visible_gpu_entries,
)
from splatforge.pipeline.specs import (
    KINDS,
    ProgressFn,
    _kind,
    _on_gpu,
    dataset_spec,
    execute,
    failure,
    run_spec,
    splatter_config,
    splatter_spec,
)

log = logging.getLogger(__name__)

__all__ = [
    "KINDS",
    "TERMINATE_GRACE_S",
    "Executor",
    "JobHandle",
    "LocalExecutor",
    "RayExecutor",
    "Slot",
    "cpu_slots",
    "dataset_spec",
    "execute",
    "gpu_slots",
    "local_slots",
    "run_spec",
    "slot_env",
    "splatter_config",
    "splatter_spec",
    "visible_gpu_entries",
]

TERMINATE_GRACE_S = 10.0
"""Seconds a cancelled job has between SIGTERM (or Ray's interrupt) and SIGKILL."""


# ----------------------------------------------------------------------------- the interface


class JobHandle:
    """A submitted job: its ``name``, ``where`` it runs (a slot's label, or ``ray``), its ``spec``
    and the worker's ``pid`` (None on Ray)."""

    pid: int | None = None

    def __init__(self, name: str, where: str, spec: dict, log_path: Path | None, on_progress: ProgressFn | None):
        self.name, self.where, self.spec = name, where, spec
        self.log_path = log_path
        self._on_progress = on_progress
        self._log_lock = threading.Lock()
        self._log_file = open(log_path, "ab") if log_path is not None else None  # noqa: SIM115 - closed at the end

    def cancel(self, grace_s: float = TERMINATE_GRACE_S) -> None:
        """Ask the job to stop now, and force it after ``grace_s`` seconds; it then ends as a
        failed job in :meth:`Executor.poll` (the caller knows it cancelled it)."""
        raise NotImplementedError

    def _progress(self, line: dict) -> None:
        """One progress line: appended to the log as JSON, then given to ``on_progress`` (whose
        errors are logged, never raised into the executor)."""
        self._write_log(json.dumps(line).encode() + b"\n")
        if self._on_progress is not None:
            try:
                self._on_progress(line)
            except Exception:  # a consumer's bug must not stop the job's bookkeeping
                log.exception("job %s: on_progress failed", self.name)

    def _write_log(self, data: bytes) -> None:
        with self._log_lock:
            if self._log_file is not None and not self._log_file.closed:
                self._log_file.write(data)
                self._log_file.flush()

    def _close_log(self) -> None:
        with self._log_lock:
            if self._log_file is not None:
                self._log_file.close()


class Executor:
    """Runs job specs (module docstring). Subclasses: :class:`LocalExecutor`, :class:`RayExecutor`."""

    capacity: int | None = None
    """Most jobs at once (None: no limit here, the cluster queues them)."""

    def __init__(self, logs: Path | None = None):
        self.logs = Path(logs) if logs is not None else None
        self._lock = threading.Lock()
        self._running: dict[str, JobHandle] = {}

    def running(self) -> list[JobHandle]:
        """The jobs submitted and not yet returned by :meth:`poll`."""
        with self._lock:
            return list(self._running.values())

    def has_room(self) -> bool:
        """Whether :meth:`submit` can start a job now."""
        with self._lock:
            return self.capacity is None or len(self._running) < self.capacity

    def submit(
        self,
        spec: dict,
        *,
        name: str,
        log: Path | None = None,
        workdir: Path | None = None,
        on_progress: ProgressFn | None = None,
        banner: str | None = None,
    ) -> JobHandle:
        """Start the job ``spec`` as ``name`` (unique among the running jobs); its log is
        ``log`` (default: ``LOGS/<name>.log`` when the executor has a log folder, else none),
        starting with the line ``"<banner> on <where>"`` when ``banner`` is given; the local
        pool keeps the spec and result files in ``workdir`` (default: the log's folder) and runs
        the worker there.

        Raises:
            ConfigError: an unknown kind, a name already running, no free slot.
        """
        _kind(spec)
        if log is None and self.logs is not None:
            self.logs.mkdir(parents=True, exist_ok=True)
            log = self.logs / f"{name}.log"
        with self._lock:
            if name in self._running:
                raise ConfigError(f"a job named {name!r} is already running")
            if self.capacity is not None and len(self._running) >= self.capacity:
                raise ConfigError(f"no free slot for job {name!r} ({self.capacity} running)")
            handle = self._start(spec, name, log, workdir, on_progress, banner)
            self._running[name] = handle
        return handle

    def _start(self, spec, name, log_path, workdir, on_progress, banner) -> JobHandle:
        raise NotImplementedError

    def poll(self) -> list[tuple[JobHandle, dict]]:
        """The jobs that ended since the last call, with their results (a job that crashed,
        was killed or cancelled: a failed result naming why)."""
        raise NotImplementedError

    def stop(self, grace_s: float = TERMINATE_GRACE_S) -> None:
        """Cancel every running job and wait up to ``grace_s`` seconds (plus a few to reap them)
        for them to end; their results are dropped."""
        handles = self.running()
        for h in handles:
            h.cancel(grace_s)
        deadline = time.monotonic() + grace_s + 5.0
        while self.running() and time.monotonic() < deadline:
            self.poll()
            time.sleep(0.1)

    def close(self) -> None:
        """Stop what still runs and release the executor's resources."""
        if self.running():
            self.stop()

    def run(
        self,
        jobs: list,
        on_event: Callable[[str, Any, dict | None, str], None] | None = None,
        on_progress: Callable[[Any, dict], None] | None = None,
    ) -> list[dict]:
        """Run the dataset jobs ``jobs`` (:class:`~splatforge.pipeline.job.JobSpec`) as slots
        free up; ``on_event("start"|"end", job, result, where)``, ``on_progress(job, line)`` with
        each progress line of a running job; returns the results in the order the jobs ended (a
        failing job is reported alone, the others go on; two jobs of the same name, e.g. one scene
        in two subsets, never run at once: they share a log)."""
        events = on_event or (lambda *a: None)
        queue = deque(jobs)
        by_name: dict[str, Any] = {}
        results = []
        while queue or self.running():
            while queue and self.has_room():
                busy = {h.name for h in self.running()}
                job = next((j for j in queue if j.name not in busy), None)
                if job is None:
                    break
                queue.remove(job)
                lines = None if on_progress is None else (lambda line, job=job: on_progress(job, line))
                handle = self.submit(dataset_spec(job), name=job.name, on_progress=lines)
                by_name[job.name] = job
                events("start", job, None, handle.where)
            time.sleep(0.2)
            for handle, result in self.poll():
                results.append(result)
                events("end", by_name.pop(handle.name), result, handle.where)
        return results


# --------------------------------------------------------------------------------- local pool


_PR_SET_PDEATHSIG = 1
try:  # resolved here, in the parent: the child between fork and exec only makes the call
    import ctypes

    _PRCTL = ctypes.CDLL(None, use_errno=True).prctl
except (OSError, AttributeError):  # not Linux: no parent-death signal
    _PRCTL = None


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    if _PRCTL is not None:
        _PRCTL(_PR_SET_PDEATHSIG, signal.SIGKILL)


class _LocalJob(JobHandle):
    def __init__(self, name, where, spec, log_path, on_progress, slot: int, own_group: bool):
        super().__init__(name, where, spec, log_path, on_progress)
        self.slot, self.own_group = slot, own_group
        self.proc: subprocess.Popen | None = None
        self.result_path: Path | None = None
        self.reader: threading.Thread | None = None

    def _signal(self, sig: int) -> None:
        try:
            if self.own_group:
                os.killpg(self.proc.pid, sig)
            else:
                self.proc.send_signal(sig)
        except (ProcessLookupError, PermissionError):
            pass

    def cancel(self, grace_s: float = TERMINATE_GRACE_S) -> None:
        if self.proc.poll() is not None:
            return
        self._signal(signal.SIGTERM)

        def kill_later() -> None:
            try:
                self.proc.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                self._signal(signal.SIGKILL)

        threading.Thread(target=kill_later, name=f"cancel-{self.name}", daemon=True).start()

    def _read(self) -> None:
        for raw in self.proc.stdout:
            try:
                line = json.loads(raw)
            except ValueError:
                self._write_log(raw)
                continue
            if isinstance(line, dict):
                self._progress(line)
            else:
                self._write_log(raw)

    def _result(self) -> dict:
        self.reader.join(timeout=10)
        self.proc.stdout.close()
        rc = self.proc.returncode
        try:
            result = json.loads(self.result_path.read_text())
        except (OSError, ValueError):
            where = f" (see {self.log_path})" if self.log_path is not None else ""
            how = f"was killed by signal {-rc}" if rc < 0 else f"exited with code {rc}"
            result = failure(self.spec, f"the worker {how}{where}")
        self._close_log()
        return result


class LocalExecutor(Executor):
    """One subprocess per job, at most one per slot (module docstring): GPU jobs see only their
    GPU, CPU jobs get their share of the cores (``SPLATFORGE_THREADS`` and the numba, torch and
    OpenMP thread counts). ``logs``: the folder of the jobs' logs (``<name>.log``) and of their
    spec and result files (``.<name>.spec.json``, ``.<name>.result.json``) when ``submit`` names
    no other. ``own_group``: each worker leads its own process group, and cancelling signals the
    whole group (a server's workers; otherwise they stay in the caller's group, so that killing
    the caller's group kills them too)."""

    def __init__(self, slots: list[Slot], logs: Path | None = None, *, own_group: bool = False):
        super().__init__(logs)
        if not slots:
            raise ConfigError("the local executor needs at least one slot")
        self.slots = list(slots)
        self.capacity = len(self.slots)
        self.own_group = own_group

    def _start(self, spec, name, log_path, workdir, on_progress, banner) -> JobHandle:
        used = {h.slot for h in self._running.values()}
        si = next(i for i in range(len(self.slots)) if i not in used)
        slot = self.slots[si]
        if slot.gpu is not None:
            spec = _on_gpu(spec)
        folder = Path(workdir) if workdir is not None else (log_path.parent if log_path is not None else None)
        if folder is None:
            raise ConfigError(f"job {name!r}: no log and no workdir for its spec and result files")
        folder.mkdir(parents=True, exist_ok=True)
        spec_path, result_path = folder / f".{name}.spec.json", folder / f".{name}.result.json"
        with atomic_path(spec_path) as tmp:
            tmp.write_text(json.dumps(spec))
        result_path.unlink(missing_ok=True)
        handle = _LocalJob(name, slot.label, spec, log_path, on_progress, si, self.own_group)
        if banner:
            handle._write_log(f"{banner} on {slot.label}\n".encode())
        try:
            handle.proc = subprocess.Popen(
                [sys.executable, "-m", "splatforge.pipeline.executors", str(spec_path), str(result_path)],
                stdout=subprocess.PIPE,
                stderr=handle._log_file if handle._log_file is not None else None,
                cwd=folder,
                env=slot_env(slot, dict(os.environ, PYTHONUNBUFFERED="1")),
                start_new_session=self.own_group,
                preexec_fn=_die_with_parent,  # noqa: PLW1509 - only the prctl call, before exec
            )
        except OSError as exc:
            handle._close_log()
            raise ConfigError(f"job {name!r}: could not start the worker: {exc}") from exc
        handle.pid, handle.result_path = handle.proc.pid, result_path
        handle.reader = threading.Thread(target=handle._read, name=f"progress-{name}", daemon=True)
        handle.reader.start()
        log.info("job %s: started (pid %d, %s)", name, handle.pid, slot.label)
        return handle

    def poll(self) -> list[tuple[JobHandle, dict]]:
        with self._lock:
            ended = [h for h in self._running.values() if h.proc.poll() is not None]
        out = []
        for h in ended:
            result = h._result()
            with self._lock:
                del self._running[h.name]
            out.append((h, result))
        return out


# ----------------------------------------------------------------------------------------- Ray


class _ProgressHub:
    """A Ray actor holding the progress lines of the running tasks until the driver drains them."""

    def __init__(self):
        self.lines: dict[str, list[dict]] = {}

    def put(self, key: str, line: dict) -> None:
        self.lines.setdefault(key, []).append(line)

    def drain(self) -> dict[str, list[dict]]:
        out, self.lines = self.lines, {}
        return out


def _ray_job(spec: dict, key: str, hub, log_path: str | None) -> dict:
    """The Ray task: :func:`execute` with the task's CPUs as its threads, its progress lines put
    into ``hub`` (all delivered before it returns) and the ``splatforge`` logs appended to
    ``log_path`` when that folder is reachable from here."""
    import ray

    cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1.0)
    _set_threads(max(1, int(cpus)))
    handler = None
    logger = logging.getLogger("splatforge")
    before = logger.level
    if log_path is not None and Path(log_path).parent.is_dir():
        try:
            handler = logging.FileHandler(log_path)
        except OSError:
            handler = None
    if handler is not None:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        logger.addHandler(handler)
        if logger.getEffectiveLevel() > logging.INFO:
            logger.setLevel(logging.INFO)
    last = []

    def emit(line: dict) -> None:
        last[:] = [hub.put.remote(key, line)]

    try:
        return execute(spec, emit)
    finally:
        if last:
            ray.get(last[0])  # actor calls run in order: every line is in the hub now
        if handler is not None:
            logger.removeHandler(handler)
            handler.close()
        logger.setLevel(before)


class _RayJob(JobHandle):
    def __init__(self, name, spec, log_path, on_progress, ray, ref):
        super().__init__(name, "ray", spec, log_path, on_progress)
        self.ray, self.ref = ray, ref
        self.cancelled = False

    def cancel(self, grace_s: float = TERMINATE_GRACE_S) -> None:
        self.cancelled = True
        try:
            self.ray.cancel(self.ref)  # a KeyboardInterrupt in the task
        except Exception:  # noqa: BLE001 - already ended or gone
            return

        def kill_later() -> None:
            ready, _ = self.ray.wait([self.ref], timeout=grace_s)
            if not ready:
                with contextlib.suppress(Exception):  # it may end meanwhile
                    self.ray.cancel(self.ref, force=True)  # kills the worker process

        threading.Thread(target=kill_later, name=f"cancel-{self.name}", daemon=True).start()

    def _result(self) -> dict:
        from ray import exceptions as rex

        try:
            result = self.ray.get(self.ref)
        except rex.TaskCancelledError:
            result = failure(self.spec, "cancelled")
        except (rex.WorkerCrashedError, rex.NodeDiedError, rex.OwnerDiedError, rex.ObjectLostError) as exc:
            result = failure(self.spec, f"the Ray worker died: {type(exc).__name__}")
        except rex.RayError as exc:
            cause = getattr(exc, "cause", None) or exc
            if isinstance(cause, KeyboardInterrupt) or self.cancelled:
                result = failure(self.spec, "cancelled")
            else:
                result = failure(self.spec, f"{type(cause).__name__}: {cause}".splitlines()[0])
        self._close_log()
        return result


class RayExecutor(Executor):
    """One Ray task per job (module docstring), with ``num_gpus`` and ``num_cpus`` each (a job's
    threads are its CPUs). Connects to the cluster at ``address`` (None: ``RAY_ADDRESS`` or a
    cluster started by ``ray start`` on this machine, else a new local one; ``"local"``: a new
    local one), unless Ray is already initialised here; ``init_options``: more ``ray.init``
    arguments for a cluster it starts (e.g. ``num_cpus``). ``capacity``: most jobs submitted at
    once (None: every job is submitted and Ray queues them). ``logs``: as the local pool's.

    Raises:
        ConfigError: Ray is not installed.
    """

    def __init__(
        self,
        address: str | None = None,
        num_gpus: float = 0.0,
        num_cpus: float = 1.0,
        logs: Path | None = None,
        *,
        capacity: int | None = None,
        init_options: dict | None = None,
    ):
        super().__init__(logs)
        try:
            import ray
        except ImportError as exc:
            raise ConfigError('the Ray executor needs ray: pip install "splatforge[ray]"') from exc
        self.ray = ray
        self.started = False
        if not ray.is_initialized():
            options = {"include_dashboard": False, "log_to_driver": False, "ignore_reinit_error": True}
            ray.init(address=address, **(options | (init_options or {})))
            self.started = True
        self.num_gpus, self.num_cpus, self.capacity = num_gpus, num_cpus, capacity
        self._hub = None
        self._tasks: dict[tuple[float, float], Any] = {}

    @classmethod
    def for_server(cls, address: str | None = None, jobs: int | None = None) -> RayExecutor:
        """An executor for a job server: on the cluster at ``address`` (None: a new local one
        with this machine's cores), at most ``jobs`` at once (default: one per GPU of the
        cluster, else one per node); each job takes a GPU and a CPU on a cluster with GPUs, else
        the cores of the smallest node shared by the jobs per node.

        Raises:
            ConfigError: Ray is not installed, or the cluster has no live node.
        """
        ex = cls(address or "local", init_options=None if address else {"num_cpus": os.cpu_count() or 1})
        nodes = [n.get("Resources", {}) for n in ex.ray.nodes() if n.get("Alive")]
        if not nodes:
            raise ConfigError(f"the Ray cluster at {address or 'local'} has no live node")
        gpus = int(sum(n.get("GPU", 0) for n in nodes))
        if gpus:
            ex.num_gpus, ex.num_cpus, ex.capacity = 1.0, 1.0, jobs or gpus
        else:
            ex.capacity = jobs or len(nodes)
            per_node = -(-ex.capacity // len(nodes))
            ex.num_cpus = float(max(1, int(min(n.get("CPU", 1) for n in nodes)) // per_node))
        log.info(
            "Ray executor: %d nodes, %d jobs at once, %g CPUs and %g GPUs each",
            len(nodes),
            ex.capacity,
            ex.num_cpus,
            ex.num_gpus,
        )
        return ex

    def _start(self, spec, name, log_path, workdir, on_progress, banner) -> JobHandle:
        if self._hub is None:
            self._hub = self.ray.remote(num_cpus=0)(_ProgressHub).remote()
        if self.num_gpus > 0:
            spec = _on_gpu(spec)
        key = (self.num_cpus, self.num_gpus)
        if key not in self._tasks:
            self._tasks[key] = self.ray.remote(num_cpus=self.num_cpus, num_gpus=self.num_gpus)(_ray_job)
        task = self._tasks[key]
        ref = task.remote(spec, name, self._hub, str(log_path) if log_path is not None else None)
        handle = _RayJob(name, spec, log_path, on_progress, self.ray, ref)
        if banner:
            handle._write_log(f"{banner} on ray\n".encode())
        log.info("job %s: submitted to Ray", name)
        return handle

    def _drain(self) -> None:
        if self._hub is None:
            return
        lines = self.ray.get(self._hub.drain.remote())
        with self._lock:
            handles = dict(self._running)
        for key, batch in lines.items():
            handle = handles.get(key)
            if handle is not None:
                for line in batch:
                    handle._progress(line)

    def poll(self) -> list[tuple[JobHandle, dict]]:
        handles = self.running()
        self._drain()
        if not handles:
            return []
        refs = [h.ref for h in handles]
        ready, _ = self.ray.wait(refs, num_returns=len(refs), timeout=0)
        if not ready:
            return []
        self._drain()  # the lines a task put before it returned
        done = set(ready)
        out = []
        for h in handles:
            if h.ref in done:
                result = h._result()
                with self._lock:
                    del self._running[h.name]
                out.append((h, result))
        return out

    def close(self, shutdown: bool = False) -> None:
        """Stop what still runs and end the progress actor; with ``shutdown``, disconnect from
        Ray too (ending a local cluster this process started). Without it Ray stays initialised
        for the next executor of this process."""
        super().close()
        if self._hub is not None:
            with contextlib.suppress(Exception):  # it may be gone with its cluster
                self.ray.kill(self._hub)
            self._hub = None
        if shutdown:
            self.ray.shutdown()


# ----------------------------------------------------------------------------------- the worker


def main(argv: list[str] | None = None) -> int:
    """Worker entry: ``python -m splatforge.pipeline.executors SPEC.json RESULT.json``. Progress
    lines go to stdout (one JSON object a line; whatever else would be printed there goes to
    stderr), logs to stderr; the result is written to ``RESULT.json``; exits 0 when the job is
    done, 1 when it failed, 2 on a bad command line."""
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2:
        sys.stderr.write("usage: python -m splatforge.pipeline.executors SPEC.json RESULT.json\n")
        return 2
    progress = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # stray prints (Python's or a library's) must not mix with the progress lines
    sys.stdout = sys.stderr
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("numba").setLevel(logging.WARNING)
    threads = os.environ.get("SPLATFORGE_THREADS")
    if threads:
        import torch

        torch.set_num_threads(int(threads))

    def emit(line: dict) -> None:
        try:
            progress.write(json.dumps(line, default=str) + "\n")
        except (OSError, ValueError):  # the reader is gone: the job itself goes on
            pass

    try:
        spec = json.loads(Path(argv[0]).read_text())
    except (OSError, ValueError) as exc:
        spec, result = {}, {"status": "failed", "error": f"{argv[0]}: cannot read the job spec: {exc}"}
    else:
        result = execute(spec, emit)
    with atomic_path(Path(argv[1])) as tmp:
        tmp.write_text(json.dumps(result, indent=1, default=str))
    return 0 if result.get("status") == "done" else 1


if __name__ == "__main__":
    sys.exit(main())
