"""Where a drain's time goes, read from outside while it runs: PostgreSQL's backends by
application_name (their peak count), the CPU seconds of PostgreSQL's processes and of the
worker processes (psutil), and the database's committed transactions. Used by the scaling
section's large points (bench/drain.py) and the idle section (backends per process)."""

from __future__ import annotations

import asyncio
import os
import time
from dataclasses import dataclass, field

import psutil

_BY_APP = ("SELECT coalesce(nullif(application_name, ''), '(unnamed)') AS app, count(*)::int AS n"
           "  FROM pg_stat_activity WHERE backend_type = 'client backend' GROUP BY 1")
_ALL_PIDS = "SELECT pid FROM pg_stat_activity"
_COMMITS = "SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()"


async def backends_by_app(conn) -> dict[str, int]:
    """Client backends of the whole PostgreSQL by application_name, this probe's own not
    counted."""
    out = {r["app"]: r["n"] for r in await conn.fetch(_BY_APP)}
    mine = await conn.fetchval("SELECT coalesce(nullif(current_setting('application_name'), ''), '(unnamed)')")
    out[mine] = out.get(mine, 1) - 1
    return {k: v for k, v in out.items() if v}


def _cpu_s(pids: list[int]) -> dict[int, float]:
    out = {}
    for pid in pids:
        try:
            t = psutil.Process(pid).cpu_times()
            out[pid] = t.user + t.system
        except psutil.Error:
            pass
    return out


_JOBS = ("SELECT avg(duration_ms)::float8 AS mean, percentile_cont(0.5) WITHIN GROUP (ORDER BY duration_ms) AS p50,"
         " percentile_cont(0.99) WITHIN GROUP (ORDER BY duration_ms) AS p99, sum(duration_ms)::float8 / 1000 AS busy_s,"
         " extract(epoch FROM max(completed_at) - min(started_at))::float8 AS span_s"
         "  FROM completed_job WHERE tag = $1")


async def job_times(conn, tag: str, subworkers: int) -> dict:
    """How the slots spent a drain of ``tag``: the jobs' own run time as the workers timed
    it (mean, p50, p99 ms: a 100 ms sleep that ends late is the event loop's or the cores'
    delay), and the slots' busy share from the first start to the last completion (the
    rest: the ramp, the tail, waits for claims)."""
    r = await conn.fetchrow(_JOBS, tag)
    span = r["span_s"] or 0.0
    return {"job_ms_mean": r["mean"], "job_ms_p50": r["p50"], "job_ms_p99": r["p99"],
            "slot_busy_share": r["busy_s"] / (span * subworkers) if span else 0.0}


@dataclass
class Probe:
    """Sample a drain: call ``start()`` before it, ``stop()`` after; ``sample()`` (every
    ``every_s`` in ``run()``) keeps the peak backends. ``worker_pids``: the worker
    processes whose CPU is counted."""

    conn: object
    worker_pids: list[int]
    every_s: float = 0.25
    peak: dict[str, int] = field(default_factory=dict)
    peak_total: int = 0
    _t0: float = 0.0
    _pg0: dict[int, float] = field(default_factory=dict)
    _w0: dict[int, float] = field(default_factory=dict)
    _c0: int = 0

    async def start(self) -> None:
        pids = [r["pid"] for r in await self.conn.fetch(_ALL_PIDS)]
        pids += list({psutil.Process(p).ppid() for p in pids[:1]})  # the postmaster
        self._pg0 = _cpu_s([p for p in pids if p != os.getpid()])
        self._w0 = _cpu_s(self.worker_pids)
        self._c0 = await self.conn.fetchval(_COMMITS)
        self._t0 = time.monotonic()
        await self.sample()

    async def sample(self) -> None:
        got = await backends_by_app(self.conn)
        self.peak_total = max(self.peak_total, sum(got.values()))
        for k, v in got.items():
            self.peak[k] = max(self.peak.get(k, 0), v)

    async def run(self, stop: asyncio.Event) -> None:
        """sample() every ``every_s`` until ``stop`` is set."""
        while not stop.is_set():
            try:
                await asyncio.wait_for(stop.wait(), self.every_s)
            except asyncio.TimeoutError:
                await self.sample()

    async def stop(self, jobs: int) -> dict:
        """The figures since start(): wall seconds, CPU seconds of PostgreSQL and of the
        workers (in all, per 1,000 jobs, and each worker's share of one core), the
        machine's cores used, committed transactions per second, the peak backends."""
        elapsed = time.monotonic() - self._t0
        await self.conn.execute("SELECT pg_stat_clear_snapshot()")
        commits = await self.conn.fetchval(_COMMITS) - self._c0
        pg1, w1 = _cpu_s(list(self._pg0)), _cpu_s(self.worker_pids)
        pg_s = sum(pg1[p] - self._pg0[p] for p in pg1)
        w_each = [w1[p] - self._w0[p] for p in w1 if p in self._w0]
        w_s = sum(w_each)
        cores = psutil.cpu_count() or 1
        return {"elapsed_s": elapsed, "pg_cpu_s": pg_s, "workers_cpu_s": w_s,
                "pg_cpu_ms_per_1000_jobs": 1e6 * pg_s / max(1, jobs),
                "workers_cpu_ms_per_1000_jobs": 1e6 * w_s / max(1, jobs),
                "worker_core_share": [round(x / elapsed, 3) for x in w_each],
                "cores": cores, "cores_used": (pg_s + w_s) / elapsed,
                "tx_per_s": commits / elapsed, "tx_per_job": commits / max(1, jobs),
                "peak_backends": dict(self.peak), "peak_backends_total": self.peak_total}
