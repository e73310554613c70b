"""One runtime's loop of a dedicated worker (worker/dedicated.py): claim the script's jobs
in batches, feed them ahead to its runtime, hand each result to the completer, and replace
the runtime on a fault (the job it ran fails with the reason; those sent behind it go to
the next one)."""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import os
import time
import uuid
from typing import TYPE_CHECKING, Any

from sandmill.store import dedicated as store
from sandmill.store import queue
from sandmill.store.storable import MAX_RESULT_JSON_BYTES, _SUSPECT_JSON, decode_output, json_problem

from .dedicated_channel import Sent
from .dedicated_runtime import Runtime, RuntimeStartError
from .execute import now
from .logs import MAX_LOG_BYTES
from .runtimes import failure
from .stmt_timing import DEDICATED_CLAIM

if TYPE_CHECKING:
    from .dedicated import Dedicated

log = logging.getLogger("sandmill.worker")

BATCH = 512  # jobs one claim takes at most
AHEAD = 32  # jobs sent to a runtime before their turn
SUCCESS_OUTCOME = json.dumps({"status": "success", "runtime": "dedicated"})
IMPORT_BACKOFF_S = (1.0, 2.0, 5.0, 10.0, 30.0)
START_BACKOFF_S = (0.5, 1.0, 2.0, 5.0, 10.0)


class ScriptLoop:
    """One runtime of one script: claim, feed, complete, replace on faults."""

    def __init__(self, d: Dedicated, workspace: str, path: str, index: int) -> None:
        self.d = d
        self.w = d.w
        self.workspace, self.path, self.index = workspace, path, index
        self.tag = store.dedicated_tag(workspace, path)
        self.local: collections.deque[dict[str, Any]] = collections.deque()  # claimed, not sent
        self.rt: Runtime | None = None
        self.changed = asyncio.Event()
        self.claiming: asyncio.Task | None = None
        self.drained = False  # the last claim found nothing: wait for a wake-up
        self.due: Any = False  # the tag's next due time (None: no job waits; False: unknown)
        self.wakes = 0  # wake-ups so far: a claim that began before one may not idle on it
        self.import_failed: dict[str, tuple[str, float, int]] = {}  # hash -> (error, until, tries)
        self.starts = 0
        self.lost: set[uuid.UUID] = set()
        self._mem_kb = 0
        self._mem_at = 0.0

    # ---- the loop --------------------------------------------------------------------------

    async def run(self, stopping: asyncio.Event) -> None:
        fails = 0
        while not stopping.is_set():
            if self.rt is None or (self.rt.ended is not None and self.rt.ended.done()):
                if self.rt is not None:
                    await self._after_end(self.rt)
                    self.rt = None
                if not self.local:  # a runtime starts with its first jobs, not before
                    self._claim()
                    if self.drained:
                        await self._idle(stopping)
                        continue
                    await self._wait()
                    continue
                try:
                    self.rt = await self._start()
                    fails = 0
                except RuntimeStartError as e:
                    delay = START_BACKOFF_S[min(fails, len(START_BACKOFF_S) - 1)]
                    fails += 1
                    log.error("dedicated %s: %s; trying again in %g s", self.tag, e, delay)
                    await self._sleep(delay, stopping)
                    continue
            self._feed()
            if len(self.local) < BATCH // 2:
                self._claim()
            if not self.local and not self.rt.inflight:
                if self.drained:
                    await self._idle(stopping)
                else:
                    await self._wait()
                continue
            await self._wait()
        await self._stop()

    async def _wait(self) -> None:
        await self.changed.wait()
        self.changed.clear()

    async def _idle(self, stopping: asyncio.Event) -> None:
        """Nothing to do: wait for a NOTIFY of the tag, the next due time, or poll_s. The
        due time is read once and kept while it lies ahead: every job that becomes due
        sooner comes with a NOTIFY (push, give-back, requeue), so a loop woken for a lone
        job does not read it again after each one."""
        if self.due is False or (self.due is not None and self.due <= now()):
            try:
                self.due = await queue.next_due(self.w.pool, [self.tag])
            except Exception:  # noqa: BLE001
                self.due = False
        due = self.due
        wait = self.w.settings.poll_s
        if due:
            wait = min(wait, max(0.0, (due - now()).total_seconds()))
        if wait > 0 and not self.changed.is_set():
            waiter = asyncio.ensure_future(self.changed.wait())
            stop = asyncio.ensure_future(stopping.wait())
            await asyncio.wait([waiter, stop], timeout=wait, return_when=asyncio.FIRST_COMPLETED)
            if not waiter.done():  # timed out (poll_s, or the due time): read it again next time
                self.due = False
            waiter.cancel()
            stop.cancel()
        self.changed.clear()
        self.drained = False

    async def _sleep(self, delay: float, stopping: asyncio.Event) -> None:
        try:
            await asyncio.wait_for(stopping.wait(), delay)
        except asyncio.TimeoutError:
            pass

    def wake_at(self, epoch: float | None) -> None:
        if epoch is None or epoch <= time.time():
            self.wakes += 1
            self.drained = False
            self.changed.set()
        else:  # a job due later: wake then
            loop = asyncio.get_running_loop()
            loop.call_at(loop.time() + (epoch - time.time()), self.wake_at, None)

    def _poke(self) -> None:
        self.changed.set()

    # ---- claims ----------------------------------------------------------------------------

    def _claim(self) -> None:
        if self.claiming is None and not self.drained:
            self.claiming = asyncio.get_running_loop().create_task(self._claim_now())

    async def _claim_now(self) -> None:
        gen = self.wakes
        want = BATCH - len(self.local)
        try:
            t0 = time.perf_counter()
            jobs = await store.claim(self.w.pool, self.tag, self.w.name, want)
            self.w.timing.add(DEDICATED_CLAIM, t0)
        except Exception as e:  # noqa: BLE001 - try again in a second
            log.warning("dedicated %s: claim failed: %s", self.tag, e)
            await asyncio.sleep(1.0)
            jobs = []
        finally:
            self.claiming = None
        if jobs:
            self.d.claims += 1
            for job in jobs:  # which heartbeats may judge it (drop_lost)
                job["claim_no"] = self.d.claims
            self.local.extend(jobs)
        # fewer than asked: nothing else was due at its snapshot, and a job committed since
        # comes with a NOTIFY (a wake-up): no empty claim after each lone job
        if len(jobs) < want and gen == self.wakes:
            self.drained = True
        self.changed.set()

    # ---- feeding the runtime ---------------------------------------------------------------

    def _feed(self) -> None:
        rt = self.rt
        assert rt is not None
        lim = self.w.profile.limits
        while self.local and len(rt.inflight) < AHEAD and rt.sock is not None:
            job = self.local.popleft()
            jid = job["id"]
            if jid in self.lost:
                self.lost.discard(jid)
                continue
            if jid in self.d.canceled or job["canceled"]:
                self.d.canceled.discard(jid)
                self._done_failure(job, None, "Canceled", "job canceled", "canceled before it started")
                continue
            h = job["script_hash"]
            if job["language"] != "python3":
                self._done_failure(job, None, "UnsupportedLanguage",
                                   f"a dedicated worker runs python3 scripts only, not {job['language']}")
                continue
            failed = self.import_failed.get(h)
            if failed is not None and time.monotonic() < failed[1]:
                err, until, tries = failed
                self._done_error(job, None, err, note=f" (import failed {tries} time(s); tried again"
                                                     f" in {until - time.monotonic():.1f} s)")
                continue
            wall = float(job["timeout_s"]) if job["timeout_s"] else lim.wall_s
            rt.send(job, wall)

    def running(self) -> list[Sent]:
        """The job its runtime runs now (its start stamp goes with the heartbeat)."""
        rt = self.rt
        if rt is not None and rt.inflight and rt.inflight[0].started is not None:
            return [rt.inflight[0]]
        return []

    def cancel(self, job_id: uuid.UUID) -> None:
        rt = self.rt
        if rt is not None and rt.inflight and rt.inflight[0].job["id"] == job_id:
            if rt.inflight[0].started is not None:
                rt.kill("canceled")
        # sent behind: killed when it starts (on_start); local: completed in _feed

    def drop_lost(self, held: set[uuid.UUID], seen: int) -> None:
        """Jobs the heartbeat says are not ours any more (the monitor gave them away). Only
        those claimed by the first ``seen`` claims: a claim that committed after the
        heartbeat's snapshot is missing from ``held`` although the jobs are ours (marking
        them lost left them held, heartbeated and never run: issue 18)."""
        before = len(self.lost)
        for job in self.local:
            if job["id"] not in held and job["claim_no"] <= seen:
                self.lost.add(job["id"])
        rt = self.rt
        if rt is not None:
            for s in rt.inflight:
                if s.job["id"] not in held and s.job["claim_no"] <= seen:
                    self.lost.add(s.job["id"])
                    if s is rt.inflight[0] and s.started is not None:
                        rt.kill("lost")
        if len(self.lost) > before:
            log.warning("dedicated %s: %d job(s) no longer this worker's (the monitor gave them"
                        " away): not run here", self.tag, len(self.lost) - before)

    # ---- runtimes --------------------------------------------------------------------------

    async def _start(self) -> Runtime:
        w = self.w
        backend = w.backend
        pool = getattr(backend, "warm_pool", None)
        if pool is None:
            raise RuntimeStartError(f"backend {backend.name if backend else 'none'} has no warm"
                                    " interpreters to host a dedicated runtime")
        rt = Runtime(pool, w.profile.python, w.profile.limits, w.env, self._on_result,
                     MAX_LOG_BYTES, self._poke)
        rt.on_start = self._on_start
        await rt.start()
        self.starts += 1
        return rt

    def _on_start(self, s: Sent) -> None:
        if s.job["id"] in self.d.canceled and self.rt is not None:
            self.rt.kill("canceled")

    async def _after_end(self, rt: Runtime) -> None:
        """The runtime ended: the job it ran fails with the reason; those sent behind it
        (never started) go first to the next runtime."""
        assert rt.ended is not None
        status, detail = rt.ended.result()
        q = list(rt.inflight)
        rt.inflight.clear()
        if q and q[0].started is not None:
            s = q.pop(0)
            jid = s.job["id"]
            if rt.why == "shutdown":
                q.insert(0, s)
            elif jid in self.lost:
                self.lost.discard(jid)
            else:
                name, msg = rt.describe(status, detail, self.w.profile.limits.merged(
                    {"wall_s": s.wall_s}))
                if rt.why == "canceled":
                    self.d.canceled.discard(jid)
                self._done_failure(s.job, s, name, msg)
                log.info("dedicated %s: runtime ended (%s) running job %s", self.tag, msg, jid)
        for s in q:
            if s.pipe >= 0:
                os.close(s.pipe)
                s.pipe = -1
        self.local.extendleft(reversed([s.job for s in q]))

    async def _stop(self) -> None:
        """Give back what never reached the runtime; let what was sent finish (up to the
        grace period), then end the runtime and give back what it never started."""
        w = self.w
        ids = [j["id"] for j in self.local]
        self.local.clear()
        rt = self.rt
        if rt is not None and rt.ended is not None and not rt.ended.done():
            deadline = time.monotonic() + w.settings.grace_s
            while rt.inflight and not rt.ended.done() and time.monotonic() < deadline:
                self.changed.clear()
                try:
                    await asyncio.wait_for(self.changed.wait(), max(0.01, deadline - time.monotonic()))
                except asyncio.TimeoutError:
                    break
            rt.kill("shutdown")
            await asyncio.shield(rt.ended)
            await self._after_end(rt)
            ids += [j["id"] for j in self.local]
            self.local.clear()
        if self.claiming is not None:
            await asyncio.wait([self.claiming])
            ids += [j["id"] for j in self.local]
        try:
            await store.give_back(w.pool, w.name, ids)
        except Exception as e:  # noqa: BLE001 - the monitor puts them back
            log.warning("dedicated %s: give-back failed: %s", self.tag, e)

    # ---- results ---------------------------------------------------------------------------

    def _mem(self, rt: Runtime) -> int:
        t = time.monotonic()
        if t - self._mem_at > 0.05:  # a cgroup read per 50 ms, not per job
            self._mem_at = t
            self._mem_kb = rt.peak_memory_kb()
        return self._mem_kb

    def _on_result(self, s: Sent, kind: int, body: bytes) -> None:
        job = s.job
        if job["id"] in self.lost:
            self.lost.discard(job["id"])
            return
        if kind == 68:  # D
            text = body.decode("utf-8", "replace")
            problem = _result_problem(text, self.w.profile.limits.output_bytes)
            if problem is None:
                h = job["script_hash"]
                if h in self.import_failed:
                    del self.import_failed[h]
                self._complete(job, s, "success", text, None, SUCCESS_OUTCOME)
                return
            self._done_failure(job, s, "ResultNotStorable", problem)
            return
        err = body.decode("utf-8", "replace")
        if kind == 73:  # I: the version's import failed: not again before the backoff
            h = job["script_hash"]
            tries = self.import_failed.get(h, ("", 0.0, 0))[2] + 1
            delay = IMPORT_BACKOFF_S[min(tries - 1, len(IMPORT_BACKOFF_S) - 1)]
            self.import_failed[h] = (err, time.monotonic() + delay, tries)
            if self.rt is not None:
                self.rt.unload(h)
        self._done_error(job, s, err)

    def _done_error(self, job: dict[str, Any], s: Sent | None, err_json: str, note: str = "") -> None:
        try:
            err = json.loads(err_json)
            name, msg, stack = str(err.get("name", "Error")), str(err.get("message", "")), err.get("stack")
        except (ValueError, AttributeError, RecursionError):
            name, msg, stack = "ResultError", "the runtime sent an error that is not valid JSON", None
        self._done_failure(job, s, name, msg + note, stack=str(stack) if stack else None)

    def _done_failure(self, job: dict[str, Any], s: Sent | None, name: str, msg: str,
                      error: str | None = None, stack: str | None = None) -> None:
        r = failure(name, msg, stack)
        outcome = json.dumps({"status": "failure", "runtime": "dedicated", "error": name})
        self._complete(job, s, "failure", json.dumps(r.result), error or r.error, outcome)

    def _complete(self, job: dict[str, Any], s: Sent | None, status: str, result: str,
                  error: str | None, outcome: str) -> None:
        t = time.monotonic()
        started = s.started if s is not None and s.started is not None else t
        logs = ""
        if s is not None and s.out:
            logs = decode_output(bytes(s.out))
            if s.out_total > len(s.out):
                logs += f"\n[sandmill: {s.out_total - len(s.out)} more bytes of output not stored]\n"
        rt = self.rt
        mem = self._mem(rt) if rt is not None else 0
        self.w.stats.jobs_done += 1
        self.d.completer.add(store.Done(
            job["id"], status, result, error, int((t - started) * 1000), mem, outcome,
            s.started_at if s is not None and s.started_at is not None else now(), logs,
            s.cpu_ms if s is not None else 0))


def _result_problem(text: str, output_bytes: int) -> str | None:
    """Why the result JSON text a runtime sent cannot be stored, or None. It is hostile:
    the job's code may write to the control channel."""
    if len(text) >= output_bytes:
        return f"the result is larger than the output limit of {output_bytes} bytes"
    if len(text) > MAX_RESULT_JSON_BYTES:
        return (f"the result is {len(text)} bytes as JSON, over the {MAX_RESULT_JSON_BYTES}"
                " bytes a result may take")
    try:
        value = json.loads(text)
    except (ValueError, RecursionError):
        return "the result is not valid JSON"
    if _SUSPECT_JSON.search(text) is None:
        return None
    return json_problem(value)

