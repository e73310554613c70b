"""The worker's one connection for statements (``DbConn``): every part of a worker process
(claims, completions, pings, log appends, job heartbeats, config reads) sends its
statements through it, one at a time, in the order they ask. With the LISTEN connection
that makes two PostgreSQL backends per worker process whatever its subworker count.
See docs/performance.md ("Connections per worker")."""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Awaitable, Callable

import asyncpg

from sandmill.store import db as dbmod

log = logging.getLogger("sandmill.worker")

CLOSE_WAIT_S = 5.0  # how long close() waits for the statement in flight


class DbConn:
    """One asyncpg connection shared by a worker's tasks, with the calls of a pool that
    the store's functions use (``fetch``, ``fetchrow``, ``fetchval``, ``execute``), and
    ``acquire``/``release`` to hold it over several statements (the feed's claims).

    asyncpg runs one statement at a time on a connection: a FIFO lock orders the tasks,
    which costs nothing when the connection is free (no task, no loop turn: a pool's
    acquire and release cost about as much as a small statement). The connection is opened
    on first use and reopened on the next use after it was lost (the database restarted);
    ``on_connect(conn)`` runs on each new one (the worker prepares its statements there).
    Callers see an outage as they saw the pool's: the statement raises, and they retry."""

    def __init__(self, url: str, *, settings: dict[str, str] | None = None, app_name: str | None = None,
                 on_connect: Callable[[asyncpg.Connection], Awaitable[Any]] | None = None):
        self.url = url
        self.settings = settings
        self.app_name = app_name
        self.on_connect = on_connect
        self.opened = 0  # connections opened so far (1 unless the database restarted)
        self._conn: asyncpg.Connection | None = None
        self._lock = asyncio.Lock()
        self._closed = False

    async def open(self) -> None:
        """Connect now (raises what connecting raises)."""
        conn = await self.acquire()
        await self.release(conn)

    async def acquire(self) -> asyncpg.Connection:
        """Wait for the connection (in turn) and hold it until ``release``."""
        await self._lock.acquire()
        try:
            if self._closed:
                raise asyncpg.InterfaceError("the worker's connection is closed")
            if self._conn is None or self._conn.is_closed():
                self._conn = None
                conn = await dbmod.connect(self.url, settings=self.settings, app_name=self.app_name)
                try:
                    if self.on_connect is not None:
                        await self.on_connect(conn)
                except BaseException:
                    conn.terminate()
                    raise
                self._conn = conn
                self.opened += 1
            return self._conn
        except BaseException:
            self._lock.release()
            raise

    async def release(self, conn: asyncpg.Connection) -> None:
        """Hand the connection on to the next task; a transaction left open (a statement
        that failed inside one) is rolled back first, as a pool's reset would."""
        try:
            if conn is self._conn and not conn.is_closed() and conn.is_in_transaction():
                await conn.execute("ROLLBACK")
        except Exception as e:  # noqa: BLE001 - a broken connection is replaced on next use
            log.warning("rollback on the worker's connection failed (%s); reconnecting", e)
            conn.terminate()
        finally:
            self._lock.release()

    async def _run(self, method: str, query: str, args: tuple, kw: dict) -> Any:
        conn = await self.acquire()
        try:
            return await getattr(conn, method)(query, *args, **kw)
        finally:
            await self.release(conn)

    async def fetch(self, query: str, *args: Any, **kw: Any) -> list[asyncpg.Record]:
        return await self._run("fetch", query, args, kw)

    async def fetchrow(self, query: str, *args: Any, **kw: Any) -> asyncpg.Record | None:
        return await self._run("fetchrow", query, args, kw)

    async def fetchval(self, query: str, *args: Any, **kw: Any) -> Any:
        return await self._run("fetchval", query, args, kw)

    async def execute(self, query: str, *args: Any, **kw: Any) -> str:
        return await self._run("execute", query, args, kw)

    async def close(self) -> None:
        """Close the connection once the statement in flight (if any) is done, or after
        CLOSE_WAIT_S; later calls raise InterfaceError."""
        try:
            await asyncio.wait_for(self._lock.acquire(), CLOSE_WAIT_S)
            held = True
        except asyncio.TimeoutError:
            held = False
        self._closed = True
        conn, self._conn = self._conn, None
        try:
            if conn is not None and not conn.is_closed():
                if held:
                    try:
                        await asyncio.wait_for(conn.close(), CLOSE_WAIT_S)
                    except (asyncio.TimeoutError, OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
                        conn.terminate()
                else:
                    conn.terminate()
        finally:
            if held:
                self._lock.release()
