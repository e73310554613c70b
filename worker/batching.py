"""Group commit of the worker's claim and completion statements (``Batcher``), and the
connections kept out of the pool for them (``HotConns``). See docs/performance.md ("Worker")."""

from __future__ import annotations

import asyncio
from typing import Any, Awaitable, Callable

import asyncpg


class Batcher:
    """Group commit for one kind of request: callers that ask while statements are in
    flight are served together by the next one. A lone caller pays no added wait. Up to
    ``in_flight`` statements run at once, so that the database works on one batch while
    this process handles the answer to another.

    A lazy request (nobody waits for its answer yet) may wait for company, up to its
    ``wait_s``: the earliest due of the waits of those pending sends them all; ``flush()``
    sends them at once when an answer is wanted."""

    def __init__(self, run_batch: Callable[[list[Any]], Awaitable[list[Any]]], in_flight: int = 1):
        self._run_batch = run_batch  # async (list of requests) -> list of answers, same order
        self._pending: list[tuple[Any, asyncio.Future]] = []
        self._in_flight = in_flight
        self._timer: asyncio.TimerHandle | None = None
        self._tasks: set[asyncio.Task] = set()
        self._starting: asyncio.Task | None = None  # a statement's task made, not yet run (sending())

    async def submit(self, request: Any) -> Any:
        """Send ``request`` at once (with those that wait) and return its answer."""
        return await self.enqueue(request)

    async def wait_idle(self) -> None:
        """Return once no statement is in flight and no request waits."""
        while self._tasks or self._pending:
            self.flush()
            await asyncio.wait(list(self._tasks))

    def enqueue(self, request: Any, wait_s: float = 0.0) -> asyncio.Future:
        """Queue ``request``, to go out within ``wait_s`` (at once: 0); the future
        resolves to its answer."""
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        self._pending.append((request, fut))
        if wait_s <= 0:
            self.flush()
        else:
            due = loop.time() + wait_s
            if self._timer is None or due < self._timer.when():
                self._drop_timer()
                self._timer = loop.call_at(due, self.flush)
        return fut

    def withdraw(self, fut: asyncio.Future) -> bool:
        """Take back the request of ``fut`` if it has not gone out yet (its future is then
        cancelled): True; False once it is in a statement, or unknown here."""
        for i, (_, f) in enumerate(self._pending):
            if f is fut:
                del self._pending[i]
                if not self._pending:
                    self._drop_timer()
                fut.cancel()
                return True
        return False

    def flush_if(self, wanted: Callable[[Any], bool]) -> None:
        """flush() if a waiting request is ``wanted`` now."""
        if any(wanted(req) for req, _ in self._pending):
            self.flush()

    def flush(self) -> None:
        """Send what waits now (as soon as fewer than ``in_flight`` statements run)."""
        self._drop_timer()
        if self._pending and len(self._tasks) < self._in_flight:
            t = self._starting = asyncio.create_task(self._drain())
            self._tasks.add(t)
            t.add_done_callback(self._tasks.discard)

    def sending(self) -> bool:
        """A statement is about to go out: its task is made but has not run yet (it runs
        once the caller's task yields)."""
        return self._starting is not None and not self._starting.done()

    def _drop_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    async def _drain(self) -> None:
        if self._starting is asyncio.current_task():
            self._starting = None
        try:
            while self._pending:
                self._drop_timer()  # what waited lazily goes with this batch
                batch, self._pending = self._pending, []
                try:
                    answers = await self._run_batch([req for req, _ in batch])
                except Exception as e:  # noqa: BLE001 - handed to every caller of the batch
                    for _, fut in batch:
                        if not fut.done():
                            fut.set_exception(e)
                    continue
                for (_, fut), answer in zip(batch, answers):
                    if not fut.done():
                        fut.set_result(answer)
        finally:
            # out of the count in the step that saw nothing pending: a request queued
            # before the done callback ran would otherwise find every place taken, start
            # no statement, and wait forever
            self._tasks.discard(asyncio.current_task())


class HotConns:
    """Pool connections kept out of the pool for the claims and completions, whose
    acquire and release would cost about as much as the statement. Up to ``keep`` are
    kept between statements; one that saw an error goes back to the pool, which resets
    or replaces it. ``pool`` is set once the worker has connected."""

    def __init__(self, keep: int):
        self.keep = keep
        self.pool: asyncpg.Pool | None = None
        self._free: list[asyncpg.Connection] = []

    async def acquire(self) -> asyncpg.Connection:
        while self._free:
            conn = self._free.pop()
            try:
                if not conn.is_closed():
                    return conn
            except asyncpg.InterfaceError:
                continue  # lost while kept, and taken back by the pool already
            # lost while kept (the database restarted): the pool replaces it on acquire
            await self.pool.release(conn)
        return await self.pool.acquire()

    async def release(self, conn: asyncpg.Connection, ok: bool) -> None:
        if ok and len(self._free) < self.keep:
            self._free.append(conn)
        else:
            try:
                await self.pool.release(conn)
            except asyncpg.InterfaceError:
                pass  # the pool took it back when its connection was lost

    async def prepare(self, statements: Callable[[asyncpg.Connection], Awaitable[Any]]) -> None:
        """Open the ``keep`` connections now and run ``statements(conn)`` on each."""
        conns = [await self.pool.acquire() for _ in range(self.keep - len(self._free))]
        try:
            for conn in conns:
                await statements(conn)
        finally:
            self._free.extend(conns)

    async def close(self) -> None:
        while self._free:
            await self.pool.release(self._free.pop())
