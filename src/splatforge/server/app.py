"""``splatforge serve``: capture jobs over HTTP (FastAPI on uvicorn).

``DATA_DIR/jobs.db`` (SQLite, WAL) holds the jobs; ``DATA_DIR/jobs/<id>/`` is each job's
workspace in the splatter job-root layout (``datasets/``, ``refined/``, ``Frames/``, and
``uploads/`` for captures), with the worker's ``job.log``. Jobs run on the local pool or on Ray
(``--executor``, :mod:`splatforge.server.workers`). Uploads are written under a temporary
name and the workspace appears whole (renamed into place) before the job row exists.

API (JSON; ``Authorization: Bearer TOKEN`` on everything but ``/healthz`` when the server has a
token; the page ``/`` also takes ``?token=``):

====================================  ==================================================================
``POST /api/jobs``                    multipart: ``file`` = a ``.zip`` of a job root, or ``files`` = videos
                                      and/or photos (posed by ``prepare``); ``options`` = JSON of splatter
                                      options (:data:`~splatforge.server.workers.OPTIONS`);
                                      ``Idempotency-Key`` header: the same key gives the same job. 201
``GET /api/jobs``                     ``{"jobs": [job, ...]}``, newest first
``GET /api/jobs/{id}``                a job: ``id, status, kind, progress, created_ms, started_ms,
                                      ended_ms, error, options, artifacts [{name, data_type, bytes, url}]``
``GET /api/jobs/{id}/artifacts/{n}``  an artifact's bytes (names as in ``artifacts``)
``GET /api/jobs/{id}/log``            the worker's log (text)
``DELETE /api/jobs/{id}``             cancel (SIGTERM, SIGKILL after 10 s); 409 once the job has ended
``GET /healthz``                      ``{"status": "ok"}`` (no token)
``GET /``                             a page listing the jobs
====================================  ==================================================================

Errors are ``{"error": message, "request_id": id}``: 400 a bad upload (zip with absolute paths,
``..``, symlinks or no recognisable layout; unknown options), 401 a missing or wrong token, 404
an unknown job or artifact, 409 a conflict, 413 an upload over ``--max-upload-mb``. A failure
inside the server is a 500 without a traceback; the log has it under the request id.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import shutil
import stat
import tempfile
import uuid
import zipfile
from pathlib import Path, PurePosixPath

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, PlainTextResponse
from starlette.exceptions import HTTPException

from splatforge.data.frames import VIDEO_SUFFIXES
from splatforge.data.images import IMAGE_SUFFIXES
from splatforge.pipeline.splatter import MODEL_DIR, OUT_DIR, REQUIRED_BINS
from splatforge.server.store import TERMINAL, JobStore
from splatforge.server.workers import OPTIONS, Supervisor, make_executor

log = logging.getLogger(__name__)

__all__ = ["EXTRA_FILES", "ServerConfig", "create_app"]

EXTRA_FILES = (("splat.ply", "splat_ply"), ("splat_rot.ply", "splat_rot_ply"), ("result.json", "result_json"))
"""Files of ``refined/splatter/`` offered as artifacts beside the node's own (name = file name)."""


class ServerConfig:
    """What ``create_app`` needs: ``data_dir``, ``token`` (None: no authentication, loopback
    only), ``max_upload_mb``, ``workers`` (local: CPU worker processes when there is no GPU; Ray:
    most jobs at once), ``executor`` (``local`` or ``ray``) and ``ray_address`` (None: a new local
    Ray); see :func:`splatforge.server.workers.make_executor`."""

    def __init__(
        self,
        data_dir: Path,
        token: str | None = None,
        max_upload_mb: float = 2048,
        workers: int | None = None,
        executor: str = "local",
        ray_address: str | None = None,
    ):
        self.data_dir = Path(data_dir)
        self.token = token or None
        self.max_upload_bytes = int(max_upload_mb * 2**20)
        self.workers = workers
        self.executor = executor
        self.ray_address = ray_address


class UploadError(Exception):
    """A rejected upload: ``status`` (400/413) and a message for the client."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def check_options(raw: str | None) -> dict:
    """The ``options`` form field (JSON object) checked against the allowed splatter options.

    Raises:
        UploadError: not a JSON object, an unknown key, or a value of the wrong type or choice.
    """
    if raw in (None, ""):
        return {}
    try:
        options = json.loads(raw)
    except ValueError as exc:
        raise UploadError(400, f"options: not JSON: {exc}") from exc
    if not isinstance(options, dict):
        raise UploadError(400, "options: expected a JSON object")
    for key, value in options.items():
        if key not in OPTIONS:
            raise UploadError(400, f"options: unknown option {key!r}; allowed: {', '.join(sorted(OPTIONS))}")
        kind = OPTIONS[key]
        if kind is int and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
            raise UploadError(400, f"options: {key} must be a non-negative integer, got {value!r}")
        if kind is not int and value not in kind:
            raise UploadError(400, f"options: {key} must be one of {', '.join(kind)}, got {value!r}")
    return options


def _safe_member(info: zipfile.ZipInfo) -> PurePosixPath:
    name = info.filename.replace("\\", "/")
    path = PurePosixPath(name)
    if name.startswith("/") or (len(name) > 1 and name[1] == ":"):
        raise UploadError(400, f"zip: absolute path {info.filename!r}")
    if ".." in path.parts:
        raise UploadError(400, f"zip: path with '..': {info.filename!r}")
    if stat.S_ISLNK(info.external_attr >> 16):
        raise UploadError(400, f"zip: symbolic link {info.filename!r}")
    return path


def extract_job_zip(zip_path: Path, dest: Path, max_bytes: int) -> None:
    """Extract a job root from ``zip_path`` into ``dest`` (a new folder): every member checked
    first; the layout may sit at the top of the zip or inside one folder.

    Raises:
        UploadError: not a zip, an unsafe member, over ``max_bytes`` uncompressed, or no
            ``datasets/<d>/Frames.mp4`` and ``refined/global/refined_sfm_combined/`` model.
    """
    try:
        z = zipfile.ZipFile(zip_path)
    except (zipfile.BadZipFile, OSError) as exc:
        raise UploadError(400, f"file: not a zip archive ({exc})") from exc
    with z:
        members = [(info, _safe_member(info)) for info in z.infolist()]
        if sum(info.file_size for info, _ in members) > max_bytes:
            raise UploadError(413, f"zip: more than {max_bytes // 2**20} MiB uncompressed")
        files = {str(p) for info, p in members if not info.is_dir()}
        prefix = None
        for cand in [""] + sorted({p.parts[0] + "/" for _, p in members if len(p.parts) > 1}):
            model = f"{cand}{MODEL_DIR.as_posix()}"
            videos = [
                f
                for f in files
                if f.startswith(f"{cand}datasets/")
                and f.endswith("/Frames.mp4")
                and f.count("/") == cand.count("/") + 2
            ]
            if videos and all(f"{model}/{b}" in files for b in REQUIRED_BINS):
                prefix = cand
                break
        if prefix is None:
            raise UploadError(
                400,
                f"zip: no recognisable job root (need datasets/<dataset>/Frames.mp4 and "
                f"{MODEL_DIR.as_posix()}/{{{','.join(REQUIRED_BINS)}}})",
            )
        for info, path in members:
            rel = str(path)[len(prefix) :] if str(path).startswith(prefix) else None
            if not rel or info.is_dir():
                continue
            target = dest / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            with z.open(info) as src, open(target, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)


def _capture_name(name: str | None) -> str:
    base = PurePosixPath((name or "").replace("\\", "/")).name
    suffix = PurePosixPath(base).suffix.lower()
    if not base or base.startswith(".") or suffix not in tuple(VIDEO_SUFFIXES) + tuple(IMAGE_SUFFIXES):
        raise UploadError(400, f"files: {name!r} is neither a video nor a photo")
    return base


def artifacts(job: dict, workspace: Path) -> list[dict]:
    """``[{name, data_type, bytes, url, file}]``: the node's artifacts listed in the job's
    ``result.json`` (when it has one) and :data:`EXTRA_FILES`."""
    out_dir = workspace / OUT_DIR
    found = []
    try:
        result = json.loads((out_dir / "result.json").read_text())
    except (OSError, ValueError):
        result = None
    if result is not None:
        for a in result.get("artifacts", []):
            path = workspace / a["file"]
            if path.is_file():
                found.append(
                    {"name": a["name"], "data_type": a["data_type"], "bytes": path.stat().st_size, "file": path}
                )
        for name, dtype in EXTRA_FILES:
            if (out_dir / name).is_file():
                found.append(
                    {"name": name, "data_type": dtype, "bytes": (out_dir / name).stat().st_size, "file": out_dir / name}
                )
    for a in found:
        a["url"] = f"/api/jobs/{job['id']}/artifacts/{a['name']}"
    return found


def job_json(job: dict, workspace: Path) -> dict:
    """The API's view of a store row: its fields and the artifacts found in ``workspace``."""
    keys = ("id", "status", "kind", "progress", "created_ms", "started_ms", "ended_ms", "error", "options", "attempts")
    listed = [
        {k: v for k, v in a.items() if k != "file"} | {"filename": a["file"].name} for a in artifacts(job, workspace)
    ]
    return {k: job[k] for k in keys} | {"artifacts": listed}


def create_app(cfg: ServerConfig):
    """The FastAPI application (module docstring); its lifespan starts and stops the workers.

    Raises:
        ConfigError: a bad executor, or ``ray`` without ray installed (before anything is
            written).
    """
    from splatforge.server.page import PAGE

    executor = make_executor(cfg.executor, cfg.workers, cfg.ray_address)
    data_dir = cfg.data_dir
    jobs_dir = data_dir / "jobs"
    jobs_dir.mkdir(parents=True, exist_ok=True)
    store = JobStore(data_dir / "jobs.db")
    supervisor = Supervisor(store, jobs_dir, executor=executor)
    for stale in jobs_dir.glob(".upload-*"):  # uploads interrupted by a crash: never a job
        shutil.rmtree(stale, ignore_errors=True)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        supervisor.start()
        try:
            yield
        finally:
            supervisor.stop()
            store.close()

    app = FastAPI(title="splatforge", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.store, app.state.supervisor = store, supervisor

    def error(status: int, message: str, request: Request, headers: dict | None = None) -> JSONResponse:
        return JSONResponse(
            {"error": message, "request_id": request.state.request_id}, status_code=status, headers=headers
        )

    @app.middleware("http")
    async def request_id_and_limits(request: Request, call_next):
        request.state.request_id = request.headers.get("x-request-id") or uuid.uuid4().hex[:12]
        if request.method == "POST":
            length = request.headers.get("content-length")
            if length is not None and length.isdigit() and int(length) > cfg.max_upload_bytes:
                return error(
                    413,
                    f"upload of {int(length)} bytes is over the limit of {cfg.max_upload_bytes // 2**20} MiB",
                    request,
                )
        try:
            response = await call_next(request)
        except Exception:  # no traceback in a body; the log has it
            log.exception(
                "request %s %s failed (request id %s)", request.method, request.url.path, request.state.request_id
            )
            response = error(500, "internal server error", request)
        response.headers["X-Request-ID"] = request.state.request_id
        return response

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException):
        return error(exc.status_code, str(exc.detail), request, getattr(exc, "headers", None))

    def authorize(request: Request, allow_query: bool = False) -> None:
        if cfg.token is None:
            return
        header = request.headers.get("authorization", "")
        given = header[7:] if header.lower().startswith("bearer ") else None
        if given is None and allow_query:
            given = request.query_params.get("token")
        if given is None or not hmac.compare_digest(given.encode(), cfg.token.encode()):
            raise HTTPException(401, "missing or wrong bearer token", headers={"WWW-Authenticate": "Bearer"})

    def find(job_id: str) -> dict:
        job = store.get(job_id)
        if job is None:
            raise HTTPException(404, f"no job {job_id!r}")
        return job

    @app.get("/healthz")
    async def healthz():
        return {"status": "ok"}

    @app.get("/", response_class=HTMLResponse)
    async def page(request: Request):
        authorize(request, allow_query=True)
        return HTMLResponse(PAGE)

    @app.get("/api/jobs")
    def list_jobs(request: Request):
        authorize(request)
        return {"jobs": [job_json(j, supervisor.workspace(j["id"])) for j in store.list()]}

    @app.get("/api/jobs/{job_id}")
    def get_job(job_id: str, request: Request):
        authorize(request)
        return job_json(find(job_id), supervisor.workspace(job_id))

    @app.get("/api/jobs/{job_id}/artifacts/{name}")
    def get_artifact(job_id: str, name: str, request: Request):
        authorize(request)
        job = find(job_id)
        for a in artifacts(job, supervisor.workspace(job_id)):
            if a["name"] == name:
                return FileResponse(a["file"], filename=a["file"].name)
        raise HTTPException(404, f"job {job_id} has no artifact {name!r}")

    @app.get("/api/jobs/{job_id}/log", response_class=PlainTextResponse)
    def get_log(job_id: str, request: Request):
        authorize(request)
        find(job_id)
        path = supervisor.workspace(job_id) / "job.log"
        return PlainTextResponse(path.read_text(errors="replace") if path.is_file() else "")

    @app.delete("/api/jobs/{job_id}")
    def cancel_job(job_id: str, request: Request):
        authorize(request)
        job = find(job_id)
        if job["status"] in TERMINAL or not supervisor.cancel(job_id):
            raise HTTPException(409, f"job {job_id} has already ended ({store.get(job_id)['status']})")
        return job_json(find(job_id), supervisor.workspace(job_id))

    @app.post("/api/jobs", status_code=201)
    async def submit(request: Request):
        authorize(request)
        key = request.headers.get("idempotency-key") or None
        if key is not None:
            existing = store.by_key(key)
            if existing is not None:
                return JSONResponse(job_json(existing, supervisor.workspace(existing["id"])), status_code=201)
        job_id = JobStore.new_id()
        staging = Path(tempfile.mkdtemp(prefix=".upload-", dir=jobs_dir))
        try:
            try:
                kind, options = await _receive(request, staging, cfg)
            except UploadError as exc:
                return error(exc.status, str(exc), request)
            workspace = supervisor.workspace(job_id)
            staging.rename(workspace)  # the workspace appears whole, then the job
            job, created = store.create(job_id, kind, options, key)
            if not created:  # the same key raced this request: keep the first job
                shutil.rmtree(workspace, ignore_errors=True)
            return JSONResponse(job_json(job, supervisor.workspace(job["id"])), status_code=201)
        finally:
            if staging.exists():
                shutil.rmtree(staging, ignore_errors=True)

    return app


def _copy(src, dst: Path) -> None:
    with open(dst, "wb") as out:
        shutil.copyfileobj(src, out, 1 << 20)


async def _receive(request, staging: Path, cfg: ServerConfig) -> tuple[str, dict]:
    """Read the multipart body into ``staging`` (counting bytes against the limit); returns
    ``(kind, options)``.

    Raises:
        UploadError: over the limit, no ``file``/``files``, both, or a bad file, zip or option.
    """
    from starlette.datastructures import UploadFile

    limit = cfg.max_upload_bytes
    total = 0
    receive = request._receive

    async def counted():
        nonlocal total
        message = await receive()
        total += len(message.get("body", b""))
        if total > limit:
            raise UploadError(413, f"upload over the limit of {limit // 2**20} MiB")
        return message

    request._receive = counted
    try:
        form = await request.form(max_files=10_000, max_fields=100)
    except UploadError:
        raise
    except (ValueError, KeyError) as exc:
        raise UploadError(400, f"not a multipart form: {exc}") from exc
    try:
        options = check_options(form.get("options") if isinstance(form.get("options"), str) else None)
        zips = [f for f in form.getlist("file") if isinstance(f, UploadFile)]
        captures = [f for f in form.getlist("files") if isinstance(f, UploadFile)]
        if bool(zips) == bool(captures) or len(zips) > 1:
            raise UploadError(400, "send either one `file` (a .zip of a job root) or `files` (videos/photos)")
        if zips:
            tmp_zip = staging / ".upload.zip"
            await asyncio.to_thread(_copy, zips[0].file, tmp_zip)
            await asyncio.to_thread(extract_job_zip, tmp_zip, staging, 10 * limit)
            tmp_zip.unlink()
            return "job_root", options
        (staging / "uploads").mkdir()
        seen = set()
        for f in captures:
            name = _capture_name(f.filename)
            if name in seen:
                raise UploadError(400, f"files: {name!r} sent twice")
            seen.add(name)
            await asyncio.to_thread(_copy, f.file, staging / "uploads" / name)
        return "captures", options
    finally:
        await form.close()
