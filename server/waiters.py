"""Requests waiting for a job's result, woken by the completion NOTIFY (channel queue.CH_DONE)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from typing import Any, Iterator, NamedTuple

import asyncpg

from sandmill.store import db as dbmod
from sandmill.store import jobs as store_jobs
from sandmill.store import queue

log = logging.getLogger("sandmill.api")


class Result(NamedTuple):
    """A completed job's answer as its NOTIFY carried it: success, and the result as JSON
    text (the completion statement's own, read from the row it wrote)."""

    success: bool
    json: str


def parse_done(payload: str) -> tuple[uuid.UUID, Result | None]:
    """A sandmill_done payload: '<id>' (read the result), or '<id> <1|0><result JSON>' as
    dedicated_complete sends it when the result fits in a NOTIFY (no read after it)."""
    if len(payload) > 37 and payload[36] == " ":
        return uuid.UUID(payload[:36]), Result(payload[37] == "1", payload[38:])
    return uuid.UUID(payload), None


class ResultWaiters:
    """Per job id, the futures of the requests waiting for it to complete. A future's
    value: the Result when the NOTIFY carried it, else True (read it)."""

    def __init__(self) -> None:
        self._by_job: dict[uuid.UUID, list[asyncio.Future]] = {}

    def on_done(self, _conn: Any, _pid: int, _channel: str, payload: str) -> None:
        """The asyncpg listener callback: the payload names the completed job (parse_done)."""
        try:
            job_id, result = parse_done(payload)
        except ValueError:  # not ours to answer: a waiter times out rather than the listener dying
            log.warning("%s: a payload that names no job: %.80r", queue.CH_DONE, payload)
            return
        for fut in self._by_job.pop(job_id, []):
            if not fut.done():
                fut.set_result(result or True)

    def waiting(self) -> list[uuid.UUID]:
        """The ids of the jobs someone waits for."""
        return list(self._by_job)

    def resolve(self, job_ids: set[uuid.UUID]) -> None:
        """Wake the waiters of ``job_ids`` (completed while their NOTIFY could not come)."""
        for job_id in job_ids:
            self.on_done(None, 0, "", str(job_id))

    @contextlib.contextmanager
    def register(self, job_id: uuid.UUID) -> Iterator[asyncio.Future]:
        """A future that resolves when ``job_id`` completes; unregistered on exit."""
        fut = asyncio.get_running_loop().create_future()
        self._by_job.setdefault(job_id, []).append(fut)
        try:
            yield fut
        finally:
            lst = self._by_job.get(job_id)
            if lst and fut in lst:
                lst.remove(fut)
                if not lst:
                    self._by_job.pop(job_id, None)


async def listen_for_results(url: str, pool: asyncpg.Pool, waiters: ResultWaiters,
                             ready: asyncio.Event | None = None) -> None:
    """Keep a LISTEN connection on queue.CH_DONE for ``waiters``, for good. When it is lost
    (the database restarted; asyncpg calls its termination listener) it is opened again,
    with backoff while the database is unreachable; the waiters of jobs that completed
    meanwhile (their NOTIFY went nowhere) are then woken from one read of completed_job.
    ``ready`` is set once it first listens."""
    listener: asyncpg.Connection | None = None
    backoff = dbmod.Backoff()
    lost = asyncio.Event()
    try:
        while True:
            if listener is not None and not listener.is_closed():
                await lost.wait()
            try:
                lost = asyncio.Event()
                listener = await dbmod.connect(url)
                listener.add_termination_listener(lambda _conn, ev=lost: ev.set())
                await listener.add_listener(queue.CH_DONE, waiters.on_done)
                if waiters.waiting():  # after a loss: their NOTIFYs may have gone nowhere
                    waiters.resolve(await store_jobs.completed_among(pool, waiters.waiting()))
            except Exception as e:  # noqa: BLE001 - keep trying until the database is back
                log.warning("LISTEN %s: %s; reconnecting", queue.CH_DONE, e)
                await backoff.wait()
                continue
            backoff.reset()
            if ready is not None:
                ready.set()
    finally:
        if listener is not None:
            await listener.close()
