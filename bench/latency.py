"""Per-job overhead: submit->result latency (p50, p95) of a trivial job on one worker, and
jobs per second over a batch, beside the bare cost of starting the same interpreter on
the same machine in the same run.

    python -m bench.latency [--backend process|nsjail|docker] [--language python3|bash]
                            [--jobs 200] [--latency-runs 50] [--cold] [--quick]
                            [--profile PATH] [--workdir-root DIR] [--client raw|httpx]
                            [--gaps]

Over the throughput batch it also reports the CPU ms per job of each process (psutil):
the server, the worker, the sandbox (every process under the worker: nsjail, warm
interpreters and the job processes they reaped), PostgreSQL (postmaster and backends)
and the bench's own client, which submits the batch and the latency runs on the same cores
(bench/rawhttp.py by default; ``--client httpx`` as before, about 2-4 ms of CPU a request).
Kernel threads (e.g. a network namespace's teardown) are not counted.

python3 jobs on process and nsjail fork from a warm interpreter by default; --cold runs
each in a fresh interpreter (the backend option ``warm: false``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import statistics
import subprocess
import time
from pathlib import Path

import httpx
import psutil

from sandmill.store import db as dbmod
from sandmill.store import embedded
from sandmill.localcluster import LocalCluster

from . import rawhttp
from .common import count_done, drop_scratch, last_done_at, scratch_dir
from .gaps import GapTrace, ms_line

TRIVIAL = {"python3": "def main():\n    return 1\n", "bash": "echo 1\n"}
BARE = {"python3": ["/usr/bin/python3", "-c", "pass"], "bash": ["/bin/bash", "-c", "echo 1"]}
TARGET_OVERHEAD_MS = 25.0


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


async def bare_start(argv: list[str], runs: int) -> list[float]:
    """Wall ms of starting the interpreter and waiting for it, ``runs`` times."""
    out = []
    for _ in range(runs):
        t0 = time.perf_counter()
        p = await asyncio.create_subprocess_exec(*argv, stdout=asyncio.subprocess.DEVNULL)
        await p.wait()
        out.append((time.perf_counter() - t0) * 1000)
    return out


async def latency(cluster: LocalCluster, language: str, runs: int, client: str = "raw") -> list[float]:
    """Wall ms of each of ``runs`` run_wait_result calls, one after the other (after 5 to
    warm up). ``client``: "raw" (bench/rawhttp.py) or "httpx" (its own 1.7-3.9 ms of CPU a
    request were in each figure before session 13)."""
    body = {"content": TRIVIAL[language], "language": language}
    if client == "raw":
        return await rawhttp.time_each(cluster.base, "/api/w/bench/jobs/run_wait_result/preview",
                                       json.dumps(body).encode(),
                                       {"Authorization": f"Bearer {cluster.token}"}, runs)
    out = []
    async with cluster.async_client() as c:
        for _ in range(5):  # warm up connections and caches
            await c.post("/api/w/bench/jobs/run_wait_result/preview", json=body)
        for _ in range(runs):
            t0 = time.perf_counter()
            r = await c.post("/api/w/bench/jobs/run_wait_result/preview", json=body)
            out.append((time.perf_counter() - t0) * 1000)
            assert r.status_code == 200, r.text
    return out


async def throughput(cluster: LocalCluster, language: str, jobs: int, client: str = "raw") -> float:
    """Jobs per second: submit ``jobs`` at once (20 at a time over the HTTP API), until the
    last one's completion (its commit time in the database, on the same host's clock: the
    50 ms poll that sees it would add up to 50 ms to a batch of 0.3-1 s). ``client``: "raw" (bench/rawhttp.py, a few tens of us of CPU a
    request) or "httpx" (1.7-3.9 ms a request here: the client's CPU competed with what it
    measured on the same 2 cores; the figures before session 12 used it)."""
    body = {"content": TRIVIAL[language], "language": language}
    path = "/api/w/bench/jobs/run/preview"
    t0 = time.time()
    if client == "raw":
        ids = [i.decode() for i in await rawhttp.post_many(
            cluster.base, path, json.dumps(body).encode(),
            {"Authorization": f"Bearer {cluster.token}"}, jobs, concurrency=20)]
    else:
        async with cluster.async_client(limits=httpx.Limits(max_connections=20)) as c:
            sem = asyncio.Semaphore(20)

            async def submit() -> str:
                async with sem:
                    return (await c.post(path, json=body)).text

            ids = await asyncio.gather(*(submit() for _ in range(jobs)))
    conn = await dbmod.connect(cluster.db_url)
    try:
        while await count_done(conn, ids) < jobs:
            await asyncio.sleep(0.05)
        t1 = float(await last_done_at(conn, ids))
    finally:
        await conn.close()
    return jobs / (t1 - t0)


def _cpu(p: psutil.Process, reaped: bool = True) -> float:
    """CPU seconds of ``p``, with those of its children it has reaped when ``reaped``."""
    try:
        t = p.cpu_times()
    except psutil.Error:
        return 0.0
    return t.user + t.system + ((t.children_user + t.children_system) if reaped else 0.0)


def cpu_by_process(cluster: LocalCluster, pg_dir: Path) -> dict[str, float]:
    """CPU seconds so far of the server, the worker, its sandbox processes and PostgreSQL."""
    server, worker = (psutil.Process(p.pid) for p in cluster.procs[:2])
    out = {"server": _cpu(server), "worker": _cpu(worker, reaped=False)}
    try:
        t = worker.cpu_times()
        out["sandbox"] = t.children_user + t.children_system  # reaped cold sandboxes
        out["sandbox"] += sum(_cpu(c) for c in worker.children(recursive=True))
    except psutil.Error:
        out["sandbox"] = 0.0
    pg = [p for p in psutil.process_iter(["cmdline"])
          if str(pg_dir) in " ".join(p.info["cmdline"] or ())]
    out["postgres"] = sum(_cpu(p) + sum(_cpu(c) for c in p.children(recursive=True)) for p in pg)
    return out


def start_profile(cluster: LocalCluster, path: str) -> subprocess.Popen:
    """py-spy sampling the worker process (native frames, 500 Hz, raw collapsed stacks to
    ``path``) over the throughput batch: where the worker's own CPU per job goes."""
    worker = cluster.procs[1].pid
    spy = subprocess.Popen(["py-spy", "record", "--native", "-r", "500", "--format", "raw",
                            "-o", path, "--pid", str(worker)],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(1.0)  # py-spy attaches before the batch starts
    return spy


def stop_profile(spy: subprocess.Popen) -> None:
    spy.send_signal(signal.SIGINT)  # py-spy writes its file on SIGINT
    try:
        spy.wait(30)
    except subprocess.TimeoutExpired:
        spy.kill()


async def warm_share(cluster: LocalCluster, language: str) -> float:
    """Share of the completed ``language`` jobs that ran warm (Outcome.warm)."""
    conn = await dbmod.connect(cluster.db_url)
    try:
        v = await conn.fetchval(
            "SELECT avg(CASE WHEN (outcome->>'warm')::bool THEN 1.0 ELSE 0.0 END)"
            " FROM completed_job WHERE language = $1", language)
    finally:
        await conn.close()
    return float(v or 0.0)


async def run(args: argparse.Namespace) -> dict:
    pgserver = embedded.import_pgserver()

    tmp = scratch_dir()
    pg = pgserver.get_server(tmp / "pg", cleanup_mode="delete")
    url = pg.get_uri()
    await dbmod.migrate_url(url)
    cluster = LocalCluster(url, tmp / "cluster")
    try:
        cluster.start_server()
        opts = {**({"warm": False} if args.cold else {}),
                **({"workdir_root": args.workdir_root} if args.workdir_root else {})}
        cluster.start_worker("bench", tags="python3, bash", backend=args.backend,
                             backend_options=opts or None)
        cluster.wait_workers("bench")
        bare = await bare_start(BARE[args.language], args.latency_runs)
        lat = await latency(cluster, args.language, args.latency_runs, args.client)
        spy = start_profile(cluster, args.profile) if args.profile else None
        # the job program's name in the kernel's events is the language's (bash)
        trace = GapTrace(args.language, tmp / "gaps.data") if args.gaps else None
        cpu0 = {**cpu_by_process(cluster, tmp / "pg"), "bench client": _cpu(psutil.Process(), reaped=False)}
        jps = await throughput(cluster, args.language, args.jobs, args.client)
        cpu1 = {**cpu_by_process(cluster, tmp / "pg"), "bench client": _cpu(psutil.Process(), reaped=False)}
        if spy is not None:
            stop_profile(spy)
        gaps = trace.stop() if trace is not None else None
        cpu = {k: (cpu1[k] - cpu0[k]) * 1000 / args.jobs for k in cpu0}
        warm = await warm_share(cluster, args.language)
    finally:
        cluster.stop()
        pg.cleanup()
        drop_scratch(tmp)
    return {"backend": args.backend + (" (cold)" if args.cold else ""), "language": args.language, "bare": bare, "latency": lat, "jobs_per_s": jps,
            "jobs": args.jobs, "warm_share": warm, "cpu_ms_per_job": cpu, "gaps": gaps}


def report(r: dict) -> str:
    bare50, lat50, lat95 = statistics.median(r["bare"]), pct(r["latency"], 50), pct(r["latency"], 95)
    over = lat50 - bare50
    lines = [
        f"sandmill per-job overhead: {r['language']} on the {r['backend']} backend, one worker",
        f"  bare interpreter start   p50 {bare50:7.1f} ms   p95 {pct(r['bare'], 95):7.1f} ms   ({len(r['bare'])} runs)",
        f"  submit -> result         p50 {lat50:7.1f} ms   p95 {lat95:7.1f} ms   ({len(r['latency'])} runs)",
        f"  overhead above bare      p50 {over:7.1f} ms   (target <= {TARGET_OVERHEAD_MS:.0f} ms:"
        f" {'met' if over <= TARGET_OVERHEAD_MS else 'NOT met'})",
        f"  throughput               {r['jobs_per_s']:7.1f} jobs/s over {r['jobs']} jobs",
        f"  ran warm                 {100 * r['warm_share']:7.1f} % of the jobs (a fork of a warm interpreter)",
        "  CPU per job (batch)      " + "   ".join(f"{k} {v:.2f} ms" for k, v in r["cpu_ms_per_job"].items())
        + f"   total {sum(r['cpu_ms_per_job'].values()):.2f} ms",
        "  for scale: Windmill publishes ~50 ms overhead per standard job (~65 ms per Python job in its CI)",
    ]
    if r.get("gaps") is not None:
        g = r["gaps"]
        lines += [f"  the program's run        {ms_line(g['runs_ms'])}   (exec -> exit, {len(g['runs_ms'])} jobs)",
                  f"  the gap between jobs     {ms_line(g['gaps_ms'])}   (an exit -> the next exec)"]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backend", default="process", choices=["process", "nsjail", "docker"])
    ap.add_argument("--language", default="python3", choices=["python3", "bash"])
    ap.add_argument("--jobs", type=int, default=200)
    ap.add_argument("--latency-runs", type=int, default=50)
    ap.add_argument("--cold", action="store_true", help="a fresh interpreter per job (warm: false)")
    ap.add_argument("--workdir-root", metavar="DIR",
                    help="the backend's workdir_root (e.g. a tmpfs: /dev/shm/sandmill-jobs)")
    ap.add_argument("--profile", metavar="PATH",
                    help="py-spy the worker over the batch (raw collapsed stacks to PATH)")
    ap.add_argument("--client", default="raw", choices=["raw", "httpx"],
                    help="the HTTP client of the batch and the latency runs (raw: bench/rawhttp.py; "
                         "httpx: as before session 12, for the latency runs before session 13)")
    ap.add_argument("--gaps", action="store_true",
                    help="bash: the program's own run against the gap between jobs over the batch "
                         "(perf's exec/exit tracepoints; needs perf and root; bench/gaps.py)")
    ap.add_argument("--quick", action="store_true", help="a small run (40 jobs, 10 latency runs)")
    args = ap.parse_args()
    if args.quick:
        args.jobs, args.latency_runs = min(args.jobs, 40), min(args.latency_runs, 10)
    print(report(asyncio.run(run(args))))


if __name__ == "__main__":
    main()
