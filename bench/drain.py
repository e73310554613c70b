"""Queue-bound measurements with native worker processes: scaling (N subworkers draining
jobs that each sleep 100 ms; ideal N x 10 jobs/s) and queue throughput (no-op jobs
drained as fast as the queue allows).

    python -m bench.drain scaling [--subworkers 10,20,50,100] [--jobs 2000] [--probe]
    python -m bench.drain scaling --subworkers 500 --per-process 100 --jobs 20000 --max-connections 100 --probe
    python -m bench.drain queue [--jobs 5000] [--db-conns 0,1]   (the worker's pool before, its one connection now)
"""

from __future__ import annotations

import argparse
import asyncio
import time
import uuid

from sandmill.store import db as dbmod

from .common import (BenchPG, commit_time, enqueue, last_completion_time, start_native_workers,
                     wait_drained, wait_registered)
from .dbload import Probe, job_times


def split_processes(subworkers: int, per_process: int = 25) -> tuple[int, int]:
    """(processes, subworkers each) for ``subworkers`` in all: one process up to
    ``per_process``, then as many processes of equal size as needed."""
    procs = max(1, -(-subworkers // per_process))
    while subworkers % procs:
        procs += 1
    return procs, subworkers // procs


def drain_once(bp: BenchPG, *, subworkers: int, jobs: int, language: str, args: dict,
               per_process: int = 25, timeout: float = 600, env: dict | None = None,
               probe: bool = False) -> dict:
    """Start native workers with ``subworkers`` slots in all on a fresh database, wait until
    they are idle, queue ``jobs`` jobs in one transaction, and time from its commit to the
    commit of the last completion, both as PostgreSQL timestamped them: the harness sees
    its commit return 6-9 ms after the jobs became visible (the woken workers take the
    cores first), and polls for the end every 10 ms, which would add up to a poll (0-14
    ms, 0.7% of a 2 s drain) that is not the queue's. Returns jobs/s and, beside it, the
    figure timed by the harness (from the commit's return to the poll that saw the end).
    ``probe``: also sample the drain from outside (bench/dbload.py: the peak backends by
    application_name, CPU of PostgreSQL and of the workers, transactions/s), as "load"."""
    url = bp.database("drain")
    procs, each = split_processes(subworkers, per_process)
    tag = f"bench{uuid.uuid4().hex[:6]}"
    group = f"g{tag}"
    bp.checkpoint()
    cluster = bp.cluster(url, "drain", env=env)
    try:
        start_native_workers(cluster, group, tag, procs, each)

        async def go() -> dict:
            await wait_registered(url, group, procs)
            await asyncio.sleep(0.5)  # let every slot reach its idle wait
            econn, conn = await dbmod.connect(url), await dbmod.connect(url)
            pr = Probe(await dbmod.connect(url, app_name="sandmill-bench-probe"),
                       [p.pid for p in cluster.procs]) if probe else None
            stop_probe = asyncio.Event()
            sampler = None
            # the harness stays off the cores until the drain's end can be near: no
            # poll, close or commit-time read in the burst of claims that starts it
            work_s = jobs * float(args.get("seconds", 0)) / subworkers if language == "sleep" else 0.0
            try:
                t0 = time.monotonic()
                xid = await enqueue(econn, jobs, tag=tag, language=language, args=args)
                t_commit, wall_return = time.monotonic(), time.time()
                if pr is not None:  # from the commit on: the enqueue's own load is not the drain's
                    await pr.start()
                    sampler = asyncio.create_task(pr.run(stop_probe))
                t_end = await wait_drained(conn, jobs, tag, timeout, settle_s=0.9 * work_s)
                load = None
                if pr is not None:
                    stop_probe.set()
                    await sampler
                    load = await pr.stop(jobs)
                    load.update(await job_times(conn, tag, subworkers))
                committed = await commit_time(conn, xid)
                last = await last_completion_time(conn, tag)
            finally:
                stop_probe.set()
                await econn.close()
                await conn.close()
                if pr is not None:
                    await pr.conn.close()
            polled_s = t_end - t_commit
            drain_s = last - committed if last is not None and committed is not None else polled_s
            return {"jobs": jobs, "subworkers": subworkers, "processes": procs,
                    "enqueue_s": t_commit - t0, "drain_s": drain_s, "polled_drain_s": polled_s,
                    "return_lag_s": wall_return - committed if committed is not None else 0.0,
                    "jobs_per_s": jobs / drain_s, "polled_jobs_per_s": jobs / polled_s,
                    **({"load": load} if load is not None else {})}

        return asyncio.run(go())
    finally:
        cluster.stop()
        bp.drop(url)


def _load_txt(load: dict) -> str:
    return (f"  peak backends {load['peak_backends_total']} {load['peak_backends']};"
            f" CPU per 1,000 jobs: PostgreSQL {load['pg_cpu_ms_per_1000_jobs']:.0f} ms,"
            f" workers {load['workers_cpu_ms_per_1000_jobs']:.0f} ms; cores used {load['cores_used']:.2f}"
            f" of {load['cores']}; worker processes' core share {load['worker_core_share']};"
            f" {load['tx_per_s']:.0f} tx/s ({load['tx_per_job']:.3f} a job); jobs' own time ms mean"
            f" {load['job_ms_mean']:.1f}, p50 {load['job_ms_p50']:.0f}, p99 {load['job_ms_p99']:.0f};"
            f" slots busy {100 * load['slot_busy_share']:.1f}%")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=["scaling", "queue"])
    ap.add_argument("--subworkers", default="10,20,50,100")
    ap.add_argument("--jobs", type=int, default=2000)
    ap.add_argument("--per-process", type=int, default=25)
    ap.add_argument("--probe", action="store_true", help="sample backends, CPU and tx/s (bench/dbload.py)")
    ap.add_argument("--db-conns", default="1",
                    help="worker connection layouts to run, in turn: 1 (one connection), 0 (the pool before it)")
    ap.add_argument("--max-connections", type=int, default=300, help="PostgreSQL's max_connections")
    a = ap.parse_args()
    bp = BenchPG(max_connections=a.max_connections)
    try:
        for layout in a.db_conns.split(","):
            env = {"SANDMILL_WORKER_DB_CONNS": layout}
            for n in [int(x) for x in a.subworkers.split(",")]:
                if a.what == "scaling":
                    r = drain_once(bp, subworkers=n, jobs=a.jobs, language="sleep", args={"seconds": 0.1},
                                   per_process=a.per_process, env=env, probe=a.probe)
                    print(f"db_conns {layout}: {n:4d} subworkers ({r['processes']} proc): {r['jobs_per_s']:7.1f} jobs/s "
                          f"= {100 * r['jobs_per_s'] / (n * 10):5.1f}% of ideal (polled end:"
                          f" {100 * r['polled_jobs_per_s'] / (n * 10):5.1f}%)")
                else:
                    r = drain_once(bp, subworkers=n, jobs=a.jobs, language="noop", args={},
                                   per_process=a.per_process, env=env, probe=a.probe)
                    print(f"db_conns {layout}: noop {n} subworkers: {r['jobs_per_s']:.1f} jobs/s"
                          f"  (enqueue {r['enqueue_s']:.2f}s)")
                if "load" in r:
                    print(_load_txt(r["load"]))
    finally:
        bp.close()


if __name__ == "__main__":
    main()
