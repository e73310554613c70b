"""The hot path of a busy worker: completion and next claim in one statement, claims that
read the queue in order whatever the statistics say, and idle slots that share one
next_due read."""

from __future__ import annotations

import asyncio
import datetime as dt
import time
import uuid

from sandmill.store import db as dbmod
from sandmill.store import queue
from sandmill.profiles import profile_from_dict
from sandmill.worker.worker import Worker

from support import recreate_database


def _push(pool, tag: str, **kw):
    return queue.push(pool, workspace="w", language="noop", content="", args={}, tag=tag, **kw)


def _done(job_id: uuid.UUID, worker: str = "w1") -> queue.Completion:
    return queue.Completion(job_id, worker, "success", {"ok": 1}, None)


async def test_complete_and_pull_completes_and_claims_in_one_statement(pg_url):
    pool = await dbmod.create_pool(pg_url)
    tag = "cap-" + uuid.uuid4().hex[:6]
    ids = [await _push(pool, tag) for _ in range(4)]
    (first,) = await queue.pull_many(pool, "w1", [tag], 1)
    statuses, jobs = await queue.complete_and_pull(pool, [_done(first["id"])], "w1", [tag], 2)
    assert statuses == {first["id"]: "success"}
    assert [j["id"] for j in jobs] == ids[1:3]  # the next two, in order, now running as w1's
    assert all(j["running"] and j["worker"] == "w1" for j in jobs)
    assert (await queue.get_job(pool, "w", first["id"]))["type"] == "CompletedJob"
    # a job that is not this worker's is left alone; want 0 claims nothing
    statuses, jobs = await queue.complete_and_pull(pool, [_done(ids[1], "w2")], "w1", [tag], 0)
    assert statuses == {} and jobs == []
    # nothing left to claim: the completions still go through
    statuses, jobs = await queue.complete_and_pull(
        pool, [_done(ids[1]), _done(ids[2])], "w1", [tag], 5)
    assert statuses == {ids[1]: "success", ids[2]: "success"}
    assert [j["id"] for j in jobs] == [ids[3]]
    await pool.close()


async def test_complete_and_pull_stops_at_a_keyed_job(pg_url):
    """A keyed job is claimed by pull() alone (its slot); jobs behind it must not pass it."""
    pool = await dbmod.create_pool(pg_url)
    tag = "capk-" + uuid.uuid4().hex[:6]
    key = "k-" + tag
    running = await _push(pool, tag, priority=9)
    (r,) = await queue.pull_many(pool, "w1", [tag], 1)
    assert r["id"] == running
    before = await _push(pool, tag, priority=5)
    keyed = await _push(pool, tag, priority=5, concurrency_key=key, concurrent_limit=1)
    after = await _push(pool, tag, priority=5)
    statuses, jobs = await queue.complete_and_pull(pool, [_done(running)], "w1", [tag], 3)
    assert statuses == {running: "success"}
    assert [j["id"] for j in jobs] == [before]  # up to the keyed job, not past it
    assert (await queue.pull(pool, "w1", [tag]))["id"] == keyed  # with its key's slot
    assert await pool.fetchval("SELECT running FROM concurrency_key WHERE key = $1", key) == [keyed]
    statuses, jobs = await queue.complete_and_pull(pool, [_done(before)], "w1", [tag], 3)
    assert [j["id"] for j in jobs] == [after]
    await pool.close()


async def _fresh_db(pg_server) -> str:
    url = await recreate_database(pg_server, "claims_" + uuid.uuid4().hex[:8])
    await dbmod.migrate_url(url)
    return url


async def _cand_plan(conn, sql: str, tags: list[str]) -> str:
    """The plan of a claim's candidate scan (rolled back: EXPLAIN ANALYZE claims)."""
    bases, plain, pairs = queue.split_tags(tags)
    tr = conn.transaction()
    await tr.start()
    try:
        rows = await conn.fetch("EXPLAIN ANALYZE " + sql, bases, "w", plain, pairs, 8)
    finally:
        await tr.rollback()
    text = "\n".join(r[0] for r in rows)
    return text[text.index("CTE cand"):text.index("CTE claimed")]


async def test_claims_read_the_queue_in_order_without_statistics(pg_server):
    """A burst of waiting jobs in a queue PostgreSQL has no statistics for: the claim must
    read the pull indexes in order and stop, not sort every waiting row per claim."""
    url = await _fresh_db(pg_server)
    pool = await dbmod.create_pool(url, max_size=1, settings=queue.CLAIM_SETTINGS)
    async with pool.acquire() as conn:
        await conn.execute(
            "INSERT INTO queue (id, workspace, kind, language, content, tag)"
            " SELECT gen_random_uuid(), 'w', 'preview', 'noop', '', (ARRAY['a','b','c','d'])[1 + i % 4]"
            "   FROM generate_series(1, 8000) i")
        one = await _cand_plan(conn, queue._PULL_MANY_ONE_TAG, ["a"])
        assert "Index Scan using queue_pull_idx" in one and "Sort" not in one, one
        many = await _cand_plan(conn, queue._PULL_MANY, ["a", "b", "c"])
        assert "Index Scan using queue_pull_order_idx" in many and "Sort" not in many, many
        got = await queue.pull_many(conn, "w", ["a", "b", "c"], 3)
        assert [j["seq"] for j in got] == [1, 2, 4]  # pull order (seq 3 is tag d's)
    await pool.close()


async def test_worker_connections_plan_the_claim_and_completion_once(pg_url):
    """PostgreSQL plans the first five runs of a prepared statement on a connection anew;
    on the worker's connections (CLAIM_SETTINGS) the claim and completion statements must
    use their one generic plan from the first run: planning the completion and claim
    statement costs 1.5-6 ms, paid on every run by a connection that runs it rarely."""
    pool = await dbmod.create_pool(pg_url, max_size=1, settings=queue.CLAIM_SETTINGS)
    tag = "gp-" + uuid.uuid4().hex[:6]
    for _ in range(8):
        await _push(pool, tag)
    async with pool.acquire() as conn:
        await queue.prepare_worker_statements(conn, "w1", [tag])
        (job,) = await queue.pull_many(conn, "w1", [tag], 1)
        for _ in range(4):
            _, (job,) = await queue.complete_and_pull(conn, [_done(job["id"])], "w1", [tag], 1)
        rows = await conn.fetch("SELECT statement, generic_plans, custom_plans FROM pg_prepared_statements"
                                " WHERE statement LIKE '%cand AS%'")
    await pool.close()
    assert rows
    assert all(r["custom_plans"] == 0 and r["generic_plans"] >= 1 for r in rows), \
        [(r["statement"][:60], r["generic_plans"], r["custom_plans"]) for r in rows]


def _literal(v) -> str:
    if isinstance(v, list):
        return "ARRAY[" + ",".join(_literal(x) for x in v) + "]" if v else "'{}'"
    if v is None:
        return "NULL"
    if isinstance(v, int):
        return str(v)
    return "'" + str(v).replace("'", "''") + "'"


async def test_completion_looks_jobs_up_by_key_after_analyze(pg_server):
    """Mid-drain, after (auto)ANALYZE has seen few running rows, the completion must still
    find its jobs by primary key: not scan queue_running_idx, which holds an entry for
    every job run since the last vacuum (a plan the generic plan of a busy worker's
    prepared statement kept for the rest of the drain)."""
    url = await _fresh_db(pg_server)
    pool = await dbmod.create_pool(url, max_size=1, settings=queue.CLAIM_SETTINGS)
    async with pool.acquire() as conn:
        await conn.execute(
            "INSERT INTO queue (id, workspace, kind, language, content, tag)"
            " SELECT gen_random_uuid(), 'w', 'preview', 'noop', '', 't' FROM generate_series(1, 4000)")
        for _ in range(100):  # a drain in progress
            jobs = await queue.pull_many(conn, "w", ["t"], 8)
            await queue.complete_many(conn, [_done(j["id"], "w") for j in jobs])
        running = await queue.pull_many(conn, "w", ["t"], 8)
        await conn.execute("ANALYZE queue")
        await conn.execute("SET plan_cache_mode = force_generic_plan")
        await conn.execute("PREPARE done_p(uuid[], text[], text[], text[], text[], int[], int[], int[],"
                           " text[], timestamptz[]) AS " + queue._COMPLETE)
        args = queue._completion_arrays([_done(j["id"], "w") for j in running])
        types = ["uuid[]", "text[]", "text[]", "text[]", "text[]", "int[]", "int[]", "int[]", "text[]",
                 "timestamptz[]"]
        rows = await conn.fetch("EXPLAIN EXECUTE done_p("
                                + ", ".join(f"{_literal(a)}::{t}" for a, t in zip(args, types)) + ")")
        plan = "\n".join(r[0] for r in rows)
        gone = plan[plan.index("CTE gone"):plan.index("CTE released")]
        assert "queue_pkey" in gone and "queue_running_idx" not in gone, gone
        statuses = await queue.complete_many(conn, [_done(j["id"], "w") for j in running])
        assert len(statuses) == 8
    await pool.close()


async def test_idle_slots_share_one_next_due_read(monkeypatch):
    w = Worker(profile_from_dict({"name": "nd", "tags": ["nd"], "native": True}), "postgresql://unused")
    calls = []
    answer: list[dt.datetime | None] = [None]

    async def slow_next_due(_db, tags):
        calls.append(tags)
        await asyncio.sleep(0.01)  # every slot asks while the read is in flight
        return answer[0]

    monkeypatch.setattr(queue, "next_due", slow_next_due)
    wake = w.slots.wake
    assert await asyncio.gather(*(w.slots.next_due(wake) for _ in range(10))) == [None] * 10
    assert calls == [["nd"]]
    calls.clear()
    for _ in range(5):
        await w.slots.next_due(wake)  # the same wake-up: nothing new can be due sooner
    assert calls == []
    w.slots.wake_all()  # a NOTIFY: read again
    answer[0] = dt.datetime.fromtimestamp(time.time() + 0.05, dt.timezone.utc)
    assert await w.slots.next_due(w.slots.wake) == answer[0]
    assert await w.slots.next_due(w.slots.wake) == answer[0]
    assert len(calls) == 1
    await asyncio.sleep(0.06)  # that due time passed: read again
    await w.slots.next_due(w.slots.wake)
    assert len(calls) == 2


async def test_completion_notifies_only_jobs_someone_waits_on(pg_url):
    pool = await dbmod.create_pool(pg_url)
    tag = "nd-" + uuid.uuid4().hex[:6]
    heard: list[str] = []
    listener = await dbmod.connect(pg_url)
    await listener.add_listener(queue.CH_DONE, lambda _c, _p, _ch, payload: heard.append(payload))
    waited = await _push(pool, tag, notify_done=True)
    fire_and_forget = await _push(pool, tag)
    jobs = await queue.pull_many(pool, "w1", [tag], 2)
    assert {j["id"] for j in jobs} == {waited, fire_and_forget}
    statuses, _ = await queue.complete_and_pull(pool, [_done(waited), _done(fire_and_forget)],
                                                "w1", [tag], 1)
    assert statuses == {waited: "success", fire_and_forget: "success"}
    deadline = time.monotonic() + 5
    while str(waited) not in heard and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    await asyncio.sleep(0.1)  # time for a stray NOTIFY to arrive too
    assert heard == [str(waited)]
    await listener.close()
    await pool.close()


async def test_complete_and_pull_appends_the_logs_its_completions_carry(pg_url):
    """One statement per variant: $20 holds the completions' log texts ('' for a job
    without), or NULL when none carries logs; neither NULL nor '' appends a row."""
    pool = await dbmod.create_pool(pg_url)
    for tags in (["cl1-" + uuid.uuid4().hex[:6]], ["cl2-" + uuid.uuid4().hex[:6], "other"]):
        ids = [await _push(pool, tags[0]) for _ in range(4)]
        jobs = await queue.pull_many(pool, "w1", tags, 4)
        assert sorted(j["id"] for j in jobs) == sorted(ids)
        bare = [_done(ids[0]), _done(ids[1])]  # no logs: $20 is NULL
        statuses, _ = await queue.complete_and_pull(pool, bare, "w1", tags, 0)
        assert set(statuses) == set(ids[:2])
        logged = [_done(ids[2]), _done(ids[3])]
        logged[0].logs = "hello\n"  # the other one carries '' in the array
        statuses, _ = await queue.complete_and_pull(pool, logged, "w1", tags, 0)
        assert set(statuses) == set(ids[2:])
        rows = await pool.fetch("SELECT job_id, chunk FROM job_logs WHERE job_id = ANY($1::uuid[])", ids)
        assert [(r["job_id"], r["chunk"]) for r in rows] == [(ids[2], "hello\n")], tags
    await pool.close()
