"""Job endpoints, on Windmill's paths: submit (and wait for the result), read, logs, cancel, list."""

from __future__ import annotations

import datetime as dt
from typing import Any, Callable, NamedTuple

import asyncpg
from fastapi import APIRouter, Body, Depends, HTTPException, Query
from fastapi.responses import JSONResponse, PlainTextResponse, Response

from sandmill.store import autoscale, queue

from ..deps import (CancelJobs, ListJobs, Pool, ReadJobs, RunJobs, RunStored, Settings, User,
                    Waiters, job_uuid)
from ..models import CancelBody, Preview
from ..routing import dedicated_tag
from ..submit import push_and_wait, push_preview, push_stored
from ..views import _job_json, _listed_json
from .errors import IN_WORKSPACE, WAIT

# Every route: 404 for another workspace's token, 403 for a scope it lacks (deps).
router = APIRouter(prefix="/api/w/{ws}", tags=["jobs"], responses=IN_WORKSPACE)

Tag = Query(None, description="run on workers serving this tag")
Sched = Query(0, ge=0, description="delay the start by this many seconds")
# Windmill's: the instant the job becomes due (ISO 8601; one without a zone is UTC)
SchedFor = Query(None, description="start no earlier than this instant (ISO 8601)")
Prio = Query(None, ge=1, le=100, description="1..100, higher runs first")
WaitT = Query(None, gt=0, le=3600, description="seconds to wait before answering 408")


# ---- submitting -----------------------------------------------------------------------------

class ScriptRef(NamedTuple):
    """A stored script, named by its path (its latest version) or by a version's hash."""
    path: str | None = None
    hash: str | None = None


async def by_path(path: str) -> ScriptRef:
    return ScriptRef(path=path)


async def by_hash(h: str) -> ScriptRef:
    return ScriptRef(hash=h)


def _add_script_routes(by: str, route: str, ref_of: Callable[..., ScriptRef]) -> None:
    """run/{route} and run_wait_result/{route}: one handler each for the path (p) and hash (h) forms."""

    # ref_of only names the script (no I/O): the lookup's 404 comes after auth and validation
    async def run(ws: str, u: User, db: RunStored, pool: Pool, ref: ScriptRef = Depends(ref_of),
                  args: Any = Body(default_factory=dict), tag: str | None = Tag,
                  scheduled_in_secs: float = Sched, priority: int | None = Prio,
                  scheduled_for: str | None = SchedFor) -> str:
        delay = due_in(scheduled_for, scheduled_in_secs)
        return str(await push_stored(pool, db, ws, ref.path, ref.hash, args, tag, delay, priority,
                                     created_by=u.name))

    async def run_wait(ws: str, u: User, db: RunStored, pool: Pool, settings: Settings,
                       waiters: Waiters, ref: ScriptRef = Depends(ref_of),
                       args: Any = Body(default_factory=dict), tag: str | None = Tag,
                       priority: int | None = Prio, timeout_s: float | None = WaitT) -> Response:
        return await push_and_wait(pool, waiters, ws, lambda jid: push_stored(
            pool, db, ws, ref.path, ref.hash, args, tag, 0, priority, wait=True,
            created_by=u.name, job_id=jid), timeout_s or settings.wait_timeout_s)

    # the names keep the operation ids and summaries of the OpenAPI document
    router.add_api_route(f"/jobs/run/{route}", run, methods=["POST"], name=f"run_{by}",
                         response_class=PlainTextResponse, status_code=201)
    router.add_api_route(f"/jobs/run_wait_result/{route}", run_wait, methods=["POST"],
                         name=f"run_wait_{by}", responses=WAIT)


_add_script_routes("path", "p/{path:path}", by_path)
_add_script_routes("hash", "h/{h}", by_hash)


@router.post("/jobs/run/preview", response_class=PlainTextResponse, status_code=201)
async def run_preview(ws: str, body: Preview, u: RunJobs, pool: Pool, tag: str | None = Tag,
                      scheduled_in_secs: float = Sched, priority: int | None = Prio,
                      scheduled_for: str | None = SchedFor) -> str:
    delay = due_in(scheduled_for, scheduled_in_secs)
    return str(await push_preview(pool, ws, body, tag, delay, priority, created_by=u.name))


def due_in(scheduled_for: str | None, scheduled_in_secs: float) -> float:
    """Seconds until the job is due: ``scheduled_for`` (ISO 8601; past: now) wins over
    ``scheduled_in_secs``; 400 for a time that does not parse."""
    if scheduled_for is None:
        return scheduled_in_secs
    try:
        at = dt.datetime.fromisoformat(scheduled_for.replace("Z", "+00:00"))
    except ValueError:
        raise HTTPException(400, f"scheduled_for: not an ISO 8601 date and time: {scheduled_for[:100]!r}") from None
    if at.tzinfo is None:
        at = at.replace(tzinfo=dt.timezone.utc)
    return max(0.0, (at - dt.datetime.now(dt.timezone.utc)).total_seconds())


@router.post("/jobs/run_wait_result/preview", responses=WAIT)
@router.post("/jobs/run_inline/preview", responses=WAIT)
async def run_wait_preview(ws: str, body: Preview, u: RunJobs, pool: Pool, settings: Settings,
                           waiters: Waiters, tag: str | None = Tag, priority: int | None = Prio,
                           timeout_s: float | None = WaitT) -> Response:
    return await push_and_wait(pool, waiters, ws, lambda jid: push_preview(
        pool, ws, body, tag, 0, priority, wait=True, created_by=u.name, job_id=jid),
        timeout_s or settings.wait_timeout_s)


# ---- reading --------------------------------------------------------------------------------

@router.get("/jobs_u/get/{id}")
async def get_job(ws: str, id: str, db: ReadJobs, pool: Pool) -> dict[str, Any]:
    jid = job_uuid(id)
    j = await queue.get_job(db, ws, jid)
    if not j:
        raise HTTPException(404, f"job {id} not found in workspace {ws}")
    logs, _ = await queue.get_logs(pool, jid)
    out = _job_json(j, logs)
    if j["type"] == "QueuedJob" and not j["running"]:
        out["waiting_reason"] = await _waiting_reason(pool, j)
    return out


async def _waiting_reason(pool: asyncpg.Pool, j: dict[str, Any]) -> str:
    if j["scheduled_for"] and await queue.is_future(pool, j["scheduled_for"]):
        return f"scheduled for {j['scheduled_for'].isoformat()}"
    if await queue.queued_tags_without_workers(pool, [j["tag"]], j["workspace"]):
        if group := await autoscale.group_for_tag(pool, j["tag"], j["workspace"]):
            return f"group {group} is scaled to zero; a worker is starting"
        if j["script_path"] and j["tag"] == dedicated_tag(j["workspace"], j["script_path"]):
            return (f"no live worker is dedicated to script {j['script_path']} (a group with"
                    f" dedicated_worker: {j['tag']}); the job waits until one is")
        return (f"no live worker serves tag {j['tag']!r} (for workspace {j['workspace']});"
                " the job waits until one does")
    if j["concurrency_key"] and not await queue.key_has_slot(pool, j["id"]):
        win = j["concurrency_time_window_s"] or 0
        rule = (f"{j['concurrent_limit']} start(s) per {win} s" if win
                else f"{j['concurrent_limit']} running at once")
        return f"waiting for its concurrency key {j['concurrency_key']!r} (limit: {rule})"
    return "waiting for a free worker"


@router.get("/jobs_u/completed/get_result/{id}",
            responses={200: {"description": "the job's result (any JSON)",
                             "content": {"application/json": {"schema": {}}}}})
async def get_result(ws: str, id: str, db: ReadJobs) -> Response:
    c = await queue.get_completed(db, ws, job_uuid(id))
    if not c:
        raise HTTPException(404, f"completed job {id} not found in workspace {ws}")
    return JSONResponse(c["result"])


@router.get("/jobs_u/completed/get_result_maybe/{id}")
async def get_result_maybe(ws: str, id: str, db: ReadJobs) -> dict[str, Any]:
    st = await queue.job_state(db, ws, job_uuid(id))
    if not st:
        raise HTTPException(404, f"job {id} not found in workspace {ws}")
    return {"started": st["started"], "completed": st["completed"], "success": st["success"],
            "result": st["result"]}


@router.get("/jobs_u/get_logs/{id}", response_class=PlainTextResponse)
async def get_logs(ws: str, id: str, db: ReadJobs, pool: Pool) -> str:
    jid = job_uuid(id)
    if not await queue.job_state(db, ws, jid):
        raise HTTPException(404, f"job {id} not found in workspace {ws}")
    text, _ = await queue.get_logs(pool, jid)
    return text


@router.get("/jobs_u/getupdate/{id}")
async def get_update(ws: str, id: str, db: ReadJobs, pool: Pool,
                     log_offset: int = Query(0, ge=0)) -> dict[str, Any]:
    """New logs since ``log_offset`` and whether the job is done (for following a job)."""
    jid = job_uuid(id)
    st = await queue.job_state(db, ws, jid)
    if not st:
        raise HTTPException(404, f"job {id} not found in workspace {ws}")
    text, last = await queue.get_logs(pool, jid, log_offset)
    return {"running": bool(st["started"] and not st["completed"]), "completed": st["completed"],
            "success": st["success"], "new_logs": text, "log_offset": last}


@router.post("/jobs_u/queue/cancel/{id}", response_class=PlainTextResponse)
async def cancel(ws: str, id: str, user: User, db: CancelJobs,
                 body: CancelBody | None = None) -> str:
    reason = (body.reason if body else None) or "no reason given"
    r = await queue.cancel(db, ws, job_uuid(id), user.name, reason)
    if r is None:
        raise HTTPException(404, f"queued or running job {id} not found in workspace {ws}")
    return f"job {id} {r}"


@router.get("/jobs/list")
async def list_jobs(ws: str, _u: ListJobs, pool: Pool, limit: int = Query(50, ge=1, le=1000),
                    script_path_exact: str | None = None, success: bool | None = None,
                    running: bool | None = None) -> list[dict[str, Any]]:
    rows = await queue.list_jobs(pool, ws, limit=limit, script_path=script_path_exact,
                                 success=success, running=running)
    return [_listed_json(r) for r in rows]
