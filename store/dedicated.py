"""SQL of dedicated workers (worker/dedicated.py): claim many jobs of a served script in
one statement, complete many (with their logs) in one, heartbeat every held job in one,
give back jobs never started. The statements are in sql/dedicated.sql."""

from __future__ import annotations

import datetime as dt
import uuid
from dataclasses import dataclass
from typing import Any

from .queries import Executor, sql

_CLAIM = sql("dedicated_claim")
_COMPLETE = sql("dedicated_complete")
_PING = sql("dedicated_ping")
_GIVE_BACK = sql("dedicated_give_back")


def dedicated_tag(workspace: str, path: str) -> str:
    """The tag the jobs of a dedicated script are queued under (Windmill's form)."""
    return f"{workspace}:{path}"


async def claim(db: Executor, tag: str, worker: str, n: int) -> list[dict[str, Any]]:
    """Up to ``n`` due jobs of ``tag`` for ``worker``, best first; ``args`` as JSON text."""
    rows = await db.fetch(_CLAIM, tag, worker, n)
    jobs = [dict(r) for r in rows]
    jobs.sort(key=lambda j: (-j["priority"], j["scheduled_for"], j["seq"]))
    return jobs


@dataclass
class Done:
    """How one job of a dedicated runtime ended. ``result`` is JSON text, already checked
    to be storable."""

    job_id: uuid.UUID
    status: str
    result: str | None
    error: str | None
    duration_ms: int
    mem_peak_kb: int
    outcome: str | None
    started_at: dt.datetime | None
    log: str = ""
    cpu_ms: int = 0


async def complete(db: Executor, worker: str, done: list[Done]) -> dict[uuid.UUID, str]:
    """Complete ``done`` (and store their logs) in one statement; returns the final status
    of each job that was still this worker's."""
    if not done:
        return {}
    rows = await db.fetch(
        _COMPLETE, [d.job_id for d in done], [worker] * len(done), [d.status for d in done],
        [d.result for d in done], [d.error for d in done], [d.duration_ms for d in done],
        [d.cpu_ms for d in done], [d.mem_peak_kb for d in done], [d.outcome for d in done],
        [d.started_at for d in done], [d.log for d in done])
    return {r["id"]: r["status"] for r in rows}


async def ping(db: Executor, worker: str, starting: list[tuple[uuid.UUID, dt.datetime]],
               ) -> tuple[set[uuid.UUID], set[uuid.UUID]]:
    """Heartbeat every job ``worker`` holds and stamp the starts in ``starting``. Returns
    (the ids it still holds, the canceled ones among them)."""
    row = await db.fetchrow(_PING, worker, [j for j, _ in starting], [at for _, at in starting])
    return set(row["held"]), set(row["canceled"])


async def give_back(db: Executor, worker: str, ids: list[uuid.UUID]) -> None:
    """Jobs claimed but never started go back to the queue (no restart counted)."""
    if ids:
        await db.execute(_GIVE_BACK, ids, worker)
