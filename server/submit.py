"""Putting a job on the queue (from a stored script or a preview) and waiting for its result."""

from __future__ import annotations

import asyncio
import collections
import uuid
from typing import Any, Awaitable, Callable

import asyncpg
from fastapi import HTTPException
from fastapi.responses import JSONResponse, Response

from sandmill.store import jobs as store_jobs
from sandmill.store import queue, scripts

from . import submit_batch
from .models import Preview, check_args, check_code, check_text
from .pydeps import check_requirements
from .routing import RoutingError, dedicated_tag, interpolate, resolve_tag
from .waiters import Result, ResultWaiters


def concurrency_key(ws: str, s: dict[str, Any], args: dict[str, Any]) -> str | None:
    """The job's concurrency key when its script has a limit: the script's key template
    with $workspace and $args[name] filled in, else the workspace and the script path."""
    if not s.get("concurrent_limit"):
        return None
    template = s.get("concurrency_key") or f"{ws}/{s['path']}"
    return interpolate(template, ws, args, what="concurrency_key")


async def script_or_404(pool: asyncpg.Pool, ws: str, path: str | None = None,
                        h: str | None = None) -> dict[str, Any]:
    check_text("workspace", ws)  # a %00 in the URL would reach the SELECT
    check_text("path", path)
    check_text("hash", h)
    s = await (scripts.get_by_path(pool, ws, path) if path else scripts.get_by_hash(pool, ws, h))
    if not s:
        what = f"script {path}" if path else f"script version {h}"
        raise HTTPException(404, f"{what} not found in workspace {ws}")
    return s


# wait=True: the caller waits for the result (wait_result), so its completion NOTIFYs
async def push_script(pool: asyncpg.Pool, ws: str, s: dict[str, Any], args: Any, tag: str | None,
                      scheduled_in_secs: float, priority: int | None, wait: bool = False,
                      created_by: str = "admin", job_id: uuid.UUID | None = None,
                      if_latest: bool = False) -> uuid.UUID | None:
    """Queue a run of script version ``s``. ``if_latest``: only while it is still the
    newest version at its path (None, nothing queued, when it is not)."""
    args = check_args(args)
    check_text("workspace", ws)
    check_text("tag", tag)
    try:
        # a dedicated script's jobs go to its group (an explicit tag still wins)
        dedicated = dedicated_tag(ws, s["path"]) if s.get("dedicated_worker") else None
        job_tag = resolve_tag(s["language"], ws, args, explicit=tag or dedicated, script_tag=s["tag"])
        key = concurrency_key(ws, s, args)
    except RoutingError as e:
        raise HTTPException(400, str(e)) from None
    push = store_jobs.push_if_latest if if_latest else submit_batch.push
    return await push(
        pool, workspace=ws, language=s["language"], content=s["content"], args=args,
        tag=job_tag, kind="script", script_path=s["path"], script_hash=s["hash"],
        priority=priority if priority is not None else (s["priority"] or 0),
        timeout_s=s["timeout_s"], scheduled_in_secs=scheduled_in_secs,
        concurrency_key=key, concurrent_limit=s["concurrent_limit"] if key else None,
        concurrency_time_window_s=s["concurrency_time_window_s"] if key else None,
        notify_done=wait, created_by=created_by, job_id=job_id,
    )


# (workspace, path) -> the newest version there as last looked up, so that a run by path
# queues in one statement (push_if_latest checks it is still the newest) instead of a read
# and an insert. Versions are content-addressed (their hash covers every field), so a
# remembered version that is still the newest is exactly what a read would return.
_LATEST: collections.OrderedDict[tuple[str, str], dict[str, Any]] = collections.OrderedDict()
LATEST_MAX = 1024


async def push_stored(pool: asyncpg.Pool, db: Any, ws: str, path: str | None, h: str | None,
                      args: Any, tag: str | None, scheduled_in_secs: float, priority: int | None,
                      wait: bool = False, created_by: str = "admin",
                      job_id: uuid.UUID | None = None) -> uuid.UUID:
    """Queue a run of the stored script at ``path`` (its newest version) or of version
    ``h``; 404 when there is none. ``db`` is the lookup's executor (deps.lookup: the pool,
    or nothing for another workspace's token); only a lookup on the pool is remembered."""
    key = (ws, path or "")
    s = _LATEST.get(key) if path and db is pool else None
    if s is not None:
        jid = await push_script(pool, ws, s, args, tag, scheduled_in_secs, priority, wait,
                                created_by, job_id, if_latest=True)
        if jid is not None:
            return jid
        _LATEST.pop(key, None)  # a newer version since: read it
    s = await script_or_404(db, ws, path, h)
    if path and db is pool:
        _LATEST[key] = s
        _LATEST.move_to_end(key)
        if len(_LATEST) > LATEST_MAX:
            _LATEST.popitem(last=False)
    jid = await push_script(pool, ws, s, args, tag, scheduled_in_secs, priority, wait,
                            created_by, job_id)
    assert jid is not None
    return jid


def preview_job(ws: str, body: Preview, tag: str | None, scheduled_in_secs: float,
                priority: int | None, wait: bool = False, created_by: str = "admin",
                job_id: uuid.UUID | None = None) -> dict[str, Any]:
    """``push``'s keywords for a preview, checked: HTTPException (400, 422) for what can
    never run or cannot be stored. No I/O (the fast path runs it before it commits to
    answering a request itself)."""
    check_code(body.language, body.content)
    check_requirements(body.language, body.content)  # resolved by the worker that runs it
    check_text("workspace", ws)
    check_text("tag", tag)
    try:
        job_tag = resolve_tag(body.language, ws, body.args, explicit=tag or body.tag)
    except RoutingError as e:
        raise HTTPException(400, str(e)) from None
    return dict(workspace=ws, language=body.language, content=body.content, args=body.args,
                tag=job_tag, kind="preview", priority=priority or 0,
                scheduled_in_secs=scheduled_in_secs, notify_done=wait, created_by=created_by,
                job_id=job_id)


async def push_preview(pool: asyncpg.Pool, ws: str, body: Preview, tag: str | None,
                       scheduled_in_secs: float, priority: int | None, wait: bool = False,
                       created_by: str = "admin", job_id: uuid.UUID | None = None) -> uuid.UUID:
    return await submit_batch.push(pool, **preview_job(ws, body, tag, scheduled_in_secs, priority,
                                                       wait, created_by, job_id))


async def push_and_wait(pool: asyncpg.Pool, waiters: ResultWaiters, ws: str,
                        push: Callable[[uuid.UUID], Awaitable[uuid.UUID]],
                        timeout_s: float) -> Response:
    """Queue a job with ``push(job_id)`` and answer its result once it completes: 200, or
    400 with its error as the body when it failed (never a 5xx); 408 after ``timeout_s``,
    the job going on. The waiter is registered before the insert, so no completion can
    come first and no read of the job's state is needed before waiting; a NOTIFY that
    carries the result (dedicated workers') spares the read after it too."""
    job_id = uuid.uuid4()
    with waiters.register(job_id) as done:
        await push(job_id)
        try:
            got = await asyncio.wait_for(done, timeout_s)
        except asyncio.TimeoutError:
            raise HTTPException(
                408, f"job {job_id} did not complete within {timeout_s:g} s; it goes on:"
                     f" poll /api/w/{ws}/jobs_u/completed/get_result_maybe/{job_id}",
                headers={"x-sandmill-job-id": str(job_id)}) from None
    headers = {"x-sandmill-job-id": str(job_id)}
    if isinstance(got, Result):  # the JSON text as stored: sent as is, not decoded and encoded
        return Response(got.json, status_code=200 if got.success else 400, headers=headers,
                        media_type="application/json")
    st = await queue.job_state(pool, ws, job_id)
    return JSONResponse(st["result"], status_code=200 if st["success"] else 400, headers=headers)
