"""The server's and PostgreSQL's share per submitted job: concurrent submits share one
INSERT and one commit (server/submit_batch.py, store/sql/jobs.sql push_many), with every
caller's answer as its own insert would give it."""

from __future__ import annotations

import asyncio
import uuid

import asyncpg
import httpx
from sandmill.server import submit_batch
from sandmill.store import db as dbmod
from sandmill.store import jobs as store_jobs


def _job(ws: str, tag: str, **kw) -> dict:
    return {"workspace": ws, "language": "bash", "content": "echo 1\n", "args": {"n": 1},
            "tag": tag, "kind": "preview", **kw}


async def _with_pool(pg_url, fn):
    pool = await dbmod.create_pool(pg_url, min_size=1, max_size=4)
    try:
        return await fn(pool)
    finally:
        await pool.close()


def test_push_many_queues_in_order_in_one_transaction_and_notifies_once_per_payload(pg_url):
    ws, tag = "ws" + uuid.uuid4().hex[:8], "t" + uuid.uuid4().hex[:8]

    async def go(pool):
        listener = await dbmod.connect(pg_url)
        got: list[str] = []
        await listener.add_listener("sandmill_queue", lambda *a: got.append(a[3]))
        try:
            jobs = [_job(ws, tag, job_id=uuid.uuid4()) for _ in range(4)]
            jobs.append(_job(ws, tag, job_id=uuid.uuid4(), scheduled_in_secs=600))
            ids = await store_jobs.push_many(pool, jobs)
            await asyncio.sleep(0.3)  # the notifications' delivery
            rows = await pool.fetch("SELECT id, xmin::text AS x, args, scheduled_for > now() AS later"
                                    " FROM queue WHERE workspace = $1 ORDER BY seq", ws)
        finally:
            await listener.close()
        return ids, rows, got

    ids, rows, got = asyncio.run(_with_pool(pg_url, go))
    assert [r["id"] for r in rows] == ids  # seq follows the order given
    assert len({r["x"] for r in rows}) == 1  # one transaction
    assert [r["later"] for r in rows] == [False] * 4 + [True]
    assert all(r["args"] == {"n": 1} for r in rows)
    mine = [p for p in got if p.split("|")[0] == tag]
    assert sorted(mine, key=len)[0] == tag and len(mine) == 2, got  # 'tag' once, 'tag|epoch' once
    assert "|" in sorted(mine, key=len)[1]


def test_submits_in_the_same_loop_turn_share_one_statement(pg_url):
    ws = "ws" + uuid.uuid4().hex[:8]

    async def go(pool):
        b = submit_batch.SubmitBatcher(pool)
        ids = await asyncio.gather(*(b.push(**_job(ws, "nobody")) for _ in range(10)))
        xs = await pool.fetch("SELECT DISTINCT xmin::text FROM queue WHERE workspace = $1", ws)
        return b.statements, ids, len(xs)

    statements, ids, txns = asyncio.run(_with_pool(pg_url, go))
    assert statements == 1 and txns == 1 and len(set(ids)) == 10


def test_a_value_postgresql_refuses_fails_its_own_submit_only(pg_url):
    ws = "ws" + uuid.uuid4().hex[:8]

    async def go(pool):
        b = submit_batch.SubmitBatcher(pool)
        # an interval past PostgreSQL's range: the INSERT fails (class 22) for this job
        subs = [_job(ws, "nobody", scheduled_in_secs=1e300 if i == 2 else 0) for i in range(5)]
        got = await asyncio.gather(*(b.push(**j) for j in subs), return_exceptions=True)
        n = await pool.fetchval("SELECT count(*) FROM queue WHERE workspace = $1", ws)
        return got, n

    got, n = asyncio.run(_with_pool(pg_url, go))
    assert isinstance(got[2], asyncpg.PostgresError) and got[2].sqlstate.startswith("22")
    assert all(isinstance(g, uuid.UUID) for i, g in enumerate(got) if i != 2)
    assert n == 4


def test_concurrent_http_submits_share_transactions_and_each_gets_its_answer(make_cluster):
    c = make_cluster()
    ws, n = "ws" + uuid.uuid4().hex[:8], 100
    body = {"content": "echo 1\n", "language": "bash", "tag": "nobody-" + ws}

    async def go():
        conn = await dbmod.connect(c.env["DATABASE_URL"])
        # The first insert waits on this lock while the others come in behind it: they share
        # statements however slowly this host's client sends them.
        held = conn.transaction()
        await held.start()
        await conn.execute("LOCK TABLE queue IN SHARE MODE")
        async with c.async_client(limits=httpx.Limits(max_connections=20)) as h:
            bad = h.post(f"/api/w/{ws}/jobs/run/preview", json=body, params={"scheduled_in_secs": 1e300})
            sent = asyncio.gather(bad, *(h.post(f"/api/w/{ws}/jobs/run/preview", json=body)
                                         for _ in range(n)))
            for _ in range(500):
                if sent.done() or await conn.fetchval(
                        "SELECT count(*) FROM pg_locks WHERE NOT granted AND relation = 'queue'::regclass"):
                    break
                await asyncio.sleep(0.02)
            await asyncio.sleep(0.3)
            await held.rollback()
            rs = await sent
        try:
            txns = await conn.fetchval("SELECT count(DISTINCT xmin::text) FROM queue WHERE workspace = $1", ws)
            rows = await conn.fetchval("SELECT count(*) FROM queue WHERE workspace = $1", ws)
        finally:
            await conn.close()
        return rs, txns, rows

    rs, txns, rows = asyncio.run(go())
    assert rs[0].status_code == 400 and "error" in rs[0].json(), rs[0].text
    assert all(r.status_code == 201 for r in rs[1:]), [r.text for r in rs[1:] if r.status_code != 201]
    assert len({r.text for r in rs[1:]}) == n and rows == n
    assert txns < n, "every submit had a transaction of its own"


def test_batching_off_is_a_statement_per_job(make_cluster):
    """SANDMILL_SUBMIT_BATCH=0 (before/after runs): one INSERT per submit, as before."""
    c = make_cluster(env={"SANDMILL_SUBMIT_BATCH": "0"})
    ws = "ws" + uuid.uuid4().hex[:8]
    body = {"content": "echo 1\n", "language": "bash", "tag": "nobody-" + ws}

    async def go():
        async with c.async_client(limits=httpx.Limits(max_connections=20)) as h:
            await asyncio.gather(*(h.post(f"/api/w/{ws}/jobs/run/preview", json=body) for _ in range(30)))
        conn = await dbmod.connect(c.env["DATABASE_URL"])
        try:
            return await conn.fetchval("SELECT count(DISTINCT xmin::text) FROM queue WHERE workspace = $1", ws)
        finally:
            await conn.close()

    assert asyncio.run(go()) == 30


def test_the_submit_bench_runs_quick():
    """python -m bench.submit --quick (the figures of docs/performance.md, at a small size)."""
    import subprocess
    import sys

    from support import REPO

    p = subprocess.run([sys.executable, "-m", "bench.submit", "--quick"], cwd=REPO, capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "round 2:" in p.stdout and "server    off" in p.stdout and "postgres  off" in p.stdout
