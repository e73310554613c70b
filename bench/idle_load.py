"""Idle load: how many transactions an idle cluster (server + a default worker + a native
worker, no jobs) commits per second, read from pg_stat_database. The target is under 5.

    python -m bench.idle_load [--seconds 30] [--database-url URL]

Without --database-url (or DATABASE_URL) it starts an embedded PostgreSQL in a temporary
directory, so the figure counts sandmill's own transactions only.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
import time
import uuid
from pathlib import Path

from sandmill.store import db as dbmod
from sandmill.store import embedded
from sandmill.localcluster import LocalCluster
from sandmill.profiles import shipped

TARGET_TX_PER_S = 5.0
_COMMITS = "SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()"


async def measure_commits_per_s(database_url: str, seconds: float) -> float:
    """Committed transactions per second in this database over ``seconds``, not counting
    the two reads this measure makes itself."""
    conn = await dbmod.connect(database_url)
    try:
        before = await conn.fetchval(_COMMITS)
        t0 = time.monotonic()
        await asyncio.sleep(seconds)
        await conn.execute("SELECT pg_stat_clear_snapshot()")
        after = await conn.fetchval(_COMMITS)
        elapsed = time.monotonic() - t0
    finally:
        await conn.close()
    return max(0, after - before - 2) / elapsed


IDLE_WORKER_PROCESSES = 2  # start_idle_cluster's: a default and a native worker


async def idle_backends(database_url: str) -> dict:
    """The idle cluster's PostgreSQL backends by application_name ('sandmill-server',
    'sandmill-worker GROUP'), and the workers' backends per worker process."""
    from .dbload import backends_by_app

    conn = await dbmod.connect(database_url, app_name="sandmill-bench-probe")
    try:
        by_app = await backends_by_app(conn)
    finally:
        await conn.close()
    workers = sum(n for app, n in by_app.items() if app.startswith("sandmill-worker "))
    return {"by_app": by_app, "total": sum(by_app.values()), "server": by_app.get("sandmill-server", 0),
            "workers": workers, "worker_processes": IDLE_WORKER_PROCESSES,
            "per_worker_process": workers / IDLE_WORKER_PROCESSES}


def start_idle_cluster(c: LocalCluster) -> None:
    """The cluster whose idle load is measured: server, a default and a native worker."""
    c.start_server()
    c.spawn("worker", "--profile", str(shipped("default")))
    c.spawn("worker", "--profile", str(shipped("native")))
    c.wait_workers("default")
    c.wait_workers("native")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=30)
    ap.add_argument("--database-url", default=os.environ.get("DATABASE_URL"))
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="sandmill-idle-") as tmp:
        pg = None
        url = args.database_url
        if not url:
            pgserver = embedded.import_pgserver()

            os.chmod(tmp, 0o755)
            pg = pgserver.get_server(Path(tmp) / "pg", cleanup_mode="stop")
            url = pg.get_uri()
        c = LocalCluster(url, Path(tmp) / "cluster", token=uuid.uuid4().hex)
        try:
            start_idle_cluster(c)
            # PostgreSQL publishes an idle backend's pending counters up to 10 s late: wait,
            # so that the start-up burst does not land inside the window.
            time.sleep(11)
            rate = asyncio.run(measure_commits_per_s(url, args.seconds))
            backends = asyncio.run(idle_backends(url))
        finally:
            c.stop()
            if pg is not None:
                pg.cleanup()
    verdict = "ok" if rate < TARGET_TX_PER_S else "OVER TARGET"
    print(f"| idle cluster (server + default + native worker), {args.seconds:g} s "
          f"| {rate:.2f} committed tx/s | target < {TARGET_TX_PER_S:g} | {verdict} |")
    print(f"| backends | {backends['total']} in all: server {backends['server']}, workers {backends['workers']}"
          f" ({backends['per_worker_process']:g} per worker process) | {backends['by_app']} |")
    return 0 if rate < TARGET_TX_PER_S else 1


if __name__ == "__main__":
    raise SystemExit(main())
