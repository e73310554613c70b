"""The server's and PostgreSQL's CPU per submitted job, the submit path's changes off and
on, alternating in the same minutes (docs/performance.md, "The server's and PostgreSQL's
share per job"):

    python -m bench.submit [--jobs 1000] [--rounds 4] [--route run|run_wait_result] [--quick]

Two servers on one embedded PostgreSQL: "off" with SANDMILL_SUBMIT_BATCH=0
SANDMILL_FAST_SUBMIT=0, "on" with the defaults. Each round sends ``--jobs`` bash previews
to each (20 at a time through httpx, as bench/latency.py does; the order alternates per
round) and reads the CPU of the server process and of every PostgreSQL process (psutil)
around it, and this process's own (the client). ``--route run`` needs no worker (the
queue is emptied between batches); ``run_wait_result`` starts a process worker of 4
subworkers that serves both servers' jobs. Figures are CPU ms per job; on a shared machine
compare the two columns of a round, not rounds.
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import statistics
import time

import httpx
import psutil

from sandmill.localcluster import LocalCluster
from sandmill.store import db as dbmod
from sandmill.store import embedded

from .common import drop_scratch, scratch_dir
from .latency import _cpu

OFF = {"SANDMILL_SUBMIT_BATCH": "0", "SANDMILL_FAST_SUBMIT": "0"}
BODY = {"content": "echo 1\n", "language": "bash"}


def pg_cpu(pg_dir) -> float:
    """CPU seconds of the PostgreSQL processes of ``pg_dir`` (postmaster and backends)."""
    pg = [p for p in psutil.process_iter(["cmdline"]) if str(pg_dir) in " ".join(p.info["cmdline"] or ())]
    return sum(_cpu(p) + sum(_cpu(c) for c in p.children(recursive=True)) for p in pg)


def self_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


async def batch(cluster: LocalCluster, route: str, n: int) -> None:
    async with cluster.async_client(limits=httpx.Limits(max_connections=20)) as c:
        sem = asyncio.Semaphore(20)

        async def one() -> None:
            async with sem:
                r = await c.post(f"/api/w/bench/jobs/{route}/preview", json=BODY)
                assert r.status_code in (200, 201), r.text
        await asyncio.gather(*(one() for _ in range(n)))


async def run(args: argparse.Namespace) -> dict:
    pgserver = embedded.import_pgserver()
    tmp = scratch_dir()
    pg = pgserver.get_server(tmp / "pg", cleanup_mode="delete")
    url = pg.get_uri()
    await dbmod.migrate_url(url)
    clusters = {"off": LocalCluster(url, tmp / "off", env=OFF), "on": LocalCluster(url, tmp / "on")}
    rounds: list[dict] = []
    try:
        for c in clusters.values():
            c.start_server()
        if args.route != "run":
            clusters["off"].start_worker("bench", tags="bash", backend="process", subworkers=4)
            clusters["off"].wait_workers("bench")
        for c in clusters.values():
            await batch(c, args.route, 50)  # connections, prepared statements
        conn = await dbmod.connect(url)
        try:
            for r in range(args.rounds):
                row = {}
                for k in ("off", "on") if r % 2 == 0 else ("on", "off"):
                    if args.route == "run":
                        await conn.execute("DELETE FROM queue")
                    srv = psutil.Process(clusters[k].procs[0].pid)
                    s0, p0, c0, t0 = _cpu(srv), pg_cpu(tmp / "pg"), self_cpu(), time.perf_counter()
                    await batch(clusters[k], args.route, args.jobs)
                    s1, p1, c1, t1 = _cpu(srv), pg_cpu(tmp / "pg"), self_cpu(), time.perf_counter()
                    row[k] = {"server": 1000 * (s1 - s0) / args.jobs, "postgres": 1000 * (p1 - p0) / args.jobs,
                              "client": 1000 * (c1 - c0) / args.jobs, "per_s": args.jobs / (t1 - t0)}
                rounds.append(row)
                print(f"round {r + 1}: " + "   ".join(
                    f"{k}: server {v['server']:.2f} ms, postgres {v['postgres']:.2f} ms, client {v['client']:.2f} ms,"
                    f" {v['per_s']:.0f}/s" for k, v in row.items()), flush=True)
        finally:
            await conn.close()
    finally:
        for c in clusters.values():
            c.stop()
        pg.cleanup()
        drop_scratch(tmp)
    return {"route": args.route, "jobs": args.jobs, "rounds": rounds}


def report(res: dict) -> str:
    lines = [f"CPU per submitted job ({res['route']}/preview, {res['jobs']} jobs a batch, off = "
             "SANDMILL_SUBMIT_BATCH=0 SANDMILL_FAST_SUBMIT=0), median of the rounds:"]
    for what in ("server", "postgres", "client"):
        off = statistics.median(r["off"][what] for r in res["rounds"])
        on = statistics.median(r["on"][what] for r in res["rounds"])
        lines.append(f"  {what:9s} off {off:6.2f} ms   on {on:6.2f} ms")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--jobs", type=int, default=1000)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--route", default="run", choices=["run", "run_wait_result"])
    ap.add_argument("--quick", action="store_true", help="a small run (100 jobs, 2 rounds)")
    args = ap.parse_args()
    if args.quick:
        args.jobs, args.rounds = min(args.jobs, 100), min(args.rounds, 2)
    print(report(asyncio.run(run(args))))


if __name__ == "__main__":
    main()
