"""Native jobs run in the worker's own task (no task of their own per job): their
timeout, an outside cancel, the result bound; and a job's log sink when nothing is logged."""

from __future__ import annotations

import asyncio
import uuid

import pytest

from sandmill.worker import native
from sandmill.worker.logs import LogSink
from sandmill.worker.native import run_native


def _job(language: str, args: dict | None = None) -> dict:
    return {"id": uuid.uuid4(), "language": language, "content": "", "args": args}


async def test_noop_and_sleep_succeed():
    assert (await run_native(_job("noop"), 5)).status == "success"
    r = await run_native(_job("noop", {"value": {"a": [1, 2]}}), 5)
    assert (r.status, r.result, r.error) == ("success", {"a": [1, 2]}, None)
    assert (await run_native(_job("sleep", {"seconds": 0.01}), 5)).status == "success"


async def test_timeout_fails_the_job():
    r = await run_native(_job("sleep", {"seconds": 5}), 0.05)
    assert r.status == "failure"
    assert r.result["error"]["name"] == "Timeout"
    assert "0.05 s" in r.error


async def test_outside_cancel_is_not_a_timeout():
    """A cancel from the worker (job canceled, lost, shutdown) must reach the worker as a
    cancel, not come back as a timed-out job."""
    t = asyncio.create_task(run_native(_job("sleep", {"seconds": 5}), 10))
    await asyncio.sleep(0.02)
    t.cancel()
    with pytest.raises(asyncio.CancelledError):
        await t


async def test_result_bound(monkeypatch):
    monkeypatch.setattr(native, "MAX_RESULT_BYTES", 10)
    r = await run_native(_job("noop", {"value": "x" * 20}), 5)
    assert r.status == "failure" and r.result["error"]["name"] == "ResultTooLarge"


async def test_log_sink_with_nothing_logged_writes_nothing():
    sink = LogSink(None, uuid.uuid4())  # no database: any write would fail
    await sink.close()


async def test_log_sink_writes_a_partial_line_at_close(monkeypatch):
    written: list[str] = []

    async def append_logs(_db, _job_id, chunks):
        written.extend(chunks)

    monkeypatch.setattr("sandmill.store.queue.append_logs", append_logs)
    sink = LogSink(None, uuid.uuid4())
    sink.on_output("stdout", b"no newline")
    await sink.close()
    assert written == ["no newline\n"]


# ---- the worker running native jobs in its slots' tasks -------------------------------------

async def _wait(cond, timeout: float = 10):
    deadline = asyncio.get_running_loop().time() + timeout
    while not await cond():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.02)


async def test_worker_heartbeats_cancels_and_gives_up_native_jobs_and_its_slot_goes_on(pg_url):
    """One slot, jobs run in its own task: a long job gets its heartbeat (after about
    job_ping_s), a cancel kills it, a job taken away is dropped; after each the same slot
    runs the next job."""
    from sandmill.store import db as dbmod
    from sandmill.store import queue
    from sandmill.profiles import profile_from_dict
    from sandmill.worker.settings import WorkerSettings
    from sandmill.worker.worker import Worker

    tag = "nat-" + uuid.uuid4().hex[:6]
    w = Worker(profile_from_dict({"name": "nat", "tags": [tag], "native": True, "subworkers": 1}), pg_url,
               settings=WorkerSettings(job_ping_s=0.1, poll_s=1.0))
    run = asyncio.create_task(w.run())
    pool = await dbmod.create_pool(pg_url)

    async def push(language: str, args: dict) -> uuid.UUID:
        return await queue.push(pool, workspace="w", language=language, content="", args=args, tag=tag)

    async def completed(jid) -> dict | None:
        return await pool.fetchrow("SELECT status, error FROM completed_job WHERE id = $1", jid)

    try:
        long = await push("sleep", {"seconds": 30})
        await _wait(lambda: pool.fetchval("SELECT running FROM queue WHERE id = $1", long))
        first = await pool.fetchval("SELECT last_ping FROM queue WHERE id = $1", long)
        await _wait(lambda: pool.fetchval("SELECT last_ping > $2 FROM queue WHERE id = $1", long, first))
        assert await queue.cancel(pool, "w", long, "me", "enough") == "canceling"
        await _wait(lambda: completed(long))
        assert (await completed(long))["status"] == "canceled"

        after = await push("noop", {"value": 1})
        await _wait(lambda: completed(after))
        assert (await completed(after))["status"] == "success"

        taken = await push("sleep", {"seconds": 30})
        await _wait(lambda: pool.fetchval("SELECT running FROM queue WHERE id = $1", taken))
        await pool.execute("UPDATE queue SET worker = 'someone-else' WHERE id = $1", taken)
        await _wait(lambda: _not_running_here(w, taken))
        assert await completed(taken) is None  # not completed by the worker it was taken from

        last = await push("noop", {})
        await _wait(lambda: completed(last))
        assert (await completed(last))["status"] == "success"
    finally:
        w.stop()
        await asyncio.wait_for(run, 20)
        await pool.close()


async def _not_running_here(w, job_id) -> bool:
    return job_id not in w.running
