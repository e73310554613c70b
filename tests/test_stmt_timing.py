"""The worker's statement timing (worker/stmt_timing.py): its buckets, its report, what the
ping does with the report (merged into the worker row's info), and that server/metrics.py
reads the report as sent."""

from __future__ import annotations

import time
import uuid

from sandmill.server.metrics import _statement_latency
from sandmill.store import db as dbmod
from sandmill.store import workers
from sandmill.worker.stmt_timing import BOUNDS_MS, CLAIM, COMPLETE, StatementTiming


def _observe(t: StatementTiming, name: str, ms: float) -> None:
    t.add(name, time.perf_counter() - ms / 1000)  # as if it began ``ms`` ago


def test_a_statement_lands_in_the_first_bucket_at_or_above_its_time():
    t = StatementTiming()
    assert t.report() is None  # nothing timed: the ping leaves info alone
    _observe(t, CLAIM, 0.1)
    _observe(t, CLAIM, 3.0)
    _observe(t, CLAIM, 60_000.0)
    rep = t.report()
    assert list(rep) == [CLAIM]
    h = rep[CLAIM]
    assert h["bounds_ms"] == list(BOUNDS_MS) and len(h["counts"]) == len(BOUNDS_MS) + 1
    assert h["counts"][0] == 1 and h["counts"][BOUNDS_MS.index(5)] == 1 and h["counts"][-1] == 1
    assert sum(h["counts"]) == 3 and h["sum_ms"] >= 60_003


def test_the_metrics_read_the_report_as_sent_and_sum_a_groups_workers():
    a, b = StatementTiming(), StatementTiming()
    _observe(a, COMPLETE, 0.4)
    _observe(b, COMPLETE, 0.4)
    _observe(b, CLAIM, 7.0)
    rows = [{"worker_group": "g", "info": {"statement_latency": a.report()}},
            {"worker_group": "g", "info": {"statement_latency": b.report()}}]
    fam, = _statement_latency(rows)
    got = {(s.name, s.labels["statement"], s.labels.get("le")): s.value for s in fam.samples}
    assert got[("sandmill_worker_statement_duration_seconds_count", COMPLETE, None)] == 2
    assert got[("sandmill_worker_statement_duration_seconds_bucket", COMPLETE, "0.0005")] == 2
    assert got[("sandmill_worker_statement_duration_seconds_bucket", COMPLETE, "0.00025")] == 0
    assert got[("sandmill_worker_statement_duration_seconds_bucket", CLAIM, "0.01")] == 1
    assert got[("sandmill_worker_statement_duration_seconds_bucket", CLAIM, "0.005")] == 0


async def test_the_ping_merges_the_report_into_info_and_keeps_the_rest(pg_url):
    conn = await dbmod.connect(pg_url)
    name = f"timing-{uuid.uuid4().hex[:8]}"
    try:
        await workers.register(conn, name=name, group="g", hostname="h", tags=["t"], backend="process",
                               subworkers=1, info={"cpus": 2})
        ping = dict(tags=["t"], jobs_done=0, busy=0, occupancy=0.0)
        await workers.ping(conn, name, **ping)  # nothing timed yet: info as registered
        assert await conn.fetchval("SELECT info FROM worker WHERE name = $1", name) == {"cpus": 2}
        t = StatementTiming()
        _observe(t, CLAIM, 1.5)
        await workers.ping(conn, name, **ping, statement_latency=t.report())
        _observe(t, CLAIM, 1.5)
        await workers.ping(conn, name, **ping, statement_latency=t.report())  # replaces, not adds
        info = await conn.fetchval("SELECT info FROM worker WHERE name = $1", name)
        assert info["cpus"] == 2 and sum(info["statement_latency"][CLAIM]["counts"]) == 2
        await workers.ping(conn, name, **ping)  # a ping without a report keeps the last one
        info = await conn.fetchval("SELECT info FROM worker WHERE name = $1", name)
        assert sum(info["statement_latency"][CLAIM]["counts"]) == 2
    finally:
        await workers.unregister(conn, name)
        await conn.close()
