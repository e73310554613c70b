"""The autoscaler's loop, in the server: every ``SANDMILL_AUTOSCALE_INTERVAL_S`` (30 s),
in the one server that holds the PostgreSQL advisory lock, decide each autoscaled group's
count (rules.decide), apply it (integrations) and record it with an event. A job queued
for a group at zero is checked at once: the leader LISTENs on sandmill_queue on its lock
connection and wakes when a NOTIFY names a tag of such a group."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from typing import Any

import asyncpg

from sandmill.profiles import Profile
from sandmill.store import autoscale as store
from sandmill.store import db as dbmod
from sandmill.store import queue

from .groups import Group, load_groups, profiles_from_env, publish
from .integrations import apply
from .rules import Decision, Occupancy, decide

log = logging.getLogger("sandmill.autoscale")

ALIVE_S = 60.0  # a worker that pinged this recently counts
WAKE_GAP_S = 0.2  # after a NOTIFY wake, let the rest of its burst land before checking


def interval_s() -> float:
    """SANDMILL_AUTOSCALE_INTERVAL_S, default 30."""
    return float(os.environ.get("SANDMILL_AUTOSCALE_INTERVAL_S", 30))


class Autoscaler:
    """One per server; acts only while it holds the lock (``leader``)."""

    def __init__(self, database_url: str, pool: asyncpg.Pool, every_s: float | None = None,
                 server: str | None = None, profiles: list[Profile] | None = None):
        self.url = database_url
        # the server's own profile files (SANDMILL_PROFILES), published for whoever leads;
        # a bad one raises here, before the server serves
        self.profiles = profiles_from_env() if profiles is None else profiles
        self.pool = pool
        self.every_s = interval_s() if every_s is None else every_s
        self.server = server or f"{socket.gethostname()}-{os.getpid()}"
        self.lock_conn: asyncpg.Connection | None = None
        self._wake = asyncio.Event()
        self._zero: tuple[set[str], set[str]] = (set(), set())  # plain tags, pairs of groups at zero
        self._published = False

    @property
    def leader(self) -> bool:
        return self.lock_conn is not None and not self.lock_conn.is_closed()

    async def run(self) -> None:
        """Forever: publish this server's profiles, take the lead when free, check."""
        while True:
            try:
                if not self._published:
                    await publish(self.pool, self.profiles)
                    self._published = True
                if not self.leader:
                    await self._try_lead()
                if self.leader:
                    await self.check()
            except Exception as e:  # noqa: BLE001 - the autoscaler outlives a failed pass
                log.warning("autoscaler pass failed: %s", e)
            try:
                await asyncio.wait_for(self._wake.wait(), self.every_s)
                await asyncio.sleep(WAKE_GAP_S)  # a burst of NOTIFYs makes one check, not one each
            except asyncio.TimeoutError:
                pass
            self._wake.clear()

    async def close(self) -> None:
        if self.lock_conn is not None:
            await self.lock_conn.close()  # the lock goes with the session
            self.lock_conn = None

    async def _try_lead(self) -> None:
        conn = await dbmod.connect(self.url)
        try:
            if not await store.try_lock(conn):
                await conn.close()
                return
            await conn.add_listener(queue.CH_QUEUE, self._on_queue)
        except BaseException:
            await conn.close()
            raise
        self.lock_conn = conn
        log.info("autoscaler: %s leads (every %g s)", self.server, self.every_s)

    def _on_queue(self, _conn: Any, _pid: int, _channel: str, payload: str) -> None:
        """A job was queued: check at once if its tag is a group's at zero."""
        plain, pairs = self._zero
        tag = payload.split("|", 1)[0]
        if tag in plain or any(p.startswith(tag + "(") for p in pairs):
            self._wake.set()

    async def check(self) -> list[dict[str, Any]]:
        """One pass over every autoscaled group; returns the events recorded."""
        events = []
        zero_plain: set[str] = set()
        zero_pairs: set[str] = set()
        for g in await load_groups(self.pool):
            ev, count = await self.check_group(g)
            if ev is not None:
                events.append(ev)
            if count == 0:
                plain, pairs = store.tag_sets(g.tags)
                zero_plain.update(plain)
                zero_pairs.update(pairs)
        self._zero = (zero_plain, zero_pairs)
        return events

    async def check_group(self, g: Group) -> tuple[dict[str, Any] | None, int]:
        """Decide and apply one group's count; returns (the event or None, the count now)."""
        waiting = await store.jobs_waiting(self.pool, g.tags)
        ws = await store.group_workers(self.pool, g.name, ALIVE_S)
        occ = None if ws["occ_15s"] is None else Occupancy(ws["occ_15s"], ws["occ_5m"], ws["occ_30m"])
        current = g.desired if g.desired is not None else ws["workers"]
        d = decide(g.cfg, current, waiting, occ, g.since_change_s, g.last_event)
        if d.event is None:
            return None, current
        ev, ok = await self._act(g, d, current)
        return ev, (d.desired if ok else current)

    async def _act(self, g: Group, d: Decision, current: int) -> tuple[dict[str, Any], bool]:
        """Apply, record the count (when applied) and the event."""
        applied = await apply(g, d, current, self.pool)
        if applied.ok:
            await store.set_desired(self.pool, g.name, g.tags, d.desired, d.event or "")
        ev = {"group": g.name, "event_type": d.event, "from_workers": current, "desired": d.desired,
              "reason": d.reason, "integration": g.cfg.integration.type, "status": applied.status,
              "output": applied.output, "server": self.server}
        ev["id"] = await store.insert_event(self.pool, **ev)
        log.info("autoscale %s: %s %d -> %d (%s): %s", g.name, d.event, current, d.desired, d.reason,
                 applied.status)
        return ev, applied.ok
