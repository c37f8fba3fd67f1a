"""The job server's job store: one SQLite file (``DATA_DIR/jobs.db``, WAL journal), one row per
job. Status moves ``queued -> running -> succeeded | failed | cancelled`` (a restarted server
puts ``running`` jobs back to ``queued``: they resume from their checkpoints); a terminal status
never changes, enforced in every update's ``WHERE`` clause.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
import uuid
from pathlib import Path
from typing import Any

__all__ = ["STATUSES", "TERMINAL", "JobStore", "now_ms"]

STATUSES = ("queued", "running", "succeeded", "failed", "cancelled")
TERMINAL = ("succeeded", "failed", "cancelled")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    kind TEXT NOT NULL,              -- "job_root" (a zip in the node's layout) or "captures"
    status TEXT NOT NULL,
    options TEXT NOT NULL,           -- JSON: the splatter options
    idempotency_key TEXT UNIQUE,
    created_ms INTEGER NOT NULL,
    started_ms INTEGER,
    ended_ms INTEGER,
    error TEXT,
    progress TEXT,                   -- JSON: the latest progress line
    attempts INTEGER NOT NULL DEFAULT 0,
    pid INTEGER
);
CREATE INDEX IF NOT EXISTS jobs_status ON jobs(status, created_ms);
"""


def now_ms() -> int:
    return int(time.time() * 1000)


class JobStore:
    """Thread-safe access to ``jobs.db`` (one connection, serialised by a lock: the server is
    one process and its writes are tiny)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None, timeout=30)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(_SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _exec(self, sql: str, args: tuple = ()) -> sqlite3.Cursor:
        with self._lock:
            return self._db.execute(sql, args)

    @staticmethod
    def _row(row: sqlite3.Row | None) -> dict[str, Any] | None:
        if row is None:
            return None
        job = dict(row)
        job["options"] = json.loads(job["options"])
        job["progress"] = json.loads(job["progress"]) if job["progress"] else None
        return job

    @staticmethod
    def new_id() -> str:
        return uuid.uuid4().hex[:16]

    def create(self, job_id: str, kind: str, options: dict, idempotency_key: str | None = None) -> tuple[dict, bool]:
        """Insert a queued job; returns ``(job, True)``, or ``(the existing job, False)`` when
        ``idempotency_key`` was used before."""
        try:
            self._exec(
                "INSERT INTO jobs (id, kind, status, options, idempotency_key, created_ms) "
                "VALUES (?, ?, 'queued', ?, ?, ?)",
                (job_id, kind, json.dumps(options), idempotency_key, now_ms()),
            )
        except sqlite3.IntegrityError:
            existing = self.by_key(idempotency_key) if idempotency_key else None
            if existing is None:
                raise
            return existing, False
        return self.get(job_id), True

    def by_key(self, key: str) -> dict | None:
        return self._row(self._exec("SELECT * FROM jobs WHERE idempotency_key = ?", (key,)).fetchone())

    def get(self, job_id: str) -> dict | None:
        return self._row(self._exec("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone())

    def list(self, limit: int = 500) -> list[dict]:
        rows = self._exec("SELECT * FROM jobs ORDER BY created_ms DESC, id LIMIT ?", (limit,)).fetchall()
        return [self._row(r) for r in rows]

    def claim_next(self) -> dict | None:
        """The oldest queued job, now ``running`` (atomically), or None."""
        with self._lock:
            row = self._db.execute(
                "SELECT id FROM jobs WHERE status = 'queued' ORDER BY created_ms, id LIMIT 1"
            ).fetchone()
            if row is None:
                return None
            cur = self._db.execute(
                "UPDATE jobs SET status = 'running', started_ms = COALESCE(started_ms, ?), "
                "attempts = attempts + 1 WHERE id = ? AND status = 'queued'",
                (now_ms(), row["id"]),
            )
            if cur.rowcount != 1:
                return None
        return self.get(row["id"])

    def set_pid(self, job_id: str, pid: int | None) -> None:
        self._exec("UPDATE jobs SET pid = ? WHERE id = ?", (pid, job_id))

    def set_progress(self, job_id: str, line: dict) -> None:
        self._exec("UPDATE jobs SET progress = ? WHERE id = ? AND status = 'running'", (json.dumps(line), job_id))

    def finish(self, job_id: str, status: str, error: str | None = None) -> bool:
        """Set a terminal ``status`` unless the job already has one; True when it changed."""
        if status not in TERMINAL:
            raise ValueError(f"not a terminal status: {status}")
        cur = self._exec(
            "UPDATE jobs SET status = ?, error = ?, ended_ms = ?, pid = NULL WHERE id = ? "
            "AND status IN ('queued', 'running')",
            (status, error, now_ms(), job_id),
        )
        return cur.rowcount == 1

    def requeue_running(self) -> list[dict]:
        """At start-up: jobs left ``running`` by a server that died go back to ``queued``
        (returns them, with the pid their worker had)."""
        rows = [self._row(r) for r in self._exec("SELECT * FROM jobs WHERE status = 'running'").fetchall()]
        self._exec("UPDATE jobs SET status = 'queued' WHERE status = 'running'")
        return rows
