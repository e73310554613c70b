"""The slot loop: each of a worker's ``subworkers`` slots runs a job, completes it, runs the
next; an idle one waits for a wake-up (NOTIFY), the next job's due time or the poll."""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import os
import time
import uuid
from typing import Any


from sandmill.store import queue

from .ahead import NextSetUp
from .execute import Executor, Running, now
from .feed import COMPLETION_FAILED, Done, Feed, Pace, SlotState, internal_error, log_failed_completion
from .settings import Group, WorkerSettings
from .watch import Stats, Watch

log = logging.getLogger("sandmill.worker")


class Slots:
    """The worker's slots. ``wake`` is the event idle slots wait on: ``wake_all()`` swaps
    it; ``stopping`` (the worker's) ends each slot's loop at its next turn."""

    def __init__(self, group: Group, settings: WorkerSettings, stopping: asyncio.Event, feed: Feed,
                 executor: Executor, watch: Watch, pace: Pace, stats: Stats,
                 running: dict[uuid.UUID, Running]):
        self.group = group
        self.settings = settings
        self.stopping = stopping
        self.feed = feed
        self.executor = executor
        self.watch = watch
        self.pace = pace
        self.stats = stats
        self.running = running
        self.wake = asyncio.Event()
        # the wake event and next_due's read under it, shared by the idle slots (next_due)
        self._due: tuple[asyncio.Event, asyncio.Future] | None = None
        self._after: set[asyncio.Future] = set()  # completions waiting for their logs (_after_logs)
        # a short job's completion waits for the next one's statement (_completion_wait_s);
        # the environment's 0 turns it off, for bench.completions' before/after
        self.share_short = os.environ.get("SANDMILL_SHARE_SHORT_COMPLETIONS", "1") != "0"
        # the next job's set-up while a job runs (worker/ahead.py); the environment's 0
        # turns it off, for the benchmark's before/after
        self.prepare_next = os.environ.get("SANDMILL_PREPARE_NEXT", "1") != "0"

    def wake_all(self) -> None:
        """Wake every idle slot (a NOTIFY for our tags, a config reload)."""
        # Swap the event so that every slot waiting on the old one wakes, and a slot that
        # is mid-pull still sees this wake-up (it captured the old event before pulling).
        ev, self.wake = self.wake, asyncio.Event()
        ev.set()

    async def run_slot(self, index: int) -> None:
        """One subworker, until the worker stops: run a job, complete it, and run the next.
        A busy slot's completion claims its next job in the same statement; with claim
        ahead it claims the job after that, so that the next one is in hand (and starts)
        the moment this one ends; with very short jobs, several (as many as run in
        claim_ahead_cover_s)."""
        feed, watch, stats = self.feed, self.watch, self.stats
        st = SlotState()
        job: dict[str, Any] | None = None  # the job to run next
        hold_s = self.settings.claim_ahead_hold_s
        found_none = False  # the last completion's claim found no job due
        wake = self.wake
        lane = asyncio.current_task()
        nxt: NextSetUp | None = None  # the next job's set-up, started while a job runs
        while not self.stopping.is_set():
            if found_none:
                # wait for a wake-up rather than claim again at once (at a drain's end, every
                # slot would, beside the last completions); one since `wake` was taken,
                # before that claim, ends the wait at once
                found_none = False
                await self._idle(wake)
                continue  # a stop() may have ended the wait: no claim then
            wake = self.wake
            if job is None:
                job = await feed.next_held(st)
            if job is None:
                try:
                    job, ahead_claim = await feed.next_job()
                except Exception as e:  # noqa: BLE001 - a slot outlives any failed claim
                    log.warning("pull failed (%s); retrying", e)
                    await self._sleep_or_stop(1.0)
                    continue
                if job is None:
                    await self._idle(wake)
                    continue
                if ahead_claim is not None:
                    st.coming.append(ahead_claim)
                    st.asked += ahead_claim[1]
            if self.stopping.is_set():
                break  # claimed as the worker began to stop: not started, given back below
            t0 = time.monotonic()
            current, job = job, None
            made = nxt.take(current) if nxt is not None else None
            nxt = NextSetUp(self.executor, st, lane) if self.prepare_next and lane is not None else None
            if st.ready or st.coming:  # the jobs held ahead go back if this one runs long
                watch.holds[st] = t0 + hold_s
                watch.arm()
            started = now()
            logs: asyncio.Future[None] | None = None  # its last logs' write, still under way
            try:
                done, logs = await self.executor.execute_deferred(current, made)
            except Exception as e:  # noqa: BLE001 - one bad job must not kill the worker
                log.exception("job %s: internal error", current["id"])
                done = self._failed(current, started, f"{type(e).__name__}: {e}")
            finally:
                watch.holds.pop(st, None)
            if (why := watch.failed.pop(current["id"], None)) is not None:  # its heartbeat broke
                done = self._failed(current, started, why, done.logs if done is not None else None)
            ran_s = time.monotonic() - t0
            stats.busy_s += ran_s
            stats.jobs_done += 1
            self.pace.note(ran_s)  # how long this worker's jobs run, lately
            if done is None:  # lost, or put back at shutdown: nothing to complete
                continue
            job = await feed.next_held(st, ended=True)  # its claim has had this job's run to come back
            if job is None and nxt is not None:  # nothing held: no set-up to keep
                nxt.close()
                nxt = None
            stopping = self.stopping.is_set()
            if job is not None and stopping:
                await feed.give_back(job)
                job = None
            # no claim ahead after a long job: the next is likely long too, and its
            # held jobs would only go back
            ahead = 0
            if self.group.profile.claim_ahead and not stopping and ran_s < hold_s:
                ahead = max(0, self.pace.depth() - len(st.ready) - st.asked)
            d = Done(done, now=job is None and not stopping, ahead=ahead,
                     starting=(job["id"], now()) if job is not None else None)
            wait_s = self._completion_wait_s(st, current, ran_s, job, stopping)
            if logs is not None and job is None:
                await _written(logs)  # nothing to run meanwhile: the completion follows its logs
            if logs is not None and job is not None:
                # the next job runs while the logs are written; the completion follows them
                fut = self._after_logs(logs, d, 0.0 if ahead else wait_s)
            else:
                fut = feed.completer.enqueue(d, wait_s=wait_s)
            if ahead:
                st.coming.append((fut, ahead))
                st.asked += ahead
            if job is None:  # wait for the next job, or (stopping) for the job's completion
                try:
                    job = (await fut).now
                    found_none = job is None and not stopping
                except Exception as e:  # noqa: BLE001 - the statement failed for every caller
                    log.warning(COMPLETION_FAILED, e)
            elif not ahead:
                fut.add_done_callback(log_failed_completion)
        if nxt is not None:
            nxt.close()
        if job is not None:  # claimed while the worker began to stop: not started, give it back
            await feed.give_back(job)
        while (held := await feed.next_held(st)) is not None:
            await feed.give_back(held)
        if self._after:  # completions still waiting for their logs are handed in
            await asyncio.wait(list(self._after))

    def _after_logs(self, logs: asyncio.Future[None], d: Done, wait_s: float) -> asyncio.Future:
        """Hand ``d`` in once ``logs`` are written (a reader who sees the job completed
        sees all its logs); the slot goes on with its next job meanwhile. A completion
        that a claim of held jobs rides on (``d.ahead``) is sent at once then."""
        async def send() -> Any:
            await _written(logs)
            return await self.feed.completer.enqueue(d, wait_s=wait_s)

        t = asyncio.ensure_future(send())
        self._after.add(t)
        t.add_done_callback(self._after.discard)
        return t

    def _failed(self, job: dict[str, Any], started: dt.datetime, cause: str,
                logs: str | None = None) -> queue.Completion:
        """The completion of a job that failed inside sandmill (not of itself), with the
        logs its completion carried."""
        ran_ms = int((now() - started).total_seconds() * 1000)
        return internal_error(queue.Completion(job["id"], self.group.name, "failure", None, None,
                                               duration_ms=ran_ms, started_at=started, logs=logs), cause)

    def _completion_wait_s(self, st: SlotState, ran: dict[str, Any], ran_s: float,
                           job: dict[str, Any] | None, stopping: bool) -> float:
        """How long the completion of the job ``ran`` may wait for company (0: at once).

        With the next job in hand it is not urgent: unless jobs are short (their next answer
        is wanted at once), it waits completion_lazy_s for the slots whose jobs end about
        now; a short job's waits for the next completion when the slot holds more jobs
        than the one it starts (not for a job someone waits on). With none, at a burst's end (its last claim ahead found no backlog, and other
        jobs of this worker still run), completion_tail_wait_s; not for a job someone waits
        on, and a new job for our tags (NOTIFY) or the last running job's end sends it at
        once. See docs/performance.md ("Worker"), "Completion tail wait"."""
        s = self.settings
        if job is not None:
            if ran_s >= 2 * s.completion_lazy_s:
                return s.completion_lazy_s
            # A short job whose slot holds more jobs beside the one it starts now: the
            # answer (its claim of jobs to hold) is not wanted before those have run, so it
            # waits for the next job's completion to share its statement (the earliest
            # wait of a batch sends it; the slot's last held job sends it at once): half
            # the statements, and their commits (docs/performance.md, "Round 3").
            if self.share_short and st.ready and self.pace.job_s and not ran.get("notify_done"):
                return min(s.completion_lazy_s, (len(st.ready) + 0.5) * self.pace.job_s)
            return 0.0
        if stopping or not st.dry or not self.running or ran.get("notify_done"):
            return 0.0
        return s.completion_tail_wait_s

    async def _idle(self, wake: asyncio.Event) -> None:
        timeout = self.settings.poll_s
        due = await self.next_due(wake)
        if due is not None:
            timeout = max(0.0, min(timeout, due.timestamp() - time.time()))
        # asyncio.timeout, not wait_for: 3.11's wait_for runs the wait in a task of its own,
        # and a burst wakes every idle slot at once, before their claim can go out
        try:
            async with asyncio.timeout(timeout):
                await wake.wait()
        except TimeoutError:
            pass

    async def next_due(self, wake: asyncio.Event) -> dt.datetime | None:
        """When the earliest waiting job may start, read once per wake-up for all the slots
        that miss a pull (a drain's tail: every slot at once): what makes a job due sooner
        (a push, a freed key slot, a re-queue) NOTIFYs and so swaps the wake event; what
        makes it later (another worker claims it) only wakes a slot early. A due time that
        has passed, or a failed read, is read again."""
        d = self._due
        if d is None or d[0] is not wake or _due_stale(d[1]):
            d = self._due = (wake, asyncio.ensure_future(self.group.q.next_due(self.group.pool, self.group.tags)))
        try:
            return await asyncio.shield(d[1])
        except Exception:  # noqa: BLE001 - read again at the next wake-up
            return None

    async def _sleep_or_stop(self, s: float) -> None:
        try:
            await asyncio.wait_for(self.stopping.wait(), s)
        except asyncio.TimeoutError:
            pass


async def _written(logs: asyncio.Future[None]) -> None:
    """Wait for a job's logs' write; its failure is not the completion's (LogSink logs it)."""
    try:
        await logs
    except Exception:  # noqa: BLE001, S110 - a worker never dies of one job's logs
        pass


def _due_stale(read: asyncio.Future) -> bool:
    if not read.done():
        return False
    if read.cancelled() or read.exception() is not None:
        return True
    due = read.result()
    return due is not None and due.timestamp() <= time.time()
