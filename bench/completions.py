"""Completion statements of short jobs: one slot, a backlog of native ``sleep`` jobs pushed
at once, the worker in this process; jobs per completion statement, CPU ms per job of the
worker (this process) and of PostgreSQL, jobs/s, with a short job's completion sent alone
(``SANDMILL_SHARE_SHORT_COMPLETIONS=0``, "off") and waiting for the next one ("on"),
alternating. See docs/performance.md, "Round 3: the worker's CPU per job".

    python -m bench.completions [--jobs 600] [--job-ms 1] [--rounds 2] [--cover-s 0.005] [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time
import uuid
from pathlib import Path

import psutil

from sandmill.profiles import profile_from_dict
from sandmill.store import db as dbmod
from sandmill.store import embedded, queue
from sandmill.worker.settings import WorkerSettings
from sandmill.worker.worker import Worker

from .common import count_completion_batches, count_done, drop_scratch, scratch_dir

SWITCH = "SANDMILL_SHARE_SHORT_COMPLETIONS"


def pg_cpu_s(pg_dir: Path) -> float:
    """CPU seconds so far of the PostgreSQL processes under ``pg_dir``."""
    total = 0.0
    for p in psutil.process_iter(["cmdline"]):
        if str(pg_dir) in " ".join(p.info["cmdline"] or ()):
            try:
                t = p.cpu_times()
                total += t.user + t.system + t.children_user + t.children_system
                for c in p.children(recursive=True):
                    t = c.cpu_times()
                    total += t.user + t.system
            except psutil.Error:
                pass
    return total


async def drain(url: str, pool, pg_dir: Path, jobs: int, job_s: float, cover_s: float, share: bool) -> dict:
    """Push ``jobs`` sleep jobs of a fresh tag, run a one-slot worker over them; figures."""
    tag = "cmp-" + uuid.uuid4().hex[:8]
    ids = [await queue.push(pool, workspace="bench", language="sleep", content="",
                            args={"seconds": job_s}, tag=tag) for _ in range(jobs)]
    os.environ[SWITCH] = "1" if share else "0"  # read when the worker's slots are made
    w = Worker(profile_from_dict({"name": "cmp", "tags": [tag], "native": True}), url,
               settings=WorkerSettings(poll_s=1.0, claim_ahead_cover_s=cover_s))
    sizes = count_completion_batches(w)
    c0, p0, t0 = time.process_time(), pg_cpu_s(pg_dir), time.perf_counter()
    run = asyncio.create_task(w.run())
    try:
        while await count_done(pool, ids) < jobs:
            await asyncio.sleep(0.05)
        t1, c1, p1 = time.perf_counter(), time.process_time(), pg_cpu_s(pg_dir)
    finally:
        w.stop()
        await asyncio.wait_for(run, 30)
    return {"share": share, "jobs_per_statement": sum(sizes) / max(1, len(sizes)),
            "worker_ms": (c1 - c0) * 1000 / jobs, "postgres_ms": (p1 - p0) * 1000 / jobs,
            "jobs_per_s": jobs / (t1 - t0)}


async def run(args: argparse.Namespace) -> list[dict]:
    pgserver = embedded.import_pgserver()
    tmp = scratch_dir()
    pg = pgserver.get_server(tmp / "pg", cleanup_mode="delete")
    url = pg.get_uri()
    before = os.environ.get(SWITCH)
    out = []
    try:
        await dbmod.migrate_url(url)
        pool = await dbmod.create_pool(url)
        try:
            for _ in range(args.rounds):
                for share in (False, True):
                    out.append(await drain(url, pool, tmp / "pg", args.jobs, args.job_ms / 1000,
                                           args.cover_s, share))
        finally:
            await pool.close()
    finally:
        if before is None:
            os.environ.pop(SWITCH, None)
        else:
            os.environ[SWITCH] = before
        pg.cleanup()
        drop_scratch(tmp)
    return out


def report(rows: list[dict], args: argparse.Namespace) -> str:
    lines = [f"completions of short jobs: {args.jobs} native sleep jobs of {args.job_ms:g} ms, one slot,"
             f" claim_ahead_cover_s {args.cover_s:g}"]
    for r in rows:
        lines.append(f"  {'on ' if r['share'] else 'off'}  {r['jobs_per_statement']:5.2f} jobs a statement"
                     f"   worker {r['worker_ms']:.3f} ms   postgres {r['postgres_ms']:.3f} ms CPU a job"
                     f"   {r['jobs_per_s']:6.0f} jobs/s")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--jobs", type=int, default=600)
    ap.add_argument("--job-ms", type=float, default=1.0, help="each job's sleep")
    ap.add_argument("--rounds", type=int, default=2, help="off/on pairs, alternating")
    ap.add_argument("--cover-s", type=float, default=0.005, help="claim_ahead_cover_s (the default)")
    ap.add_argument("--quick", action="store_true", help="one round of 150 jobs")
    args = ap.parse_args()
    if args.quick:
        args.jobs, args.rounds = min(args.jobs, 150), 1
    print(report(asyncio.run(run(args)), args))


if __name__ == "__main__":
    main()
