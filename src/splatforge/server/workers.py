"""The job server's workers: each running job is one ``splatforge splatter`` subprocess on a slot
of the local executor ``generate`` uses (:func:`splatforge.pipeline.generate.local_slots`: GPU
slots by NVML, else CPU workers with an equal share of the cores).

A job's subprocess runs in its own process group (cancel: SIGTERM to the group, SIGKILL after
:data:`TERMINATE_GRACE_S`, as the node's runner does) and dies with the server (Linux's
parent-death signal), so a killed server leaves no orphan training into a workspace; at start-up,
jobs left ``running`` are queued again (after any worker of theirs that survived is killed) and
resume from their checkpoints. Progress lines from the worker's stdout go to the store; stdout
and stderr go to ``jobs/<id>/job.log``.
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from splatforge.pipeline.generate import Slot, local_slots, slot_env
from splatforge.server.store import JobStore

log = logging.getLogger(__name__)

__all__ = ["Supervisor", "TERMINATE_GRACE_S", "OPTIONS", "worker_command"]

TERMINATE_GRACE_S = 10.0
OPTIONS = {"steps": int, "max_gaussians": int, "strategy": ("default", "mcmc"), "data_factor": int,
           "preset": ("auto", "fast", "default", "quality"), "checkpoint_every": int, "test_every": int, "preview_size": int,
           "seed": int}  # fmt: skip
"""The splatter options a submission may set: a non-negative integer, or one of the choices.
Each is the ``splatforge splatter`` flag of that name (``--max-gaussians`` for ``max_gaussians``)."""

_PR_SET_PDEATHSIG = 1
try:  # resolved here, in the parent: the child between fork and exec only makes the call
    _PRCTL = ctypes.CDLL(None, use_errno=True).prctl
except (OSError, AttributeError):  # not Linux: no parent-death signal (start-up still kills survivors)
    _PRCTL = None


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    if _PRCTL is not None:
        _PRCTL(_PR_SET_PDEATHSIG, signal.SIGKILL)


def worker_command(job: dict, workspace: Path) -> list[str]:
    """The worker's command line for ``job`` (a store row) in ``workspace``."""
    cmd = [sys.executable, "-m", "splatforge.cli", "splatter", "--job_root_path", str(workspace), "--job_id", job["id"]]
    for key, value in sorted(job["options"].items()):
        cmd += [f"--{key.replace('_', '-')}", str(value)]
    if job["kind"] == "captures":
        captures = sorted(str(p) for p in (workspace / "uploads").iterdir())
        cmd += ["--captures", *captures]
    return cmd


@dataclass
class _Running:
    proc: subprocess.Popen
    slot: int
    log_file: object
    reader: threading.Thread


class Supervisor:
    """Claims queued jobs from ``store`` while a slot is free and runs them (module docstring)."""

    def __init__(self, store: JobStore, jobs_dir: Path, workers: Optional[int] = None, slots: Optional[list[Slot]] = None):
        self.store, self.jobs_dir = store, Path(jobs_dir)
        self.slots = slots if slots is not None else local_slots(workers)
        self._running: dict[str, _Running] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    # ---------------------------------------------------------------- life cycle
    def start(self) -> None:
        for job in self.store.requeue_running():
            self._kill_survivor(job)
            log.info("job %s: was running when the server stopped; queued again (resumes from its checkpoint)", job["id"])
        self._thread = threading.Thread(target=self._loop, name="splatforge-supervisor", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop claiming, end the running workers (their jobs stay ``running`` in the store and
        are queued again at the next start)."""
        self._stop.set()
        with self._lock:
            running = list(self._running.items())
        for _, r in running:
            self._signal(r.proc, signal.SIGTERM)
        for _, r in running:
            try:
                r.proc.wait(timeout=TERMINATE_GRACE_S)
            except subprocess.TimeoutExpired:
                self._signal(r.proc, signal.SIGKILL)
        if self._thread is not None:
            self._thread.join(timeout=5)

    def workspace(self, job_id: str) -> Path:
        return self.jobs_dir / job_id

    # ---------------------------------------------------------------- cancel
    def cancel(self, job_id: str) -> bool:
        """Mark the job cancelled (unless it already ended) and end its worker: SIGTERM to its
        process group, SIGKILL after the grace period. True when the status changed."""
        changed = self.store.finish(job_id, "cancelled", "cancelled by request")
        with self._lock:
            r = self._running.get(job_id)
        if changed and r is not None:
            self._signal(r.proc, signal.SIGTERM)
            threading.Thread(target=self._kill_later, args=(r.proc,), daemon=True).start()
        return changed

    def _kill_later(self, proc: subprocess.Popen) -> None:
        try:
            proc.wait(timeout=TERMINATE_GRACE_S)
        except subprocess.TimeoutExpired:
            self._signal(proc, signal.SIGKILL)

    @staticmethod
    def _signal(proc: subprocess.Popen, sig: int) -> None:
        try:
            os.killpg(proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    def _kill_survivor(self, job: dict) -> None:
        """A worker of ``job`` still alive from the previous server (it should have died with
        it): kill its process group, so that the job never runs twice at once."""
        pid = job.get("pid")
        if not pid:
            return
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            return
        if job["id"].encode() not in cmdline:
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
            except Exception:  # noqa: BLE001 - the supervisor must outlive any one job's failure
                log.exception("supervisor: unexpected error (continuing)")
            self._stop.wait(0.2)

    def _free_slot(self) -> Optional[int]:
        used = {r.slot for r in self._running.values()}
        return next((i for i in range(len(self.slots)) if i not in used), None)

    def _launch(self) -> None:
        while not self._stop.is_set():
            with self._lock:
                slot = self._free_slot()
            if slot is None:
                return
            job = self.store.claim_next()
            if job is None:
                return
            ws = self.workspace(job["id"])
            log_file = open(ws / "job.log", "ab")  # noqa: SIM115 - closed when the job ends
            log_file.write(f"--- attempt {job['attempts']} on {self.slots[slot].label}\n".encode())
            log_file.flush()
            try:
                proc = subprocess.Popen(worker_command(job, ws), stdout=subprocess.PIPE, stderr=log_file, cwd=ws,
                                        env=slot_env(self.slots[slot], dict(os.environ, PYTHONUNBUFFERED="1")),
                                        start_new_session=True, preexec_fn=_die_with_parent)  # fmt: skip
            except OSError as exc:
                log_file.close()
                self.store.finish(job["id"], "failed", f"could not start the worker: {exc}")
                continue
            self.store.set_pid(job["id"], proc.pid)
            reader = threading.Thread(target=self._read_progress, args=(job["id"], proc, log_file), daemon=True)
            with self._lock:
                self._running[job["id"]] = _Running(proc, slot, log_file, reader)
            reader.start()
            log.info("job %s: started (pid %d, %s)", job["id"], proc.pid, self.slots[slot].label)

    def _read_progress(self, job_id: str, proc: subprocess.Popen, log_file) -> None:
        for raw in proc.stdout:
            log_file.write(raw)
            log_file.flush()
            try:
                line = json.loads(raw)
            except ValueError:
                continue
            if isinstance(line, dict) and "stage" in line:
                self.store.set_progress(job_id, line)

    def _reap(self) -> None:
        with self._lock:
            done = [(jid, r) for jid, r in self._running.items() if r.proc.poll() is not None]
        for job_id, r in done:
            r.reader.join(timeout=10)
            r.log_file.close()
            with self._lock:
                del self._running[job_id]
            if self._stop.is_set():
                continue  # ended by the server's own shutdown: queued again at the next start
            rc = r.proc.returncode
            if rc == 0:
                self.store.finish(job_id, "succeeded")
            else:
                self.store.finish(job_id, "failed", _last_error(self.workspace(job_id) / "job.log", rc))
            log.info("job %s: worker exited with %d", job_id, rc)


def _last_error(log_path: Path, rc: int) -> str:
    """The worker's last ``error: ...`` line, else a line with its exit code."""
    try:
        lines = log_path.read_text(errors="replace").splitlines()
    except OSError:
        lines = []
    for line in reversed(lines):
        if line.startswith("error: "):
            return line[len("error: ") :]
    return f"the worker exited with code {rc} (see the job's log)"
