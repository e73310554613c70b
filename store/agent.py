"""Agent workers' statements: the secret that signs their tokens, revoked tokens, the
checks that a job is the agent's own, and their heartbeats gathered into one statement.

The statements are in sql/agent.sql."""

from __future__ import annotations

import datetime as dt
import uuid

from .queries import Executor, sql

_SECRET = sql("agent_secret")
_BLACKLIST = sql("blacklist_agent_token")
_LIST_BLACKLIST = sql("agent_blacklist")
_COMPLETED_BY = sql("completed_by")
_APPEND_LOG_IF_HELD = sql("append_log_if_held")
_PING_WORKERS = sql("ping_workers")


async def secret(db: Executor, new: str) -> str:
    """The secret that signs agent tokens: the stored one, else ``new``, stored now."""
    return await db.fetchval(_SECRET, new)


async def blacklist(db: Executor, jti: str, group: str, expires_at: dt.datetime) -> None:
    """Revoke the agent token ``jti`` (until ``expires_at``, when it expires anyway)."""
    await db.execute(_BLACKLIST, jti, group, expires_at)


async def blacklisted(db: Executor) -> set[str]:
    """The ids of the revoked agent tokens not yet expired."""
    return {r["jti"] for r in await db.fetch(_LIST_BLACKLIST)}


async def completed_by(db: Executor, ids: list[uuid.UUID], worker: str) -> set[uuid.UUID]:
    """Which of ``ids`` completed on ``worker``."""
    return {r["id"] for r in await db.fetch(_COMPLETED_BY, ids, worker)} if ids else set()


async def append_log_if_held(db: Executor, job_id: uuid.UUID, chunks: list[str], worker: str) -> bool:
    """Append log text to a job ``worker`` runs; False (nothing written) when it runs no such job."""
    if not chunks:
        return True
    return (await db.execute(_APPEND_LOG_IF_HELD, job_id, "".join(chunks), worker)).endswith(" 1")


async def ping_workers(db: Executor, pings: list[tuple[str, int, int, float]]) -> None:
    """Heartbeats of many workers: (name, jobs done, busy slots, occupancy) each."""
    if pings:
        await db.execute(_PING_WORKERS, [p[0] for p in pings], [p[1] for p in pings],
                         [p[2] for p in pings], [p[3] for p in pings])
