"""The cost of concurrency limits: jobs per second through one contended key and through
no key, on the same native worker, in one run.

    python -m bench.concurrency [--jobs 1000] [--subworkers 8] [--limit 4]
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path

import httpx

from sandmill.store import db as dbmod
from sandmill.store import embedded
from sandmill.localcluster import LocalCluster
from .common import count_done

NATIVE = "name: cbench\ntags: [cbench]\nnative: true\nsubworkers: {sub}\n"


async def drain(cluster: LocalCluster, path: str, jobs: int) -> float:
    """Submit ``jobs`` runs of script ``path`` while no worker serves them, then start
    timing when the worker starts pulling; returns jobs/s."""
    async with cluster.async_client(limits=httpx.Limits(max_connections=20)) as c:
        sem = asyncio.Semaphore(20)

        async def submit() -> str:
            async with sem:
                r = await c.post(f"/api/w/bench/jobs/run/p/{path}", json={"value": 1})
                return r.text

        ids = await asyncio.gather(*(submit() for _ in range(jobs)))
    conn = await dbmod.connect(cluster.db_url)
    try:
        t0 = time.perf_counter()
        await conn.execute("UPDATE queue SET tag = 'cbench' WHERE id = ANY($1::uuid[])", ids)
        await conn.execute("NOTIFY sandmill_queue, 'cbench'")
        while await count_done(conn, ids) < jobs:
            await asyncio.sleep(0.02)
        return jobs / (time.perf_counter() - t0)
    finally:
        await conn.close()


async def run(args: argparse.Namespace) -> dict[str, float]:
    pgserver = embedded.import_pgserver()

    tmp = Path(tempfile.mkdtemp(prefix="sandmill-cbench-"))
    tmp.chmod(0o755)
    pg = pgserver.get_server(tmp / "pg", cleanup_mode="delete")
    await dbmod.migrate_url(pg.get_uri())
    cluster = LocalCluster(pg.get_uri(), tmp / "cluster")
    out = {}
    try:
        cluster.start_server()
        cluster.start_worker(profile_text=NATIVE.format(sub=args.subworkers))
        cluster.wait_workers("cbench")
        with cluster.client() as c:
            # jobs are queued under a parking tag and moved to the worker's tag at once
            for body in ({"path": "nokey", "language": "noop", "content": "", "tag": "parked"},
                         {"path": "keyed", "language": "noop", "content": "", "tag": "parked",
                          "concurrent_limit": args.limit, "concurrency_key": "one-key"}):
                assert c.post("/api/w/bench/scripts/create", json=body).status_code == 201
        for _ in range(args.rounds):
            out.setdefault("no key", []).append(await drain(cluster, "nokey", args.jobs))
            out.setdefault(f"one key, limit {args.limit}", []).append(await drain(cluster, "keyed", args.jobs))
    finally:
        cluster.stop()
        pg.cleanup()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--jobs", type=int, default=1000)
    ap.add_argument("--subworkers", type=int, default=8)
    ap.add_argument("--limit", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    res = asyncio.run(run(args))
    base = sorted(res["no key"])[len(res["no key"]) // 2]
    print(f"concurrency limits: {args.jobs} no-op native jobs, one worker with {args.subworkers} subworkers,"
          f" {args.rounds} rounds (median, min-max)")
    for name, xs in res.items():
        xs = sorted(xs)
        med = xs[len(xs) // 2]
        print(f"  {name:<20} {med:8.1f} jobs/s  ({xs[0]:.1f}-{xs[-1]:.1f})   {med / base:5.2f}x of no key")


if __name__ == "__main__":
    main()
