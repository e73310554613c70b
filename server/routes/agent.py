"""Agent workers' routes (``/api/agent_workers/...``): what a worker does with the database,
done over HTTP by a worker that has none. Each takes an agent token (``server.agent_auth``)
and nothing else: the admin token and workspace tokens are refused here, and an agent token
is refused everywhere else. The group and tags come from the token only; a worker name must
end with the token's ``@<id>`` suffix, so an agent completes, pings and logs only the jobs
of its own workers. Token management (create, blacklist) is the admin's."""

from __future__ import annotations

import asyncio
import hmac
import time
import uuid
from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, Request, Response
from fastapi.responses import PlainTextResponse

from sandmill.store import agent as store_agent
from sandmill.store import queue, workers
from sandmill.store.wirejson import dumps

from ..agent_auth import AgentClaims, bearer
from ..agent_state import AgentState, agent_state, lifespan
from ..agent_models import (request_body, AdminJob, AgentTokenCreate, AgentTokenRevoke, Complete, JobRef,
                            Listen, Logs, Named, Ping, Pull, Register, Result, completions)
from ..deps import Admin, Pool
from .errors import AUTHED, TEXT, error

router = APIRouter(prefix="/api/agent_workers", tags=["agent workers"], lifespan=lifespan,
                   responses={**AUTHED, 401: error("missing, invalid, tampered or expired agent token"),
                              403: error("a revoked agent token, another group's or tags, a worker"
                                         " name not of this token, or the admin token (routes for agents)")})

State = Annotated[AgentState, Depends(agent_state)]


async def agent(request: Request, st: State) -> AgentClaims:
    """The caller's agent token, checked (signature, expiry, revocation); the admin token
    and workspace tokens are refused."""
    token = bearer(request.headers)
    if hmac.compare_digest(token.encode(), request.app.state.settings.admin_token.encode()):
        raise HTTPException(403, "the agent routes take an agent token, not the admin token"
                                 " (make one: sandmill agent-token create)")
    return await st.keys.check(token)


Agent = Annotated[AgentClaims, Depends(agent)]


def _json(body: bytes) -> Response:
    return Response(body, media_type="application/json")


def _own(a: AgentClaims, name: str) -> str:
    if not name.endswith(a.suffix):
        raise HTTPException(403, f"worker name {name!r} is not of this agent token: names end with {a.suffix}")
    return name


def _gone(request: Request) -> asyncio.Task:
    """A task that ends when the client disconnects (its body was read: the next message
    of the request is its disconnect), so that a long poll of a client that left ends."""
    async def wait() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass
    return asyncio.ensure_future(wait())


def _key(request: Request, a: AgentClaims) -> tuple[str, str] | None:
    k = request.headers.get("idempotency-key")
    return (a.jti, k[:100]) if k else None


# ---- tokens (the admin's) -----------------------------------------------------------------





@router.post("/create_agent_token", response_class=PlainTextResponse, responses={200: TEXT})
async def create_agent_token(body: AgentTokenCreate, _u: Admin, st: State) -> PlainTextResponse:
    """A token for agent workers of one group and its tags, until ``exp`` (Windmill's shape)."""
    from ..agent_auth import make_token

    if body.exp <= time.time():
        raise HTTPException(422, f"exp: {body.exp} is in the past")
    await st.keys.fresh()
    token, _claims = make_token(st.keys.secret, body.worker_group, body.tags, body.exp)
    return PlainTextResponse(token)


@router.post("/blacklist_token", response_class=PlainTextResponse, responses={200: TEXT})
async def blacklist_token(body: AgentTokenRevoke, _u: Admin, st: State) -> PlainTextResponse:
    """Revoke an agent token: refused by this server at once, by the others within
    SANDMILL_AGENT_BLACKLIST_S (2 s)."""
    c = await st.keys.revoke(body.token)
    return PlainTextResponse(f"agent token {c.jti[:12]} (group {c.group}) revoked")


# ---- the worker ----------------------------------------------------------------------------





@router.post("/register")
async def register(body: Register, a: Agent, pool: Pool) -> dict[str, Any]:
    """Register a worker of the token's group; refused when the worker's profile names
    another group or other tags than the token."""
    _own(a, body.name)
    if body.group != a.group or sorted(set(body.tags)) != sorted(set(a.tags)):
        raise HTTPException(403, f"this agent token is for group {a.group!r} with tags {list(a.tags)};"
                                 f" the worker is of group {body.group!r} with tags {body.tags}")
    await workers.register(pool, name=body.name, group=a.group, hostname=body.hostname,
                           tags=list(a.tags), backend=body.backend, subworkers=body.subworkers,
                           info={**body.info, "agent": True})
    return {"name": body.name, "group": a.group, "tags": list(a.tags)}




@router.post("/update_ping")
async def update_ping(body: Ping, a: Agent, st: State) -> dict[str, Any]:
    """The worker's heartbeat: gathered with the other agents' and written in one statement
    every SANDMILL_AGENT_PING_FLUSH_S (2 s)."""
    hub = await st.started()
    hub.ping(_own(a, body.name), body.jobs_done, body.busy, body.occupancy)
    return {"ok": True}


@router.post("/unregister")
async def unregister(body: Named, a: Agent, pool: Pool, st: State) -> dict[str, Any]:
    st.hub.pings.pop(_own(a, body.name), None)
    await workers.unregister(pool, body.name)
    return {"ok": True}


@router.post("/get_config")
async def get_config(body: Named, a: Agent, pool: Pool) -> Any:
    """The group's config (a partial profile), or null. Its tags do not apply to an agent:
    its token's do."""
    _own(a, body.name)
    return await workers.get_config(pool, f"worker__{a.group}")




@router.post("/listen")
async def listen(body: Listen, a: Agent, st: State, request: Request) -> dict[str, Any]:
    """The agent's LISTEN, as a long poll: what happened since ``cursor`` (a job of its tags
    to claim: ``wake``; ``cancels``; its group's ``config`` changed), waiting up to
    ``wait_s`` for something when nothing has; the new cursor. No database read."""
    _own(a, body.name)
    hub = await st.started()
    if body.stats is not None:  # the worker's ping, written with the others' (update_ping)
        hub.ping(body.name, body.stats.jobs_done, body.stats.busy, body.stats.occupancy)
    bases = queue.split_tags(list(a.tags))[0]
    deadline = time.monotonic() + body.wait_s
    gone = _gone(request) if body.wait_s else None
    try:
        while True:
            cur = hub.cursor()
            ev = hub.since(body.cursor, bases, a.group)
            left = deadline - time.monotonic()
            if (ev["wake"] or ev["config"] or ev["cancels"] or ev["resync"] or left <= 0
                    or st.keys.is_revoked(a) or (gone is not None and gone.done())):
                return {**ev, "cursor": cur}
            await hub.wait(bases, a.group, left, gone)  # a revocation ends it too (wake_all)
    finally:
        if gone is not None:
            gone.cancel()




async def _claim(pool: Any, name: str, tags: list[str], n: int) -> list[dict[str, Any]]:
    """Up to ``n`` jobs, keyed ones included (as the DB worker's feed claims)."""
    jobs: list[dict[str, Any]] = []
    async with pool.acquire() as conn:
        if n > 1:
            jobs = await queue.pull_many(conn, name, tags, n)
        while len(jobs) < n:
            job = await queue.pull(conn, name, tags)
            if job is None:
                break
            jobs.append(job)
    return jobs


@router.post("/pull_job")
async def pull_job(body: Pull, a: Agent, pool: Pool, st: State, request: Request) -> Response:
    """Claim up to ``n`` jobs of the token's tags (and ``ahead`` more to hold ahead, among
    those due ``ahead_after_s`` ago). With ``wait_s`` and nothing due, wait up to that long
    for a NOTIFY of one of the tags and claim then (a long poll). A claim that found
    nothing is remembered until the next NOTIFY of its tags: the idle agents of a group
    cost no database read. Answered again, not claimed again, for a request sent twice
    with the same Idempotency-Key."""
    _own(a, body.name)
    key = _key(request, a)
    if (again := st.reply(key)) is not None:
        return _json(again)
    hub = await st.started()
    pool = st.claims
    tags, name = list(a.tags), body.name
    bases = queue.split_tags(tags)[0]
    deadline = time.monotonic() + body.wait_s
    gone = _gone(request) if body.wait_s else None
    try:
        while True:
            if st.keys.is_revoked(a):
                raise HTTPException(403, f"agent token {a.jti[:12]} (group {a.group}) was revoked")
            if body.ahead:
                jobs = await queue.pull_many(pool, name, tags, body.n, ahead=body.ahead,
                                             ahead_after_s=body.ahead_after_s)
            elif body.n == 0 or hub.known_empty(a.tags, bases):
                jobs = []
            else:
                epoch, n_before = hub.cursor()
                jobs = await _claim(pool, name, tags, body.n)
                if not jobs:
                    hub.note_empty(a.tags, n_before, epoch, await queue.next_due(pool, tags))
            left = deadline - time.monotonic()
            if jobs or left <= 0 or body.n == 0 or (gone is not None and gone.done()):
                break
            _, due = hub.empty_due(a.tags, bases)
            if due is not None:
                left = min(left, max(0.0, due - time.time()))
            await hub.wait_queue(bases, left, gone)
    finally:
        if gone is not None:
            gone.cancel()
    # with none: when the next may come due, if known (the idle slots' next_due, then, needs
    # no request of its own)
    known, due = hub.empty_due(a.tags, bases) if not jobs else (False, None)
    out = dumps({"jobs": jobs, "idle": {"due": due}} if known else {"jobs": jobs})
    st.keep_reply(key, out)
    return _json(out)


@router.post("/next_due")
async def next_due(body: Named, a: Agent, pool: Pool, st: State) -> dict[str, Any]:
    """When the earliest waiting job of the token's tags may start (null: none waits)."""
    _own(a, body.name)
    hub = await st.started()
    known, due = hub.empty_due(a.tags, queue.split_tags(list(a.tags))[0])  # no read while known
    if known:
        return {"due": due}
    when = await queue.next_due(pool, list(a.tags))
    return {"due": when.timestamp() if when else None}






async def _sorted(pool: Any, ids: list[str], statuses: dict[str, str], name: str) -> tuple[list[str], list[str]]:
    """Of the jobs not completed now (ids as text): (those this worker completed before: a
    result sent again, acknowledged), (the others: not this worker's, refused)."""
    rest = [i for i in ids if i not in statuses]
    before = {str(i) for i in await store_agent.completed_by(pool, rest, name)} if rest else set()
    return [i for i in rest if i in before], [i for i in rest if i not in before]


@router.post("/complete", openapi_extra=request_body(Complete))
async def complete(a: Agent, pool: Pool, st: State, request: Request) -> Response:
    """Complete the worker's jobs and, in the same statement, claim its next ones (``want``
    to run now, ``ahead`` to hold), and stamp the start of held jobs (``starting``): the
    DB worker's completion, over HTTP. A result sent again is acknowledged (``acked``), not
    written twice; one for a job this worker does not hold is ``refused``. (Its body is
    read by ``agent_models.completions``: checked as the model says, faster.)"""
    body, done = completions(await request.body())
    name = _own(a, body.name)
    key = _key(request, a)
    if (again := st.reply(key)) is not None:
        return _json(again)
    if st.keys.is_revoked(a) and (body.want or body.ahead):
        raise HTTPException(403, f"agent token {a.jti[:12]} (group {a.group}) was revoked")
    await st.started()
    pool = st.claims
    jobs: list[dict[str, Any]] = []
    if body.want or body.ahead or body.starting:
        statuses, jobs = await queue.complete_and_pull(
            pool, done, name, list(a.tags), body.want, ahead=body.ahead,
            ahead_after_s=body.ahead_after_s, starting=list(body.starting))
    else:
        statuses = await queue.complete_many(pool, done)
    by_text = statuses_json(statuses)
    acked, refused = await _sorted(pool, [str(d.job_id) for d in done], by_text, name)
    out = dumps({"statuses": by_text, "acked": acked, "refused": refused, "jobs": jobs})
    st.keep_reply(key, out)
    return _json(out)


def statuses_json(statuses: dict[uuid.UUID, str]) -> dict[str, str]:
    return {str(k): v for k, v in statuses.items()}




@router.post("/send_result/{job_id}", responses={409: error("the job is not this worker's (not held, or given away)")})
async def send_result(job_id: uuid.UUID, body: Result, a: Agent, pool: Pool) -> dict[str, Any]:
    """One job's result (Windmill's send_result). Sent twice, it completes the job once
    (the second answer says ``again``); for a job this worker does not hold, 409."""
    name = _own(a, body.name)
    body.id = job_id
    statuses = await queue.complete_many(pool, [body.completion(name)])
    if job_id in statuses:
        return {"id": str(job_id), "status": statuses[job_id], "again": False}
    if await store_agent.completed_by(pool, [job_id], name):
        return {"id": str(job_id), "again": True}
    raise HTTPException(409, f"job {job_id} is not held by worker {name}: its result is refused")




@router.post("/ping_job")
async def ping_job(body: JobRef, a: Agent, pool: Pool) -> dict[str, str]:
    """Heartbeat of a running job: ``ok``, ``canceled`` (kill it) or ``lost`` (not this
    worker's any more)."""
    return {"state": await queue.ping_job(pool, body.job_id, _own(a, body.name))}


@router.post("/requeue")
async def requeue(body: JobRef, a: Agent, pool: Pool) -> dict[str, bool]:
    """Give a job this worker holds back to the queue (no restart counted)."""
    return {"requeued": await queue.requeue(pool, body.job_id, _own(a, body.name))}




@router.post("/append_logs")
async def append_logs(body: Logs, a: Agent, pool: Pool) -> dict[str, bool]:
    """Append log text to a job this worker runs (nothing for any other job)."""
    ok = await store_agent.append_log_if_held(pool, body.job_id, body.chunks, _own(a, body.name))
    return {"ok": ok}




@router.post("/insert_completed")
async def insert_completed(body: AdminJob, a: Agent, pool: Pool, st: State, request: Request) -> Response:
    """Record the worker's init or periodic script as a completed job of the admins
    workspace (tag ``<kind>-<worker>``), as a DB worker does."""
    name = _own(a, body.name)
    key = _key(request, a)
    if (again := st.reply(key)) is not None:
        return _json(again)
    job_id = await queue.insert_completed(
        pool, workspace="admins", kind=body.kind, language="bash", content=body.content,
        tag=f"{body.kind}-{name}", worker=name, started_at=body.started_at, status=body.status,
        result=body.result, error=body.error, logs=body.logs, duration_ms=body.duration_ms,
        cpu_ms=body.cpu_ms, mem_peak_kb=body.mem_peak_kb, outcome=body.outcome)
    out = dumps({"id": job_id})
    st.keep_reply(key, out)
    return _json(out)
