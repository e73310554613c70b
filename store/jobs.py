"""Writes to a job outside the claim path: push, cancel, requeue (one job, or every job of
a dead worker), heartbeats, logs, and the jobs a worker runs on its own.

The statements are in sql/jobs.sql. Use through ``sandmill.store.queue``.
"""

from __future__ import annotations

import datetime as dt
import json
import uuid
from typing import Any

import asyncpg

from .claims import complete
from .queries import Executor, sql

_PUSH = sql("push")
_PUSH_MANY = sql("push_many")
_PUSH_IF_LATEST = sql("push_if_latest")
_REQUEUE = sql("requeue")
_STALE_JOBS = sql("stale_jobs")
_COUNT_RESTART = sql("count_restart")
_DB_UP_S = sql("db_up_s")
_COMPLETED_AMONG = sql("completed_among")
_CANCEL_QUEUED = sql("cancel_queued")
_CANCEL_RUNNING = sql("cancel_running")
_PING_JOB = sql("ping_job")
_APPEND_LOG = sql("append_log")
_INSERT_COMPLETED = sql("insert_completed")


async def push(
    db: Executor,
    *,
    workspace: str,
    language: str,
    content: str,
    args: dict[str, Any],
    tag: str,
    kind: str = "script",
    script_path: str | None = None,
    script_hash: str | None = None,
    priority: int = 0,
    timeout_s: float | None = None,
    scheduled_in_secs: float = 0,
    created_by: str = "admin",
    concurrency_key: str | None = None,
    concurrent_limit: int | None = None,
    concurrency_time_window_s: int | None = None,
    notify_done: bool = False,
    job_id: uuid.UUID | None = None,
    _stmt: str = _PUSH,
) -> uuid.UUID:
    """Queue one job and wake the workers that serve its tag. Returns the job id (``job_id``
    when given: a result waiter registers under it before the insert).
    ``notify_done``: someone waits for the result, NOTIFY CH_DONE when it completes (a
    NOTIFY wakes every listening backend of the database, so only when asked)."""
    job_id = job_id or uuid.uuid4()
    row = await db.fetchrow(
        _stmt, job_id, workspace, kind, script_path, script_hash, language, content, args,
        tag, priority, timeout_s, created_by, float(scheduled_in_secs),
        concurrency_key, concurrent_limit, concurrency_time_window_s, notify_done,
    )
    return job_id if row is not None else None  # type: ignore[return-value] # push_if_latest's None


# push's keywords, in the order of its statement's parameters (push_many's arrays)
PUSH_FIELDS = ("job_id", "workspace", "kind", "script_path", "script_hash", "language", "content",
               "args", "tag", "priority", "timeout_s", "created_by", "scheduled_in_secs",
               "concurrency_key", "concurrent_limit", "concurrency_time_window_s", "notify_done")
_PUSH_DEFAULTS = {"kind": "script", "script_path": None, "script_hash": None, "priority": 0,
                  "timeout_s": None, "scheduled_in_secs": 0, "created_by": "admin",
                  "concurrency_key": None, "concurrent_limit": None,
                  "concurrency_time_window_s": None, "notify_done": False}


async def push_many(db: Executor, jobs: list[dict[str, Any]]) -> list[uuid.UUID]:
    """Queue several jobs in one statement and one commit, in the order given (their
    ``seq``); each job is a dict of ``push``'s keywords (``job_id`` required). All or
    none: a value PostgreSQL refuses fails the whole statement. Returns the ids."""
    if not jobs:
        return []
    cols: list[list[Any]] = [[] for _ in PUSH_FIELDS]
    for j in jobs:
        for col, name in zip(cols, PUSH_FIELDS):
            col.append(j[name] if name in j else _PUSH_DEFAULTS[name])
    cols[7] = [json.dumps(a) for a in cols[7]]  # args: as the pool's jsonb codec writes them
    cols[12] = [float(x) for x in cols[12]]
    # every column as text (the statement casts it back): repr of a float reads back exact
    await db.fetch(_PUSH_MANY, *[[None if v is None else _as_text(v) for v in col] for col in cols])
    return [j["job_id"] for j in jobs]


def _as_text(v: Any) -> str:
    if isinstance(v, bool):
        return "t" if v else "f"
    return v if isinstance(v, str) else repr(v) if isinstance(v, float) else str(v)


async def push_if_latest(db: Executor, **kw: Any) -> uuid.UUID | None:
    """Queue one job as ``push`` does (same keywords), only while ``script_hash`` is still
    the newest version at ``script_path`` (a server's remembered lookup, checked in the
    same statement); None, nothing queued, when it is not."""
    return await push(db, _stmt=_PUSH_IF_LATEST, **kw)


async def cancel(db: Executor, workspace: str, job_id: uuid.UUID, by: str, reason: str) -> str | None:
    """Cancel a job. A queued job completes as canceled at once ('canceled'); a running
    one is flagged and its worker kills it ('canceling'). None if no such queued job."""
    if await db.fetchrow(_CANCEL_QUEUED, job_id, workspace, by, reason):
        return "canceled"
    if await db.fetchrow(_CANCEL_RUNNING, job_id, workspace, by, reason):
        return "canceling"
    return None


async def requeue(db: Executor, job_id: uuid.UUID, worker: str) -> bool:
    """Give a running job back to the queue (its worker is shutting down), or a job held
    ahead that its worker will not start."""
    return await db.fetchrow(_REQUEUE, job_id, worker, 0) is not None


async def requeue_stale(db: Executor, ping_timeout_s: float, max_restarts: int,
                        db_settle_s: float = 0.0) -> list[dict]:
    """Put back in the queue every running job whose heartbeat is older than the timeout,
    counting the restart; a job whose worker died ``max_restarts`` times already (it
    survives that many dead workers) fails instead, with a message saying why. Nothing
    while the database has been up for less than ``db_settle_s`` (the monitor: the ping
    timeout): a heartbeat is then stale because the database was down, not the worker.
    Returns what it did, one dict per job."""
    async with _tx(db) as conn:
        if db_settle_s and await conn.fetchval(_DB_UP_S) < db_settle_s:
            return []
        stale = await conn.fetch(_STALE_JOBS, float(ping_timeout_s))
        done = []
        for r in stale:
            if not r["started"]:  # held ahead by a worker that died before starting it
                await conn.fetchrow(_REQUEUE, r["id"], r["worker"], 0)
                done.append({"id": r["id"], "action": "requeued", "worker": r["worker"]})
            elif r["restarts"] >= max_restarts:
                dead = r["restarts"] + 1
                msg = (f"worker {r['worker']} died while running this job, the {_nth(dead)} worker"
                       f" to die running it; a job survives {max_restarts} dead worker(s)"
                       f" (SANDMILL_MAX_RESTARTS), so it is not run again")
                await conn.execute(_COUNT_RESTART, r["id"])
                await complete(conn, r["id"], r["worker"], status="failure",
                               result={"error": {"name": "WorkerDied", "message": msg}}, error=msg,
                               duration_ms=0, cpu_ms=0, mem_peak_kb=0, outcome=None)
                done.append({"id": r["id"], "action": "failed", "worker": r["worker"]})
            else:
                await conn.fetchrow(_REQUEUE, r["id"], r["worker"], 1)
                await conn.execute(
                    _APPEND_LOG, r["id"],
                    f"\n[sandmill] worker {r['worker']} stopped answering; job put back in the queue\n",
                )
                done.append({"id": r["id"], "action": "requeued", "worker": r["worker"]})
        return done


def _nth(n: int) -> str:
    return {1: "1st", 2: "2nd", 3: "3rd"}.get(n, f"{n}th")


async def db_up_s(db: Executor) -> float:
    """Seconds since the database's postmaster started."""
    return await db.fetchval(_DB_UP_S)


async def completed_among(db: Executor, ids: list[uuid.UUID]) -> set[uuid.UUID]:
    """Which of ``ids`` are jobs that have completed."""
    return {r["id"] for r in await db.fetch(_COMPLETED_AMONG, ids)} if ids else set()


class _tx:
    """A transaction on a connection or on a connection taken from a pool."""

    def __init__(self, db: Executor):
        self.db, self.conn, self.tr = db, None, None

    async def __aenter__(self) -> asyncpg.Connection:
        self.conn = await self.db.acquire() if isinstance(self.db, asyncpg.Pool) else self.db
        self.tr = self.conn.transaction()
        await self.tr.start()
        return self.conn

    async def __aexit__(self, typ, exc, tb) -> None:
        try:
            if exc is None:
                await self.tr.commit()
            else:
                await self.tr.rollback()
        finally:
            if isinstance(self.db, asyncpg.Pool):
                await self.db.release(self.conn)


async def ping_job(db: Executor, job_id: uuid.UUID, worker: str) -> str:
    """Heartbeat of a running job: 'ok', 'canceled' (kill it), or 'lost' (not ours any more)."""
    canceled = await db.fetchval(_PING_JOB, job_id, worker)
    if canceled is None:
        return "lost"
    return "canceled" if canceled else "ok"


async def append_logs(db: Executor, job_id: uuid.UUID, chunks: list[str]) -> None:
    """Append a batch of log text in one statement."""
    if chunks:
        await db.execute(_APPEND_LOG, job_id, "".join(chunks))


async def insert_completed(
    db: Executor,
    *,
    workspace: str,
    kind: str,
    language: str,
    content: str,
    tag: str,
    worker: str,
    started_at: dt.datetime,
    status: str,
    result: Any,
    error: str | None,
    logs: str,
    duration_ms: int = 0,
    cpu_ms: int = 0,
    mem_peak_kb: int = 0,
    outcome: dict[str, Any] | None = None,
) -> uuid.UUID:
    """Record a job that a worker ran on its own (its init or periodic script) directly as
    completed, with its logs, in one statement. Returns the job id."""
    job_id = uuid.uuid4()
    await db.fetchrow(
        _INSERT_COMPLETED, job_id, workspace, kind, language, content, tag, worker, started_at,
        status, result, error, duration_ms, cpu_ms, mem_peak_kb, outcome, logs,
    )
    return job_id
