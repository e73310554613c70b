"""The server's monitor: jobs whose worker stopped answering go back to the queue."""

from __future__ import annotations

import asyncio
import logging

import asyncpg

from sandmill.store import queue

log = logging.getLogger("sandmill.monitor")


async def monitor_loop(pool: asyncpg.Pool, ping_timeout_s: float, max_restarts: int,
                       every_s: float) -> None:
    """Run forever: every ``every_s``, requeue (or fail) jobs with a stale heartbeat."""
    while True:
        await asyncio.sleep(every_s)
        try:
            for action in await queue.requeue_stale(pool, ping_timeout_s, max_restarts):
                log.warning("job %s %s (worker %s stopped answering)", action["id"], action["action"], action["worker"])
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as e:
            log.warning("monitor pass failed: %s", e)
