"""The job server's HTTP client (httpx): what ``splatforge submit`` and the tests use."""

from __future__ import annotations

import json
import os
import tempfile
import time
import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path

from splatforge._fs import atomic_path
from splatforge.errors import SplatforgeError

__all__ = ["Client", "ServerError", "zip_job_root"]


class ServerError(SplatforgeError):
    """The server answered with an error: ``status`` and its ``{"error"}`` message."""

    def __init__(self, status: int, message: str):
        super().__init__(f"server answered {status}: {message}")
        self.status = status


def zip_job_root(folder: Path, dest: Path) -> Path:
    """Zip the job root ``folder`` (its ``datasets/`` and ``refined/global/``; symlinks followed)
    into ``dest`` (stored: videos do not compress)."""
    folder = Path(folder)
    with atomic_path(dest) as tmp, zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED) as z:
        for sub in ("datasets", "refined/global"):
            for path in sorted((folder / sub).rglob("*")):
                if path.is_file():
                    z.write(path, path.relative_to(folder).as_posix())
    return Path(dest)


class Client:
    """``Client("http://127.0.0.1:8000", token)``: submit, poll, cancel, download."""

    def __init__(self, server: str, token: str | None = None, timeout: float = 60.0):
        import httpx

        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.http = httpx.Client(base_url=server.rstrip("/"), headers=headers, timeout=timeout)

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> Client:  # noqa: PYI034
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _check(self, r):
        if r.status_code >= 400:
            try:
                message = r.json().get("error", r.text)
            except ValueError:
                message = r.text
            raise ServerError(r.status_code, message)
        return r

    def submit(self, paths: Sequence[Path], options: dict | None = None, idempotency_key: str | None = None) -> dict:
        """Submit a job: one ``.zip`` (or job-root folder, zipped here) or videos/photos.

        Raises:
            ServerError: the server refused it (status and message).
            SplatforgeError: a path that does not exist.
        """
        paths = [Path(p) for p in paths]
        for p in paths:
            if not p.exists():
                raise SplatforgeError(f"{p}: no such file or folder")
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        data = {"options": json.dumps(options)} if options else {}
        with tempfile.TemporaryDirectory() as tmp:
            if len(paths) == 1 and paths[0].is_dir():
                paths = [zip_job_root(paths[0], Path(tmp) / f"{paths[0].name}.zip")]
            field = "file" if len(paths) == 1 and paths[0].suffix.lower() == ".zip" else "files"
            handles = [open(p, "rb") for p in paths]  # noqa: SIM115 - closed below
            try:
                files = [(field, (p.name, h, "application/octet-stream")) for p, h in zip(paths, handles)]
                return self._check(self.http.post("/api/jobs", files=files, data=data, headers=headers)).json()
            finally:
                for h in handles:
                    h.close()

    def job(self, job_id: str) -> dict:
        return self._check(self.http.get(f"/api/jobs/{job_id}")).json()

    def jobs(self) -> list[dict]:
        return self._check(self.http.get("/api/jobs")).json()["jobs"]

    def cancel(self, job_id: str) -> dict:
        return self._check(self.http.delete(f"/api/jobs/{job_id}")).json()

    def log(self, job_id: str) -> str:
        return self._check(self.http.get(f"/api/jobs/{job_id}/log")).text

    def download(self, job_id: str, name: str, dest: Path) -> Path:
        """Stream artifact ``name`` into ``dest`` (atomically)."""
        with (
            atomic_path(dest) as tmp,
            open(tmp, "wb") as out,
            self.http.stream("GET", f"/api/jobs/{job_id}/artifacts/{name}") as r,
        ):
            if r.status_code >= 400:
                r.read()
                self._check(r)
            out.writelines(r.iter_bytes(1 << 20))
        return Path(dest)

    def wait(
        self,
        job_id: str,
        timeout: float = 24 * 3600,
        poll: float = 1.0,
        on_update: Callable[[dict], None] | None = None,
    ) -> dict:
        """Poll until the job ends (or ``timeout`` seconds pass: TimeoutError); returns it."""
        deadline = time.monotonic() + timeout
        while True:
            job = self.job(job_id)
            if on_update is not None:
                on_update(job)
            if job["status"] in ("succeeded", "failed", "cancelled"):
                return job
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still {job['status']} after {timeout:.0f} s")
            time.sleep(poll)

    def download_all(self, job: dict, folder: Path) -> list[Path]:
        folder = Path(folder)
        os.makedirs(folder, exist_ok=True)
        return [self.download(job["id"], a["name"], folder / a.get("filename", a["name"])) for a in job["artifacts"]]
