"""Reads of the web dashboard and the Prometheus metrics: the queue per tag, throughput,
paged job lists (keyset, on indexes of migration 0012), the workers' running jobs and
init runs, and completed jobs folded per label set for the metrics.

The statements are in sql/dashboard.sql."""

from __future__ import annotations

import datetime as dt
import uuid
from typing import Any

from .queries import Executor, sql

_QUEUE_BY_TAG = sql("queue_by_tag")
_THROUGHPUT = sql("throughput")
_ACTIVE_JOBS = sql("active_jobs")
_COMPLETED_JOBS = sql("completed_jobs")
_RUNNING_JOBS_OF = sql("running_jobs_of")
_LAST_ADMIN_RUNS = sql("last_admin_runs")
_GROUP_NAMES = sql("group_names")
_DB_NOW = sql("db_now")
_FOLD_COMPLETED = sql("fold_completed")
_RUNNING_STARTED = sql("running_started")

# The first page's cursor: after every completed job.
FIRST = (dt.datetime.max.replace(tzinfo=dt.timezone.utc), uuid.UUID(int=(1 << 128) - 1))
ACTIVE_STATES = ("queued", "running")
COMPLETED_STATES = ("success", "failure", "canceled")


def _rows(rows: list[Any]) -> list[dict[str, Any]]:
    return [dict(r) for r in rows]


async def queue_by_tag(db: Executor) -> list[dict[str, Any]]:
    """Per tag: jobs waiting, running, and the oldest due waiting job's wait (s)."""
    return _rows(await db.fetch(_QUEUE_BY_TAG))


async def throughput(db: Executor, seconds: float = 3600) -> list[dict[str, Any]]:
    """Completed jobs per minute over the last ``seconds``, by status."""
    return _rows(await db.fetch(_THROUGHPUT, float(seconds)))


async def active_jobs(db: Executor, *, workspace: str | None, script_path: str | None,
                      tag: str | None, state: str | None, limit: int) -> list[dict[str, Any]]:
    """A page of the queue's jobs, newest first (``state``: queued, running or None)."""
    return _rows(await db.fetch(_ACTIVE_JOBS, workspace, script_path, tag, state, limit))


async def completed_jobs(db: Executor, *, after: tuple[dt.datetime, uuid.UUID] = FIRST,
                         workspace: str | None, script_path: str | None, tag: str | None,
                         status: str | None, limit: int) -> list[dict[str, Any]]:
    """A page of completed jobs, newest completion first, after the keyset cursor
    ``after`` (completed_at, id)."""
    return _rows(await db.fetch(_COMPLETED_JOBS, after[0], after[1], workspace, script_path, tag,
                                status, limit))


async def running_jobs_of(db: Executor, workers: list[str]) -> list[dict[str, Any]]:
    """The jobs the named workers are running now."""
    return _rows(await db.fetch(_RUNNING_JOBS_OF, workers))


async def last_admin_runs(db: Executor, workers: list[str], kind: str = "init") -> list[dict[str, Any]]:
    """Each named worker's last init (or periodic) script run, where it has one."""
    return _rows(await db.fetch(_LAST_ADMIN_RUNS, workers, kind))


async def group_names(db: Executor) -> list[str]:
    """Worker groups with a live or recent worker row, or a stored config."""
    return [r["name"] for r in await db.fetch(_GROUP_NAMES)]


async def db_now(db: Executor) -> dt.datetime:
    return await db.fetchval(_DB_NOW)


async def fold_completed(db: Executor, since: dt.datetime, until: dt.datetime,
                         bounds_ms: list[int]) -> list[dict[str, Any]]:
    """Completed jobs with completed_at in [since, until), counted per (group, language,
    backend, status, duration bucket, wait bucket), with their duration and wait sums."""
    return _rows(await db.fetch(_FOLD_COMPLETED, since, until, bounds_ms))


async def running_started(db: Executor) -> list[dict[str, Any]]:
    """Jobs running now, per group, language and backend of their worker."""
    return _rows(await db.fetch(_RUNNING_STARTED))
