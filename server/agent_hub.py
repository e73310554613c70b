"""One LISTEN connection for every agent request that waits (the long polls), instead of
one database connection per waiting agent; what an idle agent's claims found (nothing),
remembered until a NOTIFY says otherwise; the agents' pings gathered into one statement.

Cursors: every NOTIFY heard gets the next number (``n``); an agent's long poll sends the
number it has seen and gets back what came after: a wake-up when a job of one of its tags
was pushed, re-queued or freed, the ids of the jobs canceled, and whether its group's
config changed. ``epoch`` is drawn anew when the LISTEN connection is opened (NOTIFYs
sent meanwhile were missed; or this is another server, or the same one restarted): a
cursor of another epoch gets everything (wake, config)."""

from __future__ import annotations

import asyncio
import collections
import datetime as dt
import logging
import os
import secrets
import time
from dataclasses import dataclass
from typing import Any

import asyncpg

from sandmill.store import agent as store_agent
from sandmill.store import db as dbmod
from sandmill.store import queue, workers

log = logging.getLogger("sandmill.api")

# How long an empty claim is trusted without a NOTIFY: the DB worker's fallback poll.
EMPTY_TRUST_S = float(os.environ.get("SANDMILL_POLL_S", 30))
PING_FLUSH_S = float(os.environ.get("SANDMILL_AGENT_PING_FLUSH_S", 2))
CANCELS_KEPT = 1000


@dataclass
class _Empty:
    epoch: int
    n: int  # the cursor read before the claim that found nothing
    due: float | None  # when the earliest waiting job of the tags may start (unix seconds)
    until: float  # monotonic: trusted until then


class Hub:
    """The agents' shared view of the NOTIFY channels. ``run()`` keeps the LISTEN
    connection, for good."""

    def __init__(self, url: str, pool: asyncpg.Pool):
        self.url, self.pool = url, pool
        self.n = 0
        self.epoch = 0
        self.listening = False
        self.tag_n: dict[str, int] = {}
        self.config_n: dict[str, int] = {}
        self.cancels: collections.deque[tuple[int, str]] = collections.deque(maxlen=CANCELS_KEPT)
        self._waiters: dict[str, set[asyncio.Future]] = {}  # "q:tag", "c:group", "*" -> futures
        self._empty: dict[tuple[str, ...], _Empty] = {}
        self.pings: dict[str, tuple[int, int, float]] = {}
        self.ready = asyncio.Event()

    # ---- the LISTEN connection -----------------------------------------------------------

    async def run(self) -> None:
        conn: asyncpg.Connection | None = None
        backoff = dbmod.Backoff()
        lost = asyncio.Event()
        try:
            while True:
                if conn is not None and not conn.is_closed():
                    await lost.wait()
                    self.listening = False
                try:
                    lost = asyncio.Event()
                    conn = await dbmod.connect(self.url)
                    conn.add_termination_listener(lambda _c, ev=lost: ev.set())
                    await conn.add_listener(queue.CH_QUEUE, self._on_queue)
                    await conn.add_listener(queue.CH_CANCEL, self._on_cancel)
                    await conn.add_listener(workers.CH_CONFIG, self._on_config)
                except Exception as e:  # noqa: BLE001 - keep trying until the database is back
                    log.warning("agents' LISTEN: %s; reconnecting", e)
                    await backoff.wait()
                    continue
                backoff.reset()
                # what was missed meanwhile: every cursor of before sees it all (drawn, not
                # counted: a restarted server, or another one, must not reuse an epoch)
                self.epoch = secrets.randbits(48)
                self._empty.clear()
                self.listening = True
                self.ready.set()
                self._wake(list(self._waiters))
        finally:
            self.listening = False
            if conn is not None:
                await conn.close()

    def _next(self) -> int:
        self.n += 1
        return self.n

    def _on_queue(self, _c: Any, _p: int, _ch: str, payload: str) -> None:
        tag = payload.split("|", 1)[0]
        self.tag_n[tag] = self._next()
        self._wake(["q:" + tag])

    def _on_cancel(self, _c: Any, _p: int, _ch: str, payload: str) -> None:
        self.cancels.append((self._next(), payload))
        self._wake(["*"])

    def _on_config(self, _c: Any, _p: int, _ch: str, payload: str) -> None:
        self.config_n[payload] = self._next()
        self._wake(["c:" + payload])

    def wake_all(self) -> None:
        """End every wait (a token was revoked: each long poll looks at its own)."""
        self._wake(list(self._waiters))

    def _wake(self, keys: list[str]) -> None:
        for k in keys:
            for fut in self._waiters.pop(k, ()):
                if not fut.done():
                    fut.set_result(None)

    # ---- cursors and waits ---------------------------------------------------------------

    def cursor(self) -> list[int]:
        return [self.epoch, self.n]

    def since(self, cursor: list[int] | None, bases: list[str], group: str) -> dict[str, Any]:
        """What an agent of ``bases`` and ``group`` has not seen since ``cursor``."""
        if not cursor or len(cursor) != 2 or cursor[0] != self.epoch:
            return {"wake": True, "config": True, "cancels": [], "resync": True}
        seen = cursor[1]
        oldest = self.cancels[0][0] if self.cancels else self.n + 1
        return {"wake": any(self.tag_n.get(b, 0) > seen for b in bases),
                "config": self.config_n.get(group, 0) > seen,
                "cancels": [j for k, j in self.cancels if k > seen],
                "resync": len(self.cancels) == CANCELS_KEPT and oldest > seen + 1}

    async def wait(self, bases: list[str], group: str, timeout: float,
                   gone: asyncio.Future | None = None) -> None:
        """Until a NOTIFY for one of ``bases``, a cancel, ``group``'s config, ``gone``
        (the client left), or ``timeout``."""
        await self._wait(["q:" + b for b in bases] + ["c:" + group, "*"], timeout, gone)

    async def wait_queue(self, bases: list[str], timeout: float, gone: asyncio.Future | None = None) -> None:
        """Until a NOTIFY for one of ``bases`` (a job to claim), ``gone``, or ``timeout``."""
        await self._wait(["q:" + b for b in bases], timeout, gone)

    async def _wait(self, keys: list[str], timeout: float, gone: asyncio.Future | None) -> None:
        fut = asyncio.get_running_loop().create_future()
        for k in keys:
            self._waiters.setdefault(k, set()).add(fut)
        try:
            await asyncio.wait([fut] + ([gone] if gone is not None else []), timeout=timeout,
                               return_when=asyncio.FIRST_COMPLETED)
        finally:
            for k in keys:
                s = self._waiters.get(k)
                if s is not None:
                    s.discard(fut)
                    if not s:
                        del self._waiters[k]

    # ---- what an idle agent's claim found ----------------------------------------------

    def known_empty(self, tags: tuple[str, ...], bases: list[str]) -> bool:
        """Whether a claim for ``tags`` found nothing since the last NOTIFY of their bases
        (and no job of theirs has come due since): another claim would find nothing too."""
        e = self._empty.get(tags)
        if e is None or not self.listening or e.epoch != self.epoch or time.monotonic() > e.until:
            return False
        if any(self.tag_n.get(b, 0) > e.n for b in bases):
            return False
        return e.due is None or e.due > time.time()

    def note_empty(self, tags: tuple[str, ...], n_before: int, epoch_before: int,
                   due: dt.datetime | None) -> None:
        if self.listening and epoch_before == self.epoch:
            self._empty[tags] = _Empty(epoch_before, n_before, due.timestamp() if due else None,
                                       time.monotonic() + EMPTY_TRUST_S)

    def empty_due(self, tags: tuple[str, ...], bases: list[str]) -> tuple[bool, float | None]:
        """(known, due) of the cached empty claim of ``tags``."""
        if not self.known_empty(tags, bases):
            return False, None
        return True, self._empty[tags].due

    # ---- the agents' pings ---------------------------------------------------------------

    def ping(self, name: str, jobs_done: int, busy: int, occupancy: float) -> None:
        self.pings[name] = (jobs_done, busy, occupancy)

    async def flush_pings(self, every_s: float = PING_FLUSH_S) -> None:
        """Write the agents' pings every ``every_s``: one statement for all of them."""
        while True:
            await asyncio.sleep(every_s)
            if not self.pings:
                continue
            batch, self.pings = self.pings, {}
            try:
                await store_agent.ping_workers(self.pool, [(k, *v) for k, v in batch.items()])
            except Exception as e:  # noqa: BLE001 - the next pings will do
                log.warning("agents' pings not written: %s", e)
