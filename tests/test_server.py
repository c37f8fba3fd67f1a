"""``splatforge serve``: a real uvicorn process on 127.0.0.1 started and stopped by the tests, the
client of ``splatforge submit``, headless Chromium for the page. Every wait is bounded."""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import zipfile
from pathlib import Path

import pytest
from scenes import datasets_dir, needs_datasets

from splatforge.server.client import Client, ServerError, zip_job_root

JOB = datasets_dir() / "skull_splatter_job"
TOKEN = "s3cret-token"
needs_job = needs_datasets("skull_splatter_job/datasets")
SMALL = {"steps": 300, "data_factor": 2, "checkpoint_every": 50, "preview_size": 128}
TINY = {"steps": 30, "data_factor": 4, "checkpoint_every": 0, "preview_size": 64}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """``splatforge serve`` as a subprocess (its own process group), on a free port."""

    def __init__(self, data_dir: Path, port: int, *extra: str):
        self.data_dir, self.port, self.extra = data_dir, port, extra
        self.url = f"http://127.0.0.1:{port}"
        self.proc = None

    def start(self, timeout: float = 60) -> Server:
        log = open(self.data_dir.parent / f"server-{self.port}.log", "ab")  # noqa: SIM115 - kept for the process
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "splatforge.cli",
                "serve",
                "--port",
                str(self.port),
                "--data-dir",
                str(self.data_dir),
                "--token",
                TOKEN,
                "--workers",
                "1",
                *self.extra,
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}")
            try:
                if httpx.get(f"{self.url}/healthz", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise TimeoutError("server did not start")

    def kill(self) -> None:
        """SIGKILL, as a crash would."""
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def job_zip(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("zip")
    return zip_job_root(JOB, tmp / "skull_job.zip")


@pytest.fixture()
def server(tmp_path):
    srv = Server(tmp_path / "data", free_port(), "--max-upload-mb", "40").start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def shared_server(tmp_path_factory):
    """One server for the tests that create no job (start-up costs seconds)."""
    srv = Server(tmp_path_factory.mktemp("shared") / "data", free_port(), "--max-upload-mb", "40").start()
    yield srv
    srv.stop()


def wait_for(pred, timeout: float, poll: float = 0.5, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = pred()
        if value:
            return value
        time.sleep(poll)
    raise TimeoutError(f"{what} not reached in {timeout:.0f} s")


def test_auth_health_and_unknown_jobs(shared_server):
    import httpx

    server = shared_server
    assert httpx.get(f"{server.url}/healthz").json() == {"status": "ok"}
    r = httpx.get(f"{server.url}/api/jobs")
    assert r.status_code == 401 and "token" in r.json()["error"] and r.headers["www-authenticate"] == "Bearer"
    assert httpx.get(f"{server.url}/api/jobs", headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert httpx.get(f"{server.url}/").status_code == 401
    assert httpx.get(f"{server.url}/?token={TOKEN}").status_code == 200
    with Client(server.url, TOKEN) as c:
        assert c.jobs() == []
        for call in (lambda: c.job("nope"), lambda: c.cancel("nope"), lambda: c.log("nope")):
            with pytest.raises(ServerError) as e:
                call()
            assert e.value.status == 404


def _zip(members: dict[str, bytes | None], symlink: str | None = None) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for name, data in members.items():
            z.writestr(name, data or b"x")
        if symlink:
            info = zipfile.ZipInfo(symlink)
            info.external_attr = 0o120777 << 16
            z.writestr(info, "/etc/passwd")
    return buf.getvalue()


LAYOUT = {
    "datasets/d/Frames.mp4": None,
    "refined/global/refined_sfm_combined/cameras.bin": None,
    "refined/global/refined_sfm_combined/images.bin": None,
    "refined/global/refined_sfm_combined/points3D.bin": None,
}


@pytest.mark.parametrize(
    "case, status, message",
    [
        ("absolute", 400, "absolute path"),
        ("dotdot", 400, "'..'"),
        ("symlink", 400, "symbolic link"),
        ("no layout", 400, "no recognisable job root"),
        ("not a zip", 400, "not a zip"),
        ("too big", 413, "limit"),
        ("bad options", 400, "unknown option"),
        ("both", 400, "either one"),
        ("not a capture", 400, "neither a video"),
    ],
)
def test_bad_uploads_are_refused_and_leave_nothing(shared_server, case, status, message):
    import httpx

    server = shared_server
    files, data = None, {}
    if case == "absolute":
        files = {"file": ("a.zip", _zip(LAYOUT | {"/etc/evil": None}))}
    elif case == "dotdot":
        files = {"file": ("a.zip", _zip(LAYOUT | {"datasets/../../evil": None}))}
    elif case == "symlink":
        files = {"file": ("a.zip", _zip(LAYOUT, symlink="datasets/link"))}
    elif case == "no layout":
        files = {"file": ("a.zip", _zip({"datasets/d/other.mp4": None}))}
    elif case == "not a zip":
        files = {"file": ("a.zip", b"PK not really")}
    elif case == "too big":
        files = {"file": ("a.zip", b"0" * (41 * 2**20))}
    elif case == "bad options":
        files, data = {"file": ("a.zip", _zip(LAYOUT))}, {"options": json.dumps({"stepz": 3})}
    elif case == "both":
        files = [("file", ("a.zip", _zip(LAYOUT))), ("files", ("v.mp4", b"x"))]
    elif case == "not a capture":
        files = {"files": ("notes.txt", b"hello")}
    r = httpx.post(
        f"{server.url}/api/jobs", files=files, data=data, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=60
    )
    assert r.status_code == status, r.text
    body = r.json()
    assert message in body["error"] and body["request_id"] and "Traceback" not in r.text
    with Client(server.url, TOKEN) as c:
        assert c.jobs() == []
    assert not [p for p in (server.data_dir / "jobs").iterdir()]


@needs_job
@pytest.mark.slow
def test_submit_poll_download_and_crash_resume(server, job_zip, tmp_path):
    """A job trains; the server is SIGKILLed mid-training and started again: the job resumes
    from its checkpoint and finishes, once; its artifacts download whole."""
    with Client(server.url, TOKEN) as c:
        job = c.submit([job_zip], SMALL, idempotency_key="k-1")
        assert job["status"] == "queued" and job["options"] == SMALL
        assert c.submit([job_zip], SMALL, idempotency_key="k-1")["id"] == job["id"]  # same key, same job
        wait_for(lambda: (c.job(job["id"]).get("progress") or {}).get("step", 0) >= 120, 240, what="step 120")
    server.kill()
    wait_for(lambda: not _workers_alive(job["id"]), 10, what="the worker's death with the server")
    server.start()
    with Client(server.url, TOKEN) as c:
        done = c.wait(job["id"], timeout=400)
        assert done["status"] == "succeeded", c.log(job["id"])[-3000:]
        assert done["attempts"] == 2 and len(c.jobs()) == 1
        log = c.log(job["id"])
        assert "--- attempt 2" in log and '"resumed_from": ' in log
        resumed = [
            json.loads(line)["resumed_from"]
            for line in log.splitlines()
            if line.startswith("{") and '"resumed_from"' in line
        ]
        assert resumed[0] is None and resumed[-1] >= 100  # attempt 2 started from a checkpoint
        names = {a["name"]: a for a in done["artifacts"]}
        assert {
            "refined_splat",
            "refined_splat_preview_top",
            "refined_splat_preview_video",
            "splat.ply",
            "result.json",
        } <= names.keys()
        folder = tmp_path / "download"
        paths = c.download_all(done, folder)
        for a in done["artifacts"]:
            assert (folder / a["filename"]).stat().st_size == a["bytes"]
        result = json.loads((folder / "result.json").read_text())
        assert result["train"]["resumed"] is True and result["train"]["steps"] == 300
        assert len(paths) == len(done["artifacts"])
        with pytest.raises(ServerError) as e:
            c.cancel(job["id"])
        assert e.value.status == 409
        _page_screenshot(server, tmp_path, job["id"])


def _workers_alive(job_id: str) -> bool:
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if job_id.encode() in (proc / "cmdline").read_bytes():
                    return True
            except OSError:
                continue
    return False


def _page_screenshot(server, tmp_path: Path, job_id: str) -> None:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        return
    shot = tmp_path / "page.png"
    flags = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={tmp_path / 'chrome'}",
        "--virtual-time-budget=8000",
    ]
    url = f"{server.url}/?token={TOKEN}"
    dom = subprocess.run(
        [chromium, *flags, "--dump-dom", url], capture_output=True, text=True, timeout=120, check=False
    ).stdout
    assert f"job-{job_id}" in dom and "succeeded" in dom and "refined_splat" in dom
    subprocess.run(
        [chromium, *flags, f"--screenshot={shot}", "--window-size=1200,500", url],
        capture_output=True,
        timeout=120,
        check=False,
    )
    assert shot.stat().st_size > 5000
    docs = Path(__file__).resolve().parents[1] / "docs" / "server_page.png"
    if os.environ.get("SPLATFORGE_UPDATE_DOCS"):
        shutil.copy(shot, docs)


@needs_job
def test_cancel_twenty_concurrent_submissions_none_lost(server, job_zip):
    """20 submissions at once: 20 distinct jobs, all listed; the running one is cancelled
    (SIGTERM to its worker) and the queued ones too; a cancelled job stays cancelled."""
    results, errors = [], []

    def one(i: int) -> None:
        try:
            with Client(server.url, TOKEN) as c:
                results.append(c.submit([job_zip], {"steps": 2000, "data_factor": 4, "checkpoint_every": 0}))
        except Exception as exc:  # noqa: BLE001 - collected and asserted below
            errors.append(exc)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors and len(results) == 20
    ids = {j["id"] for j in results}
    assert len(ids) == 20
    with Client(server.url, TOKEN) as c:
        assert {j["id"] for j in c.jobs()} == ids
        first = wait_for(
            lambda: next((j for j in c.jobs() if j["status"] == "running"), None), 60, what="a running job"
        )
        wait_for(lambda: _workers_alive(first["id"]), 30, what="its worker")
        for j in sorted(ids - {first["id"]}) + [first["id"]]:  # the queued first: none may start meanwhile
            assert c.cancel(j)["status"] == "cancelled"
        wait_for(lambda: not _workers_alive(first["id"]), 15, what="the cancelled worker's end")
        time.sleep(1.5)
        statuses = {j["id"]: j["status"] for j in c.jobs()}
        assert set(statuses.values()) == {"cancelled"} and statuses.keys() == ids
        assert all(c.job(j)["started_ms"] is None for j in ids - {first["id"]})  # none of the others ran
        with pytest.raises(ServerError) as e:
            c.cancel(first["id"])
        assert e.value.status == 409


@needs_job
@pytest.mark.slow
def test_captures_are_posed_by_prepare_and_trained(server, tmp_path, capsys):
    """``splatforge submit PHOTOS... --wait``: the job runs prepare (SfM) on the photos, then
    the same training, exports and result as a job root; the client downloads every artifact."""
    from splatforge.cli import main

    photos = sorted((datasets_dir() / "skull" / "images_8").iterdir())  # 66 photos at 266x177
    out = tmp_path / "artifacts"
    rc = main(
        [
            "submit",
            *map(str, photos),
            "--server",
            server.url,
            "--token",
            TOKEN,
            "--wait",
            "--output",
            str(out),
            "--options",
            json.dumps({"steps": 60, "preview_size": 64, "test_every": 0}),
        ]
    )
    job = json.loads(capsys.readouterr().out)
    assert rc == 0 and job["status"] == "succeeded" and job["kind"] == "captures"
    for a in job["artifacts"]:
        assert (out / a["filename"]).stat().st_size == a["bytes"] > 0
    result = json.loads((out / "result.json").read_text())
    assert result["frames"]["prepare"]["num_images"] == 66 and result["frames"]["count"] >= 40
    assert result["train"]["steps"] == 60 and result["train"]["test_views"] == 0
    assert {"refined_splat", "splat.ply"} <= {a["name"] for a in job["artifacts"]}
    uploads = sorted(p.name for p in (server.data_dir / "jobs" / job["id"] / "uploads").iterdir())
    assert uploads == [p.name for p in photos]


@needs_job
def test_ray_executor_runs_a_job_end_to_end(tmp_path, job_zip):
    """``serve --executor ray`` (a local Ray started by the server): a short job runs as a Ray
    task; its progress lines feed the job's ``progress``, its log has them and the task's logs,
    its artifacts are listed."""
    pytest.importorskip("ray")
    server = Server(tmp_path / "data", free_port(), "--executor", "ray").start(timeout=120)
    try:
        with Client(server.url, TOKEN) as c:
            job = c.submit([job_zip], TINY)
            stages = set()
            done = c.wait(
                job["id"], timeout=240, poll=0.5, on_update=lambda j: stages.add((j.get("progress") or {}).get("stage"))
            )
            log = c.log(job["id"])
            assert done["status"] == "succeeded", log[-3000:]
            assert done["progress"] == done["progress"] | {"pct": 100, "stage": "complete", "status": "succeeded"}
            assert "train" in stages or "export" in stages or "previews" in stages, stages
            assert log.startswith("--- attempt 1 on ray\n")
            lines = [json.loads(x) for x in log.splitlines() if x.startswith("{")]
            assert {"frames", "train", "export", "complete"} <= {x["stage"] for x in lines}
            assert any(x["stage"] == "train" and x["status"] == "running" for x in lines)
            assert "INFO splatforge.products.export" in log  # the task's own log records
            assert {"refined_splat", "splat.ply", "result.json"} <= {a["name"] for a in done["artifacts"]}
    finally:
        server.stop()
    assert "executor: ray" in (tmp_path / f"server-{server.port}.log").read_text()


def test_refuses_a_public_address_without_a_token(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "SPLATFORGE_TOKEN"}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "splatforge.cli",
            "serve",
            "--host",
            "0.0.0.0",
            "--port",
            str(free_port()),
            "--data-dir",
            str(tmp_path / "d"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        check=False,
    )
    assert proc.returncode == 1 and "without a token" in proc.stderr.strip().splitlines()[-1]
