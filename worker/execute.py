"""One job's run: through the group's backend or in-process (native), inline in its slot's
task; its logs, its kill (cancel, lost, shutdown), and the completion it ends with."""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import os
import time
import uuid
from dataclasses import dataclass, field
from collections.abc import Awaitable
from typing import TYPE_CHECKING, Any

from sandmill.isolation import Outcome, RunSpec
from sandmill.store import queue

from . import pydeps
from .ahead import Ahead
from .gpus import run_on_gpus
from .logs import LogSink
from .native import NATIVE_LANGUAGES, run_native
from .runtimes import JobResult, build_spec, failure, interpret
from .settings import Group
from sandmill.store.storable import json_problem, storable_json, storable_text

if TYPE_CHECKING:
    from .watch import Watch

log = logging.getLogger("sandmill.worker")


def now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


@dataclass
class Running:
    """A job that runs, inline in its slot's task (a task of its own would cost two more
    loop turns between one job's end and the next one's start)."""

    job: dict[str, Any]
    task: asyncio.Task  # the slot's task
    why: str = ""  # set when we kill it: "canceled" | "lost" | "shutdown"
    heartbeat: asyncio.Task | None = None
    killed: bool = False
    t0: float = field(default_factory=time.monotonic)

    def kill(self, why: str) -> None:
        """Stop the job: the slot's task is inside it (a job is running exactly while the
        slot awaits it), so the CancelledError lands in the job; execute() takes it back."""
        self.why = why
        if not self.killed:
            self.killed = True
            self.task.cancel()


class Executor:
    """Runs a slot's jobs. ``running`` holds the jobs that run now (the watch starts their
    heartbeats); ``canceled_held`` the jobs canceled while held ahead, which complete as
    canceled without running."""

    def __init__(self, group: Group, running: dict[uuid.UUID, Running],
                 canceled_held: set[uuid.UUID], watch: Watch):
        self.group = group
        self.running = running
        self.canceled_held = canceled_held
        self.watch = watch
        # a short job's logs ride on its completion (Completion.logs), whose statement
        # appends them: no log statement per job (docs/performance.md, round 2); the
        # environment's 0 turns it off, for the benchmark's before/after
        self.carry_logs = os.environ.get("SANDMILL_LOGS_IN_COMPLETION", "1") != "0"

    async def execute(self, job: dict[str, Any]) -> queue.Completion | None:
        """Run one job in the calling slot's task; returns its completion for the slot to
        hand in (None when the job is not this worker's to complete any more, or went back
        to the queue), once the job's logs are written."""
        done, logs = await self.execute_deferred(job)
        if logs is not None:
            await logs
        return done

    def prepare(self, job: dict[str, Any], lane: asyncio.Task) -> Ahead | None:
        """Start ``job``'s set-up in the backend (worker/ahead.py) while the slot's job
        (``lane``: the slot's task) runs; None where there is none: native, GPU and
        python dependency jobs, backends that prepare nothing."""
        g = self.group
        backend, lang = g.backend, job["language"]
        if (backend is None or g.gpus is not None or lang not in ("python3", "bash")
                or (lang in NATIVE_LANGUAGES and g.profile.native) or job["id"] in self.canceled_held
                or (lang == "python3" and pydeps.worker_deps().needs_env(job))):
            return None
        profile, env = g.profile, g.env
        try:
            spec = build_spec(job, profile, env)
        except Exception:  # noqa: BLE001 - its run reports it
            return None
        p = backend.prepare(spec, lane)
        return Ahead(job["id"], spec, p, profile, env, backend) if p is not None else None

    async def execute_deferred(self, job: dict[str, Any], ahead: Ahead | None = None,
                               ) -> tuple[queue.Completion | None, asyncio.Future[None] | None]:
        """``execute``, but the write of the job's last logs may still be under way: the
        second item, when not None, is that write, which must end before the completion is
        sent (a reader who sees the job completed sees all its logs). The slot starts its
        next job meanwhile: a bash job always prints, and its logs' statement on the
        slot's path cost a database round trip per job (docs/performance.md). ``ahead``:
        the job's set-up made while the job before it ran (``prepare``)."""
        g = self.group
        if ahead is not None and not ahead.fits(job, g.profile, g.env, g.backend):
            ahead.discard()
            ahead = None
        job_id: uuid.UUID = job["id"]
        sink = LogSink(g.pool, job_id, g.q)
        if job["restarts"]:
            sink.note(f"restart {job['restarts']} of this job, on worker {g.name}")
        lang = job["language"]
        profile = g.profile
        limits = profile.limits
        if job.get("timeout_s"):
            limits = limits.merged({"wall_s": float(job["timeout_s"])})
        outcome: Outcome | None = None
        if job_id in self.canceled_held:  # canceled while held ahead: not run at all
            self.canceled_held.discard(job_id)
            coro = _const(canceled("canceled before it started"))
        elif lang in NATIVE_LANGUAGES and profile.native:
            coro = run_native(job, limits.wall_s)
        elif lang in ("python3", "bash") and g.backend is not None:
            spec = ahead.spec if ahead is not None else build_spec(job, profile, g.env)
            backend, gpus = g.backend, g.gpus

            def run_spec(s: RunSpec) -> Awaitable[Outcome]:
                if gpus is not None:  # a GPU group: the job's own GPUs, passed through
                    return run_on_gpus(gpus, backend, s, sink.on_output, job_id)
                if ahead is not None and s is ahead.spec:
                    return backend.run(s, sink.on_output, prepared=ahead.prepared)  # type: ignore[call-arg]
                return backend.run(s, sink.on_output)

            if lang == "python3" and pydeps.worker_deps().needs_env(job):  # requirements
                coro = pydeps.run(job, spec, g, sink, run_spec)
            else:
                coro = run_spec(spec)
        else:
            coro = _const(JobResult("failure", {"error": {"name": "UnsupportedLanguage",
                          "message": f"worker group {profile.name} cannot run {lang} jobs"}},
                          f"UnsupportedLanguage: worker group {profile.name} cannot run {lang} jobs"))
        me = asyncio.current_task()
        started = now()
        r = self.running[job_id] = Running(job, me)
        self.watch.arm()  # which starts its heartbeat once it has run job_ping_s
        t0 = r.t0
        try:
            res = await coro
        except asyncio.CancelledError:
            if not r.why:  # the slot's task was cancelled from outside: treat as shutdown
                r.why = "shutdown"
            res = None
        finally:
            if ahead is not None:  # not taken by its run (a no-op once taken)
                ahead.discard()
            if r.killed:  # our own cancel (delivered or swallowed) is not the slot's
                me.uncancel()
            if r.heartbeat is not None:
                r.heartbeat.cancel()
            self.running.pop(job_id, None)
        wall_ms = int((time.monotonic() - t0) * 1000)
        if isinstance(res, Outcome):
            outcome = res
            try:
                result = interpret(job, outcome, limits)
            except Exception as e:  # noqa: BLE001 - a job's bytes must not cost its completion
                log.exception("job %s: its outcome could not be read", job_id)
                result = failure("ResultError", f"sandmill could not read the job's outcome: {e!r}")
        elif isinstance(res, JobResult):
            result = res
        else:
            result = None
        if r.why == "lost":
            sink.note(f"job taken away from worker {g.name} (heartbeat lost); not completing it here")
            await sink.close()
            return None, None
        if r.why == "shutdown":
            sink.note(f"worker {g.name} shutting down; job put back in the queue")
            await sink.close()
            await g.q.requeue(g.pool, job_id, g.name)
            return None, None
        if r.why == "canceled":
            sink.note("job canceled; killed")
            result = canceled("canceled")
        # only the database's completion appends carried logs (not an agent's HTTP store)
        carried = sink.take() if self.carry_logs and g.q is queue else None
        logs = None if carried is not None else _closing(sink)
        result = storable_result(result)  # nothing a job wrote may fail the statement
        return queue.Completion(
            job_id, g.name, status=result.status, result=result.result, error=result.error,
            duration_ms=outcome.wall_ms if outcome else wall_ms,
            cpu_ms=outcome.cpu_ms if outcome else 0,
            mem_peak_kb=outcome.peak_memory_kb if outcome else 0,
            outcome=storable_json(outcome.to_json()) if outcome else None, started_at=started,
            logs=carried or None,
        ), logs


def _closing(sink: LogSink) -> asyncio.Future[None] | None:
    """The close of ``sink`` under way, or None when it has nothing to write (most python3
    jobs print nothing: no task for them)."""
    if sink.idle():
        return None
    return asyncio.ensure_future(sink.close())


async def _const(v: Any) -> Any:
    return v


def storable_result(res: JobResult) -> JobResult:
    """``res`` as the completion can store it, whoever built it (a sandbox job, a native
    one): a result jsonb cannot hold fails the job with ResultNotStorable; the error text
    gets NUL and lone surrogates replaced visibly (store/storable.py)."""
    problem = json_problem(res.result)
    if problem:
        return failure("ResultNotStorable", problem)
    if res.error is not None:
        error = storable_text(res.error)
        if error is not res.error:
            return JobResult(res.status, res.result, error)
    return res


def canceled(error: str) -> JobResult:
    """The result of a canceled job."""
    return JobResult("failure", {"error": {"name": "Canceled", "message": "job canceled"}}, error)
