"""``serve`` and ``submit``: the job server and its client."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import tyro
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from splatforge.cli.common import STDERR
from splatforge.errors import ConfigError, SplatforgeError


@dataclass
class ServeCommand:
    """A job server: FastAPI on uvicorn, jobs in DATA_DIR/jobs.db (SQLite), one workspace per job
    in DATA_DIR/jobs/<id>/ (the splatter job-root layout), jobs run by generate's local pool
    or as Ray tasks (--executor ray). Refuses a non-loopback address without a token. API: see
    the README."""

    host: str = "127.0.0.1"
    port: int = 8000
    data_dir: Path = Path("splatforge-data")
    """Jobs database and workspaces."""
    token: str | None = None
    """Bearer token the clients must send (default: --token-file, else $SPLATFORGE_TOKEN)."""
    token_file: Path | None = None
    """File whose first line is the token."""
    max_upload_mb: float = 2048
    """Largest upload accepted (413 above)."""
    workers: int | None = None
    """Local: CPU worker processes when there is no GPU (default 1; with GPUs: slots by NVML).
    Ray: most jobs at once (default: one per GPU of the cluster, else one per node)."""
    executor: Literal["local", "ray"] = "local"
    """Where jobs run: local subprocesses, or Ray tasks (needs ray: pip install "splatforge[ray]";
    the workspaces in --data-dir must be reachable at the same path from every Ray node)."""
    ray_address: str | None = None
    """The Ray cluster to use with --executor ray, e.g. HOST:6379 or auto (default: start a local
    Ray with this machine's cores)."""

    def main(self) -> None:
        import ipaddress

        import uvicorn

        from splatforge.server.app import ServerConfig, create_app

        token = self.token
        if token is None and self.token_file is not None:
            try:
                token = self.token_file.read_text().strip().splitlines()[0].strip()
            except (OSError, IndexError) as exc:
                raise ConfigError(f"{self.token_file}: cannot read a token: {exc}") from exc
        token = token or os.environ.get("SPLATFORGE_TOKEN") or None
        try:
            loopback = self.host == "localhost" or ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            loopback = False
        if not loopback and not token:
            raise ConfigError(
                f"refusing to listen on {self.host} without a token: give --token, --token-file or $SPLATFORGE_TOKEN"
            )
        if self.ray_address is not None and self.executor != "ray":
            raise ConfigError("--ray-address needs --executor ray")
        config = ServerConfig(self.data_dir, token, self.max_upload_mb, self.workers, self.executor, self.ray_address)
        app = create_app(config)
        STDERR.print(
            f"splatforge serve: http://{self.host}:{self.port}  "
            f"(data: {self.data_dir}, token: {'yes' if token else 'none'}, executor: {self.executor})"
        )
        uvicorn.run(app, host=self.host, port=self.port, log_level="info", access_log=False)


@dataclass
class SubmitCommand:
    """Submit a job to a splatforge server: a .zip of a job root (or the folder itself), or
    videos/photos. Prints the job as JSON; --wait shows a progress bar and downloads the
    artifacts into --output."""

    inputs: tyro.conf.Positional[list[Path]]
    """A job-root .zip or folder, or videos/photos."""
    server: str = "http://127.0.0.1:8000"
    token: str | None = None
    """Bearer token (default: $SPLATFORGE_TOKEN)."""
    options: str | None = None
    """Splatter options as JSON, e.g. '{"steps": 3000, "data_factor": 2}'."""
    idempotency_key: str | None = None
    wait: bool = False
    """Wait for the job to end (progress bar), then download its artifacts."""
    output: Path | None = None
    """Folder for the artifacts with --wait (default: ./<job id>)."""

    def main(self) -> None:

        from splatforge.server.client import Client

        try:
            options = json.loads(self.options) if self.options else None
        except ValueError as exc:
            raise ConfigError(f"--options is not JSON: {exc}") from exc
        with Client(self.server, self.token or os.environ.get("SPLATFORGE_TOKEN")) as client:
            job = client.submit(self.inputs, options, self.idempotency_key)
            STDERR.print(f"job {job['id']}: {job['status']}")
            if self.wait:
                columns = [
                    TextColumn("[bold]{task.fields[stage]}"),
                    BarColumn(),
                    TextColumn("{task.percentage:>3.0f}%"),
                    TextColumn("{task.fields[detail]}"),
                    TimeElapsedColumn(),
                ]
                with Progress(*columns, console=STDERR) as bar:
                    task = bar.add_task("job", total=100, stage="queued", detail="")

                    def update(j: dict) -> None:
                        p = j.get("progress") or {}
                        detail = f"step {p['step']}/{p.get('steps', p['step'])}" if "step" in p else j["status"]
                        bar.update(task, completed=p.get("pct", 0), stage=p.get("stage", j["status"]), detail=detail)

                    job = client.wait(job["id"], on_update=update)
                if job["status"] != "succeeded":
                    raise SplatforgeError(f"job {job['id']} {job['status']}: {job.get('error')}")
                folder = self.output or Path(job["id"])
                paths = client.download_all(job, folder)
                STDERR.print(f"{len(paths)} artifacts -> {folder}")
        print(json.dumps(job, indent=2))
