"""The workers table (register, ping, list) and the stored configs of worker groups.

The statements are in sql/workers.sql."""

from __future__ import annotations

from typing import Any

from .queries import CH_CONFIG, Executor, sql  # noqa: F401  (CH_CONFIG: the listeners' name for it)

_REGISTER = sql("register_worker")
_PING = sql("ping_worker")
_UNREGISTER = sql("unregister_worker")
_LIST = sql("list_workers")
_GET_CONFIG = sql("get_config")
_PUT_CONFIG = sql("put_config")
_SET_GPU_JOBS = sql("set_worker_gpu_jobs")


async def register(db: Executor, *, name: str, group: str, hostname: str, tags: list[str],
                   backend: str, subworkers: int, info: dict[str, Any]) -> None:
    """Register a worker process (or refresh the row of one restarted under its name)."""
    await db.execute(_REGISTER, name, group, hostname, tags, backend, subworkers, info)


async def ping(db: Executor, name: str, *, tags: list[str], jobs_done: int, busy: int,
               occupancy: float, windows: tuple[float, float, float] = (0.0, 0.0, 0.0),
               statement_latency: dict[str, Any] | None = None) -> None:
    """Heartbeat of a worker process, with its counters, its occupancy over 15 s, 5 min
    and 30 min (``windows``, worker/occupancy.py) and its statements' latency
    (``statement_latency``, worker/stmt_timing.py: kept in ``info``; None leaves it)."""
    await db.execute(_PING, name, tags, jobs_done, busy, occupancy, *windows, statement_latency)


async def unregister(db: Executor, name: str) -> None:
    await db.execute(_UNREGISTER, name)


async def list_workers(db: Executor, alive_within_s: float = 300) -> list[dict[str, Any]]:
    rows = await db.fetch(_LIST, float(alive_within_s))
    return [dict(r) for r in rows]


async def get_config(db: Executor, name: str) -> dict[str, Any] | None:
    return await db.fetchval(_GET_CONFIG, name)


async def put_config(db: Executor, name: str, config: dict[str, Any]) -> None:
    """Store a config and, for a worker group's (``worker__<group>``), tell its running
    workers in the same statement (NOTIFY on CH_CONFIG with the group name)."""
    await db.execute(_PUT_CONFIG, name, config)


async def set_gpu_jobs(db: Executor, name: str, gpus: list[dict[str, Any]]) -> None:
    """A GPU worker's GPUs and the jobs that hold each now (worker/gpus.py)."""
    await db.execute(_SET_GPU_JOBS, name, gpus)
