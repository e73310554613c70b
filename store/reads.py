"""Reads of jobs, for the API, the monitor and a worker's wait: a job, its state and logs,
the recent jobs, the next due time of a worker's tags, and small gauges.

The statements are in sql/reads.sql. Use through ``sandmill.store.queue``.
"""

from __future__ import annotations

import datetime as dt
import uuid
from typing import Any

from .claims import split_tags
from .queries import Executor, sql

_NEXT_DUE = sql("next_due")
_GET_QUEUED = sql("get_queued")
_GET_COMPLETED_WHOLE = sql("get_completed_whole")
_GET_COMPLETED = sql("get_completed")
_JOB_STATE = sql("job_state")
_GET_LOGS = sql("get_logs")
_LIST_JOBS = sql("list_jobs")
_KEY_HAS_SLOT = sql("key_has_slot")
_QUEUED_TAGS_WITHOUT_WORKERS = sql("queued_tags_without_workers")
_COUNTS = sql("counts")
_IS_FUTURE = sql("is_future")


async def next_due(db: Executor, tags: list[str]) -> dt.datetime | None:
    """When the earliest waiting job of ``tags`` may start: its scheduled time, or later
    when its concurrency key is full (None if none can start before a job ends)."""
    bases, plain, pairs = split_tags(tags)
    return await db.fetchval(_NEXT_DUE, bases, plain, pairs)


async def get_job(db: Executor, workspace: str, job_id: uuid.UUID) -> dict[str, Any] | None:
    """The job, queued or completed, with ``type`` 'QueuedJob' or 'CompletedJob'."""
    row = await db.fetchrow(_GET_QUEUED, job_id, workspace)
    if row:
        return {"type": "QueuedJob", **dict(row)}
    row = await db.fetchrow(_GET_COMPLETED_WHOLE, job_id, workspace)
    return {"type": "CompletedJob", **dict(row)} if row else None


async def get_completed(db: Executor, workspace: str, job_id: uuid.UUID) -> dict[str, Any] | None:
    """A completed job's id, status, result and error; None if it is not completed."""
    row = await db.fetchrow(_GET_COMPLETED, job_id, workspace)
    return dict(row) if row else None


async def job_state(db: Executor, workspace: str, job_id: uuid.UUID) -> dict[str, Any] | None:
    """Cheap state for result polling: started/completed/success/result."""
    row = await db.fetchrow(_JOB_STATE, job_id, workspace)
    return dict(row) if row else None


async def get_logs(db: Executor, job_id: uuid.UUID, after_id: int = 0) -> tuple[str, int]:
    """Log text appended after log row ``after_id``, and the last row id (the next offset)."""
    row = await db.fetchrow(_GET_LOGS, job_id, after_id)
    return row["text"], row["last"]


async def list_jobs(
    db: Executor,
    workspace: str,
    *,
    limit: int = 50,
    script_path: str | None = None,
    success: bool | None = None,
    running: bool | None = None,
) -> list[dict[str, Any]]:
    """Recent jobs, queued and completed, newest first."""
    rows = await db.fetch(_LIST_JOBS, workspace, script_path, success, running, limit)
    return [dict(r) for r in rows]


async def key_has_slot(db: Executor, job_id: uuid.UUID) -> bool:
    """Could this waiting job's concurrency key let it start now?"""
    return await db.fetchval(_KEY_HAS_SLOT, job_id) is not False


async def queued_tags_without_workers(db: Executor, tags: list[str],
                                      workspace: str | None = None) -> list[str]:
    """Of ``tags``, those no worker that pinged recently serves (for ``workspace``, when
    given: a worker tag ``t(ws1+ws2)`` serves t for those workspaces only)."""
    rows = await db.fetch(_QUEUED_TAGS_WITHOUT_WORKERS, tags, workspace)
    return [r["t"] for r in rows]


async def counts(db: Executor) -> dict[str, int]:
    """Jobs waiting and running, and workers alive (pinged in the last 60 s)."""
    return dict(await db.fetchrow(_COUNTS))


async def is_future(db: Executor, when: dt.datetime) -> bool:
    """Is ``when`` still to come by the database's clock (the one scheduled_for is set by)?"""
    return bool(await db.fetchval(_IS_FUTURE, when))
