"""The server's monitor: jobs whose worker stopped answering go back to the queue."""

from __future__ import annotations

import asyncio
import logging
import time

import asyncpg

from sandmill.store import jobs as store_jobs
from sandmill.store import queue

log = logging.getLogger("sandmill.monitor")


class Settle:
    """When the monitor may give jobs away: only once its passes have reached the database
    for ``ping_timeout_s`` in a row. After an outage (the database down, or this server cut
    off from it), every heartbeat looks stale, though the workers are alive and ping again
    as soon as they can reach it; the store also checks the database's own uptime
    (requeue_stale), for a restart this server never saw fail."""

    def __init__(self, ping_timeout_s: float, every_s: float):
        self.ping_timeout_s = ping_timeout_s
        self.every_s = every_s
        self.ok_since: float | None = None  # start of the current run of successful passes
        self.last_ok: float | None = None

    def reached(self, t: float) -> None:
        # a gap longer than a couple of passes is an outage too (the loop was starved)
        if self.ok_since is None or self.last_ok is None or t - self.last_ok > 2 * self.every_s + 1:
            self.ok_since = t
        self.last_ok = t

    def failed(self) -> None:
        self.ok_since = None

    def settled(self, t: float) -> bool:
        return self.ok_since is not None and t - self.ok_since >= self.ping_timeout_s


async def monitor_loop(pool: asyncpg.Pool, ping_timeout_s: float, max_restarts: int,
                       every_s: float) -> None:
    """Run forever: every ``every_s``, requeue (or fail) jobs with a stale heartbeat, once
    the database has been reachable for the ping timeout (``Settle``)."""
    settle = Settle(ping_timeout_s, every_s)
    while True:
        await asyncio.sleep(every_s)
        try:
            if not settle.settled(time.monotonic()):
                await store_jobs.db_up_s(pool)  # only whether the database answers
                settle.reached(time.monotonic())
                continue
            actions = await queue.requeue_stale(pool, ping_timeout_s, max_restarts, db_settle_s=ping_timeout_s)
            settle.reached(time.monotonic())
            for action in actions:
                log.warning("job %s %s (worker %s stopped answering)", action["id"], action["action"], action["worker"])
        except Exception as e:  # noqa: BLE001 - the monitor outlives any failed pass
            settle.failed()
            log.warning("monitor pass failed: %s", e)
