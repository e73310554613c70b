"""SQL for the workers table: register, ping, list."""

from __future__ import annotations

from typing import Any

from .queue import Executor

CH_CONFIG = "sandmill_config"  # payload: the name of a worker group whose config changed


async def register(db: Executor, *, name: str, group: str, hostname: str, tags: list[str],
                   backend: str, subworkers: int, info: dict[str, Any]) -> None:
    await db.execute(
        """INSERT INTO worker (name, worker_group, hostname, tags, backend, subworkers, info)
           VALUES ($1, $2, $3, $4, $5, $6, $7)
           ON CONFLICT (name) DO UPDATE SET worker_group = $2, hostname = $3, tags = $4,
               backend = $5, subworkers = $6, info = $7, started_at = now(), last_ping = now()""",
        name, group, hostname, tags, backend, subworkers, info,
    )


async def ping(db: Executor, name: str, *, tags: list[str], jobs_done: int, busy: int,
               occupancy: float) -> None:
    """Heartbeat of a worker process, with its counters."""
    await db.execute(
        "UPDATE worker SET last_ping = now(), tags = $2, jobs_done = $3, busy = $4, occupancy = $5"
        " WHERE name = $1",
        name, tags, jobs_done, busy, occupancy,
    )


async def unregister(db: Executor, name: str) -> None:
    await db.execute("DELETE FROM worker WHERE name = $1", name)


async def list_workers(db: Executor, alive_within_s: float = 300) -> list[dict[str, Any]]:
    rows = await db.fetch(
        "SELECT *, extract(epoch FROM now() - last_ping)::float AS last_ping_s_ago FROM worker"
        " WHERE last_ping > now() - make_interval(secs => $1) ORDER BY worker_group, name",
        float(alive_within_s),
    )
    return [dict(r) for r in rows]


async def get_config(db: Executor, name: str) -> dict[str, Any] | None:
    return await db.fetchval("SELECT config FROM config WHERE name = $1", name)


async def put_config(db: Executor, name: str, config: dict[str, Any]) -> None:
    """Store a config and, for a worker group's (``worker__<group>``), tell its running
    workers in the same statement (NOTIFY on CH_CONFIG with the group name)."""
    await db.execute(
        "WITH c AS (INSERT INTO config (name, config) VALUES ($1, $2)"
        " ON CONFLICT (name) DO UPDATE SET config = $2, updated_at = now() RETURNING name)"
        f" SELECT pg_notify('{CH_CONFIG}', substr(name, 9)) FROM c WHERE name LIKE 'worker\\_\\_%'",
        name, config,
    )
