"""The sections of `python -m bench`: each runs on the shared BenchPG and returns plain
data (lists of samples and their spreads) for the tables and the report."""

from __future__ import annotations

import asyncio
import os
import signal
import time
import uuid
from dataclasses import dataclass, field

from sandmill.store import db as dbmod
from sandmill.store import queue

from . import latency as lat
from .common import BenchPG, spread, start_native_workers, wait_registered
from .drain import drain_once
from .idle_load import idle_backends, measure_commits_per_s, start_idle_cluster
from .pgq import pgqueuer_drain


@dataclass
class Counts:
    """How much each section runs: the full set, or --quick's tiny counts."""

    backends: list[str] = field(default_factory=lambda: ["process", "nsjail", "docker"])
    latency_runs: int = 50
    batch_jobs: int = 300        # jobs per throughput batch (per-job overhead; 100 until session 13)
    batches: int = 3
    docker_batch_jobs: int = 30
    docker_latency_runs: int = 15
    scaling_n: list[int] = field(default_factory=lambda: [10, 20, 50, 100])
    scaling_jobs: int = 2000
    scaling_repeats: int = 3
    # the large point(s): 500 subworkers in 5 processes of 100, on a PostgreSQL of their own
    # at max_connections 100 (asserted); 20,000 jobs (4 s of ideal: the ramp at the start and
    # the tail at the end, ~0.1 s each, stay small beside it)
    scaling_large: list[int] = field(default_factory=lambda: [500])
    scaling_large_jobs: int = 20000
    scaling_large_per_process: int = 100
    scaling_large_max_connections: int = 100
    queue_jobs: int = 5000
    queue_repeats: int = 3
    queue_subworkers: int = 8    # the native group's default
    idle_window_s: float = 5
    idle_windows: int = 6        # 6 x 5 s = 30 s
    idle_settle_s: float = 11    # PostgreSQL flushes an idle backend's counters up to 10 s late
    recovery_repeats: int = 3
    recovery_env: dict = field(default_factory=dict)  # defaults: SANDMILL_PING_TIMEOUT_S 6, MONITOR_EVERY_S 2
    # the sections of bench/sections_more.py (pydeps runs on ``backends``)
    dedicated_backends: list[str] = field(default_factory=lambda: ["process", "nsjail"])
    dedicated_jobs: int = 5000   # no-op jobs drained by the dedicated worker (the standard one: a tenth)
    dedicated_runs: int = 200    # fib(10) run_wait_result calls per worker
    agent_jobs: int = 20000  # a 3,000-job drain is mostly its ramp (docs/performance.md, "Agent workers")
    agent_rounds: int = 5
    agent_idle_agents: int = 200
    agent_idle_s: float = 60
    autoscale_quick: bool = False  # the ramp's small burst
    pydeps_jobs: int = 30
    pydeps_locks: int = 3
    dashboard_jobs: int = 100_000
    dashboard_rounds: int = 30


QUICK = Counts(backends=["process"], latency_runs=5, batch_jobs=10, batches=1, docker_batch_jobs=5,
               docker_latency_runs=3, scaling_n=[5, 10], scaling_jobs=60, scaling_repeats=1,
               scaling_large=[20], scaling_large_jobs=200, scaling_large_per_process=10,
               queue_jobs=200, queue_repeats=1, idle_window_s=1, idle_windows=2, idle_settle_s=1,
               recovery_repeats=1,
               recovery_env={"SANDMILL_PING_TIMEOUT_S": "2", "SANDMILL_MONITOR_EVERY_S": "0.5"},
               dedicated_backends=["process"], dedicated_jobs=500, dedicated_runs=30, agent_jobs=300,
               agent_rounds=1, agent_idle_agents=20, agent_idle_s=6, autoscale_quick=True, pydeps_jobs=5,
               pydeps_locks=1, dashboard_jobs=10_000, dashboard_rounds=5)


def available_backends(wanted: list[str]) -> dict[str, str]:
    """{backend: "" if it runs here else why not}."""
    from sandmill.isolation import get_backend

    out = {}
    for name in wanted:
        try:
            p = get_backend(name).probe()
            out[name] = "" if p.available else (p.reason or "not available")
        except Exception as e:  # noqa: BLE001 - a backend that cannot even load is reported
            out[name] = f"{type(e).__name__}: {e}"
    return out


# ---- 1. per-job overhead ---------------------------------------------------------------------

# python3 jobs fork from a warm interpreter there (docker: bash jobs too, in a warm container)
WARM_BACKENDS = ("process", "nsjail", "docker")

def overhead(bp: BenchPG, counts: Counts, log=print) -> dict:
    """One worker per backend; per language: bare interpreter start, submit->result latency
    (run_wait_result, one at a time) and jobs/s over batches submitted at once."""
    probes = available_backends(counts.backends)
    rows = []
    variants = [(b, False) for b in probes]
    # The same python3 jobs in a fresh interpreter each: what the warm interpreters save.
    variants += [(b, True) for b in probes if b in WARM_BACKENDS]
    for backend, cold in variants:
        why = probes[backend]
        if why:
            if not cold:
                log(f"  {backend}: skipped ({why})")
            continue
        name = f"{backend}-cold" if cold else backend
        url = bp.database(f"ovh_{name.replace('-', '_')}")
        c = bp.cluster(url, f"ovh-{name}")
        try:
            c.start_server()
            c.start_worker("bench", tags="python3, bash", backend=backend,
                           backend_options={"warm": False} if cold else None)
            c.wait_workers("bench")
            with c.client() as api:
                used = next(w["backend"] for w in api.get("/api/workers/list").json() if w["worker_group"] == "bench")
            # Fewer jobs for a fresh container each (~120 ms); warm docker takes the usual counts.
            slow = backend == "docker" and cold
            runs = counts.docker_latency_runs if slow else counts.latency_runs
            batch = counts.docker_batch_jobs if slow else counts.batch_jobs
            for language in ("python3",) if cold else ("python3", "bash"):
                log(f"  {name} / {language}: {runs} latency runs, {counts.batches} x {batch} jobs")

                async def go() -> tuple[list[float], list[float], list[float]]:
                    bare = await lat.bare_start(lat.BARE[language], runs)
                    l_ms = await lat.latency(c, language, runs)
                    jps = [await lat.throughput(c, language, batch) for _ in range(counts.batches)]
                    return bare, l_ms, jps, await lat.warm_share(c, language)

                bare, l_ms, jps, warm_share = asyncio.run(go())
                rows.append({"backend": name, "backend_used": f"{used}-cold" if cold else used,
                             "language": language, "warm_share": warm_share,
                             "bare_ms": bare, "latency_ms": l_ms, "jobs_per_s": jps, "batch_jobs": batch,
                             "bare": spread(bare), "latency": spread(l_ms), "jps": spread(jps),
                             "overhead_ms": spread(l_ms)["median"] - spread(bare)["median"]})
        finally:
            c.stop()
            bp.drop(url)
    return {"rows": rows, "probes": probes}


# ---- 2. scaling ------------------------------------------------------------------------------

def scaling(bp: BenchPG, counts: Counts, log=print) -> dict:
    rows = []
    for n in counts.scaling_n:
        samples = []
        for i in range(counts.scaling_repeats):
            r = drain_once(bp, subworkers=n, jobs=counts.scaling_jobs, language="sleep",
                           args={"seconds": 0.1})
            samples.append(r)
            log(f"  {n} subworkers ({r['processes']} process(es)), run {i + 1}: {r['jobs_per_s']:.1f} jobs/s"
                f" ({100 * r['jobs_per_s'] / (n * 10):.1f}% of ideal)")
        jps = [s["jobs_per_s"] for s in samples]
        rows.append({"subworkers": n, "processes": samples[0]["processes"], "ideal": n * 10.0,
                     "jobs_per_s": jps, "jps": spread(jps),
                     "efficiency": spread([j / (n * 10.0) for j in jps])})
    return {"rows": rows, "jobs": counts.scaling_jobs, "repeats": counts.scaling_repeats,
            "large": scaling_large(counts, log)}


def scaling_large(counts: Counts, log=print) -> dict:
    """The large points, on a PostgreSQL of their own at max_connections
    ``scaling_large_max_connections`` (PostgreSQL's default, 100): the drain must fit in it
    (asserted: the setting, and the peak of client backends sampled during each drain),
    with where the time goes (bench/dbload.py: CPU of PostgreSQL and of the workers,
    transactions/s)."""
    if not counts.scaling_large:
        return {"rows": []}
    limit = counts.scaling_large_max_connections
    bp = BenchPG(max_connections=limit)
    try:
        got = int(bp.pg.psql("SHOW max_connections;").split()[2])
        assert got == limit, f"max_connections is {got}, not {limit}"
        rows = []
        for n in counts.scaling_large:
            samples = []
            for i in range(counts.scaling_repeats):
                r = drain_once(bp, subworkers=n, jobs=counts.scaling_large_jobs, language="sleep",
                               args={"seconds": 0.1}, per_process=counts.scaling_large_per_process, probe=True)
                peak = r["load"]["peak_backends_total"]
                assert peak < limit, f"{peak} backends at {n} subworkers: max_connections {limit} exceeded"
                samples.append(r)
                ld = r["load"]
                log(f"  {n} subworkers ({r['processes']} processes), max_connections {limit}, run {i + 1}:"
                    f" {r['jobs_per_s']:.1f} jobs/s ({100 * r['jobs_per_s'] / (n * 10):.1f}% of ideal);"
                    f" peak backends {peak}; CPU per 1,000 jobs: PostgreSQL {ld['pg_cpu_ms_per_1000_jobs']:.0f} ms,"
                    f" workers {ld['workers_cpu_ms_per_1000_jobs']:.0f} ms; cores used {ld['cores_used']:.2f}")
            jps = [s["jobs_per_s"] for s in samples]
            loads = [s["load"] for s in samples]
            mid = sorted(range(len(jps)), key=jps.__getitem__)[len(jps) // 2]  # the median run's load
            rows.append({"subworkers": n, "processes": samples[0]["processes"], "ideal": n * 10.0,
                         "jobs_per_s": jps, "jps": spread(jps),
                         "efficiency": spread([j / (n * 10.0) for j in jps]),
                         "peak_backends": max(ld["peak_backends_total"] for ld in loads),
                         "load": loads[mid], "loads": loads})
        return {"rows": rows, "jobs": counts.scaling_large_jobs, "max_connections": limit,
                "per_process": counts.scaling_large_per_process}
    finally:
        bp.close()


# ---- 3. queue throughput vs pgqueuer ---------------------------------------------------------

def queue_throughput(bp: BenchPG, counts: Counts, log=print) -> dict:
    sm, pq = [], []
    for i in range(counts.queue_repeats):
        r = drain_once(bp, subworkers=counts.queue_subworkers, jobs=counts.queue_jobs, language="noop", args={})
        sm.append(r["jobs_per_s"])
        url = bp.database("pgq")
        bp.checkpoint()  # as before sandmill's drain (drain_once)
        try:
            p = asyncio.run(pgqueuer_drain(url, counts.queue_jobs))
        finally:
            bp.drop(url)
        pq.append(p["jobs_per_s"])
        log(f"  run {i + 1}: sandmill {sm[-1]:.0f} jobs/s, pgqueuer {pq[-1]:.0f} jobs/s")
    ratio = [a / b for a, b in zip(sm, pq)]
    return {"jobs": counts.queue_jobs, "repeats": counts.queue_repeats, "subworkers": counts.queue_subworkers,
            "sandmill": spread(sm), "pgqueuer": spread(pq), "ratio": spread(ratio),
            "sandmill_samples": sm, "pgqueuer_samples": pq}


# ---- 4. idle load ----------------------------------------------------------------------------

def idle(bp: BenchPG, counts: Counts, log=print) -> dict:
    url = bp.database("idle")
    c = bp.cluster(url, "idle")
    try:
        start_idle_cluster(c)
        time.sleep(counts.idle_settle_s)
        windows = [asyncio.run(measure_commits_per_s(url, counts.idle_window_s)) for _ in range(counts.idle_windows)]
        backends = asyncio.run(idle_backends(url))
    finally:
        c.stop()
    total_s = counts.idle_window_s * counts.idle_windows
    return {"windows": windows, "window_s": counts.idle_window_s, "total_s": total_s,
            "tx_per_s": sum(windows) / len(windows), "spread": spread(windows), "backends": backends}


# ---- 5. recovery -----------------------------------------------------------------------------

def recovery(bp: BenchPG, counts: Counts, log=print) -> dict:
    """SIGKILL the worker that runs a (native sleep) job; seconds until the job runs again
    on another worker, put back by the server's monitor."""
    url = bp.database("recovery")
    env = {"SANDMILL_GRACE_S": "1", **counts.recovery_env}
    c = bp.cluster(url, "recovery", env=env)
    group, tag = "rec", f"rec{uuid.uuid4().hex[:6]}"
    secs = []
    try:
        c.start_server()
        start_native_workers(c, group, tag, counts.recovery_repeats + 1, 1)

        async def go() -> None:
            await wait_registered(url, group, counts.recovery_repeats + 1)
            conn = await dbmod.connect(url)
            try:
                for i in range(counts.recovery_repeats):
                    jid = await queue.push(conn, workspace="bench", language="sleep", content="",
                                           args={"seconds": 120}, tag=tag)
                    while not (w := await conn.fetchval("SELECT worker FROM queue WHERE id = $1 AND running", jid)):
                        await asyncio.sleep(0.02)
                    await asyncio.sleep(1.5)  # a job ping or two, as a job in the middle of its run
                    os.kill(int(w.split("-")[-2]), signal.SIGKILL)
                    t_kill = time.monotonic()
                    while True:
                        w2 = await conn.fetchval("SELECT worker FROM queue WHERE id = $1 AND running", jid)
                        if w2 and w2 != w:
                            break
                        if time.monotonic() - t_kill > 120:
                            raise RuntimeError("job not recovered in 120 s")
                        await asyncio.sleep(0.02)
                    secs.append(time.monotonic() - t_kill)
                    log(f"  kill {i + 1}: job running again after {secs[-1]:.2f} s")
                    await queue.cancel(conn, "bench", jid, "bench", "recovery measured")
            finally:
                await conn.close()

        asyncio.run(go())
    finally:
        c.stop()
    from sandmill.server.settings import ServerSettings as S

    return {"seconds": secs, "spread": spread(secs),
            "ping_timeout_s": float(env.get("SANDMILL_PING_TIMEOUT_S", S.ping_timeout_s)),
            "monitor_every_s": float(env.get("SANDMILL_MONITOR_EVERY_S", S.monitor_every_s)),
            "defaults": not counts.recovery_env}
