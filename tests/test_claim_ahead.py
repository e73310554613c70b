"""Claim ahead: a busy slot claims its next job while the current one runs, from a
backlog only; the held job is running and ours but not started until it starts, goes
back to the queue if the current job runs long or the worker dies, and completes as
canceled without running if canceled while held."""

from __future__ import annotations

import asyncio
import datetime as dt
import contextlib
import uuid

from bench.common import count_batches, count_completion_batches
from sandmill.store import db as dbmod
from sandmill.store import queue
from sandmill.profiles import profile_from_dict
from sandmill.worker.batching import Batcher
from sandmill.worker.settings import WorkerSettings
from sandmill.worker.worker import Worker


def _push(pool, tag: str, language: str = "noop", args: dict | None = None):
    return queue.push(pool, workspace="w", language=language, content="", args=args or {}, tag=tag)


def _done(job_id: uuid.UUID, worker: str = "w1", duration_ms: int = 0) -> queue.Completion:
    return queue.Completion(job_id, worker, "success", None, None, duration_ms=duration_ms)


async def _row(pool, job_id):
    return await pool.fetchrow("SELECT running, worker, started_at, restarts FROM queue WHERE id = $1", job_id)


async def _held(pool, prefix: str) -> tuple[str, uuid.UUID]:
    """Two jobs of a fresh tag: the first runs on w1, whose completion of it claims the
    second ahead. Returns (the tag, the held job)."""
    tag = prefix + uuid.uuid4().hex[:6]
    a, b = await _push(pool, tag), await _push(pool, tag)
    await queue.pull_many(pool, "w1", [tag], 1)
    _, jobs = await queue.complete_and_pull(pool, [_done(a)], "w1", [tag], 0, ahead=1)
    assert [j["id"] for j in jobs] == [b]
    return tag, b


async def test_only_a_backlog_is_claimed_ahead_and_it_is_not_started(pg_url):
    pool = await dbmod.create_pool(pg_url)
    tag = "ca-" + uuid.uuid4().hex[:6]
    a, b = await _push(pool, tag), await _push(pool, tag)
    await asyncio.sleep(0.2)
    fresh = await _push(pool, tag)
    (first,) = await queue.pull_many(pool, "w1", [tag], 1)
    assert first["id"] == a and first["started_at"] is not None
    # two asked ahead: b has waited 0.2 s, the fresh job has not (an idle slot takes it)
    statuses, jobs = await queue.complete_and_pull(pool, [_done(a)], "w1", [tag], 0, ahead=2, ahead_after_s=0.1)
    assert statuses == {a: "success"}
    assert [j["id"] for j in jobs] == [b] and jobs[0]["started_at"] is None
    r = await _row(pool, b)
    assert r["running"] and r["worker"] == "w1" and r["started_at"] is None
    assert not (await _row(pool, fresh))["running"]
    # now-claims are not held back by age; the held job's start is stamped with them
    at = dt.datetime.now(dt.timezone.utc) - dt.timedelta(seconds=1)
    _, jobs = await queue.complete_and_pull(pool, [], "w1", [tag], 1, starting=[(b, at)])
    assert [j["id"] for j in jobs] == [fresh] and jobs[0]["started_at"] is not None
    # the worker's time of the start, not the statement's: two statements in flight may run
    # in either order, and the starts must keep the jobs' order
    assert (await _row(pool, b))["started_at"] == at
    await queue.complete_many(pool, [_done(b), _done(fresh)])
    await pool.close()


async def test_a_held_job_goes_back_without_counting_a_restart(pg_url):
    pool = await dbmod.create_pool(pg_url)
    tag, b = await _held(pool, "cab-")
    assert await queue.requeue(pool, b, "w1")  # the worker gives it back
    r = await _row(pool, b)
    assert (r["running"], r["worker"], r["restarts"]) == (False, None, 0)
    # held by a worker that dies: the monitor puts it back, no restart (it never ran),
    # even with no restarts allowed at all
    await queue.complete_and_pull(pool, [], "w1", [tag], 0, ahead=1)
    await pool.execute("UPDATE queue SET last_ping = now() - interval '1 hour' WHERE id = $1", b)
    done = await queue.requeue_stale(pool, ping_timeout_s=6, max_restarts=0)
    assert [(d["id"], d["action"]) for d in done] == [(b, "requeued")]
    r = await _row(pool, b)
    assert (r["running"], r["restarts"]) == (False, 0)
    await pool.close()


async def test_a_held_job_that_ends_before_its_start_stamp_gets_a_start(pg_url):
    pool = await dbmod.create_pool(pg_url)
    _, b = await _held(pool, "cac-")
    await queue.complete_many(pool, [_done(b, duration_ms=250)])
    span = await pool.fetchval(
        "SELECT extract(epoch FROM completed_at - started_at) FROM completed_job WHERE id = $1", b)
    assert 0.2 <= float(span) <= 5
    # with the start the worker saw, that one
    _, c = await _held(pool, "cac-")
    at = dt.datetime.now(dt.timezone.utc) - dt.timedelta(seconds=2)
    done = _done(c, duration_ms=250)
    done.started_at = at
    await queue.complete_many(pool, [done])
    assert await pool.fetchval("SELECT started_at FROM completed_job WHERE id = $1", c) == at
    await pool.close()


async def _wait(cond, timeout: float = 10):
    deadline = asyncio.get_running_loop().time() + timeout
    while not await cond():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.01)


@contextlib.asynccontextmanager
async def _serving(pg_url: str, tag: str, claim_ahead: bool = True, db_conns: int | None = None, **settings):
    """A one-slot native worker serving ``tag``, claiming ahead at once (no minimum wait)."""
    w = Worker(profile_from_dict({"name": "ahead", "tags": [tag], "native": True, "claim_ahead": claim_ahead}),
               pg_url, settings=WorkerSettings(**{"poll_s": 1.0, "claim_ahead_after_s": 0.0, **settings}),
               db_conns=db_conns)
    run = asyncio.create_task(w.run())
    try:
        yield w
    finally:
        w.stop()
        await asyncio.wait_for(run, 20)


def _started(pool, job_id):
    return lambda: pool.fetchval("SELECT started_at IS NOT NULL FROM queue WHERE id = $1", job_id)


def _all_done(pool, ids):
    return lambda: pool.fetchval("SELECT count(*) = $2 FROM completed_job WHERE id = ANY($1)", ids, len(ids))


async def test_a_busy_slot_holds_its_next_job_and_records_its_true_start(pg_url):
    """One slot, a backlog of 0.4 s jobs: while one runs the next is held (running, ours,
    not started); each job's started_at is when it started, not when it was claimed."""
    tag = "cad-" + uuid.uuid4().hex[:6]
    pool = await dbmod.create_pool(pg_url)
    ids = [await _push(pool, tag, "sleep", {"seconds": 0.4}) for _ in range(3)]
    async with _serving(pg_url, tag, claim_ahead_hold_s=5.0) as w:
        # the idle slot claims one to run and, a moment later, one to hold
        await _wait(_started(pool, ids[0]))
        await _wait(lambda: _is_held(w, ids[1]))
        r = await _row(pool, ids[1])
        assert r["running"] and r["worker"] == w.name and r["started_at"] is None
        await _wait(_started(pool, ids[1]))
        await asyncio.sleep(0.1)
        r = await _row(pool, ids[2])  # held while ids[1] runs
        assert r["running"] and r["worker"] == w.name and r["started_at"] is None
        assert ids[2] in w.held
        await _wait(_all_done(pool, ids))
    rows = {r["id"]: r for r in await pool.fetch(
        "SELECT id, started_at, completed_at FROM completed_job WHERE id = ANY($1)", ids)}
    for before, after in zip(ids, ids[1:]):
        gap = (rows[after]["started_at"] - rows[before]["completed_at"]).total_seconds()
        assert -0.1 < gap < 0.1, gap  # started as the one before ended, not at its claim
    await pool.close()


async def test_a_held_job_goes_back_when_the_current_one_runs_long(pg_url):
    tag = "cae-" + uuid.uuid4().hex[:6]
    pool = await dbmod.create_pool(pg_url)
    short = await _push(pool, tag, "sleep", {"seconds": 0.05})
    long = await _push(pool, tag, "sleep", {"seconds": 3})
    nxt = await _push(pool, tag)
    async with _serving(pg_url, tag, claim_ahead_hold_s=0.3):
        await _wait(_started(pool, long))
        # held while the long job starts, given back once it has run 0.3 s
        await _wait(lambda: pool.fetchval("SELECT NOT running FROM queue WHERE id = $1", nxt), timeout=2)
        assert (await _row(pool, nxt))["restarts"] == 0
        assert await pool.fetchval("SELECT running FROM queue WHERE id = $1", long)
        await _wait(_all_done(pool, [short, long, nxt]))
    await pool.close()


async def test_a_job_canceled_while_held_completes_canceled_without_running(pg_url):
    tag = "caf-" + uuid.uuid4().hex[:6]
    pool = await dbmod.create_pool(pg_url)
    await _push(pool, tag, "sleep", {"seconds": 0.05})
    await _push(pool, tag, "sleep", {"seconds": 1})
    held = await _push(pool, tag, "sleep", {"seconds": 10})
    # heartbeats far apart: only the worker's own note of the cancel can stop it in time
    async with _serving(pg_url, tag, claim_ahead_hold_s=5.0, job_ping_s=30.0) as w:
        await _wait(lambda: _is_held(w, held))
        assert await queue.cancel(pool, "w", held, "me", "not needed") == "canceling"
        await _wait(_all_done(pool, [held]), timeout=4)
    r = await pool.fetchrow("SELECT status, duration_ms FROM completed_job WHERE id = $1", held)
    assert r["status"] == "canceled" and r["duration_ms"] < 1000
    await pool.close()


async def _const(v):
    return v


async def _is_held(w: Worker, job_id) -> bool:
    return job_id in w.held


async def test_claim_ahead_off_in_the_profile_holds_nothing(pg_url):
    tag = "cag-" + uuid.uuid4().hex[:6]
    pool = await dbmod.create_pool(pg_url)
    ids = [await _push(pool, tag, "sleep", {"seconds": 0.3}) for _ in range(3)]
    async with _serving(pg_url, tag, claim_ahead=False):
        await _wait(_started(pool, ids[1]))
        assert not (await _row(pool, ids[2]))["running"]
        await _wait(_all_done(pool, ids))
    await pool.close()


async def test_lazy_requests_wait_for_company_unless_flushed():
    batches: list[list[int]] = []

    async def run(reqs):
        batches.append(list(reqs))
        return reqs

    b = Batcher(run, in_flight=2)
    futs = [b.enqueue(i, wait_s=0.05) for i in range(3)]
    await asyncio.sleep(0.01)
    assert batches == []  # still waiting for company
    assert await asyncio.gather(*futs) == [0, 1, 2]
    assert batches == [[0, 1, 2]]  # one statement for the three
    lazy = b.enqueue(3, wait_s=0.05)
    b.flush()  # its answer is wanted now
    assert await asyncio.wait_for(lazy, 0.02) == 3
    assert await asyncio.wait_for(b.enqueue(4), 0.02) == 4  # not lazy: at once
    assert batches[1:] == [[3], [4]]


async def test_a_request_queued_as_the_last_statement_ends_is_sent():
    """A request that arrives in the loop turn where the batcher's statement has ended but
    its task's done callbacks have not run yet is served (it was left waiting forever:
    every place looked taken, and no statement was started for it)."""
    b: Batcher
    late: list[asyncio.Future] = []

    async def run(reqs):
        if not late:  # runs before the drain task's done callbacks, in the same turn
            asyncio.get_running_loop().call_soon(lambda: late.append(b.enqueue("late")))
        return reqs

    b = Batcher(run, in_flight=1)
    assert await b.enqueue("first") == "first"
    await asyncio.sleep(0)
    assert late and await asyncio.wait_for(late[0], 1) == "late"


def test_the_api_shows_a_held_job_as_not_running():
    import datetime as dt

    from sandmill.server.views import _job_json

    row = {"type": "QueuedJob", "id": uuid.uuid4(), "workspace": "w", "kind": "script", "script_path": "f/x",
           "script_hash": "h", "language": "noop", "args": {}, "tag": "t", "priority": 0,
           "created_by": "admin", "created_at": dt.datetime.now(dt.timezone.utc),
           "scheduled_for": dt.datetime.now(dt.timezone.utc), "started_at": None, "worker": "w1",
           "running": True, "canceled": False, "canceled_by": None, "canceled_reason": None, "restarts": 0,
           "content": "", "status": None, "last_ping": None}
    assert _job_json(row, "")["running"] is False  # held ahead: the worker's, not started
    row["started_at"] = dt.datetime.now(dt.timezone.utc)
    assert _job_json(row, "")["running"] is True


async def test_completions_of_slots_that_run_their_next_job_share_a_statement(pg_url):
    """Four slots whose jobs end 10 ms apart: each slot already holds its next job, so its
    completion waits (lazy, 40 ms here) and the four go in one statement, not one each."""
    tag = "cah-" + uuid.uuid4().hex[:6]
    pool = await dbmod.create_pool(pg_url)
    ids = [await _push(pool, tag, "sleep", {"seconds": 0.1 + 0.01 * (i % 4)}) for i in range(12)]
    w = Worker(profile_from_dict({"name": "ahead", "tags": [tag], "native": True, "subworkers": 4}), pg_url,
               settings=WorkerSettings(poll_s=1.0, claim_ahead_after_s=0.0, completion_lazy_s=0.04))
    sizes = count_completion_batches(w)
    run = asyncio.create_task(w.run())
    try:
        await _wait(_all_done(pool, ids))
    finally:
        w.stop()
        await asyncio.wait_for(run, 20)
        await pool.close()
    assert max(sizes) >= 3, sizes


async def test_the_claim_and_completion_connections_are_ready_at_start(pg_url):
    """The pool layout (``SANDMILL_WORKER_DB_CONNS=0``): the connections a worker keeps for
    its claims and completions ran those statements at start: their first use in a burst
    looks up no types (asyncpg's introspection of uuid[] and int[], 20 ms a connection,
    would otherwise land on the first and the last jobs' path). The one-connection layout's
    own test: test_connections.py."""
    tag = "cap-" + uuid.uuid4().hex[:6]
    async with _serving(pg_url, tag, db_conns=0) as w:
        assert w.hot.keep > 0
        async def all_kept():
            return len(w.hot._free) == w.hot.keep
        await _wait(all_kept)
        conns = [await w.hot.acquire() for _ in range(w.hot.keep)]
        try:
            for conn in conns:
                ran: list[str] = []

                def log(record, ran=ran):
                    ran.append(record.query)
                conn.add_query_logger(log)
                await queue.complete_and_pull(conn, [], w.name, w.tags, 0)
                await queue.pull_many(conn, w.name, w.tags, 0)
                conn.remove_query_logger(log)
                assert ran and not [q for q in ran if "typeinfo" in q], ran
        finally:
            for conn in conns:
                await w.hot.release(conn, True)


def test_a_slot_holds_one_job_ahead_unless_jobs_are_very_short():
    w = Worker(profile_from_dict({"name": "depth", "tags": ["d"], "native": True}), "postgresql://unused",
               settings=WorkerSettings(claim_ahead_cover_s=0.005, claim_ahead_max=8))
    assert w.pace.depth() == 1  # nothing run yet
    for job_s, depth in [(0.1, 1), (0.003, 1), (0.002, 2), (0.001, 5), (0.0001, 8)]:
        w.pace.job_s = job_s
        assert w.pace.depth() == depth, job_s


def _count_asks(w: Worker) -> list[tuple[int, int]]:
    """(completions, jobs asked ahead) of each completion statement the worker sends."""
    asks: list[tuple[int, int]] = []
    complete_batch = w.feed.complete_batch

    async def counted(reqs):
        asks.append((len(reqs), sum(r.ahead for r in reqs)))
        return await complete_batch(reqs)

    w.feed.completer._run_batch = counted
    return asks


async def test_a_slot_with_very_short_jobs_holds_several_and_statements_carry_several(pg_url):
    """One slot, a backlog of no-op jobs: it holds several ahead and works through them
    while its completions are in flight, so one statement completes several jobs (with one
    held at a time, a lone slot's statements carry one or two). Every job runs once."""
    tag = "cai-" + uuid.uuid4().hex[:6]
    pool = await dbmod.create_pool(pg_url)
    async with pool.acquire() as conn, conn.transaction():
        ids = [await _push(conn, tag) for _ in range(300)]
    async with _serving(pg_url, tag, claim_ahead_hold_s=5.0) as w:
        asks = _count_asks(w)
        await _wait(_all_done(pool, ids))
    assert max(a for _, a in asks) > 1, asks
    assert sum(n for n, _ in asks) / len(asks) >= 3, asks
    rows = await pool.fetch("SELECT status, started_at FROM completed_job WHERE id = ANY($1)", ids)
    assert len(rows) == 300 and {r["status"] for r in rows} == {"success"}
    assert all(r["started_at"] is not None for r in rows)
    assert not await pool.fetchval("SELECT count(*) FROM queue WHERE tag = $1", tag)
    await pool.close()


async def _short_then_long(pool, tag: str, long_s: float) -> tuple[uuid.UUID, list[uuid.UUID]]:
    """40 no-op jobs (the slot learns its jobs are short), a long sleep, 20 no-ops behind
    it: (the long job, the jobs behind it)."""
    for _ in range(40):
        await _push(pool, tag)
    long = await _push(pool, tag, "sleep", {"seconds": long_s})
    return long, [await _push(pool, tag) for _ in range(20)]


def _held_of(pool, ids):
    return pool.fetchval("SELECT count(*) FROM queue WHERE id = ANY($1) AND running AND started_at IS NULL", ids)


def _given_back(pool, ids):
    """How many of ``ids`` wait in the queue again, with no restart counted."""
    return pool.fetchval("SELECT count(*) FROM queue WHERE id = ANY($1) AND NOT running AND restarts = 0", ids)


async def test_the_jobs_held_behind_a_long_one_all_go_back(pg_url):
    tag = "caj-" + uuid.uuid4().hex[:6]
    pool = await dbmod.create_pool(pg_url)
    long, behind = await _short_then_long(pool, tag, 2.0)
    async with _serving(pg_url, tag, claim_ahead_hold_s=0.5):
        await _wait(_started(pool, long))
        assert await _held_of(pool, behind) >= 2  # several held while it runs
        await asyncio.sleep(0.7)  # it has run past the hold time: every held job went back
        assert await _given_back(pool, behind) == len(behind)
        await _wait(_all_done(pool, [long, *behind]))
    await pool.close()


async def test_a_stopping_worker_gives_back_every_job_it_holds(pg_url):
    tag = "cak-" + uuid.uuid4().hex[:6]
    pool = await dbmod.create_pool(pg_url)
    long, behind = await _short_then_long(pool, tag, 0.6)
    async with _serving(pg_url, tag, claim_ahead_hold_s=5.0):
        await _wait(_started(pool, long))
        assert await _held_of(pool, behind) >= 2
    # the long job finished in the grace period; nothing is left held, nothing restarted
    assert await _given_back(pool, behind) == len(behind)
    assert await pool.fetchval("SELECT status FROM completed_job WHERE id = $1", long) == "success"
    await pool.close()


async def test_a_burst_runs_its_first_jobs_before_it_claims_those_to_hold(pg_url):
    """Idle slots woken by a backlog claim the jobs they run now in one statement, and
    those they hold in another that waits like a lazy completion: the first jobs do not
    wait for the held ones' claim."""
    tag = "cal-" + uuid.uuid4().hex[:6]
    pool = await dbmod.create_pool(pg_url)
    ids = [await _push(pool, tag, "sleep", {"seconds": 2}) for _ in range(4)]
    w = Worker(profile_from_dict({"name": "ahead", "tags": [tag], "native": True, "subworkers": 2}), pg_url,
               settings=WorkerSettings(poll_s=1.0, claim_ahead_after_s=0.0, completion_lazy_s=0.5,
                                       claim_ahead_hold_s=5.0))
    run = asyncio.create_task(w.run())
    try:
        await _wait(_started(pool, ids[1]))
        assert await _held_of(pool, ids) == 0 and not w.held  # claimed to run, none held yet
        async def both_held():
            return await _held_of(pool, ids[2:]) == 2
        await _wait(both_held, timeout=3)
    finally:
        w.stop()
        await asyncio.wait_for(run, 20)
    await pool.close()


async def test_a_slot_whose_job_ends_sends_the_claim_of_its_held_jobs_at_once(pg_url):
    """The claim of held jobs may wait for company, but not once a slot needs them."""
    tag = "cam-" + uuid.uuid4().hex[:6]
    pool = await dbmod.create_pool(pg_url)
    ids = [await _push(pool, tag) for _ in range(20)]
    async with _serving(pg_url, tag, completion_lazy_s=30.0):
        await _wait(_all_done(pool, ids), timeout=5)  # not a lazy wait of 30 s
    await pool.close()


async def test_a_slot_whose_completion_found_no_job_waits_for_a_wake_up(pg_url):
    """A completion claims the slot's next job; when it finds none, the slot does not claim
    again at once (at a drain's end every slot would, beside the last completions), and a
    job pushed later still wakes it."""
    tag = "can-" + uuid.uuid4().hex[:6]
    pool = await dbmod.create_pool(pg_url)
    async with _serving(pg_url, tag, poll_s=30.0) as w:
        claims = count_batches(w.feed.claims)
        await _wait(lambda: _const(bool(claims)))  # its first claim at start found nothing
        await asyncio.sleep(0.2)
        first = await _push(pool, tag)
        await _wait(_all_done(pool, [first]))
        await asyncio.sleep(0.3)
        # woken by the push, it claimed the job; the job's completion claimed the next one
        # and found none: no claim after that
        assert claims == [1, 1]
        later = await _push(pool, tag)
        await _wait(_all_done(pool, [later]))
    await pool.close()


async def test_a_stopping_worker_claims_nothing_more(pg_url):
    """A slot that waits because its last completion found no job, woken by the stop: it
    leaves without a claim (it used to claim a waiting job and run it on its way out)."""
    tag = "cas-" + uuid.uuid4().hex[:6]
    pool = await dbmod.create_pool(pg_url)
    async with _serving(pg_url, tag) as w:
        first = await _push(pool, tag)
        await _wait(_all_done(pool, [first]))
        await asyncio.sleep(0.2)  # the slot now waits for a wake-up (poll_s is 1 s)
        # a job that wakes no one (no NOTIFY): only a claim made at the stop would take it
        quiet = uuid.uuid4()
        await pool.execute("INSERT INTO queue (id, workspace, kind, language, content, tag)"
                           " VALUES ($1, 'w', 'script', 'noop', '', $2)", quiet, tag)
        claims = count_batches(w.feed.claims)
        w.stop()
    assert claims == []  # not even one whose job goes back: a wasted claim and requeue
    row = await pool.fetchrow("SELECT running, worker, restarts FROM queue WHERE id = $1", quiet)
    assert row is not None and (row["running"], row["worker"], row["restarts"]) == (False, None, 0)
    await pool.close()


async def test_a_job_claimed_as_the_worker_stops_goes_back_unstarted(pg_url):
    tag = "cat-" + uuid.uuid4().hex[:6]
    pool = await dbmod.create_pool(pg_url)
    async with _serving(pg_url, tag, poll_s=30.0) as w:
        await asyncio.sleep(0.3)  # idle: its first claim found nothing
        claim = w.feed.claims._run_batch

        async def stop_meanwhile(asks):
            answers = await claim(asks)
            w.stop()  # the stop comes while the claim is in flight
            return answers

        w.feed.claims._run_batch = stop_meanwhile
        job = await _push(pool, tag, "sleep", {"seconds": 0.2})
    assert not await pool.fetchval("SELECT EXISTS (SELECT 1 FROM completed_job WHERE id = $1)", job)
    row = await pool.fetchrow("SELECT running, worker, restarts FROM queue WHERE id = $1", job)
    assert (row["running"], row["worker"], row["restarts"]) == (False, None, 0)
    await pool.close()


@contextlib.asynccontextmanager
async def _burst_end(pg_url: str, prefix: str, waited: bool = False):
    """Three slots, three jobs pushed at once (so no backlog is left to hold): two of
    0.2 s (the first one waited on when ``waited``) and one of 1.2 s, with a tail wait
    far longer than that. Yields (pool, tag, [short, short, long] ids, worker)."""
    tag = prefix + uuid.uuid4().hex[:6]
    pool = await dbmod.create_pool(pg_url)
    async with pool.acquire() as conn, conn.transaction():
        ids = [await queue.push(conn, workspace="w", language="sleep", content="", args={"seconds": s},
                                tag=tag, notify_done=waited and i == 0)
               for i, s in enumerate([0.2, 0.2, 1.2])]
    w = Worker(profile_from_dict({"name": "tail", "tags": [tag], "native": True, "subworkers": 3}), pg_url,
               settings=WorkerSettings(poll_s=1.0, claim_ahead_after_s=0.0, completion_tail_wait_s=30.0))
    run = asyncio.create_task(w.run())
    try:
        yield pool, tag, ids, w
    finally:
        w.stop()
        await asyncio.wait_for(run, 20)
        await pool.close()


def _completed_at(pool, ids):
    return pool.fetch("SELECT id, completed_at FROM completed_job WHERE id = ANY($1)", ids)


async def test_the_last_completions_of_a_burst_share_one_statement(pg_url):
    """At a burst's end (no job in hand, no backlog), a slot's completion waits for those
    of the jobs still running: the last one's end sends them all in one statement."""
    async with _burst_end(pg_url, "cat-") as (pool, _, ids, _w):
        await _wait(_all_done(pool, ids))
        rows = await _completed_at(pool, ids)
    assert len({r["completed_at"] for r in rows}) == 1  # one statement, one transaction


async def test_a_job_someone_waits_on_is_not_held_back_at_a_burst_end(pg_url):
    async with _burst_end(pg_url, "caw-", waited=True) as (pool, _, ids, _w):
        await _wait(_all_done(pool, ids))
        at = {r["id"]: r["completed_at"] for r in await _completed_at(pool, ids)}
    assert at[ids[0]] < at[ids[2]]  # (the other short job's completion may go with it)


async def test_a_new_job_sends_the_completions_waiting_at_a_burst_end(pg_url):
    """Every slot is busy or waits on its completion: a pushed job is taken by the claim
    of a waiting completion, which the job's NOTIFY sends at once (not after the long job)."""
    async with _burst_end(pg_url, "can2-") as (pool, tag, ids, w):
        await _wait(_started(pool, ids[2]))
        await asyncio.sleep(0.5)  # the short jobs have ended: their completions wait
        assert len(w.running) == 1
        new = await _push(pool, tag)
        await _wait(_all_done(pool, ids + [new]))
        started = await pool.fetchval("SELECT started_at FROM completed_job WHERE id = $1", new)
        long_done = await pool.fetchval("SELECT completed_at FROM completed_job WHERE id = $1", ids[2])
    assert started < long_done - dt.timedelta(seconds=0.3)


async def test_a_job_costs_the_event_loop_one_timer(pg_url):
    """A job's heartbeat and the give-back of the jobs held behind it are due long after
    most jobs end: one watch for the worker covers them, not two timers set and cancelled
    on every job (the job's own wall-clock limit is its one timer)."""
    tag = "cat1-" + uuid.uuid4().hex[:6]
    pool = await dbmod.create_pool(pg_url)
    ids = [await _push(pool, tag) for _ in range(200)]
    async with _serving(pg_url, tag, completion_lazy_s=0.0) as w:
        loop = asyncio.get_running_loop()
        timers = 0
        call_at = loop.call_at

        def counted(*a, **k):
            nonlocal timers
            timers += 1
            return call_at(*a, **k)

        loop.call_at = counted
        try:
            await _wait(_all_done(pool, ids), timeout=30)
        finally:
            del loop.call_at
        assert w.stats.jobs_done == 200
    # the test's own 10 ms polls count too, more of them on a loaded machine; two timers
    # set and cancelled per job (the old way) came to 3.4 per job
    assert timers < 2 * len(ids), timers
    await pool.close()


async def test_the_watch_rests_while_the_only_jobs_are_long_and_pinging(pg_url):
    """Once every running job's heartbeat runs and nothing is held, the watch has nothing
    to come and stops: a worker with a long job does not wake for it five times a second."""
    tag = "caw2-" + uuid.uuid4().hex[:6]
    pool = await dbmod.create_pool(pg_url)
    long = await _push(pool, tag, "sleep", {"seconds": 2})
    async with _serving(pg_url, tag, job_ping_s=0.1, claim_ahead_hold_s=0.1) as w:
        await _wait(lambda: _const(long in w.running and w.running[long].heartbeat is not None))
        await asyncio.sleep(0.1)
        assert w.watch._timer is None
        await _wait(_all_done(pool, [long]))
    await pool.close()


async def test_a_lone_jobs_claim_ahead_not_sent_yet_rides_on_its_completion(pg_url):
    """A job that ends before its slot's claim of jobs to hold has gone out (it waits for
    company, completion_lazy_s): the claim is taken back and the completion asks for them
    instead; one statement and round trip less on a lone job's path (run_wait_result)."""
    tag = "cal-" + uuid.uuid4().hex[:6]
    pool = await dbmod.create_pool(pg_url)
    w = Worker(profile_from_dict({"name": "lone", "tags": [tag], "native": True, "subworkers": 1}), pg_url,
               settings=WorkerSettings(poll_s=1.0, claim_ahead_after_s=0.0, completion_lazy_s=5.0))
    ahead = count_batches(w.feed.ahead)
    sizes = count_completion_batches(w)
    run = asyncio.create_task(w.run())
    try:
        for _ in range(4):  # one at a time, each alone in the queue
            job = await _push(pool, tag)
            await _wait(_all_done(pool, [job]))
    finally:
        w.stop()
        await asyncio.wait_for(run, 20)
        await pool.close()
    assert ahead == [] and len(sizes) == 4, (ahead, sizes)


async def test_a_batcher_takes_back_only_what_has_not_gone_out():
    sent: list[list[str]] = []
    gate = asyncio.Event()

    async def run(reqs: list[str]) -> list[str]:
        sent.append(reqs)
        await gate.wait()
        return [r.upper() for r in reqs]

    b = Batcher(run)
    first = b.enqueue("a")  # goes out at once
    await asyncio.sleep(0)
    lazy, other = b.enqueue("b", wait_s=10), b.enqueue("c", wait_s=10)
    assert b.withdraw(lazy) and lazy.cancelled()
    assert not b.withdraw(first)  # in a statement already
    gate.set()
    b.flush()
    assert await first == "A" and await other == "C"
    assert sent == [["a"], ["c"]]
