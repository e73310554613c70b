"""What a worker does on a clock: the one watch timer over its running and held jobs
(start a long job's heartbeat, give back the jobs held behind a long one), the jobs'
heartbeats, and the worker's own ping."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Awaitable, Callable

from sandmill.store import db as dbmod

from .settings import Group, WorkerSettings

if TYPE_CHECKING:
    from .execute import Running
    from .feed import SlotState

log = logging.getLogger("sandmill.worker")


class Watch:
    """One timer for the worker while it has jobs to watch, not one per job (see
    docs/performance.md ("Worker"), "The watch timer"). ``holds`` maps a slot that holds jobs
    ahead to when they go back (``release(slot)``) if its current job still runs."""

    def __init__(self, group: Group, settings: WorkerSettings, running: dict[uuid.UUID, Running],
                 release: Callable[[SlotState], None]):
        self.group = group
        self.settings = settings
        self.running = running
        self.release = release
        self.holds: dict[SlotState, float] = {}  # slot -> when its held jobs go back
        self.failed: dict[uuid.UUID, str] = {}  # job -> why its heartbeat failed (it fails)
        self._timer: asyncio.TimerHandle | None = None

    def arm(self) -> None:
        """Arm the watch of the running jobs and held ones, unless armed."""
        if self._timer is None:
            s = self.settings
            every = max(0.01, min(s.job_ping_s, s.claim_ahead_hold_s) / 5)
            self._timer = asyncio.get_running_loop().call_later(every, self._on_watch)

    def _on_watch(self) -> None:
        """Start the heartbeat of each job that has run job_ping_s; give back the jobs
        held behind one that has run claim_ahead_hold_s (a fifth of the shorter of the two
        late at most)."""
        self._timer = None
        now = time.monotonic()
        for r in list(self.running.values()):
            if r.heartbeat is None and now - r.t0 >= self.settings.job_ping_s:
                self._start_heartbeat(r)
        for st, due in list(self.holds.items()):
            if now >= due:
                del self.holds[st]
                self.release(st)
        # on while something is still to come (not for long jobs whose heartbeat runs)
        if self.holds or any(r.heartbeat is None for r in self.running.values()):
            self.arm()

    def _start_heartbeat(self, r: Running) -> None:
        if self.running.get(r.job["id"]) is r:
            r.heartbeat = asyncio.create_task(self._job_heartbeat(r))

    async def _job_heartbeat(self, r: Running) -> None:
        """Ping the job every job_ping_s. While the database is unreachable, ping again with
        backoff (under a second: the monitor gives a job away only once the database has
        been up for the ping timeout); any other failure fails the job (``failed``)."""
        backoff = dbmod.Backoff()
        while True:
            try:
                state = await self.group.q.ping_job(self.group.pool, r.job["id"], self.group.name)
            except Exception as e:  # noqa: BLE001 - sorted: an outage, or this job's fault
                if dbmod.is_disconnect(e):
                    log.warning("job %s: ping failed (%s); retrying", r.job["id"], e)
                    await backoff.wait()
                    continue
                log.error("job %s: heartbeat failed: %s", r.job["id"], e)
                if not r.why:
                    self.failed[r.job["id"]] = f"heartbeat failed: {type(e).__name__}: {e}"
                    r.kill("internal")
                return
            backoff.reset()
            if state != "ok" and not r.why:
                r.kill(state)
                return
            await asyncio.sleep(self.settings.job_ping_s)


@dataclass
class Stats:
    """The worker's jobs since its last ping, for the next one."""

    jobs_done: int = 0
    busy_s: float = 0.0
    since: float = field(default_factory=time.monotonic)

    def take_occupancy(self, subworkers: int) -> float:
        """The share of the slots' time spent in jobs since the last call; starts anew."""
        now = time.monotonic()
        occ = self.busy_s / max(1e-9, (now - self.since) * subworkers)
        self.busy_s, self.since = 0.0, now
        return min(1.0, occ)


async def ping_loop(every_s: float, ping: Callable[[], Awaitable[None]]) -> None:
    """The worker's heartbeat: ``ping()`` every ``every_s``, for good."""
    while True:
        await asyncio.sleep(every_s)
        try:
            await ping()
        except Exception as e:  # noqa: BLE001 - the worker outlives a failed ping
            log.warning("worker ping failed: %s", e)
