"""Dedicated workers: a group dedicated to scripts (profile ``dedicated_worker(s)``) runs
their jobs in long-lived runtimes (dedicated_runtime.py), one per script and subworker,
fed ahead from batched claims, with batched completions: no fork, no interpreter start and
no database round trip on a job's path.

Per script and subworker a ``ScriptLoop`` (dedicated_loop.py): it claims up to ``BATCH`` jobs of the script's
tag in one statement (again when half are gone, so the runtime never waits on the
database), keeps ``AHEAD`` of them sent to its runtime, and hands each result to the
``Completer``, which completes every result that came meanwhile in one statement. One
heartbeat statement a second covers every job the worker holds (and says which were
canceled). When a runtime ends (a job exited it, a segfault, the memory limit, a timeout,
a cancel), the job it was running fails with that reason and the jobs sent behind it,
never started, go to the next runtime.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from typing import TYPE_CHECKING, Any

from sandmill.store import db as dbmod
from sandmill.store import dedicated as store

from .dedicated_loop import ScriptLoop
from .runtimes import failure
from .settings import WorkerStartError
from .stmt_timing import DEDICATED_COMPLETE

if TYPE_CHECKING:
    from .worker import Worker

log = logging.getLogger("sandmill.worker")


class Completer:
    """Completions of the worker's dedicated jobs: those that arrive while a statement runs
    go together in the next one (a lone one goes at once)."""

    def __init__(self, w: Worker) -> None:
        self.w = w
        self.pending: list[store.Done] = []
        self.task: asyncio.Task | None = None
        self.idle = asyncio.Event()
        self.idle.set()

    def add(self, d: store.Done) -> None:
        self.pending.append(d)
        if self.task is None:
            self.idle.clear()
            self.task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        try:
            while self.pending:
                batch, self.pending = self.pending, []
                await self._send(batch)
        finally:
            self.task = None
            self.idle.set()

    async def _send(self, batch: list[store.Done]) -> None:
        backoff = dbmod.Backoff()
        while True:
            try:
                t0 = time.perf_counter()
                await store.complete(self.w.pool, self.w.name, batch)
                self.w.timing.add(DEDICATED_COMPLETE, t0)
                return
            except Exception as e:  # noqa: BLE001 - a worker never dies of a completion
                if dbmod.is_disconnect(e):
                    log.warning("dedicated completions: database unreachable, retrying (%s)", e)
                    await backoff.wait()
                    continue
                if len(batch) == 1:
                    log.error("job %s: its completion was refused: %r", batch[0].job_id, e)
                    d = batch[0]
                    if d.status != "failure" or d.log:  # once more, as an internal error
                        r = failure("InternalError", f"internal error: its completion was refused: {e!r}")
                        batch = [store.Done(d.job_id, "failure", json.dumps(r.result), r.error,
                                            d.duration_ms, 0, None, d.started_at)]
                        continue
                    return
                for d in batch:  # apart: the one refused costs only itself
                    await self._send([d])
                return

    async def wait_idle(self) -> None:
        await self.idle.wait()


def dedicated_tags(profile: Any) -> list[str]:
    """The tags of the scripts a profile is dedicated to (what its workers register)."""
    return [store.dedicated_tag(*s.split(":", 1)) for s in profile.dedicated]


class Dedicated:
    """The dedicated path of a worker: a ScriptLoop per served script and subworker, the
    completer and the heartbeat of every held job."""

    def __init__(self, w: Worker) -> None:
        self.w = w
        self.completer = Completer(w)
        self.canceled: set[uuid.UUID] = set()
        self.claims = 0  # claims that returned jobs so far (their number stamps the jobs)
        self.loops: list[ScriptLoop] = []
        for script in w.profile.dedicated:
            ws, _, path = script.partition(":")
            for i in range(w.profile.subworkers):
                self.loops.append(ScriptLoop(self, ws, path, i))

    @classmethod
    def for_worker(cls, w: Worker, info: dict[str, Any]) -> "Dedicated":
        """The dedicated path of ``w``, or WorkerStartError where its backend cannot host
        a runtime (a configuration never runs weaker than it says)."""
        pool = getattr(w.backend, "warm_pool", None)
        if pool is None or pool.disabled:
            why = pool.disabled if pool is not None else (
                f"backend {w.backend.name if w.backend else 'native'} has no warm interpreters")
            raise WorkerStartError(
                f"group {w.profile.name} is dedicated to {', '.join(w.profile.dedicated)}, but its"
                f" runtimes cannot run here: {why} (a dedicated runtime is a warm interpreter in"
                " the sandbox: nsjail or process as root, backend.warm true)")
        info["dedicated"] = list(w.profile.dedicated)
        return cls(w)

    async def run(self, stopping: asyncio.Event) -> None:
        """Serve until ``stopping``; then give back what never started, let what was sent
        finish (up to the grace period) and complete it."""
        tasks = [asyncio.create_task(lp.run(stopping)) for lp in self.loops]
        pinger = asyncio.create_task(self._ping_loop())
        waker = asyncio.create_task(self._wake_on(stopping))
        try:
            await asyncio.gather(*tasks)
        finally:
            pinger.cancel()
            waker.cancel()
            await self.completer.wait_idle()

    async def _wake_on(self, stopping: asyncio.Event) -> None:
        await stopping.wait()
        for lp in self.loops:  # a loop waiting on its runtime sees the stop at once
            lp.changed.set()

    def wake(self, payload: str) -> None:
        """A NOTIFY on sandmill_queue: wake the loops of that tag (at the due time, when the
        job is scheduled: 'tag|epoch')."""
        tag, _, epoch = payload.partition("|")
        for lp in self.loops:
            if lp.tag == tag:
                lp.wake_at(float(epoch) if epoch else None)

    def wake_all(self) -> None:
        """Wake every loop (the LISTEN connection is back: a NOTIFY may have been missed)."""
        for lp in self.loops:
            lp.wake_at(None)

    def cancel(self, job_id: uuid.UUID) -> None:
        """Cancel a job this worker holds: kill the runtime running it; one not started yet
        completes as canceled without running."""
        self.canceled.add(job_id)
        for lp in self.loops:
            lp.cancel(job_id)

    async def _ping_loop(self) -> None:
        every = self.w.settings.job_ping_s
        while True:
            await asyncio.sleep(every)
            await self.ping_once()

    async def ping_once(self) -> None:
        """One heartbeat of every held job; drop the jobs it says are not ours any more."""
        starting = [(s.job["id"], s.started_at) for lp in self.loops for s in lp.running()]
        # Only jobs whose claim had returned (so committed) before the ping's snapshot can
        # be judged by it: a claim committing while the ping runs is not in its answer.
        seen = self.claims
        try:
            held, canceled = await store.ping(self.w.pool, self.w.name, starting)
        except Exception as e:  # noqa: BLE001 - the next ping tries again
            log.warning("dedicated heartbeat failed: %s", e)
            return
        for j in canceled - self.canceled:
            self.cancel(j)
        for lp in self.loops:
            lp.drop_lost(held, seen)
