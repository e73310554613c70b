"""Few PostgreSQL connections per worker process: a worker holds two backends (LISTEN, and
one connection for every statement) whatever its subworker count, idle and draining, and
its wake-ups, heartbeats, log appends and cancels still work through that one connection;
the connection comes back after it was lost."""

from __future__ import annotations

import asyncio
import time
import uuid

from sandmill.profiles import profile_from_dict
from sandmill.store import db as dbmod
from sandmill.store import queue
from sandmill.worker.dbconn import DbConn
from sandmill.worker.settings import WorkerSettings
from sandmill.worker.worker import Worker

_BACKENDS = "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1"


async def _wait(check, timeout: float = 30.0, every: float = 0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = await check()
        if got:
            return got
        await asyncio.sleep(every)
    raise AssertionError(f"not true within {timeout} s: {check}")


def _native(pg_url: str, group: str, tag: str, subworkers: int) -> Worker:
    return Worker(profile_from_dict({"name": group, "tags": [tag], "native": True, "subworkers": subworkers}),
                  pg_url, settings=WorkerSettings(poll_s=30.0))


async def _backends(pool, w: Worker) -> int:
    return await pool.fetchval(_BACKENDS, w.app_name)


async def test_a_worker_of_25_subworkers_holds_two_backends_idle_and_draining(pg_url):
    tag = "conn-" + uuid.uuid4().hex[:6]
    pool = await dbmod.create_pool(pg_url)
    w = _native(pg_url, "conns" + tag[-6:], tag, 25)
    run = asyncio.create_task(w.run())
    try:
        await _wait(lambda: _backends(pool, w))  # it has connected
        await asyncio.sleep(0.3)
        idle = await _backends(pool, w)
        # a burst: every slot busy, claims ahead, completions batched
        ids = [await queue.push(pool, workspace="w", language="sleep", content="", args={"seconds": 0.02}, tag=tag)
               for _ in range(400)]
        seen = []

        async def all_done():
            seen.append(await _backends(pool, w))
            return await pool.fetchval("SELECT count(*) FROM completed_job WHERE id = ANY($1::uuid[])", ids) == len(ids)
        await _wait(all_done, every=0.02)
    finally:
        w.stop()
        await asyncio.wait_for(run, 20)
        await pool.close()
    assert idle == 2, idle
    assert max(seen) <= 2 and min(seen) >= 1, seen


async def test_listen_wakes_an_idle_worker_at_once(pg_url):
    """poll_s is 30 s: a job that runs within a second was woken by the NOTIFY."""
    tag = "connw-" + uuid.uuid4().hex[:6]
    pool = await dbmod.create_pool(pg_url)
    w = _native(pg_url, "connw" + tag[-6:], tag, 4)
    run = asyncio.create_task(w.run())
    try:
        await _wait(lambda: _backends(pool, w))
        await asyncio.sleep(0.3)  # every slot in its idle wait
        for _ in range(3):
            t0 = time.monotonic()
            job = await queue.push(pool, workspace="w", language="noop", content="", args={}, tag=tag)
            await _wait(lambda: queue.get_completed(pool, "w", job), timeout=10, every=0.01)
            assert time.monotonic() - t0 < 2.0
    finally:
        w.stop()
        await asyncio.wait_for(run, 20)
        await pool.close()


async def test_heartbeats_logs_and_cancel_under_load_on_one_connection(pg_url, tmp_path):
    """Eight bash jobs that print while they run past the heartbeat, beside a stream of
    no-op jobs: their logs are stored, their heartbeats land, and one canceled is killed;
    the worker holds two backends throughout."""
    tag = "connl-" + uuid.uuid4().hex[:6]
    group = "connl" + tag[-6:]
    profile = profile_from_dict({"name": group, "tags": [tag], "subworkers": 12,
                                 "backend": {"kind": "process"},
                                 "limits": {"wall_s": 60}})
    w = Worker(profile, pg_url, settings=WorkerSettings(poll_s=30.0, job_ping_s=0.2))
    pool = await dbmod.create_pool(pg_url)
    run = asyncio.create_task(w.run())
    try:
        await _wait(lambda: _backends(pool, w))
        script = "for i in $(seq 1 20); do echo line-$i; sleep 0.1; done"
        long = [await queue.push(pool, workspace="w", language="bash", content=script, args={}, tag=tag)
                for _ in range(8)]
        victim = await queue.push(pool, workspace="w", language="bash", content="echo started; sleep 30",
                                  args={}, tag=tag)
        noops = [await queue.push(pool, workspace="w", language="noop", content="", args={}, tag=tag)
                 for _ in range(200)]
        await _wait(lambda: pool.fetchval(
            "SELECT last_ping > started_at + interval '0.3 s' FROM queue WHERE id = $1 AND running", victim))
        assert await queue.cancel(pool, "w", victim, "admin", "test") == "canceling"
        seen = []

        async def all_done():
            seen.append(await _backends(pool, w))
            n = await pool.fetchval("SELECT count(*) FROM completed_job WHERE id = ANY($1::uuid[])",
                                    [*long, victim, *noops])
            return n == len(long) + 1 + len(noops)
        await _wait(all_done, timeout=60)
        for job in long:
            assert (await queue.get_completed(pool, "w", job))["status"] == "success"
            text, _ = await queue.get_logs(pool, job)
            assert text.count("line-") == 20 and "line-20" in text
        assert (await queue.get_completed(pool, "w", victim))["status"] == "canceled"
        assert max(seen) <= 2, seen
    finally:
        w.stop()
        await asyncio.wait_for(run, 30)
        await pool.close()


async def test_the_connection_comes_back_after_it_was_lost(pg_url):
    """Its backend terminated: the next statement fails as an outage (the caller retries,
    as with a pool), the one after reconnects and runs on_connect again."""
    prepared = []

    async def on_connect(conn):
        prepared.append(await conn.fetchval("SELECT pg_backend_pid()"))

    c = DbConn(pg_url, app_name="sandmill-test-conn", on_connect=on_connect)
    admin = await dbmod.connect(pg_url)
    try:
        await c.open()
        assert await c.fetchval("SELECT current_setting('application_name')") == "sandmill-test-conn"
        pid = await c.fetchval("SELECT pg_backend_pid()")
        assert prepared == [pid]
        await admin.execute("SELECT pg_terminate_backend($1)", pid)
        await asyncio.sleep(0.2)
        try:
            await c.fetchval("SELECT 1")
        except Exception as e:  # noqa: BLE001 - whichever error, it must read as an outage
            assert dbmod.is_disconnect(e), e
        assert await c.fetchval("SELECT 2") == 2
        assert c.opened == 2 and len(prepared) == 2 and prepared[1] != pid
        # statements of many tasks at once take the connection in turn
        got = await asyncio.gather(*(c.fetchval("SELECT $1::int", i) for i in range(50)))
        assert got == list(range(50))
    finally:
        await c.close()
        await admin.close()


async def test_the_claim_and_completion_statements_are_prepared_on_the_connection(pg_url):
    """The one connection ran the claim and completion statements at start: their first
    use in a burst looks up no types (20 ms of asyncpg's introspection otherwise)."""
    tag = "connp-" + uuid.uuid4().hex[:6]
    w = _native(pg_url, "connp" + tag[-6:], tag, 2)
    run = asyncio.create_task(w.run())
    try:
        await _wait(lambda: asyncio.sleep(0, result=w.pool is not None and w.pool.opened))
        conn = await w.pool.acquire()
        try:
            ran: list[str] = []
            conn.add_query_logger(lambda r: ran.append(r.query))
            await queue.complete_and_pull(conn, [], w.name, w.tags, 0)
            await queue.pull_many(conn, w.name, w.tags, 0)
            assert ran and not [q for q in ran if "typeinfo" in q], ran
        finally:
            await w.pool.release(conn)
    finally:
        w.stop()
        await asyncio.wait_for(run, 20)


async def test_a_statement_canceled_midway_leaves_the_connection_to_the_next(pg_url):
    """A job's heartbeat or log flush is canceled when the job ends, maybe mid-statement:
    the next caller gets the same connection, usable at once."""
    c = DbConn(pg_url)
    try:
        await c.open()
        for i in range(3):
            t = asyncio.create_task(c.fetchval("SELECT pg_sleep(5)"))
            await asyncio.sleep(0.1)
            t.cancel()
            t0 = time.monotonic()
            assert await c.fetchval("SELECT $1::int", i) == i
            assert time.monotonic() - t0 < 2.0
        assert c.opened == 1
    finally:
        await c.close()


async def test_a_job_end_waits_for_the_log_write_in_hand_instead_of_dropping_it():
    """The flusher took lines and waits for the connection (here: a store that answers in
    0.3 s) when the job ends: those lines are stored, before the rest, not dropped."""
    from sandmill.worker.logs import LogSink

    stored: list[str] = []

    class SlowStore:
        async def append_logs(self, _db, _job_id, chunks):
            await asyncio.sleep(0.3)
            stored.extend(chunks)

    sink = LogSink(None, uuid.uuid4(), SlowStore())
    sink.on_output("stdout", b"first\n")
    sink._wake.set()  # flush now: the write is in hand
    await asyncio.sleep(0.05)
    sink.on_output("stdout", b"second\n")
    await sink.close()
    assert "".join(stored) == "first\nsecond\n", stored


def test_a_dedicated_worker_process_holds_two_backends(make_cluster):
    """The dedicated worker is the same Worker with its own loop: the same two backends,
    idle and after a burst of its script's jobs."""
    from support import wait_done

    c = make_cluster()
    ws, path = "w" + uuid.uuid4().hex[:6], "ded" + uuid.uuid4().hex[:6]
    name = "dedc-" + uuid.uuid4().hex[:6]
    with c.client() as api:
        r = api.post(f"/api/w/{ws}/scripts/create", json={"path": path, "content": "def main(x):\n    return x\n",
                                                          "language": "python3", "dedicated_worker": True})
        assert r.status_code == 201, r.text
        c.start_worker(profile_text=f'name: {name}\ndedicated_workers: ["{ws}:{path}"]\nbackend: {{kind: process}}\n'
                                    'subworkers: 8\nlimits: {wall_s: 20, memory_mb: 128}\n')
        c.wait_workers(name)

        async def count() -> int:
            conn = await dbmod.connect(c.db_url)
            try:
                return await conn.fetchval(_BACKENDS, f"sandmill-worker {name}")
            finally:
                await conn.close()

        idle = asyncio.run(count())
        ids = [api.post(f"/api/w/{ws}/jobs/run/p/{path}", json={"x": i}).text.strip('"') for i in range(40)]
        for jid in ids:
            assert wait_done(api, ws, jid, timeout=60)["success"], c.logs()
        busy = asyncio.run(count())
    assert idle == 2 and busy == 2, (idle, busy)
