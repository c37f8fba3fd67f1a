"""``manifest.json``: what each stage of one output folder did, so reruns redo only what changed.

Per stage: ``hash`` (of its inputs and config, see :func:`stage_hash`), ``status``
(``running``, ``done`` or ``failed``), ``outputs`` (relative paths with their sizes),
``seconds``, ``finished_at`` (a counter: the value of ``runs`` when it finished), and ``error``
for a failure. Every update rewrites the file atomically (temp file, then rename), so a process
killed at any moment leaves either the old or the new manifest, never a torn one.

A stage is **fresh** when it is ``done`` with the same hash and every recorded output still exists
with its recorded size.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from splatforge._fs import atomic_path

__all__ = ["Manifest", "stage_hash"]


def stage_hash(*parts: Any) -> str:
    """sha256 of the canonical JSON of ``parts`` (configs, upstream hashes, input fingerprints)."""
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


class Manifest:
    """The manifest of one output folder (created on first write)."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.path = self.folder / "manifest.json"
        self.data: dict[str, Any] = {"runs": 0, "stages": {}}
        if self.path.exists():
            try:
                self.data = json.loads(self.path.read_text())
            except ValueError:
                self.data = {"runs": 0, "stages": {}}  # unreadable: treat every stage as not done

    def save(self) -> None:
        with atomic_path(self.path) as tmp:
            tmp.write_text(json.dumps(self.data, indent=1))

    def begin_run(self) -> int:
        self.data["runs"] = int(self.data.get("runs", 0)) + 1
        self.save()
        return self.data["runs"]

    def stage(self, name: str) -> dict[str, Any]:
        return self.data["stages"].get(name, {})

    def is_fresh(self, name: str, digest: str) -> bool:
        rec = self.stage(name)
        if rec.get("status") != "done" or rec.get("hash") != digest:
            return False
        for rel, size in rec.get("outputs", {}).items():
            p = self.folder / rel
            if not p.is_file() or p.stat().st_size != size:
                return False
        return True

    def start(self, name: str, digest: str) -> None:
        self.data["stages"][name] = {"hash": digest, "status": "running", "started": time.time()}
        self.save()

    def finish(self, name: str, outputs: Iterable[Path], seconds: float, extra: dict | None = None) -> None:
        rec = self.data["stages"][name]
        files = {}
        for p in outputs:
            p = Path(p)
            if p.is_file():  # relative to the folder (``../`` for a job's files beside it, splatter's frames)
                files[os.path.relpath(p, self.folder)] = p.stat().st_size
        rec.update(status="done", outputs=files, seconds=round(seconds, 3), finished_at=self.data.get("runs", 0))
        if extra:
            rec.update(extra)
        rec.pop("error", None)
        self.save()

    def fail(self, name: str, error: str, seconds: float) -> None:
        rec = self.data["stages"].setdefault(name, {})
        rec.update(status="failed", error=error, seconds=round(seconds, 3), finished_at=self.data.get("runs", 0))
        self.save()

    def drop(self, name: str) -> None:
        if self.data["stages"].pop(name, None) is not None:
            self.save()
