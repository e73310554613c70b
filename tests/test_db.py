"""Migrations and the queue SQL against the real PostgreSQL."""

from __future__ import annotations

import asyncio
import os
import uuid

from sandmill.store import db as dbmod
from sandmill.store import queue


async def _fresh_db(pg_server) -> str:
    name = "mig_" + uuid.uuid4().hex[:8]
    admin = await dbmod.connect(pg_server.get_uri())
    await admin.execute(f'CREATE DATABASE "{name}"')
    await admin.close()
    return pg_server.get_uri(name)


async def test_migrations_twice_and_concurrently(pg_server):
    url = await _fresh_db(pg_server)
    conns = [await dbmod.connect(url) for _ in range(3)]
    results = await asyncio.gather(*(dbmod.migrate(c) for c in conns))
    # exactly one of the racing processes applied each migration
    applied = sorted(v for r in results for v in r)
    assert applied == [v for v, _, _ in dbmod.migrations()]
    assert await dbmod.migrate(conns[0]) == []  # and again: nothing to do
    rows = await conns[0].fetch("SELECT version FROM sandmill_migrations ORDER BY version")
    assert [r["version"] for r in rows] == applied
    for c in conns:
        await c.close()


async def test_pull_is_one_claim_per_job_under_racing_pullers(pg_url):
    pool = await dbmod.create_pool(pg_url, max_size=8)
    tag = "race-" + uuid.uuid4().hex[:6]
    ids = {await queue.push(pool, workspace="w", language="bash", content="", args={}, tag=tag)
           for _ in range(40)}

    async def puller(i: int) -> list:
        got = []
        while (j := await queue.pull(pool, f"w{i}", [tag])) is not None:
            got.append(j["id"])
        return got

    claims = [x for lst in await asyncio.gather(*(puller(i) for i in range(8))) for x in lst]
    assert sorted(claims) == sorted(ids)  # every job claimed exactly once
    await pool.close()


async def test_pull_order_priority_then_submission_and_due_time(pg_url):
    pool = await dbmod.create_pool(pg_url)
    tag = "ord-" + uuid.uuid4().hex[:6]
    push = lambda **kw: queue.push(pool, workspace="w", language="bash", content="", args={}, tag=tag, **kw)  # noqa: E731
    later = await push(priority=100, scheduled_in_secs=30)
    a = await push()
    b = await push(priority=5)
    c = await push()
    d = await push(priority=5)
    order = []
    while (j := await queue.pull(pool, "w", [tag])) is not None:
        order.append(j["id"])
    assert order == [b, d, a, c]  # later is not due yet
    assert (await queue.next_due(pool, [tag])) is not None
    assert later not in order
    await pool.close()


async def test_complete_only_by_the_holder_and_once(pg_url):
    pool = await dbmod.create_pool(pg_url)
    tag = "cmp-" + uuid.uuid4().hex[:6]
    jid = await queue.push(pool, workspace="w", language="bash", content="", args={}, tag=tag)
    assert (await queue.pull(pool, "me", [tag]))["id"] == jid
    kw = dict(status="success", result=1, error=None, duration_ms=1, cpu_ms=1, mem_peak_kb=1, outcome=None)
    assert await queue.complete(pool, jid, "someone-else", **kw) is None
    assert await queue.complete(pool, jid, "me", **kw) == "success"
    assert await queue.complete(pool, jid, "me", **kw) is None
    assert (await queue.get_job(pool, "w", jid))["type"] == "CompletedJob"
    await pool.close()


async def test_pull_many_claims_best_first_up_to_a_keyed_job(pg_url):
    pool = await dbmod.create_pool(pg_url)
    tag = "many-" + uuid.uuid4().hex[:6]
    push = lambda **kw: queue.push(pool, workspace="w", language="noop", content="", args={}, tag=tag, **kw)  # noqa: E731
    low = [await push() for _ in range(3)]
    high = await push(priority=9)
    keyed = await push(priority=50, concurrency_key="k", concurrent_limit=1)
    assert await queue.pull_many(pool, "w1", [tag], 3) == []  # the batch stops at a keyed job
    one = await queue.pull(pool, "w1", [tag])
    assert one["id"] == keyed  # the one-job pull takes it, with its key's slot
    got = await queue.pull_many(pool, "w1", [tag], 3)
    assert [j["id"] for j in got] == [high, low[0], low[1]]  # best first
    await pool.close()


async def test_complete_many_gives_back_every_slot_of_a_key(pg_url):
    pool = await dbmod.create_pool(pg_url)
    tag = "cm-" + uuid.uuid4().hex[:6]
    key = "key-" + tag
    ids = [await queue.push(pool, workspace="w", language="noop", content="", args={}, tag=tag,
                            concurrency_key=key, concurrent_limit=2) for _ in range(3)]
    a, b = await queue.pull(pool, "w", [tag]), await queue.pull(pool, "w", [tag])
    assert await queue.pull(pool, "w", [tag]) is None  # the key is full
    done = await queue.complete_many(pool, [
        queue.Completion(a["id"], "w", "success", [1, {"x": 2}], None),
        queue.Completion(b["id"], "w", "failure", {"error": {"name": "E", "message": "m"}}, "E: m"),
        queue.Completion(ids[2], "w", "success", 1, None),  # not running: left alone
    ])
    assert done == {a["id"]: "success", b["id"]: "failure"}
    assert await pool.fetchval("SELECT running FROM concurrency_key WHERE key = $1", key) == []
    assert (await queue.get_job(pool, "w", a["id"]))["result"] == [1, {"x": 2}]
    assert (await queue.pull(pool, "w", [tag]))["id"] == ids[2]
    await pool.close()


def test_the_embedded_postgresql_starts_without_a_runtime_dir_warning(tmp_path):
    """As root, in a service or in CI there is no XDG_RUNTIME_DIR: pgserver's import made
    platformdirs print a RuntimeDirWarning (two lines on stderr) on every `sandmill up` and
    benchmark run."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "XDG_RUNTIME_DIR"}
    code = "from sandmill.store import embedded; print(embedded.import_pgserver().__name__)"
    p = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert p.returncode == 0 and p.stdout.strip() == "pgserver", p.stderr
    assert "Warning" not in p.stderr, p.stderr
