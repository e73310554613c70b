"""The peer: pgqueuer (a PostgreSQL job queue for Python) draining no-op jobs on the same
PostgreSQL, shaped like its own benchmark's "drain" strategy (pgqueuer's tools/benchmark.py,
which its wheel does not ship): enqueue N jobs in one call, then time consumers, each a
QueueManager on its own asyncpg connection running in drain mode with dequeue batches of
10 (its defaults: 5 consumers, batch 10), until the queue is empty.

    python -m bench.pgq [--jobs 5000] [--consumers 5] [--batch 10]
"""

from __future__ import annotations

import argparse
import asyncio
import time


async def pgqueuer_drain(url: str, jobs: int, consumers: int = 5, batch: int = 10) -> dict:
    """Install pgqueuer's schema in the database at ``url`` (if missing), queue ``jobs``
    no-op jobs, drain them; returns jobs/s of the drain, from the first dequeue to the
    consumers' exit on an empty queue (and, for comparison, from their start)."""
    import asyncpg
    from pgqueuer.db import AsyncpgDriver
    from pgqueuer.qm import QueueManager
    from pgqueuer.queries import Queries
    from pgqueuer.types import QueueExecutionMode

    setup = await asyncpg.connect(url)
    try:
        q = Queries(AsyncpgDriver(setup))
        if not await q.has_table("pgqueuer"):
            await q.install()
        await q.clear_queue()
        await q.enqueue(["noop"] * jobs, [None] * jobs, [0] * jobs)
        conns = [await asyncpg.connect(url) for _ in range(consumers)]
        done = 0
        first_dequeue: list[float] = []

        class TimedQueries(Queries):
            """Notes when the first dequeue is sent: the drain is timed from there, as
            sandmill's is from the commit that its idle, already started workers see.
            Each QueueManager's own start (schema check, LISTEN) comes before: 200-350 ms on
            this machine, 7-10% of a 5,000-job drain."""

            async def dequeue(self, *a, **kw):
                if not first_dequeue:
                    first_dequeue.append(time.monotonic())
                return await super().dequeue(*a, **kw)

        async def consume(conn) -> None:
            nonlocal done
            qm = QueueManager(TimedQueries(AsyncpgDriver(conn)))

            @qm.entrypoint("noop")
            async def noop(job) -> None:
                nonlocal done
                done += 1

            await qm.run(batch_size=batch, mode=QueueExecutionMode.drain)

        t0 = time.monotonic()
        await asyncio.gather(*(consume(c) for c in conns))
        t_end = time.monotonic()
        elapsed = t_end - first_dequeue[0]
        left = sum(x.count for x in await q.queue_size() if x.status == "queued")
        for c in conns:
            await c.close()
    finally:
        await setup.close()
    return {"jobs": jobs, "done": done, "left": left, "consumers": consumers, "batch": batch,
            "drain_s": elapsed, "jobs_per_s": jobs / elapsed,
            "start_s": first_dequeue[0] - t0, "jobs_per_s_with_start": jobs / (t_end - t0)}


def main() -> None:
    from .common import BenchPG

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--jobs", type=int, default=5000)
    ap.add_argument("--consumers", type=int, default=5)
    ap.add_argument("--batch", type=int, default=10)
    a = ap.parse_args()
    bp = BenchPG()
    try:
        url = bp.database("pgq")
        r = asyncio.run(pgqueuer_drain(url, a.jobs, a.consumers, a.batch))
        print(r)
    finally:
        bp.close()


if __name__ == "__main__":
    main()
