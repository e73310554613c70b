"""Shared pieces of the benchmark suite: one embedded PostgreSQL for the whole run with a
fresh database per section, native worker processes, percentiles."""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import psutil

from sandmill.store import db as dbmod
from sandmill.store import embedded
from sandmill.localcluster import LocalCluster

NATIVE_PROFILE = """
name: {name}
tags: [{tag}]
native: true
subworkers: {subworkers}
limits: {{wall_s: 300}}
"""


def pct(xs: list[float], p: float) -> float:
    """Nearest-rank percentile (p in 0..100)."""
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


def spread(xs: list[float]) -> dict:
    """median, p5, p95, min, max and n of a sample."""
    return {"n": len(xs), "median": pct(xs, 50), "p5": pct(xs, 5), "p95": pct(xs, 95),
            "min": min(xs), "max": max(xs)}


class BenchPG:
    """One embedded PostgreSQL (pgserver) for the run; ``database()`` hands out a fresh,
    migrated database per section, so that sections do not see each other's rows."""

    def __init__(self, max_connections: int = 300):
        pgserver = embedded.import_pgserver()

        self.tmp = scratch_dir()
        self.pg = pgserver.get_server(self.tmp / "pg", cleanup_mode="delete")
        self.url = self.pg.get_uri()
        self._configure(max_connections)

    def _configure(self, n: int) -> None:
        """pgserver starts PostgreSQL with max_connections 100; 100 subworkers over a few
        worker processes, the server and the drivers need more. And a drain is timed by
        commit timestamps (``last_completion_time``). Both are restart settings: write
        them with ALTER SYSTEM and restart through pg_ctl."""
        if (int(self.pg.psql("SHOW max_connections;").split()[2]) >= n
                and self.pg.psql("SHOW track_commit_timestamp;").split()[2] == "on"):
            return
        self.pg.psql(f"ALTER SYSTEM SET max_connections = {n};")
        self.pg.psql("ALTER SYSTEM SET track_commit_timestamp = on;")
        pg_ctl = embedded.import_pgserver().pg_ctl  # the binary pgserver ships; restart keeps postmaster.opts

        pg_ctl(["-w", "-l", str(self.pg.log), "-m", "fast", "restart"], pgdata=self.pg.pgdata,
               user=self.pg.system_user, timeout=60)

    def database(self, prefix: str) -> str:
        name = f"{prefix}_{uuid.uuid4().hex[:6]}"
        self.pg.psql(f"CREATE DATABASE {name};")
        url = self.url.replace("/postgres?", f"/{name}?")

        asyncio.run(dbmod.migrate_url(url))
        return url

    def drop(self, url: str) -> None:
        """Drop a section's database once its figures are read: left behind, the databases
        of earlier sections keep autovacuum busy (their queues are all dead rows) on the
        cores that a later section times."""
        name = url.split("?")[0].rsplit("/", 1)[1]
        self.pg.psql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE);')

    def vacuum(self, url: str) -> None:
        """VACUUM ANALYZE the queue of the database at ``url`` before a timed drain (as
        pgbench vacuums before a run): a drain after an earlier one on the same tag would
        otherwise claim past the earlier rows' dead index entries, as fast or as slow as
        autovacuum happened to be."""
        async def run() -> None:
            conn = await dbmod.connect(url)
            try:
                await conn.execute("VACUUM (ANALYZE) queue")
            finally:
                await conn.close()

        asyncio.run(run())

    def checkpoint(self) -> None:
        """Write out what earlier work left in the WAL now, not during the next timed drain
        (a timed checkpoint lands every 5 minutes; as pgbench does before a run)."""
        self.pg.psql("CHECKPOINT;")

    def cluster(self, url: str, name: str, env: dict | None = None) -> LocalCluster:
        return LocalCluster(url, self.tmp / f"{name}-{uuid.uuid4().hex[:4]}", env=env)

    def close(self) -> None:
        # pgserver stops the postmaster it started; _configure restarted it, so stop this
        # one here (left running on a deleted data dir, it lingered until its own check of
        # the lock file, up to a minute, beside whatever ran next)
        pg_ctl = embedded.import_pgserver().pg_ctl

        try:
            pg_ctl(["-w", "-m", "fast", "stop"], pgdata=self.pg.pgdata, user=self.pg.system_user, timeout=60)
        except Exception:  # noqa: BLE001 - already stopped; cleanup() below still tidies up
            pass
        self.pg.cleanup()
        drop_scratch(self.tmp)


def tree_cpu_s(p: psutil.Process) -> float:
    """CPU seconds so far of ``p`` and its living descendants (a worker's runtimes, the
    postmaster's backends); a process gone meanwhile counts nothing."""
    total = 0.0
    for q in [p, *p.children(recursive=True)]:
        try:
            t = q.cpu_times()
            total += t.user + t.system
        except psutil.Error:
            pass
    return total


def scratch_dir() -> Path:
    """A fresh folder for one run: its PostgreSQL, worker profiles and process logs."""
    tmp = Path(tempfile.mkdtemp(prefix="sandmill-bench-"))
    tmp.chmod(0o755)  # job sandboxes run as other users
    return tmp


def drop_scratch(tmp: Path) -> None:
    """Remove a run's folder (a few hundred KB each: they piled up by the hundred), unless
    SANDMILL_BENCH_KEEP is set, to read the logs of a run that went wrong."""
    if os.environ.get("SANDMILL_BENCH_KEEP"):
        print(f"kept {tmp} (SANDMILL_BENCH_KEEP)")
        return
    shutil.rmtree(tmp, ignore_errors=True)


async def wait_registered(url: str, group: str, count: int, timeout: float = 60) -> None:
    """Wait until ``count`` workers of ``group`` have registered in the DB (no server needed)."""
    conn = await dbmod.connect(url)
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if await conn.fetchval("SELECT count(*) FROM worker WHERE worker_group = $1", group) >= count:
                return
            await asyncio.sleep(0.1)
    finally:
        await conn.close()
    raise RuntimeError(f"{count} worker(s) of group {group} did not register in {timeout}s")


def start_native_workers(cluster: LocalCluster, group: str, tag: str, processes: int,
                         subworkers: int) -> None:
    text = NATIVE_PROFILE.format(name=group, tag=tag, subworkers=subworkers)
    for _ in range(processes):
        cluster.start_worker(group, profile_text=text)


async def enqueue(conn, n: int, *, tag: str, language: str, args: dict,
                  workspace: str = "bench") -> str:
    """Queue ``n`` jobs in one transaction on ``conn`` through server.queue.push, so that
    they all become visible at the commit (and the per-row NOTIFYs of one tag fold into
    one). Returns the transaction's id, for commit_time: that commit is the moment idle
    workers can see the jobs, and its return reaches this process later (6-9 ms on this
    2-core machine, where the workers it wakes take the cores first)."""
    from sandmill.store import queue

    async with conn.transaction():
        for _ in range(n):
            await queue.push(conn, workspace=workspace, language=language, content="", args=args, tag=tag)
        # the low 32 bits of the 64-bit id are the xid that commit timestamps are kept by
        return await conn.fetchval("SELECT (pg_current_xact_id()::text::bigint % 4294967296)::text")


async def commit_time(conn, xid: str) -> float | None:
    """The epoch of transaction ``xid``'s commit, as PostgreSQL timestamped it (None where
    track_commit_timestamp is off)."""
    return await conn.fetchval("SELECT extract(epoch FROM pg_xact_commit_timestamp($1::text::xid))::float8", xid)


async def last_completion_time(conn, tag: str) -> float | None:
    """The epoch (PostgreSQL's commit timestamp, the host's clock) of the commit that
    completed the last job of ``tag``: completed rows are written once, by the statement
    that completes them, so their xmin is that commit. None where track_commit_timestamp
    is off."""
    return await conn.fetchval(
        "SELECT extract(epoch FROM max(pg_xact_commit_timestamp(xmin)))::float8"
        "  FROM completed_job WHERE tag = $1", tag)


# ids as a join: under the generic plan asyncpg's prepared statement gets after five runs,
# `id = ANY($1)` compares every completed row with every id (uuid_eq: tens of ms of a
# PostgreSQL backend per poll at a few thousand ids, on the cores being timed)
_DONE_OF = "FROM unnest($1::uuid[]) AS u(id) JOIN completed_job c ON c.id = u.id"


async def count_done(conn, ids: list) -> int:
    """How many of the jobs ``ids`` have completed (one primary-key probe per id)."""
    return await conn.fetchval(f"SELECT count(*) {_DONE_OF}", ids)


async def last_done_at(conn, ids: list) -> float | None:
    """The epoch of the latest ``completed_at`` among the jobs ``ids``."""
    return await conn.fetchval(f"SELECT extract(epoch FROM max(c.completed_at))::float8 {_DONE_OF}", ids)


async def wait_drained(conn, n: int, tag: str, timeout: float, poll_s: float = 0.01,
                       settle_s: float = 0.0) -> float:
    """monotonic time at which ``n`` jobs of ``tag`` have completed, polled every ``poll_s``
    after ``settle_s`` (a drain's known minimum: no poll in the burst that starts it).
    While jobs still wait, a poll is one probe of the queue's pull index; only then does it
    count completed_job. A count every 10 ms reads every completed row of the run each time
    (1 ms and more of a PostgreSQL backend's time by the end of a 5,000-job drain): load on
    the 2 cores that the drain it times shares with the database, and that pgqueuer's drain,
    which nothing polls, does not carry."""
    deadline = time.monotonic() + timeout
    await asyncio.sleep(settle_s)
    while time.monotonic() < deadline:
        if (not await conn.fetchval("SELECT EXISTS (SELECT 1 FROM queue WHERE tag = $1 AND NOT running)", tag)
                and await conn.fetchval("SELECT count(*) FROM completed_job WHERE tag = $1", tag) >= n):
            return time.monotonic()
        await asyncio.sleep(poll_s)
    raise RuntimeError(f"{n} {tag} jobs not completed in {timeout}s")



def count_batches(batcher: Any) -> list[int]:
    """The sizes of the statements ``batcher`` (a worker.batching.Batcher) sends from now
    on, appended as they go (how many requests each serves)."""
    sizes: list[int] = []
    run_batch = batcher._run_batch

    async def counted(reqs: list[Any]) -> list[Any]:
        sizes.append(len(reqs))
        return await run_batch(reqs)

    batcher._run_batch = counted
    return sizes


def count_completion_batches(worker: Any) -> list[int]:
    """The sizes of the completion statements ``worker`` (a worker.Worker not yet run)
    sends from now on (how many jobs each statement completes)."""
    return count_batches(worker.feed.completer)
