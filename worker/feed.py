"""Where a worker's slots get their jobs and where they hand them in: the claim of the idle
slots, the claims of the jobs held ahead (claim ahead), the completions that claim the
next jobs in the same statement, and the give-back of the jobs a slot will not run."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import logging
import os
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from itertools import islice
from typing import Any, Callable, Coroutine

import asyncpg

from sandmill.store import db as dbmod
from sandmill.store import queue
from sandmill.store.storable import storable_text

from .batching import Batcher, HotConns
from .settings import Group, WorkerSettings
from .stmt_timing import CLAIM, COMPLETE, COMPLETE_AND_CLAIM, StatementTiming

log = logging.getLogger("sandmill.worker")

COMPLETION_FAILED = "completion failed (%s); the monitor puts the job back"
# How long a completion is sent again while the database is unreachable: past that the
# monitor puts the job back. The wait between tries stays under a second, well inside the
# monitor's settle time after the database comes back (SANDMILL_PING_TIMEOUT_S).
COMPLETION_RETRY_S = float(os.environ.get("SANDMILL_COMPLETION_RETRY_S", 600))
RETRY_MAX_WAIT_S = 1.0
CAUSE_MAX = 500  # characters of an internal error's cause kept in the job's error


def internal_error(c: queue.Completion, cause: str) -> queue.Completion:
    """The completion of a job that something of sandmill's own failed (its completion
    refused, its logs or heartbeat broken): a failure saying why, with nothing of the
    job's own output in it, so that it is storable whatever the job returned."""
    msg = f"internal error: {storable_text(cause[:CAUSE_MAX])}"  # it may quote hostile bytes
    return queue.Completion(c.job_id, c.worker, status="failure",
                            result={"error": {"name": "InternalError", "message": msg}}, error=msg,
                            duration_ms=c.duration_ms, cpu_ms=c.cpu_ms, mem_peak_kb=c.mem_peak_kb,
                            outcome=None, started_at=c.started_at, logs=c.logs)


def log_failed_completion(fut: asyncio.Future) -> None:
    """Done callback of a completion nobody awaits: log its failure."""
    if not fut.cancelled() and fut.exception() is not None:
        log.warning(COMPLETION_FAILED, fut.exception())


@dataclass
class Done:
    """A slot's job has ended: its completion, and what the slot wants back in the same
    statement: a job to run now (it holds none), how many to hold ahead, and the start
    stamp of the held job it starts as this one ends."""

    completion: queue.Completion
    now: bool
    ahead: int
    starting: tuple[uuid.UUID, dt.datetime] | None = None


@dataclass
class Answer:
    """What a slot gets back with its completion: a job to run now, jobs to hold."""

    now: dict[str, Any] | None
    ahead: list[dict[str, Any]]


@dataclass(eq=False)  # one per slot, a key by identity
class SlotState:
    """The jobs a slot holds ahead: those in hand, and the completions still in flight
    that claim more (each with how many it asked for)."""

    ready: deque[dict[str, Any]] = field(default_factory=deque)
    coming: deque[tuple[asyncio.Future, int]] = field(default_factory=deque)
    asked: int = 0
    dry: bool = False  # its last claim ahead got fewer jobs than it asked: no backlog left


class Pace:
    """How long this worker's jobs run lately, and so how many jobs a slot holds ahead."""

    def __init__(self, settings: WorkerSettings):
        self.settings = settings
        self.job_s: float | None = None  # a moving average of the jobs' run time

    def note(self, ran_s: float) -> None:
        self.job_s = ran_s if self.job_s is None else 0.8 * self.job_s + 0.2 * ran_s

    def depth(self) -> int:
        """How many jobs a slot holds ahead: one, or as many as run in claim_ahead_cover_s
        when this worker's jobs are that short (up to claim_ahead_max): a slot then keeps
        working through a completion's round trip, and each statement carries more jobs."""
        s = self.settings
        if self.job_s is None or self.job_s * 2 >= s.claim_ahead_cover_s:
            return 1
        return max(1, min(s.claim_ahead_max, int(s.claim_ahead_cover_s / max(self.job_s, 1e-6))))


class Feed:
    """Jobs for the slots of one worker. Idle slots that ask at the same time are served by
    one claim of several jobs (``claims``: queue.pull_many; keyed jobs by the one-job pull).
    With claim ahead and a backlog, each slot also asks for jobs to hold ahead, in a claim
    of their own that waits like a lazy completion (``ahead``). A busy slot's completion
    claims its next jobs in the same statement (``completer``).

    ``held`` is the set of the jobs claimed ahead and not started yet; ``canceled_held``
    those of them canceled meanwhile. ``spawn`` runs a coroutine in the background.
    ``timing`` times each claim and completion statement (worker/stmt_timing.py)."""

    def __init__(self, group: Group, settings: WorkerSettings, hot: HotConns, pace: Pace,
                 held: set[uuid.UUID], canceled_held: set[uuid.UUID],
                 spawn: Callable[[Coroutine[Any, Any, Any]], None],
                 timing: StatementTiming | None = None, completions_in_flight: int = 2):
        self.group = group
        self.settings = settings
        self.hot = hot
        self.pace = pace
        self.held = held
        self.canceled_held = canceled_held
        self.spawn = spawn
        self.timing = timing if timing is not None else StatementTiming()
        self.claims = Batcher(self._claim)
        self.ahead = Batcher(self._claim_ahead)
        # two completions in flight at once where each has a connection (the database
        # works on one batch while this process handles the answer to the other)
        self.completer = Batcher(self.complete_batch, in_flight=completions_in_flight)
        # once a slot has run half the jobs it holds, yield to a completion about to go out
        # (an agent's: its round trip then overlaps the other half, rather than follow all
        # the slots' jobs; docs/performance.md, "Agent workers")
        self.send_first = False

    # ---- claims ----------------------------------------------------------------------------

    async def next_job(self) -> tuple[dict[str, Any] | None, tuple[asyncio.Future, int] | None]:
        """(a job to run now, the claim of the jobs to hold ahead and how many it asks)"""
        return await self.claims.submit(None)

    async def _claim(self, asks: list[None]) -> list[tuple[dict[str, Any] | None, tuple[asyncio.Future, int] | None]]:
        g, n = self.group, len(asks)
        jobs: list[dict[str, Any]] = []
        conn, ok = await self.hot.acquire(), False
        try:
            if n > 1:
                t0 = time.perf_counter()
                jobs = await g.q.pull_many(conn, g.name, g.tags, n)
                self.timing.add(CLAIM, t0)
            while len(jobs) < n:  # one at a time: jobs with a concurrency key, or a lone slot
                t0 = time.perf_counter()
                job = await g.q.pull(conn, g.name, g.tags)
                self.timing.add(CLAIM, t0)
                if job is None:
                    break
                jobs.append(job)
            ok = True
        finally:
            await self.hot.release(conn, ok)
        if not g.profile.claim_ahead or len(jobs) < n:  # no backlog
            return [(job, None) for job in jobs] + [(None, None)] * (n - len(jobs))
        depth, lazy_s = self.pace.depth(), self.settings.completion_lazy_s
        return [(job, (self.ahead.enqueue(depth, wait_s=lazy_s), depth)) for job in jobs]

    async def _claim_ahead(self, depths: list[int]) -> list[Answer]:
        """Claim the jobs to hold ahead for slots that ask ``depths`` each."""
        g = self.group
        conn, ok = await self.hot.acquire(), False
        try:
            t0 = time.perf_counter()
            held = await g.q.pull_many(conn, g.name, g.tags, 0, ahead=sum(depths),
                                         ahead_after_s=self.settings.claim_ahead_after_s)
            self.timing.add(CLAIM, t0)
            ok = True
        finally:
            await self.hot.release(conn, ok)
        for job in held:
            self.held.add(job["id"])
        jobs = iter(held)  # best first
        return [Answer(None, list(islice(jobs, d))) for d in depths]

    async def complete_batch(self, reqs: list[Done]) -> list[Answer]:
        """Complete a batch and, in the same statement, claim the next job of each slot
        that wants one, claim the jobs to hold ahead, and stamp the start of the held jobs
        that start now: a busy slot makes one round trip per job.

        While the database is unreachable the batch is sent again, with backoff, for up to
        COMPLETION_RETRY_S (the jobs stay this worker's: a completion only lands for the
        worker that holds the job, so one that did land is not written twice). A batch the
        database refuses (one job's data) is completed job by job, the refused job failing
        with an internal error (``complete_apart``)."""
        backoff, apart = dbmod.Backoff(max_s=RETRY_MAX_WAIT_S), False
        while True:
            try:
                return await (self.complete_apart(reqs) if apart else self._complete_together(reqs))
            except Exception as e:  # noqa: BLE001 - sorted below: an outage or refused data
                if not dbmod.is_disconnect(e):
                    if apart:
                        raise
                    log.warning("a completion of %d job(s) was refused (%s); completing them one by one",
                                len(reqs), e)
                    apart = True
                    continue
                if backoff.elapsed_s > COMPLETION_RETRY_S:
                    raise
                log.warning("completion of %d job(s) failed (%s); retrying", len(reqs), e)
                await backoff.wait()

    async def _complete_together(self, reqs: list[Done]) -> list[Answer]:
        g = self.group
        done = [r.completion for r in reqs]
        want = sum(r.now for r in reqs)
        ahead = sum(r.ahead for r in reqs)
        starting = [r.starting for r in reqs if r.starting is not None]
        conn, ok = await self.hot.acquire(), False
        try:
            t0 = time.perf_counter()
            if want or ahead or starting or any(c.logs for c in done):  # only it carries logs
                _, jobs = await g.q.complete_and_pull(
                    conn, done, g.name, g.tags, want, ahead=ahead,
                    ahead_after_s=self.settings.claim_ahead_after_s, starting=starting)
                self.timing.add(COMPLETE_AND_CLAIM, t0)
            else:
                await g.q.complete_many(conn, done)
                self.timing.add(COMPLETE, t0)
                jobs = []
            ok = True
        finally:
            await self.hot.release(conn, ok)
        return self._answers(reqs, want, jobs)

    async def complete_apart(self, reqs: list[Done]) -> list[Answer]:
        """Complete the batch's jobs one statement each; a job whose completion is refused
        fails with an internal error instead (once: should that be refused too, it is left
        to the monitor); then claim and stamp for the batch in one statement. Sent again
        whole after an outage, it completes nothing twice (a completed job is not queued)."""
        g = self.group
        want = sum(r.now for r in reqs)
        ahead = sum(r.ahead for r in reqs)
        starting = [r.starting for r in reqs if r.starting is not None]
        conn, ok = await self.hot.acquire(), False
        try:
            for r in reqs:
                await self._complete_alone(conn, r.completion)
            jobs: list[dict[str, Any]] = []
            if want or ahead or starting:
                t0 = time.perf_counter()
                _, jobs = await g.q.complete_and_pull(
                    conn, [], g.name, g.tags, want, ahead=ahead,
                    ahead_after_s=self.settings.claim_ahead_after_s, starting=starting)
                self.timing.add(COMPLETE_AND_CLAIM, t0)
            ok = True
        finally:
            await self.hot.release(conn, ok)
        return self._answers(reqs, want, jobs)

    async def _complete_alone(self, conn: asyncpg.Connection, c: queue.Completion) -> None:
        if c.logs:  # the logs it carried go first (a reader who sees it completed sees them)
            try:
                await self.group.q.append_logs(conn, c.job_id, [c.logs])
            except Exception as e:  # noqa: BLE001 - logs are best effort, the completion is not
                if dbmod.is_disconnect(e):
                    raise
                log.warning("job %s: its log was not stored (%s)", c.job_id, e)
            c = dataclasses.replace(c, logs=None)
        try:
            t0 = time.perf_counter()
            await self.group.q.complete_many(conn, [c])
            self.timing.add(COMPLETE, t0)
            return
        except Exception as e:  # noqa: BLE001 - refused data fails this job, not the batch
            if dbmod.is_disconnect(e):
                raise
            cause = f"its completion was refused by the database: {type(e).__name__}: {e}"
        log.error("job %s: %s", c.job_id, cause)
        try:
            await self.group.q.complete_many(conn, [internal_error(c, cause)])
        except Exception as e:  # noqa: BLE001
            if dbmod.is_disconnect(e):
                raise
            log.error("job %s: its internal-error completion was refused too (%s); the monitor"
                      " will put it back", c.job_id, e)

    def _answers(self, reqs: list[Done], want: int, jobs: list[dict[str, Any]]) -> list[Answer]:
        now, held = iter(jobs[:want]), iter(jobs[want:])  # the first `want` run now
        for job in jobs[want:]:
            self.held.add(job["id"])
        return [Answer(next(now, None) if r.now else None, list(islice(held, r.ahead))) for r in reqs]

    # ---- the jobs a slot holds ahead ---------------------------------------------------------

    async def next_held(self, st: SlotState, ended: bool = False) -> dict[str, Any] | None:
        """The slot's next job held ahead, in the order they were claimed; waits for the
        oldest claim still in flight when none is back yet (None when they brought none).
        ``ended`` (the slot's job has just ended): a claim of jobs to hold that has not
        gone out yet is taken back instead (None): the job's completion claims them, one
        statement and round trip less before it (docs/performance.md, "Claim ahead")."""
        if self.send_first and self.completer.sending() and len(st.ready) * 2 <= self.pace.depth():
            await asyncio.sleep(0)  # half its held jobs are left: the completion goes now
        while True:
            self.absorb(st)
            if st.ready:
                job = st.ready.popleft()
                self.held.discard(job["id"])
                return job
            if not st.coming:
                return None
            if ended and self.ahead.withdraw(st.coming[0][0]):
                st.asked -= st.coming.popleft()[1]
                continue
            # it may still wait for company: its answer is wanted now
            self.completer.flush()
            self.ahead.flush()
            await asyncio.wait([st.coming[0][0]])

    def absorb(self, st: SlotState) -> None:
        """Move the jobs of the slot's claims that are back into its hands, in order."""
        while st.coming and st.coming[0][0].done():
            fut, n = st.coming.popleft()
            st.asked -= n
            if fut.cancelled() or fut.exception() is not None:
                log_failed_completion(fut)
            else:
                got = fut.result().ahead
                st.dry = len(got) < n
                st.ready.extend(got)

    def release_held(self, st: SlotState) -> None:
        """The slot's current job runs long: give its held jobs back to the queue, for idle
        slots to take (those still being claimed, as soon as their claim is back)."""
        self.absorb(st)
        for job in st.ready:
            self.spawn(self.give_back(job))
        st.ready.clear()
        for fut, _ in st.coming:
            fut.add_done_callback(self._release_answer)
        st.coming.clear()
        st.asked = 0

    def _release_answer(self, fut: asyncio.Future) -> None:
        if fut.cancelled() or fut.exception() is not None:
            log_failed_completion(fut)
            return
        for job in fut.result().ahead:
            self.spawn(self.give_back(job))

    async def give_back(self, job: dict[str, Any]) -> None:
        """Put a job this worker claimed and will not start back in the queue."""
        self.held.discard(job["id"])
        self.canceled_held.discard(job["id"])
        try:
            await self.group.q.requeue(self.group.pool, job["id"], self.group.name)
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as e:
            log.warning("could not give job %s back (%s); the monitor will", job["id"], e)
