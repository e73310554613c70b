"""The HTTP API. Job endpoints follow Windmill's REST paths, field names and shapes, so a
Windmill client can drive sandmill unchanged."""

from __future__ import annotations

import ast
import asyncio
import contextlib
import hmac
import logging
import re
import uuid
from typing import Any

import asyncpg
from fastapi import Body, Depends, FastAPI, HTTPException, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from sandmill.profiles import Profile  # the one profile model, shared with the workers
from sandmill.store import db as dbmod
from sandmill.store import queue, scripts, workers

from .monitor import monitor_loop
from .routing import LANGUAGES, RoutingError, interpolate, resolve_tag
from .settings import ServerSettings

log = logging.getLogger("sandmill.api")


class ScriptCreate(BaseModel):
    model_config = ConfigDict(extra="ignore")  # Windmill clients send more fields than we use

    path: str = Field(min_length=1, max_length=255, pattern=r"^[A-Za-z0-9_\-./]+$")
    content: str
    language: str
    summary: str = ""
    description: str = ""
    tag: str | None = None
    priority: int | None = Field(None, ge=1, le=100)
    timeout: float | None = Field(None, gt=0)
    concurrent_limit: int | None = Field(None, ge=1)
    concurrency_time_window_s: int | None = Field(None, ge=0)
    concurrency_key: str | None = None
    dedicated_worker: bool = False

    @model_validator(mode="after")
    def _concurrency(self) -> "ScriptCreate":
        if self.concurrent_limit is None and (self.concurrency_key or self.concurrency_time_window_s):
            raise ValueError("concurrency_key and concurrency_time_window_s need concurrent_limit")
        return self


class Preview(BaseModel):
    model_config = ConfigDict(extra="ignore")

    content: str
    language: str
    args: dict[str, Any] = Field(default_factory=dict)
    tag: str | None = None


class CancelBody(BaseModel):
    reason: str | None = None


def check_code(language: str, content: str) -> None:
    """Refuse what can never run: unknown language, python that does not parse or has no
    main. Raises HTTPException 400 with the reason (the line, for a syntax error)."""
    if language not in LANGUAGES:
        raise HTTPException(400, f"unknown language {language!r}; known: {', '.join(LANGUAGES)}")
    if language == "python3":
        try:
            tree = ast.parse(content, "main.py")
        except SyntaxError as e:
            raise HTTPException(400, f"python syntax error at line {e.lineno}: {e.msg}") from None
        if not any(isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.name == "main"
                   for n in tree.body):
            raise HTTPException(400, "the script defines no main(...) function")


def concurrency_key(ws: str, s: dict[str, Any], args: dict[str, Any]) -> str | None:
    """The job's concurrency key when its script has a limit: the script's key template
    with $workspace and $args[name] filled in, else the workspace and the script path."""
    if not s.get("concurrent_limit"):
        return None
    template = s.get("concurrency_key") or f"{ws}/{s['path']}"
    return interpolate(template, ws, args, what="concurrency_key")


def create_app(settings: ServerSettings) -> FastAPI:
    """The FastAPI app, bound to one database."""
    state: dict[str, Any] = {"waiters": {}}

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        conn = await dbmod.connect(settings.database_url)
        try:
            await dbmod.migrate(conn)
        finally:
            await conn.close()
        state["pool"] = await dbmod.create_pool(settings.database_url, min_size=2, max_size=10)
        listener = await dbmod.connect(settings.database_url)
        await listener.add_listener(queue.CH_DONE, _on_done)
        mon = asyncio.create_task(monitor_loop(state["pool"], settings.ping_timeout_s,
                                               settings.max_restarts, settings.monitor_every_s))
        try:
            yield
        finally:
            mon.cancel()
            await listener.close()
            await state["pool"].close()

    def _on_done(_c, _p, _ch, payload: str) -> None:
        for fut in state["waiters"].pop(uuid.UUID(payload), []):
            if not fut.done():
                fut.set_result(True)

    app = FastAPI(title="sandmill", version="0.1.0", lifespan=lifespan,
                  description="Sandboxed job execution runtime. Job endpoints are Windmill-compatible.")

    @app.exception_handler(RequestValidationError)
    async def _validation(_req: Request, exc: RequestValidationError) -> JSONResponse:
        errs = [{"field": ".".join(str(x) for x in e["loc"] if x != "body") or "body", "reason": e["msg"]}
                for e in exc.errors()]
        msg = "; ".join(f"{e['field']}: {e['reason']}" for e in errs)
        return JSONResponse({"error": f"invalid request: {msg}", "detail": errs}, status_code=422)

    @app.exception_handler(HTTPException)
    async def _http(_req: Request, exc: HTTPException) -> JSONResponse:
        return JSONResponse({"error": exc.detail}, status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(asyncpg.PostgresError)
    async def _pg(_req: Request, exc: asyncpg.PostgresError) -> JSONResponse:
        log.error("database error: %s", exc)
        return JSONResponse({"error": f"database unavailable: {type(exc).__name__}"}, status_code=503)

    def auth(request: Request) -> str:
        h = request.headers.get("authorization", "")
        scheme, _, token = h.partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise HTTPException(401, "missing bearer token: send 'Authorization: Bearer <token>'",
                                headers={"WWW-Authenticate": "Bearer"})
        if not hmac.compare_digest(token.strip(), settings.admin_token):
            raise HTTPException(401, "invalid token", headers={"WWW-Authenticate": "Bearer"})
        return "admin"

    def pool() -> asyncpg.Pool:
        return state["pool"]

    def job_uuid(id: str) -> uuid.UUID:
        try:
            return uuid.UUID(id)
        except ValueError:
            raise HTTPException(404, f"job {id} not found (not a job id)") from None

    def check_args(args: Any) -> dict[str, Any]:
        if not isinstance(args, dict):
            raise HTTPException(422, f"args must be a JSON object, got {type(args).__name__}")
        return args

    # ---- health & meta --------------------------------------------------------------------

    @app.get("/health", tags=["meta"])
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/api/version", tags=["meta"], response_class=PlainTextResponse)
    async def version(_u: str = Depends(auth)) -> str:
        return "sandmill 0.1.0"

    # ---- scripts --------------------------------------------------------------------------

    @app.post("/api/w/{ws}/scripts/create", tags=["scripts"], response_class=PlainTextResponse, status_code=201)
    async def create_script(ws: str, body: ScriptCreate, _u: str = Depends(auth)) -> str:
        check_code(body.language, body.content)
        fields = body.model_dump()
        fields["timeout_s"] = fields.pop("timeout")
        return await scripts.create(pool(), ws, body.path, fields)

    @app.get("/api/w/{ws}/scripts/get/p/{path:path}", tags=["scripts"])
    async def get_script(ws: str, path: str, _u: str = Depends(auth)) -> dict[str, Any]:
        s = await scripts.get_by_path(pool(), ws, path)
        if not s:
            raise HTTPException(404, f"script {path} not found in workspace {ws}")
        return _script_json(s)

    @app.get("/api/w/{ws}/scripts/get/h/{h}", tags=["scripts"])
    async def get_script_by_hash(ws: str, h: str, _u: str = Depends(auth)) -> dict[str, Any]:
        s = await scripts.get_by_hash(pool(), ws, h)
        if not s:
            raise HTTPException(404, f"script version {h} not found in workspace {ws}")
        return _script_json(s)

    @app.get("/api/w/{ws}/scripts/list", tags=["scripts"])
    async def list_scripts(ws: str, _u: str = Depends(auth)) -> list[dict[str, Any]]:
        return await scripts.list_scripts(pool(), ws)

    # ---- submitting -----------------------------------------------------------------------

    # wait=True: the caller waits for the result (wait_result), so its completion NOTIFYs
    async def push_script(ws: str, s: dict[str, Any], args: Any, tag: str | None,
                          scheduled_in_secs: float, priority: int | None, wait: bool = False) -> uuid.UUID:
        args = check_args(args)
        try:
            job_tag = resolve_tag(s["language"], ws, args, explicit=tag, script_tag=s["tag"])
            key = concurrency_key(ws, s, args)
        except RoutingError as e:
            raise HTTPException(400, str(e)) from None
        return await queue.push(
            pool(), workspace=ws, language=s["language"], content=s["content"], args=args,
            tag=job_tag, kind="script", script_path=s["path"], script_hash=s["hash"],
            priority=priority if priority is not None else (s["priority"] or 0),
            timeout_s=s["timeout_s"], scheduled_in_secs=scheduled_in_secs,
            concurrency_key=key, concurrent_limit=s["concurrent_limit"] if key else None,
            concurrency_time_window_s=s["concurrency_time_window_s"] if key else None,
            notify_done=wait,
        )

    async def push_preview(ws: str, body: Preview, tag: str | None, scheduled_in_secs: float,
                           priority: int | None, wait: bool = False) -> uuid.UUID:
        check_code(body.language, body.content)
        try:
            job_tag = resolve_tag(body.language, ws, body.args, explicit=tag or body.tag)
        except RoutingError as e:
            raise HTTPException(400, str(e)) from None
        return await queue.push(
            pool(), workspace=ws, language=body.language, content=body.content, args=body.args,
            tag=job_tag, kind="preview", priority=priority or 0, scheduled_in_secs=scheduled_in_secs,
            notify_done=wait,
        )

    async def script_or_404(ws: str, path: str | None = None, h: str | None = None) -> dict[str, Any]:
        s = await (scripts.get_by_path(pool(), ws, path) if path else scripts.get_by_hash(pool(), ws, h))
        if not s:
            raise HTTPException(404, f"script {path or h} not found in workspace {ws}")
        return s

    Tag = Query(None, description="run on workers serving this tag")
    Sched = Query(0, ge=0, description="delay the start by this many seconds")
    Prio = Query(None, ge=1, le=100, description="1..100, higher runs first")

    @app.post("/api/w/{ws}/jobs/run/p/{path:path}", tags=["jobs"], response_class=PlainTextResponse, status_code=201)
    async def run_path(ws: str, path: str, args: Any = Body(default_factory=dict), tag: str | None = Tag,
                       scheduled_in_secs: float = Sched, priority: int | None = Prio, _u: str = Depends(auth)) -> str:
        s = await script_or_404(ws, path=path)
        return str(await push_script(ws, s, args, tag, scheduled_in_secs, priority))

    @app.post("/api/w/{ws}/jobs/run/h/{h}", tags=["jobs"], response_class=PlainTextResponse, status_code=201)
    async def run_hash(ws: str, h: str, args: Any = Body(default_factory=dict), tag: str | None = Tag,
                       scheduled_in_secs: float = Sched, priority: int | None = Prio, _u: str = Depends(auth)) -> str:
        s = await script_or_404(ws, h=h)
        return str(await push_script(ws, s, args, tag, scheduled_in_secs, priority))

    @app.post("/api/w/{ws}/jobs/run/preview", tags=["jobs"], response_class=PlainTextResponse, status_code=201)
    async def run_preview(ws: str, body: Preview, tag: str | None = Tag, scheduled_in_secs: float = Sched,
                          priority: int | None = Prio, _u: str = Depends(auth)) -> str:
        return str(await push_preview(ws, body, tag, scheduled_in_secs, priority))

    async def wait_result(ws: str, job_id: uuid.UUID, timeout_s: float) -> Response:
        fut = asyncio.get_running_loop().create_future()
        state["waiters"].setdefault(job_id, []).append(fut)
        try:
            st = await queue.job_state(pool(), ws, job_id)
            if not (st and st["completed"]):
                try:
                    await asyncio.wait_for(fut, timeout_s)
                except asyncio.TimeoutError:
                    raise HTTPException(
                        408, f"job {job_id} did not complete within {timeout_s:g} s; it goes on:"
                             f" poll /api/w/{ws}/jobs_u/completed/get_result_maybe/{job_id}",
                        headers={"x-sandmill-job-id": str(job_id)}) from None
                st = await queue.job_state(pool(), ws, job_id)
        finally:
            lst = state["waiters"].get(job_id)
            if lst and fut in lst:
                lst.remove(fut)
                if not lst:
                    state["waiters"].pop(job_id, None)
        # A failed job answers 400 with its error as the body, never a 5xx.
        return JSONResponse(st["result"], status_code=200 if st["success"] else 400,
                            headers={"x-sandmill-job-id": str(job_id)})

    WaitT = Query(None, gt=0, le=3600, description="seconds to wait before answering 408")

    @app.post("/api/w/{ws}/jobs/run_wait_result/p/{path:path}", tags=["jobs"])
    async def run_wait_path(ws: str, path: str, args: Any = Body(default_factory=dict), tag: str | None = Tag,
                            priority: int | None = Prio, timeout_s: float | None = WaitT,
                            _u: str = Depends(auth)) -> Response:
        s = await script_or_404(ws, path=path)
        jid = await push_script(ws, s, args, tag, 0, priority, wait=True)
        return await wait_result(ws, jid, timeout_s or settings.wait_timeout_s)

    @app.post("/api/w/{ws}/jobs/run_wait_result/h/{h}", tags=["jobs"])
    async def run_wait_hash(ws: str, h: str, args: Any = Body(default_factory=dict), tag: str | None = Tag,
                            priority: int | None = Prio, timeout_s: float | None = WaitT,
                            _u: str = Depends(auth)) -> Response:
        s = await script_or_404(ws, h=h)
        jid = await push_script(ws, s, args, tag, 0, priority, wait=True)
        return await wait_result(ws, jid, timeout_s or settings.wait_timeout_s)

    @app.post("/api/w/{ws}/jobs/run_wait_result/preview", tags=["jobs"])
    @app.post("/api/w/{ws}/jobs/run_inline/preview", tags=["jobs"])
    async def run_wait_preview(ws: str, body: Preview, tag: str | None = Tag, priority: int | None = Prio,
                               timeout_s: float | None = WaitT, _u: str = Depends(auth)) -> Response:
        jid = await push_preview(ws, body, tag, 0, priority, wait=True)
        return await wait_result(ws, jid, timeout_s or settings.wait_timeout_s)

    # ---- reading jobs ---------------------------------------------------------------------

    @app.get("/api/w/{ws}/jobs_u/get/{id}", tags=["jobs"])
    async def get_job(ws: str, id: str, _u: str = Depends(auth)) -> dict[str, Any]:
        jid = job_uuid(id)
        j = await queue.get_job(pool(), ws, jid)
        if not j:
            raise HTTPException(404, f"job {id} not found in workspace {ws}")
        logs, _ = await queue.get_logs(pool(), jid)
        out = _job_json(j, logs)
        if j["type"] == "QueuedJob" and not j["running"]:
            out["waiting_reason"] = await _waiting_reason(j)
        return out

    async def _waiting_reason(j: dict[str, Any]) -> str:
        if j["scheduled_for"] and await queue.is_future(pool(), j["scheduled_for"]):
            return f"scheduled for {j['scheduled_for'].isoformat()}"
        if await queue.queued_tags_without_workers(pool(), [j["tag"]], j["workspace"]):
            return (f"no live worker serves tag {j['tag']!r} (for workspace {j['workspace']});"
                    " the job waits until one does")
        if j["concurrency_key"] and not await queue.key_has_slot(pool(), j["id"]):
            win = j["concurrency_time_window_s"] or 0
            rule = (f"{j['concurrent_limit']} start(s) per {win} s" if win
                    else f"{j['concurrent_limit']} running at once")
            return f"waiting for its concurrency key {j['concurrency_key']!r} (limit: {rule})"
        return "waiting for a free worker"

    @app.get("/api/w/{ws}/jobs_u/completed/get_result/{id}", tags=["jobs"])
    async def get_result(ws: str, id: str, _u: str = Depends(auth)) -> Response:
        c = await queue.get_completed(pool(), ws, job_uuid(id))
        if not c:
            raise HTTPException(404, f"completed job {id} not found in workspace {ws}")
        return JSONResponse(c["result"])

    @app.get("/api/w/{ws}/jobs_u/completed/get_result_maybe/{id}", tags=["jobs"])
    async def get_result_maybe(ws: str, id: str, _u: str = Depends(auth)) -> dict[str, Any]:
        st = await queue.job_state(pool(), ws, job_uuid(id))
        if not st:
            raise HTTPException(404, f"job {id} not found in workspace {ws}")
        return {"started": st["started"], "completed": st["completed"], "success": st["success"],
                "result": st["result"]}

    @app.get("/api/w/{ws}/jobs_u/get_logs/{id}", tags=["jobs"], response_class=PlainTextResponse)
    async def get_logs(ws: str, id: str, _u: str = Depends(auth)) -> str:
        jid = job_uuid(id)
        if not await queue.job_state(pool(), ws, jid):
            raise HTTPException(404, f"job {id} not found in workspace {ws}")
        text, _ = await queue.get_logs(pool(), jid)
        return text

    @app.get("/api/w/{ws}/jobs_u/getupdate/{id}", tags=["jobs"])
    async def get_update(ws: str, id: str, log_offset: int = Query(0, ge=0), _u: str = Depends(auth)) -> dict[str, Any]:
        """New logs since ``log_offset`` and whether the job is done (for following a job)."""
        jid = job_uuid(id)
        st = await queue.job_state(pool(), ws, jid)
        if not st:
            raise HTTPException(404, f"job {id} not found in workspace {ws}")
        text, last = await queue.get_logs(pool(), jid, log_offset)
        return {"running": bool(st["started"] and not st["completed"]), "completed": st["completed"],
                "success": st["success"], "new_logs": text, "log_offset": last}

    @app.post("/api/w/{ws}/jobs_u/queue/cancel/{id}", tags=["jobs"], response_class=PlainTextResponse)
    async def cancel(ws: str, id: str, body: CancelBody | None = None, user: str = Depends(auth)) -> str:
        reason = (body.reason if body else None) or "no reason given"
        r = await queue.cancel(pool(), ws, job_uuid(id), user, reason)
        if r is None:
            raise HTTPException(404, f"queued or running job {id} not found in workspace {ws}")
        return f"job {id} {r}"

    @app.get("/api/w/{ws}/jobs/list", tags=["jobs"])
    async def list_jobs(ws: str, limit: int = Query(50, ge=1, le=1000), script_path_exact: str | None = None,
                        success: bool | None = None, running: bool | None = None,
                        _u: str = Depends(auth)) -> list[dict[str, Any]]:
        rows = await queue.list_jobs(pool(), ws, limit=limit, script_path=script_path_exact,
                                     success=success, running=running)
        return [_listed_json(r) for r in rows]

    # ---- workers & configs ----------------------------------------------------------------

    @app.get("/api/workers/list", tags=["workers"])
    async def list_workers(_u: str = Depends(auth)) -> list[dict[str, Any]]:
        return [_worker_json(w) for w in await workers.list_workers(pool())]

    def group_of(name: str) -> str:
        group = name.removeprefix("worker__")
        if group == name or not _GROUP_RE.match(group):
            raise HTTPException(404, f"no config {name!r}: worker group configs are named"
                                     " worker__<group> (lowercase letters, digits, _ and -)")
        return group

    @app.get("/api/configs/{name}", tags=["workers"])
    @app.get("/api/configs/get/{name}", tags=["workers"], include_in_schema=False)
    async def get_config(name: str, _u: str = Depends(auth)) -> Any:
        """A worker group's config: a partial profile that overrides its YAML profile."""
        group = group_of(name)
        cfg = await workers.get_config(pool(), name)
        if cfg is None:
            raise HTTPException(404, f"no config for worker group {group!r}")
        return cfg

    @app.put("/api/configs/{name}", tags=["workers"])
    @app.post("/api/configs/update/{name}", tags=["workers"], include_in_schema=False)
    async def put_config(name: str, body: Any = Body(...), _u: str = Depends(auth)) -> Any:
        """Set a worker group's config (a partial profile, e.g. ``{"tags": [...]}``). Running
        workers of the group reload it at once (NOTIFY), without restart."""
        group = group_of(name)
        cfg, errs = validate_group_config(group, body)
        if errs:
            msg = "; ".join(f"{e['field']}: {e['reason']}" for e in errs)
            return JSONResponse({"error": f"invalid worker group config: {msg}", "detail": errs},
                                status_code=422)
        await workers.put_config(pool(), name, cfg)
        return cfg

    @app.get("/metrics", tags=["meta"], response_class=PlainTextResponse)
    async def metrics(_u: str = Depends(auth)) -> str:
        r = await queue.counts(pool())
        return "".join(f"sandmill_{k} {v}\n" for k, v in r.items())

    return app


_GROUP_RE = re.compile(r"^[a-z0-9][a-z0-9_\-]*$")


def validate_group_config(group: str, body: Any) -> tuple[dict[str, Any], list[dict[str, str]]]:
    """Check a partial profile against the profile model. Returns (the config to store:
    the fields given, [{field, reason}] for each bad field)."""
    if not isinstance(body, dict):
        return {}, [{"field": "body", "reason": f"a group config is a JSON object of profile fields,"
                                                 f" got {type(body).__name__}"}]
    if body.get("name", group) != group:
        return {}, [{"field": "name", "reason": f"must be {group!r} (the group) or left out"}]
    try:
        Profile.model_validate({"tags": ["_placeholder"], **body, "name": group})
    except ValidationError as e:
        return {}, [{"field": ".".join(str(x) for x in err["loc"]) or "(top level)", "reason": err["msg"]}
                    for err in e.errors()]
    return {k: v for k, v in body.items() if k != "name"}, []


def _iso(v: Any) -> Any:
    return v.isoformat() if hasattr(v, "isoformat") else v


def _script_json(s: dict[str, Any]) -> dict[str, Any]:
    out = {k: _iso(v) for k, v in s.items()}
    out["timeout"] = out.pop("timeout_s")
    out["workspace_id"] = out.pop("workspace")
    return out


def _job_json(j: dict[str, Any], logs: str) -> dict[str, Any]:
    completed = j["type"] == "CompletedJob"
    out = {
        "id": str(j["id"]), "type": j["type"], "workspace_id": j["workspace"],
        "job_kind": j["kind"], "script_path": j["script_path"], "script_hash": j["script_hash"],
        "language": j["language"], "args": j["args"], "tag": j["tag"], "priority": j["priority"],
        "created_by": j["created_by"], "created_at": _iso(j["created_at"]),
        "scheduled_for": _iso(j["scheduled_for"]), "started_at": _iso(j["started_at"]),
        # a job held ahead by a worker is not running until it starts
        "worker": j["worker"], "running": (not completed) and j["running"] and j["started_at"] is not None,
        "canceled": j["status"] == "canceled" if completed else j["canceled"],
        "canceled_by": j["canceled_by"], "canceled_reason": j["canceled_reason"],
        "restarts": j["restarts"], "logs": logs, "raw_code": j.get("content"),
        "success": j["status"] == "success" if completed else None,
        "result": j["result"] if completed else None,
        "duration_ms": j["duration_ms"] if completed else None,
        "mem_peak": j["mem_peak"] if completed else None,
    }
    if completed:
        out.update(status=j["status"], error=j["error"], cpu_ms=j["cpu_ms"], outcome=j["outcome"],
                   completed_at=_iso(j["completed_at"]))
    else:
        out["last_ping"] = _iso(j["last_ping"])
    return out


def _listed_json(r: dict[str, Any]) -> dict[str, Any]:
    out = {k: _iso(v) for k, v in r.items()}
    out["id"] = str(r["id"])
    out["success"] = (r["status"] == "success") if r["status"] else None
    return out


def _worker_json(w: dict[str, Any]) -> dict[str, Any]:
    info = w["info"] or {}
    return {
        "worker": w["name"], "worker_group": w["worker_group"], "hostname": w["hostname"],
        "tags": w["tags"], "backend": w["backend"], "subworkers": w["subworkers"],
        "cpus": info.get("cpus"), "memory_mb": info.get("memory_mb"), "gpus": info.get("gpus", []),
        "version": info.get("version"), "started_at": _iso(w["started_at"]),
        "last_ping": _iso(w["last_ping"]), "last_ping_s_ago": round(w["last_ping_s_ago"], 1),
        "jobs_done": w["jobs_done"], "busy": w["busy"], "occupancy": w["occupancy"],
    }
