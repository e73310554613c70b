"""The worker: register, wait on LISTEN/NOTIFY, pull one job per subworker, run it through
the group's backend, stream logs, heartbeat, complete; stop cleanly on ``stop()``.

``Worker`` holds the group's live config (the ``Group`` its parts read) and its
lifecycle, notifications and config reloads; it composes the parts: the claims and
completions (``feed``), the slot loop (``slots``), the job runs (``executor``) and the
watch of running and held jobs (``watch``)."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import uuid
from typing import Any, Callable, Coroutine

import asyncpg

from sandmill.isolation import Backend, workdir
from sandmill.profiles import Profile, ProfileError, profile_from_dict
from sandmill.store import db as dbmod
from sandmill.store import queue, workers

from .admin_scripts import ADMIN_WORKSPACE, periodic_loop, run_admin_script
from .backend_choice import resolve_backend, sweep_loop, work_root
from .batching import HotConns
from .dbconn import DbConn
from .dedicated import Dedicated, dedicated_tags
from .execute import Executor, Running
from .feed import Feed, Pace
from .gpus import GpuPool, Publisher, gpu_pool
from .occupancy import Occupancy
from .runtimes import job_env
from .settings import WorkerInitError, WorkerSettings, WorkerStartError
from .slots import Slots
from .stmt_timing import StatementTiming
from .sysinfo import host_info
from .watch import Stats, Watch, ping_loop

log = logging.getLogger("sandmill.worker")

# The worker's connections for statements: 1 (all its statements through one connection,
# worker/dbconn.py), or 0 for the layout before it, a pool of one connection per slot plus
# five, kept to measure against (bench: SANDMILL_WORKER_DB_CONNS=0).
DB_CONNS = int(os.environ.get("SANDMILL_WORKER_DB_CONNS", "1"))


class Worker:
    """One worker process of a group, with ``profile.subworkers`` concurrent slots."""

    def __init__(self, profile: Profile, database_url: str, *, name: str | None = None,
                 settings: WorkerSettings | None = None, db_conns: int | None = None):
        self.profile = profile
        self.file_profile = profile  # the YAML profile; the group's DB config overrides it
        self.database_url = database_url
        self.settings = settings or WorkerSettings()
        self.name = name or f"{profile.name}-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:4]}"
        self.tags = list(profile.tags) or dedicated_tags(profile)  # a dedicated group: its scripts'
        self.dedicated: Dedicated | None = None  # the dedicated path (worker/dedicated.py), when dedicated
        self.backend: Backend | None = None
        self.env = job_env(profile)
        # the connection of every statement (DbConn), or with db_conns 0 a pool
        self.pool: DbConn | asyncpg.Pool | None = None
        self.db_conns = DB_CONNS if db_conns is None else db_conns
        if not database_url:  # an agent (worker/agent_worker.py): its store is HTTP, where
            self.db_conns = 0  # two requests at once each go their own way, as a pool's did
        self.app_name = f"sandmill-worker {profile.name}"  # in pg_stat_activity
        self.gpus: GpuPool | None = None  # a GPU group's GPUs (gpus_per_job), set at start
        # the store's functions (the job SQL, the worker table): an agent swaps in its own
        # over HTTP (worker/agent_worker.py); the call sites are the same
        self.q: Any = queue
        self.w: Any = workers
        self.listener: asyncpg.Connection | None = None
        self._listener_lost = asyncio.Event()  # set when the LISTEN connection ends
        self.running: dict[uuid.UUID, Running] = {}
        self.held: set[uuid.UUID] = set()  # jobs claimed ahead, not started yet
        self._canceled_held: set[uuid.UUID] = set()  # of those, the ones canceled meanwhile
        self.stats = Stats()
        self.occupancy = Occupancy(profile.subworkers)  # 15 s / 5 min / 30 min, for the autoscaler
        self.pace = Pace(self.settings)
        self._stopping = asyncio.Event()
        self._bg: set[asyncio.Task] = set()
        # with a pool (db_conns 0), the claims' and completions' connections: one for each
        # statement that may be in flight at once (the feed's two claims, the completer's
        # two); with the one connection, none is kept apart: they take it in turn
        self.hot = HotConns(keep=2 + 2 if self.db_conns == 0 else 0)
        self.timing = StatementTiming()  # claim/completion latency, sent with each ping
        # one connection runs one statement at a time: a second completion in flight would
        # only take its batch early, and wait
        self.feed = Feed(self, self.settings, self.hot, self.pace, self.held, self._canceled_held, self._spawn,
                         timing=self.timing, completions_in_flight=2 if self.db_conns == 0 else 1)
        self.watch = Watch(self, self.settings, self.running, release=self.feed.release_held)
        self.executor = Executor(self, self.running, self._canceled_held, self.watch)
        self.slots = Slots(self, self.settings, self._stopping, self.feed, self.executor, self.watch,
                           self.pace, self.stats, self.running)

    # ---- lifecycle -----------------------------------------------------------------------

    async def start(self) -> None:
        """Check the host, connect, apply the group's DB config, pick the backend, register,
        run the init script. Raises WorkerStartError / WorkerInitError when it cannot."""
        info = host_info()
        self.gpus = gpu_pool(self.profile, info)  # a GPU group: info["gpus"] are the ones it hands out
        if self.profile.requires_gpu and not info["gpus"] and not self.settings.allow_no_gpu:
            raise WorkerStartError(
                f"group {self.profile.name} requires a GPU (requires_gpu: true) and none was found"
                " on this host (no nvidia-smi GPU, no /dev/nvidia<N>); start it with --allow-no-gpu"
                " or SANDMILL_ALLOW_NO_GPU=1 to run it anyway")
        await self._open_store()
        p = self.profile
        info["backend_reason"] = "native jobs only: they run in the worker process"
        if (not p.native or any(t in ("python3", "bash") for t in self.tags)
                or p.init_script or p.periodic_script):
            # an explicit kind that cannot run here raises WorkerStartError (exit 2)
            self.backend, backend_reason = resolve_backend(self.profile, workdir.owner_root(work_root(self.profile)))
            info["backend_reason"] = backend_reason
            self._spawn(sweep_loop(self.profile, self.settings))  # docker workers too: dead owners' containers
        if p.dedicated:
            self.dedicated = Dedicated.for_worker(self, info)  # WorkerStartError where it cannot run
        await dbmod.until_reachable(self._listen)
        await dbmod.until_reachable(lambda: self.w.register(
            self.pool, name=self.name, group=self.profile.name, hostname=info["hostname"],
            tags=self.tags, backend=self.backend.name if self.backend else "native",
            subworkers=self.profile.subworkers, info=info,
        ))
        if self.gpus is not None and hasattr(self.w, "set_gpu_jobs"):  # each GPU's jobs, as they change
            Publisher(self.gpus, lambda st: self.w.set_gpu_jobs(self.pool, self.name, st), self._spawn).changed()
        log.info("worker %s up: tags %s, backend %s (%s), %d subworker(s)", self.name, self.tags,
                 self.backend.name if self.backend else "native", info["backend_reason"],
                 self.profile.subworkers)
        if self.profile.init_script:
            status, logs, job_id = await run_admin_script(self, "init", self.profile.init_script)
            if status != "success":
                raise WorkerInitError(f"init script failed (job {job_id} in workspace {ADMIN_WORKSPACE})", logs)
            log.info("init script done (job %s)", job_id)

    async def _open_store(self) -> None:
        """Connect (the statements' connection, or the pool and its hot connections), read
        the group's DB config."""
        # (a worker started while the database restarts waits for it, as its running peers do)
        if self.db_conns == 0:
            # A connection per subworker plus one for pings, and those that claims and
            # completions keep between statements: no slot waits for a connection.
            self.pool = self.hot.pool = await dbmod.until_reachable(lambda: dbmod.create_pool(
                self.database_url, min_size=1, max_size=self.profile.subworkers + 1 + self.hot.keep,
                settings=queue.CLAIM_SETTINGS, app_name=self.app_name))
        else:
            # every statement on one connection; a new one (after a restart) prepares the
            # claim and completion statements before its first use, as the first one does
            self.pool = self.hot.pool = DbConn(
                self.database_url, settings=queue.CLAIM_SETTINGS, app_name=self.app_name,
                on_connect=lambda conn: queue.prepare_worker_statements(conn, self.name, self.tags))
            await dbmod.until_reachable(self.pool.open)
        await self._apply_config(await dbmod.until_reachable(
            lambda: workers.get_config(self.pool, f"worker__{self.profile.name}")))
        if self.db_conns == 0:
            await dbmod.until_reachable(lambda: self.hot.prepare(
                lambda conn: queue.prepare_worker_statements(conn, self.name, self.tags)))

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
        self.occupancy.subworkers = max(1, self.profile.subworkers)  # with the group's stored config applied
        pinger = asyncio.create_task(ping_loop(self.settings.worker_ping_s, self.ping))
        relisten = asyncio.create_task(self._keep_listening())
        periodic = asyncio.create_task(periodic_loop(self, self._stopping))
        slots = ([asyncio.create_task(self.dedicated.run(self._stopping))] if self.dedicated else
                 [asyncio.create_task(self.slots.run_slot(i)) for i in range(self.profile.subworkers)])
        await self._stopping.wait()
        periodic.cancel()
        log.info("worker %s stopping: finishing %d job(s) in hand", self.name, len(self.running))
        done, pending = await asyncio.wait(slots, timeout=self.settings.grace_s)
        if pending:
            for r in list(self.running.values()):
                r.kill("shutdown")
            await asyncio.wait(pending)
        pinger.cancel()
        relisten.cancel()
        await self.feed.completer.wait_idle()  # no completion is left behind in the batcher
        await self.close()

    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        """Run ``coro`` in the background, keeping a reference until it is done."""
        t = asyncio.get_running_loop().create_task(coro)
        self._bg.add(t)
        t.add_done_callback(self._bg.discard)

    def stop(self) -> None:
        """Stop taking jobs; ``run()`` then finishes those in hand and returns."""
        self._stopping.set()
        self.slots.wake.set()

    async def close(self) -> None:
        try:
            if self.pool:
                await self.w.unregister(self.pool, self.name)
        finally:
            if self.backend is not None:
                self.backend.close()  # warm interpreters stop now, not at process exit
            if self.listener:
                await self.listener.close()
            if self.pool:
                await self.hot.close()  # the pool's close waits for every connection it lent
                await self.pool.close()

    async def ping(self) -> None:
        """The worker's heartbeat: its tags, jobs done, busy slots and occupancy (since the last
        ping, and over 15 s, 5 min and 30 min), and its statements' latency (stmt_timing.py)."""
        self.occupancy.add_completed(self.stats.busy_s)  # before take_occupancy starts anew
        occupancy = self.stats.take_occupancy(self.profile.subworkers)
        windows = self.occupancy.sample(r.t0 for r in self.running.values())
        await self.w.ping(self.pool, self.name, tags=self.tags, jobs_done=self.stats.jobs_done,
                           busy=len(self.running), occupancy=occupancy, windows=windows,
                           statement_latency=self.timing.report())

    # ---- notifications -------------------------------------------------------------------

    async def _listen(self) -> None:
        """Open the LISTEN connection and listen on the worker's channels."""
        conn = await dbmod.connect(self.database_url, app_name=self.app_name)
        try:
            await conn.add_listener(queue.CH_QUEUE, self._on_queue)
            await conn.add_listener(queue.CH_CANCEL, self._on_cancel)
            await conn.add_listener(workers.CH_CONFIG, self._on_config)
        except BaseException:
            await conn.close()
            raise
        lost = self._listener_lost = asyncio.Event()
        conn.add_termination_listener(lambda _conn: lost.set())  # its socket ended
        self.listener = conn

    async def _keep_listening(self) -> None:
        """Reopen the LISTEN connection when it is lost (the database restarted), with
        backoff while the database is unreachable; then wake every idle slot and reload the
        group's config, since the NOTIFYs sent meanwhile were missed (a missed cancel is
        caught by the job's next heartbeat). No timer and no round trip while it lasts:
        asyncpg calls the termination listener when the connection's socket ends."""
        backoff = dbmod.Backoff()
        while True:
            if self.listener is not None and not self.listener.is_closed():
                await self._listener_lost.wait()
            try:
                await self._listen()
            except Exception as e:  # noqa: BLE001 - keep trying until the database is back
                log.warning("LISTEN connection lost; reconnecting (%s)", e)
                await backoff.wait()
                continue
            backoff.reset()
            log.info("LISTEN connection back; listening again")
            self.slots.wake_all()
            if self.dedicated is not None:
                self.dedicated.wake_all()
            self.feed.completer.flush()
            self._spawn(self._reload_config())

    def _on_queue(self, _conn, _pid, _channel, payload: str) -> None:
        if self.dedicated is not None:
            self.dedicated.wake(payload)
        elif payload.split("|", 1)[0] in self._bases:
            self.slots.wake_all()
            # a completion waiting at a burst's end also claims: the new job is its to take
            self.feed.completer.flush_if(lambda d: d.now)

    @property
    def tags(self) -> list[str]:
        return self._tags

    @tags.setter
    def tags(self, tags: list[str]) -> None:
        self._tags = list(tags)
        self._bases = set(queue.split_tags(self._tags)[0])  # gpu(ws1+ws2) is woken by gpu

    def _on_cancel(self, _conn, _pid, _channel, payload: str) -> None:
        job_id = uuid.UUID(payload)
        if self.dedicated is not None:
            self.dedicated.cancel(job_id)
        r = self.running.get(job_id)
        if r and not r.why:
            r.kill("canceled")
        elif job_id in self.held:
            self._canceled_held.add(job_id)  # it completes as canceled without running

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
        self.tags = merged.tags or dedicated_tags(self.file_profile)
        self.env = job_env(merged)
        return True

    def _on_config(self, _conn, _pid, _channel, payload: str) -> None:
        if payload == self.file_profile.name:
            self._spawn(self._reload_config())

    async def _reload_config(self) -> None:
        try:
            cfg = await self.w.get_config(self.pool, f"worker__{self.file_profile.name}")
            old = self.tags
            if not await self._apply_config(cfg):
                return
            log.info("group config reloaded: tags %s -> %s", old, self.tags)
            await self.ping()
        except Exception as e:  # noqa: BLE001 - the worker keeps its config meanwhile
            log.warning("config reload failed: %s", e)
        self.slots.wake_all()
