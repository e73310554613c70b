"""What the server keeps for its agent workers: the token keys, the shared LISTEN (the
hub, started with the first agent request, so a server without agents holds no connection
for them), the pings' writer, and the answers of recent requests by idempotency key."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
import time
from typing import Any

from fastapi import FastAPI, Request

from sandmill.store import db as dbmod
from sandmill.store import queue

from .agent_auth import AgentKeys
from .agent_hub import Hub

CLAIM_CONNS = int(os.environ.get("SANDMILL_AGENT_CLAIM_CONNS", 8))  # per server, for all its agents
REPLY_KEPT_S = 300.0  # an agent retries a request for less than this
REPLIES_KEPT = 20000


class AgentState:
    """One per app (``app.state.agents``)."""

    def __init__(self, url: str, pool: Any):
        self.url = url
        self.claims: Any = None  # the agents' claims and completions: a pool of their own (started())
        self.keys = AgentKeys(pool)
        self.hub = Hub(url, pool)
        self.keys.on_revoke = self.hub.wake_all
        self._tasks: list[asyncio.Task] = []
        self._lock = asyncio.Lock()
        self._replies: collections.OrderedDict[tuple[str, str], tuple[float, bytes]] = collections.OrderedDict()

    async def started(self) -> Hub:
        """The hub, listening (started by the first agent request that needs it)."""
        if self.claims is None:
            async with self._lock:
                if self.claims is None:
                    # the session settings a DB worker claims with (the in-order scan of the
                    # pull index, generic plans): the same statements, the same plans
                    self.claims = await dbmod.create_pool(self.url, min_size=1, max_size=CLAIM_CONNS,
                                                          settings=queue.CLAIM_SETTINGS)
        if not self._tasks:
            self._tasks = [asyncio.create_task(self.hub.run()), asyncio.create_task(self.hub.flush_pings()),
                           asyncio.create_task(self.keys.keep_fresh())]
        if not self.hub.ready.is_set():  # its first LISTEN; not for long while the database is down
            ready = asyncio.create_task(self.hub.ready.wait())
            await asyncio.wait([self._tasks[0], ready], timeout=5.0, return_when=asyncio.FIRST_COMPLETED)
            ready.cancel()
        return self.hub

    async def close(self) -> None:
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.claims is not None:
            await self.claims.close()

    # ---- answers by idempotency key: a request sent again after its answer was lost gets
    # the same answer, not a second claim (the jobs of the first would be held by nobody)

    def reply(self, key: tuple[str, str] | None) -> bytes | None:
        if key is None:
            return None
        hit = self._replies.get(key)
        return hit[1] if hit is not None and hit[0] > time.monotonic() else None

    def keep_reply(self, key: tuple[str, str] | None, body: bytes) -> None:
        if key is None:
            return
        self._replies[key] = (time.monotonic() + REPLY_KEPT_S, body)
        now = time.monotonic()
        while self._replies and (len(self._replies) > REPLIES_KEPT or next(iter(self._replies.values()))[0] < now):
            self._replies.popitem(last=False)


def agent_state(request: Request) -> AgentState:
    """The app's AgentState (made on first use: the pool exists by then)."""
    st = getattr(request.app.state, "agents", None)
    if st is None:
        st = request.app.state.agents = AgentState(request.app.state.settings.database_url,
                                                   request.app.state.pool)
    return st


@contextlib.asynccontextmanager
async def lifespan(app: FastAPI):
    """The agent router's lifespan: stop the hub's tasks when the server stops."""
    yield
    st = getattr(app.state, "agents", None)
    if st is not None:
        await st.close()
