"""Native jobs run in the worker's own task (no task of their own per job): their
timeout, an outside cancel, the result bound; and a job's log sink when nothing is logged."""

from __future__ import annotations

import asyncio
import uuid

import pytest

from worker import native
from worker.logs import LogSink
from worker.native import run_native


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

    monkeypatch.setattr("server.queue.append_logs", append_logs)
    sink = LogSink(None, uuid.uuid4())
    sink.on_output("stdout", b"no newline")
    await sink.close()
    assert written == ["no newline\n"]
