"""Group commit of submits: the jobs that requests queue in the same loop turn, or while
an INSERT is in flight, go out together in the next one (``push_many``), one statement
and one commit for all of them; a lone submit goes at the loop's next turn, alone, with
no timer. Why: per job, PostgreSQL's
statement and commit and the server's round trip cost more than the row itself
(docs/performance.md, "The server's and PostgreSQL's share per job")."""

from __future__ import annotations

import asyncio
import os
import uuid
from typing import Any

import asyncpg

from sandmill.store import jobs as store_jobs

# Statements in flight at once per pool: two, so one batch's commit (its WAL flush)
# overlaps the next one's send; more would only make each batch smaller.
IN_FLIGHT = 1
MAX_BATCH = 200  # jobs in one statement (a burst of thousands goes in several)
ENABLED = os.environ.get("SANDMILL_SUBMIT_BATCH", "1") != "0"  # 0: a statement per job (before/after runs)


class SubmitBatcher:
    """Queues jobs of one pool: ``await push(**push_keywords)``, as ``store.jobs.push``."""

    def __init__(self, pool: asyncpg.Pool, in_flight: int = IN_FLIGHT, max_batch: int = MAX_BATCH):
        self.pool, self.in_flight, self.max_batch = pool, in_flight, max_batch
        self._pending: list[tuple[dict[str, Any], asyncio.Future]] = []
        self._running = 0
        self._kicked = False  # a _kick is scheduled
        self._tasks: set[asyncio.Task] = set()  # a strong reference while each runs
        self.statements = 0  # sent so far (tests and measurements)

    async def push(self, **job: Any) -> uuid.UUID:
        """Queue one job (``store.jobs.push``'s keywords); returns its id once committed.
        Raises what its own insert would have raised."""
        if job.get("job_id") is None:
            job["job_id"] = uuid.uuid4()
        fut = asyncio.get_running_loop().create_future()
        self._pending.append((job, fut))
        if self._running < self.in_flight and not self._kicked:
            # at the loop's next turn, not now: the other requests this turn's read brought
            # in reach here first and go in the same statement
            self._kicked = True
            asyncio.get_running_loop().call_soon(self._kick)
        return await fut

    def _kick(self) -> None:
        self._kicked = False
        while self._pending and self._running < self.in_flight:
            self._start()

    def _start(self) -> None:
        batch = [(j, f) for j, f in self._pending[:self.max_batch] if not f.done()]
        del self._pending[:self.max_batch]
        if not batch:
            return
        self._running += 1
        task = asyncio.get_running_loop().create_task(self._send(batch))
        self._tasks.add(task)
        task.add_done_callback(self._sent)

    def _sent(self, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        self._running -= 1
        if self._pending and self._running < self.in_flight:
            self._start()

    async def _send(self, batch: list[tuple[dict[str, Any], asyncio.Future]]) -> None:
        self.statements += 1
        try:
            if len(batch) == 1:  # push's own statement: the same as without batching
                job, fut = batch[0]
                await store_jobs.push(self.pool, **job)
            else:
                await store_jobs.push_many(self.pool, [j for j, _ in batch])
        except BaseException as e:  # noqa: BLE001 - each caller gets its own answer below
            if len(batch) == 1 or isinstance(e, asyncio.CancelledError):
                for _, fut in batch:
                    _settle(fut, exc=e)
                if isinstance(e, asyncio.CancelledError):
                    raise
                return
            # one job's value may be what PostgreSQL refused: each again alone, so each
            # caller gets the answer its own insert gives (an outage: each its own 503)
            await asyncio.gather(*(self._alone(j, f) for j, f in batch))
            return
        for job, fut in batch:
            _settle(fut, result=job["job_id"])

    async def _alone(self, job: dict[str, Any], fut: asyncio.Future) -> None:
        try:
            _settle(fut, result=await store_jobs.push(self.pool, **job))
        except Exception as e:  # noqa: BLE001 - handed to its caller
            _settle(fut, exc=e)


def _settle(fut: asyncio.Future, result: Any = None, exc: BaseException | None = None) -> None:
    if fut.done():  # its caller gave up (cancelled): the job is queued all the same
        return
    if isinstance(exc, asyncio.CancelledError):  # the statement's task was cancelled (shutdown)
        fut.cancel()
    elif exc is not None:
        fut.set_exception(exc)
    else:
        fut.set_result(result)


# The batchers of the app's pools (asyncpg's Pool takes no weak reference): the app's
# lifespan attaches its pool when it opens it and detaches it before closing it.
_BATCHERS: dict[int, SubmitBatcher] = {}


def attach(pool: asyncpg.Pool) -> None:
    """Submits on ``pool`` go through a batcher from now on (unless SANDMILL_SUBMIT_BATCH=0)."""
    if ENABLED:
        _BATCHERS[id(pool)] = SubmitBatcher(pool)


def detach(pool: asyncpg.Pool) -> None:
    """Submits on ``pool`` go directly again (it is closing)."""
    _BATCHERS.pop(id(pool), None)


async def push(pool: Any, **job: Any) -> uuid.UUID:
    """Queue one job as ``store.jobs.push`` does: through the batcher of ``pool`` when it
    has one, else directly (a connection, a transaction, a pool not attached)."""
    b = _BATCHERS.get(id(pool))
    if b is not None and b.pool is pool:
        return await b.push(**job)
    return await store_jobs.push(pool, **job)
