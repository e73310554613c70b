"""The worker process: register, wait on LISTEN/NOTIFY, pull one job per subworker, run
it through the group's backend, stream logs, heartbeat, complete; stop cleanly on SIGTERM."""

from __future__ import annotations

import asyncio
import datetime as dt
import gc
import logging
import os
import signal
import socket
import sys
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any, Callable

import asyncpg

from sandmill.isolation import Backend, Outcome, cgroups, get_backend, workdir
from sandmill.store import db as dbmod
from sandmill.store import queue, workers

from . import eventloop
from .logs import LogSink
from .native import NATIVE_LANGUAGES, run_native
from sandmill.profiles import Profile, ProfileError, profile_from_dict
from .runtimes import JobResult, build_spec, interpret, job_env
from .sysinfo import host_info

log = logging.getLogger("sandmill.worker")


def _env_float(name: str, default: float) -> float:
    return float(os.environ.get(name, default))


@dataclass
class WorkerSettings:
    """Timings of the worker; defaults suit production and tests alike. Each can be set
    from the environment (SANDMILL_JOB_PING_S, SANDMILL_WORKER_PING_S, SANDMILL_POLL_S,
    SANDMILL_GRACE_S)."""

    # heartbeat of a running job (cancel is seen within this)
    job_ping_s: float = field(default_factory=lambda: _env_float("SANDMILL_JOB_PING_S", 1.0))
    # heartbeat of the worker row
    worker_ping_s: float = field(default_factory=lambda: _env_float("SANDMILL_WORKER_PING_S", 15.0))
    # fallback poll when no NOTIFY arrives
    poll_s: float = field(default_factory=lambda: _env_float("SANDMILL_POLL_S", 30.0))
    # on SIGTERM, how long the job in hand may still run before it is killed and re-queued
    grace_s: float = field(default_factory=lambda: _env_float("SANDMILL_GRACE_S", 30.0))
    # leftovers of dead workers (work dirs, job cgroups): swept at start and this often;
    # a dead worker's work dirs once untouched this long
    sweep_every_s: float = field(default_factory=lambda: _env_float("SANDMILL_SWEEP_EVERY_S", 600.0))
    sweep_grace_s: float = field(default_factory=lambda: _env_float("SANDMILL_SWEEP_GRACE_S", 60.0))
    # claim ahead (profile claim_ahead): a busy slot claims its next job while its current
    # one runs, only from a backlog (jobs due this long ago that no idle slot took), and
    # gives it back if the current job is still running after claim_ahead_hold_s
    claim_ahead_after_s: float = field(default_factory=lambda: _env_float("SANDMILL_CLAIM_AHEAD_AFTER_S", 0.02))
    claim_ahead_hold_s: float = field(default_factory=lambda: _env_float("SANDMILL_CLAIM_AHEAD_HOLD_S", 0.5))
    # when the worker's jobs are very short, a slot holds as many as run in this long (up
    # to claim_ahead_max), not one: it works on through its completion's round trip
    claim_ahead_cover_s: float = field(default_factory=lambda: _env_float("SANDMILL_CLAIM_AHEAD_COVER_S", 0.005))
    claim_ahead_max: int = field(default_factory=lambda: int(_env_float("SANDMILL_CLAIM_AHEAD_MAX", 8)))
    # how long the completion of a job whose slot already runs its next one may wait to
    # share a statement with others (their answers come back well before they are needed)
    completion_lazy_s: float = field(default_factory=lambda: _env_float("SANDMILL_COMPLETION_LAZY_S", 0.02))
    # at a burst's end (no job in hand, the queue's backlog gone), how long a slot's
    # completion may wait for those of the jobs still running: the last of them to end,
    # a result waiter or a new job sends it at once
    completion_tail_wait_s: float = field(default_factory=lambda: _env_float("SANDMILL_COMPLETION_TAIL_WAIT_S", 0.01))
    # start a requires_gpu group on a host where no GPU is found
    allow_no_gpu: bool = field(default_factory=lambda: os.environ.get("SANDMILL_ALLOW_NO_GPU", "") not in ("", "0"))


class WorkerStartError(Exception):
    """The worker cannot start (bad backend, no GPU...): exit code 2."""


class WorkerInitError(Exception):
    """The group's init script failed: exit code 3. ``logs`` is the script's output."""

    def __init__(self, message: str, logs: str):
        super().__init__(message)
        self.logs = logs


ADMIN_WORKSPACE = "admins"  # where the workers' own jobs (init, periodic scripts) are recorded


# Backends whose work dirs go under a root of the worker's own (see _own_options).
_OWN_ROOT_BACKENDS = ("process", "nsjail")


def work_root(profile: Profile) -> Path:
    """The shared work dir root of the profile's backend (the worker's own lives in it)."""
    opt = profile.backend.options.get("workdir_root")
    return Path(opt) if opt else workdir.default_root()


def _own_options(name: str, options: dict[str, Any], own_root: Path | None) -> dict[str, Any]:
    # A SIGKILLed worker leaves its jobs' work dirs behind; under a root named after the
    # worker (workdir.owner_root) a later worker can tell they are a dead worker's.
    if own_root is None or name not in _OWN_ROOT_BACKENDS:
        return options
    return {**options, "workdir_root": str(own_root)}


def resolve_backend(profile: Profile, own_root: Path | None = None) -> tuple[Backend, str | None]:
    """The backend the profile names, or process with a warning that says why. With
    ``own_root``, process and nsjail keep their work dirs there."""
    kind = profile.backend.kind
    options = profile.backend.options
    candidates = ["nsjail"] if kind == "auto" else [kind]
    reason = ""
    for name in candidates:
        try:
            b = get_backend(name, **_own_options(name, options, own_root))
            p = b.probe()
        except (ImportError, OSError, ValueError, TypeError) as e:
            p, b = None, None
            reason = f"backend {name} cannot be loaded: {e}"
        else:
            if p.available:
                return b, None
            reason = f"backend {name} is not available here: {p.reason}"
        if kind != "auto" and profile.backend.fallback == "refuse":
            raise WorkerStartError(reason)
    if kind == "process":
        raise WorkerStartError(reason)
    return (get_backend("process", **_own_options("process", {}, own_root)),
            f"{reason}; running jobs with the process backend instead")


@dataclass
class _Running:
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
        slot awaits it), so the CancelledError lands in the job; _execute takes it back."""
        self.why = why
        if not self.killed:
            self.killed = True
            self.task.cancel()


class _Batcher:
    """Group commit for one kind of request: callers that ask while statements are in
    flight are served together by the next one. A lone caller pays no added wait. Up to
    ``in_flight`` statements run at once, so that the database works on one batch while
    this process handles the answer to another (one at a time leaves both sides idle half
    of the time when jobs are short).

    A lazy request (nobody waits for its answer yet) may wait for company: slots whose
    jobs end together then share one statement, instead of one each, at the moment their
    next jobs start. The earliest due of the waits of those pending sends them all;
    ``flush()`` sends them at once when an answer is wanted."""

    def __init__(self, run_batch, in_flight: int = 1):
        self._run_batch = run_batch  # async (list of requests) -> list of answers, same order
        self._pending: list[tuple[Any, asyncio.Future]] = []
        self._in_flight = in_flight
        self._timer: asyncio.TimerHandle | None = None
        self._tasks: set[asyncio.Task] = set()

    async def submit(self, request: Any) -> Any:
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

    def flush_if(self, wanted: Callable[[Any], bool]) -> None:
        """flush() if a waiting request is ``wanted`` now."""
        if any(wanted(req) for req, _ in self._pending):
            self.flush()

    def flush(self) -> None:
        """Send what waits now (as soon as fewer than ``in_flight`` statements run)."""
        self._drop_timer()
        if self._pending and len(self._tasks) < self._in_flight:
            t = asyncio.create_task(self._drain())
            self._tasks.add(t)
            t.add_done_callback(self._tasks.discard)

    def _drop_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    async def _drain(self) -> None:
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


class _HotConns:
    """Pool connections kept out of the pool for the claims and completions: a busy worker
    makes one such statement per batch of jobs, and asyncpg's acquire and release around
    each (its release runs in a task of its own, under asyncio.shield) cost this process
    about as much as a small statement does. Up to ``keep`` are kept between statements;
    one that saw an error goes back to the pool, which resets or replaces it."""

    def __init__(self, keep: int):
        self.keep = keep
        self.pool: asyncpg.Pool | None = None
        self._free: list[asyncpg.Connection] = []

    async def acquire(self) -> asyncpg.Connection:
        return self._free.pop() if self._free else await self.pool.acquire()

    async def release(self, conn: asyncpg.Connection, ok: bool) -> None:
        if ok and len(self._free) < self.keep:
            self._free.append(conn)
        else:
            await self.pool.release(conn)

    async def prepare(self, statements) -> None:
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


@dataclass
class _Done:
    """A slot's job has ended: its completion, and what the slot wants back in the same
    statement: a job to run now (it holds none), how many to hold ahead, and the start
    stamp of the held job it starts as this one ends."""

    completion: queue.Completion
    now: bool
    ahead: int
    starting: tuple[uuid.UUID, dt.datetime] | None = None


@dataclass
class _Answer:
    """What a slot gets back with its completion: a job to run now, jobs to hold."""

    now: dict[str, Any] | None
    ahead: list[dict[str, Any]]


@dataclass(eq=False)  # one per slot, a key by identity
class _SlotState:
    """The jobs a slot holds ahead: those in hand, and the completions still in flight
    that claim more (each with how many it asked for)."""

    ready: deque[dict[str, Any]] = field(default_factory=deque)
    coming: deque[tuple[asyncio.Future, int]] = field(default_factory=deque)
    asked: int = 0
    dry: bool = False  # its last claim ahead got fewer jobs than it asked: no backlog left


@dataclass
class Stats:
    jobs_done: int = 0
    busy_s: float = 0.0
    since: float = field(default_factory=time.monotonic)


class _Feed:
    """Jobs for the idle slots of one worker: slots that ask at the same time are served
    by one claim of several jobs (queue.pull_many), keyed jobs by the one-job pull. With
    claim ahead and a backlog, each slot also asks for jobs to hold ahead, in a claim of
    their own that waits like a lazy completion (a burst of jobs wakes idle slots: the
    claims of the jobs they run first are then not slowed by those they hold, and their
    first completions still need no claim)."""

    def __init__(self, worker: "Worker"):
        self.w = worker
        self._batcher = _Batcher(self._claim)
        self.ahead = _Batcher(self._claim_ahead)

    async def next_job(self) -> tuple[dict[str, Any] | None, tuple[asyncio.Future, int] | None]:
        """(a job to run now, the claim of the jobs to hold ahead and how many it asks)"""
        return await self._batcher.submit(None)

    async def _claim(self, asks: list[None]) -> list[tuple[dict[str, Any] | None, tuple[asyncio.Future, int] | None]]:
        w, n = self.w, len(asks)
        jobs: list[dict[str, Any]] = []
        conn, ok = await w.hot.acquire(), False
        try:
            if n > 1:
                jobs = await queue.pull_many(conn, w.name, w.tags, n)
            while len(jobs) < n:  # one at a time: jobs with a concurrency key, or a lone slot
                job = await queue.pull(conn, w.name, w.tags)
                if job is None:
                    break
                jobs.append(job)
            ok = True
        finally:
            await w.hot.release(conn, ok)
        if not w.profile.claim_ahead or len(jobs) < n:  # no backlog
            return [(job, None) for job in jobs] + [(None, None)] * (n - len(jobs))
        depth, lazy_s = w._ahead_depth(), w.settings.completion_lazy_s
        return [(job, (self.ahead.enqueue(depth, wait_s=lazy_s), depth)) for job in jobs]

    async def _claim_ahead(self, depths: list[int]) -> list[_Answer]:
        """Claim the jobs to hold ahead for slots that ask ``depths`` each."""
        w = self.w
        conn, ok = await w.hot.acquire(), False
        try:
            held = await queue.pull_many(conn, w.name, w.tags, 0, ahead=sum(depths),
                                         ahead_after_s=w.settings.claim_ahead_after_s)
            ok = True
        finally:
            await w.hot.release(conn, ok)
        for job in held:
            w.held.add(job["id"])
        jobs = iter(held)  # best first
        return [_Answer(None, list(islice(jobs, d))) for d in depths]


class Worker:
    """One worker process of a group, with ``profile.subworkers`` concurrent slots."""

    def __init__(self, profile: Profile, database_url: str, *, name: str | None = None,
                 settings: WorkerSettings | None = None):
        self.profile = profile
        self.file_profile = profile  # the YAML profile; the group's DB config overrides it
        self.database_url = database_url
        self.settings = settings or WorkerSettings()
        self.name = name or f"{profile.name}-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:4]}"
        self.tags = list(profile.tags)
        self.backend: Backend | None = None
        self.env = job_env(profile)
        self.pool: asyncpg.Pool | None = None
        self.listener: asyncpg.Connection | None = None
        self.running: dict[uuid.UUID, _Running] = {}
        self._holds: dict[_SlotState, float] = {}  # slot -> when its held jobs go back
        self._watch_timer: asyncio.TimerHandle | None = None
        self.held: set[uuid.UUID] = set()  # jobs claimed ahead, not started yet
        self._job_s: float | None = None  # how long jobs run here lately (_note_run)
        self._canceled_held: set[uuid.UUID] = set()  # of those, the ones canceled meanwhile
        self.stats = Stats()
        self._wake = asyncio.Event()
        self._stopping = asyncio.Event()
        self._bg: set[asyncio.Task] = set()
        self._feed = _Feed(self)
        self._completer = _Batcher(self._complete_batch, in_flight=2)
        # the claims' and completions' connections: one for each statement that may be
        # in flight at once (the feed's two claims, the completer's two)
        self.hot = _HotConns(keep=2 + 2)
        # the wake event and next_due's read under it, shared by the idle slots (_next_due)
        self._due: tuple[asyncio.Event, asyncio.Future] | None = None

    # ---- lifecycle -----------------------------------------------------------------------

    async def start(self) -> None:
        """Check the host, connect, apply the group's DB config, pick the backend, register,
        run the init script. Raises WorkerStartError / WorkerInitError when it cannot."""
        info = host_info()
        if self.profile.requires_gpu and not info["gpus"] and not self.settings.allow_no_gpu:
            raise WorkerStartError(
                f"group {self.profile.name} requires a GPU (requires_gpu: true) and none was found"
                " on this host (no nvidia-smi GPU, no /dev/nvidia<N>); start it with --allow-no-gpu"
                " or SANDMILL_ALLOW_NO_GPU=1 to run it anyway")
        # A connection per subworker plus one for pings, and those that claims and
        # completions keep between statements: no slot waits for a connection.
        self.pool = self.hot.pool = await dbmod.create_pool(
            self.database_url, min_size=1, max_size=self.profile.subworkers + 1 + self.hot.keep,
            settings=queue.CLAIM_SETTINGS)
        await self._apply_config(await workers.get_config(self.pool, f"worker__{self.profile.name}"))
        await self.hot.prepare(lambda conn: queue.prepare_worker_statements(conn, self.name, self.tags))
        p = self.profile
        if (not p.native or any(t in ("python3", "bash") for t in self.tags)
                or p.init_script or p.periodic_script):
            self.backend, warning = resolve_backend(self.profile, workdir.owner_root(work_root(self.profile)))
            if warning:
                log.warning("%s: %s", self.profile.name, warning)
            if self.backend.name in _OWN_ROOT_BACKENDS:
                self._spawn(self._sweep_loop())
        self.listener = await dbmod.connect(self.database_url)
        await self.listener.add_listener(queue.CH_QUEUE, self._on_queue)
        await self.listener.add_listener(queue.CH_CANCEL, self._on_cancel)
        await self.listener.add_listener(workers.CH_CONFIG, self._on_config)
        await workers.register(
            self.pool, name=self.name, group=self.profile.name, hostname=info["hostname"],
            tags=self.tags, backend=self.backend.name if self.backend else "native",
            subworkers=self.profile.subworkers, info=info,
        )
        log.info("worker %s up: tags %s, backend %s, %d subworker(s)", self.name, self.tags,
                 self.backend.name if self.backend else "native", self.profile.subworkers)
        if self.profile.init_script:
            status, logs, job_id = await self.run_admin_script("init", self.profile.init_script)
            if status != "success":
                raise WorkerInitError(f"init script failed (job {job_id} in workspace {ADMIN_WORKSPACE})", logs)
            log.info("init script done (job %s)", job_id)

    async def run(self, on_started: Callable[[], None] | None = None) -> None:
        """Start, then serve jobs until ``stop()``; then finish (or after the grace period,
        re-queue) the jobs in hand and leave. ``on_started`` runs between the two."""
        try:
            await self.start()
        except BaseException:
            await self.close()
            raise
        if on_started is not None:
            on_started()
        pinger = asyncio.create_task(self._ping_loop())
        periodic = asyncio.create_task(self._periodic_loop())
        slots = [asyncio.create_task(self._slot(i)) for i in range(self.profile.subworkers)]
        await self._stopping.wait()
        periodic.cancel()
        log.info("worker %s stopping: finishing %d job(s) in hand", self.name, len(self.running))
        done, pending = await asyncio.wait(slots, timeout=self.settings.grace_s)
        if pending:
            for r in list(self.running.values()):
                r.kill("shutdown")
            await asyncio.wait(pending)
        pinger.cancel()
        await self._completer.wait_idle()  # no completion is left behind in the batcher
        await self.close()

    def _spawn(self, coro) -> None:
        """Run ``coro`` in the background, keeping a reference until it is done."""
        t = asyncio.get_running_loop().create_task(coro)
        self._bg.add(t)
        t.add_done_callback(self._bg.discard)

    def stop(self) -> None:
        self._stopping.set()
        self._wake.set()

    async def close(self) -> None:
        try:
            if self.pool:
                await workers.unregister(self.pool, self.name)
        finally:
            if self.backend is not None:
                self.backend.close()  # warm interpreters stop now, not at process exit
            if self.listener:
                await self.listener.close()
            if self.pool:
                await self.hot.close()  # the pool's close waits for every connection it lent
                await self.pool.close()

    # ---- notifications -------------------------------------------------------------------

    def _on_queue(self, _conn, _pid, _channel, payload: str) -> None:
        if payload.split("|", 1)[0] in self._bases:
            self._wake_all()
            # a completion waiting at a burst's end also claims: the new job is its to take
            self._completer.flush_if(lambda d: d.now)

    @property
    def tags(self) -> list[str]:
        return self._tags

    @tags.setter
    def tags(self, tags: list[str]) -> None:
        self._tags = list(tags)
        self._bases = set(queue.split_tags(self._tags)[0])  # gpu(ws1+ws2) is woken by gpu

    # ---- the group's config in the DB ----------------------------------------------------

    async def _apply_config(self, config: dict[str, Any] | None) -> bool:
        """Overlay the group's DB config (a partial profile) on the YAML profile. Tags,
        limits, env and the periodic script apply at once; backend, subworkers, native and
        the init script at the next start. Returns whether anything was applied."""
        try:
            merged = profile_from_dict({**self.file_profile.model_dump(), **(config or {}),
                                        "name": self.file_profile.name}, source=f"config worker__{self.file_profile.name}")
        except ProfileError as e:
            log.warning("ignoring the group's DB config: %s", e)
            return False
        self.profile = merged
        self.tags = merged.tags
        self.env = job_env(merged)
        return True

    def _on_config(self, _conn, _pid, _channel, payload: str) -> None:
        if payload == self.file_profile.name:
            self._spawn(self._reload_config())

    async def _reload_config(self) -> None:
        try:
            cfg = await workers.get_config(self.pool, f"worker__{self.file_profile.name}")
            old = self.tags
            if not await self._apply_config(cfg):
                return
            log.info("group config reloaded: tags %s -> %s", old, self.tags)
            await self._ping()
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as e:
            log.warning("config reload failed: %s", e)
        self._wake_all()

    def _wake_all(self) -> None:
        # Swap the event so that every slot waiting on the old one wakes, and a slot that
        # is mid-pull still sees this wake-up (it captured the old event before pulling).
        ev, self._wake = self._wake, asyncio.Event()
        ev.set()

    def _on_cancel(self, _conn, _pid, _channel, payload: str) -> None:
        job_id = uuid.UUID(payload)
        r = self.running.get(job_id)
        if r and not r.why:
            r.kill("canceled")
        elif job_id in self.held:
            self._canceled_held.add(job_id)  # it completes as canceled without running

    # ---- leftovers of dead workers -------------------------------------------------------

    async def _sweep_loop(self) -> None:
        """Now and then (at start first), remove what dead workers left on this host: the
        work dirs of a worker that no longer runs, and job cgroups with no process."""
        root = work_root(self.profile)
        parent = self.profile.backend.options.get("cgroup_parent", "sandmill")
        while True:
            try:
                dirs = await asyncio.to_thread(workdir.sweep_stale, root, self.settings.sweep_grace_s)
                cgs = await asyncio.to_thread(cgroups.sweep_stale, parent=parent)
                if dirs or cgs:
                    log.info("removed %d work dir root(s) and %d cgroup(s) of dead workers",
                             len(dirs), len(cgs))
            except OSError as e:
                log.warning("sweep of dead workers' leftovers failed: %s", e)
            await asyncio.sleep(self.settings.sweep_every_s)

    # ---- the pull loop -------------------------------------------------------------------

    async def _slot(self, index: int) -> None:
        """One subworker: run a job, complete it, and run the next. A busy slot's completion
        claims its next job in the same statement; with claim ahead it claims the job after
        that, so that the next one is in hand (and starts) the moment this one ends; with
        very short jobs, several (as many as run in claim_ahead_cover_s)."""
        st = _SlotState()
        job: dict[str, Any] | None = None  # the job to run next
        hold_s = self.settings.claim_ahead_hold_s
        found_none = False  # the last completion's claim found no job due
        wake = self._wake
        while not self._stopping.is_set():
            if found_none:
                # wait for a wake-up rather than claim again at once (at a drain's end, every
                # slot would, beside the last completions); one since `wake` was taken,
                # before that claim, ends the wait at once
                found_none = False
                await self._idle(wake)
                continue  # a stop() may have ended the wait: no claim then
            wake = self._wake
            if job is None:
                job = await self._next_held(st)
            if job is None:
                try:
                    job, ahead_claim = await self._feed.next_job()
                except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as e:
                    log.warning("pull failed (%s); retrying", e)
                    await self._sleep_or_stop(1.0)
                    continue
                if job is None:
                    await self._idle(wake)
                    continue
                if ahead_claim is not None:
                    st.coming.append(ahead_claim)
                    st.asked += ahead_claim[1]
            if self._stopping.is_set():
                break  # claimed as the worker began to stop: not started, given back below
            t0 = time.monotonic()
            current, job = job, None
            if st.ready or st.coming:  # the jobs held ahead go back if this one runs long
                self._holds[st] = t0 + hold_s
                self._watch()
            try:
                done = await self._execute(current)
            except Exception:  # noqa: BLE001 - one bad job must not kill the worker
                log.exception("job %s: internal error", current["id"])
                done = None
            finally:
                self._holds.pop(st, None)
            ran_s = time.monotonic() - t0
            self._note_run(ran_s)
            if done is None:  # lost, or put back at shutdown: nothing to complete
                continue
            job = await self._next_held(st)  # its claim has had this job's run to come back
            stopping = self._stopping.is_set()
            if job is not None and stopping:
                await self._give_back(job)
                job = None
            # no claim ahead after a long job: the next is likely long too, and its
            # held jobs would only go back
            ahead = 0
            if self.profile.claim_ahead and not stopping and ran_s < hold_s:
                ahead = max(0, self._ahead_depth() - len(st.ready) - st.asked)
            fut = self._completer.enqueue(_Done(done, now=job is None and not stopping, ahead=ahead,
                                                starting=(job["id"], _now()) if job is not None else None),
                                          wait_s=self._completion_wait_s(st, current, ran_s, job, stopping))
            if ahead:
                st.coming.append((fut, ahead))
                st.asked += ahead
            if job is None:  # wait for the next job, or (stopping) for the job's completion
                try:
                    job = (await fut).now
                    found_none = job is None and not stopping
                except Exception as e:  # noqa: BLE001 - the statement failed for every caller
                    log.warning(_COMPLETION_FAILED, e)
            elif not ahead:
                fut.add_done_callback(_log_failed_completion)
        if job is not None:  # claimed while the worker began to stop: not started, give it back
            await self._give_back(job)
        while (held := await self._next_held(st)) is not None:
            await self._give_back(held)

    def _completion_wait_s(self, st: _SlotState, ran: dict[str, Any], ran_s: float,
                           job: dict[str, Any] | None, stopping: bool) -> float:
        """How long the completion of the job ``ran`` may wait for company (0: at once).

        With the next job in hand it is not urgent: unless jobs are short (their next answer
        is wanted at once), it waits completion_lazy_s for the slots whose jobs end about
        now. With none, at a burst's end (its last claim ahead found no backlog, and other
        jobs of this worker still run: the slots of a burst end together, and one statement
        for their last completions, not one each, keeps the database and this process free
        for the jobs still ending), completion_tail_wait_s; not for a job someone waits on,
        and a new job for our tags (NOTIFY) or the last running job's end sends it at once."""
        s = self.settings
        if job is not None:
            return s.completion_lazy_s if ran_s >= 2 * s.completion_lazy_s else 0.0
        if stopping or not st.dry or not self.running or ran.get("notify_done"):
            return 0.0
        return s.completion_tail_wait_s

    def _note_run(self, ran_s: float) -> None:
        self.stats.busy_s += ran_s
        self.stats.jobs_done += 1
        # how long this worker's jobs run, lately (for how many to hold ahead)
        self._job_s = ran_s if self._job_s is None else 0.8 * self._job_s + 0.2 * ran_s

    def _ahead_depth(self) -> int:
        """How many jobs a slot holds ahead: one, or as many as run in claim_ahead_cover_s
        when this worker's jobs are that short (up to claim_ahead_max): a slot then keeps
        working through a completion's round trip, and each statement carries more jobs."""
        s = self.settings
        if self._job_s is None or self._job_s * 2 >= s.claim_ahead_cover_s:
            return 1
        return max(1, min(s.claim_ahead_max, int(s.claim_ahead_cover_s / max(self._job_s, 1e-6))))

    async def _next_held(self, st: _SlotState) -> dict[str, Any] | None:
        """The slot's next job held ahead, in the order they were claimed; waits for the
        oldest claim still in flight when none is back yet (None when they brought none)."""
        while True:
            self._absorb(st)
            if st.ready:
                job = st.ready.popleft()
                self.held.discard(job["id"])
                return job
            if not st.coming:
                return None
            # it may still wait for company: its answer is wanted now
            self._completer.flush()
            self._feed.ahead.flush()
            await asyncio.wait([st.coming[0][0]])

    def _absorb(self, st: _SlotState) -> None:
        """Move the jobs of the slot's claims that are back into its hands, in order."""
        while st.coming and st.coming[0][0].done():
            fut, n = st.coming.popleft()
            st.asked -= n
            if fut.cancelled() or fut.exception() is not None:
                _log_failed_completion(fut)
            else:
                got = fut.result().ahead
                st.dry = len(got) < n
                st.ready.extend(got)

    def _release_held(self, st: _SlotState) -> None:
        """The slot's current job runs long: give its held jobs back to the queue, for idle
        slots to take (those still being claimed, as soon as their claim is back)."""
        self._absorb(st)
        for job in st.ready:
            self._spawn(self._give_back(job))
        st.ready.clear()
        for fut, _ in st.coming:
            fut.add_done_callback(self._release_answer)
        st.coming.clear()
        st.asked = 0

    def _release_answer(self, fut: asyncio.Future) -> None:
        if fut.cancelled() or fut.exception() is not None:
            _log_failed_completion(fut)
            return
        for job in fut.result().ahead:
            self._spawn(self._give_back(job))

    async def _give_back(self, job: dict[str, Any]) -> None:
        """Put a job this worker claimed and will not start back in the queue."""
        self.held.discard(job["id"])
        self._canceled_held.discard(job["id"])
        try:
            await queue.requeue(self.pool, job["id"], self.name)
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as e:
            log.warning("could not give job %s back (%s); the monitor will", job["id"], e)

    async def _idle(self, wake: asyncio.Event) -> None:
        timeout = self.settings.poll_s
        due = await self._next_due(wake)
        if due is not None:
            timeout = max(0.0, min(timeout, due.timestamp() - time.time()))
        # asyncio.timeout, not wait_for: 3.11's wait_for runs the wait in a task of its own,
        # and a burst wakes every idle slot at once, before their claim can go out
        try:
            async with asyncio.timeout(timeout):
                await wake.wait()
        except TimeoutError:
            pass

    async def _next_due(self, wake: asyncio.Event) -> dt.datetime | None:
        """When the earliest waiting job may start, read once per wake-up for all the slots
        that miss a pull (a drain's tail: every slot at once): what makes a job due sooner
        (a push, a freed key slot, a re-queue) NOTIFYs and so swaps the wake event; what
        makes it later (another worker claims it) only wakes a slot early. A due time that
        has passed, or a failed read, is read again."""
        d = self._due
        if d is None or d[0] is not wake or self._due_stale(d[1]):
            d = self._due = (wake, asyncio.ensure_future(queue.next_due(self.pool, self.tags)))
        try:
            return await asyncio.shield(d[1])
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
            return None

    @staticmethod
    def _due_stale(read: asyncio.Future) -> bool:
        if not read.done():
            return False
        if read.cancelled() or read.exception() is not None:
            return True
        due = read.result()
        return due is not None and due.timestamp() <= time.time()

    async def _sleep_or_stop(self, s: float) -> None:
        try:
            await asyncio.wait_for(self._stopping.wait(), s)
        except asyncio.TimeoutError:
            pass

    # ---- one job -------------------------------------------------------------------------

    async def _execute(self, job: dict[str, Any]) -> queue.Completion | None:
        """Run one job; returns its completion for the slot to hand in (None when the job
        is not this worker's to complete any more, or went back to the queue)."""
        job_id: uuid.UUID = job["id"]
        sink = LogSink(self.pool, job_id)
        if job["restarts"]:
            sink.note(f"restart {job['restarts']} of this job, on worker {self.name}")
        lang = job["language"]
        limits = self.profile.limits
        if job.get("timeout_s"):
            limits = limits.merged({"wall_s": float(job["timeout_s"])})
        outcome: Outcome | None = None
        if job_id in self._canceled_held:  # canceled while held ahead: not run at all
            self._canceled_held.discard(job_id)
            coro = _const(_canceled("canceled before it started"))
        elif lang in NATIVE_LANGUAGES and self.profile.native:
            coro = run_native(job, limits.wall_s)
        elif lang in ("python3", "bash") and self.backend is not None:
            spec = build_spec(job, self.profile, self.env)
            coro = self.backend.run(spec, sink.on_output)
        else:
            coro = _const(JobResult("failure", {"error": {"name": "UnsupportedLanguage",
                          "message": f"worker group {self.profile.name} cannot run {lang} jobs"}},
                          f"UnsupportedLanguage: worker group {self.profile.name} cannot run {lang} jobs"))
        me = asyncio.current_task()
        started = _now()
        r = self.running[job_id] = _Running(job, me)
        self._watch()  # which starts its heartbeat once it has run job_ping_s
        t0 = r.t0
        try:
            res = await coro
        except asyncio.CancelledError:
            if not r.why:  # the slot's task was cancelled from outside: treat as shutdown
                r.why = "shutdown"
            res = None
        finally:
            if r.killed:  # our own cancel (delivered or swallowed) is not the slot's
                me.uncancel()
            if r.heartbeat is not None:
                r.heartbeat.cancel()
            self.running.pop(job_id, None)
        wall_ms = int((time.monotonic() - t0) * 1000)
        if isinstance(res, Outcome):
            outcome = res
            result = interpret(job, outcome, limits)
        elif isinstance(res, JobResult):
            result = res
        else:
            result = None
        if r.why == "lost":
            sink.note(f"job taken away from worker {self.name} (heartbeat lost); not completing it here")
            await sink.close()
            return None
        if r.why == "shutdown":
            sink.note(f"worker {self.name} shutting down; job put back in the queue")
            await sink.close()
            await queue.requeue(self.pool, job_id, self.name)
            return None
        if r.why == "canceled":
            sink.note("job canceled; killed")
            result = _canceled("canceled")
        await sink.close()
        return queue.Completion(
            job_id, self.name, status=result.status, result=result.result, error=result.error,
            duration_ms=outcome.wall_ms if outcome else wall_ms,
            cpu_ms=outcome.cpu_ms if outcome else 0,
            mem_peak_kb=outcome.peak_memory_kb if outcome else 0,
            outcome=outcome.to_json() if outcome else None, started_at=started,
        )

    async def _complete_batch(self, reqs: list[_Done]) -> list[_Answer]:
        """Complete a batch and, in the same statement, claim the next job of each slot
        that wants one, claim the jobs to hold ahead, and stamp the start of the held jobs
        that start now: a busy slot makes one round trip per job."""
        done = [r.completion for r in reqs]
        want = sum(r.now for r in reqs)
        ahead = sum(r.ahead for r in reqs)
        starting = [r.starting for r in reqs if r.starting is not None]
        conn, ok = await self.hot.acquire(), False
        try:
            if want or ahead or starting:
                _, jobs = await queue.complete_and_pull(
                    conn, done, self.name, self.tags, want, ahead=ahead,
                    ahead_after_s=self.settings.claim_ahead_after_s, starting=starting)
            else:
                await queue.complete_many(conn, done)
                jobs = []
            ok = True
        finally:
            await self.hot.release(conn, ok)
        now, held = iter(jobs[:want]), iter(jobs[want:])  # the first `want` run now
        for job in jobs[want:]:
            self.held.add(job["id"])
        return [_Answer(next(now, None) if r.now else None, list(islice(held, r.ahead))) for r in reqs]

    def _watch(self) -> None:
        """Arm the watch of the running jobs and held ones, unless armed: one timer for the
        worker while it has jobs, where a timer per job for its heartbeat and another for
        its held jobs, set and cancelled on every job (most end long before either is
        due), cost every job's start and end a share of the process's time."""
        if self._watch_timer is None:
            s = self.settings
            every = max(0.01, min(s.job_ping_s, s.claim_ahead_hold_s) / 5)
            self._watch_timer = asyncio.get_running_loop().call_later(every, self._on_watch)

    def _on_watch(self) -> None:
        """Start the heartbeat of each job that has run job_ping_s; give back the jobs
        held behind one that has run claim_ahead_hold_s (a fifth of the shorter of the two
        late at most)."""
        self._watch_timer = None
        now = time.monotonic()
        for r in list(self.running.values()):
            if r.heartbeat is None and now - r.t0 >= self.settings.job_ping_s:
                self._start_heartbeat(r)
        for st, due in list(self._holds.items()):
            if now >= due:
                del self._holds[st]
                self._release_held(st)
        # on while something is still to come (not for long jobs whose heartbeat runs)
        if self._holds or any(r.heartbeat is None for r in self.running.values()):
            self._watch()

    def _start_heartbeat(self, r: _Running) -> None:
        if self.running.get(r.job["id"]) is r:
            r.heartbeat = asyncio.create_task(self._job_heartbeat(r))

    async def _job_heartbeat(self, r: _Running) -> None:
        while True:
            try:
                state = await queue.ping_job(self.pool, r.job["id"], self.name)
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as e:
                log.warning("job ping failed: %s", e)
                continue
            if state != "ok" and not r.why:
                r.kill(state)
                return
            await asyncio.sleep(self.settings.job_ping_s)

    async def _ping_loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.worker_ping_s)
            try:
                await self._ping()
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as e:
                log.warning("worker ping failed: %s", e)

    async def _ping(self) -> None:
        now = time.monotonic()
        occ = self.stats.busy_s / max(1e-9, (now - self.stats.since) * self.profile.subworkers)
        self.stats.busy_s, self.stats.since = 0.0, now
        await workers.ping(self.pool, self.name, tags=self.tags, jobs_done=self.stats.jobs_done,
                           busy=len(self.running), occupancy=min(1.0, occ))

    # ---- init and periodic scripts -------------------------------------------------------

    async def run_admin_script(self, kind: str, script: str) -> tuple[str, str, uuid.UUID]:
        """Run the group's init or periodic bash script through its backend, with the group's
        limits and env, and record it as a completed job (workspace admins, tag
        '<kind>-<worker>'). Returns (status, logs, job id)."""
        job = {"id": None, "language": "bash", "content": script, "args": {}, "timeout_s": None}
        chunks: list[str] = []
        started = dt.datetime.now(dt.timezone.utc)
        outcome: Outcome | None = None
        if self.backend is None:
            result = JobResult("failure", None, "no sandbox backend to run the script with")
        else:
            spec = build_spec(job, self.profile, self.env)
            outcome = await self.backend.run(spec, lambda _s, b: chunks.append(b.decode(errors="replace")))
            result = interpret(job, outcome, self.profile.limits)
        logs = "".join(chunks)
        if result.status != "success":
            logs += f"\n[sandmill] {kind} script failed: {result.error}\n"
        job_id = await queue.insert_completed(
            self.pool, workspace=ADMIN_WORKSPACE, kind=kind, language="bash", content=script,
            tag=f"{kind}-{self.name}", worker=self.name, started_at=started, status=result.status,
            result=result.result, error=result.error, logs=logs,
            duration_ms=outcome.wall_ms if outcome else 0, cpu_ms=outcome.cpu_ms if outcome else 0,
            mem_peak_kb=outcome.peak_memory_kb if outcome else 0,
            outcome=outcome.to_json() if outcome else None,
        )
        return result.status, logs, job_id

    async def _periodic_loop(self) -> None:
        while True:
            await asyncio.sleep(self.profile.periodic_interval_s)
            script = self.profile.periodic_script
            if not script or self._stopping.is_set():
                continue
            try:
                status, _logs, job_id = await self.run_admin_script("periodic", script)
                if status != "success":
                    log.warning("periodic script failed (job %s)", job_id)
            except Exception as e:  # noqa: BLE001 - the worker goes on; the next run may work
                log.warning("periodic script not run: %s", e)


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


async def _const(v: Any) -> Any:
    return v


def _canceled(error: str) -> JobResult:
    return JobResult("failure", {"error": {"name": "Canceled", "message": "job canceled"}}, error)


_COMPLETION_FAILED = "completion failed (%s); the monitor puts the job back"


def _log_failed_completion(fut: asyncio.Future) -> None:
    if not fut.cancelled() and fut.exception() is not None:
        log.warning(_COMPLETION_FAILED, fut.exception())


def _fast_child_watcher() -> None:
    """On Python 3.11, wait for job processes through pidfds instead of a thread per
    child (the default watcher's thread start is paid by every job). 3.12 does this
    by itself."""
    if sys.version_info < (3, 12) and hasattr(asyncio, "PidfdChildWatcher"):
        try:
            w = asyncio.PidfdChildWatcher()
            w.attach_loop(asyncio.get_running_loop())
            asyncio.set_child_watcher(w)
        except OSError:  # kernel without pidfd_open
            pass


def _freeze_startup_objects() -> None:
    """Leave what the worker has built by now (modules, the pool, the profile: 60,000
    objects and more) out of every garbage collection to come. Collections stop the whole
    process: none of its slots runs, its jobs' timers are late and its completions wait.
    Measured in a 100-subworker drain: the first collection of the middle generation
    walked what start-up had left there, 2-7 ms in each worker process; a full collection,
    which comes once enough objects have survived, walked all of them, 75-100 ms. The
    cycles left from start-up are collected first, not kept for good."""
    gc.collect()
    gc.freeze()


def run_worker(profile: Profile, database_url: str, settings: WorkerSettings | None = None) -> int:
    """Entry point of `sandmill worker`: run until SIGTERM/SIGINT. Returns the exit code."""

    async def main() -> int:
        _fast_child_watcher()
        w = Worker(profile, database_url, settings=settings)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, w.stop)
        try:
            await w.run(on_started=_freeze_startup_objects)
        except WorkerStartError as e:
            log.error("worker %s cannot start: %s", profile.name, e)
            return 2
        except WorkerInitError as e:
            log.error("worker %s: %s; exiting", profile.name, e)
            print(f"sandmill worker: {e}. Its logs:\n{e.logs.rstrip()}", file=sys.stderr, flush=True)
            return 3
        return 0

    with asyncio.Runner(loop_factory=eventloop.new_event_loop) as runner:
        return runner.run(main())
